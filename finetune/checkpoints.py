"""Checkpoints and the run identity that guards `--resume`: which checkpoint is complete, and whether the
recipe, the data or the process count changed since the run began. Loads nothing, so preflight uses it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from finetune import artifacts
from finetune.recipe import Recipe

IDENTITY = "run.json"  # inside <output>/checkpoints/


def latest(out: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint of an output folder that every process finished writing (it has the marker)."""
    folder = out / "checkpoints"
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for ckpt in reversed(found):
        if (ckpt / artifacts.COMPLETE).is_file():
            return ckpt
        log(f"[yellow]skipping incomplete checkpoint {ckpt} (no completion marker)[/]")
    return None


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def run_identity(recipe: Recipe, files: list[dict], processes: int) -> dict:
    """What makes two runs the same run: the resolved recipe, the data files' contents, the process count."""
    return {"recipe": recipe.model_dump(mode="json"), "data": [{"path": f["path"], "sha256": f["sha256"]} for f in files],
            "processes": processes}


def saved_identity(out: Path) -> dict | None:
    path = out / "checkpoints" / IDENTITY
    return json.loads(path.read_text()) if path.is_file() else None


def diff_identity(old: dict, new: dict) -> list[str]:
    changes = []
    for section, fields in new["recipe"].items():
        before = old["recipe"].get(section)
        if isinstance(fields, dict) and isinstance(before, dict):
            changes += [f"{section}.{k}: {before.get(k)!r} -> {v!r}" for k, v in fields.items() if before.get(k) != v]
        elif before != fields:
            changes.append(f"{section}: {before!r} -> {fields!r}")
    if old["data"] != new["data"]:
        changes.append("data files changed (contents or list)")
    if old.get("processes", 1) != new["processes"]:
        changes.append(f"processes: {old.get('processes', 1)} -> {new['processes']} (the global batch is batch_size x "
                       "gradient_accumulation x processes, so the run would change)")
    return changes
