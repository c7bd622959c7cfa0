//! One [`Linear`] as ONNX nodes, by representation: `y = x · Wᵀ + b` for `x` of shape (…, in).
//!
//! | representation | ONNX form |
//! |---|---|
//! | dense (any float dtype), sparse | `MatMul(x, Wᵀ)` with Wᵀ in f32 (sparse layers as dense: ONNX has no sparse MatMul ONNX Runtime runs) |
//! | `w8a8-dynamic` | per-token u8 activations as whittle runs them (ReduceMin/ReduceMax, Round, Clip) → `MatMulInteger(x_u8, W_q int8)` − z·Σw → `· (s_x · s_w)`; or ONNX Runtime's per-tensor `DynamicQuantizeLinear` form ([`LinearOptions::per_tensor_dynamic`]) |
//! | `w8a8-static` | explicit Q/DQ: `QuantizeLinear`/`DequantizeLinear(x, s, z)` and `DequantizeLinear(W_q, s_w, axis=1)` around a float `MatMul` |
//! | low-rank U·V | two MatMuls (`x·Vᵀ`, then `·Uᵀ`), each factor in its own form |
//! | 4-bit grouped (`w4a16` RTN / GPTQ / AWQ), GGUF `q4_0` | activations rounded to int8 per 32 as whittle runs block formats (f32 activations when the model runs with `float_activations`), then ONNX Runtime's `com.microsoft.MatMulNBits` (codes, scales, zero points as stored) |
//! | other block formats (GGUF K-quants, q4_1, …, `w8a16`, 2/3-bit) | none here: an error that says so (load with `--dequantize` for an f32 export) |
//!
//! `whittle` quantizes `w8a8-dynamic` activations per token (u8, asymmetric); ONNX's `DynamicQuantizeLinear`
//! uses one scale for the whole tensor. Both forms are offered; `whittle verify` measures either.

use std::sync::Arc;

use candle_core::DType;
use whittle_core::{Linear, LinearWeight};

use super::graph::{Attr, Graph};
use super::proto::DataType;
use crate::{Error, Result};

/// Wᵀ (in, out) of a row-major (out, in) matrix.
fn transpose<T: Copy + Default>(w: &[T], out: usize, inp: usize) -> Vec<T> {
    let mut t = vec![T::default(); w.len()];
    for r in 0..out {
        for (c, &v) in w[r * inp..(r + 1) * inp].iter().enumerate() {
            t[c * out + r] = v;
        }
    }
    t
}

/// A name safe for ONNX tensor names (they are free strings; dots kept, as Optimum's exports keep them).
fn tensor_name(name: &str, suffix: &str) -> String {
    format!("{name}.{suffix}")
}

/// Wᵀ of a dense weight as an f32 initializer, once per tensor.
fn dense_t(g: &mut Graph, name: &str, l: &Linear) -> Result<String> {
    let key = match &l.weight {
        LinearWeight::Dense(t) => format!("dense:{:?}", t.id()),
        LinearWeight::Sparse(s) => format!("sparse:{:p}", Arc::as_ptr(s)),
        _ => unreachable!("dense_t takes dense and sparse weights"),
    };
    if let Some(n) = g.cache.get(&key) {
        return Ok(n[0].clone());
    }
    let w: Vec<f32> = l.dequantize()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (o, i) = (l.out_features(), l.in_features());
    let n = g.init_f32(&tensor_name(name, "weight_t"), &[i, o], &transpose(&w, o, i));
    g.cache.insert(key, vec![n.clone()]);
    Ok(n)
}

/// Adds the bias (if any) to `y`.
fn add_bias(g: &mut Graph, name: &str, l: &Linear, y: String) -> Result<String> {
    let Some(b) = &l.bias else { return Ok(y) };
    let key = format!("bias:{:?}", b.id());
    let bn = match g.cache.get(&key) {
        Some(n) => n[0].clone(),
        None => {
            let v: Vec<f32> = b.to_dtype(DType::F32)?.to_vec1()?;
            let n = g.init_f32(&tensor_name(name, "bias"), &[v.len()], &v);
            g.cache.insert(key, vec![n.clone()]);
            n
        }
    };
    Ok(g.op("Add", &[&y, &bn], vec![]))
}

