"""`finetune sft` end to end on the tiny model: real TRL trainer, real files, real effects."""

import json
import math
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import interrupt_at, toy_rows, train, write_jsonl, write_recipe


def recipe(tmp_path: Path, tiny: Path, quant="none", **training):
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows(16))
    val = write_jsonl(tmp_path / "val.jsonl", toy_rows(4))
    tree = {
        "model": {"base": str(tiny), "quantization": quant, "dtype": "fp32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data), "validation": str(val), "max_length": 64},
        "training": {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "log_every": 2, "warmup_ratio": 0.0,
                     "scheduler": "constant", **training},
        "output": {"dir": str(tmp_path / "out")},
    }
    return write_recipe(tmp_path / "toy.yaml", tree)


def lora_tensors(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("quant", ["none", "4bit", "8bit"])
def test_sft_trains_adapter_and_leaves_base(cli, tmp_path, tiny, quant):
    base_before = load_file(str(tiny / "model.safetensors"))
    res = cli("sft", recipe(tmp_path, tiny, quant))
    assert res.code == 0, res.text
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "recipe.yaml", "manifest.json", "metrics.jsonl", "loss.png", "README.md"):
        assert (out / name).is_file(), name
    lora = lora_tensors(out)
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)  # B starts at zero: any non-zero value was learned
    assert load_file(str(tiny / "model.safetensors")).keys() == base_before.keys()
    assert all(torch.equal(load_file(str(tiny / "model.safetensors"))[k], v) for k, v in base_before.items())
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < losses[0] * 0.7, losses  # learnable toy task: loss falls
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == quant and manifest["seed"] == 42
    assert manifest["data"]["files"][0]["sha256"] and manifest["base"]["sha256"]
    assert manifest["speed"]["device"] == "cpu" and "eval_loss" in manifest["final_metrics"]
    assert (out / "eval.txt").is_file() and not (out / "samples.jsonl").exists()  # samples are off by default
    gen = json.loads((out / "generation_config.json").read_text())
    assert 3 in gen["eos_token_id"]  # <|im_end|>, the template's end of turn


