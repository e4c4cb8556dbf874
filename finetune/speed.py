"""What makes training fast on each device: the settings chosen automatically (recorded in the manifest),
and the pieces of work no library does for us on a CPU (measured in bench/, see docs/benchmarks.md):

- a cross-entropy over the trained positions only, computed in chunks with its input gradient formed in
  the forward pass, so (tokens x vocabulary) fp32 logits never exist at once;
- per-sequence causal attention for padding-free batches, instead of one dense block-diagonal mask over
  the whole flattened batch (cost: sum of squared lengths instead of the square of their sum);
- LoRA layers that leave their input in the autocast dtype instead of copying it to fp32 per adapter;
- on CPUs, LoRA dropout masks drawn from 16-bit slices of random words (cheap_lora_dropout);
- on Linux CPUs, freed memory kept in the heap for the next step (reuse_freed_memory);
- on CPUs, one compute thread per core that other processes leave free (cpu_threads).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

VARLEN = "finetune_varlen_sdpa"
CHUNK = 512  # positions per chunk of the output head: 512 x 49k vocabulary x fp32 = 100 MB


# methods that keep gradient checkpointing on on a CPU (see gradient_checkpointing). The rule: a CPU run keeps
# activations for speed unless recomputing them costs at most ~20 % of the step, then the memory wins. Measured
# on the bench tasks (bench/methods.py, bench/run.py; docs/benchmarks.md): recomputing costs DPO ~19 % and KTO
# ~18 % (KTO: 2.3 vs 2.9 GB peak), reward models ~29 % and SFT ~40 %, so those two keep their activations; ORPO
# has DPO's doubled batch. GRPO's step is mostly generation; its flipped leg has not been measured.
CPU_RECOMPUTE = ("dpo", "orpo", "kto")


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
    threads: int | None = None  # CPU compute threads (None: the library's default)
    lora_dropout: str = "off"  # how LoRA dropout masks are drawn, set by apply from the attached adapter


def choose(recipe, loaded, method: str) -> RunSettings:
    from finetune.models import parameter_count

    n_params = parameter_count(loaded.model)  # 4-bit weights count as what they hold, not their packed size
    t = recipe.training
    gc = gradient_checkpointing(t.gradient_checkpointing, loaded.device, n_params, method)
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
                 "glibc, freed memory reused" if loaded.device == "cpu" and reuse_freed_memory(dry_run=True) else "default",
                 cpu_threads() if loaded.device == "cpu" else None)


def gradient_checkpointing(setting, device: str, n_params: int, method: str) -> bool:
    """`training.gradient_checkpointing` resolved; the memory estimate (inspect.py) calls this too, so it
    plans for what training will do."""
    if setting != "auto":
        return bool(setting)
    # recomputation costs ~30 % speed; worth it where activations don't fit: big models on GPUs. DPO on a
    # CPU is the exception: chosen and rejected double the activations. With TRL 1.16's fused log-prob head,
    # recomputing costs DPO ~19 % of its speed on the bench task and saves 27 % of peak memory (7.6-8.7 s
    # vs 6.3-6.9 s a step, 3.5-3.6 GB vs 4.8-4.9 GB; plain TRL DPO peaks at 3.1 GB), so it stays on: without
    # it DPO would need 1.6x the memory of the plain TRL script it replaces
    return (device == "cuda" and n_params >= 1e9) or (device == "cpu" and method in CPU_RECOMPUTE)


def apply(base_model, peft_model, settings: RunSettings) -> None:
    """Switch the model to the chosen attention and LoRA input handling (call after attaching LoRA), and record
    how its LoRA dropout runs: only SFT and reward models keep the recipe's dropout, the other methods attach
    the adapter without it."""
    if settings.attention == VARLEN:
        use_varlen_attention(base_model)
    lora_input_casting(peft_model, enabled=settings.dtype == "float32")  # bf16/fp16 train under autocast
    if settings.device == "cpu":
        settings.lora_dropout = CHEAP_DROPOUT if cheap_lora_dropout(peft_model) else "off"
    elif any(getattr(d, "p", 0) > 0 for _, _, d in lora_dropouts(peft_model)):
        settings.lora_dropout = "torch"
    if settings.allocator != "default":
        reuse_freed_memory()
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)


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


def busy_cores(seconds: float = 0.5) -> float | None:
    """How many of the cores this process may run on other work kept busy over a short sample (Linux /proc/stat;
    None elsewhere). Called while this process waits, so what it sees is everyone else's load."""
    import os
    import time

    mine = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None

    def sample():
        total = idle = 0
        with open("/proc/stat") as fh:
            for line in fh:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or (mine is not None and name not in mine):
                    continue
                numbers = [int(x) for x in fields]
                total += sum(numbers)
                idle += numbers[3] + numbers[4]  # idle + iowait jiffies
        return total, idle, len(mine) if mine is not None else os.cpu_count() or 1

    try:
        total0, idle0, cores = sample()
        time.sleep(seconds)
        total1, idle1, _ = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * cores


