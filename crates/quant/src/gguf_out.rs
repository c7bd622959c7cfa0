//! GGUF output: a LLaMA model written in one of llama.cpp's file types (`Q8_0`, `Q4_K_M`, …) with the same
//! per-tensor type choices as `llama-quantize` (its `llama_tensor_get_type`: more bits for `attn_v` and
//! `ffn_down` in some layers, Q8_0/Q6_K for the output/tied embedding table, and its fallback when a row width
//! is not a multiple of 256). Blocks are quantized with ggml's quantizers ported in `kquant` (the reference
//! ones, or the importance-weighted ones with an imatrix), norms stay
//! F32. Metadata and tokenizer come from the source GGUF; tensors are read in the source's own layout (Q/K rows stay
//! in llama.cpp's RoPE order), one at a time.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use whittle_core::InvalidOption;
use whittle_formats::gguf::{write, Gguf, Value};
use whittle_kernels::ggml::{ty, GgmlType};
use whittle_models::names;

use crate::{Error, LayerReport, Report, Result};

/// A llama.cpp file type (`LLAMA_FTYPE_MOSTLY_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ftype {
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3KS,
    Q3KM,
    Q3KL,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
}

/// (scheme name, file type, `general.file_type`). `q3_k`/`q4_k`/`q5_k` are the `_M` mixtures, as in
/// `llama-quantize`.
const FTYPES: &[(&str, Ftype, u32)] = &[
    ("f16", Ftype::F16, 1),
    ("bf16", Ftype::Bf16, 32),
    ("q8_0", Ftype::Q8_0, 7),
    ("q4_0", Ftype::Q4_0, 2),
    ("q4_1", Ftype::Q4_1, 3),
    ("q5_0", Ftype::Q5_0, 8),
    ("q5_1", Ftype::Q5_1, 9),
    ("q2_k", Ftype::Q2K, 10),
    ("q3_k_s", Ftype::Q3KS, 11),
    ("q3_k_m", Ftype::Q3KM, 12),
    ("q3_k", Ftype::Q3KM, 12),
    ("q3_k_l", Ftype::Q3KL, 13),
    ("q4_k_s", Ftype::Q4KS, 14),
    ("q4_k_m", Ftype::Q4KM, 15),
    ("q4_k", Ftype::Q4KM, 15),
    ("q5_k_s", Ftype::Q5KS, 16),
    ("q5_k_m", Ftype::Q5KM, 17),
    ("q5_k", Ftype::Q5KM, 17),
    ("q6_k", Ftype::Q6K, 18),
];

/// The GGUF scheme names, for error messages.
pub const GGUF_SCHEMES: &str =
    "f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m (q3_k), q3_k_l, q4_k_s, q4_k_m (q4_k), q5_k_s, q5_k_m (q5_k), q6_k";

impl Ftype {
    /// The file type a scheme name selects, if it is a GGUF scheme.
    pub fn parse(s: &str) -> Option<Ftype> {
        let s = s.to_ascii_lowercase();
        FTYPES.iter().find(|f| f.0 == s).map(|f| f.1)
    }

    pub fn name(self) -> &'static str {
        FTYPES.iter().find(|f| f.1 == self).map(|f| f.0).unwrap_or("?")
    }

    /// `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        FTYPES.iter().find(|f| f.1 == self).map(|f| f.2).unwrap_or(0)
    }

    fn default_type(self) -> u32 {
        use Ftype::*;
        match self {
            F16 => ty::F16,
            Bf16 => ty::BF16,
            Q8_0 => ty::Q8_0,
            Q4_0 => ty::Q4_0,
            Q4_1 => ty::Q4_1,
            Q5_0 => ty::Q5_0,
            Q5_1 => ty::Q5_1,
            Q2K => ty::Q2_K,
            Q3KS | Q3KM | Q3KL => ty::Q3_K,
            Q4KS | Q4KM => ty::Q4_K,
            Q5KS | Q5KM => ty::Q5_K,
            Q6K => ty::Q6_K,
        }
    }
}

/// ggml type name (`?` for an unknown id).
pub fn type_name(t: u32) -> &'static str {
    GgmlType::by_id(t).map_or("?", |i| i.name)
}

fn block_size(t: u32) -> usize {
    GgmlType::by_id(t).map_or(1, |i| i.block)
}

/// A ggml type by name (for override values).
fn parse_type(s: &str) -> Option<u32> {
    GgmlType::by_name(s).map(|t| t.id)
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
}

