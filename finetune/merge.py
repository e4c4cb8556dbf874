"""`finetune merge ADAPTER --out DIR`: fold a LoRA adapter into a full safetensors model, then verify it.

The merge runs shard by shard: each shard of the base is read, the LoRA deltas of the weights it holds
are added, and the shard is written, so peak memory stays near one shard. Adapters trained on a 4-bit
base are merged by default onto the NF4 round trip of the base weights (quantize, dequantize), which
is what the adapter was trained against. The result is reloaded and compared with base + adapter as
trained on fixed prompts before it is moved into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finetune import artifacts, models
from finetune.memory import peak_memory
from finetune.errors import UserError

err = Console(stderr=True, highlight=False)
MIN_PART_BYTES = 64 << 20  # smallest output part written by the merge
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# fp32 merged vs fp32 base + adapter differ only by float re-association: a few 1e-5 mean |Δlogit| on real
# bases; a top-1 flip needs a near-tie. A merge that is wrong in any weight is far beyond both.
FP32_MEAN_TOLERANCE = 1e-3
FP32_TOP1_SLACK = 0.01
VERIFICATION_FAILED = "VERIFICATION_FAILED"  # marker file in a merged folder that failed its check
PROMPTS = ["What is your name?", "Explain what a star is in one sentence.", "Write a short poem about the sea.",
           "List three prime numbers.", "How do I boil an egg?", "Translate 'good morning' into French.",
           "Who wrote Hamlet?", "Give me two tips for a job interview."]


def base_folder(spec: str) -> Path:
    """A local folder holding the base's safetensors (downloading hub ids where a hub is reachable)."""
    base = models.resolve_base(spec, log=err.print)
    if base.kind != "hub":
        return Path(base.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:
        raise UserError(f"base `{spec}` could not be fetched from the hub ({str(exc).splitlines()[0][:200]}) — pass --base with a local folder") from None


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{folder}: no safetensors weights found (model.safetensors or an index) — merging needs safetensors")


def lora_deltas(adapter: Path) -> tuple[dict, dict, float]:
    """{base weight name: (A, B)} from the adapter, and its config and scale."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter}: a {cfg.get('peft_type')} adapter cannot be merged — only LoRA adapters can")
    if cfg.get("use_dora"):
        raise UserError(f"{adapter}: DoRA adapters are not supported by the shard-by-shard merge yet — load with PEFT and call merge_and_unload()")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    pairs: dict = {}
    for key, t in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise UserError(f"{adapter}: unexpected tensor {key} (modules_to_save or extra embeddings are not supported by merge)")
        module = key.split(".lora_")[0].removeprefix("base_model.model.")
        pairs.setdefault(module + ".weight", {})["A" if ".lora_A." in key else "B"] = t
    return {k: (v["A"], v["B"]) for k, v in pairs.items()}, cfg, scale


def nf4_round_trip(weight, dtype):
    """The base weight as the 4-bit model saw it: cast to the training dtype, NF4 with double quantization
    (what the loader uses), then dequantized."""
    import bitsandbytes.functional as F

    w = weight.to(dtype)
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(q, state).to(weight.dtype)


def read_tensors(path: Path):
    """Yield (name, tensor) from a safetensors file one tensor at a time with plain reads.

    safetensors' own reader memory-maps the file, and every page it touches counts as resident until the
    file is closed, so a whole input shard would stay in memory; reading each tensor's bytes on its own
    keeps just that tensor."""
    import torch

    dtypes = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            if info["dtype"] not in dtypes:
                raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which merge does not handle")
            fh.seek(8 + size + start)
            data = bytearray(fh.read(end - start))
            t = torch.frombuffer(data, dtype=dtypes[info["dtype"]]) if data else torch.empty(0, dtype=dtypes[info["dtype"]])
            yield name, t.reshape(info["shape"])


def merge_shards(base: Path, adapter: Path, out: Path, dtype: str, round_trip_dtype) -> dict:
    """Write the merged weights into `out`, one input shard at a time; returns counts.

    Output is flushed in parts of at most a quarter of an input shard (64 MB at least), so memory holds
    one input shard's pages plus one small output part, not a whole model."""
    import torch
    from safetensors.torch import save_file

    pairs, cfg, scale = lora_deltas(adapter)
    target = getattr(torch, DTYPES[dtype])
    remaining = dict(pairs)
    merged = 0
    shards = shard_files(base)
    part_limit = max(MIN_PART_BYTES, max(f.stat().st_size for f in shards) // 4)
    parts: list[tuple[str, list[str]]] = []
    buffer: dict = {}
    size = total = 0

    def flush():
        nonlocal buffer, size
        if buffer:
            name = f".part-{len(parts):05d}.safetensors"
            save_file(buffer, str(out / name), metadata={"format": "pt"})
            parts.append((name, list(buffer)))
            buffer, size = {}, 0

    for shard in shards:
        for name, t in read_tensors(shard):
            if name in remaining:
                a, b = remaining.pop(name)
                if t.shape != (b.shape[0], a.shape[1]):
                    raise UserError(f"adapter {adapter} does not fit base {base}: {name} is {tuple(t.shape)} in the base "
                                    f"but the adapter expects {(b.shape[0], a.shape[1])} — pass the base it was trained on with --base")
                w = t.float()
                if round_trip_dtype is not None:
                    w = nf4_round_trip(w, round_trip_dtype)
                t = w + scale * (b.float() @ a.float())
                merged += 1
            t = t.to(target) if t.is_floating_point() else t
            buffer[name] = t
            size += t.numel() * t.element_size()
            total += t.numel() * t.element_size()
            if size >= part_limit:
                flush()
    flush()
    if remaining:
        missing = ", ".join(list(remaining)[:3])
        raise UserError(f"adapter {adapter} does not fit base {base}: the base has no weights named {missing} — "
                        f"pass the base it was trained on with --base")
    # name the parts the way transformers expects: one model.safetensors, or numbered shards plus an index
    if len(parts) == 1:
        os.replace(out / parts[0][0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, (tmp_name, keys) in enumerate(parts, 1):
            final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            os.replace(out / tmp_name, out / final)
            weight_map.update({k: final for k in keys})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"merged_weights": merged, "input_shards": len(shards), "shards": len(parts), "scale": scale}


def write_metadata(base: Path, adapter: Path, out: Path, dtype: str, base_spec: str, how: str, name: str) -> None:
    """Config, generation config, tokenizer and a README into `out` (a staging folder published as `name`)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    cfg.dtype = DTYPES[dtype]
    cfg.save_pretrained(out)
    src = adapter if (adapter / "generation_config.json").is_file() else base
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", out / "generation_config.json")
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tok = models.load_tokenizer(str(tok_src))
    tok.save_pretrained(out)
    (out / "README.md").write_text(
        f"# merged model\n\nBase `{base_spec}` with the LoRA adapter `{adapter}` merged in ({how}), saved as {dtype} safetensors "
        f"by `finetune merge`.\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}")\ntokenizer = AutoTokenizer.from_pretrained("{name}")\n```\n')


def dequantized_4bit_weights(base_spec: str, train_dtype: str) -> dict:
    """The base weights exactly as a 4-bit run saw them: the base loaded the way training loads it, each 4-bit
    weight dequantized by bitsandbytes. Independent of `nf4_round_trip`, so verification checks that too."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from finetune.recipe import ModelSection

    short = {v: k for k, v in DTYPES.items()}.get(train_dtype, "bf16")
    loaded = models.load(ModelSection(base=base_spec, quantization="4bit", dtype=short), for_training=False, log=lambda s: None)
    weights = {f"{name}.weight": F.dequantize_4bit(m.weight.data, m.weight.quant_state).float().cpu()
               for name, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    del loaded
    return weights


def logit_distance(ref: list, got: list) -> dict:
    """Max and mean |logit difference| over every position and vocabulary entry, and top-1 agreement."""
    import torch

    diff = torch.cat([(r - g).abs().flatten() for r, g in zip(ref, got)])
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got))
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "top1_agreement": agree / sum(r.shape[0] for r in ref)}


def verify(merged: Path, adapter: Path, base: Path, base_spec: str, dtype: str, round_trip: bool, train_dtype: str) -> dict:
    """Logits of the merged model against base + adapter, both computed in fp32, on fixed chat prompts.

    The reference is what the merge claims to reproduce: the base weights (as the 4-bit model dequantizes
    them, for a round-trip merge) with the adapter applied by PEFT. Computing both sides in fp32 leaves one
    legitimate difference: the merged weights rounded to the output dtype. How much that moves the logits
    depends on the model (depth, logit scale), so it is measured on the same model and prompts: PEFT's own
    merge of the reference, rounded to the output dtype. The merged model may be at most 1.5x as far from
    the reference as that (fp32 output: no rounding, so only float re-association, ~1e-5 on real bases)."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = models.load_tokenizer(str(adapter if (adapter / "tokenizer_config.json").is_file() else base))
    from finetune.data import ensure_chat_template

    ensure_chat_template(tok)
    prompts = [torch.tensor([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                                     return_dict=False)], device=device) for p in PROMPTS]

    def run_all(model) -> list:
        with torch.inference_mode():
            return [model(input_ids=x).logits.float()[0].cpu() for x in prompts]

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if round_trip:
        weights = dequantized_4bit_weights(base_spec, train_dtype)
        state = model.state_dict()
        for name, w in weights.items():
            state[name].copy_(w)
    model = PeftModel.from_pretrained(model, str(adapter)).to(device).eval()
    ref = run_all(model)
    rounding = {"max_abs_logit_diff": 0.0, "mean_abs_logit_diff": 0.0, "top1_agreement": 1.0}
    if dtype != "fp32":
        target = getattr(torch, DTYPES[dtype])
        model = model.merge_and_unload()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(target).float())
        rounding = logit_distance(ref, run_all(model))
    del model
    gc.collect()
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(device).eval()
    result = logit_distance(ref, run_all(merged_model))
    del merged_model
    mean_tol = 1.5 * rounding["mean_abs_logit_diff"] + FP32_MEAN_TOLERANCE
    agree_tol = rounding["top1_agreement"] - FP32_TOP1_SLACK
    quant = "the 4-bit base as dequantized in training" if round_trip else "the original base weights"
    result.update({
        "reference": f"{quant} + adapter (PEFT), fp32 compute; merged model upcast to fp32",
        "rounding_to_output_dtype": rounding,
        "tolerance": {"mean_abs_logit_diff": mean_tol, "top1_agreement": agree_tol,
                      "rule": "1.5x the effect of rounding PEFT's merge of the reference to the output dtype, "
                              f"plus fp32 slack ({FP32_MEAN_TOLERANCE:g} mean, {FP32_TOP1_SLACK:g} top-1)"},
    })
    result["passed"] = result["mean_abs_logit_diff"] <= mean_tol and result["top1_agreement"] >= agree_tol
    return result


def run(adapter: Path, out: Path, *, base: str | None, dtype: str, original_weights: bool, overwrite: bool) -> None:
    import torch

    if dtype not in DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not allowed — use bf16, fp16 or fp32")
    info = models.adapter_info(adapter) if adapter.is_dir() else None
    if info is None:
        raise UserError(f"{adapter}: not an adapter folder (no adapter_config.json) — pass a folder written by `finetune sft` or `dpo`")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists — pass --overwrite to replace it, or choose another --out")
    if out.resolve() == adapter.resolve():
        raise UserError("--out must differ from the adapter folder")
    artifacts.check_writable(out.parent, "--out")
    base_spec = base or info["base"]
    if not base_spec:
        raise UserError(f"{adapter}: the adapter names no base — pass --base")
    try:
        folder = base_folder(base_spec)
    except UserError as exc:
        raise UserError(f"adapter {adapter}: its base cannot be found — {exc}") from None
    trained_q = info["quantization"] or "none"
    manifest = adapter / "manifest.json"
    train_dtype = json.loads(manifest.read_text()).get("speed", {}).get("dtype", "bfloat16") if manifest.is_file() else "bfloat16"
    round_trip = trained_q == "4bit" and not original_weights
    how = "onto the NF4 round trip of the base weights, as the adapter was trained" if round_trip else "onto the original base weights"
    err.print(f"merging {adapter} into {base_spec} ({dtype}), {how}")

    start = time.perf_counter()
    # an interrupted or failed merge leaves nothing behind; a finished one replaces --out whole
    with artifacts.disk_errors_are_user_errors(out, "--out"), artifacts.staged_folder(out, "merging") as tmp:
        stats = merge_shards(folder, adapter, tmp, dtype, getattr(torch, train_dtype) if round_trip else None)
        merge_s = time.perf_counter() - start
        peak_mb = peak_memory("cpu").used_mb  # the merge runs on the CPU
        write_metadata(folder, adapter, tmp, dtype, base_spec, how, out.name)
        # compare with what the merge claims to reproduce: the 4-bit model as trained, or the original weights + adapter
        check = verify(tmp, adapter, folder, base_spec, dtype, round_trip, train_dtype)
        report = {"adapter": str(adapter), "base": base_spec, "dtype": dtype, "merged_onto": "nf4_round_trip" if round_trip else "original",
                  **stats, "merge_seconds": round(merge_s, 2), "peak_rss_mb_during_merge": round(peak_mb),
                  "verification": check}
        artifacts.write_json(tmp / "merge_report.json", report)
        if not check["passed"]:
            (tmp / VERIFICATION_FAILED).write_text(
                "The merged logits differ from base + adapter beyond tolerance: do not use this model. "
                "See merge_report.json.\n")
            with (tmp / "README.md").open("a") as fh:
                fh.write("\n**Warning: verification failed** — this merge does not reproduce base + adapter; see merge_report.json.\n")
    t = Table(title=f"merged → {out}", show_header=False)
    t.add_row("merged onto", how)
    t.add_row("weights merged", f"{stats['merged_weights']}, {stats['input_shards']} shard(s) in, {stats['shards']} out")
    t.add_row("time / peak memory", f"{merge_s:.1f} s / {peak_mb:.0f} MiB (RSS, merge phase)")
    t.add_row("max / mean |Δlogit|", f"{check['max_abs_logit_diff']:.2e} / {check['mean_abs_logit_diff']:.2e}")
    t.add_row("top-1 agreement", f"{check['top1_agreement']:.1%}")
    tol = check["tolerance"]
    t.add_row("allowed", f"mean |Δlogit| ≤ {tol['mean_abs_logit_diff']:.2e}, top-1 ≥ {tol['top1_agreement']:.1%} (fp32 compute; "
              f"{dtype} rounding alone: {check['rounding_to_output_dtype']['mean_abs_logit_diff']:.2e})")
    t.add_row("verification", "[green]passed[/]" if check["passed"] else "[red]FAILED[/]")
    Console().print(t)
    if not check["passed"]:
        from finetune.errors import RunStopped

        raise RunStopped(
            f"{out}: the merged model does not match base + adapter (mean |Δlogit| {check['mean_abs_logit_diff']:.3g}, "
            f"allowed {check['tolerance']['mean_abs_logit_diff']:.3g}; top-1 {check['top1_agreement']:.1%}, allowed "
            f"{check['tolerance']['top1_agreement']:.1%}); it is marked VERIFICATION_FAILED. Check that the base is the one "
            f"the adapter was trained on (--base), retry with --dtype fp32 to rule out rounding, and if it persists report "
            f"it with {out / 'merge_report.json'}")
