//! A LLaMA-family decoder with a KV cache as an ONNX graph, named as Optimum's and transformers.js'
//! `text-generation-with-past` exports are:
//!
//! - inputs: `input_ids` (batch_size, sequence_length), `attention_mask` (batch_size,
//!   past_sequence_length + sequence_length), `position_ids` (batch_size, sequence_length), all int64, and per
//!   block `past_key_values.N.key` / `.value`, f32 (batch_size, kv_heads_N, past_sequence_length, head_dim);
//! - outputs: `logits` (batch_size, sequence_length, vocab) and `present.N.key` / `.value` (the past with
//!   this call's keys and values appended).
//!
//! Each block keeps its own head and KV-head counts and FFN width (structured pruning), and grouped-query
//! attention repeats each KV head for its query heads, as `modeling_llama.py`'s `repeat_kv`. RoPE is the
//! "rotate half" convention of HF checkpoints (whittle's loader already undid llama.cpp's permutation), with
//! the model's own inverse frequencies (rope scaling included).

use whittle_core::LinearWeight;
use whittle_models::llama::{Llama, LlamaBlock};
use whittle_models::nn::RmsNorm;

use super::graph::{f32_init, Attr, Dim, Graph};
use super::linear::linear;
use super::proto::DataType;
use crate::Result;

const B: &str = "batch_size";
const T: &str = "sequence_length";
const P: &str = "past_sequence_length";
const TOTAL: &str = "past_sequence_length + sequence_length";

/// RMSNorm, `x / √(mean(x²) + ε) · w` (opset 17 has no RMSNormalization; ONNX Runtime fuses this pattern).
fn rms_norm(g: &mut Graph, name: &str, n: &RmsNorm, x: &str) -> Result<String> {
    let w = f32_init(g, &format!("{name}.weight"), &n.weight)?;
    let sq = g.op("Mul", &[x, x], vec![]);
    let ms = g.op("ReduceMean", &[&sq], vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))]);
    let eps = g.float(n.eps as f32);
    let ms = g.op("Add", &[&ms, &eps], vec![]);
    let d = g.op("Sqrt", &[&ms], vec![]);
    let y = g.op("Div", &[x, &d], vec![]);
    Ok(g.op("Mul", &[&y, &w], vec![]))
}

/// The rotary embedding of `x` (B, n, T, D): `x·cos + rotate_half(x)·sin`, cos and sin (B, 1, T, D).
fn rope(g: &mut Graph, x: &str, cos: &str, sin: &str, d: usize) -> String {
    let half = (d / 2) as i64;
    let (s0, s1, s2, ax) = (g.ints(&[0]), g.ints(&[half]), g.ints(&[d as i64]), g.ints(&[3]));
    let x1 = g.op("Slice", &[x, &s0, &s1, &ax], vec![]);
    let x2 = g.op("Slice", &[x, &s1, &s2, &ax], vec![]);
    let nx2 = g.op("Neg", &[&x2], vec![]);
    let rot = g.op("Concat", &[&nx2, &x1], vec![("axis", Attr::Int(-1))]);
    let a = g.op("Mul", &[x, cos], vec![]);
    let b = g.op("Mul", &[&rot, sin], vec![]);
    g.op("Add", &[&a, &b], vec![])
}

/// (B, T, n·d) → (B, n, T, d).
fn heads(g: &mut Graph, x: &str, n: usize, d: usize) -> String {
    let shape = g.ints(&[0, 0, n as i64, d as i64]);
    let r = g.op("Reshape", &[x, &shape], vec![]);
    g.op("Transpose", &[&r], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))])
}

/// KV heads repeated for their `rep` query heads each: (B, KV, S, D) → (B, KV·rep, S, D).
fn repeat_kv(g: &mut Graph, x: &str, kv: usize, rep: usize, d: usize) -> String {
    if rep == 1 {
        return x.into();
    }
    let ax = g.ints(&[2]);
    let x5 = g.op("Unsqueeze", &[x, &ax], vec![]); // (B, KV, 1, S, D)
    let bc = g.ints(&[1, 1, rep as i64, 1, 1]);
    let e = g.op("Expand", &[&x5, &bc], vec![]); // (B, KV, rep, S, D)
    let shape = g.ints(&[0, (kv * rep) as i64, -1, d as i64]);
    g.op("Reshape", &[&e, &shape], vec![])
}

