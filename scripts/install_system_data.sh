#!/usr/bin/env bash
# Installs Debian's Fashion-MNIST package when it is missing and we are root on a Debian-like system.
# Otherwise prints how to get it; the data loader repeats that if a run needs it.
set -u
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] || [ -n "${LIFELONG_FASHION_MNIST_DIR:-}" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian package dataset-fashion-mnist ..."
  # Another package-manager process (usual on a new cloud machine) holds apt's lock: wait for it, bounded.
  APT="apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3"
  $APT install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
    { $APT update -q >/dev/null 2>&1 && $APT install -y -q dataset-fashion-mnist >/dev/null; } || \
    echo "warning: apt-get could not install dataset-fashion-mnist" >&2
else
  echo "note: Fashion-MNIST is not installed. Run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)," >&2
  echo "      or put the four IDX .gz files in a folder and set LIFELONG_FASHION_MNIST_DIR to it." >&2
fi
exit 0
