"""Speed of finetune against the plain TRL + PEFT (and plain transformers) code a user would otherwise write.

    .venv/bin/python bench/run.py                 # CPU suite on the built-in base (every SFT leg, 3 rounds)
    .venv/bin/python bench/run.py --quick         # one-step smoke of every benchmark (CI)
    .venv/bin/python bench/run.py --only sft,whole,busy   # the SFT legs only
    .venv/bin/python bench/run.py --device cuda --base llama-3.1-8b --quant 4bit   # on a GPU, an 8B-shape base
    bash bench/llamafactory_env.sh                # once: the LLaMA-Factory leg's own environment (skipped without it)

SFT legs: finetune; finetune with gradient checkpointing on; plain TRL (documented defaults); tuned TRL (bf16
weights, no gradient checkpointing, padding-free); LLaMA-Factory. Step time (rounds of interleaved processes,
min/median/max), whole-process time of one epoch, and step time with one core kept busy by another process.

Every measurement runs in its own subprocess (clean peak memory), toolkit and baseline alternating in
one sequence, so the ratios compare like with like on a noisy shared machine. Results go to
bench/results/<suite>-<date>.json and a table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bases import CONFIGS, build as build_base, flops_per_token, spec_peak_tflops  # noqa: E402  (bench/ is the script's folder)
from legs import STACK, Busy, finetune_recipe, llamafactory_available, llamafactory_cli, llamafactory_steps, sync, trl_trainer, trl_whole, versions  # noqa: E402

BASE = "smollm2-135m-instruct"


# ---- data ----------------------------------------------------------------------------------------


def bench_data(folder: Path, n: int = 48, seed: int = 0) -> Path:
    """Alpaca-style prompt/completion rows of varied length (about 60-500 tokens), written for this bench."""
    rng = random.Random(seed)
    words = ("the star planet moon light orbit telescope comet galaxy nebula ring ice rock gas cloud dust "
             "bright faint distant near cold hot slowly quickly large small ancient young red blue white").split()
    verbs = "forms shines turns drifts collapses glows spins cools heats orbits".split()

    def sentence():
        return " ".join([rng.choice(words) for _ in range(rng.randint(4, 9))] + [rng.choice(verbs)] +
                        [rng.choice(words) for _ in range(rng.randint(2, 6))]).capitalize() + "."

    rows = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(sentence() for _ in range(rng.randint(1, 4))) + " Explain."
        completion = " ".join(sentence() for _ in range(rng.randint(3, 28)))
        rows.append({"prompt": prompt, "completion": completion})
    path = folder / "bench_sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefs = [{"prompt": r["prompt"], "chosen": r["completion"][:400], "rejected": " ".join(reversed(r["completion"][:400].split()))}
             for r in rows[:24]]
    (folder / "bench_dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (folder / "bench_eval.txt").write_text("\n\n".join(r["completion"] for r in rows))
    return path


# ---- one measurement (runs in a subprocess) ------------------------------------------------------


def peak_mb(device: str) -> float:
    """Peak memory of this process, measured as the toolkit measures it (finetune/memory.py)."""
    from finetune.memory import peak_memory

    return peak_memory(device).used_mb


class StepTimer:
    """Trainer callback: wall time of every optimizer step and the losses logged."""

    def __new__(cls, device: str = "cpu"):
        from transformers import TrainerCallback

        class _T(TrainerCallback):
            def __init__(self):
                self.times, self.losses, self._t = [], [], None

            def on_step_begin(self, args, state, control, **kw):
                sync(device)  # the previous step's GPU work is not this step's
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                sync(device)
                self.times.append(time.perf_counter() - self._t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses.append(logs["loss"])

        return _T()


def leg_result(args, timer, trainer, real: int, padded: int, **extra) -> dict:
    """What every SFT leg reports: step times, losses, tokens, peak memory (and reserved on CUDA), versions."""
    from finetune.memory import peak_memory

    p = peak_memory(args.device)
    return {"times": timer.times, "losses": timer.losses, "real_tokens": real, "padded_tokens": padded, "peak_mb": p.used_mb,
            "peak_reserved_mb": p.reserved_mb, "versions": versions(*STACK), **extra}


def real_and_padded_tokens(trainer, steps: int) -> tuple[int, int]:
    """Count real and padded tokens of the batches the trainer's dataloader yields for `steps` steps."""
    real = padded = 0
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i >= steps * trainer.args.gradient_accumulation_steps:
            break
        if "attention_mask" in batch:
            real += int(batch["attention_mask"].sum())
        else:
            real += int((batch["position_ids"] >= 0).sum()) if "position_ids" in batch else int(batch["input_ids"].numel())
        padded += int(batch["input_ids"].numel())
    return real, padded


def sft_baseline(args) -> dict:
    """What a user writes from TRL's docs: SFTTrainer + LoraConfig, documented defaults."""
    return sft_trl(args, tuned=False)


def sft_tuned(args) -> dict:
    """The same with every documented switch a user would set for speed: bf16 weights, no gradient checkpointing, padding-free."""
    return sft_trl(args, tuned=True)


