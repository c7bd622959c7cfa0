#!/usr/bin/env bash
# The main job on the real default models: fetch them if missing, build whittle, then inspect, embed and
# generate with all-MiniLM-L6-v2 (BERT) and SmolLM2-135M-Instruct (LLaMA, Q4_1 GGUF).
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
