"""`finetune data clean`: find what should not be trained on, and write a cleaned copy of the data.

Rules, each naming the row's `file line N`:
  broken encoding   mojibake (UTF-8 read as Latin-1/cp1252, "cafÃ©") repaired with ftfy's fix_encoding (changed)
  no final answer   a conversation that does not end with an assistant turn (removed)
  empty answer      an assistant turn / completion / chosen answer that is empty or only whitespace (removed)
  answer = prompt   the last answer repeats the turn before it (removed)
  overlong          longer than max_length: tokens of the chat-rendered row with a recipe's tokenizer, else characters (removed)
  leak              the same or nearly the same as a validation row (removed from the training data)
  duplicate         the same as an earlier row after case and whitespace normalisation (removed; the first is kept)
  near duplicate    MinHash (datasketch, fixed seed) over word 3-grams, Jaccard >= threshold with an earlier kept row (removed)
  personal data     e-mail addresses, phone numbers, AWS / GitHub / `sk-...` keys, private-key blocks:
                    flagged, or replaced by [EMAIL], [PHONE], ... with --redact (changed)
Rows are checked in file order and the first kept row of a group is the one that stays, so two runs on the
same input give the same output. Only the cleaned copy is written; the input is never touched.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data import formats
from finetune.data.read import READERS, Row, read_file, rename
from finetune.errors import UserError

SEED = 1  # MinHash permutations are drawn from this seed: identical input gives identical output
NUM_PERM = 128
SECRETS = [  # (label, placeholder, pattern): private keys first so that their contents are not matched piecemeal
    ("private key", "[PRIVATE_KEY]", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL)),
    ("AWS access key", "[AWS_KEY]", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("GitHub token", "[GITHUB_TOKEN]", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})")),
    ("API key", "[API_KEY]", re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}")),
    ("e-mail address", "[EMAIL]", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    ("phone number", "[PHONE]", re.compile(r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])")),
]
IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


@dataclass
class Finding:
    where: str
    action: str  # removed | changed | flagged
    reason: str
    detail: str = ""


@dataclass
class Report:
    source: str
    rows: int = 0
    kept: int = 0
    findings: list[Finding] = field(default_factory=list)

    def counts(self) -> dict:
        out: dict[str, dict[str, int]] = {"removed": {}, "changed": {}, "flagged": {}}
        for f in self.findings:
            out[f.action][f.reason] = out[f.action].get(f.reason, 0) + 1
        return {"rows": self.rows, "kept": self.kept, **out}

    def to_json(self) -> dict:
        return {"source": self.source, **self.counts(), "findings": [f.__dict__ for f in self.findings]}


def _phone(m: re.Match) -> bool:
    """A number only counts as a phone number with 9-15 digits and not a version or an IP address."""
    digits = sum(c.isdigit() for c in m.group())
    return 9 <= digits <= 15 and not IPV4.fullmatch(m.group())


def find_secrets(text: str) -> Counter:
    found: Counter = Counter()
    for label, _, pattern in SECRETS:
        hits = [m for m in pattern.finditer(text) if label != "phone number" or _phone(m)]
        if hits:
            found[label] += len(hits)
            text = pattern.sub(" ", text)  # a key's digits are not also a phone number
    return found


def redact(text: str) -> str:
    for label, placeholder, pattern in SECRETS:
        text = pattern.sub(lambda m, p=placeholder, lb=label: p if lb != "phone number" or _phone(m) else m.group(), text)
    return text


def fix_encoding(text: str) -> str:
    import ftfy

    return ftfy.fix_encoding(text)


def map_strings(value, fn):
    """`value` with `fn` applied to every string inside it (keys kept)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_strings(v, fn) for k, v in value.items()}
    return value


def _content(turn) -> str:
    if isinstance(turn, dict):
        value = turn.get("content", turn.get("value"))
        return value if isinstance(value, str) else ""
    return turn if isinstance(turn, str) else ""


def _role(turn) -> str:
    return formats.ROLE_ALIASES.get(str(turn.get("role", turn.get("from", ""))).lower(), "?") if isinstance(turn, dict) else "?"


