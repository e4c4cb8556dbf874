"""The hand-written speed pieces equal what they replace."""

import pytest
import torch
import torch.nn.functional as F

from finetune import speed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_autograd(dtype, monkeypatch):
    monkeypatch.setattr(speed, "CHUNK", 7)  # several chunks, the last one partial
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 16, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=dtype)
    targets = torch.randint(0, 50, (30,), generator=g)
    got = speed.linear_cross_entropy(hidden, weight, targets)
    (got * 0.5).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    ref = F.cross_entropy((hidden.float() @ weight.float().T), targets, reduction="sum")
    (ref * 0.5).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.item() == pytest.approx(ref.item(), rel=tol)
    torch.testing.assert_close(grad.float(), hidden.grad.float(), rtol=tol, atol=tol)


def test_varlen_attention_equals_block_diagonal_sdpa(tiny):
    """A padding-free batch through per-sequence attention gives each sequence exactly its own logits."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    seqs = [list(range(5, 17)), list(range(20, 27)), list(range(30, 49))]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in seqs])
    batch.pop("labels")
    ref_model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    speed.use_varlen_attention(model)
    with torch.no_grad():
        ref = ref_model(**batch, use_cache=False).logits  # transformers' own block-diagonal mask (training mode)
        got = model(**batch, use_cache=False).logits
        alone = torch.cat([ref_model(input_ids=torch.tensor([s])).logits for s in seqs], dim=1)
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # an ordinary padded batch goes through the usual SDPA path
    with torch.no_grad():
        x = torch.tensor([seqs[0], seqs[0][:6] + [0] * 6])
        m = torch.tensor([[1] * 12, [1] * 6 + [0] * 6])
        torch.testing.assert_close(model(input_ids=x, attention_mask=m).logits, ref_model(input_ids=x, attention_mask=m).logits)
