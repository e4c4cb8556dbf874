"""`finetune reward` on the tiny model: separable pairs are separated on held-out pairs, the folder loads as a plain
classifier, 4-bit runs, resume equals an uninterrupted run, a reward model scores files in `finetune eval`."""

import json
from pathlib import Path

import torch

from helpers import write_jsonl, write_recipe

# a separable preference: the chosen answer names the star, the rejected one talks about rock and ice
TOPICS = ["sun", "moon", "sky", "night", "light", "ring", "comet", "planet"]


def pairs(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        t = TOPICS[i % len(TOPICS)]
        rows.append({"prompt": f"what is the {t} {i % 5}", "chosen": f"the {t} is a big blue star",
                     "rejected": f"rock ice gas cold {t} no"})
    return rows


def reward_recipe(tmp_path: Path, tiny: Path, quant="none", name="rm", **training) -> Path:
    train_file = write_jsonl(tmp_path / "pairs.jsonl", pairs(24))
    held = write_jsonl(tmp_path / "held.jsonl", pairs(8, offset=100))
    tree = {"model": {"base": str(tiny), "quantization": quant, "dtype": "fp32" if quant == "none" else "bf16"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(train_file), "validation": str(held), "max_length": 64},
            "training": {"max_steps": 12, "batch_size": 4, "learning_rate": 2e-2, "log_every": 1, "warmup_ratio": 0.0, **training},
            "reward": {}, "output": {"dir": str(tmp_path / name)}}
    return write_recipe(tmp_path / f"{name}.yaml", tree)


def test_reward_model_separates_held_out_pairs_and_loads_without_toolkit(cli, tmp_path, tiny):
    res = cli("reward", reward_recipe(tmp_path, tiny))
    assert res.code == 0, res.text
    out = tmp_path / "rm"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "reward"
    final = manifest["final_metrics"]
    assert final["eval_accuracy"] >= 0.9 and final["eval_margin"] > 0.5, final
    assert "held-out pairs: accuracy" in res.err
    # a small loss is shown to significant digits, not rounded to 0.0
    assert manifest["summary"]["eval loss"] == float(f"{final['eval_loss']:.4g}") and manifest["summary"]["eval loss"] > 0

    # plain transformers + PEFT: the head was trained and saved with the adapter
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    card = (out / "README.md").read_text()  # the folder's own card says how to load it, and that is what runs here
    assert "AutoPeftModelForSequenceClassification.from_pretrained(" in card and "pad_token_id" in card
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(out), num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    model.config.pad_token_id = tok.pad_token_id

    def score(prompt, answer):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()

    held = pairs(8, offset=100)
    wins = sum(score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in held)
    assert wins >= 7


def test_reward_4bit_trains_adapter_and_head(cli, tmp_path, tiny):
    from safetensors.torch import load_file

    res = cli("reward", reward_recipe(tmp_path, tiny, quant="4bit", max_steps=3))
    assert res.code == 0, res.text
    out = tmp_path / "rm"
    assert json.loads((out / "manifest.json").read_text())["quantization"] == "4bit"
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert "base_model.model.score.weight" in saved  # the head is trained and saved with the adapter


def test_reward_resume_equals_uninterrupted(cli, tmp_path, tiny):
    import pytest
    from safetensors.torch import load_file

    from finetune import recipe as recipes
    from helpers import train
    from helpers import interrupt_at

    straight = reward_recipe(tmp_path, tiny, max_steps=6, save_every=3)
    assert cli("reward", straight, "--set", f"output.dir={tmp_path / 'a'}").code == 0
    overrides = [f"output.dir={tmp_path / 'b'}"]
    with pytest.raises(SystemExit) as stopped:
        train(recipes.load(straight, overrides), "reward", [interrupt_at(2)])
    assert stopped.value.code == 130
    res = cli("reward", straight, "--set", overrides[0], "--resume")
    assert res.code == 0, res.text
    a, b = (load_file(str(tmp_path / x / "adapter_model.safetensors")) for x in "ab")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_eval_reward_model_accuracy_on_pairs_and_scores_of_answers(cli, tmp_path, tiny):
    assert cli("reward", reward_recipe(tmp_path, tiny)).code == 0
    rm = tmp_path / "rm"
    held = tmp_path / "held.jsonl"
    res = cli("eval", rm, "--data", held, "--json")
    assert res.code == 0, res.text
    (result,) = json.loads(res.out)
    manifest = json.loads((rm / "manifest.json").read_text())["final_metrics"]
    # the same pairs, scored one by one, agree with the trainer's held-out evaluation
    assert result["accuracy"] == manifest["eval_accuracy"]
    # bf16 weights here, bf16 autocast in the trainer: the same margin to bf16's precision (8 bits: 0.4 %)
    assert abs(result["mean_margin"] - manifest["eval_margin"]) < 1e-2 * max(1, abs(manifest["eval_margin"]))
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"prompt": "what is the sun 1", "completion": "the sun is a big blue star"},
        {"prompt": "what is the sun 1", "completion": "rock ice gas cold sun no"}])
    res = cli("eval", rm, "--prompts", answers, "--out", tmp_path / "rep")
    assert res.code == 0, res.text
    good, bad = [json.loads(line)[str(rm)] for line in (tmp_path / "rep" / "scores.jsonl").read_text().splitlines()]
    assert good > bad
    res = cli("eval", rm, tiny, "--data", held)
    assert res.code == 2 and "not a reward model" in res.err
