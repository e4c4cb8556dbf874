"""Command-line usage mistakes, generated from the command tree: for every command an unknown option, each
missing required argument or option, and a bad value for each typed option (numbers, ranges, choices,
constrained paths), plus an unknown command. Each must exit 2 with click's own message (usage line,
"Try ... --help", the error), never as an internal error with a traceback or a crash log.

A command added later is covered by the same walk without touching this file.
"""

from __future__ import annotations

import enum
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main
from helpers import REPO

from finetune.cli import app


@dataclass
class Case:
    id: str
    args: list[str]
    expect: list[str]  # pieces of click's message, all present


def commands(group, path: tuple[str, ...] = ()):
    """(command path, command) for every leaf command, sub-groups included."""
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def annotation(param):
    return param.type_descriptor.annotation


def inner(ann):
    """The element type: list[int] -> int, Optional[X] -> X (typer already unwraps Optional)."""
    if typing.get_origin(ann) in (list, tuple, set):
        return typing.get_args(ann)[0]
    return ann


def choices(ann) -> list | None:
    ann = inner(ann)
    if typing.get_origin(ann) is typing.Literal:
        return [str(a) for a in typing.get_args(ann)]
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return [str(m.value) for m in ann]
    return None


def placeholder(param) -> str:
    """A value click accepts for this parameter (so that only the mistake under test is wrong)."""
    ann = inner(annotation(param))
    if c := choices(ann):
        return c[0]
    if ann in (int, float):
        return str(param.min if param.min is not None else 1)
    return "x"


def bad_values(param) -> list[tuple[str, str]]:
    """(label, value) pairs click must refuse for this option."""
    ann = inner(annotation(param))
    out = []
    if choices(ann):
        out.append(("choice", "no-such-choice"))
    if ann in (int, float):
        out.append(("not-a-number", "abc"))
        if param.min is not None:
            out.append(("below-min", str(param.min - 1)))
        if param.max is not None:
            out.append(("above-max", str(param.max + 1)))
    if ann is int:
        out.append(("not-an-int", "1.5"))
    if ann is Path:
        info = param.type_descriptor.parameter_info
        if getattr(info, "exists", False):
            out.append(("missing-path", "/no/such/path/anywhere"))
        if getattr(info, "dir_okay", True) is False:
            out.append(("dir-not-file", str(REPO)))
        if getattr(info, "file_okay", True) is False:
            out.append(("file-not-dir", str(REPO / "README.md")))
    return out


def is_option(param) -> bool:
    return type(param).__name__.endswith("Option") or bool(getattr(param, "opts", [""])[0].startswith("-"))


def required_line(cmd, skip=None) -> list[str]:
    """Every required parameter with a valid placeholder, except `skip`."""
    line = []
    for p in cmd.params:
        if not p.required or p is skip:
            continue
        line += [p.opts[0], placeholder(p)] if is_option(p) else [placeholder(p)]
    return line


def cases() -> list[Case]:
    out = [Case("unknown-command", ["no-such-command"], ["No such command 'no-such-command'"]),
           Case("unknown-command-did-you-mean", ["evl"], ["No such command 'evl'", "Did you mean 'eval'"]),
           Case("unknown-root-option", ["--no-such-option"], ["No such option: --no-such-option"])]
    for path, cmd in commands(typer.main.get_command(app)):
        name = " ".join(path)
        out.append(Case(f"{name}:unknown-option", [*path, *required_line(cmd), "--no-such-option", "1"],
                        ["No such option: --no-such-option"]))
        for p in cmd.params:
            if p.required:
                what = f"Missing option '{p.opts[0]}'" if is_option(p) else "Missing argument"
                out.append(Case(f"{name}:missing-{p.name}", [*path, *required_line(cmd, skip=p)], [what]))
            if not is_option(p) or getattr(p, "is_flag", False):
                continue
            for label, value in bad_values(p):
                base = required_line(cmd, skip=p)
                out.append(Case(f"{name}:{p.opts[0]}:{label}", [*path, *base, p.opts[0], value],
                                [f"Invalid value for '{p.opts[0]}'"]))
    return out


CASES = cases()


def test_the_walk_covers_every_command_and_typed_option():
    """The generator sees each command and the options whose values click checks (guards the walk itself)."""
    ids = {c.id for c in CASES}
    for path, cmd in commands(typer.main.get_command(app)):
        assert f"{' '.join(path)}:unknown-option" in ids
    for expected in ("sft:missing-recipe", "eval:--max-new-tokens:below-min", "eval:missing-models", "merge:missing-out",
                     "sft:--num-processes:below-min", "dpo:--num-processes:below-min", "merge:--dtype:choice",
                     "eval:--dtype:choice", "eval:--quantization:choice", "chat:--quantization:choice",
                     "chat:--temperature:not-a-number", "chat:--temperature:below-min", "chat:--max-new-tokens:below-min",
                     "eval:--max-length:below-min", "inspect:--examples:not-an-int"):
        assert expected in ids, expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_usage_mistake_is_a_user_error(case, cli, tmp_path):
    res = cli(*case.args)
    assert res.code == 2, res.text
    for piece in case.expect:
        assert piece in res.err, res.err
    assert "Usage:" in res.err and "--help" in res.err
    assert "internal error" not in res.text and "Traceback" not in res.text
    assert not (tmp_path / "cache" / "logs").exists()  # no crash log


def test_suggestion_for_a_misspelt_option(cli):
    res = cli("sft", "r.yaml", "--sett", "a=1")
    assert res.code == 2
    assert "No such option: --sett" in res.err and "--set" in res.err.split("No such option: --sett", 1)[1]


def test_recipe_key_given_as_an_option_names_the_set_override(cli):
    res = cli("sft", "r.yaml", "--max-steps", "5")
    assert res.code == 2 and "No such option: --max-steps" in res.err
    assert "--set training.max_steps=VALUE" in res.err
    res = cli("dpo", "r.yaml", "--beta", "0.2")
    assert res.code == 2 and "--set dpo.beta=VALUE" in res.err
    res = cli("eval", "m", "--data", "d", "--max-steps", "3")  # eval takes no recipe: no --set hint
    assert res.code == 2 and "No such option: --max-steps" in res.err and "--set" not in res.err


def test_real_entry_point(tmp_path):
    """The installed console entry point, in its own process: exit status and stderr as a shell sees them."""
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "FINETUNE_CACHE": str(tmp_path / "cache")}
    for args, piece in ((["exprot"], "No such command 'exprot'"), (["sft", "r.yaml", "--max-steps", "5"], "No such option: --max-steps"),
                        (["sft"], "Missing argument"), (["chat", "M", "--temperature", "hot"], "Invalid value for '--temperature'")):
        res = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=env, timeout=120, check=False)
        assert res.returncode == 2, res.stderr
        assert piece in res.stderr and "internal error" not in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "cache" / "logs").exists()


def test_user_error_text_in_brackets_is_printed(cli, tmp_path):
    """Messages quote user input verbatim; rich markup must not swallow `[...]` in them."""
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {{base: '[my-model]'}}\ndata: {{train: {REPO / 'datasets_local/persona.jsonl'}}}\n")
    res = cli("inspect", r)
    assert res.code == 2 and "[my-model]" in res.err
