"""`finetune run PIPELINE.yaml` on the tiny model: hand-offs between stages, the skip / re-run / --from rules,
resuming a stopped stage, whole-pipeline validation and the lineage in the final manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import interrupt_at, REPO, toy_rows, write_jsonl, write_recipe

PREF = [{"prompt": f"who are you {i % 4}", "chosen": "my name is pico", "rejected": "i am a red star"} for i in range(8)]


def inline(tiny: Path, data: Path, **training) -> dict:
    return {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4, "alpha": 16, "dropout": 0.0},
            "data": {"train": str(data), "max_length": 64},
            "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1, **training}}


def write_pipeline(tmp: Path, tiny: Path, *, second_lr: float = 1e-2, steps: int = 3, save_every: int | None = None,
                   tail: bool = True) -> Path:
    chat = write_jsonl(tmp / "chat.jsonl", toy_rows(8))
    pref = write_jsonl(tmp / "pref.jsonl", PREF)
    second = inline(tiny, chat, max_steps=steps, learning_rate=second_lr, **({"save_every": save_every} if save_every else {}))
    stages = [{"name": "first", "method": "sft", "recipe": inline(tiny, chat)},
              {"name": "second", "method": "sft", "recipe": second}]
    if tail:
        dpo = inline(tiny, pref, learning_rate=1e-3)
        stages += [{"name": "prefs", "method": "dpo", "recipe": {**dpo, "dpo": {"beta": 0.1}}},
                   {"name": "merged", "step": "merge", "dtype": "fp32"},
                   {"name": "compare", "step": "eval", "data": str(chat), "max_length": 64}]
    return write_recipe(tmp / "p.yaml", {"name": "tinyline", "output": str(tmp / "runs"), "stages": stages})


def lora_of(folder: Path) -> dict:
    return {k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


def first_step_weights(into: dict):
    """The trainable LoRA weights of the policy as its first optimizer step begins."""
    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 0:
                into.update({n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters()
                             if "lora_" in n and ".default." in n})

    return Grab()


def statuses(lineage: dict) -> dict:
    return {r["stage"]: r["status"] for r in lineage["stages"]}


def test_handoffs_skip_rerun_and_lineage(tmp_path, tiny, cli):
    from finetune import stages

    path = write_pipeline(tmp_path, tiny)
    runs = tmp_path / "runs"
    grabbed = {"second": {}, "prefs": {}}
    lineage = stages.run(path, callbacks={k: [first_step_weights(v)] for k, v in grabbed.items()})
    assert statuses(lineage) == dict.fromkeys(["first", "second", "prefs", "merged", "compare"], "ran")

    # hand-offs: each training stage's first step starts from the previous stage's final adapter
    for stage, previous in (("second", "01-first"), ("prefs", "02-second")):
        saved = {k.replace("base_model.model.", ""): v for k, v in lora_of(runs / previous).items()}
        got = {k.replace("base_model.model.", ""): v for k, v in grabbed[stage].items()}
        assert saved.keys() == got.keys() and saved
        for k in saved:
            torch.testing.assert_close(got[k], saved[k], rtol=0, atol=0)
    assert json.loads((runs / "03-prefs" / "manifest.json").read_text())["adapter_start"] == str(runs / "02-second")
    # the merge folded the DPO adapter into the base; eval measured the base and every stage's model
    assert json.loads((runs / "04-merged" / "merge_report.json").read_text())["adapter"] == str(runs / "03-prefs")
    ppl = lineage["stages"][4]["metrics"]["perplexity"]
    assert list(ppl) == [str(tiny), *(str(runs / f) for f in ("01-first", "02-second", "03-prefs", "04-merged"))]
    assert ppl[str(runs / "01-first")] < ppl[str(tiny)]  # training on this very data lowered its perplexity

    # lineage: in the final model folder's manifest, with recipes, data hashes, metrics and output hashes
    final = json.loads((runs / "04-merged" / "manifest.json").read_text())["pipeline"]
    assert final == json.loads((runs / "pipeline.json").read_text())
    first = final["stages"][0]
    assert first["recipe"]["training"]["max_steps"] == 3 and first["recipe"]["output"]["dir"] == str(runs / "01-first")
    chat_sha = hashlib.sha256((tmp_path / "chat.jsonl").read_bytes()).hexdigest()
    assert first["data"] == [{"path": str(tmp_path / "chat.jsonl"), "sha256": chat_sha}]
    assert first["metrics"]["summary"]["steps"] == 3
    assert first["output"]["sha256"] == hashlib.sha256(b"adapter_model.safetensors" + (runs / "01-first" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert final["stages"][3]["metrics"]["passed"] is True and final["stages"][3]["settings"] == {"dtype": "fp32"}
    res = cli("info", runs / "04-merged")
    assert res.code == 0, res.text
    assert "pipeline tinyline" in res.out and "prefs" in res.out and first["output"]["sha256"][:12] in res.out
    res = cli("info", runs, "--json")
    assert res.code == 0 and json.loads(res.out)["lineage"]["stages"][2]["stage"] == "prefs"

    # a second invocation skips every stage and touches no output
    stamp = (runs / "02-second" / "adapter_model.safetensors").stat().st_mtime_ns
    again = stages.run(path)
    assert set(statuses(again).values()) == {"skipped"}
    assert (runs / "02-second" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert [r["output"] for r in again["stages"]] == [r["output"] for r in lineage["stages"]]

    # a changed middle stage runs again with everything after it; the stage before it is skipped
    write_pipeline(tmp_path, tiny, second_lr=5e-3)
    changed = stages.run(path)
    assert statuses(changed) == {"first": "skipped", "second": "ran", "prefs": "ran", "merged": "ran", "compare": "ran"}
    assert changed["stages"][1]["output"]["sha256"] != lineage["stages"][1]["output"]["sha256"]
    assert changed["stages"][0]["output"] == lineage["stages"][0]["output"]

    # --from forces a stage that did not change
    forced = cli("run", path, "--from", "merged")
    assert forced.code == 0, forced.text
    assert statuses(json.loads((runs / "pipeline.json").read_text())) == {
        "first": "skipped", "second": "skipped", "prefs": "skipped", "merged": "ran", "compare": "ran"}


def test_stopped_stage_resumes_from_its_checkpoint(tmp_path, tiny, capsys):
    from finetune import stages

    path = write_pipeline(tmp_path, tiny, steps=6, save_every=2, tail=False)
    with pytest.raises(SystemExit) as stopped:
        stages.run(path, callbacks={"second": [interrupt_at(3)]})
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert f"continue with: finetune run {path}" in err
    runs = tmp_path / "runs"
    assert (runs / "02-second" / "checkpoints" / "checkpoint-4" / "finetune-complete").is_file()
    assert not (runs / "02-second" / "adapter_model.safetensors").exists()
    lineage = stages.run(path)
    assert statuses(lineage) == {"first": "skipped", "second": "resumed"}
    summary = lineage["stages"][1]["metrics"]["summary"]
    assert summary["steps"] == 6 and summary["steps this run"] == 2


def test_whole_pipeline_is_validated_before_any_stage(tmp_path, tiny, cli):
    chat = write_jsonl(tmp_path / "chat.jsonl", toy_rows(8))
    good = inline(tiny, chat)
    path = write_recipe(tmp_path / "bad.yaml", {"output": str(tmp_path / "runs"), "stages": [
        {"name": "merge-first", "step": "merge"},
        {"name": "typo", "method": "sft", "recipe": {**good, "training": {"max_stepz": 3}}},
        {"name": "wrong-format", "method": "dpo", "recipe": {**good, "dpo": {"beta": 0.1}}},
        {"name": "no-file", "method": "sft", "recipe": str(tmp_path / "missing.yaml")},
        {"name": "ok", "method": "sft", "recipe": good},
        {"name": "measure", "step": "eval", "data": str(tmp_path / "held-out.jsonl")},
    ]})
    res = cli("run", path)
    assert res.code == 2, res.text
    assert "6 problem(s), so no stage has run" in res.err or "5 problem(s), so no stage has run" in res.err, res.err
    for expected in ("stage 1 `merge-first` (merge): a merge step folds an adapter", "training.max_stepz: unknown key — did you mean `max_steps`?",
                     "stage 3 `wrong-format` (dpo)", "missing.yaml: recipe file not found", "held-out.jsonl not found"):
        assert expected in res.err, res.err
    assert "Traceback" not in res.text and not (tmp_path / "runs").exists()
    # the pipeline file itself: unknown keys with a suggestion, a stage that is neither a method nor a step
    path = write_recipe(tmp_path / "bad2.yaml", {"stagez": [], "stages": [{"name": "x", "method": "ppo", "recipe": "r.yaml"},
                                                                         {"name": "x", "step": "export", "data": "d"}]})
    res = cli("run", path)
    assert res.code == 2, res.text
    for expected in ("stagez: unknown key — did you mean `stages`?", "method: 'ppo' is not a training method — use one of sft, dpo",
                     "data is not a key of an export step"):
        assert expected in res.err, res.err
    twice = write_recipe(tmp_path / "bad3.yaml", {"stages": [{"name": "x", "step": "merge"}, {"name": "x", "step": "merge"}]})
    assert "stages: the name(s) x are used twice" in cli("run", twice).err
    res = cli("run", write_pipeline(tmp_path, tiny, tail=False), "--from", "nope")
    assert res.code == 2 and "--from nope: no stage has that name — the stages are first, second" in res.err


def test_shipped_pipelines_validate():
    from finetune import pipeline

    for path in sorted((REPO / "recipes" / "pipelines").glob("*.yaml")):
        spec = pipeline.load(path)
        assert spec.stages and all(s.method in (None, *pipeline.METHODS) for s in spec.stages)


@pytest.mark.slow
def test_shipped_pipeline_end_to_end(tmp_path, builtin_cache):
    """recipes/pipelines/pico.yaml on the built-in base: every stage runs, a second invocation skips them all,
    a changed middle stage runs again with what follows, and the lineage is in the final manifest."""
    import subprocess
    import sys

    import yaml

    spec = yaml.safe_load((REPO / "recipes" / "pipelines" / "pico.yaml").read_text())
    spec["output"] = str(tmp_path / "runs")
    path = write_recipe(tmp_path / "pico.yaml", spec)
    env = {**os.environ, "FINETUNE_CACHE": str(builtin_cache), "PYTHONPATH": str(REPO)}

    def run() -> dict:
        done = subprocess.run([sys.executable, "-m", "finetune", "run", str(path)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=3600)
        assert done.returncode == 0, done.stdout + done.stderr
        return statuses(json.loads((tmp_path / "runs" / "pipeline.json").read_text()))

    names = [s["name"] for s in spec["stages"]]
    assert run() == dict.fromkeys(names, "ran")
    assert run() == dict.fromkeys(names, "skipped")
    spec["stages"][2]["set"].append("training.learning_rate=2.0e-5")
    write_recipe(path, spec)
    assert run() == {**dict.fromkeys(names[:2], "skipped"), **dict.fromkeys(names[2:], "ran")}
    lineage = json.loads((tmp_path / "runs" / "04-merged" / "manifest.json").read_text())["pipeline"]
    assert [r["stage"] for r in lineage["stages"]] == names
    assert lineage["stages"][2]["recipe"]["training"]["learning_rate"] == 2.0e-5
    assert all(r["output"]["sha256"] for r in lineage["stages"])
    assert lineage["stages"][4]["metrics"]["files"][0]["verified"] is True
