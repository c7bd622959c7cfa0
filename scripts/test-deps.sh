#!/usr/bin/env bash
# Test dependencies outside cargo: a Python venv with the official OpenAI client and prometheus_client,
# used by crates/serve/tests/openai_client.rs, and the onnxruntime wheel, whose libonnxruntime.so the ONNX
# export tests load through `ort` (crates/export/tests/ort.rs, `whittle verify`). Both find the venv at
# $WHITTLE_TEST_VENV or ~/.cache/whittle-test-venv. Idempotent and quick when the venv is already there.
set -euo pipefail
VENV="${WHITTLE_TEST_VENV:-$HOME/.cache/whittle-test-venv}"
if "$VENV/bin/python" -c "import openai, prometheus_client, onnxruntime" 2>/dev/null; then
    echo "test venv ready: $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check openai prometheus-client onnxruntime
"$VENV/bin/python" -c "import openai, prometheus_client, onnxruntime; print('test venv ready:', '$VENV', 'openai', openai.__version__, 'onnxruntime', onnxruntime.__version__)"
