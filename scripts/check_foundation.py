#!/usr/bin/env python3
"""Acceptance checks of the foundation against the reference implementations (needs the peers venv):

1. all-MiniLM-L6-v2 embeddings of every STS-B test sentence: whittle vs sentence-transformers (min cosine).
2. `whittle convert` of SmolLM2's GGUF to an HF directory: loads in transformers, and its last-position
   logits and greedy tokens match the golden fixture (transformers on the GGUF) that whittle is tested against.

usage: ~/.cache/whittle-peers/bin/python scripts/check_foundation.py [path/to/whittle]
"""
import json, os, subprocess, sys, tempfile
import numpy as np, torch

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
whittle = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "target/release/whittle")
models = os.environ.get("WHITTLE_MODELS", os.path.expanduser("~/.cache/whittle/models"))
minilm = os.path.join(models, "all-MiniLM-L6-v2")
smol = os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf")

# 1. STS-B sentences
rows = [l.rstrip("\n").split("\t") for l in open(os.path.join(root, "data/stsbenchmark/sts-test.tsv"), encoding="utf-8")][1:]
sents = sorted({s for r in rows for s in (r[5], r[6])})
from sentence_transformers import SentenceTransformer
ref = SentenceTransformer(minilm, device="cpu").encode(sents, batch_size=32, convert_to_numpy=True)
with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
    f.write("\n".join(sents) + "\n")
out = subprocess.run([whittle, "embed", minilm, "--file", f.name, "--json"], check=True, capture_output=True).stdout
ours = np.array(json.loads(out)["embeddings"], dtype=np.float64)
cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
print(json.dumps({"check": "minilm-sts-embeddings", "sentences": len(sents), "cos_min": float(cos.min()),
                  "cos_mean": float(cos.mean()), "max_abs_diff": float(np.abs(ours - ref).max())}))

# 2. GGUF -> HF directory -> transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
fx = json.load(open(os.path.join(root, "tests/fixtures/smollm2.json")))
d = tempfile.mkdtemp()
subprocess.run([whittle, "convert", smol, "-o", os.path.join(d, "hf")], check=True)
model = AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"), dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(os.path.join(d, "hf"))
worst, same_tokens, same_ids = 0.0, True, True
for p in fx["prompts"]:
    ids = tok(p["text"], add_special_tokens=False)["input_ids"]
    same_ids &= ids == p["ids"]
    x = torch.tensor([p["ids"]])
    with torch.no_grad():
        logits = model(x).logits[0, -1].double()
        gen = model.generate(x, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    worst = max(worst, float((logits[p["top20_ids"]] - torch.tensor(p["top20_logits"])).abs().max() / p["max_abs_logit"]))
    same_tokens &= gen[0, len(p["ids"]):].tolist() == p["greedy32"]
print(json.dumps({"check": "smollm2-convert-in-transformers", "max_rel_logit_diff": worst, "greedy32_identical": same_tokens,
                  "tokenizer_ids_identical": same_ids, "num_parameters": sum(t.numel() for t in model.parameters())}))
