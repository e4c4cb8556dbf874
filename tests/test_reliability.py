"""Bad input across all commands: exit code 2, one message naming the key / file / line / value and the fix,
no traceback, nothing half-written, nothing existing touched. Also kill -9 + --resume and a full disk.

`python tests/test_reliability.py` rewrites the table in docs/reliability.md from CASES; a test keeps it in sync.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import REPO, toy_rows, train, write_jsonl, write_recipe  # noqa: E402

PREF = {"prompt": "who", "chosen": "pico", "rejected": "no"}
ACCEL = REPO / "recipes" / "accelerate"


@dataclass
class Case:
    id: str
    what: str  # the mistake, for the docs
    expect: str  # a piece of the message
    args: Callable[[Path, Path], list]  # (tmp, tiny) -> command line


def good(tmp: Path, tiny: Path, **sections) -> dict:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, toy_rows(8))
    tree = {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4},
            "data": {"train": str(data), "max_length": 64}, "training": {"max_steps": 2, "batch_size": 2},
            "output": {"dir": str(tmp / "out")}}
    for k, v in sections.items():
        if v is None:
            tree.pop(k, None)
        elif isinstance(v, dict) and isinstance(tree.get(k), dict):
            tree[k] = {**tree[k], **v}
        else:
            tree[k] = v
    return tree


def recipe(tmp: Path, tiny: Path, **sections) -> Path:
    return write_recipe(tmp / "r.yaml", good(tmp, tiny, **sections))


def text(tmp: Path, name: str, content: str) -> Path:
    (tmp / name).write_text(content)
    return tmp / name


def sft_with_data(name: str, content: str, **data):
    return lambda t, m: ["sft", recipe(t, m, data={"train": str(text(t, name, content)), **data})]


def adapter(tmp: Path, tiny: Path) -> Path:
    """A finished adapter folder for the merge / eval / chat cases (trained once per test)."""
    from finetune.recipe import load

    train(load(recipe(tmp, tiny, output={"dir": str(tmp / "ad")})), "sft")
    return tmp / "ad"


def other_base(tmp: Path, tiny: Path) -> Path:
    from transformers import AutoTokenizer

    from helpers import build_model

    build_model(tmp / "other", AutoTokenizer.from_pretrained(tiny), hidden=48)
    return tmp / "other"


def pickle_base(t: Path, m: Path) -> Path:
    """A base folder whose weights are a pickle file."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = t / "pickled"
    shutil.copytree(m, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def truncated_base(t: Path, m: Path) -> Path:
    """A base folder whose weights file was cut short, as an interrupted download leaves it."""
    import shutil

    folder = t / "truncated"
    shutil.copytree(m, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def orphan_adapter(t: Path) -> Path:
    """An adapter folder whose base folder no longer exists."""
    (t / "ad").mkdir()
    (t / "ad" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(t / "gone")}))
    return t / "ad"


def resumed_with_change(t, m):
    from finetune.recipe import load

    train(load(recipe(t, m, training={"save_every": 1})), "sft")
    return ["sft", t / "r.yaml", "--resume", "--set", "lora.r=8"]


def nonempty_out(t, m):
    (t / "out").mkdir()
    (t / "out" / "precious.txt").write_text("keep me")
    return ["sft", recipe(t, m)]


def pipeline(t: Path, m: Path, *stages, **top) -> Path:
    """A pipeline file whose training stages use the good recipe inline."""
    return write_recipe(t / "p.yaml", {"output": str(t / "runs"), **top, "stages": [
        {"name": name, **({"method": "sft", "recipe": good(t, m)} if kind == "sft" else kind)} for name, kind in stages]})


def foreign_runs(t, m):
    (t / "runs").mkdir()
    (t / "runs" / "precious.txt").write_text("keep me")
    return ["run", pipeline(t, m, ("a", "sft"))]


KTO_GOOD = {"prompt": "who are you", "completion": "pico", "label": True}
KTO_BAD = {"prompt": "who are you", "completion": "a comet", "label": False}


def kto_case(t: Path, m: Path, rows: list[dict], **sections) -> list:
    return ["kto", recipe(t, m, kto={"beta": 0.1}, **{**sections, "data": {"train": str(write_jsonl(t / "kto.jsonl", rows)), **sections.get("data", {})}})]


