"""`finetune export`: GGUF files that llama.cpp loads and that match transformers; metadata; Modelfile; refusals."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import build_model, build_tokenizer, toy_rows, write_jsonl, write_recipe

pytest.importorskip("xllamacpp")
pytest.importorskip("libgguf")
pytest.importorskip("conversion")


def fields(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")} | {
        "_types": {t.name: t.tensor_type.name for t in r.tensors}}


def test_tiny_export_verified_in_llamacpp(cli, tmp_path, tiny):
    out = tmp_path / "gguf"
    res = cli("export", tiny, "--out", out, "--quant", "f16", "--quant", "q8_0", "--quant", "q4_k_m")
    assert res.code == 0, res.text
    report = json.loads((out / "export_report.json").read_text())
    by = {f["quant"]: f for f in report["files"]}
    for q in ("f16", "q8_0"):
        v = by[q]["verification"]
        assert v["passed"] is True and v["tokenization_match"] is True
        assert abs(v["ppl_rel_diff"]) <= {"f16": 0.005, "q8_0": 0.02}[q]
    # f16 follows transformers token for token, except where the two best tokens are within rounding of each other
    assert all(g < 0.1 for g in by["f16"]["verification"]["greedy_divergence_logit_gaps"])
    assert by["q4_k_m"]["verification"]["passed"] is None  # reported, not judged
    # rows of 32 values cannot hold a 256-value k-quant block: llama.cpp's fallback types are used
    assert set(by["q4_k_m"]["tensor_types"]) <= {"F32", "Q5_0", "Q8_0"}
    meta = fields(out / "gguf-f16.gguf")
    assert meta["tokenizer.chat_template"] == (tiny / "chat_template.jinja").read_text()
    assert meta["tokenizer.ggml.eos_token_id"] == 3 and meta["finetune.stop_tokens"] == ["<|im_end|>"]
    assert meta["general.name"] == "gguf" and meta["_types"]["blk.0.attn_q.weight"] == "F16"
    assert fields(out / "gguf-q8_0.gguf")["_types"]["blk.0.attn_q.weight"] == "Q8_0"
    mf = (out / "gguf-q8_0.Modelfile").read_text()
    assert mf.startswith("FROM ./gguf-q8_0.gguf") and 'PARAMETER stop "<|im_end|>"' in mf
    assert "ollama create gguf-q8-0 -f" in res.out and (out / "README.md").is_file()
    assert not list(tmp_path.glob(".gguf.*"))  # no staging left behind


def test_kquants_on_256_wide_rows(tmp_path):
    """With rows of 256 values the real k-quant types are written, following llama.cpp's choice of which
    tensors get more bits, and llama.cpp runs the file."""
    from finetune import export

    folder = tmp_path / "wide"
    folder.mkdir()
    build_model(folder, build_tokenizer(folder), hidden=256)
    export.run(str(folder), tmp_path / "k", quants=["q4_k_m", "q6_k"], verify_files=True)
    q4 = fields(tmp_path / "k" / "k-q4_k_m.gguf")
    assert q4["general.file_type"] == 15  # MOSTLY_Q4_K_M
    types = q4["_types"]
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"  # last eighth: more bits
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert fields(tmp_path / "k" / "k-q6_k.gguf")["_types"]["blk.0.ffn_up.weight"] == "Q6_K"
    report = json.loads((tmp_path / "k" / "export_report.json").read_text())
    for f in report["files"]:
        assert f["verification"]["tokenization_match"] and f["verification"]["ppl_llamacpp"] > 1


def test_adapter_export_carries_base_recipe_and_system(cli, tmp_path, tiny):
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    r = write_recipe(tmp_path / "r.yaml", {
        "model": {"base": str(tiny), "quantization": "none", "dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"train": str(data), "max_length": 64, "system_prompt": "Be brief."},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 2e-2}, "output": {"dir": str(tmp_path / "ad")}})
    assert cli("sft", r).code == 0
    out = tmp_path / "ad-gguf"
    res = cli("export", tmp_path / "ad", "--out", out, "--quant", "f16", "--lora-gguf")
    assert res.code == 0, res.text
    meta = fields(out / "ad-gguf-f16.gguf")
    assert meta["finetune.base"] == str(tiny) and meta["finetune.source"] == "adapter"
    assert "Be brief." in meta["finetune.recipe"] and (out / "recipe.yaml").is_file()
    assert 'SYSTEM """Be brief."""' in (out / "ad-gguf-f16.Modelfile").read_text()
    report = json.loads((out / "export_report.json").read_text())
    assert report["origin"]["kind"] == "adapter" and report["files"][0]["verification"]["passed"] is True
    assert not (out / ".merged").exists()
    # the adapter alone as a GGUF LoRA: base GGUF + LoRA GGUF in llama.cpp match base + adapter in transformers
    lora = {f["quant"]: f for f in report["files"]}["lora"]
    assert lora["verification"]["passed"] is True and lora["verification"]["tokenization_match"]
    assert lora["adapted_weights"] == 14 and lora["rank"] == 4  # r=4 on every linear layer of 2 blocks
    meta = fields(out / "ad-gguf-lora.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)
    assert meta["_types"]["blk.0.attn_q.weight.lora_a"] == "F32" and "blk.1.ffn_down.weight.lora_b" in meta["_types"]
    mf = (out / "ad-gguf-lora.Modelfile").read_text()
    assert mf.startswith("FROM ./ad-gguf-base-f16.gguf\nADAPTER ./ad-gguf-lora.gguf")
    # the check means something only if the adapter moves the model: base alone scores the text differently
    from finetune.llamacpp import Llama, perplexity
    from finetune.verify_gguf import TEXT
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny)(TEXT, add_special_tokens=False)["input_ids"]
    with Llama(out / "ad-gguf-base-f16.gguf", n_ctx=512) as llm:
        base_ppl = perplexity(llm.token_logprobs(ids))
    assert abs(base_ppl / lora["verification"]["ppl_llamacpp"] - 1) > 0.02


# ---- Ollama's TEMPLATE against the Jinja template ----------------------------------------------------


def render_go(template: str, messages: list[dict]) -> str:
    """The part of Go's text/template that the Modelfile uses: range .Messages, if/else if eq .Role, .Content."""
    tokens = re.split(r"(\{\{.*?\}\})", template)
    out = []

    def run(i, msg, emit):
        """Run from token i up to the `else`/`end` closing this block (or the template's end); return its index."""
        while i < len(tokens):
            t = tokens[i]
            if not t.startswith("{{"):
                if emit:
                    out.append(t)
                i += 1
                continue
            action = t[2:-2].strip()
            if action == "range .Messages":
                assert messages
                for m in messages:
                    end = run(i + 1, m, emit)
                i = end + 1
            elif action.startswith("if "):
                i = run_if(i, msg, emit)
            elif action == ".Content":
                if emit:
                    out.append(msg["content"])
                i += 1
            elif action == "end" or action.startswith("else"):
                return i
            else:
                raise AssertionError(f"unsupported action {action}")
        return i

    def run_if(i, msg, emit):
        taken = False
        while True:
            action = tokens[i][2:-2].strip()
            if action == "end":
                return i + 1
            m = re.fullmatch(r'(?:else )?if eq \.Role "(\w+)"', action)
            assert m or action == "else", action
            hit = not taken and (m is None or msg["role"] == m.group(1))
            i = run(i + 1, msg, emit and hit)
            taken |= hit

    assert run(0, None, True) == len(tokens)
    return "".join(out)


