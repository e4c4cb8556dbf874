"""Pairwise judging for `finetune eval --prompts FILE --judge MODEL_OR_URL`.

Each model's answer is compared with the first model's (the base, when listed first) by a judge: any
model the toolkit loads, or an OpenAI-compatible endpoint (official `openai` client, key from
OPENAI_API_KEY). Every pair is judged in both orders to cancel position bias; a prompt counts as a win
or a loss only when both orders agree, as a tie otherwise. A verdict that cannot be read is counted and
shown as unparseable, never guessed. Win and loss shares carry Wilson 95 % intervals.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from rich.console import Console

from finetune import data, models
from finetune.errors import UserError

err = Console(stderr=True, highlight=False)

DEFAULT_PROMPT = """Please act as an impartial judge and compare two answers to the same request.

[Request]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Which answer follows the request better: more helpful, correct and to the point? Do not let the order or
the length of the answers decide. Reply with exactly one verdict: [[A]] if A is better, [[B]] if B is
better, [[TIE]] if they are equally good."""
PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}")
VERDICT_TOKENS = 32  # room for a short reason before the verdict; local and remote judges get the same

_BRACKETED = re.compile(r"\[\[\s*(A|B|TIE|C)\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"^\W*(?:verdict\W*)?(A|B|TIE)\W*$", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a judge's reply; None when it names no verdict or names conflicting ones."""
    found = {m.upper() for m in _BRACKETED.findall(text)}
    if not found:
        m = _BARE.match(text.strip())
        found = {m.group(1).upper()} if m else set()
    found = {"TIE" if f == "C" else f for f in found}  # MT-Bench writes a tie as [[C]]
    if len(found) != 1:
        return None
    v = found.pop()
    return "tie" if v == "TIE" else v


def render(template: str, question: str, a: str, b: str) -> str:
    # plain replacement: prompts and answers may contain braces
    return template.replace("{question}", question).replace("{answer_a}", a).replace("{answer_b}", b)


def load_prompt(path: Path | None) -> str:
    if path is None:
        return DEFAULT_PROMPT
    if not path.is_file():
        raise UserError(f"--judge-prompt: {path} not found")
    text = path.read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise UserError(f"--judge-prompt: {path} lacks {', '.join(missing)} — the judge prompt must contain "
                        f"{', '.join(PLACEHOLDERS)}, and should ask for [[A]], [[B]] or [[TIE]]")
    return text


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (0, 0 when n is 0)."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class RemoteJudge:
    """An OpenAI-compatible chat endpoint, checked before any model loads."""

    def __init__(self, url: str, model: str | None):
        from openai import APIConnectionError, APIStatusError, AuthenticationError, OpenAI

        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise UserError(f"--judge {url}: no API key — set OPENAI_API_KEY (any value for a local server that checks none)")
        self.client = OpenAI(base_url=url, api_key=key, timeout=60, max_retries=1)
        names: list[str] = []
        try:
            names = [m.id for m in self.client.models.list()]
        except AuthenticationError:
            raise UserError(f"--judge {url}: the server refused the key in OPENAI_API_KEY — set the right key") from None
        except APIConnectionError as exc:
            raise UserError(f"--judge {url}: cannot connect ({exc.__cause__ or exc}) — is the server running at that "
                            "address (an OpenAI-compatible base URL, usually ending in /v1)?") from None
        except APIStatusError as exc:
            if model is not None:  # reachable; some servers cannot list models but serve the one named
                names = []
            else:
                raise UserError(f"--judge {url}: the server answered {exc.status_code} when asked for its models — "
                                "pass an OpenAI-compatible base URL (usually ending in /v1), or name the model with --judge-model") from None
        if model is None and not names:
            raise UserError(f"--judge {url}: the server lists no models — name one with --judge-model")
        if model is not None and names and model not in names:
            raise UserError(f"--judge-model {model}: {url} does not serve it — it serves {', '.join(names)}")
        self.model = model or names[0]
        self.name = f"{self.model} at {url}"

    def __call__(self, prompt: str) -> str:
        r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompt}],
                                                temperature=0, max_tokens=VERDICT_TOKENS)
        return r.choices[0].message.content or ""


class LocalJudge:
    """Any model the toolkit loads, answering greedily through its chat template."""

    def __init__(self, spec: str, quantization: str | None, dtype: str, generate, max_new_tokens: int = VERDICT_TOKENS):
        # `generate` is the answers' own greedy generation (answers.generate_all), so verdicts decode exactly like answers
        self.spec, self.quantization, self.dtype, self.max_new_tokens = spec, quantization, dtype, max_new_tokens
        self.generate = generate
        self.loaded = None
        self.name = spec

    def __call__(self, prompt: str) -> str:
        if self.loaded is None:  # loaded after the answers, so one model is in memory at a time
            self.loaded, _ = models.load_any(self.spec, quantization=self.quantization, dtype=self.dtype, log=err.print)
            data.ensure_chat_template(self.loaded.tokenizer)
        return self.generate(self.loaded, [{"messages": [{"role": "user", "content": prompt}]}], self.max_new_tokens)[0]["text"]


def open_judge(spec: str, model: str | None, quantization: str | None, dtype: str, generate):
    if spec.startswith(("http://", "https://")):
        return RemoteJudge(spec, model)
    if model is not None:
        raise UserError("--judge-model names the model of an OpenAI-compatible endpoint — use it with --judge http(s)://...")
    folder = Path(spec).expanduser()
    if not folder.exists() and spec not in models.BUILTINS and not (spec.count("/") == 1 and not spec.startswith((".", "/", "~"))):
        raise UserError(f"--judge: `{spec}` is not a URL, built-in alias, folder or hub id — see `finetune models`")
    return LocalJudge(spec, quantization, dtype, generate)


def question_text(messages: list[dict]) -> str:
    """The request as the judge sees it: the user's text, or the whole exchange with roles when longer."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def outcome(first: str | None, second: str | None) -> str:
    """Candidate's result from (verdict with the candidate as B, verdict with the candidate as A)."""
    if first is None or second is None:
        return "unparseable"
    a = {"B": "win", "A": "loss", "tie": "tie"}[first]
    b = {"A": "win", "B": "loss", "tie": "tie"}[second]
    return a if a == b else "tie"  # the orders disagree: position decided it, so neither answer is better


def judge_pairs(judge, prompts: list[dict], by_model: dict, template: str) -> dict:
    names = list(by_model)
    ref = names[0]
    result = {"judge": judge.name, "prompt": template, "reference_model": ref, "pairs": {}}
    for cand in names[1:]:
        verdicts, counts = [], {"win": 0, "tie": 0, "loss": 0, "unparseable": 0}
        for i, p in enumerate(prompts):
            question = question_text(p["messages"])
            r, c = by_model[ref][i]["text"], by_model[cand][i]["text"]
            raw1 = judge(render(template, question, r, c))  # candidate as B
            raw2 = judge(render(template, question, c, r))  # candidate as A
            v1, v2 = parse_verdict(raw1), parse_verdict(raw2)
            o = outcome(v1, v2)
            counts[o] += 1
            verdicts.append({"candidate_as_b": {"raw": raw1, "verdict": v1}, "candidate_as_a": {"raw": raw2, "verdict": v2},
                             "outcome": o})
        n = counts["win"] + counts["tie"] + counts["loss"]
        result["pairs"][cand] = {"verdicts": verdicts, **counts, "judged": n,
                                 "win_rate": counts["win"] / n if n else None, "win_ci95": wilson(counts["win"], n),
                                 "loss_rate": counts["loss"] / n if n else None, "loss_ci95": wilson(counts["loss"], n)}
    return result
