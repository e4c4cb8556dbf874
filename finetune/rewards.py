"""The rewards a GRPO recipe declares: their checks (called by preflight, before any model loads) and the
callables handed to TRL's GRPOTrainer as `reward_funcs`, with `reward_weights` in the same order.

Built-in rule rewards score one answer at a time from the answer's text and the row's columns: `equals`
(the answer equals the reference column, ignoring case, surrounding space and a final full stop), `regex`
(the answer matches the row's pattern column), `format` (the whole answer matches the recipe's pattern),
`length` (1 at `target` characters, falling linearly to 0 at 0 or twice the target). A `model` reward is
a `finetune reward` folder, merged into its base and scored by TRL. A `python` reward is the user's own
function, imported only with `grpo.allow_python_rewards: true` (checked by the recipe).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Callable

from finetune import models
from finetune.errors import UserError
from finetune.recipe import GrpoReward, ModelSection, Recipe


def label(spec: GrpoReward) -> str:
    """The reward's name in the metrics (`rewards/<name>/mean`)."""
    return spec.name or (Path(spec.function.split(":")[0]).stem + "." + spec.function.split(":")[1] if spec.type == "python" else spec.type)


def where(i: int, spec: GrpoReward) -> str:
    return f"grpo.rewards.{i} ({label(spec)})"


# ---- checks (preflight: nothing loads) -------------------------------------------------------------


def check(recipe: Recipe, records: list[tuple[dict, str]], log: Callable[[str], None] = print) -> None:
    """Every reward can run on these rows: files and folders exist, patterns compile, columns are present,
    a reward model is a sequence-classification adapter on the recipe's base, a python function imports."""
    names = [label(s) for s in recipe.grpo.rewards]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"grpo.rewards: two rewards are named `{dup}` — give them distinct `name`s so their metrics stay apart")
    for i, spec in enumerate(recipe.grpo.rewards):
        at = where(i, spec)
        if spec.type in ("equals", "regex"):
            rec, row_at = records[0]
            if spec.column not in rec:
                cols = ", ".join(k for k in rec if k != "prompt")
                raise UserError(f"{at}.column: `{spec.column}` is not a column of the data ({row_at} has: {cols or 'only a prompt'}) — "
                                "name the column that holds the reference")
            for rec, row_at in records:
                value = rec.get(spec.column)
                if value is None:
                    raise UserError(f"{row_at}: `{spec.column}` is empty, and {at} ({spec.type}) needs it in every row — fill it in")
                if spec.type == "regex":
                    _compile(str(value), f"{row_at}: `{spec.column}`")
        elif spec.type == "format":
            _compile(spec.pattern, f"{at}.pattern")
        elif spec.type == "model":
            check_reward_model(Path(spec.model), recipe.model, f"{at}.model")
        elif spec.type == "python":
            load_function(spec.function, f"{at}.function")


