#!/usr/bin/env bash
# Two writers to one output (issue 22): `quantize --scheme q4_k_m` and, DELAY seconds later, `--scheme q8_0`,
# both to the same out.gguf (with --force, so only the claim can keep them apart). Expected in every try:
# exactly one exits 0, the other exits 1 saying another whittle process is writing the output, the file is
# the winner's and whole, and nothing else is left in the directory.
# usage: scripts/race.sh [TRIES (20)] [DELAY (0.3)]    env: WHITTLE (target/release/whittle), WORK
set -u
N=${1:-20}; DELAY=${2:-0.3}
W=${WHITTLE:-target/release/whittle}
WORK=${WORK:-/tmp/whittle-race}
SMOL=${WHITTLE_MODELS:-$HOME/.cache/whittle/models}/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf "$WORK" && mkdir -p "$WORK"
ok=0
for i in $(seq 1 "$N"); do
  rm -f "$WORK/out.gguf"
  $W quantize "$SMOL" --scheme q4_k_m --allow-requantize --force -o "$WORK/out.gguf" >/dev/null 2>"$WORK/a.err" &
  a=$!
  sleep "$DELAY"
  $W quantize "$SMOL" --scheme q8_0 --allow-requantize --force -o "$WORK/out.gguf" >/dev/null 2>"$WORK/b.err" &
  b=$!
  wait $a; ra=$?; wait $b; rb=$?
  left=$(ls -A "$WORK" | grep -v -x -e out.gguf -e a.err -e b.err | tr '\n' ' ')
  # The file's type: q4_k_m has Q4_K tensors (ggml type 12), q8_0 none.
  kind=$($W inspect "$WORK/out.gguf" 2>/dev/null | grep -q -i q4_k && echo q4_k_m || echo q8_0)
  if [ $ra -eq 0 ] && [ $rb -ne 0 ]; then winner=q4_k_m; loser=$WORK/b.err
  elif [ $rb -eq 0 ] && [ $ra -ne 0 ]; then winner=q8_0; loser=$WORK/a.err
  else winner=none; loser=/dev/null; fi
  if [ $winner != none ] && [ "$kind" = $winner ] && grep -q "another whittle process" "$loser" && [ -z "$left" ]; then
    ok=$((ok + 1)); verdict=ok
  else
    verdict=FAIL
  fi
  echo "try $i: exit $ra/$rb, winner $winner, file $kind, leftovers [$left]: $verdict; loser said: $(head -c 200 "$loser")"
done
echo "SUMMARY: $ok of $N tries: exactly one writer succeeded, the other was refused clearly, the file is the winner's"
[ $ok -eq "$N" ]
