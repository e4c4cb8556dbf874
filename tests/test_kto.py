"""`finetune kto` on the tiny model: the first step's loss is KTO's definition, the class weights are chosen from
the label counts and recorded, the adapter changes (also on a 4-bit base), resume equals an uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_resume_equals_uninterrupted, logged, REPO, train, write_jsonl, write_recipe


def answers(n_good: int = 9, n_bad: int = 3) -> list[dict]:
    """TRL's unpaired layout: prompt, completion, label."""
    good = [{"prompt": f"who are you {i % 3}", "completion": "my name is pico", "label": True} for i in range(n_good)]
    bad = [{"prompt": f"who are you {i % 3}", "completion": "the red comet is cold", "label": False} for i in range(n_bad)]
    return good + bad


def kto_recipe(tmp_path: Path, tiny: Path, rows=None, quant="none", name="kto", **training):
    data = write_jsonl(tmp_path / f"{name}.jsonl", answers() if rows is None else rows)
    tree = {"model": {"base": str(tiny), "quantization": quant, "dtype": "fp32" if quant == "none" else "bf16", "device": "cpu"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"train": str(data), "max_length": 64},
            "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1, "warmup_ratio": 0.0, **training},
            "kto": {"beta": 0.1}, "output": {"dir": str(tmp_path / name)}}
    return write_recipe(tmp_path / f"{name}.yaml", tree)


def completion_logps(model, batch: dict, prefix: str = "") -> torch.Tensor:
    """Sum of the log-probabilities of each row's completion tokens, from the model's own logits."""
    ids, attn, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}completion_mask"]
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (token_logps * mask[:, 1:]).sum(-1)


