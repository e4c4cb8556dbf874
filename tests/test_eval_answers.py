"""`finetune eval --prompts` (answers side by side, report) and `--judge` (both orders, robust verdicts)."""

import json
import socket
from pathlib import Path

import pytest

from helpers import REPO, toy_rows, train, write_jsonl, write_recipe

pytest.importorskip("sacrebleu", reason="the eval extra is not installed (pip install -e '.[eval]')")

from finetune import answers, judge


def test_stop_rate_is_exact_on_constructed_answers():
    stop = [3, 1]
    ids = [[5, 6, 3], [5, 6, 7], [1], [], [3, 9]]  # ends with end of turn, cut, EOS alone, nothing, stop token not last
    flags = [answers.ended_with_stop(x, stop) for x in ids]
    assert flags == [True, False, True, False, False]
    got = [{"text": "x", "tokens": len(x), "stopped": f} for x, f in zip(ids, flags)]
    assert answers.stop_rate(got) == 2 / 5
    assert answers.summary([], got)["stop_rate"] == 0.4


def test_verdict_parsing():
    assert judge.parse_verdict("[[A]]") == "A"
    assert judge.parse_verdict("After comparing, B is more helpful. [[B]]") == "B"
    assert judge.parse_verdict("[[tie]]") == "tie" and judge.parse_verdict("[[C]]") == "tie"
    assert judge.parse_verdict(" b. ") == "B" and judge.parse_verdict("Verdict: A") == "A"
    for junk in ("", "A is fine but B is better", "[[A]] no wait [[B]]", "the sky is blue", "AB"):
        assert judge.parse_verdict(junk) is None, junk
    # both orders must agree for a win; disagreement is position bias, counted as a tie
    assert judge.outcome("B", "A") == "win" and judge.outcome("A", "B") == "loss"
    assert judge.outcome("A", "A") == "tie" and judge.outcome("tie", "A") == "tie"
    assert judge.outcome(None, "A") == "unparseable"
    lo, hi = judge.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """An adapter that learned to answer `my name is pico` and stop."""
    from finetune import recipe as recipes

    d = tmp_path_factory.mktemp("trained")
    data = write_jsonl(d / "train.jsonl", toy_rows(16))
    recipe = write_recipe(d / "r.yaml", {
        "model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data), "max_length": 64},
        "training": {"max_steps": 30, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
        "output": {"dir": str(d / "ad")},
    })
    train(recipes.load(recipe), "sft")
    return d / "ad"


def prompts_file(tmp_path: Path) -> Path:
    # three formats in one toolkit-readable file: a reference from the assistant turn, none, and from `completion`
    return write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": "who are you 1"}, {"role": "assistant", "content": "my name is pico"}]},
        {"messages": [{"role": "user", "content": "who are you 2"}]},
        {"prompt": "who are you 3", "completion": "my name is pico"},
    ])