/// One pre-norm block: `x += attn(norm(x)); x += mlp(norm(x))`. Writes `present.{i}.key/value`.
#[allow(clippy::too_many_arguments)]
fn block(
    g: &mut Graph,
    i: usize,
    b: &LlamaBlock,
    x: &str,
    cos: &str,
    sin: &str,
    mask: &str,
    d: usize,
) -> Result<String> {
    let p = format!("model.layers.{i}");
    let (h, kv) = (b.n_head, b.n_kv_head);
    let hx = rms_norm(g, &format!("{p}.input_layernorm"), &b.attn_norm, x)?;
    let q = linear(g, &format!("{p}.self_attn.q_proj"), &b.q, &hx)?;
    let k = linear(g, &format!("{p}.self_attn.k_proj"), &b.k, &hx)?;
    let v = linear(g, &format!("{p}.self_attn.v_proj"), &b.v, &hx)?;
    let q = heads(g, &q, h, d); // (B, H, T, D)
    let k = heads(g, &k, kv, d); // (B, KV, T, D)
    let v = heads(g, &v, kv, d);
    let q = rope(g, &q, cos, sin, d);
    let k = rope(g, &k, cos, sin, d);
    let (pk, pv) = (format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value"));
    let (nk, nv) = (format!("present.{i}.key"), format!("present.{i}.value"));
    g.op_into("Concat", &[&pk, &k], &[&nk], vec![("axis", Attr::Int(2))]); // (B, KV, S, D)
    g.op_into("Concat", &[&pv, &v], &[&nv], vec![("axis", Attr::Int(2))]);
    let kr = repeat_kv(g, &nk, kv, h / kv, d); // (B, H, S, D)
    let vr = repeat_kv(g, &nv, kv, h / kv, d);
    let kt = g.op("Transpose", &[&kr], vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))]); // (B, H, D, S)
    let s = g.op("MatMul", &[&q, &kt], vec![]); // (B, H, T, S)
    let scale = g.float(1.0 / (d as f32).sqrt());
    let s = g.op("Mul", &[&s, &scale], vec![]);
    let s = g.op("Add", &[&s, mask], vec![]);
    let pr = g.op("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
    let a = g.op("MatMul", &[&pr, &vr], vec![]); // (B, H, T, D)
    let a = g.op("Transpose", &[&a], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let shape = g.ints(&[0, 0, (h * d) as i64]);
    let a = g.op("Reshape", &[&a, &shape], vec![]); // (B, T, H·D)
    let o = linear(g, &format!("{p}.self_attn.o_proj"), &b.o, &a)?;
    let x = g.op("Add", &[x, &o], vec![]);
    let hm = rms_norm(g, &format!("{p}.post_attention_layernorm"), &b.mlp_norm, &x)?;
    let gt = linear(g, &format!("{p}.mlp.gate_proj"), &b.gate, &hm)?;
    let up = linear(g, &format!("{p}.mlp.up_proj"), &b.up, &hm)?;
    let sg = g.op("Sigmoid", &[&gt], vec![]);
    let silu = g.op("Mul", &[&gt, &sg], vec![]);
    let m = g.op("Mul", &[&silu, &up], vec![]); // (B, T, F)
    let dn = linear(g, &format!("{p}.mlp.down_proj"), &b.down, &m)?;
    Ok(g.op("Add", &[&x, &dn], vec![]))
}

/// Builds the decoder graph into `g`; returns the input and output names.
pub fn build(g: &mut Graph, m: &Llama) -> Result<(Vec<String>, Vec<String>)> {
    let c = &m.config;
    let d = c.head_dim;
    let ids = g.input("input_ids", DataType::Int64, &[B.into(), T.into()]);
    let am = g.input("attention_mask", DataType::Int64, &[B.into(), TOTAL.into()]);
    let pos = g.input("position_ids", DataType::Int64, &[B.into(), T.into()]);
    let mut ins = vec![ids.clone(), am.clone(), pos.clone()];
    for (i, b) in m.blocks.iter().enumerate() {
        for kind in ["key", "value"] {
            let n = format!("past_key_values.{i}.{kind}");
            g.input(&n, DataType::Float, &[B.into(), Dim::Fixed(b.n_kv_head), P.into(), Dim::Fixed(d)]);
            ins.push(n);
        }
    }

    // RoPE tables from the positions: angles p·θ_i in f32 (as whittle and transformers compute them), the
    // half-width table repeated twice (the "rotate half" layout). cos, sin: (B, 1, T, D).
    let inv = g.floats(&c.inv_freq());
    let pf = g.op("Cast", &[&pos], vec![("to", Attr::Int(DataType::Float as i64))]);
    let ax2 = g.ints(&[2]);
    let p3 = g.op("Unsqueeze", &[&pf, &ax2], vec![]); // (B, T, 1)
    let fr = g.op("Mul", &[&p3, &inv], vec![]); // (B, T, D/2)
    let emb = g.op("Concat", &[&fr, &fr], vec![("axis", Attr::Int(-1))]); // (B, T, D)
    let ax1 = g.ints(&[1]);
    let cos = g.op("Cos", &[&emb], vec![]);
    let cos = g.op("Unsqueeze", &[&cos, &ax1], vec![]);
    let sin = g.op("Sin", &[&emb], vec![]);
    let sin = g.op("Unsqueeze", &[&sin, &ax1], vec![]);

    // Mask (B, 1, T, S): causal (query i sits at position past + i and sees keys 0..=past+i) plus padding
    // from `attention_mask`, both as the most negative f32, clamped so a fully masked row stays finite.
    let total = g.op("Shape", &[&am], vec![("start", Attr::Int(1)), ("end", Attr::Int(2))]); // [S]
    let t_len = g.op("Shape", &[&ids], vec![("start", Attr::Int(1)), ("end", Attr::Int(2))]); // [T]
    let past = g.op("Sub", &[&total, &t_len], vec![]);
    let ax0 = g.ints(&[0]);
    let total_s = g.op("Squeeze", &[&total, &ax0], vec![]);
    let past_s = g.op("Squeeze", &[&past, &ax0], vec![]);
    let (zero, one) = (g.int(0), g.int(1));
    let rows = g.op("Range", &[&past_s, &total_s, &one], vec![]); // (T,)
    let rows = g.op("Unsqueeze", &[&rows, &ax1], vec![]); // (T, 1)
    let cols = g.op("Range", &[&zero, &total_s, &one], vec![]); // (S,)
    let cols = g.op("Unsqueeze", &[&cols, &ax0], vec![]); // (1, S)
    let allowed = g.op("LessOrEqual", &[&cols, &rows], vec![]); // (T, S)
    let (f0, fmin, f1) = (g.float(0.0), g.float(f32::MIN), g.float(1.0));
    let causal = g.op("Where", &[&allowed, &f0, &fmin], vec![]);
    let mf = g.op("Cast", &[&am], vec![("to", Attr::Int(DataType::Float as i64))]); // (B, S)
    let inv_m = g.op("Sub", &[&f1, &mf], vec![]);
    let pad = g.op("Mul", &[&inv_m, &fmin], vec![]);
    let ax12 = g.ints(&[1, 2]);
    let pad = g.op("Unsqueeze", &[&pad, &ax12], vec![]); // (B, 1, 1, S)
    let mask = g.op("Add", &[&causal, &pad], vec![]); // (B, 1, T, S)
    let mask = g.op("Max", &[&mask, &fmin], vec![]);

    let embed = f32_init(g, "model.embed_tokens.weight", &m.embed_tokens)?;
    let mut x = g.op("Gather", &[&embed, &ids], vec![]); // (B, T, C)
    for (i, b) in m.blocks.iter().enumerate() {
        x = block(g, i, b, &x, &cos, &sin, &mask, d)?;
    }
    let h = rms_norm(g, "model.norm", &m.norm, &x)?;
    // A head tied to the embedding reads the same initializer, transposed in the graph (stored once).
    let logits = match &m.lm_head.weight {
        LinearWeight::Dense(t) if t.id() == m.embed_tokens.id() => {
            let et = g.op("Transpose", &[&embed], vec![("perm", Attr::Ints(vec![1, 0]))]); // (C, V)
            g.op("MatMul", &[&h, &et], vec![])
        }
        _ => linear(g, "lm_head", &m.lm_head, &h)?,
    };
    g.output_from(&logits, "logits", DataType::Float, &[B.into(), T.into(), Dim::Fixed(c.vocab_size)]);
    let mut outs = vec!["logits".to_string()];
    for (i, b) in m.blocks.iter().enumerate() {
        for kind in ["key", "value"] {
            let n = format!("present.{i}.{kind}");
            g.output(&n, DataType::Float, &[B.into(), Dim::Fixed(b.n_kv_head), TOTAL.into(), Dim::Fixed(d)]);
            outs.push(n);
        }
    }
    Ok((ins, outs))
}
