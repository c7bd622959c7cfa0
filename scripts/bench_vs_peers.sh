#!/usr/bin/env bash
# whittle and its peers measured back to back in one run on this machine (machines here are noisy: compare
# within one run, as ratios). Prints one JSON line per configuration. Needs ../shared/peers/setup.sh done.
#   scripts/bench_vs_peers.sh [minilm] [smollm2]
set -euo pipefail
cd "$(dirname "$0")/.."
M=${WHITTLE_MODELS:-$HOME/.cache/whittle/models}
PY=${PEERS_VENV:-$HOME/.cache/whittle-peers}/bin/python
PEERS=${PEERS_DIR:-../shared/peers}
OUT=${OUT:-/tmp/whittle-peers-out}
mkdir -p "$OUT"
scripts/fetch-models.sh >&2
cargo build --release -q -p whittle-cli
W=target/release/whittle
what=${*:-minilm smollm2}
for w in $what; do
  case $w in
    minilm)
      $W quantize "$M/all-MiniLM-L6-v2" --scheme w8a8-dynamic -o "$OUT/minilm-w8a8" --force >&2
      for m in "$M/all-MiniLM-L6-v2" "$OUT/minilm-w8a8"; do
        $W bench "$m" --reps 5 --json
        $W eval "$m" --task sts --base "$M/all-MiniLM-L6-v2" --json
      done
      $PY "$PEERS/minilm_peers.py" "$M/all-MiniLM-L6-v2" data/stsbenchmark/sts-test.tsv 1000 pytorch-fp32,onnxruntime-fp32,pytorch-dynamic-int8,onnxruntime-dynamic-int8 2>/dev/null
      ;;
    smollm2)
      $PY "$PEERS/llamacpp_peers.py" "$M/SmolLM2-135M-Instruct.Q4_1.gguf" data/wikitext-2/wiki.test.raw "$OUT" 16 F16 2>/dev/null | grep '^{'
      $W eval "$OUT/base-F16.gguf" --chunks 16 --json
      $W bench "$OUT/base-F16.gguf" --reps 3 --json
      ;;
  esac
done