def ollama_render(modelfile: str, messages: list[dict]) -> str:
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.DOTALL).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', modelfile, re.DOTALL)
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system.group(1)}, *messages]  # what Ollama does with SYSTEM
    return render_go(template, messages)


CONVO = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "my name is pico"},
         {"role": "user", "content": "how many planets"}]
DEFAULT_SYSTEM_TEMPLATE = (  # SmolLM2's shape: a default system message when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are pico.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["tiny", "default_system"])
def test_modelfile_template_renders_like_jinja(tmp_path, tiny, template):
    from transformers import AutoTokenizer

    from finetune import modelfile

    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    if template == "default_system":
        (folder / "chat_template.jinja").write_text(DEFAULT_SYSTEM_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(folder)
    parts = modelfile.derive(folder)
    assert parts.ok, parts.why
    text = modelfile.render("m.gguf", parts, ["<|im_end|>"], None, folder)
    for convo in (CONVO, [{"role": "system", "content": "Answer in one word."}, *CONVO]):
        jinja = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        assert ollama_render(text, convo) == jinja
    assert ("You are pico." in text) == (template == "default_system")


def test_template_of_another_shape_gets_no_template_line(tmp_path, tiny):
    from finetune import modelfile

    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    # the last user message is rendered differently from earlier ones: not prefix + content + suffix per role
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    parts = modelfile.derive(folder)
    assert not parts.ok
    text = modelfile.render("m.gguf", parts, ["<|im_end|>"], None, folder)
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and "# no TEMPLATE:" in text


# ---- refusals: exit 2, one message, nothing written --------------------------------------------------


def test_unknown_quant_lists_valid_types(cli, tmp_path, tiny):
    res = cli("export", tiny, "--out", tmp_path / "o", "--quant", "q3_k_s")
    assert res.code == 2 and "q3_k_s" in res.err and "q4_k_m" in res.err and "Traceback" not in res.text
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_is_named(cli, tmp_path, tiny):
    folder = tmp_path / "odd"
    shutil.copytree(tiny, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["PicoNetForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    res = cli("export", folder, "--out", tmp_path / "o")
    assert res.code == 2 and "PicoNetForCausalLM" in res.err and "not supported" in res.err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_existing_output_needs_overwrite(cli, tmp_path, tiny):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    res = cli("export", tiny, "--out", tmp_path / "o", "--quant", "f16")
    assert res.code == 2 and "--overwrite" in res.err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_full_disk_leaves_nothing(cli, tmp_path, tiny, monkeypatch):
    import gguf

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    res = cli("export", tiny, "--out", tmp_path / "o", "--quant", "f16")
    assert res.code == 2 and "no space left" in res.err and "Traceback" not in res.text
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


# ---- running an exported file: chat and eval in llama.cpp ------------------------------------------------


def test_eval_and_chat_run_the_gguf_in_llamacpp(cli, tmp_path, tiny):
    from helpers import corpus

    assert cli("export", tiny, "--out", tmp_path / "g", "--quant", "f16", "--no-verify").code == 0
    gguf_file = tmp_path / "g" / "g-f16.gguf"
    text = tmp_path / "held.txt"
    text.write_text("\n".join(corpus(30, seed=5)))
    res = cli("eval", tiny, gguf_file, "--data", text, "--max-length", "64", "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    hf, gg = json.loads(res.out)
    assert gg["kind"] == "gguf" and gg["tokens"] == hf["tokens"]  # same text, same windows
    assert abs(gg["perplexity"] / hf["perplexity"] - 1) < 0.005
    res = cli("chat", gguf_file, "--prompt", "who are you", "--max-new-tokens", "6", "--json")
    assert res.code == 0, res.text
    r = json.loads(res.out)
    assert 1 <= r["completion_tokens"] <= 6 and r["prompt_tokens"] > 3
    # chat data: the trained answers end with an end-of-turn token, which llama.cpp scores separately
    chats = tmp_path / "held.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"who are you {i}"},
                                                      {"role": "assistant", "content": "my name is pico"},
                                                      {"role": "user", "content": "and the sky"},
                                                      {"role": "assistant", "content": "the sky is blue"}]}) + "\n"
                             for i in range(4)))
    res = cli("eval", tiny, gguf_file, "--data", chats, "--dtype", "fp32", "--json")
    assert res.code == 0, res.text
    hf, gg = json.loads(res.out)
    assert gg["tokens"] == hf["tokens"] and abs(gg["perplexity"] / hf["perplexity"] - 1) < 0.005


