"""bench/: the bases built offline from real architectures' shapes, the FLOPs MFU is computed from, one step of
the SFT legs on such a base, and one step of every leg of the reward/GRPO/KTO/ORPO bench."""

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import bases  # noqa: E402


def test_flops_per_token_counts_every_matmul_weight(tiny):
    """Without attention (length 0) the forward is 2 FLOPs per weight of every linear layer, head included;
    LoRA training doubles it (input gradients), full training triples it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bases.flops_per_token(model.config, 0) == 2 * 2 * linear
    assert bases.flops_per_token(model.config, 0, lora=False) == 3 * 2 * linear
    c = model.config
    per_layer_attention = 2 * c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads) * 100
    assert bases.flops_per_token(c, 100) - bases.flops_per_token(c, 0) == 2 * c.num_hidden_layers * per_layer_attention


def test_spec_peak_by_device_name():
    assert bases.spec_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bases.spec_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bases.spec_peak_tflops("NVIDIA A10G") == 70.0
    assert bases.spec_peak_tflops("NVIDIA L40S") == 362.0
    assert bases.spec_peak_tflops("Some Future GPU") is None
    assert bases.spec_peak_tflops(None) is None


@pytest.mark.slow
def test_llama_1b_shape_builds_and_trains_one_step(tiny, tmp_path):
    """The Llama-3.2-1B shape (cut to 2 layers) builds offline with the given tokenizer, and one step of finetune's
    and tuned TRL's SFT legs runs on it with a finite loss."""
    from transformers import AutoConfig

    folder = bases.build("llama-3.2-1b", tmp_path / "bases", tiny, layers=2)
    cfg = AutoConfig.from_pretrained(folder)
    real = bases.CONFIGS["llama-3.2-1b"]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim"):
        assert getattr(cfg, key) == real[key], key
    assert cfg.num_hidden_layers == 2 and cfg.tie_word_embeddings
    assert (folder / "tokenizer.json").is_file()
    assert bases.build("llama-3.2-1b", tmp_path / "bases", tiny, layers=2) == folder  # built once
    rows = [{"prompt": f"Question {i}: what is the star?", "completion": "The star is bright and far away. " * (i + 1)} for i in range(4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for leg in ("sft-toolkit", "sft-tuned"):
        out = tmp_path / f"{leg}.json"
        done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "one", leg, "--out", str(out), "--data", str(data),
                               "--steps", "1", "--max-length", "128", "--model-path", str(folder), "--work", str(tmp_path / leg)],
                              env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
        res = json.loads(out.read_text())
        assert len(res["times"]) == 1 and res["real_tokens"] > 0
        assert 0 < res["losses"][0] < 20  # random weights over a 128k vocabulary: about ln(128256) = 11.8
        assert res["versions"]["transformers"]


def run_method_bench(tiny, work, *args) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "methods.py"), "--quick", "--model-path", str(tiny), "--work", str(work), *args],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((work / "report.json").read_text()), done.stdout


@pytest.mark.slow
def test_method_legs_train_a_step_each_on_the_tiny_model(tiny, tmp_path):
    """bench/methods.py --quick on the tiny model: for reward, GRPO and ORPO, finetune's leg and plain TRL's leg each
    train a step in their own process with a finite loss; the report has both sides' speed and memory and finetune's
    speed settings, the flipped leg reverses finetune's gradient-checkpointing choice, nothing goes to bench/results."""
    results = REPO / "bench" / "results"
    before = set(results.iterdir())
    report, out = run_method_bench(tiny, tmp_path, "--only", "reward,grpo,orpo", "--gc-leg", "reward")
    for method, loss in (("reward", "TRL REWARD loss"), ("grpo", "TRL GRPO loss"), ("orpo", "TRL ORPO loss")):
        r = report[method]
        for side in ("toolkit", "baseline"):
            assert r[side]["processes"] == 1 and r[side]["per_s"] > 0 and r[side]["peak_mb"] > 0, (method, side)
            assert math.isfinite(r[side]["final_loss"]), (method, side)
        assert r["speed_settings"]["loss"] == loss
        assert r["baseline"]["gradient_checkpointing"]  # TRL's default
        assert r["ratio_per_s"] == pytest.approx(r["toolkit"]["per_s"] / r["baseline"]["per_s"])
    assert report["grpo"]["toolkit"]["mean_reward"] >= 0 and report["grpo"]["baseline"]["mean_reward"] >= 0
    assert report["reward"]["flipped"]["gradient_checkpointing"] != report["reward"]["toolkit"]["gradient_checkpointing"]
    assert "| ORPO (4 pairs a step) | finetune |" in out  # the docs table is printed
    assert set(results.iterdir()) == before


@pytest.mark.slow
def test_kto_legs_train_a_step_on_the_tiny_model(tiny, tmp_path):
    report, _ = run_method_bench(tiny, tmp_path, "--only", "kto")
    for side in ("toolkit", "baseline"):
        assert report["kto"][side]["per_s"] > 0 and math.isfinite(report["kto"][side]["final_loss"])
