"""Test fixtures: a tiny Llama and a BPE tokenizer built offline, once per session. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import PICO, REPO, STAR, build_model, build_tokenizer, train_adapter  # plain helpers live in tests/helpers.py

# Tests are CPU tests: on a GPU machine every `device: auto` recipe would silently become an untested CUDA
# run with CPU-only expectations. GPU checks are marked `gpu` and run with FINETUNE_TEST_GPU=1.
if os.environ.get("FINETUNE_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """Folder with a tiny Llama (hidden 32, 2 layers) and its tokenizer; safetensors + chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(folder)
    build_model(folder, tok)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """One conversion of the built-in GGUF base, shared by the slow tests."""
    return tmp_path_factory.mktemp("finetune-cache")


@pytest.fixture(scope="session")
def quickstart_adapter(tmp_path_factory, builtin_cache) -> Path:
    """The README's quickstart trained once on the built-in base (its own process), shared by the slow tests."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("quickstart") / "adapter"
    env = {**os.environ, "FINETUNE_CACHE": str(builtin_cache)}
    done = subprocess.run([sys.executable, "-m", "finetune", "sft", "recipes/quickstart.yaml", "--set", f"output.dir={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="session")
def adapters(tiny, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("serve-adapters")
    return train_adapter(tmp / "pico", tiny, PICO, tmp), train_adapter(tmp / "star", tiny, STAR, tmp)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder with its own cache, so outputs never collide."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `finetune ARGS...` in-process (the heavy imports are shared) and return exit code and output."""
    from finetune import cli as cli_module

    def run(*args: str) -> Result:
        monkeypatch.setattr("sys.argv", ["finetune", *map(str, args)])
        # rich consoles are bound at import time; point them at the captured streams for this call
        monkeypatch.setenv("COLUMNS", "200")
        code = 0
        try:
            cli_module.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FINETUNE_TEST_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="GPU check: run with FINETUNE_TEST_GPU=1 on a machine with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
