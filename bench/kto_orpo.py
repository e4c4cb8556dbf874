"""Speed of the preference methods beyond DPO against the same method in plain TRL + PEFT.

    .venv/bin/python bench/kto_orpo.py                 # KTO and ORPO on the built-in base, CPU (~10 minutes quiet)
    .venv/bin/python bench/kto_orpo.py --quick         # one step of each (smoke)
    .venv/bin/python bench/kto_orpo.py --only kto

Each leg runs in its own subprocess (clean peak memory), baseline and toolkit alternating, on the same data
(bench/run.py's preference pairs; KTO gets them split into desirable and undesirable answers), the same LoRA
(r16 all-linear), batch, max_length, learning rate and number of steps. The toolkit leg calls the same `build`
the command runs; a third leg runs the toolkit with gradient checkpointing flipped from its automatic choice, the
measurement behind that choice per method. Results: bench/results/methods-<device>-<date>.json and a section
appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BASE, ROOT, StepTimer, bench_data, peak_mb  # noqa: E402

LR = 2e-4  # the recipes' rate; TRL's own default (1e-6) would leave the losses flat in a few steps


def pairs(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def unpaired(rows: list[dict]) -> list[dict]:
    """Each pair as a desirable and an undesirable answer (what TRL's KTOTrainer does with paired data)."""
    return [x for r in rows for x in ({"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                                      {"prompt": r["prompt"], "completion": r["rejected"], "label": False})]


def toolkit_trainer(method: str, args, data_path: Path, timer):
    from finetune import kto, orpo
    from finetune import recipe as recipes

    tree = {"model": {"base": BASE, "quantization": args.quant, "device": args.device}, "lora": {"r": 16, "alpha": 32},
            "data": {"train": str(data_path), "max_length": args.max_length}, method: {},
            "training": {"max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "seed": 0, "warmup_ratio": 0.0,
                         "learning_rate": LR}}
    if args.gc != "auto":
        tree["training"]["gradient_checkpointing"] = args.gc == "on"
    built = {"kto": kto, "orpo": orpo}[method].build(recipes.Recipe.model_validate(tree), Path(args.work), [timer])
    return built.trainer, built.settings


def baseline_trainer(method: str, args, rows: list[dict], timer):
    """What a user writes from TRL's docs: the trainer + a LoraConfig, TRL's defaults otherwise."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import resolve_base

    path = resolve_base(BASE, log=lambda s: None).path
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(output_dir=args.work, max_steps=args.steps, per_device_train_batch_size=args.batch, max_length=args.max_length,
                  learning_rate=LR, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=args.device == "cpu",
                  disable_tqdm=True)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)

    def user(x):
        return [{"role": "user", "content": x}]

    def assistant(x):
        return [{"role": "assistant", "content": x}]

    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        ds = datasets.Dataset.from_list([{"prompt": user(x["prompt"]), "completion": assistant(x["completion"]), "label": x["label"]}
                                         for x in unpaired(rows)])
        return KTOTrainer(model=model, args=KTOConfig(**common), train_dataset=ds, processing_class=tok, callbacks=[timer],
                          peft_config=lora)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    ds = datasets.Dataset.from_list([{"prompt": user(x["prompt"]), "chosen": assistant(x["chosen"]), "rejected": assistant(x["rejected"])}
                                     for x in rows])
    return ORPOTrainer(model=model, args=ORPOConfig(**common), train_dataset=ds, processing_class=tok, callbacks=[timer],
                       peft_config=lora)


def side(args) -> dict:
    """One leg (in its own process): `args.what` is `<method>-<toolkit|baseline>`."""
    method, who = args.what.split("-", 1)
    rows = pairs(args.data)
    timer = StepTimer()
    settings = None
    if who == "toolkit":
        data_path = Path(args.data)
        if method == "kto":
            data_path = Path(args.work) / "bench_kto.jsonl"
            data_path.write_text("".join(json.dumps(r) + "\n" for r in unpaired(rows)))
        trainer, settings = toolkit_trainer(method, args, data_path, timer)
    else:
        trainer = baseline_trainer(method, args, rows, timer)
    trainer.train()
    from dataclasses import asdict

    return {"times": timer.times, "losses": timer.losses, "examples": args.steps * args.batch, "peak_mb": peak_mb(args.device),
            "speed": asdict(settings) if settings else None, "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}


def one(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=[f"{m}-{w}" for m in ("kto", "orpo") for w in ("toolkit", "baseline")])
    p.add_argument("--data", required=True)
    p.add_argument("--work", default="/tmp/finetune-bench-methods")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--quant", default="none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gc", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(side(a)))


def measure(what: str, out_dir: Path, **opts) -> dict:
    out = out_dir / f"{what}-{time.time_ns()}.json"
    cmd = [sys.executable, __file__, "one", what, "--out", str(out)] + [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def bench_method(method: str, ctx) -> dict:
    """Baseline, toolkit (automatic settings) and toolkit with gradient checkpointing flipped, alternating per round."""
    legs = {"baseline": [], "toolkit": [], **({"toolkit-gc-flipped": []} if ctx["gc_leg"] else {})}
    auto_gc = None
    for r in range(ctx["rounds"]):
        for leg in legs:
            opts = dict(data=ctx["data"], steps=ctx["steps"], device=ctx["device"], work=ctx["work"] / f"{method}-{leg}")
            if leg == "toolkit-gc-flipped":
                opts["gc"] = "off" if auto_gc else "on"
            res = measure(f"{method}-{leg.split('-gc')[0]}", ctx["raw"], **opts)
            if leg == "toolkit":
                auto_gc = res["gradient_checkpointing"]
            res["median_step_s"] = statistics.median(res["times"][1:] or res["times"])  # the first step warms up
            legs[leg].append(res)
            print(f"{method} {leg} round {r}: median step {res['median_step_s']:.2f}s, gc {res['gradient_checkpointing']}, "
                  f"losses {[round(x, 4) for x in res['losses']]}, peak {res['peak_mb']:.0f} MiB", flush=True)
    out = {}
    for leg, rs in legs.items():
        med = statistics.median(x["median_step_s"] for x in rs)
        out[leg] = {"median_step_s": med, "examples_per_s": ctx["batch"] / med, "peak_mb": max(x["peak_mb"] for x in rs),
                    "gradient_checkpointing": rs[0]["gradient_checkpointing"], "first_loss": rs[0]["losses"][0],
                    "final_loss": rs[0]["losses"][-1]}
    out["speed_settings"] = legs["toolkit"][0]["speed"]
    out["ratio_examples_per_s"] = out["toolkit"]["examples_per_s"] / out["baseline"]["examples_per_s"]
    out["ratio_peak_memory"] = out["toolkit"]["peak_mb"] / out["baseline"]["peak_mb"]
    if "toolkit-gc-flipped" in out:
        out["ratio_auto_vs_flipped_gc"] = out["toolkit"]["examples_per_s"] / out["toolkit-gc-flipped"]["examples_per_s"]
    print(f"{method}: {out['ratio_examples_per_s']:.2f}x examples/s vs plain TRL+PEFT, memory {out['ratio_peak_memory']:.2f}", flush=True)
    return out


def bench_kto(ctx) -> dict:
    return bench_method("kto", ctx)


def bench_orpo(ctx) -> dict:
    return bench_method("orpo", ctx)


def write_section(report: dict) -> None:
    lines = ["", f"## Preference methods beyond DPO · {report['suite']} · {report['date']} · {report['cpus']} cores", "",
             f"Settings: {report['settings']}. Toolkit = the command's own `build`; baseline = the TRL trainer + `LoraConfig` "
             "with TRL's defaults (gradient checkpointing on), same data, LoRA, batch, max_length, learning rate and steps. "
             "`bench/kto_orpo.py`; raw numbers in `bench/results/`.", "",
             "| method | finetune examples/s | plain TRL+PEFT examples/s | ratio | peak MiB (finetune / plain) | first / last loss (finetune; plain) | gc: auto vs flipped |",
             "|---|---|---|---|---|---|---|"]
    for name in ("kto", "orpo"):
        if name not in report:
            continue
        m = report[name]
        t, b, f = m["toolkit"], m["baseline"], m.get("toolkit-gc-flipped")
        lines.append(f"| {name.upper()} | {t['examples_per_s']:.2f} | {b['examples_per_s']:.2f} | **{m['ratio_examples_per_s']:.2f}x** | "
                     f"{t['peak_mb']:.0f} / {b['peak_mb']:.0f} | {t['first_loss']:.4f} → {t['final_loss']:.4f}; "
                     f"{b['first_loss']:.4f} → {b['final_loss']:.4f} | " + (
                         f"gc {'on' if t['gradient_checkpointing'] else 'off'} {t['median_step_s']:.2f} s/step vs "
                         f"{'off' if t['gradient_checkpointing'] else 'on'} {f['median_step_s']:.2f} s/step ({m['ratio_auto_vs_flipped_gc']:.2f}x)"
                         if f else f"gc {'on' if t['gradient_checkpointing'] else 'off'} (flipped leg not run)") + " |")
    lines.append("")
    doc = ROOT / "docs" / "benchmarks.md"
    doc.write_text(doc.read_text().rstrip() + "\n" + "\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        return one(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="one step of each, nothing written")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--work", default="/tmp/finetune-bench-methods")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(METHOD_BENCHES))
    p.add_argument("--no-gc-leg", action="store_true", help="skip the toolkit leg with gradient checkpointing flipped")
    a = p.parse_args()
    work = Path(a.work)
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    bench_data(work)  # writes bench_dpo.jsonl: 24 pairs, prompts and answers of varied length
    ctx = {"device": a.device, "steps": 2 if a.quick else a.steps, "rounds": 1 if a.quick else a.rounds, "batch": 4,
           "work": work, "raw": raw, "data": work / "bench_dpo.jsonl", "gc_leg": not a.no_gc_leg}
    report = {"suite": f"methods-{a.device}{'-quick' if a.quick else ''}", "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
              "settings": {"base": BASE, "max_length": 512, "batch": 4, "lora": "r16 all-linear", "learning_rate": LR,
                           "steps": ctx["steps"], "rounds": ctx["rounds"], "quantization": "none"}}
    for name in (a.only.split(",") if a.only else METHOD_BENCHES):
        report[name] = METHOD_BENCHES[name](ctx)
    if not a.quick:
        results = ROOT / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / f"{report['suite']}-{time.strftime('%Y%m%d-%H%M')}.json").write_text(json.dumps(report, indent=2) + "\n")
        write_section(report)


METHOD_BENCHES = {"kto": bench_kto, "orpo": bench_orpo}


if __name__ == "__main__":
    main()
