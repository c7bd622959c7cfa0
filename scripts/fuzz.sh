#!/usr/bin/env bash
# Runs the fuzz targets of crates/cli/examples/fuzz.rs on the stable toolchain, one after the other.
# usage: scripts/fuzz.sh [SECONDS] [TARGET[:SECONDS]...]   (SECONDS per target, default 60)
# TARGET: gguf gguf-header tokenizer safetensors safetensors-header config manifest recipe http (default: all)
# Env: OUT (default fuzz/): findings (panics, inputs costing > 1 s of CPU time, single allocations > 1 GB,
#      hard crashes) are saved under OUT/crashes — turn each into a regression test; each target's summary line
#      is appended to OUT/summary.txt.
#      IDLE=1 runs the fuzzer in the idle scheduling class (chrt --idle 0), so it only uses CPU nobody else wants.
#      FUZZ_BIN: an already-built fuzzer (default: build it).  SEED: the first seed (default: random).
set -u
SECS=${1:-60}; shift || true
TARGETS=${*:-"gguf gguf-header tokenizer safetensors safetensors-header config manifest recipe http"}
OUT=${OUT:-fuzz}
if [ -z "${FUZZ_BIN:-}" ]; then
  cargo build --release -p whittle-cli --example fuzz || exit 1
  FUZZ_BIN=${CARGO_TARGET_DIR:-target}/release/examples/fuzz
fi
RUN=()
[ "${IDLE:-0}" = 1 ] && RUN=(chrt --idle 0)
mkdir -p "$OUT/crashes"
status=0
for spec in $TARGETS; do
  t=${spec%%:*}; s=$SECS
  [ "$spec" != "$t" ] && s=${spec#*:}
  line=$("${RUN[@]}" "$FUZZ_BIN" "$t" "$s" "$OUT" "${SEED:-$RANDOM}" | tee /dev/stderr | tail -1)
  rc=${PIPESTATUS[0]}
  echo "$(date -u +%FT%TZ) $line (exit $rc)" >> "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then
    status=1
    # A hard crash (abort, out of memory) leaves the input it was trying.
    if [ -f "$OUT/current-$t" ]; then
      mv "$OUT/current-$t" "$OUT/crashes/$t-hard-crash-$(date +%s)"
      echo "FINDING $t: exit $rc; input saved in $OUT/crashes"
    fi
  fi
done
exit $status
