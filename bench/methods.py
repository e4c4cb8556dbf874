"""Speed of the reward, GRPO, KTO and ORPO commands against the same method in plain TRL + PEFT (same data, LoRA,
batch, max_length, learning rate and steps).

    .venv/bin/python bench/methods.py                      # every method, 3 interleaved rounds, built-in base, CPU
    .venv/bin/python bench/methods.py --quick              # one step of each leg, one round, nothing written (smoke)
    .venv/bin/python bench/methods.py --only reward,kto --rounds 3 --steps 4
    .venv/bin/python bench/methods.py --gc-leg reward,kto  # also finetune with gradient checkpointing flipped

The harness is bench/run.py's: every leg runs in its own process (`methods.py one LEG ...`, clean peak memory),
the legs of a method interleaved round after round, each process's median step (its first, warm-up step left
out) and the median over rounds. The toolkit leg calls the same `build` the command runs; the baseline is the
TRL trainer + `LoraConfig` as TRL's docs show it, TRL's defaults otherwise (gradient checkpointing on, fp32).
The flipped leg runs the toolkit with its automatic gradient-checkpointing choice reversed: the measurement
behind that choice (finetune/speed.py). Results: bench/results/methods-<device>-<date>.json and the methods
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BASE, ROOT, StepTimer, bench_data, fmt_spread, interleaved, measure, one, peak_mb, spread, step_stats  # noqa: E402

LR = 2e-4  # the recipes' rate, both sides; TRL's own defaults (1e-6 for KTO and GRPO) would leave the losses flat
GROUP = 4  # GRPO answers per prompt
COMPLETION = 32  # GRPO tokens generated per answer
# what one example is, and how many make a step (GRPO: two prompts of GROUP answers each)
UNIT = {"reward": "pairs", "grpo": "answers", "kto": "answers", "orpo": "pairs"}
BATCH = {"reward": 4, "grpo": 2 * GROUP, "kto": 4, "orpo": 4}
SECTION = {"reward": {}, "kto": {}, "orpo": {},
           "grpo": {"rewards": [{"type": "length", "target": 100}], "num_generations": GROUP, "max_completion_length": COMPLETION}}


def length_reward(completions, **kw):
    """The baseline's rule reward, what finetune's `{type: length, target: 100}` computes: closeness to 100 characters."""
    text = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [max(0.0, 1 - abs(len(t) - 100) / 100) for t in text]


def unpaired(rows: list[dict]) -> list[dict]:
    """Each pair as a desirable and an undesirable answer (KTO's data, for both sides)."""
    return [x for r in rows for x in ({"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                                      {"prompt": r["prompt"], "completion": r["rejected"], "label": False})]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def method_data(method: str, work: Path) -> Path:
    """The bench's 24 preference pairs (bench/run.py's bench_data) in the shape each method reads."""
    pairs = [json.loads(line) for line in (work / "bench_dpo.jsonl").read_text().splitlines()]
    if method == "kto":
        return write_jsonl(work / "bench_kto.jsonl", unpaired(pairs))
    if method == "grpo":
        return write_jsonl(work / "bench_grpo.jsonl", [{"prompt": p["prompt"]} for p in pairs])
    return work / "bench_dpo.jsonl"


# ---- one leg (runs in a subprocess) ----------------------------------------------------------------


def toolkit_trainer(method: str, args, gc: str, timer):
    """The trainer `finetune <method>` builds for the bench recipe; `gc` on/off overrides its automatic choice."""
    from importlib import import_module

    from finetune import recipe as recipes

    training = {"max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "seed": 0, "warmup_ratio": 0.0, "learning_rate": LR}
    if gc != "auto":
        training["gradient_checkpointing"] = gc == "on"
    r = recipes.Recipe.model_validate({
        "model": {"base": args.model_path, "quantization": args.quant, "device": args.device}, "lora": {"r": 16, "alpha": 32},
        "data": {"train": args.data, "max_length": args.max_length}, method: SECTION[method], "training": training})
    built = import_module(f"finetune.{method}").build(r, Path(args.work), [timer])  # the same steps the command runs
    return built.trainer, built.settings


def baseline_trainer(method: str, args, timer):
    """What a user writes from TRL's docs: the method's trainer + a LoraConfig, TRL's defaults otherwise."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = args.model_path
    rows = [json.loads(line) for line in open(args.data)]
    common = dict(output_dir=args.work, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=LR, logging_steps=1,
                  save_strategy="no", report_to=[], seed=0, use_cpu=args.device == "cpu", disable_tqdm=True)
    lora = dict(r=16, lora_alpha=32, target_modules="all-linear")
    tok = AutoTokenizer.from_pretrained(path)

    def chat(role: str, text: str) -> list[dict]:
        return [{"role": role, "content": text}]

    if method == "reward":
        from trl import RewardConfig, RewardTrainer

        ds = [{"prompt": chat("user", x["prompt"]), "chosen": chat("assistant", x["chosen"]), "rejected": chat("assistant", x["rejected"])}
              for x in rows]
        return RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=1),
                             args=RewardConfig(**common, max_length=args.max_length), train_dataset=datasets.Dataset.from_list(ds),
                             processing_class=tok, callbacks=[timer], peft_config=LoraConfig(**lora, task_type="SEQ_CLS"))
    model = AutoModelForCausalLM.from_pretrained(path)
    peft = LoraConfig(**lora, task_type="CAUSAL_LM")
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(**common, num_generations=GROUP, max_completion_length=COMPLETION)
        return GRPOTrainer(model=model, reward_funcs=[length_reward], args=config, processing_class=tok, callbacks=[timer], peft_config=peft,
                           train_dataset=datasets.Dataset.from_list([{"prompt": chat("user", x["prompt"])} for x in rows]))
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        ds = [{"prompt": chat("user", x["prompt"]), "completion": chat("assistant", x["completion"]), "label": x["label"]} for x in rows]
        return KTOTrainer(model=model, args=KTOConfig(**common, max_length=args.max_length), train_dataset=datasets.Dataset.from_list(ds),
                          processing_class=tok, callbacks=[timer], peft_config=peft)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    ds = [{"prompt": chat("user", x["prompt"]), "chosen": chat("assistant", x["chosen"]), "rejected": chat("assistant", x["rejected"])}
          for x in rows]
    return ORPOTrainer(model=model, args=ORPOConfig(**common, max_length=args.max_length), train_dataset=datasets.Dataset.from_list(ds),
                       processing_class=tok, callbacks=[timer], peft_config=peft)


def leg(method: str, side: str, gc: str = "auto"):
    """The function that runs one leg in the child process: `side` toolkit or baseline."""

    def run_leg(args) -> dict:
        from dataclasses import asdict

        timer = StepTimer(args.device)
        settings = None
        if side == "toolkit":
            trainer, settings = toolkit_trainer(method, args, gc, timer)
        else:
            trainer = baseline_trainer(method, args, timer)
        trainer.train()
        history = trainer.state.log_history
        tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
        return {"times": timer.times, "losses": timer.losses, "peak_mb": peak_mb(args.device), "examples_per_step": args.batch,
                "gradient_checkpointing": bool(trainer.args.gradient_checkpointing), "dtype": str(trainer.model.dtype).removeprefix("torch."),
                "tokens": tokens[-1] if tokens else None, "rewards": [h["reward"] for h in history if "reward" in h],
                "speed": asdict(settings) if settings else None}

    return run_leg


# toolkit-gc-on / -off: the flipped leg, whichever its automatic choice is not
LEGS = {f"{m}-{name}": leg(m, side, gc) for m in UNIT
        for name, side, gc in (("baseline", "baseline", "auto"), ("toolkit", "toolkit", "auto"),
                               ("toolkit-gc-on", "toolkit", "on"), ("toolkit-gc-off", "toolkit", "off"))}


# ---- the suite -------------------------------------------------------------------------------------


def bench_method(method: str, ctx) -> dict:
    """Baseline, toolkit (and the toolkit with gradient checkpointing flipped) of one method, interleaved per round."""
    data = method_data(method, ctx["work"])
    names = ["baseline", "toolkit"] + (["flipped"] if method in ctx["gc_leg"] else [])
    runs: dict = {k: [] for k in names}
    auto_gc = None
    for r, name in interleaved(names, ctx["rounds"]):
        what = f"{method}-{name}"
        if name == "flipped":  # the toolkit leg ran before it in the first round and reported its automatic choice
            what = f"{method}-toolkit-gc-{'off' if auto_gc else 'on'}"
        res = measure(what, ctx["raw"], script=__file__, data=data, steps=ctx["steps"], batch=BATCH[method], max_length=ctx["max_length"],
                      quant=ctx["quant"], device=ctx["device"], model_path=ctx["model_path"], work=ctx["work"] / f"{method}-{name}")
        if name == "toolkit":
            auto_gc = res["gradient_checkpointing"]
        res.update(step_stats(res, skip=1 if ctx["steps"] > 2 else 0))
        runs[name].append(res)
        print(f"{method} {name} round {r}: median step {res['median_step_s']:.2f}s, gc {res['gradient_checkpointing']}, "
              f"losses {[round(x, 4) for x in res['losses']]}, peak {res['peak_mb']:.0f} MiB", flush=True)

    def summarise(rs: list[dict]) -> dict:
        per_s = [BATCH[method] / x["median_step_s"] for x in rs]
        out = {"median_step_s": statistics.median(x["median_step_s"] for x in rs), "step_s": spread(x["median_step_s"] for x in rs),
               "per_s": statistics.median(per_s), "per_s_spread": spread(per_s), "peak_mb": max(x["peak_mb"] for x in rs),
               "peak_mb_each": [round(x["peak_mb"]) for x in rs], "gradient_checkpointing": rs[0]["gradient_checkpointing"],
               "dtype": rs[0]["dtype"], "first_loss": statistics.mean(x["losses"][0] for x in rs),
               "final_loss": statistics.mean(x["losses"][-1] for x in rs), "processes": len(rs)}
        if any(x["rewards"] for x in rs):
            out["mean_reward"] = statistics.mean(statistics.mean(x["rewards"]) for x in rs if x["rewards"])
        return out

    out: dict = {k: summarise(v) for k, v in runs.items()}
    t, b = out["toolkit"], out["baseline"]
    out.update(unit=UNIT[method], batch=BATCH[method], speed_settings=runs["toolkit"][0]["speed"],
               ratio_per_s=t["per_s"] / b["per_s"], ratio_peak_memory=t["peak_mb"] / b["peak_mb"])
    if "flipped" in out:
        out["ratio_auto_vs_flipped"] = t["per_s"] / out["flipped"]["per_s"]
    print(f"{method}: {out['ratio_per_s']:.2f}x {UNIT[method]}/s against plain TRL+PEFT, peak memory {out['ratio_peak_memory']:.2f}x", flush=True)
    return out


def table(report: dict) -> list[str]:
    """The methods section's table for docs/benchmarks.md: one row per leg that ran."""
    lines = ["| method | leg | gradient checkpointing | weights | examples/s, median (min-max) | median step (s) | peak MiB | "
             "first → last loss | finetune is |", "|---|---|---|---|---|---|---|---|---|"]
    for m in UNIT:
        if m not in report:
            continue
        x = report[m]
        for name, label in (("toolkit", "finetune"), ("baseline", "plain TRL + PEFT"), ("flipped", "finetune, checkpointing flipped")):
            if name not in x:
                continue
            r = x[name]
            ratio = (f"**{x['ratio_per_s']:.2f}x** {x['unit']}/s, {x['ratio_peak_memory']:.2f}x memory" if name == "toolkit" else
                     f"auto {x['ratio_auto_vs_flipped']:.2f}x this leg's speed" if name == "flipped" else "")
            lines.append(f"| {m.upper()} ({x['batch']} {x['unit']} a step) | {label} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['dtype']} | "
                         f"{fmt_spread(r['per_s_spread'], 2)} | {r['median_step_s']:.2f} | {r['peak_mb']:.0f} | "
                         f"{r['first_loss']:.4f} → {r['final_loss']:.4f} | {ratio} |")
    return lines


START, END = "<!-- methods -->", "<!-- /methods -->"


def write_section(report: dict) -> None:
    """Replace the methods table of docs/benchmarks.md (between its markers) with this run's; what is written
    about it by hand goes after the end marker."""
    s = report["settings"]
    lines = [START, f"## Reward, GRPO, KTO, ORPO against plain TRL + PEFT · {report['suite']} · {report['date']} · {report['cpus']} cores", "",
             f"`bench/methods.py --rounds {s['rounds']} --steps {s['steps']}`: medians over {s['rounds']} interleaved rounds (one process per "
             f"leg and round; each process's median step, its first step left out). Base {s['base']}, max_length {s['max_length']}, LoRA "
             f"{s['lora']}, learning rate {s['learning_rate']}, quantization {s['quantization']}; GRPO: {GROUP} answers of {COMPLETION} new "
             f"tokens per prompt, length reward. Load average before / after: {report['load_average']} / {report.get('load_average_after')}. "
             "Raw numbers in `bench/results/`.", ""] + table(report) + [""]
    lines.append(END)
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    if START in text and END in text:
        text = text.split(START)[0] + "\n".join(lines) + text.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n\n" + "\n".join(lines) + "\n"
    doc.write_text(text)


METHOD_BENCHES = list(UNIT)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        return one(sys.argv[2:], LEGS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="one step of each leg, one round, nothing written (smoke)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quant", default="none", choices=["none", "4bit", "8bit"], help="quantization of the base, for every leg")
    p.add_argument("--model-path", default="", help="a base folder (default: the built-in base)")
    p.add_argument("--work", default="/tmp/finetune-bench-methods")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(METHOD_BENCHES))
    p.add_argument("--gc-leg", default="", help="methods that also run finetune with gradient checkpointing flipped")
    a = p.parse_args()
    only = a.only.split(",") if a.only else METHOD_BENCHES
    unknown = [m for m in only + (a.gc_leg.split(",") if a.gc_leg else []) if m not in UNIT]
    if unknown:
        p.error(f"unknown method(s) {unknown}: choose from {METHOD_BENCHES}")
    work = Path(a.work)
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    bench_data(work)  # bench_dpo.jsonl: 24 preference pairs, prompts and answers of varied length
    ctx = {"device": a.device, "steps": 1 if a.quick else a.steps, "rounds": 1 if a.quick else a.rounds, "quant": a.quant,
           "max_length": 512, "work": work, "raw": raw, "model_path": a.model_path,  # empty: each leg resolves the built-in base
           "gc_leg": a.gc_leg.split(",") if a.gc_leg else []}
    report: dict = {"suite": f"methods-{a.device}{'-quick' if a.quick else ''}", "date": time.strftime("%Y-%m-%d %H:%M"),
                    "cpus": os.cpu_count(), "load_average": [round(x, 1) for x in os.getloadavg()],
                    "settings": {"base": a.model_path or BASE, "max_length": ctx["max_length"], "lora": "r16 all-linear", "learning_rate": LR,
                                 "steps": ctx["steps"], "rounds": ctx["rounds"], "quantization": a.quant}}
    results = ROOT / "bench" / "results" / f"{report['suite']}-{time.strftime('%Y%m%d-%H%M')}.json"
    for name in only:  # written after each method, so a failing leg later keeps the methods measured before it
        report[name] = bench_method(name, ctx)
        report["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")  # every run's, a --quick one's too
        if not a.quick:
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(report, indent=2) + "\n")
            write_section(report)
    print("\n".join(table(report)))


if __name__ == "__main__":
    main()
