"""llama.cpp (llama-cpp-python) speed, and optionally perplexity, on F16 / BF16 GGUF files, for the
half-precision bars in README. Same protocol as /work/shared/peers/llamacpp_peers.py (pp512 after an
8-token warm-up, tg128 after a 16-token prompt, PPL: 512-token chunks scoring the second half), plus BF16
(llama.cpp ftype 32), which that script's type table lacks.
usage: python half_peers.py make IN.gguf OUT.gguf {F16|BF16}     (llama.cpp's own conversion)
       python half_peers.py speed FILE.gguf [reps]              (one JSON line per rep)
       python half_peers.py ppl FILE.gguf WIKI_TEST_RAW [chunks]"""
import ctypes, json, os, sys, time
import numpy as np
import llama_cpp

FT = {"F32": 0, "F16": 1, "BF16": 32}
threads = os.cpu_count()


def make(inp, out, t):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FT[t]; p.allow_requantize = True; p.nthread = threads
    assert llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(p)) == 0, f"quantize {t} failed"


def speed(path, pp=512, tg=128):
    llm = llama_cpp.Llama(path, n_ctx=1024, n_batch=512, logits_all=False, n_threads=threads, verbose=False)
    toks = list(range(1000, 1000 + pp))
    llm.reset(); llm.eval(toks[:8])  # warm-up
    llm.reset(); t = time.perf_counter(); llm.eval(toks); pp_s = pp / (time.perf_counter() - t)
    llm.reset(); llm.eval(toks[:16]); t = time.perf_counter()
    for i in range(tg): llm.eval([toks[16 + i]])
    tg_s = tg / (time.perf_counter() - t)
    return pp_s, tg_s


def ppl(path, wiki, n_chunks, n_ctx=512):
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads, verbose=False)
    toks = llm.tokenize(open(wiki, encoding="utf-8").read().encode(), add_bos=True)
    bos, nll, cnt, first = llm.token_bos(), 0.0, 0, n_ctx // 2
    for c in range(min(n_chunks, len(toks) // n_ctx)):
        chunk = toks[c * n_ctx:(c + 1) * n_ctx]; chunk[0] = bos
        llm.reset(); llm.eval(chunk)
        lp = np.array(llm.scores[:n_ctx], dtype=np.float64)
        lp = lp - lp.max(1, keepdims=True); lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
        for i in range(first - 1, n_ctx - 1):
            nll -= lp[i, chunk[i + 1]]; cnt += 1
    return float(np.exp(nll / cnt))


cmd = sys.argv[1]
if cmd == "make":
    make(sys.argv[2], sys.argv[3], sys.argv[4])
elif cmd == "speed":
    for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 1):
        pp_s, tg_s = speed(sys.argv[2])
        print(json.dumps({"peer": "llama.cpp", "file": sys.argv[2], "pp512_tok_s": round(pp_s, 1), "tg128_tok_s": round(tg_s, 1)}), flush=True)
elif cmd == "ppl":
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    print(json.dumps({"peer": "llama.cpp", "file": sys.argv[2], "chunks": n, "ppl_wt2_ctx512": round(ppl(sys.argv[2], sys.argv[3], n), 4)}))
else:
    sys.exit(__doc__)