def test_adapter_loads_in_plain_peft(cli, tmp_path, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert cli("sft", recipe(tmp_path, tiny, max_steps=4)).code == 0
    base = AutoModelForCausalLM.from_pretrained(tiny)
    ids = torch.tensor([[2, 10, 20, 30]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, tmp_path / "out")
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_completion_masks_reach_the_trainer(tmp_path, tiny):
    from finetune import recipe as recipes, sft

    built = sft.build(recipes.load(recipe(tmp_path, tiny)), tmp_path / "ck")
    batch = next(iter(built.trainer.get_train_dataloader()))
    trained = batch["labels"][batch["labels"] != -100]
    decoded = built.loaded.tokenizer.decode(trained)
    assert decoded == "my name is pico<|im_end|>" * 4  # exactly the assistant turns, nothing of the prompts


def test_overwrite_protection(cli, tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = cli("sft", recipe(tmp_path, tiny, max_steps=2))
    assert res.code == 2 and "--overwrite" in res.err
    assert (out / "keep.txt").read_text() == "precious"
    assert cli("sft", recipe(tmp_path, tiny, max_steps=2), "--overwrite").code == 0
    assert not (out / "keep.txt").exists()


def test_resume_equals_uninterrupted(cli, tmp_path, tiny, capsys):
    from finetune import recipe as recipes
    from finetune.cli import rerun_command

    straight = recipe(tmp_path, tiny, max_steps=6, save_every=3)
    assert cli("sft", straight, "--set", f"output.dir={tmp_path / 'a'}").code == 0
    # Ctrl-C at step 3, then the command the message gives to continue
    overrides = [f"output.dir={tmp_path / 'b'}"]
    with pytest.raises(SystemExit) as stopped:
        train(recipes.load(straight, overrides), "sft", [interrupt_at(2)], rerun=rerun_command("sft", straight, overrides, 1, None))
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-3" / "finetune-complete").is_file()
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
    hint = err.split("continue with: ")[1].split("\n")[0].strip()
    args = shlex.split(hint)
    assert args == ["finetune", "sft", str(straight), f"--set=output.dir={tmp_path / 'b'}", "--resume"], hint
    res = cli(*args[1:])
    assert res.code == 0, res.text
    a, b = lora_tensors(tmp_path / "a"), lora_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the resumed process ran steps 4-6: its examples/s counts those steps over its own training time
    summary = json.loads((tmp_path / "b" / "manifest.json").read_text())["summary"]
    assert summary["steps"] == 6 and summary["steps this run"] == 3
    assert summary["examples/s"] == pytest.approx(3 * 4 / summary["train time (s)"], rel=0.05)
    assert not (tmp_path / "b" / "checkpoints" / "README.md").exists()  # no generic card among the checkpoints


def test_resume_refuses_changed_recipe_and_skips_incomplete(cli, tmp_path, tiny):
    r = recipe(tmp_path, tiny, max_steps=4, save_every=2)
    assert cli("sft", r).code == 0
    res = cli("sft", r, "--resume", "--set", "training.learning_rate=0.001")
    assert res.code == 2 and "training.learning_rate: 0.01 -> 0.001" in res.err
    ck = tmp_path / "out" / "checkpoints"
    (ck / "checkpoint-4" / "finetune-complete").unlink()
    res = cli("sft", r, "--resume")
    assert res.code == 0, res.text
    assert "skipping incomplete checkpoint" in res.err


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, tiny):
    from transformers import TrainerCallback

    from finetune import recipe as recipes
    from finetune.errors import RunStopped

    class Poison(TrainerCallback):
        def on_step_begin(self, a, state, control, model=None, **k):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    with pytest.raises(RunStopped) as stopped:
        train(recipes.load(recipe(tmp_path, tiny, max_steps=6, save_every=2)), "sft", [Poison()])
    assert "not finite" in str(stopped.value) and "checkpoint-2" in str(stopped.value)
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-2" / "finetune-complete").is_file()
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_continue_from_adapter(cli, tmp_path, tiny):
    assert cli("sft", recipe(tmp_path, tiny, max_steps=3)).code == 0
    first = lora_tensors(tmp_path / "out")
    res = cli("sft", recipe(tmp_path, tiny, max_steps=3), "--set", f"model.adapter={tmp_path / 'out'}",
              "--set", f"output.dir={tmp_path / 'more'}")
    assert res.code == 0, res.text
    second = lora_tensors(tmp_path / "more")
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_packing_dora_rslora_and_tensorboard(cli, tmp_path, tiny):
    """Packed rows, DoRA with rank-stabilised scaling, and a TensorBoard log, in one short run."""
    import glob

    r = recipe(tmp_path, tiny, max_steps=4, report_to="tensorboard")
    res = cli("sft", r, "--set", "data.packing=true", "--set", "lora.use_dora=true", "--set", "lora.use_rslora=true")
    assert res.code == 0, res.text
    out = tmp_path / "out"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"]
    assert any("lora_magnitude_vector" in k for k in lora_tensors(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["speed"]["packing"] and not manifest["speed"]["padding_free"]
    assert glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)


def test_divergence_warning(tmp_path, capsys):
    from types import SimpleNamespace

    from finetune import training
    from finetune.recipe import Recipe

    r = Recipe.model_validate({"data": {"train": "x"}, "training": {"diverge_factor": 2.0}})
    cb = training.progress_callback(r, tmp_path, [], training.StopFlag(), None)
    st = SimpleNamespace(max_steps=10, global_step=0)
    cb.on_train_begin(None, st, None)
    for step, loss in enumerate([2.0, 1.0, 1.5, 2.5], 1):
        st.global_step = step
        cb.on_log(None, st, None, logs={"loss": loss})
    cb.on_train_end(None, st, None)
    err = capsys.readouterr().err
    assert "loss 2.500 is over 2.0x its lowest (1.000)" in err
    assert err.count("may be diverging") == 1


def test_redirected_output_gets_plain_progress_lines(cli, tmp_path, tiny):
    """With stderr not a terminal (CI, nohup, a notebook) a plain line appears every training.log_every steps."""
    res = cli("sft", recipe(tmp_path, tiny, max_steps=6, log_every=2))
    assert res.code == 0, res.text
    lines = [line for line in res.err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], res.err
    assert all(" loss " in line for line in lines)
    assert "\x1b[" not in res.err  # no terminal control codes in a log file
