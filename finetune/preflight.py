"""Every check that needs the file system or the launch plan, run before anything loads.

All three ways of starting a run (one process, `--num-processes` / `--accelerate-config`, and each worker
under `accelerate launch`) call `preflight` first, so a typo-level mistake costs a second, not the minutes
a 7B base takes to load. Rules that need only the recipe are pydantic validators in finetune/recipe.py.
The result is the `Plan` a method's `run` follows: where to write, what to resume from, the run identity.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Collection

from finetune import artifacts, checkpoints, data, models
from finetune.errors import UserError
from finetune.launch import SHARDED, Launch
from finetune.recipe import ModelSection, Recipe


@dataclass(frozen=True)
class Plan:
    method: str
    launch: Launch
    device: str
    out: Path
    resume_from: Path | None  # the checkpoint to continue, for --resume
    identity: dict  # recipe + data file hashes + processes: a resumed run must match it
    rerun: str  # the command that continues this run after a stop


def preflight(recipe: Recipe, method: str, launch: Launch, device: str | None = None, resume: bool = False, *,
              overwrite: bool = False, rerun: str | None = None, log: Callable[[str], None] = print,
              planned: Collection[str] = ()) -> Plan:
    """`planned`: folders an earlier pipeline stage will write (a base or an adapter that does not exist yet);
    they are checked when that stage has run, everything else now."""
    device = device or models.pick_device(recipe.model.device)
    dtype = models.pick_dtype(recipe.model.dtype, device)
    check_attention(recipe.model, device, dtype)
    check_launch(recipe, launch, device)
    if recipe.model.base not in planned:
        check_base(recipe.model, log)
    if recipe.model.adapter not in planned:
        check_adapter(recipe.model)
    files = check_data(recipe, method)
    out = recipe.output_dir()
    artifacts.prepare_output(out, overwrite=overwrite, resume=resume)
    identity = checkpoints.run_identity(recipe, files, launch.processes)
    resume_from = check_resume(out, identity, log) if resume else None
    return Plan(method, launch, device, out, resume_from, identity, rerun or f"finetune {method} RECIPE --resume")


# ---- the launch ------------------------------------------------------------------------------------


def check_launch(recipe: Recipe, launch: Launch, device: str) -> None:
    """Refuse the process/device/sharding combinations that cannot work, saying what to use instead (all of
    them at once, in one message)."""
    q = recipe.model.quantization
    where = f"{launch.kind} ({launch.config_file})" if launch.config_file else launch.kind
    problems = []
    if launch.kind in SHARDED and q != "none":
        problems.append(f"model.quantization: {q} cannot be combined with {where}: bitsandbytes-quantized weights are not "
                        "sharded by this toolkit — for QLoRA use plain data parallel (--num-processes N) or ZeRO-2 "
                        "(recipes/accelerate/deepspeed-zero2.yaml); to shard the weights set model.quantization: none")
    if launch.kind != "ddp" and device != "cuda":
        # Accelerate would quietly fall back to plain data parallel on CPUs
        problems.append(f"{where} needs CUDA GPUs and this run is on {device} — leave out --accelerate-config "
                        "(plain data parallel over gloo works on CPU: --num-processes N)")
    if device == "mps" and launch.processes > 1:
        problems.append("several processes on Apple MPS are not supported by PyTorch — run with one process")
    if device == "mps" and q != "none":
        problems.append(f"model.quantization: {q} does not run on Apple MPS — set quantization: none")
    if launch.kind.startswith("deepspeed") and find_spec("deepspeed") is None:
        problems.append(f"{where} needs DeepSpeed — pip install deepspeed (it builds against the CUDA toolkit), or use "
                        "recipes/accelerate/fsdp.yaml or ddp.yaml")
    if device == "cuda" and launch.config_file is None and launch.machines == 1 and launch.processes > 1:
        import torch

        if launch.processes > torch.cuda.device_count():
            problems.append(f"--num-processes {launch.processes}: only {torch.cuda.device_count()} CUDA GPU(s) visible — use at most that many")
    if problems:
        raise UserError("\n".join(problems))


# ---- the attention kernel --------------------------------------------------------------------------

FLASH_ATTN_PIP = "pip install flash-attn --no-build-isolation"


def check_attention(section: ModelSection, device: str, dtype) -> None:
    """flash_attention_2 asked for where it cannot run. transformers would raise an ImportError while loading
    the base (after minutes, for a big one); say what is missing now, with the install line."""
    if section.attn_implementation != "flash_attention_2":
        return
    import torch

    problems = []
    if device != "cuda":
        problems.append(f"needs a CUDA GPU and this run is on {device}")
    if find_spec("flash_attn") is None:
        problems.append(f"needs the flash-attn package: {FLASH_ATTN_PIP} (it compiles against the CUDA toolkit "
                        "unless a prebuilt wheel matches your torch and CUDA versions)")
    if dtype not in (torch.bfloat16, torch.float16):
        problems.append(f"runs in bf16 or fp16 only and this run's dtype is {str(dtype).removeprefix('torch.')}")
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 8:
        problems.append(f"needs an Ampere or newer GPU (compute capability 8.0+); this one is "
                        f"{'.'.join(map(str, torch.cuda.get_device_capability()))}")
    if problems:
        raise UserError("model.attn_implementation: flash_attention_2 " + "; ".join(problems)
                        + " — or use `sdpa` (PyTorch's own fused attention, no install needed)")


# ---- the base and the starting adapter -------------------------------------------------------------


def check_base(section: ModelSection, log: Callable[[str], None] = print) -> None:
    """The base exists, and a local base's weight files are whole (an interrupted download leaves a truncated
    file that would otherwise fail deep inside loading)."""
    base = models.resolve_base(section.base, log, convert=False)
    folder = Path(base.path)
    if base.kind == "hub" or not (folder / "config.json").is_file():
        return  # a hub id, or a .gguf base not converted yet (its conversion checks the file)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        if not section.allow_pickle_weights:
            raise UserError(f"model.base: `{base.spec}` has no safetensors weights — convert them, or set "
                            "model.allow_pickle_weights: true if you trust the files (pickle can run code)")
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            raise UserError(f"model.base: {index} is not a valid shard index — download the model again") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise UserError(f"model.base: {folder / missing[0]} is missing ({len(missing)} of {len(shards)} weight files) — "
                            "the download is incomplete; download the model again")
    for f in weights:
        problem = safetensors_problem(f)
        if problem:
            raise UserError(f"model.base: {f} is {problem} — an interrupted download? Download the model again")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole, from its header and size alone (no tensor is read)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if 8 + n > size:
                return f"truncated ({size} bytes; its header alone needs {8 + n})"
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "not a safetensors file (its header is unreadable)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"truncated ({size} of {expected} bytes)"
    return None


def check_adapter(section: ModelSection) -> None:
    if section.adapter and not (Path(section.adapter) / "adapter_config.json").is_file():
        raise UserError(f"model.adapter: {section.adapter} is not an adapter folder (no adapter_config.json)")


# ---- data ------------------------------------------------------------------------------------------


def check_data(recipe: Recipe, method: str) -> list[dict]:
    """Every data file exists, parses and holds the method's format (no tokenizer needed); returns the files
    with their hashes, the data part of the run identity."""
    section = recipe.data
    rows, files, _ = data.read_train(section, recipe.training.seed)
    fmt, records = data.normalise(rows, section.format, method, section.system_prompt)
    if method == "grpo":
        check_grpo(recipe, records)
    if isinstance(section.validation, str):
        val_rows, val_files = data.read(section.validation, section.columns)
        data.normalise(val_rows, fmt, method, section.system_prompt, training=False)
        files += [{**f, "split": "validation"} for f in val_files]
    return files


def check_grpo(recipe: Recipe, records: list) -> None:
    """The rewards can run on these prompts (finetune/rewards.py), and vLLM is there when asked for."""
    from finetune import rewards

    rewards.check(recipe, records)
    if recipe.grpo.use_vllm is True and find_spec("vllm") is None:
        raise UserError("grpo.use_vllm: vLLM is not installed — pip install vllm (CUDA machines), or set use_vllm: auto")


# ---- resume ----------------------------------------------------------------------------------------


def check_resume(out: Path, identity: dict, log: Callable[[str], None] = print) -> Path:
    checkpoint = checkpoints.latest(out, log)
    if checkpoint is None:
        raise UserError(f"{out}: no complete checkpoint to resume from — run without --resume (training.save_every makes checkpoints)")
    saved = checkpoints.saved_identity(out)
    changes = checkpoints.diff_identity(saved, identity) if saved else []
    if changes:
        raise UserError(f"{out}: the recipe or data changed since this run started, so --resume would mix two runs:\n  "
                        + "\n  ".join(changes) + "\nrevert the change, or start afresh with --overwrite")
    return checkpoint