/// The ggml type llama-quantize gives a 2-D tensor (`kind` = GGUF name without `blk.N.` and `.weight`).
pub fn tensor_type(ft: Ftype, kind: &str, layer: usize, n_layer: usize, ne0: usize, n_gqa: usize, tied: bool) -> u32 {
    use Ftype::*;
    let default = ft.default_type();
    if matches!(ft, F16 | Bf16) {
        return default;
    }
    let mut t = default;
    let is_output = kind == "output" || (tied && kind == "token_embd");
    if is_output {
        if !ne0.is_multiple_of(block_size(default)) {
            t = ty::Q8_0;
        } else if t != ty::Q8_0 {
            t = ty::Q6_K;
        }
    } else if kind == "attn_v" {
        t = match ft {
            Q2K => {
                if n_gqa >= 4 {
                    ty::Q4_K
                } else {
                    ty::Q3_K
                }
            }
            Q3KM if layer < 2 => ty::Q5_K,
            Q3KM => ty::Q4_K,
            Q3KL => ty::Q5_K,
            Q4KM | Q5KM if use_more_bits(layer, n_layer) => ty::Q6_K,
            Q4KS if layer < 4 => ty::Q5_K,
            _ => t,
        };
    } else if kind == "attn_output" {
        t = match ft {
            Q2K => ty::Q3_K,
            Q3KM => ty::Q4_K,
            Q3KL => ty::Q5_K,
            _ => t,
        };
    } else if kind == "ffn_down" {
        t = match ft {
            Q2K => ty::Q3_K,
            Q3KM if layer < n_layer / 16 => ty::Q5_K,
            Q3KM => ty::Q4_K,
            Q3KL => ty::Q5_K,
            Q4KM | Q5KM if use_more_bits(layer, n_layer) => ty::Q6_K,
            Q4KS if layer < n_layer / 8 => ty::Q5_K,
            _ => t,
        };
    }
    fallback(t, ne0)
}

/// llama.cpp's `tensor_type_fallback`: a type whose block does not divide the row width.
fn fallback(t: u32, ne0: usize) -> u32 {
    if ne0.is_multiple_of(block_size(t)) {
        return t;
    }
    let f = match t {
        ty::Q2_K | ty::Q3_K => ty::Q4_0,
        ty::Q4_K => ty::Q5_0,
        ty::Q5_K => ty::Q5_1,
        ty::Q6_K => ty::Q8_0,
        _ => ty::F16,
    };
    if !ne0.is_multiple_of(block_size(f)) {
        ty::F16
    } else {
        f
    }
}

/// Encodes one 2-D f32 tensor (rows × cols, named `name` in errors) as ggml type `t`; returns the bytes and
/// the RMSE of the stored values against the input. With an importance vector (mean x² per column, from an
/// imatrix) block types use ggml's importance-weighted quantizers, as llama-quantize does.
pub fn encode(w: &Tensor, t: u32, name: &str, importance: Option<&[f32]>) -> Result<(Vec<u8>, f64)> {
    let (rows, cols) = w.dims2()?;
    let vals: Vec<f32> = w.flatten_all()?.to_vec1()?;
    if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!("{name} (element {i})")));
    }
    let (bytes, deq): (Vec<u8>, Vec<f32>) = match t {
        ty::F32 => (vals.iter().flat_map(|v| v.to_le_bytes()).collect(), vals.clone()),
        ty::F16 | ty::BF16 => {
            let dt = if t == ty::F16 { DType::F16 } else { DType::BF16 };
            let h = w.to_dtype(dt)?;
            let deq = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let bytes = if t == ty::F16 {
                h.flatten_all()?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()
            } else {
                h.flatten_all()?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()
            };
            (bytes, deq)
        }
        _ => {
            // ggml's quantizers (kquant.rs): the `_ref` ones without an importance vector (byte-identical to
            // llama-quantize without an imatrix), the importance-weighted `_impl` ones with it.
            let bytes = crate::kquant::quantize_weighted(t, &vals, rows, cols, importance)
                .map_err(|e| Error::Unsupported(format!("{name}: {e}")))?;
            let deq = whittle_kernels::ggml::unpack(t, &bytes, rows, cols).map_err(Error::Unsupported)?.dequantize();
            (bytes, deq)
        }
    };
    Ok((bytes, crate::rmse(&vals, &deq)))
}

/// Options of [`write_gguf`].
pub struct GgufOptions<'a> {
    pub ftype: Ftype,
    /// Per-tensor type by regex on the HF layer name (e.g. `model.layers.0.mlp.down_proj`), last match wins.
    pub overrides: &'a [String],
    pub allow_requantize: bool,
    /// Mean x² per input channel by GGUF tensor name (option `imatrix` of `quantize`), checked against the source.
    pub imatrix: Option<&'a std::collections::BTreeMap<String, Vec<f32>>>,
}

/// One tensor of a planned GGUF file type: its HF name and the ggml type it gets (`None`: copied as it is).
pub struct PlannedTensor {
    pub hf: String,
    pub t: u32,
}

