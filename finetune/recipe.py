"""Typed recipes: the YAML a user writes, validated once, then passed through every workflow.

`load(path, overrides)` reads a recipe file, applies `--set a.b=value` overrides, validates the
result with pydantic and reports every problem at once as `path: what is wrong — how to fix`.
Field descriptions are the only help text: the README's recipe reference is generated from them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.errors import UserError

DEFAULT_BASE = "smollm2-135m-instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    base: str = Field(
        DEFAULT_BASE,
        description="Base model: a built-in alias (see `finetune models`), a local Hugging Face folder, "
        "a `.gguf` file, or a hub id such as `Qwen/Qwen2.5-7B-Instruct`.",
    )
    quantization: Literal["4bit", "8bit", "none"] = Field(
        "4bit", description="How the frozen base is stored: `4bit` (QLoRA, NF4), `8bit`, or `none`."
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Compute dtype. `auto`: bf16 on GPUs and CPUs that support it, else fp16 (GPU) or fp32. "
        "fp16 trains with a loss scaler.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel. `auto` uses PyTorch SDPA. `flash_attention_2` needs a CUDA GPU (Ampere or "
        "newer), bf16/fp16 and `pip install flash-attn --no-build-isolation`."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where to train. `auto`: CUDA if present, else MPS, else CPU."
    )
    trust_remote_code: bool = Field(
        False, description="Allow code shipped with a hub model to run. Only set this for models you trust."
    )
    allow_pickle_weights: bool = Field(
        False, description="Also load .bin / .pt weights (pickle, can run code). Off: safetensors only."
    )
    adapter: str | None = Field(
        None, description="Start from an existing LoRA adapter folder (continue training it; DPO uses it as reference)."
    )


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Module names to adapt, or `all-linear` for every linear layer except the output head."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list adapts nothing — name modules such as [q_proj, v_proj], or use all-linear")
        return v


class MixSource(Section):
    source: str | list[str] = Field(..., description="Files, folders, globs or hub datasets, as in `data.train`.")
    weight: float = Field(..., gt=0, description="This source's share of the mixed rows (weights are normalised to sum to 1).")


class DataSection(Section):
    train: str | list[str] | None = Field(
        None, description="Training data: a file (.jsonl .json .csv .parquet .txt), a folder of such files, a glob such as "
        "`data/*.jsonl`, a list of them, or a hub dataset `owner/name[:subset][@split]` (split `train` unless named)."
    )
    mix: list[MixSource] | None = Field(
        None, description="Instead of `train`: several sources with weights, e.g. `[{source: a.jsonl, weight: 0.7}, "
        "{source: b/, weight: 0.3}]`; rows are drawn by `training.seed`, `max_rows` in all or as many as no repeat allows."
    )
    max_rows: int | None = Field(
        None, ge=1, description="Use at most this many training rows: the first of `train`, or the total drawn by `mix`."
    )
    format: Literal[
        "auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "unpaired"
    ] = Field("auto", description="Record format. `auto` detects it from the fields and prints what it found. "
              "`unpaired` (KTO): prompt/completion or messages with a true/false `label` (or `kto_tag`).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename unusual fields to the expected ones, e.g. `{question: prompt, answer: completion}`.",
    )
    validation: str | float | None = Field(
        None, description="Held-out data: a file, or a fraction (0-0.5) of the training rows chosen by `training.seed`."
    )
    max_length: int = Field(1024, ge=8, description="Longest example in tokens.")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with longer examples: cut them at `max_length`, or drop them."
    )
    max_dropped_fraction: float = Field(
        0.5, ge=0, le=1, description="Stop before training if more than this share of rows would be dropped."
    )
    packing: bool = Field(False, description="Pack several examples into each `max_length` row (fewer, fuller steps).")
    train_on: Literal["completions", "all"] = Field(
        "completions", description="`completions`: loss on assistant turns only (with their end-of-turn token). `all`: every token."
    )
    system_prompt: str | None = Field(None, description="System message added to conversations that have none.")
    num_proc: int | None = Field(
        None, ge=1, description="Processes that tokenize the data. Default: one per CPU core (one for fewer than 2,000 rows)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.train is None) == (self.mix is None):
            raise ValueError("data: give either `train` (files, a folder, a glob or a hub dataset) or `mix` (sources with weights)"
                             + (", not both" if self.train is not None else " — e.g. train: data/train.jsonl"))
        if self.mix is not None and not self.mix:
            raise ValueError("data.mix: an empty list mixes nothing — give at least one {source, weight}")
        return self

    @field_validator("validation")
    @classmethod
    def _fraction_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0 < v <= 0.5:
            raise ValueError("a validation fraction must be between 0 and 0.5 — e.g. 0.1, or give a file path")
        return v


class TrainingSection(Section):
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides `epochs`).")
    epochs: float = Field(1, gt=0, description="Passes over the training data.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    batch_size: int = Field(4, ge=1, description="Examples per device per micro-step.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for data order, LoRA initialisation and the validation split.")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="Recompute activations to save memory. `auto`: on for CUDA with a base of 1B+ parameters, off otherwise."
    )
    padding_free: Literal["auto"] | bool = Field(
        "auto", description="Flatten each batch into one row without padding. `auto`: on where it is faster."
    )
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate on the validation data every N steps (and always at the end).")
    save_every: int | None = Field(None, ge=1, description="Save a checkpoint every N steps (needed for `--resume`).")
    save_total_limit: int = Field(3, ge=1, description="Keep at most this many checkpoints.")
    diverge_factor: float = Field(
        4.0, gt=1, description="Warn when the loss rises above this multiple of its lowest value."
    )
    report_to: Literal["none", "tensorboard", "wandb"] = Field("none", description="Extra experiment tracker.")
    sample_every: int | None = Field(
        None, ge=1, description="Every N steps, answer a few validation prompts greedily and append them to `samples.jsonl` in the run folder."
    )
    sample_prompts: int = Field(3, ge=1, description="How many validation prompts `sample_every` answers.")
    sample_max_tokens: int = Field(64, ge=1, description="Longest answer `sample_every` generates, in tokens.")


DpoLoss = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]


class DpoSection(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty towards the reference model.")
    loss: DpoLoss | list[DpoLoss] = Field("sigmoid", description="DPO loss type(s) as named by TRL; a list combines several.")


class RewardSection(Section):
    center_rewards: float | None = Field(
        None, ge=0, description="Pull scores towards zero with this weight (TRL's center_rewards_coefficient; e.g. 0.01)."
    )


RewardType = Literal["model", "equals", "regex", "format", "length", "python"]


class GrpoReward(Section):
    type: RewardType = Field(
        ..., description="`model`: a `finetune reward` folder; `equals` / `regex`: the answer equals / matches the row's `column`; "
        "`format`: the answer matches `pattern`; `length`: closeness to `target` characters; `python`: `function`."
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum GRPO maximises.")
    name: str | None = Field(None, description="Name in the metrics (`rewards/<name>/mean`). Default: the type.")
    model: str | None = Field(None, description="type model: the reward model folder written by `finetune reward`.")
    column: str | None = Field(None, description="type equals / regex: the data column holding the reference answer or pattern.")
    pattern: str | None = Field(None, description="type format: a regular expression the whole answer must match.")
    target: int | None = Field(None, ge=1, description="type length: the answer length in characters that scores 1.")
    function: str | None = Field(None, description="type python: `file.py:function`, called with prompts, completions and the row's columns.")

    @model_validator(mode="after")
    def _needs(self) -> GrpoReward:
        needs = {"model": "model", "equals": "column", "regex": "column", "format": "pattern", "length": "target", "python": "function"}
        key = needs[self.type]
        if getattr(self, key) is None:
            raise ValueError(f"a `{self.type}` reward needs `{key}`")
        if self.type == "python" and ":" not in self.function:
            raise ValueError("function: write it as `file.py:function_name`")
        return self


class GrpoSection(Section):
    rewards: list[GrpoReward] = Field(..., min_length=1, description="The rewards, summed with their weights.")
    allow_python_rewards: bool = Field(
        False, description="Run `python` rewards: they are your code, executed during training. Off: such a recipe is refused."
    )
    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt (the group GRPO compares).")
    max_completion_length: int = Field(64, ge=1, description="Longest generated answer in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generations.")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the starting policy (0: no reference pass).")
    loss: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field("dapo", description="GRPO loss type as named by TRL.")
    use_vllm: Literal["auto"] | bool = Field(
        "auto", description="Generate with vLLM. `auto`: when vLLM is installed and the run is on CUDA; transformers otherwise."
    )


class KtoSection(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty towards the reference model.")
    loss: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="KTO loss as named by TRL.")
    desirable_weight: float | None = Field(
        None, gt=0, description="Weight of desirable (label true) examples. Unset with `undesirable_weight` unset: chosen from "
        "the label counts so that desirable_weight·n_desirable / (undesirable_weight·n_undesirable) is within [1, 4/3] (KTO paper).")
    undesirable_weight: float | None = Field(
        None, gt=0, description="Weight of undesirable (label false) examples. Unset: see `desirable_weight`; 1 if only the other is set.")


class OrpoSection(Section):
    beta: float = Field(0.1, gt=0, description="Weight λ of the odds-ratio term added to the chosen answers' NLL.")


class OutputSection(Section):
    dir: str | None = Field(None, description="Output folder. Default: `adapters/<recipe file name>`.")


# every method but SFT is named by its section in the recipe (the section holds its settings); an example of each
METHOD_SECTIONS = {"dpo": "dpo: {beta: 0.1}", "kto": "kto: {beta: 0.1}", "orpo": "orpo: {beta: 0.1}", "reward": "reward: {}",
                   "grpo": "grpo: {rewards: [{type: length, target: 200}]}"}


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    dpo: DpoSection | None = Field(None, description="Present only in DPO recipes (`finetune dpo`).")
    kto: KtoSection | None = Field(None, description="Present only in KTO recipes (`finetune kto`).")
    orpo: OrpoSection | None = Field(None, description="Present only in ORPO recipes (`finetune orpo`).")
    reward: RewardSection | None = Field(None, description="Present only in reward-model recipes (`finetune reward`).")
    grpo: GrpoSection | None = Field(None, description="Present only in GRPO recipes (`finetune grpo`).")
    output: OutputSection = Field(default_factory=OutputSection)
    name: str = Field("run", description="Run name; defaults to the recipe file name.")

    # Rules that need only the recipe, by topic. Each message starts with the key to change. Rules that need
    # the file system or the launch (data files, output folder, resume, processes) are in finetune/preflight.py.

    @model_validator(mode="after")
    def _data_rules(self) -> Recipe:
        if self.data.packing and self.training.padding_free is True:
            raise ValueError(
                "data.packing and training.padding_free cannot both be on — packing already removes padding; set one of them to false"
            )
        return self

    @model_validator(mode="after")
    def _sample_rules(self) -> Recipe:
        if self.training.sample_every and self.data.validation is None:
            raise ValueError("training.sample_every: answers validation prompts, but there is no validation data — "
                             "set data.validation to a file or a fraction such as 0.1, or remove training.sample_every")
        return self

    @model_validator(mode="after")
    def _method_rules(self) -> Recipe:
        if self.dpo is not None and self.training.padding_free is True:
            raise ValueError("training.padding_free: only supported by `finetune sft` — set it to auto or false for DPO")
        sections = [m for m in METHOD_SECTIONS if getattr(self, m) is not None]
        if len(sections) > 1:
            raise ValueError(f"a recipe has one method section, this one has {' and '.join(f'`{m}:`' for m in sections)} — keep the "
                             "one for the command you run")
        if (self.reward is not None or self.grpo is not None) and self.training.padding_free is True:
            raise ValueError("training.padding_free: only supported by `finetune sft` — set it to auto or false")
        if self.grpo is not None:
            t, n = self.training, self.grpo.num_generations
            if (t.batch_size * t.gradient_accumulation) % n:
                raise ValueError(f"training.batch_size x gradient_accumulation ({t.batch_size * t.gradient_accumulation}) must be a "
                                 f"multiple of grpo.num_generations ({n}) — each step holds whole groups of answers")
            if self.data.validation is not None:
                raise ValueError("data.validation: `finetune grpo` trains on prompts and does not hold any out — remove it")
            if any(r.type == "python" for r in self.grpo.rewards) and not self.grpo.allow_python_rewards:
                raise ValueError("grpo.allow_python_rewards: a `python` reward runs your code during training — set "
                                 "allow_python_rewards: true to allow it")
        return self

    @model_validator(mode="after")
    def _kto_orpo_rules(self) -> Recipe:
        methods = [m for m in ("dpo", "kto", "orpo") if getattr(self, m) is not None]
        if methods in (["kto"], ["orpo"]) and self.training.padding_free is True:
            raise ValueError(f"training.padding_free: only supported by `finetune sft` — set it to auto or false for {methods[0].upper()}")
        if self.kto is not None and self.kto.loss == "kto" and self.training.batch_size < 2:
            raise ValueError("training.batch_size: KTO estimates its KL term from the other answers in the batch, so it needs at "
                             "least 2 — raise it (use gradient_accumulation to save memory), or set kto.loss: apo_zero_unpaired")
        return self

    def output_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else Path("adapters") / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading ---------------------------------------------------------------------------------------


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    """Apply one `--set a.b=value`; the value is parsed as YAML so numbers and lists keep their types."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: `{k}` is not a section — use a full key such as training.max_steps=3")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item or item.startswith("="):
        raise UserError(f"--set {item!r}: expected KEY=VALUE — e.g. --set training.max_steps=3")
    key, value = item.split("=", 1)
    return key.strip(), value