def sft_trl(args, tuned: bool) -> dict:
    timer = StepTimer(args.device)
    trainer = trl_trainer(args, args.model_path, tuned, [timer])
    real, padded = real_and_padded_tokens(trainer, args.steps)
    trainer.train()
    return leg_result(args, timer, trainer, real, padded)


def sft_llamafactory(args) -> dict:
    return llamafactory_steps(args)


def sft_toolkit(args, gc=None) -> dict:
    """`gc`: gradient checkpointing forced on or off (the recipe's `auto` otherwise)."""
    import dataclasses

    import yaml

    from finetune import recipe as recipes, sft

    r = recipes.Recipe.model_validate(yaml.safe_load(finetune_recipe(args, Path(args.work), epochs=False, gc=gc).read_text()))
    timer = StepTimer(args.device)
    built = sft.build(r, Path(args.work), [timer])  # the same steps `finetune sft` runs
    trainer = built.trainer
    real, padded = real_and_padded_tokens(trainer, args.steps)
    trainer.train()
    return leg_result(args, timer, trainer, real, padded, speed=dataclasses.asdict(built.settings))


def profiled(args, method: str, run) -> dict:
    """Where finetune's step spends its time: torch's profiler over the steps after the first of `run()` (a leg
    whose trainer `finetune.<method>.build` makes), ops grouped by name (self time, so nothing counts twice),
    each with its share of the profiled time."""
    import importlib

    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 1 and self.prof is None:  # after the warm-up step
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
                self.prof.__enter__()
                self.t = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            if self.prof is not None:
                self.wall = time.perf_counter() - self.t
                self.prof.__exit__(None, None, None)

    cb = Profile()
    module = importlib.import_module(f"finetune.{method}")
    real_build = module.build

    def build(r, out, callbacks=()):
        return real_build(r, out, [*callbacks, cb])

    module.build = build
    res = run()
    events = cb.prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    res["profile"] = {"profiled_steps": args.steps - 1, "wall_s": cb.wall, "self_cpu_s": total / 1e6,
                      "top": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total, "calls": e.count} for e in top]}
    return res


def sft_toolkit_trl_loss(args) -> dict:
    """The toolkit's SFT with TRL's own loss (`loss_type="nll"`, computed by TRL in chunks) instead of our
    trained-positions loss: everything else equal, so the two legs isolate the loss."""
    from trl import SFTTrainer

    from finetune import sft

    real_build = sft.build

    def build(*a, **k):
        built = real_build(*a, **k)
        trainer = built.trainer

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            am = inputs.get("attention_mask")
            built.counts.real += int(am.sum()) if am is not None else int(inputs["input_ids"].numel())
            return SFTTrainer.compute_loss(trainer, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        trainer.compute_loss = compute_loss
        return built

    sft.build = build
    return sft_toolkit(args)


def dpo_side(args, toolkit: bool) -> dict:
    import datasets
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(l) for l in open(args.data)]
    timer = StepTimer(args.device)
    if toolkit:
        from finetune import dpo, recipe as recipes

        r = recipes.Recipe.model_validate({
            "model": {"base": args.model_path, "quantization": args.quant, "device": args.device}, "lora": {"r": 16, "alpha": 32},
            "data": {"train": args.data, "max_length": args.max_length}, "dpo": {},
            "training": {"max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "seed": 0, "warmup_ratio": 0.0}})
        trainer = dpo.build(r, Path(args.work), [timer]).trainer  # the same steps `finetune dpo` runs
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from legs import quantization_config

        path = args.model_path
        q = quantization_config(args.quant)
        model = AutoModelForCausalLM.from_pretrained(path, **({"quantization_config": q} if q else {}))
        if args.device == "cuda" and q is None:
            model = model.to("cuda")
        if args.quant == "4bit" and args.device == "cpu":
            from finetune.models import guard_bnb_cpu

            guard_bnb_cpu(model)
        ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": x["prompt"]}],
                                          "chosen": [{"role": "assistant", "content": x["chosen"]}],
                                          "rejected": [{"role": "assistant", "content": x["rejected"]}]} for x in rows])
        config = DPOConfig(output_dir=args.work, max_steps=args.steps, per_device_train_batch_size=args.batch, max_length=args.max_length,
                           logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=args.device == "cpu", disable_tqdm=True)
        trainer = DPOTrainer(model=model, args=config, train_dataset=ds,
                             processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer],
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    return leg_result(args, timer, trainer, 0, 0, pairs=args.steps * args.batch)


