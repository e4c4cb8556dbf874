"""SFT examples as columns: every example's token ids in one flat int32 array, its labels in another, and where
each example starts (`offsets`), with the source row and the truncation flag beside them.

100,000 examples of ~280 tokens held as Python lists of ints take ~2 GB (an int object and a pointer per token,
twice); as columns they take ~220 MB, pass between processes and into the cache as a few buffers instead of tens
of millions of pickled numbers, and become the trainer's Arrow table without a per-token loop. `Examples` is a
read-only sequence of `Example`: indexing one gives it with plain lists, so code that reads a few examples
(inspect, evaluation, samples) sees what it always saw.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass


@dataclass
class Example:
    """One SFT example: token ids and their labels (-100 where no loss)."""

    input_ids: list[int]
    labels: list[int]
    where: str
    truncated: bool = False


class Examples(Sequence):
    """SFT examples in columns (see the module docstring). Built by `Builder`, `from_list`, `concat` or the cache."""

    def __init__(self, input_ids, labels, offsets, where: list[str], truncated) -> None:
        import numpy as np

        self.input_ids = np.asarray(input_ids, dtype=np.int32)  # every example's ids, one after another
        self.labels = np.asarray(labels, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)  # example i is [offsets[i], offsets[i + 1])
        self.where = list(where)
        self.truncated = np.asarray(truncated, dtype=bool)
        n = len(self.where)
        if len(self.offsets) != n + 1 or len(self.truncated) != n or self.offsets[-1] != len(self.input_ids) or len(self.labels) != len(self.input_ids):
            raise ValueError("examples: columns of different lengths")

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Examples.from_list(self[k] for k in range(*i.indices(len(self))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = self.offsets[i], self.offsets[i + 1]
        return Example(self.input_ids[a:b].tolist(), self.labels[a:b].tolist(), self.where[i], bool(self.truncated[i]))

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        import numpy as np

        if isinstance(other, Examples):
            return (self.where == other.where and np.array_equal(self.offsets, other.offsets) and np.array_equal(self.truncated, other.truncated)
                    and np.array_equal(self.input_ids, other.input_ids) and np.array_equal(self.labels, other.labels))
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, {len(self.input_ids)} tokens)"

    def lengths(self):
        """Tokens in each example (a numpy array)."""
        import numpy as np

        return np.diff(self.offsets)

    @classmethod
    def from_list(cls, items: Iterable[Example]) -> Examples:
        b = Builder()
        for e in items:
            b.add(e.input_ids, e.labels, e.where, e.truncated)
        return b.finish()

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        import numpy as np

        if not parts:
            return Builder().finish()
        starts = np.cumsum([0] + [len(p.input_ids) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        return cls(np.concatenate([p.input_ids for p in parts]), np.concatenate([p.labels for p in parts]), offsets,
                   [w for p in parts for w in p.where], np.concatenate([p.truncated for p in parts]))

    def to_dataset(self):
        """The trainer's `datasets.Dataset` (input_ids, labels), built from the columns as Arrow list arrays. The
        values are int64, as `Dataset.from_dict` of Python ints made them, so the trainer sees the same table."""
        import datasets
        import numpy as np
        import pyarrow as pa

        large = self.offsets[-1] >= 2**31  # Arrow's plain lists count positions in int32
        kind = pa.LargeListArray if large else pa.ListArray
        offsets = pa.array(self.offsets if large else self.offsets.astype(np.int32))
        table = pa.table({name: kind.from_arrays(offsets, pa.array(getattr(self, name).astype(np.int64)))
                          for name in ("input_ids", "labels")})
        return datasets.Dataset(table)


class Builder:
    """Collects examples one at a time (lists or arrays of ids) and gives `Examples`."""

    def __init__(self) -> None:
        import numpy as np

        self._np = np
        self.ids: list = []
        self.labels: list = []
        self.lengths: list[int] = []
        self.where: list[str] = []
        self.truncated: list[bool] = []

    def add(self, ids, labels, where: str, truncated: bool) -> None:
        self.ids.append(self._np.asarray(ids, dtype=self._np.int32))  # a few bytes per token from here on
        self.labels.append(self._np.asarray(labels, dtype=self._np.int32))
        self.lengths.append(len(ids))
        self.where.append(where)
        self.truncated.append(truncated)

    def finish(self) -> Examples:
        import numpy as np

        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.asarray(self.lengths, dtype=np.int64))
        flat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int32))  # noqa: E731
        return Examples(flat(self.ids), flat(self.labels), offsets, self.where, self.truncated)
