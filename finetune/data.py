"""The data path: files -> rows -> one internal form -> chat template -> token ids + loss labels.

Rows are read with the `datasets` library, one file at a time so that every problem can be reported
with its file and line. Every format is normalised to `{"messages": [...]}` (SFT), `{"text": ...}`
(continued pre-training) or `{"prompt": [...], "chosen": [...], "rejected": [...]}` (preference).
Conversations are rendered with the tokenizer's own chat template; the loss mask marks the assistant
turns (with their end-of-turn token) so the model learns to stop.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from finetune.errors import UserError
from finetune.recipe import DataSection

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "system": "system", "tool": "tool"}
SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")

# A plain ChatML template for bases that ship none. The generation tags let transformers mark assistant
# tokens directly; the end-of-turn token sits inside them so that it is trained.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Row:
    data: dict
    where: str  # "file line N" / "file row N"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss
    where: str
    truncated: bool = False


@dataclass
class Prepared:
    """What the trainers and `inspect` need: tokenized examples plus the counts behind them."""

    format: str
    files: list[dict]
    rows: int
    train: list  # list[Example] for SFT, list[dict] (prompt/chosen/rejected strings) for preference
    validation: list
    truncated: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count
    notes: list[str] = field(default_factory=list)


# ---- reading -------------------------------------------------------------------------------------


def expand(spec: str | list[str]) -> list[Path | str]:
    """Files named by `data.train`: paths, folders (their supported files, sorted), or a hub id."""
    out: list[Path | str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        p = Path(item).expanduser()
        if p.is_dir():
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_bad_json_line(path: Path) -> str | None:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{path} line {n}: invalid JSON ({exc.msg} at column {exc.colno}) — fix or remove that line"
                if not isinstance(obj, dict):
                    return f"{path} line {n}: expected one JSON object per line, got {type(obj).__name__} — wrap the record in {{...}}"
    return None


def read_file(path: Path) -> list[Row]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # read errors are reported by us, with the line
    kind = READERS[path.suffix]
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty — add some examples")
    if path.suffix == ".jsonl":
        bad = _first_bad_json_line(path)
        if bad:
            raise UserError(bad)
    if path.suffix == ".json":
        # a list of records, or an object holding one list of records under some key
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg}) — fix the syntax there") from None
        if isinstance(doc, dict):
            lists = [k for k, v in doc.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise UserError(f"{path}: expected a list of records, or an object with exactly one list in it (found keys {list(doc)})")
            doc = doc[lists[0]]
        if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
            raise UserError(f"{path}: expected a JSON list of objects (one per example)")
        return [Row(r, f"{path} item {i + 1}") for i, r in enumerate(doc)]
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if kind == "text" else {}
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as exc:
        raise UserError(f"{path}: could not read this {kind} file ({str(exc).splitlines()[0][:200]}) — check its format") from None
    rows = ds.to_list()
    if path.suffix == ".jsonl":
        lines = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        return [Row(r, f"{path} line {lines[i] if i < len(lines) else i + 1}") for i, r in enumerate(rows)]
    if path.suffix == ".csv":
        return [Row(r, f"{path} line {i + 2}") for i, r in enumerate(rows)]
    return [Row(r, f"{path} row {i + 1}") for i, r in enumerate(rows)]


def read_hub(name: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise UserError(f"{name}: not a local file and the hub dataset could not be loaded ({str(exc).splitlines()[0][:200]})") from None
    return [Row(r, f"{name} row {i + 1}") for i, r in enumerate(ds.to_list())]


def read(spec: str | list[str], columns: dict[str, str]) -> tuple[list[Row], list[dict]]:
    rows: list[Row] = []
    files = []
    for src in expand(spec):
        got = read_file(src) if isinstance(src, Path) else read_hub(src)
        files.append({"path": str(src), "rows": len(got), "sha256": file_sha256(src) if isinstance(src, Path) else None})
        rows.extend(got)
    if not rows:
        raise UserError(f"{spec}: no examples found — the data is empty")
    if columns:
        for r in rows:
            # arrow fills a missing field with None; a renamed field must not be overwritten by that placeholder
            r.data = {columns.get(k, k): v for k, v in r.data.items() if not (v is None and k not in columns)}
    return rows, files


# ---- formats -------------------------------------------------------------------------------------


def _has(d: dict, *keys: str) -> bool:
    return all(d.get(k) is not None for k in keys)


def detect(d: dict, where: str) -> str:
    if _has(d, "chosen", "rejected"):
        return "preference"
    if _has(d, "messages"):
        return "messages"
    if _has(d, "conversations"):
        conv = d["conversations"]
        first = conv[0] if isinstance(conv, list) and conv else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"
    if _has(d, "instruction", "output"):
        return "alpaca"
    if _has(d, "prompt", "completion"):
        return "prompt_completion"
    if _has(d, "text"):
        return "text"
    keys = ", ".join(k for k, v in d.items() if v is not None)
    raise UserError(
        f"{where}: cannot tell the format from the fields ({keys}) — expected messages, conversations, "
        "instruction/output, prompt/completion, text or prompt/chosen/rejected; map yours with data.columns, "
        "e.g. columns: {question: prompt, answer: completion}"
    )


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {what} must be a string, got {type(value).__name__} — fix that record")
    return value


def _turns(conv: Any, where: str, key_role="role", key_content="content") -> list[dict]:
    if not isinstance(conv, list) or not conv:
        raise UserError(f"{where}: expected a non-empty list of turns")
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or m.get(key_role) is None or key_content not in m:
            raise UserError(f"{where}: turn {i + 1} needs `{key_role}` and `{key_content}` fields")
        role = ROLE_ALIASES.get(str(m[key_role]).lower())
        if role is None:
            raise UserError(
                f"{where}: turn {i + 1} has unknown role {m[key_role]!r} — use system, user or assistant "
                "(ShareGPT: system, human, gpt)"
            )
        out.append({"role": role, "content": _text(m[key_content], where, f"turn {i + 1} content")})
    return out


def to_messages(d: dict, fmt: str, where: str) -> dict:
    """One SFT row in any supported format -> {"messages": [...]} or {"text": ...}."""
    if fmt == "messages":
        msgs = _turns(d.get("messages", d.get("conversations")), where)
    elif fmt == "sharegpt":
        msgs = _turns(d.get("conversations"), where, "from", "value")
    elif fmt == "alpaca":
        msgs = []
        if d.get("system"):
            msgs.append({"role": "system", "content": _text(d["system"], where, "system")})
        for pair in d.get("history") or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise UserError(f"{where}: history must be a list of [instruction, response] pairs")
            msgs += [{"role": "user", "content": _text(pair[0], where, "history")},
                     {"role": "assistant", "content": _text(pair[1], where, "history")}]
        instruction = _text(d["instruction"], where, "instruction")
        if d.get("input"):
            instruction += "\n\n" + _text(d["input"], where, "input")
        msgs += [{"role": "user", "content": instruction}, {"role": "assistant", "content": _text(d["output"], where, "output")}]
    elif fmt == "prompt_completion":
        prompt, completion = d["prompt"], d["completion"]
        msgs = (_turns(prompt, where) if isinstance(prompt, list) else [{"role": "user", "content": _text(prompt, where, "prompt")}])
        msgs += (_turns(completion, where) if isinstance(completion, list) else [{"role": "assistant", "content": _text(completion, where, "completion")}])
    elif fmt == "text":
        return {"text": _text(d.get("text"), where, "text")}
    else:
        raise UserError(f"{where}: this is preference data (chosen/rejected) — use `finetune dpo` with a `dpo:` section")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: conversation has no assistant turn, so there is nothing to train on — add one or set data.format: text")
    return {"messages": msgs}


def _common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def to_preference(d: dict, where: str) -> dict:
    """Any preference row -> {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}."""
    chosen, rejected = d["chosen"], d["rejected"]
    if _has(d, "conversations"):  # ShareGPT style: a conversation plus chosen / rejected final turns
        prompt = _turns(d["conversations"], where, "from", "value")
        pick = lambda t: _turns([t] if isinstance(t, dict) else t, where, "from", "value")  # noqa: E731
        chosen, rejected = pick(chosen), pick(rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list) and d.get("prompt") is None:
        # full conversations sharing a prefix (Anthropic HH style)
        c, r = _turns(chosen, where), _turns(rejected, where)
        n = _common_prefix(c, r)
        while n > 0 and c[n - 1]["role"] == "assistant":  # the prompt ends where the differing answer starts
            n -= 1
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
    else:
        p = d.get("prompt")
        if p is None:
            raise UserError(f"{where}: preference row needs a prompt (or full chosen/rejected conversations)")
        prompt = _turns(p, where) if isinstance(p, list) else [{"role": "user", "content": _text(p, where, "prompt")}]
        chosen = _turns(chosen, where) if isinstance(chosen, list) else [{"role": "assistant", "content": _text(chosen, where, "chosen")}]
        rejected = _turns(rejected, where) if isinstance(rejected, list) else [{"role": "assistant", "content": _text(rejected, where, "rejected")}]
    if not prompt:
        raise UserError(f"{where}: preference row has an empty prompt")
    if not chosen or not rejected:
        raise UserError(f"{where}: chosen and rejected answers must both be non-empty")
    if chosen == rejected:
        raise UserError(f"{where}: chosen is identical to rejected, so there is no preference to learn — fix or remove the row")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# ---- chat template and masks ---------------------------------------------------------------------


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the default one. Returns True if it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each assistant turn (content + end-of-turn).

    Works with any template whose rendering of a conversation prefix is a prefix of the whole: the
    answer is what the assistant turn adds after the generation prompt. Trailing whitespace after the
    end-of-turn token is left untrained."""
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise UserError(
                "the chat template does not render conversations incrementally (a prefix renders differently "
                "alone), so assistant turns cannot be located — use train_on: all or a template with {% generation %} tags"
            )
        end = len(upto.rstrip())
        spans.append((len(before), end))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], train_on: str) -> tuple[list[int], list[int]]:
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on == "all":
        return ids, list(ids)
    labels = [
        tok if any(s <= start < e for s, e in spans) else -100
        for tok, (start, _end) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]  # documents end, so the model learns where they end
    return ids, list(ids)


