#!/usr/bin/env bash
# Runs two whittle binaries side by side on the real models and prints the figures a restructuring must
# keep: MiniLM STS-B (fp32, w8a8-dynamic), SmolLM2 F16 perplexity, q4_k_m GGUF bytes, GPTQ w4a16 g64
# act-order perplexity, and bench speed (MiniLM fp32 / w8a8, SmolLM2 Q8_0), alternating the binaries.
#
#   scripts/check_behaviour.sh BEFORE_BINARY AFTER_BINARY [WORKDIR]
set -euo pipefail
B=$1; A=$2; W=${3:-$(mktemp -d)}
M=${WHITTLE_MODELS:-$HOME/.cache/whittle/models}
MINI=$M/all-MiniLM-L6-v2; SMOL=$M/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$W"
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(' '.join(str(d.get(k)) for k in sys.argv[1:]))" "$@"; }
for tag in before after; do
  X=$B; [[ $tag == after ]] && X=$A
  echo "== $tag ($X)"
  echo "minilm fp32 sts:  $($X eval "$MINI" --task sts --json | j sts_spearman)"
  $X quantize "$MINI" --scheme w8a8-dynamic -o "$W/$tag-mini-w8" --force --json >/dev/null
  echo "minilm w8a8 sts:  $($X eval "$W/$tag-mini-w8" --task sts --json | j sts_spearman)"
  $X quantize "$SMOL" --scheme f16 --allow-requantize -o "$W/$tag-smol-f16.gguf" --force --json >/dev/null
  echo "smol f16 ppl:     $($X eval "$W/$tag-smol-f16.gguf" --chunks 16 --json | j ppl)"
  $X quantize "$W/$tag-smol-f16.gguf" --scheme q4_k_m -o "$W/$tag-q4km.gguf" --force --json >/dev/null
  $X quantize "$W/$tag-smol-f16.gguf" --scheme q8_0 -o "$W/$tag-q8.gguf" --force --json >/dev/null
  echo "q4_k_m sha256:    $(sha256sum "$W/$tag-q4km.gguf" | cut -c1-16)"
  $X convert "$SMOL" -o "$W/$tag-smol-f32" 2>/dev/null || true
  $X quantize "$W/$tag-smol-f32" --scheme w4a16 --group-size 64 --method gptq --act-order -o "$W/$tag-gptq" --force --json >/dev/null
  echo "gptq ppl:         $($X eval "$W/$tag-gptq" --chunks 16 --json | j ppl)"
done
echo "== bench (medians of --reps 5; before/after alternating, two rounds)"
for round in 1 2; do
  for tag in before after; do
    X=$B; [[ $tag == after ]] && X=$A
    echo "round $round $tag minilm fp32: $($X bench "$MINI" --json | j sent_per_s p50_ms)"
    echo "round $round $tag minilm w8a8: $($X bench "$W/before-mini-w8" --json | j sent_per_s p50_ms)"
    echo "round $round $tag smol q8_0:   $($X bench "$W/before-q8.gguf" --json | j pp_tok_s tg_tok_s)"
  done
done
