//! `whittle export --format compressed-tensors`: a LLaMA-family model as the Hugging Face directory that
//! llm-compressor writes and transformers (with the `compressed-tensors` package) and vLLM load.
//!
//! The layout, as `compressed-tensors` 0.20 reads it (`compressors/pack_quantized`, `naive_quantized`,
//! `ModelCompressor.update_config`):
//! - **`pack-quantized`** (weight-only grouped int-N, whittle's `wNa16-gG[-asym]`): `weight_packed` int32
//!   (out, ⌈in·N/32⌉), the signed codes `q ∈ [−2^(N−1), 2^(N−1))` plus `2^(N−1)` packed densely, element `i`
//!   of a row at bit `i·N` of the row's little-endian word stream (`pack_to_int32`); `weight_scale` in the model
//!   dtype (out, in/G); `weight_shape` int64 `[out, in]`; asymmetric: `weight_zero_point`, the signed zero
//!   points packed the same way along the *output* dimension (⌈out·N/32⌉, in/G). Dequantized `w = s·(q − z)`.
//!   whittle's stored codes are exactly the packed unsigned values (symmetric: `q + 2^(N−1)`; asymmetric:
//!   codes in `[0, 2^N)` with zero point `z`, both shifted by `2^(N−1)` in compressed-tensors' signed form),
//!   so the codes are copied one for one ([`pack_rows`]).
//! - **`int-quantized`** (whittle's `w8a8-dynamic`: int8 weights per output channel, activations per token):
//!   `weight` int8 (out, in), `weight_scale` (out, 1); the scheme's activations are symmetric int8 per
//!   token, dynamic (whittle's are asymmetric u8 per token: the same weights, a finer activation grid).
//! - Dense Linears (and the head) keep `weight` in the model dtype and are listed in `ignore`; embeddings and
//!   norms are in the model dtype. `quantization_config` has llm-compressor's keys (`config_groups` with
//!   `targets` `["Linear"]` when one scheme covers every quantized Linear, else the Linears' names).
//!
//! The scales are whittle's f32 rounded to the model dtype (f16 by default, as llm-compressor writes them):
//! the codes are identical and the report gives the weight error the rounding adds per tensor
//! ([`Conversion::Codes`]); with `dtype` f32 the export is exact. Other representations (GGUF block types,
//! w8a8-static, low-rank, sparse, shared blocks, per-block widths) have no compressed-tensors form that
//! transformers loads, and are an error naming the tensor — never a silent dequantization.

use crate::gguf::errors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::{json, Value};
use whittle_core::{Linear, LinearWeight, Stored};
use whittle_models::llama::{Llama, RopeScaling};
use whittle_models::{Loaded, Model};

use crate::gguf::Conversion;
use crate::{Error, Result};

/// `quantization_config.quant_method`.
pub const QUANT_METHOD: &str = "compressed-tensors";
/// The `compressed-tensors` release whose layout this writer follows (written as `version`, as
/// llm-compressor writes the installed one).
pub const CT_VERSION: &str = "0.20.1";

/// Options of [`export`].
#[derive(Debug, Clone)]
pub struct CtOptions {
    /// The model dtype: embeddings, norms, dense weights and scales (f16 as llm-compressor writes, bf16, or
    /// f32 for scales exactly as whittle holds them).
    pub dtype: DType,
}

impl Default for CtOptions {
    fn default() -> Self {
        CtOptions { dtype: DType::F16 }
    }
}

/// One quantization scheme of the export (a `config_groups` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scheme {
    /// Weight-only grouped int-N (`pack-quantized`).
    Packed { bits: u32, group: usize, symmetric: bool },
    /// int8 weights per output channel, int8 activations per token, dynamic (`int-quantized`, W8A8).
    W8A8,
}

