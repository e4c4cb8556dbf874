"""`finetune eval`: numbers proven equal to a direct computation in the test."""

import json
import math

import pytest
import torch
from helpers import toy_rows, write_jsonl, write_recipe

from finetune import evaluate


def test_windows_score_every_token_once():
    ids = list(range(100, 137))
    for w, s in [(8, 8), (8, 3), (10, 1), (50, 50)]:
        scored = []
        for x, y in evaluate.windows(ids, w, s):
            assert len(x) <= w
            scored += [t for t in y if t != -100]
            first = next(i for i, t in enumerate(y) if t != -100)
            assert first >= 1  # each scored token has at least one token of context in its window
        assert scored == ids[1:], (w, s)


def direct_nll(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()


@pytest.fixture
def text_file(tmp_path):
    from helpers import corpus

    p = tmp_path / "held.txt"
    p.write_text(" ".join(corpus(30, seed=5)))
    return p


def test_short_text_equals_model_loss(cli, tmp_path, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = tmp_path / "short.txt"
    p.write_text("the star is red and the moon is cold")
    res = cli("eval", tiny, "--data", p, "--max-length", "512", "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    r = json.loads(res.out)[0]
    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok(p.read_text())["input_ids"]
    loss = direct_nll(AutoModelForCausalLM.from_pretrained(tiny), ids)
    assert r["tokens"] == len(ids) - 1
    assert r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["nll"]), rel=1e-12)


def test_sliding_window_equals_direct_computation(cli, tiny, text_file):
    """Long text: compare with a per-window computation written out here, token by token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny)
    ids = AutoTokenizer.from_pretrained(tiny)(text_file.read_text())["input_ids"]
    w, s = 32, 16
    total, n, scored = 0.0, 0, 1
    with torch.no_grad():
        while scored < len(ids):
            end = min(scored + s, len(ids))
            start = max(0, end - w)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[start:end]])).logits[0].double(), -1)
            for pos in range(scored, end):
                total -= logp[pos - start - 1, ids[pos]].item()
                n += 1
            scored = end
    expected = math.exp(total / n)
    results = {}
    for bs in (1, 3, 8):
        res = cli("eval", tiny, "--data", text_file, "--max-length", str(w), "--stride", str(s), "--batch-size", str(bs),
                  "--dtype", "fp32", "--json")
        assert res.code == 0, res.text
        results[bs] = json.loads(res.out)[0]
        assert results[bs]["tokens"] == len(ids) - 1 == n
        assert results[bs]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert results[1]["perplexity"] == pytest.approx(results[8]["perplexity"], rel=1e-4)


def test_chat_data_scored_on_trained_tokens_matches_training_eval(cli, tmp_path, tiny):
    """An adapter's perplexity on its validation file equals the eval loss training reported."""
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(12))
    val_rows = toy_rows(4) + [{"messages": [{"role": "user", "content": "and you"}, {"role": "assistant", "content": "a small red star"}]}]
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)  # answers of different lengths: token weighting matters
    r = write_recipe(tmp_path / "r.yaml", {
        "model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4, "dropout": 0.0},
        "data": {"train": str(train), "validation": str(val), "max_length": 64},
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2}, "output": {"dir": str(tmp_path / "ad")}})
    assert cli("sft", r).code == 0
    manifest = json.loads((tmp_path / "ad" / "manifest.json").read_text())
    res = cli("eval", tiny, tmp_path / "ad", "--data", val, "--dtype", "fp32", "--json", "--batch-size", "2")
    assert res.code == 0, res.text
    base, adapter = json.loads(res.out)
    assert adapter["kind"] == "adapter" and base["kind"] == "model"
    assert base["comparable"] and adapter["comparable"] and "warning" not in res.err  # an adapter shares its base's tokenizer
    assert adapter["nll"] == pytest.approx(manifest["final_metrics"]["eval_loss"], rel=1e-5)
    assert adapter["nll"] < base["nll"]
    # the trained-token count is exactly what the masks select: "my name is pico<|im_end|>" per row
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])
    assert adapter["tokens"] == 4 * n("my name is pico<|im_end|>") + n("a small red star<|im_end|>")


def test_eval_bad_inputs(cli, tmp_path, tiny):
    res = cli("eval", tiny, "--data", tmp_path / "none.txt")
    assert res.code == 2 and "data file not found" in res.err
    empty = tmp_path / "e.txt"
    empty.write_text("")
    res = cli("eval", tiny, "--data", empty)
    assert res.code == 2 and "empty" in res.err
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    p = tmp_path / "t.txt"
    p.write_text("the sun is a star")
    res = cli("eval", ad, "--data", p)
    assert res.code == 2 and "its base cannot be loaded" in res.err and "Traceback" not in res.text
    res = cli("eval", "no-such-model", "--data", p)
    assert res.code == 2 and "not found" in res.err


def other_tokenizer_model(folder):
    """A second tiny model whose BPE tokenizer was trained to another vocabulary size on another corpus."""
    from helpers import CHAT_TEMPLATE, build_model, corpus
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(200, seed=7), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    build_model(folder, fast)
    return folder


def test_different_tokenizers_are_flagged(cli, tmp_path, tiny, text_file):
    other = other_tokenizer_model(tmp_path / "other")
    res = cli("eval", tiny, other, "--data", text_file, "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    rows = json.loads(res.out)
    assert rows[0]["tokenizer"] != rows[1]["tokenizer"] and rows[0]["tokens"] != rows[1]["tokens"]
    assert [r["comparable"] for r in rows] == [False, False]
    assert "different tokenizers" in rows[0]["not_comparable_because"] and str(other) in rows[0]["not_comparable_because"]
    assert "warning:" in res.err and "different tokenizers" in res.err
    res = cli("eval", tiny, other, "--data", text_file, "--dtype", "fp32")
    assert res.code == 0, res.text
    assert "different tokenizers" in res.err and "not comparable" in res.out and "perplexity" in res.out


def test_same_tokenizer_is_comparable(cli, tmp_path, tiny, text_file):
    """A second model with other weights but the same tokenizer files: no warning."""
    from helpers import build_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.save_pretrained(tmp_path / "twin")
    build_model(tmp_path / "twin", tok, seed=1)
    res = cli("eval", tiny, tmp_path / "twin", "--data", text_file, "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    rows = json.loads(res.out)
    assert rows[0]["tokenizer"] == rows[1]["tokenizer"] and [r["comparable"] for r in rows] == [True, True]
    assert rows[0]["perplexity"] != rows[1]["perplexity"]  # really two models
    assert "warning" not in res.err and "not_comparable_because" not in rows[0]
