"""`finetune orpo` on the tiny model: the first step's loss is ORPO's definition (as TRL 1.16 computes it), the
adapter changes (also on a 4-bit base) towards the chosen answers, resume equals an uninterrupted run."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import assert_resume_equals_uninterrupted, logged, train, write_jsonl, write_recipe

PAIRS = [{"prompt": f"who are you {i % 4}", "chosen": "my name is pico", "rejected": "the red comet is cold"} for i in range(12)]


def orpo_recipe(tmp_path: Path, tiny: Path, rows=None, quant="none", name="orpo", **training):
    data = write_jsonl(tmp_path / f"{name}.jsonl", PAIRS if rows is None else rows)
    tree = {"model": {"base": str(tiny), "quantization": quant, "dtype": "fp32" if quant == "none" else "bf16", "device": "cpu"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"train": str(data), "max_length": 64},
            "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1, "warmup_ratio": 0.0, **training},
            "orpo": {"beta": 0.5}, "output": {"dir": str(tmp_path / name)}}
    return write_recipe(tmp_path / f"{name}.yaml", tree)


def test_first_step_loss_is_orpo_definition(tmp_path, tiny):
    """L = NLL(chosen) - λ·mean log σ(log odds(chosen) - log odds(rejected)), odds from each answer's mean token
    log-probability, computed here from the model's logits. TRL 1.16 takes the NLL over the chosen sequence's prompt
    and answer tokens (the paper: the answer); this pins what the toolkit trains."""
    from transformers import TrainerCallback

    from finetune import recipe

    rows = [{"prompt": f"question {w}", "chosen": f"answer is {w} star", "rejected": f"no {w}"} for w in ("red", "blue", "cold", "big")]
    r = recipe.load(orpo_recipe(tmp_path, tiny, rows=rows, max_steps=1))  # one batch holds all four pairs: order is moot
    seen = {}

    class FirstBatch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
            batch = next(iter(train_dataloader))
            with torch.no_grad():
                for side in ("chosen", "rejected"):
                    ids, attn, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
                    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
                    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
                    answer = labels[:, 1:] != -100
                    seen["real"] = seen.get("real", 0) + int(attn.sum())  # prompt + answer of both sides run through the model
                    seen["labelled"] = seen.get("labelled", 0) + int((labels != -100).sum())
                    seen[side] = (logps * answer).sum(-1) / answer.sum(-1)  # mean log-probability of the answer
                    if side == "chosen":
                        every = attn[:, 1:].bool()  # TRL: every real token of the chosen sequence
                        seen["nll"] = -(logps * every).sum() / every.sum()

    out = train(r, "orpo", [FirstBatch()])
    c, rj = seen["chosen"].double(), seen["rejected"].double()
    log_odds = (c - rj) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(rj)))
    expected = (seen["nll"] - 0.5 * F.logsigmoid(log_odds).mean()).item()
    first = logged(out)[0]
    assert first["loss"] == pytest.approx(expected, abs=1e-4)
    assert first["nll_loss"] == pytest.approx(seen["nll"].item(), abs=1e-4)
    assert first["log_odds_chosen"] == pytest.approx(log_odds.mean().item(), abs=1e-4)
    # TRL's ORPO logs no token count: the trainer counts this one batch's tokens, so the summary has tokens/s (was 0.0)
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["trained tokens"] == seen["labelled"] > 0
    assert summary["tokens/s"] == pytest.approx(seen["real"] / summary["train time (s)"], rel=0.05)


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_orpo_trains_the_adapter_towards_chosen(cli, tmp_path, tiny, quant):
    res = cli("orpo", orpo_recipe(tmp_path, tiny, quant=quant, max_steps=6), "--set", "data.validation=0.25")
    assert res.code == 0, res.text
    out = tmp_path / "orpo"
    lora = load_file(str(out / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    rows = logged(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["log_odds_chosen"] > rows[0]["log_odds_chosen"]  # the chosen answer gained on the rejected one
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "orpo" and manifest["quantization"] == quant and manifest["speed"]["loss"] == "TRL ORPO loss"
    final = manifest["final_metrics"]  # TRL's ORPO evaluation on the held-out quarter, with its NLL as a perplexity
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_nll_loss"]), rel=1e-6)


def test_orpo_adapter_loads_with_plain_peft(cli, tmp_path, tiny):
    """The published folder is a PEFT adapter plus tokenizer: transformers + PEFT load it without this toolkit."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    assert cli("orpo", orpo_recipe(tmp_path, tiny, max_steps=3)).code == 0
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "orpo"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "orpo"))
    ids = tok.apply_chat_template([{"role": "user", "content": "who are you 1"}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        adapted = model(**ids).logits
        with model.disable_adapter():
            base = model(**ids).logits
    assert not torch.allclose(adapted, base)


def test_resume_equals_uninterrupted(cli, tmp_path, tiny):
    assert_resume_equals_uninterrupted(cli, "orpo", orpo_recipe(tmp_path, tiny, max_steps=6, save_every=3), tmp_path)
