//! GGUF output on a tiny LLaMA: written as a GGUF source (f32, llama.cpp's Q/K permutation and names), read
//! back identical to the HF original, then re-written as Q8_0 and read back close to it.

use candle_core::{Device, Tensor};
use whittle_formats::gguf::{write, Gguf, Value};
use whittle_models::llama::{permute_rows, KvCache};
use whittle_models::testing::tiny_llama;
use whittle_models::{load, names, LoadOptions, Loaded, Model};
use whittle_quant::gguf_out::{write_gguf, Ftype, GgufOptions};

/// Q8_0 weights: logits within this fraction of the largest |logit| of the f32 model's.
const MAX_Q8_0_LOGIT_REL_ERR: f32 = 0.02;
/// The same with int8 activations per 32-block (the block runtime) on this 32-wide random model.
const MAX_Q8_0_INT8_ACTS_LOGIT_REL_ERR: f32 = 0.05;
/// 4-5-bit weights (Q4_K_M's fallbacks on these narrow rows).
const MAX_Q4_LOGIT_REL_ERR: f32 = 0.15;

fn logits(l: &Loaded) -> Vec<f32> {
    let Model::Llama(m) = &l.model else { panic!() };
    let x = Tensor::new(&[1u32, 7, 3, 9, 22], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.forward(&x, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn gguf_source_roundtrip_and_q8_0_output() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny_llama(d.path());
    let hf = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    // A GGUF of the same weights, as llama.cpp's converter writes it.
    let mut tensors = Vec::new();
    for (n, w) in &t {
        let g = names::hf_to_gguf(n).unwrap();
        let w = if n.ends_with("q_proj.weight") || n.ends_with("k_proj.weight") {
            permute_rows(w, w.dim(0).unwrap() / 8).unwrap()
        } else {
            w.clone()
        };
        let ne: Vec<u64> = w.dims().iter().rev().map(|&x| x as u64).collect();
        let bytes: Vec<u8> =
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((g, ne, 0u32, bytes));
    }
    // Byte-level BPE over the 50 ids: single characters, no merges.
    let toks: Vec<Value> =
        (0..50).map(|i| Value::String(((b'a' + (i % 26) as u8) as char).to_string() + &"x".repeat(i / 26))).collect();
    let meta = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(2)),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.feed_forward_length", Value::U32(48)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.context_length", Value::U32(64)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(toks)),
        ("tokenizer.ggml.merges", Value::Array(vec![Value::String("a x".into())])),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let refs: Vec<(&str, Vec<u64>, u32, Vec<u8>)> =
        tensors.iter().map(|(n, ne, ty, b)| (n.as_str(), ne.clone(), *ty, b.clone())).collect();
    let src_path = d.path().join("tiny.gguf");
    write::write_file(&src_path, &meta, &refs).unwrap();
    let gg = load(src_path.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(logits(&gg), logits(&hf), "GGUF (un-permuted on load) must equal the HF original");

    let out = d.path().join("tiny-q8_0.gguf");
    let src = Gguf::open(&src_path).unwrap();
    let opts = |ftype| GgufOptions { ftype, overrides: &[], allow_requantize: false, imatrix: None };
    let report = write_gguf(&src, &out, &opts(Ftype::Q8_0)).unwrap();
    // token_embd + 14 block weights; the three whose rows are not whole 32-blocks (block 0's down_proj, in 48;
    // block 1's o_proj, in 16, and down_proj, in 24) fall back to F16.
    assert_eq!(report.layers.len(), 1 + 2 * 7);
    assert_eq!(report.layers.iter().filter(|r| r.scheme == "f16").count(), 3);
    assert!(report.layers.iter().filter(|r| r.scheme == "q8_0").all(|r| (r.bpw - 8.5).abs() < 1e-9));
    // Weights uniform in ±0.5: Q8_0 steps of ≤ 0.5/127 give an RMSE near step/√12 ≈ 1.1e-3.
    assert!(
        report.layers.iter().filter(|r| r.scheme == "q8_0").all(|r| r.weight_rmse > 1e-4 && r.weight_rmse < 2e-3),
        "{:?}",
        report.layers
    );
    let g = Gguf::open(&out).unwrap();
    assert_eq!(g.get("general.file_type").and_then(|v| v.as_u64()), Some(7));
    assert_eq!(g.tensor("blk.0.attn_q.weight").unwrap().type_name, "q8_0");
    assert_eq!(g.tensor("blk.0.attn_norm.weight").unwrap().type_name, "f32");
    let b = logits(&hf);
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_err = |l: &Loaded| logits(l).iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    // Run in the block format, and dequantized to f32.
    for dequantize in [false, true] {
        let q = load(out.to_str().unwrap(), &LoadOptions { dequantize, ..Default::default() }).unwrap();
        let err = max_err(&q);
        let tol = if dequantize { MAX_Q8_0_LOGIT_REL_ERR } else { MAX_Q8_0_INT8_ACTS_LOGIT_REL_ERR };
        assert!(err < tol * scale && err > 0.0, "dequantize {dequantize}: {err} vs scale {scale}");
    }
    // A 4-bit mixture: every 2-D weight quantized, the model runs and stays near the original.
    let out4 = d.path().join("tiny-q4_k_m.gguf");
    let r4 = write_gguf(&src, &out4, &opts(Ftype::Q4KM)).unwrap();
    assert!(r4.layers.iter().any(|r| r.scheme == "q5_0"), "{:?}", r4.layers);
    let q4 = load(out4.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let err = max_err(&q4);
    assert!(err < MAX_Q4_LOGIT_REL_ERR * scale, "{err} vs scale {scale}");
    // Requantizing a quantized source needs the flag.
    let e = write_gguf(&Gguf::open(&out).unwrap(), &d.path().join("x.gguf"), &opts(Ftype::Q4_0)).unwrap_err();
    assert!(e.to_string().contains("already quantized"), "{e}");
    assert!(!d.path().join("x.gguf").exists());
}
