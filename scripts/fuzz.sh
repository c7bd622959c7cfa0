#!/usr/bin/env bash
# Runs each fuzz target of crates/cli/examples/fuzz.rs for SECONDS (default 60) on the stable toolchain.
# Findings (panics, inputs slower than 10 s, hard crashes) are saved under OUT/crashes (default fuzz/);
# turn each into a regression test. usage: scripts/fuzz.sh [SECONDS] [TARGETS...]
set -u
SECS=${1:-60}; shift || true
TARGETS=${*:-"gguf tokenizer safetensors config manifest"}
OUT=${OUT:-fuzz}
cargo build --release -p whittle-cli --example fuzz || exit 1
BIN=${CARGO_TARGET_DIR:-target}/release/examples/fuzz
status=0
for t in $TARGETS; do
  "$BIN" "$t" "$SECS" "$OUT" "${SEED:-$RANDOM}"
  rc=$?
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
