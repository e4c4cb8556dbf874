"""What makes training fast on each device: the settings chosen automatically (recorded in the manifest),
and the pieces of work no library does for us on a CPU (measured in bench/, see docs/benchmarks.md):

- a cross-entropy over the trained positions only, computed in chunks with its input gradient formed in
  the forward pass, so (tokens x vocabulary) fp32 logits never exist at once;
- per-sequence causal attention for padding-free batches, instead of one dense block-diagonal mask over
  the whole flattened batch (cost: sum of squared lengths instead of the square of their sum);
- LoRA layers that leave their input in the autocast dtype instead of copying it to fp32 per adapter;
- on Linux CPUs, freed memory kept in the heap for the next step (reuse_freed_memory).
"""

from __future__ import annotations

from dataclasses import dataclass

VARLEN = "finetune_varlen_sdpa"
CHUNK = 512  # positions per chunk of the output head: 512 x 49k vocabulary x fp32 = 100 MB


# methods whose CPU steps are faster with gradient checkpointing on (see choose)
CPU_RECOMPUTE = ("dpo", "orpo")


@dataclass
class RunSettings:
    """How this run executes: where and in which dtype (from the loaded base), and the speed switches chosen
    for that device. Recorded in the manifest under `speed`."""

    device: str
    dtype: str
    quantization: str
    gradient_checkpointing: bool
    padding_free: bool
    packing: bool
    attention: str
    loss: str
    allocator: str = "default"


def choose(recipe, loaded, method: str) -> RunSettings:
    from finetune.models import parameter_count

    n_params = parameter_count(loaded.model)  # 4-bit weights count as what they hold, not their packed size
    t = recipe.training
    gc = t.gradient_checkpointing
    if gc == "auto":
        # recomputation costs ~30 % speed; worth it where activations don't fit: big models on GPUs. DPO on a
        # CPU is the exception: its full-vocabulary logits for chosen and rejected make each step allocate GBs,
        # and recomputing measured faster than keeping them (4.4 s vs 4.8 s a step, 37 % less memory; bench/)
        gc = (loaded.device == "cuda" and n_params >= 1e9) or (loaded.device == "cpu" and method in CPU_RECOMPUTE)
    pf = t.padding_free
    if pf == "auto":
        # flattening the batch removes padding work; on CUDA it pays with a varlen (flash) kernel, on CPU with ours
        pf = (not recipe.data.packing) and method == "sft" and (
            loaded.device == "cpu" or recipe.model.attn_implementation == "flash_attention_2")
    attention = loaded.model.config._attn_implementation
    if pf and attention == "sdpa":
        # transformers keeps the flattened sequences apart with one dense block-diagonal mask over the whole
        # batch; attention per sequence does the same work in sum(len^2) instead of (sum len)^2
        attention = VARLEN
    return RunSettings(loaded.device, str(loaded.dtype).removeprefix("torch."), loaded.quantization, bool(gc), bool(pf),
                 recipe.data.packing, attention, "chunked cross-entropy over trained positions" if method == "sft" else f"TRL {method.upper()} loss",
                 "glibc, freed memory reused" if loaded.device == "cpu" and reuse_freed_memory(dry_run=True) else "default")


def apply(base_model, peft_model, settings: RunSettings) -> None:
    """Switch the model to the chosen attention and LoRA input handling (call after attaching LoRA)."""
    if settings.attention == VARLEN:
        use_varlen_attention(base_model)
    lora_input_casting(peft_model, enabled=settings.dtype == "float32")  # bf16/fp16 train under autocast
    if settings.allocator != "default":
        reuse_freed_memory()


