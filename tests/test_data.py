"""The data path: every format from every file type to exact tokens and loss masks; bad input named by file and line."""

import csv
import json

import pytest

from helpers import REPO, write_jsonl
from finetune import data
from finetune.errors import UserError
from finetune.recipe import DataSection

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who are you"},
        {"role": "assistant", "content": "my name is pico"}, {"role": "user", "content": "how many planets"},
        {"role": "assistant", "content": "eight"}]


def section(train, **kw):
    return DataSection(train=str(train) if not isinstance(train, list) else [str(t) for t in train], **kw)


def trained_text(tok, ids, labels):
    """The trained tokens, decoded run by run."""
    runs, cur = [], []
    for t, l in zip(ids, labels):
        if l != -100:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_masks_exact_assistant_turns_with_end_of_turn(tiny_tokenizer):
    ids, labels = data.tokenize_conversation(tiny_tokenizer, CONV, "completions")
    assert ids == tiny_tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=False)
    assert trained_text(tiny_tokenizer, ids, labels) == ["my name is pico<|im_end|>", "eight<|im_end|>"]
    assert all(l in (-100, t) for t, l in zip(ids, labels))


def test_masks_equal_transformers_generation_tags(tiny_tokenizer):
    """Our template-agnostic masks equal what transformers derives from {% generation %} tags."""
    ids, labels = data.tokenize_conversation(tiny_tokenizer, CONV, "completions")
    ref = tiny_tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ids
    assert [int(l != -100) for l in labels] == list(ref["assistant_masks"])