def _fields_at(loc: tuple, root: type[BaseModel] | None = None) -> list[str]:
    """Known keys of the model at `loc` (for did-you-mean); list positions are stepped over."""
    model: type[BaseModel] | None = root or Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return []
        ann = model.model_fields[part].annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model else []


def format_errors(err: ValidationError, source: str, root: type[BaseModel] | None = None, what: str = "recipe") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in ("str", "float", "list[str]", "literal['all-linear']", "literal['auto']", "bool", "int"))))
        path = ".".join(str(p) for p in loc) or "(recipe)"
        if e["type"] == "extra_forbidden":
            known = _fields_at(loc[:-1], root)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            hint = f"did you mean `{close[0]}`?" if close else f"known keys here: {', '.join(known)}"
            lines.append(f"{path}: unknown key — {hint}")
        elif e["type"] == "missing":
            lines.append(f"{path}: required — add it to the {what}")
        elif e["type"] == "literal_error":
            lines.append(f"{path}: {e['input']!r} is not allowed — {e['msg'].replace('Input should be ', 'use ')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            # a rule over several keys (a model validator) names its keys itself
            lines.append(f"{msg}{got}" if not loc else f"{path}: {msg}{got}")
    # one problem may surface once per union member; keep each line once
    unique = list(dict.fromkeys(lines))
    return f"{source}: {len(unique)} problem(s) in the {what}:\n" + "\n".join(f"  {l}" for l in unique)


def read_yaml(path: Path, what: str = "recipe", where: str = "recipes/") -> Any:
    """A YAML file's contents (safe loader: no Python objects), or one message naming the line to fix."""
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found — check the path ({what}s live in {where})")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{at}: not valid YAML ({getattr(exc, 'problem', exc)}) — fix the syntax there") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file — a {what} is UTF-8 YAML") from None


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    tree = read_yaml(path)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model, lora, data, training, dpo, output)")
    tree.setdefault("name", path.stem)
    # relative data paths in a recipe are relative to where the command runs (the repository root)
    return from_tree(tree, str(path), overrides)


def from_tree(tree: dict, source: str, overrides: list[str] | None = None) -> Recipe:
    """A recipe from an already parsed mapping (a file's, or one written inline in a pipeline), `--set` applied."""
    for item in overrides or []:
        _set_path(tree, *parse_override(item))
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise UserError(format_errors(err, source)) from None


def require_method(recipe: Recipe, method: str, path: str) -> None:
    """A recipe given to the wrong training command is a mistake worth naming: every method but SFT has its section."""
    own = next((m for m in METHOD_SECTIONS if getattr(recipe, m) is not None), None)
    if own == method or (own is None and method == "sft"):
        return
    if own is not None:
        raise UserError(f"{path}: this is a {own.upper()} recipe (it has a `{own}:` section) — run `finetune {own} {path}`")
    raise UserError(f"{path}: this recipe has no `{method}:` section, so it is an SFT recipe — run `finetune sft {path}`, "
                    f"or add `{METHOD_SECTIONS[method]}` to make it a {method.upper()} recipe")
