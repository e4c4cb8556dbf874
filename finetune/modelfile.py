"""Ollama Modelfiles for exported GGUFs, and the README of the export folder.

Ollama's TEMPLATE is a Go template, not Jinja. Most chat templates put each message between a fixed
prefix and suffix per role, then a fixed generation prompt; those parts are read off the Jinja template
by rendering short conversations and taking the differences, and the whole is checked by rebuilding a
longer conversation from them. A template that is not of that shape gets no TEMPLATE line: Ollama then
uses the chat template stored in the GGUF itself. A default system prompt that the Jinja template
inserts when a conversation has none becomes the Modelfile's SYSTEM, which Ollama adds the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finetune import models

MARK = "\u2063{}\u2063"  # invisible separator around probe contents: never produced by a template itself
ROLES = ("system", "user", "assistant")


@dataclass
class Parts:
    ok: bool
    prefix: dict = field(default_factory=dict)
    suffix: dict = field(default_factory=dict)
    generation: str = ""
    default_system: str | None = None
    why: str = ""


def _render(tok, messages, gen=False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def derive(folder: Path) -> Parts:
    from finetune.data import ensure_chat_template

    tok = models.load_tokenizer(str(folder))
    ensure_chat_template(tok)
    msgs = [{"role": r, "content": MARK.format(r)} for r in ROLES]
    try:
        parts = Parts(ok=True)
        before = ""
        for i, role in enumerate(ROLES):
            now = _render(tok, msgs[:i + 1])
            if not now.startswith(before):
                return Parts(False, why="rendering a longer conversation changes the earlier text")
            block = now[len(before):]
            content = MARK.format(role)
            if block.count(content) != 1:
                return Parts(False, why=f"a {role} message is not rendered as prefix + content + suffix")
            parts.prefix[role], parts.suffix[role] = block.split(content)
            before = now
        parts.generation = _render(tok, msgs[:2], gen=True)[len(_render(tok, msgs[:2])):]
        # a system message the template adds on its own when the conversation has none
        alone = _render(tok, msgs[1:2])
        user_block = parts.prefix["user"] + MARK.format("user") + parts.suffix["user"]
        if alone != user_block:
            head = alone.removesuffix(user_block)
            sp, ss = parts.prefix["system"], parts.suffix["system"]
            if head == alone or not (head.startswith(sp) and head.endswith(ss)):
                return Parts(False, why="the template adds text before the first message that is not a system message")
            parts.default_system = head[len(sp):len(head) - len(ss)]
    except Exception as exc:  # noqa: BLE001  a template that cannot render one of the probes (e.g. refuses a system role)
        return Parts(False, why=f"the chat template cannot render a plain system/user/assistant conversation ({exc})")
    # the parts must rebuild a longer conversation exactly
    convo = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "U2"}]
    rebuilt = "".join(parts.prefix[m["role"]] + m["content"] + parts.suffix[m["role"]] for m in convo) + parts.generation
    if rebuilt != _render(tok, convo, gen=True):
        return Parts(False, why="a multi-turn conversation does not render as the sum of its messages")
    if any("{{" in s or "}}" in s for s in [*parts.prefix.values(), *parts.suffix.values(), parts.generation]):
        return Parts(False, why="the template's text contains '{{' or '}}'")
    return parts


def go_template(parts: Parts) -> str:
    """The Go template Ollama renders for a conversation; no whitespace-trimming markers, because the
    literal text around the actions is exactly what the model was trained on."""
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{parts.prefix[role]}{{{{ .Content }}}}{parts.suffix[role]}'
        for i, role in enumerate(ROLES))
    return f"{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{parts.generation}"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def generation_defaults(folder: Path) -> dict:
    gen = folder / "generation_config.json"
    cfg = json.loads(gen.read_text()) if gen.is_file() else {}
    out = {k: cfg[k] for k in ("temperature", "top_p", "top_k", "repeat_penalty") if cfg.get(k) is not None}
    if cfg.get("repetition_penalty") is not None:
        out["repeat_penalty"] = cfg["repetition_penalty"]
    config = json.loads((folder / "config.json").read_text())
    if config.get("max_position_embeddings"):
        out["num_ctx"] = min(int(config["max_position_embeddings"]), 8192)
    return out


def render(gguf_name: str, parts: Parts, stops: list[str], system: str | None, folder: Path, adapter: str | None = None) -> str:
    lines = [f"FROM ./{gguf_name}"] + ([f"ADAPTER ./{adapter}"] if adapter else []) + [""]
    if parts.ok:
        lines += [f'TEMPLATE """{go_template(parts)}"""', ""]
    else:
        lines += [f"# no TEMPLATE: {parts.why}; Ollama uses the chat template stored in the GGUF", ""]
    system = system if system is not None else parts.default_system
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in generation_defaults(folder).items()]
    return "\n".join(lines) + "\n"


def readme(name: str, source: str, origin: dict, files: list[dict], stops: list[str], out: Path) -> str:
    rows = "\n".join(f"| `{f['file']}` | {f['quant']} | {f['bytes'] / 2**20:.1f} MiB | "
                     f"{_verdict(f.get('verification'))} |" for f in files)
    first = files[0]
    made_from = f"the adapter `{origin['adapter']}` merged into `{origin['base']}`" if origin.get("adapter") else f"`{source}`"
    return f"""# {name} (GGUF)

Exported by `finetune export` from {made_from}. Each file was loaded in llama.cpp and compared with the
transformers model (token ids, greedy continuations, perplexity): see `export_report.json`.

| file | type | size | verification |
|---|---|---|---|
{rows}

Stop tokens (end of turn): {", ".join(f"`{s}`" for s in stops)} — stored in the GGUF metadata and in each Modelfile.

## llama.cpp

```
llama-cli -m {first['file']} -cnv
llama-server -m {first['file']}
```

## Ollama

```
{chr(10).join(f['ollama_create'] for f in files)}
ollama run {name}-{first['quant'].replace('_', '-')}
```
"""


def _verdict(v: dict | None) -> str:
    if not v:
        return "not run"
    return {True: "passed", False: "FAILED", None: "reported only (below 8 bits)"}[v.get("passed")]
