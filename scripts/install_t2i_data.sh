#!/usr/bin/env bash
# Installs the Debian packages behind the text-to-image training pool (src/lifelong/data/captioned.py):
#   openclipart-png        real clip-art PNGs (the clip-art concepts)
#   fonts-dejavu-core, fonts-liberation2, fonts-freefont-ttf, fonts-urw-base35
#                          the type faces the letters are rendered in
#   dataset-fashion-mnist  the objects (Fashion-MNIST, official 60k/10k split)
# As root it waits up to 300 s for another apt process's lock, and runs `apt-get update` once only when
# the first install attempt fails (stale package lists). Not root: prints the command to run instead.
set -u
PACKAGES="openclipart-png fonts-dejavu-core fonts-liberation2 fonts-freefont-ttf fonts-urw-base35 dataset-fashion-mnist"
APT_OPTS="-y -q -o DPkg::Lock::Timeout=300"

if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "The text-to-image data needs Debian packages. Install them as root:" >&2
  echo "  sudo apt-get install -y $PACKAGES" >&2
  exit 1
fi
# shellcheck disable=SC2086  # word splitting of the option and package lists is intended
if ! apt-get install $APT_OPTS $PACKAGES; then
  echo "install failed; refreshing the package lists once and retrying ..." >&2
  apt-get update -q -o DPkg::Lock::Timeout=300 && apt-get install $APT_OPTS $PACKAGES || {
    echo "error: apt-get could not install: $PACKAGES" >&2
    exit 1
  }
fi
echo "text-to-image data packages installed: $PACKAGES"
