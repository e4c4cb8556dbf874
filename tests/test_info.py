"""`finetune info`: facts read from a model or adapter folder, checked against the real objects."""

import json

import yaml


def test_info_of_a_model_folder(cli, tiny):
    from transformers import AutoModelForCausalLM

    res = cli("info", tiny, "--json")
    assert res.code == 0, res.text
    facts = json.loads(res.out)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    m = facts["base_model"]
    assert m["architecture"] == "LlamaForCausalLM" and m["parameters"] == sum(p.numel() for p in model.parameters())
    assert m["context_length"] == 512 and m["vocabulary"] == model.config.vocab_size and m["quantization"] == "none"
    assert m["layers"] == 2 and m["hidden_size"] == 32 and set(m["weight_dtypes"]) == {"F32"}
    assert facts["chat_template"] == "own" and facts["eos_token"] == "<|im_end|>"
    assert facts["rendered_sample"].endswith("<|im_start|>assistant\n") and "<|im_start|>system\nYou are helpful." in facts["rendered_sample"]
    res = cli("info", tiny)
    assert res.code == 0 and "LlamaForCausalLM" in res.out and "context length" in res.out and "<|im_start|>user" in res.out


def test_info_of_an_adapter(cli, tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path / "ad"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"model": {"base": str(tiny)}, "lora": {"r": 4}}))
    res = cli("info", folder, "--json")
    assert res.code == 0, res.text
    facts = json.loads(res.out)
    a = facts["adapter"]
    assert facts["kind"] == "adapter" and a["base"] == str(tiny) and a["rank"] == 4 and a["alpha"] == 8
    assert sorted(a["target_modules"]) == ["q_proj", "v_proj"]
    assert a["adapter_parameters"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert yaml.safe_load(a["recipe"])["lora"]["r"] == 4 and facts["base_model"]["parameters"] > 0
    res = cli("info", folder)
    assert res.code == 0 and "rank 4" in res.out and "q_proj" in res.out and "training recipe" in res.out


def test_info_refuses_what_it_cannot_read(cli, tmp_path):
    res = cli("info", tmp_path / "nope")
    assert res.code == 2 and "not found" in res.err
    (tmp_path / "empty").mkdir()
    res = cli("info", tmp_path / "empty")
    assert res.code == 2 and "config.json" in res.err
