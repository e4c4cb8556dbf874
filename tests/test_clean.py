"""`finetune data clean`: every rule on constructed rows (exact lines), redaction, leaks, determinism, bad input,
every file format, and a scraped chat file cleaned and then trained on."""

import csv
import json
from pathlib import Path

import pytest
from helpers import toy_rows, write_jsonl, write_recipe

from finetune.data.read import read_file


def chat(user: str, answer: str | None = None) -> dict:
    msgs = [{"role": "user", "content": user}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return {"messages": msgs}


LONG_Q = "tell me about the red planet and its two small moons and the old rovers on it please"
LONG_A = "the red planet is cold and dry and has two small moons named phobos and deimos and several rovers"

ROWS = [
    chat("who are you", "my name is pico"),                       # 1 kept
    chat("Who  are YOU", "my name is   Pico"),                    # 2 duplicate of 1 (case / whitespace)
    chat(LONG_Q, LONG_A),                                         # 3 kept
    chat(LONG_Q, LONG_A + " too"),                                # 4 near duplicate of 3
    chat("hello", " \n "),                                        # 5 empty answer
    chat("say echo", "Say  echo"),                                # 6 answer = prompt
    chat("are you there"),                                        # 7 no final answer
    chat("what is the sun", "a star"),                            # 8 leak (exact)
    chat("the cafÃ© menu", "the cafÃ© serves tea"),               # 9 broken encoding, repaired and kept
    chat("how big is the moon " * 20, "big"),                     # 10 overlong with --max-length 200 (characters)
    chat("what is a comet", "ice and rock and dust in a long orbit around the sun with a bright tail"),  # 11 leak (near)
]
VAL = [chat("what is the sun", "a star"),
       chat("what is a comet", "ice and rock and dust in a long orbit around the sun with a bright tail!")]


def report_of(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".report.json").read_text())