def conversation(d: dict, fmt: str) -> list[tuple[str, str]]:
    """A row as (role, text) turns, read leniently: the point is to find what the strict reader would reject."""
    def side(value, role):
        if isinstance(value, list):
            return [(_role(t), _content(t)) for t in value]
        if isinstance(value, dict):
            return [(_role(value), _content(value))]
        return [(role, value if isinstance(value, str) else "")]

    if fmt == "text":
        return [("text", d.get("text") if isinstance(d.get("text"), str) else "")]
    if fmt == "alpaca":
        prompt = "\n\n".join(s for s in (d.get("instruction"), d.get("input")) if isinstance(s, str) and s)
        return [("user", prompt)] + side(d.get("output"), "assistant")
    if fmt == "prompt_completion":
        return side(d.get("prompt"), "user") + side(d.get("completion"), "assistant")
    if fmt == "preference":
        prompt = side(d["prompt"], "user") if d.get("prompt") is not None else side(d.get("conversations") or [], "user")
        return prompt + side(d.get("chosen"), "assistant") + side(d.get("rejected"), "assistant")
    turns = d.get("messages") if d.get("messages") is not None else d.get("conversations")
    return side(turns if isinstance(turns, list) else [], "user")


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def key(turns: list[tuple[str, str]]) -> str:
    return "\n".join(f"{role}: {normalise(text)}" for role, text in turns)


@functools.cache
def _permutations():
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=SEED)
    return m.permutations, m.scheme


def minhash(text: str):
    from datasketch import MinHash

    words = text.split()
    shingles = {" ".join(words[i:i + 3]) for i in range(len(words) - 2)} or set(words) or {text}
    # drawing the permutations took most of the time; they depend only on the seed, so they are drawn once
    permutations, scheme = _permutations()
    m = MinHash(num_perm=NUM_PERM, seed=SEED, permutations=permutations, scheme=scheme)
    m.update_batch([s.encode("utf-8") for s in sorted(shingles)])
    return m


def row_problem(turns: list[tuple[str, str]], fmt: str, size, max_length: int | None) -> tuple[str, str] | None:
    """The first per-row reason to remove it, as (reason, detail), or None."""
    answers = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
    if fmt in ("messages", "sharegpt") and (not turns or turns[-1][0] != "assistant"):
        return "no final answer", f"the conversation ends with a `{turns[-1][0] if turns else 'nothing'}` turn, not the assistant's"
    if fmt == "text" and not turns[0][1].strip():
        return "empty answer", "the text is empty"
    for i in answers:
        if not turns[i][1].strip():
            return "empty answer", "an assistant answer is empty or only whitespace"
    last = answers[0] if fmt == "preference" and answers else (answers[-1] if answers else None)
    if last is not None and last > 0 and normalise(turns[last][1]) == normalise(turns[last - 1][1]):
        return "answer = prompt", "the answer repeats the prompt"
    if max_length is not None:
        n, unit = size(turns)
        if n > max_length:
            return "overlong", f"{n} {unit}, more than {max_length}"
    return None


def sizer(tokenizer):
    """How long a row is: tokens of its chat-rendered text with a tokenizer, else characters."""
    if tokenizer is None:
        return lambda turns: (sum(len(t) for _, t in turns), "characters")
    from finetune.data import template

    template.ensure_chat_template(tokenizer)

    def size(turns):
        if turns and turns[0][0] == "text":
            text = turns[0][1]
        else:
            text = template.render(tokenizer, [{"role": r if r != "?" else "user", "content": t} for r, t in turns])
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]), "tokens"

    return size


