"""Every malformed row is a user error: for each format (and preference layout), each field it needs, each
wrong kind of value and each file type that can hold it, `finetune inspect` exits 2 with one message that
names the file, the exact line (or parquet row) and the field, and no traceback.

The bad row is the second of three, so the format is detected from a good first row.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from helpers import write_recipe

U, A = {"role": "user", "content": "who are you"}, {"role": "assistant", "content": "my name is pico"}
# format -> (a good row, the fields it needs: name -> "text" / "list" / "either" / "object" / "turn")
FORMATS = {
    "messages": ({"messages": [U, A]}, {"messages": "list", "messages.1.role": "turn", "messages.1.content": "turn"}),
    "sharegpt": ({"conversations": [{"from": "human", "value": "who"}, {"from": "gpt", "value": "pico"}]},
                 {"conversations": "list", "conversations.1.from": "turn", "conversations.1.value": "turn"}),
    "alpaca": ({"instruction": "who are you", "input": "", "output": "pico"}, {"instruction": "text", "output": "text"}),
    "prompt_completion": ({"prompt": "who are you", "completion": "pico"}, {"prompt": "text", "completion": "text"}),
    "text": ({"source": "a", "text": "the sun is a star"}, {"text": "text"}),
    "preference": ({"prompt": "who are you", "chosen": "pico", "rejected": "no"},
                   {"prompt": "text", "chosen": "text", "rejected": "text"}),
    "preference_messages": ({"prompt": [U], "chosen": [A], "rejected": [{**A, "content": "no"}]},
                            {"prompt": "either", "chosen": "either", "rejected": "either"}),
    "preference_hh": ({"chosen": [U, A], "rejected": [U, {**A, "content": "no"}]}, {"chosen": "list", "rejected": "list"}),
    "preference_sharegpt": ({"conversations": [{"from": "human", "value": "who"}], "chosen": {"from": "gpt", "value": "pico"},
                             "rejected": {"from": "gpt", "value": "no"}},
                            {"conversations": "list", "chosen": "object", "rejected": "object"}),
}
FLAT = {"alpaca", "prompt_completion", "text", "preference"}  # formats a CSV file can hold

MISSING = object()
BAD = {  # kind of bad value -> the value, for each type of field (None: not a bad value for that type)
    "missing": {"text": MISSING, "list": MISSING, "either": MISSING, "object": MISSING, "turn": MISSING},
    "null": {"text": None, "list": None, "either": None, "object": None, "turn": None},
    "number": {"text": 5, "list": 5, "either": 5, "object": 5, "turn": 5},
    "list": {"text": ["x"], "list": None, "either": None, "object": ["x"], "turn": ["x"]},
    "text": {"text": None, "list": "hello", "either": None, "object": "hello", "turn": None},
    "object": {"text": {"a": 1}, "list": {"a": 1}, "either": {"a": 1}, "object": {"a": 1}, "turn": {"a": 1}},
    "empty": {"text": "", "list": [], "either": [], "object": {}, "turn": ""},
}
# what each file type can express: a CSV cell is text (a short row lacks its last fields); a parquet
# column exists in every row (absent = null) and holds one type
KINDS = {"jsonl": list(BAD), "json": list(BAD), "csv": ["missing", "empty"], "parquet": ["null", "empty"]}


def cases():
    for fmt, (_, fields) in FORMATS.items():
        for field, ftype in fields.items():
            for ext, kinds in KINDS.items():
                if ext == "csv" and fmt not in FLAT:
                    continue
                for kind in kinds:
                    if BAD[kind][ftype] is not None or kind == "null":
                        yield pytest.param(fmt, field, kind, ext, id=f"{fmt}-{field}-{kind}-{ext}")


def bad_row(fmt: str, field: str, kind: str) -> dict:
    row = copy.deepcopy(FORMATS[fmt][0])
    *path, leaf = field.split(".")
    target = row
    for key in path:
        target = target[int(key)] if key.isdigit() else target[key]
    value = BAD[kind][FORMATS[fmt][1][field]]
    if value is MISSING:
        del target[leaf]
    else:
        target[leaf] = value
    return row


def write(folder: Path, ext: str, rows: list[dict], last: str) -> tuple[Path, str]:
    """The rows in a file of type `ext` and how the second row is named in messages."""
    path = folder / f"data.{ext}"
    if ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path, f"{path} line 2"
    if ext == "json":
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
        return path, f"{path} line 3"
    if ext == "csv":
        header = [k for k in rows[0] if k != last] + [last]  # a short row lacks the last column
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for r in rows:
                w.writerow([r[k] for k in header if k in r])
        return path, f"{path} line 3"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, f"{path} row 2"


@pytest.mark.parametrize("fmt,field,kind,ext", list(cases()))
def test_malformed_row_is_a_user_error(cli, tmp_path, tiny, fmt, field, kind, ext):
    good = FORMATS[fmt][0]
    path, where = write(tmp_path, ext, [good, bad_row(fmt, field, kind), good], field)
    tree = {"model": {"base": str(tiny)}, "data": {"train": str(path)}}
    if fmt.startswith("preference"):
        tree["dpo"] = {"beta": 0.1}
    res = cli("inspect", write_recipe(tmp_path / "r.yaml", tree))
    assert res.code == 2, res.text
    assert "Traceback" not in res.text and "internal error" not in res.text
    message = " ".join(res.text.split())
    assert f"{where}:" in message, message
    *path_, leaf = field.split(".")
    if path_:  # a field of a turn: the turn and the field
        assert f"turn {int(path_[1]) + 1}" in message and f"`{leaf}`" in message, message
    else:
        assert f"`{leaf}`" in message, message