impl Scheme {
    /// compressed-tensors' compression format of the scheme.
    pub fn format(self) -> &'static str {
        match self {
            Scheme::Packed { .. } => "pack-quantized",
            Scheme::W8A8 => "int-quantized",
        }
    }

    /// `w4a16-g128`, `w4a16-g32-asym`, `w8a8`.
    pub fn name(self) -> String {
        match self {
            Scheme::Packed { bits, group, symmetric } => {
                format!("w{bits}a16-g{group}{}", if symmetric { "" } else { "-asym" })
            }
            Scheme::W8A8 => "w8a8".into(),
        }
    }

    /// The `config_groups` entry, with the fields `QuantizationScheme.model_dump()` writes.
    fn json(self, targets: &[String]) -> Value {
        let (weights, input) = match self {
            Scheme::Packed { bits, group, symmetric } => (
                json!({"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group,
                       "strategy": "group", "dynamic": false}),
                Value::Null,
            ),
            Scheme::W8A8 => (
                json!({"num_bits": 8, "type": "int", "symmetric": true, "group_size": null,
                       "strategy": "channel", "dynamic": false}),
                json!({"num_bits": 8, "type": "int", "symmetric": true, "group_size": null,
                       "strategy": "token", "dynamic": true}),
            ),
        };
        json!({"targets": targets, "weights": weights, "input_activations": input, "output_activations": null,
               "format": self.format()})
    }
}

/// One tensor of the export.
#[derive(Debug, Clone, Serialize)]
pub struct CtTensorRow {
    /// The Linear or tensor (HF name, `model.layers.3.self_attn.q_proj`, `model.norm.weight`).
    pub name: String,
    /// whittle's representation of it (`w4a16-g32`, `f32`, …).
    pub source: String,
    /// How it is stored (`pack-quantized w4a16-g32`, `int-quantized w8a8`, `f16`).
    pub stored: String,
    pub conversion: Conversion,
    /// ‖W_export − W‖ / ‖W‖ and max |W_export − W| against what whittle runs (W dequantized).
    pub rel_err: f64,
    pub max_abs_err: f64,
}

