"""Where an assistant turn ends: the token ids generation must stop at, for training output and chat alike."""

from __future__ import annotations

from finetune import data


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the last trained token of a rendered answer, plus EOS."""
    ids, labels = data.tokenize_conversation(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "completions")
    trained = [t for t in labels if t != -100]
    out = [trained[-1]] if trained and trained[-1] in tokenizer.all_special_ids else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out
