"""Speed of finetune against the plain TRL + PEFT (and plain transformers) code a user would otherwise write.

    .venv/bin/python bench/run.py                 # CPU suite on the built-in base (~10 minutes)
    .venv/bin/python bench/run.py --quick         # one-step smoke of every benchmark (CI)
    .venv/bin/python bench/run.py --device cuda   # the same on a GPU

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

    def __new__(cls):
        from transformers import TrainerCallback

        class _T(TrainerCallback):
            def __init__(self):
                self.times, self.losses, self._t = [], [], None

            def on_step_begin(self, args, state, control, **kw):
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.times.append(time.perf_counter() - self._t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses.append(logs["loss"])

        return _T()


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
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from finetune.models import resolve_base

    path = resolve_base(BASE, log=lambda s: None).path
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(l) for l in open(args.data)]
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                      "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    kwargs = {}
    if args.quant == "4bit":
        from transformers import BitsAndBytesConfig
        import torch

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if args.quant == "4bit" and args.device == "cpu":
        from finetune.models import guard_bnb_cpu

        guard_bnb_cpu(model)  # without it the baseline's gradients are wrong on this CPU (see docs)
    config = SFTConfig(output_dir=args.work, max_steps=args.steps, per_device_train_batch_size=args.batch, max_length=args.max_length,
                       learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0,
                       use_cpu=args.device == "cpu", disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[timer])
    real, padded = real_and_padded_tokens(trainer, args.steps)
    trainer.train()
    return {"times": timer.times, "losses": timer.losses, "real_tokens": real, "padded_tokens": padded, "peak_mb": peak_mb(args.device)}


def sft_toolkit(args) -> dict:
    from finetune import recipe as recipes, sft

    r = recipes.Recipe.model_validate({
        "model": {"base": BASE, "quantization": args.quant, "device": args.device},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": args.data, "max_length": args.max_length},
        "training": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 2e-4, "log_every": 1, "seed": 0,
                     "scheduler": "constant", "warmup_ratio": 0.0},
    })
    timer = StepTimer()
    built = sft.build(r, Path(args.work), [timer])  # the same steps `finetune sft` runs
    trainer = built.trainer
    real, padded = real_and_padded_tokens(trainer, args.steps)
    trainer.train()
    return {"times": timer.times, "losses": timer.losses, "real_tokens": real, "padded_tokens": padded,
            "peak_mb": peak_mb(args.device), "speed": __import__("dataclasses").asdict(built.settings)}


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
    timer = StepTimer()
    if toolkit:
        from finetune import dpo, recipe as recipes

        r = recipes.Recipe.model_validate({
            "model": {"base": BASE, "quantization": args.quant, "device": args.device}, "lora": {"r": 16, "alpha": 32},
            "data": {"train": args.data, "max_length": args.max_length}, "dpo": {},
            "training": {"max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "seed": 0, "warmup_ratio": 0.0}})
        trainer = dpo.build(r, Path(args.work), [timer]).trainer  # the same steps `finetune dpo` runs
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from finetune.models import resolve_base

        path = resolve_base(BASE, log=lambda s: None).path
        ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": x["prompt"]}],
                                          "chosen": [{"role": "assistant", "content": x["chosen"]}],
                                          "rejected": [{"role": "assistant", "content": x["rejected"]}]} for x in rows])
        config = DPOConfig(output_dir=args.work, max_steps=args.steps, per_device_train_batch_size=args.batch, max_length=args.max_length,
                           logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=args.device == "cpu", disable_tqdm=True)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=config, train_dataset=ds,
                             processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer],
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    return {"times": timer.times, "losses": timer.losses, "pairs": args.steps * args.batch, "peak_mb": peak_mb(args.device)}


def eval_side(args, toolkit: bool) -> dict:
    import math

    import torch

    if toolkit:
        from finetune import evaluate

        r = evaluate.evaluate_model(BASE, Path(args.data), max_length=args.max_length, stride=None, batch_size=None,  # its default
                                    quantization="none", show_progress=False)
        # scoring time only, like the baseline's timer: model loading is excluded on both sides
        return {"seconds": r["wall_s"], "tokens": r["tokens"], "perplexity": r["perplexity"], "peak_mb": peak_mb(args.device)}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import resolve_base

    path = resolve_base(BASE, log=lambda s: None).path
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
    """Convert the built-in base and build the synthetic merge model, outside the parent process."""
    from finetune.models import resolve_base

    resolve_base(BASE, log=lambda s: None)
    synthetic_base(Path(args.work), hidden=args.batch, layers=args.steps)
    import torch

    return {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def chat_side(args, toolkit: bool) -> dict:
    import torch

    prompt = [{"role": "user", "content": "Tell me about the stars in the night sky."}]
    if toolkit:
        from finetune import chat, models

        loaded, _ = models.load_any(BASE, log=lambda s: None)
        gc = chat.generation_config(loaded, None, {"temperature": 0, "max_new_tokens": args.steps})
        gc.eos_token_id = None  # decode the full length on both sides
        runs = [chat.generate(loaded, prompt, gc, stream=lambda s: None) for _ in range(2)]
        r = runs[-1]
        return {"ttft_s": r["time_to_first_token_s"], "decode_tokens_per_s": r["tokens_per_s"], "tokens": r["completion_tokens"]}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import resolve_base

    path = resolve_base(BASE, log=lambda s: None).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    for _ in range(2):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False)
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
       "dpo-toolkit": lambda a: dpo_side(a, True), "dpo-baseline": lambda a: dpo_side(a, False),
       "eval-toolkit": lambda a: eval_side(a, True), "eval-baseline": lambda a: eval_side(a, False),
       "merge-toolkit": lambda a: merge_side(a, True), "merge-baseline": lambda a: merge_side(a, False),
       "chat-toolkit": lambda a: chat_side(a, True), "chat-baseline": lambda a: chat_side(a, False),
       "peak": lambda a: matmul_peak_gflops(a.device), "prepare": prepare_side}


def one(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=ONE)
    p.add_argument("--data", default="")
    p.add_argument("--work", default="/tmp/finetune-bench")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--quant", default="none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--base", default="")
    p.add_argument("--adapter", default="")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(ONE[a.what](a)))


# ---- the suite -----------------------------------------------------------------------------------


def measure(what: str, out_dir: Path, **opts) -> dict:
    out = out_dir / f"{what}-{time.time_ns()}.json"
    cmd = [sys.executable, __file__, "one", what, "--out", str(out)] + [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
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


def bench_sft(ctx) -> dict:
    """SFT: alternating baseline and toolkit rounds; real tokens/s from the median step time."""
    runs = {"toolkit": [], "baseline": []}
    for r in range(ctx["rounds"]):
        for side in ("baseline", "toolkit"):
            res = measure(f"sft-{side}", ctx["raw"], data=ctx["data"], steps=ctx["steps"], quant=ctx["quant"], device=ctx["device"],
                          work=ctx["work"] / f"sft-{side}")
            res.update(step_stats(res, skip=1 if ctx["steps"] > 2 else 0))
            runs[side].append(res)
            print(f"sft {side} round {r}: median step {res['median_step_s']:.2f}s, last loss {res['losses'][-1]:.4f}, peak {res['peak_mb']:.0f} MiB")

    def summarise(rs):
        med = statistics.median(x["median_step_s"] for x in rs)
        real = rs[0]["real_tokens"] / max(1, len(rs[0]["times"]))
        padded = rs[0]["padded_tokens"] / max(1, len(rs[0]["times"]))
        return {"median_step_s": med, "real_tokens_per_s": real / med, "padded_tokens_per_s": padded / med,
                "peak_mb": max(x["peak_mb"] for x in rs), "final_loss": statistics.mean(x["losses"][-1] for x in rs),
                "mean_loss": statistics.mean(statistics.mean(x["losses"]) for x in rs)}

    t, b = summarise(runs["toolkit"]), summarise(runs["baseline"])
    # MFU: ~4N FLOPs per trained token for LoRA (forward 2N, input gradients 2N; frozen weights get none)
    flops_per_token = 4 * 134_515_008
    peak = ctx["peak"]["bf16"] * 1e9
    for x in (t, b):
        x["mfu"] = round(flops_per_token * x["real_tokens_per_s"] / peak, 4)
    out = {"toolkit": t, "baseline": b, "speed_settings": runs["toolkit"][0].get("speed"),
           "ratio_real_tokens_per_s": t["real_tokens_per_s"] / b["real_tokens_per_s"], "ratio_peak_memory": t["peak_mb"] / b["peak_mb"]}
    print(f"sft: {out['ratio_real_tokens_per_s']:.2f}x real tokens/s, memory ratio {out['ratio_peak_memory']:.2f}")
    return out


def bench_dpo(ctx) -> dict:
    d = {}
    for side in ("baseline", "toolkit"):
        res = measure(f"dpo-{side}", ctx["raw"], data=ctx["work"] / "bench_dpo.jsonl", steps=max(1, ctx["steps"] // 2),
                      device=ctx["device"], work=ctx["work"] / f"dpo-{side}")
        med = statistics.median(res["times"][1:] or res["times"])
        d[side] = {"median_step_s": med, "pairs_per_s": 4 / med, "peak_mb": res["peak_mb"], "final_loss": res["losses"][-1]}
    out = {**d, "ratio_pairs_per_s": d["toolkit"]["pairs_per_s"] / d["baseline"]["pairs_per_s"]}
    print(f"dpo: {out['ratio_pairs_per_s']:.2f}x pairs/s")
    return out


def bench_eval(ctx) -> dict:
    e = {}
    for side in ("baseline", "toolkit"):
        res = measure(f"eval-{side}", ctx["raw"], data=ctx["work"] / "bench_eval.txt", device=ctx["device"], max_length=512)
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
    c = {side: measure(f"chat-{side}", ctx["raw"], steps=8 if ctx["quick"] else 64, device=ctx["device"]) for side in ("baseline", "toolkit")}
    out = {**c, "ratio_decode": c["toolkit"]["decode_tokens_per_s"] / c["baseline"]["decode_tokens_per_s"]}
    print(f"chat: decode {out['ratio_decode']:.2f}x")
    return out


def bench_sft_loss(ctx) -> dict:
    """A/B of the SFT loss inside the toolkit: our trained-positions loss against TRL's chunked `nll`."""
    runs = {"ours": [], "trl": []}
    for r in range(ctx["rounds"]):
        for side, what in (("trl", "sft-toolkit-trl-loss"), ("ours", "sft-toolkit")):
            res = measure(what, ctx["raw"], data=ctx["data"], steps=ctx["steps"], quant=ctx["quant"], device=ctx["device"],
                          work=ctx["work"] / f"sft-loss-{side}")
            res.update(step_stats(res, skip=1 if ctx["steps"] > 2 else 0))
            runs[side].append(res)
            print(f"sft loss {side} round {r}: median step {res['median_step_s']:.2f}s, last loss {res['losses'][-1]:.4f}, peak {res['peak_mb']:.0f} MiB")
    med = {k: statistics.median(x["median_step_s"] for x in v) for k, v in runs.items()}
    out = {"median_step_s": med, "ratio_speed": med["trl"] / med["ours"],
           "peak_mb": {k: max(x["peak_mb"] for x in v) for k, v in runs.items()},
           "final_loss": {k: statistics.mean(x["losses"][-1] for x in v) for k, v in runs.items()}}
    print(f"sft loss A/B: ours {out['ratio_speed']:.2f}x TRL's nll per step, peak {out['peak_mb']}, final loss {out['final_loss']}")
    return out


