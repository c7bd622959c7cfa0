//! Every ONNX export path round-tripped through ONNX Runtime on tiny random models: the export is run in ORT
//! by `verify` and compared with whittle's run of the same model.
//!
//! ONNX Runtime comes from the `onnxruntime` wheel that `scripts/test-deps.sh` installs into
//! `~/.cache/whittle-test-venv` (or `ORT_DYLIB_PATH`); without it each test prints why it skipped.

use std::path::{Path, PathBuf};

use whittle_core::{Linear, LinearWeight};
use whittle_export::onnx::{self, linear::LinearOptions, OnnxOptions};
use whittle_export::verify::{verify, VerifyOptions};
use whittle_kernels::int8::{quantize_rows_sym, PackedI8};
use whittle_models::{load, testing, Loaded};

/// f32 graphs compute what whittle computes, in another order: embeddings agree to this cosine.
const MIN_COS_F32: f64 = 0.99999;
/// int8 graphs round like whittle but may round a tie the other way (half-even vs half-away) or sum in
/// another order before the scales: embeddings of the tiny model agree to this cosine.
const MIN_COS_INT8: f64 = 0.999;
/// One MatMulNBits Linear against whittle's block kernel: the same int8 activations and 4-bit weights, f32
/// sums in another order (measured: about 7e-7 of the largest output).
const MAX_NBITS_REL_ERR: f32 = 1e-5;
/// Spearman on a dozen pairs moves by whole ranks; the two runs must rank the pairs alike.
const MAX_STS_DIFF: f64 = 1e-6;

fn ort_available() -> bool {
    match whittle_export::runtime::find_library(None) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: {e} (scripts/test-deps.sh installs it)");
            false
        }
    }
}

fn open(dir: &Path) -> Loaded {
    load(dir.to_str().unwrap(), &Default::default()).unwrap()
}

/// An STS-B-style TSV of `n` pairs of words the tiny BERT's tokenizer knows, with made-up gold scores.
fn sts_file(dir: &Path, n: usize) -> PathBuf {
    let mut s = String::from("genre\tfile\tyear\tid\tscore\tsentence1\tsentence2\n");
    for i in 0..n {
        let a: Vec<String> = (0..3 + i % 4).map(|j| format!("w{}", 3 + (i * 7 + j * 5) % 36)).collect();
        let b: Vec<String> = (0..2 + i % 5).map(|j| format!("w{}", 3 + (i * 11 + j * 3) % 36)).collect();
        s += &format!("x\tx\tx\t{i}\t{}\t{}\t{}\n", (i * 37 % 50) as f64 / 10.0, a.join(" "), b.join(" "));
    }
    let p = dir.join("sts.tsv");
    std::fs::write(&p, s).unwrap();
    p
}

fn encoder_options(dir: &Path) -> VerifyOptions {
    VerifyOptions { sts_file: Some(sts_file(dir, 16)), threads: Some(1), ..Default::default() }
}

/// Exports `l` to `dir/name` and verifies it; returns (cos_min, sts_onnx, sts_whittle).
fn export_and_verify_encoder(l: &Loaded, dir: &Path, name: &str, o: &OnnxOptions) -> (f64, f64, f64) {
    let out = dir.join(name);
    let r = onnx::export(l, &out, o).unwrap();
    assert!(
        out.join("model.onnx").is_file() && out.join("tokenizer.json").is_file() && out.join("config.json").is_file()
    );
    assert_eq!(r.outputs, ["last_hidden_state", "sentence_embedding"]);
    let v = verify(&out, l, &encoder_options(dir)).unwrap();
    let e = v.encoder.unwrap();
    (e.cos_min, e.sts_onnx, e.sts_whittle)
}

fn tiny_bert(dir: &Path) -> Loaded {
    let m = dir.join("bert");
    testing::tiny_bert_layers(&m, 32, 48, 2);
    open(&m)
}

#[test]
fn bert_f32_runs_in_onnx_runtime_as_in_whittle() {
    if !ort_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let l = tiny_bert(d.path());
    let (cos, a, b) = export_and_verify_encoder(&l, d.path(), "onnx", &OnnxOptions::default());
    assert!(cos >= MIN_COS_F32, "cos_min {cos}");
    assert!((a - b).abs() <= MAX_STS_DIFF, "STS onnx {a} whittle {b}");
}

/// Every block Linear as w8a8 (dynamic or static), quantized the way `whittle quantize` stores them.
fn to_int8(l: &mut Loaded, stat: bool) {
    for (_, lin) in l.model.block_linears_mut() {
        let w: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let (m, k) = (lin.out_features(), lin.in_features());
        let (q, s) = quantize_rows_sym(&w, m, k);
        let p = PackedI8::new(q, s, m, k);
        let new = if stat {
            // A calibrated range of about [-3, 3] with zero point 128.
            Linear::int8_static(p, 6.0 / 255.0, 128, lin.bias.clone()).unwrap()
        } else {
            Linear::int8_dynamic(p, lin.bias.clone()).unwrap()
        };
        *lin = new.inheriting(lin);
    }
}

