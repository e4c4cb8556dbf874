"""`finetune eval FILE.gguf --tasks / --prompts`: harness scores and greedy answers computed in llama.cpp,
checked against the transformers model the file was exported from (an f32 file: no rounding, so the
numbers agree to float noise and greedy tokens are identical)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import PICO, train_adapter, write_jsonl

pytest.importorskip("xllamacpp")
pytest.importorskip("libgguf")
pytest.importorskip("conversion")
pytest.importorskip("lm_eval", reason="the eval extra is not installed (pip install -e '.[eval]')")
pytest.importorskip("sacrebleu", reason="the eval extra is not installed (pip install -e '.[eval]')")

TASK_DIR = Path(__file__).resolve().parents[1] / "finetune" / "tasks"


@pytest.fixture(scope="module")
def merged_and_gguf(tmp_path_factory, tiny) -> tuple[Path, Path]:
    """A tiny adapter that learned to answer `my name is pico` and stop, merged in fp32, exported as f32 GGUF."""
    from finetune import export, merge

    tmp = tmp_path_factory.mktemp("gguf-eval")
    adapter = train_adapter(tmp / "pico", tiny, PICO, tmp)
    merge.run(adapter, tmp / "merged", base=None, dtype="fp32", original_weights=False, overwrite=False)
    export.run(str(tmp / "merged"), tmp / "g", quants=["f32"], verify_files=False)
    return tmp / "merged", tmp / "g" / "g-f32.gguf"


def sky_requests() -> list:
    """The shipped task's loglikelihood requests, as the harness builds them (question + each choice)."""
    docs = [json.loads(line) for line in (TASK_DIR / "pico_sky.jsonl").read_text().splitlines()]
    return [SimpleNamespace(args=(f"Question: {d['question']}\nAnswer:", " " + c)) for d in docs for c in d["choices"]]


