"""The default serving engine: one base loaded once with every adapter on it, plus merged or other
full models, and one worker thread that batches waiting requests into `model.generate` calls.

Requests for different adapters of the same base share a batch through PEFT's `adapter_names=` (rows
for the base use PEFT's "__base__"). Each row stops on its own (its end-of-turn tokens, its stop
strings, its max_tokens, or its client going away) through a per-row stopping criterion; the batch's
`generate` ends when every row has stopped. Requests that arrive while a batch runs wait for the next
one (static batching: measured in bench/ against one request at a time).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import models
from finetune.errors import UserError

BASE_ROW = "__base__"  # PEFT's name for "no adapter" inside a mixed batch


@dataclass
class Served:
    """One name a request can select: the base, an adapter on it, or a separate full model."""

    name: str
    group: Group
    adapter: str | None  # PEFT adapter name, or None for the group's plain model
    tokenizer: Any
    eos_ids: list[int]
    context: int
    source: str  # what the user passed
    # one fast tokenizer is not safe to use from the request handlers and the generate thread at once
    # (the Rust side raises "Already borrowed"): both sides take this lock
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Group:
    """One loaded model and the adapters attached to it."""

    loaded: models.Loaded
    has_adapters: bool = False


@dataclass
class Job:
    served: Served
    prompt_ids: list[int]
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    stop: list[str]
    seed: int | None
    emit: Callable[[dict], None]  # called from the worker thread with {"text"} deltas and a final {"done"}
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    finish: str | None = None

    def key(self) -> tuple:
        """Jobs with equal keys can share one generate call."""
        sampling = ("greedy",) if self.temperature == 0 else ("sample", self.temperature, self.top_p)
        if self.seed is not None:  # a seeded answer must not depend on who else was in the batch
            sampling = ("seeded", id(self))
        return (id(self.served.group), tuple(self.eos_ids()), sampling)

    def eos_ids(self) -> list[int]:
        return self.served.eos_ids


def _name_for(spec: str) -> str:
    p = Path(spec)
    return p.name if p.exists() else spec


def parse_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` gives a model its request name; a plain PATH is named after its folder."""
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
        if name and path:
            return name, path
    return None, spec


def serving_dtype(dtype: str) -> str:
    """`auto` serves in fp32 on a CPU. Measured on the built-in base (docs/benchmarks.md, Serving): in bf16 a
    left-padded row of a batch computes attention over its padding-shifted keys in a different order, the
    rounding differs by one bf16 step, and after 30 layers greedy answers flipped within their first tokens
    (rows without padding stayed bit-identical); in fp32 batched answers equal one-at-a-time answers."""
    import torch

    return "fp32" if dtype == "auto" and not torch.cuda.is_available() else dtype


def cpu_threads(requested: int | None) -> int:
    """Threads for generation on a CPU: the user's number, else the training rule (speed.cpu_threads: one per core
    other processes leave free). Decoding a small model is hundreds of tiny ops per token, each ending in a
    barrier of all threads; on busy cores one thread measured 4-15x faster than two (docs/benchmarks.md)."""
    import torch

    from finetune import speed

    return requested or speed.cpu_threads() or torch.get_num_threads()


