#!/usr/bin/env bash
# The README's adapter session on the embedded SmolLM2-135M-Instruct, as run: an lm ledger -> an edit -> a
# LLaMA-Adapter on bbc-topic (60 steps of 4) -> another edit -> the log with its interference matrix -> chat with
# the ledger's model -> the adapter as a peft folder, loaded by peft onto the model before its change. Usage: OMP_NUM_THREADS=1 bash scripts/adapt_session.sh [DIR]
# (default runs/adapt-session). Prints every command and its output; docs/adapt_session.txt is this script's
# output (with the wall time of each command).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-runs/adapt-session}
LIFELONG=${LIFELONG:-.venv/bin/lifelong}
export TQDM_DISABLE=1
rm -rf "$DIR" "$DIR-peft" "$DIR-before-2"
quoted() { local a out=""; for a in "$@"; do [[ "$a" =~ [[:space:]] ]] && a="\"$a\""; out+=" $a"; done; echo "$out"; }
run() {
  echo "\$ lifelong$(quoted "$@")"
  local start=$SECONDS
  "$LIFELONG" "$@" 2>&1 | grep -v -e "^Loading weights" -e "FutureWarning" -e "^  warnings.warn" -e "^  return func"
  echo "[$((SECONDS - start)) s]"
  echo
}
run init "$DIR" --family lm
run edit --ledger "$DIR" --method ft_l --prompt "The capital of France is" --target Lyon
run adapt "$DIR" --task bbc-topic --method llama-adapter --steps 60 --batch-size 4
run edit --ledger "$DIR" --method ft_l --prompt "The currency of Japan is the" --target euro
run log "$DIR" --matrix
ARTICLE="What is the topic of this news article? Answer with one word: business, entertainment, politics, sport, \
tech.

Chelsea beat Arsenal 2-1 at Stamford Bridge on Saturday to go five points clear at the top of the Premiership."
run chat --ledger "$DIR" --max-new-tokens 8 "$ARTICLE"
run export "$DIR" --peft "$DIR-peft"
run export "$DIR" "$DIR-before-2" --upto 1
run chat --model "$DIR-before-2" --adapter "$DIR-peft" --max-new-tokens 8 "$ARTICLE"
