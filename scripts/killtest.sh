#!/usr/bin/env bash
# Crash safety (issue 22, item 4): `kill -9` each writing command at random points of its run, then check
#  - the final output either does not exist or is whole: it loads (`whittle inspect`) and equals the output
#    of a clean run byte for byte;
#  - the next run to the same output succeeds, equals the clean output, and leaves nothing else behind
#    (no `.NAME.tmp-PID`, `.NAME.old-PID`, `.NAME.whittle-lock`).
#
# usage: scripts/killtest.sh [KILLS_PER_COMMAND (20)] [COMMANDS (quantize prune lowrank share convert distill gguf)]
# env:   WHITTLE (default target/release/whittle), WORK (default /tmp/whittle-killtest), SEED (default 1)
# Prints one line per kill and a summary; exits 1 if any check failed.
set -u
N=${1:-20}
CMDS=${2:-"quantize prune lowrank share convert distill gguf"}
W=${WHITTLE:-target/release/whittle}
WORK=${WORK:-/tmp/whittle-killtest}
M=${WHITTLE_MODELS:-$HOME/.cache/whittle/models}
MINI=$M/all-MiniLM-L6-v2
SMOL=$M/SmolLM2-135M-Instruct.Q4_1.gguf
RANDOM=${SEED:-1}
rm -rf "$WORK" && mkdir -p "$WORK"

# The command writing OUT for each name (deterministic: fixed threads and seeds).
args() { # NAME OUT
  case $1 in
    quantize) echo quantize "$MINI" --scheme w8a8-dynamic -o "$2" ;;
    prune) echo prune "$MINI" --method magnitude --sparsity 0.5 -o "$2" ;;
    lowrank) echo lowrank "$MINI" --method svd --ratio 0.8 -o "$2" ;;
    share) echo share "$MINI" --groups 0-1,2-3 -o "$2" ;;
    convert) echo convert "$MINI" --dtype f16 -o "$2" ;;
    distill) echo distill --teacher "$MINI" --keep-layers 0,2,4 --max-steps 2 --batch 4 --eval-every 1 --ckpt-every 1 --eval-windows 1 -o "$2" ;;
    gguf) echo quantize "$SMOL" --scheme q8_0 --allow-requantize -o "$2" ;;
  esac
}

same() { # A B: identical trees (files and bytes)
  diff -r -q "$1" "$2" >/dev/null 2>&1
}

# Everything in DIR other than the outputs a command legitimately writes (OUT and, for distill, OUT.ckpt).
leftovers() { # DIR NAME
  ls -A "$1" | grep -v -x -e "$2" -e "$2.ckpt" || true
}

total=0; bad=0; partial=0; absent=0; whole=0
for c in $CMDS; do
  out=out; [ "$c" = gguf ] && out=out.gguf
  ref=$WORK/$c-ref; mkdir -p "$ref"
  t0=$(date +%s.%N)
  $W --threads 2 $(args "$c" "$ref/$out") >/dev/null 2>"$WORK/$c-ref.log" || { echo "$c: clean run failed"; cat "$WORK/$c-ref.log"; exit 1; }
  t=$(echo "$(date +%s.%N) - $t0" | bc)
  echo "== $c: clean run ${t}s"
  dir=$WORK/$c; mkdir -p "$dir"
  for i in $(seq 1 "$N"); do
    total=$((total + 1))
    # A random point in [0, 1.1 × the clean run's time].
    at=$(echo "scale=3; $t * 1.1 * $((RANDOM % 1000)) / 1000" | bc)
    # Odd kills write a new output, even ones replace the previous run's (--force).
    [ $((i % 2)) -eq 1 ] && rm -rf "${dir:?}/$out"
    $W --threads 2 $(args "$c" "$dir/$out") --force >/dev/null 2>&1 &
    pid=$!
    sleep "$at"
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
    state=absent
    if [ -e "$dir/$out" ]; then
      # distill writes its best student so far after each evaluation: a kill may leave an earlier best,
      # which must load but need not equal the final one.
      if { [ "$c" = distill ] || same "$ref/$out" "$dir/$out"; } && $W inspect "$dir/$out" >/dev/null 2>&1; then
        state=whole
      else
        state=PARTIAL; partial=$((partial + 1)); bad=$((bad + 1))
      fi
    fi
    [ $state = absent ] && absent=$((absent + 1)); [ $state = whole ] && whole=$((whole + 1))
    left_after_kill=$(leftovers "$dir" "$out" | tr '\n' ' ')
    # The next run: succeeds, equals the clean output, nothing else left.
    if $W --threads 2 $(args "$c" "$dir/$out") --force >/dev/null 2>"$dir.rerun.log"; then
      rerun=ok
      same "$ref/$out" "$dir/$out" || { rerun=DIFFERS; bad=$((bad + 1)); }
    else
      rerun=FAILED; bad=$((bad + 1)); cat "$dir.rerun.log"
    fi
    left=$(leftovers "$dir" "$out" | tr '\n' ' ')
    [ -n "$left" ] && { bad=$((bad + 1)); left="LEFTOVERS: $left"; }
    echo "$c kill $i at ${at}s: output $state; after the kill: [${left_after_kill}]; rerun $rerun $left"
  done
done
echo "SUMMARY: $total kills; final output absent $absent, whole $whole, partial $partial; failed checks $bad"
[ $bad -eq 0 ]
