"""`finetune reward RECIPE`: a reward model (a LoRA adapter plus a trained one-score head on a
sequence-classification copy of the base) with TRL's RewardTrainer, from any preference format.

`run` is the whole workflow, top to bottom: load the base with a score head, render the pairs, attach LoRA
(PEFT's SEQ_CLS task also trains the head, saved beside the adapter), train on "chosen scores above
rejected", measure held-out accuracy and mean margin, publish. The folder loads in plain transformers +
PEFT as a classifier (`AutoPeftModelForSequenceClassification`) and is what `finetune grpo` rewards with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune import data, models, publish, speed, training
from finetune.preflight import Plan
from finetune.recipe import Recipe
from finetune.training import console


def run(recipe: Recipe, plan: Plan, callbacks: Sequence = ()) -> Path:
    """Train a reward model as planned and publish it; `callbacks` are extra TrainerCallbacks."""
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
        console.print(f"held-out pairs: accuracy {ev.get('eval_accuracy', float('nan')):.3f} · "
                      f"mean margin {ev.get('eval_margin', float('nan')):.3f} ({len(built.prepared.validation)} pairs)")
    return publish.adapter(built.trainer, recipe, plan, built.loaded, built.prepared, built.settings, metrics, final,
                           trained, None, started)


@dataclass
class Built:
    loaded: models.Loaded
    prepared: data.Prepared
    settings: speed.RunSettings
    trainer: Any


def build(recipe: Recipe, out: Path, callbacks: Sequence = ()) -> Built:
    """Load the base with a score head, render the pairs, attach LoRA and make the trainer."""
    from transformers import set_seed
    from trl import RewardConfig

    # the score head is new: it is initialised while the base loads, from the global generator, so without a seed
    # here it would depend on whatever ran before in the process (the seed reproduces it, as it does the LoRA init)
    set_seed(recipe.training.seed)
    loaded = training.load_base(recipe, classifier=True)
    # the pairs are rendered and fitted exactly as for DPO; the trainer scores prompt+chosen against prompt+rejected
    prepared = data.prepare(recipe.data, loaded.tokenizer, "reward", recipe.training.seed, log=console.print)
    settings = speed.choose(recipe, loaded, "reward")
    training.warn_memory(recipe, loaded)
    model = training.attach_lora(recipe, loaded, settings, task_type="SEQ_CLS")
    speed.apply(loaded.model, model, settings)
    args = RewardConfig(
        **training.training_args(recipe, settings, out, bool(prepared.validation)),
        max_length=None,  # the data path already fitted every pair into data.max_length
        center_rewards_coefficient=recipe.reward.center_rewards if recipe.reward else None,
        disable_dropout=True,
        dataset_num_proc=None,
    )
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=to_dataset(prepared.train, loaded.tokenizer),
        eval_dataset=to_dataset(prepared.validation, loaded.tokenizer) if prepared.validation else None,
        processing_class=loaded.tokenizer,
        callbacks=list(callbacks),
    )
    training.quiet_trainer(trainer)
    return Built(loaded, prepared, settings, trainer)


def template_tail(tokenizer) -> str:
    """What the chat template writes after an answer's end-of-turn token (ChatML: a newline)."""
    full = data.render(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    return full[len(full.rstrip()):]


def to_dataset(pairs: list[data.PreferencePair], tokenizer):
    """Each pair as the whole conversation the chat template renders, tokenized, so TRL's tokenization is skipped.

    The score is read at the last token that is not padding. Training on exactly what `apply_chat_template`
    gives for [prompt..., answer] (tail included) makes the scores the same when GRPO, `finetune eval` or a
    user's own code renders a conversation that way."""
    import datasets

    tail = template_tail(tokenizer)

    def ids(prompt: str, answer: str) -> list[int]:
        return tokenizer(text=prompt + answer + tail, add_special_tokens=False)["input_ids"]

    return datasets.Dataset.from_dict({"chosen_ids": [ids(p.prompt, p.chosen) for p in pairs],
                                       "rejected_ids": [ids(p.prompt, p.rejected) for p in pairs]})


def make_trainer_class():
    from trl import RewardTrainer

    return training.guarded(RewardTrainer)


def final_eval(built: Built) -> dict:
    """TRL's reward evaluation on the held-out pairs: loss, accuracy (chosen scored above rejected), mean margin."""
    return {k: v for k, v in built.trainer.evaluate().items() if isinstance(v, (int, float))}
