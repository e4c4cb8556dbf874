"""`finetune merge`: merged logits equal base + adapter; NF4 round trip; shard by shard; atomic; refusals."""

import json
from pathlib import Path

import torch

from helpers import build_model, toy_rows, write_jsonl, write_recipe


def train_adapter(cli, tmp_path: Path, base: Path, quant="none", name="ad", steps=4) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    r = write_recipe(tmp_path / f"{name}.yaml", {
        "model": {"base": str(base), "quantization": quant, "dtype": "fp32" if quant == "none" else "bf16"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"train": str(data), "max_length": 64},
        "training": {"max_steps": steps, "batch_size": 4, "learning_rate": 2e-2}, "output": {"dir": str(tmp_path / name)}})
    res = cli("sft", r)
    assert res.code == 0, res.text
    return tmp_path / name


def logits(model, ids=(2, 10, 20, 30, 40, 50)):
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits.float()


def test_fp32_merge_equals_base_plus_adapter(cli, tmp_path, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = train_adapter(cli, tmp_path, tiny)
    res = cli("merge", ad, "--out", tmp_path / "merged", "--dtype", "fp32")
    assert res.code == 0, res.text
    out = tmp_path / "merged"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
                 "README.md", "merge_report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "merge_report.json").read_text())
    assert report["verification"]["passed"] and report["merged_onto"] == "original"
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no toolkit code
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), ad)
    assert (logits(merged) - logits(ref)).abs().max() < 1e-4
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3]


def test_shard_by_shard_equals_whole_model_merge(cli, tmp_path, tiny, monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(sharded, max_shard_size="30KB")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3
    ad = train_adapter(cli, tmp_path, sharded)
    from finetune import merge

    monkeypatch.setattr(merge, "MIN_PART_BYTES", 1)  # small output parts, like a large model's
    assert cli("merge", ad, "--out", tmp_path / "m", "--dtype", "fp32").code == 0
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    got = {}
    for name in sorted(set(index.values())):
        part = load_file(str(tmp_path / "m" / name))
        assert all(index[k] == name for k in part)
        got.update(part)
    assert len(set(index.values())) > len(shards)  # output parts are smaller than the input shards
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m") is not None
    whole = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sharded), ad).merge_and_unload().state_dict()
    assert got.keys() == whole.keys()
    for k in got:
        torch.testing.assert_close(got[k], whole[k], rtol=1e-5, atol=1e-6)


def test_qlora_adapter_merged_onto_nf4_round_trip(cli, tmp_path, tiny):
    """The round-trip merge reproduces the 4-bit-trained model more closely than a plain merge."""
    from transformers import AutoModelForCausalLM

    from finetune import models

    ad = train_adapter(cli, tmp_path, tiny, quant="4bit", steps=6)
    assert cli("merge", ad, "--out", tmp_path / "rt", "--dtype", "fp32").code == 0
    assert cli("merge", ad, "--out", tmp_path / "plain", "--dtype", "fp32", "--original-weights").code == 0
    assert json.loads((tmp_path / "rt" / "merge_report.json").read_text())["merged_onto"] == "nf4_round_trip"
    trained, _ = models.load_any(str(ad), log=lambda s: None)  # 4-bit base + adapter, as trained
    ref = logits(trained.model)
    rt = (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "rt")) - ref).abs().mean()
    plain = (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain")) - ref).abs().mean()
    assert rt < plain / 2, (rt, plain)


def test_interrupted_merge_leaves_nothing(cli, tmp_path, tiny, monkeypatch):
    from finetune import merge

    ad = train_adapter(cli, tmp_path, tiny)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "write_metadata", boom)
    res = cli("merge", ad, "--out", tmp_path / "m")
    assert res.code == 130, res.text
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.merging-*"))


def test_existing_out_kept_and_mismatched_base_refused(cli, tmp_path, tiny):
    from transformers import AutoTokenizer

    ad = train_adapter(cli, tmp_path, tiny)
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("x")
    res = cli("merge", ad, "--out", out)
    assert res.code == 2 and "--overwrite" in res.err and (out / "keep").is_file()
    other = tmp_path / "other"
    build_model(other, AutoTokenizer.from_pretrained(tiny), hidden=48)
    res = cli("merge", ad, "--out", tmp_path / "m2", "--base", other)
    assert res.code == 2, res.text
    assert str(ad) in res.err and str(other) in res.err and "does not fit" in res.err
    assert not (tmp_path / "m2").exists()
    res = cli("merge", tmp_path / "nothing", "--out", tmp_path / "m3")
    assert res.code == 2 and "not an adapter folder" in res.err


def test_bf16_merge_within_its_measured_rounding(cli, tmp_path, tiny):
    """The bf16 tolerance is derived from the model itself: the effect of rounding the base to bf16."""
    ad = train_adapter(cli, tmp_path, tiny)
    res = cli("merge", ad, "--out", tmp_path / "m", "--dtype", "bf16")
    assert res.code == 0, res.text
    check = json.loads((tmp_path / "m" / "merge_report.json").read_text())["verification"]
    rounding = check["rounding_to_output_dtype"]["mean_abs_logit_diff"]
    assert 0 < rounding and check["tolerance"]["mean_abs_logit_diff"] == 1.5 * rounding + 1e-3
    assert check["passed"] and check["mean_abs_logit_diff"] <= check["tolerance"]["mean_abs_logit_diff"]
    assert "fp32 compute" in check["reference"]


def test_wrong_merge_is_marked_and_warned_about(cli, tmp_path, tiny, monkeypatch):
    """A merge that does not reproduce base + adapter (here: the LoRA scale doubled) fails its check, says what to
    do next, is marked, and chat/eval warn before using it."""
    from finetune import merge

    ad = train_adapter(cli, tmp_path, tiny, steps=6)
    lora_deltas = merge.lora_deltas
    monkeypatch.setattr(merge, "lora_deltas", lambda a: (lambda p, c, s: (p, c, 2 * s))(*lora_deltas(a)))
    out = tmp_path / "bad"
    res = cli("merge", ad, "--out", out, "--dtype", "fp32")
    assert res.code == 1, res.text
    assert "VERIFICATION_FAILED" in res.err and "--base" in res.err and "--dtype fp32" in res.err
    assert "internal error" not in res.err and "Traceback" not in res.text
    assert (out / "VERIFICATION_FAILED").is_file() and not json.loads((out / "merge_report.json").read_text())["verification"]["passed"]
    readme = (out / "README.md").read_text()
    assert ".merging-" not in readme and 'from_pretrained("bad")' in readme and "verification failed" in readme
    monkeypatch.undo()
    res = cli("chat", out, "--prompt", "who are you 1", "--max-new-tokens", "4", "--temperature", "0")
    assert res.code == 0 and "failed its merge verification" in res.err
    data = write_jsonl(tmp_path / "val.jsonl", toy_rows(4))
    res = cli("eval", out, "--data", data)
    assert res.code == 0 and "failed its merge verification" in res.err