def check_template(tokenizer, messages: list[dict], ids: list[int], labels: list[int]) -> None:
    """Once per run: the ids the trainer sees equal the template tokenized directly; no doubled BOS; the
    end-of-turn token is trained."""
    direct = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    if hasattr(direct, "keys"):
        direct = direct["input_ids"]
    if list(direct) != list(ids):
        raise RuntimeError("chat template check failed: rendered-then-tokenized ids differ from the template's own tokenization")
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise RuntimeError("chat template check failed: BOS appears twice at the start")
    trained = [t for t in labels if t != -100]
    if not trained:
        raise RuntimeError("chat template check failed: no trained tokens in the first example")


# ---- the whole path ------------------------------------------------------------------------------


def split_validation(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * fraction))
    if n_val >= len(rows):
        raise UserError(f"data.validation: {fraction} of {len(rows)} rows leaves nothing to train on — use a smaller fraction or a file")
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def normalise(rows: list[Row], fmt: str, method: str, system_prompt: str | None) -> tuple[str, list[tuple[dict, str]]]:
    detected = fmt if fmt != "auto" else detect(rows[0].data, rows[0].where)
    if method == "sft" and detected == "preference":
        raise UserError(f"{rows[0].where}: this is preference data (chosen/rejected) — train it with `finetune dpo` (a recipe with a `dpo:` section)")
    if method == "dpo" and detected != "preference":
        raise UserError(f"{rows[0].where}: DPO needs preference data (prompt/chosen/rejected), found {detected} — use `finetune sft` for it")
    out = []
    for r in rows:
        rec = to_preference(r.data, r.where) if detected == "preference" else to_messages(r.data, detected, r.where)
        if system_prompt:
            key = "prompt" if detected == "preference" else "messages"
            if key in rec and rec[key][0]["role"] != "system":
                rec[key] = [{"role": "system", "content": system_prompt}] + rec[key]
        out.append((rec, r.where))
    return detected, out


