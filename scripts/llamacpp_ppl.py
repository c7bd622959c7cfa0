#!/usr/bin/env python3
"""Perplexity of a GGUF file in llama.cpp (llama-cpp-python), with the protocol of ../shared/peers/llamacpp_peers.py
(chunks of 512, first token of each chunk set to BOS, second half scored): checks that a GGUF written by whittle
loads and runs in llama.cpp with the PPL whittle reports.
usage: ~/.cache/whittle-peers/bin/python scripts/llamacpp_ppl.py FILE.gguf [WIKI_TEST_RAW] [CHUNKS]"""
import json, os, sys
import numpy as np
import llama_cpp

path = sys.argv[1]
wiki = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "data/wikitext-2/wiki.test.raw")
n_chunks = int(sys.argv[3]) if len(sys.argv) > 3 else 16
n_ctx = 512
llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=os.cpu_count(), verbose=False)
toks = llm.tokenize(open(wiki, encoding="utf-8").read().encode(), add_bos=True)
nll, cnt, first = 0.0, 0, n_ctx // 2
for c in range(min(n_chunks, len(toks) // n_ctx)):
    chunk = toks[c * n_ctx:(c + 1) * n_ctx]
    chunk[0] = llm.token_bos()
    llm.reset(); llm.eval(chunk)
    lp = np.array(llm.scores[:n_ctx], dtype=np.float64)
    lp = lp - lp.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    for i in range(first - 1, n_ctx - 1):
        nll -= lp[i, chunk[i + 1]]; cnt += 1
print(json.dumps({"peer": "llama.cpp", "file": path, "ppl": float(np.exp(nll / cnt)), "tokens": cnt, "chunks": n_chunks}))