def eval_side(args, toolkit: bool) -> dict:
    import math

    import torch

    if toolkit:
        from finetune import evaluate

        r = evaluate.evaluate_model(args.model_path, Path(args.data), max_length=args.max_length, stride=None, batch_size=None,  # its default
                                    quantization="none", show_progress=False)
        # scoring time only, like the baseline's timer: model loading is excluded on both sides
        return {"seconds": r["wall_s"], "tokens": r["tokens"], "perplexity": r["perplexity"], "peak_mb": peak_mb(args.device)}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model_path
    tok = AutoTokenizer.from_pretrained(path)
    # the same dtype finetune picks for this device, so both compute the same perplexity
    from finetune.models import pick_dtype

    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype("auto", args.device)).to(args.device).eval()
    ids = tok(Path(args.data).read_text(), return_tensors="pt").input_ids
    t = time.perf_counter()
    nll, count = 0.0, 0
    # the sliding-window loop of the transformers perplexity guide, one window per forward and the model's
    # own loss; each window scores the next w-1 tokens with the rest as context, so every token after the
    # first is scored exactly once with as much context as the window allows (what finetune eval computes)
    w = args.max_length
    scored = 1
    while scored < ids.size(1):
        end = min(scored + w - 1, ids.size(1))
        begin = max(0, end - w)
        x = ids[:, begin:end].to(args.device)
        y = x.clone()
        y[:, : scored - begin] = -100
        with torch.no_grad():
            loss = model(x, labels=y).loss
        n = int((y[:, 1:] != -100).sum())
        nll += loss.item() * n
        count += n
        scored = end
    return {"seconds": time.perf_counter() - t, "tokens": count, "perplexity": math.exp(nll / count), "peak_mb": peak_mb(args.device)}


def merge_side(args, toolkit: bool) -> dict:
    import torch

    out = Path(args.work) / ("merged-toolkit" if toolkit else "merged-plain")
    shutil.rmtree(out, ignore_errors=True)  # left by an earlier run
    t = time.perf_counter()
    if toolkit:
        from finetune import merge

        out.mkdir(parents=True)
        merge.merge_shards(Path(args.base), Path(args.adapter), out, "bf16", None)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16), args.adapter)
        model.merge_and_unload().save_pretrained(out, max_shard_size="200MB")
    return {"seconds": time.perf_counter() - t, "peak_mb": peak_mb("cpu")}


def prepare_side(args) -> dict:
    """Convert the built-in base, build the synthetic merge model and the --base model, outside the parent process."""
    import torch
    from transformers import AutoConfig

    from finetune.models import resolve_base

    builtin = resolve_base(BASE, log=lambda s: None).path
    synthetic_base(Path(args.work), hidden=args.batch, layers=args.steps)
    path = builtin
    if args.base in CONFIGS:
        path = build_base(args.base, Path(args.work).parent / "bases", builtin, layers=args.layers or None, device=args.device)
    cfg = AutoConfig.from_pretrained(path)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "gpu": gpu, "model_path": str(path), "versions": versions(*STACK),
            "flops_per_token_at_256": flops_per_token(cfg, 256),
            "config": {k: getattr(cfg, k, None) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads",
                                                          "num_key_value_heads", "head_dim")}}


def chat_side(args, toolkit: bool) -> dict:
    import torch

    prompt = [{"role": "user", "content": "Tell me about the stars in the night sky."}]
    if toolkit:
        from finetune import chat, models

        loaded, _ = models.load_any(args.model_path, log=lambda s: None)
        gc = chat.generation_config(loaded, None, {"temperature": 0, "max_new_tokens": args.steps})
        gc.eos_token_id = None  # decode the full length on both sides
        runs = [chat.generate(loaded, prompt, gc, stream=lambda s: None) for _ in range(2)]
        r = runs[-1]
        return {"ttft_s": r["time_to_first_token_s"], "decode_tokens_per_s": r["tokens_per_s"], "tokens": r["completion_tokens"]}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import pick_dtype

    path = args.model_path
    tok = AutoTokenizer.from_pretrained(path)
    # on the same device as finetune's; its dtype there is the one a user picks for a GPU (bf16), fp32 loads on a CPU as before
    model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": pick_dtype("auto", "cuda")} if args.device == "cuda" else {}))
    model = model.to(args.device).eval()
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(args.device)
    for _ in range(2):
        sync(args.device)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=1, do_sample=False)
        sync(args.device)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False)
        sync(args.device)
        total = time.perf_counter() - t
    n = out.shape[1] - ids["input_ids"].shape[1]
    return {"ttft_s": ttft, "decode_tokens_per_s": (n - 1) / max(total - ttft, 1e-9), "tokens": n}


def matmul_peak_gflops(device: str) -> dict:
    import torch

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(1024, 1024, dtype=dt, device=device)
        b = torch.randn(1024, 1024, dtype=dt, device=device)
        for _ in range(3):
            a @ b
        n = 20
        t = time.perf_counter()
        for _ in range(n):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        out[name] = round(2 * 1024**3 * n / (time.perf_counter() - t) / 1e9, 1)
    return out


ONE = {"sft-toolkit": sft_toolkit, "sft-baseline": sft_baseline, "sft-toolkit-trl-loss": sft_toolkit_trl_loss,
       "sft-tuned": sft_tuned, "sft-toolkit-profile": lambda a: profiled(a, "sft", lambda: sft_toolkit(a)), "sft-llamafactory": sft_llamafactory, "sft-toolkit-gc": lambda a: sft_toolkit(a, gc=True),
       "whole-baseline": lambda a: trl_whole(a, tuned=False), "whole-tuned": lambda a: trl_whole(a, tuned=True),
       "dpo-toolkit": lambda a: dpo_side(a, True), "dpo-baseline": lambda a: dpo_side(a, False),
       "dpo-toolkit-profile": lambda a: profiled(a, "dpo", lambda: dpo_side(a, True)),
       "eval-toolkit": lambda a: eval_side(a, True), "eval-baseline": lambda a: eval_side(a, False),
       "merge-toolkit": lambda a: merge_side(a, True), "merge-baseline": lambda a: merge_side(a, False),
       "chat-toolkit": lambda a: chat_side(a, True), "chat-baseline": lambda a: chat_side(a, False),
       "peak": lambda a: matmul_peak_gflops(a.device), "prepare": prepare_side}


