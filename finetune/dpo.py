"""`finetune dpo`: TRL's DPOTrainer on preference pairs rendered by the data path.

The reference model is the starting policy: the base with the adapter disabled when training a new
adapter, or the starting SFT adapter loaded a second time, frozen, as `ref` (see train.attach_lora).
"""

from __future__ import annotations

from pathlib import Path

from finetune import data
from finetune.recipe import Recipe
from finetune.sft import training_args


def make_trainer_class():
    from trl import DPOTrainer

    from finetune.train import check_finite

    class Trainer(DPOTrainer):
        """DPOTrainer that stops on a non-finite loss before the step is applied."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                check_finite(out[0] if return_outputs else out)
            return out

    return Trainer


def build(recipe: Recipe, loaded, model, prepared, speed, out: Path, callbacks):
    from trl import DPOConfig

    loss = recipe.dpo.loss if isinstance(recipe.dpo.loss, list) else [recipe.dpo.loss]
    args = DPOConfig(
        **training_args(recipe, speed, out, bool(prepared.validation)),
        beta=recipe.dpo.beta,
        loss_type=loss,
        max_length=recipe.data.max_length,
        truncation_mode="keep_start",
        disable_dropout=True,
        dataset_num_proc=None,
    )
    Trainer = make_trainer_class()
    return Trainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=data.to_preference_dataset(prepared.train),
        eval_dataset=data.to_preference_dataset(prepared.validation) if prepared.validation else None,
        processing_class=loaded.tokenizer,
        callbacks=callbacks,
    )
