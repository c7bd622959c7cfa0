#!/usr/bin/env bash
# whittle and its peers measured back to back in one run on this machine (machines here are noisy: compare
# within one run, as ratios). Prints one JSON line per configuration. Needs ../shared/peers/setup.sh done.
#   scripts/bench_vs_peers.sh [minilm] [smollm2] [smollm2-quant]
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
    smollm2-quant)
      # llama.cpp makes Q8_0 and Q4_K_M from the F16 (PPL, pp512, tg128); whittle runs the very same files,
      # writes its own from the F16 (time, peak memory), and llama.cpp scores whittle's files.
      $PY "$PEERS/llamacpp_peers.py" "$M/SmolLM2-135M-Instruct.Q4_1.gguf" data/wikitext-2/wiki.test.raw "$OUT" 16 F16,Q8_0,Q4_K_M 2>/dev/null | grep '^{'
      for t in Q8_0 Q4_K_M; do
        $W eval "$OUT/$t.gguf" --chunks 16 --json
        $W bench "$OUT/$t.gguf" --reps 3 --json
        lower=$(echo $t | tr A-Z a-z)
        /usr/bin/time -f "{\"whittle_quantize\": \"$lower\", \"wall_s\": %e, \"peak_rss_kb\": %M}" \
          $W quantize "$OUT/base-F16.gguf" --scheme "$lower" -o "$OUT/whittle-$lower.gguf" --force --json >/dev/null
        $PY scripts/llamacpp_ppl.py "$OUT/whittle-$lower.gguf" data/wikitext-2/wiki.test.raw 16 2>/dev/null | grep '^{'
      done
      for sq in "" "--smoothquant 0.6"; do
        $W quantize "$OUT/base-F16.gguf" --scheme w8a8-dynamic $sq -o "$OUT/smollm2-w8a8" --force >/dev/null
        $W eval "$OUT/smollm2-w8a8" --chunks 16 --json
        $W bench "$OUT/smollm2-w8a8" --reps 3 --json
      done
      ;;
  esac
done
