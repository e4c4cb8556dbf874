"""The chat template: rendering, where the assistant turns are, the loss mask, and checks on the template.

Conversations are rendered with the tokenizer's own template; the mask marks each assistant turn with
its end-of-turn token, so the model learns to stop. Assistant spans are found by rendering prefixes,
which works for any template whose rendering of a conversation prefix is a prefix of the whole (no
`{% generation %}` tags needed).
"""

from __future__ import annotations

from bisect import bisect_left

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


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each assistant turn (content + end-of-turn).

    The answer is what the assistant turn adds after the generation prompt. Trailing whitespace after the
    end-of-turn token is left untrained."""
    # a conversation that ends with its last answer renders as that answer's prefix: one render saved per row
    full = render(tokenizer, messages) if messages[-1]["role"] != "assistant" else None
    spans = []
    for i in reversed(range(len(messages))):
        if messages[i]["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        full = upto if full is None else full
        if not (full.startswith(upto) and upto.startswith(before)):
            raise UserError(
                "the chat template does not render conversations incrementally (a prefix renders differently "
                "alone), so assistant turns cannot be located — use train_on: all or a template with {% generation %} tags"
            )
        spans.append((len(before), len(upto.rstrip())))
    return full or render(tokenizer, messages), spans[::-1]


def tokenize_conversation(tokenizer, messages: list[dict], train_on: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and their labels (-100 where no loss)."""
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on == "all":
        return ids, list(ids)
    # a token is trained when it starts inside an assistant span; starts only grow, so bisect per span
    starts = [start for start, _end in enc["offset_mapping"]]
    labels = [-100] * len(ids)
    for s, e in spans:
        lo, hi = bisect_left(starts, s), bisect_left(starts, e)
        labels[lo:hi] = ids[lo:hi]
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


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the last trained token of a rendered answer, plus EOS."""
    _, labels = tokenize_conversation(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "completions")
    trained = [t for t in labels if t != -100]
    out = [trained[-1]] if trained and trained[-1] in tokenizer.all_special_ids else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out
