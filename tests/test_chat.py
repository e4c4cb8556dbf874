"""`finetune chat`: one-shot equals a direct generate, history trimming, the interactive loop on scripted input."""

import io
import json

import torch

from finetune import chat


def direct_greedy(tiny, messages, n=12):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16 if _bf16() else torch.float32)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>")],
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _bf16():
    from finetune.models import cpu_supports_bf16

    return cpu_supports_bf16()


def test_one_shot_greedy_equals_direct_generate(cli, tiny):
    res = cli("chat", tiny, "--prompt", "who are you", "--temperature", "0", "--max-new-tokens", "12")
    assert res.code == 0, res.text
    expected = direct_greedy(tiny, [{"role": "user", "content": "who are you"}])
    assert res.out.strip() == expected
    assert "tok/s" in res.err  # the dim stats line goes to stderr, the answer alone to stdout


def test_one_shot_json_and_system(cli, tiny):
    res = cli("chat", tiny, "--prompt", "hello", "--system", "be brief", "--temperature", "0", "--max-new-tokens", "8", "--json")
    assert res.code == 0, res.text
    r = json.loads(res.out)
    assert r["answer"] == direct_greedy(tiny, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}], 8)
    assert 0 < r["completion_tokens"] <= 8 and r["prompt_tokens"] > 0
    assert r["time_to_first_token_s"] > 0 and r["tokens_per_s"] >= 0


def test_prompt_from_stdin(cli, tiny, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("who are you\n"))
    res = cli("chat", tiny, "--prompt", "-", "--temperature", "0", "--max-new-tokens", "12")
    assert res.code == 0 and res.out.strip() == direct_greedy(tiny, [{"role": "user", "content": "who are you"}])


def test_history_trimmed_oldest_first_system_kept(tiny_tokenizer):
    s = chat.Session(system="sys")
    for i in range(6):
        s.turns += [{"role": "user", "content": f"question {i} " + "star " * 10}, {"role": "assistant", "content": "answer " * 10}]
    s.turns.append({"role": "user", "content": "last"})
    full = len(tiny_tokenizer.apply_chat_template(s.messages(), tokenize=True, add_generation_prompt=True, return_dict=False))
    msgs = chat.fit_history(tiny_tokenizer, s, context=full // 2, reserve=10)
    n = len(tiny_tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
    assert n + 10 <= full // 2
    assert msgs[0] == {"role": "system", "content": "sys"} and msgs[-1] == {"role": "user", "content": "last"}
    assert msgs[1]["role"] == "user" and "question 0" not in json.dumps(msgs)  # oldest exchanges went first


def test_interactive_commands(cli, tiny, tmp_path, monkeypatch):
    script = "\n".join(["who are you", "/save first.json", "/reset", "/system be brief", "hello", "/save second.json",
                        "/bogus", "/exit", "never read"]) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    res = cli("chat", tiny, "--temperature", "0", "--max-new-tokens", "6")
    assert res.code == 0, res.text
    first = json.loads((tmp_path / "first.json").read_text())
    assert [m["role"] for m in first] == ["user", "assistant"] and first[0]["content"] == "who are you"
    second = json.loads((tmp_path / "second.json").read_text())
    assert [m["role"] for m in second] == ["system", "user", "assistant"]  # /reset cleared, /system set
    assert second[0]["content"] == "be brief" and second[1]["content"] == "hello"
    assert second[2]["content"] == direct_greedy(tiny, second[:2], 6)
    assert "unknown command /bogus" in res.err


def test_missing_model_and_bad_options(cli, tmp_path):
    res = cli("chat", tmp_path / "nope", "--prompt", "hi")
    assert res.code == 2 and "not found" in res.err and "Traceback" not in res.text
    res = cli("chat", "no-such-alias", "--prompt", "hi")
    assert res.code == 2
    res = cli("chat", "x", "--prompt", "hi", "--max-new-tokens", "0")
    assert res.code == 2 and "--max-new-tokens" in res.err


def test_compare_needs_adapter_and_shows_both(cli, tiny, tmp_path):
    res = cli("chat", tiny, "--prompt", "hi", "--compare")
    assert res.code == 2 and "--compare needs an adapter" in res.err


def test_adapter_chat_and_compare(cli, tiny, tmp_path):
    from helpers import toy_rows, write_jsonl, write_recipe

    r = write_recipe(tmp_path / "r.yaml", {
        "model": {"base": str(tiny), "quantization": "none"}, "lora": {"r": 4, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", toy_rows(8))), "max_length": 64},
        "training": {"max_steps": 20, "batch_size": 4, "learning_rate": 3e-2}, "output": {"dir": str(tmp_path / "ad")}})
    assert cli("sft", r).code == 0
    res = cli("chat", tmp_path / "ad", "--prompt", "who are you 1", "--temperature", "0", "--max-new-tokens", "10", "--compare", "--json")
    assert res.code == 0, res.text
    both = json.loads(res.out)
    assert both["base"]["answer"] == direct_greedy(tiny, [{"role": "user", "content": "who are you 1"}], 10)
    assert both["adapter"]["answer"] == "my name is pico"  # learned, and stopped at the end-of-turn token
