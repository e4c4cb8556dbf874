"""SFT examples held as columns (flat int32 arrays + offsets) from the workers through the cache to the trainer's
dataset, and the batched rendering and tokenization behind them: the same ids and masks as one row at a time."""

import copy
import random

import numpy as np

from helpers import write_jsonl
from finetune import data
from finetune.data import template
from finetune.data.examples import Example, Examples
from finetune.recipe import DataSection

WORDS = "the star planet moon sun ring comet red blue cold, hot. big small  é 漢字 \n\n ok? yes!".split(" ")


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Varied conversations: optional system turn, one to three exchanges, some ending with a user turn, odd spacing."""
    rng = random.Random(seed)
    say = lambda: "".join(rng.choice(WORDS) + rng.choice(["", " ", "  ", "\n"]) for _ in range(rng.randint(0, 12)))  # noqa: E731
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": say()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
        if rng.random() < 0.2:
            msgs.append({"role": "user", "content": say()})
        out.append(msgs)
    return out


def test_generation_tags_mark_what_rendering_prefixes_finds(tiny_tokenizer):
    """The one-render path (the template's {% generation %} tags) gives the texts and spans of the prefix path."""
    convs = conversations(200)
    assert template.tracks_turns(tiny_tokenizer)
    assert template._tracked_spans(tiny_tokenizer, convs) == template._prefix_spans(tiny_tokenizer, convs)


def test_tags_that_leave_out_the_end_of_turn_are_not_used(tiny_tokenizer):
    """Tags around the content alone would leave <|im_end|> untrained: such a template is read by rendering prefixes."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = tok.chat_template.replace("{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
                                                  "{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
    assert "{% generation %}" in tok.chat_template and not template.tracks_turns(tok)
    ids, labels = data.tokenize_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "completions")
    trained = [t for t, l in zip(ids, labels) if l != -100]
    assert tok.decode(trained) == "ok<|im_end|>"


def test_batched_tokenization_equals_one_record_at_a_time(tiny_tokenizer):
    records = [{"messages": c} for c in conversations(150, seed=1)] + [{"text": "a document, plain text"}, {"text": ""}]
    random.Random(2).shuffle(records)
    for train_on in ("completions", "all"):
        batched = list(template.tokenize_records(tiny_tokenizer, records, train_on, batch=64))
        one_by_one = [next(template.tokenize_records(tiny_tokenizer, [r], train_on)) for r in records]
        assert batched == one_by_one and len(batched) == len(records)
    plain = copy.deepcopy(tiny_tokenizer)  # no generation tags: prefixes rendered in batches
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert not template.tracks_turns(plain)
    convs = [r for r in records if "messages" in r]
    assert list(template.tokenize_records(plain, convs, "completions", batch=64)) == list(template.tokenize_records(tiny_tokenizer, convs, "completions"))


def test_examples_columns_behave_as_a_list_of_examples():
    items = [Example([1, 2, 3], [-100, 2, 3], "f line 1"), Example([4], [4], "f line 2", True), Example([5, 6], [-100, -100], "f line 3")]
    ex = Examples.from_list(items)
    assert len(ex) == 3 and list(ex) == items and ex[1] == items[1] and ex[-1] == items[2] and ex == items
    assert ex[1:] == items[1:] and isinstance(ex[1:], Examples) and ex[::2] == items[::2]
    assert ex.input_ids.dtype == np.int32 and ex.offsets.tolist() == [0, 3, 4, 6] and ex.lengths().tolist() == [3, 1, 2]
    both = Examples.concat([ex, ex[1:]])
    assert list(both) == items + items[1:]
    assert Examples.concat([]) == [] and not Examples.concat([])
    ds = data.to_dataset(ex)
    ref = data.to_dataset(items)  # a plain list of examples takes the same way
    assert ds["input_ids"][:] == [e.input_ids for e in items] and ds["labels"][:] == [e.labels for e in items]
    assert ds.features == ref.features and str(ds.features["input_ids"].feature.dtype) == "int64"


def test_prepared_sft_data_are_arrays_from_workers_to_cache(tmp_path, tiny_tokenizer, monkeypatch):
    rows = [{"messages": [m if m["role"] == "system" or m["content"].strip() else {**m, "content": "ok"} for m in c]}
            for c in conversations(60, seed=3) if c[-1]["role"] == "assistant"]  # blank turns are refused: filled in
    s = DataSection(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), validation=0.2, max_length=96, num_proc=2,
                    max_dropped_fraction=0.9)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    first = data.prepare(s, tiny_tokenizer, "sft", 42, log=lambda _: None)
    second = data.prepare(s, tiny_tokenizer, "sft", 42, log=lambda _: None)
    assert (first.cache, second.cache) == ("miss", "hit")
    for p in (first, second):
        assert isinstance(p.train, Examples) and isinstance(p.validation, Examples) and p.train.input_ids.dtype == np.int32
    assert second.train == first.train and second.validation == first.validation and first.truncated > 0
    # each example that was kept whole is what tokenizing its row alone gives; the others were cut to max_length
    for e in list(first.train) + list(first.validation):
        line = int(e.where.rsplit(" ", 1)[1])
        ids, labels = data.tokenize_conversation(tiny_tokenizer, rows[line - 1]["messages"], "completions")
        assert (e.input_ids, e.labels) == (ids, labels) if not e.truncated else len(e.input_ids) <= 96 < len(ids)
