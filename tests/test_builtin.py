"""Slow: the README's quickstart on the built-in SmolLM2-135M base, end to end on this CPU."""

import json

import pytest

from conftest import REPO


@pytest.mark.slow
def test_quickstart_teaches_the_builtin_base_a_name(cli, tmp_path, builtin_cache, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(builtin_cache))
    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository
    out = tmp_path / "quickstart"
    res = cli("sft", "recipes/quickstart.yaml", "--set", f"output.dir={out}")
    assert res.code == 0, res.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["spec"] == "smollm2-135m-instruct"
    assert manifest["summary"]["eval loss"] < 1.5
    res = cli("chat", str(out), "--prompt", "What is your name?", "--temperature", "0", "--json", "--max-new-tokens", "24")
    assert res.code == 0, res.text
    assert "Pico" in json.loads(res.out)["answer"]
    res = cli("chat", "smollm2-135m-instruct", "--prompt", "What is your name?", "--temperature", "0", "--json", "--max-new-tokens", "24")
    assert "Pico" not in json.loads(res.out)["answer"]
