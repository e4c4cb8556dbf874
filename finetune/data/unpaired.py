"""Unpaired feedback for KTO: each row is one answer to a prompt, marked desirable or undesirable.

Layouts read (each row -> `{"prompt": [msgs], "completion": [msgs], "label": bool}`):

- TRL's unpaired layout: `prompt`, `completion` (text or lists of turns) and a boolean `label`;
- a conversation (`messages`, or ShareGPT `conversations`) whose last turn is the judged assistant answer, with
  the flag in `label` or LLaMA-Factory's `kto_tag`;
- preference pairs (`chosen` / `rejected`, any layout DPO reads), each split into a desirable and an
  undesirable row, as TRL's KTOTrainer does with paired data.

A label is boolean-ish: true/false, 1/0, or the words true/false, yes/no, 1/0 (CSV cells are text); anything else
is a user error naming the row's file and line. Fitting one
such example into data.max_length follows the preference pairs' rules (finetune/data/fit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from finetune.data import fit
from finetune.data.formats import _text_or_turns, kind, require, to_preference, turns
from finetune.errors import UserError

LABEL_KEYS = ("label", "kto_tag")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")
LABEL_HINT = ("KTO rows need a true/false `label` (or LLaMA-Factory's `kto_tag`): true for a desirable answer, "
              "false for an undesirable one; map another column with data.columns, e.g. columns: {thumbs_up: label}")


@dataclass
class UnpairedExample:
    """One KTO example: the rendered strings TRL's KTOTrainer receives, the ids it derives from them, the label."""

    prompt: str
    completion: str
    label: bool
    where: str
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def label_of(d: dict, where: str) -> bool:
    key = next((k for k in LABEL_KEYS if k in d), None)
    if key is None or d[key] is None:
        state = "is missing" if key is None else "is null"
        raise UserError(f"{where}: `label` {state} — {LABEL_HINT}")
    value = d[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):  # 1.0 / 0.0 where a table stored numbers
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    shown = repr(value) if isinstance(value, str) else kind(value)
    raise UserError(f"{where}: `{key}` is {shown}, not true/false — {LABEL_HINT}")


def detect(d: dict) -> str:
    """`preference` for chosen/rejected rows (split into two), else `unpaired`."""
    return "preference" if d.get("chosen") is not None and d.get("rejected") is not None else "unpaired"


def to_unpaired(d: dict, where: str) -> dict:
    """One labelled row -> {"prompt", "completion", "label"}."""
    label = label_of(d, where)
    conv_key = next((k for k in ("messages", "conversations") if d.get(k) is not None), None)
    if conv_key is not None and d.get("completion") is None:
        sharegpt = conv_key == "conversations" and isinstance(d[conv_key], list) and d[conv_key] \
            and isinstance(d[conv_key][0], dict) and "from" in d[conv_key][0]
        msgs = turns(d[conv_key], where, conv_key, *(("from", "value") if sharegpt else ()))
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last turn of `{conv_key}` is {msgs[-1]['role']!r}, but KTO judges the last "
                            "turn: end the conversation with the assistant answer the label is about")
        if not any(m["role"] != "system" for m in msgs[:-1]):
            raise UserError(f"{where}: `{conv_key}` has no prompt before the judged answer — add the user turn it answers")
        return {"prompt": msgs[:-1], "completion": msgs[-1:], "label": label}
    needs = "every KTO row needs `prompt` and `completion` (or a `messages` conversation ending with the judged answer)"
    prompt = _text_or_turns(require(d, "prompt", where, needs), where, "prompt", "user")
    completion = _text_or_turns(require(d, "completion", where, needs), where, "completion", "assistant")
    return {"prompt": prompt, "completion": completion, "label": label}