def analyse(rows: list[Row], validation: list[Row] | None = None, *, columns: dict | None = None, threshold: float = 0.8,
            max_length: int | None = None, tokenizer=None, redact_secrets: bool = False, source: str = "") -> tuple[Report, list[Row]]:
    """Apply every rule to `rows` in order -> (report, the kept rows with their changes applied)."""
    from datasketch import MinHashLSH

    if not 0 < threshold <= 1:
        raise UserError(f"near-duplicate threshold must be above 0 and at most 1 (got {threshold})")
    report = Report(source=source, rows=len(rows))
    if not rows:
        return report, []
    columns = columns or {}
    fmt = formats.detect(rename(rows[0].data, columns), rows[0].where)
    size = sizer(tokenizer)
    val_keys: dict[str, str] = {}
    # LSH only proposes candidates and cannot band for a threshold of 1; each candidate is checked against `threshold`
    lsh_threshold = min(threshold, 0.95)
    val_lsh = MinHashLSH(threshold=lsh_threshold, num_perm=NUM_PERM)
    val_hashes = {}
    for r in validation or []:
        k = key(conversation(rename(r.data, columns), fmt))
        val_keys.setdefault(k, r.where)
        if r.where not in val_hashes:
            val_hashes[r.where] = (len(val_hashes), minhash(k))
            val_lsh.insert(r.where, val_hashes[r.where][1])
    seen: dict[str, str] = {}
    lsh = MinHashLSH(threshold=lsh_threshold, num_perm=NUM_PERM)
    hashes: dict[str, tuple] = {}  # where -> (position, MinHash)
    kept: list[Row] = []
    for r in rows:
        data = r.data
        fixed = map_strings(data, fix_encoding)
        if fixed != data:
            report.findings.append(Finding(r.where, "changed", "broken encoding", "mojibake repaired"))
            data = fixed
        turns = conversation(rename(data, columns), fmt)
        problem = row_problem(turns, fmt, size, max_length)
        if problem:
            report.findings.append(Finding(r.where, "removed", *problem))
            continue
        k = key(turns)
        if k in val_keys:
            report.findings.append(Finding(r.where, "removed", "leak", f"the same as validation row {val_keys[k]}"))
            continue
        m = minhash(k)
        close = _closest(m, val_lsh, val_hashes, threshold)
        if close:
            report.findings.append(Finding(r.where, "removed", "leak", f"nearly the same as validation row {close}"))
            continue
        if k in seen:
            report.findings.append(Finding(r.where, "removed", "duplicate", f"the same as {seen[k]}"))
            continue
        close = _closest(m, lsh, hashes, threshold)
        if close:
            report.findings.append(Finding(r.where, "removed", "near duplicate", f"nearly the same as {close}"))
            continue
        seen[k] = r.where
        hashes[r.where] = (len(hashes), m)
        lsh.insert(r.where, m)
        texts: list[str] = []
        map_strings(data, texts.append)  # only text is searched (and redacted), never numbers or keys
        found = find_secrets("\n".join(texts))
        if found:
            what = ", ".join(f"{n} {label}{'s' if n > 1 else ''}" for label, n in found.items())
            if redact_secrets:
                data = map_strings(data, redact)
                report.findings.append(Finding(r.where, "changed", "personal data", f"redacted {what}"))
            else:
                report.findings.append(Finding(r.where, "flagged", "personal data", f"{what} (use --redact to replace them)"))
        kept.append(Row(data, r.where))
    report.kept = len(kept)
    return report, kept


def _closest(m, lsh, hashes: dict, threshold: float) -> str | None:
    """The earliest candidate whose estimated Jaccard similarity really reaches the threshold (LSH only proposes)."""
    good = [w for w in lsh.query(m) if m.jaccard(hashes[w][1]) >= threshold]
    return min(good, key=lambda w: hashes[w][0]) if good else None


LINE = re.compile(r" line (\d+)(?: \(item \d+\))?$")


