"""Output folders: atomic writes, the manifest, metrics, the loss plot and the model card."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from finetune.errors import UserError

LIBRARIES = ("finetune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")
COMPLETE = "finetune-complete"  # marker written last into a checkpoint folder


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: Path, what: str) -> None:
    """Fail before a long job, not after it, when the output can't be written: try writing a file in the
    nearest existing folder (permission bits alone say nothing for root or read-only mounts)."""
    probe_dir = folder if folder.is_dir() else next((p for p in folder.absolute().parents if p.exists()), Path("."))
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".finetune-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"{folder}: {what} is not writable ({exc.strerror}) — choose another folder or fix its permissions") from None


def prepare_output(folder: Path, *, overwrite: bool, resume: bool, option: str = "output.dir") -> None:
    check_writable(folder, option)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: {option} exists and is a file — choose a folder path")
    if resume:
        return
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"{folder}: output folder is not empty — pass --overwrite to replace it, --resume to continue it, or set {option}")


DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


@contextlib.contextmanager
def disk_errors_are_user_errors(folder: Path, option: str):
    """A full or read-only disk while writing outputs is the user's to fix: one message, exit code 2."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_ERRORS:
            raise UserError(f"{folder}: {DISK_ERRORS[exc.errno]} while writing the output — nothing was published there; "
                            f"free some space or choose another {option}") from None
        raise


@contextlib.contextmanager
def staged_folder(out: Path, what: str):
    """A sibling staging folder for a whole output: it replaces `out` when the block finishes and is removed
    when the block fails or is interrupted, so `out` is never half-written (merge, export)."""
    staging = out.parent / f".{out.name}.{what}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def library_versions() -> dict:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).parent).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_metrics(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_loss(path: Path, rows: list[dict], title: str) -> dict[str, list[tuple[int, float]]]:
    """Train and eval loss against the step; returns the plotted series. A run shorter than
    `training.log_every` logs no per-step loss, only the trainer's closing average (`train_loss`): that
    point is plotted instead of an empty chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    label = "train loss"
    if not train:
        train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        label = "train loss (average of the run)"
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    # markers where points are few: a line through one or two points is invisible or says nothing
    if train:
        ax.plot(*zip(*train), "o-" if len(train) <= 20 else "-", label=label)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    if not (train or evals):
        ax.text(0.5, 0.5, "no loss was logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return {name: points for name, points in ((label, train), ("eval loss", evals)) if points}


def publish(staging: Path, folder: Path) -> None:
    """Move finished files from a staging folder into the output folder, each by rename, manifest last."""
    names = sorted(p.name for p in staging.iterdir())
    names.sort(key=lambda n: n == "manifest.json")
    for name in names:
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
