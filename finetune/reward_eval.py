"""`finetune eval REWARD_MODEL... --data PAIRS` / `--prompts ANSWERS`: what a reward model (a `finetune reward`
folder) says about a file.

--data with preference pairs (any format `finetune reward` reads): accuracy (the chosen answer scored above
the rejected one) and the mean margin. --prompts with answers (prompt/completion, messages, alpaca, ...):
the score of every answer, written to OUT/scores.jsonl. Conversations are scored as the chat template renders
them, exactly as the reward model was trained and as `finetune grpo` scores answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finetune import data, models
from finetune.errors import UserError
from finetune.recipe import ModelSection

err = Console(stderr=True, highlight=False)


def is_reward_model(spec: str) -> bool:
    info = models.adapter_info(Path(spec)) if Path(spec).is_dir() else None
    return info is not None and info["config"].get("task_type") == "SEQ_CLS"


def load(spec: str, quantization: str | None, dtype: str):
    """The reward model as PEFT holds it (base with a score head + the adapter), and its tokenizer."""
    from peft import PeftModel

    folder = Path(spec)
    info = models.adapter_info(folder)
    try:
        loaded = models.load(ModelSection(base=info["base"], quantization=quantization or info["quantization"] or "none", dtype=dtype),
                             for_training=False, classifier=True, log=err.print)
    except UserError as exc:
        raise UserError(f"reward model {folder}: its base cannot be loaded — {exc}") from None
    model = PeftModel.from_pretrained(loaded.model, str(folder)).eval()
    tokenizer = models.load_tokenizer(str(folder))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def scores(model, tokenizer, conversations: list[list[dict]]) -> list[float]:
    """One score per conversation (one at a time: no padding, so no pad-position question)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for conv in conversations:
            ids = tokenizer(text=data.render(tokenizer, conv), add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out.append(float(model(input_ids=ids).logits[0, 0].float()))
    return out


def read(path: Path, method: str) -> list[tuple[dict, str]]:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    rows, _ = data.read(str(path), {})
    return data.normalise(rows, "auto", method, None)[1]


def run(specs: list[str], pairs: Path | None, answers: Path | None, out: Path, *, quantization: str | None, dtype: str,
        as_json: bool) -> None:
    others = [s for s in specs if not is_reward_model(s)]
    if others:
        raise UserError(f"{others[0]} is not a reward model, and {specs[0] if others[0] != specs[0] else specs[-1]} is: "
                        "evaluate reward models (folders from `finetune reward`) and language models in separate runs")
    pair_records = read(pairs, "reward") if pairs else []
    answer_records = read(answers, "sft") if answers else []
    if answers and any("messages" not in rec for rec, _ in answer_records):
        raise UserError(f"{answers}: plain text rows have no prompt and answer — give prompt/completion or messages rows")
    results = []
    for spec in specs:
        model, tokenizer = load(spec, quantization, dtype)
        result = {"model": spec}
        if pair_records:
            chosen = scores(model, tokenizer, [rec["prompt"] + rec["chosen"] for rec, _ in pair_records])
            rejected = scores(model, tokenizer, [rec["prompt"] + rec["rejected"] for rec, _ in pair_records])
            margins = [c - r for c, r in zip(chosen, rejected)]
            result.update(pairs=len(margins), accuracy=sum(m > 0 for m in margins) / len(margins), mean_margin=sum(margins) / len(margins))
        if answer_records:
            got = scores(model, tokenizer, [rec["messages"] for rec, _ in answer_records])
            result.update(answers=len(got), mean_score=sum(got) / len(got))
            result["scores"] = [{"where": where, "score": s} for (_, where), s in zip(answer_records, got)]
        results.append(result)
        del model
    if answer_records:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "scores.jsonl").open("w") as fh:
            for i, (rec, where) in enumerate(answer_records):
                conv = rec["messages"]
                fh.write(json.dumps({"where": where, "prompt": conv[-2]["content"] if len(conv) > 1 else "",
                                     "answer": conv[-1]["content"], **{r["model"]: r["scores"][i]["score"] for r in results}},
                                    ensure_ascii=False) + "\n")
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "scores"} for r in results], indent=2))
        return
    t = Table(title="reward model")
    cols = ["model"] + (["pairs", "accuracy", "mean margin"] if pair_records else []) + (["answers", "mean score"] if answer_records else [])
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right", overflow="fold")
    for r in results:
        row = [r["model"]]
        if pair_records:
            row += [str(r["pairs"]), f"{r['accuracy']:.3f}", f"{r['mean_margin']:.3f}"]
        if answer_records:
            row += [str(r["answers"]), f"{r['mean_score']:.3f}"]
        t.add_row(*row)
    Console().print(t)
    if answer_records:
        err.print(f"scores of every answer: {out / 'scores.jsonl'}")
