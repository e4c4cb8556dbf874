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
from finetune.errors import UserError
from finetune.recipe import Recipe

console = Console(highlight=False)


def percentile(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def padding_share(lengths: list[int], batch: int, max_length: int | None = None) -> float:
    """Share of padded positions when batches of `batch` examples are padded to their longest member
    (each example first cut at `max_length`, as training does)."""
    if max_length is not None:
        lengths = [min(n, max_length) for n in lengths]
    total = padded = 0
    for i in range(0, len(lengths), batch):
        chunk = lengths[i:i + batch]
        total += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - total / padded if padded else 0.0


def packed_padding_share(lengths: list[int], max_length: int) -> float:
    """Unused share of the `max_length` rows that best-fit-decreasing packing fills (TRL's `bfd` strategy).
    A longer example is cut at `max_length` first: counting its full length made a row hold more than fits,
    and the share came out negative."""
    lengths = [min(n, max_length) for n in lengths]
    bins: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, used in enumerate(bins) if used + n <= max_length]
        if fits:
            best = min(fits, key=lambda i: max_length - bins[i] - n)
            bins[best] += n
        else:
            bins.append(n)
    return 1 - sum(lengths) / (len(bins) * max_length) if bins else 0.0


def count_params(cfg, lora=None, trust_remote_code: bool = False) -> dict:
    """Parameter counts of the model a config describes, and of the LoRA adapters `lora` (a recipe's LoRA
    section) would add. The model is built on the meta device (shapes only: no memory, no weights read)
    and PEFT attaches the adapters as training does, so the counts are exact for any architecture
    (fused QKV projections, tied heads, MoE) instead of guessed from Llama's module names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        head = model.get_output_embeddings()
        # what bitsandbytes quantizes: every linear layer (GPT-2 style Conv1D included) except the output head
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head)
        out = {"parameters": sum(p.numel() for p in model.parameters()), "linear": linear,
               "hidden": text.hidden_size, "layers": text.num_hidden_layers, "vocab": text.vocab_size,
               "intermediate": getattr(text, "intermediate_size", None) or 4 * text.hidden_size}
        if lora is not None:
            config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                                use_dora=lora.use_dora, use_rslora=lora.use_rslora, task_type="CAUSAL_LM")
            try:
                out["lora"] = get_peft_model(model, config).get_nb_trainable_parameters()[0]
            except ValueError as exc:
                raise UserError(f"lora.target_modules: {str(exc).splitlines()[0][:300]} — use all-linear or names such as q_proj, v_proj") from None
    return out


# Measured on CPU (tests/test_inspect.py): what the process holds besides the model and its training state
# (the libraries themselves, those loaded during the run, tokenized data, the trainer). On CUDA the reported
# peak is the allocator's, which holds none of it.
RUNTIME_GIB = {"cpu": 0.75, "cuda": 0.0, "mps": 0.0}
# Measured with TRL 1.16's DPO loss (tests/test_inspect.py): at its peak it holds about ten tensors the size
# of the full-vocabulary logits of all rows (policy and reference logits, their log-softmax, the gradients).
DPO_LOGIT_COPIES = 10
# On CUDA, GPU memory the tensors never see: the CUDA context with its kernels (cuBLAS, cuDNN; commonly
# 0.3-0.7 GiB per process, not in torch's counters) and the caching allocator's slack, blocks reserved but
# not holding a tensor at the peak (reserved over allocated; ~10 % in typical training runs).
CUDA_CONTEXT_GIB = 0.5
ALLOCATOR_SLACK = 0.10


def resolve_gradient_checkpointing(recipe: Recipe, device: str, parameters: int, method: str) -> bool:
    """What training will choose (speed.gradient_checkpointing), from the recipe and the parameter count alone."""
    from finetune.speed import gradient_checkpointing

    return gradient_checkpointing(recipe.training.gradient_checkpointing, device, parameters, method)


def memory_estimate(recipe: Recipe, cfg, dtype_bytes: int = 2, *, method: str | None = None, device: str | None = None,
                    length: int | None = None) -> dict:
    """Peak training memory in GiB, for a batch of examples `length` tokens long (default `data.max_length`,
    the worst case; batches are padded to their longest example, so the data's longest sets the peak).

    weights: the base (4-bit: half a byte per linear weight plus its quantization constants). A quantized base's
    other weights (embeddings, norms, output head) are fp32: PEFT's kbit preparation upcasts them.
    adapters_and_optimizer: LoRA weights, gradients and two AdamW moments, all fp32.
    activations: what backward keeps per token and layer (norm, attention and MLP inputs and outputs,
    LoRA inputs), or only each layer's input plus one recomputed layer with gradient checkpointing.
    DPO runs chosen and rejected together (twice the rows) and its loss holds full-vocabulary fp32 logits;
    SFT's loss runs over trained positions in chunks (speed.py), so only a chunk's logits exist at once.
    runtime: the process around it (see RUNTIME_GIB).
    cuda_context and allocator_slack: on CUDA only (see CUDA_CONTEXT_GIB); what to hold against the GPU's free
    memory is the total, what torch reports as allocated at the peak is the total without them."""
    from finetune.speed import CHUNK

    method = method or method_of(recipe)
    device = device or models.pick_device(recipe.model.device)
    p = count_params(cfg, recipe.lora, recipe.model.trust_remote_code)
    h, layers, vocab, inter = p["hidden"], p["layers"], p["vocab"], p["intermediate"]
    # NF4 with double quantization: 4 bits a weight plus an 8-bit scale per block of 64; int8: a byte plus a row scale
    per_linear = {"4bit": 0.5 + 1 / 64, "8bit": 1.0 + 4 / h, "none": dtype_bytes}[recipe.model.quantization]
    quantized = recipe.model.quantization != "none"
    other_bytes = 4 if quantized else dtype_bytes  # prepare_model_for_kbit_training casts them to fp32
    weights = p["linear"] * per_linear + (p["parameters"] - p["linear"]) * other_bytes
    adapters = p["lora"] * 16  # fp32 weights + gradients + two AdamW moments
    rows = recipe.training.batch_size * (2 if method in (*PAIRED_FORWARD, "reward") else 1)
    tokens = rows * min(length or recipe.data.max_length, recipe.data.max_length)
    per_layer = 16 * h + 4 * inter  # elements kept per token and layer without checkpointing
    if resolve_gradient_checkpointing(recipe, device, p["parameters"], method):
        act = tokens * (layers * h + per_layer) * dtype_bytes
    else:
        act = tokens * layers * per_layer * dtype_bytes
    if method in PAIRED_FORWARD:
        head = DPO_LOGIT_COPIES * tokens * vocab * 4
    elif method == "reward":
        head = tokens * h * 4  # one score per sequence: no vocabulary-wide logits
    else:
        head = 3 * min(CHUNK, tokens) * vocab * 4 + tokens * h * 4  # one chunk's logits, softmax and gradient
        if quantized and dtype_bytes < 4:
            head += vocab * h * dtype_bytes  # the fp32 head's copy in the run's dtype, for the loss's matmuls
    gib = 2**30
    est = {"weights": weights / gib, "adapters_and_optimizer": adapters / gib, "activations": (act + head) / gib,
           "runtime": RUNTIME_GIB.get(device, 0.0)}
    cuda = device == "cuda"
    est["cuda_context"] = CUDA_CONTEXT_GIB if cuda else 0.0
    est["allocator_slack"] = ALLOCATOR_SLACK * (weights + adapters + act + head) / gib if cuda else 0.0
    est["total"] = sum(est.values())
    est["lora_parameters"] = p["lora"]
    est["base_parameters"] = p["parameters"]
    est["method"] = method
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in est.items()}


def available_memory_gib(device: str) -> float | None:
    """Memory this process can use, to hold against the estimate's total. On CUDA: the GPU's *free* memory
    (other processes' use is not ours to take), plus what this process already holds (its cached blocks and,
    since asking creates it, its context: both are counted in the estimate)."""
    try:
        if device == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info()
            return (free + torch.cuda.memory_reserved()) / 2**30 + CUDA_CONTEXT_GIB
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


# methods whose trainer runs chosen and rejected together and holds their full-vocabulary logits
PAIRED_FORWARD = ("dpo", "orpo")


def method_of(recipe: Recipe) -> str:
    """The training command a recipe is for, from its method section."""
    from finetune.recipe import METHOD_SECTIONS

    return next((m for m in METHOD_SECTIONS if getattr(recipe, m) is not None), "sft")


def statistics_for(recipe: Recipe, prepared: data.Prepared, tokenizer) -> dict:
    paired = prepared.format == "preference" or bool(prepared.train) and hasattr(prepared.train[0], "label")  # pairs, or KTO's answers
    if paired:
        lengths = [pair.length for pair in prepared.train]
        trained_share = None
    elif isinstance(prepared.train, data.Examples):  # columns: counted without a Python int per token
        ex = prepared.train
        lengths = ex.lengths().tolist()
        firsts = ex.offsets[:-1][ex.lengths() > 0]  # the first label of an example is never predicted
        trained = int((ex.labels != -100).sum() - (ex.labels[firsts] != -100).sum())
        trained_share = trained / max(1, sum(lengths))
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
        "padding_share": {"batched": round(padding_share(lengths, b, recipe.data.max_length), 4),
                          # TRL packs SFT data only; preference pairs are never packed
                          "packed": None if paired else round(packed_padding_share(lengths, recipe.data.max_length), 4),
                          "padding_free": 0.0},
        "files": prepared.files,
    }


def clean_counts(recipe: Recipe, tokenizer) -> dict:
    """What `finetune data clean` would remove, change or flag in the training data (nothing is written)."""
    from finetune.data import clean
    from finetune.data.read import read as read_rows
    from finetune.data.sources import read_train

    rows, _, _ = read_train(recipe.data.model_copy(update={"columns": {}}), recipe.training.seed)
    val = read_rows(recipe.data.validation, {})[0] if isinstance(recipe.data.validation, str) else None
    report, _ = clean.analyse(rows, val, columns=recipe.data.columns, max_length=recipe.data.max_length, tokenizer=tokenizer)
    return report.counts()


def clean_hint(recipe: Recipe, tokenizer) -> str:
    """For data the trainer refuses: what `finetune data clean` would remove, when it finds anything."""
    try:
        removed = clean_counts(recipe, tokenizer)["removed"]
    except UserError:
        return ""
    if not removed:
        return ""
    return f" (`finetune data clean` would remove {', '.join(f'{n} {why}' for why, n in removed.items())})"


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
    method = method_of(recipe)
    if method == "grpo":
        raise UserError("finetune inspect reads SFT, DPO, KTO, ORPO and reward recipes; a GRPO recipe's data are prompts, which "
                        "`finetune grpo` checks row by row before the model loads — run it with training.max_steps: 1 to try them")
    try:
        prepared = data.prepare(recipe.data, tokenizer, method, recipe.training.seed, log=log)
    except UserError as exc:
        raise UserError(f"{exc}{clean_hint(recipe, tokenizer)}") from None
    stats = statistics_for(recipe, prepared, tokenizer)
    stats["clean"] = clean_counts(recipe, tokenizer)
    cfg = AutoConfig.from_pretrained(base.path, trust_remote_code=recipe.model.trust_remote_code)
    device = models.pick_device(recipe.model.device)
    dtype_bytes = models.pick_dtype(recipe.model.dtype, device).itemsize
    # for this data's longest example; the recipe's max_length is the bound for any data
    stats["memory_estimate_gib"] = memory_estimate(recipe, cfg, dtype_bytes, method=method, device=device, length=stats["tokens"]["max"])
    stats["memory_estimate_at_max_length_gib"] = memory_estimate(recipe, cfg, dtype_bytes, method=method, device=device)["total"]
    if device == "cuda":  # what the estimate must fit in: free GPU memory, not the card's size
        stats["memory_available_gib"] = round(available_memory_gib(device) or 0.0, 2)
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
    packed = f"packing not used for {method.upper()}" if ps["packed"] is None else f"{ps['packed']:.1%} of packed rows unused"
    t.add_row("padding", f"{ps['batched']:.1%} at batch {recipe.training.batch_size} · {packed} · 0% padding-free")
    c = stats["clean"]
    t.add_row("data clean would", "; ".join(f"{a} {', '.join(f'{n} {why}' for why, n in c[a].items())}" for a in ("removed", "changed", "flagged")
                                            if c[a]) or "change nothing (finetune data clean)")
    m = stats["memory_estimate_gib"]
    t.add_row("memory estimate", f"{m['total']:.2f} GiB = weights {m['weights']:.2f} + adapters/optimizer {m['adapters_and_optimizer']:.2f} "
              f"+ activations and logits {m['activations']:.2f} + runtime {m['runtime']:.2f}"
              + (f" + CUDA context {m['cuda_context']:.2f} + allocator slack {m['allocator_slack']:.2f}" if m["cuda_context"] else "")
              + f" ({method}, {recipe.model.quantization}, "
              f"{m['lora_parameters']:,} LoRA parameters) · {stats['memory_estimate_at_max_length_gib']:.2f} GiB for examples of "
              f"max_length {recipe.data.max_length}"
              + (f" · {stats['memory_available_gib']:.2f} GiB available on the GPU" if "memory_available_gib" in stats else ""))
    console.print(t)
    if method == "kto":
        for e in prepared.train[:examples]:
            mark = "[green](desirable)[/]" if e.label else "[red](undesirable)[/]"
            console.print(f"[dim]── {e.where}{' (truncated)' if e.truncated else ''}[/]\n[dim]{e.prompt}[/]{e.completion}  {mark}")
    elif prepared.format != "preference":
        console.print("[bold]examples[/] ([bold black on green]trained[/], [dim]not trained[/]):")
        for e in prepared.train[:examples]:
            console.print(f"[dim]── {e.where}{' (truncated)' if e.truncated else ''}[/]")
            console.print(render_example(tokenizer, e))
    else:
        for r in prepared.train[:examples]:
            console.print(f"[dim]── {r.where}{' (truncated)' if r.truncated else ''}[/]\n[dim]{r.prompt}[/][green]{r.chosen}[/]  [red](rejected: {r.rejected})[/]")
