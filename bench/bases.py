"""Bases for bench/run.py beyond the built-in one, built offline, and what a GPU's speed is measured against.

`--base llama-3.2-1b` / `--base llama-3.1-8b` build a model with the real architecture's config (Meta's published
config.json values, written out below) and random weights, next to the built-in base's tokenizer (its ids fit
in the larger vocabulary). Speed and memory depend on the shapes, not on the weights, so these stand in for
the real models where the hub is out of reach. `--layers N` keeps the shapes and cuts the depth (CPU checks).
"""

from __future__ import annotations

from pathlib import Path

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CONFIGS = {
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={**LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True, hidden_act="silu",
                         bos_token_id=128000, eos_token_id=128001),
    # meta-llama/Llama-3.1-8B config.json
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False, hidden_act="silu",
                         bos_token_id=128000, eos_token_id=128001),
}

# dense bf16 tensor-core peak from each vendor's data sheet (TFLOP/s, without sparsity); the first name
# contained in torch.cuda.get_device_name() wins, so the more specific names come first
GPU_BF16_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("A6000", 155.0),
]


def spec_peak_tflops(device_name: str | None) -> float | None:
    """The data-sheet bf16 peak of a GPU by name, or None for one not in the table (MFU is then not reported)."""
    for name, tflops in GPU_BF16_TFLOPS:
        if device_name and name.lower() in device_name.lower():
            return tflops
    return None


def build(name: str, folder: Path, tokenizer_from: Path, layers: int | None = None, device: str = "cpu") -> Path:
    """Save a random-weight model of `name`'s shape (bf16) with the tokenizer of `tokenizer_from` under `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = dict(CONFIGS[name])
    if layers:
        cfg["num_hidden_layers"] = layers
    out = folder / f"{name}{f'-{layers}l' if layers else ''}"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    # the built-in tokenizer's own special tokens, so templates, padding and stopping work as on the real base
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device if device == "cuda" and torch.cuda.is_available() else "cpu"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: an 8B model in fp32 would need 32 GB
        try:
            model = LlamaForCausalLM(LlamaConfig(**cfg))
        finally:
            torch.set_default_dtype(previous)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def flops_per_token(config, seq_len: float, lora: bool = True) -> float:
    """Training FLOPs per token from the model's own shapes: 2 per multiply-add of every matmul weight
    (attention and MLP projections, output head) plus causal attention's scores and weighted sum, times 2
    for LoRA (forward, and the gradient of the inputs; frozen weights get none) or 3 for full training."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers, inter, v = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    matmul_weights = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + h * v
    # QK^T and AV: 2 x q x (seq_len / 2) multiply-adds a token per layer (a causal token sees half the sequence on average)
    attention = layers * 2 * q * seq_len
    forward = 2 * matmul_weights + attention
    return forward * (2 if lora else 3)