def one(argv: list[str], legs: dict | None = None) -> None:
    """Run one leg in this process and write its result (`legs`: another script's table, bench/methods.py's)."""
    legs = legs or ONE
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=legs)
    p.add_argument("--data", default="")
    p.add_argument("--work", default="/tmp/finetune-bench")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--quant", default="none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--base", default="")
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--model-path", default="")
    p.add_argument("--adapter", default="")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if not a.model_path and a.what != "prepare":
        from finetune.models import resolve_base

        a.model_path = str(resolve_base(BASE, log=lambda s: None).path)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(legs[a.what](a)))


# ---- the suite -----------------------------------------------------------------------------------


def measure(what: str, out_dir: Path, script: str | None = None, **opts) -> dict:
    """One leg in its own process (`script one WHAT --opt value ...`; this file unless another is named)."""
    out = out_dir / f"{what}-{time.time_ns()}.json"
    cmd = [sys.executable, script or __file__, "one", what, "--out", str(out)] + [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def step_stats(r: dict, skip: int) -> dict:
    times = r["times"][skip:] or r["times"]
    return {"median_step_s": statistics.median(times), "mean_step_s": sum(times) / len(times)}


def synthetic_base(folder: Path, hidden: int, layers: int) -> Path:
    """A larger random Llama saved in several shards, with a LoRA adapter for it (for merge)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "adapter" / "adapter_config.json").is_file():
        return folder
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder / "base", max_shard_size="200MB")
    peft = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(folder / "adapter")
    return folder


# the SFT legs: finetune as shipped, finetune with gradient checkpointing on (TRL's default, to separate our
# defaults from our code), plain TRL (its defaults), TRL with every documented speed switch, LLaMA-Factory
SFT_LEGS = {"toolkit": "sft-toolkit", "baseline": "sft-baseline", "tuned": "sft-tuned", "llamafactory": "sft-llamafactory",
            "toolkit_gc": "sft-toolkit-gc"}
LEG_NAMES = {"toolkit": "finetune", "toolkit_gc": "finetune, gradient checkpointing on", "baseline": "plain TRL",
             "tuned": "tuned TRL", "llamafactory": "LLaMA-Factory"}


def spread(values) -> dict:
    values = list(values)
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def sft_legs(ctx) -> tuple[dict, dict]:
    """The legs that can run here, and why the others cannot."""
    legs, skipped = dict(SFT_LEGS), {}
    why = llamafactory_available()
    if why:
        legs.pop("llamafactory")
        skipped["llamafactory"] = why
    return legs, skipped


def interleaved(legs: list[str], rounds: int):
    """(round, leg) in an order that alternates direction each round, so no leg always runs right after the same one."""
    for r in range(rounds):
        for leg in (legs if r % 2 == 0 else legs[::-1]):
            yield r, leg


def sft_opts(ctx, leg: str, steps: int) -> dict:
    return dict(data=ctx["data"], steps=steps, quant=ctx["quant"], device=ctx["device"], model_path=ctx["model_path"],
                work=ctx["work"] / f"sft-{leg}")


def bench_sft(ctx) -> dict:
    """SFT step time of every leg, legs interleaved, `rounds` processes each; real tokens/s from each process's
    median step (the first step, with its one-off warm-up, left out)."""
    legs, skipped = sft_legs(ctx)
    runs: dict = {k: [] for k in legs}
    for r, leg in interleaved(list(legs), ctx["rounds"]):
        res = measure(legs[leg], ctx["raw"], **sft_opts(ctx, leg, ctx["steps"]))
        res.update(step_stats(res, skip=1 if ctx["steps"] > 2 else 0))
        runs[leg].append(res)
        print(f"sft {leg} round {r}: median step {res['median_step_s']:.2f}s, last loss {res['losses'][-1]:.4f}, peak {res['peak_mb']:.0f} MiB")

    def summarise(rs):
        med = statistics.median(x["median_step_s"] for x in rs)
        real = rs[0]["real_tokens"] / max(1, len(rs[0]["times"]))
        padded = rs[0]["padded_tokens"] / max(1, len(rs[0]["times"]))
        tps = spread(real / x["median_step_s"] for x in rs)
        out = {"median_step_s": med, "step_s": spread(x["median_step_s"] for x in rs), "real_tokens_per_s": real / med,
               "real_tokens_per_s_spread": tps, "padded_tokens_per_s": padded / med, "real_tokens_per_step": real,
               "peak_mb": max(x["peak_mb"] for x in rs), "final_loss": statistics.mean(x["losses"][-1] for x in rs),
               "mean_loss": statistics.mean(statistics.mean(x["losses"]) for x in rs), "versions": rs[0].get("versions"), "processes": len(rs)}
        if rs[0].get("peak_reserved_mb") is not None:
            out["peak_reserved_mb"] = max(x["peak_reserved_mb"] for x in rs)
        # MFU: training FLOPs per token from the model's own shapes at this batch's mean length, against the
        # device's bf16 peak (the data sheet's on a known GPU, else the matmul peak measured on the spot)
        seq = real / ctx["batch"]
        out["mfu"] = round(flops_per_token(ctx["config"], seq) * out["real_tokens_per_s"] / ctx["peak_flops"], 4)
        return out

    out: dict = {k: summarise(v) for k, v in runs.items()}
    t = out["toolkit"]
    out.update(speed_settings=runs["toolkit"][0].get("speed"), skipped=skipped, peak_flops_source=ctx["peak_source"],
               ratio_real_tokens_per_s=t["real_tokens_per_s"] / out["baseline"]["real_tokens_per_s"],
               ratio_peak_memory=t["peak_mb"] / out["baseline"]["peak_mb"],
               ratios={k: {"real_tokens_per_s": t["real_tokens_per_s"] / out[k]["real_tokens_per_s"], "peak_memory": t["peak_mb"] / out[k]["peak_mb"]}
                       for k in runs if k != "toolkit"})
    if "toolkit_gc" in out:  # the same gradient-checkpointing setting on both sides: our code, not our defaults
        out["ratio_same_checkpointing"] = out["toolkit_gc"]["real_tokens_per_s"] / out["baseline"]["real_tokens_per_s"]
    for k, v in out["ratios"].items():
        print(f"sft: finetune {v['real_tokens_per_s']:.2f}x {LEG_NAMES[k]} real tokens/s, memory ratio {v['peak_memory']:.2f}")
    for k, why in skipped.items():
        print(f"sft: {LEG_NAMES[k]} skipped: {why}")
    return out


def whole_data(ctx) -> Path:
    """The rows of the whole-process legs: all 48 (one epoch = 12 steps), or one batch with --quick."""
    if not ctx["quick"]:
        return ctx["data"]
    path = ctx["work"] / "bench_sft_quick.jsonl"
    path.write_text("".join(Path(ctx["data"]).read_text().splitlines(keepends=True)[: ctx["batch"]]))
    return path


def whole_command(ctx, leg: str, work: Path, data: Path) -> tuple[list[str], dict]:
    """The command a user runs for one epoch of the bench task, and its environment."""
    import types

    work.mkdir(parents=True, exist_ok=True)
    a = types.SimpleNamespace(data=data, model_path=ctx["model_path"], max_length=512, batch=ctx["batch"], steps=0, quant=ctx["quant"],
                              device=ctx["device"], work=str(work))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": str(ROOT)}
    if leg == "toolkit":
        return [sys.executable, "-m", "finetune", "sft", str(finetune_recipe(a, work, epochs=True)), "--overwrite"], env
    if leg == "llamafactory":
        env.pop("PYTHONPATH")
        return llamafactory_cli(a, work), env
    out = work / "result.json"
    return [sys.executable, __file__, "one", f"whole-{leg}", "--out", str(out), "--data", str(data), "--work", str(work), "--quant", ctx["quant"],
            "--device", ctx["device"], "--model-path", str(ctx["model_path"])], env


def bench_whole(ctx) -> dict:
    """Whole-process time of one epoch, command start to exit (imports, data preparation, model load, training,
    saving): what a user waits for. Legs interleaved, `rounds` processes each."""
    legs, skipped = sft_legs(ctx)
    legs.pop("toolkit_gc")
    data = whole_data(ctx)
    times: dict = {k: [] for k in legs}
    for r, leg in interleaved(list(legs), ctx["rounds"]):
        work = ctx["work"] / f"whole-{leg}"
        shutil.rmtree(work, ignore_errors=True)
        cmd, env = whole_command(ctx, leg, work, data)
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - t
        if done.returncode:
            raise RuntimeError(f"whole-process leg {leg} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        times[leg].append(seconds)
        print(f"whole {leg} round {r}: {seconds:.1f}s")
    out: dict = {k: spread(v) for k, v in times.items()}
    out["skipped"] = skipped
    out["ratios"] = {k: out[k]["median"] / out["toolkit"]["median"] for k in times if k != "toolkit"}
    for k, v in out["ratios"].items():
        print(f"whole process: {LEG_NAMES[k]} takes {v:.2f}x finetune's time")
    return out


def bench_busy(ctx) -> dict:
    """Step time of each leg while a background process keeps one core busy, against the same leg on the quiet
    machine measured right before it (interleaved: quiet, busy per leg)."""
    legs, skipped = sft_legs(ctx)
    legs.pop("toolkit_gc")
    steps = ctx["busy_steps"]
    out: dict = {"skipped": skipped, "steps": steps}
    for r, leg in interleaved(list(legs), ctx["busy_rounds"]):
        quiet = measure(legs[leg], ctx["raw"], **sft_opts(ctx, leg, steps))
        with Busy():
            busy = measure(legs[leg], ctx["raw"], **sft_opts(ctx, leg, steps))
        q, b = step_stats(quiet, skip=1)["median_step_s"], step_stats(busy, skip=1)["median_step_s"]
        row = out.setdefault(leg, {"quiet_step_s": [], "busy_step_s": [], "busy_real_tokens_per_s": []})
        row["quiet_step_s"].append(q)
        row["busy_step_s"].append(b)
        row["busy_real_tokens_per_s"].append(busy["real_tokens"] / max(1, len(busy["times"])) / b)
        if busy.get("speed"):
            row["speed_settings"] = busy["speed"]
        print(f"busy {leg} round {r}: quiet {q:.2f}s, busy {b:.2f}s a step ({b / q:.2f}x)")
    for leg in legs:
        row = out[leg]
        row["slowdown"] = statistics.median(b / q for q, b in zip(row["quiet_step_s"], row["busy_step_s"]))
    return out


def bench_dpo(ctx) -> dict:
    d = {}
    for side in ("baseline", "toolkit"):
        res = measure(f"dpo-{side}", ctx["raw"], data=ctx["work"] / "bench_dpo.jsonl", steps=max(1, ctx["steps"] // 2),
                      device=ctx["device"], quant=ctx["quant"], model_path=ctx["model_path"], work=ctx["work"] / f"dpo-{side}")
        med = statistics.median(res["times"][1:] or res["times"])
        d[side] = {"median_step_s": med, "pairs_per_s": 4 / med, "peak_mb": res["peak_mb"], "peak_reserved_mb": res.get("peak_reserved_mb"),
                   "final_loss": res["losses"][-1], "versions": res.get("versions")}
    out = {**d, "ratio_pairs_per_s": d["toolkit"]["pairs_per_s"] / d["baseline"]["pairs_per_s"]}
    print(f"dpo: {out['ratio_pairs_per_s']:.2f}x pairs/s")
    return out


def bench_eval(ctx) -> dict:
    e = {}
    for side in ("baseline", "toolkit"):
        res = measure(f"eval-{side}", ctx["raw"], data=ctx["work"] / "bench_eval.txt", device=ctx["device"], max_length=512, model_path=ctx["model_path"])
        res["tokens_per_s"] = res["tokens"] / res["seconds"]
        e[side] = res
    out = {**e, "ratio_tokens_per_s": e["toolkit"]["tokens_per_s"] / e["baseline"]["tokens_per_s"],
           "perplexity_rel_diff": abs(e["toolkit"]["perplexity"] / e["baseline"]["perplexity"] - 1)}
    print(f"eval: {out['ratio_tokens_per_s']:.2f}x tokens/s, perplexity rel. diff {out['perplexity_rel_diff']:.1e}")
    return out


def bench_merge(ctx) -> dict:
    syn = ctx["synthetic"]
    m = {side: measure(f"merge-{side}", ctx["raw"], base=syn / "base", adapter=syn / "adapter", work=ctx["work"] / f"merge-{side}")
         for side in ("baseline", "toolkit")}
    out = {**m, "shards": len(list((syn / "base").glob("*.safetensors"))), "ratio_peak_memory": m["toolkit"]["peak_mb"] / m["baseline"]["peak_mb"]}
    print(f"merge: peak memory ratio {out['ratio_peak_memory']:.2f}")
    return out


def bench_chat(ctx) -> dict:
    c = {side: measure(f"chat-{side}", ctx["raw"], steps=8 if ctx["quick"] else 64, device=ctx["device"], model_path=ctx["model_path"])
         for side in ("baseline", "toolkit")}
    out = {**c, "ratio_decode": c["toolkit"]["decode_tokens_per_s"] / c["baseline"]["decode_tokens_per_s"]}
    print(f"chat: decode {out['ratio_decode']:.2f}x")
    return out


def bench_sft_loss(ctx) -> dict:
    """A/B of the SFT loss inside the toolkit: our trained-positions loss against TRL's chunked `nll`."""
    runs = {"ours": [], "trl": []}
    for r in range(ctx["rounds"]):
        for side, what in (("trl", "sft-toolkit-trl-loss"), ("ours", "sft-toolkit")):
            res = measure(what, ctx["raw"], data=ctx["data"], steps=ctx["steps"], quant=ctx["quant"], device=ctx["device"],
                          model_path=ctx["model_path"], work=ctx["work"] / f"sft-loss-{side}")
            res.update(step_stats(res, skip=1 if ctx["steps"] > 2 else 0))
            runs[side].append(res)
            print(f"sft loss {side} round {r}: median step {res['median_step_s']:.2f}s, last loss {res['losses'][-1]:.4f}, peak {res['peak_mb']:.0f} MiB")
    med = {k: statistics.median(x["median_step_s"] for x in v) for k, v in runs.items()}
    out = {"median_step_s": med, "ratio_speed": med["trl"] / med["ours"],
           "peak_mb": {k: max(x["peak_mb"] for x in v) for k, v in runs.items()},
           "final_loss": {k: statistics.mean(x["losses"][-1] for x in v) for k, v in runs.items()}}
    print(f"sft loss A/B: ours {out['ratio_speed']:.2f}x TRL's nll per step, peak {out['peak_mb']}, final loss {out['final_loss']}")
    return out


BENCHES = {"sft": bench_sft, "whole": bench_whole, "busy": bench_busy, "dpo": bench_dpo, "eval": bench_eval, "merge": bench_merge, "chat": bench_chat,
           "sft-loss": bench_sft_loss}


def suite(args) -> None:
    import types

    quick = args.quick
    only = args.only.split(",") if args.only else list(BENCHES)
    work = Path(args.work)
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    data = bench_data(work)
    # the parent stays small (no torch): each child is measured by its own high-water mark
    syn = work / "synthetic"
    env_info = measure("prepare", raw, work=syn, batch=512 if quick else 1536, steps=2 if quick else 12, base=args.base, layers=args.layers,
                       device=args.device)
    ctx = {"device": args.device, "quick": quick, "steps": 1 if quick else args.steps, "rounds": 1 if quick else args.rounds,
           "busy_steps": 2 if quick else args.busy_steps, "busy_rounds": 1 if quick else args.busy_rounds, "batch": 4,
           "quant": args.quant, "work": work, "raw": raw, "data": data, "synthetic": syn, "model_path": env_info["model_path"],
           "config": types.SimpleNamespace(**env_info["config"])}
    ctx["peak"] = measure("peak", raw, device=args.device)
    spec = spec_peak_tflops(env_info["gpu"]) if args.device == "cuda" else None
    ctx["peak_flops"] = spec * 1e12 if spec else ctx["peak"]["bf16"] * 1e9
    ctx["peak_source"] = f"data sheet bf16 {spec} TFLOP/s ({env_info['gpu']})" if spec else f"measured bf16 matmul {ctx['peak']['bf16']} GFLOP/s"
    base = args.base + (f" ({args.layers} layers)" if args.layers else "")
    report: dict = {"suite": f"{args.device}{'-quick' if quick else ''}", "date": time.strftime("%Y-%m-%d %H:%M"),
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                                "torch": env_info["torch"], "gpu": env_info["gpu"] if args.device == "cuda" else None,
                                "load_average": os.getloadavg()},
                    "settings": {"base": base, "max_length": 512, "batch": 4, "lora": "r16 all-linear", "steps": ctx["steps"],
                                 "rounds": ctx["rounds"], "quantization": args.quant},
                    "versions": env_info["versions"], "matmul_peak_gflops": ctx["peak"], "only": only}
    print("matmul peak GFLOP/s:", ctx["peak"], "· MFU against", ctx["peak_source"])
    for name in only:
        report[name] = BENCHES[name](ctx)
    report["machine"]["load_average_after"] = os.getloadavg()
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")  # every run's, a --quick one's too
    if not quick:
        results_dir = ROOT / "bench" / "results"
        results_dir.mkdir(parents=True, exist_ok=True)
        name = report["suite"] + ("" if set(only) == set(BENCHES) else "-" + "+".join(only))
        (results_dir / f"{name}-{time.strftime('%Y%m%d-%H%M')}.json").write_text(json.dumps(report, indent=2) + "\n")
        write_table(report)


