"""`finetune eval MODEL... --prompts FILE`: greedy answers from every model, side by side, with metrics.

Prompts come from any file the toolkit reads (messages, ShareGPT, alpaca, prompt/completion, question/
answer, text); a final assistant turn, `completion`, `output` or `answer` is the reference. Every model
answers with the same settings (greedy, same max_new_tokens, its chat template, stopping at the
template's end of turn). Written as answers.jsonl and report.html (self-contained) under --out.
Metrics come from maintained packages (sacrebleu for chrF/BLEU, rouge-score for ROUGE-L) where a
reference exists; always the answer length and the stop rate: the share of answers that ended with the
end-of-turn token instead of running into max_new_tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from finetune import data, llamacpp, models
from finetune.data import formats
from finetune.errors import UserError

err = Console(stderr=True, highlight=False)


def prompt_of(d: dict, where: str) -> tuple[list[dict], str | None] | None:
    """One row -> (messages to answer, reference or None); None when the row holds no prompt."""
    if d.get("messages") is not None or d.get("conversations") is not None:
        fmt = formats.detect(d, where)
        if fmt == "sharegpt":
            msgs = formats.turns(d["conversations"], where, "conversations", "from", "value")
        else:
            key = "messages" if d.get("messages") is not None else "conversations"
            msgs = formats.turns(d[key], where, key)
        ref = None
        if msgs and msgs[-1]["role"] == "assistant":
            ref, msgs = msgs[-1]["content"], msgs[:-1]
        return (msgs, ref) if any(m["role"] == "user" for m in msgs) else None
    for key, answer in (("instruction", "output"), ("prompt", "completion"), ("question", "answer"), ("text", None)):
        value = d.get(key)
        if isinstance(value, str) and value.strip():
            if key == "instruction" and isinstance(d.get("input"), str) and d["input"].strip():
                value += "\n\n" + d["input"]
            msgs = [{"role": "system", "content": d["system"]}] if isinstance(d.get("system"), str) and d["system"].strip() else []
            ref = d.get(answer) if answer else None
            return msgs + [{"role": "user", "content": value}], ref if isinstance(ref, str) and ref.strip() else None
        if key == "prompt" and isinstance(value, list):
            return formats.turns(value, where, "prompt"), d.get("completion") if isinstance(d.get("completion"), str) else None
    return None


def read_prompts(path: Path, limit: int | None = None) -> list[dict]:
    if not path.is_file():
        raise UserError(f"--prompts: {path} not found — pass a .jsonl, .json, .csv, .parquet or .txt file of prompts")
    rows, _ = data.read(str(path), {})
    out = []
    for r in rows:
        got = prompt_of(r.data, r.where)
        if got is not None:
            out.append({"where": r.where, "messages": got[0], "reference": got[1]})
    if not out:
        raise UserError(f"--prompts: {path} holds no prompts — each row needs messages with a user turn, or one of "
                        "`prompt`, `instruction`, `question` or `text`")
    return out[:limit] if limit else out


def stop_rate(answers: list[dict]) -> float:
    """Share of answers that ended with an end-of-turn token (not cut off by max_new_tokens)."""
    return sum(bool(a["stopped"]) for a in answers) / len(answers) if answers else 0.0


def ended_with_stop(new_ids: list[int], stop_ids: list[int]) -> bool:
    return bool(new_ids) and new_ids[-1] in stop_ids


def generate_all(loaded, prompts: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy answers; stop at the chat template's end of turn (and EOS)."""
    import torch

    from finetune.data import end_of_turn_ids

    tok = loaded.tokenizer
    eos = loaded.model.generation_config.eos_token_id
    stop_ids = list(dict.fromkeys(([eos] if isinstance(eos, int) else list(eos or [])) + end_of_turn_ids(tok)))
    out = []
    for p in prompts:
        ids = tok.apply_chat_template(p["messages"], tokenize=True, add_generation_prompt=True, return_dict=False)
        x = torch.tensor([ids], device=loaded.model.device)
        with torch.inference_mode():
            y = loaded.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, temperature=None,
                                      top_p=None, top_k=None, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                      pad_token_id=tok.pad_token_id)
        new = y[0, len(ids):].tolist()
        out.append({"text": tok.decode(new, skip_special_tokens=True).strip(), "tokens": len(new),
                    "stopped": ended_with_stop(new, stop_ids)})
    return out


def reference_metrics(answer: str, reference: str) -> dict:
    """Exact match (trimmed, case-folded), chrF and BLEU (sacrebleu), ROUGE-L F1 (rouge-score); 0-100 except EM."""
    import sacrebleu
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, answer)["rougeL"].fmeasure
    return {"exact_match": float(answer.strip().casefold() == reference.strip().casefold()),
            "chrf": sacrebleu.sentence_chrf(answer, [reference]).score,
            "bleu": sacrebleu.sentence_bleu(answer, [reference]).score,
            "rougeL": 100 * rouge}