/// The type every tensor of `src` gets under `o` (llama-quantize's rules, then the overrides), without
/// encoding anything.
pub fn plan_gguf(src: &Gguf, o: &GgufOptions) -> Result<Vec<Option<PlannedTensor>>> {
    let cfg = whittle_models::llama::LlamaConfig::from_gguf(src)?;
    let mut overrides = Vec::new();
    for s in o.overrides {
        let (re, tname) = crate::parse_override(s)?;
        let t = parse_type(tname).ok_or_else(|| {
            InvalidOption::new(
                "override",
                format!("`{s}`"),
                format!("`{tname}` is not a GGUF tensor type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k)"),
            )
        })?;
        overrides.push((re, t));
    }
    let n_layer = cfg.num_layers;
    let n_gqa = cfg.num_heads / cfg.num_kv_heads.max(1);
    let tied = src.tensor("output.weight").is_none();
    let mut jobs: Vec<Option<PlannedTensor>> = Vec::with_capacity(src.tensors.len());
    for info in &src.tensors {
        let Some(hf) = names::gguf_to_hf(&info.name) else {
            jobs.push(None); // rope_freqs and other tensors without an HF twin: copied as they are
            continue;
        };
        let shape = info.shape();
        let t = if shape.len() == 2 && info.name.ends_with(".weight") && !info.name.contains("_norm") {
            let quantized_src = !matches!(info.type_id, ty::F32 | ty::F16 | ty::BF16);
            if quantized_src && !o.allow_requantize {
                return Err(Error::AlreadyQuantized(hf.trim_end_matches(".weight").into(), info.type_name.into()));
            }
            let (layer, kind) = split_name(&info.name);
            let mut t = tensor_type(o.ftype, kind, layer, n_layer, shape[1], n_gqa, tied);
            let lname = hf.trim_end_matches(".weight");
            if let Some((_, ot)) = overrides.iter().rev().find(|(re, _)| re.is_match(lname)) {
                if shape[1] % block_size(*ot) != 0 {
                    return Err(Error::Unsupported(format!(
                        "option `override`: `{lname}` has rows of {} values, not a multiple of {}'s block of {}",
                        shape[1],
                        type_name(*ot),
                        block_size(*ot)
                    )));
                }
                t = *ot;
            }
            t
        } else {
            ty::F32
        };
        jobs.push(Some(PlannedTensor { hf, t }));
    }
    Ok(jobs)
}

/// The bytes of the tensor data `o` would write from `src` (the file adds its metadata and alignment).
pub fn planned_bytes(src: &Gguf, o: &GgufOptions) -> Result<u64> {
    let plan = plan_gguf(src, o)?;
    Ok(src
        .tensors
        .iter()
        .zip(&plan)
        .map(|(info, p)| {
            let n: usize = info.ne.iter().product();
            match p {
                None => info.bytes as u64,
                Some(p) => match GgmlType::by_id(p.t) {
                    Some(g) => (n / g.block * g.bytes) as u64,
                    None => 4 * n as u64,
                },
            }
        })
        .sum())
}

/// Writes the GGUF `src` to `out` as a GGUF of file type `o.ftype`, one tensor at a time straight from the
/// source's values (no model in memory: peak ≈ the mapped source + the output + two tensors in f32).
pub fn write_gguf(src: &Gguf, out: &Path, o: &GgufOptions) -> Result<Report> {
    let t0 = std::time::Instant::now();
    if let Some(im) = o.imatrix {
        let widths = src.tensors.iter().map(|t| (t.name.clone(), t.ne[0])).collect();
        crate::imatrix::check_imatrix(im, &widths, "option `imatrix`")?;
    }
    // Plan every tensor first (cheap), then encode the 2-D ones on all cores.
    let jobs = plan_gguf(src, o)?;

    // Per source tensor: (bytes, weight RMSE, seconds), filled by the workers.
    type Encoded = Result<(Vec<u8>, f64, f64)>;
    let results: Mutex<Vec<Option<Encoded>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Largest first, so the embedding table does not start last.
    let mut order: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].is_some()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(src.tensors[i].ne.iter().product::<usize>()));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = order.get(n) else { break };
                let job = jobs[i].as_ref().expect("planned");
                let t = std::time::Instant::now();
                let r = (|| {
                    let w = src.dequantize(&src.tensors[i])?;
                    let w2 = if w.dims().len() == 1 { w.unsqueeze(0)? } else { w };
                    let imp = o.imatrix.and_then(|im| im.get(&src.tensors[i].name)).map(Vec::as_slice);
                    let (bytes, rmse) = encode(&w2, job.t, &job.hf, imp)?;
                    Ok((bytes, rmse, t.elapsed().as_secs_f64()))
                })();
                results.lock().unwrap()[i] = Some(r);
            });
        }
    });
    let results = results.into_inner().unwrap();

    let mut tensors: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    let mut layers = Vec::new();
    let (mut before, mut after) = (0usize, 0usize);
    for ((info, job), r) in src.tensors.iter().zip(&jobs).zip(results) {
        let ne: Vec<u64> = info.ne.iter().map(|&d| d as u64).collect();
        let Some(job) = job else {
            tensors.push((info.name.as_str(), ne, info.type_id, src.raw(info).to_vec()));
            continue;
        };
        let (bytes, rmse, secs) = r.expect("every planned tensor was encoded")?;
        let params: usize = info.ne.iter().product();
        before += 4 * params;
        after += bytes.len();
        if job.t != ty::F32 {
            layers.push(LayerReport {
                name: job.hf.trim_end_matches(".weight").to_string(),
                scheme: type_name(job.t).into(),
                params,
                bpw: 8.0 * bytes.len() as f64 / params as f64,
                weight_rmse: rmse,
                seconds: secs,
                output_mse: None,
                rtn_output_mse: None,
                note: String::new(),
            });
        }
        tensors.push((info.name.as_str(), ne, job.t, bytes));
    }
    let mut meta: Vec<(&str, Value)> = src
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type" && k.as_str() != "general.quantization_version")
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    meta.push(("general.file_type", Value::U32(o.ftype.file_type())));
    meta.push(("general.quantization_version", Value::U32(2)));
    write::write_file(out, &meta, &tensors)?;
    Ok(Report { layers, linear_bytes_before: before, linear_bytes_after: after, seconds: t0.elapsed().as_secs_f64() })
}

