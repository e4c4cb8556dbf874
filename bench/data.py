"""Data preparation at scale: finetune's data path against TRL's own SFT preprocessing of the same rows.

    .venv/bin/python bench/data.py                  # 100,000 chat rows (minutes on 2 cores)
    .venv/bin/python bench/data.py --rows 5000      # a quicker look

The rows are generated here (messages format: an optional system message, one to three exchanges,
answers from a sentence to a few paragraphs, so some exceed max_length). Every side runs in its own
subprocess with its own empty caches and times only the preparation, from the file on disk to token ids
and labels; importing the libraries and loading the tokenizer are outside the timer on every side:

- finetune, first run: `data.prepare` with an empty prepared-data cache (reads, checks, tokenizes in
  worker processes, fits max_length, stores the result).
- finetune, cached run: `data.prepare` again on the same cache (what a second run, `--resume` and
  `inspect` after `sft` do).
- TRL: `datasets.load_dataset("json")` then the real `SFTTrainer._prepare_dataset` of a real trainer
  (chat template, assistant-only mask, labels, truncation to max_length), with an empty datasets cache,
  with TRL's default `dataset_num_proc` (one process) and with one process per core.

Both sides use the built-in base's tokenizer with the same ChatML template (with the `{% generation %}`
tags TRL needs for `assistant_only_loss`) and the same max_length. Results: bench/results/data-*.json and
a section appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASE = "smollm2-135m-instruct"
MAX_LENGTH = 1024


def generate(path: Path, n: int, seed: int = 0) -> Path:
    """`n` chat rows of varied length (about 30 to 1,500 tokens)."""
    rng = random.Random(seed)
    words = ("the star planet moon light orbit telescope comet galaxy nebula ring ice rock gas cloud dust bright faint "
             "distant near cold hot slowly quickly large small ancient young red blue white of and in with from").split()

    def text(lo: int, hi: int) -> str:
        sentences = []
        for _ in range(rng.randint(lo, hi)):
            sentences.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 16))).capitalize() + ".")
        return " ".join(sentences)

    with path.open("w") as fh:
        for i in range(n):
            msgs = [{"role": "system", "content": "You are a helpful astronomer."}] if rng.random() < 0.3 else []
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                msgs += [{"role": "user", "content": f"Question {i}: " + text(1, 3)},
                         {"role": "assistant", "content": text(1, 12) if rng.random() < 0.9 else text(30, 80)}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


def tokenizer():
    from finetune.data.template import DEFAULT_CHAT_TEMPLATE
    from finetune.models import load_tokenizer, resolve_base

    tok = load_tokenizer(resolve_base(BASE, log=lambda s: None).path)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE  # ChatML with generation tags: TRL's assistant-only mask needs them
    return tok


# ---- one side (runs in a subprocess) ---------------------------------------------------------------


def peak_rss() -> dict:
    """Peak resident memory of this process and of its largest worker process, in MiB."""
    import resource

    mib = lambda ru: round(ru.ru_maxrss / 1024)  # noqa: E731 (kilobytes on Linux)
    return {"peak_rss_mib": mib(resource.getrusage(resource.RUSAGE_SELF)),
            "peak_worker_rss_mib": mib(resource.getrusage(resource.RUSAGE_CHILDREN))}


def finetune_side(a) -> dict:
    from finetune import data
    from finetune.recipe import DataSection

    tok = tokenizer()
    section = DataSection(train=a.data, max_length=MAX_LENGTH)
    t = time.perf_counter()
    prepared = data.prepare(section, tok, "sft", 42, log=lambda s: None)
    seconds = time.perf_counter() - t
    tokens = int(prepared.train.lengths().sum())
    return {"seconds": seconds, "cache": prepared.cache, "examples": len(prepared.train), "tokens": tokens,
            "truncated": prepared.truncated, "dropped": sum(prepared.dropped.values()), **peak_rss()}


def trl_side(a) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from finetune.models import resolve_base

    tok = tokenizer()
    model = AutoModelForCausalLM.from_pretrained(resolve_base(BASE, log=lambda s: None).path)
    args = SFTConfig(output_dir=a.work, max_length=MAX_LENGTH, assistant_only_loss=True, dataset_num_proc=a.num_proc or None,
                     use_cpu=True, report_to=[], disable_tqdm=True)
    two = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}] * 2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=two, processing_class=tok)
    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=a.data, split="train")
    ds = trainer._prepare_dataset(ds, tok, args, False, None, "train")  # TRL's own preprocessing, as SFTTrainer runs it
    seconds = time.perf_counter() - t
    tokens = sum(len(ids) for ids in ds["input_ids"])
    return {"seconds": seconds, "examples": len(ds), "tokens": tokens, "num_proc": a.num_proc or 1, **peak_rss()}


def one(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("side", choices=("finetune", "trl"))
    p.add_argument("--data", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--num-proc", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    Path(a.out).write_text(json.dumps({"finetune": finetune_side, "trl": trl_side}[a.side](a)))


# ---- the suite -------------------------------------------------------------------------------------


def measure(side: str, data: Path, work: Path, env: dict, **opts) -> dict:
    out = work / f"{side}-{time.time_ns()}.json"
    cmd = [sys.executable, __file__, "one", side, "--data", str(data), "--work", str(work), "--out", str(out)]
    cmd += [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, **env, "PYTHONWARNINGS": "ignore", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        return one(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--work", default=None, help="scratch folder (default: a new one under /tmp)")
    p.add_argument("--no-table", action="store_true", help="do not append the result to docs/benchmarks.md")
    p.add_argument("--no-trl-parallel", action="store_true", help="skip TRL with one process per core")
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="finetune-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = generate(work / "chat.jsonl", a.rows)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    # our side gets an empty cache of its own; the converted built-in base is shared into it, not converted again
    from finetune.models import cache_root, resolve_base

    resolve_base(BASE, log=lambda s: None)
    (work / "finetune-cache").mkdir(exist_ok=True)
    if not (work / "finetune-cache" / "bases").exists():
        (work / "finetune-cache" / "bases").symlink_to(cache_root() / "bases")
    ours = {"FINETUNE_CACHE": str(work / "finetune-cache")}
    r: dict = {"rows": a.rows, "bytes": data.stat().st_size, "cpus": cpus, "load_before": load, "max_length": MAX_LENGTH}
    print(f"{a.rows} rows ({data.stat().st_size / 1e6:.1f} MB), {cpus} cores, load {load}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    result = ROOT / "bench" / "results" / f"data-{a.rows}-{stamp}.json"

    def save():  # after every side, so a long run that is stopped keeps what it measured
        result.write_text(json.dumps(r, indent=1))

    r["trl"] = measure("trl", data, work, {"HF_DATASETS_CACHE": str(work / "hf-1")})
    save()
    print("TRL, one process:", r["trl"], flush=True)
    r["finetune_first"] = measure("finetune", data, work, ours)
    print("finetune, first run:", r["finetune_first"], flush=True)
    save()
    r["finetune_cached"] = measure("finetune", data, work, ours)
    print("finetune, cached run:", r["finetune_cached"], flush=True)
    save()
    if cpus > 1 and not a.no_trl_parallel:
        r["trl_parallel"] = measure("trl", data, work, {"HF_DATASETS_CACHE": str(work / "hf-2")}, num_proc=cpus)
        print(f"TRL, num_proc={cpus}:", r["trl_parallel"], flush=True)
        save()
    r["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    base = r["trl"]["seconds"]
    r["ratios"] = {"first_vs_trl": r["finetune_first"]["seconds"] / base, "cached_vs_trl": r["finetune_cached"]["seconds"] / base}
    if "trl_parallel" in r:
        r["ratios"]["first_vs_trl_parallel"] = r["finetune_first"]["seconds"] / r["trl_parallel"]["seconds"]
    r["ratios"]["cached_vs_first"] = r["finetune_cached"]["seconds"] / r["finetune_first"]["seconds"]
    # memory: the main process alone, and with its largest worker added (forked workers share pages, so the sum overstates)
    both = lambda side: side["peak_rss_mib"] + side["peak_worker_rss_mib"]  # noqa: E731
    r["ratios"]["peak_memory_vs_trl"] = r["finetune_first"]["peak_rss_mib"] / r["trl"]["peak_rss_mib"]
    r["ratios"]["peak_memory_with_workers_vs_trl"] = both(r["finetune_first"]) / both(r["trl"])
    print(json.dumps(r["ratios"]), flush=True)
    save()
    if not a.no_table:
        write_table(r, stamp)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


def write_table(r: dict, stamp: str) -> None:
    def row(name: str, side: dict, ratio: str = "") -> str:
        memory = f"{side['peak_rss_mib']:,}" + (f" + workers {side['peak_worker_rss_mib']:,}" if side["peak_worker_rss_mib"] > 100 else "")
        return f"| {name} | {side['seconds']:.1f} | {side['examples']:,} | {side['tokens']:,} | {memory} | {ratio} |"

    base = r["trl"]["seconds"]
    lines = [
        "", "", f"## Data preparation · cpu · {stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:]} UTC · {r['rows']:,} chat rows · {r['cpus']} cores shared "
        f"(load average {r['load_before']:.1f} before, {r['load_after']:.1f} after)", "",
        f"`python bench/data.py --rows {r['rows']}`: {r['rows']:,} generated chat rows ({r['bytes'] / 1e6:.0f} MB), the built-in base's "
        f"tokenizer with the same ChatML template, max_length {r['max_length']}, loss on the assistant turns on both sides. "
        "Time from the file on disk to token ids and labels, each side in its own process with empty caches.", "",
        "| side | seconds | examples | tokens | peak memory (MiB) | vs TRL (1 process) |", "|---|---|---|---|---|---|",
        row("TRL `SFTTrainer._prepare_dataset`, default (1 process)", r["trl"], "1.00"),
    ]
    if "trl_parallel" in r:
        lines.append(row(f"TRL, `dataset_num_proc={r['cpus']}`", r["trl_parallel"], f"{r['trl_parallel']['seconds'] / base:.2f}"))
    lines += [row("finetune `data.prepare`, first run", r["finetune_first"], f"**{r['ratios']['first_vs_trl']:.2f}**"),
              row("finetune `data.prepare`, cached run", r["finetune_cached"], f"**{r['ratios']['cached_vs_trl']:.3f}**")]
    q = r["ratios"]
    lines += ["", f"Ratios: first run / TRL **{q['first_vs_trl']:.2f}**, cached run / first run **{q['cached_vs_first']:.3f}**, "
              f"peak memory / TRL's **{q['peak_memory_vs_trl']:.2f}** (main process), {q['peak_memory_with_workers_vs_trl']:.2f} "
              "(main process + its largest worker on each side; forked workers share pages with the parent, so this overstates)."]
    with (ROOT / "docs" / "benchmarks.md").open("a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
