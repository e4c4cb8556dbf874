"""`finetune eval --data`: each perplexity next to its change from the first model, in plain words."""

import json

import pytest

from helpers import toy_rows, write_jsonl, write_recipe


def test_perplexity_change_and_reading(cli, tmp_path, tiny):
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows(16))
    val = write_jsonl(tmp_path / "val.jsonl", toy_rows(4))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data), "max_length": 64},
        "training": {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
        "output": {"dir": str(tmp_path / "ad")},
    })
    assert cli("sft", recipe).code == 0
    res = cli("eval", str(tiny), str(tmp_path / "ad"), str(tiny) + "/", "--data", val, "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    base, tuned, same = json.loads(res.out)
    assert "reading" not in base and "perplexity_change_pct" not in base
    change = 100 * (tuned["perplexity"] - base["perplexity"]) / base["perplexity"]
    assert tuned["perplexity_change_pct"] == pytest.approx(change) and change < -50  # the adapter learned this text
    assert tuned["reading"] == (f"{tmp_path / 'ad'} fits this text {abs(change):.1f} % better than {tiny} "
                                f"(perplexity {tuned['perplexity']:.3f} vs {base['perplexity']:.3f})")
    assert same["perplexity_change_pct"] == pytest.approx(0) and "fits this text as well as" in same["reading"]
    table = cli("eval", str(tiny), str(tmp_path / "ad"), "--data", val, "--dtype", "fp32")
    assert table.code == 0 and f"{change:+.1f} %" in table.out and tuned["reading"] in table.out
