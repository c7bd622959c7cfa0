#!/usr/bin/env bash
# Test dependencies outside cargo: a Python venv with the official OpenAI client and prometheus_client,
# used by crates/serve/tests/openai_client.rs, and the onnxruntime wheel, whose libonnxruntime.so the ONNX
# export tests load through `ort` (crates/export/tests/ort.rs, `whittle verify`). Both find the venv at
# $WHITTLE_TEST_VENV or ~/.cache/whittle-test-venv. Idempotent and quick when the venv is already there.
# Where the peers' venv exists (~/.cache/whittle-peers: torch, transformers, llama-cpp-python), it also gets the
# `compressed-tensors` package, with which transformers loads `whittle export --format compressed-tensors`
# (crates/export/tests/compressed_tensors.rs, `whittle verify`).
set -euo pipefail
PEERS="${PEERS_VENV:-$HOME/.cache/whittle-peers}"
if "$PEERS/bin/python" -c "import torch, transformers" 2>/dev/null \
    && ! "$PEERS/bin/python" -c "import compressed_tensors" 2>/dev/null; then
    "$PEERS/bin/pip" install --quiet --disable-pip-version-check compressed-tensors
fi
VENV="${WHITTLE_TEST_VENV:-$HOME/.cache/whittle-test-venv}"
if "$VENV/bin/python" -c "import openai, prometheus_client, onnxruntime" 2>/dev/null; then
    echo "test venv ready: $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check openai prometheus-client onnxruntime
"$VENV/bin/python" -c "import openai, prometheus_client, onnxruntime; print('test venv ready:', '$VENV', 'openai', openai.__version__, 'onnxruntime', onnxruntime.__version__)"
