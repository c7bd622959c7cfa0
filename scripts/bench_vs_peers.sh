#!/usr/bin/env bash
# whittle and its peers measured back to back in one run on this machine (machines here are noisy: compare
# within one run, as ratios). Prints one JSON line per configuration. Needs ../shared/peers/setup.sh done.
#   scripts/bench_vs_peers.sh [minilm] [smollm2] [smollm2-quant] [quant2] [quant2-time]
set -euo pipefail
cd "$(dirname "$0")/.."
M=${WHITTLE_MODELS:-$HOME/.cache/whittle/models}
PY=${PEERS_VENV:-$HOME/.cache/whittle-peers}/bin/python
PEERS=${PEERS_DIR:-../shared/peers}
OUT=${OUT:-/tmp/whittle-peers-out}
mkdir -p "$OUT"
scripts/fetch-models.sh >&2
cargo build --release -q -p whittle-cli
W=${WHITTLE_BIN:-target/release/whittle}
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
    quant2)
      # Quantization II (#5): importance matrix on llama.cpp's K-quant mixtures (scored by both runtimes),
      # GPTQ / AWQ on the grouped 4- and 3-bit formats, --target-bpw against uniform formats, MiniLM GPTQ.
      $PY "$PEERS/llamacpp_peers.py" "$M/SmolLM2-135M-Instruct.Q4_1.gguf" data/wikitext-2/wiki.test.raw "$OUT" 16 F16,Q4_K_M,Q3_K_M 2>/dev/null | grep '^{'
      F="$OUT/base-F16.gguf"
      $W imatrix "$F" -o "$OUT/imatrix.gguf" --force >&2
      for t in q4_k_m q3_k_m; do
        for im in "" "--imatrix $OUT/imatrix.gguf"; do
          f="$OUT/whittle-$t${im:+-imatrix}.gguf"
          $W quantize "$F" --scheme $t $im -o "$f" --force >/dev/null
          echo "{\"file\": \"$f\", \"bytes\": $(stat -c %s "$f")}"
          $PY scripts/llamacpp_ppl.py "$f" data/wikitext-2/wiki.test.raw 16 2>/dev/null | grep '^{'
          $W eval "$f" --chunks 16 --json
        done
      done
      q() { # NAME ARGS...: quantize the F16 to a directory, then its PPL
        local n=$1; shift
        $W quantize "$F" "$@" -o "$OUT/q2-$n" --force >/dev/null
        $W eval "$OUT/q2-$n" --chunks 16 --json | sed "s|^{|{\"config\": \"$n: $*\", |"
      }
      q rtn4 --scheme w4a16 --group-size 64
      q gptq4 --scheme w4a16 --group-size 64 --method gptq --act-order
      q awq4 --scheme w4a16 --group-size 64 --method awq
      q rtn3a --scheme w3a16 --group-size 64 --zero-point
      q awqgptq3a --scheme w3a16 --group-size 64 --zero-point --method awq-gptq --act-order --calib-samples 32
      q rtn3g32 --scheme w3a16 --group-size 32
      q rtn3g32a --scheme w3a16 --group-size 32 --zero-point
      q rtn2a --scheme w2a16 --group-size 64 --zero-point
      $W sensitivity "$F" --group-size 64 -o "$OUT/sens.json" --force >/dev/null
      $W sensitivity "$F" --group-size 64 --zero-point -o "$OUT/sens-asym.json" --force >/dev/null
      q tb4 --scheme w4a16 --group-size 64 --target-bpw 4.0 --sensitivity "$OUT/sens.json"
      q tb4a --scheme w4a16 --group-size 64 --zero-point --target-bpw 4.0 --sensitivity "$OUT/sens-asym.json"
      q tb4awq --scheme w4a16 --group-size 64 --zero-point --target-bpw 4.0 --sensitivity "$OUT/sens-asym.json" --method awq-gptq --act-order
      for meth in rtn gptq; do
        $W quantize "$M/all-MiniLM-L6-v2" --scheme w4a16 --group-size 64 --method $meth -o "$OUT/minilm-$meth" --force >/dev/null
        $W eval "$OUT/minilm-$meth" --task sts --json
      done
      ;;
    quant2-time)
      # GPTQ's time and peak memory at the issue's 128 windows of 512 tokens, and a forward pass over the same
      # tokens for scale (pp512 × 128).
      F="$OUT/base-F16.gguf"
      for n in 16 128; do
        /usr/bin/time -f "{\"gptq_windows\": $n, \"wall_s\": %e, \"peak_rss_kb\": %M}" \
          $W quantize "$F" --scheme w4a16 --group-size 64 --method gptq --act-order --calib-samples $n -o "$OUT/gptq-time" --force >/dev/null
      done
      $W bench "$F" --reps 3 --json
      ;;
  esac
done
