"""`finetune serve`: an OpenAI-compatible server (and a web chat page) for bases, adapters and merged models.

engine.py loads the models and batches generation; api.py is the HTTP layer; server.py checks the
command line, then runs uvicorn (or hands the models to vLLM's own server with --engine vllm).
"""
