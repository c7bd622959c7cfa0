//! The search space: what each level lets the search use, and the candidates it makes from a model.
//!
//! - `light`: post-training quantization only — llama.cpp file types with an importance matrix for GGUF
//!   decoders; w8a8 (dynamic, static, static after SmoothQuant) and w8a16 for the rest.
//! - `medium`: adds mixed precision (a GGUF type per tensor group — embeddings, attention, gate/up, down —
//!   ranked by a per-group KL probe), unstructured / 2:4 pruning (Wanda) and low-rank factorisation
//!   (SVD-LLM), each combined with every quantization of `light`: the knobs are searched together.
//! - `full`: adds structured pruning (heads, FFN neurons) and cross-layer sharing, each recovered by
//!   distillation from the original.

use serde::{Deserialize, Serialize};
use whittle_core::InvalidOption;
use whittle_formats::gguf::Gguf;
use whittle_quant::gguf_out::{self, Ftype, GgufOptions};

use super::goal::MaxDrop;
use crate::config::{CalibConfig, DistillConfig, TrainConfig};
use crate::stages::{AnyStage, LowrankConfig, PruneConfig, QuantizeConfig, ShareConfig};
use crate::Result;

/// A deployment level: which technique families the search may use, its default tolerance and budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Light,
    Medium,
    Full,
}

impl Level {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "light" => Self::Light,
            "medium" => Self::Medium,
            "full" => Self::Full,
            _ => return Err(InvalidOption::new("level", s, "valid: light, medium, full").into()),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Light => "light",
            Self::Medium => "medium",
            Self::Full => "full",
        }
    }

    pub fn default_max_drop(self) -> MaxDrop {
        match self {
            Self::Light => MaxDrop::Relative(0.01),
            Self::Medium => MaxDrop::Relative(0.02),
            Self::Full => MaxDrop::Relative(0.03),
        }
    }

    /// Seconds.
    pub fn default_budget(self) -> f64 {
        match self {
            Self::Light => 600.0,
            Self::Medium => 1200.0,
            Self::Full => 2400.0,
        }
    }

    /// What the level may use, for the report and the terminal.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Light => "post-training quantization only (GGUF file types with an importance matrix; w8a8 dynamic/static, w8a16)",
            Self::Medium => "light + mixed precision per tensor group, unstructured/2:4 pruning and low-rank factorisation, searched jointly with the quantization (no training)",
            Self::Full => "medium + structured pruning and cross-layer sharing recovered by distillation",
        }
    }
}

/// How a candidate is made from the source model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Plan {
    /// A llama.cpp file type (with per-group overrides) written from the GGUF source.
    Gguf(Box<QuantizeConfig>),
    /// Stages applied in order to the model in memory, saved as an HF directory.
    Stages(Vec<AnyStage>),
}

/// One point of the space.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Unique, readable: `gguf q4_k_m`, `mix emb=q4_1 attn=q4_1 gate_up=q4_1 down=q4_k`, ...
    pub name: String,
    pub family: &'static str,
    /// Knob → value, for the report.
    pub knobs: Vec<(String, String)>,
    pub plan: Plan,
    /// Per knob, how aggressive the value is (0 = none); a candidate at least as aggressive on every knob
    /// as one that failed is skipped (same family).
    pub aggr: Vec<u32>,
    /// Predicted bytes on disk (exact for GGUF plans, estimated for the rest).
    pub bytes: f64,
    /// Predicted cost of a forward pass relative to the original (1.0), for speed objectives.
    pub cost: f64,
    /// For probed families: (group, type, weight) terms whose KL probes (minus the reference's) add up to
    /// the predicted loss; a weight below 1 stands for a part of the group's blocks.
    pub probe: Vec<(usize, String, f64)>,
}

/// A tensor group of the mixed-precision family: its name, its regex on HF layer names and the GGUF types
/// its row widths allow, most bits first.
pub struct Group {
    pub name: &'static str,
    pub regex: &'static str,
    pub types: Vec<&'static str>,
}

/// GGUF tensor types by decreasing bits per weight.
const TYPES: [&str; 10] = ["q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", "q3_k", "q2_k"];
/// The type the probes keep the other groups at (close to lossless).
pub const PROBE_REFERENCE: &str = "q8_0";
/// The uniform file types of `light`.
const FTYPES: [&str; 14] = [
    "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "q3_k_l", "q3_k_m",
    "q3_k_s", "q2_k",
];

