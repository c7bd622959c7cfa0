#!/usr/bin/env python3
"""Where does an ONNX export of a LLaMA decoder first depart from whittle's run of the same model?

Reads the activations `cargo run --release -p whittle-export --example dump_hidden -- MODEL DUMP` wrote
(whittle's run of the first WikiText-2 test chunk), runs EXPORT/model.onnx in ONNX Runtime on the same ids
with every residual sum and every MatMulNBits input / output exposed as a graph output, and prints, block by
block, the relative error of ONNX Runtime's activations against whittle's, plus two exact checks of the
in-graph activation rounding:

- `round≠`: values where the graph's int8-rounded activations differ from whittle's rounding
  (`whittle_kernels::block::quantize_block_ref`, emulated here in f32) of the *same* (ONNX Runtime's) input;
- `mm rel`: MatMulNBits' output against an f64 product of its own rounded input and the dequantized weights.

usage: onnx_divergence.py EXPORT_DIR DUMP_DIR [--blocks N]
(run it with the peers' venv: ~/.cache/whittle-peers/bin/python, which has onnx and onnxruntime)
"""
import argparse
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def whittle_round(x, ab=32):
    """whittle's block activation rounding in f32: s = amax / 127, q = round_half_away(x · (1/s)), x ≈ s·q."""
    n, k = x.shape
    xb = x.reshape(n, k // ab, ab).astype(np.float32)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    s = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(s > 0, np.float32(1.0) / np.where(s > 0, s, 1), 0).astype(np.float32)
    v = (xb * inv).astype(np.float32)
    q = np.trunc((v + np.copysign(np.float32(0.5), v)).astype(np.float32))
    q = np.clip(q, -127, 127).astype(np.float32)
    return (q * s).astype(np.float32).reshape(n, k)


def rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("dump")
    ap.add_argument("--blocks", type=int, default=1000)
    ap.add_argument("--tokens", action="store_true", help="per-token detail for blocks 0 and 1")
    a = ap.parse_args()

    m = onnx.load(os.path.join(a.export, "model.onnx"))
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    # The residual stream: from the embedding Gather, each Add that takes the stream as its first input.
    x = next(n.output[0] for n in g.node if n.op_type == "Gather")
    residual = []
    for n in g.node:
        if n.op_type == "Add" and n.input[0] == x:
            x = n.output[0]
            residual.append(x)
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    raw_in = []
    for n in nbits:
        r = producer[n.input[0]]  # Reshape(xd, Shape(x))
        raw_in.append(producer[r.input[1]].input[0] if r.op_type == "Reshape" else n.input[0])
    extra = residual + [n.input[0] for n in nbits] + [n.output[0] for n in nbits] + raw_in
    have = {o.name for o in g.output}
    for name in dict.fromkeys(extra):
        if name not in have:
            g.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    ids = np.fromfile(os.path.join(a.dump, "ids.bin"), dtype=np.uint32).astype(np.int64)[None, :]
    t = ids.shape[1]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(t)[None, :]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feeds)))

    def ours(name, width):
        return np.fromfile(os.path.join(a.dump, name + ".bin"), dtype=np.float32).reshape(t, width)

    def dequant(n):
        k = next(at.i for at in n.attribute if at.name == "K")
        nn = next(at.i for at in n.attribute if at.name == "N")
        bs = next(at.i for at in n.attribute if at.name == "block_size")
        packed = numpy_helper.to_array(inits[n.input[1]]).reshape(nn, -1)
        q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(nn, -1)[:, :k].astype(np.float64)
        s = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64).reshape(nn, -1)
        z = 8.0
        if len(n.input) > 3 and n.input[3]:
            zp = numpy_helper.to_array(inits[n.input[3]]).reshape(nn, -1)
            z = np.stack([zp & 15, zp >> 4], axis=-1).reshape(nn, -1)[:, : k // bs].astype(np.float64)
            z = np.repeat(z, bs, axis=1)
        return (q - z) * np.repeat(s, bs, axis=1)  # (N, K)

    lin = ["q", "k", "v", "o", "gate", "up", "down"]
    dump_of = {"q": "qkv_in", "k": "qkv_in", "v": "qkv_in", "o": "o_in", "gate": "gate_up_in", "up": "gate_up_in",
               "down": "down_in"}
    print(f"{t} tokens; per block: rel. error of ORT vs whittle (Linear inputs, residual stream); "
          "round≠ = values the graph rounds differently from whittle's rounding of the same input; "
          "mm rel = MatMulNBits vs f64 on its own inputs")
    for b in range(min(len(nbits) // 7, a.blocks)):
        row = []
        for j, ln in enumerate(lin):
            n = nbits[7 * b + j]
            xin = outs[raw_in[7 * b + j]].reshape(t, -1)
            xd = outs[n.input[0]].reshape(t, -1)
            y = outs[n.output[0]].reshape(t, -1)
            wr = whittle_round(xin)
            neq = int((wr != xd).sum())
            mm = rel(y, xd.astype(np.float64) @ dequant(n).T) if b < 2 or b % 10 == 9 else float("nan")
            mine = ours(f"b{b}.{dump_of[ln]}", xin.shape[1])
            row.append(f"{ln}: in {rel(xin, mine):.1e} round≠ {neq}" + (f" mm {mm:.1e}" if mm == mm else ""))
            if a.tokens and b < 2 and ln in ("q", "o", "gate", "down"):
                d = np.linalg.norm(xin.astype(np.float64) - mine, axis=1) / np.linalg.norm(mine, axis=1)
                bad = np.argsort(-d)[:6]
                print(f"  b{b}.{ln} input: tokens with rel>1e-5: {int((d > 1e-5).sum())}/{t}, worst "
                      + ", ".join(f"t{i}:{d[i]:.1e}" for i in bad)
                      + f"; whittle-rounded(ORT in) vs whittle-rounded(whittle in) differ in "
                      f"{int((whittle_round(mine) != wr).sum())}")
        c = outs[residual[2 * b]].shape[-1]
        res_a = rel(outs[residual[2 * b]].reshape(t, -1), ours(f"b{b}.attn_res", c))
        res_o = rel(outs[residual[2 * b + 1]].reshape(t, -1), ours(f"b{b}.out", c))
        print(f"block {b:2}: attn_res {res_a:.2e} out {res_o:.2e} | " + "; ".join(row))
        sys.stdout.flush()
    lo = outs["logits"].reshape(t, -1)
    lw = ours("logits", lo.shape[1])
    print(f"logits rel {rel(lo, lw):.2e}, top-1 agreement {float((lo.argmax(1) == lw.argmax(1)).mean()):.4f}")


if __name__ == "__main__":
    main()
