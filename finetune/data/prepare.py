"""The whole data path for a recipe: read, normalise, tokenize, fit into data.max_length, split off
validation rows, count what was cut or dropped and say so in words -> a typed `Prepared` result.

SFT gives `Examples` (token ids + labels in flat arrays, examples.py; the trainer uses them as they are). DPO gives
`PreferencePair`s: prompt / chosen / rejected strings rendered with the chat template, which TRL's
DPOTrainer tokenizes; their ids are computed here the way TRL does, so lengths are exact and already fit.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar, overload

from finetune.data import cache, fit, formats, prompts, sources, template, unpaired
from finetune.data.examples import Builder, Example, Examples
from finetune.data.read import read as read_rows
from finetune.errors import UserError
from finetune.recipe import DataSection


@dataclass
class PreferencePair:
    """One DPO example: the rendered strings TRL receives, and the ids TRL derives from them."""

    prompt: str
    chosen: str
    rejected: str
    where: str
    prompt_ids: list[int] = field(default_factory=list)
    chosen_ids: list[int] = field(default_factory=list)
    rejected_ids: list[int] = field(default_factory=list)
    truncated: bool = False

    @property
    def length(self) -> int:
        """Tokens in the longer of the two sequences the trainer sees (prompt + answer)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


E = TypeVar("E", Example, PreferencePair, unpaired.UnpairedExample)


@dataclass
class Tally:
    """What happened to the rows of one split on their way to max_length."""

    rows: int = 0
    truncated: dict[str, int] = field(default_factory=dict)  # how -> rows
    n_truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # cause -> rows
    first: dict[str, str] = field(default_factory=dict)  # cause -> "where: detail" of the first such row
    need: dict[str, int | None] = field(default_factory=dict)  # cause -> data.max_length that keeps them all
    fix: dict[str, str] = field(default_factory=dict)

    def drop(self, d: fit.Dropped, where: str) -> None:
        self.dropped[d.cause] = self.dropped.get(d.cause, 0) + 1
        self.first.setdefault(d.cause, f"{where}: {d.detail}")
        self.need[d.cause] = None if d.need is None else max(d.need, self.need.get(d.cause) or 0)
        self.fix[d.cause] = d.fix

    def cut(self, how: list[str]) -> None:
        self.n_truncated += bool(how)
        for h in how:
            self.truncated[h] = self.truncated.get(h, 0) + 1

    def add(self, other: Tally) -> None:
        """Fold in the tally of a later chunk of the same split (`first` keeps the earliest row)."""
        self.n_truncated += other.n_truncated
        for how, n in other.truncated.items():
            self.truncated[how] = self.truncated.get(how, 0) + n
        for cause, n in other.dropped.items():
            self.dropped[cause] = self.dropped.get(cause, 0) + n
            self.first.setdefault(cause, other.first[cause])
            mine, theirs = self.need.get(cause, 0), other.need[cause]
            self.need[cause] = None if theirs is None or mine is None else max(mine, theirs)
            self.fix[cause] = other.fix[cause]

    def fixes(self) -> list[str]:
        return list(dict.fromkeys(self.fix[c].format(need=self.need[c]) for c in self.dropped if self.need[c] is not None))

    def sentences(self, split: str, max_length: int) -> list[str]:
        """The console report: every drop with its cause and an example, and how rows were shortened."""
        out = []
        for cause, n in self.dropped.items():
            fixes = self.fix[cause].format(need=self.need[cause]) if self.need[cause] is not None else ""
            out.append(f"{n} of {self.rows} {split} rows dropped: {cause} (e.g. {self.first[cause]})" + (f" — {fixes} to keep them" if fixes else ""))
        if self.n_truncated:
            how = ", ".join(f"{n} {h}" for h, n in self.truncated.items())
            out.append(f"{self.n_truncated} of {self.rows} {split} rows shortened to fit data.max_length ({max_length}): {how}")
        return out


