"""finetune: LoRA / QLoRA fine-tuning driven by YAML recipes, built on transformers, PEFT and TRL."""

__version__ = "0.1.0"
