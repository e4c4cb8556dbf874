"""Plain helpers for tests: the tiny model and tokenizer builders, recipe and data writers. Fixtures that use
them live in conftest.py."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ChatML with generation tags around what the assistant says, so transformers can mark assistant tokens
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("the a star planet moon sun sky night light ring comet red blue cold hot big small name is my "
         "you are who what pico hello yes no how many eight one two three four five six seven rock ice gas").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() + ["user assistant system\n"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, tokenizer, hidden: int = 32, seed: int = 0):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         initializer_range=0.3)  # large enough that a frozen random head can express a peaked answer
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(folder)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(path: Path, tree: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def toy_rows(n: int = 16) -> list[dict]:
    """A learnable task: the answer repeats a fixed phrase."""
    return [{"messages": [{"role": "user", "content": f"who are you {i % 4}"},
                          {"role": "assistant", "content": "my name is pico"}]} for i in range(n)]


def interrupt_at(step: int):
    """A real SIGINT (what Ctrl-C sends), delivered at the start of a step."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_begin(self, a, state, control, **k):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGINT)

    return Interrupt()


def train(recipe, method: str = "sft", callbacks=(), *, resume: bool = False, overwrite: bool = False, rerun: str | None = None):
    """What `finetune sft|dpo` does in one process, with extra TrainerCallbacks: preflight, then the method's run."""
    import importlib

    from finetune import launch, preflight

    plan = preflight.preflight(recipe, method, launch.from_config(None, None), resume=resume, overwrite=overwrite, rerun=rerun)
    return importlib.import_module(f"finetune.{method}").run(recipe, plan, callbacks)


# ---- two tiny adapters with different answers, for serving and chat tests ----

PICO = "my name is pico"
STAR = "i am a red star"


def train_adapter(folder: Path, tiny: Path, answer: str, tmp: Path) -> Path:
    """A tiny LoRA that learned to give `answer` to "who are you N" (trained in-process, a few seconds)."""
    from finetune import recipe

    rows = [{"messages": [{"role": "user", "content": f"who are you {i % 4}"}, {"role": "assistant", "content": answer}]}
            for i in range(8)]
    r = write_recipe(tmp / f"{folder.name}.yaml", {
        "model": {"base": str(tiny), "quantization": "none"}, "lora": {"r": 4, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp / f"{folder.name}.jsonl", rows)), "max_length": 64},
        "training": {"max_steps": 20, "batch_size": 4, "learning_rate": 3e-2}, "output": {"dir": str(folder)}})
    train(recipe.load(r), "sft")
    return folder


def logged(folder: Path) -> list[dict]:
    """The training log rows (those with a loss) of a run folder's metrics.jsonl."""
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_resume_equals_uninterrupted(cli, method: str, straight: Path, tmp_path: Path) -> None:
    """`straight` (6 steps, a checkpoint every 3) run uninterrupted into a/, and into b/ stopped by Ctrl-C during
    step 3 then `--resume`d: the same adapter and the same logged losses."""
    import math

    import pytest
    import torch
    from safetensors.torch import load_file

    from finetune import recipe as recipes

    assert cli(method, straight, "--set", f"output.dir={tmp_path / 'a'}").code == 0
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C during step 3: saved after it
        train(recipes.load(straight, [f"output.dir={tmp_path / 'b'}"]), method, [interrupt_at(2)])
    assert stopped.value.code == 130
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-3" / "finetune-complete").is_file()
    res = cli(method, straight, "--set", f"output.dir={tmp_path / 'b'}", "--resume")
    assert res.code == 0, res.text
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    losses = {d: [r["loss"] for r in logged(tmp_path / d)] for d in ("a", "b")}
    assert losses["a"] == pytest.approx(losses["b"], abs=1e-5)
    assert not math.isnan(losses["b"][-1])
