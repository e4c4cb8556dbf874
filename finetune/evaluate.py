"""`finetune eval MODEL... --data FILE`: perplexity of bases, adapters and merged models, side by side.

Plain text (`.txt`, or rows with only a `text` field) is scored as whole documents with a sliding
window: every token after the first is scored exactly once, with as much left context as the window
allows. Chat and instruction data is scored on the tokens training would train on (same template and
masks), so the number agrees with training's eval loss. Perplexity = exp(token-weighted mean NLL).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from finetune import data, models
from finetune.errors import UserError
from finetune.recipe import DataSection
from finetune.speed import reuse_freed_memory, trained_positions_loss

err = Console(stderr=True, highlight=False)


def windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """Split one document into (input_ids, labels) windows. Window k scores the next `stride` tokens
    not yet scored; the tokens before them in the window are context (labels -100)."""
    stride = min(stride, max_length - 1)  # a window of L tokens predicts at most L-1 of them
    out = []
    scored = 1  # token 0 has no left context
    while scored < len(ids):
        end = min(scored + stride, len(ids))
        start = max(0, end - max_length)
        window = ids[start:end]
        labels = [-100] * (scored - start) + window[scored - start:]
        out.append((window, labels))
        scored = end
    return out


def nll_sum(model, input_ids, attention_mask, labels) -> tuple[float, int]:
    """Sum of negative log-likelihoods over positions whose label is not -100, and their count; the
    same computation as training's loss, so full-vocabulary fp32 logits for a batch never exist at once."""
    total, count = trained_positions_loss(model, {"input_ids": input_ids, "attention_mask": attention_mask}, labels)
    return float(total), int(count)


