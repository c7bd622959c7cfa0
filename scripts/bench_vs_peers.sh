#!/usr/bin/env bash
# whittle and its peers measured back to back in one run on this machine (machines here are noisy: compare
# within one run, as ratios). Prints one JSON line per configuration. Needs ../shared/peers/setup.sh done.
#   scripts/bench_vs_peers.sh [minilm] [smollm2] [smollm2-quant] [quant2] [quant2-time] [prune] [prune-structured] [lowrank] [distill]
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
        for mode in "" --calib-int8; do
          /usr/bin/time -f "{\"gptq_windows\": $n, \"mode\": \"${mode:-f32}\", \"wall_s\": %e, \"peak_rss_kb\": %M}" \
            $W quantize "$F" --scheme w4a16 --group-size 64 --method gptq --act-order --calib-samples $n $mode -o "$OUT/gptq-time$mode" --force >/dev/null
          $W eval "$OUT/gptq-time$mode" --chunks 16 --json
        done
      done
      $W bench "$F" --reps 3 --json
      ;;
    prune)
      # Pruning (#6): 50% unstructured and 2:4 with magnitude, Wanda and SparseGPT from the f32 model (the Q4_1
      # file's weights), time and peak memory of each, PPL 16×512, and decode/prefill speed against dense.
      B="$OUT/smol-f32"
      [ -e "$B" ] || $W convert "$M/SmolLM2-135M-Instruct.Q4_1.gguf" -o "$B" >&2
      $W eval "$B" --chunks 16 --json | sed 's|^{|{"config": "dense f32", |'
      $W bench "$B" --reps 3 --json
      p() { # NAME ARGS...: prune the f32 model, then its PPL
        local n=$1; shift
        /usr/bin/time -o "$OUT/time.json" -f "{\"prune\": \"$n\", \"wall_s\": %e, \"peak_rss_kb\": %M}" \
          $W prune "$B" "$@" -o "$OUT/pr-$n" --force --json > "$OUT/pr-$n.json"
        cat "$OUT/time.json"
        $W eval "$OUT/pr-$n" --chunks 16 --json | sed "s|^{|{\"config\": \"$n: $*\", |"
      }
      p mag50 --method magnitude --sparsity 0.5
      p wanda50 --method wanda --sparsity 0.5
      p wanda50-16 --method wanda --sparsity 0.5 --calib-samples 16
      p sgpt50 --method sparsegpt --sparsity 0.5
      p mag24 --method magnitude --pattern 2:4
      p wanda24 --method wanda --pattern 2:4
      p sgpt24 --method sparsegpt --pattern 2:4
      $W bench "$OUT/pr-sgpt50" --reps 3 --json
      $W bench "$OUT/pr-sgpt24" --reps 3 --json
      ;;
    lowrank)
      # Low-rank (#8): 20% fewer block-Linear parameters by plain SVD, ASVD and SVD-LLM (PPL 16×512, time,
      # peak memory), and SVD-LLM at 40% fewer against dense in pp512 / tg128.
      B="$OUT/smol-f32"
      [ -e "$B" ] || $W convert "$M/SmolLM2-135M-Instruct.Q4_1.gguf" -o "$B" >&2
      for meth in svd asvd svd-llm; do
        /usr/bin/time -o "$OUT/time.json" -f "{\"lowrank\": \"$meth 0.8\", \"wall_s\": %e, \"peak_rss_kb\": %M}" \
          $W lowrank "$B" --method $meth --ratio 0.8 -o "$OUT/lr-$meth" --force --json > "$OUT/lr-$meth.json"
        cat "$OUT/time.json"
        $W eval "$OUT/lr-$meth" --chunks 16 --json | sed "s|^{|{\"config\": \"$meth ratio 0.8\", |"
      done
      $W lowrank "$B" --method svd-llm --ratio 0.6 -o "$OUT/lr-svd-llm-60" --force --json > "$OUT/lr-svd-llm-60.json"
      $W eval "$OUT/lr-svd-llm-60" --chunks 16 --json | sed "s|^{|{\"config\": \"svd-llm ratio 0.6\", |"
      for m in "$B" "$OUT/lr-svd-llm-60" "$B" "$OUT/lr-svd-llm-60"; do
        $W bench "$m" --reps 5 --json
      done
      # Sharing (ALBERT) on MiniLM: pairs of blocks, with and without the factorised embedding, then a 20-minute
      # distillation of the smaller one (STS-B before and after).
      $W share "$M/all-MiniLM-L6-v2" --groups 0-1,2-3,4-5 -o "$OUT/mini-share" --force --json
      $W share "$M/all-MiniLM-L6-v2" --groups 0-1,2-3,4-5 --embedding-rank 192 -o "$OUT/mini-share-e192" --force --json
      /usr/bin/time -o "$OUT/time.json" -f "{\"distill\": \"mini-share-e192\", \"wall_s\": %e, \"peak_rss_kb\": %M}" \
        $W distill --teacher "$M/all-MiniLM-L6-v2" --student "$OUT/mini-share-e192" -o "$OUT/mini-share-e192-kd" --max-time 20m --force >&2
      cat "$OUT/time.json"
      $W eval "$OUT/mini-share-e192-kd" --task sts --json
      ;;
    prune-structured)
      # Structured removal (#6): SmolLM2 with 1 of 3 KV groups and 25% of FFN neurons gone (~27% of the
      # non-embedding parameters), file / pp512 / tg128 against the dense f32 model in the same run, PPL;
      # all-MiniLM-L6-v2 with 25% of heads and 30% of FFN neurons gone: STS-B, SST-2 probe, sentences/s.
      B="$OUT/smol-f32"
      [ -e "$B" ] || $W convert "$M/SmolLM2-135M-Instruct.Q4_1.gguf" -o "$B" >&2
      $W prune "$B" --structured heads=0.34,ffn=0.25 -o "$OUT/st27" --force >&2
      for m in "$B" "$OUT/st27" "$B" "$OUT/st27"; do
        $W bench "$m" --reps 5 --json
      done
      $W eval "$OUT/st27" --chunks 16 --json
      E="$M/all-MiniLM-L6-v2"
      $W prune "$E" --structured heads=0.25,ffn=0.3 -o "$OUT/minilm-st" --force >&2
      for m in "$E" "$OUT/minilm-st"; do
        $W eval "$m" --task sts --json
        $W eval "$m" --task classify --json
        $W bench "$m" --reps 5 --json
      done
      ;;
    distill)
      # Distillation (#7), ~75 min on 2 cores: the structured student (see prune-structured) recovered by
      # fine-tuning and by distillation from a teacher corrected on the same text (Minitron), same steps, data
      # and schedule (85-step cosine, stopped at 73); then MiniLM's 3-layer student, undistilled vs distilled.
      B="$OUT/smol-f32"
      [ -e "$B" ] || $W convert "$M/SmolLM2-135M-Instruct.Q4_1.gguf" -o "$B" >&2
      [ -e "$OUT/st27" ] || $W prune "$B" --structured heads=0.34,ffn=0.25 -o "$OUT/st27" >&2
      S="--max-steps 85 --stop-at 73 --eval-every 17 --ckpt-every 17 --seed 0 --force"
      $W finetune "$OUT/st27" -o "$OUT/st27-ft" $S >&2
      $W finetune "$B" -o "$OUT/teacher-ft" $S >&2
      $W distill --teacher "$OUT/teacher-ft" --student "$OUT/st27" -o "$OUT/st27-kd" --alpha 1 --temperature 1 \
        --max-time 20m $S >&2
      for m in "$B" "$OUT/teacher-ft" "$OUT/st27" "$OUT/st27-ft" "$OUT/st27-kd"; do
        $W eval "$m" --chunks 16 --json
      done
      E="$M/all-MiniLM-L6-v2"
      $W prune "$E" --drop-layers 1,3,5 -o "$OUT/minilm3" --force >&2
      $W distill --teacher "$E" --keep-layers 0,2,4 -o "$OUT/minilm3-kd" --max-steps 381 --eval-every 63 \
        --ckpt-every 63 --max-time 20m --force >&2
      for m in "$E" "$OUT/minilm3" "$OUT/minilm3-kd"; do
        $W eval "$m" --task sts --json
      done
      ;;
  esac
done
