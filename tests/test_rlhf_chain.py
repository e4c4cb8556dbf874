"""The shipped RLHF chain (recipes/rlhf: SFT -> reward model -> GRPO from the SFT adapter against it), run on the
tiny model with fewer steps, and on the built-in base as the recipes stand (slow)."""

import json
from pathlib import Path

import pytest

from helpers import REPO

CHAIN = [("sft", "1-sft.yaml", "adapters/rlhf-sft"), ("reward", "2-reward.yaml", "adapters/rlhf-reward"),
         ("grpo", "3-grpo.yaml", "adapters/rlhf-grpo")]


def run_chain(cli, tmp_path: Path, *extra: str) -> Path:
    import shutil

    shutil.copytree(REPO / "datasets_local", tmp_path / "datasets_local")  # the recipes name data relative to the root
    for method, recipe, out in CHAIN:
        res = cli(method, REPO / "recipes" / "rlhf" / recipe, *extra)
        assert res.code == 0, f"{method}: {res.text}"
        assert (tmp_path / out / "manifest.json").is_file()
    return tmp_path / "adapters" / "rlhf-grpo"


def rewards(folder: Path) -> list[float]:
    return [r["rewards/rm/mean"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "rewards/rm/mean" in r]


def test_rlhf_chain_on_the_tiny_model(cli, tmp_path, tiny):
    out = run_chain(cli, tmp_path, "--set", f"model.base={tiny}", "--set", "training.max_steps=2", "--set", "data.max_length=128")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "grpo" and manifest["adapter_start"] == "adapters/rlhf-sft"
    assert len(rewards(out)) == 2  # the reward model scored every step's answers
    reward_manifest = json.loads((tmp_path / "adapters" / "rlhf-reward" / "manifest.json").read_text())
    assert "eval_accuracy" in reward_manifest["final_metrics"]


@pytest.mark.slow
def test_rlhf_chain_on_the_builtin_base_raises_the_reward(cli, tmp_path):
    got = rewards(run_chain(cli, tmp_path))
    assert sum(got[-4:]) / 4 > sum(got[:4]) / 4, got
