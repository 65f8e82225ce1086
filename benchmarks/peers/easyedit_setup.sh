#!/usr/bin/env bash
# bash benchmarks/peers/easyedit_setup.sh
# EasyEdit's environment for the knowledge-editing peer benchmark (benchmarks/peers/easyedit_run.py), in
# benchmarks/peers/.venv-easyedit (git-ignored). EasyEdit's only PyPI release, easyeditor 0.0.1.dev0
# (October 2023), pins torch 2.0.1 and transformers 4.30.1, which cannot load SmolLM2 (no grouped-query
# attention); issue 19 found this set to run it unchanged on the CPU:
#   torch 2.13.0 (CPU, the wheel lifelong uses), transformers 4.40.0, numpy 1.26.4,
#   easyeditor and peft 0.5.0 without their dependencies (their pins would pull torch 2.0.1 back in),
#   and what `import easyeditor` imports at module level (torchvision 0.16.2: the newest that imports here;
#   datasets 2.x and pyarrow < 18: newer pyarrow wheels need NumPy 2).
# A second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV=benchmarks/peers/.venv-easyedit

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --disable-pip-version-check -q)
"${PIP[@]}" torch==2.13.0 transformers==4.40.0 numpy==1.26.4 sentencepiece
"${PIP[@]}" --no-deps easyeditor==0.0.1.dev0 peft==0.5.0
"${PIP[@]}" torch==2.13.0 numpy==1.26.4 transformers==4.40.0 \
    higher omegaconf hydra-core pandas iopath fairscale opencv-python-headless scipy \
    nltk sentence-transformers scikit-learn einops "datasets<3" "pyarrow<18" matplotlib openai accelerate
# torchvision 0.16.2 declares torch==2.1.2; it is only imported (by timm and EasyEdit's multimodal code),
# never run here, so it goes in without its dependencies, and timm after it
"${PIP[@]}" --no-deps torchvision==0.16.2 timm
"$VENV/bin/python" - <<'PY'
from importlib import metadata
import easyeditor  # noqa: F401  (fails here, not in the benchmark, if the install is broken)
print("easyedit env:", {p: metadata.version(p) for p in ("torch", "transformers", "numpy", "easyeditor", "peft")})
PY
