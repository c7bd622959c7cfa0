#!/usr/bin/env bash
# Test dependencies outside cargo: a Python venv with the official OpenAI client and prometheus_client,
# used by crates/serve/tests/openai_client.rs (which finds it at $WHITTLE_TEST_VENV or
# ~/.cache/whittle-test-venv). Idempotent and quick when the venv is already there.
set -euo pipefail
VENV="${WHITTLE_TEST_VENV:-$HOME/.cache/whittle-test-venv}"
if "$VENV/bin/python" -c "import openai, prometheus_client" 2>/dev/null; then
    echo "test venv ready: $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check openai prometheus-client
"$VENV/bin/python" -c "import openai, prometheus_client; print('test venv ready:', '$VENV', 'openai', openai.__version__)"