def fmt_spread(x: dict, digits: int = 0) -> str:
    return f"{x['median']:.{digits}f} ({x['min']:.{digits}f}-{x['max']:.{digits}f})"


def sft_legs_table(s: dict) -> list[str]:
    """One row per SFT leg: real tokens/s (median and range over processes), step, memory, loss, finetune's ratio."""
    legs = [k for k in LEG_NAMES if k in s]
    lines = ["| SFT leg | real tokens/s, median (min-max) | median step (s) | peak memory (MiB) | mean / final loss | MFU | finetune is | versions |",
             "|---|---|---|---|---|---|---|---|"]
    for k in legs:
        x = s[k]
        ratio = s["ratios"].get(k, {})
        vs = x.get("versions") or {}
        ver = ", ".join(f"{n} {v}" for n, v in vs.items() if v and n in ("llamafactory", "transformers", "trl", "peft", "torch"))
        mem = f"{x['peak_mb']:.0f}" + (f" ({x['peak_reserved_mb']:.0f} reserved)" if x.get("peak_reserved_mb") else "")
        lines.append(f"| {LEG_NAMES[k]} | {fmt_spread(x['real_tokens_per_s_spread'], 0 if x['real_tokens_per_s'] >= 100 else 1)} | {x['median_step_s']:.2f} | {mem} | "
                     f"{x['mean_loss']:.3f} / {x['final_loss']:.3f} | {x['mfu']:.1%} | "
                     + (f"**{ratio['real_tokens_per_s']:.2f}x** tokens/s, {ratio['peak_memory']:.2f}x memory" if ratio else "")
                     + f" | {ver} |")
    for k, why in s.get("skipped", {}).items():
        lines.append(f"| {LEG_NAMES[k]} | skipped: {why} | | | | | | |")
    return lines