/// The mixed-precision groups of a GGUF LLaMA, with the types each group's row widths allow.
pub fn gguf_groups(src: &Gguf) -> Vec<Group> {
    let spec: [(&str, &str, &[&str]); 4] = [
        ("emb", r"re:(model\.embed_tokens|lm_head)", &["token_embd", "output"]),
        ("attn", r"re:.*self_attn\.(q_proj|k_proj|v_proj|o_proj)", &["attn_q", "attn_k", "attn_v", "attn_output"]),
        ("gate_up", r"re:.*mlp\.(gate_proj|up_proj)", &["ffn_gate", "ffn_up"]),
        ("down", r"re:.*mlp\.down_proj", &["ffn_down"]),
    ];
    spec.iter()
        .map(|(name, regex, kinds)| {
            let widths: Vec<usize> = src
                .tensors
                .iter()
                .filter(|t| t.ne.len() == 2 && kinds.iter().any(|k| t.name.ends_with(&format!("{k}.weight"))))
                .map(|t| t.ne[0])
                .collect();
            let types = TYPES
                .iter()
                .copied()
                .filter(|t| {
                    let block = whittle_kernels::ggml::GgmlType::by_name(t).map_or(1, |g| g.block);
                    widths.iter().all(|w| w % block == 0)
                })
                .collect();
            Group { name, regex, types }
        })
        .collect()
}

fn gguf_config(scheme: &str, overrides: Vec<String>, imatrix: &std::path::Path) -> QuantizeConfig {
    QuantizeConfig {
        scheme: scheme.into(),
        overrides,
        allow_requantize: true,
        imatrix: Some(imatrix.to_path_buf()),
        ..Default::default()
    }
}

fn planned(src: &Gguf, c: &QuantizeConfig) -> Result<f64> {
    let ftype = Ftype::parse(&c.scheme).expect("a GGUF scheme");
    let o = GgufOptions { ftype, overrides: &c.overrides, allow_requantize: true, imatrix: None };
    Ok(gguf_out::planned_bytes(src, &o)? as f64)
}

/// The candidates of a GGUF decoder (`imatrix` is where the search keeps its importance matrix).
pub fn gguf_candidates(src: &Gguf, level: Level, imatrix: &std::path::Path) -> Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for (i, ft) in FTYPES.iter().enumerate() {
        let c = gguf_config(ft, Vec::new(), imatrix);
        let bytes = planned(src, &c)?;
        out.push(Candidate {
            name: format!("gguf {ft}"),
            family: "gguf",
            knobs: vec![("file type".into(), ft.to_string())],
            plan: Plan::Gguf(Box::new(c)),
            aggr: vec![i as u32],
            bytes,
            cost: bytes,
            probe: Vec::new(),
        });
    }
    if level >= Level::Medium {
        let groups = gguf_groups(src);
        let n_blocks = src.tensors.iter().filter(|t| t.name.ends_with("ffn_up.weight")).count();
        let gate_up = groups.iter().position(|g| g.name == "gate_up");
        let mut idx = vec![0usize; groups.len()];
        'combos: loop {
            let mut overrides = Vec::new();
            let mut knobs = Vec::new();
            let mut probe = Vec::new();
            let mut aggr = Vec::new();
            for (g, &i) in groups.iter().zip(&idx) {
                let t = g.types[i];
                overrides.push(format!("{}={t}", g.regex));
                knobs.push((g.name.to_string(), t.to_string()));
                probe.push((probe.len(), t.to_string(), 1.0));
                aggr.push(i as u32);
            }
            let base = format!("mix {}", knobs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "));
            // Per-layer bits: the gate/up projections of the K middle blocks one type lower (the first and
            // last blocks are the most sensitive, as llama.cpp's use_more_bits assumes).
            for (li, lean) in [0usize, 4, 8, 12].into_iter().enumerate() {
                let (mut overrides, mut knobs, mut probe, mut aggr) =
                    (overrides.clone(), knobs.clone(), probe.clone(), aggr.clone());
                let mut name = base.clone();
                if lean > 0 {
                    let Some(gu) = gate_up else { break };
                    let (t, Some(lower)) = (groups[gu].types[idx[gu]], groups[gu].types.get(idx[gu] + 1)) else {
                        break;
                    };
                    if lean >= n_blocks {
                        break;
                    }
                    let first = (n_blocks - lean) / 2;
                    let blocks: Vec<String> = (first..first + lean).map(|b| b.to_string()).collect();
                    overrides
                        .push(format!(r"re:model\.layers\.({})\.mlp\.(gate_proj|up_proj)={lower}", blocks.join("|")));
                    knobs.push(("gate_up lower in middle blocks".into(), format!("{lean} ({lower})")));
                    let w = lean as f64 / n_blocks as f64;
                    probe.push((gu, lower.to_string(), w));
                    probe.push((gu, t.to_string(), -w));
                    name = format!("{base} lean={lean}");
                }
                aggr.push(li as u32);
                let c = gguf_config("q8_0", overrides, imatrix);
                let bytes = planned(src, &c)?;
                out.push(Candidate {
                    name,
                    family: "mix",
                    knobs,
                    plan: Plan::Gguf(Box::new(c)),
                    aggr,
                    bytes,
                    cost: bytes,
                    probe,
                });
            }
            // Next combination (odometer).
            for (k, g) in groups.iter().enumerate() {
                idx[k] += 1;
                if idx[k] < g.types.len() {
                    continue 'combos;
                }
                idx[k] = 0;
            }
            break;
        }
    }
    Ok(out)
}

