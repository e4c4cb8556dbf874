"""The SFT legs of bench/run.py beyond finetune and plain TRL: TRL with every documented speed switch, LLaMA-Factory
(in its own virtual environment), whole processes as a user runs them, and a fixed background load.

Each function here runs in a child process started by bench/run.py (`run.py one LEG ...`) or, for the
whole-process legs, is the command line of one: the parent times command start to exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LF_VENV = HERE / ".venv-llamafactory"
LF_PYTHON = LF_VENV / "bin" / "python"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def versions(*names: str) -> dict:
    """Installed versions of the libraries a leg runs on (recorded with its results)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


STACK = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes")


def sync(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def chat_rows(path: str) -> list[dict]:
    rows = [json.loads(line) for line in open(path)]
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows]


def quantization_config(quant: str):
    """The same bitsandbytes settings finetune uses for `quantization: 4bit/8bit`."""
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def trl_trainer(args, model_path: str, tuned: bool, callbacks: list, epochs: float | None = None):
    """SFTTrainer + LoraConfig as a user writes it from TRL's docs. `tuned`: with every documented switch a user
    would flip for speed on the device: bf16 weights, gradient checkpointing off, padding-free (which TRL
    allows only with max_length=None; every bench row is shorter than 512 tokens, so nothing is cut either way)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    kwargs = {}
    q = quantization_config(args.quant)
    if q is not None:
        kwargs["quantization_config"] = q
    elif tuned:
        kwargs["dtype"] = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if args.device == "cuda" and q is None:
        model = model.to("cuda")
    if args.quant == "4bit" and args.device == "cpu":
        from finetune.models import guard_bnb_cpu

        guard_bnb_cpu(model)  # without it the gradients are wrong on this CPU (docs/benchmarks.md)
    steps = {"num_train_epochs": epochs} if epochs else {"max_steps": args.steps}
    extra = {"gradient_checkpointing": False, "padding_free": True, "max_length": None, "bf16": True} if tuned else {"max_length": args.max_length}
    config = SFTConfig(output_dir=args.work, per_device_train_batch_size=args.batch, learning_rate=2e-4, logging_steps=1, save_strategy="no",
                       report_to=[], seed=0, data_seed=0, use_cpu=args.device == "cpu", disable_tqdm=True, lr_scheduler_type="constant",
                       warmup_steps=0, **steps, **extra)
    return SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(chat_rows(args.data)),
                      processing_class=AutoTokenizer.from_pretrained(model_path), callbacks=callbacks,
                      peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
                                             task_type="CAUSAL_LM"))


def trl_whole(args, tuned: bool) -> dict:
    """One epoch and the adapter saved: the whole script a user runs (the parent times the process)."""
    trainer = trl_trainer(args, args.model_path, tuned, [], epochs=1)
    trainer.train()
    trainer.save_model(str(Path(args.work) / "adapter"))
    return {"steps": trainer.state.global_step, "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None}


def finetune_recipe(args, folder: Path, epochs: bool, gc=None) -> Path:
    """The recipe `finetune sft` runs for the bench task."""
    import yaml

    training = {"batch_size": args.batch, "learning_rate": 2e-4, "log_every": 1, "seed": 0, "scheduler": "constant", "warmup_ratio": 0.0}
    training.update({"epochs": 1} if epochs else {"max_steps": args.steps})
    if gc is not None:
        training["gradient_checkpointing"] = gc
    recipe = {"model": {"base": args.model_path, "quantization": args.quant, "device": args.device}, "lora": dict(LORA),
              "data": {"train": str(args.data), "max_length": args.max_length}, "training": training,
              "output": {"dir": str(folder / "out")}}
    path = folder / "recipe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---- LLaMA-Factory ---------------------------------------------------------------------------------


def llamafactory_available() -> str | None:
    """None when the leg can run, else why not (said in the results instead of failing the suite)."""
    if not LF_PYTHON.is_file():
        return f"no LLaMA-Factory environment at {LF_VENV} (create it with: bash bench/llamafactory_env.sh)"
    r = subprocess.run([str(LF_PYTHON), "-c", "import llamafactory"], capture_output=True, text=True)
    if r.returncode:
        return f"LLaMA-Factory does not import in {LF_VENV}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return None


def llamafactory_config(args, work: Path, epochs: bool) -> dict:
    """LLaMA-Factory's SFT arguments for the bench task: the same rows (as an alpaca dataset), rank, targets, length,
    batch, learning rate and steps; bf16 and gradient checkpointing off, the switches its docs name for speed."""
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in open(args.data)]
    (work / "bench.json").write_text(json.dumps([{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in rows]))
    (work / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))
    cfg = {
        "model_name_or_path": str(args.model_path), "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"],
        "lora_dropout": LORA["dropout"], "lora_target": "all",
        "dataset": "bench", "dataset_dir": str(work), "template": "smollm2",  # its ChatML with the base's default system prompt
        "cutoff_len": args.max_length, "overwrite_cache": True, "preprocessing_num_workers": None,
        "output_dir": str(work / "out"), "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1, "learning_rate": 2e-4,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "seed": 0, "data_seed": 0,
        "bf16": args.quant == "none" or args.device == "cuda", "disable_gradient_checkpointing": True, "disable_tqdm": True,
        "use_cpu": args.device == "cpu", "plot_loss": False,
    }
    if args.quant in ("4bit", "8bit"):
        cfg["quantization_bit"] = 4 if args.quant == "4bit" else 8
        cfg["quantization_method"] = "bnb"
    cfg.update({"num_train_epochs": 1.0} if epochs else {"max_steps": args.steps})
    return cfg


def llamafactory_steps(args) -> dict:
    """Run bench/llamafactory_leg.py in LLaMA-Factory's environment with this leg's arguments."""
    work = Path(args.work)
    cfg = llamafactory_config(args, work, epochs=False)
    out = work / "lf-result.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(LF_PYTHON), str(HERE / "llamafactory_leg.py"), json.dumps(cfg), str(out), args.device], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"LLaMA-Factory leg failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(out.read_text())


def llamafactory_cli(args, work: Path) -> list[str]:
    """`llamafactory-cli train bench.yaml` for one epoch (the whole-process leg)."""
    import yaml

    cfg = llamafactory_config(args, work, epochs=True)
    (work / "bench.yaml").write_text(yaml.safe_dump(cfg))
    return [str(LF_VENV / "bin" / "llamafactory-cli"), "train", str(work / "bench.yaml")]


# ---- background load -------------------------------------------------------------------------------

BUSY = ("import os, torch\n"
        "torch.set_num_threads(1)\n"
        "a = torch.randn(512, 512)\n"
        "while True:\n"
        "    a = torch.tanh(a @ a)\n")


class Busy:
    """A background process that keeps one core busy (a single-threaded matmul loop) while a leg runs."""

    def __enter__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)  # its imports done, the core is busy before the leg starts
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
