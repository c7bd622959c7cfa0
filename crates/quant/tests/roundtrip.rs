//! w8a8-dynamic end to end on tiny models: quantize, save, load back, same outputs bit for bit.

use candle_core::{Device, Tensor};
use whittle_models::llama::KvCache;
use whittle_models::testing::{tiny_bert, tiny_llama};
use whittle_models::{load, text, LoadOptions, Model};
use whittle_quant::{quantize, Error, Plan};

/// Sentence embeddings of the int8 model vs the float one (tiny random model, unit-norm outputs).
const MAX_W8A8_EMBED_ABS_ERR: f32 = 0.05;

#[test]
fn bert_w8a8_roundtrip_is_bit_exact() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert(d.path());
    let l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let before = text::embed_texts(&l, &["w3 w4 w5", "w9 w10"], 16, 2).unwrap();
    let mut q = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let report = quantize(&mut q.model, &Plan::new("w8a8-dynamic", &[]).unwrap(), false, |_, _| {}).unwrap();
    assert_eq!(report.layers.len(), 6);
    assert!(report.linear_bytes_after * 2 < report.linear_bytes_before, "tiny layers: biases and scales weigh more");
    let after = text::embed_texts(&q, &["w3 w4 w5", "w9 w10"], 16, 2).unwrap();
    let err = before.iter().flatten().zip(after.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err > 0.0 && err < MAX_W8A8_EMBED_ABS_ERR, "{err}");
    let out = d.path().join("q");
    whittle_models::save::save_hf_dir(&q, &out, candle_core::DType::F32).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["layers"]["encoder.layer.0.output.dense"], "w8a8-dynamic");
    let back = load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert!(back.source.tensors.iter().any(|t| t.dtype == "i8"));
    assert_eq!(text::embed_texts(&back, &["w3 w4 w5", "w9 w10"], 16, 2).unwrap(), after, "bit for bit");
    // Requantizing needs the flag.
    let mut again = back;
    let e = quantize(&mut again.model, &Plan::new("w8a8-dynamic", &[]).unwrap(), false, |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::AlreadyQuantized(..)), "{e}");
    assert!(quantize(&mut again.model, &Plan::new("w8a8-dynamic", &[]).unwrap(), true, |_, _| {}).is_ok());
}