def render_copy(path: Path, text: str | None, kept: list[Row], originals: set[int]) -> bytes:
    """The kept rows in the input's own format. JSON Lines keeps every untouched row's line byte for byte."""
    if path.suffix == ".jsonl":
        lines = text.split("\n")
        out = [lines[int(LINE.search(r.where).group(1)) - 1] if id(r.data) in originals else json.dumps(r.data, ensure_ascii=False)
               for r in kept]
        return ("\n".join(out) + "\n" if out else "").encode("utf-8")
    if path.suffix == ".json":
        doc = json.loads(text)
        records = [r.data for r in kept]
        if isinstance(doc, dict):  # an object holding one list of records: keep the wrapper
            doc[next(k for k, v in doc.items() if isinstance(v, list))] = records
        else:
            doc = records
        return (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    if path.suffix == ".csv":
        import csv
        import io

        header = next(csv.reader(io.StringIO(text)))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(r.data for r in kept)
        return buf.getvalue().encode("utf-8")
    if path.suffix == ".txt":
        return ("\n\n".join(r.data["text"].strip("\n") for r in kept) + "\n").encode("utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([r.data for r in kept], schema=schema), buf)
    return buf.getvalue().to_pybytes()


def check_paths(source: Path, out: Path, overwrite: bool) -> None:
    """Every mistake in the paths is found before anything is read or written."""
    if not source.is_file():
        raise UserError(f"{source}: file not found — give a data file (.jsonl .json .csv .parquet .txt) or a recipe")
    if source.suffix not in READERS:
        raise UserError(f"{source}: unsupported file type `{source.suffix}` — use .jsonl, .json, .csv, .parquet or .txt")
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the input file itself — the original is never modified; choose another path")
    if out.suffix != source.suffix:
        raise UserError(f"--out {out}: the cleaned copy keeps the input's format — name it with `{source.suffix}`")
    for path in (out, report_path(out), report_path(out, ".txt")):
        if path.exists() and not overwrite:
            raise UserError(f"{path} already exists — pass --overwrite to replace it, or choose another --out")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"--out {out}: {out.parent} is not a folder")


def report_path(out: Path, suffix: str = ".json") -> Path:
    return out.with_name(out.name + ".report" + suffix)


def clean_file(source: Path, out: Path, *, validation: list[Row] | None = None, columns: dict | None = None, threshold: float = 0.8,
               max_length: int | None = None, tokenizer=None, redact_secrets: bool = False, overwrite: bool = False) -> Report:
    """Clean one file into `out` (same format) and write `out`.report.json; returns the report."""
    from finetune.artifacts import write_atomic

    check_paths(source, out, overwrite)
    rows, _ = read_file(source)
    report, kept = analyse(rows, validation, columns=columns, threshold=threshold, max_length=max_length, tokenizer=tokenizer,
                           redact_secrets=redact_secrets, source=str(source))
    if not kept:
        raise UserError(f"{source}: every row would be removed ({report.counts()['removed']}) — nothing to write")
    text = None if source.suffix == ".parquet" else source.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
    payload = render_copy(source, text, kept, {id(r.data) for r in rows})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(report_path(out), json.dumps({**report.to_json(), "out": str(out)}, indent=2, ensure_ascii=False) + "\n")
    return report


def run(source: Path, out: Path, *, validation: Path | None, threshold: float, max_length: int | None, redact_secrets: bool,
        overwrite: bool, overrides: list[str] | None = None) -> Report:
    """The command: a data file, or a recipe (its training file, validation file, tokenizer, max_length and columns)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    tokenizer, columns, val_rows = None, {}, None
    if source.suffix in (".yaml", ".yml"):
        from finetune import models
        from finetune import recipe as recipes

        r = recipes.load(source, overrides)
        if not isinstance(r.data.train, str) or not Path(r.data.train).is_file():
            raise UserError(f"{source}: data.train must name one local file to clean (it is {r.data.train!r}) — or pass the file itself")
        check_paths(Path(r.data.train), out, overwrite)
        if validation is None and isinstance(r.data.validation, str):
            validation = Path(r.data.validation)
        columns, max_length = r.data.columns, max_length or r.data.max_length
        tokenizer = models.load_tokenizer(models.resolve_base(r.model.base, log=lambda s: None).path, r.model.trust_remote_code)
        source = Path(r.data.train)
    else:
        check_paths(source, out, overwrite)
    if validation is not None:
        if not validation.is_file():
            raise UserError(f"{validation}: validation file not found")
        val_rows, _ = read_file(validation)
    report = clean_file(source, out, validation=val_rows, columns=columns, threshold=threshold, max_length=max_length,
                        tokenizer=tokenizer, redact_secrets=redact_secrets, overwrite=overwrite)
    console = Console(highlight=False, record=True)
    table = Table(title=f"{escape(str(source))}: {report.rows} rows, {report.kept} kept")
    for col in ("row", "action", "reason", "detail"):
        table.add_column(col, overflow="fold")
    for f in report.findings:
        table.add_row(escape(f.where), f.action, f.reason, escape(f.detail))
    console.print(table if report.findings else f"{source}: {report.rows} rows, nothing to clean")
    c = report.counts()
    for action in ("removed", "changed", "flagged"):
        if c[action]:
            console.print(f"{action}: " + ", ".join(f"{n} {reason}" for reason, n in c[action].items()))
    from finetune.artifacts import write_atomic

    write_atomic(report_path(out, ".txt"), console.export_text())  # the table as printed, for reading later
    console.print(f"cleaned copy: {escape(str(out))}\nreport: {escape(str(report_path(out)))} (table: "
                  f"{escape(str(report_path(out, '.txt')))})", soft_wrap=True)
    return report
