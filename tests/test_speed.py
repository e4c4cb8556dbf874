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
