"""GGUF files in `finetune eval --prompts` and `--tasks`: answers and harness scores computed in llama.cpp itself.

Answers: the prompt is rendered to token ids by the file's chat template through transformers (the
template `finetune export` copied from the merged folder), so a GGUF column answers exactly the token ids
the transformers columns answer; greedy continuation in llama.cpp with the transformers columns' stop rule.
Benchmarks: an lm-evaluation-harness model (`TemplateLM`) whose log-likelihoods and greedy generations
come from llama.cpp; the harness builds the requests, tokenizes them as it does for HFLM, aggregates and
reports. The harness's own `gguf` model is not used: it reads prompt log-probabilities from `/v1/completions`
with `echo`, which llama.cpp's server refuses or answers with the generated token's only (ggml-org/llama.cpp
issue 27174; the echo PRs 15189 and 17935 are unmerged); the grammar technique of llamacpp.py gives them.
"""

from __future__ import annotations

from pathlib import Path

from finetune import data, llamacpp
from finetune.errors import UserError


def metadata(path: Path, key: str):
    from gguf import GGUFReader

    field = GGUFReader(str(path)).get_field(key)
    return None if field is None else field.contents()


def stop_ids(path: Path, tok) -> list[int]:
    """The transformers columns' stop rule (answers.generate_all: the generation config's EOS ids and the
    template's end of turn): export writes the generation config's stop tokens as `finetune.stop_tokens`."""
    vocab = tok.get_vocab()
    named = [vocab[t] for t in metadata(path, "finetune.stop_tokens") or [] if t in vocab]
    return list(dict.fromkeys(named + data.end_of_turn_ids(tok)))


def greedy(llm, ids: list[int], n: int, stop: list[int]) -> list[int]:
    """Greedy tokens after `ids`, at most n, ending with the first token of `stop` (included).

    llama.cpp ends at its own end-of-generation tokens, which it does not return; the set can differ from
    `stop` (it also ends at e.g. `<|endoftext|>`). Where it ended at a token outside `stop`, that token is
    appended (greedy: the most likely one) and generation goes on, so the stop rule is the transformers one."""
    new: list[int] = []
    while len(new) < n:
        got, ended = llm.complete(ids + new, n - len(new))
        cut = next((i for i, t in enumerate(got) if t in stop), None)
        if cut is not None:  # a stop token llama.cpp does not treat as end of generation
            return new + got[:cut + 1]
        new += got
        if not ended:
            break  # ran into max_new_tokens
        top = llm.top_logprobs(ids + new, 1)
        new.append(max(top, key=top.__getitem__))
        if new[-1] in stop:
            break
    return new


def generate_all(path: Path, prompts: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy answers from a GGUF, in the shape of answers.generate_all."""
    tok = llamacpp.tokenizer(path)
    data.ensure_chat_template(tok)
    stop = stop_ids(path, tok)
    # the file's template rendered by transformers, not llama.cpp's chat route (`jinja=True`): the route renders
    # it with another Jinja engine and its own BOS rule, and the columns would no longer start from the same ids
    prompt_ids = [tok.apply_chat_template(p["messages"], tokenize=True, add_generation_prompt=True, return_dict=False)
                  for p in prompts]
    out = []
    with llamacpp.Llama(path, n_ctx=max(len(x) for x in prompt_ids) + max_new_tokens + 1) as llm:
        for ids in prompt_ids:
            new = greedy(llm, ids, max_new_tokens, stop)
            out.append({"text": tok.decode(new, skip_special_tokens=True).strip(), "tokens": len(new),
                        "stopped": bool(new) and new[-1] in stop})
    return out


def check_tasks(spec: str, tasks: dict) -> None:
    """Refuse, before anything loads, what the GGUF model cannot do the harness's way: it answers greedily."""
    for name, task in tasks.items():
        kwargs = getattr(getattr(task, "config", None), "generation_kwargs", None) or {}
        if getattr(task, "OUTPUT_TYPE", None) == "generate_until" and (kwargs.get("do_sample") or kwargs.get("temperature")):
            raise UserError(f"--tasks: task `{name}` samples its answers (do_sample / temperature); a GGUF file ({spec}) "
                            "answers greedily here — run it on the merged folder the GGUF was exported from")


def harness_model(path: Path):
    """An lm-evaluation-harness model that scores with llama.cpp running `path`."""
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text

    class LlamaCppLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = llamacpp.tokenizer(path)
            arch = metadata(path, "general.architecture")
            self.max_length = int(metadata(path, f"{arch}.context_length") or 2048)  # as HFLM reads the model's

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def tokenizer_name(self) -> str:
            return str(path).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            # HFLM's rule: the tokenizer's default special tokens, except on text that already starts with BOS
            if add_special_tokens is None:
                add_special_tokens = not has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id))
            return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            # as HFLM: the last max_length + 1 tokens of context + continuation, the continuation's tokens scored
            if not requests:
                return []
            seqs = [((ctx + cont)[-(self.max_length + 1):], len(cont)) for _, ctx, cont in requests]
            out = []
            with llamacpp.Llama(path, n_ctx=max(len(s) for s, _ in seqs)) as llm:
                for seq, n in seqs:
                    scored = llm.scored(seq, len(seq) - n)
                    out.append((sum(lp for lp, _ in scored), all(top == t for (_, top), t in zip(scored, seq[-n:]))))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            # as HFLM: each text in disjoint windows of the model's length, each token scored once
            windows, owner = [], []
            for i, (string,) in enumerate(r.args for r in requests):
                for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                    windows.append((None, ctx, cont))
                    owner.append(i)
            sums = [0.0] * len(requests)
            for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
                sums[i] += ll
            return sums

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            # as HFLM: context left-truncated to leave room for max_gen_toks, greedy until the model's stop token,
            # the text cut at the first stop sequence (EOS text included) by the harness's own post-processing
            eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
            jobs = []
            for context, gen_kwargs in (r.args for r in requests):
                kw = normalize_gen_kwargs(gen_kwargs, 256)
                n = kw["max_gen_toks"]
                jobs.append((self.tokenizer.encode(context)[-(self.max_length - n):], n, handle_stop_sequences(kw.get("until"), eos=eos)))
            if not jobs:
                return []
            stop = stop_ids(path, self.tokenizer)
            out = []
            with llamacpp.Llama(path, n_ctx=max(len(ids) + n for ids, n, _ in jobs)) as llm:
                for ids, n, until in jobs:
                    text = self.tokenizer.decode(greedy(llm, ids, n, stop), skip_special_tokens=True)
                    out.append(postprocess_generated_text(text, until, None))
            return out

    return LlamaCppLM()