class Engine:
    def __init__(self, specs: list[str], *, dtype: str = "auto", quantization: str | None = None,
                 max_batch: int = 8, batch_window_s: float = 0.05, threads: int | None = None, log=print):
        self.max_batch, self.batch_window_s, self.log = max_batch, batch_window_s, log
        self.models: dict[str, Served] = {}
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stopping = threading.Event()
        self.dtype = serving_dtype(dtype)
        self.threads = threads
        self.stats = {"batches": 0, "rows": 0, "cancelled": 0, "dtype": self.dtype}
        self._load(specs, self.dtype, quantization)
        if not any(s.group.loaded.device == "cuda" for s in self.models.values()):
            self.threads = cpu_threads(threads)
            self.stats["threads"] = self.threads
        self.thread = threading.Thread(target=self._loop, name="finetune-generate", daemon=True)

    # ---- loading ------------------------------------------------------------------------------------

    def _load(self, specs: list[str], dtype: str, quantization: str | None) -> None:
        from finetune.chat import generation_config
        from finetune.data import ensure_chat_template

        adapters: dict[str, list[tuple[str | None, Path, dict]]] = {}  # base spec -> its adapters
        plain: list[tuple[str | None, str]] = []
        for spec in specs:
            name, path = parse_spec(spec)
            folder = Path(path).expanduser()
            info = models.adapter_info(folder) if folder.is_dir() else None
            if info is None:
                plain.append((name, path))
            else:
                if not info["base"]:
                    raise UserError(f"{folder}: adapter_config.json names no base model — serve it as NAME=PATH next to its base")
                adapters.setdefault(info["base"], []).append((name, folder, info))
        for base_spec in adapters:  # a base passed on its own is the one the adapters attach to
            plain = [(n, p) for n, p in plain if p != base_spec]

        def register(name: str, served: Served) -> None:
            if name in self.models:
                raise UserError(f"two models are both called `{name}` — name them apart with NAME=PATH")
            for other in self.models.values():  # names sharing one tokenizer object share its lock
                if other.tokenizer is served.tokenizer:
                    served.lock = other.lock
            self.models[name] = served

        def context_of(loaded) -> int:
            return int(getattr(loaded.model.config, "max_position_embeddings", 0) or 4096)

        for base_spec, items in adapters.items():
            _, first, _ = items[0]
            loaded, _info = models.load_any(str(first), quantization=quantization, dtype=dtype, log=self.log)
            group = Group(loaded, has_adapters=True)
            base_tok = models.load_tokenizer(loaded.base.path)
            ensure_chat_template(base_tok)
            base_gc = generation_config(loaded, Path(loaded.base.path) if Path(loaded.base.path).is_dir() else None,
                                        {"max_new_tokens": 1})
            register(_name_for(base_spec), Served(_name_for(base_spec), group, None, base_tok, list(base_gc.eos_token_id),
                                                  context_of(loaded), base_spec))
            for i, (name, folder, _) in enumerate(items):
                adapter_name = "default" if i == 0 else f"a{i}"
                if i:
                    try:
                        loaded.model.load_adapter(str(folder), adapter_name=adapter_name)
                    except (RuntimeError, ValueError) as exc:
                        raise UserError(f"adapter {folder} does not fit base `{base_spec}` ({str(exc).splitlines()[0][:200]})") from None
                tok = models.load_tokenizer(str(folder)) if (folder / "tokenizer_config.json").is_file() else base_tok
                ensure_chat_template(tok)
                gc = generation_config(loaded, folder, {"max_new_tokens": 1})
                nm = name or folder.name
                register(nm, Served(nm, group, adapter_name, tok, list(gc.eos_token_id), context_of(loaded), str(folder)))
        for name, path in plain:
            loaded, _ = models.load_any(path, quantization=quantization, dtype=dtype, log=self.log)
            ensure_chat_template(loaded.tokenizer)
            folder = Path(path) if Path(path).is_dir() else None
            gc = generation_config(loaded, folder, {"max_new_tokens": 1})
            nm = name or _name_for(path)
            register(nm, Served(nm, Group(loaded), None, loaded.tokenizer, list(gc.eos_token_id), context_of(loaded), path))

    # ---- requests -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def begin_shutdown(self) -> None:
        """Running answers end at their next token and queued ones get an error, so that open streams close by
        themselves within the server's graceful-shutdown time."""
        self.stopping.set()
        self.queue.put(None)

    def stop(self, timeout_s: float = 60) -> None:
        """Stop generating (a running batch ends at its next step) and wait for the worker, so that the
        interpreter never shuts down underneath a running torch op."""
        self.stopping.set()
        self.queue.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout_s)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def _loop(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        pending: list[Job] = []
        try:
            self._serve(pending)
        finally:  # shutting down: whoever still waits gets an answer instead of waiting for ever
            while True:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    pending.append(job)
            for j in pending:
                if j.finish is None:
                    j.finish = "error"
                    j.emit({"error": "the server is shutting down"})

    def _serve(self, pending: list[Job]) -> None:
        while not self.stopping.is_set():
            if not pending:
                job = self.queue.get()
                if job is None:
                    return
                pending.append(job)
                # a short window lets clients that start together share the first batch
                deadline = time.monotonic() + self.batch_window_s
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        job = self.queue.get(timeout=left)
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    pending.append(job)
            while True:  # whatever queued up meanwhile joins the next batch
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                pending.append(job)
            pending[:] = [j for j in pending if not self._drop_cancelled(j)]
            if not pending:
                continue
            key = pending[0].key()
            batch = [j for j in pending if j.key() == key][: self.max_batch]
            pending[:] = [j for j in pending if j not in batch]
            try:
                self._run(batch)
            except Exception as exc:  # one failing batch must not take the server down
                for j in batch:
                    if j.finish is None:
                        j.finish = "error"
                        j.emit({"error": f"{type(exc).__name__}: {exc}"})

    def _drop_cancelled(self, job: Job) -> bool:
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            job.finish = "cancelled"
            return True
        return False

    def _run(self, batch: list[Job]) -> None:
        import torch
        from transformers import (
            GenerationConfig,
            StoppingCriteria,
            StoppingCriteriaList,
        )
        from transformers.generation.streamers import BaseStreamer

        group = batch[0].served.group
        model = group.loaded.model
        pad = batch[0].served.tokenizer.pad_token_id
        pad = pad if pad is not None else batch[0].eos_ids()[0]
        width = max(len(j.prompt_ids) for j in batch)
        # left padding: every row's next token lands in the same column
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch], device=model.device)
        first = batch[0]
        gc = GenerationConfig(max_new_tokens=max(j.max_tokens for j in batch), eos_token_id=first.eos_ids(), pad_token_id=pad,
                              do_sample=first.temperature > 0)
        if first.temperature > 0:
            gc.temperature, gc.top_p, gc.top_k = first.temperature, first.top_p, 0
        if first.seed is not None:
            torch.manual_seed(first.seed)
        stopping = self.stopping
        eos = set(first.eos_ids())

        class Rows(BaseStreamer):
            """Receives each step's new tokens (one per row) and feeds every row's own stream."""

            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate hands over the prompt first
                    self.prompt_seen = True
                    return
                for job, tok in zip(batch, value.reshape(-1).tolist()):
                    if job.finish is None:
                        step(job, tok)

            def end(self):
                for job in batch:
                    if job.finish is None:
                        finish(job, "cancelled" if job.cancelled.is_set() or stopping.is_set() else "length")

        class RowsDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                for job in batch:
                    if job.finish is None and (job.cancelled.is_set() or stopping.is_set()):
                        finish(job, "cancelled")
                return torch.tensor([job.finish is not None for job in batch], device=input_ids.device)

        def step(job: Job, tok: int) -> None:
            if tok in eos:
                job.tokens.append(tok)
                return finish(job, "stop", counted=True)
            job.tokens.append(tok)
            with job.served.lock:
                job.text = job.served.tokenizer.decode(job.tokens, skip_special_tokens=True)
            for s in job.stop:
                at = job.text.find(s)
                if at >= 0:
                    job.text = job.text[:at]
                    return finish(job, "stop")
            if len(job.tokens) >= job.max_tokens:
                return finish(job, "length")
            # hold back an incomplete character and anything that may be the start of a stop string
            hold = max((len(s) - 1 for s in job.stop), default=0)
            ready = len(job.text) - hold
            while ready > job.sent and job.text[ready - 1] == "\ufffd":
                ready -= 1
            if ready > job.sent:
                job.emit({"text": job.text[job.sent:ready]})
                job.sent = ready

        def finish(job: Job, reason: str, counted: bool = False) -> None:
            job.finish = reason
            if reason == "cancelled" and stopping.is_set():
                reason = job.finish = "length"  # cut short by the shutdown: the client still gets a proper end
            elif reason == "cancelled":
                self.stats["cancelled"] += 1
                self.log(f"request for {job.served.name} stopped: client went away after {len(job.tokens)} tokens")
            if len(job.text) > job.sent and reason != "cancelled":
                job.emit({"text": job.text[job.sent:]})
                job.sent = len(job.text)
            job.emit({"done": reason, "completion_tokens": len(job.tokens)})

        kwargs: dict[str, Any] = {}
        context = contextlib.nullcontext()
        names = {j.served.adapter for j in batch}
        if group.has_adapters and len(names) > 1:
            kwargs["adapter_names"] = [j.served.adapter or BASE_ROW for j in batch]
        elif group.has_adapters and names == {None}:
            context = model.disable_adapter()
        elif group.has_adapters:  # one adapter for the whole batch: the plain (faster) LoRA path
            model.set_adapter(names.pop())
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        streamer = Rows()
        with torch.inference_mode(), context:
            model.generate(input_ids=ids, attention_mask=mask, generation_config=gc, streamer=streamer,
                           stopping_criteria=StoppingCriteriaList([RowsDone()]), **kwargs)
        streamer.end()