/// One `config_groups` entry of the export.
#[derive(Debug, Clone, Serialize)]
pub struct CtGroup {
    pub name: String,
    pub scheme: String,
    pub format: String,
    pub linears: usize,
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct CtReport {
    pub format: String,
    pub dir: PathBuf,
    /// Bytes of `model.safetensors`.
    pub bytes: u64,
    /// The model dtype (`float16`, …).
    pub dtype: String,
    /// `quantization_config.format`: the groups' format, or `mixed-precision`.
    pub quant_format: String,
    pub groups: Vec<CtGroup>,
    /// Linears left dense (`quantization_config.ignore`).
    pub ignore: Vec<String>,
    pub tensors: Vec<CtTensorRow>,
    /// Largest relative weight error of a quantized Linear (scale rounding) and of a float tensor.
    pub max_codes_rel_err: f64,
    pub max_float_rel_err: f64,
    pub seconds: f64,
}

/// The HF names and Linears of a LLaMA block, in file order.
fn block_linears(b: &whittle_models::llama::LlamaBlock) -> [(&'static str, &Linear); 7] {
    [
        ("self_attn.q_proj", &b.q),
        ("self_attn.k_proj", &b.k),
        ("self_attn.v_proj", &b.v),
        ("self_attn.o_proj", &b.o),
        ("mlp.gate_proj", &b.gate),
        ("mlp.up_proj", &b.up),
        ("mlp.down_proj", &b.down),
    ]
}

/// Writes the LLaMA-family model `l` to the directory `out` in the compressed-tensors layout (atomically).
pub fn export(l: &Loaded, out: &Path, o: &CtOptions) -> Result<CtReport> {
    let t0 = std::time::Instant::now();
    let Model::Llama(m) = &l.model else {
        return Err(Error::Usage(format!(
            "{}: compressed-tensors export is for decoders (LLaMA family, loaded by AutoModelForCausalLM); this is \
             a {} encoder (export it with --format onnx)",
            l.source.path.display(),
            l.model.family()
        )));
    };
    if !matches!(o.dtype, DType::F16 | DType::BF16 | DType::F32) {
        return Err(whittle_core::InvalidOption::new("dtype", format!("{:?}", o.dtype), "f16, bf16 or f32").into());
    }
    check_exportable(l, m)?;
    let dt = o.dtype;
    let mut tensors: Vec<(String, Stored)> = Vec::new();
    let mut rows: Vec<CtTensorRow> = Vec::new();
    let mut groups: BTreeMap<Scheme, Vec<String>> = BTreeMap::new();
    let mut ignore: Vec<String> = Vec::new();

    let float = |name: String, t: &Tensor, tensors: &mut Vec<(String, Stored)>| -> Result<CtTensorRow> {
        let src = t.to_dtype(DType::F32)?;
        let st = src.to_dtype(dt)?;
        let back: Vec<f32> = st.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let src_v: Vec<f32> = src.flatten_all()?.to_vec1()?;
        if back.iter().zip(&src_v).any(|(b, s)| !b.is_finite() && s.is_finite()) {
            return Err(Error::Unsupported {
                tensor: name,
                repr: dtype_name(t.dtype()).into(),
                reason: format!("values overflow {}: export with option `dtype` f32 or bf16", dtype_name(dt)),
            });
        }
        let (rel, max) = errors(&back, &src_v);
        tensors.push((name.clone(), Stored::Tensor(st)));
        Ok(CtTensorRow {
            name,
            source: dtype_name(t.dtype()).into(),
            stored: dtype_name(dt).into(),
            conversion: if max == 0.0 { Conversion::Exact } else { Conversion::Encoded },
            rel_err: rel,
            max_abs_err: max,
        })
    };

    rows.push(float("model.embed_tokens.weight".into(), &m.embed_tokens, &mut tensors)?);
    let mut linears: Vec<(String, &Linear)> = Vec::new();
    for (i, b) in m.blocks.iter().enumerate() {
        rows.push(float(format!("model.layers.{i}.input_layernorm.weight"), &b.attn_norm.weight, &mut tensors)?);
        rows.push(float(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            &b.mlp_norm.weight,
            &mut tensors,
        )?);
        for (n, lin) in block_linears(b) {
            linears.push((format!("model.layers.{i}.{n}"), lin));
        }
    }
    rows.push(float("model.norm.weight".into(), &m.norm.weight, &mut tensors)?);
    // A tied head that is quantized is written as its own `lm_head` (and the config unties it); a dense tied
    // head is the embedding table, which transformers ties back.
    let untie = m.config.tie_word_embeddings && m.lm_head.is_quantized();
    if !m.config.tie_word_embeddings || untie {
        linears.push(("lm_head".into(), &m.lm_head));
    } else {
        ignore.push("lm_head".into());
    }

    for (name, lin) in &linears {
        if let Some(b) = &lin.bias {
            rows.push(float(format!("{name}.bias"), b, &mut tensors)?);
        }
        match linear_scheme(name, lin)? {
            None => {
                ignore.push(name.clone());
                let mut row = float(format!("{name}.weight"), &lin.dequantize()?, &mut tensors)?;
                row.source = lin.storage_name();
                rows.push(row);
            }
            Some(s) => {
                let (ts, row) = encode_linear(name, lin, s, dt)?;
                tensors.extend(ts);
                rows.push(row);
                groups.entry(s).or_default().push(name.clone());
            }
        }
    }

    // One scheme for every quantized Linear: `targets: ["Linear"]` (what llm-compressor's recipes write);
    // several: each group names its Linears.
    let single = groups.len() == 1;
    let mut config_groups = serde_json::Map::new();
    let mut group_rows = Vec::new();
    for (i, (s, names)) in groups.iter().enumerate() {
        let targets = if single { vec!["Linear".to_string()] } else { names.clone() };
        config_groups.insert(format!("group_{i}"), s.json(&targets));
        group_rows.push(CtGroup {
            name: format!("group_{i}"),
            scheme: s.name(),
            format: s.format().into(),
            linears: names.len(),
        });
    }
    let formats: std::collections::BTreeSet<&str> = groups.keys().map(|s| s.format()).collect();
    let quant_format = match formats.len() {
        0 => {
            return Err(Error::Usage(format!(
                "{}: no Linear is quantized (compressed-tensors holds weight-only wNa16 and w8a8 models: quantize \
                 it with `whittle quantize --scheme w4a16`, or save a float model with `whittle convert`)",
                l.source.path.display()
            )))
        }
        1 => formats.iter().next().copied().unwrap_or_default().to_string(),
        _ => "mixed-precision".to_string(),
    };
    let mut config = m.config.to_hf_json(&m.blocks, l.bos_token_id, &l.eos_token_ids);
    if untie {
        config["tie_word_embeddings"] = false.into();
    }
    config["torch_dtype"] = torch_dtype(dt).into();
    config["quantization_config"] = json!({
        "config_groups": config_groups,
        "format": quant_format,
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "moe_sparsity_config": null,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    });
    let st_path = out.join("model.safetensors");
    whittle_formats::hf::write_dir_atomic(out, |dir| {
        whittle_formats::hf::write_json(&dir.join("config.json"), &config)?;
        whittle_formats::hf::write_stored(
            &dir.join("model.safetensors"),
            &tensors,
            Some([("format".to_string(), "pt".to_string())].into()),
        )?;
        whittle_models::save::write_tokenizer_files(l, dir)
    })?;
    let bytes = std::fs::metadata(&st_path).map(|md| md.len()).unwrap_or(0);
    let quantized = |r: &&CtTensorRow| r.stored.contains("quantized");
    let max_codes_rel_err = rows.iter().filter(quantized).map(|r| r.rel_err).fold(0.0, f64::max);
    let max_float_rel_err = rows.iter().filter(|r| !quantized(r)).map(|r| r.rel_err).fold(0.0, f64::max);
    Ok(CtReport {
        format: QUANT_METHOD.into(),
        dir: out.to_path_buf(),
        bytes,
        dtype: torch_dtype(dt).into(),
        quant_format,
        groups: group_rows,
        ignore,
        tensors: rows,
        max_codes_rel_err,
        max_float_rel_err,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Refuses what transformers' LLaMA cannot represent, naming the layer.
fn check_exportable(l: &Loaded, m: &Llama) -> Result<()> {
    let c = &m.config;
    if !matches!(c.model_type.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(Error::Usage(format!(
            "model_type `{}`: compressed-tensors export writes llama, mistral and qwen2 models",
            c.model_type
        )));
    }
    if let RopeScaling::Divisors(_) = c.rope_scaling {
        return Err(Error::Usage(format!(
            "{}: RoPE frequencies from the GGUF's `rope_freqs` table have no config.json form; export from the \
             HF directory",
            l.source.path.display()
        )));
    }
    let d = |b: &whittle_models::llama::LlamaBlock| (b.n_head, b.n_kv_head, b.gate.out_features());
    if let Some(i) = m.blocks.iter().position(|b| d(b) != d(&m.blocks[0])) {
        return Err(Error::Usage(format!(
            "block {i} has {} heads, {} KV heads and an FFN of {} where block 0 has {:?}: transformers' {} has one \
             width for every layer (export per-block widths with --format gguf or onnx)",
            m.blocks[i].n_head,
            m.blocks[i].n_kv_head,
            m.blocks[i].gate.out_features(),
            d(&m.blocks[0]),
            c.model_type
        )));
    }
    if let Some((b, leader)) = l.shared_blocks.iter().next() {
        return Err(Error::Unsupported {
            tensor: format!("model.layers.{b}"),
            repr: format!("shared with block {leader}"),
            reason: "transformers has one set of weights per block; export the model before sharing it".into(),
        });
    }
    Ok(())
}

/// The scheme of a Linear, `None` for a dense one; an error naming it when compressed-tensors has no form.
fn linear_scheme(name: &str, l: &Linear) -> Result<Option<Scheme>> {
    let unsupported = |reason: &str| Error::Unsupported {
        tensor: name.to_string(),
        repr: l.storage_name(),
        reason: reason.to_string(),
    };
    Ok(match &l.weight {
        LinearWeight::Dense(_) => None,
        LinearWeight::Block(b) => match b.rtn {
            Some(r) if (1..=8).contains(&r.bits) && l.in_features().is_multiple_of(r.group) => {
                Some(Scheme::Packed { bits: r.bits, group: r.group, symmetric: !r.zero_point })
            }
            Some(_) => return Err(unsupported("the group does not divide the input width")),
            None => {
                return Err(unsupported(
                    "a GGUF block type (super-blocks, f16 mins) has no compressed-tensors form; export it with \
                     --format gguf, or requantize the float model with `whittle quantize --scheme w4a16`",
                ))
            }
        },
        LinearWeight::Int8Dynamic(_) => Some(Scheme::W8A8),
        LinearWeight::Int8Static { .. } => {
            return Err(unsupported(
                "static activation scales (asymmetric, per tensor) are not written yet; export w8a8-dynamic or \
                 a weight-only scheme",
            ))
        }
        LinearWeight::Sparse(_) => {
            return Err(unsupported(
                "sparse weights: compressed-tensors' sparse formats are not written; export with --format onnx",
            ))
        }
        LinearWeight::LowRank(_) => {
            return Err(unsupported(
                "a low-rank factorisation U·V is two matmuls; transformers' LLaMA has one weight per projection",
            ))
        }
    })
}

/// The tensors of a quantized Linear and its report row.
fn encode_linear(name: &str, l: &Linear, s: Scheme, dt: DType) -> Result<(Vec<(String, Stored)>, CtTensorRow)> {
    let (m, k) = (l.out_features(), l.in_features());
    let dev = &candle_core::Device::Cpu;
    let reference: Vec<f32> = l.dequantize()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::new();
    // Scales in the model dtype, read back as transformers will see them.
    let scale_tensor = |scale: Vec<f32>, shape: (usize, usize)| -> Result<(Tensor, Vec<f32>)> {
        let t = Tensor::from_vec(scale, shape, dev)?.to_dtype(dt)?;
        let back: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if back.iter().any(|v| !v.is_finite()) {
            return Err(Error::Unsupported {
                tensor: format!("{name}.weight_scale"),
                repr: l.storage_name(),
                reason: format!("scales overflow {}: export with option `dtype` f32", dtype_name(dt)),
            });
        }
        Ok((t, back))
    };
    let dequant: Vec<f32> = match (s, &l.weight) {
        (Scheme::Packed { bits, group, symmetric }, LinearWeight::Block(b)) => {
            let rtn = b.rtn.expect("packed schemes come from grouped layers");
            let bw = b.packed.unpack();
            let (_, scale, zero) = rtn.pack(&bw);
            let ng = k / group;
            // whittle's codes are compressed-tensors' packed (unsigned) values; see the module docs.
            let packed = pack_rows(&bw.q, m, k, bits);
            out.push((
                format!("{name}.weight_packed"),
                Stored::Tensor(Tensor::from_vec(packed, (m, k * bits as usize / 32), dev)?),
            ));
            let (st, scale_back) = scale_tensor(scale, (m, ng))?;
            out.push((format!("{name}.weight_scale"), Stored::Tensor(st)));
            out.push((format!("{name}.weight_shape"), Stored::Tensor(Tensor::new(&[m as i64, k as i64], dev)?)));
            let half = 1i32 << (bits - 1);
            let zero_signed: Option<Vec<i32>> = zero.map(|z| z.iter().map(|&v| v as i32 - half).collect());
            if let Some(z) = &zero_signed {
                debug_assert!(!symmetric);
                // Packed along the output dimension: transpose (ng, m), pack rows, transpose back.
                let zt: Vec<u8> = (0..ng * m).map(|i| (z[(i % m) * ng + i / m] + half) as u8).collect();
                let words_per_row = (m * bits as usize).div_ceil(32);
                let pz = pack_rows(&zt, ng, m, bits);
                let back: Vec<i32> = (0..words_per_row * ng).map(|i| pz[(i % ng) * words_per_row + i / ng]).collect();
                out.push((
                    format!("{name}.weight_zero_point"),
                    Stored::Tensor(Tensor::from_vec(back, (words_per_row, ng), dev)?),
                ));
            }
            (0..m * k)
                .map(|i| {
                    let (r, c) = (i / k, i % k);
                    let g = r * ng + c / group;
                    let z = zero_signed.as_ref().map_or(0, |z| z[g]);
                    let q = bw.q[i] as i32 - half;
                    scale_back[g] * (q - z) as f32
                })
                .collect()
        }
        (Scheme::W8A8, LinearWeight::Int8Dynamic(p)) => {
            out.push((format!("{name}.weight"), Stored::I8 { shape: vec![m, k], data: p.q.clone() }));
            let (st, scale_back) = scale_tensor(p.scale.clone(), (m, 1))?;
            out.push((format!("{name}.weight_scale"), Stored::Tensor(st)));
            (0..m * k).map(|i| scale_back[i / k] * p.q[i] as f32).collect()
        }
        _ => unreachable!("linear_scheme chose the scheme from the weight"),
    };
    let (rel, max) = errors(&dequant, &reference);
    let row = CtTensorRow {
        name: name.to_string(),
        source: l.storage_name(),
        stored: format!("{} {}", s.format(), s.name()),
        conversion: if max == 0.0 { Conversion::Exact } else { Conversion::Codes },
        rel_err: rel,
        max_abs_err: max,
    };
    Ok((out, row))
}

/// Packs `rows` × `cols` unsigned `bits`-bit values into int32 words as compressed-tensors'
/// `pack_to_int32` does: per row, value `i` at bit `i·bits` of a little-endian stream of
/// ⌈cols·bits/32⌉ words, the tail zero-padded.
pub fn pack_rows(values: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<i32> {
    let bits = bits as usize;
    let words = (cols * bits).div_ceil(32);
    let mut out = vec![0u32; rows * words];
    for r in 0..rows {
        let w = &mut out[r * words..(r + 1) * words];
        for (i, &v) in values[r * cols..(r + 1) * cols].iter().enumerate() {
            let v = (v as u64) & ((1u64 << bits) - 1);
            let bit = i * bits;
            let wide = v << (bit % 32);
            w[bit / 32] |= wide as u32;
            if bit % 32 + bits > 32 {
                w[bit / 32 + 1] |= (wide >> 32) as u32;
            }
        }
    }
    out.into_iter().map(|x| x as i32).collect()
}

/// The inverse of [`pack_rows`] (compressed-tensors' `unpack_from_int32`, before the signed shift).
pub fn unpack_rows(words: &[i32], rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    let bits = bits as usize;
    let per_row = (cols * bits).div_ceil(32);
    let mask = (1u64 << bits) - 1;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let w = &words[r * per_row..(r + 1) * per_row];
        for i in 0..cols {
            let bit = i * bits;
            let lo = w[bit / 32] as u32 as u64;
            let hi = w.get(bit / 32 + 1).map_or(0, |&x| x as u32 as u64);
            out.push((((lo | (hi << 32)) >> (bit % 32)) & mask) as u8);
        }
    }
    out
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        _ => "int",
    }
}

fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of pseudo-random bytes (xorshift).
    fn codes(n: usize, bits: u32, seed: u64) -> Vec<u8> {
        let mut x = seed.max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % (1u64 << bits)) as u8
            })
            .collect()
    }

