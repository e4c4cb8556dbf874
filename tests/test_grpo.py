"""`finetune grpo` on the tiny model: a rule reward rises over steps, samples are written, a python reward gets
the row's columns, a reward model from `finetune reward` scores the answers, a failing reward exits 2."""

import json
from pathlib import Path

from helpers import write_jsonl, write_recipe

PROMPTS = [{"prompt": f"who are you {i}", "answer": "pico"} for i in range(16)]


def grpo_recipe(tmp_path: Path, tiny: Path, rewards: list, name="grpo", quant="none", grpo=None, **training) -> Path:
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    tree = {"model": {"base": str(tiny), "quantization": quant, "dtype": "fp32" if quant == "none" else "bf16"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "data": {"train": str(data), "max_length": 64},
            "training": {"max_steps": 10, "batch_size": 8, "learning_rate": 5e-2, "log_every": 1, "warmup_ratio": 0.0, **training},
            "grpo": {"rewards": rewards, "num_generations": 4, "max_completion_length": 8, **(grpo or {})},
            "output": {"dir": str(tmp_path / name)}}
    return write_recipe(tmp_path / f"{name}.yaml", tree)


def logged(folder: Path) -> list[dict]:
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def test_grpo_raises_a_rule_reward_and_writes_samples(cli, tmp_path, tiny):
    # the untrained tiny model starts an answer with a lowercase letter about a quarter of the time
    res = cli("grpo", grpo_recipe(tmp_path, tiny, [{"type": "format", "pattern": "[a-z].*", "name": "lower"}]))
    assert res.code == 0, res.text
    out = tmp_path / "grpo"
    rows = logged(out)
    assert len(rows) == 10 and all("rewards/lower/mean" in r for r in rows)
    first, last = [r["reward"] for r in rows[:3]], [r["reward"] for r in rows[-3:]]
    assert sum(last) / 3 > sum(first) / 3 + 0.25, [r["reward"] for r in rows]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(1, 11))
    for s in samples:  # each sample's recorded reward is the rule applied to its text
        assert s["rewards"]["lower"] == float(s["completion"].strip()[:1].islower() and s["completion"].strip()[:1].isascii()
                                              and s["completion"].strip()[:1].isalpha())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "grpo" and (out / "adapter_model.safetensors").is_file()


def test_python_reward_gets_the_columns_and_a_failing_one_exits_2(cli, tmp_path, tiny):
    (tmp_path / "mine.py").write_text(
        "def score(prompts, completions, answer, **kw):\n"
        "    return [float(a == 'pico') + 0.5 for a in answer]\n"
        "def broken(prompts, completions, **kw):\n"
        "    raise KeyError('no such column')\n")
    reward = {"type": "python", "function": "mine.py:score", "name": "mine"}
    res = cli("grpo", grpo_recipe(tmp_path, tiny, [reward], grpo={"allow_python_rewards": True}, max_steps=1))
    assert res.code == 0, res.text
    assert all(r["rewards/mine/mean"] == 1.5 for r in logged(tmp_path / "grpo"))
    res = cli("grpo", grpo_recipe(tmp_path, tiny, [{**reward, "function": "mine.py:broken"}], name="bad",
                                  grpo={"allow_python_rewards": True}, max_steps=1))
    assert res.code == 2, res.text
    assert "mine.py:broken raised KeyError" in res.err and "Traceback" not in res.text


def test_grpo_with_a_reward_model_and_a_weighted_rule(cli, tmp_path, tiny):
    from test_reward import reward_recipe

    assert cli("reward", reward_recipe(tmp_path, tiny, max_steps=4)).code == 0
    rewards = [{"type": "model", "model": str(tmp_path / "rm"), "name": "rm"}, {"type": "length", "target": 20, "weight": 0.5}]
    res = cli("grpo", grpo_recipe(tmp_path, tiny, rewards, max_steps=2))
    assert res.code == 0, res.text
    rows = logged(tmp_path / "grpo")
    for r in rows:
        # TRL sums the weighted rewards per answer: the logged mean is the weighted sum of the means
        assert abs(r["reward"] - (r["rewards/rm/mean"] + 0.5 * r["rewards/length/mean"])) < 1e-4
    assert len({r["rewards/rm/mean"] for r in rows}) == 2  # scores of different answers, not a constant


def test_grpo_4bit_runs(cli, tmp_path, tiny):
    res = cli("grpo", grpo_recipe(tmp_path, tiny, [{"type": "length", "target": 20}], quant="4bit", max_steps=2))
    assert res.code == 0, res.text
    assert json.loads((tmp_path / "grpo" / "manifest.json").read_text())["quantization"] == "4bit"
    assert len(logged(tmp_path / "grpo")) == 2


def test_grpo_resume_equals_uninterrupted(cli, tmp_path, tiny):
    import pytest
    import torch
    from safetensors.torch import load_file

    from finetune import recipe as recipes
    from helpers import train
    from helpers import interrupt_at

    straight = grpo_recipe(tmp_path, tiny, [{"type": "length", "target": 20}], max_steps=4, save_every=2)
    assert cli("grpo", straight, "--set", f"output.dir={tmp_path / 'a'}").code == 0
    overrides = [f"output.dir={tmp_path / 'b'}"]
    with pytest.raises(SystemExit) as stopped:
        train(recipes.load(straight, overrides), "grpo", [interrupt_at(1)])
    assert stopped.value.code == 130
    res = cli("grpo", straight, "--set", overrides[0], "--resume")
    assert res.code == 0, res.text
    a, b = (load_file(str(tmp_path / x / "adapter_model.safetensors")) for x in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the same answers were sampled after the resume as in the straight run
    samples = [[json.loads(line) for line in (tmp_path / x / "samples.jsonl").read_text().splitlines()] for x in "ab"]
    assert [s for s in samples[0] if s["step"] > 2] == [s for s in samples[1] if s["step"] > 2]
