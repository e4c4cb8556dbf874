"""Data-parallel training across processes, through Accelerate (DDP, FSDP, DeepSpeed).

Two ways in, one set of checks:
- `finetune sft RECIPE --num-processes N [--accelerate-config FILE]` validates the recipe, the output folder
  and the combination here, then starts N workers with Accelerate's launcher (torchrun underneath) and
  waits for them, exiting with the first failing worker's code.
- `accelerate launch [--config_file FILE] -m finetune sft RECIPE` (multi-node included): each worker reads
  the launch from the environment Accelerate sets and runs the same checks before loading anything.

Inside a run, process 0 of all machines writes every file and draws the progress bar; see train.run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from finetune.errors import UserError

SHARDED = ("fsdp", "deepspeed-3")  # the kinds that split the frozen weights across processes


@dataclass(frozen=True)
class Launch:
    processes: int
    kind: str  # ddp, fsdp, deepspeed-1, deepspeed-2, deepspeed-3
    config_file: str | None = None
    machines: int = 1


# ---- inside a worker ------------------------------------------------------------------------------


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def from_environment() -> Launch | None:
    """The launch Accelerate described in this worker's environment, or None for a single process."""
    if world_size() <= 1:
        return None
    flag = lambda name: os.environ.get(name, "").lower() in ("1", "true", "yes")  # noqa: E731
    if flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if ds_file and Path(ds_file).is_file() and ds_file.endswith(".json"):
            stage = json.loads(Path(ds_file).read_text()).get("zero_optimization", {}).get("stage", stage)
        kind = f"deepspeed-{stage or 2}"
    elif flag("ACCELERATE_USE_FSDP"):
        kind = "fsdp"
    else:
        kind = "ddp"
    machines = max(1, world_size() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))))
    return Launch(world_size(), kind, None, machines)


def start_worker(device: str) -> None:
    """Join the process group before the model loads, so each worker loads onto its own GPU."""
    if world_size() > 1:
        from accelerate import PartialState

        die_with_launcher()
        PartialState(cpu=device == "cpu")  # gloo between CPU processes; transformers' Trainer reuses this state


def die_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so when the launcher is killed (kill -9, a
    closed terminal) the workers would train on as orphans, holding GPUs and racing a later --resume. On
    Linux, ask the kernel to end a worker when its launcher goes."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    try:
        ctypes.CDLL("libc.so.6").prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # the launcher went in between (in a container the launcher may be pid 1)
        os._exit(1)


def _all_reduce(value: float, op: str) -> float:
    if world_size() <= 1:
        return value
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    t = torch.tensor([float(value)], dtype=torch.float64, device=PartialState().device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.item()


def total(value: float) -> float:
    """Sum over all processes (a collective: every process must call it at the same point)."""
    return _all_reduce(value, "sum")


def largest(value: float) -> float:
    return _all_reduce(value, "max")


def anyone(flag: bool) -> bool:
    """True when any process says so: keeps processes stopping at the same step (Ctrl-C, a bad loss)."""
    return bool(_all_reduce(1.0 if flag else 0.0, "max"))


# ---- before launching -----------------------------------------------------------------------------


def from_config(path: Path | None, processes: int) -> Launch:
    """The launch described by `--num-processes` and an optional Accelerate config file."""
    if path is None:
        return Launch(processes or 1, "ddp")
    if not path.is_file():
        raise UserError(f"--accelerate-config: {path} does not exist — see recipes/accelerate/ for ready-made configs")
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise UserError(f"--accelerate-config: {path} is not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "distributed_type" not in cfg:
        raise UserError(f"--accelerate-config: {path} has no `distributed_type` — is it an Accelerate config (`accelerate config`)?")
    dtype = str(cfg["distributed_type"]).upper()
    if dtype == "DEEPSPEED":
        ds = cfg.get("deepspeed_config") or {}
        stage = ds.get("zero_stage")
        if stage is None and ds.get("deepspeed_config_file"):
            ds_file = (path.parent / ds["deepspeed_config_file"]) if not Path(ds["deepspeed_config_file"]).is_absolute() else Path(ds["deepspeed_config_file"])
            stage = json.loads(ds_file.read_text()).get("zero_optimization", {}).get("stage") if ds_file.is_file() else None
        kind = f"deepspeed-{stage if stage is not None else 2}"
    elif dtype == "FSDP":
        kind = "fsdp"
    elif dtype in ("MULTI_GPU", "MULTI_CPU", "NO"):
        kind = "ddp"
    else:
        raise UserError(f"--accelerate-config: distributed_type {cfg['distributed_type']} is not supported here — use MULTI_GPU, FSDP or DEEPSPEED")
    if int(cfg.get("num_machines") or 1) > 1:
        raise UserError(f"--accelerate-config: {path} spans {cfg['num_machines']} machines — start multi-node runs on each machine "
                        f"with `accelerate launch --config_file {path} --machine_rank R -m finetune sft RECIPE`")
    return Launch(processes or int(cfg.get("num_processes") or 1), kind, str(path))


def check(recipe, launch: Launch, device: str) -> None:
    """Refuse, before anything loads, the combinations that cannot work, saying what to use instead (all
    of them at once, in one message)."""
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
    if device == "mps":
        problems.append("several processes on Apple MPS are not supported by PyTorch — run with one process")
    if launch.kind.startswith("deepspeed") and find_spec("deepspeed") is None:
        problems.append(f"{where} needs DeepSpeed — pip install deepspeed (it builds against the CUDA toolkit), or use "
                        "recipes/accelerate/fsdp.yaml or ddp.yaml")
    if device == "cuda" and launch.config_file is None and launch.machines == 1:
        import torch

        if launch.processes > torch.cuda.device_count():
            problems.append(f"--num-processes {launch.processes}: only {torch.cuda.device_count()} CUDA GPU(s) visible — use at most that many")
    if problems:
        raise UserError("\n".join(problems))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(launch: Launch, device: str, worker_args: list[str]) -> int:
    """Start the workers with Accelerate's launcher in this process and wait; returns the exit code of the
    first worker that failed (2 for a user error, as in a single-process run)."""
    os.environ.setdefault("LOGLEVEL", "ERROR")  # torchrun's own notices; the workers report what went wrong
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException

    argv = ["--num_processes", str(launch.processes), "--num_machines", "1", "--main_process_port", str(free_port())]
    if launch.config_file:
        argv += ["--config_file", launch.config_file]
    else:
        # torchrun starts one worker per process on CPU too; the workers then choose gloo (start_worker)
        argv += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    argv += ["-m", "finetune", *worker_args]
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would give each worker one thread; share the cores out instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.processes))
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except SignalException:  # Ctrl-C reached the launcher, which passed it on; the workers save a checkpoint and stop
        return 130
    except Exception as exc:  # torchrun's ChildFailedError carries each worker's exit code
        codes = [f.exitcode for f in getattr(exc, "failures", {}).values()]
        failed = [c for c in codes if c and c > 0]
        if failed:
            return failed[0]
        if codes:
            return 1
        raise
    return 0


def worker_command(method: str, recipe_path: Path, overrides: list[str] | None, overwrite: bool, resume: bool) -> list[str]:
    args = [method, str(recipe_path)] + [f"--set={s}" for s in overrides or []]
    return args + (["--overwrite"] if overwrite else []) + (["--resume"] if resume else [])

