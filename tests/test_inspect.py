"""`finetune inspect`: statistics, mask rendering and the memory estimate, without loading weights."""

import json

import pytest

from conftest import toy_rows, write_jsonl, write_recipe
from finetune import inspect as inspect_
from finetune.recipe import Recipe


def test_padding_shares():
    assert inspect_.padding_share([4, 4, 2, 2], 2) == 0.0
    assert inspect_.padding_share([4, 2], 2) == pytest.approx(0.25)
    assert inspect_.packed_padding_share([6, 4, 5, 5], 10) == 0.0
    assert inspect_.packed_padding_share([6, 6], 10) == pytest.approx(0.4)


def test_param_count_matches_a_real_model(tiny):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny)
    p = inspect_.count_params(cfg)
    real = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(tiny).parameters())
    assert p["linear"] + p["embedding"] + p["norms"] == real


def test_lora_parameter_estimate_matches_peft(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    r = Recipe.model_validate({"data": {"train": "x"}, "lora": {"r": 4}})
    assert inspect_.memory_estimate(r, model.config)["lora_parameters"] == trainable


def test_inspect_json_and_render(cli, tmp_path, tiny):
    data = write_jsonl(tmp_path / "t.jsonl", toy_rows(6))
    p = write_recipe(tmp_path / "r.yaml", {"model": {"base": str(tiny)}, "data": {"train": str(data), "max_length": 64},
                                           "training": {"batch_size": 2}})
    res = cli("inspect", p, "--json")
    assert res.code == 0, res.text
    stats = json.loads(res.out)
    assert stats["format"] == "messages" and stats["train_examples"] == 6
    assert stats["tokens"]["min"] <= stats["tokens"]["median"] <= stats["tokens"]["p95"] <= stats["tokens"]["max"]
    assert 0 < stats["trained_token_share"] < 1
    assert stats["memory_estimate_gib"]["total"] > 0
    res = cli("inspect", p, "-n", "1")
    assert res.code == 0
    assert "my name is pico<|im_end|>" in res.out and "memory estimate" in res.out


def test_inspect_bad_data_exit_2(cli, tmp_path, tiny):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"messages": [}\n')
    p = write_recipe(tmp_path / "r.yaml", {"model": {"base": str(tiny)}, "data": {"train": str(bad)}})
    res = cli("inspect", p)
    assert res.code == 2 and "line 1: invalid JSON" in res.err and "Traceback" not in res.text