#[test]
fn llama_head_stays_float_unless_overridden_and_nan_is_named() {
    let d = tempfile::tempdir().unwrap();
    let mut t = tiny_llama(d.path());
    let mut q = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    quantize(&mut q.model, &Plan::new("w8a8", &[]).unwrap(), false, |_, _| {}).unwrap();
    let names: Vec<(String, bool)> = q.model.linears().into_iter().map(|(n, l)| (n, l.is_quantized())).collect();
    assert!(names.iter().all(|(n, qz)| *qz == (n != "lm_head")), "{names:?}");
    let Model::Llama(m) = &q.model else { panic!() };
    let x = Tensor::new(&[1u32, 5, 9], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    assert!(m.forward(&x, &mut KvCache::default()).unwrap().dims() == [1, 3, 50]);
    let mut h = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    quantize(&mut h.model, &Plan::new("w8a8", &["re:.*lm_head=w8a8".into()]).unwrap(), false, |_, _| {}).unwrap();
    assert!(h.model.linears().iter().all(|(_, l)| l.is_quantized()));
    // NaN in a weight: the error names the layer.
    let i = t.iter().position(|(n, _)| n == "model.layers.1.mlp.up_proj.weight").unwrap();
    t[i].1 = (t[i].1.clone() * f64::NAN).unwrap();
    whittle_formats::hf::write_safetensors(&d.path().join("model.safetensors"), &t, None).unwrap();
    let mut bad = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let e = quantize(&mut bad.model, &Plan::new("w8a8", &[]).unwrap(), false, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj"), "{e}");
}

/// Grouped weight-only int4/int8: quantize, save (packed codes + scales + zero points), load back: the same
/// logits bit for bit; widths that are not a multiple of 32 stay float, with a note.
#[test]
fn llama_weight_only_roundtrip_is_bit_exact() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let x = Tensor::new(&[1u32, 5, 9, 3], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = |l: &whittle_models::Loaded| -> Vec<f32> {
        let Model::Llama(m) = &l.model else { panic!() };
        m.forward(&x, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let base = logits(&load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap());
    // Tolerances relative to the largest |logit|: 4-bit steps on this 32-wide random model move logits a lot
    // (the real-model figure is perplexity, in the README); 8-bit barely.
    for (scheme, group, zp, tol) in [("w4a16", 32, false, 0.6), ("w8a16", 64, true, 0.03)] {
        let mut q = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
        let mut plan = Plan::new(scheme, &[]).unwrap();
        (plan.group_size, plan.zero_point) = (group, zp);
        let r = quantize(&mut q.model, &plan, false, |_, _| {}).unwrap();
        let kept: Vec<&str> = r.layers.iter().filter(|l| l.note.contains("kept")).map(|l| l.name.as_str()).collect();
        assert_eq!(kept.len(), 3, "{kept:?}"); // in-widths 48, 16 and 24
        let regrouped = r.layers.iter().filter(|l| l.note.contains("does not divide")).count();
        assert_eq!(regrouped, if group == 64 { 11 } else { 0 }, "{:?}", r.layers);
        let got = logits(&q);
        let scale = base.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err > 0.0 && err < tol * scale, "{scheme}: {err} vs {scale}");
        let out = d.path().join(scheme);
        whittle_models::save::save_hf_dir(&q, &out, candle_core::DType::F32).unwrap();
        let back = load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
        assert!(back.source.tensors.iter().any(|t| t.name.ends_with("weight_packed") && t.dtype == "u8"));
        assert_eq!(back.source.tensors.iter().any(|t| t.name.ends_with("weight_zero_point")), zp);
        let names: Vec<String> = back.model.linears().iter().map(|(_, l)| l.storage_name()).collect();
        assert!(names.iter().any(|n| n.starts_with(&format!("{scheme}-g"))), "{names:?}");
        assert_eq!(logits(&back), got, "{scheme}: bit for bit after save/load");
    }
}

/// Calibration text for the tiny models (their word tokenizer knows `w0`..`w49`).
fn tiny_text() -> String {
    (0..400)
        .map(|i| format!("w{} w{} w{} w{} w{} w{}", i % 50, (i * 7) % 50, (i * 3) % 50, 5, 9, i % 13))
        .collect::<Vec<_>>()
        .join("\n")
}

/// SmoothQuant rewrites the float model exactly (same outputs), evens out the inputs it smooths, and
/// w8a8-static with calibrated ranges saves and reloads bit for bit, for both families.
#[test]
fn smoothquant_is_exact_and_static_roundtrips() {
    use whittle_quant::calib::{calibrate, CalibOptions};
    for family in ["llama", "bert"] {
        let d = tempfile::tempdir().unwrap();
        if family == "llama" {
            tiny_llama(d.path());
        } else {
            whittle_models::testing::tiny_bert_sized(d.path(), 32, 64);
        }
        let run = |l: &whittle_models::Loaded| -> Vec<f32> {
            match &l.model {
                Model::Llama(m) => {
                    let x = Tensor::new(&[1u32, 5, 9, 3, 7], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                    m.forward(&x, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
                }
                Model::Bert(_) => text::embed_texts(l, &["w3 w4 w5", "w9 w10"], 16, 2).unwrap().concat(),
            }
        };
        let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
        let before = run(&l);
        let o = CalibOptions { samples: 8, seq_len: 16, source: "tiny".into(), int8: false };
        let mut cal = calibrate(&mut l, &tiny_text(), &o, |_, _| {}).unwrap();
        assert!(cal.stats.values().all(|s| s.rows > 0), "{family}: every Linear observed");
        let r = whittle_quant::smooth::smooth(&mut l.model, &mut cal.stats, 0.5).unwrap();
        assert!(!r.is_empty());
        let after = run(&l);
        let err = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = before.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(err <= 1e-4 * scale.max(1.0), "{family}: smoothing changed the float model by {err}");
        // Static: recalibrate on the smoothed model, quantize, save, reload.
        let cal = calibrate(&mut l, &tiny_text(), &o, |_, _| {}).unwrap();
        let mut plan = Plan::new("w8a8-static", &[]).unwrap();
        plan.observer = whittle_quant::Observer::Percentile(99.9);
        let rep = whittle_quant::quantize_calibrated(&mut l.model, &plan, false, Some(&cal.stats), |_, _| {}).unwrap();
        assert!(rep.layers.iter().all(|x| x.output_mse.is_some_and(|m| m > 0.0) && x.scheme == "w8a8-static"));
        let q = run(&l);
        let out = d.path().join("static");
        whittle_models::save::save_hf_dir(&l, &out, candle_core::DType::F32).unwrap();
        let back = load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
        assert!(back.source.tensors.iter().any(|t| t.name.ends_with("input_scale")));
        assert_eq!(run(&back), q, "{family}: bit for bit after save/load");
        // Without statistics, static quantization names the layer it cannot calibrate.
        let mut fresh = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
        let e = quantize(&mut fresh.model, &Plan::new("w8a8-static", &[]).unwrap(), false, |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("no calibration statistics for"), "{e}");
    }
}

/// AWQ rewrites the float model exactly (it only moves scales between ops) and never raises the output error
/// of plain rounding on the calibration rows (α = 0 is in its grid).
#[test]
fn awq_is_exact_and_not_worse_than_rounding() {
    use whittle_quant::calib::{calibrate, CalibOptions};
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let x = Tensor::new(&[1u32, 5, 9, 3, 7], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let run = |l: &whittle_models::Loaded| -> Vec<f32> {
        let Model::Llama(m) = &l.model else { panic!() };
        m.forward(&x, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let before = run(&l);
    let o = CalibOptions { samples: 8, seq_len: 16, source: "tiny".into(), int8: false };
    let mut cal = calibrate(&mut l, &tiny_text(), &o, |_, _| {}).unwrap();
    let rtn = whittle_core::Rtn { bits: 4, group: 32, zero_point: false };
    let r = whittle_quant::awq::awq(&mut l.model, &mut cal.stats, |_, k| (k % 32 == 0).then_some(rtn), 10, |_, _| {})
        .unwrap();
    assert!(!r.is_empty());
    assert!(r.iter().all(|g| g.awq_error <= g.rtn_error && (0.0..=1.0).contains(&g.alpha)), "{r:?}");
    let after = run(&l);
    let scale = before.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err <= 1e-4 * scale.max(1.0), "awq changed the float model by {err}");
}

/// `whittle imatrix`'s file: llama.cpp's GGUF imatrix layout, Σx² and token counts per block weight.
#[test]
fn imatrix_file_has_llama_cpp_layout() {
    use whittle_formats::gguf::Gguf;
    use whittle_quant::calib::{calibrate, CalibOptions};
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let o = CalibOptions { samples: 4, seq_len: 16, source: "tiny".into(), int8: false };
    let cal = calibrate(&mut l, &tiny_text(), &o, |_, _| {}).unwrap();
    let out = d.path().join("imatrix.gguf");
    let n = whittle_quant::imatrix::write_imatrix(&cal.stats, &out, "tiny", 4, 16, None).unwrap();
    assert_eq!(n, 14); // 7 Linears × 2 blocks; the head is left out as llama-imatrix does
    let g = Gguf::open(&out).unwrap();
    assert_eq!(g.get("general.type").and_then(|v| v.as_str()), Some("imatrix"));
    let t = g.tensor("blk.1.ffn_down.weight.in_sum2").unwrap();
    let c = g.tensor("blk.1.ffn_down.weight.counts").unwrap();
    assert_eq!((t.type_name, c.ne.clone()), ("f32", vec![1, 1]));
    let counts: Vec<f32> = g.dequantize(c).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(counts, vec![64.0]);
    let s = &cal.stats["model.layers.1.mlp.down_proj"];
    let sums: Vec<f32> = g.dequantize(t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(sums, s.sumsq.iter().map(|&v| v as f32).collect::<Vec<_>>());
}

/// The layer-wise GPTQ engine runs on both families, and every solved layer's output error on the
/// calibration inputs is at most plain rounding's (up to float noise).
#[test]
fn layerwise_gptq_runs_on_both_families_and_beats_rounding() {
    use whittle_quant::calib::CalibOptions;
    use whittle_quant::gptq::GptqOptions;
    let rtn = whittle_core::Rtn { bits: 3, group: 32, zero_point: true };
    // With the calibration forward in f32 and in int8 (`--calib-int8`).
    for (family, int8) in [("llama", false), ("bert", false), ("llama", true), ("bert", true)] {
        let d = tempfile::tempdir().unwrap();
        if family == "llama" {
            tiny_llama(d.path());
        } else {
            whittle_models::testing::tiny_bert_sized(d.path(), 32, 64);
        }
        let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
        let o = CalibOptions { samples: 8, seq_len: 16, source: "tiny".into(), int8 };
        let r = whittle_quant::layerwise::gptq_model(
            &mut l,
            &tiny_text(),
            &o,
            |_, k| (k % 32 == 0).then_some(rtn),
            GptqOptions::default(),
            |_, _| {},
        )
        .unwrap();
        assert!(!r.report.layers.is_empty(), "{family}");
        for lr in &r.report.layers {
            let (g, p) = (lr.output_mse.unwrap(), lr.rtn_output_mse.unwrap());
            assert!(g <= p * 1.01 + 1e-12, "{family} {}: gptq {g} > rtn {p}", lr.name);
        }
        let fits = |(n, l): &&(String, &whittle_core::Linear)| n.contains("layer") && l.in_features() % 32 == 0;
        assert!(l.model.linears().iter().filter(fits).all(|(_, l)| l.is_quantized()), "{family}");
    }
}

/// Sensitivity on a tiny decoder: one entry per block Linear, costs that fall with more bits, and an
/// allocation that meets its budget and names every layer.
#[test]
fn sensitivity_and_target_bpw_on_a_tiny_decoder() {
    use whittle_quant::calib::CalibOptions;
    use whittle_quant::mixed::{allocate, sensitivity, SensitivityOptions};
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let before: Vec<(String, Vec<f32>)> = l
        .model
        .linears()
        .into_iter()
        .map(|(n, l)| (n, l.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    let o = CalibOptions { samples: 2, seq_len: 16, source: "tiny".into(), int8: false };
    let so = SensitivityOptions { group_size: 32, ..Default::default() };
    let s = sensitivity(&mut l, &tiny_text(), &o, &so, |_, _| {}).unwrap();
    let fit = l.model.linears().iter().filter(|(n, l)| n.contains("layers") && l.in_features() % 32 == 0).count();
    assert_eq!(s.layers.len(), fit, "one entry per block Linear a grouped format fits");
    for ls in &s.layers {
        assert!(ls.probe_kl > 0.0, "{}: {}", ls.name, ls.probe_kl);
        let kl: Vec<f64> = ls.candidates.iter().map(|c| c.predicted_kl).collect(); // bits 8, 4, 3, 2
        assert!(kl.windows(2).all(|w| w[0] <= w[1]), "{}: {kl:?}", ls.name);
    }
    // The model is restored after every probe.
    for ((n, w), (_, lin)) in before.iter().zip(l.model.linears()) {
        let now: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(w, &now, "{n} changed");
    }
    s.check_matches(&l.model, "s.json").unwrap();
    let a = allocate(&s, 4.0, |_| false).unwrap();
    assert!(a.bpw <= 4.0 && a.bpw > 3.5, "{}", a.bpw);
    assert_eq!(a.choices.len(), fit);
    // A model with other widths is refused, naming the layer.
    let d2 = tempfile::tempdir().unwrap();
    tiny_bert(d2.path());
    let other = load(d2.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let e = s.check_matches(&other.model, "s.json").unwrap_err().to_string();
    assert!(e.contains("s.json") && e.contains("model.layers.0"), "{e}");
}

/// A factorised layer quantized with a weight-only scheme keeps its factorisation: U and V become two
/// grouped int8 Linears (the rank padded to 32), save and load give the same outputs bit for bit, and the
/// output stays close to the float factorisation's.
#[test]
fn low_rank_factors_are_quantized_separately_and_round_trip() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let name = "model.layers.0.mlp.gate_proj";
    // gate_proj (48, 32) as a rank-20 product: 20 is not a multiple of the group.
    let (u, v) = (whittle_models::testing::rand(&[48, 20], 7), whittle_models::testing::rand(&[20, 32], 8));
    for (n, lin) in l.model.linears_mut() {
        if n == name {
            *lin = whittle_core::Linear::low_rank(u.clone(), v.clone(), None).unwrap();
        }
    }
    let x = whittle_models::testing::rand(&[5, 32], 9);
    let float = |m: &Model| m.linears().into_iter().find(|(n, _)| n == name).unwrap().1.forward(&x).unwrap();
    let y0 = float(&l.model);
    let keep: Vec<String> = l
        .model
        .linears()
        .into_iter()
        .filter(|(n, _)| n != name)
        .map(|(n, _)| format!("^{}$=keep", regex_escape(&n)))
        .collect();
    let mut plan = Plan::new("w8a16", &keep).unwrap();
    plan.group_size = 32;
    let r = quantize(&mut l.model, &plan, false, |_, _| {}).unwrap();
    assert_eq!(r.layers.len(), 1);
    assert!(r.layers[0].scheme.starts_with("low-rank-32 w8a16-g32"), "{:?}", r.layers[0]);
    assert!(r.layers[0].note.contains("rank 20 padded to 32"), "{:?}", r.layers[0]);
    let lin = l.model.linears().into_iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert!(lin.is_quantized() && lin.rank() == Some(32));
    let y1 = float(&l.model);
    let rel = ((&y1 - &y0).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        / y0.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
    .sqrt();
    assert!(rel > 0.0 && rel < 0.02, "int8 factors: relative output error {rel}");
    let out = d.path().join("q");
    whittle_models::save::save_hf_dir(&l, &out, candle_core::DType::F32).unwrap();
    let back = load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
    for f in ["u.weight_packed", "v.weight_packed", "u.weight_scale"] {
        assert!(back.source.tensors.iter().any(|t| t.name == format!("{name}.{f}")), "{f}");
    }
    assert!(!back.source.tensors.iter().any(|t| t.name.starts_with(name) && t.name.ends_with("weight_u")));
    assert_eq!(float(&back.model).to_vec2::<f32>().unwrap(), y1.to_vec2::<f32>().unwrap(), "bit for bit");
    // GPTQ-style requantization of a quantized factorisation needs the flag, like any quantized layer.
    let mut again = back;
    let e = quantize(&mut again.model, &plan, false, |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::AlreadyQuantized(..)), "{e}");
}

fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}

/// The blocks' stages (what the layer-wise engine runs) compose to their forward, on both families.
#[test]
fn block_stages_compose_to_the_forward() {
    use whittle_models::bert::AttnMask;
    for family in ["llama", "bert"] {
        let d = tempfile::tempdir().unwrap();
        if family == "llama" {
            tiny_llama(d.path());
        } else {
            whittle_models::testing::tiny_bert_sized(d.path(), 32, 64);
        }
        let l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 4, 6]], &Device::Cpu).unwrap();
        type Stage<'a> = dyn Fn(usize, &mut Tensor, Option<&Tensor>) -> Option<Tensor> + 'a;
        let run = |stage: &Stage, x: &Tensor| {
            let mut x = x.clone();
            let mut input = stage(0, &mut x, None);
            for s in 1..=4 {
                input = stage(s, &mut x, input.as_ref());
            }
            assert!(input.is_none());
            x
        };
        let (full, staged) = match &l.model {
            Model::Llama(m) => {
                let (cos, sin, mask) = m.block_inputs(8).unwrap();
                let x = m.embed(&ids).unwrap();
                let b = &m.blocks[0];
                let hd = m.config.head_dim;
                let full = b.forward(&x, &cos, &sin, mask.as_ref(), &mut None, hd).unwrap();
                let staged = run(&|s, x, i| b.stage(s, x, i, &cos, &sin, mask.as_ref(), hd).unwrap(), &x);
                (full, staged)
            }
            Model::Bert(m) => {
                let x = m.embed(&ids, &ids.zeros_like().unwrap()).unwrap();
                let (b, hd, lens) = (&m.blocks[0], m.config.head_dim, [8usize]);
                let full = b.forward(&x, &AttnMask::Lengths(&lens), hd).unwrap();
                let staged = run(&|s, x, i| b.stage(s, x, i, &AttnMask::Lengths(&lens), hd).unwrap(), &x);
                (full, staged)
            }
        };
        let diff = (full - staged).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{family}: {diff}");
    }
}
