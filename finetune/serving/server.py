"""Start `finetune serve`: check the command line before anything loads, load the engine, run uvicorn.

Safe by default: binds 127.0.0.1; any other address needs --api-key (or FINETUNE_API_KEY) or an
explicit --no-auth. SIGTERM and Ctrl-C end the server through uvicorn's own graceful shutdown; open
streams are cancelled, which stops their generation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from rich.console import Console

from finetune import models
from finetune.errors import UserError

err = Console(stderr=True, highlight=False)
LOCAL = {"127.0.0.1", "localhost", "::1"}


def check(specs: list[str], host: str, port: int, api_key: str | None, no_auth: bool, max_tokens: int, max_batch: int) -> None:
    from finetune.serving.engine import parse_spec

    if not specs:
        raise UserError("name at least one model: a base, an adapter folder, or a merged folder")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (0-65535)")
    if host not in LOCAL and not api_key and not no_auth:
        raise UserError(f"--host {host} makes the server reachable from other machines: add --api-key KEY (or set "
                        "FINETUNE_API_KEY), or --no-auth if the network is trusted")
    if api_key is not None and len(api_key) < 8:
        raise UserError("--api-key is shorter than 8 characters — use a longer, random key")
    if max_tokens < 1 or max_batch < 1:
        raise UserError("--max-tokens and --max-batch must be at least 1")
    for spec in specs:
        _, path = parse_spec(spec)
        p = Path(path).expanduser()
        if p.exists() or path in models.BUILTINS:
            if p.is_dir() and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
                raise UserError(f"{path}: neither a model folder (config.json) nor an adapter folder (adapter_config.json)")
            continue
        if path.count("/") == 1 and not path.startswith((".", "/", "~")):
            continue  # a hub id: load_any reports it if it cannot be fetched
        raise UserError(f"model `{path}` not found: not a built-in alias, folder, .gguf file or hub id — see `finetune models`")


def run(specs: list[str], *, host: str, port: int, api_key: str | None, no_auth: bool, engine: str, dtype: str,
        quantization: str | None, max_tokens: int, max_body_bytes: int, max_batch: int, threads: int = 0) -> None:
    api_key = api_key or os.environ.get("FINETUNE_API_KEY") or None
    check(specs, host, port, api_key, no_auth, max_tokens, max_batch)
    if engine == "vllm":
        return run_vllm(specs, host=host, port=port, api_key=api_key)
    if engine != "transformers":
        raise UserError(f"--engine {engine!r} is not known — use transformers (default) or vllm")
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UserError("serving needs fastapi and uvicorn — run scripts/setup.sh, or pip install 'finetune[serve]'")
    import uvicorn

    from finetune.serving.api import Limits, create_app
    from finetune.serving.engine import Engine

    eng = Engine(specs, dtype=dtype, quantization=quantization, max_batch=max_batch, threads=threads or None, log=err.print)
    app = create_app(eng, Limits(max_body_bytes=max_body_bytes, max_tokens=max_tokens, api_key=api_key))
    eng.start()
    shown = f"[{host}]" if ":" in host else host
    if "threads" in eng.stats:
        err.print(f"generating in {eng.dtype} with {eng.threads} CPU thread{'s' if eng.threads > 1 else ''}")
    err.print(f"[bold]serving[/] {', '.join(eng.models)} on http://{shown}:{port} "
              f"(chat page at /, OpenAI API at /v1{'; API key required' if api_key else ''}) · Ctrl-C stops")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3,
                            limit_concurrency=256)
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would die by the signal;
    # handling them here gives the same shutdown, then a normal exit (0) with the engine stopped
    server.capture_signals = contextlib.nullcontext

    def on_signal(sig, frame):
        eng.begin_shutdown()
        server.handle_exit(sig, frame)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        eng.stop()
    err.print("[dim]server stopped[/]")


def run_vllm(specs: list[str], *, host: str, port: int, api_key: str | None) -> None:
    """Hand one base and its adapters to vLLM's own OpenAI server (GPU engine with multi-LoRA serving)."""
    from finetune.serving.engine import parse_spec

    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        raise UserError("--engine vllm needs vLLM, which is not installed — pip install vllm on a machine with a "
                        "supported GPU, or leave out --engine to use the built-in engine")
    base, loras, rank = None, [], 8
    for spec in specs:
        name, path = parse_spec(spec)
        info = models.adapter_info(Path(path)) if Path(path).is_dir() else None
        if info is None:
            b = path
            loras_name = None
        else:
            b, loras_name = info["base"], name or Path(path).name
            loras.append(f"{loras_name}={path}")
            rank = max(rank, int(info["config"].get("r", 8)))
        if base is not None and b != base:
            raise UserError(f"--engine vllm serves one base with its adapters; got `{base}` and `{b}` — start one server per base")
        base = b
    resolved = models.resolve_base(base, err.print)
    argv = ["vllm", "serve", resolved.path, "--host", host, "--port", str(port), "--served-model-name", Path(base).name]
    if loras:
        argv += ["--enable-lora", "--max-lora-rank", str(rank), "--lora-modules", *loras]
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key  # not on the command line, where other users could read it
    err.print("[bold]starting vLLM:[/] " + " ".join(json.dumps(a) if " " in a else a for a in argv))
    code = subprocess.call(argv, env=env)
    if code:
        raise SystemExit(code)