/// The int8 weights Wq ᵀ (in, out) and per-channel scales (out,) of an int8 Linear, once per tensor.
fn int8_t(g: &mut Graph, name: &str, p: &Arc<whittle_kernels::int8::PackedI8>) -> (String, String) {
    let key = format!("int8:{:p}", Arc::as_ptr(p));
    if let Some(n) = g.cache.get(&key) {
        return (n[0].clone(), n[1].clone());
    }
    let w = g.init_i8(&tensor_name(name, "weight_q_t"), &[p.k, p.m], &transpose(&p.q, p.m, p.k));
    let s = g.init_f32(&tensor_name(name, "weight_scale"), &[p.m], &p.scale);
    g.cache.insert(key, vec![w.clone(), s.clone()]);
    (w, s)
}

/// `w8a8-dynamic` as whittle runs it: each row (token) of `x` quantized to u8 with its own scale and zero
/// point (`x_u = clamp(round(x / s) + z, 0, 255)`, `s = (max(hi, 0) − min(lo, 0)) / 255`, as
/// `whittle_kernels::int8::quantize_row_ref`), an integer GEMM against the int8 weights, the zero point taken
/// out with the weights' column sums, and the two scales applied:
/// `y[n, m] = s_x[n] · s_w[m] · (Σ_k x_u[n, k] · w_q[m, k] − z[n] · Σ_k w_q[m, k])`.
///
/// ONNX Runtime's `DynamicQuantizeLinear` has one scale per tensor (the whole batch, padding included),
/// which costs MiniLM 0.2 STS-B points against whittle's per-token rounding; this form keeps whittle's
/// numbers and still runs the GEMM as `MatMulInteger` (u8 × s8).
fn per_token_dynamic(g: &mut Graph, name: &str, p: &Arc<whittle_kernels::int8::PackedI8>, x: &str) -> String {
    let (w, s_w) = int8_t(g, name, p);
    let wsum_key = format!("int8-colsum:{:p}", Arc::as_ptr(p));
    let wsum = match g.cache.get(&wsum_key) {
        Some(n) => n[0].clone(),
        None => {
            let sums: Vec<i32> = p.q.chunks(p.k).map(|r| r.iter().map(|&v| v as i32).sum()).collect();
            let raw = sums.iter().flat_map(|v| v.to_le_bytes()).collect();
            let n = g.init_raw(&tensor_name(name, "weight_q_colsum"), DataType::Int32, &[p.m], raw);
            g.cache.insert(wsum_key, vec![n.clone()]);
            n
        }
    };
    let flat = g.ints(&[-1, p.k as i64]);
    let x2 = g.op("Reshape", &[x, &flat], vec![]); // (N, K)
    let keep = vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))];
    let lo = g.op("ReduceMin", &[&x2], keep);
    let keep = vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))];
    let hi = g.op("ReduceMax", &[&x2], keep);
    let (f0, f255, tiny) = (g.float(0.0), g.float(255.0), g.float(f32::MIN_POSITIVE));
    let lo = g.op("Min", &[&lo, &f0], vec![]);
    let hi = g.op("Max", &[&hi, &f0], vec![]);
    let range = g.op("Sub", &[&hi, &lo], vec![]);
    let s = g.op("Div", &[&range, &f255], vec![]); // (N, 1)
    let s_safe = g.op("Max", &[&s, &tiny], vec![]); // an all-zero row: codes z = 0, output 0
    let inv = g.op("Reciprocal", &[&s_safe], vec![]);
    let nlo = g.op("Neg", &[&lo], vec![]);
    let z = g.op("Mul", &[&nlo, &inv], vec![]);
    let z = g.op("Round", &[&z], vec![]);
    let z = g.op("Clip", &[&z, &f0, &f255], vec![]); // (N, 1), a float holding an integer
    let xs = g.op("Mul", &[&x2, &inv], vec![]);
    let xr = g.op("Round", &[&xs], vec![]);
    let xz = g.op("Add", &[&xr, &z], vec![]);
    let xc = g.op("Clip", &[&xz, &f0, &f255], vec![]);
    let xu = g.op("Cast", &[&xc], vec![("to", Attr::Int(DataType::Uint8 as i64))]);
    let acc = g.op("MatMulInteger", &[&xu, &w], vec![]); // (N, M) int32
    let zi = g.op("Cast", &[&z], vec![("to", Attr::Int(DataType::Int32 as i64))]);
    let corr = g.op("Mul", &[&zi, &wsum], vec![]); // (N, M)
    let acc = g.op("Sub", &[&acc, &corr], vec![]);
    let accf = g.op("Cast", &[&acc], vec![("to", Attr::Int(DataType::Float as i64))]);
    let sc = g.op("Mul", &[&s, &s_w], vec![]); // (N, M) = s_x · s_w
    let y = g.op("Mul", &[&sc, &accf], vec![]);
    // Back to (…, M).
    let lead = g.op("Shape", &[x], vec![("start", Attr::Int(0)), ("end", Attr::Int(-1))]);
    let m = g.ints(&[p.m as i64]);
    let shape = g.op("Concat", &[&lead, &m], vec![("axis", Attr::Int(0))]);
    g.op("Reshape", &[&y, &shape], vec![])
}