BENCHES = {"sft": bench_sft, "dpo": bench_dpo, "eval": bench_eval, "merge": bench_merge, "chat": bench_chat, "sft-loss": bench_sft_loss}


def suite(args) -> None:
    quick = args.quick
    only = args.only.split(",") if args.only else list(BENCHES)
    work = Path(args.work)
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    data = bench_data(work)
    # the parent stays small (no torch): each child is measured by its own high-water mark
    syn = work / "synthetic"
    env_info = measure("prepare", raw, work=syn, batch=512 if quick else 1536, steps=2 if quick else 12)
    ctx = {"device": args.device, "quick": quick, "steps": 1 if quick else args.steps, "rounds": 1 if quick else args.rounds,
           "quant": args.quant, "work": work, "raw": raw, "data": data, "synthetic": syn}
    ctx["peak"] = measure("peak", raw, device=args.device)
    report: dict = {"suite": f"{args.device}{'-quick' if quick else ''}", "date": time.strftime("%Y-%m-%d %H:%M"),
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                                "torch": env_info["torch"], "gpu": env_info["gpu"] if args.device == "cuda" else None},
                    "settings": {"base": BASE, "max_length": 512, "batch": 4, "lora": "r16 all-linear", "steps": ctx["steps"],
                                 "rounds": ctx["rounds"], "quantization": args.quant},
                    "matmul_peak_gflops": ctx["peak"]}
    print("matmul peak GFLOP/s:", ctx["peak"])
    for name in only:
        report[name] = BENCHES[name](ctx)
    if not quick and set(only) == set(BENCHES):
        results_dir = ROOT / "bench" / "results"
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / f"{report['suite']}-{time.strftime('%Y%m%d-%H%M')}.json").write_text(json.dumps(report, indent=2) + "\n")
        write_table(report)


