"""Serving benchmark: 8 concurrent greedy clients against the same 8 requests one at a time.

    .venv/bin/python bench/serve.py [--adapter adapters/quickstart] [--dtype bf16|fp32] [--tokens 64]

Starts `finetune serve` on the built-in base (plus the adapter, whose requests then share batches with
the base's), sends 8 chat requests one after another with the official `openai` client, then the same
8 at once from 8 threads, and reports aggregate completion tokens/s of both and whether every
concurrent answer equals its one-at-a-time answer (token for token). Results: bench/results/serve-*.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is your name?", "Name three planets.", "Why is the sky blue?", "Write a haiku about rain.",
           "What is 12 times 7?", "Give me a tip for learning to cook.", "Who are you?", "Describe a cat in one sentence."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default="")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="the server's --threads (0: its automatic choice)")
    args = p.parse_args()
    import openai

    port = free_port()
    specs = [args.base] + ([args.adapter] if args.adapter else [])
    log = open(f"/tmp/finetune-bench-serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", *specs, "--port", str(port), "--dtype", args.dtype,
                             "--max-batch", str(args.clients), "--threads", str(args.threads)], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        for _ in range(1200):
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {Path(log.name).read_text()}")
            try:
                names = [m.id for m in client.models.list().data]
                break
            except openai.APIConnectionError:
                time.sleep(0.25)
        # requests alternate between the adapter and the base when there is an adapter: mixed batches
        jobs = [(names[(i % len(names))] if args.adapter else names[0], q) for i, q in enumerate(PROMPTS[: args.clients])]

        def ask(job):
            model, q = job
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], temperature=0,
                                               max_tokens=args.tokens)
            return r.choices[0].message.content, r.usage.completion_tokens

        import urllib.request

        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60).read())
        ask(jobs[0])  # warm-up
        t = time.perf_counter()
        alone = [ask(j) for j in jobs]
        t_alone = time.perf_counter() - t
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(ask, jobs))
        t_together = time.perf_counter() - t
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    tokens_alone, tokens_together = sum(n for _, n in alone), sum(n for _, n in together)
    same = [a[0] == b[0] for a, b in zip(alone, together)]
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "base": args.base, "adapter": args.adapter or None,
        "dtype": args.dtype, "threads": health.get("threads"), "load_average": os.getloadavg()[0], "clients": len(jobs),
        "max_tokens": args.tokens,
        "one_at_a_time": {"seconds": round(t_alone, 2), "completion_tokens": tokens_alone, "tokens_per_s": round(tokens_alone / t_alone, 2)},
        "concurrent": {"seconds": round(t_together, 2), "completion_tokens": tokens_together,
                       "tokens_per_s": round(tokens_together / t_together, 2)},
        "speedup": round((tokens_together / t_together) / (tokens_alone / t_alone), 2),
        "identical_answers": f"{sum(same)}/{len(same)}",
        "differing": [{"request": jobs[i], "alone": alone[i][0], "concurrent": together[i][0]} for i, s in enumerate(same) if not s],
    }
    out = REPO / "bench" / "results" / f"serve-{time.strftime('%Y%m%d-%H%M', time.gmtime())}-{args.dtype}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"serve {args.dtype}, {result['threads']} threads: {len(jobs)} concurrent clients {result['concurrent']['tokens_per_s']} tok/s vs one at a time "
          f"{result['one_at_a_time']['tokens_per_s']} tok/s = {result['speedup']}x; identical answers {result['identical_answers']} "
          f"({out.relative_to(REPO)})")


if __name__ == "__main__":
    main()