#[test]
fn bert_w8a8_dynamic_per_token_and_per_tensor() {
    if !ort_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut l = tiny_bert(d.path());
    to_int8(&mut l, false);
    let (cos, a, b) = export_and_verify_encoder(&l, d.path(), "tok", &OnnxOptions::default());
    assert!(cos >= MIN_COS_INT8, "per-token: cos_min {cos}");
    assert!((a - b).abs() <= MAX_STS_DIFF, "per-token: STS onnx {a} whittle {b}");
    // ONNX Runtime's own form (one activation scale per tensor): runs, and stays close.
    let o = OnnxOptions { linear: LinearOptions { per_tensor_dynamic: true } };
    let (cos, _, _) = export_and_verify_encoder(&l, d.path(), "tensor", &o);
    assert!(cos >= 0.9, "per-tensor: cos_min {cos}");
}

#[test]
fn bert_w8a8_static_as_qdq() {
    if !ort_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut l = tiny_bert(d.path());
    to_int8(&mut l, true);
    let (cos, a, b) = export_and_verify_encoder(&l, d.path(), "onnx", &OnnxOptions::default());
    assert!(cos >= MIN_COS_INT8, "cos_min {cos}");
    assert!((a - b).abs() <= MAX_STS_DIFF, "STS onnx {a} whittle {b}");
}

#[test]
fn bert_low_rank_as_two_matmuls_and_shared_blocks_stored_once() {
    if !ort_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut l = tiny_bert(d.path());
    let plain = onnx::model_bytes(&l, &OnnxOptions::default()).unwrap().0.len();
    // Block 1 shares block 0's weights: the export stores them once.
    l.model.share_block(1, 0);
    let shared = onnx::model_bytes(&l, &OnnxOptions::default()).unwrap().0.len();
    let block_bytes = 4 * (4 * 32 * 32 + 2 * 32 * 48); // the six Linears' weights, f32
    assert!(plain - shared >= block_bytes, "sharing saved {} bytes of {block_bytes}", plain - shared);
    let (cos, _, _) = export_and_verify_encoder(&l, d.path(), "shared", &OnnxOptions::default());
    assert!(cos >= MIN_COS_F32, "shared: cos_min {cos}");
    // The intermediate Linear of block 0 as U·V (rank 20).
    for (n, lin) in l.model.block_linears_mut() {
        if n == "encoder.layer.0.intermediate.dense" {
            let w = lin.dequantize().unwrap(); // (48, 32)
            let u = w.narrow(1, 0, 20).unwrap().contiguous().unwrap(); // (48, 20)
            let v = testing::rand(&[20, 32], 99);
            *lin = Linear::low_rank(u, v, lin.bias.clone()).unwrap().inheriting(lin);
            assert!(matches!(lin.weight, LinearWeight::LowRank(_)));
        }
    }
    let (cos, a, b) = export_and_verify_encoder(&l, d.path(), "lowrank", &OnnxOptions::default());
    assert!(cos >= MIN_COS_F32, "low-rank: cos_min {cos}");
    assert!((a - b).abs() <= MAX_STS_DIFF, "low-rank: STS onnx {a} whittle {b}");
}

/// The tiny LLaMA (GQA, block 1 narrower than block 0) decodes the same greedy tokens in ONNX Runtime, with
/// its KV cache fed back, and scores a chunk with the same logits.
#[test]
fn llama_with_kv_cache_decodes_as_whittle() {
    if !ort_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("llama");
    testing::tiny_llama(&m);
    let l = open(&m);
    let out = d.path().join("onnx");
    let r = onnx::export(&l, &out, &OnnxOptions::default()).unwrap();
    assert_eq!(r.inputs[..3], ["input_ids", "attention_mask", "position_ids"]);
    assert_eq!(
        r.inputs[3..],
        ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    );
    assert_eq!(r.outputs[0], "logits");
    let words: Vec<String> = (0..200).map(|i| format!("w{}", 1 + (i * 13) % 49)).collect();
    let text = d.path().join("text.txt");
    std::fs::write(&text, words.join(" ")).unwrap();
    let o = VerifyOptions {
        prompts: vec!["w1 w3 w5".into(), "w7".into(), "w2 w9 w4 w4 w8 w11".into()],
        n_tokens: 12,
        chunks: 2,
        ctx: 32,
        text_file: Some(text),
        threads: Some(1),
        ..Default::default()
    };
    let v = verify(&out, &l, &o).unwrap().decoder.unwrap();
    for p in &v.prompts {
        assert_eq!(p.export_ids, p.whittle_ids, "prompt {:?}", p.prompt);
    }
    assert_eq!(v.identical, 3);
    assert_eq!(v.tokens, 2 * 16);
    assert!(v.top1_agree.unwrap() >= 100.0, "top-1 {:?}", v.top1_agree);
    assert!(v.kld_mean.unwrap() < 1e-6, "KLD {:?}", v.kld_mean);
}