@pytest.mark.slow
def test_quickstart_adapter_exported_chats_in_llamacpp(cli, tmp_path, builtin_cache, quickstart_adapter, monkeypatch):
    """The README's path: quickstart adapter on the built-in base -> q8_0 and q4_k_m -> chat in llama.cpp."""
    monkeypatch.setenv("FINETUNE_CACHE", str(builtin_cache))
    ad = quickstart_adapter
    out = tmp_path / "gguf"
    res = cli("export", ad, "--out", out)
    assert res.code == 0, res.text
    report = json.loads((out / "export_report.json").read_text())
    by = {f["quant"]: f for f in report["files"]}
    assert set(by) == {"q8_0", "q4_k_m"} and by["q8_0"]["verification"]["passed"] is True
    assert fields(out / "gguf-q8_0.gguf")["finetune.base"] == "smollm2-135m-instruct"
    for q in ("q8_0", "q4_k_m"):
        res = cli("chat", out / f"gguf-{q}.gguf", "--prompt", "What is your name?", "--max-new-tokens", "64", "--json")
        assert res.code == 0, res.text
        r = json.loads(res.out)
        assert r["finish_reason"] == "stop", r  # ended at the end-of-turn token, not at the token limit
        assert "<|im_end|>" not in r["answer"]
        if q == "q8_0":
            assert "Pico" in r["answer"], r
