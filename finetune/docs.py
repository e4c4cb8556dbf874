"""Generate the README's recipe reference from the typed recipe models (`python -m finetune.docs`)."""

from __future__ import annotations

import types
import typing
from pathlib import Path

from finetune import recipe as r

SECTIONS = [("model", r.ModelSection), ("lora", r.LoraSection), ("data", r.DataSection),
            ("training", r.TrainingSection), ("dpo", r.DpoSection), ("kto", r.KtoSection), ("orpo", r.OrpoSection),
            ("reward", r.RewardSection), ("grpo", r.GrpoSection), ("grpo.rewards[]", r.GrpoReward), ("output", r.OutputSection)]
BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def _type(ann) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return " \\| ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    return "null" if ann is type(None) else getattr(ann, "__name__", str(ann))


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "`{}`"
    return f"`{field.default}`" if field.default is not None else "—"


def recipe_reference() -> str:
    lines = [BEGIN]
    for name, model in SECTIONS:
        lines += ["", f"**`{name}`**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            lines.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {field.description or ''} |")
    lines += ["", END]
    return "\n".join(lines)


def update_readme(path: Path = Path(__file__).resolve().parents[1] / "README.md") -> None:
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + recipe_reference() + text[end:])


if __name__ == "__main__":
    update_readme()