def summary(prompts: list[dict], answers: list[dict]) -> dict:
    s = {"answers": len(answers), "stop_rate": stop_rate(answers),
         "mean_tokens": sum(a["tokens"] for a in answers) / len(answers),
         "mean_words": sum(len(a["text"].split()) for a in answers) / len(answers)}
    scored = [a["metrics"] for a in answers if a.get("metrics")]
    for key in ("exact_match", "chrf", "bleu", "rougeL"):
        if scored:
            s[key] = sum(m[key] for m in scored) / len(scored)
    if scored:
        s["with_reference"] = len(scored)
    return s


def check(specs: list[str], prompts_path: Path, max_new_tokens: int, out: Path) -> list[dict]:
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if any(llamacpp.is_gguf_file(s) for s in specs):
        llamacpp.require()  # a GGUF answers in llama.cpp: its wheel is checked before any model loads
    if len(set(specs)) < len(specs):
        raise UserError("--prompts: a model is listed twice — answers and verdicts are kept per model, so name each once")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file — name a folder for answers.jsonl and report.html")
    return read_prompts(prompts_path)


def answer_all(specs: list[str], prompts: list[dict], *, max_new_tokens: int, quantization: str | None, dtype: str) -> dict:
    by_model = {}
    for spec in specs:
        if llamacpp.is_gguf_file(spec):  # same prompts, settings and stop rule, generated in llama.cpp
            from finetune import gguf_eval

            got = gguf_eval.generate_all(Path(spec), prompts, max_new_tokens)
        else:
            loaded, _ = models.load_any(spec, quantization=quantization, dtype=dtype, log=err.print)
            data.ensure_chat_template(loaded.tokenizer)
            got = generate_all(loaded, prompts, max_new_tokens)
            del loaded
        for p, a in zip(prompts, got):
            if p["reference"] is not None:
                a["metrics"] = reference_metrics(a["text"], p["reference"])
        by_model[spec] = got
    return by_model


def write(out: Path, prompts: list[dict], by_model: dict, summaries: dict, judge: dict | None, settings: dict) -> None:
    """answers.jsonl (one line per prompt) and report.html, each written to a temporary name and renamed."""
    from finetune import report

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, p in enumerate(prompts):
        row = {"where": p["where"], "messages": p["messages"], "reference": p["reference"],
               "answers": {m: by_model[m][i] for m in by_model}}
        if judge:
            row["judge"] = {m: judge["pairs"][m]["verdicts"][i] for m in judge["pairs"]}
        lines.append(json.dumps(row, ensure_ascii=False))
    for name, text in (("answers.jsonl", "\n".join(lines) + "\n"),
                       ("report.html", report.html(prompts, by_model, summaries, judge, settings))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


def run(specs: list[str], prompts_path: Path, out: Path, *, max_new_tokens: int, quantization: str | None, dtype: str,
        judge_spec: str | None, judge_model: str | None, judge_prompt: Path | None, as_json: bool) -> dict:
    from rich.table import Table

    from finetune import judge as judging

    prompts = check(specs, prompts_path, max_new_tokens, out)
    template = judging.load_prompt(judge_prompt) if judge_spec or judge_prompt else None
    if judge_prompt and not judge_spec:
        raise UserError("--judge-prompt needs --judge MODEL_OR_URL")
    if judge_spec and len(specs) < 2:
        raise UserError("--judge compares models with the first one: name at least two models")
    judge = judging.open_judge(judge_spec, judge_model, quantization, dtype, generate_all) if judge_spec else None  # URL and key checked now
    by_model = answer_all(specs, prompts, max_new_tokens=max_new_tokens, quantization=quantization, dtype=dtype)
    summaries = {m: summary(prompts, a) for m, a in by_model.items()}
    verdicts = judging.judge_pairs(judge, prompts, by_model, template) if judge else None
    settings = {"prompts": str(prompts_path), "decoding": "greedy", "max_new_tokens": max_new_tokens, "dtype": dtype}
    write(out, prompts, by_model, summaries, verdicts, settings)
    result = {"out": str(out), "summaries": summaries,
              "judge": {k: v for k, v in verdicts.items() if k != "pairs"} | {
                  "pairs": {m: {k: v for k, v in p.items() if k != "verdicts"} for m, p in verdicts["pairs"].items()}} if verdicts else None}
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    t = Table(title=f"answers to {len(prompts)} prompts from {prompts_path}")
    cols = ["model", "stop rate", "mean tokens"] + (["exact match", "chrF", "ROUGE-L"] if any("chrf" in s for s in summaries.values()) else [])
    cols += ["judge: win / tie / loss (unparseable)", "win rate 95 % CI"] if verdicts else []
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right")
    for m, s in summaries.items():
        row = [m, f"{s['stop_rate']:.0%}", f"{s['mean_tokens']:.1f}"]
        if "exact match" in cols:
            row += [f"{s.get('exact_match', 0):.2f}", f"{s.get('chrf', 0):.1f}", f"{s.get('rougeL', 0):.1f}"]
        if verdicts:
            p = verdicts["pairs"].get(m)
            row += ([f"{p['win']} / {p['tie']} / {p['loss']} ({p['unparseable']})", f"{p['win_ci95'][0]:.2f}–{p['win_ci95'][1]:.2f}"]
                    if p else ["(reference)", ""])
        t.add_row(*row)
    Console().print(t)
    err.print(f"answers: {out / 'answers.jsonl'}\nreport:  {out / 'report.html'}", soft_wrap=True)
    return result
