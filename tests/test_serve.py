"""`finetune serve`: a real server process driven by the official `openai` client (streaming and not) and by
plain HTTP for the error cases, concurrency, client disconnects, the auth rule and a clean SIGTERM."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PICO, REPO, STAR  # noqa: F401  (the `adapters` fixture in conftest.py trains on them)

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        self.port = free_port()
        self.log = cwd / f"server-{self.port}.log"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "FINETUNE_CACHE": str(cwd / "cache"), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", *map(str, args), "--port", str(self.port)],
                                     cwd=cwd, env=full_env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):  # bounded: up to ~2 minutes on a busy machine
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            self.stop()
            raise AssertionError("server did not start:\n" + self.log.read_text())

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    def client(self, key: str = "unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny, adapters, tmp_path_factory):
    pico, star = adapters
    s = Server([pico, star], tmp_path_factory.mktemp("serve"))  # no --dtype: a CPU serves in fp32 by default
    yield s
    s.stop()


def ask(client, model: str, content: str, **kw) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       **{"temperature": 0, "max_tokens": 12, **kw})
    return r.choices[0].message.content


def test_models_listed_base_included(server, tiny):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [tiny.name, "pico", "star"]
    health = server.request("GET", "/health")[1]
    assert health["dtype"] == "fp32" and health["threads"] >= 1  # CPU defaults: batched answers stay exact


def test_adapter_answers_streamed_and_differs_from_base(server, tiny):
    client = server.client()
    stream = client.chat.completions.create(model="pico", messages=[{"role": "user", "content": "who are you 1"}],
                                            temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PICO
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # really streamed, piece by piece
    assert chunks[-2].choices[0].finish_reason == "stop"  # stopped by the adapter's end-of-turn token
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0
    whole = client.chat.completions.create(model="pico", messages=[{"role": "user", "content": "who are you 1"}],
                                           temperature=0, max_tokens=12)
    assert whole.choices[0].message.content == PICO and whole.choices[0].finish_reason == "stop"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert ask(client, "star", "who are you 1") == STAR
    base = ask(client, tiny.name, "who are you 1")
    assert base != PICO and base != STAR


def test_base_answer_equals_direct_generate(server, tiny):
    got = ask(server.client(), tiny.name, "hello", max_tokens=10)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype="float32")
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True, add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False, eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>")],
                         pad_token_id=tok.pad_token_id)
    assert got == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_completions_stop_max_tokens_and_seed(server, tiny):
    client = server.client()
    r = client.completions.create(model=tiny.name, prompt="the red star", max_tokens=7, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    full = r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=tiny.name, prompt="the red star", max_tokens=7,
                                                                             temperature=0, stream=True))
    assert streamed == full
    # a stop string cuts the answer before it and is not part of it
    stop = full.strip()[2:5]
    cut = client.completions.create(model=tiny.name, prompt="the red star", max_tokens=7, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text and full.startswith(cut.choices[0].text)
    # sampling: the same seed gives the same answer; the answers vary across seeds
    a = [ask(client, "pico", "the moon", temperature=1.0, seed=s, max_tokens=8) for s in (1, 1, 2, 3, 4)]
    assert a[0] == a[1] and len(set(a)) > 1


def test_concurrent_clients_get_their_one_at_a_time_answers(server, tiny):
    client = server.client()
    jobs = [(m, f"{w} {i}") for i, (m, w) in enumerate([(tiny.name, "hello"), ("pico", "who are you"), ("star", "who are you"),
                                                          ("pico", "the sky"), (tiny.name, "red moon"), ("star", "cold ice"),
                                                          ("pico", "who are you"), (tiny.name, "two rings")])]
    alone = [ask(client, m, q, max_tokens=16) for m, q in jobs]
    before = server.request("GET", "/health")[1]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda mq: ask(server.client(), *mq, max_tokens=16), jobs))
    assert together == alone
    after = server.request("GET", "/health")[1]
    # the eight requests shared batches (mixed adapters in one generate call) rather than running one by one
    assert after["rows"] - before["rows"] == 8 and after["batches"] - before["batches"] < 8


@pytest.mark.parametrize("body,status,fragment", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "pico", "messages": []}, 400, "messages"),
    ({"model": "pico", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": "pico", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "pico", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "pico", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=1"),
    ({"model": "pico", "messages": [{"role": "user", "content": "star " * 600}]}, 400, "context"),
    ({"model": "pico", "messages": [{"role": "user", "content": "star " * 200}], "max_tokens": 400}, 400, "context"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    code, r = server.request("POST", "/v1/chat/completions", body)
    assert code == status, r
    assert set(r["error"]) == {"message", "type", "param", "code"} and fragment in r["error"]["message"]


def test_bad_json_big_body_unknown_route_and_still_serving(server):
    code, r = server.request("POST", "/v1/chat/completions", raw=b"{not json")
    assert code == 400 and "not valid JSON" in r["error"]["message"]
    code, r = server.request("POST", "/v1/chat/completions", raw=b"[1, 2]")
    assert code == 400 and "JSON object" in r["error"]["message"]
    code, r = server.request("POST", "/v1/completions", raw=json.dumps({"model": "pico", "prompt": "x" * (2 << 20)}).encode())
    assert code == 413 and "larger than" in r["error"]["message"]
    code, r = server.request("GET", "/v1/nothing-here")
    assert code == 404 and "error" in r
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    assert ask(server.client(), "pico", "who are you 2") == PICO  # none of that hurt the server


def test_client_disconnect_stops_generation(server, tiny):
    prompt = "the red star"
    whole = server.client().completions.create(model=tiny.name, prompt=prompt, max_tokens=400, temperature=0)
    if whole.choices[0].finish_reason != "length":
        pytest.skip("the tiny base ended this answer early; nothing to interrupt")
    before = server.request("GET", "/health")[1]["cancelled"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": tiny.name, "prompt": prompt, "max_tokens": 400, "temperature": 0,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    for _ in range(200):  # bounded wait for the server to notice
        if server.request("GET", "/health")[1]["cancelled"] > before:
            break
        time.sleep(0.05)
    assert server.request("GET", "/health")[1]["cancelled"] == before + 1
    log = server.log.read_text()
    stopped = [int(line.split("after ")[1].split()[0]) for line in log.splitlines() if "client went away" in line]
    assert stopped and stopped[-1] < 400


def test_api_key_checked_on_every_request(tiny, tmp_path):
    s = Server([tiny, "--api-key", "s3cret-key-123"], tmp_path)
    try:
        assert s.request("GET", "/v1/models")[0] == 401
        code, r = s.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong-key-0000"})
        assert code == 401 and r["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong-key-0000").models.list()
        assert [m.id for m in s.client("s3cret-key-123").models.list().data] == [tiny.name]
        assert s.request("GET", "/")[0] == 200  # the page itself holds no secrets; it sends the key it is given
        # SIGTERM while an answer is streaming: a clean shutdown all the same
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": tiny.name, "prompt": "the red star", "max_tokens": 400,
                                                            "stream": True}),
                     {"Content-Type": "application/json", "Authorization": "Bearer s3cret-key-123"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    finally:
        assert s.stop() == 0
    log = s.log.read_text()
    assert "server stopped" in log and "Traceback" not in log and "terminate called" not in log


def test_refusals_before_loading(cli, tiny, tmp_path):
    res = cli("serve", tiny, "--host", "0.0.0.0")
    assert res.code == 2 and "--api-key" in res.err and "--no-auth" in res.err
    res = cli("serve", tmp_path / "missing")
    assert res.code == 2 and "not found" in res.err
    res = cli("serve", tiny, "--engine", "vllm")
    if res.code == 2:
        assert "vLLM" in res.err and "not installed" in res.err
    res = cli("serve", tiny, "--api-key", "short")
    assert res.code == 2 and "8 characters" in res.err
