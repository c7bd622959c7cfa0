//! compressed-tensors export on tiny random LLaMAs: the safetensors read back (codes unpacked as
//! compressed-tensors' `unpack_from_int32` does, scales, zero points, `quantization_config`), the errors for
//! what transformers cannot load, and — where the peers' venv has torch, transformers and
//! compressed-tensors (`scripts/test-deps.sh`) — loaded by transformers and run by `verify`.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde_json::json;
use whittle_core::rtn::Rtn;
use whittle_core::{Linear, LinearWeight};
use whittle_export::compressed_tensors::{export, unpack_rows, CtOptions};
use whittle_export::gguf::Conversion;
use whittle_export::verify::{verify, VerifyOptions};
use whittle_models::{load, testing, Loaded};

/// The f16 rounding of a group scale moves a weight by at most 2⁻¹¹ of it.
const MAX_F16_SCALE_REL_ERR: f64 = 1e-3;
/// An asymmetric grid in f32: `s·(q − z)` (compressed-tensors) against `s·q + min` (whittle), one rounding.
const MAX_F32_ASYM_REL_ERR: f64 = 1e-6;
/// transformers (f32, the decompressed weights) against whittle run dequantized (exact activations) on the
/// tiny model: the same weights, summed in another order.
const MAX_TRANSFORMERS_KLD: f64 = 1e-5;

/// A byte-level BPE tokenizer of exactly 50 tokens (as `tests/gguf.rs`): end-of-text, `a`–`z`, `Ġ`, six
/// merges, `A`–`O`, `Ċ`.
fn bpe_tokenizer() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    let mut toks: Vec<String> = vec!["<|endoftext|>".into()];
    toks.extend(('a'..='z').map(String::from));
    toks.extend(["Ġ", "Ġt", "he", "Ġthe", "Ġc", "at", "Ġcat"].map(String::from));
    toks.extend(('A'..='O').map(String::from));
    toks.push("Ċ".into());
    assert_eq!(toks.len(), 50);
    for (i, t) in toks.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": bl, "post_processor": bl, "decoder": bl,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["Ġ", "c"], ["a", "t"], ["Ġc", "at"]]}})
}

/// `testing::slow_llama` (4 uniform blocks, widths 256 / 512) with the BPE tokenizer, whose end-of-text
/// token is BOS and EOS (the fixture's ids 1 and 2 are letters here, which transformers would make special).
fn uniform(dir: &Path) -> Loaded {
    testing::slow_llama(dir);
    std::fs::write(dir.join("tokenizer.json"), bpe_tokenizer().to_string()).unwrap();
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["bos_token_id"] = json!(0);
    cfg["eos_token_id"] = json!(0);
    std::fs::write(&p, cfg.to_string()).unwrap();
    load(dir.to_str().unwrap(), &Default::default()).unwrap()
}

/// Replaces every block Linear of `l` with its round-to-nearest `rtn` form.
fn quantize_blocks(l: &mut Loaded, rtn: Rtn) {
    for (_, lin) in l.model.block_linears_mut() {
        let w: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let bw = rtn.quantize(&w, lin.out_features(), lin.in_features());
        *lin = Linear::rtn(&bw, rtn, None).unwrap();
    }
}

/// A tensor of the export as safetensors stores it: (dtype, shape, little-endian bytes).
fn raw(st: &SafeTensors, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    (t.dtype(), t.shape().to_vec(), t.data().to_vec())
}

