"""Run a GGUF file in llama.cpp itself (the `xllamacpp` wheel embeds llama.cpp's own server).

Used by `finetune export` to prove what it wrote: the same prompt gives the same token ids, greedy
continuations match transformers, and perplexity of the same text agrees. Perplexity needs the
log-probability of given tokens, which the server does not return for prompt tokens; a grammar made of
exactly those token ids (`<[id]>`) forces the completion to be the text, and the server reports each
token's log-probability from the model's raw logits (measured equal to transformers' to ~1e-2 in f16).
"""

from __future__ import annotations

import json
import math
import os
import urllib.request
from pathlib import Path

from finetune.errors import UserError


def require() -> None:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        raise UserError("running GGUF files needs llama.cpp's Python wheel — pip install xllamacpp "
                        "(or `pip install finetune[gguf]`)") from None


class Llama:
    """One llama.cpp server in this process, loaded with one GGUF file (optionally plus a LoRA GGUF)."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, lora: Path | None = None, threads: int | None = None,
                 jinja: bool = False):
        require()
        import xllamacpp as x

        p = x.CommonParams()
        p.model.path = str(path)
        p.n_ctx = n_ctx
        p.n_parallel = 1  # one request at a time: results must not depend on batching with other requests
        p.cpuparams.n_threads = threads or os.cpu_count() or 1
        p.cpuparams_batch.n_threads = threads or os.cpu_count() or 1
        p.warmup = False
        p.verbosity = -1
        p.use_jinja = jinja  # chat through the file's own Jinja template, not llama.cpp's built-in guesses
        if lora is not None:
            info = x.CommonAdapterLoraInfo()
            info.path = str(lora)
            info.scale = 1.0
            p.lora_adapters = [info]
        self.n_ctx = n_ctx
        try:
            self.server = x.Server(p)
        except RuntimeError as exc:  # xllamacpp's only report of a file llama.cpp refuses
            raise UserError(f"{path}: llama.cpp could not load this file ({exc})") from None
        self.address = self.server.listening_address
        self.eog = end_of_generation_ids(path)

    def _post(self, route: str, body: dict) -> dict:
        req = urllib.request.Request(self.address + route, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as llama.cpp reads a prompt: special tokens parsed, no BOS added (the chat
        template writes its own)."""
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def complete(self, ids: list[int], n: int) -> tuple[list[int], bool]:
        """Greedy continuation of the token ids `ids`, and whether it ended at an end-of-generation token."""
        # the native route returns every token id; the OpenAI-style one drops tokens that end inside a UTF-8 character
        r = self._post("/completion", {"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1, "return_tokens": True,
                                       "cache_prompt": False, "seed": 0})
        return r["tokens"], r.get("stop_type") == "eos"

    def top_logprobs(self, ids: list[int], n: int) -> dict[int, float]:
        """The n most likely next tokens after `ids`, with their log-probabilities (from the raw logits)."""
        r = self._post("/completion", {"prompt": ids, "n_predict": 1, "temperature": 0, "n_probs": n, "cache_prompt": False})
        probs = r.get("completion_probabilities") or [{}]  # none for a token that ends inside a UTF-8 character
        return {c["id"]: c["logprob"] for c in probs[0].get("top_logprobs", [])}

    def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0, **sampling) -> dict:
        """One chat turn through llama.cpp's own chat template handling and stop tokens."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, **sampling}
        r = self.server.handle_chat_completions(body)
        self._check(r)
        return r

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1, in windows of the context size (as transformers is scored)."""
        out: list[float] = []
        for window in windows(ids, self.n_ctx):
            out += self.token_logprobs_window(window)
        return out

    def token_logprobs_window(self, window: list[int]) -> list[float]:
        """log p(window[i] | window[:i]) for i >= 1, in one sequence."""
        return [lp for lp, _ in self.scored(window)]

    def scored(self, window: list[int], start: int = 1) -> list[tuple[float, int | None]]:
        """(log p(window[i] | window[:i]), the model's most likely token at i) for i >= start, in one sequence.

        Runs of ordinary tokens are forced by a grammar of their ids. An end-of-generation token (a chat
        turn's end) cannot be forced that way: llama.cpp's grammar sampler only admits one when the grammar is
        complete, so it is scored with an empty grammar (only end-of-generation tokens allowed) and the other
        end-of-generation tokens banned. The most likely token is read from the raw logits too (the grammar
        does not restrict what `n_probs` reports)."""
        out: list[tuple[float, int | None]] = []
        pos = max(1, start)
        while pos < len(window):
            if window[pos] in self.eog:
                run = window[pos:pos + 1]
                body = {"grammar": 'root ::= ""', "logit_bias": [[t, False] for t in self.eog if t != window[pos]]}
            else:
                end = next((i for i in range(pos, len(window)) if window[i] in self.eog), len(window))
                run = window[pos:end]
                body = {"grammar": "root ::= " + " ".join(f"<[{t}]>" for t in run)}
            r = self._post("/completion", {"prompt": window[:pos], "n_predict": len(run), "n_probs": 1, "temperature": 0,
                                           "return_tokens": True, "cache_prompt": True, **body})
            self._check(r)
            probs = r.get("completion_probabilities") or []
            if [c["id"] for c in probs] != run:
                # llama.cpp reports no probability for a token that ends inside a UTF-8 character
                raise UserError("llama.cpp cannot score this text token by token (a token ends inside a multi-byte "
                                "character) — use plain ASCII text for GGUF perplexity")
            out += [(c["logprob"], (c.get("top_logprobs") or [{}])[0].get("id")) for c in probs]
            pos += len(run)
        return out

    @staticmethod
    def _check(r) -> None:
        if isinstance(r, dict) and "error" in r:
            raise RuntimeError(f"llama.cpp: {r['error']}")

    def close(self) -> None:
        del self.server

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# token texts llama.cpp treats as end of generation besides the file's EOS/EOT/EOM ids (llama-vocab.cpp)
EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "_<EOT>",
             "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>", "<|end_of_text|>", "<|eom_id|>"}


