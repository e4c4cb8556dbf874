"""What every training method shares, in the order a method's `run` uses it: training arguments, LoRA,
the output folder, the progress/metrics callback, the Ctrl-C stop flag, the finite-loss stop and the
training call itself. Publishing the finished folder is finetune/publish.py; a method module (sft.py,
dpo.py) strings these steps together. Nothing here imports a method module.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from finetune import artifacts, checkpoints, launch, models
from finetune.errors import RunStopped, UserError
from finetune.preflight import Plan
from finetune.recipe import Recipe
from finetune.speed import RunSettings, lora_input_casting

console = Console(stderr=True, highlight=False)


@dataclass
class StopFlag:
    """Set by the Ctrl-C handler; the progress callback stops every process after the same step."""

    requested: bool = False


@dataclass
class TokenCounts:
    """Tokens processed by this process in this run (a trainer that counts them fills this in)."""

    real: int = 0  # non-padding tokens through the model
    trained: int = 0  # tokens with a label


@dataclass
class Trained:
    """What `train` hands to publishing."""

    start_step: int  # the step resumed from (0 for a fresh run)
    seconds: float  # time this process spent in trainer.train


def begin(recipe: Recipe, plan: Plan) -> None:
    """Join the process group (before the model loads, so each worker loads onto its own GPU) and say what runs."""
    launch.start_worker(plan.device)
    console.print(f"[bold]finetune {plan.method}[/] {recipe.name} → {plan.out}")


# ---- the trainer's ingredients ---------------------------------------------------------------------


def training_args(recipe: Recipe, settings: RunSettings, out: Path, has_eval: bool) -> dict:
    """Transformers TrainingArguments every method shares, straight from the recipe."""
    t = recipe.training
    return dict(
        output_dir=str(out),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=settings.gradient_checkpointing,
        logging_steps=t.log_every,
        eval_strategy="steps" if (has_eval and t.eval_every) else "no",
        eval_steps=t.eval_every,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=t.save_total_limit,
        report_to=[] if t.report_to == "none" else [t.report_to],
        bf16=settings.dtype == "bfloat16",
        fp16=settings.dtype == "float16",
        use_cpu=settings.device == "cpu",
        disable_tqdm=True,
        prediction_loss_only=True,
        dataloader_num_workers=0,
        # every LoRA weight gets a gradient each step; DDP's search for unused ones only costs time
        ddp_find_unused_parameters=False,
    )


def load_base(recipe: Recipe, classifier: bool = False) -> models.Loaded:
    """The recipe's base loaded for training, and the line that says what was loaded (every method prints it)."""
    loaded = models.load(recipe.model, classifier=classifier, log=console.print)
    console.print(f"base: {loaded.base.spec} ({loaded.base.kind}) · {loaded.quantization} · {loaded.device} · {loaded.dtype}"
                  + (" · score head" if classifier else ""))
    return loaded


def attach_lora(recipe: Recipe, loaded: models.Loaded, settings: RunSettings, dropout: float | None = None,
                task_type: str = "CAUSAL_LM"):
    """The base with a new LoRA adapter (or the recipe's starting adapter, trainable). `dropout` overrides the
    recipe's for methods that train without it; `task_type` SEQ_CLS also trains the classifier head."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    model = loaded.model
    if loaded.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    set_seed(recipe.training.seed)  # the LoRA initialisation is part of what a seed reproduces
    if recipe.model.adapter:  # an adapter folder (checked in preflight)
        folder = Path(recipe.model.adapter)
        try:
            return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"model.adapter: {folder} does not fit base `{recipe.model.base}` ({str(exc).splitlines()[0][:200]})") from None
    lc = recipe.lora
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout if dropout is None else dropout,
                        target_modules=lc.target_modules, use_dora=lc.use_dora, use_rslora=lc.use_rslora, task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {str(exc).splitlines()[0][:300]} — use all-linear or names such as q_proj, v_proj") from None


def quiet_trainer(trainer) -> None:
    """Our progress callback replaces transformers' own printing and tqdm bar."""
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def check_finite(loss) -> None:
    """Stop before a non-finite loss is applied to the weights (called from each method's compute_loss)."""
    import torch

    # all processes agree, so none is left waiting for the others in the next gradient exchange
    if launch.anyone(not bool(torch.isfinite(loss.detach()).all())):
        raise RunStopped(f"the loss became {loss.item()} (not finite), so training stopped before applying this step")


