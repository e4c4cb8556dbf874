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
# verification limits per output dtype: mean |logit difference| and top-1 agreement
TOLERANCE = {"fp32": (1e-3, 1.0), "bf16": (5e-2, 0.95), "fp16": (2e-2, 0.95)}
PROMPTS = ["What is your name?", "Explain what a star is in one sentence.", "Write a short poem about the sea.",
           "List three prime numbers."]


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


def write_metadata(base: Path, adapter: Path, out: Path, dtype: str, base_spec: str, how: str) -> None:
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
        f'model = AutoModelForCausalLM.from_pretrained("{out.name}")\ntokenizer = AutoTokenizer.from_pretrained("{out.name}")\n```\n')


def verify(merged: Path, adapter: Path, base_spec: str, quantization: str, dtype: str, train_dtype: str) -> dict:
    """Logits of the merged model against base + adapter loaded as trained (same quantization and dtype),
    on fixed prompts. The tolerance is that of the less precise of the two."""
    import torch
    from transformers import AutoModelForCausalLM

    short = {v: k for k, v in DTYPES.items()}.get(train_dtype, "bf16")
    loaded, _ = models.load_any(str(adapter), quantization=quantization, base_override=base_spec, dtype=short, log=lambda s: None)
    tok = loaded.tokenizer
    from finetune.data import ensure_chat_template

    ensure_chat_template(tok)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=getattr(torch, DTYPES[dtype]))
    model.eval()
    max_diff, diff_sum, values, agree, positions = 0.0, 0.0, 0, 0, 0
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True, return_dict=False)
            x = torch.tensor([ids])
            ref = loaded.model(input_ids=x.to(loaded.model.device)).logits.float().cpu()[0]
            got = model(input_ids=x).logits.float()[0]
            d = (ref - got).abs()
            max_diff = max(max_diff, d.max().item())
            diff_sum += d.sum().item()
            values += d.numel()
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            positions += len(ids)
    mean_tol, agree_tol = max(TOLERANCE[dtype], TOLERANCE[short])
    result = {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": diff_sum / values, "top1_agreement": agree / positions,
              "reference": f"base + adapter ({quantization}, {short})", "tolerance": {"mean_abs_logit_diff": mean_tol, "top1_agreement": agree_tol}}
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

    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    with artifacts.disk_errors_are_user_errors(out, "--out"):
        try:
            stats = merge_shards(folder, adapter, tmp, dtype, getattr(torch, train_dtype) if round_trip else None)
            merge_s = time.perf_counter() - start
            peak_mb = peak_memory("cpu").used_mb  # the merge runs on the CPU
            write_metadata(folder, adapter, tmp, dtype, base_spec, how)
            # compare with what the merge claims to reproduce: the 4-bit model as trained, or the original weights + adapter
            check = verify(tmp, adapter, base_spec, trained_q if round_trip else "none", dtype, train_dtype)
            report = {"adapter": str(adapter), "base": base_spec, "dtype": dtype, "merged_onto": "nf4_round_trip" if round_trip else "original",
                      **stats, "merge_seconds": round(merge_s, 2), "peak_rss_mb_during_merge": round(peak_mb),
                      "verification": check}
            artifacts.write_json(tmp / "merge_report.json", report)
            if not check["passed"]:
                (tmp / "VERIFICATION_FAILED").write_text("merged logits differ from base + adapter beyond tolerance; see merge_report.json\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted merge leaves nothing behind
            raise
    t = Table(title=f"merged → {out}", show_header=False)
    t.add_row("merged onto", how)
    t.add_row("weights merged", f"{stats['merged_weights']}, {stats['input_shards']} shard(s) in, {stats['shards']} out")
    t.add_row("time / peak memory", f"{merge_s:.1f} s / {peak_mb:.0f} MiB (RSS, merge phase)")
    t.add_row("max / mean |Δlogit|", f"{check['max_abs_logit_diff']:.2e} / {check['mean_abs_logit_diff']:.2e}")
    t.add_row("top-1 agreement", f"{check['top1_agreement']:.1%}")
    t.add_row("verification", "[green]passed[/]" if check["passed"] else "[red]FAILED[/]")
    Console().print(t)
    if not check["passed"]:
        from finetune.errors import RunStopped

        raise RunStopped(f"{out}: the merged model does not match base + adapter within the {dtype} tolerance "
                         f"(mean |Δlogit| {check['mean_abs_logit_diff']:.3g}, top-1 {check['top1_agreement']:.1%}); it is marked VERIFICATION_FAILED")
