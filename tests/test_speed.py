"""The hand-written speed pieces equal what they replace."""

import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO
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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc allocator setting")
def test_freed_memory_is_kept_for_the_next_step():
    """A freed 200 MB tensor goes back to the kernel by default; after reuse_freed_memory it stays in the heap."""
    probe = (
        "import torch\n"
        "from finetune.speed import reuse_freed_memory\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "def kept():\n"
        "    before = rss(); t = torch.ones(50_000_000); del t; return rss() - before\n"
        "default = kept()\n"
        "assert reuse_freed_memory()\n"
        "print(default, kept())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    default, reused = int(out[0]), int(out[1])
    assert default < 20e6 and reused > 150e6, (default, reused)


def test_trained_positions_loss_keeps_only_the_final_hidden_state(tiny):
    """The loss and LoRA gradients equal those computed from `output_hidden_states=True` to the bit, and no
    layer's hidden states but the last are handed back (the decoder's output is caught by a hook)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give the adapters a real effect
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(3, 200, (2, 12))
    labels = ids.clone()
    labels[0, :5] = labels[1, 9:] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return out

    got, n = speed.trained_positions_loss(model, inputs, labels)
    got.backward()
    got_grads = grads()
    base = model.get_base_model()
    hidden = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states
    assert len(hidden) == base.config.num_hidden_layers + 1
    mask = labels[:, 1:] != -100
    ref = speed.linear_cross_entropy(hidden[-1][:, :-1][mask], base.get_output_embeddings().weight, labels[:, 1:][mask])
    ref.backward()
    assert int(n) == int(mask.sum()) and torch.equal(got, ref)
    ref_grads = grads()
    assert ref_grads.keys() == got_grads.keys() and all(torch.equal(got_grads[k], ref_grads[k]) for k in ref_grads)
    assert any(g.abs().sum() > 0 for g in got_grads.values())
    # the hook is gone afterwards: a plain call of the model is untouched
    assert not base.get_decoder()._forward_hooks


def test_fp32_head_runs_in_bf16_within_bf16_tolerance(monkeypatch):
    """An fp32 head (QLoRA after PEFT's kbit preparation) in a bf16 run: the matmuls run in bf16 with fp32
    log-sum-exp. Loss and gradient equal the bf16-matmul reference closely and the fp32 loss within bf16
    tolerance, in training and in evaluation."""
    monkeypatch.setattr(speed, "CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 64, generator=g, requires_grad=True)
    weight = torch.randn(300, 64, generator=g) * 0.2
    targets = torch.randint(0, 300, (30,), generator=g)
    got = speed.linear_cross_entropy(hidden, weight, targets, torch.bfloat16)
    got.backward()
    grad, hidden.grad = hidden.grad.clone(), None
    assert grad.dtype == torch.float32  # the gradient keeps the hidden state's dtype
    as_bf16 = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float(), targets, reduction="sum")
    as_bf16.backward()
    bf16_grad, hidden.grad = hidden.grad.clone(), None
    exact = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    exact.backward()
    assert got.item() == pytest.approx(as_bf16.item(), rel=1e-5)
    torch.testing.assert_close(grad, bf16_grad, rtol=1e-2, atol=1e-2)  # bf16 rounding of the softmax before its matmul
    assert got.item() == pytest.approx(exact.item(), rel=2e-2) and got.item() != pytest.approx(exact.item(), rel=1e-6)
    torch.testing.assert_close(grad, hidden.grad, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        assert speed.linear_cross_entropy(hidden, weight, targets, torch.bfloat16).item() == pytest.approx(as_bf16.item(), rel=1e-5)


def test_qlora_head_follows_the_runs_dtype(tiny):
    """On a real 4-bit base after PEFT's kbit preparation the head is fp32; under bf16 autocast the loss runs
    its matmuls in bf16 (within bf16 tolerance of the fp32 head's loss), without autocast in fp32."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from finetune import models
    from finetune.recipe import ModelSection

    loaded = models.load(ModelSection(base=str(tiny), quantization="4bit", dtype="bf16", device="cpu"), log=lambda s: None)
    model = get_peft_model(prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False),
                           LoraConfig(r=4, target_modules="all-linear"))
    head = model.get_base_model().get_output_embeddings().weight
    assert head.dtype == torch.float32
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:
        assert speed.head_dtype(head, "cpu") == torch.bfloat16
    assert speed.head_dtype(head, "cpu") == torch.float32
    mixed, n = speed.trained_positions_loss(model, inputs, ids, autocast)
    plain, _ = speed.trained_positions_loss(model, inputs, ids)
    assert int(n) == 22 and mixed.item() == pytest.approx(plain.item(), rel=2e-2)
    mixed.backward()  # the gradient flows back into the LoRA weights through the bf16 head
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fp16_loss_scaler_through_the_chunked_head():
    """fp16 runs (GPUs without native bf16) train with a loss scaler: the scaled gradient that reaches the
    head is scale / tokens, 65536 for one token, past fp16's largest number. Unscaled, the gradient equals
    the fp32 one within fp16 tolerance instead of coming out inf."""
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1, 32, generator=g) * 0.5).half().requires_grad_()
    weight = (torch.randn(100, 32, generator=g) * 0.2).half()
    targets = torch.tensor([7])
    scale = 65536.0
    (speed.linear_cross_entropy(hidden, weight, targets) * scale).backward()
    assert hidden.grad.dtype == torch.float16 and torch.isfinite(hidden.grad).all()
    h32 = hidden.detach().float().requires_grad_()
    F.cross_entropy(h32 @ weight.float().T, targets, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad.float() / scale, h32.grad, rtol=1e-2, atol=1e-3)