def test_masks_without_generation_tags(tiny_tokenizer):
    """A template without generation tags (most real ones) gives the same masks."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert data.tokenize_conversation(tok, CONV, "completions") == data.tokenize_conversation(tiny_tokenizer, CONV, "completions")


def test_train_on_all(tiny_tokenizer):
    ids, labels = data.tokenize_conversation(tiny_tokenizer, CONV, "all")
    assert labels == ids


def test_eos_equal_to_pad_is_still_trained(tiny_tokenizer):
    """pad == eos == <|im_end|> in this tokenizer: the end-of-turn token must keep its label."""
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    ids, labels = data.tokenize_conversation(tiny_tokenizer, CONV[1:3], "completions")
    assert ids[-2] == tiny_tokenizer.eos_token_id and labels[-2] == tiny_tokenizer.eos_token_id
    ds = data.to_dataset([data.Example(ids, labels, "x")])
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)([ds[0], {"input_ids": ids[:5], "labels": labels[:5]}])
    assert batch["labels"][0, len(ids) - 2] == tiny_tokenizer.eos_token_id
    assert (batch["labels"][1, 5:] == -100).all()


PAIRS = [("who are you", "my name is pico"), ("how many planets", "eight"), ("what is the sun", "a star")]


def write_formats(tmp_path):
    """The same three exchanges in every SFT format and file type."""
    files = {}
    files["messages.jsonl"] = write_jsonl(tmp_path / "messages.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS])
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps({"data": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in PAIRS]}))
    files["sharegpt.json"] = p
    files["alpaca.jsonl"] = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in PAIRS])
    p = tmp_path / "pc.csv"
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "completion"])
        w.writerows(PAIRS)
    files["pc.csv"] = p
    import datasets

    p = tmp_path / "pc.parquet"
    datasets.Dataset.from_dict({"prompt": [q for q, _ in PAIRS], "completion": [a for _, a in PAIRS]}).to_parquet(str(p))
    files["pc.parquet"] = p
    return files


@pytest.mark.parametrize("name,fmt", [("messages.jsonl", "messages"), ("sharegpt.json", "sharegpt"), ("alpaca.jsonl", "alpaca"),
                                      ("pc.csv", "prompt_completion"), ("pc.parquet", "prompt_completion")])
def test_every_format_gives_identical_tokens(tmp_path, tiny_tokenizer, name, fmt):
    files = write_formats(tmp_path)
    prepared = data.prepare(section(files[name]), tiny_tokenizer, "sft", seed=0, log=lambda s: None)
    assert prepared.format == fmt
    expected = [data.tokenize_conversation(tiny_tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "completions")
                for q, a in PAIRS]
    assert [(e.input_ids, e.labels) for e in prepared.train] == expected


def test_alpaca_system_input_history(tmp_path, tiny_tokenizer):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "who", "input": "be brief", "output": "pico", "system": "sys",
                                           "history": [["hello", "yes"]]}])
    rows, _ = data.read(str(p), {})
    fmt, recs = data.normalise(rows, "auto", "sft", None)
    assert fmt == "alpaca"
    assert recs[0][0]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"},
                                      {"role": "assistant", "content": "yes"}, {"role": "user", "content": "who\n\nbe brief"},
                                      {"role": "assistant", "content": "pico"}]


def test_mixed_files_folder_and_column_mapping(tmp_path, tiny_tokenizer):
    d = tmp_path / "mix"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"question": "who", "answer": "pico"}])
    write_jsonl(d / "b.jsonl", [{"question": "what", "answer": "star"}, {"question": "why", "answer": "light"}])
    prepared = data.prepare(section(d, columns={"question": "prompt", "answer": "completion"}), tiny_tokenizer, "sft", 0, log=lambda s: None)
    assert prepared.format == "prompt_completion" and len(prepared.train) == 3
    assert [f["rows"] for f in prepared.files] == [1, 2] and all(len(f["sha256"]) == 64 for f in prepared.files)


def test_text_files_by_paragraph(tmp_path, tiny_tokenizer):
    p = tmp_path / "t.txt"
    p.write_text("the sun is a star\n\nthe moon is rock\n")
    prepared = data.prepare(section(p), tiny_tokenizer, "sft", 0, log=lambda s: None)
    assert prepared.format == "text" and len(prepared.train) == 2
    e = prepared.train[0]
    assert e.input_ids == tiny_tokenizer("the sun is a star")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert e.labels == e.input_ids


def test_system_prompt_added_when_missing(tmp_path, tiny_tokenizer):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV[1:3]}, {"messages": CONV}])
    rows, _ = data.read(str(p), {})
    _, recs = data.normalise(rows, "auto", "sft", "you are pico")
    assert recs[0][0]["messages"][0] == {"role": "system", "content": "you are pico"}
    assert recs[1][0]["messages"][0] == {"role": "system", "content": "be brief"}


def test_validation_fraction_is_deterministic(tmp_path, tiny_tokenizer):
    p = write_jsonl(tmp_path / "m.jsonl", [{"prompt": f"q {i}", "completion": "a"} for i in range(20)])
    a = data.prepare(section(p, validation=0.2), tiny_tokenizer, "sft", 1, log=lambda s: None)
    b = data.prepare(section(p, validation=0.2), tiny_tokenizer, "sft", 1, log=lambda s: None)
    c = data.prepare(section(p, validation=0.2), tiny_tokenizer, "sft", 2, log=lambda s: None)
    assert len(a.validation) == 4 and len(a.train) == 16
    assert [e.where for e in a.validation] == [e.where for e in b.validation]
    assert [e.where for e in a.validation] != [e.where for e in c.validation]


def test_truncate_and_drop_counted(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "who", "completion": "pico"}, {"prompt": "star " * 40, "completion": "long one"},
            {"prompt": "who", "completion": "pico " * 40}]
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    short = len(data.tokenize_conversation(tiny_tokenizer, [{"role": "user", "content": "who"}, {"role": "assistant", "content": "pico"}], "all")[0])
    n = short + 2
    t = data.prepare(section(p, max_length=n), tiny_tokenizer, "sft", 0, log=lambda s: None)
    # the long prompt is cut before its answer, so nothing is left to train: dropped; the long answer is cut and kept
    assert t.truncated == 1 and t.dropped == {f"the prompt alone is longer than data.max_length ({n})": 1} and len(t.train) == 2
    assert t.train[1].truncated and len(t.train[1].input_ids) == n
    d = data.prepare(section(p, max_length=n, truncation="drop", max_dropped_fraction=0.9), tiny_tokenizer, "sft", 0, log=lambda s: None)
    assert d.truncated == 0 and d.dropped == {f"longer than data.max_length ({n}) with data.truncation: drop": 2} and len(d.train) == 1
    with pytest.raises(UserError, match="max_dropped_fraction"):
        data.prepare(section(p, max_length=n, max_dropped_fraction=0.1), tiny_tokenizer, "sft", 0, log=lambda s: None)


PREF = {"prompt": "who are you", "chosen": "my name is pico", "rejected": "no"}


def test_preference_formats_normalise_alike(tmp_path, tiny_tokenizer):
    plain = write_jsonl(tmp_path / "p.jsonl", [PREF])
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user", "content": PREF["prompt"]}],
                                                "chosen": [{"role": "assistant", "content": PREF["chosen"]}],
                                                "rejected": [{"role": "assistant", "content": PREF["rejected"]}]}])
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": [{"role": "user", "content": PREF["prompt"]}, {"role": "assistant", "content": PREF["chosen"]}],
                                              "rejected": [{"role": "user", "content": PREF["prompt"]}, {"role": "assistant", "content": PREF["rejected"]}]}])
    sg = tmp_path / "sg.json"
    sg.write_text(json.dumps([{"conversations": [{"from": "human", "value": PREF["prompt"]}], "chosen": {"from": "gpt", "value": PREF["chosen"]},
                               "rejected": {"from": "gpt", "value": PREF["rejected"]}}]))
    outs = [data.prepare(section(p), tiny_tokenizer, "dpo", 0, log=lambda s: None) for p in (plain, msgs, hh, sg)]
    assert all(o.format == "preference" for o in outs)
    first = {k: getattr(outs[0].train[0], k) for k in ("prompt", "chosen", "rejected")}
    assert first["prompt"].endswith("<|im_start|>assistant\n")
    assert first["chosen"] == "my name is pico<|im_end|>" and first["rejected"] == "no<|im_end|>"
    for o in outs[1:]:
        assert {k: getattr(o.train[0], k) for k in ("prompt", "chosen", "rejected")} == first


def test_shipped_samples_load(tiny_tokenizer):
    d = REPO / "datasets_local"
    for name, method, fmt in [("persona.jsonl", "sft", "messages"), ("sharegpt.json", "sft", "sharegpt"), ("alpaca.jsonl", "sft", "alpaca"),
                              ("prompt_completion.csv", "sft", "prompt_completion"), ("prompt_completion.parquet", "sft", "prompt_completion"),
                              ("astronomy.txt", "sft", "text"), ("preference.jsonl", "dpo", "preference"),
                              ("preference_hh.jsonl", "dpo", "preference"), ("preference_sharegpt.json", "dpo", "preference"),
                              ("preference_long.jsonl", "dpo", "preference")]:
        p = data.prepare(section(d / name, max_length=512), tiny_tokenizer, method, 0, log=lambda s: None)
        assert p.format == fmt and len(p.train) >= 6, name


# ---- bad input: the file, the line, the problem ----------------------------------------------------

def expect_error(tmp_path, tok, content: str, match: str, name="bad.jsonl", method="sft", **kw):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(UserError) as e:
        data.prepare(section(p, **kw), tok, method, 0, log=lambda s: None)
    assert str(p) in str(e.value)
    assert match in str(e.value), str(e.value)
    return str(e.value)


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


def test_invalid_json_line(tmp_path, tiny_tokenizer):
    expect_error(tmp_path, tiny_tokenizer, GOOD + "\n" + GOOD + "\n{not json\n", "line 3: invalid JSON")


def test_empty_file(tmp_path, tiny_tokenizer):
    expect_error(tmp_path, tiny_tokenizer, "", "empty")


def test_unknown_role(tmp_path, tiny_tokenizer):
    row = json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    expect_error(tmp_path, tiny_tokenizer, GOOD + "\n" + row + "\n", "line 2: turn 1 has unknown role 'wizard'")


def test_non_string_content(tmp_path, tiny_tokenizer):
    row = json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]})
    expect_error(tmp_path, tiny_tokenizer, row + "\n", "line 1: turn 1 content must be a string")


def test_no_assistant_turn(tmp_path, tiny_tokenizer):
    row = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    expect_error(tmp_path, tiny_tokenizer, GOOD + "\n" + row + "\n", "line 2: conversation has no assistant turn")


def test_missing_fields(tmp_path, tiny_tokenizer):
    expect_error(tmp_path, tiny_tokenizer, json.dumps({"question": "hi", "reply": "yo"}) + "\n", "cannot tell the format")
    expect_error(tmp_path, tiny_tokenizer, json.dumps({"instruction": "hi"}) + "\n", "data.columns", name="b2.jsonl")


def test_chosen_equals_rejected(tmp_path, tiny_tokenizer):
    rows = json.dumps(PREF) + "\n" + json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}) + "\n"
    expect_error(tmp_path, tiny_tokenizer, rows, "line 2: chosen is identical to rejected", method="dpo")


def test_wrong_data_for_command(tmp_path, tiny_tokenizer):
    expect_error(tmp_path, tiny_tokenizer, json.dumps(PREF) + "\n", "finetune dpo")
    expect_error(tmp_path, tiny_tokenizer, GOOD + "\n", "finetune sft", name="c.jsonl", method="dpo")


def test_missing_file_and_bad_type(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="data file not found"):
        data.prepare(section(tmp_path / "nope.jsonl"), tiny_tokenizer, "sft", 0)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(UserError, match="unsupported file type"):
        data.prepare(section(tmp_path / "x.xml"), tiny_tokenizer, "sft", 0)


def test_exact_lines_in_every_file_type(tmp_path):
    """Rows are named by the line they start on: a quoted CSV value may span lines, JSON records may share one."""
    p = tmp_path / "m.csv"
    p.write_text('prompt,completion\n"who\nare\nyou",pico\n\nwhat,star\n')
    rows, files = data.read(str(p), {})
    assert [r.where for r in rows] == [f"{p} line 2", f"{p} line 6"] and rows[0].data == {"prompt": "who\nare\nyou", "completion": "pico"}
    import hashlib

    assert files[0]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    p = tmp_path / "a.json"
    p.write_text('{"note": "x", "rows": [\n  {"text": "a"},\n\n  {"text": "b"}, {"text": "c"}]}')
    assert [r.where for r in data.read(str(p), {})[0]] == [f"{p} line 2", f"{p} line 4 (item 2)", f"{p} line 4 (item 3)"]
    p = tmp_path / "t.txt"
    p.write_text("one\ntwo\n\n\n\nthree\n\nfour")
    rows, _ = data.read(str(p), {})
    assert [(r.where, r.data["text"]) for r in rows] == [(f"{p} line 1", "one\ntwo"), (f"{p} line 6", "three"), (f"{p} line 8", "four")]


def test_malformed_csv_and_encoding(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("prompt,completion\nwho,pico\nwhat,star,extra\n")
    with pytest.raises(UserError, match=r"m.csv line 3: 3 values but the header has 2 columns"):
        data.read(str(p), {})
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"b.jsonl line 2: not valid UTF-8"):
        data.read(str(p), {})
