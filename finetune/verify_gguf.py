"""Check exported GGUF files in a real llama.cpp against the transformers model they came from.

For each file: (a) chat-rendered prompts tokenize to the same ids in llama.cpp as in transformers;
(b) greedy continuations match token for token (a divergence where transformers' two best logits are
nearly equal is a tie-break, not an error); (c) perplexity of the same text, scored in the same windows,
agrees within the file type's tolerance. Types below 8 bits are reported, not judged: a small model
loses too much at 4-5 bits for any fixed bound to mean anything.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from finetune.merge import PROMPTS

err = Console(stderr=True, highlight=False)
# relative perplexity difference; "lora" is an f32 adapter on the f16 base
PPL_TOLERANCE = {"f32": 0.005, "f16": 0.005, "bf16": 0.005, "q8_0": 0.02, "lora": 0.005}
GREEDY_EXACT = ("f32", "f16", "bf16", "lora")  # types whose greedy output must match transformers
GREEDY_TOKENS = 24
# logit gap under which either of two tokens is a correct greedy choice: a 16-bit file rounds weights by
# up to 2^-11 (f16) or 2^-8 (bf16) of their size, which moves logits by a few hundredths
TIE = 0.1
N_CTX = 512
TEXT = (
    "The sun is a star at the centre of the solar system. It is a nearly perfect ball of hot plasma, heated to "
    "incandescence by nuclear fusion reactions in its core. The sun radiates this energy from its surface mainly as "
    "visible light and infrared radiation. It is by far the most important source of energy for life on Earth. "
    "The moon is the only natural satellite of the Earth. It orbits at an average distance of about 384,000 "
    "kilometres, and it always shows the same face to the Earth because its rotation is locked to its orbit. "
    "Planets are large bodies that orbit a star. The eight planets of the solar system are Mercury, Venus, Earth, "
    "Mars, Jupiter, Saturn, Uranus and Neptune. The four inner planets are rocky, the outer planets are giants made "
    "mostly of gas and ice. Comets are small icy bodies that release gas and dust when they pass close to the sun."
)


def reference(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import models
    from finetune.data import ensure_chat_template

    tok = models.load_tokenizer(str(folder))
    ensure_chat_template(tok)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tok


def hf_greedy(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    """Greedy tokens up to n, ending with the first end-of-turn token as llama.cpp's generation does."""
    import torch

    seq = list(ids)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([seq]), use_cache=True)
        for _ in range(n):
            nxt = int(out.logits[0, -1].float().argmax())
            seq.append(nxt)
            if nxt in stop:
                break
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return seq[len(ids):]


def hf_logprobs(model, ids: list[int]) -> list[float]:
    import torch

    from finetune.llamacpp import windows

    out: list[float] = []
    with torch.inference_mode():
        for w in windows(ids, N_CTX):
            logp = model(input_ids=torch.tensor([w])).logits[0].float().log_softmax(-1)
            out += logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].tolist()
    return out


def compare_greedy(model, llm, ids: list[int], ref: list[int], got: list[int], stop: set[int]) -> tuple[int, float | None]:
    """Tokens matched before the first difference, and there the smaller of the two models' logit gaps
    between the two tokens chosen (None when there is no difference). Any end-of-turn token matches any other."""
    import torch

    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b and not (a in stop and b in stop):
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids + ref[:i]])).logits[0, -1].float()
            hf_gap = float(logits[a] - logits[b])
            theirs = {t: lp for t, lp in llm.top_logprobs(ids + ref[:i], 20).items()}
            llama_gap = theirs[b] - theirs[a] if a in theirs and b in theirs else float("inf")
            return i, min(hf_gap, llama_gap)
    return min(len(ref), len(got)), None


def verify_all(folder: Path, staging: Path, files: list[dict], stop_tokens: list[str]) -> None:
    """Add a `verification` entry to each file's report entry."""
    from finetune.llamacpp import Llama, perplexity

    model, tok = reference(folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stop = {tok.convert_tokens_to_ids(t) for t in stop_tokens}
    refs = [hf_greedy(model, ids, GREEDY_TOKENS, stop) for ids in prompt_ids]
    text_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
        text_ids = [tok.bos_token_id, *text_ids]
    ppl_hf = perplexity(hf_logprobs(model, text_ids))
    for entry in files:
        err.print(f"checking {entry['file']} in llama.cpp")
        lora = staging / entry["file"] if "base_file" in entry else None  # base GGUF + LoRA GGUF, as llama.cpp's --lora
        with Llama(staging / entry.get("base_file", entry["file"]), n_ctx=N_CTX, lora=lora) as llm:
            tokens_ok = all(llm.tokenize(p) == ids for p, ids in zip(prompts, prompt_ids))
            matched = total = 0
            gaps: list[float] = []
            all_ok = True
            for ids, ref in zip(prompt_ids, refs):
                got, ended = llm.complete(ids, GREEDY_TOKENS)
                if ended:  # llama.cpp does not return the end-of-generation token it stopped at: its top token there
                    got.append(max(llm.top_logprobs(ids + got, 1).items(), key=lambda kv: kv[1])[0])
                n, gap = compare_greedy(model, llm, ids, ref, got, stop)
                # after a near-tie the two continuations are different texts: the comparison ends there
                matched += n
                total += min(len(ref), len(got))  # a file may end a turn earlier at a token llama.cpp treats as end of generation
                if gap is not None:
                    gaps.append(round(gap, 4))
                all_ok &= gap is None or gap < TIE
            ppl = perplexity(llm.token_logprobs(text_ids))
        q = entry["quant"]
        rel = ppl / ppl_hf - 1
        v = {"tokenization_match": tokens_ok, "greedy_matched": matched, "greedy_total": total, "greedy_divergence_logit_gaps": gaps,
             "ppl_llamacpp": ppl, "ppl_transformers": ppl_hf, "ppl_rel_diff": rel, "ppl_tokens": len(text_ids) - 1}
        if q in PPL_TOLERANCE:
            v["tolerance"] = {"ppl_rel_diff": PPL_TOLERANCE[q], "greedy": "exact up to near-ties" if q in GREEDY_EXACT else "reported"}
            v["passed"] = tokens_ok and abs(rel) <= PPL_TOLERANCE[q] and (all_ok if q in GREEDY_EXACT else True)
        else:
            v["passed"] = None if tokens_ok else False  # below 8 bits: numbers reported, tokenization still judged
        entry["verification"] = v
