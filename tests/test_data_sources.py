"""Where training rows come from: globs, data.max_rows, a weighted data.mix (deterministic by seed), hub datasets
(refused clearly when the hub cannot be reached), every source's hash in the manifest; tokenizing in worker
processes gives exactly what one process gives."""

import hashlib
import json

import pytest
from helpers import toy_rows, write_jsonl, write_recipe

from finetune.data import prepare, read_train
from finetune.data.read import expand, hub_parts
from finetune.errors import UserError
from finetune.recipe import DataSection, Recipe


def quiet(_):
    pass


def rows_of(tag: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}"}, {"role": "assistant", "content": f"{tag} answer {i}"}]}
            for i in range(n)]


def users(rows) -> list[str]:
    return [r.data["messages"][0]["content"] for r in rows]


def test_glob_reads_the_matching_files_sorted_with_their_hashes(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", rows_of("b", 2))
    write_jsonl(tmp_path / "a.jsonl", rows_of("a", 3))
    (tmp_path / "notes.md").write_text("not data")
    rows, files, _ = read_train(DataSection(train=str(tmp_path / "*")), 42)
    assert [f["path"] for f in files] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert [f["sha256"] for f in files] == [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.jsonl", "b.jsonl")]
    assert users(rows) == [f"a question {i}" for i in range(3)] + [f"b question {i}" for i in range(2)]
    with pytest.raises(UserError, match=r"nothing\*\.jsonl: the pattern matches no data files"):
        read_train(DataSection(train=str(tmp_path / "nothing*.jsonl")), 42)


def test_max_rows_keeps_the_first_rows_and_says_so(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", rows_of("a", 5))
    write_jsonl(tmp_path / "b.jsonl", rows_of("b", 5))
    rows, files, notes = read_train(DataSection(train=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], max_rows=3), 42)
    assert users(rows) == ["a question 0", "a question 1", "a question 2"]
    assert files == [{"path": str(tmp_path / "a.jsonl"), "rows": 5, "used": 3, "sha256": files[0]["sha256"]}]  # b is not read at all
    assert notes == ["data.max_rows: using the first 3 rows"]


def mix(tmp_path, a=30, b=10, **kw) -> DataSection:
    write_jsonl(tmp_path / "a.jsonl", rows_of("a", a))
    write_jsonl(tmp_path / "b.jsonl", rows_of("b", b))
    return DataSection(mix=[{"source": str(tmp_path / "a.jsonl"), "weight": 3}, {"source": str(tmp_path / "b.jsonl"), "weight": 1}], **kw)


def test_mix_draws_by_weight_without_repeats_and_is_deterministic(tmp_path):
    section = mix(tmp_path, a=30, b=10)
    rows, files, notes = read_train(section, 42)
    # b (10 rows, a quarter of the mix) runs out first: 40 rows in all, 30 from a and all of b
    got = users(rows)
    assert len(got) == 40 and len(set(got)) == 40
    assert sum(u.startswith("a ") for u in got) == 30 and sum(u.startswith("b ") for u in got) == 10
    assert [(f["weight"], f["rows"], f["used"]) for f in files] == [(3, 30, 30), (1, 10, 10)]
    assert notes[0].startswith("data.mix: 40 rows")
    # a smaller total draws a sample; the same seed draws the same rows, another seed others
    small = section.model_copy(update={"max_rows": 8})
    first, again, other = (users(read_train(small, s)[0]) for s in (42, 42, 7))
    assert first == again and first != other
    assert sum(u.startswith("a ") for u in first) == 6 and sum(u.startswith("b ") for u in first) == 2
    a_rows = [int(u.split()[-1]) for u in first if u.startswith("a ")]
    assert a_rows == sorted(a_rows)  # file order kept within a source


def test_mix_repeats_a_small_source_to_reach_its_share(tmp_path):
    rows, files, notes = read_train(mix(tmp_path, a=30, b=2, max_rows=40), 42)
    b_rows = [u for u in users(rows) if u.startswith("b ")]
    assert len(b_rows) == 10 and set(b_rows) == {"b question 0", "b question 1"}
    assert files[1]["used"] == 10 and "about 5.0 times" in notes[0]


def test_mix_rows_are_trained_and_every_file_is_in_the_manifest(cli, tmp_path, tiny):
    section = mix(tmp_path, a=6, b=2, max_length=64)
    tree = {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4},
            "data": section.model_dump(mode="json", exclude_none=True), "training": {"max_steps": 1, "batch_size": 2},
            "output": {"dir": str(tmp_path / "out")}}
    res = cli("sft", write_recipe(tmp_path / "r.yaml", tree))
    assert res.code == 0, res.text
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    files = manifest["data"]["files"]
    assert [(f["path"], f["weight"], f["used"]) for f in files] == [(str(tmp_path / "a.jsonl"), 3, 6), (str(tmp_path / "b.jsonl"), 1, 2)]
    assert all(f["sha256"] == hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for f, n in zip(files, ("a.jsonl", "b.jsonl")))
    assert manifest["data"]["train_examples"] == 8 and manifest["data"]["prepared_cache"] == "miss"


def test_train_or_mix_not_both(tmp_path):
    with pytest.raises(ValueError, match="give either `train`"):
        Recipe.model_validate({"data": {}})
    with pytest.raises(ValueError, match="not both"):
        Recipe.model_validate({"data": {"train": "a.jsonl", "mix": [{"source": "b.jsonl", "weight": 1}]}})
    with pytest.raises(ValueError, match="weight"):
        Recipe.model_validate({"data": {"mix": [{"source": "b.jsonl", "weight": 0}]}})


def test_hub_spec_parts():
    assert hub_parts("org/set") == ("org/set", None, "train")
    assert hub_parts("org/set:subset@test") == ("org/set", "subset", "test")
    assert hub_parts("org/set@validation") == ("org/set", None, "validation")
    assert expand("org/set@train[:100]") == ["org/set@train[:100]"]  # datasets' split slicing is not a glob


def test_unreachable_hub_dataset_is_a_clear_refusal_before_any_load(cli, tmp_path, tiny):
    # the tests run with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, like a machine without a network
    tree = {"model": {"base": str(tiny)}, "data": {"train": "nobody/no-such-set:sub@test", "max_rows": 5}}
    res = cli("sft", write_recipe(tmp_path / "r.yaml", tree))
    assert res.code == 2, res.text
    assert "nobody/no-such-set:sub@test: not a local file, and hub dataset `nobody/no-such-set` (subset sub, split test) could not be loaded" in res.text
    assert "without a network, use local files" in res.text and "Traceback" not in res.text


def test_worker_processes_give_what_one_process_gives(tmp_path, tiny_tokenizer, monkeypatch):
    rows = toy_rows(40)
    rows[5]["messages"][1]["content"] = "pico " * 80  # cut at the end
    rows[30]["messages"][0]["content"] = "who " * 90  # the prompt alone is too long: dropped
    s = DataSection(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), validation=0.1, max_length=48)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "one"))
    one = prepare(s.model_copy(update={"num_proc": 1}), tiny_tokenizer, "sft", 42, log=quiet)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "two"))
    two = prepare(s.model_copy(update={"num_proc": 2}), tiny_tokenizer, "sft", 42, log=quiet)
    assert (one.cache, two.cache) == ("miss", "miss")
    assert two.train == one.train and two.validation == one.validation
    assert (two.truncated, two.dropped, two.truncations, two.notes) == (one.truncated, one.dropped, one.truncations, one.notes)
    assert one.truncated >= 1 and sum(one.dropped.values()) == 1
    # the number of processes is not part of the cache key: the same data prepared by one process is a hit
    assert prepare(s.model_copy(update={"num_proc": 1}), tiny_tokenizer, "sft", 42, log=quiet).cache == "hit"


def test_sft_tokenizes_in_worker_processes_after_the_base_is_loaded(cli, tmp_path, tiny):
    # the workers are forked from a process that already holds torch and the model
    data = write_jsonl(tmp_path / "t.jsonl", toy_rows(40))
    p = write_recipe(tmp_path / "r.yaml", {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"},
                                           "data": {"train": str(data), "max_length": 64, "num_proc": 2},
                                           "training": {"max_steps": 2, "batch_size": 2}, "output": {"dir": str(tmp_path / "out")}})
    res = cli("sft", p)
    assert res.code == 0, res.text
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["data"]["train_examples"] == 40 and manifest["data"]["prepared_cache"] == "miss"
