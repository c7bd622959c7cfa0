#!/usr/bin/env python3
"""Writes the golden fixtures whittle's tests compare against (tests/fixtures/*.json).

Reference implementations: sentence-transformers for all-MiniLM-L6-v2, transformers (loading the GGUF
with `gguf_file=`, which dequantizes to f32) for SmolLM2-135M-Instruct. Regenerate with:

    ../shared/peers/setup.sh                      # once: torch, transformers, sentence-transformers, gguf
    scripts/fetch-models.sh
    ~/.cache/whittle-peers/bin/python scripts/make_reference.py
"""
import json
import os
import sys

import torch

MODELS = os.environ.get("WHITTLE_MODELS", os.path.expanduser("~/.cache/whittle/models"))
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Hi",
    "Stocks fell 3.5% on Tuesday after the central bank raised rates to 5.25 percent.",
    "naïve café — Zürich, 東京 and São Paulo!",
    "Is this the right way?  Double  spaces\tand tabs.",
    "A woman slices a tomato.",
    " ".join(["This sentence is repeated many times to exceed the truncation limit."] * 30),
]

TOKENIZER_TEXTS = [
    "In 1999, 12345 people met at 10:30 in room 42.",
    "naïve café — Zürich, 東京, emoji 🙂 and São Paulo",
    "  leading spaces\n\nnew lines\tand tabs  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "def f(x):\n    return x**2  # square",
]

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]


def minilm():
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    d = os.path.join(MODELS, "all-MiniLM-L6-v2")
    st = SentenceTransformer(d, device="cpu")
    tok = AutoTokenizer.from_pretrained(d)
    emb = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False, batch_size=32)
    ids = [tok(s, truncation=True, max_length=st.max_seq_length)["input_ids"] for s in SENTENCES]
    return {
        "model": "all-MiniLM-L6-v2",
        "reference": "sentence-transformers (mean pooling + Normalize)",
        "max_seq_length": st.max_seq_length,
        "sentences": SENTENCES,
        "token_ids": ids,
        "embeddings": [[float(x) for x in row] for row in emb],
        "num_parameters": sum(p.numel() for p in st[0].auto_model.parameters()),
    }


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=gguf, dtype=torch.float32)
    model.eval()
    out = {
        "model": gguf,
        "reference": "transformers, GGUF dequantized to f32",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TOKENIZER_TEXTS],
        "prompts": [],
    }
    for p in PROMPTS:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, -1].double()
            gen = model.generate(x, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        top = torch.topk(logits, 20)
        out["prompts"].append({
            "text": p,
            "ids": ids,
            "top20_ids": top.indices.tolist(),
            "top20_logits": top.values.tolist(),
            "logsumexp": float(torch.logsumexp(logits, 0)),
            "max_abs_logit": float(logits.abs().max()),
            "greedy32": gen[0, len(ids):].tolist(),
        })
    return out


def eval_refs():
    """Protocol references for `whittle eval` on small subsets (tests/fixtures/eval.json)."""
    from scipy.stats import spearmanr
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = {}
    # Perplexity, llama.cpp protocol (BOS only as each chunk's first token: SmolLM2 does not add BOS), 2 chunks of 512.
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=gguf, dtype=torch.float32).eval()
    text = open(os.path.join(root, "data/wikitext-2/wiki.test.raw"), encoding="utf-8").read()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_ctx, first, nll, cnt = 512, 256, 0.0, 0
    for c in range(2):
        chunk = ids[c * n_ctx:(c + 1) * n_ctx]
        chunk[0] = tok.bos_token_id
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), -1)
        for i in range(first - 1, n_ctx - 1):
            nll -= float(lp[i, chunk[i + 1]]); cnt += 1
    out["ppl_smollm2_q4_1_2x512"] = {"ppl": float(torch.tensor(nll / cnt).exp()), "tokens": cnt, "n_text_tokens": len(ids)}
    # Cloze: greedy continuation of the first 20 lines, judged by the same rule as whittle's.
    lines = [json.loads(l)["text"] for l in open(os.path.join(root, "data/cloze/wikitext2-test-cloze.jsonl"), encoding="utf-8")][:20]
    correct = []
    for line in lines:
        ctx, target = line.rstrip().rsplit(None, 1)
        x = torch.tensor([tok(ctx, add_special_tokens=False)["input_ids"]])
        n = len(tok(" " + target, add_special_tokens=False)["input_ids"]) + 1
        with torch.no_grad():
            g = model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        cont = tok.decode(g[0, x.shape[1]:], skip_special_tokens=True).lstrip()
        correct.append(cont.startswith(target) and not cont[len(target):][:1].isalnum())
    out["cloze_smollm2_q4_1_first20"] = {"cloze_acc": 100.0 * sum(correct) / len(correct), "correct": correct}
    # STS-B: PyTorch mean pooling, 128-token cap, first 200 pairs.
    d = os.path.join(MODELS, "all-MiniLM-L6-v2")
    btok, bert = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    rows = [l.rstrip("\n").split("\t") for l in open(os.path.join(root, "data/stsbenchmark/sts-test.tsv"), encoding="utf-8")][1:201]
    def emb(s):
        b = btok(s, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            h = bert(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    a, b = emb([r[5] for r in rows]), emb([r[6] for r in rows])
    rho = spearmanr((a * b).sum(1).numpy(), [float(r[4]) for r in rows]).correlation
    out["sts_minilm_first200"] = {"sts_spearman": 100.0 * rho, "pairs": len(rows)}
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    which = sys.argv[1:] or ["minilm", "smollm2", "eval"]
    for name in which:
        data = {"minilm": minilm, "smollm2": smollm2, "eval": eval_refs}[name]()
        path = os.path.join(OUT, f"{name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, ensure_ascii=False)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