def write_table(r: dict) -> None:
    lines = [
        f"## {r['suite']} · {r['date']} · {r['machine']['platform']} · {r['machine']['cpus']} cores"
        + (f" · {r['machine']['gpu']}" if r['machine']['gpu'] else ""),
        "",
        f"Settings: {r['settings']}. Matmul peak measured on the spot: {r['matmul_peak_gflops']} GFLOP/s. "
        f"Load average before / after: {r['machine'].get('load_average')} / {r['machine'].get('load_average_after')}.",
        "",
    ]
    if "sft" in r:
        s = r["sft"]
        lines += sft_legs_table(s) + [""]
        if "ratio_same_checkpointing" in s:
            lines += [f"With gradient checkpointing on, as in plain TRL, finetune is {s['ratio_same_checkpointing']:.2f}x plain TRL's real tokens/s "
                      f"(its default, checkpointing off on this device, {s['ratio_real_tokens_per_s']:.2f}x).", ""]
        lines += [f"MFU against {s.get('peak_flops_source')}. SFT speed settings chosen by finetune: {s['speed_settings']}", ""]
    if "whole" in r:
        w = r["whole"]
        lines += ["| whole process, one epoch (s), median (min-max) | " + " | ".join(LEG_NAMES[k] for k in LEG_NAMES if k in w) + " |",
                  "|---" * (1 + sum(k in w for k in LEG_NAMES)) + "|",
                  "| seconds | " + " | ".join(fmt_spread(w[k], 1) for k in LEG_NAMES if k in w) + " |",
                  "| time / finetune's | " + " | ".join("1.00" if k == "toolkit" else f"{w['ratios'][k]:.2f}" for k in LEG_NAMES if k in w) + " |", ""]
    if "busy" in r:
        b = r["busy"]
        lines += [f"Busy machine: each leg's step time with a background process keeping one core busy, against the same leg on the quiet "
                  f"machine just before ({b['steps']} steps a process):", "",
                  "| leg | quiet step (s) | busy step (s) | slowdown |", "|---|---|---|---|"]
        lines += [f"| {LEG_NAMES[k]} | {statistics.median(b[k]['quiet_step_s']):.2f} | {statistics.median(b[k]['busy_step_s']):.2f} | **{b[k]['slowdown']:.2f}x** |"
                  for k in LEG_NAMES if k in b]
        lines += [""]
    rows = []
    if "dpo" in r:
        d = r["dpo"]
        rows += [f"| DPO pairs/s | {d['toolkit']['pairs_per_s']:.2f} | {d['baseline']['pairs_per_s']:.2f} | **{d['ratio_pairs_per_s']:.2f}x** |",
                 f"| DPO peak memory (MiB) | {d['toolkit']['peak_mb']:.0f} | {d['baseline']['peak_mb']:.0f} | |"]
    if "eval" in r:
        e = r["eval"]
        rows += [f"| eval tokens/s | {e['toolkit']['tokens_per_s']:.0f} | {e['baseline']['tokens_per_s']:.0f} | **{e['ratio_tokens_per_s']:.2f}x** |",
                 f"| eval perplexity | {e['toolkit']['perplexity']:.4f} | {e['baseline']['perplexity']:.4f} | rel. diff {e['perplexity_rel_diff']:.1e} |"]
    if "merge" in r:
        m = r["merge"]
        rows += [f"| merge peak memory (MiB), {m['shards']} shards | {m['toolkit']['peak_mb']:.0f} | {m['baseline']['peak_mb']:.0f} | **{m['ratio_peak_memory']:.2f}** |",
                 f"| merge time (s) | {m['toolkit']['seconds']:.1f} | {m['baseline']['seconds']:.1f} | |"]
    if "chat" in r:
        c = r["chat"]
        rows += [f"| chat time to first token (s) | {c['toolkit']['ttft_s']:.3f} | {c['baseline']['ttft_s']:.3f} | |",
                 f"| chat decode tokens/s | {c['toolkit']['decode_tokens_per_s']:.1f} | {c['baseline']['decode_tokens_per_s']:.1f} | {c['ratio_decode']:.2f}x |"]
    if "sft-loss" in r:  # the same SFT with TRL's own chunked nll in place of the trained-positions loss
        a = r["sft-loss"]
        rows += [f"| SFT loss A/B: median step (s), ours vs TRL's nll | {a['median_step_s']['ours']:.2f} | {a['median_step_s']['trl']:.2f} | **{a['ratio_speed']:.2f}x** |",
                 f"| SFT loss A/B: peak memory (MiB) | {a['peak_mb']['ours']:.0f} | {a['peak_mb']['trl']:.0f} | {a['peak_mb']['ours'] / a['peak_mb']['trl']:.2f} |"]
    if rows:
        lines += ["| benchmark | finetune | plain baseline | ratio |", "|---|---|---|---|"] + rows + [""]
    lines.append("")
    doc = ROOT / "docs" / "benchmarks.md"
    head = doc.read_text().split("<!-- results -->")[0] if doc.is_file() else "# Benchmarks\n\n"
    old = doc.read_text().split("<!-- results -->", 1)[1] if doc.is_file() and "<!-- results -->" in doc.read_text() else ""
    doc.write_text(head + "<!-- results -->\n\n" + "\n".join(lines) + old)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        return one(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="one step of everything, nothing written (CI smoke)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quant", default="none", choices=["none", "4bit", "8bit"], help="quantization of the base, for every leg")
    p.add_argument("--base", default=BASE, choices=[BASE, *CONFIGS],
                   help="the built-in base, or a random-weight model with a real architecture's shape, built offline")
    p.add_argument("--layers", type=int, default=0, help="with a built --base: keep its shapes, use this many layers")
    p.add_argument("--busy-steps", type=int, default=4, help="steps of each process in the busy-machine rows")
    p.add_argument("--busy-rounds", type=int, default=1)
    p.add_argument("--work", default="/tmp/finetune-bench")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(BENCHES))
    suite(p.parse_args())


if __name__ == "__main__":
    main()
