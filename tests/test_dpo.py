"""`finetune dpo` on the tiny model: adapter changes, reward metrics, the reference is the starting policy."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import toy_rows, write_jsonl, write_recipe

PREFS = [{"prompt": f"who are you {i % 3}", "chosen": "my name is pico", "rejected": "the red comet is cold"} for i in range(12)]


def dpo_recipe(tmp_path: Path, tiny: Path, quant="none", adapter=None, name="dpo", **training):
    data = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    tree = {"model": {"base": str(tiny), "quantization": quant, "dtype": "fp32" if quant == "none" else "bf16", "adapter": adapter},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"train": str(data), "max_length": 64},
            "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1, "warmup_ratio": 0.0, **training},
            "dpo": {"beta": 0.1}, "output": {"dir": str(tmp_path / name)}}
    return write_recipe(tmp_path / f"{name}.yaml", tree)


def rows(folder: Path) -> list[dict]:
    """Logged training steps (not the end-of-run summary row)."""
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_dpo_from_base_changes_adapter_and_logs_rewards(cli, tmp_path, tiny, quant):
    res = cli("dpo", dpo_recipe(tmp_path, tiny, quant))
    assert res.code == 0, res.text
    out = tmp_path / "dpo"
    lora = load_file(str(out / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    logged = rows(out)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in logged[-1], key
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # a new adapter starts as the base
    assert logged[-1]["rewards/margins"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "dpo" and manifest["quantization"] == quant


def test_dpo_from_sft_adapter_uses_it_as_reference(cli, tmp_path, tiny):
    sft = write_recipe(tmp_path / "sft.yaml", {
        "model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", toy_rows(8))), "max_length": 64},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 2e-2}, "output": {"dir": str(tmp_path / "sft")}})
    assert cli("sft", sft).code == 0
    res = cli("dpo", dpo_recipe(tmp_path, tiny, adapter=str(tmp_path / "sft")))
    assert res.code == 0, res.text
    first = rows(tmp_path / "dpo")[0]
    # policy == reference at the first step: zero rewards, loss log 2. Against the raw base it would not be.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    out = tmp_path / "dpo"
    assert not (out / "ref").exists()  # only the trained adapter is published
    start, end = load_file(str(tmp_path / "sft" / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)


def test_dpo_with_sft_recipe_or_sft_data_is_refused(cli, tmp_path, tiny):
    sft = write_recipe(tmp_path / "s.yaml", {"model": {"base": str(tiny)}, "data": {"train": "x.jsonl"}})
    res = cli("dpo", sft)
    assert res.code == 2 and "finetune sft" in res.err
    res = cli("sft", dpo_recipe(tmp_path, tiny))
    assert res.code == 2 and "finetune dpo" in res.err
    chat = write_jsonl(tmp_path / "chat.jsonl", toy_rows(4))
    res = cli("dpo", dpo_recipe(tmp_path, tiny), "--set", f"data.train={chat}")
    assert res.code == 2 and "preference data" in res.err


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_non_finite_loss_stops_preference_training_before_the_step(tmp_path, tiny, method):
    """The preference trainers share training.guarded: a NaN in the weights stops the run with the checkpoint
    kept and nothing published, as for SFT."""
    from test_orpo import orpo_recipe
    from transformers import TrainerCallback

    from finetune import recipe as recipes
    from finetune.errors import RunStopped
    from helpers import train

    class Poison(TrainerCallback):
        def on_step_begin(self, a, state, control, model=None, **k):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    make = dpo_recipe if method == "dpo" else orpo_recipe
    r = make(tmp_path, tiny, max_steps=6, save_every=2)
    with pytest.raises(RunStopped) as stopped:
        train(recipes.load(r), method, [Poison()])
    assert "not finite" in str(stopped.value) and "checkpoint-2" in str(stopped.value)
    assert not (tmp_path / method / "adapter_model.safetensors").exists()
