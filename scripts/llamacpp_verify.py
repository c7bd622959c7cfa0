#!/usr/bin/env python3
"""llama.cpp's side of `whittle verify FILE.gguf --against MODEL` (llama-cpp-python). whittle embeds this script
and runs it with the peers' Python; it sends the token ids, so both runtimes see the same inputs.

usage: PYTHON llamacpp_verify.py FILE.gguf < request.json
request (one JSON line on stdin): {"prompts": [[ids]], "n_tokens": N, "chunks": [[ids]], "first": F,
                                   "texts": [str], "threads": T}
reply on stdout: one JSON line {"llama_cpp": version, "n_vocab": V, "greedy": [[ids]], "tokens": [[ids]]},
then for each chunk the logits of positions F-1 .. len-2 as little-endian float32 rows (V each), back to back.
Exit status 3 when llama_cpp cannot be imported, 4 when the model does not load."""
import json
import os
import sys

try:
    import numpy as np
    import llama_cpp
except Exception as e:  # noqa: BLE001 - any import failure means the same thing to the caller
    print(f"cannot import llama_cpp (llama-cpp-python) or numpy: {e}", file=sys.stderr)
    sys.exit(3)

path = sys.argv[1]
req = json.loads(sys.stdin.readline())
prompts, chunks = req.get("prompts", []), req.get("chunks", [])
n_tokens, first = int(req.get("n_tokens", 0)), int(req.get("first", 1))
longest = max([len(p) + n_tokens for p in prompts] + [len(c) for c in chunks] + [8])
n_ctx = max(longest, 32)
try:
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=int(req.get("threads") or os.cpu_count()), verbose=False)
except Exception as e:  # noqa: BLE001
    print(f"llama.cpp could not load {path}: {e}", file=sys.stderr)
    sys.exit(4)
n_vocab = llm.n_vocab()


def greedy(ids, n):
    """n greedy tokens after ids, through llama.cpp's KV cache (no early stop)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


reply = {
    "llama_cpp": llama_cpp.__version__,
    "n_vocab": n_vocab,
    "greedy": [greedy(p, n_tokens) for p in prompts],
    "tokens": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in req.get("texts", [])],
}
out = sys.stdout.buffer
out.write((json.dumps(reply) + "\n").encode())
out.flush()
for c in chunks:
    llm.reset()
    llm.eval(c)
    rows = np.ascontiguousarray(np.asarray(llm.scores[first - 1:len(c) - 1], dtype="<f4"))
    out.write(rows.tobytes())
    out.flush()
