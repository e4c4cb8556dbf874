"""`finetune eval MODEL... --tasks NAME|FILE.yaml,...`: lm-evaluation-harness benchmarks, base and adapters side by side.

The harness does the work: each model is loaded once by this toolkit (adapter applied, same dtype and
device for all) and handed to lm_eval's HFLM, so every number is the harness's own. Tasks are built
once, before any model loads, so a task that needs a download fails first (offline: exit 2 with the
reason). Tasks shipped with the toolkit live in finetune/tasks/ (`pico_sky`); a task YAML of your own
is accepted by path, its relative `data_files` read relative to the YAML.
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finetune import llamacpp, models
from finetune.errors import UserError

err = Console(stderr=True, highlight=False)
SHIPPED = Path(__file__).parent / "tasks"
METRICS = ("acc", "acc_norm", "exact_match", "f1", "bleu", "rouge1")  # shown when a task reports them


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def task_config(path: Path) -> dict:
    """A task YAML as the harness reads it (includes, !function), with relative data files made absolute:
    the harness would read them relative to the working directory, not to the YAML."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path)
    except Exception as exc:  # malformed YAML or a missing !function module
        raise UserError(f"{path}: not a readable lm-eval task YAML ({str(exc).splitlines()[0][:200]})") from None
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        def fix(p):
            q = path.parent / p
            return str(q.resolve()) if not Path(p).is_absolute() and q.exists() else p
        if isinstance(files, dict):
            cfg["dataset_kwargs"]["data_files"] = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
        else:
            cfg["dataset_kwargs"]["data_files"] = [fix(x) for x in files] if isinstance(files, list) else fix(files)
    if "task" not in cfg:
        raise UserError(f"{path}: a task YAML needs a `task:` name (groups of tasks: pass the task names instead)")
    return cfg


@functools.cache
def task_manager(stock: bool):
    """The harness's task index; its ~15k stock tasks take ~25 s to index, so only when a stock name is asked for."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=stock)


def build_tasks(names: list[str]) -> tuple[dict, object]:
    """Task objects (data loaded) for every name or YAML path, or a UserError naming what is wrong."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    specs: list = []
    stock: list[str] = []
    for name in names:
        path = Path(name).expanduser()
        if name.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise UserError(f"--tasks: task file {name} not found")
            specs.append(task_config(path))
        elif (SHIPPED / f"{name}.yaml").is_file():
            specs.append(task_config(SHIPPED / f"{name}.yaml"))
        else:
            stock.append(name)
            specs.append(name)
    manager = task_manager(bool(stock))
    known = set(manager.all_tasks) | set(shipped_tasks())
    for name in stock:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" — did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--tasks: unknown task `{name}`{hint} (shipped here: {', '.join(shipped_tasks())}; "
                            "or pass the path of a task YAML)")
    built = {}
    for name, spec in zip(names, specs):
        try:
            built.update(manager.load(spec)["tasks"])  # a group's leaf tasks, each reported on its own
        except Exception as exc:  # the harness raises many types; the first line says what failed
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            if "offline" in first.lower() or "hub" in first.lower() or "connect" in first.lower() or "ConnectionError" in type(exc).__name__:
                raise UserError(f"--tasks: task `{name}` needs its data downloaded from the Hugging Face hub, which cannot be "
                                f"reached here ({first}) — run it where the hub is reachable, or write a task YAML with "
                                "`dataset_path: json` and local `data_files`") from None
            raise UserError(f"--tasks: task `{name}` could not be built: {first}") from None
    return built, manager


def evaluate_model(spec: str, tasks: dict, manager, *, batch_size: int, limit: float | None, quantization: str | None,
                   dtype: str, chat_template: bool) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if llamacpp.is_gguf_file(spec):  # scored in llama.cpp; the harness still builds requests and aggregates
        from finetune import gguf_eval

        lm, adapter = gguf_eval.harness_model(Path(spec)), None
    else:
        loaded, adapter = models.load_any(spec, quantization=quantization, dtype=dtype, log=err.print)
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, device=str(loaded.model.device), batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=list(tasks.values()), task_manager=manager, limit=limit, log_samples=False,
                          bootstrap_iters=1000, apply_chat_template=chat_template, verbosity="ERROR")
    scores = {}
    for task, res in out["results"].items():
        scores[task] = {"samples": res.get("sample_len") or out.get("n-samples", {}).get(task, {}).get("effective")}
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric not in ("sample_len",):
                scores[task][metric] = value
                stderr = res.get(f"{metric}_stderr,{filt}")
                if isinstance(stderr, (int, float)):
                    scores[task][f"{metric}_stderr"] = stderr
    return {"model": spec, "kind": "gguf" if llamacpp.is_gguf_file(spec) else "adapter" if adapter else "model", "tasks": scores}


def run(specs: list[str], task_names: list[str], *, batch_size: int | None, limit: float | None, quantization: str | None,
        dtype: str, chat_template: bool, as_json: bool) -> list[dict]:
    if not task_names:
        raise UserError("--tasks: name at least one task, e.g. --tasks pico_sky")
    ggufs = [s for s in specs if llamacpp.is_gguf_file(s)]
    if ggufs:
        llamacpp.require()
    tasks, manager = build_tasks(task_names)
    if ggufs:
        from finetune import gguf_eval

        gguf_eval.check_tasks(ggufs[0], tasks)
    results = [evaluate_model(s, tasks, manager, batch_size=batch_size or 8, limit=limit, quantization=quantization,
                              dtype=dtype, chat_template=chat_template) for s in specs]
    ref = results[0]
    for r in results[1:]:  # change from the first model (the base, when it is listed first)
        for task, scores in r["tasks"].items():
            base = ref["tasks"].get(task, {})
            scores["change"] = {m: v - base[m] for m, v in scores.items() if m in METRICS and isinstance(base.get(m), (int, float))}
    if as_json:
        print(json.dumps(results, indent=2))
        return results
    t = Table(title=f"benchmarks (change from {ref['model']})")
    for col in ("task", "metric", *(r["model"] for r in results)):
        t.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task in tasks:
        shown = [m for m in METRICS if m in ref["tasks"].get(task, {})]
        for metric in shown:
            cells = []
            for r in results:
                s = r["tasks"].get(task, {})
                cell = f"{s[metric]:.3f}" if metric in s else "—"
                if f"{metric}_stderr" in s:
                    cell += f" ± {s[f'{metric}_stderr']:.3f}"
                if metric in s.get("change", {}):
                    cell += f" ({s['change'][metric]:+.3f})"
                cells.append(cell)
            t.add_row(f"{task} (n={ref['tasks'][task].get('samples')})", metric, *cells)
    Console().print(t)
    return results
