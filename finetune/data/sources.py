"""The training rows a recipe names: `data.train` (first `data.max_rows` of them), or a weighted `data.mix`.

A mix draws from each source its share of the rows (weights are proportions): `data.max_rows` rows in all,
or, without it, as many as the weights allow without repeating any row (the source that runs out first
decides). A source asked for more rows than it holds gives all of them, as often as needed, and a random
rest. Which rows are drawn depends only on the data and `training.seed`, and the rows keep their file order
within each source. Every file's hash, weight and the rows used from it go into the manifest.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from pathlib import Path

from finetune.data.read import Row, read
from finetune.recipe import DataSection


def specs(section: DataSection) -> list[tuple[str, str | list[str]]]:
    """(split, what `read` gets) for every source of the recipe, in reading order."""
    train = [("train", m.source) for m in section.mix] if section.mix else [("train", section.train)]
    return train + ([("validation", section.validation)] if isinstance(section.validation, str) else [])


def read_train(section: DataSection, seed: int) -> tuple[list[Row], list[dict], list[str]]:
    """Training rows, one manifest record per file, and notes for the console."""
    if not section.mix:
        rows, files = read(section.train, section.columns, section.max_rows)  # type: ignore[arg-type]
        cut = [f"data.max_rows: using the first {len(rows)} rows"] if any("used" in f for f in files) else []
        return rows, files, cut
    groups = [read(m.source, section.columns) for m in section.mix]
    total_weight = sum(m.weight for m in section.mix)
    shares = [m.weight / total_weight for m in section.mix]
    sizes = [len(rows) for rows, _ in groups]
    total = section.max_rows or int(min(n / p for n, p in zip(sizes, shares)) + 1e-9)
    counts = _apportion(total, shares)
    rng = random.Random(seed)
    rows_out: list[Row] = []
    files_out: list[dict] = []
    notes = []
    for m, (rows, files), k in zip(section.mix, groups, counts):
        picked = list(range(len(rows))) * (k // len(rows)) + sorted(rng.sample(range(len(rows)), k % len(rows)))
        rows_out += [rows[i] for i in picked]
        per_file = _per_file(files, picked)
        files_out += [{**f, "mix_source": _name(m.source), "weight": m.weight, "used": u} for f, u in zip(files, per_file)]
        repeat = f", each row about {k / len(rows):.1f} times" if k > len(rows) else ""
        notes.append(f"{_name(m.source)}: {k} of {len(rows)} rows ({100 * k / total:.0f} % of the mix{repeat})")
    return rows_out, files_out, [f"data.mix: {total} rows — " + "; ".join(notes)]


def _name(source: str | list[str]) -> str:
    return source if isinstance(source, str) else ", ".join(source)


def _apportion(total: int, shares: list[float]) -> list[int]:
    """Whole row counts in proportion to `shares` that add up to `total` (largest remainders get the rest)."""
    exact = [total * p for p in shares]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(shares)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _per_file(files: list[dict], picked: list[int]) -> list[int]:
    """How many of the picked row indices fall in each file of a source (files are read in order)."""
    ends, end = [], 0
    for f in files:
        end += f["rows"]
        ends.append(end)
    used = [0] * len(files)
    for i in picked:
        used[bisect_right(ends, i)] += 1
    return used


def paths(section: DataSection) -> list[tuple[str, Path | str]]:
    """(split, local file or hub id) of every source, for keying the prepared-data cache."""
    from finetune.data.read import expand

    return [(split, src) for split, spec in specs(section) for src in expand(spec)]