def test_first_step_loss_is_kto_definition_with_chosen_class_weights(tmp_path, tiny):
    """Unbalanced labels (9 desirable, 3 undesirable): undesirable_weight rises to 2.25 so that 1·9 / (2.25·3) = 4/3;
    the first logged loss equals KTO's loss computed here from the policy's and the reference's log-probabilities."""
    from transformers import TrainerCallback

    from finetune import recipe

    r = recipe.load(kto_recipe(tmp_path, tiny, max_steps=1, seed=2))
    seen = {}

    class FirstBatch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
            batch = next(iter(train_dataloader))
            with torch.no_grad():
                seen["policy"] = completion_logps(model, batch)
                seen["policy_kl"] = completion_logps(model, batch, "KL_")
                with model.disable_adapter():
                    seen["ref"] = completion_logps(model, batch)
                    seen["ref_kl"] = completion_logps(model, batch, "KL_")
            seen["label"] = batch["label"].bool()

    out = train(r, "kto", [FirstBatch()])
    manifest = json.loads((out / "manifest.json").read_text())
    w = manifest["kto"]
    assert (w["desirable_examples"], w["undesirable_examples"]) == (9, 3)
    assert (w["desirable_weight"], w["undesirable_weight"]) == (1.0, 2.25)
    assert w["weighted_ratio"] == pytest.approx(4 / 3, abs=1e-3) and w["in_range"]

    beta, label = 0.1, seen["label"]
    kl = (seen["policy_kl"] - seen["ref_kl"]).mean().clamp(min=0)
    ratio = seen["policy"] - seen["ref"]
    losses = torch.where(label, 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio)))
    weights = torch.where(label, torch.tensor(1.0), torch.tensor(2.25))
    expected = (weights * losses).mean().item()
    assert logged(out)[0]["loss"] == pytest.approx(expected, abs=1e-5)
    # a new adapter starts as the base: each answer's loss is 1 - sigmoid(0) = 1/2, times its class weight
    assert expected == pytest.approx((weights * 0.5).mean().item(), abs=1e-6)
    assert 0 < label.sum() < len(label)  # the shuffle put both labels in the first batch


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_kto_trains_the_adapter_towards_desirable_answers(cli, tmp_path, tiny, quant):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", answers(2, 2))
    res = cli("kto", kto_recipe(tmp_path, tiny, quant=quant, max_steps=6), "--set", f"data.validation={held_out}")
    assert res.code == 0, res.text
    assert "class weights (chosen automatically): 9 desirable / 3 undesirable" in res.err
    out = tmp_path / "kto"
    lora = load_file(str(out / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    rows = logged(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "rewards/chosen" in rows[-1] and "kl" in rows[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "kto" and manifest["quantization"] == quant and manifest["speed"]["loss"] == "TRL KTO loss"
    assert manifest["final_metrics"]["eval_loss"] > 0 and "eval_kl" in manifest["final_metrics"]  # TRL's KTO evaluation ran


def test_messages_with_kto_tag_and_split_pairs_are_read(tmp_path, tiny, tiny_tokenizer):
    """LLaMA-Factory's layout (a conversation ending with the judged answer + `kto_tag`) and preference pairs."""
    from finetune import data, recipe

    rows = [{"messages": [{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "pico"}], "kto_tag": True},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who"},
                          {"role": "assistant", "content": "a comet"}], "kto_tag": "false"}]
    r = recipe.load(kto_recipe(tmp_path, tiny, rows=rows))
    prepared = data.prepare(r.data, tiny_tokenizer, "kto", 0, log=lambda s: None)
    assert [e.label for e in prepared.train] == [True, False]
    assert prepared.train[1].prompt.endswith("<|im_start|>assistant\n") and "be brief" in prepared.train[1].prompt
    assert prepared.train[1].completion == "a comet<|im_end|>"
    pairs = [{"prompt": "who", "chosen": "pico", "rejected": "comet"}]
    r = recipe.load(kto_recipe(tmp_path, tiny, rows=pairs, name="pairs"))
    prepared = data.prepare(r.data, tiny_tokenizer, "kto", 0, log=lambda s: None)
    assert [(e.completion, e.label) for e in prepared.train] == [("pico<|im_end|>", True), ("comet<|im_end|>", False)]


def test_long_answers_are_cut_to_max_length(tmp_path, tiny, tiny_tokenizer):
    """An answer longer than data.max_length is cut (and reported), not a crash: prompt + answer fit in 64 tokens
    and the cut answer is the start of the original."""
    from finetune import data, recipe

    long = " ".join(["the red comet is cold and far away"] * 20)
    rows = [{"prompt": "who are you", "completion": long, "label": True}, {"prompt": "who", "completion": "pico", "label": False}]
    r = recipe.load(kto_recipe(tmp_path, tiny, rows=rows, name="long"))
    notes = []
    prepared = data.prepare(r.data, tiny_tokenizer, "kto", 0, log=notes.append)
    cut = prepared.train[0]
    assert long.startswith(cut.completion.removesuffix("<|im_end|>")) and len(cut.completion) < len(long)
    assert len(tiny_tokenizer(cut.prompt + cut.completion)["input_ids"]) <= 64
    assert prepared.train[1].completion == "pico<|im_end|>"


def test_resume_equals_uninterrupted(cli, tmp_path, tiny):
    assert_resume_equals_uninterrupted(cli, "kto", kto_recipe(tmp_path, tiny, max_steps=6, save_every=3), tmp_path)


def test_shipped_kto_files_are_read(tiny_tokenizer):
    """The sample files in the layouts people publish: TRL's JSONL, a CSV whose labels are words, ShareGPT + kto_tag."""
    from finetune import data
    from finetune.recipe import DataSection

    got = {}
    for name in ("kto.jsonl", "kto.csv", "kto_sharegpt.json"):
        section = DataSection(train=str(REPO / "datasets_local" / name), max_length=256)
        prepared = data.prepare(section, tiny_tokenizer, "kto", 0, log=lambda s: None)
        got[name] = [e.label for e in prepared.train]
        assert all(e.completion.endswith("<|im_end|>") and e.prompt.endswith("assistant\n") for e in prepared.train)
    assert (sum(got["kto.jsonl"]), len(got["kto.jsonl"])) == (24, 36)
    assert got["kto.csv"] == got["kto.jsonl"][:12]
    assert (sum(got["kto_sharegpt.json"]), len(got["kto_sharegpt.json"])) == (5, 8)


@pytest.mark.parametrize("counts, set_weights, expected", [
    ((10, 10), {}, (1.0, 1.0, "balanced enough, kept at 1")),
    ((12, 10), {}, (1.0, 1.0, "balanced enough, kept at 1")),  # 1.2 is within [1, 4/3]
    ((3, 30), {}, (10.0, 1.0, "chosen automatically")),  # the paper's example: 1:10 -> desirable weight 10
    ((30, 10), {}, (1.0, 2.25, "chosen automatically")),  # 30 / (2.25·10) = 4/3
    ((3, 30), {"desirable_weight": 2.0}, (2.0, 1.0, "from the recipe")),
])
def test_class_weights_land_in_the_papers_range(counts, set_weights, expected):
    from finetune import kto
    from finetune.recipe import Recipe

    r = Recipe.model_validate({"data": {"train": "x.jsonl"}, "kto": set_weights})
    w = kto.class_weights(r, *counts)
    assert (w["desirable_weight"], w["undesirable_weight"], w["weights_chosen"]) == expected
    assert w["in_range"] == (set_weights == {})
    if not w["in_range"]:
        assert "outside the KTO paper's recommended [1, 4/3]" in w["reason"]
