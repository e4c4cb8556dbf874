"""The `finetune` command line. Each command parses its arguments, loads the recipe and hands the typed
recipe to its workflow module, imported lazily so that `finetune --help` stays instant.

Exit codes: 0 success · 2 the user's input is wrong (one message, no traceback) · 1 a bug or an
environment failure (message plus the file holding the full traceback). `--debug` or FINETUNE_DEBUG=1
shows tracebacks instead.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

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


OverwriteOpt = Annotated[bool, typer.Option(help="Replace a non-empty output folder.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue from the latest complete checkpoint of the output folder.")]
ProcessesOpt = Annotated[
    Optional[int],
    typer.Option("--num-processes", help="Data-parallel processes (one per GPU; gloo processes on CPU), started through Accelerate."),
]
AccelerateOpt = Annotated[
    Optional[Path],
    typer.Option("--accelerate-config", help="Accelerate config for the launch: FSDP / DeepSpeed ZeRO (see recipes/accelerate/)."),
]


def _train(method: str, path: Path, set_, overwrite: bool, resume: bool, processes: int | None, accelerate_config: Path | None) -> None:
    if processes is not None and processes < 1:
        raise UserError(f"--num-processes must be at least 1 (got {processes})")
    r = _recipe(path, set_, method)
    from finetune import launch, models, train

    inside = launch.from_environment()
    if inside is not None:  # a worker started by `accelerate launch` (ours or the user's)
        if not launch.is_main():
            train.console.quiet = True  # process 0 speaks for everyone
        if processes or accelerate_config:
            raise UserError("--num-processes / --accelerate-config start a launch; under `accelerate launch` leave them out "
                            "and pass --num_processes / --config_file to accelerate instead")
        launch.check(r, inside, models.pick_device(r.model.device))
        train.run(r, method, overwrite=overwrite, resume=resume)
        return
    if (processes or 1) == 1 and accelerate_config is None:
        train.run(r, method, overwrite=overwrite, resume=resume)
        return
    plan = launch.from_config(accelerate_config, processes)
    device = models.pick_device(r.model.device)
    launch.check(r, plan, device)
    # what would fail in every worker is checked once, here: output folder, resume point, the base itself
    from finetune import artifacts

    out = r.output_dir()
    artifacts.prepare_output(out, overwrite=overwrite, resume=resume)
    if resume and train.latest_checkpoint(out) is None:
        raise UserError(f"{out}: no complete checkpoint to resume from — run without --resume (training.save_every makes checkpoints)")
    models.resolve_base(r.model.base, train.console.print)  # converts a built-in/.gguf base once, not once per process
    train.console.print(f"[bold]launching {plan.processes} processes[/] ({plan.kind}{', ' + plan.config_file if plan.config_file else ''})")
    code = launch.relaunch(plan, device, launch.worker_command(method, path, set_, overwrite, resume))
    if code:
        raise SystemExit(code)


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


@app.command()
def inspect(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")],
    set_: SetOpt = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="How many examples to render.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
) -> None:
    """Show exactly what a recipe will train on: format, lengths, masks, padding, memory estimate."""
    r = _recipe(recipe, set_)
    from finetune import inspect as inspect_

    inspect_.run(r, examples=examples, as_json=as_json)


@app.command("eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="Bases, adapter folders or merged folders to compare.")],
    data: Annotated[Path, typer.Option(help="Held-out data: .txt / text column, or chat / instruction data.")],
    max_length: Annotated[int, typer.Option(help="Window length in tokens.")] = 1024,
    stride: Annotated[Optional[int], typer.Option(help="Step between windows (default: the window).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Windows per forward pass (default: 1 on CPU, where batching measured slower; 8 on GPUs).")] = None,
    quantization: Annotated[Optional[str], typer.Option(help="Override how bases load: 4bit, 8bit or none.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32 (fp32 gives batch-size-independent numbers).")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
) -> None:
    """Perplexity of bases, adapters and merged models, side by side."""
    from finetune import evaluate

    evaluate.run(models, data, max_length=max_length, stride=stride, batch_size=batch_size, quantization=quantization,
                 as_json=as_json, dtype=dtype)


@app.command()
def merge(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder written by `finetune sft` or `dpo`.")],
    out: Annotated[Path, typer.Option(help="Where to write the merged model.")],
    base: Annotated[Optional[str], typer.Option(help="Base to merge into (default: the adapter's base).")] = None,
    dtype: Annotated[str, typer.Option(help="bf16, fp16 or fp32.")] = "bf16",
    original_weights: Annotated[
        bool, typer.Option(help="For 4-bit-trained adapters, merge into the original weights instead of the NF4 round trip.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Fold an adapter into a full safetensors model, then verify it against base + adapter."""
    from finetune import merge as merge_

    merge_.run(adapter, out, base=base, dtype=dtype, original_weights=original_weights, overwrite=overwrite)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="Base alias / folder / .gguf / hub id, adapter folder, or merged folder.")],
    prompt: Annotated[Optional[str], typer.Option(help="One-shot: answer this and exit ('-' reads standard input).")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 means greedy.")] = None,
    top_p: Annotated[Optional[float], typer.Option()] = None,
    top_k: Annotated[Optional[int], typer.Option()] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option()] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="[default: 256]")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    quantization: Annotated[Optional[str], typer.Option(help="Override how the base loads: 4bit, 8bit or none.")] = None,
    compare: Annotated[bool, typer.Option(help="Answer with the base and with the adapter, side by side.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One-shot: print the answer with token counts and speed as JSON.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="YAML file of generation settings (the flags' names; flags win).")] = None,
    history_turns: Annotated[Optional[int], typer.Option(help="Keep at most this many past exchanges in the prompt.")] = None,
    history_tokens: Annotated[Optional[int], typer.Option(help="Keep the prompt within this many tokens (oldest turns go first).")] = None,
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
    """List the built-in base models and where their converted weights are cached."""
    from rich.table import Table

    from finetune.models import BUILTINS, builtin_gguf, gguf_cache_dir

    table = Table(title="Built-in bases")
    for col in ("alias", "model", "weights", "converted cache"):
        table.add_column(col)
    for b in BUILTINS.values():
        gguf = builtin_gguf(b)
        if gguf is None:
            table.add_row(b.alias, b.description, f"[red]not installed[/] — {b.pip}", "-")
        else:
            cache = gguf_cache_dir(gguf)
            state = str(cache) if (cache / "config.json").is_file() else f"{cache} [dim](converted on first use)[/]"
            table.add_row(b.alias, b.description, str(gguf), state)
    Console().print(table)
    Console().print("Also accepted as model.base: a local HF folder, a .gguf file, or a hub id (owner/name).")


@app.command()
def serve(
    models_: Annotated[list[str], typer.Argument(metavar="MODEL [ADAPTER ...]", help="A base, adapter folders (served on their base, loaded once), merged folders; NAME=PATH names one.")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but 127.0.0.1/localhost needs --api-key or --no-auth.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Require `Authorization: Bearer KEY` on every API request (or set FINETUNE_API_KEY).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Allow a non-local --host without an API key.")] = False,
    engine: Annotated[str, typer.Option(help="transformers (built in) or vllm (hands the base and adapters to vLLM's server).")] = "transformers",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    quantization: Annotated[Optional[str], typer.Option(help="Override how bases load: 4bit, 8bit or none.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for (and the default).")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted.")] = 1 << 20,
    max_batch: Annotated[int, typer.Option(help="Most requests generated together in one batch.")] = 8,
) -> None:
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a web chat page at /."""
    from finetune.serving import server

    server.run(models_, host=host, port=port, api_key=api_key, no_auth=no_auth, engine=engine, dtype=dtype,
               quantization=quantization, max_tokens=max_tokens, max_body_bytes=max_body_bytes, max_batch=max_batch)


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Base alias / folder / .gguf, adapter folder, or merged folder.")],
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
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
    except RunStopped as exc:
        console.print(f"[bold red]stopped:[/] {exc}", soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click's usage errors are user errors too
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        if debug_enabled():
            traceback.print_exc()
            sys.exit(1)
        where = _crash_log(exc)
        console.quiet = False  # a crash may be one process's alone: every process reports its own
        console.print(f"[process {rank}] " if rank else "", end="")
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\nfull traceback: {where} (rerun with --debug to print it)", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