/// `x` (…, K) with each block of `ab` values rounded as whittle's block kernels quantize activations
/// (`whittle_kernels::block::quantize_block_ref`: `s = max|x| / 127`, `q = round(x · (1/s))` in [−127, 127]
/// with ties away from zero, `x ≈ s·q`), bit for bit: ONNX's `Round` rounds ties to even, so the graph
/// rounds as `sign(v) · floor(|v| + 0.5)`, which is whittle's `trunc(v + copysign(0.5, v))` for every f32
/// (on SmolLM2, `Round` put 1–3 values per Linear input on the other side of a tie, each flipping a code).
fn block_acts(g: &mut Graph, x: &str, k: usize, ab: usize) -> String {
    let blocks = g.ints(&[-1, (k / ab) as i64, ab as i64]);
    let xb = g.op("Reshape", &[x, &blocks], vec![]); // (N, K/ab, ab)
    let ax = g.op("Abs", &[&xb], vec![]);
    let amax = g.op("ReduceMax", &[&ax], vec![("axes", Attr::Ints(vec![2])), ("keepdims", Attr::Int(1))]);
    let (f127, tiny, n127, half) = (g.float(127.0), g.float(f32::MIN_POSITIVE), g.float(-127.0), g.float(0.5));
    let s = g.op("Div", &[&amax, &f127], vec![]);
    let s = g.op("Max", &[&s, &tiny], vec![]); // an all-zero block stays zero
    let inv = g.op("Reciprocal", &[&s], vec![]);
    let v = g.op("Mul", &[&xb, &inv], vec![]);
    let av = g.op("Abs", &[&v], vec![]);
    let av = g.op("Add", &[&av, &half], vec![]);
    let av = g.op("Floor", &[&av], vec![]);
    let sg = g.op("Sign", &[&v], vec![]);
    let q = g.op("Mul", &[&sg, &av], vec![]);
    let q = g.op("Clip", &[&q, &n127, &f127], vec![]);
    let xd = g.op("Mul", &[&q, &s], vec![]);
    let shape = g.op("Shape", &[x], vec![]);
    g.op("Reshape", &[&xd, &shape], vec![])
}

/// Whether a block weight is one [`matmul_nbits`] writes: whittle's 4-bit grouped format or GGUF's Q4_0.
fn four_bit(b: &whittle_core::BlockLinear) -> bool {
    b.rtn.as_ref().map_or(b.format == "q4_0", |r| r.bits == 4)
}