/// `blk.7.attn_v.weight` → (7, "attn_v"); `token_embd.weight` → (0, "token_embd").
fn split_name(n: &str) -> (usize, &str) {
    let base = n.strip_suffix(".weight").unwrap_or(n);
    if let Some(rest) = base.strip_prefix("blk.") {
        if let Some((i, kind)) = rest.split_once('.') {
            return (i.parse().unwrap_or(0), kind);
        }
    }
    (0, base)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-tensor types llama-quantize (llama-cpp-python 0.3.36) gave SmolLM2-135M (30 layers, widths 576
    /// and 1536, GQA 3, tied embeddings), read back from its output files.
    #[test]
    fn mixtures_match_llama_quantize_on_smollm2() {
        let more = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29];
        let t = |ft, kind, layer| {
            let ne0 = if kind == "ffn_down" { 1536 } else { 576 };
            type_name(tensor_type(ft, kind, layer, 30, ne0, 3, true))
        };
        for l in 0..30 {
            let m = more.contains(&l);
            assert_eq!(t(Ftype::Q4KM, "attn_q", l), "q5_0");
            assert_eq!(t(Ftype::Q4KM, "attn_v", l), if m { "q8_0" } else { "q5_0" });
            assert_eq!(t(Ftype::Q4KM, "ffn_down", l), if m { "q6_k" } else { "q4_k" });
            assert_eq!(t(Ftype::Q5KM, "ffn_up", l), "q5_1");
            assert_eq!(t(Ftype::Q5KM, "ffn_down", l), if m { "q6_k" } else { "q5_k" });
            assert_eq!(t(Ftype::Q3KM, "attn_k", l), "q4_0");
            assert_eq!(t(Ftype::Q3KM, "attn_v", l), if l < 2 { "q5_1" } else { "q5_0" });
            assert_eq!(t(Ftype::Q3KM, "attn_output", l), "q5_0");
            assert_eq!(t(Ftype::Q3KM, "ffn_down", l), if l < 1 { "q5_k" } else { "q4_k" });
            assert_eq!(t(Ftype::Q4KS, "attn_v", l), if l < 4 { "q5_1" } else { "q5_0" });
            assert_eq!(t(Ftype::Q4KS, "ffn_down", l), if l < 3 { "q5_k" } else { "q4_k" });
            assert_eq!(t(Ftype::Q2K, "attn_output", l), "q4_0");
            assert_eq!(t(Ftype::Q2K, "ffn_down", l), "q3_k");
            assert_eq!(t(Ftype::Q6K, "attn_q", l), "q8_0");
            assert_eq!(t(Ftype::Q6K, "ffn_down", l), "q6_k");
        }
        for ft in [Ftype::Q8_0, Ftype::Q4_0, Ftype::Q4_1, Ftype::Q5_0, Ftype::Q4KM, Ftype::Q2K, Ftype::Q6K] {
            assert_eq!(t(ft, "token_embd", 0), "q8_0", "{ft:?}");
        }
        assert_eq!(t(Ftype::F16, "token_embd", 0), "f16");
        assert_eq!(split_name("blk.12.ffn_down.weight"), (12, "ffn_down"));
        assert_eq!(Ftype::parse("Q4_K").unwrap(), Ftype::Q4KM);
        assert!(Ftype::parse("q4_k_x").is_none());
    }
}