fn i32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<i32>) {
    let (dt, shape, b) = raw(st, name);
    assert_eq!(dt, Dtype::I32, "{name}");
    (shape, b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[test]
fn grouped_grids_are_packed_code_for_code_as_compressed_tensors_reads_them() {
    let d = tempfile::tempdir().unwrap();
    for (bits, group, zero_point) in [(4, 32, false), (4, 64, true), (8, 128, false), (3, 32, true)] {
        let rtn = Rtn { bits, group, zero_point };
        let mut l = uniform(&d.path().join("m"));
        quantize_blocks(&mut l, rtn);
        let out = d.path().join(rtn.name());
        let r = export(&l, &out, &CtOptions::default()).unwrap();
        assert_eq!(r.quant_format, "pack-quantized");
        assert_eq!(r.ignore, vec!["lm_head".to_string()], "a tied float head is ignored");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let q = &cfg["quantization_config"];
        assert_eq!(q["quant_method"], "compressed-tensors");
        assert_eq!(q["format"], "pack-quantized");
        assert_eq!(q["quantization_status"], "compressed");
        let w = &q["config_groups"]["group_0"]["weights"];
        assert_eq!(q["config_groups"]["group_0"]["targets"], json!(["Linear"]));
        assert_eq!(
            (w["num_bits"].as_u64(), w["group_size"].as_u64(), w["symmetric"].as_bool(), w["strategy"].as_str()),
            (Some(bits as u64), Some(group as u64), Some(!zero_point), Some("group"))
        );
        assert_eq!(cfg["torch_dtype"], "float16");
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let hf = SafeTensors::deserialize(&bytes).unwrap();
        for (name, lin) in l.model.block_linears() {
            let (m, k) = (lin.out_features(), lin.in_features());
            let LinearWeight::Block(b) = &lin.weight else { panic!("quantized") };
            let ours = b.packed.unpack();
            let (shape, words) = i32s(&hf, &format!("{name}.weight_packed"));
            assert_eq!(shape, vec![m, k * bits as usize / 32], "{name}");
            // compressed-tensors' signed codes are the unpacked values − 2^(bits−1): whittle's codes shifted.
            assert_eq!(unpack_rows(&words, m, k, bits), ours.q, "{name}: codes differ");
            let (dt, shape, b) = raw(&hf, &format!("{name}.weight_shape"));
            let ws: Vec<i64> = b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!((dt, shape, ws), (Dtype::I64, vec![2], vec![m as i64, k as i64]), "{name}");
            let (dt, shape, _) = raw(&hf, &format!("{name}.weight_scale"));
            assert_eq!((dt, shape), (Dtype::F16, vec![m, k / group]), "{name}");
            if zero_point {
                let (zs, zw) = i32s(&hf, &format!("{name}.weight_zero_point"));
                assert_eq!(zs, vec![(m * bits as usize).div_ceil(32), k / group], "{name}: packed along out");
                // Transposed back: (k/G, m) rows unpacked, then zero point (r, g).
                let zt: Vec<i32> = (0..zw.len()).map(|i| zw[(i % zs[0]) * zs[1] + i / zs[0]]).collect();
                let z = unpack_rows(&zt, k / group, m, bits);
                let (_, _, want) = rtn.pack(&ours);
                let want = want.unwrap();
                for r in 0..m {
                    for g in 0..k / group {
                        assert_eq!(z[g * m + r], want[r * (k / group) + g], "{name}: zero point ({r}, {g})");
                    }
                }
            } else {
                assert!(
                    hf.tensor(&format!("{name}.weight_zero_point")).is_err(),
                    "{name}: symmetric has no zero point"
                );
            }
            let row = r.tensors.iter().find(|t| t.name == name).unwrap();
            assert!(matches!(row.conversion, Conversion::Exact | Conversion::Codes), "{name}");
            assert!(row.rel_err <= MAX_F16_SCALE_REL_ERR, "{name}: {}", row.rel_err);
        }
        // f32 model dtype: the scales as whittle holds them; symmetric grids exact, asymmetric ones up to the
        // order of `s·(q − z)` against whittle's `s·q + min`.
        let out32 = d.path().join(format!("{}-f32", rtn.name()));
        let r = export(&l, &out32, &CtOptions { dtype: candle_core::DType::F32 }).unwrap();
        for t in &r.tensors {
            if zero_point {
                assert!(t.rel_err <= MAX_F32_ASYM_REL_ERR, "{}: {}", t.name, t.rel_err);
            } else {
                assert_eq!(t.conversion, Conversion::Exact, "{}: f32 export of a symmetric grid is exact", t.name);
            }
        }
    }
}

#[test]
fn w8a8_is_int_quantized_and_mixed_schemes_name_their_linears() {
    let d = tempfile::tempdir().unwrap();
    let mut l = uniform(&d.path().join("m"));
    {
        let mut ls = l.model.block_linears_mut();
        for (i, (_, lin)) in ls.iter_mut().enumerate() {
            let w: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let (m, k) = (lin.out_features(), lin.in_features());
            **lin = if i % 2 == 0 {
                let rtn = Rtn { bits: 4, group: 32, zero_point: false };
                Linear::rtn(&rtn.quantize(&w, m, k), rtn, None).unwrap()
            } else {
                // Symmetric int8 per output channel.
                let scale: Vec<f32> = w.chunks(k).map(|r| r.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0).collect();
                let q: Vec<i8> = w.iter().enumerate().map(|(i, v)| (v / scale[i / k]).round() as i8).collect();
                Linear::int8_dynamic(whittle_kernels::int8::PackedI8::new(q, scale, m, k), None).unwrap()
            };
        }
    }
    let out = d.path().join("mixed");
    let r = export(&l, &out, &CtOptions::default()).unwrap();
    assert_eq!(r.quant_format, "mixed-precision");
    assert_eq!(r.groups.len(), 2);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let groups = cfg["quantization_config"]["config_groups"].as_object().unwrap();
    let w8 = groups.values().find(|g| g["format"] == "int-quantized").unwrap();
    assert_eq!(w8["input_activations"]["strategy"], "token");
    assert_eq!(w8["weights"]["strategy"], "channel");
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let hf = SafeTensors::deserialize(&bytes).unwrap();
    for (name, lin) in l.model.block_linears() {
        let listed = groups
            .values()
            .filter(|g| g["targets"].as_array().unwrap().iter().any(|t| t.as_str() == Some(name.as_str())))
            .count();
        assert_eq!(listed, 1, "{name} is in exactly one group");
        if let LinearWeight::Int8Dynamic(p) = &lin.weight {
            let (dt, shape, q) = raw(&hf, &format!("{name}.weight"));
            let q: Vec<i8> = q.into_iter().map(|b| b as i8).collect();
            assert_eq!((dt, shape, q), (Dtype::I8, vec![p.m, p.k], p.q.clone()), "{name}: int8 as whittle holds them");
            let (dt, shape, _) = raw(&hf, &format!("{name}.weight_scale"));
            assert_eq!((dt, shape), (Dtype::F16, vec![p.m, 1]), "{name}");
        }
    }
}

#[test]
fn what_transformers_cannot_load_is_a_clear_error_and_nothing_is_written() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x");
    // A float model: nothing to compress.
    let l = uniform(&d.path().join("m"));
    let e = export(&l, &out, &CtOptions::default()).unwrap_err().to_string();
    assert!(e.contains("no Linear is quantized"), "{e}");
    // Low-rank: named.
    let mut l = uniform(&d.path().join("m"));
    quantize_blocks(&mut l, Rtn { bits: 4, group: 32, zero_point: false });
    {
        let mut ls = l.model.block_linears_mut();
        let (_, lin) = &mut ls[3]; // model.layers.0.self_attn.o_proj
        let w = lin.dequantize().unwrap();
        **lin = Linear::low_rank(w.narrow(1, 0, 8).unwrap(), w.narrow(0, 0, 8).unwrap(), None).unwrap();
    }
    let e = export(&l, &out, &CtOptions::default()).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.self_attn.o_proj") && e.contains("low-rank"), "{e}");
    // Shared blocks.
    let mut l = uniform(&d.path().join("m"));
    quantize_blocks(&mut l, Rtn { bits: 4, group: 32, zero_point: false });
    l.model.share_block(2, 1);
    l.shared_blocks.insert(2, 1);
    let e = export(&l, &out, &CtOptions::default()).unwrap_err().to_string();
    assert!(e.contains("model.layers.2") && e.contains("shared with block 1"), "{e}");
    // Per-block widths (tiny_llama: FFN 48 / 24).
    testing::tiny_llama(&d.path().join("w"));
    let l = load(d.path().join("w").to_str().unwrap(), &Default::default()).unwrap();
    let e = export(&l, &out, &CtOptions::default()).unwrap_err().to_string();
    assert!(e.contains("block 1") && e.contains("one width for every layer"), "{e}");
    assert!(!out.exists(), "a refused export leaves nothing");
    let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().starts_with(".x")), "no temporaries: {left:?}");
}