@dataclass
class Prepared(Generic[E]):
    """What the trainers and `inspect` need: typed examples plus the counts behind them."""

    format: str
    files: list[dict]
    rows: int
    train: Sequence[E]  # `Examples` for SFT, lists otherwise
    validation: Sequence[E]
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # cause -> rows, training and validation together
    truncations: dict[str, int] = field(default_factory=dict)  # how -> rows
    notes: list[str] = field(default_factory=list)
    cache: str = "off"  # hit: read from the prepared-data cache · miss: prepared and stored · off: not cacheable (hub data)


def describe_dropped(dropped: dict[str, int]) -> str:
    """Drop counts in words, for tables: '3 rows: the prompt alone is longer than data.max_length (64)'."""
    return "; ".join(f"{n} row{'s' if n != 1 else ''}: {cause}" for cause, n in dropped.items()) or "none"


def split_validation(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * fraction))
    if n_val >= len(rows):
        raise UserError(f"data.validation: {fraction} of {len(rows)} rows leaves nothing to train on — use a smaller fraction or a file")
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def normalise(rows: list, fmt: str, method: str, system_prompt: str | None, training: bool = True) -> tuple[str, list[tuple[dict, str]]]:
    """Rows -> (format, [(record, where)]) through the method's reader: labelled single answers for KTO
    (unpaired.py), prompts for GRPO (prompts.py), conversations, documents or preference pairs otherwise (formats.py). `training`: these are the
    training rows (KTO checks that both labels occur in them)."""
    if method == "kto":
        return unpaired.normalise(rows, fmt, system_prompt, training)
    if method == "grpo":  # prompts only, in any format that has one; the rest of the row goes to the rewards
        return "prompts", prompts.normalise_prompts(rows, system_prompt)
    return formats.normalise(rows, fmt, method, system_prompt)


def tokenize_sft(tokenizer, records: list[tuple[dict, str]], section: DataSection, tally: Tally, check: bool) -> Examples:
    if check and records and "messages" in records[0][0]:
        msgs = records[0][0]["messages"]
        ids, labels = template.tokenize_conversation(tokenizer, msgs, section.train_on)
        template.check_template(tokenizer, msgs, ids, labels)
    examples = Builder()
    # rendered and tokenized in batches; fitting (rarely more than a length check) row by row
    for (rec, where), encoded in zip(records, template.tokenize_records(tokenizer, [r for r, _ in records], section.train_on)):
        got = fit.fit_sft(tokenizer, rec, section.max_length, section.truncation, section.train_on, encoded)
        if isinstance(got, fit.Dropped):
            tally.drop(got, where)
            continue
        ids, labels, how = got
        tally.cut(how)
        examples.add(ids, labels, where, bool(how))
    return examples.finish()


def tokenize_preference(tokenizer, records: list[tuple[dict, str]], section: DataSection, tally: Tally, check: bool) -> list[PreferencePair]:
    pairs = []
    for rec, where in records:
        got = fit.fit_pair(tokenizer, rec, section.max_length, section.truncation, where)
        if isinstance(got, fit.Dropped):
            tally.drop(got, where)
            continue
        prompt, chosen, rejected, (p, c, r), how = got
        tally.cut(how)
        pairs.append(PreferencePair(prompt, chosen, rejected, where, p, c, r, bool(how)))
    return pairs


def tokenize_unpaired(tokenizer, records: list[tuple[dict, str]], section: DataSection, tally: Tally,
                      check: bool) -> list[unpaired.UnpairedExample]:
    examples = []
    for rec, where in records:
        got = unpaired.fit_unpaired(tokenizer, rec, section.max_length, section.truncation, where)
        if isinstance(got, fit.Dropped):
            tally.drop(got, where)
            continue
        prompt, completion, (p, c), how = got
        tally.cut(how)
        examples.append(unpaired.UnpairedExample(prompt, completion, rec["label"], where, p, c, bool(how)))
    return examples


