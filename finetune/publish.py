"""The last step of every training method: the run summary, the manifest, and the adapter folder written to
a staging sibling and renamed into place (usable without this toolkit: PEFT adapter, tokenizer, generation
config with the end-of-turn stop, recipe, metrics, loss plot, model card)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from finetune import artifacts, launch, models
from finetune.memory import peak_memory
from finetune.preflight import Plan
from finetune.recipe import Recipe
from finetune.speed import RunSettings
from finetune.training import TokenCounts, Trained, console
from finetune.turns import end_of_turn_ids

EVAL_TABLE = "eval.txt"  # the final evaluation's perplexity table, base against the trained adapter


def summarise(trainer, plan: Plan, loaded: models.Loaded, metrics: list[dict], final: dict, trained: Trained,
              counts: TokenCounts | None, started: float) -> dict:
    """The numbers a person reads at the end of a run (speeds are of this process's part of the run)."""
    args = trainer.args
    processes = launch.world_size()
    steps_here = trainer.state.global_step - trained.start_step
    seconds = max(trained.seconds, 1e-9)
    peak = peak_memory(loaded.device)
    tokens = tokens_seen(trainer, counts)
    train_losses = [r["loss"] for r in metrics if "loss" in r]
    summary = {
        "steps": trainer.state.global_step,
        "steps this run": steps_here,
        "processes": processes,
        "trained tokens": int(launch.total(counts.trained)) if counts is not None else None,
        "wall time (s)": round(time.time() - started, 1),
        "train time (s)": round(trained.seconds, 2),
        "tokens/s": round(tokens / seconds, 1) if tokens is not None else None,  # shown as "-": not 0 when nothing counted them
        "examples/s": round(steps_here * args.per_device_train_batch_size * args.gradient_accumulation_steps * processes / seconds, 2),
        "peak memory (MiB)": round(launch.largest(peak.used_mb)),  # of the busiest process
        # significant digits, not decimals: a reward model's loss of 3e-5 must not print as 0.0
        "final train loss": significant(train_losses[-1]) if train_losses else (significant(final["train_loss"]) if "train_loss" in final else None),
        "eval loss": significant(final["eval_loss"]) if "eval_loss" in final else None,
        "eval perplexity": round(final["eval_perplexity"], 3) if "eval_perplexity" in final else None,
    }
    if peak.reserved_mb is not None:
        summary["peak reserved memory (MiB)"] = round(launch.largest(peak.reserved_mb))
    return summary


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def tokens_seen(trainer, counts: TokenCounts | None) -> int | None:
    """Real (non-padding) tokens processed by all processes: counted by our SFT and ORPO trainers, by TRL's
    `num_tokens` (already summed over processes) for DPO, KTO, reward and GRPO; None where nothing counted them."""
    if counts is not None:
        return int(launch.total(counts.real))
    rows = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    return int(rows[-1]) if rows else None


def manifest(recipe: Recipe, plan: Plan, loaded: models.Loaded, prepared, settings: RunSettings, summary: dict, final: dict,
             started: float, method_settings: dict | None = None) -> dict:
    processes = launch.world_size()
    record = {
        "method": plan.method,
        "versions": artifacts.library_versions(),
        "git_commit": artifacts.git_commit(),
        "base": {"spec": loaded.base.spec, "kind": loaded.base.kind, **models.weights_identity(loaded.base.path)},
        "quantization": loaded.quantization,
        "adapter_start": recipe.model.adapter,
        "data": {"format": prepared.format, "files": prepared.files, "train_examples": len(prepared.train),
                 "validation_examples": len(prepared.validation), "truncated": prepared.truncated, "dropped": prepared.dropped,
                 "prepared_cache": prepared.cache},
        "seed": recipe.training.seed,
        "processes": processes,
        "distributed": asdict(launch.from_environment()) if processes > 1 else None,
        "machine": artifacts.machine(),
        "speed": asdict(settings),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "summary": summary,
        "final_metrics": final,
    }
    if method_settings:  # what a method chose from the data (KTO's class weights), under the method's name
        record[plan.method] = method_settings
    return record


def adapter(trainer, recipe: Recipe, plan: Plan, loaded: models.Loaded, prepared, settings: RunSettings, metrics: list[dict],
            final: dict, trained: Trained, counts: TokenCounts | None, started: float, eval_table: str | None = None,
            method_settings: dict | None = None) -> Path:
    """Write the adapter folder (process 0; every process takes part in gathering a sharded adapter). `eval_table`:
    the final evaluation's perplexity table, written as eval.txt; `method_settings`: what the method chose from
    the data (KTO's class weights), written into the manifest under the method's name."""
    import torch

    out = plan.out
    summary = summarise(trainer, plan, loaded, metrics, final, trained, counts, started)
    record = manifest(recipe, plan, loaded, prepared, settings, summary, final, started, method_settings)
    # FSDP and ZeRO-3 hold the adapter in shards: gather it (all processes take part), then process 0 writes
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if not launch.is_main():
        return out
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with artifacts.disk_errors_are_user_errors(out, "output.dir"):
            staging.mkdir()
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, state_dict=state_dict, selected_adapters=["default"])
            point_adapter_at_base(staging, loaded.base)
            loaded.tokenizer.save_pretrained(staging)
            save_generation_config(loaded.model, loaded.tokenizer, staging)
            (staging / "recipe.yaml").write_text(recipe.to_yaml())
            artifacts.write_metrics(staging / "metrics.jsonl", metrics)
            artifacts.plot_loss(staging / "loss.png", metrics, f"{recipe.name} ({plan.method})")
            (staging / "README.md").write_text(model_card(recipe, plan.method, loaded.base, summary))
            if eval_table:
                (staging / EVAL_TABLE).write_text(eval_table)
            artifacts.write_json(staging / "manifest.json", record)
            artifacts.publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays beside the published files
    if eval_table:
        console.print(eval_table, end="", soft_wrap=True, markup=False)
    show_summary(summary, out)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def save_generation_config(model, tokenizer, folder: Path) -> None:
    from transformers import GenerationConfig

    gc = getattr(model, "generation_config", None) or GenerationConfig()
    gc = GenerationConfig.from_dict(gc.to_dict())
    gc.eos_token_id = end_of_turn_ids(tokenizer)
    gc.pad_token_id = tokenizer.pad_token_id
    gc.save_pretrained(folder)


