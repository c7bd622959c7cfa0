//! A BERT encoder as an ONNX graph with sentence-transformers' head, named as Optimum's feature-extraction
//! exports are: inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, (batch_size, sequence_length)),
//! outputs `last_hidden_state` (batch_size, sequence_length, C) and `sentence_embedding` (batch_size, C): mean
//! pooling over the mask and L2 normalisation, as `whittle embed` and sentence-transformers compute them.
//!
//! The graph follows [`whittle_models::bert`] in forward order (embeddings, then each block: attention,
//! residual + LayerNorm, GELU MLP, residual + LayerNorm), with each block's own head count and widths.

use whittle_models::bert::{Bert, BertBlock};
use whittle_models::nn::LayerNorm;

use super::graph::{f32_init, Attr, Dim, Graph};
use super::linear::linear;
use super::proto::DataType;
use crate::Result;

const B: &str = "batch_size";
const T: &str = "sequence_length";

/// `LayerNormalization` over the last axis (opset 17).
fn layer_norm(g: &mut Graph, name: &str, ln: &LayerNorm, x: &str) -> Result<String> {
    let w = f32_init(g, &format!("{name}.weight"), &ln.weight)?;
    let b = f32_init(g, &format!("{name}.bias"), &ln.bias)?;
    Ok(g.op("LayerNormalization", &[x, &w, &b], vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(ln.eps as f32))]))
}

/// Exact GELU, `x · ½(1 + erf(x/√2))` (opset 17 has no Gelu; ONNX Runtime fuses this pattern).
fn gelu_erf(g: &mut Graph, x: &str) -> String {
    let r = g.float(std::f32::consts::FRAC_1_SQRT_2);
    let (one, half) = (g.float(1.0), g.float(0.5));
    let s = g.op("Mul", &[x, &r], vec![]);
    let e = g.op("Erf", &[&s], vec![]);
    let e1 = g.op("Add", &[&e, &one], vec![]);
    let h = g.op("Mul", &[x, &half], vec![]);
    g.op("Mul", &[&h, &e1], vec![])
}

/// (B, T, n·d) → (B, n, T, d), or (B, n, d, T) when `keys` (ready for Q·Kᵀ).
fn heads(g: &mut Graph, x: &str, n: usize, d: usize, keys: bool) -> String {
    let shape = g.ints(&[0, 0, n as i64, d as i64]);
    let r = g.op("Reshape", &[x, &shape], vec![]);
    let perm = if keys { vec![0, 2, 3, 1] } else { vec![0, 2, 1, 3] };
    g.op("Transpose", &[&r], vec![("perm", Attr::Ints(perm))])
}

