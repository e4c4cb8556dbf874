"""Base resolution (alias, folder, .gguf, hub id) and the one loader in 4-bit, 8-bit and full precision."""

import os
from pathlib import Path

import pytest
import torch

from finetune import models
from finetune.errors import UserError
from finetune.recipe import ModelSection


def test_folder_resolution(tiny):
    base = models.resolve_base(str(tiny))
    assert base.kind == "folder" and base.path == str(tiny)


def test_unknown_base_lists_what_was_tried(tmp_path):
    with pytest.raises(UserError) as e:
        models.resolve_base("no-such-model")
    msg = str(e.value)
    assert "no-such-model" in msg and "built-in alias" in msg and "local folder" in msg and "hub id" in msg


def test_adapter_folder_is_not_a_base(tmp_path):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="adapter"):
        models.resolve_base(str(tmp_path / "ad"))


def test_missing_gguf(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        models.resolve_base(str(tmp_path / "x.gguf"))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(UserError) as e:
        models.load(ModelSection(base="someone/not-here", quantization="none"))
    assert "someone/not-here" in str(e.value)


@pytest.mark.parametrize("quant", ["none", "8bit", "4bit"])
def test_loader_quantizations_on_cpu(tiny, quant):
    import bitsandbytes as bnb

    loaded = models.load(ModelSection(base=str(tiny), quantization=quant, dtype="fp32"), log=lambda s: None)
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    if quant == "4bit":
        assert "Linear4bit" in kinds
        assert all(not m.support_avx512bf16_for_cpu for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit))
        q = next(m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight.quant_state
        assert q.quant_type == "nf4" and q.nested  # double quantization
    elif quant == "8bit":
        assert "Linear8bitLt" in kinds
    else:
        assert not kinds & {"Linear4bit", "Linear8bitLt"}
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert loaded.tokenizer.pad_token is not None


def test_auto_dtype_on_cpu(tiny):
    loaded = models.load(ModelSection(base=str(tiny), quantization="none"), log=lambda s: None)
    expected = torch.bfloat16 if models.cpu_supports_bf16() else torch.float32
    assert loaded.dtype == expected and loaded.model.dtype == expected


def test_device_errors():
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            models.pick_device("cuda")
    with pytest.raises(UserError, match="fp16"):
        models.pick_dtype("fp16", "cpu")


def test_models_command_lists_builtin(cli):
    res = cli("models")
    assert res.code == 0
    assert "smollm2-135m-instruct" in res.out


@pytest.mark.slow
def test_builtin_alias_and_gguf_path_resolve_offline(builtin_cache, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(builtin_cache))
    b = models.BUILTINS["smollm2-135m-instruct"]
    gguf = models.builtin_gguf(b)
    assert gguf is not None, "run scripts/setup.sh: it installs the built-in base package"
    base = models.resolve_base("smollm2-135m-instruct", log=lambda s: None)
    assert base.kind == "alias" and Path(base.path, "model.safetensors").is_file()
    assert str(builtin_cache) in base.path
    mtime = os.path.getmtime(Path(base.path, "config.json"))
    again = models.resolve_base(str(gguf), log=lambda s: None)  # the same file by path: no second conversion
    assert again.kind == "gguf" and again.path == base.path
    assert os.path.getmtime(Path(base.path, "config.json")) == mtime
    loaded = models.load(ModelSection(quantization="none"), log=lambda s: None)
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert loaded.tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("columns", ["80", "200"])
def test_models_command_never_cuts_paths(tmp_path, columns, monkeypatch):
    """Paths are printed whole at any terminal width (they were cut with '…' even at 200 columns)."""
    import subprocess
    import sys

    from helpers import REPO

    cache = tmp_path.joinpath(*["a-cache-folder-with-a-long-name"] * 7)  # longer than either width
    env = {**os.environ, "PYTHONPATH": str(REPO), "FINETUNE_CACHE": str(cache), "COLUMNS": columns}
    res = subprocess.run([sys.executable, "-m", "finetune", "models"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    b = models.BUILTINS["smollm2-135m-instruct"]
    assert b.alias in res.stdout and "…" not in res.stdout
    gguf = models.builtin_gguf(b)
    if gguf is None:
        assert b.pip in res.stdout
        return
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    assert str(gguf) in res.stdout
    assert str(models.gguf_cache_dir(gguf)) in res.stdout and len(str(models.gguf_cache_dir(gguf))) > int(columns)


def test_parameter_count_of_a_4bit_model_is_its_real_count(tiny):
    """Packed 4-bit weights report half their numel(); thresholds (gradient checkpointing at 1B) need the real count."""
    from finetune import models
    from finetune.recipe import ModelSection

    full = models.load(ModelSection(base=str(tiny), quantization="none", dtype="fp32"), log=lambda s: None).model
    q4 = models.load(ModelSection(base=str(tiny), quantization="4bit", dtype="fp32"), log=lambda s: None).model
    expected = sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for p in q4.parameters()) < expected  # what a plain count sees
    assert models.parameter_count(q4) == models.parameter_count(full) == expected
