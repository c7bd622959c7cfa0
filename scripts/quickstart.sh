#!/usr/bin/env bash
# The main job on the real default models: fetch them if missing, build whittle, then inspect, embed and
# generate with all-MiniLM-L6-v2 (BERT) and SmolLM2-135M-Instruct (LLaMA, Q4_1 GGUF); then quantize MiniLM to
# w8a8-dynamic and compare it with the original (STS-B, embedding cosine, size, sentences/s, latency), and write
# SmolLM2 as a llama.cpp Q4_K_M GGUF and compare it with the original (perplexity, KL, size, pp/tg speed).
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
# Make MiniLM smaller and faster, and prove it: int8 weights + activations, then quality and speed side by side.
OUT=${TMPDIR:-/tmp}/whittle-quickstart
$W quantize "$M/all-MiniLM-L6-v2" --scheme w8a8-dynamic -o "$OUT/minilm-w8a8" --force | tail -3
$W compare "$M/all-MiniLM-L6-v2" "$OUT/minilm-w8a8" --reps 1
$W quantize "$M/SmolLM2-135M-Instruct.Q4_1.gguf" --scheme q4_k_m --allow-requantize -o "$OUT/smollm2-q4_k_m.gguf" --force | tail -2
$W compare "$M/SmolLM2-135M-Instruct.Q4_1.gguf" "$OUT/smollm2-q4_k_m.gguf" --chunks 4 --reps 1
