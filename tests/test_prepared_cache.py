"""The prepared-data cache: a second prepare is a hit with identical examples; changing the data, the tokenizer's
chat template or the data settings is a miss; entries are JSON and int32 arrays; `inspect` says when it used one."""

import copy
import json

import numpy as np

from helpers import CHAT_TEMPLATE, toy_rows, write_jsonl, write_recipe

from finetune.data import cache, prepare
from finetune.recipe import DataSection


def section(tmp_path, **kw) -> DataSection:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, toy_rows(12))
    return DataSection(train=str(data), validation=0.25, max_length=64, **kw)


def quiet(_):
    pass


def test_second_prepare_is_a_hit_with_identical_examples(tmp_path, tiny_tokenizer):
    s = section(tmp_path)
    first = prepare(s, tiny_tokenizer, "sft", 42, log=quiet)
    logged = []
    second = prepare(s, tiny_tokenizer, "sft", 42, log=logged.append)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert second.train == first.train and second.validation == first.validation  # ids, labels, where, truncated
    assert len(second.train) == 9 and len(second.validation) == 3
    assert (second.format, second.files, second.rows, second.notes) == (first.format, first.files, first.rows, first.notes)
    assert logged[:-1] == first.notes and "read from the cache" in logged[-1]
    entries = list(cache.root().iterdir())
    assert len(entries) == 1
    assert sorted(p.name for p in entries[0].iterdir()) == ["prepared.json"] + [
        f"{split}.{f}" for split in ("train", "validation") for f in
        ("input_ids.lengths.npy", "input_ids.npy", "jsonl", "labels.lengths.npy", "labels.npy")]
    rows = [json.loads(line) for line in (entries[0] / "train.jsonl").read_text().splitlines()]
    assert rows[0] == {"where": first.train[0].where, "truncated": first.train[0].truncated}
    ids = np.load(entries[0] / "train.input_ids.npy", allow_pickle=False)  # plain int32 arrays, nothing pickled
    assert ids.dtype == np.int32 and ids[: len(first.train[0].input_ids)].tolist() == first.train[0].input_ids


def test_changes_are_misses(tmp_path, tiny_tokenizer):
    s = section(tmp_path)
    assert prepare(s, tiny_tokenizer, "sft", 42, log=quiet).cache == "miss"
    assert prepare(s, tiny_tokenizer, "sft", 42, log=quiet).cache == "hit"
    # the data file changes
    write_jsonl(tmp_path / "train.jsonl", toy_rows(13))
    changed = prepare(s, tiny_tokenizer, "sft", 42, log=quiet)
    assert changed.cache == "miss" and changed.rows == 13
    # the tokenizer's chat template changes: the examples change with it
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = CHAT_TEMPLATE.replace("'\n' }}{% endfor %}", "'\n\n' }}{% endfor %}")
    templated = prepare(s, other, "sft", 42, log=quiet)
    assert templated.cache == "miss" and templated.train[0].input_ids != changed.train[0].input_ids
    # max_length, the seed of a validation fraction, and the method
    assert prepare(s.model_copy(update={"max_length": 32}), tiny_tokenizer, "sft", 42, log=quiet).cache == "miss"
    assert prepare(s, tiny_tokenizer, "sft", 7, log=quiet).cache == "miss"
    assert prepare(s, tiny_tokenizer, "sft", 42, log=quiet).cache == "hit"
    assert len(list(cache.root().iterdir())) == 5


def test_preference_pairs_round_trip(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"who are you {i}", "chosen": "my name is pico", "rejected": "no"} for i in range(6)]
    s = DataSection(train=str(write_jsonl(tmp_path / "pairs.jsonl", rows)), max_length=64)
    first = prepare(s, tiny_tokenizer, "dpo", 42, log=quiet)
    second = prepare(s, tiny_tokenizer, "dpo", 42, log=quiet)
    assert second.cache == "hit" and second.train == first.train and second.train[0].length == first.train[0].length


