#!/usr/bin/env bash
# Create the virtual environment bench/run.py's LLaMA-Factory leg runs in (bench/.venv-llamafactory).
# LLaMA-Factory pins older transformers/TRL/PEFT/datasets/accelerate than finetune uses, so it cannot share
# finetune's environment. torch is installed first and pinned (the same build as finetune's) so that its
# pins do not pull another torch; everything else is what `pip install llamafactory==VERSION` resolves.
#   bash bench/llamafactory_env.sh            # LLAMAFACTORY_VERSION and TORCH_VERSION override the pins
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
LF_VERSION=${LLAMAFACTORY_VERSION:-0.9.5}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV=.venv-llamafactory
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if [ "${FINETUNE_TORCH:-cpu}" = cuda ]; then
  $PIP install -q "torch==${TORCH_VERSION}"
else
  $PIP install -q --no-deps "torch==${TORCH_VERSION}+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
# torch's own small dependencies, then LLaMA-Factory with its pins; the constraint keeps torch as installed
$PIP install -q filelock typing-extensions sympy networkx jinja2 fsspec
echo "torch==$($VENV/bin/python -c 'import torch; print(torch.__version__)')" > "$VENV/constraints.txt"
$PIP install -q "llamafactory==${LF_VERSION}" -c "$VENV/constraints.txt"
if [ "${FINETUNE_TORCH:-cpu}" != cuda ]; then
  # PyPI's torchvision/torchaudio are built against the CUDA torch and fail to load against the CPU build
  # ("operator torchvision::nms does not exist"), which breaks transformers' imports. Text SFT uses neither,
  # but LLaMA-Factory imports torchaudio at module level (data/mm_plugin.py), so a stub module stands in.
  $PIP uninstall -y -q torchvision torchaudio
  SITE=$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$SITE/torchaudio"
  cat > "$SITE/torchaudio/__init__.py" <<'PY'
"""Stand-in for torchaudio in the bench's CPU LLaMA-Factory environment: imported by LLaMA-Factory, never used for text."""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: torchaudio is not installed in this environment (text-only benchmark)")
PY
fi
$VENV/bin/python -c "import llamafactory, transformers, trl, peft, torch; print('llamafactory', llamafactory.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'torch', torch.__version__)"
