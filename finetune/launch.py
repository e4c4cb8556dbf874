"""Data-parallel training across processes, through Accelerate (DDP, FSDP, DeepSpeed).

Two ways in, one set of checks (finetune/preflight.py, run before anything loads):
- `finetune sft RECIPE --num-processes N [--accelerate-config FILE]` runs preflight, then starts N workers
  with Accelerate's launcher (torchrun underneath) and waits for them, exiting with the first failing
  worker's code.
- `accelerate launch [--config_file FILE] -m finetune sft RECIPE` (multi-node included): each worker reads
  the launch from the environment Accelerate sets and runs the same preflight.

Inside a run, process 0 of all machines writes every file and draws the progress bar (finetune/training.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
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


def from_config(path: Path | None, processes: int | None) -> Launch:
    """The launch described by `--num-processes` and an optional Accelerate config file (read with
    Accelerate's own parser, so a file `accelerate launch` accepts is accepted here)."""
    if path is None:
        return Launch(processes or 1, "ddp")
    if not path.is_file():
        raise UserError(f"--accelerate-config: {path} does not exist — see recipes/accelerate/ for ready-made configs")
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        cfg = load_config_from_file(str(path))
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise UserError(f"--accelerate-config: {path} is not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    except (ValueError, TypeError, AttributeError) as exc:
        # no distributed_type, unknown keys, or not a mapping at all
        raise UserError(f"--accelerate-config: {path} has no `distributed_type` or is not an Accelerate config (`accelerate config` "
                        f"writes one): {str(exc).splitlines()[0][:200]}") from None
    kind = {"MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "NO": "ddp", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(cfg.distributed_type.value)
    if kind is None:
        raise UserError(f"--accelerate-config: distributed_type {cfg.distributed_type.value} is not supported here — use MULTI_GPU, FSDP or DEEPSPEED")
    if kind == "deepspeed":
        kind = f"deepspeed-{zero_stage(cfg.deepspeed_config or {}, path.parent)}"
    if (cfg.num_machines or 1) > 1:
        raise UserError(f"--accelerate-config: {path} spans {cfg.num_machines} machines — start multi-node runs on each machine "
                        f"with `accelerate launch --config_file {path} --machine_rank R -m finetune sft RECIPE`")
    return Launch(processes or (cfg.num_processes if cfg.num_processes > 0 else 1), kind, str(path))


def zero_stage(ds: dict, here: Path) -> int:
    """The ZeRO stage of an Accelerate config's deepspeed section, or of the DeepSpeed JSON it points at."""
    if ds.get("zero_stage") is not None:
        return int(ds["zero_stage"])
    if ds.get("deepspeed_config_file"):
        ds_file = Path(ds["deepspeed_config_file"])
        ds_file = ds_file if ds_file.is_absolute() else here / ds_file
        if ds_file.is_file():
            return int(json.loads(ds_file.read_text()).get("zero_optimization", {}).get("stage", 2))
    return 2


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

