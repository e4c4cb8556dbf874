"""`finetune export ADAPTER --lora-gguf`: the adapter alone as a GGUF LoRA for llama.cpp's `--lora`.

llama.cpp reads a LoRA GGUF as a pair of tensors per adapted weight, `<weight name>.lora_a` (r x in) and
`.lora_b` (out x r), scaled by `adapter.lora.alpha / r`. Weight names and any reordering of output rows
come from llama.cpp's converter for the base architecture (Llama-family models reorder the rows of the
query and key projections for their rotary layout; B holds the output rows, so B is reordered the same
way). Only converter classes of the Llama family are accepted: others may split or transpose weights in
ways an adapter pair cannot follow. The pair is verified like a full file: base GGUF + LoRA GGUF in
llama.cpp against base + adapter in transformers.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError


def write(adapter: Path, base_folder: Path, dest: Path, name: str, extra: dict) -> dict:
    import gguf
    import torch
    from conversion import logger
    from conversion.llama import LlamaModel

    from finetune import merge
    from finetune.gguf_convert import add_metadata, model_class

    cls = model_class(base_folder)
    if not issubclass(cls, LlamaModel):
        raise UserError(f"--lora-gguf: the base's architecture ({cls.__name__}) is not of the Llama family — "
                        "export the merged model instead (without --lora-gguf)")
    pairs, cfg, scale = merge.lora_deltas(adapter)
    logger.setLevel("ERROR")
    m = cls(base_folder, gguf.LlamaFileType.ALL_F32, dest, model_name=name, dry_run=True)
    writer = gguf.GGUFWriter(dest, gguf.MODEL_ARCH_NAMES[m.model_arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    rank = None
    count = 0
    with torch.inference_mode():
        for weight, (a, b) in sorted(pairs.items()):
            rank = a.shape[0]
            bid = int(weight.split(".layers.")[1].split(".")[0]) if ".layers." in weight else None
            mapped = list(m.modify_tensors(b.float(), weight, bid))
            if len(mapped) != 1:
                raise UserError(f"--lora-gguf: llama.cpp stores {weight} as {len(mapped)} tensors; an adapter pair cannot follow that")
            gguf_name, b_rows = mapped[0]
            writer.add_tensor(gguf_name + ".lora_a", a.float().numpy())
            writer.add_tensor(gguf_name + ".lora_b", b_rows.float().contiguous().numpy())
            count += 1
    # llama.cpp scales by alpha / r: give it the alpha that yields this adapter's scale (rsLoRA included)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * rank))
    add_metadata(writer, extra)
    writer.add_name(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"adapted_weights": count, "rank": rank, "scale": scale}
