"""Per-step losses of a fixed-seed run on the tiny model, pinned: a refactor that changes what training
computes (data order, masks, LoRA initialisation, the loss itself) fails here loudly."""

import json
from pathlib import Path

import pytest

from helpers import toy_rows, write_jsonl, write_recipe

# recorded from the code before the workflow modules were restructured; change them only with a reason
SFT_LOSSES = [7.3664093017578125, 5.8793864250183105, 4.6859235763549805, 3.753671169281006, 2.954840660095215]
DPO_LOSSES = [0.6931471824645996, 0.40709787607192993, 0.2349821925163269, 0.1261395514011383, 0.06530985981225967]
# recorded when `finetune reward` and `finetune grpo` were added
REWARD_LOSSES = [0.3216899633407593, 0.09612587094306946, 0.05479973554611206, 0.010804004967212677, 0.00883120484650135]
GRPO_REWARDS = [0.45624998211860657, 0.5062500238418579, 0.4375000298023224, 0.4625000059604645, 0.44999998807907104]


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def tree(tmp_path: Path, tiny: Path, train: Path, **extra) -> dict:
    return {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32", "device": "cpu"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train": str(train), "max_length": 64},
            "training": {"max_steps": 5, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1, "warmup_ratio": 0.0,
                         "scheduler": "constant", "seed": 7},
            "output": {"dir": str(tmp_path / "out")}, **extra}


def test_sft_losses_are_pinned(cli, tmp_path, tiny):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(16))
    res = cli("sft", write_recipe(tmp_path / "sft.yaml", tree(tmp_path, tiny, train)))
    assert res.code == 0, res.text
    got = losses(tmp_path / "out")
    assert got == pytest.approx(SFT_LOSSES, abs=1e-4)


def test_dpo_losses_are_pinned(cli, tmp_path, tiny):
    prefs = [{"prompt": f"who are you {i % 3}", "chosen": "my name is pico", "rejected": "the red comet is cold"} for i in range(12)]
    train = write_jsonl(tmp_path / "prefs.jsonl", prefs)
    res = cli("dpo", write_recipe(tmp_path / "dpo.yaml", tree(tmp_path, tiny, train, dpo={"beta": 0.1})),
              "--set", "training.learning_rate=0.002")  # a lower rate keeps the DPO losses away from 0
    assert res.code == 0, res.text
    got = losses(tmp_path / "out")
    assert got == pytest.approx(DPO_LOSSES, abs=1e-4)


def test_reward_losses_are_pinned(cli, tmp_path, tiny):
    prefs = [{"prompt": f"who are you {i % 3}", "chosen": "my name is pico", "rejected": "the red comet is cold"} for i in range(12)]
    train = write_jsonl(tmp_path / "prefs.jsonl", prefs)
    res = cli("reward", write_recipe(tmp_path / "rm.yaml", tree(tmp_path, tiny, train, reward={})), "--set", "training.learning_rate=0.002")
    assert res.code == 0, res.text
    assert losses(tmp_path / "out") == pytest.approx(REWARD_LOSSES, abs=1e-4)


def test_grpo_rewards_are_pinned(cli, tmp_path, tiny):
    """GRPO's loss is advantage-weighted and near 0 by construction; the sampled answers' mean reward per step
    pins sampling, scoring and the updates together."""
    train = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"who are you {i}"} for i in range(8)])
    grpo = {"rewards": [{"type": "length", "target": 20}], "num_generations": 4, "max_completion_length": 8}
    res = cli("grpo", write_recipe(tmp_path / "g.yaml", tree(tmp_path, tiny, train, grpo=grpo)), "--set", "training.batch_size=8")
    assert res.code == 0, res.text
    got = [r["reward"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert got == pytest.approx(GRPO_REWARDS, abs=1e-4)
