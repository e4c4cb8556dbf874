"""The LLaMA-Factory leg of bench/run.py, run by LLaMA-Factory's own virtual environment (bench/llamafactory_env.sh):

    bench/.venv-llamafactory/bin/python bench/llamafactory_leg.py CONFIG_JSON OUT_JSON DEVICE

Trains with LLaMA-Factory's `run_exp` (what `llamafactory-cli train` calls) and records the same things as the
other legs: each optimizer step's wall time, the logged losses, the real (non-padding) tokens each step saw,
peak memory and the library versions. It imports nothing from finetune (that needs newer libraries).
"""

import json
import sys
import time
from pathlib import Path


def peak_mb(device: str) -> dict:
    if device == "cuda":
        import torch

        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    for line in Path("/proc/self/status").read_text().splitlines():  # the same VmHWM finetune/memory.py reads
        if line.startswith("VmHWM:"):
            return {"peak_mb": int(line.split()[1]) / 1024}
    return {"peak_mb": None}


def main() -> None:
    cfg, out, device = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    import torch
    import transformers
    from transformers import TrainerCallback

    import llamafactory
    from llamafactory.train.tuner import run_exp

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    counted = {"real": 0, "padded": 0}
    original = transformers.Trainer.training_step

    def training_step(self, model, inputs, *a, **k):  # LLaMA-Factory's trainers inherit this one
        am = inputs.get("attention_mask")
        counted["real"] += int(am.sum()) if am is not None else int(inputs["input_ids"].numel())
        counted["padded"] += int(inputs["input_ids"].numel())
        return original(self, model, inputs, *a, **k)

    transformers.Trainer.training_step = training_step

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.t = [], [], None

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    timer = Timer()
    run_exp(args=cfg, callbacks=[timer])
    import peft
    import trl

    out.write_text(json.dumps({"times": timer.times, "losses": timer.losses, "real_tokens": counted["real"], "padded_tokens": counted["padded"],
                               **peak_mb(device), "versions": {"llamafactory": llamafactory.__version__, "torch": torch.__version__,
                                                               "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__}}))


if __name__ == "__main__":
    main()
