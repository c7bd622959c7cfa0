#!/usr/bin/env python3
"""transformers' side of `whittle verify DIR --against MODEL` for a compressed-tensors export: loads DIR with
AutoModelForCausalLM (the `compressed-tensors` package decompresses its quantized Linears), fed the token ids
whittle sends, so both runtimes see the same inputs. whittle embeds this script and runs it with the peers'
Python.

usage: PYTHON transformers_verify.py DIR < request.json
request (one JSON line on stdin): {"prompts": [[ids]], "n_tokens": N, "chunks": [[ids]], "first": F,
                                   "texts": [str], "threads": T, "dtype": "float32" | "float16" | "bfloat16"}
reply on stdout: one JSON line {"transformers": versions, "n_vocab": V, "greedy": [[ids]], "tokens": [[ids]],
                                "quantized_linears": n},
then for each chunk the logits of positions F-1 .. len-2 as little-endian float32 rows (V each), back to back.
Exit status 3 when torch, transformers or compressed_tensors cannot be imported, 4 when the model does not load."""
import json
import os
import sys

try:
    import numpy as np
    import torch
    import transformers
    import compressed_tensors
except Exception as e:  # noqa: BLE001 - any import failure means the same thing to the caller
    print(f"cannot import torch, transformers, compressed_tensors or numpy: {e}", file=sys.stderr)
    sys.exit(3)

path = sys.argv[1]
req = json.loads(sys.stdin.readline())
prompts, chunks = req.get("prompts", []), req.get("chunks", [])
n_tokens, first = int(req.get("n_tokens", 0)), int(req.get("first", 1))
torch.set_num_threads(int(req.get("threads") or os.cpu_count()))
dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
dtype = dtypes[req.get("dtype") or "float32"]
try:
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    tok = transformers.AutoTokenizer.from_pretrained(path)
except Exception as e:  # noqa: BLE001
    print(f"transformers could not load {path}: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(4)
model.eval()
# The Linears compressed-tensors attached a quantization scheme to (0: the config was not applied).
quantized = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)


@torch.inference_mode()
def logits_of(ids):
    """(T, V) float32 logits of one sequence, no cache."""
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.inference_mode()
def greedy(ids, n):
    """n greedy tokens after ids, through transformers' KV cache (no early stop)."""
    out_ids = []
    out = model(torch.tensor([ids]), use_cache=True)
    for _ in range(n):
        nxt = int(torch.argmax(out.logits[0, -1]))
        out_ids.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return out_ids


greedy_ids = [greedy(p, n_tokens) for p in prompts]
n_vocab = int(model.get_output_embeddings().weight.shape[0])
reply = {
    "transformers": f"{transformers.__version__}, compressed-tensors {compressed_tensors.__version__}, "
                    f"torch {torch.__version__}",
    "n_vocab": n_vocab,
    "greedy": greedy_ids,
    "tokens": [tok(t, add_special_tokens=False)["input_ids"] for t in req.get("texts", [])],
    "quantized_linears": quantized,
}
out = sys.stdout.buffer
out.write((json.dumps(reply) + "\n").encode())
out.flush()
for c in chunks:
    rows = logits_of(c)[first - 1:len(c) - 1]
    out.write(np.ascontiguousarray(rows.numpy(), dtype="<f4").tobytes())
    out.flush()
