"""The chat template: rendering, where the assistant turns are, the loss mask, and checks on the template.

Conversations are rendered with the tokenizer's own template; the mask marks each assistant turn with
its end-of-turn token, so the model learns to stop. Assistant spans are found by rendering prefixes,
which works for any template whose rendering of a conversation prefix is a prefix of the whole (no
`{% generation %}` tags needed).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from finetune.errors import UserError

# A plain ChatML template for bases that ship none. The generation tags let transformers mark assistant
# tokens directly; the end-of-turn token sits inside them so that it is trained.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the default one. Returns True if it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_many(tokenizer, conversations: list[list[dict]], generation_prompt: bool = False) -> list[str]:
    """`render` of each conversation, in one call of the template (its per-call work is done once)."""
    if not conversations:
        return []
    return list(tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation_prompt))


NOT_INCREMENTAL = ("the chat template does not render conversations incrementally (a prefix renders differently "
                   "alone), so assistant turns cannot be located — use train_on: all or a template with {% generation %} tags")


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each assistant turn (content + end-of-turn).

    The answer is what the assistant turn adds after the generation prompt. Trailing whitespace after the
    end-of-turn token is left untrained."""
    return spans_many(tokenizer, [messages])[0]


def _prefix_spans(tokenizer, conversations: list[list[dict]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Assistant spans by rendering prefixes: for each assistant turn, the conversation before it with the
    generation prompt, and up to its end. Every prefix of every conversation is rendered in two calls."""
    turns = [[i for i, m in enumerate(msgs) if m["role"] == "assistant"] for msgs in conversations]
    before = iter(render_many(tokenizer, [msgs[:i] for msgs, ts in zip(conversations, turns) for i in ts], generation_prompt=True))
    # a conversation that ends with its last answer renders as that answer's prefix: only the others are rendered whole
    upto = iter(render_many(tokenizer, [msgs[: i + 1] for msgs, ts in zip(conversations, turns) for i in ts]
                            + [msgs for msgs in conversations if msgs[-1]["role"] != "assistant"]))
    pairs = [[(next(before), next(upto)) for _ in ts] for ts in turns]
    out = []
    for msgs, rendered in zip(conversations, pairs):
        full = rendered[-1][1] if msgs[-1]["role"] == "assistant" else next(upto)
        spans = []
        for b, u in rendered:
            if not (full.startswith(u) and u.startswith(b)):
                raise UserError(NOT_INCREMENTAL)
            spans.append((len(b), len(u.rstrip())))
        out.append((full, spans))
    return out


def _tracked_spans(tokenizer, conversations: list[list[dict]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Assistant spans as the template's `{% generation %}` tags mark them: one render per conversation
    (transformers' renderer records where each tagged block starts and ends)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    plain = [[{k: v for k, v in m.items() if v is not None} for m in msgs] for msgs in conversations]  # as apply_chat_template does
    texts, indices = render_jinja_template(conversations=plain, chat_template=tokenizer.get_chat_template(),
                                           return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    return [(text, [(int(a), int(b)) for a, b in ix]) for text, ix in zip(texts, indices)]


# conversations on which a template's generation tags must mark exactly what rendering prefixes finds
PROBES = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three"}, {"role": "assistant", "content": " four\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
_tracks: dict[tuple[str, str], bool] = {}


def tracks_turns(tokenizer) -> bool:
    """Whether this tokenizer's `{% generation %}` tags mark the assistant turns exactly as rendering prefixes does
    (checked once per template on PROBES). Then one render per conversation finds them instead of two per turn."""
    import re

    template = tokenizer.get_chat_template()
    key = (template, str(tokenizer.special_tokens_map))
    if key not in _tracks:
        tagged = re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
        try:
            _tracks[key] = tagged and _tracked_spans(tokenizer, PROBES) == _prefix_spans(tokenizer, PROBES)
        except Exception:  # any failure means: render prefixes, which reports the problem itself
            _tracks[key] = False
    return _tracks[key]


def spans_many(tokenizer, conversations: list[list[dict]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """(rendered text, assistant spans) of each conversation."""
    if not conversations:
        return []
    return (_tracked_spans if tracks_turns(tokenizer) else _prefix_spans)(tokenizer, conversations)


def labels_of(ids: list[int], starts: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """-100 except on the tokens that start inside an assistant span (starts only grow, so bisect per span)."""
    labels = [-100] * len(ids)
    for s, e in spans:
        lo, hi = bisect_left(starts, s), bisect_left(starts, e)
        labels[lo:hi] = ids[lo:hi]
    return labels


def tokenize_records(tokenizer, records: list[dict], train_on: str, batch: int = 256) -> Iterator[tuple[list[int], list[int]]]:
    """`tokenize_conversation` or `tokenize_text` of each record (`messages` or `text`), in order, with the template
    rendered and the tokenizer called once per `batch` records instead of once per record (only one batch is
    held as Python lists at a time)."""
    for lo in range(0, len(records), batch):
        part = records[lo:lo + batch]
        got: dict[int, tuple[list[int], list[int]]] = {}
        texts = [i for i, r in enumerate(part) if "text" in r]
        if texts:
            for i, ids in zip(texts, tokenizer([part[i]["text"] for i in texts], add_special_tokens=True, return_attention_mask=False)["input_ids"]):
                got[i] = _with_eos(tokenizer, ids)
        convs = [i for i, r in enumerate(part) if "text" not in r]
        if convs:
            rendered = spans_many(tokenizer, [part[i]["messages"] for i in convs])
            enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=train_on != "all",
                            return_attention_mask=False)
            for k, (i, ids) in enumerate(zip(convs, enc["input_ids"])):
                if train_on == "all":
                    got[i] = (ids, list(ids))
                else:
                    got[i] = (ids, labels_of(ids, [s for s, _ in enc["offset_mapping"][k]], rendered[k][1]))
        yield from (got[i] for i in range(len(part)))


def tokenize_conversation(tokenizer, messages: list[dict], train_on: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and their labels (-100 where no loss)."""
    return next(tokenize_records(tokenizer, [{"messages": messages}], train_on))


def _with_eos(tokenizer, ids: list[int]) -> tuple[list[int], list[int]]:
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]  # documents end, so the model learns where they end
    return ids, list(ids)


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    return next(tokenize_records(tokenizer, [{"text": text}], "all"))


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


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the last trained token of a rendered answer, plus EOS."""
    _, labels = tokenize_conversation(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "completions")
    trained = [t for t in labels if t != -100]
    out = [trained[-1]] if trained and trained[-1] in tokenizer.all_special_ids else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out