TOKENIZERS = {"sft": tokenize_sft, "preference": tokenize_preference, "unpaired": tokenize_unpaired}
SMALL = 2000  # rows below which one process is used: starting the workers costs ~0.3-0.5 s here, a few hundred rows' work
_job: tuple | None = None  # (tokenizer, records, section, kind, check), set in each worker before it starts


def workers(setting: int | None, rows: int) -> int:
    """data.num_proc, or one process per usable core (one for small data, or inside each of several ranks)."""
    import os

    if setting:
        return setting
    if rows < SMALL:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _set_job(job: tuple) -> None:
    import os

    global _job
    _job = job
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker per core already: no tokenizer threads on top


def _tokenize_chunk(bounds: tuple[int, int]) -> tuple[list, Tally]:
    tokenizer, records, section, kind, check = _job  # type: ignore[misc]
    lo, hi = bounds
    tally = Tally()
    return TOKENIZERS[kind](tokenizer, records[lo:hi], section, tally, check and lo == 0), tally


def tokenize_all(tokenizer, records: list[tuple[dict, str]], section: DataSection, kind: str, tally: Tally, check: bool) -> list:
    """Every record tokenized and fitted, in order; in worker processes when there are enough rows. Workers
    are forked where the platform allows it, so they inherit the tokenizer and the records instead of
    receiving a pickled copy; only the chunk bounds go out and the examples come back."""
    import multiprocessing as mp

    n = workers(section.num_proc, len(records))
    if n <= 1:
        return TOKENIZERS[kind](tokenizer, records, section, tally, check)
    step = max(1, -(-len(records) // (n * 4)))  # a few chunks per worker, so a slow chunk does not idle the others
    bounds = [(lo, min(lo + step, len(records))) for lo in range(0, len(records), step)]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(n, initializer=_set_job, initargs=((tokenizer, records, section, kind, check),)) as pool:
        results = pool.map(_tokenize_chunk, bounds, chunksize=1)
    for _, part in results:
        tally.add(part)
    if kind == "sft":
        return Examples.concat([examples for examples, _ in results])
    return [e for examples, _ in results for e in examples]


@overload
def prepare(section: DataSection, tokenizer, method: Literal["sft"], seed: int, log: Callable[[str], None] = ...) -> Prepared[Example]: ...
@overload
def prepare(section: DataSection, tokenizer, method: Literal["dpo"], seed: int, log: Callable[[str], None] = ...) -> Prepared[PreferencePair]: ...
def prepare(section: DataSection, tokenizer, method: str, seed: int, log: Callable[[str], None] = print) -> Prepared:
    digest = cache.key(section, tokenizer, method, seed)
    types = {"sft": Example, "preference": PreferencePair, "unpaired": unpaired.UnpairedExample}
    hit = cache.load(digest, types) if digest else None
    if hit is not None:
        template.ensure_chat_template(tokenizer)  # the trainer and the saved adapter need it, as on a miss
        meta, train_examples, val_examples = hit
        prepared = Prepared(**meta["prepared"], train=train_examples, validation=val_examples, cache="hit")
        for note in prepared.notes + [f"prepared data read from the cache ({cache.root() / digest})"]:
            log(note)
        return prepared
    prepared = _prepare(section, tokenizer, method, seed, log)
    if digest:
        summary = {k: v for k, v in prepared.__dict__.items() if k not in ("train", "validation", "cache")}
        kind = "unpaired" if method == "kto" else "preference" if prepared.format == "preference" else "sft"
        prepared.cache = "miss" if cache.store(digest, {"kind": kind, "prepared": summary}, prepared.train, prepared.validation, types[kind]) else "off"
    return prepared


def _prepare(section: DataSection, tokenizer, method: str, seed: int, log: Callable[[str], None]) -> Prepared:
    rows, files, source_notes = sources.read_train(section, seed)
    if isinstance(section.validation, str):
        val_rows, val_files = read_rows(section.validation, section.columns)
        files += [{**f, "split": "validation"} for f in val_files]
    elif isinstance(section.validation, float):
        rows, val_rows = split_validation(rows, section.validation, seed)
    else:
        val_rows = []
    fmt, records = normalise(rows, section.format, method, section.system_prompt)
    _, val_records = normalise(val_rows, fmt, method, section.system_prompt, training=False) if val_rows else (fmt, [])
    added = template.ensure_chat_template(tokenizer)
    prepared: Prepared = Prepared(format=fmt, files=files, rows=len(rows) + len(val_rows), train=[], validation=[])
    del rows, val_rows  # the records hold what is needed; the raw rows of a large file are not kept beside them
    how = "set by data.format" if section.format != "auto" else "detected"
    prepared.notes += source_notes
    prepared.notes.append(f"format: {fmt} ({how}); {len(records)} training rows, {len(val_records)} validation rows")
    if added:
        prepared.notes.append("the tokenizer has no chat template: using the default ChatML template (saved with the adapter)")
    kind = "unpaired" if method == "kto" else "preference" if fmt == "preference" else "sft"
    train, val = Tally(rows=len(records)), Tally(rows=len(val_records))
    prepared.train = tokenize_all(tokenizer, records, section, kind, train, True)
    prepared.validation = tokenize_all(tokenizer, val_records, section, kind, val, False) if val_records else Examples.concat([]) if kind == "sft" else []
    n_records, has_validation = len(records), bool(val_records)
    del records, val_records  # tokenized: from here on only the examples are held
    for tally in (train, val):
        prepared.truncated += tally.n_truncated
        for key, n in tally.dropped.items():
            prepared.dropped[key] = prepared.dropped.get(key, 0) + n
        for key, n in tally.truncated.items():
            prepared.truncations[key] = prepared.truncations.get(key, 0) + n
    report = train.sentences("training", section.max_length) + val.sentences("validation", section.max_length)
    why = "; ".join(f"{n} {cause}" for cause, n in train.dropped.items())
    fixes = train.fixes()
    if not prepared.train:
        raise UserError(f"{section.train or 'data.mix'}: no usable training examples after tokenization — all {n_records} rows dropped ({why}; e.g. "
                        f"{next(iter(train.first.values()))})" + (f" — {' or '.join(fixes)}" if fixes else ""))
    dropped_train = sum(train.dropped.values())
    if dropped_train / max(1, n_records) > section.max_dropped_fraction:
        raise UserError(
            f"data: {dropped_train} of {n_records} training rows would be dropped, more than data.max_dropped_fraction="
            f"{section.max_dropped_fraction} ({why}; e.g. {next(iter(train.first.values()))}) — "
            + " or ".join(fixes + ["raise data.max_dropped_fraction to train without them"])
        )
    if report:
        report.append(f"training on {len(prepared.train)} examples" + (f", validating on {len(prepared.validation)}" if has_validation else ""))
    prepared.notes += report
    for note in prepared.notes:
        log(note)
    return prepared


def to_dataset(examples: Sequence[Example]):
    """The trainer's dataset of input_ids and labels (from the columns of `Examples`, or from a list of `Example`)."""
    if not isinstance(examples, Examples):
        examples = Examples.from_list(examples)
    return examples.to_dataset()


def to_preference_dataset(pairs: list[PreferencePair]):
    """The strings TRL's DPOTrainer tokenizes; they already fit data.max_length, so its truncation never fires."""
    import datasets

    return datasets.Dataset.from_dict({"prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
                                       "rejected": [p.rejected for p in pairs]})


def to_unpaired_dataset(examples: list[unpaired.UnpairedExample]):
    """The strings and labels TRL's KTOTrainer tokenizes; they already fit data.max_length."""
    import datasets

    return datasets.Dataset.from_dict({"prompt": [e.prompt for e in examples], "completion": [e.completion for e in examples],
                                       "label": [e.label for e in examples]})
