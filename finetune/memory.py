"""Peak memory of this process, measured one way everywhere (training summary, merge, bench)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Peak:
    used_mb: float  # CPU: resident high-water mark of the process; CUDA: the most tensors ever held
    reserved_mb: float | None = None  # CUDA only: the most the caching allocator held (what nvidia-smi sees)


def peak_memory(device: str) -> Peak:
    if device == "cuda":
        import torch

        return Peak(torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20)
    return Peak(process_high_water_mb())


def process_high_water_mb() -> float:
    """Resident high-water mark. Linux's VmHWM belongs to this process alone; ru_maxrss (the fallback
    elsewhere) can carry over a parent's size across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS reports bytes, Linux KiB