def guarded(trainer_class):
    """A TRL trainer class that stops on a non-finite loss before the step is applied (check_finite) and writes
    no card into checkpoints/ (TRL's generic one names no base; the published folder has ours). The preference,
    reward and RL methods train with it as it is; GRPO adds its samples on top."""

    class Guarded(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                check_finite(out[0] if return_outputs else out)
            return out

        def create_model_card(self, *args, **kwargs):
            pass

    Guarded.__name__ = Guarded.__qualname__ = trainer_class.__name__
    return Guarded


def warn_memory(recipe: Recipe, loaded: models.Loaded) -> None:
    """A run that will not fit should say so now, not an hour in."""
    from finetune.inspect import available_memory_gib, memory_estimate

    est = memory_estimate(recipe, loaded.model.config, loaded.dtype.itemsize, device=loaded.device)
    have = available_memory_gib(loaded.device)  # on CUDA what is free, not the card's size
    if have and est["total"] > 0.9 * have:
        console.print(f"[yellow]warning:[/] this recipe needs about {est['total']:.1f} GiB but the {loaded.device} has {have:.1f} GiB available — "
                      "lower training.batch_size or data.max_length, use model.quantization: 4bit, or set training.gradient_checkpointing: true")


# ---- the output folder -----------------------------------------------------------------------------


def open_output(recipe: Recipe, plan: Plan) -> list[dict]:
    """Make the output folder this run's (process 0 writes; everything was validated in preflight) and return
    the metrics rows logged so far (those up to the checkpoint when resuming)."""
    out = plan.out
    launch.barrier()  # every process has validated the output folder before process 0 changes it
    metrics: list[dict] = []
    if plan.resume_from is not None and (out / "metrics.jsonl").is_file():
        step = checkpoints.step_of(plan.resume_from)
        metrics = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("step", 0) <= step]
    if launch.is_main():
        if plan.resume_from is None and out.exists():
            shutil.rmtree(out)  # only reached with --overwrite (preflight), after every input was validated
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        artifacts.write_json(out / "checkpoints" / checkpoints.IDENTITY, plan.identity)
        artifacts.write_atomic(out / "recipe.yaml", recipe.to_yaml())
        artifacts.write_metrics(out / "metrics.jsonl", metrics)
    launch.barrier()
    return metrics


# ---- progress, metrics and stopping ----------------------------------------------------------------


def progress_callback(recipe: Recipe, out: Path, metrics: list[dict], stop: StopFlag, counts: TokenCounts | None):
    """Progress (a rich bar on a terminal, a plain line every training.log_every steps otherwise), metrics.jsonl,
    checkpoint completion markers, the Ctrl-C stop and the divergence warning."""
    from transformers import TrainerCallback

    class Finetune(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            self.t0 = time.time()
            self.best = math.inf
            self.bar = None
            if not launch.is_main() or not console.is_terminal:
                return
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=False)
            self.task = self.bar.add_task(recipe.name, total=st.max_steps, completed=st.global_step, info="")
            self.bar.start()

        def on_step_end(self, args, st, control, **kw):
            if self.bar:
                self.bar.update(self.task, completed=st.global_step)
            # every process must stop after the same step, whichever of them saw the Ctrl-C
            if launch.anyone(stop.requested):
                stop.requested = True
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, st, control, logs=None, **kw):
            logs = dict(logs or {})
            row = {"step": st.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            elapsed = time.time() - self.t0
            if counts is not None and counts.real and elapsed > 0:
                # on_log runs on every process at the same step, so these sums over processes are safe here
                row["tokens_per_s"] = round(launch.total(counts.real) / elapsed, 1)
                row["trained_tokens"] = int(launch.total(counts.trained))
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
            if self.bar:
                self.bar.update(self.task, info=info)
            elif info and ("loss" in row or "eval_loss" in row):
                # redirected output (CI, nohup, a notebook): a plain line per log, flushed as it happens
                console.print(f"step {st.global_step}/{st.max_steps}  {info}")

        def on_save(self, args, st, control, **kw):
            # the marker says every process has written its part (each writes its own RNG state; FSDP shards)
            launch.barrier()
            folder = Path(args.output_dir) / f"checkpoint-{st.global_step}"
            if launch.is_main() and folder.is_dir():
                (folder / artifacts.COMPLETE).write_text(str(st.global_step))

        def on_train_end(self, args, st, control, **kw):
            if self.bar:
                self.bar.stop()

    return Finetune()


def train(trainer, recipe: Recipe, plan: Plan, metrics: list[dict], counts: TokenCounts | None = None) -> Trained:
    """Run the trainer from the plan's resume point, with progress, Ctrl-C (save after this step, twice to
    abort) and the finite-loss stop. A Ctrl-C ends the process (exit 130) with the command that continues."""
    stop = StopFlag()
    trainer.add_callback(progress_callback(recipe, plan.out, metrics, stop, counts))

    def on_sigint(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        console.print("\n[yellow]Ctrl-C: saving a checkpoint after this step (press again to abort without saving)[/]")

    start_step = checkpoints.step_of(plan.resume_from) if plan.resume_from else 0
    previous = signal.signal(signal.SIGINT, on_sigint)
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    except RunStopped as exc:
        last = checkpoints.latest(plan.out, console.print)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise RunStopped(f"{exc} — {kept}. Lower training.learning_rate or check the data, then rerun (--resume continues from it)") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    seconds = time.perf_counter() - t0
    if stop.requested:
        launch.barrier()  # the completion marker is on disk before anyone reports it
        last = checkpoints.latest(plan.out, console.print)
        console.print(f"[yellow]stopped at step {trainer.state.global_step}; checkpoint saved to {last}[/]")
        console.print(f"continue with: {escape(plan.rerun)}", soft_wrap=True)  # one line, to copy as it is
        raise SystemExit(130)
    lora_input_casting(trainer.model, True)  # evaluation and saving run outside autocast
    return Trained(start_step, seconds)
