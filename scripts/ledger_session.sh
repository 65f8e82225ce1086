#!/usr/bin/env bash
# The README's ledger session on the embedded model, as run: init -> learn two tasks -> log -> show ->
# revert -> export -> verify. Usage: bash scripts/ledger_session.sh [DIR]   (default runs/ledger-session)
# Prints every command and its output; docs/ledger_session.txt is this script's output.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-runs/ledger-session}
LIFELONG=${LIFELONG:-.venv/bin/lifelong}
export TQDM_DISABLE=1
rm -rf "$DIR" "$DIR-export"
run() { echo "\$ lifelong $*"; "$LIFELONG" "$@"; echo; }
run init "$DIR"
run learn "$DIR" --task mnist --option invert=true --train-items 1000 --method lwf train.steps_per_task=100
run learn "$DIR" --task glyphs --option invert=true --train-items 1000 --method lwf train.steps_per_task=100
run log "$DIR" --matrix
run revert "$DIR" 1
run log "$DIR"
run export "$DIR" "$DIR-export"
run verify "$DIR"
