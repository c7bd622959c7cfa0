//! GGUF export on tiny random LLaMAs: read back by whittle's own GGUF reader (logits equal to the source's),
//! weight-only grids copied code for code, the errors for what GGUF cannot hold, and — where the peers' venv
//! with llama-cpp-python exists (`scripts/test-deps.sh`) — run in llama.cpp by `verify`.

use std::path::Path;

use candle_core::Tensor;
use serde_json::json;
use whittle_core::rtn::Rtn;
use whittle_core::{Linear, LinearWeight};
use whittle_export::gguf::{export, Conversion, GgufOptions, GgufScheme};
use whittle_export::verify::{verify, VerifyOptions};
use whittle_formats::gguf::Gguf;
use whittle_kernels::ggml::ty;
use whittle_models::{load, testing, Loaded, Model};
use whittle_quant::gguf_out::Ftype;

/// Logits of the GGUF read back against the source's, both f32: the same weights, summed in the same order.
const MAX_F32_ROUNDTRIP_ABS_ERR: f32 = 1e-5;
/// The f16 rounding of a group scale moves a weight by at most 2⁻¹¹ of it (plus the min's rounding).
const MAX_F16_SCALE_REL_ERR: f64 = 1e-3;
/// llama.cpp against whittle on the tiny model in f32: the same arithmetic in another order.
const MAX_LLAMACPP_KLD: f64 = 1e-4;

/// A byte-level BPE tokenizer (llama.cpp's `gpt2` model) of exactly 50 tokens for the tiny LLaMA: an
/// end-of-text control token, `a`–`z`, `Ġ` (space), six merges (`Ġthe`, `Ġcat`), `A`–`O` and `Ċ` (newline,
/// which llama.cpp's BPE vocabularies must have).
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

/// `testing::tiny_llama` (two blocks of different widths: 4/2 heads, FFN 48/24) with the BPE tokenizer.
fn tiny(dir: &Path) -> Loaded {
    testing::tiny_llama(dir);
    std::fs::write(dir.join("tokenizer.json"), bpe_tokenizer().to_string()).unwrap();
    load(dir.to_str().unwrap(), &Default::default()).unwrap()
}

/// `testing::slow_llama` (4 uniform blocks, widths 256 / 512: every row a multiple of 32) with the BPE tokenizer.
fn uniform(dir: &Path) -> Loaded {
    testing::slow_llama(dir);
    std::fs::write(dir.join("tokenizer.json"), bpe_tokenizer().to_string()).unwrap();
    load(dir.to_str().unwrap(), &Default::default()).unwrap()
}

fn llama(l: &Loaded) -> &whittle_models::llama::Llama {
    let Model::Llama(m) = &l.model else { panic!("a decoder") };
    m
}

