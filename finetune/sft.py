"""`finetune sft`: TRL's SFTTrainer on the data path's tokenized examples (input_ids + labels)."""

from __future__ import annotations

from pathlib import Path

from finetune import data
from finetune.recipe import Recipe


def training_args(recipe: Recipe, speed, out: Path, has_eval: bool) -> dict:
    """TrainingArguments shared by SFT and DPO, straight from the recipe."""
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
        gradient_checkpointing=speed.gradient_checkpointing,
        logging_steps=t.log_every,
        eval_strategy="steps" if (has_eval and t.eval_every) else "no",
        eval_steps=t.eval_every,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=t.save_total_limit,
        report_to=[] if t.report_to == "none" else [t.report_to],
        bf16=speed.dtype == "bfloat16",
        fp16=speed.dtype == "float16",
        use_cpu=speed.device == "cpu",
        disable_tqdm=True,
        prediction_loss_only=True,
        dataloader_num_workers=0,
        # every LoRA weight gets a gradient each step; DDP's search for unused ones only costs time
        ddp_find_unused_parameters=False,
    )


def make_trainer_class():
    import torch
    from trl import SFTTrainer

    from finetune.speed import trained_positions_loss
    from finetune.train import check_finite

    class Trainer(SFTTrainer):
        """SFTTrainer whose loss is a chunked cross-entropy over the trained positions only.

        TRL's fused head also computes entropy and top-1 accuracy over the full vocabulary in many fp32
        passes; on CPU that is a third of the step. Projecting only the positions with a label through
        the output head gives the same loss for less work and memory (see finetune/speed.py, bench/)."""

        real_tokens = 0
        trained_tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
            loss_sum, n_trained = trained_positions_loss(model, inputs, labels, self.accelerator.autocast(), sharded)
            n = num_items_in_batch if num_items_in_batch is not None else n_trained
            loss = loss_sum / torch.as_tensor(n, device=loss_sum.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            if model.training:
                check_finite(loss)
                self.trained_tokens += int(n_trained)
                am = inputs.get("attention_mask")
                self.real_tokens += int(am.sum()) if am is not None else int(inputs["input_ids"].numel())
            return (loss, None) if return_outputs else loss

    return Trainer


def build(recipe: Recipe, loaded, model, prepared, speed, out: Path, callbacks):
    from trl import SFTConfig

    args = SFTConfig(
        **training_args(recipe, speed, out, bool(prepared.validation)),
        # examples are already truncated (and counted) by the data path; packing needs the row length
        max_length=recipe.data.max_length if recipe.data.packing else None,
        packing=recipe.data.packing,
        padding_free=speed.padding_free,
        dataset_num_proc=None,
    )
    Trainer = make_trainer_class()
    return Trainer(
        model=model,
        args=args,
        train_dataset=data.to_dataset(prepared.train),
        eval_dataset=data.to_dataset(prepared.validation) if prepared.validation else None,
        processing_class=loaded.tokenizer,
        callbacks=callbacks,
    )