def test_answers_report_and_judge_on_real_generations(cli, tmp_path, tiny, trained):
    out = tmp_path / "report"
    res = cli("eval", str(tiny), str(trained), "--prompts", prompts_file(tmp_path), "--out", out, "--max-new-tokens", "12",
              "--judge", str(tiny), "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    summary = json.loads(res.out)
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[1]["reference"] is None and rows[2]["reference"] == "my name is pico"
    tuned = [r["answers"][str(trained)] for r in rows]
    base = [r["answers"][str(tiny)] for r in rows]
    assert all(a["text"] == "my name is pico" and a["stopped"] for a in tuned), tuned
    assert tuned[0]["metrics"]["exact_match"] == 1.0 and tuned[0]["metrics"]["chrf"] == pytest.approx(100.0)
    assert "metrics" not in tuned[1]
    for a in base:  # a random model: an answer is cut exactly when it did not end with the end of turn
        assert a["stopped"] or a["tokens"] == 12
    s = summary["summaries"]
    assert s[str(trained)]["stop_rate"] == 1.0
    assert s[str(tiny)]["stop_rate"] == sum(a["stopped"] for a in base) / 3
    assert s[str(trained)]["exact_match"] == 1.0 and s[str(trained)]["with_reference"] == 2

    # the judge saw each pair in both orders, and the tiny judge's junk verdicts are counted, never guessed
    pair = summary["judge"]["pairs"][str(trained)]
    verdicts = [r["judge"][str(trained)] for r in rows]
    expect = [judge.outcome(judge.parse_verdict(v["candidate_as_b"]["raw"]), judge.parse_verdict(v["candidate_as_a"]["raw"]))
              for v in verdicts]
    assert [v["outcome"] for v in verdicts] == expect
    assert pair["unparseable"] == expect.count("unparseable") and pair["win"] == expect.count("win")
    assert pair["win"] + pair["tie"] + pair["loss"] + pair["unparseable"] == 3
    assert pair["unparseable"] >= 1  # a random tiny model writes no verdict: shown as such, not turned into one
    assert summary["judge"]["prompt"] == judge.DEFAULT_PROMPT

    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script src" not in html and "<link" not in html
    assert html.count("my name is pico") >= 4 and "stop rate" in html and "Judge prompt" in html


def test_judge_sees_both_orders_and_position_bias_cancels(tmp_path, tiny, trained):
    """A judge that always prefers the first answer: every pair comes out a tie, none a win or a loss."""
    seen = []

    class FirstAlways:
        name = "always A"

        def __call__(self, prompt):
            seen.append(prompt)
            return "[[A]]"

    prompts = answers.read_prompts(prompts_file(tmp_path))
    by_model = answers.answer_all([str(tiny), str(trained)], prompts, max_new_tokens=6, quantization=None, dtype="fp32")
    result = judge.judge_pairs(FirstAlways(), prompts, by_model, judge.DEFAULT_PROMPT)
    pair = result["pairs"][str(trained)]
    assert (pair["win"], pair["tie"], pair["loss"], pair["unparseable"]) == (0, 3, 0, 0)
    assert len(seen) == 6
    for i in range(3):
        base_answer, tuned = by_model[str(tiny)][i]["text"], by_model[str(trained)][i]["text"]
        assert seen[2 * i] == judge.render(judge.DEFAULT_PROMPT, prompts[i]["messages"][-1]["content"], base_answer, tuned)
        assert seen[2 * i + 1] == judge.render(judge.DEFAULT_PROMPT, prompts[i]["messages"][-1]["content"], tuned, base_answer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_answer_and_judge_inputs_exit_2(cli, tmp_path, tiny, monkeypatch):
    p = prompts_file(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    res = cli("eval", str(tiny), str(tiny) + "/", "--prompts", p, "--judge", url)
    assert res.code == 2 and "OPENAI_API_KEY" in res.text and url in res.text
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    res = cli("eval", str(tiny), str(tiny) + "/", "--prompts", p, "--judge", url)  # nothing listens there
    assert res.code == 2 and "cannot connect" in res.text and url in res.text and "Traceback" not in res.text
    empty = write_jsonl(tmp_path / "none.jsonl", [{"label": 1}, {"score": 0.5}])
    res = cli("eval", str(tiny), "--prompts", empty)
    assert res.code == 2 and "none.jsonl holds no prompts" in res.text
    bad_prompt = tmp_path / "judge.txt"
    bad_prompt.write_text("Which is better, {answer_a} or {answer_b}?")
    res = cli("eval", str(tiny), str(tiny) + "/", "--prompts", p, "--judge", str(tiny), "--judge-prompt", bad_prompt)
    assert res.code == 2 and "{question}" in res.text
    res = cli("eval", str(tiny), "--judge", str(tiny))
    assert res.code == 2 and "--prompts" in res.text
    res = cli("eval", str(tiny), str(tiny), "--prompts", p)
    assert res.code == 2 and "listed twice" in res.text
    assert not (tmp_path / "eval-report").exists()  # nothing half-written


@pytest.mark.slow
def test_quickstart_adapter_report_with_builtin_judge(cli, tmp_path, builtin_cache, quickstart_adapter, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(builtin_cache))
    monkeypatch.chdir(REPO)
    ad = quickstart_adapter
    out = tmp_path / "report"
    res = cli("eval", "smollm2-135m-instruct", str(ad), "--prompts", "datasets_local/persona_validation.jsonl", "--out", out,
              "--max-new-tokens", "24", "--judge", "smollm2-135m-instruct", "--json")
    assert res.code == 0, res.text
    summary = json.loads(res.out)
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert sum("Pico" in r["answers"][str(ad)]["text"] for r in rows) >= 4
    assert sum("Pico" in r["answers"]["smollm2-135m-instruct"]["text"] for r in rows) == 0
    pair = summary["judge"]["pairs"][str(ad)]
    assert pair["win"] + pair["tie"] + pair["loss"] + pair["unparseable"] == 6
    assert 0 <= pair["win_ci95"][0] <= pair["win_ci95"][1] <= 1
    res = cli("eval", "smollm2-135m-instruct", str(ad), "--tasks", "pico_sky", "--json")
    assert res.code == 0, res.text
    base, tuned = json.loads(res.out)
    assert tuned["tasks"]["pico_sky"]["change"]["acc"] == pytest.approx(tuned["tasks"]["pico_sky"]["acc"] - base["tasks"]["pico_sky"]["acc"])


@pytest.fixture
def served_tiny(tiny, tmp_path):
    """Our own OpenAI-compatible server (a real `finetune serve` process) holding the tiny model in fp32."""
    pytest.importorskip("fastapi", reason="finetune serve needs the serve extra (fastapi, uvicorn)")
    from test_serve import Server

    server = Server([tiny, "--dtype", "fp32"], tmp_path)
    try:
        yield server.url + "/v1"
    finally:
        server.stop()


def test_judge_through_an_openai_compatible_server(cli, tmp_path, tiny, trained, served_tiny, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "unused-by-this-server")
    p = prompts_file(tmp_path)
    res = cli("eval", str(tiny), str(trained), "--prompts", p, "--judge", served_tiny, "--judge-model", "no-such-model")
    assert res.code == 2 and f"does not serve it — it serves {tiny.name}" in res.text
    # no --judge-model: the one model the server lists is the judge
    res = cli("eval", str(tiny), str(trained), "--prompts", p, "--judge", served_tiny, "--max-new-tokens", "8",
              "--dtype", "fp32", "--out", tmp_path / "remote", "--json")
    assert res.code == 0, res.text
    remote = json.loads(res.out)["judge"]
    assert remote["judge"] == f"{tiny.name} at {served_tiny}"
    pair = remote["pairs"][str(trained)]
    assert pair["win"] + pair["tie"] + pair["loss"] + pair["unparseable"] == 3 and pair["unparseable"] >= 1
    rows = [json.loads(line) for line in (tmp_path / "remote" / "answers.jsonl").read_text().splitlines()]
    for r in rows:  # both orders asked of the server, each reply kept with what was read from it
        v = r["judge"][str(trained)]
        for side in ("candidate_as_b", "candidate_as_a"):
            assert v[side]["raw"] and v[side]["verdict"] == judge.parse_verdict(v[side]["raw"])
    # the same model judging in-process (greedy, fp32) writes the very same verdicts
    res = cli("eval", str(tiny), str(trained), "--prompts", p, "--judge", str(tiny), "--max-new-tokens", "8",
              "--dtype", "fp32", "--out", tmp_path / "local", "--json")
    assert res.code == 0, res.text
    local = [json.loads(line) for line in (tmp_path / "local" / "answers.jsonl").read_text().splitlines()]
    assert [r["judge"][str(trained)] for r in local] == [r["judge"][str(trained)] for r in rows]
