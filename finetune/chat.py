"""`finetune chat MODEL`: streaming chat with a base, an adapter or a merged model.

One-shot: `finetune chat adapters/quickstart --prompt "What is your name?"` prints only the answer.
Interactive: commands /reset, /system TEXT, /save FILE, /load FILE, /exit; Ctrl-C stops the current answer.
Generation settings come from flags, or from a YAML file (`--config chat.yaml`, flags win), e.g.
    temperature: 0.7
    max_new_tokens: 200
    system: You are Pico.
    history_turns: 8        # keep the last 8 exchanges
    history_tokens: 1500    # and at most 1500 prompt tokens
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from finetune import models
from finetune.errors import UserError

err = Console(stderr=True, highlight=False)


@dataclass
class Session:
    system: str | None = None
    turns: list[dict] = field(default_factory=list)
    dropped: int = 0  # turns dropped so far to fit the history window

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns


class Settings(BaseModel):
    """Generation settings of `finetune chat`, from --config YAML and flags (flags win)."""

    model_config = ConfigDict(extra="forbid")
    system: str | None = None
    temperature: float | None = Field(default=None, ge=0, description="0 means greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    max_new_tokens: int = Field(default=256, ge=1)
    seed: int | None = None
    history_turns: int | None = Field(default=None, ge=0, description="keep at most this many past user/assistant exchanges")
    history_tokens: int | None = Field(default=None, ge=1, description="keep the prompt within this many tokens")


def settings(config: Path | None, flags: dict) -> Settings:
    tree: dict = {}
    if config is not None:
        import yaml

        if not config.is_file():
            raise UserError(f"--config {config}: file not found")
        try:
            tree = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--config {config}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise UserError(f"--config {config}: expected keys such as temperature: 0.7, max_new_tokens: 200")
    tree.update({k: v for k, v in flags.items() if v is not None})
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        where = f"--config {config}" if config else "options"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"{where}: {problems} — allowed keys: {', '.join(Settings.model_fields)}") from None


def fit_history(tokenizer, session: Session, context: int, reserve: int, *, max_turns: int | None = None,
                max_tokens: int | None = None) -> list[dict]:
    """Drop the oldest turns (whole user/assistant exchanges) until the prompt plus the answer fits the context,
    and the history window (`max_turns` past exchanges, `max_tokens` prompt tokens) holds; the system prompt
    and the newest user turn always stay. Returns the messages; `session.dropped` counts what went."""
    limit = context - reserve if max_tokens is None else min(context - reserve, max_tokens)
    if max_turns is not None:
        past = len(session.turns) - 1  # every turn before the newest user message
        extra = past - 2 * max_turns
        if extra > 0:
            session.dropped += extra
            del session.turns[:extra]
    while True:
        msgs = session.messages()
        n = len(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
        if n <= limit or len(session.turns) <= 1:
            return msgs
        drop = 2 if len(session.turns) > 2 and session.turns[1]["role"] == "assistant" else 1
        session.dropped += drop
        del session.turns[:drop]


def load_conversation(path: Path) -> Session:
    """Read a conversation saved by /save (a list of messages) or by the web page ({"messages": [...]})."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    msgs = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                             and isinstance(m.get("content"), str) for m in msgs):
        raise UserError(f"{path}: expected a list of {{role: system|user|assistant, content: text}} messages")
    system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
    return Session(system=system, turns=[dict(role=m["role"], content=m["content"]) for m in msgs if m["role"] != "system"])


def generation_config(loaded: models.Loaded, folder: Path | None, opts: dict):
    """Defaults from the model's saved generation config; the chat template's end-of-turn always stops."""
    from transformers import GenerationConfig

    from finetune.turns import end_of_turn_ids

    gc = None
    if folder is not None and (folder / "generation_config.json").is_file():
        gc = GenerationConfig.from_pretrained(folder)
    gc = gc or GenerationConfig.from_dict(loaded.model.generation_config.to_dict())
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id] if gc.eos_token_id is not None else []
    gc.eos_token_id = list(dict.fromkeys(eos + end_of_turn_ids(loaded.tokenizer)))
    gc.pad_token_id = loaded.tokenizer.pad_token_id
    gc.max_new_tokens = opts["max_new_tokens"]
    for key in ("top_p", "top_k", "repetition_penalty"):
        if opts.get(key) is not None:
            setattr(gc, key, opts[key])
    if opts.get("temperature") is not None:
        if opts["temperature"] == 0:
            gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
        else:
            gc.do_sample, gc.temperature = True, opts["temperature"]
    return gc