/// What the stage-plan estimates need to know about the model.
pub struct Shape {
    pub decoder: bool,
    /// Parameters of the block Linears (attention, MLP) and of everything else.
    pub attn_params: f64,
    pub mlp_params: f64,
    pub other_params: f64,
    pub n_blocks: usize,
}

/// One quantization of the stage-plan families: name, config, bits per Linear weight, speed factor.
fn quantizations(decoder: bool) -> Vec<(&'static str, Option<QuantizeConfig>, f64, f64)> {
    let q = |scheme: &str| QuantizeConfig { scheme: scheme.into(), allow_requantize: true, ..Default::default() };
    let mut v = vec![
        ("w8a8-dynamic", Some(q("w8a8-dynamic")), 8.1, 0.45),
        ("w8a8-static", Some(q("w8a8-static")), 8.1, 0.42),
        ("w8a8-static+sq0.5", Some(QuantizeConfig { smoothquant: Some(0.5), ..q("w8a8-static") }), 8.1, 0.42),
        ("w8a16", Some(QuantizeConfig { group_size: 32, ..q("w8a16") }), 8.5, 0.8),
    ];
    if decoder {
        v.push(("w4a16-gptq", Some(QuantizeConfig { group_size: 32, method: "gptq".into(), ..q("w4a16") }), 4.5, 0.7));
    }
    v
}

/// How far a quantization moves the model, for the dominance rule: weight-only int8 least, then dynamic int8
/// activations, then static ranges (SmoothQuant first moves the outliers), then 4-bit weights.
fn quant_aggressiveness(name: &str) -> u32 {
    match name {
        "w8a16" => 0,
        "w8a8-dynamic" => 1,
        "w8a8-static+sq0.5" => 2,
        "w8a8-static" => 3,
        _ => 4,
    }
}