def reuse_freed_memory(dry_run: bool = False) -> bool:
    """Keep freed memory in the process heap instead of returning it to the kernel (Linux, glibc).

    glibc serves every allocation above 32 MB with its own mmap and unmaps it on free, so a CPU training
    step that allocates and frees GBs of activations makes the kernel fault in and zero the same pages
    again every step: measured on 2 cores, a quarter of DPO's step time was kernel time. Served from the
    heap and kept there, the next step reuses them (DPO steps 1.35x faster, SFT a few percent, eval 1.14x;
    the price is that RSS stays at its high-water mark). The same effect as running under jemalloc or
    tcmalloc, without a preloaded library."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if dry_run:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


# ---- attention -------------------------------------------------------------------------------------


def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA run once per sequence of a padding-free batch (sequence bounds from the collator's
    `cu_seq_lens_q`); any other batch goes to transformers' own SDPA path unchanged."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    bounds = cu.tolist()
    p = dropout if module.training else 0.0
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=p,
                                                    is_causal=True, scale=scaling)
                     for s, e in zip(bounds[:-1], bounds[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


def use_varlen_attention(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)
    model.set_attn_implementation(VARLEN)


# ---- loss ------------------------------------------------------------------------------------------


def _linear_cross_entropy():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Sum over rows of cross_entropy(hidden @ weight.T, targets) for a frozen output head.

        Computed in chunks of CHUNK rows; each chunk's gradient w.r.t. `hidden` is formed right away
        (softmax - one_hot) @ weight, so neither the logits nor softmax outlive their chunk."""

        @staticmethod
        def forward(ctx, hidden, weight, targets):
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden)
            with torch.autocast(hidden.device.type, enabled=False):
                h_all = hidden.to(weight.dtype)
                for i in range(0, hidden.shape[0], CHUNK):
                    h, t = h_all[i:i + CHUNK], targets[i:i + CHUNK]
                    logits = (h @ weight.T).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(len(t), device=t.device), t] -= 1
                    grad[i:i + CHUNK] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            return grad * grad_output.to(grad.dtype), None, None

    return LinearCrossEntropy


_LCE = None


def linear_cross_entropy(hidden, weight, targets):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, in chunks of CHUNK rows.

    Three cases: a trained head goes through plain autograd; a frozen head with a gradient wanted uses
    LinearCrossEntropy; with no gradient wanted (evaluation) only the loss is computed, accumulated in
    float64 so long texts sum exactly."""
    global _LCE
    import torch
    import torch.nn.functional as F

    if weight.requires_grad:
        return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    if torch.is_grad_enabled() and hidden.requires_grad:
        if _LCE is None:
            _LCE = _linear_cross_entropy()
        return _LCE.apply(hidden, weight, targets)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    h_all = hidden.to(weight.dtype)
    for i in range(0, hidden.shape[0], CHUNK):
        logits = (h_all[i:i + CHUNK] @ weight.T).float()
        total += F.cross_entropy(logits, targets[i:i + CHUNK], reduction="sum").double()
    return total


def trained_positions_loss(model, inputs: dict, labels, autocast=None, sharded: bool = False):
    """Summed cross-entropy over the positions whose next-token label is not -100, and their count.

    Only those positions go through the output head (linear_cross_entropy): the model runs with its head
    cut to the last position (`logits_to_keep=1`) and hands back its final hidden states. It runs through
    whatever wraps it (DDP, accelerate's autocast), which is what makes gradients sync across processes.
    Heads with extra scaling, soft-capping or a bias, and heads sharded across processes (FSDP, ZeRO-3),
    are scored from the model's own logits instead."""
    import contextlib
    import inspect

    import torch.nn.functional as F
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    cfg = base.config.get_text_config()
    head = base.get_output_embeddings()
    shift = labels[:, 1:]
    mask = shift != -100
    plain = sharded or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) or head.bias is not None
    with autocast or contextlib.nullcontext():
        if plain or "logits_to_keep" not in inspect.signature(base.forward).parameters:
            logits = model(**inputs, use_cache=False).logits[:, :-1]
            return F.cross_entropy(logits[mask].float(), shift[mask], reduction="sum"), mask.sum()
        hidden = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]
    return linear_cross_entropy(hidden[mask], head.weight, shift[mask]), mask.sum()


# ---- LoRA input casting ----------------------------------------------------------------------------


def lora_input_casting(model, enabled: bool) -> None:
    """PEFT copies each LoRA layer's input to the adapter's fp32 dtype; under bf16 autocast the matmul casts
    it straight back. Skipping the copy saves a full activation per adapter (memory and time). Only valid
    while autocast is on, so it is switched back on for evaluation and saving."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = enabled