def test_gguf_loglikelihoods_equal_hflm_request_by_request(merged_and_gguf):
    """Each request's log-likelihood and is-greedy flag from llama.cpp equal HFLM's on the merged folder."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import gguf_eval

    merged, gguf = merged_and_gguf
    reqs = sky_requests()
    hf = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tokenizer=AutoTokenizer.from_pretrained(merged),
              batch_size=8, device="cpu").loglikelihood(reqs, disable_tqdm=True)
    gg = gguf_eval.harness_model(gguf).loglikelihood(reqs, disable_tqdm=True)
    assert len(gg) == len(hf) == 80
    for (a, greedy_a), (b, greedy_b) in zip(hf, gg):
        assert b == pytest.approx(a, rel=5e-3)  # llama.cpp keeps its KV cache in f16: up to ~1.4e-3 measured
        assert greedy_a == greedy_b
    assert len({round(x, 3) for x, _ in gg}) > 40  # real, different numbers (not one constant)


def test_gguf_harness_accuracy_equals_merged_folder_and_shares_the_table(cli, merged_and_gguf):
    merged, gguf = merged_and_gguf
    res = cli("eval", merged, gguf, "--tasks", "pico_sky", "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    hf, gg = json.loads(res.out)
    assert gg["kind"] == "gguf" and gg["model"] == str(gguf)
    a, b = hf["tasks"]["pico_sky"], gg["tasks"]["pico_sky"]
    assert b["samples"] == a["samples"] == 20
    assert b["acc"] == a["acc"] and b["acc_norm"] == a["acc_norm"]  # per-request agreement: see the test above
    assert b["change"] == {"acc": 0.0, "acc_norm": 0.0}
    res = cli("eval", merged, gguf, "--tasks", "pico_sky", "--dtype", "fp32", "--limit", "4")
    assert res.code == 0, res.text
    # one table: the GGUF's column holds its scores and their change from the merged folder
    assert "(n=4)" in res.out and "acc_norm" in res.out and res.out.count("(+0.000)") == 2


def answer_prompts(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": "who are you 1"}, {"role": "assistant", "content": PICO}]},
        {"prompt": "who are you 3"},
        {"prompt": "red comet ring and the cold moon"},
    ])


def run_answers(cli, tmp_path, merged, gguf, n: int, *extra) -> tuple[list[dict], dict]:
    out = tmp_path / f"report-{n}"
    res = cli("eval", merged, gguf, "--prompts", answer_prompts(tmp_path), "--out", out, "--max-new-tokens", n,
              "--dtype", "fp32", "--json", *extra)
    assert res.code == 0, res.text
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    return rows, json.loads(res.out)


def test_gguf_answers_equal_transformers_with_the_same_stop_rule(cli, tmp_path, merged_and_gguf):
    merged, gguf = merged_and_gguf
    m, g = str(merged), str(gguf)
    rows, summary = run_answers(cli, tmp_path, merged, gguf, 16, "--judge", m)
    for r in rows:
        assert r["answers"][g] == r["answers"][m], r  # text, token count, stop flag, reference metrics
    first = rows[0]["answers"][g]
    assert first["text"] == PICO and first["stopped"] and first["metrics"]["exact_match"] == 1.0
    assert summary["summaries"][g] == summary["summaries"][m]
    assert set(summary["judge"]["pairs"]) == {g}  # the judge compared the GGUF's answers with the first model's
    assert rows[0]["judge"][g]["outcome"] in ("win", "tie", "loss", "unparseable")
    html = (tmp_path / "report-16" / "report.html").read_text()
    assert f"<th>{g}</th>" in html and html.count(PICO) >= 3

    # the end-of-turn token as the last token allowed still counts as stopped; one token fewer is a cut answer
    n = first["tokens"]
    rows, _ = run_answers(cli, tmp_path, merged, gguf, n)
    assert rows[0]["answers"][g] == rows[0]["answers"][m] and rows[0]["answers"][g]["stopped"] is True
    rows, summary = run_answers(cli, tmp_path, merged, gguf, n - 1)
    assert rows[0]["answers"][g]["stopped"] is False and rows[0]["answers"][g]["tokens"] == n - 1
    for r in rows:
        assert r["answers"][g] == r["answers"][m]
    assert summary["summaries"][g]["stop_rate"] == summary["summaries"][m]["stop_rate"] < 1


def test_stop_rule_is_the_transformers_one_not_llamacpps(merged_and_gguf):
    """llama.cpp ends generation at its own set of tokens (`<|endoftext|>` too); where it ends at a token
    outside the transformers stop set (here `<|im_end|>`, taken out of it), the answer goes on."""
    from transformers import AutoTokenizer

    from finetune import gguf_eval, llamacpp

    merged, gguf = merged_and_gguf
    tok = AutoTokenizer.from_pretrained(merged)
    endoftext, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert gguf_eval.stop_ids(gguf, llamacpp.tokenizer(gguf)) == [im_end]
    with llamacpp.Llama(gguf, n_ctx=256) as llm:
        assert endoftext in llm.eog
        ids = tok.apply_chat_template([{"role": "user", "content": "who are you 1"}], tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
        plain = gguf_eval.greedy(llm, ids, 16, [im_end])
        assert tok.decode(plain) == PICO + "<|im_end|>"
        # with <|im_end|> banned from the stop set, generation runs on through llama.cpp's end-of-generation tokens
        longer = gguf_eval.greedy(llm, ids, 12, [tok.convert_tokens_to_ids("<unk>")])
        assert len(longer) == 12 and longer[:len(plain)] == plain


def task_yaml(folder: Path, name: str, rows: list[dict], body: str) -> Path:
    write_jsonl(folder / f"{name}.jsonl", rows)
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {name}.jsonl\n"
                    f"test_split: test\n{body}")
    return path


def test_gguf_generation_and_rolling_tasks_equal_merged_folder(cli, tmp_path, merged_and_gguf):
    """generate_until (greedy, through each model's chat template) and loglikelihood_rolling tasks."""
    from helpers import corpus

    merged, gguf = merged_and_gguf
    gen = task_yaml(tmp_path, "who_gen", [{"q": f"who are you {i}", "a": PICO} for i in range(4)]
                    + [{"q": "red comet ring", "a": PICO}, {"q": "the cold moon", "a": "blue"}],
                    "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
                    "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
                    "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    res = cli("eval", merged, gguf, "--tasks", gen, "--chat-template", "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    hf, gg = (r["tasks"]["who_gen"] for r in json.loads(res.out))
    assert gg["samples"] == 6 and gg["exact_match"] == hf["exact_match"] >= 4 / 6  # the trained answer, then a stop
    roll = task_yaml(tmp_path, "sky_ppl", [{"text": t} for t in corpus(6, seed=3)],
                     "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                     "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    res = cli("eval", merged, gguf, "--tasks", roll, "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    hf, gg = (r["tasks"]["sky_ppl"] for r in json.loads(res.out))
    assert gg["word_perplexity"] == pytest.approx(hf["word_perplexity"], rel=1e-4) and gg["word_perplexity"] > 1
    assert gg["bits_per_byte"] == pytest.approx(hf["bits_per_byte"], rel=1e-4)


def test_gguf_refusals(cli, tmp_path, merged_and_gguf, monkeypatch):
    merged, gguf = merged_and_gguf
    # a task that samples its answers: the GGUF answers greedily, so it is refused before anything loads
    sampled = task_yaml(tmp_path, "sampled", [{"q": "who are you", "a": "pico"}],
                        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
                        "generation_kwargs:\n  do_sample: true\n  temperature: 0.7\nmetric_list:\n  - metric: exact_match\n")
    res = cli("eval", merged, gguf, "--tasks", sampled)
    assert res.code == 2 and "samples its answers" in res.err and "merged folder" in res.err and "Traceback" not in res.text
    # without llama.cpp's wheel: exit 2 with the install line, nothing written
    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    for args in (("--prompts", answer_prompts(tmp_path), "--out", tmp_path / "r"), ("--tasks", "pico_sky")):
        res = cli("eval", merged, gguf, *args)
        assert res.code == 2 and "pip install xllamacpp" in res.err and "Traceback" not in res.text
    assert not (tmp_path / "r").exists()