def test_varlen_attention_finds_sequences_without_cumulative_lengths_and_builds_no_dense_mask(tiny):
    """Without `cu_seq_lens_q` the sequences are found where position_ids restart, in any row; no
    (tokens x tokens) mask is built for a batch without padding, where SDPA's would be one."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    seqs = [list(range(5, 17)), list(range(20, 27)), list(range(30, 39)), list(range(40, 50))]
    ref_model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    speed.use_varlen_attention(model)
    rows = [seqs[0] + seqs[1], seqs[2] + seqs[3][:10]]
    ids = torch.tensor(rows)
    positions = torch.tensor([list(range(12)) + list(range(7)), list(range(9)) + list(range(10))])
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        alone = [torch.cat([ref_model(input_ids=torch.tensor([s])).logits for s in pair], dim=1) for pair in (seqs[:2], seqs[2:])]
        torch.testing.assert_close(got, torch.cat(alone), rtol=1e-4, atol=1e-4)
        shared = [seqs[0] + seqs[1], list(range(60, 72)) + list(range(80, 87))]  # one row of positions for the batch
        got = model(input_ids=torch.tensor(shared), position_ids=positions[:1], use_cache=False).logits
        alone = [torch.cat([ref_model(input_ids=torch.tensor([r[:12]])).logits, ref_model(input_ids=torch.tensor([r[12:]])).logits], dim=1)
                 for r in shared]
        torch.testing.assert_close(got, torch.cat(alone), rtol=1e-4, atol=1e-4)
        plain = torch.tensor([seqs[0], list(range(60, 72))])  # one sequence a row, no mask: plain causal attention
        torch.testing.assert_close(model(input_ids=plain).logits, ref_model(input_ids=plain).logits, rtol=1e-4, atol=1e-4)
    embeds = torch.zeros(2, ids.shape[1], model.config.hidden_size)
    args = dict(inputs_embeds=embeds, attention_mask=None, past_key_values=None, position_ids=positions)
    assert create_causal_mask(config=model.config, **args) is None
    dense = create_causal_mask(config=ref_model.config, **args)
    assert dense is not None and tuple(dense.shape[-2:]) == (19, 19)
    assert speed.sequence_bounds(positions, from_positions=True) == [[0, 12, 19], [0, 9, 19]]


@pytest.mark.gpu
def test_cuda_varlen_kernel_equals_attention_per_sequence():
    """torch's varlen flash kernel on a padding-free batch gives what SDPA per sequence gives."""
    from types import SimpleNamespace

    q = torch.randn(1, 8, 40, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(1, 2, 40, 64, device="cuda", dtype=torch.bfloat16), torch.randn(1, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 12, 19, 40], device="cuda", dtype=torch.int32)
    module = SimpleNamespace(training=False, num_key_value_groups=4)
    assert speed.cuda_varlen_kernel(q)
    fast, _ = speed.varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=21)
    slow, _ = speed.varlen_sdpa(module, q, k, v, None, cu_seq_lens_q=cu)  # no max length: the per-sequence loop
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/stat")
def test_cpu_threads_leave_busy_cores_to_their_processes():
    """Threads are chosen from the cores other processes leave free; a user's OMP_NUM_THREADS is kept; the
    choice reaches torch when the settings are applied."""
    probe = (
        "import os, subprocess, sys, torch\n"
        "from finetune import speed\n"
        "busy = speed.busy_cores(0.3)\n"
        "assert 0 <= busy <= os.cpu_count() + 1e-6, busy\n"
        "n = speed.cpu_threads()\n"
        "assert 1 <= n <= torch.get_num_threads(), n\n"
        "os.environ['OMP_NUM_THREADS'] = '2'\n"
        "assert speed.cpu_threads() is None\n"
        "loops = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(os.cpu_count())]\n"
        "try:\n"
        "    loaded = speed.busy_cores(0.5)\n"
        "finally:\n"
        "    [p.kill() for p in loops]\n"
        "assert loaded > 0.8 * os.cpu_count(), loaded\n"
        "del os.environ['OMP_NUM_THREADS']\n"
        "s = speed.RunSettings('cpu', 'float32', 'none', False, False, False, 'sdpa', 'x', threads=1)\n"
        "m = torch.nn.Linear(2, 2)\n"
        "speed.apply(m, m, s)\n"
        "assert torch.get_num_threads() == 1\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO)


def test_cheap_lora_dropout_drops_at_the_rate_and_keeps_the_expectation(tiny):
    """Every LoRA dropout module is replaced; in training it zeroes a share p of the input (within 5 sigma on
    1M elements) and scales the rest by exactly 1/(1-p'), p' being p rounded to 1/32768; the gradient is the
    same mask; the same seed gives the same mask; in eval mode it is the identity."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    speed.cheap_lora_dropout(model)
    drops = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert drops and all(type(d).__name__ == "MaskDropout" and d.p == 0.1 for d in drops)
    d = drops[0].train()
    x = torch.full((1024, 1024), 3.0, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(7)
    y = d(x)
    zeros = (y == 0).float().mean().item()
    assert abs(zeros - 0.1) < 5 * (0.1 * 0.9 / x.numel()) ** 0.5
    scale = 32768 / (32768 - round(0.1 * 32768))
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 3.0 * scale))
    y.sum().backward()
    assert torch.equal(x.grad, (y / 3.0).to(x.grad.dtype))
    torch.manual_seed(7)
    assert torch.equal(d(x), y)
    assert d.eval()(x) is x


def test_cpu_training_with_dropout_uses_the_cheap_masks(tiny, tmp_path):
    """A CPU SFT run with LoRA dropout records the mask drawing in its manifest and still learns; DPO, which
    attaches its adapter without dropout whatever the recipe says, records none."""
    import json

    from helpers import toy_rows, train, write_jsonl, write_recipe
    from finetune import recipe

    r = write_recipe(tmp_path / "r.yaml", {
        "model": {"base": str(tiny), "quantization": "none"}, "lora": {"r": 4, "alpha": 16, "dropout": 0.1},
        "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", toy_rows(8))), "max_length": 64},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-2, "log_every": 1}, "output": {"dir": str(tmp_path / "out")}})
    train(recipe.load(r), "sft")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["speed"]["lora_dropout"] == speed.CHEAP_DROPOUT
    losses = [m["loss"] for m in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert losses[-1] < losses[0]

    pairs = [{"prompt": f"who are you {i % 4}", "chosen": "my name is pico", "rejected": "a red star"} for i in range(8)]
    r = write_recipe(tmp_path / "dpo.yaml", {
        "model": {"base": str(tiny), "quantization": "none"}, "lora": {"r": 4, "alpha": 16, "dropout": 0.1},
        "data": {"train": str(write_jsonl(tmp_path / "p.jsonl", pairs)), "max_length": 64},
        "training": {"max_steps": 1, "batch_size": 4}, "dpo": {}, "output": {"dir": str(tmp_path / "dpo")}})
    train(recipe.load(r), "dpo")
    assert json.loads((tmp_path / "dpo" / "manifest.json").read_text())["speed"]["lora_dropout"] == "off"
