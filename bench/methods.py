"""Speed of the reward and GRPO commands against the same method in plain TRL + PEFT (same data, settings, steps).

    .venv/bin/python bench/methods.py                   # CPU, built-in base, a few steps per side
    .venv/bin/python bench/methods.py --quick           # one step per side (smoke)
    .venv/bin/python bench/methods.py --only reward

Each side runs in its own subprocess (clean peak memory), baseline and toolkit alternating, so the ratios
compare like with like on a shared machine. The toolkit side calls the same `build` the command runs.
Results go to bench/results/methods-<date>.json and are printed as table rows for docs/benchmarks.md.
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

GROUP = 4  # GRPO answers per prompt
COMPLETION = 32  # GRPO tokens generated per answer


def length_reward(completions, **kw):
    """The rule reward both GRPO sides use: closeness to 100 characters."""
    text = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [max(0.0, 1 - abs(len(t) - 100) / 100) for t in text]


# ---- one side (runs in a subprocess) -------------------------------------------------------------


def reward_side(args, toolkit: bool) -> dict:
    import datasets
    from trl import RewardConfig, RewardTrainer

    timer = StepTimer()
    if toolkit:
        from finetune import recipe as recipes
        from finetune import reward

        r = recipes.Recipe.model_validate({
            "model": {"base": BASE, "quantization": args.quant, "device": args.device}, "lora": {"r": 16, "alpha": 32},
            "data": {"train": args.data, "max_length": args.max_length}, "reward": {},
            "training": {"max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "seed": 0, "warmup_ratio": 0.0}})
        trainer = reward.build(r, Path(args.work), [timer]).trainer  # the same steps `finetune reward` runs
    else:
        from peft import LoraConfig
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from finetune.models import resolve_base

        path = resolve_base(BASE, log=lambda s: None).path
        rows = [json.loads(line) for line in open(args.data)]
        ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": x["prompt"]}],
                                          "chosen": [{"role": "assistant", "content": x["chosen"]}],
                                          "rejected": [{"role": "assistant", "content": x["rejected"]}]} for x in rows])
        config = RewardConfig(output_dir=args.work, max_steps=args.steps, per_device_train_batch_size=args.batch, max_length=args.max_length,
                              logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=args.device == "cpu", disable_tqdm=True)
        trainer = RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), args=config, train_dataset=ds,
                                processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer],
                                peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS"))
    trainer.train()
    return {"times": timer.times, "losses": timer.losses, "peak_mb": peak_mb(args.device)}


def grpo_side(args, toolkit: bool) -> dict:
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    timer = StepTimer()
    rewards_logged: list[float] = []
    if toolkit:
        from finetune import grpo
        from finetune import recipe as recipes

        r = recipes.Recipe.model_validate({
            "model": {"base": BASE, "quantization": args.quant, "device": args.device}, "lora": {"r": 16, "alpha": 32},
            "data": {"train": args.data, "max_length": args.max_length},
            "grpo": {"rewards": [{"type": "length", "target": 100}], "num_generations": GROUP, "max_completion_length": COMPLETION},
            "training": {"max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "seed": 0, "warmup_ratio": 0.0}})
        trainer = grpo.build(r, Path(args.work), [timer]).trainer  # the same steps `finetune grpo` runs
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from finetune.models import resolve_base

        path = resolve_base(BASE, log=lambda s: None).path
        rows = [json.loads(line) for line in open(args.data)]
        ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": x["prompt"]}]} for x in rows])
        config = GRPOConfig(output_dir=args.work, max_steps=args.steps, per_device_train_batch_size=args.batch, num_generations=GROUP,
                            max_completion_length=COMPLETION, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                            use_cpu=args.device == "cpu", disable_tqdm=True)
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=[length_reward], args=config, train_dataset=ds,
                              processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer],
                              peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    rewards_logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"times": timer.times, "losses": timer.losses, "rewards": rewards_logged, "peak_mb": peak_mb(args.device)}


ONE = {"reward-toolkit": lambda a: reward_side(a, True), "reward-baseline": lambda a: reward_side(a, False),
       "grpo-toolkit": lambda a: grpo_side(a, True), "grpo-baseline": lambda a: grpo_side(a, False)}


def one(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=ONE)
    p.add_argument("--data", required=True)
    p.add_argument("--work", default="/tmp/finetune-bench-methods")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--quant", default="none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(ONE[a.what](a)))


# ---- the legs ------------------------------------------------------------------------------------


def measure(what: str, out_dir: Path, **opts) -> dict:
    out = out_dir / f"{what}-{time.time_ns()}.json"
    cmd = [sys.executable, __file__, "one", what, "--out", str(out)] + [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def median_step(res: dict) -> float:
    return statistics.median(res["times"][1:] or res["times"])  # the first step carries one-time set-up


def bench_reward(ctx) -> dict:
    d = {}
    for side in ("baseline", "toolkit"):
        res = measure(f"reward-{side}", ctx["raw"], data=ctx["work"] / "bench_dpo.jsonl", steps=ctx["steps"], batch=4,
                      quant=ctx["quant"], device=ctx["device"], work=ctx["work"] / f"reward-{side}")
        med = median_step(res)
        d[side] = {"median_step_s": med, "pairs_per_s": 4 / med, "peak_mb": res["peak_mb"], "final_loss": res["losses"][-1]}
        print(f"reward {side}: median step {med:.2f}s, final loss {res['losses'][-1]:.4f}, peak {res['peak_mb']:.0f} MiB")
    out = {**d, "ratio_pairs_per_s": d["toolkit"]["pairs_per_s"] / d["baseline"]["pairs_per_s"],
           "ratio_peak_memory": d["toolkit"]["peak_mb"] / d["baseline"]["peak_mb"]}
    print(f"reward: {out['ratio_pairs_per_s']:.2f}x pairs/s, memory ratio {out['ratio_peak_memory']:.2f}")
    return out


def bench_grpo(ctx) -> dict:
    prompts = ctx["work"] / "bench_grpo.jsonl"
    rows = [json.loads(line) for line in open(ctx["data"])][:32]
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    d = {}
    for side in ("baseline", "toolkit"):
        res = measure(f"grpo-{side}", ctx["raw"], data=prompts, steps=ctx["steps"], batch=2 * GROUP, quant=ctx["quant"],
                      device=ctx["device"], work=ctx["work"] / f"grpo-{side}")
        med = median_step(res)
        d[side] = {"median_step_s": med, "answers_per_s": 2 * GROUP / med, "peak_mb": res["peak_mb"],
                   "mean_reward": statistics.mean(res["rewards"]) if res["rewards"] else None}
        print(f"grpo {side}: median step {med:.2f}s, mean reward {d[side]['mean_reward']}, peak {res['peak_mb']:.0f} MiB")
    out = {**d, "ratio_answers_per_s": d["toolkit"]["answers_per_s"] / d["baseline"]["answers_per_s"],
           "ratio_peak_memory": d["toolkit"]["peak_mb"] / d["baseline"]["peak_mb"]}
    print(f"grpo: {out['ratio_answers_per_s']:.2f}x answers/s, memory ratio {out['ratio_peak_memory']:.2f}")
    return out


def table_rows(r: dict) -> list[str]:
    """Rows for docs/benchmarks.md (same columns as bench/run.py's table)."""
    lines = []
    if "reward" in r:
        w = r["reward"]
        lines += [f"| reward model pairs/s | {w['toolkit']['pairs_per_s']:.2f} | {w['baseline']['pairs_per_s']:.2f} | **{w['ratio_pairs_per_s']:.2f}x** |",
                  f"| reward model peak memory (MiB) | {w['toolkit']['peak_mb']:.0f} | {w['baseline']['peak_mb']:.0f} | {w['ratio_peak_memory']:.2f} |",
                  f"| reward model final loss | {w['toolkit']['final_loss']:.4f} | {w['baseline']['final_loss']:.4f} | |"]
    if "grpo" in r:
        g = r["grpo"]
        lines += [f"| GRPO answers/s ({GROUP} per prompt, {COMPLETION} new tokens) | {g['toolkit']['answers_per_s']:.2f} | "
                  f"{g['baseline']['answers_per_s']:.2f} | **{g['ratio_answers_per_s']:.2f}x** |",
                  f"| GRPO peak memory (MiB) | {g['toolkit']['peak_mb']:.0f} | {g['baseline']['peak_mb']:.0f} | {g['ratio_peak_memory']:.2f} |"]
    return lines


METHOD_BENCHES = {"reward": bench_reward, "grpo": bench_grpo}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        return one(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="one step per side, nothing written")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--quant", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--work", default="/tmp/finetune-bench-methods")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(METHOD_BENCHES))
    args = p.parse_args()
    work = Path(args.work)
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    ctx = {"device": args.device, "quant": args.quant, "steps": 2 if args.quick else args.steps, "work": work, "raw": raw,
           "data": bench_data(work)}
    report = {"suite": f"methods-{args.device}", "date": time.strftime("%Y-%m-%d %H:%M"), "steps": ctx["steps"], "base": BASE}
    for name in (args.only.split(",") if args.only else list(METHOD_BENCHES)):
        report[name] = METHOD_BENCHES[name](ctx)
    print("\n".join(table_rows(report)))
    if not args.quick:
        results = ROOT / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / f"{report['suite']}-{time.strftime('%Y%m%d-%H%M')}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