def test_each_rule_with_exact_lines(cli, tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", ROWS)
    val = write_jsonl(tmp_path / "val.jsonl", VAL)
    before = src.read_bytes()
    res = cli("data", "clean", src, "--out", tmp_path / "clean.jsonl", "--validation", val, "--max-length", "200")
    assert res.code == 0, res.text
    rep = report_of(tmp_path / "clean.jsonl")
    got = [(f["where"].split(" line ")[1], f["action"], f["reason"]) for f in rep["findings"]]
    assert got == [("2", "removed", "duplicate"), ("4", "removed", "near duplicate"), ("5", "removed", "empty answer"),
                   ("6", "removed", "answer = prompt"), ("7", "removed", "no final answer"), ("8", "removed", "leak"),
                   ("9", "changed", "broken encoding"), ("10", "removed", "overlong"), ("11", "removed", "leak")]
    details = {f["where"].split(" line ")[1]: f["detail"] for f in rep["findings"]}
    assert details["2"] == f"the same as {src} line 1"
    assert details["4"] == f"nearly the same as {src} line 3"
    assert details["8"] == f"the same as validation row {val} line 1"
    assert details["11"] == f"nearly the same as validation row {val} line 2"
    assert rep["rows"] == 11 and rep["kept"] == 3
    assert rep["removed"] == {"duplicate": 1, "near duplicate": 1, "empty answer": 1, "answer = prompt": 1,
                              "no final answer": 1, "leak": 2, "overlong": 1}
    lines = (tmp_path / "clean.jsonl").read_text().splitlines()
    src_lines = before.decode().splitlines()
    assert lines[:2] == [src_lines[0], src_lines[2]]  # untouched rows: the original bytes
    assert json.loads(lines[2]) == chat("the café menu", "the café serves tea")
    assert src.read_bytes() == before  # the input is never modified
    assert "train.jsonl line 4" in res.out and "near duplicate" in res.out  # the readable table
    table = (tmp_path / "clean.jsonl.report.txt").read_text()
    assert "train.jsonl line 11" in table and "removed: 1 duplicate, 1 near duplicate" in table


def test_threshold_is_configurable(cli, tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", [chat(LONG_Q, LONG_A), chat(LONG_Q, LONG_A + " too")])
    assert cli("data", "clean", src, "--out", tmp_path / "a.jsonl").code == 0
    assert report_of(tmp_path / "a.jsonl")["removed"] == {"near duplicate": 1}
    assert cli("data", "clean", src, "--out", tmp_path / "b.jsonl", "--threshold", "1.0").code == 0
    assert report_of(tmp_path / "b.jsonl")["kept"] == 2


SECRET_ROW = chat("how do I reach you", "mail jane.doe@example.com or call +1 415-555-0134; aws AKIAIOSFODNN7EXAMPLE, "
                  "gh ghp_" + "a1B2" * 9 + ", openai sk-proj-" + "x" * 30 + "\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow"
                  "IBAAKCAQEA\n-----END RSA PRIVATE KEY-----\ndone")


def test_redaction_changes_only_the_secrets(cli, tmp_path):
    # unusual spacing and escapes in the other rows: they must come back byte for byte
    other = [('{"messages":[{"role":"user","content":"caf\\u00e9 on 2024-01-15, v1.2.3 at 10.0.0.1"},'
              '{"role":"assistant","content":"ok"}]}'),
             '{ "messages" : [ {"role": "user", "content": "call 12"}, {"role": "assistant", "content": "n\\u00f6"} ] }']
    src = tmp_path / "train.jsonl"
    src.write_text(other[0] + "\n" + json.dumps(SECRET_ROW) + "\n" + other[1] + "\n")
    assert cli("data", "clean", src, "--out", tmp_path / "flag.jsonl").code == 0
    rep = report_of(tmp_path / "flag.jsonl")
    assert [(f["where"], f["action"]) for f in rep["findings"]] == [(f"{src} line 2", "flagged")]
    assert rep["findings"][0]["detail"].startswith("1 private key, 1 AWS access key, 1 GitHub token, 1 API key, 1 e-mail address, "
                                                   "1 phone number")
    assert (tmp_path / "flag.jsonl").read_bytes() == src.read_bytes()  # flagging writes the rows unchanged
    assert cli("data", "clean", src, "--out", tmp_path / "red.jsonl", "--redact").code == 0
    lines = (tmp_path / "red.jsonl").read_text().splitlines()
    assert lines[0] == other[0] and lines[2] == other[1]
    answer = json.loads(lines[1])["messages"][1]["content"]
    assert answer == ("mail [EMAIL] or call [PHONE]; aws [AWS_KEY], gh [GITHUB_TOKEN], openai [API_KEY]\n[PRIVATE_KEY]\ndone")
    assert report_of(tmp_path / "red.jsonl")["changed"] == {"personal data": 1}


def test_two_runs_give_identical_output(cli, tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", ROWS * 3 + [SECRET_ROW])
    for name in ("one.jsonl", "two.jsonl"):
        assert cli("data", "clean", src, "--out", tmp_path / name, "--redact").code == 0
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    one, two = report_of(tmp_path / "one.jsonl"), report_of(tmp_path / "two.jsonl")
    assert one["findings"] == two["findings"] and len(one["findings"]) > 20


def test_bad_input_exits_2_and_writes_nothing(cli, tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    cases = [((tmp_path / "missing.jsonl", "--out", tmp_path / "o.jsonl"), "file not found"),
             ((src, "--out", src), "is the input file itself"),
             ((src, "--out", tmp_path / "o.csv"), "keeps the input's format"),
             ((src, "--out", tmp_path / "o.jsonl", "--validation", tmp_path / "nope.jsonl"), "validation file not found")]
    for args, message in cases:
        res = cli("data", "clean", *args)
        assert res.code == 2 and message in res.err and "Traceback" not in res.text, res.text
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.csv").exists()
    (tmp_path / "o.jsonl").write_text("keep me\n")
    res = cli("data", "clean", src, "--out", tmp_path / "o.jsonl")
    assert res.code == 2 and "--overwrite" in res.err
    assert (tmp_path / "o.jsonl").read_text() == "keep me\n"
    assert cli("data", "clean", src, "--out", tmp_path / "o.jsonl", "--overwrite").code == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 1


ALPACA = [{"instruction": "name a planet", "input": "", "output": "mars"},
          {"instruction": "Name a  planet", "input": "", "output": "Mars"},
          {"instruction": "name a moon", "input": "", "output": ""},
          {"instruction": "mail", "input": "", "output": "bob@example.org"}]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_other_formats_keep_their_format(cli, tmp_path, suffix):
    src = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        with src.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
            w.writeheader()
            w.writerows(ALPACA)
    elif suffix == ".json":
        src.write_text(json.dumps({"data": ALPACA}, indent=1))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ALPACA), src)
    out = tmp_path / f"clean{suffix}"
    res = cli("data", "clean", src, "--out", out, "--redact")
    assert res.code == 0, res.text
    rows, _ = read_file(out)
    assert [r.data for r in rows] == [ALPACA[0], {**ALPACA[3], "output": "[EMAIL]"}]
    second = {".csv": "line 3", ".json": "line 8", ".parquet": "row 2"}[suffix]  # where the duplicate starts
    assert [(f["where"], f["reason"]) for f in report_of(out)["findings"]] == [
        (f"{src} {second}", "duplicate"), (f"{src} {second[:-1]}{int(second[-1]) + (1 if suffix != '.json' else 5)}", "empty answer"),
        (f"{src} {second[:-1]}{int(second[-1]) + (2 if suffix != '.json' else 10)}", "personal data")]
    if suffix == ".json":
        assert list(json.loads(out.read_text())) == ["data"]  # the wrapper object is kept


def test_scraped_chat_file_cleaned_then_trained(cli, tmp_path, tiny):
    scraped = [chat(f"who are you {i % 4}", "my name is pico") for i in range(12)]  # 4 distinct, 8 duplicates
    scraped += [chat("hello", ""), chat("contact", "write to someone@example.com"), chat("what is the sun", "a star")]
    data = write_jsonl(tmp_path / "scraped.jsonl", scraped)
    val = write_jsonl(tmp_path / "val.jsonl", [chat("what is the sun", "a star")])
    tree = {"model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(data), "validation": str(val), "max_length": 64},
            "training": {"max_steps": 2, "batch_size": 2, "log_every": 1}, "output": {"dir": str(tmp_path / "out")}}
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    res = cli("inspect", recipe, "--json")  # the trainer refuses the empty answer; inspect names what cleaning removes
    assert res.code == 2 and "would remove 8 duplicate, 1 empty answer, 1 leak" in res.err, res.text
    res = cli("data", "clean", recipe, "--out", tmp_path / "clean.jsonl", "--redact")
    assert res.code == 0, res.text
    rep = report_of(tmp_path / "clean.jsonl")
    reasons = {f["where"].rsplit(" ", 1)[1]: f["reason"] for f in rep["findings"]}
    assert reasons == {**{str(n): "duplicate" for n in range(5, 13)}, "13": "empty answer", "14": "personal data", "15": "leak"}
    assert rep["kept"] == 5
    res = cli("inspect", recipe, "--json", "--set", f"data.train={tmp_path / 'clean.jsonl'}")
    assert res.code == 0, res.text
    assert json.loads(res.out)["clean"] == {"rows": 5, "kept": 5, "removed": {}, "changed": {}, "flagged": {}}
    res = cli("sft", recipe, "--set", f"data.train={tmp_path / 'clean.jsonl'}")
    assert res.code == 0, res.text
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["data"]["files"][0]["path"] == str(tmp_path / "clean.jsonl")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_inspect_shows_the_same_counts_as_data_clean(cli, tmp_path, tiny):
    rows = toy_rows(8) + [chat("tell me a story", "the star " * 60), chat("who is bob", "bob@example.org"),
                          chat("what is the sun", "a star")]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [chat("what is the sun", "a star")])
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"base": str(tiny)},
                                                "data": {"train": str(data), "validation": str(val), "max_length": 64}})
    res = cli("inspect", recipe, "--json")
    assert res.code == 0, res.text
    expected = {"rows": 11, "kept": 5, "removed": {"duplicate": 4, "overlong": 1, "leak": 1}, "changed": {},
                "flagged": {"personal data": 1}}
    assert json.loads(res.out)["clean"] == expected
    res = cli("data", "clean", recipe, "--out", tmp_path / "clean.jsonl")
    assert res.code == 0, res.text
    rep = report_of(tmp_path / "clean.jsonl")
    assert {k: rep[k] for k in expected} == expected
    overlong = next(f for f in rep["findings"] if f["reason"] == "overlong")
    assert overlong["where"] == f"{data} line 9" and overlong["detail"].endswith("tokens, more than 64")
    res = cli("inspect", recipe)
    assert "data clean would" in res.out and "removed 4 duplicate, 1 overlong, 1 leak; flagged 1 personal data" in res.out
