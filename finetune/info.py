"""`finetune info MODEL`: what a base, merged folder or adapter is, read from its files without loading weights.

Architecture, parameters (counted from the safetensors headers), dtype, context length, vocabulary, the chat
template rendered on a sample conversation, quantization; for an adapter also its base, rank, alpha,
target modules and the training recipe saved beside it; for a folder made by `finetune run` (the pipeline's
own folder, or its final model) the lineage of every stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finetune import models
from finetune.errors import UserError

SAMPLE = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who are you?"}]


def weights_summary(folder: Path) -> dict:
    """Parameter count and dtypes from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    total, dtypes = 0, {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n
                dt = sl.get_dtype()
                dtypes[dt] = dtypes.get(dt, 0) + n
    return {"parameters": total, "dtypes": dtypes}


def model_facts(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    text_cfg = cfg.get("text_config") or cfg  # multimodal configs nest the language model's settings
    w = weights_summary(folder)
    facts = {
        "architecture": ", ".join(cfg.get("architectures") or [cfg.get("model_type", "?")]),
        "model_type": cfg.get("model_type"),
        "parameters": w["parameters"],
        "weight_dtypes": w["dtypes"],
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "context_length": text_cfg.get("max_position_embeddings"),
        "vocabulary": text_cfg.get("vocab_size"),
        "layers": text_cfg.get("num_hidden_layers"),
        "hidden_size": text_cfg.get("hidden_size"),
        "quantization": (cfg.get("quantization_config") or {}).get("quant_method") or "none",
    }
    return facts


def template_facts(folder: Path) -> dict:
    from finetune.data import ensure_chat_template

    try:
        tok = models.load_tokenizer(str(folder))
    except (OSError, ValueError) as exc:
        return {"tokenizer": f"could not load ({str(exc).splitlines()[0][:120]})"}
    added = ensure_chat_template(tok)
    try:
        rendered = tok.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 — a template that rejects the sample is a fact to show, not a crash
        rendered = f"(the template rejects a system + user/assistant sample: {str(exc).splitlines()[0][:160]})"
    return {"tokenizer_vocabulary": len(tok), "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "chat_template": "default (the model has none)" if added else "own", "rendered_sample": rendered}


def adapter_facts(folder: Path, info: dict) -> dict:
    cfg = info["config"]
    facts = {"base": info["base"], "peft_type": cfg.get("peft_type"), "rank": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
             "dropout": cfg.get("lora_dropout"), "target_modules": cfg.get("target_modules"),
             "trained_with_quantization": info.get("quantization") or "unknown",
             "use_dora": cfg.get("use_dora", False), "use_rslora": cfg.get("use_rslora", False)}
    w = weights_summary(folder)
    facts["adapter_parameters"] = w["parameters"]
    recipe = folder / "recipe.yaml"
    facts["recipe"] = recipe.read_text() if recipe.is_file() else None
    return facts


def lineage(folder: Path) -> dict | None:
    """The stages that made a folder, where `finetune run` recorded them: a pipeline's own folder, or the
    manifest of its final model."""
    from finetune.stages import LINEAGE

    if (folder / LINEAGE).is_file():
        return json.loads((folder / LINEAGE).read_text())
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()).get("pipeline") if manifest.is_file() else None


def run(spec: str, as_json: bool = False) -> None:
    folder = Path(spec).expanduser()
    info = models.adapter_info(folder) if folder.is_dir() else None
    out: dict = {"model": spec}
    made_by = lineage(folder) if folder.is_dir() else None
    if made_by is not None:
        out["lineage"] = made_by
    if made_by is not None and info is None and not (folder / "config.json").is_file():
        out["kind"] = "pipeline"  # a pipeline's folder: its lineage is the whole story
    elif info is not None:
        out["kind"] = "adapter"
        out["adapter"] = adapter_facts(folder, info)
        try:
            base = models.resolve_base(info["base"], log=lambda *a: None) if info["base"] else None
        except UserError as exc:
            base, out["base_error"] = None, str(exc)
        if base is not None and Path(base.path).is_dir():
            out["base_model"] = model_facts(Path(base.path))
        # the adapter's own tokenizer carries the chat template it was trained with
        tok_folder = folder if (folder / "tokenizer_config.json").is_file() else Path(base.path) if base else None
        if tok_folder is not None:
            out.update(template_facts(tok_folder))
    else:
        if not (folder.is_dir() or spec in models.BUILTINS or folder.suffix == ".gguf"):
            raise UserError(f"model `{spec}` not found: give a built-in alias, a model or adapter folder, or a .gguf file "
                            "(hub ids are not read by `info`: download the folder first)")
        base = models.resolve_base(spec, log=Console(stderr=True).print)
        out["kind"] = "merged or base model" if base.kind == "folder" else base.kind
        out["base_model"] = model_facts(Path(base.path))
        out.update(template_facts(Path(base.path)))
    if as_json:
        print(json.dumps(out, indent=2))
        return
    if out["kind"] != "pipeline":
        show(out)
    if made_by is not None:
        from finetune.stages import lineage_table

        Console(highlight=False).print(lineage_table(made_by))


def show(out: dict) -> None:
    console = Console()
    table = Table(title=f"{out['model']} ({out['kind']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    m = out.get("base_model") or {}
    rows = [("architecture", m.get("architecture")),
            ("parameters", f"{m['parameters']:,}" if m.get("parameters") else None),
            ("dtype", f"{m.get('dtype')} (weights: {', '.join(m.get('weight_dtypes', {}))})" if m else None),
            ("context length", m.get("context_length")), ("vocabulary", m.get("vocabulary")),
            ("layers / hidden", f"{m.get('layers')} / {m.get('hidden_size')}" if m else None),
            ("quantization", m.get("quantization"))]
    a = out.get("adapter")
    if a:
        rows = [("base", a["base"]), ("adapter", f"{a['peft_type']} rank {a['rank']}, alpha {a['alpha']}, dropout {a['dropout']}"
                                                  + (" · DoRA" if a["use_dora"] else "") + (" · rsLoRA" if a["use_rslora"] else "")),
                ("targets", ", ".join(a["target_modules"]) if isinstance(a["target_modules"], list) else a["target_modules"]),
                ("adapter parameters", f"{a['adapter_parameters']:,}"), ("trained with", a["trained_with_quantization"])] + \
               [(f"base {k}", v) for k, v in rows]
    if out.get("base_error"):
        rows.append(("base", f"[red]{out['base_error']}[/]"))
    rows += [("tokenizer", f"{out.get('tokenizer_vocabulary')} tokens · eos {out.get('eos_token')!r} · pad {out.get('pad_token')!r}"
              if "tokenizer_vocabulary" in out else out.get("tokenizer")),
             ("chat template", out.get("chat_template"))]
    for k, v in rows:
        if v is not None:
            table.add_row(k, str(v))
    console.print(table)
    if out.get("rendered_sample"):
        console.print("[bold]chat template on a sample conversation:[/]")
        console.print(out["rendered_sample"], markup=False, highlight=False)
    if a and a.get("recipe"):
        console.print("[bold]training recipe:[/]")
        console.print(a["recipe"], markup=False, highlight=False)
