"""Files -> rows, each row tagged with where it came from (`file line N`, `file row N`).

Every file is read from disk once: the same bytes give its sha256 (for the manifest) and its rows.
JSON Lines, JSON and CSV are parsed with the standard library, which knows the exact line of every
record (a quoted CSV field may span lines: the record is named by its first line). Parquet rows are
numbered (`file row N`), `.txt` files are split into paragraphs at blank lines, each named by its first
line. Folders and globs expand to their data files, sorted; anything else with an owner/name shape is a hub
dataset, `owner/name[:subset][@split]` (split `train` unless named), hashed by its rows' content.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Row:
    data: dict
    where: str  # "file line N" / "file row N"


GLOB = set("*?[")


def expand(spec: str | list[str]) -> list[Path | str]:
    """Files named by `data.train`: paths, folders (their supported files, sorted), globs (their matching
    data files, sorted), or a hub id."""
    out: list[Path | str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        p = Path(item).expanduser()
        if GLOB & set(item.partition("@")[0]) and not p.exists():  # after `@`, a hub split may hold datasets' `[:100]`
            anchor = Path(p.anchor) if p.is_absolute() else Path()
            files = sorted(f for f in anchor.glob(str(p.relative_to(anchor)) if p.is_absolute() else str(p))
                           if f.suffix in READERS and f.is_file())
            if not files:
                raise UserError(f"{item}: the pattern matches no data files (.jsonl .json .csv .parquet .txt) — check the pattern "
                                "(paths are relative to where you run finetune)")
            out.extend(files)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in READERS and f.is_file())
            if not files:
                raise UserError(f"{p}: folder holds no data files (.jsonl .json .csv .parquet .txt)")
            out.extend(files)
        elif p.is_file():
            if p.suffix not in READERS:
                raise UserError(f"{p}: unsupported file type `{p.suffix}` — use .jsonl, .json, .csv, .parquet or .txt")
            out.append(p)
        elif p.suffix in READERS or "/" not in item or item.startswith((".", "/", "~")):
            raise UserError(f"{item}: data file not found — check data.train / data.validation (paths are relative to where you run finetune)")
        else:
            out.append(item)  # owner/name: a hub dataset
    return out


def _decode(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not valid UTF-8 text (byte {raw[exc.start]:#x}) — save the file as UTF-8") from None
    return text.replace("\r\n", "\n")


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {n}: invalid JSON ({exc.msg} at column {exc.colno}) — fix or remove that line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} line {n}: expected one JSON object per line, got {type(obj).__name__} — wrap the record in {{...}}")
        rows.append(Row(obj, f"{path} line {n}"))
    return rows


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def _items(text: str, start: int) -> list[tuple[Any, int]]:
    """The values of the JSON array starting at `start`, each with the offset where it begins."""
    dec = json.JSONDecoder()
    out, i = [], _skip_ws(text, start + 1)
    if text[i] == "]":
        return out
    while True:
        value, end = dec.raw_decode(text, i)
        out.append((value, i))
        i = _skip_ws(text, end)
        if text[i] == "]":
            return out
        i = _skip_ws(text, i + 1)  # the comma; the document already parsed, so the syntax is known good


def _list_start(text: str, key: str) -> int:
    """Offset of the value under `key` in the top-level JSON object."""
    dec = json.JSONDecoder()
    i = _skip_ws(text, _skip_ws(text, 0) + 1)
    while True:
        name, i = dec.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the colon
        if name == key:
            return i
        _, i = dec.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the comma


def _json(path: Path, text: str) -> list[Row]:
    """A list of records, or an object holding one list of records under some key."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg}) — fix the syntax there") from None
    start = _skip_ws(text, 0)
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of records, or an object with exactly one list in it (found keys {list(doc)})")
        start = _list_start(text, lists[0])
    if not isinstance(doc, (list, dict)):
        raise UserError(f"{path}: expected a JSON list of objects (one per example)")
    items = _items(text, start)
    lines = [text.count("\n", 0, offset) + 1 for _, offset in items]
    rows = []
    for i, ((value, _), line) in enumerate(zip(items, lines)):
        # several records on one line (a minified file): the item number tells them apart
        where = f"{path} line {line}" if lines.count(line) == 1 else f"{path} line {line} (item {i + 1})"
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a JSON object per example, got {type(value).__name__} — wrap the record in {{...}}")
        rows.append(Row(value, where))
    return rows


