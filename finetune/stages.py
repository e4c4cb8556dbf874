"""Running a planned pipeline (finetune/pipeline.py): each stage is skipped, resumed or run, then the lineage
is written.

The rules, stage by stage in order:
- skipped: it finished before with the same input key — the hash of its resolved recipe (or step settings),
  its data files' contents and the models it starts from — and its output files still hash as recorded;
- run again: anything else, every stage after a stage that runs, and `--from STAGE` onwards;
- resumed: a training stage that was stopped (Ctrl-C, a crash, a kill) with the same input key continues
  from its last complete checkpoint, through the `--resume` machinery of a single run.

Each stage's state is `<output>/stages/NN-name.json` (beside its folder, which a fresh run replaces whole).
The lineage — every stage's recipe, data hashes, inputs, metrics and output hash — is `<output>/pipeline.json`
and the `pipeline` entry of the final model folder's manifest.json; `finetune info` shows it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import yaml
from rich.markup import escape
from rich.table import Table

from finetune import artifacts, checkpoints, launch, models, pipeline, preflight
from finetune.errors import RunStopped, UserError
from finetune.pipeline import Planned
from finetune.training import console

LINEAGE = "pipeline.json"  # in the output folder, and as `pipeline` in the final model folder's manifest.json
STATES = "stages"


def run(path: Path, from_stage: str | None = None, callbacks: Mapping[str, Sequence] | None = None) -> dict:
    """Run the pipeline file at `path`; `callbacks` maps a stage name to extra TrainerCallbacks for it."""
    pipe = pipeline.load(path)
    names = [s.name for s in pipe.stages]
    if from_stage is not None and from_stage not in names:
        raise UserError(f"--from {from_stage}: no stage has that name — the stages are {', '.join(names)}")
    planned = pipeline.plan(pipe, path, launch.from_config(None, None), log=console.print)
    out = pipe.output_dir()
    (out / STATES).mkdir(parents=True, exist_ok=True)
    artifacts.write_atomic(out / pipeline.SPEC, yaml.safe_dump(pipe.model_dump(mode="json"), sort_keys=False))
    console.print(f"[bold]finetune run[/] {pipe.name}: {len(planned)} stages → {out}")
    hashes: dict[str, str] = {}  # stage folder -> its output hash, for the input keys of the stages after it
    records = []
    running = False  # once a stage runs, every stage after it runs too
    for p in planned:
        forced = p.stage.name == from_stage
        running = running or forced
        key = input_key(p, hashes)
        state = read_state(out, p)
        if not running and is_finished(p, state, key):
            record = {**state["record"], "status": "skipped"}
            console.print(f"[dim]{escape(p.label)}: unchanged since {state['record']['ended']} — skipped[/]")
        else:
            resume = (not forced and p.stage.method is not None and state is not None and state["key"] == key
                      and not state["finished"] and checkpoints.latest(p.folder, console.print) is not None)
            running = True
            write_state(out, p, {"key": key, "finished": False})
            record = run_stage(p, key, resume, path, (callbacks or {}).get(p.stage.name, ()))
            write_state(out, p, {"key": key, "finished": True, "record": record})
        hashes[str(p.folder)] = record["output"]["sha256"]
        records.append(record)
    lineage = {"pipeline": pipe.name, "file": str(path), "output": str(out), "stages": records}
    final = next((p.folder for p in reversed(planned) if p.makes_model), None)
    lineage["final"] = str(final) if final else None
    artifacts.write_json(out / LINEAGE, lineage)
    if final is not None:
        manifest = final / "manifest.json"
        record = json.loads(manifest.read_text()) if manifest.is_file() else {}
        artifacts.write_json(manifest, {**record, "pipeline": lineage})
    show(lineage)
    return lineage


# ---- the skip rule ---------------------------------------------------------------------------------


def input_key(p: Planned, hashes: dict[str, str]) -> str:
    """Hash of everything a stage's output depends on: settings, data contents, the models it starts from."""
    stage = p.stage
    if stage.method:
        inputs = {"identity": p.identity, "base": model_identity(p.base, hashes), "adapter": model_identity(p.adapter, hashes)}
    elif stage.step == "merge":
        inputs = {"dtype": stage.dtype, "base": model_identity(p.base, hashes), "adapter": model_identity(p.adapter, hashes)}
    elif stage.step == "export":
        inputs = {"quant": stage.quant, "verify": stage.verify, "model": model_identity(p.adapter or p.base, hashes)}
    else:
        inputs = {"data": files_sha256([Path(stage.data)]), "max_length": stage.max_length,
                  "models": [model_identity(m, hashes) for m in p.compared]}
    return hashlib.sha256(json.dumps({"kind": p.kind, **inputs}, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(spec: str | None, hashes: dict[str, str]) -> dict | None:
    """An earlier stage's output by its hash; a local model or adapter folder by its weights; a name otherwise
    (a built-in base comes from a pinned package, a hub id names a repository)."""
    if spec is None:
        return None
    if spec in hashes:
        return {"stage_output": hashes[spec]}
    return models.weights_identity(spec) if Path(spec).is_dir() else {"name": spec}


def output_hash(p: Planned) -> str | None:
    """The stage's result: a model's or adapter's weights, the GGUF files, the eval results."""
    if p.makes_model:
        return models.weights_identity(str(p.folder))["sha256"]
    return files_sha256(sorted(p.folder.glob("*.gguf")) if p.stage.step == "export" else [p.folder / "eval.json"])


def files_sha256(files: list[Path]) -> str | None:
    """One sha256 over the files' names and contents; None when there are none or one is missing."""
    if not files or not all(f.is_file() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_state(out: Path, p: Planned) -> dict | None:
    path = out / STATES / f"{p.folder.name}.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None  # a state cut short is no state: the stage runs again


def write_state(out: Path, p: Planned, state: dict) -> None:
    artifacts.write_json(out / STATES / f"{p.folder.name}.json", state)


def is_finished(p: Planned, state: dict | None, key: str) -> bool:
    if not state or not state.get("finished") or state["key"] != key:
        return False
    return output_hash(p) == state["record"]["output"]["sha256"]


# ---- running one stage -----------------------------------------------------------------------------


def run_stage(p: Planned, key: str, resume: bool, path: Path, callbacks: Sequence) -> dict:
    """Run one stage; a failure names the stage and how to continue."""
    console.print(f"\n[bold]{escape(p.label)}[/]" + (" — resuming from its last checkpoint" if resume else ""))
    started = time.time()
    try:
        if p.stage.method:
            metrics, data = train(p, resume, path, callbacks), p.identity["data"]
        elif p.stage.step == "merge":
            metrics, data = merge(p), []
        elif p.stage.step == "export":
            metrics, data = export(p), []
        else:
            with open(p.stage.data, "rb") as fh:  # hashed as the training data files are (data.read)
                data = [{"path": p.stage.data, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}]
            metrics = evaluate(p)
    except (UserError, RunStopped) as exc:
        kept = p.stage.method and checkpoints.latest(p.folder, lambda *a: None) is not None
        how = (f"fix it, then run `finetune run {path}` again: the finished stages before it are skipped"
               + (" and this one continues from its last checkpoint" if kept else ""))
        raise type(exc)(f"{p.label} failed: {exc}\n{how}") from None
    return {"stage": p.stage.name, "index": p.index, "kind": p.kind, "status": "resumed" if resume else "ran",
            **({"recipe": p.recipe.model_dump(mode="json")} if p.recipe else
               {"settings": p.stage.model_dump(mode="json", include=pipeline.STEP_KEYS[p.stage.step])}),
            "data": data, "input": {"base": p.base, "adapter": p.adapter, **({"models": p.compared} if p.compared else {})},
            "input_key": key, "metrics": metrics, "output": {"path": str(p.folder), "sha256": output_hash(p)},
            "seconds": round(time.time() - started, 1), "ended": time.strftime("%Y-%m-%dT%H:%M:%S")}


def train(p: Planned, resume: bool, path: Path, callbacks: Sequence) -> dict:
    """What `finetune METHOD RECIPE` does: preflight (now that the earlier stages' folders exist), then the method."""
    plan = preflight.preflight(p.recipe, p.stage.method, launch.from_config(None, None), resume=resume, overwrite=not resume,
                               rerun=f"finetune run {path}", log=console.print)
    importlib.import_module(pipeline.METHODS[p.stage.method]).run(p.recipe, plan, callbacks)
    manifest = json.loads((p.folder / "manifest.json").read_text())
    return {"summary": manifest["summary"], "final_metrics": manifest["final_metrics"]}


def merge(p: Planned) -> dict:
    from finetune import merge as merge_

    merge_.run(Path(p.adapter), p.folder, base=p.base, dtype=p.stage.dtype, original_weights=False, overwrite=True)
    check = json.loads((p.folder / "merge_report.json").read_text())["verification"]
    return {k: check[k] for k in ("passed", "max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement")}


def export(p: Planned) -> dict:
    from finetune import export as export_

    report = export_.run(p.adapter or p.base, p.folder, quants=p.stage.quant, base=p.base if p.adapter else None,
                         overwrite=True, verify_files=p.stage.verify)
    return {"files": [{k: f[k] for k in ("file", "quant", "bytes") if k in f} | {"verified": f.get("verification", {}).get("passed")}
                      for f in report["files"]]}


def evaluate(p: Planned) -> dict:
    from finetune import evaluate as evaluate_

    p.folder.mkdir(parents=True, exist_ok=True)
    results = evaluate_.run(p.compared, Path(p.stage.data), max_length=p.stage.max_length, stride=None, batch_size=None,
                            quantization=None, as_json=False)
    artifacts.write_json(p.folder / "eval.json", results)
    return {"perplexity": {r["model"]: r["perplexity"] for r in results}}


# ---- showing the lineage ---------------------------------------------------------------------------


def headline(record: dict) -> str:
    """The one number a reader wants per stage."""
    m = record.get("metrics") or {}
    if "summary" in m:
        s = m["summary"]
        loss = f"eval loss {s['eval loss']}" if s.get("eval loss") is not None else f"train loss {s.get('final train loss')}"
        return f"{s['steps']} steps · {loss}"
    if "passed" in m:
        return f"verified: {'passed' if m['passed'] else 'FAILED'} (top-1 {m['top1_agreement']:.0%})"
    if "files" in m:
        return ", ".join(f"{f['file']} ({'verified' if f['verified'] else 'unverified' if f['verified'] is None else 'FAILED'})"
                         for f in m["files"])
    if "perplexity" in m:
        return " · ".join(f"{Path(k).name}: {v:.2f}" for k, v in m["perplexity"].items())
    return ""


def lineage_table(lineage: dict) -> Table:
    t = Table(title=f"pipeline {lineage['pipeline']} → {lineage['output']}")
    for col in ("#", "stage", "kind", "status", "data (sha256)", "result", "output (sha256)"):
        t.add_column(col, overflow="fold")
    for r in lineage["stages"]:
        data = ", ".join(f"{Path(d['path']).name} {str(d['sha256'])[:10]}" for d in r["data"])
        t.add_row(str(r["index"]), r["stage"], r["kind"], r["status"], data or "—", headline(r), str(r["output"]["sha256"])[:12])
    return t


def show(lineage: dict) -> None:
    from rich.console import Console

    Console(highlight=False).print(lineage_table(lineage))
    if lineage.get("final"):
        console.print(f"final model: {lineage['final']} (its manifest.json holds this lineage; `finetune info` shows it)")