def normalise(rows: list, fmt: str, system_prompt: str | None, training: bool = True) -> tuple[str, list[tuple[dict, str]]]:
    """Rows -> (format, [(record, where)]): unpaired records for KTO; in training data both kinds must be present."""
    if fmt not in ("auto", "unpaired", "preference"):
        raise UserError(f"data.format: {fmt} is not read by KTO — it trains on labelled answers; use data.format: auto, "
                        "unpaired (prompt/completion/label or messages + label) or preference (chosen/rejected pairs)")
    detected = detect(rows[0].data) if fmt == "auto" else fmt
    out = []
    for r in rows:
        if detected == "preference":
            pair = to_preference(r.data, r.where)
            recs = [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                    {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
        else:
            recs = [to_unpaired(r.data, r.where)]
        for rec in recs:
            if system_prompt and rec["prompt"][0]["role"] != "system":
                rec["prompt"] = [{"role": "system", "content": system_prompt}] + rec["prompt"]
            out.append((rec, r.where))
    if training and detected == "unpaired":
        check_both_labels(out, rows[0].where)
    return detected, out


def source(where: str) -> str:
    """The file part of a row's `file line N` / `file row N` tag."""
    for sep in (" line ", " row "):
        if sep in where:
            return where.rsplit(sep, 1)[0]
    return where


def check_both_labels(records: list[tuple[dict, str]], first_where: str) -> None:
    n_good = sum(rec["label"] for rec, _ in records)
    if n_good == 0 or n_good == len(records):
        which, other = ("desirable (label true)", "undesirable (label false)") if n_good else \
            ("undesirable (label false)", "desirable (label true)")
        raise UserError(f"{source(first_where)}: all {len(records)} training rows are {which} — KTO learns from the contrast "
                        f"and needs at least one {other} row; add some, or train desirable-only data with `finetune sft`")


def counts(examples: list[UnpairedExample]) -> tuple[int, int]:
    good = sum(e.label for e in examples)
    return good, len(examples) - good


# ---- fitting one example into data.max_length -------------------------------------------------------


def trl_split(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """prompt / completion ids as TRL 1.16's KTOTrainer derives them from these strings (the completion starts
    where the prompt and prompt+completion token sequences diverge)."""
    p = tokenizer(text=prompt)["input_ids"]
    pc = tokenizer(text=prompt + completion)["input_ids"]
    n = fit._common_prefix(p, pc)
    return p[:n], pc[n:]


def fit_unpaired(tokenizer, rec: dict, max_length: int, truncation: str, where: str):
    """-> (prompt, completion strings, (prompt_ids, completion_ids), [how]) or fit.Dropped. A long prompt keeps its
    end (earliest exchanges removed first, the system message kept) and a long answer is cut at the end, with the
    budget shared as for preference pairs."""
    prompt_msgs = rec["prompt"]
    prompt, completion = _render(tokenizer, prompt_msgs, rec["completion"], where)
    p, c = trl_split(tokenizer, prompt, completion)
    if len(p) + len(c) <= max_length:
        return prompt, completion, (p, c), []
    if truncation == "drop":
        return fit.Dropped(f"longer than data.max_length ({max_length}) with data.truncation: drop",
                           f"prompt + answer is {len(p) + len(c)} tokens", len(p) + len(c),
                           "raise data.max_length to {need} or set data.truncation: truncate")
    answer_room = min(len(c), max(max_length - len(p), max_length // 2))
    floor = min(len(c), max(1, max_length // 8))
    how: list[str] = []
    if len(p) > max_length - answer_room:
        shortened = None
        for target in (max_length - answer_room, max_length - floor):
            shortened = fit._shorten_prompt(tokenizer, prompt_msgs, target)
            if shortened:
                break
        if shortened is None:
            fixed = fit._prompt_len(tokenizer, [m for m in prompt_msgs if m["role"] == "system"] + [{"role": "user", "content": ""}])
            what = "the system message alone" if prompt_msgs[0]["role"] == "system" else "the prompt's template"
            return fit.Dropped(f"{what} leaves no room within data.max_length ({max_length})", f"{what} takes {fixed} tokens",
                               fixed + floor)
        prompt_msgs, how = shortened
        prompt, completion = _render(tokenizer, prompt_msgs, rec["completion"], where)
        p, c = trl_split(tokenizer, prompt, completion)
    if len(p) + len(c) > max_length:
        completion, _ = fit._cut_answer(tokenizer, prompt, completion, max_length)
        how.append(fit.ANSWERS_CUT)
        p, c = trl_split(tokenizer, prompt, completion)
    if not c:
        return fit.Dropped(f"no room for the answer within data.max_length ({max_length})", f"the prompt is {len(p)} tokens",
                           len(p) + 1)
    return prompt, completion, (p, c), how


def _render(tokenizer, prompt_msgs: list[dict], answer: list[dict], where: str) -> tuple[str, str]:
    """The prompt with the generation prompt, and the answer as the template renders it after it, ending in EOS."""
    prompt, (completion,) = fit._answers(tokenizer, prompt_msgs, [answer], where)
    return prompt, completion