def _csv(path: Path, text: str) -> list[Row]:
    """Every value is text, as written; an empty cell is "" and a row short of cells lacks those fields."""
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows, last = [], 0
    try:
        for record in reader:
            first, last = last + 1, reader.line_num
            if len(record) <= 1 and not "".join(record).strip():  # a blank line; a row of empty cells is a row
                continue
            if header is None:
                header = record
                continue
            if len(record) > len(header):
                raise UserError(f"{path} line {first}: {len(record)} values but the header has {len(header)} columns — quote values that contain commas")
            rows.append(Row(dict(zip(header, record)), f"{path} line {first}"))
    except csv.Error as exc:
        raise UserError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    return rows


def _parquet(path: Path, raw: bytes) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except Exception as exc:  # noqa: BLE001 (pyarrow raises several types for a damaged file)
        raise UserError(f"{path}: could not read this parquet file ({str(exc).splitlines()[0][:200]}) — check its format") from None
    return [Row(r, f"{path} row {i + 1}") for i, r in enumerate(table.to_pylist())]


def _paragraphs(path: Path, text: str) -> list[Row]:
    """Paragraphs split at blank lines, exactly as written (the text is what is trained on)."""
    rows, offset = [], 0
    for part in text.split("\n\n"):
        if part.strip():
            line = text.count("\n", 0, offset + len(part) - len(part.lstrip("\n"))) + 1
            rows.append(Row({"text": part}, f"{path} line {line}"))
        offset += len(part) + 2
    return rows


def read_file(path: Path) -> tuple[list[Row], str]:
    """Rows of one local file and the sha256 of its bytes."""
    raw = path.read_bytes()
    if not raw:
        raise UserError(f"{path}: file is empty — add some examples")
    digest = hashlib.sha256(raw).hexdigest()
    if path.suffix == ".parquet":
        return _parquet(path, raw), digest
    text = _decode(path, raw)
    parse = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".txt": _paragraphs}[path.suffix]
    return parse(path, text), digest


def hub_parts(spec: str) -> tuple[str, str | None, str]:
    """`owner/name[:subset][@split]` -> (name, subset, split); the split defaults to `train`."""
    rest, _, split = spec.partition("@")
    name, _, subset = rest.partition(":")
    return name, subset or None, split or "train"


def read_hub(spec: str, limit: int | None = None) -> tuple[list[Row], str]:
    """Rows of a hub dataset split (only the first `limit`, streamed, when given) and a sha256 of their content."""
    import datasets

    name, subset, split = hub_parts(spec)
    datasets.disable_progress_bars()
    try:
        if limit is not None:  # streaming reads only the shards that hold the first rows
            records = list(datasets.load_dataset(name, subset, split=split, streaming=True).take(limit))
        else:
            records = datasets.load_dataset(name, subset, split=split).to_list()
    except Exception as exc:  # noqa: BLE001 (network, auth and format errors all mean the same to the user)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{spec}: not a local file, and hub dataset `{name}` (subset {subset or 'default'}, split {split}) could not be "
                        f"loaded ({first}) — check the name, subset and split, the network, or HF_TOKEN for a gated dataset; "
                        "without a network, use local files") from None
    digest = hashlib.sha256()
    for r in records:  # the content, since a hub dataset has no file of ours to hash
        digest.update(json.dumps(r, sort_keys=True, default=str).encode() + b"\n")
    return [Row(r, f"{spec} row {i + 1}") for i, r in enumerate(records)], digest.hexdigest()


def rename(data: dict, columns: dict[str, str]) -> dict:
    """Apply data.columns. A null (parquet and hub rows have every column) never hides a real value."""
    out: dict = {}
    for k, v in data.items():
        new = columns.get(k, k)
        if v is None and out.get(new) is not None:
            continue
        out[new] = v
    return out


def read(spec: str | list[str], columns: dict[str, str], limit: int | None = None) -> tuple[list[Row], list[dict]]:
    """All rows named by `spec` (files, folders, globs, hub ids), at most `limit` of them in that order, and one
    record per source for the manifest (with `used` when the limit left rows out)."""
    rows: list[Row] = []
    files = []
    for src in expand(spec):
        left = None if limit is None else limit - len(rows)
        if left == 0:
            break  # the row limit is reached: later sources are not read
        if isinstance(src, Path):
            got, digest = read_file(src)
        else:
            got, digest = read_hub(src, left)
        record = {"path": str(src), "rows": len(got), "sha256": digest}
        if left is not None and len(got) > left:
            got = got[:left]
            record["used"] = left
        files.append(record)
        rows.extend(got)
    if not rows:
        raise UserError(f"{spec}: no examples found — the data is empty")
    if columns:
        for r in rows:
            r.data = rename(r.data, columns)
    return rows, files