def generate(loaded: models.Loaded, messages: list[dict], gc, *, stream=None, stop: threading.Event | None = None) -> dict:
    """Generate one answer; `stream(text)` receives text as it is produced. Returns text and timings."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    tok = loaded.tokenizer
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    input_ids = torch.tensor([ids], device=loaded.model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return bool(stop is not None and stop.is_set())

    result: dict = {}

    def work():
        try:
            with torch.inference_mode():
                result["out"] = loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                      generation_config=gc, streamer=streamer,
                                                      stopping_criteria=StoppingCriteriaList([Stop()]))
        except Exception as exc:  # surfaced in the main thread
            result["error"] = exc
            streamer.end()

    start = time.perf_counter()
    first = None
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    for piece in streamer:
        if piece and first is None:
            first = time.perf_counter() - start
        if stream and piece:
            stream(piece)
    thread.join()
    if "error" in result:
        raise result["error"]
    total = time.perf_counter() - start
    new = result["out"][0, input_ids.shape[1]:].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    decode_time = max(total - (first or 0), 1e-9)
    return {"answer": text.strip(), "prompt_tokens": len(ids), "completion_tokens": len(new),
            "time_to_first_token_s": round(first or total, 4), "tokens_per_s": round(max(len(new) - 1, 0) / decode_time, 2),
            "total_s": round(total, 4)}


def _stats_line(r: dict) -> None:
    err.print(f"[dim]{r['completion_tokens']} tokens · {r['tokens_per_s']} tok/s · first token {r['time_to_first_token_s'] * 1000:.0f} ms[/]")


def run(model: str, *, prompt, system, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed,
        quantization, compare, as_json, config: Path | None = None, history_turns: int | None = None,
        history_tokens: int | None = None) -> None:
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if temperature is not None and temperature < 0:
        raise UserError("--temperature must be 0 (greedy) or more")
    st = settings(config, dict(system=system, temperature=temperature, top_p=top_p, top_k=top_k,
                               repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
                               history_turns=history_turns, history_tokens=history_tokens))
    if prompt == "-" or (prompt is None and not sys.stdin.isatty() and as_json):
        prompt = sys.stdin.read().strip()
    if as_json and prompt is None:
        raise UserError("--json needs a one-shot prompt: --prompt TEXT or a prompt on standard input")
    from finetune import llamacpp

    if llamacpp.is_gguf_file(model):  # a GGUF runs in llama.cpp itself, as it will be used
        if compare or quantization:
            raise UserError("--compare and --quantization do not apply to a .gguf file (its weights are already quantized)")
        llamacpp.chat(Path(model), prompt=prompt, system=system, temperature=temperature, top_p=top_p, top_k=top_k,
                      repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed, as_json=as_json)
        return
    loaded, adapter = models.load_any(model, quantization=quantization, log=err.print)
    if compare and adapter is None:
        raise UserError(f"--compare needs an adapter folder, and `{model}` is not one")
    if st.seed is not None:
        from transformers import set_seed

        set_seed(st.seed)
    from finetune.data import ensure_chat_template

    ensure_chat_template(loaded.tokenizer)
    folder = Path(adapter["folder"]) if adapter else (Path(model) if Path(model).is_dir() else None)
    gc = generation_config(loaded, folder, st.model_dump())
    context = getattr(loaded.model.config, "max_position_embeddings", 4096) or 4096
    session = Session(system=st.system)

    def fit():
        return fit_history(loaded.tokenizer, session, context, st.max_new_tokens, max_turns=st.history_turns,
                           max_tokens=st.history_tokens)

    if prompt is not None:
        session.turns.append({"role": "user", "content": prompt})
        msgs = fit()
        if compare:
            with loaded.model.disable_adapter():
                base_r = generate(loaded, msgs, gc)
            tuned = generate(loaded, msgs, gc)
            if as_json:
                print(json.dumps({"base": base_r, "adapter": tuned}))
            else:
                from rich.table import Table

                t = Table(show_lines=True)
                t.add_column(f"base ({adapter['base']})")
                t.add_column(f"adapter ({adapter['folder']})")
                t.add_row(base_r["answer"], tuned["answer"])
                Console().print(t)
            return
        if as_json:
            print(json.dumps(generate(loaded, msgs, gc)))
            return
        r = generate(loaded, msgs, gc, stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        _stats_line(r)
        return
    interactive(loaded, session, gc, fit)


def interactive(loaded, session: Session, gc, fit) -> None:
    err.print("[dim]chat: /reset, /system TEXT, /save FILE, /load FILE, /exit · Ctrl-C stops an answer[/]")
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    tty = sys.stdin.isatty()
    try:
        while True:
            try:
                line = input("you> " if tty else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                if cmd in ("/exit", "/quit"):
                    break
                if cmd == "/reset":
                    session.turns.clear()
                    err.print("[dim]history cleared[/]")
                elif cmd == "/system":
                    session.system = arg.strip() or None
                    session.turns.clear()
                    err.print(f"[dim]system prompt {'set' if session.system else 'removed'}; history cleared[/]")
                elif cmd == "/save":
                    if not arg.strip():
                        err.print("[red]usage: /save FILE[/]")
                        continue
                    try:
                        Path(arg.strip()).write_text(json.dumps(session.messages(), indent=2) + "\n")
                    except OSError as exc:
                        err.print(f"[red]cannot save to {arg.strip()}: {exc.strerror}[/]")
                        continue
                    err.print(f"[dim]saved to {arg.strip()}[/]")
                elif cmd == "/load":
                    if not arg.strip():
                        err.print("[red]usage: /load FILE[/]")
                        continue
                    try:
                        loaded_session = load_conversation(Path(arg.strip()))
                    except UserError as exc:
                        err.print(f"[red]{exc}[/]")
                        continue
                    session.system, session.turns, session.dropped = loaded_session.system, loaded_session.turns, 0
                    err.print(f"[dim]loaded {len(session.turns)} messages from {arg.strip()}[/]")
                else:
                    err.print(f"[red]unknown command {cmd}[/] — /reset, /system TEXT, /save FILE, /load FILE, /exit")
                continue
            session.turns.append({"role": "user", "content": line})
            before = session.dropped
            msgs = fit()
            if session.dropped > before:  # say so rather than forget silently
                err.print(f"[dim]({session.dropped - before} older messages left out to fit the history window)[/]")
            stop.clear()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            print("assistant> " if tty else "", end="", flush=True)
            r = generate(loaded, msgs, gc, stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()), stop=stop)
            signal.signal(signal.SIGINT, previous)
            print(flush=True)
            if stop.is_set():
                err.print("[dim](answer stopped)[/]")
            session.turns.append({"role": "assistant", "content": r["answer"]})
            _stats_line(r)
    finally:
        signal.signal(signal.SIGINT, previous)