/// A 4-bit block weight as ONNX Runtime's `com.microsoft.MatMulNBits`: codes packed two per byte (low nibble
/// first) as (N, K/bs, bs/2), a scale per block of `bs` weights, and, for asymmetric groups, a 4-bit zero
/// point per block; `w = (q − z) · s` with z = 8 when none is stored. whittle stores
/// `w = s · (q + off) + min`: symmetric (`off` = −8, no min) is z = 8; asymmetric (`off` = 0,
/// `min` = −s·z) gives back the integer z. Anything else has no faithful MatMulNBits form (an error).
///
/// whittle runs block formats with activations rounded to int8 per block of 32 (llama.cpp's Q8_0
/// activations: `x ≈ s·q`, `s = max|x| / 127`) unless the model runs with `float_activations`; the graph
/// computes the same: the int8 rounding in the graph ([`block_acts`]), or f32 activations straight into
/// MatMulNBits, which computes in f32 (`accuracy_level` 0) either way. One Linear agrees with whittle's to
/// float rounding (`tests/ort.rs`). Over a whole model only the f32 form agrees as closely: with int8
/// activations, the float-rounding differences every op leaves (RMSNorm's sums, attention, the GEMMs'
/// summation order; ~3e-7 relative) move a few values per Linear input across a rounding boundary, each such
/// flip changes an activation by a whole step (~1/127 of its block's range), attention carries it to every
/// later token and it seeds more flips in the next block: on SmolLM2 GPTQ w4a16 the two runs drift to ~1e-2
/// relative by block 8 (`scripts/onnx_divergence.py`) and agree on 97.5% of top-1 tokens; with f32
/// activations on both sides, on 100%.
fn matmul_nbits(
    g: &mut Graph,
    name: &str,
    b: &Arc<whittle_core::BlockLinear>,
    x: &str,
    float_activations: bool,
) -> Result<String> {
    let unsupported = |reason: String| Error::Unsupported { tensor: name.into(), repr: b.format.clone(), reason };
    let w = b.packed.unpack();
    let (n, k, bs) = (w.m, w.k, w.sb);
    let nb = k / bs;
    if let Some(&q) = w.q.iter().find(|&&q| q > 15) {
        return Err(unsupported(format!("code {q} does not fit 4 bits")));
    }
    let zps: Option<Vec<u8>> = match (&w.min, w.off) {
        (None, -8) => None,
        (Some(mins), 0) => {
            let mut z = Vec::with_capacity(mins.len());
            for (j, (&mn, &s)) in mins.iter().zip(&w.scale).enumerate() {
                let zf = if s != 0.0 { -mn / s } else { 0.0 };
                let zr = zf.round();
                // min = −s·z exactly for whittle's own asymmetric groups; a free min (GGUF Q4_1) is not.
                if !(0.0..=15.0).contains(&zr) || (zf - zr).abs() > 1e-3 {
                    return Err(unsupported(format!(
                        "block {j}: min {mn} is not −scale·z for a 4-bit z (MatMulNBits stores integer zero points)"
                    )));
                }
                z.push(zr as u8);
            }
            Some(z)
        }
        (_, off) => return Err(unsupported(format!("code offset {off} has no MatMulNBits form"))),
    };
    let key = format!("nbits:{:p}", Arc::as_ptr(b));
    let names = match g.cache.get(&key) {
        Some(v) => v.clone(),
        None => {
            let mut packed = vec![0u8; n * k / 2];
            for (i, pair) in w.q.chunks_exact(2).enumerate() {
                packed[i] = pair[0] | (pair[1] << 4);
            }
            let mut v = vec![
                g.init_u8(&tensor_name(name, "weight_q4"), &[n, nb, bs / 2], &packed),
                g.init_f32(&tensor_name(name, "weight_scale"), &[n * nb], &w.scale),
            ];
            if let Some(z) = &zps {
                let per_row = nb.div_ceil(2);
                let mut zp = vec![0u8; n * per_row];
                for r in 0..n {
                    for j in 0..nb {
                        zp[r * per_row + j / 2] |= z[r * nb + j] << (4 * (j % 2));
                    }
                }
                v.push(g.init_u8(&tensor_name(name, "weight_zero_point"), &[n * per_row], &zp));
            }
            g.cache.insert(key, v.clone());
            v
        }
    };
    g.import("com.microsoft", 1);
    let xq = if float_activations { x.to_string() } else { block_acts(g, x, k, b.packed.act_block) };
    let inputs: Vec<&str> = std::iter::once(xq.as_str()).chain(names.iter().map(String::as_str)).collect();
    let attrs = vec![
        ("K", Attr::Int(k as i64)),
        ("N", Attr::Int(n as i64)),
        ("bits", Attr::Int(4)),
        ("block_size", Attr::Int(bs as i64)),
        ("accuracy_level", Attr::Int(0)),
    ];
    Ok(g.op_n("MatMulNBits", "com.microsoft", &inputs, 1, attrs).remove(0))
}

