"""Data-parallel training through Accelerate: two gloo processes on CPU against one process with the same
global batch, resume after kill -9 in two-process mode, and the checks that run inside launched workers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, write_jsonl, write_recipe

WORDS = "the star planet moon sun sky night light ring comet red blue".split()


def varied_rows(n: int = 32) -> list[dict]:
    """Conversations of different lengths, so the loss only matches if tokens are counted over all processes."""
    rng = random.Random(0)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"messages": [{"role": "user", "content": say(2, 12)}, {"role": "assistant", "content": say(1, 10)}]} for _ in range(n)]


def recipe(tmp: Path, tiny: Path, name: str, batch_size: int, **training) -> Path:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, varied_rows())
    tree = {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},  # dropout would draw different masks per process
            "data": {"train": str(data), "max_length": 64},
            "training": {"max_steps": 8, "batch_size": batch_size, "learning_rate": 1e-2, "log_every": 1, "warmup_ratio": 0.0,
                         "scheduler": "constant", "save_every": 4, **training},
            "output": {"dir": str(tmp / name)}}
    return write_recipe(tmp / f"{name}.yaml", tree)


def finetune(args: list, tmp: Path, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen([sys.executable, "-m", "finetune", *map(str, args)], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait:
        return proc
    out = proc.communicate(timeout=600)[0]
    return proc.returncode, out


def workers_of(recipe_path: Path) -> list[int]:
    """Processes whose command line names this recipe."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(recipe_path).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        # the same sums, added in another order: float32 rounding only
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny):
    """The reference: one process, 4 examples per step."""
    tmp = tmp_path_factory.mktemp("one")
    code, out = finetune(["sft", recipe(tmp, tiny, "one", batch_size=4)], tmp)
    assert code == 0, out
    return tmp / "one"


def test_two_processes_train_the_same_adapter_as_one(tmp_path, tiny, one_process):
    code, out = finetune(["sft", recipe(tmp_path, tiny, "two", batch_size=2), "--num-processes", "2"], tmp_path)
    assert code == 0, out
    two = tmp_path / "two"
    assert_same_adapter(one_process, two)
    b = load_file(str(two / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # it trained
    # process 0 alone reports and writes: one summary, one metrics row per logged step
    assert "launching 2 processes" in out and out.count("run summary") == 1, out
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 9)), steps
    ref = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    for r1, r2 in zip([r for r in ref if "loss" in r], [r for r in rows if "loss" in r]):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["distributed"]["kind"] == "ddp"
    assert manifest["summary"]["trained tokens"] == json.loads((one_process / "manifest.json").read_text())["summary"]["trained tokens"]
    # every checkpoint is complete: both processes' RNG states, then the marker
    for step in (4, 8):
        ckpt = two / "checkpoints" / f"checkpoint-{step}"
        assert {"adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "finetune-complete"} <= {
            p.name for p in ckpt.iterdir()}


def test_two_process_resume_after_kill_9(cli, tmp_path, tiny, one_process):
    path = recipe(tmp_path, tiny, "two", batch_size=2, max_steps=8, save_every=2)
    victim = finetune(["sft", path, "--num-processes", "2"], tmp_path, wait=False)
    marker = tmp_path / "two" / "checkpoints" / "checkpoint-2" / "finetune-complete"
    deadline = time.time() + 300
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher, with no chance to clean up
    victim.wait()
    # the workers (in sessions of their own, as torchrun starts them) must not train on as orphans
    deadline = time.time() + 30
    while workers_of(path) and time.time() < deadline:
        time.sleep(0.1)
    assert not workers_of(path), "workers outlived their launcher"
    assert not (tmp_path / "two" / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    # another process count would change the global batch: refused, naming it
    res = cli("sft", path, "--resume")
    assert res.code == 2 and "processes: 2 -> 1" in res.err, res.text
    code, out = finetune(["sft", path, "--resume", "--num-processes", "2"], tmp_path)
    assert code == 0, out
    assert_same_adapter(one_process, tmp_path / "two")


def test_worker_refuses_impossible_launch_before_loading(cli, tmp_path, tiny, monkeypatch):
    """Under `accelerate launch` the workers run the same checks as --num-processes, from the environment."""
    path = recipe(tmp_path, tiny, "w", batch_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    res = cli("sft", path, "--set", "model.quantization=4bit")
    assert res.code == 2 and "cannot be combined with fsdp" in res.err and "needs CUDA GPUs" in res.err, res.text
    assert not (tmp_path / "w").exists()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    res = cli("sft", path, "--num-processes", "2")
    assert res.code == 2 and "under `accelerate launch` leave them out" in res.err, res.text


def test_shipped_accelerate_configs_parse(tmp_path):
    """Every config in recipes/accelerate/ loads with Accelerate's own parser and maps to the intended launch."""
    from accelerate.commands.config.config_args import load_config_from_file

    from finetune import launch

    kinds = {}
    for f in sorted((REPO / "recipes" / "accelerate").glob("*.yaml")):
        cfg = load_config_from_file(str(f))
        assert cfg.compute_environment.value == "LOCAL_MACHINE" and cfg.mixed_precision == "no", f
        if cfg.num_machines == 1:
            kinds[f.stem] = launch.from_config(f, None).kind
    assert kinds == {"ddp": "ddp", "fsdp": "fsdp", "deepspeed-zero2": "deepspeed-2", "deepspeed-zero3": "deepspeed-3"}
    assert (REPO / "recipes" / "accelerate" / "README.md").is_file()


def test_dpo_two_processes_equal_one(tmp_path, tiny):
    rng = random.Random(1)
    say = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))  # noqa: E731
    write_jsonl(tmp_path / "pref.jsonl", [{"prompt": say(), "chosen": say(), "rejected": say() + " no"} for _ in range(16)])
    for name, batch, extra in (("d1", 4, []), ("d2", 2, ["--num-processes", "2"])):
        tree = {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "data": {"train": str(tmp_path / "pref.jsonl"), "max_length": 64}, "dpo": {"beta": 0.1},
                "training": {"max_steps": 4, "batch_size": batch, "learning_rate": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
                "output": {"dir": str(tmp_path / name)}}
        code, out = finetune(["dpo", write_recipe(tmp_path / f"{name}.yaml", tree), *extra], tmp_path)
        assert code == 0, out
    assert_same_adapter(tmp_path / "d1", tmp_path / "d2")


def test_accelerate_launch_module_entry(tmp_path, tiny, one_process):
    """Users who launch with accelerate themselves: `accelerate launch -m finetune sft RECIPE`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "finetune", "sft", str(recipe(tmp_path, tiny, "acc", batch_size=2))]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "acc" / "manifest.json").read_text())["processes"] == 2
    assert_same_adapter(one_process, tmp_path / "acc")