def tokenize_sft(tokenizer, records: list[tuple[dict, str]], section: DataSection, prepared: Prepared) -> list[Example]:
    examples = []
    for i, (rec, where) in enumerate(records):
        if "text" in rec:
            ids, labels = tokenize_text(tokenizer, rec["text"])
        else:
            ids, labels = tokenize_conversation(tokenizer, rec["messages"], section.train_on)
            if i == 0:
                check_template(tokenizer, rec["messages"], ids, labels)
        truncated = len(ids) > section.max_length
        if truncated:
            if section.truncation == "drop":
                prepared.dropped["longer than max_length"] = prepared.dropped.get("longer than max_length", 0) + 1
                continue
            ids, labels = ids[: section.max_length], labels[: section.max_length]
        if all(t == -100 for t in labels[1:]):  # the first label is never predicted
            prepared.dropped["no trained tokens"] = prepared.dropped.get("no trained tokens", 0) + 1
            continue
        prepared.truncated += truncated
        examples.append(Example(ids, labels, where, truncated))
    return examples


def render_preference(tokenizer, records: list[tuple[dict, str]], section: DataSection, prepared: Prepared) -> list[dict]:
    """Preference rows -> prompt / chosen / rejected strings rendered with the chat template; TRL tokenizes
    them and splits at the common prefix, so the answers carry exactly the tokens SFT would train on."""
    out = []
    for rec, where in records:
        prompt = _render(tokenizer, rec["prompt"], generation_prompt=True)
        pair = {}
        for key in ("chosen", "rejected"):
            full = _render(tokenizer, rec["prompt"] + rec[key]).rstrip()
            if not full.startswith(prompt):
                raise UserError(f"{where}: the chat template renders the prompt differently once an answer follows — cannot split prompt and answer")
            pair[key] = full[len(prompt):]
        n = len(tokenizer(prompt + max(pair.values(), key=len), add_special_tokens=False)["input_ids"])
        if n > section.max_length:
            if section.truncation == "drop" or len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) >= section.max_length:
                prepared.dropped["longer than max_length"] = prepared.dropped.get("longer than max_length", 0) + 1
                continue
            prepared.truncated += 1
        out.append({"prompt": prompt, **pair, "where": where})
    return out


