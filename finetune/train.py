"""What `sft` and `dpo` share: load, prepare data, attach LoRA, run a TRL trainer with progress,
checkpoints, resume, Ctrl-C and NaN handling, then write the adapter folder.

Run with `finetune sft recipes/quickstart.yaml` (or `finetune dpo ...`).
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from finetune import artifacts, data, launch, models
from finetune import speed as speed_mod
from finetune.errors import RunStopped, UserError
from finetune.recipe import Recipe

console = Console(stderr=True, highlight=False)


# ---- LoRA ----------------------------------------------------------------------------------------


def attach_lora(recipe: Recipe, loaded: models.Loaded, speed: speed_mod.Speed):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    model = loaded.model
    if loaded.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=speed.gradient_checkpointing)
    elif speed.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    set_seed(recipe.training.seed)  # the LoRA initialisation is part of what a seed reproduces
    if recipe.model.adapter:
        folder = Path(recipe.model.adapter)
        if not (folder / "adapter_config.json").is_file():
            raise UserError(f"model.adapter: {folder} is not an adapter folder (no adapter_config.json)")
        try:
            # For DPO, TRL's DPOTrainer copies this starting adapter into a frozen `ref` adapter on the same base
            # (only the small adapter weights exist twice), so the reference is base + SFT adapter.
            return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"model.adapter: {folder} does not fit base `{recipe.model.base}` ({str(exc).splitlines()[0][:200]})") from None
    lc = recipe.lora
    # DPO trains without dropout (TRL's disable_dropout, so policy and reference see the same network); a LoRA
    # dropout merely set to p=0 would still copy every adapter input, so it is left out altogether
    dropout = 0.0 if recipe.dpo is not None else lc.dropout
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=dropout, target_modules=lc.target_modules,
                        use_dora=lc.use_dora, use_rslora=lc.use_rslora, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {str(exc).splitlines()[0][:300]} — use all-linear or names such as q_proj, v_proj") from None


# ---- callbacks -----------------------------------------------------------------------------------


def make_callbacks(recipe: Recipe, out: Path, metrics: list[dict], state: dict):
    from transformers import TrainerCallback

    class Finetune(TrainerCallback):
        """Rich progress, metrics.jsonl, checkpoint completion markers, Ctrl-C and divergence warnings."""

        def on_train_begin(self, args, st, control, **kw):
            self.t0, self.step0 = time.time(), st.global_step
            self.best = math.inf
            self.progress = None
            if not launch.is_main():
                return
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=False)
            self.task = self.progress.add_task(recipe.name, total=st.max_steps, completed=st.global_step, info="")
            self.progress.start()

        def on_step_end(self, args, st, control, **kw):
            if self.progress:
                self.progress.update(self.task, completed=st.global_step)
            # every process must stop after the same step, whichever of them saw the Ctrl-C
            if launch.anyone(bool(state.get("interrupted"))):
                state["interrupted"] = True
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, st, control, logs=None, **kw):
            logs = dict(logs or {})
            row = {"step": st.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            trainer = state.get("trainer")
            elapsed = time.time() - self.t0
            if trainer is not None and getattr(trainer, "real_tokens", 0) and elapsed > 0:
                # on_log runs on every process at the same step, so these sums over processes are safe here
                row["tokens_per_s"] = round(launch.total(trainer.real_tokens) / elapsed, 1)
                row["trained_tokens"] = int(launch.total(trainer.trained_tokens))
            if "loss" in row:
                self.best = min(self.best, row["loss"])
                if row["loss"] > recipe.training.diverge_factor * self.best:
                    console.print(f"[yellow]warning:[/] loss {row['loss']:.3f} is over {recipe.training.diverge_factor}x its lowest "
                                  f"({self.best:.3f}): training may be diverging — consider a lower training.learning_rate")
            metrics.append(row)
            if not launch.is_main():
                return
            with (out / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            info = "  ".join(f"{k} {row[k]:.4g}" for k in ("loss", "eval_loss", "learning_rate", "tokens_per_s") if k in row)
            self.progress.update(self.task, info=info)

        def on_save(self, args, st, control, **kw):
            # the marker says every process has written its part (each writes its own RNG state; FSDP shards)
            launch.barrier()
            folder = Path(args.output_dir) / f"checkpoint-{st.global_step}"
            if launch.is_main() and folder.is_dir():
                (folder / artifacts.COMPLETE).write_text(str(st.global_step))

        def on_train_end(self, args, st, control, **kw):
            if self.progress:
                self.progress.stop()

    return [Finetune()]


# ---- resume --------------------------------------------------------------------------------------


def latest_checkpoint(out: Path) -> Path | None:
    folder = out / "checkpoints"
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for ckpt in reversed(found):
        if (ckpt / artifacts.COMPLETE).is_file():
            return ckpt
        console.print(f"[yellow]skipping incomplete checkpoint {ckpt} (no completion marker)[/]")
    return None


def run_identity(recipe: Recipe, prepared: data.Prepared) -> dict:
    tree = recipe.model_dump(mode="json")
    return {"recipe": tree, "data": [{"path": f["path"], "sha256": f["sha256"]} for f in prepared.files],
            "processes": launch.world_size()}


def diff_identity(old: dict, new: dict) -> list[str]:
    changes = []
    for section, fields in new["recipe"].items():
        before = old["recipe"].get(section)
        if isinstance(fields, dict) and isinstance(before, dict):
            changes += [f"{section}.{k}: {before.get(k)!r} -> {v!r}" for k, v in fields.items() if before.get(k) != v]
        elif before != fields:
            changes.append(f"{section}: {before!r} -> {fields!r}")
    if old["data"] != new["data"]:
        changes.append("data files changed (contents or list)")
    if old.get("processes", 1) != new["processes"]:
        changes.append(f"processes: {old.get('processes', 1)} -> {new['processes']} (the global batch is batch_size x "
                       "gradient_accumulation x processes, so the run would change)")
    return changes


# ---- the run -------------------------------------------------------------------------------------


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the last trained token of a rendered answer, plus EOS."""
    ids, labels = data.tokenize_conversation(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "completions")
    trained = [t for t in labels if t != -100]
    out = [trained[-1]] if trained and trained[-1] in tokenizer.all_special_ids else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
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
    lines += ["", "Load it without this toolkit:", "", "```python", "from peft import AutoPeftModelForCausalLM",
              "from transformers import AutoTokenizer", f'model = AutoPeftModelForCausalLM.from_pretrained("{recipe.output_dir()}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{recipe.output_dir()}")', "```", "",
              "`recipe.yaml` holds the resolved recipe; `manifest.json` the versions, data hashes and metrics.", ""]
    return "\n".join(lines)


