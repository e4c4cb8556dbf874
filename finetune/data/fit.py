"""Fitting one example into data.max_length tokens, or saying exactly why it cannot be kept.

SFT conversations are cut at the end; when that would leave no trained token (long early turns), the
earliest exchanges are removed instead (the system message stays), so the later turns that carry a
trained answer are kept. Preference pairs keep the end of a long prompt (earliest exchanges removed
first, then the start of the first remaining turn cut; the system message stays) and cut answers at the
end, sharing the budget as TRL and LLaMA-Factory users expect: answers up to half the window or what the
prompt leaves, whichever is more. Lengths are counted exactly as TRL's DPOTrainer tokenizes the strings
we hand it, so its own truncation never fires. TRL appends EOS to any answer string that lacks it, so the
strings are built with it already there (a cut answer too: TRL leaves no way around that for text data).
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.data.template import render, tokenize_conversation, tokenize_text

# how an example was shortened, as counted in the report ("3 with earlier turns removed, ...")
EARLIER_TURNS = "with earlier turns removed"
PROMPT_START = "with the start of the prompt cut"
CUT_END = "cut at the end"
ANSWERS_CUT = "with answers cut at the end"


@dataclass
class Dropped:
    """Why one row cannot be kept. `cause` is shared by all rows dropped for the same reason; `detail` is
    this row's numbers; `need` is the data.max_length that would keep it (None where none would)."""

    cause: str
    detail: str
    need: int | None = None
    fix: str = "raise data.max_length to at least {need}"


def _trained(labels: list[int], limit: int) -> bool:
    return any(t != -100 for t in labels[1:limit])  # the first label is never predicted


def _without_first_exchange(messages: list[dict]) -> list[dict] | None:
    """The conversation minus its earliest exchange (system messages kept), or None if nothing can go."""
    n_sys = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    rest = messages[n_sys:]
    nxt = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
    if nxt is None:
        return None
    return messages[:n_sys] + rest[nxt:]


def fit_sft(tokenizer, rec: dict, max_length: int, truncation: str, train_on: str, encoded: tuple[list[int], list[int]] | None = None):
    """-> (ids, labels, [how it was shortened]) or Dropped. `encoded`: the record's ids and labels, when already tokenized."""
    if encoded is not None:
        ids, labels = encoded
    elif "text" in rec:
        ids, labels = tokenize_text(tokenizer, rec["text"])
    else:
        ids, labels = tokenize_conversation(tokenizer, rec["messages"], train_on)
    if len(ids) > max_length and truncation == "drop":
        return Dropped(f"longer than data.max_length ({max_length}) with data.truncation: drop", f"{len(ids)} tokens", len(ids),
                       "raise data.max_length to {need} or set data.truncation: truncate")
    how: list[str] = []
    if "messages" in rec and len(ids) > max_length:
        msgs = rec["messages"]
        while not _trained(labels, max_length):
            shorter = _without_first_exchange(msgs)
            if shorter is None:
                break
            short_ids, short_labels = tokenize_conversation(tokenizer, shorter, train_on)
            if not _trained(short_labels, len(short_labels)):  # the later turns hold no answer: nothing to keep
                break
            msgs, ids, labels, how = shorter, short_ids, short_labels, [EARLIER_TURNS]
    if not _trained(labels, len(labels)):
        return Dropped("no trained tokens", f"{len(ids)} tokens, none of them trained", None, "check data.train_on")
    if not _trained(labels, max_length):
        first = next(i for i, t in enumerate(labels) if i and t != -100)
        return Dropped(f"the prompt alone is longer than data.max_length ({max_length})", f"the prompt alone is {first} tokens", first + 1)
    if len(ids) > max_length:
        ids, labels, how = ids[:max_length], labels[:max_length], how + [CUT_END]
    return ids, labels, how


