"""bitsandbytes 4-bit on CPUs with AVX512-BF16: after an eval-mode forward, LoRA gradients must still be right.

The first eval/no-grad 4-bit forward repacks the weight for inference; backward then silently gives wrong
gradients (relative error ~1). The loader turns that path off for every 4-bit CPU load. These tests
compare LoRA gradients on the 4-bit base, after an eval pass, with those on an fp32 model that holds the
dequantized weights."""

import copy

import pytest
import torch

from finetune import models
from finetune.recipe import ModelSection


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory, tiny_tokenizer):
    """Hidden 64: the smallest width for which bitsandbytes takes its repacking CPU path."""
    from helpers import build_model

    folder = tmp_path_factory.mktemp("tiny64")
    build_model(folder, tiny_tokenizer, hidden=64)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def lora_gradient_error(tiny, guard: bool, monkeypatch=None) -> float:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if not guard:
        monkeypatch.setattr(models, "guard_bnb_cpu", lambda model: None)  # bitsandbytes' own default behaviour
    loaded = models.load(ModelSection(base=str(tiny), quantization="4bit", dtype="fp32"), log=lambda s: None)
    q = loaded.model
    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    quantized = dict(q.named_modules())
    for name, m in ref.named_modules():
        if isinstance(quantized.get(name), bnb.nn.Linear4bit):
            w = quantized[name].weight
            m.weight.data = dequantize_4bit(w.data, w.quant_state).float()
    cfg = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    torch.manual_seed(0)
    pq = get_peft_model(q, cfg)
    torch.manual_seed(0)
    pr = get_peft_model(ref, copy.deepcopy(cfg))
    ids = torch.randint(4, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    pq.eval()
    with torch.no_grad():
        pq(input_ids=ids)  # the evaluation pass that triggers the repack
    grads = []
    for m in (pq, pr):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in m.parameters() if p.requires_grad]))
    return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


def test_lora_gradients_on_4bit_base_after_eval_pass_are_exact(tiny64):
    assert lora_gradient_error(tiny64, guard=True) < 1e-4


@pytest.mark.skipif(not models.cpu_supports_bf16(), reason="the hazard exists only on CPUs with AVX512-BF16")
def test_without_the_guard_gradients_are_wrong(tiny64, monkeypatch):
    """Documents why the guard exists; if bitsandbytes fixes the bug this test tells us the guard can go."""
    assert lora_gradient_error(tiny64, guard=False, monkeypatch=monkeypatch) > 0.1
