"""`finetune orpo RECIPE`: ORPO (odds-ratio preference optimisation) of a LoRA adapter with TRL's ORPOTrainer.

ORPO needs no reference model: its loss is the negative log-likelihood of the chosen answers plus λ (orpo.beta)
times a term that raises the odds of the chosen answer over the rejected one, so it does supervised tuning and
preference tuning in one pass from the base. It reads every preference format DPO reads. TRL 1.16 keeps ORPO
under `trl.experimental.orpo` (not in `trl` itself), so its interface may still change between TRL releases.

`run` is the whole workflow, top to bottom: load the base, render the pairs, attach LoRA, build the trainer,
train, evaluate, publish.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune import data, models, publish, speed, training
from finetune.preflight import Plan
from finetune.recipe import Recipe
from finetune.training import console


def run(recipe: Recipe, plan: Plan, callbacks: Sequence = ()) -> Path:
    """Train an ORPO adapter as planned and publish it; `callbacks` are extra TrainerCallbacks."""
    started = time.time()
    training.begin(recipe, plan)
    built = build(recipe, plan.out / "checkpoints", callbacks)
    metrics = training.open_output(recipe, plan)
    trained = training.train(built.trainer, recipe, plan, metrics, built.counts)
    final = dict(metrics[-1]) if metrics else {}
    if built.prepared.validation:
        ev = final_eval(built)
        final.update(ev)
        metrics.append({"step": built.trainer.state.global_step, **ev})
    return publish.adapter(built.trainer, recipe, plan, built.loaded, built.prepared, built.settings, metrics, final,
                           trained, built.counts, started)


@dataclass
class Built:
    loaded: models.Loaded
    prepared: data.Prepared
    settings: speed.RunSettings
    trainer: Any
    counts: training.TokenCounts  # tokens trained on (TRL's ORPO logs no token count of its own)


def build(recipe: Recipe, out: Path, callbacks: Sequence = ()) -> Built:
    """Load the base, render the pairs, attach LoRA and make the trainer (checkpoints go to `out`)."""
    import os

    # TRL warns on every import from trl.experimental; the README says where ORPO lives and what that means
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig

    loaded = training.load_base(recipe)
    prepared = data.prepare(recipe.data, loaded.tokenizer, "orpo", recipe.training.seed, log=console.print)
    settings = speed.choose(recipe, loaded, "orpo")
    training.warn_memory(recipe, loaded)
    # TRL's ORPO disables dropout in the model; a LoRA dropout of p=0 would still copy every adapter input
    model = training.attach_lora(recipe, loaded, settings, dropout=0.0)
    speed.apply(loaded.model, model, settings)
    args = ORPOConfig(
        **training.training_args(recipe, settings, out, bool(prepared.validation)),
        beta=recipe.orpo.beta,
        # the pairs already fit data.max_length as DPO counts tokens; TRL's ORPO prepends BOS where the rendered
        # prompt lacks it, one token more than that count, so one token of slack keeps its truncation from ever
        # cutting an answer fitted here
        max_length=recipe.data.max_length + 1,
        disable_dropout=True,
        remove_unused_columns=False,  # its collator needs the prompt/chosen/rejected columns
        dataset_num_proc=None,
    )
    if not os.environ.get("FINETUNE_DEBUG"):
        import datasets

        # ORPOTrainer maps the data with a bound method datasets cannot hash: a one-off notice, not a problem
        datasets.utils.logging.set_verbosity_error()
    counts = training.TokenCounts()
    trainer = make_trainer_class(counts)(
        model=model,
        args=args,
        train_dataset=data.to_preference_dataset(prepared.train),
        eval_dataset=data.to_preference_dataset(prepared.validation) if prepared.validation else None,
        processing_class=loaded.tokenizer,
        callbacks=list(callbacks),
    )
    training.quiet_trainer(trainer)
    return Built(loaded, prepared, settings, trainer, counts)


def make_trainer_class(counts: training.TokenCounts):
    from trl.experimental.orpo import ORPOTrainer

    class Trainer(training.guarded(ORPOTrainer)):
        """ORPOTrainer that counts the tokens of each training batch into `counts`, for tokens/s in the progress
        line and the run summary: unlike TRL's DPO and KTO trainers, its ORPO logs no `num_tokens`."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                count_tokens(counts, inputs)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    Trainer.__name__ = Trainer.__qualname__ = ORPOTrainer.__name__
    return Trainer


def count_tokens(counts: training.TokenCounts, batch: dict) -> None:
    """Real tokens: both sequences of each pair (prompt + answer, each runs through the model); trained: those
    with a label (TRL's ORPO labels the answers and masks the prompts with -100)."""
    for side in ("chosen", "rejected"):
        counts.real += int(batch[f"{side}_attention_mask"].sum())
        counts.trained += int((batch[f"{side}_labels"] != -100).sum())


def final_eval(built: Built) -> dict:
    """TRL's ORPO evaluation on the validation pairs, with the perplexity of the chosen answers' NLL term."""
    ev = {k: v for k, v in built.trainer.evaluate().items() if isinstance(v, (int, float))}
    if "eval_nll_loss" in ev:
        ev["eval_perplexity"] = math.exp(min(ev["eval_nll_loss"], 50))
    return ev