/// How representations map to ONNX where there is a choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinearOptions {
    /// `w8a8-dynamic` as ONNX Runtime's `quantize_dynamic` form: `DynamicQuantizeLinear` (one activation scale
    /// per tensor) + `MatMulInteger`, instead of whittle's per-token scales.
    pub per_tensor_dynamic: bool,
}

/// Emits `l` applied to `x`; returns the output's name. `name` is the Linear's HF name (initializer names
/// derive from it).
pub fn linear(g: &mut Graph, name: &str, l: &Linear, x: &str) -> Result<String> {
    let o = g.options;
    let y = match &l.weight {
        LinearWeight::Dense(_) | LinearWeight::Sparse(_) => {
            let w = dense_t(g, name, l)?;
            g.op("MatMul", &[x, &w], vec![])
        }
        LinearWeight::Int8Dynamic(p) if o.per_tensor_dynamic => {
            let (w, s_w) = int8_t(g, name, p);
            let q = g.op_n("DynamicQuantizeLinear", "", &[x], 3, vec![]); // x_u8, s_x (scalar), z_x (scalar u8)
            let acc = g.op("MatMulInteger", &[&q[0], &w, &q[2]], vec![]); // (…, out) int32
            let accf = g.op("Cast", &[&acc], vec![("to", Attr::Int(DataType::Float as i64))]);
            let s = g.op("Mul", &[&s_w, &q[1]], vec![]); // (out,) = s_w · s_x
            g.op("Mul", &[&accf, &s], vec![])
        }
        LinearWeight::Int8Dynamic(p) => per_token_dynamic(g, name, p, x),
        LinearWeight::Int8Static { p, scale, zero } => {
            let (w, s_w) = int8_t(g, name, p);
            let zero = u8::try_from(*zero).map_err(|_| Error::Unsupported {
                tensor: name.into(),
                repr: "w8a8-static".into(),
                reason: format!("activation zero point {zero} is outside u8"),
            })?;
            let s_x = g.float(*scale);
            let z_x = {
                let n = format!("{name}.input_zero_point");
                g.init_u8(&n, &[], &[zero])
            };
            let xq = g.op("QuantizeLinear", &[x, &s_x, &z_x], vec![]);
            let xd = g.op("DequantizeLinear", &[&xq, &s_x, &z_x], vec![]);
            let wd = g.op("DequantizeLinear", &[&w, &s_w], vec![("axis", Attr::Int(1))]);
            g.op("MatMul", &[&xd, &wd], vec![])
        }
        LinearWeight::LowRank(lr) => {
            let h = linear(g, &format!("{name}.v"), &lr.v, x)?;
            let mut u = lr.u.clone();
            u.bias = None;
            linear(g, &format!("{name}.u"), &u, &h)?
        }
        LinearWeight::Block(b) if four_bit(b) => matmul_nbits(g, name, b, x, l.dispatch().float_activations)?,
        LinearWeight::Block(b) => {
            return Err(Error::Unsupported {
                tensor: name.into(),
                repr: b.format.clone(),
                reason: "this block format has no faithful ONNX form in this exporter (4-bit grouped \
                         `w4a16` and GGUF `q4_0` do, as com.microsoft.MatMulNBits); load the model with \
                         `--dequantize` to export its f32 dequantization"
                    .into(),
            })
        }
    };
    add_bias(g, name, l, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_rows_to_columns() {
        // (2, 3) → (3, 2)
        assert_eq!(transpose(&[1, 2, 3, 4, 5, 6], 2, 3), vec![1, 4, 2, 5, 3, 6]);
    }
}