def _compile(pattern: str, at: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise UserError(f"{at}: {pattern!r} is not a valid regular expression ({exc}) — fix the pattern") from None


def check_reward_model(folder: Path, policy: ModelSection, at: str) -> dict:
    """A reward folder is a SEQ_CLS adapter (what `finetune reward` writes) on the same base as the policy."""
    info = models.adapter_info(folder) if folder.is_dir() else None
    if info is None:
        raise UserError(f"{at}: {folder} is not a reward model folder (no adapter_config.json) — train one with `finetune reward`")
    if info["config"].get("task_type") != "SEQ_CLS":
        raise UserError(f"{at}: {folder} is a {info['config'].get('task_type') or 'language-model'} adapter, not a reward model — "
                        "train one with `finetune reward` (a sequence-classification head)")
    theirs, ours = models.resolve_base(info["base"], convert=False), models.resolve_base(policy.base, convert=False)
    hub = "hub" in (theirs.kind, ours.kind)
    same = theirs.spec == ours.spec if hub else Path(theirs.path).resolve() == Path(ours.path).resolve()
    if not same:
        raise UserError(f"{at}: {folder} was trained on base `{info['base']}`, but this recipe trains `{policy.base}` — "
                        "train the reward model on the same base (its tokenizer must read the policy's answers)")
    return info


def load_function(ref: str, at: str) -> Callable:
    """Import `file.py:function` (the recipe opted in to running it)."""
    file, _, name = ref.rpartition(":")
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"{at}: {path} not found — give the path of a Python file, relative to where you run finetune")
    spec = importlib.util.spec_from_file_location(f"finetune_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any failure is theirs to fix
        raise UserError(f"{at}: importing {path} failed with {type(exc).__name__} ({exc}) — fix the file") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = ", ".join(n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", "") == module.__name__)
        raise UserError(f"{at}: {path} has no function `{name}` (it defines: {found or 'none'}) — fix the name after the colon")
    return fn


# ---- the callables TRL calls ------------------------------------------------------------------------


def text(completion: Any) -> str:
    """An answer as text: TRL passes a list of messages for chat prompts, a string otherwise."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def _norm(s: str) -> str:
    return s.strip().rstrip(".").strip().casefold()


def rule(spec: GrpoReward) -> Callable:
    """A built-in rule reward as a TRL reward function (one float per completion)."""
    if spec.type == "equals":
        def score(completions, **kw):
            return [float(_norm(text(c)) == _norm(str(ref))) for c, ref in zip(completions, kw[spec.column])]
    elif spec.type == "regex":
        def score(completions, **kw):
            return [float(re.search(str(p), text(c), re.DOTALL) is not None) for c, p in zip(completions, kw[spec.column])]
    elif spec.type == "format":
        pattern = re.compile(spec.pattern, re.DOTALL)

        def score(completions, **kw):
            return [float(pattern.fullmatch(text(c).strip()) is not None) for c in completions]
    else:  # length
        def score(completions, **kw):
            return [max(0.0, 1.0 - abs(len(text(c).strip()) - spec.target) / spec.target) for c in completions]
    score.__name__ = label(spec)
    return score


def user(spec: GrpoReward, at: str) -> Callable:
    """The user's function, with its failures named as theirs (exit 2) instead of a crash inside TRL."""
    fn = load_function(spec.function, at)

    def score(prompts, completions, **kw):
        try:
            out = fn(prompts=prompts, completions=completions, **kw)
        except Exception as exc:
            raise UserError(f"{at}: {spec.function} raised {type(exc).__name__} ({exc}) — fix the function "
                            "(it is called with prompts, completions and the data columns as keyword lists)") from None
        out = list(out) if out is not None else None
        if out is None or len(out) != len(completions) or not all(v is None or isinstance(v, (int, float)) for v in out):
            raise UserError(f"{at}: {spec.function} must return one number per completion ({len(completions)}), got {str(out)[:120]}")
        return [None if v is None else float(v) for v in out]

    score.__name__ = label(spec)
    return score


def reward_model(spec: GrpoReward, device: str, dtype: str):
    """A `finetune reward` folder as a plain classifier: its LoRA and head merged into its base (inference only)."""
    from peft import PeftModel

    folder = Path(spec.model)
    info = models.adapter_info(folder)
    loaded = models.load(ModelSection(base=info["base"], quantization="none", device=device, dtype=dtype),
                         for_training=False, classifier=True, log=lambda *_: None)
    model = PeftModel.from_pretrained(loaded.model, str(folder)).merge_and_unload()
    model.eval()
    tokenizer = models.load_tokenizer(str(folder))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config._name_or_path = label(spec)  # TRL names a model reward after it in the metrics
    return model, tokenizer


def build(recipe: Recipe, device: str) -> tuple[list, list[float], list]:
    """(reward_funcs, reward_weights, reward_processing_classes) for GRPOTrainer, in the recipe's order."""
    funcs, weights, tokenizers = [], [], []
    for i, spec in enumerate(recipe.grpo.rewards):
        at = where(i, spec)
        if spec.type == "model":
            model, tok = reward_model(spec, device, recipe.model.dtype)
            funcs.append(model)
            tokenizers.append(tok)
        else:
            funcs.append(user(spec, at) if spec.type == "python" else rule(spec))
            tokenizers.append(None)
        weights.append(spec.weight)
    return funcs, weights, tokenizers


def describe(recipe: Recipe) -> str:
    return " + ".join(f"{s.weight:g} x {label(s)}" for s in recipe.grpo.rewards)
