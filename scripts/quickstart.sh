#!/usr/bin/env bash
# The main job on the real default models: fetch them if missing, build whittle, then inspect, embed and
# generate with all-MiniLM-L6-v2 (BERT) and SmolLM2-135M-Instruct (LLaMA, Q4_1 GGUF); then `whittle optimize`
# both (the fastest MiniLM within 1% STS-B; the smallest SmolLM2 file within 5% perplexity) with their reports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
M=${WHITTLE_MODELS:-$HOME/.cache/whittle/models}
cargo build --release -q -p whittle-cli
W=target/release/whittle
set -x
$W inspect "$M/all-MiniLM-L6-v2"
$W embed "$M/all-MiniLM-L6-v2" "A man is playing a guitar." "Someone plays an instrument." --json | head -c 300; echo
$W inspect "$M/SmolLM2-135M-Instruct.Q4_1.gguf"
$W generate "$M/SmolLM2-135M-Instruct.Q4_1.gguf" --chat --prompt "What is the capital of France?" -n 32
# Make both models smaller and faster, and prove it: `whittle optimize` searches post-training quantization
# (MiniLM: the fastest int8 form within 1% STS-B) and mixed GGUF precision (SmolLM2: the smallest file within
# 5% perplexity), measures every candidate and writes the chosen model with an HTML report.
OUT=${TMPDIR:-/tmp}/whittle-quickstart
$W optimize "$M/all-MiniLM-L6-v2" --level light --objective throughput --budget 10m -o "$OUT/minilm" --force
$W optimize "$M/SmolLM2-135M-Instruct.Q4_1.gguf" --level medium --max-drop 5% --objective size --budget 15m -o "$OUT/smollm2" --force
set +x
echo "reports: $OUT/minilm/report.html and $OUT/smollm2/report.html (open them in a browser)"
