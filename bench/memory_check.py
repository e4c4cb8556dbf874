"""Peak memory of one scoring pass over the built-in base, two ways of getting the final hidden state.

    python bench/memory_check.py hook            # finetune.speed.trained_positions_loss (a forward hook)
    python bench/memory_check.py hidden_states   # the model's output_hidden_states=True, every layer kept
    python bench/memory_check.py hook --train    # the same with a backward pass (LoRA attached)
    python bench/memory_check.py hook --length=2048  # tokens per row (default 512)

Each mode runs in its own process (the peak is the process's high-water mark), batch 4 x 512 tokens (or --length), bf16
where the CPU has it. Prints the summed loss so the two modes can be compared for equality.
"""

from __future__ import annotations

import sys


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import models, speed
    from finetune.memory import peak_memory

    mode, train = sys.argv[1], "--train" in sys.argv
    base = models.resolve_base("smollm2-135m-instruct")
    dtype = models.pick_dtype("auto", "cpu")
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
    if train:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    torch.manual_seed(0)
    length = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--length=")), 512))
    ids = torch.randint(100, 40000, (4, length))
    labels = ids.clone()
    inputs = {"input_ids": ids}
    before = peak_memory("cpu").used_mb
    ctx = torch.enable_grad() if train else torch.inference_mode()
    with ctx:
        if mode == "hook":
            loss, _ = speed.trained_positions_loss(model, inputs, labels)
        else:
            inner = model.get_base_model() if train else model
            hidden = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]
            loss = speed.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), inner.get_output_embeddings().weight,
                                              labels[:, 1:].reshape(-1))
        if train:
            loss.backward()
    print(f"{mode}{' train' if train else ' eval'}: loss {float(loss):.6f}  peak {peak_memory('cpu').used_mb:.0f} MiB "
          f"(after loading {before:.0f} MiB)")


if __name__ == "__main__":
    main()