/// The candidates of a model run from its float weights (encoders, or decoders in directories).
pub fn stage_candidates(s: &Shape, level: Level, distill_seconds: f64, teacher: &str) -> Vec<Candidate> {
    let linear = s.attn_params + s.mlp_params;
    let mut out = Vec::new();
    // (name, stages, aggressiveness, kept attn fraction, kept mlp fraction, density, trained)
    type Pre = (String, Vec<AnyStage>, Vec<u32>, f64, f64, f64);
    let mut pres: Vec<(&'static str, Pre)> = vec![("quant", ("".into(), Vec::new(), vec![0, 0], 1.0, 1.0, 1.0))];
    if level >= Level::Medium {
        for (i, (name, method, sparsity, pattern)) in [
            ("wanda 30%", "wanda", 0.3, "unstructured"),
            ("wanda 50%", "wanda", 0.5, "unstructured"),
            ("wanda 2:4", "wanda", 0.5, "2:4"),
        ]
        .into_iter()
        .enumerate()
        {
            let p = PruneConfig {
                method: Some(method.into()),
                sparsity: Some(sparsity),
                pattern: pattern.into(),
                storage: "dense".into(),
                ..Default::default()
            };
            pres.push((
                "prune",
                (name.into(), vec![AnyStage::Prune(p)], vec![i as u32 + 1, 0], 1.0, 1.0, 1.0 - sparsity),
            ));
        }
        for (i, ratio) in [0.9, 0.8, 0.7].into_iter().enumerate() {
            let c = LowrankConfig { ratio: Some(ratio), ..Default::default() };
            pres.push((
                "lowrank",
                (format!("lowrank {ratio}"), vec![AnyStage::Lowrank(c)], vec![0, i as u32 + 1], ratio, ratio, 1.0),
            ));
        }
    }
    if level >= Level::Full {
        let distill = |keep: Option<String>| {
            AnyStage::Distill(DistillConfig {
                teacher: teacher.into(),
                keep_layers: keep,
                train: TrainConfig { max_time: Some(format!("{}s", distill_seconds.round())), ..Default::default() },
                ..Default::default()
            })
        };
        for (i, (spec, attn, mlp)) in
            [("ffn=0.25", 1.0, 0.75), ("heads=0.25,ffn=0.25", 0.75, 0.75), ("ffn=0.5", 1.0, 0.5)]
                .into_iter()
                .enumerate()
        {
            let p = PruneConfig { structured: Some(spec.into()), ..Default::default() };
            pres.push((
                "structured",
                (
                    format!("structured {spec} + distill"),
                    vec![AnyStage::Structured(p), distill(None)],
                    vec![i as u32 + 1, 0],
                    attn,
                    mlp,
                    1.0,
                ),
            ));
        }
        if !s.decoder && s.n_blocks >= 4 {
            let unique = s.n_blocks / 2;
            let c = ShareConfig { unique: Some(unique), ..Default::default() };
            pres.push((
                "share",
                (
                    format!("share {unique} unique + distill"),
                    vec![AnyStage::Share(c), distill(None)],
                    vec![0, 1],
                    1.0,
                    1.0,
                    1.0,
                ),
            ));
        }
    }
    for (family, (pre_name, stages, aggr, attn_keep, mlp_keep, density)) in pres {
        let kept = s.attn_params * attn_keep + s.mlp_params * mlp_keep;
        for (qname, q, bits, speed) in quantizations(s.decoder) {
            let mut st = stages.clone();
            if let Some(q) = q.clone() {
                if family == "lowrank" && q.method != "rtn" {
                    continue; // GPTQ rounds dense weights
                }
                st.push(AnyStage::Quantize(q));
            }
            let name = if pre_name.is_empty() { qname.to_string() } else { format!("{pre_name} + {qname}") };
            let mut knobs = vec![("quantize".to_string(), qname.to_string())];
            if !pre_name.is_empty() {
                knobs.insert(0, (family.to_string(), pre_name.clone()));
            }
            // Pruned weights are stored dense once quantized: the saving is quality-neutral only in speed of
            // sparse kernels, which int8 kernels do not have; density counts only for the float storage.
            let _ = density;
            let bytes = kept * bits / 8.0 + s.other_params * 4.0;
            // Linears dominate the encoder's cost; attention and the rest take about a fifth.
            let cost = 0.2 + 0.8 * (kept / linear) * speed;
            out.push(Candidate {
                name,
                family,
                knobs,
                plan: Plan::Stages(st),
                aggr: aggr.iter().copied().chain(std::iter::once(quant_aggressiveness(qname))).collect(),
                bytes,
                cost,
                probe: Vec::new(),
            });
        }
    }
    let _ = CalibConfig::default();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_grow() {
        assert_eq!(Level::parse("medium").unwrap(), Level::Medium);
        assert!(Level::parse("heavy").unwrap_err().to_string().contains("light, medium, full"));
        let s = Shape { decoder: false, attn_params: 4e6, mlp_params: 8e6, other_params: 12e6, n_blocks: 6 };
        let light = stage_candidates(&s, Level::Light, 60.0, "t");
        let medium = stage_candidates(&s, Level::Medium, 60.0, "t");
        let full = stage_candidates(&s, Level::Full, 60.0, "t");
        assert!(light.len() < medium.len() && medium.len() < full.len());
        assert!(light.iter().all(|c| c.family == "quant"));
        let mut names: Vec<&str> = full.iter().map(|c| c.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), full.len(), "names are unique");
        assert!(full.iter().any(|c| c.name.contains("distill")));
    }
}
