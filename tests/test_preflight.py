"""Preflight: the same mistakes are refused on all three ways of starting a run, before any base loads."""

import json

import pytest
import yaml

from helpers import toy_rows, write_jsonl, write_recipe


@pytest.fixture
def model_loads(monkeypatch):
    from finetune import models

    calls = []
    real = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def recipe(tmp_path, tiny, **training):
    tree = {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4},
            "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", toy_rows(8))), "max_length": 64},
            "training": {"max_steps": 2, "batch_size": 2, **training}, "output": {"dir": str(tmp_path / "out")}}
    return write_recipe(tmp_path / "r.yaml", tree)


def launch_paths(monkeypatch):
    """One process; a launch of two (refused before it starts any); a worker under `accelerate launch`."""
    yield "one process", []
    yield "--num-processes", ["--num-processes", "2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    yield "accelerate launch worker", []


@pytest.mark.parametrize("mistake, set_, expect", [
    ("missing data file", "data.train=nope.jsonl", "data file not found"),
    ("padding-free DPO", "training.padding_free=true", "training.padding_free: only supported by `finetune sft`"),
    ("adapter that is not one", "model.adapter=.", "is not an adapter folder"),
])
def test_refused_before_loading_on_every_launch_path(cli, tmp_path, tiny, monkeypatch, model_loads, mistake, set_, expect):
    path = recipe(tmp_path, tiny)
    method = "sft"
    if mistake == "padding-free DPO":
        method = "dpo"
        prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "who", "chosen": "pico", "rejected": "no"}] * 4)
        tree = yaml.safe_load(path.read_text())
        tree["data"]["train"], tree["dpo"] = str(prefs), {"beta": 0.1}
        path = write_recipe(tmp_path / "r.yaml", tree)
    for where, extra in launch_paths(monkeypatch):
        res = cli(method, path, "--set", set_, *extra)
        assert res.code == 2 and expect in res.err, (where, res.text)
        assert "launching" not in res.err, where
    assert model_loads == []
    assert not (tmp_path / "out").exists()


def test_resume_with_changed_recipe_is_refused_before_loading(cli, tmp_path, tiny, model_loads):
    path = recipe(tmp_path, tiny, save_every=1)
    assert cli("sft", path).code == 0
    model_loads.clear()
    res = cli("sft", path, "--resume", "--set", "training.learning_rate=0.001")
    assert res.code == 2 and "training.learning_rate: 0.0002 -> 0.001" in res.err, res.text
    res = cli("sft", path, "--resume", "--num-processes", "2")
    assert res.code == 2 and "processes: 1 -> 2" in res.err, res.text
    assert model_loads == []


def test_missing_shard_of_an_indexed_base(cli, tmp_path, tiny, model_loads):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    (base / "model.safetensors").rename(base / "model-00001-of-00002.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    res = cli("sft", recipe(tmp_path, tiny), "--set", f"model.base={base}")
    assert res.code == 2 and "model-00002-of-00002.safetensors is missing" in res.err, res.text
    assert model_loads == []


def test_flash_attention_where_it_cannot_run_says_all_that_is_missing():
    """On this CPU, in fp32, without flash-attn: one message naming each problem, the install line and sdpa."""
    import torch

    from finetune.errors import UserError
    from finetune.preflight import check_attention
    from finetune.recipe import ModelSection

    check_attention(ModelSection(attn_implementation="sdpa"), "cpu", torch.float32)  # nothing to check
    with pytest.raises(UserError) as err:
        check_attention(ModelSection(attn_implementation="flash_attention_2"), "cpu", torch.float32)
    msg = str(err.value)
    assert msg.startswith("model.attn_implementation: flash_attention_2 needs a CUDA GPU and this run is on cpu")
    for part in ("pip install flash-attn --no-build-isolation", "bf16 or fp16 only", "float32", "use `sdpa`"):
        assert part in msg
