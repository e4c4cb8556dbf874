"""Rows -> prompts for online RL (`finetune grpo`): any format that holds a prompt, the rest of the row kept
as columns for the rewards (a reference answer, a pattern, a label).

A prompt is read from `prompt` (text or turns), from the turns of `messages` / `conversations` before the
last assistant turn, or from an alpaca `instruction` (+ `input`). Answers already in the row (`completion`,
`chosen`, the last assistant turn, `output`) are not part of the prompt but stay available as columns.
"""

from __future__ import annotations

from typing import Any

from finetune.data.formats import COLUMNS_HINT, _text_or_turns, text_field, turns
from finetune.errors import UserError

# columns TRL itself fills in when it calls a reward; a data column of the same name would be overwritten
RESERVED = ("prompt", "completion", "completions", "completion_ids", "prompts", "trainer_state", "log_extra", "log_metric")


def to_prompt(d: dict, where: str) -> list[dict]:
    """The prompt turns of one row, whatever its format."""
    if d.get("prompt") is not None:
        msgs = _text_or_turns(d["prompt"], where, "prompt", "user")
    elif d.get("messages") is not None or d.get("conversations") is not None:
        key = "messages" if d.get("messages") is not None else "conversations"
        conv = d[key]
        sharegpt = isinstance(conv, list) and conv and isinstance(conv[0], dict) and "from" in conv[0]
        msgs = turns(conv, where, key, *(("from", "value") if sharegpt else ("role", "content")))
        while msgs and msgs[-1]["role"] == "assistant":  # the answer in the row is a reference, not the prompt
            msgs = msgs[:-1]
    elif d.get("instruction") is not None:
        text = text_field(d["instruction"], where, "instruction")
        extra = d.get("input")
        if isinstance(extra, str) and extra.strip():
            text += "\n\n" + extra
        msgs = [{"role": "user", "content": text}]
    else:
        keys = ", ".join(k for k, v in d.items() if v is not None)
        raise UserError(f"{where}: no prompt in this row (fields: {keys}) — GRPO needs `prompt`, `messages`/`conversations` "
                        f"or `instruction` in every row; {COLUMNS_HINT.replace('completion', 'prompt').replace('answer: prompt', 'q: prompt')}")
    if not msgs or msgs[-1]["role"] == "assistant" or all(m["role"] == "system" for m in msgs):
        raise UserError(f"{where}: the prompt has no user turn to answer — fix that row")
    return msgs


def normalise_prompts(rows: list, system_prompt: str | None) -> list[tuple[dict, str]]:
    """Rows -> [({"prompt": [turns], **the row's other columns}, where)]; every row must have the same columns
    so that a reward can rely on them."""
    out = []
    first_keys = None
    for r in rows:
        msgs = to_prompt(r.data, r.where)
        if system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        extra = {k: _plain(v) for k, v in r.data.items() if k not in RESERVED}
        keys = sorted(extra)
        if first_keys is None:
            first_keys = keys
        elif keys != first_keys:
            missing = sorted(set(first_keys) - set(keys)) or sorted(set(keys) - set(first_keys))
            raise UserError(f"{r.where}: its columns differ from the first row's (`{missing[0]}`) — give every row the same columns, "
                            "or fill the missing ones with null")
        out.append(({"prompt": msgs, **extra}, r.where))
    return out


def _plain(value: Any) -> Any:
    """Nested values go to the rewards as JSON text: Arrow needs one type per column."""
    if isinstance(value, (dict, list)):
        import json

        return json.dumps(value, ensure_ascii=False)
    return value