def prepare(section: DataSection, tokenizer, method: str, seed: int, log: Callable[[str], None] = print) -> Prepared:
    rows, files = read(section.train, section.columns)
    if isinstance(section.validation, str):
        val_rows, val_files = read(section.validation, section.columns)
        files += [{**f, "split": "validation"} for f in val_files]
    elif isinstance(section.validation, float):
        rows, val_rows = split_validation(rows, section.validation, seed)
    else:
        val_rows = []
    fmt, records = normalise(rows, section.format, method, section.system_prompt)
    _, val_records = normalise(val_rows, fmt, method, section.system_prompt) if val_rows else (fmt, [])
    added = ensure_chat_template(tokenizer)
    prepared = Prepared(format=fmt, files=files, rows=len(rows) + len(val_rows), train=[], validation=[])
    how = "set by data.format" if section.format != "auto" else "detected"
    prepared.notes.append(f"format: {fmt} ({how}); {len(records)} training rows, {len(val_records)} validation rows")
    if added:
        prepared.notes.append("the tokenizer has no chat template: using the default ChatML template (saved with the adapter)")
    tokenize = render_preference if fmt == "preference" else tokenize_sft
    prepared.train = tokenize(tokenizer, records, section, prepared)
    dropped_train = sum(prepared.dropped.values())
    prepared.validation = tokenize(tokenizer, val_records, section, prepared) if val_records else []
    if not prepared.train:
        raise UserError(f"{section.train}: no usable training examples after tokenization ({prepared.dropped}) — check data.max_length and data.train_on")
    share = dropped_train / max(1, len(records))
    if share > section.max_dropped_fraction:
        raise UserError(
            f"data: {dropped_train} of {len(records)} training rows would be dropped ({prepared.dropped}), more than "
            f"data.max_dropped_fraction={section.max_dropped_fraction} — raise data.max_length or use truncation: truncate"
        )
    for note in prepared.notes:
        log(note)
    return prepared


def to_dataset(examples: list[Example]):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})


def to_preference_dataset(records: list[dict]):
    import datasets

    return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
