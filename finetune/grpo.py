"""`finetune grpo RECIPE`: online RL of a LoRA adapter with TRL's GRPOTrainer on a file of prompts.

`run` is the whole workflow, top to bottom: load the policy, read the prompts (any format with a prompt; the
rest of each row goes to the rewards as columns), attach LoRA, build the rewards the recipe declares
(finetune/rewards.py), train, publish. Each step samples `grpo.num_generations` answers per prompt, scores
them with the weighted rewards and moves the policy towards the better ones of each group. Generation runs
in transformers, or in vLLM when it is installed and the run is on CUDA. The mean reward (and each reward's
mean) is in metrics.jsonl; samples of the generations with their rewards go to samples.jsonl in the run folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence

from finetune import data, launch, models, publish, rewards, speed, training
from finetune.preflight import Plan
from finetune.recipe import Recipe
from finetune.training import console

SAMPLES = "samples.jsonl"
SAMPLES_PER_LOG = 4  # generations written to samples.jsonl at each logged step


def run(recipe: Recipe, plan: Plan, callbacks: Sequence = ()) -> Path:
    """Train a GRPO adapter as planned and publish it; `callbacks` are extra TrainerCallbacks."""
    started = time.time()
    training.begin(recipe, plan)
    built = build(recipe, plan.out / "checkpoints", callbacks)
    metrics = training.open_output(recipe, plan)
    trained = training.train(built.trainer, recipe, plan, metrics)
    final = dict(metrics[-1]) if metrics else {}
    means = [r["reward"] for r in metrics if "reward" in r]
    if means:
        console.print(f"mean reward: first logged step {means[0]:.3f} → last {means[-1]:.3f} ({rewards.describe(recipe)})")
    return publish.adapter(built.trainer, recipe, plan, built.loaded, built.prepared, built.settings, metrics, final,
                           trained, None, started)


@dataclass
class Built:
    loaded: models.Loaded
    prepared: data.Prepared
    settings: speed.RunSettings
    trainer: Any


def use_vllm(recipe: Recipe, device: str) -> bool:
    choice = recipe.grpo.use_vllm
    return (find_spec("vllm") is not None and device == "cuda") if choice == "auto" else bool(choice)


def read_prompts(recipe: Recipe, tokenizer) -> data.Prepared:
    """The prompt rows (no tokenization: GRPOTrainer renders the chat prompt itself)."""
    rows, files = data.read(recipe.data.train, recipe.data.columns)
    fmt, records = data.normalise(rows, recipe.data.format, "grpo", recipe.data.system_prompt)
    added = data.ensure_chat_template(tokenizer)
    prepared = data.Prepared(format=fmt, files=files, rows=len(rows), train=[rec for rec, _ in records], validation=[])
    prepared.notes.append(f"{len(records)} prompts" + (" (default ChatML template: the tokenizer had none)" if added else ""))
    for note in prepared.notes:
        console.print(note)
    return prepared


def build(recipe: Recipe, out: Path, callbacks: Sequence = ()) -> Built:
    """Load the policy, read the prompts, attach LoRA, load the rewards and make the trainer."""
    import datasets
    from trl import GRPOConfig

    loaded = training.load_base(recipe)
    prepared = read_prompts(recipe, loaded.tokenizer)
    settings = speed.choose(recipe, loaded, "grpo")
    training.warn_memory(recipe, loaded)
    # the policy's log-probabilities are compared between sampling and training passes: no dropout in between
    model = training.attach_lora(recipe, loaded, settings, dropout=0.0)
    speed.apply(loaded.model, model, settings)
    # GRPO samples its answers outside autocast, where LoRA layers must cast their input themselves
    speed.lora_input_casting(model, True)
    funcs, weights, tokenizers = rewards.build(recipe, loaded.device)
    console.print(f"rewards: {rewards.describe(recipe)}")
    g = recipe.grpo
    vllm = use_vllm(recipe, loaded.device)
    args = GRPOConfig(
        **training.training_args(recipe, settings, out, False),
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        beta=g.beta,
        loss_type=g.loss,
        reward_weights=weights,
        use_vllm=vllm,
        vllm_mode="colocate",
        # the training-mode config turns the cache off; sampling needs it (GRPO spends most of a step generating)
        generation_kwargs={"use_cache": True},
        log_completions=False,
        disable_dropout=True,
    )
    trainer = make_trainer_class()(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=datasets.Dataset.from_list(prepared.train),
        processing_class=loaded.tokenizer,
        reward_processing_classes=tokenizers,
        callbacks=list(callbacks),
    )
    training.quiet_trainer(trainer)
    return Built(loaded, prepared, settings, trainer)


def make_trainer_class():
    from trl import GRPOTrainer

    class Trainer(training.guarded(GRPOTrainer)):
        """GRPOTrainer that stops on a non-finite loss and writes samples of its generations."""

        def log(self, logs, start_time=None):
            training_row = self.model.training and "loss" in logs
            super().log(logs, start_time)
            if training_row and launch.is_main():
                write_samples(Path(self.args.output_dir).parent / SAMPLES, self.state.global_step, self._logs)

    return Trainer


def write_samples(path: Path, step: int, logs: dict) -> None:
    """The latest generations with each reward (TRL keeps the last generation batch in `_logs`)."""
    prompts, completions = list(logs["prompt"]), list(logs["completion"])
    scores = {name: list(values) for name, values in logs["rewards"].items()}
    with path.open("a") as fh:
        for i in range(min(SAMPLES_PER_LOG, len(prompts))):
            row = {"step": step, "prompt": _last_user(prompts[i]), "completion": rewards.text(completions[i]),
                   "rewards": {name: v[i] for name, v in scores.items() if i < len(v)}}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _last_user(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt)
