"""`finetune eval --tasks`: lm-evaluation-harness on the shipped task, checked against a direct computation."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import write_jsonl, write_recipe

pytest.importorskip("lm_eval", reason="the eval extra is not installed (pip install -e '.[eval]')")

TASK_DIR = Path(__file__).resolve().parents[1] / "finetune" / "tasks"


def docs() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "pico_sky.jsonl").read_text().splitlines()]


def direct_scores(folder: Path) -> tuple[float, float]:
    """acc and acc_norm by hand: sum of log-probs of each choice's tokens after the question, argmax vs gold
    (acc_norm divides by the choice's length in characters, as the harness documents)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hits = norm_hits = 0
    for d in docs():
        ctx = f"Question: {d['question']}\nAnswer:"
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        lls = []
        for choice in d["choices"]:
            whole = tok(ctx + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx_ids):]
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            lls.append(sum(logp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont)))
        hits += max(range(len(lls)), key=lls.__getitem__) == d["answer"]
        normed = [ll / len(c) for ll, c in zip(lls, d["choices"])]
        norm_hits += max(range(len(normed)), key=normed.__getitem__) == d["answer"]
    return hits / len(docs()), norm_hits / len(docs())


def bench(cli, *args) -> list[dict]:
    res = cli("eval", *args, "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    return json.loads(res.out)


def test_harness_accuracy_equals_direct_loglikelihood(cli, tiny):
    [r] = bench(cli, str(tiny), "--tasks", "pico_sky")
    scores = r["tasks"]["pico_sky"]
    assert scores["samples"] == len(docs()) == 20
    acc, acc_norm = direct_scores(tiny)
    assert scores["acc"] == pytest.approx(acc, abs=1e-9)
    assert scores["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)


def test_model_trained_on_the_pattern_beats_base_and_own_task_yaml_runs(cli, tmp_path, tiny):
    # a task YAML of the user's own, in another folder: its relative data file is read next to it
    own = tmp_path / "mytasks"
    own.mkdir()
    shutil.copy(TASK_DIR / "pico_sky.jsonl", own / "sky.jsonl")
    (own / "my_sky.yaml").write_text((TASK_DIR / "pico_sky.yaml").read_text().replace("task: pico_sky", "task: my_sky")
                                     .replace("test: pico_sky.jsonl", "test: sky.jsonl"))
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"Question: {d['question']}\nAnswer: {d['choices'][d['answer']]}"}
                                                   for d in docs()])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(train), "max_length": 64},
        "training": {"max_steps": 40, "batch_size": 4, "learning_rate": 2e-2, "warmup_ratio": 0.0, "scheduler": "constant", "log_every": 10},
        "output": {"dir": str(tmp_path / "ad")},
    })
    assert cli("sft", recipe).code == 0
    base, adapter = bench(cli, str(tiny), str(tmp_path / "ad"), "--tasks", str(own / "my_sky.yaml"))
    assert adapter["kind"] == "adapter"
    b, a = base["tasks"]["my_sky"], adapter["tasks"]["my_sky"]
    assert a["acc"] > b["acc"] + 0.3, (a, b)
    assert a["change"]["acc"] == pytest.approx(a["acc"] - b["acc"])


def test_bad_tasks_exit_2_naming_the_problem(cli, tiny, tmp_path):
    res = cli("eval", str(tiny), "--tasks", "pico_skye")
    assert res.code == 2 and "unknown task `pico_skye`" in res.text and "pico_sky" in res.text
    assert "Traceback" not in res.text
    res = cli("eval", str(tiny), "--tasks", "arc_easy")  # a stock task: its data is on the hub, unreachable here
    assert res.code == 2 and "arc_easy" in res.text and "hub" in res.text and "Traceback" not in res.text
    res = cli("eval", str(tiny), "--tasks", str(tmp_path / "missing.yaml"))
    assert res.code == 2 and "missing.yaml" in res.text
    res = cli("eval", str(tiny))
    assert res.code == 2 and "--data" in res.text and "--tasks" in res.text
    res = cli("eval", str(tiny), "--tasks", "pico_sky", "--data", "x.jsonl", "--json")
    assert res.code == 2 and "one JSON document" in res.text
