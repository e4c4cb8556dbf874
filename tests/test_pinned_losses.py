"""Per-step losses of a fixed-seed run on the tiny model, pinned: a refactor that changes what training
computes (data order, masks, LoRA initialisation, the loss itself) fails here loudly."""

import json
from pathlib import Path

import pytest

from helpers import toy_rows, write_jsonl, write_recipe

# recorded from the code before the workflow modules were restructured; change them only with a reason
SFT_LOSSES = [7.3664093017578125, 5.8793864250183105, 4.6859235763549805, 3.753671169281006, 2.954840660095215]
DPO_LOSSES = [0.6931471824645996, 0.40709787607192993, 0.2349821925163269, 0.1261395514011383, 0.06530985981225967]


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