def write_table(r: dict) -> None:
    s, d, e, m, c = r["sft"], r["dpo"], r["eval"], r["merge"], r["chat"]
    lines = [
        f"## {r['suite']} · {r['date']} · {r['machine']['platform']} · {r['machine']['cpus']} cores"
        + (f" · {r['machine']['gpu']}" if r['machine']['gpu'] else ""),
        "",
        f"Settings: {r['settings']}. Matmul peak measured on the spot: {r['matmul_peak_gflops']} GFLOP/s.",
        "",
        "| benchmark | finetune | plain baseline | ratio |",
        "|---|---|---|---|",
        f"| SFT real tokens/s | {s['toolkit']['real_tokens_per_s']:.0f} | {s['baseline']['real_tokens_per_s']:.0f} | **{s['ratio_real_tokens_per_s']:.2f}x** |",
        f"| SFT padded tokens/s | {s['toolkit']['padded_tokens_per_s']:.0f} | {s['baseline']['padded_tokens_per_s']:.0f} | |",
        f"| SFT median step (s) | {s['toolkit']['median_step_s']:.2f} | {s['baseline']['median_step_s']:.2f} | |",
        f"| SFT peak memory (MiB) | {s['toolkit']['peak_mb']:.0f} | {s['baseline']['peak_mb']:.0f} | {s['ratio_peak_memory']:.2f} |",
        f"| SFT mean / final loss | {s['toolkit']['mean_loss']:.3f} / {s['toolkit']['final_loss']:.3f} | {s['baseline']['mean_loss']:.3f} / {s['baseline']['final_loss']:.3f} | |",
        f"| SFT MFU | {s['toolkit']['mfu']:.1%} | {s['baseline']['mfu']:.1%} | |",
        f"| DPO pairs/s | {d['toolkit']['pairs_per_s']:.2f} | {d['baseline']['pairs_per_s']:.2f} | **{d['ratio_pairs_per_s']:.2f}x** |",
        f"| DPO peak memory (MiB) | {d['toolkit']['peak_mb']:.0f} | {d['baseline']['peak_mb']:.0f} | |",
        f"| eval tokens/s | {e['toolkit']['tokens_per_s']:.0f} | {e['baseline']['tokens_per_s']:.0f} | **{e['ratio_tokens_per_s']:.2f}x** |",
        f"| eval perplexity | {e['toolkit']['perplexity']:.4f} | {e['baseline']['perplexity']:.4f} | rel. diff {e['perplexity_rel_diff']:.1e} |",
        f"| merge peak memory (MiB), {m['shards']} shards | {m['toolkit']['peak_mb']:.0f} | {m['baseline']['peak_mb']:.0f} | **{m['ratio_peak_memory']:.2f}** |",
        f"| merge time (s) | {m['toolkit']['seconds']:.1f} | {m['baseline']['seconds']:.1f} | |",
        f"| chat time to first token (s) | {c['toolkit']['ttft_s']:.3f} | {c['baseline']['ttft_s']:.3f} | |",
        f"| chat decode tokens/s | {c['toolkit']['decode_tokens_per_s']:.1f} | {c['baseline']['decode_tokens_per_s']:.1f} | {c['ratio_decode']:.2f}x |",
    ]
    if "sft-loss" in r:  # the same SFT with TRL's own chunked nll in place of the trained-positions loss
        a = r["sft-loss"]
        lines += [f"| SFT loss A/B: median step (s), ours vs TRL's nll | {a['median_step_s']['ours']:.2f} | {a['median_step_s']['trl']:.2f} | **{a['ratio_speed']:.2f}x** |",
                  f"| SFT loss A/B: peak memory (MiB) | {a['peak_mb']['ours']:.0f} | {a['peak_mb']['trl']:.0f} | {a['peak_mb']['ours'] / a['peak_mb']['trl']:.2f} |"]
    lines += [
        "",
        f"SFT speed settings chosen by finetune: {s['speed_settings']}",
        "",
    ]
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
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quant", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--work", default="/tmp/finetune-bench")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(BENCHES) + " (results are written only for the full suite)")
    suite(p.parse_args())


if __name__ == "__main__":
    main()