/// Whether the peers' venv can run transformers with compressed-tensors.
fn transformers_python() -> Option<std::path::PathBuf> {
    let py = whittle_export::llamacpp::default_python()?;
    let ok = std::process::Command::new(&py)
        .args(["-c", "import torch, transformers, compressed_tensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

#[test]
fn transformers_loads_the_export_and_runs_it_as_whittle_runs_the_source() {
    let Some(python) = transformers_python() else {
        eprintln!(
            "skipped: no ~/.cache/whittle-peers/bin/python with torch, transformers and compressed-tensors \
             (scripts/test-deps.sh)"
        );
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("t.txt");
    std::fs::write(&text, " the cat".repeat(40) + " abc the Back cat").unwrap();
    // Symmetric grids only: transformers 5.24 with compressed-tensors 0.20.1 cannot load an asymmetric
    // pack-quantized checkpoint as llm-compressor writes it (its loader lays the module out on the meta device
    // with an unpacked (out, in/G) zero point, then refuses the packed (⌈out·N/32⌉, in/G) one: "size mismatch").
    for rtn in [Rtn { bits: 4, group: 32, zero_point: false }, Rtn { bits: 8, group: 64, zero_point: false }] {
        let mut l = uniform(&d.path().join("m"));
        quantize_blocks(&mut l, rtn);
        let out = d.path().join(rtn.name());
        // f32: the scales exactly, so transformers' decompressed weights are whittle's dequantized ones.
        export(&l, &out, &CtOptions { dtype: candle_core::DType::F32 }).unwrap();
        let o = VerifyOptions {
            prompts: vec![" the cat".into(), "abc the".into()],
            n_tokens: 12,
            chunks: 2,
            ctx: 32,
            text_file: Some(text.clone()),
            python: Some(python.clone()),
            threads: Some(1),
            whittle_dequantized: true,
            ..Default::default()
        };
        let r = verify(&out, &l, &o).unwrap();
        assert!(r.runtime.starts_with("transformers"), "{}", r.runtime);
        assert_eq!(r.quantized_linears, Some(4 * 7), "compressed-tensors quantized every block Linear");
        let t = r.tokenizer.as_ref().unwrap();
        assert_eq!(t.identical, t.texts, "transformers' tokenizer from the export tokenizes as whittle: {t:?}");
        let dc = r.decoder.unwrap();
        for p in &dc.prompts {
            assert_eq!(p.export_ids, p.whittle_ids, "{}: prompt {:?}", rtn.name(), p.prompt);
        }
        assert_eq!(dc.top1_agree, Some(100.0), "{}", rtn.name());
        assert!(dc.kld_mean.unwrap() <= MAX_TRANSFORMERS_KLD, "{}: KLD {:?}", rtn.name(), dc.kld_mean);
    }
    // A Python without the packages is named as such.
    let l = uniform(&d.path().join("m"));
    let any = d.path().join(Rtn { bits: 4, group: 32, zero_point: false }.name());
    let o = VerifyOptions { python: Some("/bin/false".into()), chunks: 0, ..Default::default() };
    let e = verify(&any, &l, &o).unwrap_err().to_string();
    assert!(e.contains("transformers"), "{e}");
}
