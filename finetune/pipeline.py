"""`finetune run PIPELINE.yaml`: the pipeline file, checked as a whole, and the hand-off between its stages.

A pipeline is an ordered list of stages. A training stage names a method (a key of METHODS) and a recipe: a
recipe file, the recipe's sections written inline, and `set:` overrides on either. A step stage is `merge`,
`export` or `eval`. Each stage starts from what the stages before it left, the hand-off:

- a training stage trains the current adapter further (the first one starts from its recipe's base and
  adapter); its adapter becomes the current adapter. Its recipe's model.base, model.adapter and output.dir
  are set by the pipeline;
- `merge` folds the current adapter into the current base: the merged model becomes the base, and the
  next training stage starts a new adapter on it;
- `export` writes GGUF files of the current model; `eval` measures the starting model and every stage's
  model on held-out data, side by side.

`plan` checks every stage before the first one runs — each recipe through preflight, against the planned
hand-off where an earlier stage writes the folder — and reports every problem at once. Running the plan,
the skip and resume rules and the lineage are in finetune/stages.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, ValidationError, model_validator

from finetune import artifacts, preflight
from finetune import recipe as recipes
from finetune.errors import UserError
from finetune.launch import Launch
from finetune.recipe import Recipe, Section

# The training methods a pipeline can run: name -> the module whose `run(recipe, plan, callbacks)` trains it.
METHODS = {
    "sft": "finetune.sft",
    "dpo": "finetune.dpo",
    "kto": "finetune.kto",
    "orpo": "finetune.orpo",
    "grpo": "finetune.grpo",
}
# `reward` is not a stage: its output is a classifier, not a policy the next stage could continue; train it
# with `finetune reward` and name its folder in a grpo stage's rewards.
SPEC = "pipeline.yaml"  # in the output folder: the pipeline as last run (it marks the folder as a pipeline's)
STEP_KEYS = {"merge": {"dtype"}, "export": {"quant", "verify"}, "eval": {"data", "max_length"}}


class Stage(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Stage name (letters, digits, `-_.`); its folder is `NN-name` in the pipeline's output.")
    method: str | None = Field(None, description="Training method: " + ", ".join(METHODS) + ".")
    step: Literal["merge", "export", "eval"] | None = Field(None, description="A step instead of training.")
    recipe: str | dict | None = Field(None, description="Training stages: a recipe file, or the recipe's sections inline.")
    set: list[str] = Field(default_factory=list, description="Overrides on the recipe, as `--set` takes them.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="merge: data type of the merged weights.")
    quant: list[str] = Field(default_factory=list, description="export: GGUF types (default q8_0 and q4_k_m).")
    verify: bool = Field(True, description="export: load each file in llama.cpp and compare it with transformers.")
    data: str | None = Field(None, description="eval: held-out data for perplexity (text, chat or instruction data).")
    max_length: int = Field(1024, ge=2, description="eval: window length in tokens.")

    @model_validator(mode="after")
    def _kind(self) -> Stage:
        if (self.method is None) == (self.step is None):
            raise ValueError(f"stage `{self.name}`: give either method: ({', '.join(METHODS)}) or step: (merge, export, eval)")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"stage `{self.name}`: method: {self.method!r} is not a training method — use one of {', '.join(METHODS)}")
        if self.method and self.recipe is None:
            raise ValueError(f"stage `{self.name}`: recipe: required for a training stage — a recipe file, or its sections inline")
        if self.step and (self.recipe is not None or self.set):
            raise ValueError(f"stage `{self.name}`: recipe/set belong to training stages — a {self.step} step takes no recipe")
        misplaced = (self.model_fields_set & set().union(*STEP_KEYS.values())) - STEP_KEYS.get(self.step or "", set())
        if misplaced:
            raise ValueError(f"stage `{self.name}`: {', '.join(sorted(misplaced))} is not a key of "
                             f"{('an ' if self.step == 'export' else 'a ') + self.step + ' step' if self.step else 'a training stage'} — remove it")
        if self.step == "eval" and not self.data:
            raise ValueError(f"stage `{self.name}`: data: required for an eval step — held-out data to measure every stage on")
        return self


class Pipeline(Section):
    name: str = Field("pipeline", description="Pipeline name; defaults to the file name.")
    base: str | None = Field(None, description="Base of the first stage (default: the first recipe's model.base).")
    output: str | None = Field(None, description="Folder of the stages' outputs. Default: `runs/<name>`.")
    stages: list[Stage] = Field(..., min_length=1, description="The stages, in order.")

    @model_validator(mode="after")
    def _unique_names(self) -> Pipeline:
        names = [s.name for s in self.stages]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"stages: the name(s) {', '.join(twice)} are used twice — each stage needs its own name")
        return self

    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name

    def folder(self, index: int) -> Path:
        return self.output_dir() / f"{index:02d}-{self.stages[index - 1].name}"


def load(path: Path) -> Pipeline:
    tree = recipes.read_yaml(path, "pipeline", "recipes/pipelines/")
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a pipeline is a mapping with a `stages:` list — see recipes/pipelines/")
    tree.setdefault("name", path.stem)
    try:
        return Pipeline.model_validate(tree)
    except ValidationError as err:
        raise UserError(recipes.format_errors(err, str(path), Pipeline, "pipeline")) from None


# ---- the hand-off plan -----------------------------------------------------------------------------


@dataclass
class Planned:
    """One stage with its hand-off resolved."""

    index: int
    stage: Stage
    folder: Path
    base: str | None  # the base it starts from
    adapter: str | None  # the adapter it starts from (training, merge) or exports (export)
    recipe: Recipe | None = None  # training: the recipe with the hand-off applied
    identity: dict | None = None  # training: preflight's run identity (resolved recipe, data file hashes)
    compared: list[str] = field(default_factory=list)  # eval: the starting model, then every earlier stage's model

    @property
    def kind(self) -> str:
        return self.stage.method or self.stage.step

    @property
    def label(self) -> str:
        return f"stage {self.index} `{self.stage.name}` ({self.kind})"

    @property
    def makes_model(self) -> bool:
        return self.stage.method is not None or self.stage.step == "merge"


def stage_recipe(stage: Stage) -> Recipe:
    if isinstance(stage.recipe, dict):
        return recipes.from_tree({"name": stage.name, **stage.recipe}, f"stage `{stage.name}` recipe", stage.set)
    return recipes.load(stage.recipe, stage.set)


def plan(pipe: Pipeline, path: Path, launch: Launch, log: Callable[[str], Any] = print) -> list[Planned]:
    """Every stage with its hand-off, checked before anything runs; all problems in one UserError."""
    problems: list[str] = []
    out = pipe.output_dir()
    try:
        check_output(out)
    except UserError as exc:
        problems.append(str(exc))
    base, adapter = pipe.base, None
    made: set[str] = set()  # folders earlier stages write: checked when they exist
    compared: list[str] = []
    planned = []
    for i, stage in enumerate(pipe.stages, 1):
        p = Planned(i, stage, pipe.folder(i), base, adapter)
        try:
            if stage.method:
                r = stage_recipe(stage)
                if not compared:  # the first training stage: the pipeline starts from its recipe's model
                    base, adapter = base or r.model.base, r.model.adapter
                    p.base, p.adapter = base, adapter
                r.model.base, r.model.adapter, r.output.dir = base, adapter, str(p.folder)
                recipes.require_method(r, stage.method, f"stage `{stage.name}` recipe")
                p.recipe, p.identity = r, preflight.preflight(r, stage.method, launch, overwrite=True, planned=made, log=log).identity
            elif stage.step == "merge":
                if adapter is None:
                    raise UserError("a merge step folds an adapter into its base — put it after a training stage")
            elif stage.step == "export":
                if base is None and adapter is None:
                    raise UserError("nothing to export yet — put it after a training stage, or set the pipeline's base")
                check_export(stage)
            else:
                if not Path(stage.data).is_file():
                    raise UserError(f"data: {stage.data} not found — give held-out data (.txt, .jsonl, ...) to measure on")
                p.compared = list(compared)
                if not p.compared:
                    raise UserError("an eval step compares the models made before it — put it after a training stage")
        except UserError as exc:
            problems.append(f"{p.label}: {exc}")
        # the hand-off, also past a stage with problems, so that the later stages are checked against the plan
        if stage.method:
            adapter = str(p.folder)
        elif stage.step == "merge":
            base, adapter = str(p.folder), None
        if not compared and p.base and stage.method:
            compared.append(p.adapter or p.base)  # the model the pipeline starts from
        if p.makes_model:
            compared.append(str(p.folder))
        made.add(str(p.folder))
        planned.append(p)
    if problems:
        raise UserError(f"{path}: {len(problems)} problem(s), so no stage has run:\n" + "\n".join(f"  {x}" for x in problems))
    return planned


def check_output(out: Path) -> None:
    """The pipeline's folder is writable and is this pipeline's (or new): a foreign folder is never taken over."""
    artifacts.check_writable(out, "output")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is a file — set the pipeline's output: to a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SPEC).is_file():
        raise UserError(f"{out}: a non-empty folder that no pipeline wrote — set the pipeline's output: to another folder, or empty it")


def check_export(stage: Stage) -> None:
    from finetune import export

    export.check_quants(stage.quant)
    export.require_tools()
    if stage.verify:
        from finetune import llamacpp

        llamacpp.require()