/// The tiny LLaMA with every block Linear whose width allows it in whittle's 4-bit grouped format
/// (symmetric or with zero points), exported as MatMulNBits: the same greedy tokens in ONNX Runtime.
#[test]
fn llama_w4a16_as_matmul_nbits() {
    if !ort_available() {
        return;
    }
    for zero_point in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("llama");
        testing::tiny_llama(&m);
        let mut l = open(&m);
        let rtn = whittle_core::rtn::Rtn { bits: 4, group: 32, zero_point };
        let mut n = 0;
        for (_, lin) in l.model.block_linears_mut() {
            if lin.in_features() % 32 == 0 {
                let w: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let bw = rtn.quantize(&w, lin.out_features(), lin.in_features());
                *lin = Linear::rtn(&bw, rtn, None).unwrap().inheriting(lin);
                n += 1;
            }
        }
        assert!(n >= 8, "{n} layers quantized");
        let out = d.path().join("onnx");
        let r = onnx::export(&l, &out, &OnnxOptions::default()).unwrap();
        assert!(r.linears.keys().any(|k| k.contains("MatMulNBits")), "{:?}", r.linears);
        let o = VerifyOptions {
            prompts: vec!["w1 w3 w5".into(), "w2 w9 w4 w4 w8 w11".into()],
            n_tokens: 8,
            chunks: 0,
            threads: Some(1),
            ..Default::default()
        };
        let v = verify(&out, &l, &o).unwrap().decoder.unwrap();
        for p in &v.prompts {
            assert_eq!(p.export_ids, p.whittle_ids, "zero_point {zero_point}: prompt {:?}", p.prompt);
        }
    }
}

/// The tiny LLaMA in 4-bit groups, run with `float_activations` and exported so (MatMulNBits on f32
/// activations): ONNX Runtime gives whittle's greedy tokens and logits to float rounding. Verifying that
/// export against the int8-activation run is refused naming the option (they compute different things).
#[test]
fn llama_w4a16_on_float_activations_agrees_to_float_rounding() {
    if !ort_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("llama");
    testing::tiny_llama(&m);
    let w4 = |mut l: Loaded| {
        let rtn = whittle_core::rtn::Rtn { bits: 4, group: 32, zero_point: false };
        for (_, lin) in l.model.block_linears_mut() {
            if lin.in_features() % 32 == 0 {
                let w: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let bw = rtn.quantize(&w, lin.out_features(), lin.in_features());
                *lin = Linear::rtn(&bw, rtn, None).unwrap().inheriting(lin);
            }
        }
        l
    };
    let (mut l, int8) = (w4(open(&m)), w4(open(&m))); // RTN is deterministic: the same codes twice
    for (_, lin) in l.model.block_linears_mut() {
        let mut dp = lin.dispatch();
        dp.float_activations = true;
        lin.set_dispatch(dp);
    }
    let out = d.path().join("onnx");
    let r = onnx::export(&l, &out, &OnnxOptions::default()).unwrap();
    assert!(r.linears.keys().any(|k| k.contains("MatMulNBits (f32 activations)")), "{:?}", r.linears);
    let text = d.path().join("text.txt");
    let words: Vec<String> = (0..400).map(|i| format!("w{}", 3 + (i * 7) % 36)).collect();
    std::fs::write(&text, words.join(" ")).unwrap();
    let o = VerifyOptions {
        prompts: vec!["w1 w3 w5".into(), "w2 w9 w4 w4 w8 w11".into()],
        n_tokens: 8,
        chunks: 1,
        ctx: 32,
        text_file: Some(text),
        threads: Some(1),
        ..Default::default()
    };
    let v = verify(&out, &l, &o).unwrap().decoder.unwrap();
    assert_eq!(v.identical, 2);
    assert!(v.top1_agree.unwrap() >= 100.0, "top-1 {:?}", v.top1_agree);
    assert!(v.kld_mean.unwrap() < 1e-6, "KLD {:?}", v.kld_mean);
    let e = verify(&out, &int8, &o).unwrap_err().to_string();
    assert!(e.contains("take f32 activations") && e.contains("option `float_activations`"), "{e}");
}