def end_of_generation_ids(path: Path) -> set[int]:
    """Token ids that end generation in llama.cpp, read from the file's metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    ids = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        field = reader.get_field(key)
        if field is not None:
            ids.add(int(field.parts[field.data[0]][0]))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:
        for i, idx in enumerate(tokens.data):
            if bytes(tokens.parts[idx]).decode("utf-8", "replace") in EOG_TEXTS:
                ids.add(i)
    return ids


def windows(ids: list[int], n_ctx: int) -> list[list[int]]:
    """Consecutive windows of at most n_ctx tokens, each starting with the last token of the one before,
    so every token after the first is scored exactly once."""
    step = n_ctx - 1
    return [ids[s:s + step + 1] for s in range(0, len(ids) - 1, step)]


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / max(1, len(logprobs)))


# ---- `finetune chat FILE.gguf` and `finetune eval ... FILE.gguf` ----------------------------------------


def is_gguf_file(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.suffix == ".gguf" and p.is_file()


def tokenizer(path: Path):
    """The file's own tokenizer and chat template, read by transformers (the ids llama.cpp uses: checked
    by `finetune export`)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001  transformers raises many kinds for a file it cannot read
        raise UserError(f"{path}: transformers cannot read this file's tokenizer ({str(exc).splitlines()[0][:200]})") from None


def score(path: Path, items: list[tuple[list[int], list[int]]], n_ctx: int) -> tuple[float, int]:
    """Token-weighted NLL over (input_ids, labels) windows, as evaluate.score computes it in transformers:
    each window is one llama.cpp sequence, positions whose label is -100 are context only."""
    total, count = 0.0, 0
    with Llama(path, n_ctx=max(n_ctx, max(len(x) for x, _ in items))) as llm:
        for ids, labels in items:
            lps = llm.token_logprobs_window(ids)
            for lp, label in zip(lps, labels[1:]):
                if label != -100:
                    total -= lp
                    count += 1
    return total, count


def chat(path: Path, *, prompt: str | None, system: str | None, temperature: float | None, top_p: float | None,
         top_k: int | None, repetition_penalty: float | None, max_new_tokens: int, seed: int | None, as_json: bool) -> None:
    """Chat with a GGUF in llama.cpp, which renders the file's chat template and stops at its end-of-turn tokens."""
    import sys
    import time

    sampling = {k: v for k, v in {"top_p": top_p, "top_k": top_k, "repeat_penalty": repetition_penalty, "seed": seed}.items()
                if v is not None}
    messages = [{"role": "system", "content": system}] if system else []
    with Llama(path, n_ctx=4096, jinja=True) as llm:
        def answer() -> dict:
            start = time.perf_counter()
            r = llm.chat(messages, max_tokens=max_new_tokens, temperature=0.0 if temperature is None else temperature, **sampling)
            wall = time.perf_counter() - start
            n = r["usage"]["completion_tokens"]
            return {"answer": r["choices"][0]["message"]["content"], "finish_reason": r["choices"][0]["finish_reason"],
                    "prompt_tokens": r["usage"]["prompt_tokens"], "completion_tokens": n,
                    "tokens_per_s": round(n / wall, 1) if wall > 0 else None}

        if prompt is not None:
            messages.append({"role": "user", "content": prompt})
            r = answer()
            print(json.dumps(r) if as_json else r["answer"])
            return
        tty = sys.stdin.isatty()
        while True:
            try:
                line = input("you> " if tty else "").strip()
            except EOFError:
                break
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                del messages[int(bool(system)):]
                continue
            if line:
                messages.append({"role": "user", "content": line})
                r = answer()
                print(("assistant> " if tty else "") + r["answer"], flush=True)
                messages.append({"role": "assistant", "content": r["answer"]})
