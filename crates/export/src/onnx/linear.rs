//! One [`Linear`] as ONNX nodes, by representation: `y = x · Wᵀ + b` for `x` of shape (…, in).
//!
//! | representation | ONNX form |
//! |---|---|
//! | dense (any float dtype), sparse | `MatMul(x, Wᵀ)` with Wᵀ in f32 (sparse layers as dense: ONNX has no sparse MatMul ONNX Runtime runs) |
//! | `w8a8-dynamic` | ONNX Runtime's dynamic form: `DynamicQuantizeLinear(x)` → `MatMulInteger(x_u8, W_q int8, x_zp)` → `Cast` → `· (s_x · s_w)` |
//! | `w8a8-static` | explicit Q/DQ: `QuantizeLinear`/`DequantizeLinear(x, s, z)` and `DequantizeLinear(W_q, s_w, axis=1)` around a float `MatMul` |
//! | low-rank U·V | two MatMuls (`x·Vᵀ`, then `·Uᵀ`), each factor in its own form |
//! | block formats (GGUF types, grouped wNa16) | none here: an error that says so (load with `--dequantize` for an f32 export) |
//!
//! `whittle` quantizes `w8a8-dynamic` activations per token (u8, asymmetric); ONNX's `DynamicQuantizeLinear`
//! uses one scale for the whole tensor. Same weights, coarser activations: the STS figure of the export is
//! measured by `whittle verify`, not assumed.

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

/// Emits `l` applied to `x`; returns the output's name. `name` is the Linear's HF name (initializer names
/// derive from it).
pub fn linear(g: &mut Graph, name: &str, l: &Linear, x: &str) -> Result<String> {
    let y = match &l.weight {
        LinearWeight::Dense(_) | LinearWeight::Sparse(_) => {
            let w = dense_t(g, name, l)?;
            g.op("MatMul", &[x, &w], vec![])
        }
        LinearWeight::Int8Dynamic(p) => {
            let (w, s_w) = int8_t(g, name, p);
            let q = g.op_n("DynamicQuantizeLinear", "", &[x], 3, vec![]); // x_u8, s_x (scalar), z_x (scalar u8)
            let acc = g.op("MatMulInteger", &[&q[0], &w, &q[2]], vec![]); // (…, out) int32
            let accf = g.op("Cast", &[&acc], vec![("to", Attr::Int(DataType::Float as i64))]);
            let s = g.op("Mul", &[&s_w, &q[1]], vec![]); // (out,) = s_w · s_x
            g.op("Mul", &[&accf, &s], vec![])
        }
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
        LinearWeight::Block(b) => {
            return Err(Error::Unsupported {
                tensor: name.into(),
                repr: b.format.clone(),
                reason: "block-quantized weights have no faithful ONNX form in this exporter; load the model \
                         with `--dequantize` to export its f32 dequantization"
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