# ---- preference pairs ----------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _split(p: list[int], pc: list[int], pr: list[int]) -> tuple[list[int], list[int], list[int]]:
    """prompt / chosen / rejected ids exactly as TRL 1.16's DPOTrainer derives them from the tokenized prompt,
    prompt+chosen and prompt+rejected: the completions start where prompt and prompt+completion diverge."""
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:]


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of several texts in one call, each as `tokenizer(text=...)` gives it (special tokens added)."""
    return tokenizer(text=texts)["input_ids"]


def with_eos(tokenizer, answer: str) -> str:
    """The answer as TRL's DPOTrainer tokenizes it: it appends EOS to answer strings that lack it."""
    eos = tokenizer.eos_token
    return answer if not eos or answer.endswith(eos) else answer + eos


def _answers(tokenizer, prompt_msgs: list[dict], answers: list[list[dict]], where: str) -> tuple[str, list[str]]:
    from finetune.errors import UserError

    prompt = render(tokenizer, prompt_msgs, generation_prompt=True)
    out = []
    for ans in answers:
        full = render(tokenizer, prompt_msgs + ans).rstrip()
        if not full.startswith(prompt):
            raise UserError(f"{where}: the chat template renders the prompt differently once an answer follows — cannot split prompt and answer")
        out.append(with_eos(tokenizer, full[len(prompt):]))
    return prompt, out


def _prompt_len(tokenizer, msgs: list[dict]) -> int:
    return len(tokenizer(text=render(tokenizer, msgs, generation_prompt=True))["input_ids"])


def _keep_tail(msgs: list[dict], i: int, starts: list[int], k: int) -> list[dict]:
    """The messages with turn i reduced to its last k tokens (`starts`: where each of its tokens begins)."""
    return msgs[:i] + [{**msgs[i], "content": msgs[i]["content"][starts[len(starts) - k]:]}] + msgs[i + 1:]