def test_damaged_entry_is_prepared_again(tmp_path, tiny_tokenizer):
    s = section(tmp_path)
    first = prepare(s, tiny_tokenizer, "sft", 42, log=quiet)
    (next(cache.root().iterdir()) / "train.jsonl").write_text("{not json\n")
    again = prepare(s, tiny_tokenizer, "sft", 42, log=quiet)
    assert again.cache == "miss" and again.train == first.train
    ids = next(cache.root().iterdir()) / "train.labels.npy"
    np.save(ids, np.load(ids)[:-1])  # an array cut short: the lengths no longer add up
    assert prepare(s, tiny_tokenizer, "sft", 42, log=quiet).cache == "miss"
    assert prepare(s, tiny_tokenizer, "sft", 42, log=quiet).cache == "hit"


def test_inspect_twice_uses_the_cache(cli, tmp_path, tiny):
    data = write_jsonl(tmp_path / "t.jsonl", toy_rows(6))
    p = write_recipe(tmp_path / "r.yaml", {"model": {"base": str(tiny)}, "data": {"train": str(data), "max_length": 64}})
    first = cli("inspect", p, "-n", "0")
    assert first.code == 0 and "from the cache" not in first.text, first.text
    second = cli("inspect", p, "-n", "0")
    assert second.code == 0 and "prepared data read from the cache" in second.text
    assert first.out.split("what will be trained")[1] == second.out.split("what will be trained")[1]


def test_inspect_after_sft_reads_what_sft_prepared(cli, tmp_path, tiny):
    data = write_jsonl(tmp_path / "t.jsonl", toy_rows(8))
    p = write_recipe(tmp_path / "r.yaml", {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"},
                                           "data": {"train": str(data), "max_length": 64},
                                           "training": {"max_steps": 1, "batch_size": 2}, "output": {"dir": str(tmp_path / "out")}})
    res = cli("sft", p)
    assert res.code == 0 and "read from the cache" not in res.text, res.text
    res = cli("inspect", p, "-n", "0")
    assert res.code == 0 and "prepared data read from the cache" in res.text, res.text


def test_tokenizer_vocabulary_and_row_selection_are_part_of_the_key(tmp_path, tiny_tokenizer):
    s = section(tmp_path)
    assert prepare(s, tiny_tokenizer, "sft", 42, log=quiet).cache == "miss"
    grown = copy.deepcopy(tiny_tokenizer)
    grown.add_tokens(["planetarium"])  # same chat template, another vocabulary
    assert prepare(s, grown, "sft", 42, log=quiet).cache == "miss"
    assert prepare(s.model_copy(update={"max_rows": 8}), tiny_tokenizer, "sft", 42, log=quiet).cache == "miss"
    other = write_jsonl(tmp_path / "other.jsonl", toy_rows(6))
    mixed = DataSection(mix=[{"source": s.train, "weight": 1}, {"source": str(other), "weight": 1}], max_length=64)
    assert prepare(mixed, tiny_tokenizer, "sft", 42, log=quiet).cache == "miss"
    reweighted = DataSection(mix=[{"source": s.train, "weight": 2}, {"source": str(other), "weight": 1}], max_length=64)
    first = prepare(reweighted, tiny_tokenizer, "sft", 42, log=quiet)
    assert first.cache == "miss" and prepare(reweighted, tiny_tokenizer, "sft", 42, log=quiet).cache == "hit"
    assert prepare(s, tiny_tokenizer, "sft", 42, log=quiet).cache == "hit"


def test_second_sft_run_is_a_cache_hit_in_its_manifest(cli, tmp_path, tiny):
    data = write_jsonl(tmp_path / "t.jsonl", toy_rows(8))
    seen = []
    for out in ("first", "second"):
        p = write_recipe(tmp_path / "r.yaml", {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"},
                                               "data": {"train": str(data), "max_length": 64},
                                               "training": {"max_steps": 1, "batch_size": 2}, "output": {"dir": str(tmp_path / out)}})
        res = cli("sft", p)
        assert res.code == 0, res.text
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        seen.append((manifest["data"]["prepared_cache"], manifest["data"]["train_examples"], manifest["data"]["files"]))
    assert [s[0] for s in seen] == ["miss", "hit"]
    assert seen[0][1:] == seen[1][1:]  # the same examples and file hashes either way