def score(model, pad_id: int, items: list[tuple[list[int], list[int]]], batch_size: int, show_progress: bool = False) -> tuple[float, int]:
    """Token-weighted NLL over (input_ids, labels) items, batched with right padding."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))  # similar lengths together: less padding
    total, count = 0.0, 0
    with Progress(console=err, transient=True, disable=not show_progress) as progress:
        task = progress.add_task("scoring", total=len(items))
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                chunk = [items[i] for i in order[b:b + batch_size]]
                width = max(len(x) for x, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                att = torch.zeros_like(ids)
                lab = torch.full_like(ids, -100)
                for row, (x, y) in enumerate(chunk):
                    ids[row, : len(x)] = torch.tensor(x)
                    att[row, : len(x)] = 1
                    lab[row, : len(y)] = torch.tensor(y)
                # equal-length rows need no mask: attention takes its fast causal path
                mask = None if all(len(x) == width for x, _ in chunk) else att.to(device)
                s, n = nll_sum(model, ids.to(device), mask, lab.to(device))
                total += s
                count += n
                progress.advance(task, len(chunk))
    return total, count


def is_plain_text(path: Path) -> bool:
    if path.suffix == ".txt":
        return True
    rows, _ = data.read(str(path), {})
    return data.detect(rows[0].data, rows[0].where) == "text"


def items_for(path: Path, tokenizer, max_length: int, stride: int) -> tuple[str, list]:
    if is_plain_text(path):
        if path.suffix == ".txt":
            docs = [path.read_text(encoding="utf-8")]
        else:
            docs = [data.to_messages(r.data, "text", r.where)["text"] for r in data.read(str(path), {})[0]]
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise UserError(f"{path}: no text to score — the file is empty")
        items = []
        for d in docs:
            ids = tokenizer(d, add_special_tokens=True)["input_ids"]  # BOS only where this tokenizer adds one
            items += windows(ids, max_length, stride)
        if not items:
            raise UserError(f"{path}: the text is a single token — nothing to score")
        return "text", items
    prepared = data.prepare(DataSection(train=str(path), max_length=max_length), tokenizer, "sft", 0, log=lambda s: None)
    return prepared.format, [(e.input_ids, e.labels) for e in prepared.train]


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of how a tokenizer cuts text into tokens: its vocabulary and merges (plus normalizer and
    pre-tokenizer for fast tokenizers). Padding, truncation and chat-template settings are left out: they
    do not change the tokens a text becomes."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        key = json.dumps({k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer")}, sort_keys=True)
    else:
        key = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def comparability(results: list[dict]) -> str | None:
    """Why the perplexities in one table cannot be compared, or None when they can. Perplexity is per
    token: a model whose tokenizer cuts the same text into fewer, longer tokens scores differently even
    with the same knowledge of the text."""
    if len({r["tokenizer"] for r in results}) <= 1:
        return None
    which = ", ".join(f"{r['model']} ({r['tokenizer']}, {r['tokens']} tokens)" for r in results)
    return (f"the models use different tokenizers, so their perplexities per token cannot be compared: {which}. "
            "Compare models that share a tokenizer (a base with its adapters and merges).")


def reading(r: dict, ref: dict) -> str:
    """One line in plain words: how much better (or worse) a model fits the text than the reference model."""
    change = 100 * (r["perplexity"] - ref["perplexity"]) / ref["perplexity"]
    if abs(change) < 0.05:
        how = "fits this text as well as"
    else:
        how = f"fits this text {abs(change):.1f} % {'better' if change < 0 else 'worse'} than"
    return f"{r['model']} {how} {ref['model']} (perplexity {r['perplexity']:.3f} vs {ref['perplexity']:.3f})"


def evaluate_model(spec: str, path: Path, *, max_length: int, stride: int | None, batch_size: int | None,
                   quantization: str | None, dtype: str = "auto", show_progress: bool = True) -> dict:
    from finetune import llamacpp

    if llamacpp.is_gguf_file(spec):  # a GGUF is scored in llama.cpp itself: same text, same windows
        llamacpp.require()
        tok = llamacpp.tokenizer(Path(spec))
        data.ensure_chat_template(tok)
        kind, items = items_for(path, tok, max_length, stride or max_length)
        start = time.perf_counter()
        total, count = llamacpp.score(Path(spec), items, max_length)
        wall = time.perf_counter() - start
        return {"model": spec, "kind": "gguf", "data": str(path), "data_format": kind, "tokenizer": tokenizer_fingerprint(tok),
                "tokens": count, "nll": total / count,
                "perplexity": math.exp(total / count), "wall_s": round(wall, 3), "tokens_per_s": round(count / wall, 1) if wall > 0 else None}
    loaded, adapter = models.load_any(spec, quantization=quantization, dtype=dtype, log=err.print)
    data.ensure_chat_template(loaded.tokenizer)
    kind, items = items_for(path, loaded.tokenizer, max_length, stride or max_length)
    if batch_size is None:
        batch_size = 1 if loaded.device == "cpu" else 8
    if loaded.device == "cpu":
        reuse_freed_memory()  # each window's activations reuse the last one's pages (see speed.py)
    start = time.perf_counter()
    total, count = score(loaded.model, loaded.tokenizer.pad_token_id or 0, items, batch_size, show_progress)
    wall = time.perf_counter() - start
    nll = total / count
    return {"model": spec, "kind": "adapter" if adapter else "model", "data": str(path), "data_format": kind,
            "tokenizer": tokenizer_fingerprint(loaded.tokenizer), "tokens": count, "nll": nll, "perplexity": math.exp(nll), "wall_s": round(wall, 3),
            "tokens_per_s": round(count / wall, 1) if wall > 0 else None}


def run(specs: list[str], data_path: Path, *, max_length: int, stride: int | None, batch_size: int | None,
        quantization: str | None, as_json: bool, dtype: str = "auto") -> list[dict]:
    if max_length < 2:
        raise UserError("--max-length must be at least 2")
    if stride is not None and stride < 1:
        raise UserError("--stride must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if not data_path.is_file():
        raise UserError(f"{data_path}: data file not found — pass --data with a .txt, .jsonl, .json, .csv or .parquet file")
    results = [evaluate_model(s, data_path, max_length=max_length, stride=stride, batch_size=batch_size,
                              quantization=quantization, dtype=dtype, show_progress=not as_json) for s in specs]
    why = compare(results)
    if why:
        err.print(f"[bold yellow]warning:[/] {why}", soft_wrap=True)
    if as_json:
        print(json.dumps(results, indent=2))
        return results
    Console().print(table(results, f"perplexity on {data_path}"))
    for r in results:
        if "reading" in r:
            Console(highlight=False, soft_wrap=True).print(r["reading"])
    return results


def compare(results: list[dict]) -> str | None:
    """Mark each result comparable or not and give the later ones their change from the first (the base,
    usually) with a one-line reading; returns why they cannot be compared, or None."""
    why = comparability(results)
    ref = results[0]  # the first model listed (the base, usually) is what the others are read against
    for r in results:
        r["comparable"] = why is None
        if why:
            r["not_comparable_because"] = why
        elif r is not ref:
            r["perplexity_change_pct"] = 100 * (r["perplexity"] - ref["perplexity"]) / ref["perplexity"]
            r["reading"] = reading(r, ref)
    return why


def table(results: list[dict], title: str) -> Table:
    """The perplexity table of compared results (`compare` first), as `finetune eval` prints it."""
    ref, why = results[0], results[0].get("not_comparable_because")
    t = Table(title=title + (" [yellow](different tokenizers: not comparable)[/]" if why else ""))
    cols = ("model", "tokens", "mean NLL", "perplexity", f"vs {ref['model']}", "wall (s)", "tokens/s") + (("tokenizer",) if why else ())
    for col in cols:
        # model paths wrap instead of being cut: two GGUF files of one export differ only at their end
        t.add_column(col, justify="left" if col in ("model", "tokenizer") else "right", overflow="fold")
    for r in results:
        change = f"{r['perplexity_change_pct']:+.1f} %" if "perplexity_change_pct" in r else "—"
        t.add_row(r["model"], str(r["tokens"]), f"{r['nll']:.4f}", f"{r['perplexity']:.3f}", change, f"{r['wall_s']:.2f}",
                  str(r["tokens_per_s"]), *((r["tokenizer"],) if why else ()))
    return t


def as_text(results: list[dict], title: str, width: int = 120) -> str:
    """The table and the readings as plain text, for a file beside a run's other results."""
    import io

    buf = io.StringIO()
    console = Console(file=buf, width=width, highlight=False, soft_wrap=True, color_system=None)
    console.print(table(results, title))
    for r in results:
        if "reading" in r:
            console.print(r["reading"])
    return buf.getvalue()


def base_and_adapter(model, pad_id: int, items: list[tuple[list[int], list[int]]], batch_size: int,
                     base_name: str, adapter_name: str, tokenizer) -> list[dict]:
    """Perplexity of a PEFT model's base (adapters disabled) and of the model with its adapter, on the same
    items, compared as `finetune eval BASE ADAPTER` compares them (training's final evaluation)."""
    from accelerate.utils import extract_model_from_parallel

    fingerprint = tokenizer_fingerprint(tokenizer)
    results = []
    for name, off in ((base_name, True), (adapter_name, False)):
        peft = extract_model_from_parallel(model)
        with peft.disable_adapter() if off else contextlib.nullcontext():
            start = time.perf_counter()
            total, count = score(model, pad_id, items, batch_size)
            wall = time.perf_counter() - start
        nll = total / max(1, count)
        results.append({"model": name, "kind": "base" if off else "adapter", "tokenizer": fingerprint, "tokens": count, "nll": nll,
                        "perplexity": math.exp(min(nll, 50)), "wall_s": round(wall, 3),
                        "tokens_per_s": round(count / wall, 1) if wall > 0 else None})
    compare(results)
    return results
