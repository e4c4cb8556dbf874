"""What training leaves in the run folder besides the adapter: the final evaluation's perplexity table (base
against the trained adapter, the numbers `finetune eval` gives) and, with `training.sample_every`, the
answers to validation prompts as they evolve (samples.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import toy_rows, write_jsonl, write_recipe

VAL = [{"messages": [{"role": "user", "content": f"who are you {i}"}, {"role": "assistant", "content": "my name is pico"}]}
       for i in (1, 2, 3)]


def sft_recipe(tmp_path: Path, tiny: Path, dtype: str = "fp32", dropout: float = 0.0, **training) -> Path:
    return write_recipe(tmp_path / "r.yaml", {
        "model": {"base": str(tiny), "quantization": "none", "dtype": dtype},
        "lora": {"r": 8, "alpha": 16, "dropout": dropout},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", toy_rows(16))), "max_length": 64,
                 "validation": str(write_jsonl(tmp_path / "val.jsonl", VAL))},
        "training": {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant",
                     **training},
        "output": {"dir": str(tmp_path / "out")},
    })


def greedy_from_published(tiny: Path, adapter: Path, user: str, max_new_tokens: int) -> str:
    """The published adapter's greedy answer, loaded with plain transformers + PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), adapter).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_sft_samples_evolve_and_eval_table_matches_finetune_eval(cli, tmp_path, tiny):
    res = cli("sft", sft_recipe(tmp_path, tiny, sample_every=6, sample_prompts=2, sample_max_tokens=12))
    assert res.code == 0, res.text
    out = tmp_path / "out"

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 6, 12, 12]
    assert [("who are you 1" in r["prompt"], "who are you 2" in r["prompt"]) for r in rows] == [(True, False), (False, True)] * 2
    assert all(0 < r["tokens"] <= 12 for r in rows)
    # the model changed between the two samplings, and the last answers are the published adapter's own
    assert [r["answer"] for r in rows[:2]] != [r["answer"] for r in rows[2:]]
    for r, user in zip(rows[2:], ("who are you 1", "who are you 2")):
        assert r["answer"] == greedy_from_published(tiny, out, user, 12)

    # the final evaluation's table: base against adapter, with the numbers `finetune eval` gives on the same file
    final = json.loads((out / "manifest.json").read_text())["final_metrics"]
    res = cli("eval", str(tiny), str(out), "--data", str(tmp_path / "val.jsonl"), "--max-length", "64", "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    base, tuned = json.loads(res.out)
    assert final["base_eval_perplexity"] == pytest.approx(base["perplexity"], rel=1e-4)
    assert final["eval_perplexity"] == pytest.approx(tuned["perplexity"], rel=1e-4)
    assert final["eval_perplexity_change_pct"] == pytest.approx(tuned["perplexity_change_pct"], rel=1e-3)
    assert tuned["perplexity"] < base["perplexity"]  # it learned the validation answers' phrase
    table = (out / "eval.txt").read_text()
    assert f"{base['perplexity']:.3f}" in table and f"{tuned['perplexity']:.3f}" in table
    assert f"{tuned['perplexity_change_pct']:+.1f} %" in table
    assert f"fits this text {abs(tuned['perplexity_change_pct']):.1f} % better than {tiny} (base)" in table.replace("\n", "")


def test_dpo_samples_and_chosen_perplexity_table(cli, tmp_path, tiny):
    prefs = [{"prompt": f"who are you {i % 3}", "chosen": "my name is pico", "rejected": "the red comet is cold"} for i in range(12)]
    recipe = write_recipe(tmp_path / "d.yaml", {
        "model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "prefs.jsonl", prefs)), "max_length": 64, "validation": 0.25},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "sample_every": 2,
                     "sample_max_tokens": 8},
        "dpo": {"beta": 0.1}, "output": {"dir": str(tmp_path / "dpo")}})
    res = cli("dpo", recipe)
    assert res.code == 0, res.text
    out = tmp_path / "dpo"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2, 4, 4, 4]  # 3 validation pairs, the default 3 prompts
    assert all("who are you" in r["prompt"] and 0 < r["tokens"] <= 8 for r in rows)
    final = json.loads((out / "manifest.json").read_text())["final_metrics"]
    assert final["chosen_perplexity"] < final["base_chosen_perplexity"]  # DPO raised the chosen answers' likelihood
    table = (out / "eval.txt").read_text()
    assert "chosen answers" in table and f"{final['chosen_perplexity']:.3f}" in table and "(base)" in table



def test_sampling_leaves_training_unchanged_in_bf16(tmp_path, tiny):
    """Generating between steps (eval mode, outside the trainer's autocast, then back) must not change what
    training computes: the same per-step losses with and without samples, LoRA dropout on."""
    from finetune import recipe as recipes
    from helpers import train

    losses = {}
    for every in (None, 2):
        d = tmp_path / f"every-{every}"
        d.mkdir()
        train(recipes.load(sft_recipe(d, tiny, "bf16", 0.1, max_steps=4, log_every=1, sample_every=every, sample_prompts=2,
                                      sample_max_tokens=6)), "sft")
        rows = [json.loads(line) for line in (d / "out" / "metrics.jsonl").read_text().splitlines()]
        losses[every] = [row["loss"] for row in rows if "loss" in row]
        assert (d / "out" / "samples.jsonl").exists() == (every is not None)
    assert len(losses[None]) == 4 and losses[2] == losses[None]