def _fit_turn(tokenizer, msgs: list[dict], target: int) -> list[dict] | None:
    """The prompt within `target` tokens by cutting the start of its first non-system turn (or as it is)."""
    if _prompt_len(tokenizer, msgs) <= target:
        return msgs
    i = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
    if i is None:  # nothing but system messages: nothing that may be cut
        return None
    starts = [s for s, _ in tokenizer(msgs[i]["content"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    if not starts or _prompt_len(tokenizer, _keep_tail(msgs, i, starts, 1)) > target:
        return None
    lo, hi = 1, len(starts)  # the most of that turn that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _prompt_len(tokenizer, _keep_tail(msgs, i, starts, mid)) <= target else (lo, mid - 1)
    return _keep_tail(msgs, i, starts, lo)


def _shorten_prompt(tokenizer, msgs: list[dict], target: int) -> tuple[list[dict], list[str]] | None:
    """The end of the prompt, at most `target` tokens: the fewest earliest exchanges removed, then the start
    of the first remaining turn cut, the system message kept. None if the system message (and the template
    around the last turn) leave no room."""
    versions = [msgs]  # the prompt with 0, 1, 2... earliest exchanges removed
    while (shorter := _without_first_exchange(versions[-1])) is not None:
        versions.append(shorter)

    def least_fit(k: int) -> list[dict] | None:  # version k with its first turn cut to one token, if that fits
        i = next((i for i, m in enumerate(versions[k]) if m["role"] != "system"), None)
        if i is None:
            return None
        starts = [s for s, _ in tokenizer(versions[k][i]["content"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        return _keep_tail(versions[k], i, starts, 1) if starts else versions[k]

    lo, hi = 0, len(versions)  # the fewest removals after which the prompt can fit, by bisection (shorter is monotone)
    while lo < hi:
        mid = (lo + hi) // 2
        least = least_fit(mid)
        lo, hi = (lo, mid) if least is not None and _prompt_len(tokenizer, least) <= target else (mid + 1, hi)
    if lo == len(versions):
        return None
    fitted = _fit_turn(tokenizer, versions[lo], target)
    if fitted is None:
        return None
    how = [EARLIER_TURNS] if lo else []
    return fitted, how + ([PROMPT_START] if fitted is not versions[lo] else [])


def _cut_answer(tokenizer, prompt: str, answer: str, limit: int) -> tuple[str, list[int]]:
    """The start of `answer` such that prompt + answer is at most `limit` tokens (TRL's count), and the ids
    of prompt + that start."""
    enc = tokenizer(text=prompt + answer, return_offsets_mapping=True)
    keep = limit
    while keep > 0:
        end = enc["offset_mapping"][keep - 1][1]
        cut = with_eos(tokenizer, (prompt + answer)[:end][len(prompt):])
        ids = tokenizer(text=prompt + cut)["input_ids"]
        if len(ids) <= limit:
            return cut, ids
        keep -= 1  # the EOS, or a merge across the new end, can change the count: step back a token
    cut = with_eos(tokenizer, "")
    return cut, tokenizer(text=prompt + cut)["input_ids"]


def fit_pair(tokenizer, rec: dict, max_length: int, truncation: str, where: str):
    """-> (prompt, chosen, rejected strings, (prompt_ids, chosen_ids, rejected_ids), [how]) or Dropped."""
    prompt_msgs = rec["prompt"]
    prompt, (chosen, rejected) = _answers(tokenizer, prompt_msgs, [rec["chosen"], rec["rejected"]], where)
    # every text is tokenized once (one call for all three); a piece that changes is tokenized again alone
    full = _ids(tokenizer, [prompt, prompt + chosen, prompt + rejected])
    p, c, r = _split(*full)
    longest = len(p) + max(len(c), len(r))
    if longest <= max_length:
        return prompt, chosen, rejected, (p, c, r), []
    if truncation == "drop":
        return Dropped(f"longer than data.max_length ({max_length}) with data.truncation: drop",
                       f"prompt + longer answer is {longest} tokens", longest, "raise data.max_length to {need} or set data.truncation: truncate")
    answer_room = min(max(len(c), len(r)), max(max_length - len(p), max_length // 2))
    floor = min(max(len(c), len(r)), max(1, max_length // 8))  # answers keep at least this much if the prompt needs room
    how: list[str] = []
    if len(p) > max_length - answer_room:
        shortened = None
        for target in (max_length - answer_room, max_length - floor):
            shortened = _shorten_prompt(tokenizer, prompt_msgs, target)
            if shortened:
                break
        if shortened is None:
            fixed = _prompt_len(tokenizer, [m for m in prompt_msgs if m["role"] == "system"] + [{"role": "user", "content": ""}])
            what = "the system message alone" if prompt_msgs[0]["role"] == "system" else "the prompt's template"
            return Dropped(f"{what} leaves no room within data.max_length ({max_length})",
                           f"{what} takes {fixed} tokens", fixed + floor)
        prompt_msgs, how = shortened
        prompt, (chosen, rejected) = _answers(tokenizer, prompt_msgs, [rec["chosen"], rec["rejected"]], where)
        full = _ids(tokenizer, [prompt, prompt + chosen, prompt + rejected])
        p, c, r = _split(*full)
    differ = len(p) + _common_prefix(c, r) + 1  # the shortest window in which the answers differ
    if differ > max_length:
        return Dropped(f"chosen and rejected are identical within data.max_length ({max_length})",
                       f"the answers first differ at token {differ}", differ)
    # prompt + answer ids are the prompt's kept ids followed by the answer's, so their length is len(p) + len(answer)
    cut = [(a, ids) if len(p) + len(a_ids) <= max_length else _cut_answer(tokenizer, prompt, a, max_length)
           for a, a_ids, ids in ((chosen, c, full[1]), (rejected, r, full[2]))]
    if [a for a, _ in cut] != [chosen, rejected]:
        how.append(ANSWERS_CUT)
    (chosen, pc), (rejected, pr) = cut
    p, c, r = _split(full[0], pc, pr)
    if not c or not r or c == r:  # a merge at a cut can still make them equal
        return Dropped(f"chosen and rejected are identical within data.max_length ({max_length})",
                       f"the answers first differ at token {differ}", differ)
    return prompt, chosen, rejected, (p, c, r), how
