"""`training.sample_every`: every N steps the model being trained answers a few validation prompts greedily,
and the answers are appended to `samples.jsonl` in the run folder, so a person sees them change as the
adapter learns (and notices early when it learns the wrong thing). Used by every training method."""

from __future__ import annotations

import json
from pathlib import Path

from finetune import launch
from finetune.recipe import Recipe
from finetune.speed import RunSettings, lora_input_casting
from finetune.turns import end_of_turn_ids

SAMPLES = "samples.jsonl"


def prompt_ids(validation: list, n: int) -> list[list[int]]:
    """The prompts of the first `n` validation items: a preference pair's prompt, or the tokens of an SFT
    example before its first trained token. Examples trained from their first token on (plain text,
    `data.train_on: all`) have no prompt part: their first half is the prompt and the model continues it."""
    out = []
    for item in validation[:n]:
        if hasattr(item, "prompt_ids"):
            ids = item.prompt_ids
        else:
            first = next((i for i, t in enumerate(item.labels) if t != -100), len(item.labels))
            ids = item.input_ids[:first] if first > 0 else item.input_ids[: max(1, len(item.input_ids) // 2)]
        out.append(list(ids))
    return out


def generate(model, tokenizer, prompts: list[list[int]], max_tokens: int, settings: RunSettings) -> list[dict]:
    """Greedy answers from the model as it is now: eval mode and no gradients, then back to how training had it."""
    import torch
    from transformers import GenerationConfig

    eos = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    gc = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    lora_input_casting(model, True)  # generation runs outside the trainer's autocast (see speed.lora_input_casting)
    rows = []
    try:
        with torch.no_grad():
            for ids in prompts:  # one at a time: no padding, so each answer is what this prompt alone gets
                x = torch.tensor([ids], device=device)
                new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)[0, len(ids):].tolist()
                stopped = bool(new) and new[-1] in eos
                rows.append({"prompt": tokenizer.decode(ids, skip_special_tokens=True),
                             "answer": tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True),
                             "tokens": len(new), "stopped": stopped})
    finally:
        lora_input_casting(model, settings.dtype == "float32")
        model.train(was_training)
    return rows


def callback(recipe: Recipe, out: Path, tokenizer, validation: list, settings: RunSettings):
    """A TrainerCallback that writes the samples every `training.sample_every` steps (process 0 writes; every
    process generates, so a sharded model's forward has all of them taking part)."""
    from transformers import TrainerCallback

    t = recipe.training
    prompts = prompt_ids(validation, t.sample_prompts)
    path = out / SAMPLES

    class Samples(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            # resumed: the rows written after the checkpoint belong to the steps about to be redone
            if launch.is_main() and path.is_file():
                rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= state.global_step]
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))

        def on_step_end(self, args, state, control, model=None, **kw):
            if not prompts or state.global_step % t.sample_every:
                return
            rows = generate(model, tokenizer, prompts, t.sample_max_tokens, settings)
            if launch.is_main():
                with path.open("a") as fh:
                    fh.writelines(json.dumps({"step": state.global_step, **r}) + "\n" for r in rows)

    return Samples()
