"""`finetune chat` settings and history: --config YAML (flags win), the history window, /load and /save."""

import io
import json

from finetune import chat
from test_chat import direct_greedy


def test_config_file_and_flags_win(cli, tiny, tmp_path):
    cfg = tmp_path / "chat.yaml"
    cfg.write_text("temperature: 0\nmax_new_tokens: 5\nsystem: be brief\n")
    res = cli("chat", tiny, "--config", cfg, "--prompt", "hello", "--json")
    assert res.code == 0, res.text
    r = json.loads(res.out)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert r["answer"] == direct_greedy(tiny, messages, 5) and r["completion_tokens"] <= 5
    res = cli("chat", tiny, "--config", cfg, "--prompt", "hello", "--json", "--max-new-tokens", "2")
    assert res.code == 0 and json.loads(res.out)["completion_tokens"] <= 2
    assert json.loads(res.out)["answer"] == direct_greedy(tiny, messages, 2)


def test_bad_config_refused_before_loading(cli, tiny, tmp_path):
    cfg = tmp_path / "chat.yaml"
    cfg.write_text("temprature: 0.5\n")
    res = cli("chat", tiny, "--config", cfg, "--prompt", "hi")
    assert res.code == 2 and "temprature" in res.err and "allowed keys" in res.err and "Traceback" not in res.text
    cfg.write_text("top_p: 3\n")
    res = cli("chat", tiny, "--config", cfg, "--prompt", "hi")
    assert res.code == 2 and "top_p" in res.err
    cfg.write_text("a: [unclosed\n")
    assert cli("chat", tiny, "--config", cfg, "--prompt", "hi").code == 2
    assert cli("chat", tiny, "--config", tmp_path / "none.yaml", "--prompt", "hi").code == 2


def test_history_window_by_turns_and_tokens(tiny_tokenizer):
    def session():
        s = chat.Session(system="sys")
        for i in range(5):
            s.turns += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        s.turns.append({"role": "user", "content": "last"})
        return s

    s = session()
    msgs = chat.fit_history(tiny_tokenizer, s, context=512, reserve=10, max_turns=2)
    assert [m["content"] for m in msgs] == ["sys", "q3", "a3", "q4", "a4", "last"] and s.dropped == 6
    s = session()
    msgs = chat.fit_history(tiny_tokenizer, s, context=512, reserve=10, max_turns=0)
    assert [m["content"] for m in msgs] == ["sys", "last"]
    s = session()
    budget = len(tiny_tokenizer.apply_chat_template(session().messages()[:1] + session().turns[-3:], tokenize=True,
                                                    add_generation_prompt=True, return_dict=False))
    msgs = chat.fit_history(tiny_tokenizer, s, context=512, reserve=10, max_tokens=budget)
    assert [m["content"] for m in msgs] == ["sys", "q4", "a4", "last"]


def test_interactive_load_save_and_window_notice(cli, tiny, tmp_path, monkeypatch):
    saved = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]
    (tmp_path / "conv.json").write_text(json.dumps({"model": "x", "messages": saved}))  # the web page's format
    script = "\n".join(["/load missing.json", "/load conv.json", "who are you", "/save out.json", "/exit"]) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    res = cli("chat", tiny, "--temperature", "0", "--max-new-tokens", "6", "--history-turns", "0")
    assert res.code == 0, res.text
    assert "missing.json" in res.err and "loaded 2 messages" in res.err
    out = json.loads((tmp_path / "out.json").read_text())
    # the loaded conversation was carried on; the window (0 past exchanges) left the old exchange out, and said so
    assert [m["role"] for m in out] == ["system", "user", "assistant"]
    assert out[0] == {"role": "system", "content": "be brief"} and out[1]["content"] == "who are you"
    assert out[-1]["content"] == direct_greedy(tiny, [out[0], out[-2]], 6)
    assert "left out to fit the history window" in res.err


def test_load_conversation_rejects_bad_files(tmp_path):
    import pytest

    from finetune.errors import UserError

    (tmp_path / "bad.json").write_text('[{"role": "robot", "content": "x"}]')
    with pytest.raises(UserError, match="role"):
        chat.load_conversation(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        chat.load_conversation(tmp_path / "broken.json")