GOOD_ROW = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"

CASES = [
    # recipes
    Case("recipe-missing", "recipe file does not exist", "recipe file not found", lambda t, m: ["sft", t / "nope.yaml"]),
    Case("recipe-yaml", "recipe is not valid YAML", "r.yaml line 3: not valid YAML", lambda t, m: ["sft", text(t, "r.yaml", "data:\n  train: [a\n")]),
    Case("recipe-list", "recipe is a list, not a mapping", "a recipe is a mapping", lambda t, m: ["sft", text(t, "r.yaml", "- a\n- b\n")]),
    Case("unknown-section", "misspelt section", "trainin: unknown key — did you mean `training`?",
         lambda t, m: ["sft", recipe(t, m, trainin={"max_steps": 1})]),
    Case("unknown-key", "misspelt key", "training.learning_rat: unknown key — did you mean `learning_rate`?",
         lambda t, m: ["sft", recipe(t, m, training={"learning_rat": 1e-4})]),
    Case("wrong-type", "a string where a number belongs", "training.learning_rate:",
         lambda t, m: ["sft", recipe(t, m, training={"learning_rate": "fast"})]),
    Case("out-of-range", "LoRA rank 0", "lora.r:", lambda t, m: ["sft", recipe(t, m, lora={"r": 0})]),
    Case("negative-batch", "negative batch size", "training.batch_size:", lambda t, m: ["sft", recipe(t, m, training={"batch_size": -2})]),
    Case("bad-choice", "quantization that does not exist", "model.quantization: '3bit' is not allowed",
         lambda t, m: ["sft", recipe(t, m, model={"quantization": "3bit"})]),
    Case("validation-fraction", "validation fraction above 0.5", "data.validation", lambda t, m: ["sft", recipe(t, m, data={"validation": 0.9})]),
    Case("no-data-section", "recipe without data", "data: required", lambda t, m: ["sft", recipe(t, m, data=None)]),
    Case("set-syntax", "--set without =", "expected KEY=VALUE", lambda t, m: ["sft", recipe(t, m), "--set", "training.max_steps"]),
    Case("set-unknown", "--set of an unknown key", "training.max_step: unknown key", lambda t, m: ["sft", recipe(t, m), "--set", "training.max_step=3"]),
    Case("set-type", "--set with a wrong type", "training.max_steps:", lambda t, m: ["sft", recipe(t, m), "--set", "training.max_steps=abc"]),
    Case("dpo-recipe-to-sft", "a DPO recipe given to sft", "run `finetune dpo", lambda t, m: ["sft", recipe(t, m, dpo={"beta": 0.1})]),
    Case("sft-recipe-to-dpo", "an SFT recipe given to dpo", "run `finetune sft", lambda t, m: ["dpo", recipe(t, m)]),
    Case("packing-and-padding-free", "packing together with padding_free", "cannot both be on",
         lambda t, m: ["sft", recipe(t, m, data={"packing": True}, training={"padding_free": True})]),
    Case("padding-free-dpo", "padding_free for DPO", "training.padding_free: only supported by `finetune sft`",
         lambda t, m: ["dpo", recipe(t, m, data={"train": str(write_jsonl(t / "p.jsonl", [PREF] * 4))}, training={"padding_free": True},
                                    dpo={"beta": 0.1})]),
    Case("fp16-on-cpu", "fp16 training on a CPU", "model.dtype: fp16 is not supported", lambda t, m: ["sft", recipe(t, m, model={"dtype": "fp16"})]),
    Case("cuda-missing", "device cuda without a GPU", "no CUDA GPU", lambda t, m: ["sft", recipe(t, m, model={"device": "cuda"})]),
    # data
    Case("data-missing", "training file does not exist", "data file not found", lambda t, m: ["sft", recipe(t, m, data={"train": str(t / "no.jsonl")})]),
    Case("data-extension", "unsupported file type", "unsupported file type", sft_with_data("d.xml", "<a/>")),
    Case("data-empty", "empty data file", "file is empty", sft_with_data("d.jsonl", "")),
    Case("data-bad-json", "invalid JSON on line 3", "d.jsonl line 3: invalid JSON", sft_with_data("d.jsonl", GOOD_ROW * 2 + "{oops\n")),
    Case("data-not-object", "a JSON line that is not an object", "d.jsonl line 2: expected one JSON object per line", sft_with_data("d.jsonl", GOOD_ROW + "[1, 2]\n")),
    Case("data-unknown-role", "unknown role", "line 1: turn 1 has unknown role 'wizard'",
         sft_with_data("d.jsonl", json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n")),
    Case("data-non-string", "non-string content", "turn 2 content must be a string",
         sft_with_data("d.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ["y"]}]}) + "\n")),
    Case("data-no-assistant", "conversation without an assistant turn", "line 2: conversation has no assistant turn",
         sft_with_data("d.jsonl", GOOD_ROW + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")),
    Case("data-unknown-fields", "fields of no known format", "map yours with data.columns", sft_with_data("d.jsonl", json.dumps({"q": "a", "r": "b"}) + "\n")),
    Case("data-chosen-equals-rejected", "preference row with chosen identical to rejected", "line 2: chosen is identical to rejected",
         lambda t, m: ["dpo", recipe(t, m, dpo={"beta": 0.1}, data={"train": str(text(t, "p.jsonl", json.dumps(PREF) + "\n" +
                                                                               json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n"))})]),
    Case("data-preference-to-sft", "preference data given to sft", "train it with `finetune dpo`", sft_with_data("d.jsonl", json.dumps(PREF) + "\n")),
    Case("data-chat-to-dpo", "chat data given to dpo", "DPO needs preference data",
         lambda t, m: ["dpo", recipe(t, m, dpo={"beta": 0.1}, data={"train": str(text(t, "d.jsonl", GOOD_ROW))})]),
    Case("data-empty-folder", "a folder with no data files", "folder holds no data files",
         lambda t, m: (t / "empty").mkdir() or ["sft", recipe(t, m, data={"train": str(t / "empty")})]),
    Case("data-all-dropped", "every row longer than max_length with truncation: drop", "no usable training examples",
         lambda t, m: ["sft", recipe(t, m, data={"max_length": 8, "truncation": "drop"})]),
    Case("data-json-two-lists", "a JSON object holding two lists", "exactly one list",
         sft_with_data("d.json", json.dumps({"a": [{"text": "x"}], "b": [{"text": "y"}]}))),
    Case("data-glob-none", "a glob that matches no data files", "the pattern matches no data files",
         lambda t, m: ["sft", recipe(t, m, data={"train": str(t / "nothing-*.jsonl")})]),
    Case("data-hub-unreachable", "a hub dataset that cannot be loaded (no network, wrong name or split)", "could not be loaded",
         lambda t, m: ["sft", recipe(t, m, data={"train": "nobody/no-such-set@test"})]),
    Case("data-train-and-mix", "both data.train and data.mix", "give either `train`",
         lambda t, m: ["sft", recipe(t, m, data={"mix": [{"source": str(t / "train.jsonl"), "weight": 1}]})]),
    Case("data-mix-bad-file", "a data.mix source with invalid JSON on line 2", "m.jsonl line 2: invalid JSON",
         lambda t, m: ["sft", recipe(t, m, data={"train": None, "mix": [{"source": str(t / "train.jsonl"), "weight": 1},
                                                                        {"source": str(text(t, "m.jsonl", GOOD_ROW + "{oops\n")), "weight": 1}]})]),
    # KTO and ORPO
    Case("kto-label-missing", "KTO row without a label", "kto.jsonl line 2: `label` is missing", lambda t, m: kto_case(t, m, [KTO_GOOD, {"prompt": "a", "completion": "b"}])),
    Case("kto-label-not-boolean", "KTO label that is not true/false", "kto.jsonl line 1: `label` is 'maybe', not true/false",
         lambda t, m: kto_case(t, m, [{**KTO_GOOD, "label": "maybe"}, KTO_BAD])),
    Case("kto-one-label", "KTO data whose rows are all desirable", "all 2 training rows are desirable (label true)",
         lambda t, m: kto_case(t, m, [KTO_GOOD, KTO_GOOD])),
    Case("kto-last-turn-user", "KTO conversation that does not end with the judged answer", "line 1: the last turn of `messages` is 'user'",
         lambda t, m: kto_case(t, m, [{"messages": [{"role": "user", "content": "hi"}], "label": True}, KTO_BAD])),
    Case("kto-batch-one", "KTO with batch size 1 (no KL estimate)", "training.batch_size: KTO estimates its KL term",
         lambda t, m: kto_case(t, m, [KTO_GOOD, KTO_BAD], training={"batch_size": 1})),
    Case("kto-format", "a data.format KTO does not read", "data.format: alpaca is not read by KTO",
         lambda t, m: kto_case(t, m, [KTO_GOOD, KTO_BAD], data={"format": "alpaca"})),
    Case("kto-recipe-to-sft", "a KTO recipe given to sft", "run `finetune kto", lambda t, m: ["sft", recipe(t, m, kto={"beta": 0.1})]),
    Case("sft-recipe-to-orpo", "an SFT recipe given to orpo", "add `orpo: {beta: 0.1}`", lambda t, m: ["orpo", recipe(t, m)]),
    Case("two-method-sections", "a recipe with both dpo: and orpo:", "a recipe has one method section",
         lambda t, m: ["orpo", recipe(t, m, dpo={"beta": 0.1}, orpo={"beta": 0.1})]),
    Case("data-chat-to-orpo", "chat data given to orpo", "ORPO needs preference data",
         lambda t, m: ["orpo", recipe(t, m, orpo={"beta": 0.1}, data={"train": str(text(t, "d.jsonl", GOOD_ROW))})]),
    Case("padding-free-orpo", "padding_free for ORPO", "only supported by `finetune sft` — set it to auto or false for ORPO",
         lambda t, m: ["orpo", recipe(t, m, orpo={"beta": 0.1}, training={"padding_free": True})]),
    Case("unpaired-to-sft", "data.format: unpaired given to sft", "is read by `finetune kto` only",
         lambda t, m: ["sft", recipe(t, m, data={"format": "unpaired"})]),
    # models and outputs
    Case("base-missing", "base model that does not exist", "base model `no-such-model` not found", lambda t, m: ["sft", recipe(t, m, model={"base": "no-such-model"})]),
    Case("base-pickle", "base whose weights are pickle files", "has no safetensors weights",
         lambda t, m: ["sft", recipe(t, m, model={"base": str(pickle_base(t, m))})]),
    Case("base-truncated", "base whose weights file is truncated (an interrupted download)", "model.safetensors is truncated",
         lambda t, m: ["sft", recipe(t, m, model={"base": str(truncated_base(t, m))})]),
    Case("adapter-not-adapter", "model.adapter that is not an adapter folder", "model.adapter:",
         lambda t, m: (t / "notad").mkdir() or ["sft", recipe(t, m, model={"adapter": str(t / "notad")})]),
    Case("target-modules", "LoRA target modules the model does not have", "lora.target_modules:",
         lambda t, m: ["sft", recipe(t, m, lora={"target_modules": ["nope_proj"]})]),
    Case("output-not-empty", "non-empty output folder without --overwrite", "pass --overwrite", nonempty_out),
    Case("output-is-file", "output.dir is a file", "exists and is a file",
         lambda t, m: ["sft", recipe(t, m, output={"dir": str(text(t, "f", "x"))})]),
    Case("output-not-writable", "output folder on a read-only location", "is not writable",
         lambda t, m: ["sft", recipe(t, m, output={"dir": "/proc/finetune-out"})]),
    Case("resume-nothing", "--resume with no checkpoint", "no complete checkpoint", lambda t, m: ["sft", recipe(t, m), "--resume"]),
    Case("resume-changed", "--resume after the recipe changed", "lora.r: 4 -> 8", resumed_with_change),
    # multi-process launches (refused before any process starts)
    Case("launch-processes-zero", "--num-processes 0", "Invalid value for '--num-processes'", lambda t, m: ["sft", recipe(t, m), "--num-processes", "0"]),
    Case("launch-qlora-fsdp", "4-bit weights with an FSDP config", "model.quantization: 4bit cannot be combined with fsdp",
         lambda t, m: ["sft", recipe(t, m, model={"quantization": "4bit"}), "--accelerate-config", ACCEL / "fsdp.yaml"]),
    Case("launch-qlora-zero3", "4-bit weights with DeepSpeed ZeRO-3", "model.quantization: 4bit cannot be combined with deepspeed-3",
         lambda t, m: ["dpo", recipe(t, m, model={"quantization": "4bit"}, dpo={"beta": 0.1}, data={"train": str(write_jsonl(t / "p.jsonl", [PREF] * 4))}),
                       "--accelerate-config", ACCEL / "deepspeed-zero3.yaml"]),
    Case("launch-sharded-on-cpu", "FSDP on a machine without CUDA GPUs", "needs CUDA GPUs and this run is on cpu",
         lambda t, m: ["sft", recipe(t, m), "--accelerate-config", ACCEL / "fsdp.yaml"]),
    Case("launch-deepspeed-missing", "a DeepSpeed config without DeepSpeed installed", "pip install deepspeed",
         lambda t, m: ["sft", recipe(t, m), "--accelerate-config", ACCEL / "deepspeed-zero2.yaml", "--num-processes", "2"]),
    Case("launch-config-missing", "--accelerate-config that does not exist", "--accelerate-config:",
         lambda t, m: ["sft", recipe(t, m), "--accelerate-config", t / "nope.yaml"]),
    Case("launch-config-foreign", "--accelerate-config that is not an Accelerate config", "has no `distributed_type`",
         lambda t, m: ["sft", recipe(t, m), "--accelerate-config", text(t, "a.yaml", "learning_rate: 3\n")]),
    Case("launch-multi-node", "a multi-machine config given to --accelerate-config", "spans 2 machines",
         lambda t, m: ["sft", recipe(t, m), "--accelerate-config", ACCEL / "multi-node.yaml"]),
    Case("launch-cuda-processes", "--num-processes on a recipe asking for a GPU that is not there", "no CUDA GPU",
         lambda t, m: ["sft", recipe(t, m, model={"device": "cuda"}), "--num-processes", "2"]),
    # eval
    Case("eval-data-missing", "eval with a missing data file", "data file not found", lambda t, m: ["eval", m, "--data", t / "none.txt"]),
    Case("eval-empty-text", "eval on an empty text", "empty", lambda t, m: ["eval", m, "--data", text(t, "e.txt", "")]),
    Case("eval-model-missing", "eval of a model that does not exist", "not found", lambda t, m: ["eval", t / "nomodel", "--data", text(t, "x.txt", "a b c")]),
    Case("eval-adapter-base-missing", "eval of an adapter whose base is gone", "its base cannot be loaded",
         lambda t, m: ["eval", orphan_adapter(t), "--data", text(t, "x.txt", "a b c")]),
    Case("eval-max-length", "eval window of 1 token", "Invalid value for '--max-length'", lambda t, m: ["eval", m, "--data", text(t, "x.txt", "a b"), "--max-length", "1"]),
    Case("eval-gguf-sampled-task", "a task that samples its answers, asked of a GGUF file", "a GGUF file",
         lambda t, m: ["eval", m, text(t, "m.gguf", "not read: refused before loading"), "--tasks", sampled_task(t)]),
    # merge
    Case("merge-not-adapter", "merge of a folder that is not an adapter", "not an adapter folder", lambda t, m: ["merge", t, "--out", t / "merged"]),
    Case("merge-out-exists", "merge into an existing folder without --overwrite", "already exists",
         lambda t, m: (t / "merged").mkdir() or ["merge", adapter(t, m), "--out", t / "merged"]),
    Case("merge-wrong-base", "merge onto a base of another shape", "does not fit base", lambda t, m: ["merge", adapter(t, m), "--out", t / "merged", "--base", other_base(t, m)]),
    Case("merge-base-missing", "merge whose base cannot be found", "its base cannot be found",
         lambda t, m: ["merge", adapter(t, m), "--out", t / "merged", "--base", str(t / "gone")]),
    Case("merge-dtype", "merge to an unknown dtype", "'int3' is not one of 'bf16', 'fp16', 'fp32'", lambda t, m: ["merge", adapter(t, m), "--out", t / "merged", "--dtype", "int3"]),
    # chat
    Case("chat-model-missing", "chat with a model that does not exist", "not found", lambda t, m: ["chat", t / "ghost", "--prompt", "hi"]),
    Case("chat-max-new-tokens", "chat with --max-new-tokens 0", "Invalid value for '--max-new-tokens'", lambda t, m: ["chat", m, "--prompt", "hi", "--max-new-tokens", "0"]),
    Case("chat-compare-base", "--compare without an adapter", "--compare needs an adapter", lambda t, m: ["chat", m, "--prompt", "hi", "--compare"]),
    Case("chat-quantization", "chat with an unknown quantization", "'2bit' is not one of '4bit', '8bit', 'none'", lambda t, m: ["chat", m, "--prompt", "hi", "--quantization", "2bit"]),
    # the GPU path, refused before loading on any machine
    Case("flash-attn-missing", "flash_attention_2 asked for without flash-attn (and on a CPU)", "pip install flash-attn --no-build-isolation",
         lambda t, m: ["sft", recipe(t, m, model={"attn_implementation": "flash_attention_2"})]),
    # training samples
    Case("sample-every-no-validation", "training.sample_every without validation data", "training.sample_every: answers validation prompts",
         lambda t, m: ["sft", recipe(t, m, training={"sample_every": 5})]),
    # pipelines (finetune run): the whole file is checked before any stage runs
    Case("pipeline-missing", "pipeline file does not exist", "pipeline file not found", lambda t, m: ["run", t / "nope.yaml"]),
    Case("pipeline-stage-kind", "a stage with neither a method nor a step", "give either method: (sft, dpo",
         lambda t, m: ["run", pipeline(t, m, ("a", "sft"), ("b", {"recipe": "r.yaml"}))]),
    Case("pipeline-unknown-method", "a stage with a method that does not exist", "method: 'ppo' is not a training method",
         lambda t, m: ["run", pipeline(t, m, ("a", {"method": "ppo", "recipe": "r.yaml"}))]),
    Case("pipeline-merge-first", "a merge step before any training stage", "a merge step folds an adapter into its base",
         lambda t, m: ["run", pipeline(t, m, ("m", {"step": "merge"}), ("a", "sft"))]),
    Case("pipeline-stage-recipe", "a misspelt key in a stage's recipe", "training.learning_rat: unknown key",
         lambda t, m: ["run", pipeline(t, m, ("a", "sft"), ("b", {"method": "sft", "recipe": str(recipe(t, m)), "set": ["training.learning_rat=1"]}))]),
    Case("pipeline-step-key", "a key of another step (quant on a merge)", "quant is not a key of a merge step",
         lambda t, m: ["run", pipeline(t, m, ("a", "sft"), ("m", {"step": "merge", "quant": ["q8_0"]}))]),
    Case("pipeline-foreign-output", "an output folder that no pipeline wrote", "a non-empty folder that no pipeline wrote", foreign_runs),
    Case("pipeline-from-unknown", "--from a stage that does not exist", "--from nope: no stage has that name",
         lambda t, m: ["run", pipeline(t, m, ("a", "sft")), "--from", "nope"]),
    # reward and grpo
    Case("reward-recipe-to-sft", "a reward recipe given to sft", "run `finetune reward", lambda t, m: ["sft", recipe(t, m, reward={})]),
    Case("reward-chat-data", "chat data given to reward", "a reward model learns from preference data",
         lambda t, m: ["reward", recipe(t, m, reward={})]),
    Case("grpo-no-prompt", "GRPO data without a prompt", "no prompt in this row",
         lambda t, m: ["grpo", recipe(t, m, grpo=grpo_section(), data={"train": str(text(t, "d.jsonl", '{"text": "a b c"}\n'))})]),
    Case("grpo-groups", "a batch that does not hold whole groups of generations", "multiple of grpo.num_generations",
         lambda t, m: ["grpo", prompts_recipe(t, m, grpo=grpo_section(num_generations=3))]),
    Case("grpo-reward-needs-key", "an equals reward without its column", "reward needs `column`",
         lambda t, m: ["grpo", prompts_recipe(t, m, grpo=grpo_section(rewards=[{"type": "equals"}]))]),
    Case("grpo-column-missing", "a reward on a column the data lacks", "`solution` is not a column of the data",
         lambda t, m: ["grpo", prompts_recipe(t, m, grpo=grpo_section(rewards=[{"type": "equals", "column": "solution"}]))]),
    Case("grpo-bad-regex", "a format reward whose pattern is not a regular expression", "is not a valid regular expression",
         lambda t, m: ["grpo", prompts_recipe(t, m, grpo=grpo_section(rewards=[{"type": "format", "pattern": "(["}]))]),
    Case("grpo-python-not-allowed", "a python reward without the opt-in key", "grpo.allow_python_rewards",
         lambda t, m: ["grpo", prompts_recipe(t, m, grpo=grpo_section(rewards=[{"type": "python", "function": "r.py:score"}]))]),
    Case("grpo-python-file-missing", "a python reward whose file does not exist", "r.py not found",
         lambda t, m: ["grpo", prompts_recipe(t, m, grpo=grpo_section(rewards=[{"type": "python", "function": "r.py:score"}], allow_python_rewards=True))]),
    Case("grpo-python-import-fails", "a python reward file that raises on import", "importing r.py failed with ZeroDivisionError",
         lambda t, m: text(t, "r.py", "x = 1 / 0\n") and ["grpo", prompts_recipe(t, m, grpo=grpo_section(
             rewards=[{"type": "python", "function": "r.py:score"}], allow_python_rewards=True))]),
    Case("grpo-python-no-function", "a python reward naming a function the file lacks", "has no function `score` (it defines: other)",
         lambda t, m: text(t, "r.py", "def other(**kw):\n    return []\n") and ["grpo", prompts_recipe(t, m, grpo=grpo_section(
             rewards=[{"type": "python", "function": "r.py:score"}], allow_python_rewards=True))]),
    Case("grpo-reward-model-is-sft", "a language-model adapter given as the reward model", "not a reward model",
         lambda t, m: ["grpo", prompts_recipe(t, m, grpo=grpo_section(rewards=[{"type": "model", "model": str(adapter(t, m))}]))]),
    Case("grpo-reward-model-other-base", "a reward model trained on another base", "was trained on base",
         lambda t, m: ["grpo", prompts_recipe(t, m, grpo=grpo_section(rewards=[{"type": "model", "model": str(seq_cls_adapter(t, other_base(t, m)))}]))]),
]


def sampled_task(tmp: Path) -> Path:
    text(tmp, "s.jsonl", '{"q": "who are you", "a": "pico"}\n')
    return text(tmp, "s.yaml", "task: s\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: s.jsonl\ntest_split: test\n"
                "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
                "generation_kwargs:\n  do_sample: true\nmetric_list:\n  - metric: exact_match\n")


def grpo_section(**keys) -> dict:
    return {"rewards": [{"type": "equals", "column": "answer"}], "num_generations": 2, **keys}


def prompts_recipe(tmp: Path, tiny: Path, **sections) -> Path:
    data = write_jsonl(tmp / "q.jsonl", [{"prompt": f"who are you {i}", "answer": "pico"} for i in range(4)])
    return recipe(tmp, tiny, data={"train": str(data)}, **sections)


def seq_cls_adapter(tmp: Path, base: Path) -> Path:
    """The adapter_config.json a reward model folder carries (all that preflight reads of it)."""
    folder = tmp / "rm"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path": str(base), "peft_type": "LORA"}))
    return folder


def snapshot(root: Path) -> dict:
    """Every file under root (except the cache) with its content hash."""
    import hashlib

    out = {}
    for p in root.rglob("*"):
        if p.is_file() and "cache" not in p.relative_to(root).parts[:1]:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_at_least_forty_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 40


# training mistakes that only the loaded base or the tokenizer can reveal; every other one is refused before loading
NEEDS_THE_MODEL = {"target-modules", "data-all-dropped"}


@pytest.fixture
def model_loads(monkeypatch):
    """Records every base load of a training command (the seam: finetune.models.load)."""
    from finetune import models

    calls = []
    real = models.load

    def load(*a, **k):
        calls.append(a[0].base if a else k)
        return real(*a, **k)

    monkeypatch.setattr(models, "load", load)
    return calls


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, cli, tmp_path, tiny, model_loads):
    args = case.args(tmp_path, tiny)
    model_loads.clear()  # a case may train an adapter to set itself up
    before = snapshot(tmp_path)
    res = cli(*args)
    if args[0] in ("sft", "dpo", "kto", "orpo", "reward", "grpo", "run") and case.id not in NEEDS_THE_MODEL:
        assert model_loads == [], f"{case.id}: refused only after loading the base"
    assert res.code == 2, res.text
    assert case.expect in res.err, res.err
    assert "Traceback" not in res.text
    assert res.err.lower().count("error:") == 1  # one message (click writes "Error:")
    after = snapshot(tmp_path)
    assert after == before, f"files changed: {set(after) ^ set(before) or [k for k in after if after[k] != before.get(k)]}"


def test_memory_warning_before_a_long_run(cli, tmp_path, tiny, monkeypatch):
    from finetune import inspect as inspect_

    monkeypatch.setattr(inspect_, "available_memory_gib", lambda device: 0.0001)
    res = cli("sft", recipe(tmp_path, tiny))
    assert res.code == 0, res.text
    assert "warning:" in res.err and "GiB" in res.err and "batch_size" in res.err


def test_full_disk_during_save(cli, tmp_path, tiny, monkeypatch):
    """ENOSPC while writing the adapter: exit 2, nothing published, the checkpoint kept for --resume."""
    import errno

    import safetensors.torch

    r = recipe(tmp_path, tiny, training={"save_every": 2})
    real = safetensors.torch.save_file
    disk = {"full": True}

    def full(tensors, filename, *a, **k):
        # libraries may bind save_file at import time, so the fake stays and a flag says whether the disk is full
        if disk["full"] and ".staging" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **k)

    import peft.peft_model

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    res = cli("sft", r)
    assert res.code == 2, res.text
    assert "no space left on device" in res.err and "output.dir" in res.err
    out = tmp_path / "out"
    assert not (out / "adapter_model.safetensors").exists() and not (out / ".staging").exists()
    assert (out / "checkpoints" / "checkpoint-2" / "finetune-complete").is_file()
    disk["full"] = False
    res = cli("sft", r, "--resume")
    assert res.code == 0, res.text
    assert (out / "adapter_model.safetensors").is_file()


def test_trust_remote_code_off_and_yaml_safe(tmp_path, tiny):
    """A recipe cannot instantiate Python objects, and remote code stays off unless the recipe says so."""
    from finetune import recipe as recipes
    from finetune.errors import UserError

    p = text(tmp_path, "evil.yaml", "data: !!python/object/apply:os.system ['echo hacked > pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        recipes.load(p)
    assert not (tmp_path / "pwned").exists()
    assert recipes.load(recipe(tmp_path, tiny)).model.trust_remote_code is False


def run_cli_subprocess(args: list, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finetune", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, tiny):
    """SIGKILL mid-run (no chance to clean up), then --resume: same adapter as an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    tree = good(tmp_path, tiny, training={"max_steps": 10, "save_every": 2, "batch_size": 2, "learning_rate": 1e-2})
    tree["output"]["dir"] = str(tmp_path / "a")
    write_recipe(tmp_path / "a.yaml", tree)
    tree["output"]["dir"] = str(tmp_path / "b")
    write_recipe(tmp_path / "b.yaml", tree)
    straight = run_cli_subprocess(["sft", tmp_path / "a.yaml"], tmp_path, env)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    victim = run_cli_subprocess(["sft", tmp_path / "b.yaml"], tmp_path, env)
    marker = tmp_path / "b" / "checkpoints" / "checkpoint-4" / "finetune-complete"
    deadline = time.time() + 240
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    resumed = run_cli_subprocess(["sft", tmp_path / "b.yaml", "--resume"], tmp_path, env)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    a, b = load_file(str(tmp_path / "a" / "adapter_model.safetensors")), load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# ---- docs/reliability.md ---------------------------------------------------------------------------

DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- cases:begin -->", "<!-- cases:end -->"


def cases_table() -> str:
    rows = [BEGIN, "", "| # | case | mistake | the message says (excerpt) |", "|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        rows.append(f"| {i} | `{c.id}` | {c.what} | {c.expect.replace('|', '/')} |")
    return "\n".join(rows + ["", END])


def test_reliability_doc_lists_every_case():
    assert cases_table() in DOC.read_text(), "docs/reliability.md is stale: run python tests/test_reliability.py"


if __name__ == "__main__":
    text_ = DOC.read_text()
    DOC.write_text(text_[: text_.index(BEGIN)] + cases_table() + text_[text_.index(END) + len(END):])