def cpu_threads() -> int | None:
    """Compute threads for a CPU run: one per core that other processes leave free when the run starts.

    torch splits each op over its OpenMP threads and waits at a barrier for the slowest. A thread that shares
    its core with another busy process gets that core in scheduler time slices, so every op waits for it, and
    a training step of many small ops (per-layer norms, casts, LoRA's rank-16 matmuls, per-sequence attention)
    runs at the pace of the shared core. Measured on 2 cores shared with other jobs (load average 13-16),
    SmolLM2-135M SFT, batch 4: 33-37 s a step with 1 thread, 160-211 s with torch's default 2 (docs/benchmarks.md).
    OMP_NUM_THREADS set by the user is left alone (None: keep torch's setting)."""
    import os

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    have = torch.get_num_threads()
    busy = busy_cores()
    if busy is None:
        return None
    # a core counts as taken when others keep it at least 3/4 busy: brief noise on a quiet machine keeps every thread
    return max(1, min(have, have - int(busy + 0.25)))


# ---- attention -------------------------------------------------------------------------------------


def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Causal attention within each sequence of a padding-free batch, the sequences found from the collator's
    `cu_seq_lens_q` (or, without it, from where `position_ids` restart). On CUDA with torch's varlen flash
    kernel the whole batch is one call reading the bounds on the device; elsewhere SDPA runs once per
    sequence, the bounds read to the host once per batch (sequence_bounds). No (tokens x tokens) mask is
    built (varlen_mask). Any other batch goes to transformers' own SDPA path unchanged."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and query.shape[0] != 1:
        cu = None  # cumulative lengths describe one flattened row
    positions = kwargs.get("position_ids")
    if attention_mask is not None or query.shape[2] != key.shape[2] or (cu is None and positions is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    p = dropout if module.training else 0.0
    max_len = kwargs.get("max_length_q")
    if cu is not None and max_len is not None and p == 0.0 and cuda_varlen_kernel(query):
        from torch.nn.attention.varlen import varlen_attn

        # (1, heads, tokens, dim) -> (tokens, heads, dim); grouped KV heads are expanded by the kernel itself
        out = varlen_attn(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu.to(torch.int32),
                          cu.to(torch.int32), int(max_len), int(max_len), scale=scaling, window_size=(-1, 0),
                          enable_gqa=query.shape[1] != key.shape[1])
        return out.unsqueeze(0), None
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    rows = sequence_bounds(cu if cu is not None else positions, from_positions=cu is None)
    if len(rows) == 1 and query.shape[0] > 1:
        rows = rows * query.shape[0]  # one row of position ids shared by the batch (the model's default)
    if len(rows) == 1 and len(rows[0]) == 2:  # one sequence per row: plain causal attention
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=p, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    out = torch.cat([torch.cat([F.scaled_dot_product_attention(query[r:r + 1, :, s:e], key[r:r + 1, :, s:e], value[r:r + 1, :, s:e],
                                                               dropout_p=p, is_causal=True, scale=scaling)
                                for s, e in zip(bounds[:-1], bounds[1:])], dim=2)
                     for r, bounds in enumerate(rows)])
    return out.transpose(1, 2).contiguous(), None


_BOUNDS: list = [None, None]  # [weak reference to the tensor the bounds were read from, the bounds]


def sequence_bounds(t, from_positions: bool = False) -> list[list[int]]:
    """Start and end offsets of the sequences in each row of a flattened batch, from cumulative lengths (one
    row) or from position ids (a new sequence where they do not go up by one). Every layer gets the same
    tensor, so it is read to the host once per batch: on CUDA each read waits for the GPU to catch up."""
    import weakref

    ref, bounds = _BOUNDS
    if ref is not None and ref() is t:
        return bounds
    if from_positions:
        pos = t.reshape(-1, t.shape[-1])
        starts = (pos.diff(dim=-1) != 1).cpu()
        bounds = [[0, *(i + 1 for i in row.nonzero().flatten().tolist()), pos.shape[-1]] for row in starts]
    else:
        bounds = [t.tolist()]
    _BOUNDS[:] = [weakref.ref(t), bounds]
    return bounds


def cuda_varlen_kernel(query) -> bool:
    """torch's variable-length flash attention (torch.nn.attention.varlen, torch 2.9+) can run this batch:
    a CUDA tensor in bf16/fp16 on an Ampere or newer GPU."""
    import torch

    if not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(query.device)[0] >= 8


def varlen_mask(*args, attention_mask=None, **kwargs):
    """The mask for VARLEN: none for a batch without padding (varlen_sdpa keeps its sequences apart itself,
    where transformers' SDPA mask would be a dense tokens x tokens block-diagonal one), SDPA's for any other."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_varlen_attention(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN, varlen_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, varlen_mask)
    model.set_attn_implementation(VARLEN)


# ---- loss ------------------------------------------------------------------------------------------


def _linear_cross_entropy():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Sum over rows of cross_entropy(hidden @ weight.T, targets) for a frozen output head.

        Computed in chunks of CHUNK rows; each chunk's gradient w.r.t. `hidden` is formed right away
        (softmax - one_hot) @ weight, so neither the logits nor softmax outlive their chunk. The matmuls run
        in `dtype`; log-sum-exp, softmax and the sum in fp32."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, dtype):
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden)
            with torch.autocast(hidden.device.type, enabled=False):
                h_all, w = hidden.to(dtype), weight.to(dtype)
                for i in range(0, hidden.shape[0], CHUNK):
                    h, t = h_all[i:i + CHUNK], targets[i:i + CHUNK]
                    logits = (h @ w.T).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(len(t), device=t.device), t] -= 1
                    grad[i:i + CHUNK] = (probs.to(dtype) @ w).to(grad.dtype)
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            # grad_output stays fp32: with fp16 and a loss scaler it is scale / tokens, and a scale of 65536
            # over one token is already past fp16's largest number (the product is rounded only once)
            return grad * grad_output, None, None, None

    return LinearCrossEntropy


_LCE = None


def linear_cross_entropy(hidden, weight, targets, dtype=None):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, in chunks of CHUNK rows, the matmuls in
    `dtype` (default: the head's own dtype).

    Three cases: a trained head goes through plain autograd; a frozen head with a gradient wanted uses
    LinearCrossEntropy; with no gradient wanted (evaluation) only the loss is computed, accumulated in
    float64 so long texts sum exactly."""
    global _LCE
    import torch
    import torch.nn.functional as F

    if weight.requires_grad:
        return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    dtype = dtype or weight.dtype
    if torch.is_grad_enabled() and hidden.requires_grad:
        if _LCE is None:
            _LCE = _linear_cross_entropy()
        return _LCE.apply(hidden, weight, targets, dtype)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        h_all, w = hidden.to(dtype), weight.to(dtype)
        for i in range(0, hidden.shape[0], CHUNK):
            logits = (h_all[i:i + CHUNK] @ w.T).float()
            total += F.cross_entropy(logits, targets[i:i + CHUNK], reduction="sum").double()
    return total


def head_dtype(weight, device_type: str):
    """The dtype the output head's matmul runs in: the run's autocast dtype where it is narrower than the
    head's. On the QLoRA path PEFT's kbit preparation casts the head to fp32, while the run computes in
    bf16 (or fp16): an fp32 head matmul over (positions x vocabulary) would cost several times a bf16 one
    (on CUDA and on CPUs with AMX alike) for no gain, since log-sum-exp stays in fp32 either way."""
    import torch

    if torch.is_autocast_enabled(device_type):
        run = torch.get_autocast_dtype(device_type)
        if run.itemsize < weight.dtype.itemsize:
            return run
    return weight.dtype


def trained_positions_loss(model, inputs: dict, labels, autocast=None, sharded: bool = False):
    """Summed cross-entropy over the positions whose next-token label is not -100, and their count.

    Only those positions go through the output head (linear_cross_entropy): the model runs with its head
    cut to the last position (`logits_to_keep=1`) and its final hidden states are caught on the way out. It runs through
    whatever wraps it (DDP, accelerate's autocast), which is what makes gradients sync across processes.
    Heads with extra scaling, soft-capping or a bias, and heads sharded across processes (FSDP, ZeRO-3),
    are scored from the model's own logits instead."""
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
        with final_hidden_state(base) as kept:
            model(**inputs, use_cache=False, logits_to_keep=1)
        hidden = kept[-1][:, :-1]
        dtype = head_dtype(head.weight, hidden.device.type)
    return linear_cross_entropy(hidden[mask], head.weight, shift[mask], dtype), mask.sum()


@contextlib.contextmanager
def final_hidden_state(base):
    """Catch the decoder's output (the final, normed hidden states) while the model runs.

    `output_hidden_states=True` would hand it back too, but it keeps every layer's hidden states alive until
    the loss is computed: layers x tokens x hidden more memory, which in evaluation (no autograd keeping
    them anyway) is most of the peak. A forward hook on the decoder keeps only the last one."""
    kept = []

    def hook(module, args, output):
        kept.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = base.get_decoder().register_forward_hook(hook)
    try:
        yield kept
    finally:
        handle.remove()


# ---- LoRA input casting ----------------------------------------------------------------------------


def lora_input_casting(model, enabled: bool) -> None:
    """PEFT copies each LoRA layer's input to the adapter's fp32 dtype; under bf16 autocast the matmul casts
    it straight back. Skipping the copy saves a full activation per adapter (memory and time). Only valid
    while autocast is on, so it is switched back on for evaluation and saving."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = enabled


# ---- LoRA dropout on CPUs ----------------------------------------------------------------------------

CHEAP_DROPOUT = "masks from 16-bit random slices"


def _mask_dropout_class():
    import torch

    class MaskDropout(torch.nn.Dropout):
        """nn.Dropout whose mask is cut from random 64-bit words, four 15-bit draws per word.

        torch's CPU dropout draws one Bernoulli sample per element through the generator, which made mask
        drawing 14 % of a LoRA SFT step (one mask per adapter input, 7 adapters a layer; bench profile in
        docs/benchmarks.md); filling int64 words and comparing their 16-bit slices is ~3x cheaper. The drop
        probability is rounded to a multiple of 1/32768 and the kept values scaled by its exact inverse, so
        the expectation is unchanged. Same generator as torch's dropout: seeds and resumed RNG states apply."""

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            n = x.numel()
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
            # random_() leaves the sign bit of each word 0; masking every slice to 15 bits keeps all four uniform
            draws = words.view(torch.int16)[:n].view(x.shape) & 0x7FFF
            drop = round(self.p * 32768)
            keep = draws >= drop  # bool: backward keeps one byte per element, as torch's own dropout does
            return (x * keep).mul_(32768 / (32768 - drop))

    return MaskDropout


_MASK_DROPOUT = None


def lora_dropouts(model) -> list:
    """Every LoRA layer's dropout modules, as (layer, adapter name, module)."""
    from peft.tuners.lora import LoraLayer

    return [(m, name, d) for m in model.modules() if isinstance(m, LoraLayer) for name, d in m.lora_dropout.items()]


def cheap_lora_dropout(model) -> int:
    """Replace every LoRA dropout module with MaskDropout (CPU training; CUDA's fused dropout is already cheap).
    Returns how many were replaced: 0 when the adapter has no dropout."""
    import torch

    global _MASK_DROPOUT
    if _MASK_DROPOUT is None:
        _MASK_DROPOUT = _mask_dropout_class()
    replaced = 0
    for layer, name, d in lora_dropouts(model):
        if isinstance(d, torch.nn.Dropout) and d.p > 0:
            layer.lora_dropout[name] = _MASK_DROPOUT(d.p)
            replaced += 1
    return replaced
