"""Slow: the README's quickstart on the built-in SmolLM2-135M base, end to end on this CPU."""

import json

import pytest

from helpers import REPO


@pytest.mark.slow
def test_quickstart_teaches_the_builtin_base_a_name(cli, tmp_path, builtin_cache, quickstart_adapter, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(builtin_cache))
    out = quickstart_adapter
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["spec"] == "smollm2-135m-instruct"
    assert manifest["summary"]["eval loss"] < 1.5
    res = cli("chat", str(out), "--prompt", "What is your name?", "--temperature", "0", "--json", "--max-new-tokens", "24")
    assert res.code == 0, res.text
    assert "Pico" in json.loads(res.out)["answer"]
    res = cli("chat", "smollm2-135m-instruct", "--prompt", "What is your name?", "--temperature", "0", "--json", "--max-new-tokens", "24")
    assert "Pico" not in json.loads(res.out)["answer"]

    # the README's merge step on the real base: verified against base + adapter, and it answers as the adapter does
    merged = tmp_path / "merged"
    res = cli("merge", str(out), "--out", str(merged))
    assert res.code == 0, res.text
    check = json.loads((merged / "merge_report.json").read_text())["verification"]
    assert check["passed"] and not (merged / "VERIFICATION_FAILED").exists()
    res = cli("chat", str(merged), "--prompt", "What is your name?", "--temperature", "0", "--json", "--max-new-tokens", "24")
    assert res.code == 0 and "Pico" in json.loads(res.out)["answer"]


@pytest.mark.slow
def test_qlora_merge_verifies_on_the_builtin_base(cli, tmp_path, builtin_cache, monkeypatch):
    """A 4-bit-trained adapter on the real base merges onto the NF4 round trip and passes verification, in bf16 and fp32."""
    monkeypatch.setenv("FINETUNE_CACHE", str(builtin_cache))
    monkeypatch.chdir(REPO)
    out = tmp_path / "qlora"
    res = cli("sft", "recipes/quickstart.yaml", "--set", f"output.dir={out}", "--set", "model.quantization=4bit",
              "--set", "training.max_steps=3", "--set", "data.max_length=96", "--set", "data.validation=null")
    assert res.code == 0, res.text
    for dtype in ("bf16", "fp32"):
        res = cli("merge", str(out), "--out", str(tmp_path / dtype), "--dtype", dtype)
        assert res.code == 0, res.text
        report = json.loads((tmp_path / dtype / "merge_report.json").read_text())
        assert report["merged_onto"] == "nf4_round_trip" and report["verification"]["passed"]
