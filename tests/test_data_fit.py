"""Fitting examples into data.max_length: long preference prompts keep their end (system message kept),
long answers are cut, SFT keeps the later turns that carry the answer; what is shortened or dropped is
counted, reported in words with its cause, and TRL's DPOTrainer sees exactly our tokens (its own
truncation never fires)."""

import json

import pytest

from helpers import REPO, toy_rows, write_jsonl, write_recipe
from finetune import data
from finetune.errors import UserError
from finetune.recipe import DataSection

LONG = REPO / "datasets_local" / "preference_long.jsonl"
ROWS = [json.loads(line) for line in LONG.read_text().splitlines()]
SYSTEM = ROWS[0]["prompt"][0]["content"]


def quiet(s):
    return None


def trl_length(tok, text):
    return len(tok(text=text)["input_ids"])


def test_long_preference_prompts_keep_their_end(tiny_tokenizer):
    tok = tiny_tokenizer
    notes = []
    p = data.prepare(DataSection(train=str(LONG), max_length=256), tok, "dpo", 0, log=notes.append)
    assert p.dropped == {} and len(p.train) == len(ROWS) == 14
    # every row is longer than 256 tokens as written, so every row is shortened, and now fits
    for row in ROWS:
        assert trl_length(tok, data.render(tok, row["prompt"] + row["chosen"])) > 256
    assert p.truncated == 14 and all(pair.truncated for pair in p.train)
    assert p.truncations == {"with earlier turns removed": 12, "with the start of the prompt cut": 2, "with answers cut at the end": 2}
    assert ("14 of 14 training rows shortened to fit data.max_length (256): 12 with earlier turns removed, "
            "2 with the start of the prompt cut, 2 with answers cut at the end") in notes
    for row, pair in zip(ROWS, p.train):
        assert pair.where.endswith(f"line {ROWS.index(row) + 1}")
        # exact counts: the strings TRL will tokenize give these ids, and they fit
        assert pair.prompt_ids + pair.chosen_ids == tok(text=pair.prompt + pair.chosen)["input_ids"]
        assert pair.prompt_ids + pair.rejected_ids == tok(text=pair.prompt + pair.rejected)["input_ids"]
        assert pair.length == max(trl_length(tok, pair.prompt + pair.chosen), trl_length(tok, pair.prompt + pair.rejected)) <= 256
        if row["prompt"][0]["role"] == "system":  # the system message is kept
            assert pair.prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        else:
            assert "system" not in pair.prompt
        first_user = next(m for m in row["prompt"] if m["role"] == "user")["content"]
        long_answer = len(row["chosen"][0]["content"]) > 400
        assert long_answer or first_user not in pair.prompt  # the start of a multi-turn prompt went ...
        last = row["prompt"][-1]["content"]
        assert pair.prompt.endswith(f"{last[-20:]}<|im_end|>\n<|im_start|>assistant\n")  # ... the end stayed
        prompt = data.render(tok, row["prompt"], generation_prompt=True)
        rejected = data.render(tok, row["prompt"] + row["rejected"])[len(prompt):].rstrip()
        chosen = data.render(tok, row["prompt"] + row["chosen"])[len(prompt):].rstrip()
        assert pair.rejected == rejected  # short answers are whole, with their end-of-turn token
        if long_answer:  # the two long answers: cut at the end, so no end-of-turn token
            # TRL appends EOS to an answer string without one; the count includes it
            assert pair.chosen.endswith("<|im_end|>") and chosen.startswith(pair.chosen.removesuffix("<|im_end|>"))
            assert len(pair.chosen) < len(chosen) and pair.length == 256
        else:
            assert pair.chosen == chosen and pair.prompt.endswith(f"user\n{last}<|im_end|>\n<|im_start|>assistant\n")


def test_trl_sees_exactly_our_tokens(tmp_path, tiny):
    """DPOTrainer tokenizes our strings to our ids, drops none, and its collator cuts nothing."""
    from finetune import dpo, recipe as recipes

    r = recipes.load(write_recipe(tmp_path / "r.yaml", {
        "model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4},
        "data": {"train": str(LONG), "max_length": 256}, "training": {"max_steps": 1, "batch_size": 4}, "dpo": {"beta": 0.1}}))
    built = dpo.build(r, tmp_path / "ck")
    prepared, trainer = built.prepared, built.trainer
    ds = trainer.train_dataset
    assert len(ds) == len(prepared.train) == 14
    for i, pair in enumerate(prepared.train):
        assert (ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"]) == (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    n = len(ds)
    got = batch["attention_mask"].sum(dim=1).tolist()
    assert got == [len(p.prompt_ids) + len(p.chosen_ids) for p in prepared.train] + [len(p.prompt_ids) + len(p.rejected_ids) for p in prepared.train]
    assert max(got) == 256 and batch["input_ids"].shape == (2 * n, 256)


def test_dpo_trains_on_long_prompts_and_says_what_it_dropped(cli, tmp_path, tiny):
    huge = write_jsonl(tmp_path / "huge.jsonl", [{"prompt": [{"role": "system", "content": "be brief " * 80},
                                                             {"role": "user", "content": "who are you"}],
                                                  "chosen": "my name is pico", "rejected": "no"}])
    tree = {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4},
            "data": {"train": [str(LONG), str(huge)], "max_length": 256},
            "training": {"max_steps": 2, "batch_size": 2, "log_every": 1}, "dpo": {"beta": 0.1}, "output": {"dir": str(tmp_path / "out")}}
    r = write_recipe(tmp_path / "r.yaml", tree)
    res = cli("inspect", r)
    assert res.code == 0, res.text
    text = " ".join(res.text.split())
    dropped = "1 of 15 training rows dropped: the system message alone leaves no room within data.max_length (256)"
    assert dropped in text and f"(e.g. {huge} line 1: the system message alone takes" in text
    assert "14 of 15 training rows shortened to fit data.max_length (256)" in text
    assert "dropped 1 row: the system message alone leaves no room within data.max_length (256)" in text  # the table, in words
    assert "{" not in text.split("dropped")[-1]  # no Python dict
    res = cli("dpo", r)
    assert res.code == 0, res.text
    text = " ".join(res.text.split())
    assert dropped in text and "training on 14 examples" in text
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["data"]["train_examples"] == 14 and manifest["data"]["truncated"] == 14
    assert manifest["data"]["dropped"] == {"the system message alone leaves no room within data.max_length (256)": 1}