def run(recipe: Recipe, method: str, *, overwrite: bool = False, resume: bool = False) -> Path:
    import torch

    out = recipe.output_dir()  # library chatter is already quieted by the CLI (cli.quiet_libraries)
    launch.start_worker(models.pick_device(recipe.model.device))
    main = launch.is_main()
    artifacts.prepare_output(out, overwrite=overwrite, resume=resume)
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise UserError(f"{out}: no complete checkpoint to resume from — run without --resume (training.save_every makes checkpoints)")
    started = time.time()
    console.print(f"[bold]finetune {method}[/] {recipe.name} → {out}")
    loaded = models.load(recipe.model, log=console.print)
    console.print(f"base: {loaded.base.spec} ({loaded.base.kind}) · {loaded.quantization} · {loaded.device} · {loaded.dtype}")
    prepared = data.prepare(recipe.data, loaded.tokenizer, method, recipe.training.seed, log=console.print)
    identity = run_identity(recipe, prepared)
    if resume:
        saved = out / "checkpoints" / "run.json"
        if saved.is_file():
            changes = diff_identity(json.loads(saved.read_text()), identity)
            if changes:
                raise UserError(f"{out}: the recipe or data changed since this run started, so --resume would mix two runs:\n  "
                                + "\n  ".join(changes) + "\nrevert the change, or start afresh with --overwrite")
    speed = speed_mod.choose(recipe, loaded, method)
    warn_memory(recipe, loaded)
    model = attach_lora(recipe, loaded, speed)
    speed_mod.apply(loaded.model, model, speed)

    launch.barrier()  # every process has validated the output folder before process 0 changes it
    metrics: list[dict] = []
    if resume and (out / "metrics.jsonl").is_file():
        step = int(checkpoint.name.split("-")[-1])
        metrics = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("step", 0) <= step]
    if main:
        if not resume and out.exists():
            shutil.rmtree(out)  # only reached with --overwrite (checked above), after every input was validated
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        artifacts.write_json(out / "checkpoints" / "run.json", identity)
        artifacts.write_atomic(out / "recipe.yaml", recipe.to_yaml())
        artifacts.write_metrics(out / "metrics.jsonl", metrics)
    launch.barrier()

    state: dict = {}
    callbacks = make_callbacks(recipe, out, metrics, state)
    if method == "sft":
        from finetune import sft as method_module
    else:
        from finetune import dpo as method_module
    trainer = method_module.build(recipe, loaded, model, prepared, speed, out / "checkpoints", callbacks)
    state["trainer"] = trainer
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    def on_sigint(signum, frame):
        if state.get("interrupted"):
            raise KeyboardInterrupt
        state["interrupted"] = True
        console.print("\n[yellow]Ctrl-C: saving a checkpoint after this step (press again to abort without saving)[/]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except RunStopped as exc:
        last = latest_checkpoint(out)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise RunStopped(f"{exc} — {kept}. Lower training.learning_rate or check the data, then rerun (--resume continues from it)") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if state.get("interrupted"):
        launch.barrier()  # the completion marker is on disk before anyone reports it
        last = latest_checkpoint(out)
        console.print(f"[yellow]stopped at step {trainer.state.global_step}; checkpoint saved to {last}[/]\n"
                      f"continue with: finetune {method} <recipe> --resume"
                      + (f" --num-processes {launch.world_size()}" if launch.world_size() > 1 else ""))
        raise SystemExit(130)

    speed_mod.lora_input_casting(model, True)  # evaluation and saving run outside autocast
    final = dict(metrics[-1]) if metrics else {}
    if prepared.validation:
        ev = final_eval(trainer, loaded, prepared, method)
        final.update(ev)
        metrics.append({"step": trainer.state.global_step, **ev})
    train_losses = [r["loss"] for r in metrics if "loss" in r]
    wall = time.time() - started
    train_s = trainer_train_seconds(trainer, wall)
    processes = launch.world_size()
    summary = {
        "steps": trainer.state.global_step,
        "processes": processes,
        "trained tokens": int(launch.total(trainer.trained_tokens)) if hasattr(trainer, "trained_tokens") else None,
        "wall time (s)": round(wall, 1),
        "tokens/s": round(tokens_seen(trainer) / train_s, 1),
        "examples/s": round(trainer.state.global_step * trainer.args.per_device_train_batch_size
                            * trainer.args.gradient_accumulation_steps * processes / train_s, 2),
        "peak memory (MiB)": round(launch.largest(peak_memory_mb(loaded.device))),  # of the busiest process
        "final train loss": round(train_losses[-1], 4) if train_losses else (round(final["train_loss"], 4) if "train_loss" in final else None),
        "eval loss": round(final["eval_loss"], 4) if "eval_loss" in final else None,
        "eval perplexity": round(final["eval_perplexity"], 3) if "eval_perplexity" in final else None,
    }

    manifest = {
        "method": method,
        "versions": artifacts.library_versions(),
        "git_commit": artifacts.git_commit(),
        "base": {"spec": loaded.base.spec, "kind": loaded.base.kind, **models.weights_identity(loaded.base.path)},
        "quantization": loaded.quantization,
        "adapter_start": recipe.model.adapter,
        "data": {"format": prepared.format, "files": prepared.files, "train_examples": len(prepared.train),
                 "validation_examples": len(prepared.validation), "truncated": prepared.truncated, "dropped": prepared.dropped},
        "seed": recipe.training.seed,
        "processes": processes,
        "distributed": asdict(launch.from_environment()) if processes > 1 else None,
        "machine": artifacts.machine(),
        "speed": asdict(speed),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "summary": summary,
        "final_metrics": final,
    }
    # FSDP and ZeRO-3 hold the adapter in shards: gather it (all processes take part), then process 0 writes
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if not main:
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
            artifacts.plot_loss(staging / "loss.png", metrics, f"{recipe.name} ({method})")
            (staging / "README.md").write_text(model_card(recipe, method, loaded.base, summary))
            artifacts.write_json(staging / "manifest.json", manifest)
            artifacts.publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays beside the published files
    show_summary(summary, out)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def final_eval(trainer, loaded: models.Loaded, prepared: data.Prepared, method: str) -> dict:
    """Eval loss on the validation split. For SFT it is the token-weighted mean NLL over the trained
    tokens, computed exactly as `finetune eval` does, so the two agree."""
    if method == "sft":
        from finetune.evaluate import score

        was_training = trainer.model.training
        trainer.model.eval()
        total, count = score(trainer.model, loaded.tokenizer.pad_token_id or 0,
                             [(e.input_ids, e.labels) for e in prepared.validation], trainer.args.per_device_eval_batch_size)
        trainer.model.train(was_training)
        loss = total / max(1, count)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50)), "eval_tokens": count}
    ev = {k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}
    if "eval_loss" in ev:
        ev["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50))
    return ev


def warn_memory(recipe: Recipe, loaded: models.Loaded) -> None:
    """A run that will not fit should say so now, not an hour in."""
    from finetune.inspect import available_memory_gib, memory_estimate

    est = memory_estimate(recipe, loaded.model.config, loaded.dtype.itemsize)
    have = available_memory_gib(loaded.device)
    if have and est["total"] > 0.9 * have:
        console.print(f"[yellow]warning:[/] this recipe needs about {est['total']:.1f} GiB but the {loaded.device} has {have:.1f} GiB — "
                      "lower training.batch_size or data.max_length, use model.quantization: 4bit, or set training.gradient_checkpointing: true")


def tokens_seen(trainer) -> int:
    """Real (non-padding) tokens processed by all processes: counted by our SFT trainer, by TRL's
    `num_tokens` (already summed over processes) for DPO."""
    if hasattr(trainer, "real_tokens"):
        return int(launch.total(trainer.real_tokens))
    counts = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    return int(counts[-1]) if counts else 0


def trainer_train_seconds(trainer, fallback: float) -> float:
    for row in reversed(trainer.state.log_history):
        if "train_runtime" in row:
            return row["train_runtime"]
    return fallback


def show_summary(summary: dict, out: Path) -> None:
    table = Table(title="run summary", show_header=False)
    for k, v in summary.items():
        table.add_row(k, "-" if v is None else str(v))
    table.add_row("adapter", str(out))
    console.print(table)


def check_finite(loss) -> None:
    import torch

    # all processes agree, so none is left waiting for the others in the next gradient exchange
    if launch.anyone(not bool(torch.isfinite(loss.detach()).all())):
        raise RunStopped(f"the loss became {loss.item()} (not finite), so training stopped before applying this step")
