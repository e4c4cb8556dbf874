"""`finetune kto RECIPE`: KTO (Kahneman-Tversky optimisation) of a LoRA adapter with TRL's KTOTrainer.

KTO learns from single answers marked desirable or undesirable (thumbs up / down), no pairs needed. `run` is
the whole workflow, top to bottom: load the base, render the labelled answers, choose the class weights,
attach LoRA, build the trainer, train, evaluate, publish. The reference model is the starting policy (the base
with the adapter disabled, or a frozen copy of the starting adapter), as for DPO.

TRL estimates KTO's KL term from each batch's answers paired with the other prompts of the batch, so it reads
the data in order: the examples are shuffled here, once, with training.seed, so that batches mix both labels.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune import data, models, publish, speed, training
from finetune.data import unpaired
from finetune.preflight import Plan
from finetune.recipe import Recipe
from finetune.training import console
from rich.markup import escape

# the KTO paper's guidance (eq. 8): desirable_weight·n_desirable / (undesirable_weight·n_undesirable) in [1, 4/3]
RATIO_LOW, RATIO_HIGH = 1.0, 4 / 3


def run(recipe: Recipe, plan: Plan, callbacks: Sequence = ()) -> Path:
    """Train a KTO adapter as planned and publish it; `callbacks` are extra TrainerCallbacks."""
    started = time.time()
    training.begin(recipe, plan)
    built = build(recipe, plan.out / "checkpoints", callbacks)
    metrics = training.open_output(recipe, plan)
    trained = training.train(built.trainer, recipe, plan, metrics)
    final = dict(metrics[-1]) if metrics else {}
    if built.prepared.validation:
        ev = final_eval(built)
        final.update(ev)
        metrics.append({"step": built.trainer.state.global_step, **ev})
    return publish.adapter(built.trainer, recipe, plan, built.loaded, built.prepared, built.settings, metrics, final,
                           trained, None, started, method_settings=built.weights)


@dataclass
class Built:
    loaded: models.Loaded
    prepared: data.Prepared
    settings: speed.RunSettings
    trainer: Any
    weights: dict  # the class weights and the counts they were chosen from (goes into the manifest)


def build(recipe: Recipe, out: Path, callbacks: Sequence = ()) -> Built:
    """Load the base, render the labelled answers, attach LoRA and make the trainer (checkpoints go to `out`)."""
    from trl import KTOConfig

    loaded = training.load_base(recipe)
    prepared = data.prepare(recipe.data, loaded.tokenizer, "kto", recipe.training.seed, log=console.print)
    unpaired.check_both_labels([({"label": e.label}, e.where) for e in prepared.train], prepared.train[0].where)
    weights = class_weights(recipe, *unpaired.counts(prepared.train))
    console.print(("" if weights["in_range"] else "[yellow]warning:[/] ") + escape(weights["reason"]))
    settings = speed.choose(recipe, loaded, "kto")
    training.warn_memory(recipe, loaded)
    # KTO trains without dropout (TRL's disable_dropout: policy and reference must see the same network)
    model = training.attach_lora(recipe, loaded, settings, dropout=0.0)
    speed.apply(loaded.model, model, settings)
    args = KTOConfig(
        **training.training_args(recipe, settings, out, bool(prepared.validation)),
        beta=recipe.kto.beta,
        loss_type=recipe.kto.loss,
        desirable_weight=weights["desirable_weight"],
        undesirable_weight=weights["undesirable_weight"],
        max_length=recipe.data.max_length,
        disable_dropout=True,
        dataset_num_proc=None,
    )
    train_examples = list(prepared.train)
    random.Random(recipe.training.seed).shuffle(train_examples)  # TRL reads in order (see the module docstring)
    trainer = make_trainer_class()(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=data.to_unpaired_dataset(train_examples),
        eval_dataset=data.to_unpaired_dataset(prepared.validation) if prepared.validation else None,
        processing_class=loaded.tokenizer,
        callbacks=list(callbacks),
    )
    training.quiet_trainer(trainer)
    return Built(loaded, prepared, settings, trainer, weights)


def class_weights(recipe: Recipe, n_good: int, n_bad: int) -> dict:
    """The weights of desirable and undesirable losses, with the sentence that reports them.

    Unset in the recipe, they are chosen so that dw·n_good / (uw·n_bad) lies within the KTO paper's [1, 4/3]: left
    at 1 when the counts already do, otherwise the nearest end of the range is reached by raising the weight of
    the smaller class (one weight moves, the other stays 1)."""
    k = recipe.kto
    ratio = n_good / n_bad
    if k.desirable_weight is None and k.undesirable_weight is None:
        dw = uw = 1.0
        if ratio < RATIO_LOW:  # fewer desirable answers: weigh them up until they count as much as the others
            dw = math.ceil(n_bad / n_good * 100) / 100
        elif ratio > RATIO_HIGH:  # many more desirable answers: weigh the undesirable ones up to the range's top
            uw = math.ceil(n_good / (n_bad * RATIO_HIGH) * 100) / 100
        how = "chosen automatically" if (dw, uw) != (1.0, 1.0) else "balanced enough, kept at 1"
    else:
        dw = k.desirable_weight if k.desirable_weight is not None else 1.0
        uw = k.undesirable_weight if k.undesirable_weight is not None else 1.0
        how = "from the recipe"
    weighted = dw * n_good / (uw * n_bad)
    reason = (f"class weights ({how}): {n_good} desirable / {n_bad} undesirable training examples, desirable_weight {dw:g}, "
              f"undesirable_weight {uw:g} → weighted ratio {weighted:.2f}")
    in_range = RATIO_LOW - 1e-9 <= weighted <= RATIO_HIGH + 1e-9
    reason += " (within the KTO paper's [1, 4/3])" if in_range else \
        ", outside the KTO paper's recommended [1, 4/3] — unset kto.desirable_weight and kto.undesirable_weight to have them chosen"
    return {"desirable_weight": dw, "undesirable_weight": uw, "desirable_examples": n_good, "undesirable_examples": n_bad,
            "weighted_ratio": round(weighted, 4), "weights_chosen": how, "in_range": in_range, "reason": reason}


def make_trainer_class():
    from trl import KTOTrainer

    return training.guarded(KTOTrainer)


def final_eval(built: Built) -> dict:
    """TRL's KTO evaluation on the validation answers (loss, rewards, KL)."""
    return {k: v for k, v in built.trainer.evaluate().items() if isinstance(v, (int, float))}