def point_adapter_at_base(folder: Path, base: models.Base) -> None:
    """Record the base as an absolute folder (or hub id) so plain `AutoPeftModelForCausalLM` finds it from any
    working directory; the manifest keeps the name the user wrote (e.g. the built-in alias)."""
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base.spec if base.kind == "hub" else str(Path(base.path).resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))


def model_card(recipe: Recipe, method: str, base: models.Base, summary: dict) -> str:
    lines = [f"# {recipe.name}", "", f"LoRA adapter trained with `finetune {method}` on base `{base.spec}`.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    # a reward model is a one-score classifier (score head saved with the adapter); every other method a causal LM
    auto, extra = (("AutoPeftModelForSequenceClassification", ", num_labels=1") if method == "reward" else ("AutoPeftModelForCausalLM", ""))
    lines += ["", "Load it without this toolkit:", "", "```python", f"from peft import {auto}",
              "from transformers import AutoTokenizer", f'model = {auto}.from_pretrained("{recipe.output_dir()}"{extra})',
              f'tokenizer = AutoTokenizer.from_pretrained("{recipe.output_dir()}")',
              *(["model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token"] if method == "reward" else []),
              "```", "",
              "`recipe.yaml` holds the resolved recipe; `manifest.json` the versions, data hashes and metrics.", ""]
    return "\n".join(lines)


def show_summary(summary: dict, out: Path) -> None:
    table = Table(title="run summary", show_header=False)
    for k, v in summary.items():
        table.add_row(k, "-" if v is None else str(v))
    table.add_row("adapter", str(out))
    console.print(table)