/// whittle rounds activations to int8 with ties away from zero (ONNX's `Round`: to even). A block whose
/// scale is exactly 1 (max |x| = 127) puts ties on x.5; the graph must round them as whittle does.
#[test]
fn matmul_nbits_rounds_activation_ties_as_whittle() {
    if !ort_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (n, k) = (32, 32);
    // W = I: each output is one rounded activation (4-bit identity: 1 → 7·(1/7), 0 → 0).
    let w: Vec<f32> = (0..n * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
    let mut x = vec![127f32];
    x.extend((1..k).map(|i| (i as f32 - 16.0) + 0.5)); // −14.5 … 15.5: every one a tie
    let rtn = whittle_core::rtn::Rtn { bits: 4, group: 32, zero_point: false };
    let lin = Linear::rtn(&rtn.quantize(&w, n, k), rtn, None).unwrap();
    let xt = candle_core::Tensor::from_vec(x.clone(), (1, k), &candle_core::Device::Cpu).unwrap();
    let ours: Vec<f32> = lin.forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let theirs = ort_linear(&lin, &x, 1, d.path());
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!((a - b).abs() <= MAX_NBITS_REL_ERR * 127.0, "x[{i}] = {}: whittle {a}, ORT {b}", x[i]);
        if i > 0 {
            assert!((a.abs() - (x[i].abs() + 0.5)).abs() < 0.01, "x[{i}] = {} rounds away from zero: {a}", x[i]);
        }
    }
}

#[test]
fn block_formats_are_refused_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("llama");
    testing::tiny_llama(&m);
    let mut l = open(&m);
    for (n, lin) in l.model.block_linears_mut() {
        if n == "model.layers.0.mlp.gate_proj" {
            let w: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // 3-bit groups: no MatMulNBits form here.
            let rtn = whittle_core::rtn::Rtn { bits: 3, group: 32, zero_point: false };
            let bw = rtn.quantize(&w, lin.out_features(), lin.in_features());
            *lin = Linear::rtn(&bw, rtn, None).unwrap();
        }
    }
    let out = d.path().join("onnx");
    let e = onnx::export(&l, &out, &OnnxOptions::default()).unwrap_err().to_string();
    assert!(e.contains("`model.layers.0.mlp.gate_proj` (w3a16-g32)") && e.contains("no faithful ONNX form"), "{e}");
    assert!(!out.exists(), "nothing written");
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temporary left");
}

/// One Linear alone, in ONNX Runtime: y for `x` (rows × K), as the graph computes it.
fn ort_linear(lin: &Linear, x: &[f32], rows: usize, dir: &Path) -> Vec<f32> {
    use whittle_export::onnx::graph::{Dim, Graph};
    use whittle_export::onnx::proto::DataType;
    use whittle_export::runtime::{Input, OrtModel};
    let k = lin.in_features();
    let mut g = Graph::new(onnx::OPSET);
    g.input("x", DataType::Float, &[Dim::Fixed(rows), Dim::Fixed(k)]);
    let y = onnx::linear::linear(&mut g, "l", lin, "x").unwrap();
    g.output_from(&y, "y", DataType::Float, &[Dim::Fixed(rows), Dim::Fixed(lin.out_features())]);
    let p = dir.join("linear.onnx");
    std::fs::write(&p, g.finish("l", "", &[])).unwrap();
    let mut m = OrtModel::open(&p, None, Some(1)).unwrap();
    m.run(vec![("x".into(), Input::F32(vec![rows, k], x.to_vec()))], &["y"]).unwrap().remove(0).data
}

/// A 4-bit grouped Linear of several blocks per row (K = 256, groups of 64 and 128, symmetric and
/// asymmetric) gives in ONNX Runtime what whittle's block kernel gives.
#[test]
fn matmul_nbits_matches_whittle_over_many_blocks() {
    if !ort_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (n, k, rows) = (24, 256, 5);
    let w: Vec<f32> = testing::rand(&[n, k], 7).flatten_all().unwrap().to_vec1().unwrap();
    let x = testing::rand(&[rows, k], 8);
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    for (group, zero_point) in [(64, false), (128, true), (32, false)] {
        let rtn = whittle_core::rtn::Rtn { bits: 4, group, zero_point };
        let lin = Linear::rtn(&rtn.quantize(&w, n, k), rtn, None).unwrap();
        let ours: Vec<f32> = lin.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let theirs = ort_linear(&lin, &xv, rows, d.path());
        let err = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = ours.iter().fold(0f32, |a, b| a.max(b.abs()));
        assert!(err <= MAX_NBITS_REL_ERR * scale.max(1.0), "group {group} zp {zero_point}: max |Δ| {err} of {scale}");
    }
}