    #[test]
    fn pack_then_unpack_gives_the_codes_back_for_every_width_and_ragged_rows() {
        for bits in 1..=8u32 {
            for (rows, cols) in [(1, 1), (3, 7), (2, 32), (5, 33), (4, 100), (1, 257)] {
                let v = codes(rows * cols, bits, (bits as u64) * 1000 + cols as u64);
                let p = pack_rows(&v, rows, cols, bits);
                assert_eq!(p.len(), rows * (cols * bits as usize).div_ceil(32), "{bits} bits, {rows}×{cols}");
                assert_eq!(unpack_rows(&p, rows, cols, bits), v, "{bits} bits, {rows}×{cols}");
            }
        }
    }

    /// compressed-tensors' own `pack_to_int32` on fixed inputs (values + offset, as its docstring
    /// computes them): 4-bit `[0..8)` → one word 0x76543210; 8-bit `[1, 2, 3, 4]` → 0x04030201; 3-bit codes
    /// 32 × 7 fill three words with ones.
    #[test]
    fn packing_matches_compressed_tensors_bit_order() {
        assert_eq!(pack_rows(&[0, 1, 2, 3, 4, 5, 6, 7], 1, 8, 4), vec![0x7654_3210]);
        assert_eq!(pack_rows(&[1, 2, 3, 4], 1, 4, 8), vec![0x0403_0201]);
        assert_eq!(pack_rows(&[7; 32], 1, 32, 3), vec![-1, -1, -1]);
        // A 3-bit value straddling words 0 and 1: element 10 at bits 30..33.
        let mut v = vec![0u8; 11];
        v[10] = 0b101;
        assert_eq!(pack_rows(&v, 1, 11, 3), vec![0b01 << 30, 0b1]);
    }
}
