"""Rows -> one internal form: `{"messages": [...]}` (SFT), `{"text": ...}` (continued pre-training) or
`{"prompt": [...], "chosen": [...], "rejected": [...]}` (preference), each message `{"role", "content"}`.

The format is detected from the first row (or set by data.format) and every row is then read as that
format. A row that lacks a field its format needs, holds the wrong type, or holds nothing is a user
error naming the row's file and line and the field, never a crash further down.
"""

from __future__ import annotations

from typing import Any

from finetune.errors import UserError

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "system": "system", "tool": "tool"}
SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
# the fields each format is recognised by, in the order detection tries them
SIGNATURES = {"preference": ("chosen", "rejected"), "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}
PAIRED_METHODS = ("dpo", "orpo")  # methods that train on chosen/rejected pairs
COLUMNS_HINT = "map yours with data.columns, e.g. columns: {question: prompt, answer: completion}"


def kind(value: Any) -> str:
    """A value's JSON type in words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _has(d: dict, *keys: str) -> bool:
    return all(d.get(k) is not None for k in keys)


def require(d: dict, key: str, where: str, needs: str) -> Any:
    """The value of a field the format cannot do without; `needs` says what the row must have."""
    if d.get(key) is None:
        state = "is missing" if key not in d else "is null"
        raise UserError(f"{where}: `{key}` {state} — {needs}; fix or remove that row")
    return d[key]


def text_field(value: Any, where: str, key: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: `{key}` must be text, got {kind(value)} — fix that row")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: `{key}` is empty — fill it in or remove that row")
    return value


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
    for fmt, keys in SIGNATURES.items():  # some of a format's fields: name the one that is missing
        present = [k for k in keys if d.get(k) is not None]
        if present:
            missing = next(k for k in keys if k not in present)
            state = "is missing" if missing not in d else "is null"
            raise UserError(f"{where}: looks like {fmt} data (it has `{present[0]}`) but `{missing}` {state} — every {fmt} row needs "
                            f"{' and '.join(f'`{k}`' for k in keys)}; fix that row, or {COLUMNS_HINT}")
    keys = ", ".join(k for k, v in d.items() if v is not None)
    raise UserError(
        f"{where}: cannot tell the format from the fields ({keys}) — expected messages, conversations, "
        f"instruction/output, prompt/completion, text or prompt/chosen/rejected; {COLUMNS_HINT}"
    )


def turns(conv: Any, where: str, field: str, key_role: str = "role", key_content: str = "content") -> list[dict]:
    """A list of turns (`field` of the row) -> messages with canonical roles."""
    if conv is None:
        raise UserError(f"{where}: `{field}` is null — it must be a list of turns")
    if not isinstance(conv, list):
        raise UserError(f"{where}: `{field}` must be a list of turns ({{{key_role}, {key_content}}} objects), got {kind(conv)} — fix that row")
    if not conv:
        raise UserError(f"{where}: `{field}` is empty — it needs at least one turn")
    out = []
    for i, m in enumerate(conv, 1):
        if not isinstance(m, dict):
            raise UserError(f"{where}: turn {i} of `{field}` must be an object with `{key_role}` and `{key_content}`, got {kind(m)}")
        for key in (key_role, key_content):
            if m.get(key) is None:
                state = "lacks" if key not in m else "has a null"
                raise UserError(f"{where}: turn {i} of `{field}` {state} `{key}` — each turn needs `{key_role}` and `{key_content}`")
        role = ROLE_ALIASES.get(m[key_role].lower()) if isinstance(m[key_role], str) else None
        if role is None:
            raise UserError(
                f"{where}: turn {i} has unknown role {m[key_role]!r} — `{key_role}` must be system, user or assistant "
                "(ShareGPT: system, human, gpt)"
            )
        content = m[key_content]
        if not isinstance(content, str):
            raise UserError(f"{where}: turn {i} content must be a string, got {kind(content)} — fix `{key_content}` of turn {i} in `{field}`")
        if role != "system" and not content.strip():  # a blank system message is harmless; a blank exchange is not
            raise UserError(f"{where}: turn {i} of `{field}` has an empty `{key_content}` — fill it in or remove the turn")
        out.append({"role": role, "content": content})
    return out


def _text_or_turns(value: Any, where: str, field: str, role: str) -> list[dict]:
    """A prompt / answer given either as text (one turn of `role`) or as a list of turns."""
    if isinstance(value, list):
        return turns(value, where, field)
    if not isinstance(value, str):
        raise UserError(f"{where}: `{field}` must be text or a list of turns, got {kind(value)} — fix that row")
    return [{"role": role, "content": text_field(value, where, field)}]


def _alpaca(d: dict, where: str) -> list[dict]:
    needs = "every alpaca row needs `instruction` and `output`"
    instruction = text_field(require(d, "instruction", where, needs), where, "instruction")
    output = text_field(require(d, "output", where, needs), where, "output")
    msgs = []
    if d.get("system") is not None and text_field(d["system"], where, "system", allow_empty=True):
        msgs.append({"role": "system", "content": d["system"]})
    history = d.get("history")
    if history is not None and history != "":
        if not isinstance(history, list):
            raise UserError(f"{where}: `history` must be a list of pairs of (instruction, response), got {kind(history)}")
        for pair in history:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise UserError(f"{where}: `history` must be a list of pairs of (instruction, response)")
            msgs += [{"role": "user", "content": text_field(pair[0], where, "history")},
                     {"role": "assistant", "content": text_field(pair[1], where, "history")}]
    if d.get("input") is not None and text_field(d["input"], where, "input", allow_empty=True):
        instruction += "\n\n" + d["input"]
    return msgs + [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]


def to_messages(d: dict, fmt: str, where: str) -> dict:
    """One SFT row in any supported format -> {"messages": [...]} or {"text": ...}."""
    if fmt == "messages":
        key = "messages" if "messages" in d or "conversations" not in d else "conversations"
        msgs = turns(require(d, key, where, f"every row of this file needs `{key}`, a list of turns"), where, key)
    elif fmt == "sharegpt":
        needs = "every ShareGPT row needs `conversations`, a list of {from, value} turns"
        msgs = turns(require(d, "conversations", where, needs), where, "conversations", "from", "value")
    elif fmt == "alpaca":
        msgs = _alpaca(d, where)
    elif fmt == "prompt_completion":
        needs = "every prompt/completion row needs `prompt` and `completion`"
        msgs = _text_or_turns(require(d, "prompt", where, needs), where, "prompt", "user")
        msgs += _text_or_turns(require(d, "completion", where, needs), where, "completion", "assistant")
    elif fmt == "text":
        return {"text": text_field(require(d, "text", where, "every row of a text dataset needs `text`"), where, "text")}
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
    needs = "every preference row needs `chosen` and `rejected`"
    chosen, rejected = require(d, "chosen", where, needs), require(d, "rejected", where, needs)
    if (d.get("conversations") is not None or ("conversations" in d and d.get("prompt") is None)
            or any(isinstance(a, dict) and "from" in a for a in (chosen, rejected))):
        # ShareGPT style: a conversation plus chosen / rejected final turns
        needs = "ShareGPT preference rows need `conversations` (the prompt turns), `chosen` and `rejected`"
        prompt = turns(require(d, "conversations", where, needs), where, "conversations", "from", "value")
        chosen, rejected = ([a] if isinstance(a, dict) else a for a in (chosen, rejected))
        chosen = turns(chosen, where, "chosen", "from", "value")
        rejected = turns(rejected, where, "rejected", "from", "value")
    elif d.get("prompt") is None and (isinstance(chosen, list) or isinstance(rejected, list)):
        # full conversations sharing a prefix (Anthropic HH style)
        for key, other in (("chosen", "rejected"), ("rejected", "chosen")):
            if not isinstance(d[key], list):
                raise UserError(f"{where}: `{key}` must be a full conversation (a list of turns) like `{other}`, got {kind(d[key])} "
                                "— or give a separate `prompt`")
        c, r = turns(chosen, where, "chosen"), turns(rejected, where, "rejected")
        n = _common_prefix(c, r)
        while n > 0 and c[n - 1]["role"] == "assistant":  # the prompt ends where the differing answer starts
            n -= 1
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
        if not prompt:
            raise UserError(f"{where}: no `prompt`, and `chosen` and `rejected` share no prompt turns — give a `prompt`, "
                            "or make both full conversations that start with the same user turn")
    else:
        prompt = _text_or_turns(require(d, "prompt", where, "a preference row needs `prompt`, `chosen` and `rejected`, or full "
                                        "`chosen`/`rejected` conversations that share the prompt"), where, "prompt", "user")
        chosen = _text_or_turns(chosen, where, "chosen", "assistant")
        rejected = _text_or_turns(rejected, where, "rejected", "assistant")
    if not chosen or not rejected:
        raise UserError(f"{where}: chosen and rejected answers must both be non-empty")
    if chosen == rejected:
        raise UserError(f"{where}: chosen is identical to rejected, so there is no preference to learn — fix or remove the row")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def normalise(rows: list, fmt: str, method: str, system_prompt: str | None) -> tuple[str, list[tuple[dict, str]]]:
    """Rows -> (format, [(record, where)]) in the internal form; data.system_prompt added where none is.
    (KTO's labelled answers are read by finetune/data/unpaired.py; `data.normalise` picks the reader.)"""
    if fmt == "unpaired":
        raise UserError(f"data.format: unpaired (labelled single answers) is read by `finetune kto` only — use another format for {method}")
    detected = fmt if fmt != "auto" else detect(rows[0].data, rows[0].where)
    if method == "sft" and detected == "preference":
        raise UserError(f"{rows[0].where}: this is preference data (chosen/rejected) — train it with `finetune dpo` (a recipe with a `dpo:` section)")
    if method in PAIRED_METHODS and detected != "preference":
        raise UserError(f"{rows[0].where}: {method.upper()} needs preference data (prompt/chosen/rejected), found {detected} — "
                        "use `finetune sft` for it, or `finetune kto` for answers labelled good or bad")
    if method == "reward" and detected != "preference":
        raise UserError(f"{rows[0].where}: a reward model learns from preference data (prompt/chosen/rejected), found {detected} — "
                        "give pairs of a better and a worse answer")
    out = []
    for r in rows:
        rec = to_preference(r.data, r.where) if detected == "preference" else to_messages(r.data, detected, r.where)
        if system_prompt:
            key = "prompt" if detected == "preference" else "messages"
            if key in rec and rec[key][0]["role"] != "system":
                rec[key] = [{"role": "system", "content": system_prompt}] + rec[key]
        out.append((rec, r.where))
    return detected, out
