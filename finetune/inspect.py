"""`finetune inspect RECIPE`: what a recipe will train on, before any training.

Shows the detected format, row counts, token-length statistics, truncation and drops, the share of
trained tokens, padding at the configured batch size (with and without packing), a memory estimate
computed from the model config alone, and examples with the trained tokens highlighted.
"""

from __future__ import annotations

import json
import math
import os
import statistics

from rich.console import Console
from rich.table import Table
from rich.text import Text

from finetune import data, models
from finetune.recipe import Recipe

console = Console(highlight=False)


def percentile(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def padding_share(lengths: list[int], batch: int) -> float:
    """Share of padded positions when batches of `batch` examples are padded to their longest member."""
    total = padded = 0
    for i in range(0, len(lengths), batch):
        chunk = lengths[i:i + batch]
        total += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - total / padded if padded else 0.0


def packed_padding_share(lengths: list[int], max_length: int) -> float:
    """Best-fit-decreasing packing into rows of `max_length` (what TRL's `bfd` strategy does)."""
    bins: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, used in enumerate(bins) if used + n <= max_length]
        if fits:
            best = min(fits, key=lambda i: max_length - bins[i] - n)
            bins[best] += n
        else:
            bins.append(n)
    return 1 - sum(lengths) / (len(bins) * max_length) if bins else 0.0


def count_params(cfg) -> dict:
    """Parameter counts of a decoder-only transformer from its config (no weights needed)."""
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
              "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    linear = layers * sum(i * o for i, o in shapes.values())
    embed = vocab * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return {"linear": linear, "embedding": embed, "norms": layers * 2 * h + h, "shapes": shapes, "layers": layers,
            "hidden": h, "vocab": vocab, "heads": heads}


def memory_estimate(recipe: Recipe, cfg, dtype_bytes: int = 2) -> dict:
    """Rough training memory in GiB: weights, LoRA adapters, their gradients and AdamW state, activations."""
    p = count_params(cfg)
    per_weight = {"4bit": 0.5 + 0.5 / 64 * 4 / 8, "8bit": 1.0, "none": dtype_bytes}[recipe.model.quantization]
    weights = p["linear"] * per_weight + (p["embedding"] + p["norms"]) * dtype_bytes
    targets = recipe.lora.target_modules
    names = p["shapes"] if targets == "all-linear" else {k: v for k, v in p["shapes"].items() if k in targets}
    lora_params = p["layers"] * sum(recipe.lora.r * (i + o) for i, o in names.values())
    adapters = lora_params * 4 * 4  # fp32 weights + gradients + two AdamW moments
    tokens = recipe.training.batch_size * recipe.data.max_length
    gc = recipe.training.gradient_checkpointing is True
    # ~16 saved activations of width `hidden` per layer per token in 16-bit; one per layer with checkpointing
    act = tokens * p["hidden"] * p["layers"] * dtype_bytes * (2 if gc else 16)
    logits = tokens * p["vocab"] * 4 * 2  # fp32 logits and their gradient for the trained positions, at worst all
    gib = 2**30
    est = {"weights": weights / gib, "adapters_and_optimizer": adapters / gib, "activations": (act + logits) / gib}
    est["total"] = sum(est.values())
    est["lora_parameters"] = lora_params
    est["base_parameters"] = p["linear"] + p["embedding"] + p["norms"]
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in est.items()}


def available_memory_gib(device: str) -> float | None:
    try:
        if device == "cuda":
            import torch

            return torch.cuda.get_device_properties(0).total_memory / 2**30
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def statistics_for(recipe: Recipe, prepared: data.Prepared, tokenizer) -> dict:
    if prepared.format == "preference":
        lengths = [pair.length for pair in prepared.train]
        trained_share = None
    else:
        lengths = [len(e.input_ids) for e in prepared.train]
        trained = sum(sum(1 for t in e.labels[1:] if t != -100) for e in prepared.train)
        trained_share = trained / max(1, sum(lengths))
    b = recipe.training.batch_size
    return {
        "format": prepared.format,
        "rows": prepared.rows,
        "train_examples": len(prepared.train),
        "validation_examples": len(prepared.validation),
        "tokens": {"min": min(lengths), "median": int(statistics.median(lengths)), "p95": percentile(lengths, 0.95),
                   "max": max(lengths), "total": sum(lengths)},
        "truncated": prepared.truncated,
        "dropped": prepared.dropped,
        "trained_token_share": None if trained_share is None else round(trained_share, 4),
        "padding_share": {"batched": round(padding_share(lengths, b), 4),
                          "packed": round(packed_padding_share(lengths, recipe.data.max_length), 4),
                          "padding_free": 0.0},
        "files": prepared.files,
    }


def render_example(tokenizer, example: data.Example) -> Text:
    text = Text()
    for tok, label in zip(example.input_ids, example.labels):
        piece = tokenizer.decode([tok])
        text.append(piece, style="bold black on green" if label != -100 else "dim")
    return text


def run(recipe: Recipe, *, examples: int = 2, as_json: bool = False) -> None:
    from transformers import AutoConfig

    log = (lambda s: None) if as_json else (lambda s: console.print(f"[dim]{s}[/]"))
    base = models.resolve_base(recipe.model.base, log=log)
    tokenizer = models.load_tokenizer(base.path, recipe.model.trust_remote_code)
    method = "dpo" if recipe.dpo is not None else "sft"
    prepared = data.prepare(recipe.data, tokenizer, method, recipe.training.seed, log=log)
    stats = statistics_for(recipe, prepared, tokenizer)
    cfg = AutoConfig.from_pretrained(base.path, trust_remote_code=recipe.model.trust_remote_code)
    stats["memory_estimate_gib"] = memory_estimate(recipe, cfg)
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    t = Table(title=f"{recipe.name}: what will be trained", show_header=False)
    t.add_row("format", stats["format"])
    t.add_row("rows", f"{stats['rows']} read · {stats['train_examples']} train · {stats['validation_examples']} validation")
    tk = stats["tokens"]
    t.add_row("tokens per example", f"min {tk['min']} · median {tk['median']} · p95 {tk['p95']} · max {tk['max']} · total {tk['total']}")
    t.add_row("truncated / dropped", f"{stats['truncated']} truncated at {recipe.data.max_length} · dropped {data.describe_dropped(stats['dropped'])}")
    if stats["trained_token_share"] is not None:
        t.add_row("trained tokens", f"{stats['trained_token_share']:.1%} of all tokens (train_on: {recipe.data.train_on})")
    ps = stats["padding_share"]
    t.add_row("padding", f"{ps['batched']:.1%} at batch {recipe.training.batch_size} · {ps['packed']:.1%} packed · 0% padding-free")
    m = stats["memory_estimate_gib"]
    t.add_row("memory estimate", f"{m['total']:.2f} GiB = weights {m['weights']:.2f} + adapters/optimizer {m['adapters_and_optimizer']:.2f} "
              f"+ activations {m['activations']:.2f} ({recipe.model.quantization}, {m['lora_parameters']:,} LoRA parameters)")
    console.print(t)
    if prepared.format != "preference":
        console.print("[bold]examples[/] ([bold black on green]trained[/], [dim]not trained[/]):")
        for e in prepared.train[:examples]:
            console.print(f"[dim]── {e.where}{' (truncated)' if e.truncated else ''}[/]")
            console.print(render_example(tokenizer, e))
    else:
        for r in prepared.train[:examples]:
            console.print(f"[dim]── {r.where}{' (truncated)' if r.truncated else ''}[/]\n[dim]{r.prompt}[/][green]{r.chosen}[/]  [red](rejected: {r.rejected})[/]")
