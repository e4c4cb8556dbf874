"""`finetune dpo RECIPE`: preference tuning (DPO) of a LoRA adapter with TRL's DPOTrainer.

`run` is the whole workflow, top to bottom: load the base, render the preference pairs, attach LoRA,
build the trainer, train, evaluate, publish. The reference model is the starting policy: the base with
the adapter disabled when training a new adapter, or the starting SFT adapter, which DPOTrainer copies
into a frozen `ref` adapter on the same base (only the small adapter weights exist twice).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune import data, models, publish, samples, speed, training
from finetune.preflight import Plan
from finetune.recipe import Recipe
from finetune.training import console


def run(recipe: Recipe, plan: Plan, callbacks: Sequence = ()) -> Path:
    """Train a DPO adapter as planned and publish it; `callbacks` are extra TrainerCallbacks."""
    started = time.time()
    training.begin(recipe, plan)
    built = build(recipe, plan.out / "checkpoints", callbacks)
    metrics = training.open_output(recipe, plan)
    if recipe.training.sample_every:
        built.trainer.add_callback(samples.callback(recipe, plan.out, built.loaded.tokenizer, built.prepared.validation, built.settings))
    trained = training.train(built.trainer, recipe, plan, metrics)
    final = dict(metrics[-1]) if metrics else {}
    table = None
    if built.prepared.validation:
        ev, table = final_eval(built, plan.out)
        final.update(ev)
        metrics.append({"step": built.trainer.state.global_step, **ev})
    return publish.adapter(built.trainer, recipe, plan, built.loaded, built.prepared, built.settings, metrics, final,
                           trained, None, started, eval_table=table)


@dataclass
class Built:
    loaded: models.Loaded
    prepared: data.Prepared
    settings: speed.RunSettings
    trainer: Any


def build(recipe: Recipe, out: Path, callbacks: Sequence = ()) -> Built:
    """Load the base, render the pairs, attach LoRA and make the trainer (checkpoints go to `out`)."""
    from trl import DPOConfig

    loaded = training.load_base(recipe)
    prepared = data.prepare(recipe.data, loaded.tokenizer, "dpo", recipe.training.seed, log=console.print)
    settings = speed.choose(recipe, loaded, "dpo")
    training.warn_memory(recipe, loaded)
    # DPO trains without dropout (TRL's disable_dropout, so policy and reference see the same network); a LoRA
    # dropout merely set to p=0 would still copy every adapter input, so it is left out altogether
    model = training.attach_lora(recipe, loaded, settings, dropout=0.0)
    speed.apply(loaded.model, model, settings)
    loss = recipe.dpo.loss if isinstance(recipe.dpo.loss, list) else [recipe.dpo.loss]
    args = DPOConfig(
        **training.training_args(recipe, settings, out, bool(prepared.validation)),
        beta=recipe.dpo.beta,
        loss_type=loss,
        max_length=recipe.data.max_length,
        truncation_mode="keep_start",
        disable_dropout=True,
        dataset_num_proc=None,
    )
    trainer = make_trainer_class()(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=data.to_preference_dataset(prepared.train),
        eval_dataset=data.to_preference_dataset(prepared.validation) if prepared.validation else None,
        processing_class=loaded.tokenizer,
        callbacks=list(callbacks),
    )
    training.quiet_trainer(trainer)
    return Built(loaded, prepared, settings, trainer)


def make_trainer_class():
    from trl import DPOTrainer

    return training.guarded(DPOTrainer)


def final_eval(built: Built, out: Path) -> tuple[dict, str]:
    """TRL's DPO evaluation on the validation pairs, with the perplexity of its loss; and the perplexity of the
    chosen answers for the base (adapter disabled) and the trained adapter, as `finetune eval` tables it."""
    from finetune.evaluate import as_text, base_and_adapter

    ev = {k: v for k, v in built.trainer.evaluate().items() if isinstance(v, (int, float))}
    if "eval_loss" in ev:
        ev["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50))
    trainer, loaded = built.trainer, built.loaded
    was_training = trainer.model.training
    trainer.model.eval()
    items = [(p.prompt_ids + p.chosen_ids, [-100] * len(p.prompt_ids) + p.chosen_ids) for p in built.prepared.validation]
    base, tuned = base_and_adapter(trainer.model, loaded.tokenizer.pad_token_id or 0, items, trainer.args.per_device_eval_batch_size,
                                   f"{loaded.base.spec} (base)", str(out), loaded.tokenizer)
    trainer.model.train(was_training)
    ev.update({"chosen_perplexity": tuned["perplexity"], "base_chosen_perplexity": base["perplexity"],
               "chosen_perplexity_change_pct": tuned.get("perplexity_change_pct")})
    return ev, as_text([base, tuned], f"perplexity of the chosen answers of the validation pairs ({len(items)} pairs)")
