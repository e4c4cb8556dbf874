"""Recipe validation: every shipped recipe parses; bad recipes name their keys; overrides are typed."""

from pathlib import Path

import pytest

from helpers import REPO, write_recipe
from finetune import recipe as recipes
from finetune.errors import UserError

SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))  # recipes/accelerate/ holds launcher configs (test_distributed)


def test_recipes_exist():
    assert any(p.name == "quickstart.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = recipes.load(path)
    assert r.data.train


def load_tree(tmp_path: Path, tree: dict, overrides=None):
    return recipes.load(write_recipe(tmp_path / "r.yaml", tree), overrides)


def test_defaults(tmp_path):
    r = load_tree(tmp_path, {"data": {"train": "x.jsonl"}})
    assert r.model.base == "smollm2-135m-instruct"
    assert r.model.quantization == "4bit"
    assert r.lora.target_modules == "all-linear"
    assert r.data.train_on == "completions"
    assert r.name == "r"
    assert r.output_dir() == Path("adapters/r")


def test_all_errors_reported_at_once_with_paths(tmp_path):
    tree = {"model": {"quantization": "3bit"}, "lora": {"r": 0}, "data": {"train": "x.jsonl"},
            "training": {"learning_rate": "fast", "batch_size": -1}}
    with pytest.raises(UserError) as e:
        load_tree(tmp_path, tree)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    for path in ("model.quantization", "lora.r", "training.learning_rate", "training.batch_size"):
        assert path + ":" in msg
    assert "'4bit'" in msg  # says what is allowed


def test_unknown_key_did_you_mean(tmp_path):
    with pytest.raises(UserError) as e:
        load_tree(tmp_path, {"data": {"train": "x.jsonl"}, "training": {"learning_rat": 1e-4}})
    assert "training.learning_rat: unknown key — did you mean `learning_rate`?" in str(e.value)


def test_unknown_section(tmp_path):
    with pytest.raises(UserError) as e:
        load_tree(tmp_path, {"data": {"train": "x.jsonl"}, "trainin": {}})
    assert "trainin: unknown key — did you mean `training`?" in str(e.value)


def test_missing_data(tmp_path):
    with pytest.raises(UserError) as e:
        load_tree(tmp_path, {"model": {"base": "x"}})
    assert "data: required" in str(e.value)


def test_overrides_typed_and_validated(tmp_path):
    r = load_tree(tmp_path, {"data": {"train": "x.jsonl"}},
                  ["training.max_steps=3", "lora.target_modules=[q_proj, v_proj]", "data.validation=0.1", "model.adapter="])
    assert r.training.max_steps == 3
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.validation == 0.1
    assert r.model.adapter is None
    with pytest.raises(UserError) as e:
        load_tree(tmp_path, {"data": {"train": "x.jsonl"}}, ["training.max_step=3"])
    assert "training.max_step: unknown key — did you mean `max_steps`?" in str(e.value)
    with pytest.raises(UserError) as e:
        load_tree(tmp_path, {"data": {"train": "x.jsonl"}}, ["training.max_steps"])
    assert "expected KEY=VALUE" in str(e.value)


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  train: [a.jsonl\nmodel: {}\n")
    with pytest.raises(UserError) as e:
        recipes.load(p)
    assert "bad.yaml line" in str(e.value) and "not valid YAML" in str(e.value)


def test_validation_fraction_range(tmp_path):
    with pytest.raises(UserError) as e:
        load_tree(tmp_path, {"data": {"train": "x.jsonl", "validation": 0.9}})
    assert "data.validation" in str(e.value)


def test_method_mismatch(tmp_path):
    dpo = load_tree(tmp_path, {"data": {"train": "x.jsonl"}, "dpo": {"beta": 0.2}})
    with pytest.raises(UserError, match="finetune dpo"):
        recipes.require_method(dpo, "sft", "r.yaml")
    sft = load_tree(tmp_path, {"data": {"train": "x.jsonl"}})
    with pytest.raises(UserError, match="finetune sft"):
        recipes.require_method(sft, "dpo", "r.yaml")


def test_contradictory_packing(tmp_path):
    with pytest.raises(UserError) as e:
        load_tree(tmp_path, {"data": {"train": "x.jsonl", "packing": True}, "training": {"padding_free": True}})
    assert "packing" in str(e.value) and "padding_free" in str(e.value)


def test_cli_exit_code_2_no_traceback(cli, tmp_path):
    p = write_recipe(tmp_path / "r.yaml", {"data": {"train": "x.jsonl"}, "lora": {"rank": 8}})
    res = cli("sft", p)
    assert res.code == 2
    assert "lora.rank: unknown key" in res.err
    assert "Traceback" not in res.text
    res = cli("sft", tmp_path / "missing.yaml")
    assert res.code == 2 and "recipe file not found" in res.err


def test_readme_reference_matches_models():
    from finetune.docs import recipe_reference

    readme = (REPO / "README.md").read_text()
    assert recipe_reference() in readme, "README recipe reference is stale: run python -m finetune.docs"