def test_preference_drops_name_their_cause(tmp_path, tiny_tokenizer):
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "who", "chosen": "star " * 60 + "red", "rejected": "star " * 60 + "blue"}] +
                       [{"prompt": "who", "chosen": "pico", "rejected": "no"}] * 3)
    p = data.prepare(DataSection(train=str(same), max_length=64), tiny_tokenizer, "dpo", 0, log=quiet)
    assert p.dropped == {"chosen and rejected are identical within data.max_length (64)": 1} and len(p.train) == 3
    with pytest.raises(UserError) as e:
        data.prepare(DataSection(train=str(LONG), max_length=256, truncation="drop"), tiny_tokenizer, "dpo", 0, log=quiet)
    longest = max(trl_length(tiny_tokenizer, data.render(tiny_tokenizer, r["prompt"] + a).rstrip()) for r in ROWS for a in (r["chosen"], r["rejected"]))
    assert str(e.value).startswith(f"{LONG}: no usable training examples after tokenization — all 14 rows dropped (14 longer than "
                                   f"data.max_length (256) with data.truncation: drop; e.g. {LONG} line 1: prompt + longer answer is ")
    assert str(e.value).endswith(f" — raise data.max_length to {longest} or set data.truncation: truncate")


def test_too_many_drops_suggest_only_what_helps(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "star " * 80, "completion": "pico"}] * 3 + [{"prompt": "who", "completion": "pico"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(UserError) as e:
        data.prepare(DataSection(train=str(path), max_length=64), tiny_tokenizer, "sft", 0, log=quiet)
    msg = str(e.value)
    need = len(data.tokenize_conversation(tiny_tokenizer, [{"role": "user", "content": "star " * 80}], "all")[0])
    assert "3 of 4 training rows would be dropped" in msg and "the prompt alone is longer than data.max_length (64)" in msg
    assert f"{path} line 1: the prompt alone is" in msg and "raise data.max_length to" in msg and need > 64
    assert "truncation" not in msg  # truncation: truncate is already on and would not help
    with pytest.raises(UserError) as e:
        data.prepare(DataSection(train=str(path), max_length=64, truncation="drop"), tiny_tokenizer, "sft", 0, log=quiet)
    assert "with data.truncation: drop" in str(e.value) and "set data.truncation: truncate" in str(e.value)


def test_sft_keeps_the_later_turns_when_early_ones_are_long(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    long_exchange = [{"role": "user", "content": "tell me about stars " * 20}, {"role": "assistant", "content": "the sun is a star " * 20}]
    sys, last = [{"role": "system", "content": "be brief"}], [{"role": "user", "content": "who are you"},
                                                               {"role": "assistant", "content": "my name is pico"}]
    conv = sys + long_exchange + last
    ids, labels = data.tokenize_conversation(tok, conv, "completions")
    short_ids, short_labels = data.tokenize_conversation(tok, sys + last, "completions")
    first_trained = next(i for i, t in enumerate(labels) if t != -100)
    n = first_trained  # cutting the end would leave no trained token
    assert len(short_ids) <= n
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}] + toy_rows(3))
    notes = []
    p = data.prepare(DataSection(train=str(path), max_length=n), tok, "sft", 0, log=notes.append)
    assert p.dropped == {} and (p.train[0].input_ids, p.train[0].labels) == (short_ids, short_labels) and p.train[0].truncated
    assert f"1 of 4 training rows shortened to fit data.max_length ({n}): 1 with earlier turns removed" in notes
    # plenty of room for the first answer: cut at the end as before, nothing removed from the start
    p = data.prepare(DataSection(train=str(path), max_length=first_trained + 5), tok, "sft", 0, log=quiet)
    assert p.train[0].input_ids == ids[:first_trained + 5] and p.truncations == {"cut at the end": 1}


def test_inspect_says_why_sft_rows_were_dropped(cli, tmp_path, tiny):
    long = {"messages": [{"role": "user", "content": "star " * 80}, {"role": "assistant", "content": "pico"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [long] + toy_rows(5))
    r = write_recipe(tmp_path / "r.yaml", {"model": {"base": str(tiny)}, "data": {"train": str(path), "max_length": 64}})
    res = cli("inspect", r)
    assert res.code == 0, res.text
    text = " ".join(res.text.split())
    assert f"1 of 6 training rows dropped: the prompt alone is longer than data.max_length (64) (e.g. {path} line 1: the prompt alone is " in text
    assert "to keep them" in text and "training on 5 examples" in text
    assert "dropped 1 row: the prompt alone is longer than data.max_length (64)" in text