fn logits(l: &Loaded, ids: &[u32]) -> Vec<f32> {
    let m = llama(l);
    let t = Tensor::new(ids, m.embed_tokens.device()).unwrap().unsqueeze(0).unwrap();
    m.forward(&t, &mut Default::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn f32_scheme() -> GgufOptions {
    GgufOptions { scheme: Some(GgufScheme::F32) }
}

#[test]
fn per_layer_widths_round_trip_through_whittles_reader() {
    let d = tempfile::tempdir().unwrap();
    let l = tiny(&d.path().join("m"));
    let out = d.path().join("m.gguf");
    let r = export(&l, &out, &f32_scheme()).unwrap();
    assert_eq!(r.architecture, "deci");
    assert!(r.per_layer_widths);
    assert!(r.tensors.iter().all(|t| t.conversion == Conversion::Exact), "f32 → f32 is exact");
    let g = Gguf::open(&out).unwrap();
    let arr = |k: &str| -> Vec<u64> {
        g.get(k)
            .unwrap()
            .as_array()
            .unwrap_or_else(|| panic!("{k} is an array"))
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    assert_eq!(arr("deci.attention.head_count"), [4, 2]);
    assert_eq!(arr("deci.attention.head_count_kv"), [2, 1]);
    assert_eq!(arr("deci.feed_forward_length"), [48, 24]);
    assert_eq!(g.get("tokenizer.ggml.pre").unwrap().as_str(), Some("gpt-2"));
    assert_eq!(g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap().len(), 50);
    assert!(g.tensor("output.weight").is_none(), "tied head: no output.weight");
    // whittle's own GGUF reader undoes the Q/K permutation: the same model, the same logits.
    let back = load(out.to_str().unwrap(), &Default::default()).unwrap();
    let ids = [0u32, 5, 9, 27, 30, 33, 12, 1];
    let (a, b) = (logits(&l, &ids), logits(&back, &ids));
    let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(err <= MAX_F32_ROUNDTRIP_ABS_ERR, "max |Δlogit| {err}");
    // The tokenizer written from tokenizer.json is the tokenizer read back.
    let enc = |l: &Loaded| l.tokenizer.encode(" the cat sat", false).unwrap().get_ids().to_vec();
    assert_eq!(enc(&l), enc(&back));
}

#[test]
fn uniform_widths_are_llamas_scalars_and_schemes_follow_llama_quantize() {
    let d = tempfile::tempdir().unwrap();
    let l = uniform(&d.path().join("m"));
    let out = d.path().join("m.gguf");
    let r = export(&l, &out, &GgufOptions { scheme: Some(GgufScheme::Ftype(Ftype::Q4KM)) }).unwrap();
    assert_eq!(r.architecture, "llama");
    let g = Gguf::open(&out).unwrap();
    assert_eq!(g.get("llama.attention.head_count").unwrap().as_u64(), Some(4));
    assert_eq!(g.get("general.file_type").unwrap().as_u64(), Some(15));
    let ty_of = |n: &str| g.tensor(n).unwrap().type_name;
    assert_eq!(ty_of("blk.0.attn_q.weight"), "q4_k");
    assert_eq!(ty_of("blk.3.ffn_down.weight"), "q6_k", "llama-quantize's use_more_bits layer");
    assert_eq!(ty_of("blk.1.ffn_down.weight"), "q4_k");
    assert_eq!(ty_of("blk.0.attn_norm.weight"), "f32");
    assert_eq!(ty_of("token_embd.weight"), "q6_k", "tied table: the output's type");
    assert!(r
        .tensors
        .iter()
        .filter(|t| t.ggml_type == "q4_k")
        .all(|t| t.conversion == Conversion::Encoded && t.rel_err > 0.0));
}

/// Replaces every block Linear of `l` with its round-to-nearest `rtn` form, the scales (and mins) rounded to
/// f16 values when `f16_scales` (as a GGUF source's are).
fn quantize_blocks(l: &mut Loaded, rtn: Rtn, f16_scales: bool) {
    for (_, lin) in l.model.block_linears_mut() {
        let w: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut bw = rtn.quantize(&w, lin.out_features(), lin.in_features());
        if f16_scales {
            let r = |v: &mut f32| *v = half::f16::from_f32(*v).to_f32();
            bw.scale.iter_mut().for_each(r);
            if let Some(m) = bw.min.as_mut() {
                m.iter_mut().for_each(r);
            }
        }
        *lin = Linear::rtn(&bw, rtn, None).unwrap();
    }
}

#[test]
fn weight_only_grids_are_copied_code_for_code() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("m");
    for (bits, group, zero_point, want) in
        [(4, 32, false, ty::Q4_0), (4, 64, true, ty::Q4_1), (8, 32, false, ty::Q8_0), (5, 32, false, ty::Q5_0)]
    {
        let rtn = Rtn { bits, group, zero_point };
        for f16_scales in [true, false] {
            let mut l = uniform(&src);
            quantize_blocks(&mut l, rtn, f16_scales);
            let out = d.path().join(format!("{}-{f16_scales}.gguf", rtn.name()));
            // No scheme: every block Linear has an exact form, so none is needed.
            let r = export(&l, &out, &GgufOptions::default()).unwrap();
            let g = Gguf::open(&out).unwrap();
            for (name, lin) in l.model.block_linears() {
                let gname = whittle_models::names::hf_to_gguf(&format!("{name}.weight")).unwrap();
                let t = g.tensor(&gname).unwrap();
                assert_eq!(t.type_id, want, "{name}: {}", rtn.name());
                let row = r.tensors.iter().find(|t| t.name == gname).unwrap();
                // The codes llama.cpp reads are whittle's codes (Q/K rows in llama.cpp's order).
                let theirs =
                    whittle_kernels::ggml::unpack(t.type_id, g.raw(t), lin.out_features(), lin.in_features()).unwrap();
                let LinearWeight::Block(b) = &lin.weight else { panic!("quantized") };
                let ours = b.packed.unpack();
                let ours = match (name.ends_with("q_proj"), name.ends_with("k_proj")) {
                    (true, _) => ours.select_rows(&perm(ours.m, 4)),
                    (_, true) => ours.select_rows(&perm(ours.m, 2)),
                    _ => ours,
                };
                let code = |q: u8, off: i32| q as i32 + off;
                assert!(
                    theirs.q.iter().zip(&ours.q).all(|(a, b)| code(*a, theirs.off) == code(*b, ours.off)),
                    "{name}: codes differ"
                );
                if f16_scales {
                    assert_eq!(row.conversion, Conversion::Exact, "{name}");
                    assert_eq!(theirs.dequantize(), ours.dequantize(), "{name}: dequantized weights differ");
                } else {
                    assert!(matches!(row.conversion, Conversion::Exact | Conversion::Codes), "{name}");
                    assert!(row.rel_err <= MAX_F16_SCALE_REL_ERR, "{name}: {}", row.rel_err);
                }
            }
        }
    }
}

/// The row order of `permute_rows` (llama.cpp's interleaved RoPE), as indices.
fn perm(rows: usize, heads: usize) -> Vec<usize> {
    let idx = Tensor::arange(0f32, rows as f32, &candle_core::Device::Cpu).unwrap().reshape((rows, 1)).unwrap();
    let p = whittle_models::llama::permute_rows(&idx, heads).unwrap();
    p.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(|v| v as usize).collect()
}

#[test]
fn grids_without_a_ggml_type_need_a_scheme_and_report_the_error() {
    let d = tempfile::tempdir().unwrap();
    let mut l = uniform(&d.path().join("m"));
    quantize_blocks(&mut l, Rtn { bits: 8, group: 32, zero_point: true }, false);
    let out = d.path().join("m.gguf");
    let e = export(&l, &out, &GgufOptions::default()).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.") && e.contains("w8a16-g32-asym") && e.contains("option `scheme`"), "{e}");
    assert!(!out.exists(), "no half-written output");
    let r = export(&l, &out, &GgufOptions { scheme: Some(GgufScheme::Ftype(Ftype::Q8_0)) }).unwrap();
    let req: Vec<_> = r.tensors.iter().filter(|t| t.conversion == Conversion::Requantized).collect();
    assert_eq!(req.len(), 4 * 7);
    assert!(req.iter().all(|t| t.ggml_type == "q8_0" && t.rel_err > 0.0 && t.rel_err < 0.01));
    assert!(r.max_requantized_rel_err > 0.0);
}

#[test]
fn factorised_shared_and_unsupported_tokenizers_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.gguf");
    let mut l = uniform(&d.path().join("m"));
    {
        let mut ls = l.model.block_linears_mut();
        let (_, lin) = &mut ls[3]; // model.layers.0.self_attn.o_proj, (256, 256)
        let w = lin.dequantize().unwrap();
        **lin = Linear::low_rank(w.narrow(1, 0, 8).unwrap(), w.narrow(0, 0, 8).unwrap(), None).unwrap();
        // rank 8
    }
    let e = export(&l, &out, &GgufOptions::default()).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.self_attn.o_proj") && e.contains("low-rank"), "{e}");

    let mut l = uniform(&d.path().join("m"));
    l.model.share_block(2, 1);
    l.shared_blocks.insert(2, 1);
    let e = export(&l, &out, &GgufOptions::default()).unwrap_err().to_string();
    assert!(e.contains("share") && e.contains("2→1"), "{e}");

    testing::tiny_llama(&d.path().join("w")); // a WordLevel tokenizer
    let l = load(d.path().join("w").to_str().unwrap(), &Default::default()).unwrap();
    let e = export(&l, &out, &GgufOptions::default()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("WordLevel"), "{e}");
    assert!(!out.exists());
}

#[test]
fn llama_cpp_runs_the_export_as_whittle_runs_the_source() {
    let Some(python) = whittle_export::llamacpp::default_python() else {
        eprintln!("skipped: no ~/.cache/whittle-peers/bin/python with llama-cpp-python (scripts/test-deps.sh)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let l = tiny(&d.path().join("m"));
    let out = d.path().join("m.gguf");
    export(&l, &out, &f32_scheme()).unwrap();
    let text = d.path().join("t.txt");
    std::fs::write(&text, " the cat".repeat(40) + " abc the Back cat").unwrap();
    let o = VerifyOptions {
        prompts: vec![" the cat".into(), "abc the".into()],
        n_tokens: 12,
        chunks: 2,
        ctx: 32,
        text_file: Some(text),
        python: Some(python),
        threads: Some(1),
        ..Default::default()
    };
    let r = verify(&out, &l, &o).unwrap();
    assert!(r.runtime.starts_with("llama.cpp"), "{}", r.runtime);
    let t = r.tokenizer.as_ref().unwrap();
    assert_eq!(t.identical, t.texts, "llama.cpp's tokenizer from the GGUF metadata tokenizes as whittle: {t:?}");
    let dc = r.decoder.unwrap();
    for p in &dc.prompts {
        assert_eq!(p.export_ids, p.whittle_ids, "prompt {:?}", p.prompt);
    }
    assert_eq!(dc.top1_agree, Some(100.0));
    assert!(dc.kld_mean.unwrap() <= MAX_LLAMACPP_KLD, "KLD {:?}", dc.kld_mean);

    // A python without llama_cpp is named as such.
    let e =
        verify(&out, &l, &VerifyOptions { python: Some("/bin/false".into()), ..o.clone() }).unwrap_err().to_string();
    assert!(e.contains("llama.cpp"), "{e}");
}
