"""Prepared (tokenized) data on disk, so that a second run, `--resume` and `inspect` after `sft` skip the work.

An entry lives in `cache_root()/prepared/<key>/` and is keyed by everything the result depends on: the bytes
of every data file (sha256), the tokenizer (its serialised vocabulary, merges and added tokens, special
tokens and chat template), the data section of the recipe, the method and the seed (which picks a validation
fraction). Any change gives another key, so an entry is never stale; entries are written to a temporary
folder renamed into place, so a reader never sees half. Hub datasets have no file hash to key on and are not
cached. Token ids are stored as flat int32 arrays (`.npy`, read with allow_pickle=False, so nothing is
unpickled) with each example's length beside them: reading 100,000 examples back is then a few array reads
instead of parsing tens of millions of numbers as JSON. The other fields are JSON Lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import fields
from itertools import chain
from pathlib import Path

from finetune.data.examples import Example, Examples

FORMAT = 2  # bump when what prepare() produces for the same input changes


def root() -> Path:
    from finetune.models import cache_root

    return cache_root() / "prepared"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> str:
    """A digest of what decides the token ids: the tokenizer itself, its special tokens and its chat template."""
    from finetune.data.template import DEFAULT_CHAT_TEMPLATE

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, str(tokenizer.special_tokens_map),
                         tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE,  # prepare() gives a template-less tokenizer this one
                         getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)], default=str).encode())
    return h.hexdigest()


def key(section, tokenizer, method: str, seed: int) -> str | None:
    """The entry for this data, tokenizer and settings, or None when the data cannot be keyed (a hub dataset)."""
    from finetune.data.sources import paths

    files = []
    for split, src in paths(section):
        if not isinstance(src, Path):
            return None
        files.append([split, str(src), _file_digest(src)])
    # data.num_proc is left out: how many processes tokenize does not change the result
    payload = {"format": FORMAT, "files": files, "tokenizer": tokenizer_identity(tokenizer),
               "data": section.model_dump(mode="json", exclude={"num_proc"}), "method": method, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _arrays(cls) -> list[str]:
    """The fields of an example type that hold token ids."""
    return [f.name for f in fields(cls) if f.type == "list[int]"]


def _write(folder: Path, name: str, items: list, cls) -> None:
    import numpy as np

    if isinstance(items, Examples):  # SFT examples are columns already: their arrays are written as they are
        with (folder / f"{name}.jsonl").open("w") as fh:
            fh.writelines(json.dumps({"where": w, "truncated": t}) + "\n" for w, t in zip(items.where, items.truncated.tolist()))
        for field in ("input_ids", "labels"):
            np.save(folder / f"{name}.{field}.npy", getattr(items, field), allow_pickle=False)
            np.save(folder / f"{name}.{field}.lengths.npy", items.lengths(), allow_pickle=False)
        return
    arrays = _arrays(cls)
    with (folder / f"{name}.jsonl").open("w") as fh:
        fh.writelines(json.dumps({k: v for k, v in vars(e).items() if k not in arrays}) + "\n" for e in items)
    for field in arrays:
        lengths = np.fromiter((len(getattr(e, field)) for e in items), dtype=np.int64, count=len(items))
        flat = np.fromiter(chain.from_iterable(getattr(e, field) for e in items), dtype=np.int32, count=int(lengths.sum()))
        np.save(folder / f"{name}.{field}.npy", flat, allow_pickle=False)
        np.save(folder / f"{name}.{field}.lengths.npy", lengths, allow_pickle=False)


def _read(folder: Path, name: str, cls) -> list:
    import numpy as np

    rest = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines() if line]
    if cls is Example:  # back into columns without a Python int per token
        arrays, offsets = [], None
        for field in ("input_ids", "labels"):
            arrays.append(np.load(folder / f"{name}.{field}.npy", allow_pickle=False))
            ends = np.cumsum(np.load(folder / f"{name}.{field}.lengths.npy", allow_pickle=False))
            if len(ends) != len(rest) or (len(ends) and ends[-1] != len(arrays[-1])) or (offsets is not None and not np.array_equal(ends, offsets[1:])):
                raise ValueError(f"{name}.{field}: lengths do not match")  # damaged: prepared again
            offsets = np.concatenate([[0], ends])
        return Examples(*arrays, offsets, [r["where"] for r in rest], [r["truncated"] for r in rest])
    columns = {}
    for field in _arrays(cls):
        flat = np.load(folder / f"{name}.{field}.npy", allow_pickle=False).tolist()
        ends = np.cumsum(np.load(folder / f"{name}.{field}.lengths.npy", allow_pickle=False)).tolist()
        if len(ends) != len(rest) or (ends and ends[-1] != len(flat)):
            raise ValueError(f"{name}.{field}: lengths do not match")  # damaged: prepared again
        columns[field] = [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]
    return [cls(**r, **{k: v[i] for k, v in columns.items()}) for i, r in enumerate(rest)]


def load(digest: str, example_types: dict):
    """(metadata, train, validation) of a stored entry, or None when there is none (or it cannot be read)."""
    folder = root() / digest
    try:
        meta = json.loads((folder / "prepared.json").read_text())
        cls = example_types[meta["kind"]]
        splits = [_read(folder, name, cls) for name in ("train", "validation")]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: prepare again and overwrite it
    return meta, splits[0], splits[1]


def store(digest: str, meta: dict, train: list, validation: list, cls) -> Path | None:
    """Write an entry; a cache that cannot be written (read-only, full disk) only costs the next run the work."""
    folder = root() / digest
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{digest}."))
        for name, items in (("train", train), ("validation", validation)):
            _write(tmp, name, items, cls)
        (tmp / "prepared.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
        return None
    return folder