/// One post-LN block: x (B, T, C) → (B, T, C). `mask` is additive, (B, 1, 1, T).
fn block(g: &mut Graph, i: usize, b: &BertBlock, x: &str, mask: &str, head_dim: usize) -> Result<String> {
    let p = format!("encoder.layer.{i}");
    let h = b.n_head;
    let dq = b.query.out_features() / h; // low-rank attention: queries and keys narrower than head_dim
    let q = linear(g, &format!("{p}.attention.self.query"), &b.query, x)?;
    let k = linear(g, &format!("{p}.attention.self.key"), &b.key, x)?;
    let v = linear(g, &format!("{p}.attention.self.value"), &b.value, x)?;
    let (q, k, v) = (heads(g, &q, h, dq, false), heads(g, &k, h, dq, true), heads(g, &v, h, head_dim, false));
    let scale = g.float(1.0 / (dq as f32).sqrt());
    let qs = g.op("Mul", &[&q, &scale], vec![]);
    let s = g.op("MatMul", &[&qs, &k], vec![]); // (B, H, T, T)
    let s = g.op("Add", &[&s, mask], vec![]);
    let p_attn = g.op("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
    let a = g.op("MatMul", &[&p_attn, &v], vec![]); // (B, H, T, D)
    let a = g.op("Transpose", &[&a], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let shape = g.ints(&[0, 0, (h * head_dim) as i64]);
    let a = g.op("Reshape", &[&a, &shape], vec![]); // (B, T, H·D)
    let o = linear(g, &format!("{p}.attention.output.dense"), &b.attn_out, &a)?;
    let r = g.op("Add", &[&o, x], vec![]);
    let x = layer_norm(g, &format!("{p}.attention.output.LayerNorm"), &b.attn_norm, &r)?;
    let m = linear(g, &format!("{p}.intermediate.dense"), &b.intermediate, &x)?;
    let m = gelu_erf(g, &m);
    let o = linear(g, &format!("{p}.output.dense"), &b.output, &m)?;
    let r = g.op("Add", &[&o, &x], vec![]);
    layer_norm(g, &format!("{p}.output.LayerNorm"), &b.out_norm, &r)
}

/// Builds the encoder graph into `g`.
pub fn build(g: &mut Graph, m: &Bert) -> Result<()> {
    let c = &m.config;
    let ids = g.input("input_ids", DataType::Int64, &[B.into(), T.into()]);
    let mask_in = g.input("attention_mask", DataType::Int64, &[B.into(), T.into()]);
    let types = g.input("token_type_ids", DataType::Int64, &[B.into(), T.into()]);

    // Embeddings: word (through the factorisation when there is one) + token type + position, LayerNorm.
    let e = &m.embeddings;
    let word = f32_init(g, "embeddings.word_embeddings.weight", &e.word)?;
    let mut x = g.op("Gather", &[&word, &ids], vec![]); // (B, T, C) or (B, T, r)
    if let Some(v) = &e.word_v {
        let wv = f32_init(g, "embeddings.word_embeddings.weight_v", v)?;
        x = g.op("MatMul", &[&x, &wv], vec![]);
    }
    let tt = f32_init(g, "embeddings.token_type_embeddings.weight", &e.token_type)?;
    let tt = g.op("Gather", &[&tt, &types], vec![]);
    let pos = f32_init(g, "embeddings.position_embeddings.weight", &e.position)?;
    let t_len = g.op("Shape", &[&ids], vec![("start", Attr::Int(1)), ("end", Attr::Int(2))]); // [T]
    let zero = g.ints(&[0]);
    let pos = g.op("Slice", &[&pos, &zero, &t_len, &zero], vec![]); // (T, C)
    let x = g.op("Add", &[&x, &tt], vec![]);
    let x = g.op("Add", &[&x, &pos], vec![]);
    let mut x = layer_norm(g, "embeddings.LayerNorm", &e.norm, &x)?;

    // Additive mask (B, 1, 1, T): 0 where attended, the most negative f32 where padded (as whittle and
    // transformers build it).
    let mf = g.op("Cast", &[&mask_in], vec![("to", Attr::Int(DataType::Float as i64))]); // (B, T)
    let one = g.float(1.0);
    let inv = g.op("Sub", &[&one, &mf], vec![]);
    let minf = g.float(f32::MIN);
    let add = g.op("Mul", &[&inv, &minf], vec![]);
    let axes = g.ints(&[1, 2]);
    let mask = g.op("Unsqueeze", &[&add, &axes], vec![]);

    for (i, b) in m.blocks.iter().enumerate() {
        x = block(g, i, b, &x, &mask, c.head_dim)?;
    }
    g.output_from(&x, "last_hidden_state", DataType::Float, &[B.into(), T.into(), Dim::Fixed(c.hidden_size)]);

    // Mean pooling over the mask, then L2 normalisation (sentence-transformers' Pooling + Normalize).
    let ax2 = g.ints(&[2]);
    let m3 = g.op("Unsqueeze", &[&mf, &ax2], vec![]); // (B, T, 1)
    let xm = g.op("Mul", &[&x, &m3], vec![]);
    let ax1 = g.ints(&[1]);
    let sum = g.op("ReduceSum", &[&xm, &ax1], vec![("keepdims", Attr::Int(0))]); // (B, C)
    let cnt = g.op("ReduceSum", &[&m3, &ax1], vec![("keepdims", Attr::Int(0))]); // (B, 1)
    let tiny = g.float(1e-9);
    let cnt = g.op("Max", &[&cnt, &tiny], vec![]);
    let mean = g.op("Div", &[&sum, &cnt], vec![]);
    let sq = g.op("Mul", &[&mean, &mean], vec![]);
    let ss = g.op("ReduceSum", &[&sq, &ax1], vec![("keepdims", Attr::Int(1))]); // (B, 1)
    let norm = g.op("Sqrt", &[&ss], vec![]);
    let eps = g.float(1e-12);
    let norm = g.op("Max", &[&norm, &eps], vec![]);
    let emb = g.op("Div", &[&mean, &norm], vec![]);
    g.output_from(&emb, "sentence_embedding", DataType::Float, &[B.into(), Dim::Fixed(c.hidden_size)]);
    Ok(())
}
