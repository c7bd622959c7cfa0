//! Fast checks on tiny random models built inside the test: KV-cache decoding, per-layer widths,
//! padding, and every kind of bad input the loader must reject with a clear error.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use whittle_formats::hf::write_safetensors;
use whittle_models::bert::{AttnMask, BertBlock};
use whittle_models::llama::{KvCache, LlamaBlock};
use whittle_models::testing::{rand, tiny_bert, tiny_llama, word_tokenizer};
use whittle_models::{load, text, BlockLayout, Error, LoadOptions, Model};

const MAX_CACHE_ABS_ERR: f32 = 1e-4;
const MAX_PAD_ABS_ERR: f32 = 1e-5;
/// Packed (padding-free) against padded batches: the cosine of every sentence's two embeddings (issue 20).
const MIN_PACKED_COS: f64 = 0.999_999;

fn load_dir(dir: &Path) -> whittle_models::Result<whittle_models::Loaded> {
    load(dir.to_str().unwrap(), &LoadOptions::default())
}

#[test]
fn kv_cache_decoding_equals_full_forward_with_uneven_blocks() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let l = load_dir(d.path()).unwrap();
    let dims = l.model.block_dims();
    assert_eq!((dims[0].n_head, dims[0].n_kv_head, dims[0].ffn), (4, 2, 48));
    assert_eq!((dims[1].n_head, dims[1].n_kv_head, dims[1].ffn), (2, 1, 24));
    let Model::Llama(m) = &l.model else { panic!() };
    let ids: Vec<u32> = vec![1, 7, 3, 9, 22, 5, 11];
    let full = m
        .forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut KvCache::default())
        .unwrap(); // (1, T, V)
    let mut cache = KvCache::default();
    m.forward(&Tensor::new(&ids[..3], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap();
    for (p, &tok) in ids.iter().enumerate().skip(3) {
        let step = m.forward(&Tensor::new(&[tok], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap();
        let a: Vec<f32> = step.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = full.narrow(1, p, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < MAX_CACHE_ABS_ERR, "position {p}: {d:e}");
    }
    assert_eq!(cache.len(), ids.len());
    assert_eq!(l.model.linears().len(), 2 * 7 + 1);
}

#[test]
fn bert_padding_does_not_change_embeddings() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert(d.path());
    let l = load_dir(d.path()).unwrap();
    let both = text::embed_texts(&l, &["w5 w6", "w7 w8 w9 w10 w11 w12"], 32, 8).unwrap();
    let alone = text::embed_texts(&l, &["w5 w6"], 32, 8).unwrap();
    let diff = both[0].iter().zip(&alone[0]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < MAX_PAD_ABS_ERR, "{diff:e}");
    let norm: f32 = alone[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

/// Texts of 1 to 28 words (3 to 30 tokens with [CLS] and [SEP]) in a ragged order.
fn ragged_texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            (0..1 + (i * 7919 + 3) % 28)
                .map(|j| format!("w{}", 3 + (i * 13 + j * 5) % 37))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Packed batches give the padded batches' embeddings (fp32 and w8a8 dynamic Linears, the scalar and the
/// AVX-512 attention kernels), and sorting by length gives them too, in the texts' order.
#[test]
fn bert_packed_batches_equal_padded_ones() {
    use text::{EmbedOptions, Layout};
    use whittle_core::Linear;
    use whittle_kernels::int8::PackedI8;
    let texts = ragged_texts(37);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for (c, f, layers) in [(16, 24, 1), (64, 96, 2)] {
        for int8 in [false, true] {
            let d = tempfile::tempdir().unwrap();
            whittle_models::testing::tiny_bert_layers(d.path(), c, f, layers);
            let mut l = load_dir(d.path()).unwrap();
            if int8 {
                for (_, lin) in l.model.linears_mut() {
                    let w: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    let p = PackedI8::from_f32(&w, lin.out_features(), lin.in_features());
                    *lin = Linear::int8_dynamic(p, lin.bias.clone()).unwrap();
                }
            }
            let run = |layout, sort_by_length| {
                let o = EmbedOptions { max_len: 32, batch: 8, layout, sort_by_length };
                text::embed_texts_with(&l, &refs, &o).unwrap()
            };
            let padded = run(Layout::Padded, false);
            for (what, got) in [("packed", run(Layout::Packed, false)), ("packed, sorted", run(Layout::Packed, true))] {
                assert_eq!(got.len(), texts.len());
                for (i, (a, b)) in got.iter().zip(&padded).enumerate() {
                    let cs = cos(a, b);
                    assert!(cs >= MIN_PACKED_COS, "C={c} int8={int8} {what}: text {i} cos {cs}");
                }
            }
            assert_eq!(text::embed_texts(&l, &refs, 32, 8).unwrap(), run(Layout::Packed, false), "the default packs");
        }
    }
}

/// The packed forward's hidden states are the padded forward's real rows; bad offsets are errors.
#[test]
fn bert_forward_packed_matches_padded_rows_and_rejects_bad_offsets() {
    let d = tempfile::tempdir().unwrap();
    whittle_models::testing::tiny_bert_layers(d.path(), 64, 96, 2);
    let l = load_dir(d.path()).unwrap();
    let Model::Bert(m) = &l.model else { panic!() };
    let dev = Device::Cpu;
    let rows: [&[u32]; 3] = [&[1, 5, 9, 2], &[1, 7, 2], &[1, 3, 4, 5, 6, 8, 2]];
    let b = text::batch_from_ids(&rows).unwrap();
    let padded: Vec<Vec<Vec<f32>>> = m.forward(&b.ids, &b.type_ids, &b.mask).unwrap().to_vec3().unwrap();
    let flat: Vec<u32> = rows.concat();
    let ids = Tensor::new(flat.as_slice(), &dev).unwrap();
    let types = ids.zeros_like().unwrap();
    let cu = [0, 4, 7, 14];
    let packed: Vec<Vec<f32>> = m.forward_packed(&ids, &types, &cu).unwrap().to_vec2().unwrap();
    for (s, w) in cu.windows(2).enumerate() {
        for i in 0..w[1] - w[0] {
            let diff = packed[w[0] + i].iter().zip(&padded[s][i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < MAX_PAD_ABS_ERR, "sequence {s} token {i}: {diff:e}");
        }
    }
    for bad in [&[0, 4, 3, 14][..], &[0, 4, 7, 13], &[1, 14], &[]] {
        let e = m.forward_packed(&ids, &types, bad).unwrap_err().to_string();
        assert!(e.contains("offsets"), "{bad:?}: {e}");
    }
    let long: Vec<u32> = vec![3; 33];
    let e = m.forward_packed(
        &Tensor::new(long.as_slice(), &dev).unwrap(),
        &Tensor::zeros(33, DType::U32, &dev).unwrap(),
        &[0, 33],
    );
    assert!(e.unwrap_err().to_string().contains("max_position_embeddings"));
    // No sequences, and empty ones, embed to zero vectors as in the padded path.
    let e = text::embed_ids(&l, &[&[], &[1, 5, 2]]).unwrap();
    assert!(e[0].iter().all(|&x| x == 0.0) && (e[1].iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
}

#[test]
fn unsupported_model_type_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    std::fs::write(d.path().join("config.json"), json!({"model_type": "gpt_neox"}).to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap();
    assert!(matches!(e, Error::UnsupportedModelType { .. }), "{e}");
    assert!(e.to_string().contains("gpt_neox") && e.to_string().contains("config.json"), "{e}");
}

#[test]
fn wrong_tensor_shape_names_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let mut t = tiny_llama(d.path());
    let i = t.iter().position(|(n, _)| n == "model.layers.1.mlp.up_proj.weight").unwrap();
    t[i].1 = rand(&[23, 32], 5);
    write_safetensors(&d.path().join("model.safetensors"), &t, None).unwrap();
    let e = load_dir(d.path()).err().unwrap();
    assert!(matches!(e, Error::Shape { ref tensor, .. } if tensor == "model.layers.1.mlp.up_proj.weight"), "{e}");
}

#[test]
fn missing_tensor_names_it() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny_llama(d.path());
    let t: Vec<_> = t.into_iter().filter(|(n, _)| n != "model.layers.0.self_attn.v_proj.weight").collect();
    write_safetensors(&d.path().join("model.safetensors"), &t, None).unwrap();
    let e = load_dir(d.path()).err().unwrap();
    assert!(e.to_string().contains("model.layers.0.self_attn.v_proj.weight"), "{e}");
}

#[test]
fn tokenizer_larger_than_vocab_is_refused() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    std::fs::write(d.path().join("tokenizer.json"), word_tokenizer(80).to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap();
    assert!(matches!(e, Error::VocabMismatch { max_id: 79, model: 50, .. }), "{e}");
}

/// Issue 22 ("Limits"): a tokenizer with few tokens but an id past the embedding table was accepted, and
/// the first such token failed deep inside candle without naming the tokenizer.
#[test]
fn tokenizer_ids_beyond_vocab_are_refused() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let mut tok = word_tokenizer(3);
    tok["model"]["vocab"]["w2"] = json!(4000);
    std::fs::write(d.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json: tokenizer has token ids up to 4000") && e.contains("50 rows"), "{e}");
}

/// Issue 22 ("Limits"): a BERT tokenizer given to a LLaMA model was accepted.
#[test]
fn bert_tokenizer_for_a_decoder_is_refused() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..10).map(|i| (format!("t{i}"), json!(i))).chain([("[UNK]".to_string(), json!(10))]).collect();
    let tok = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordPiece", "vocab": vocab, "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100}});
    std::fs::write(d.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json: tokenizer does not belong to this model: a WordPiece"), "{e}");
}

/// Issue 22 ("Limits"): `num_hidden_layers: 0` loaded and ran, ignoring the file's blocks.
#[test]
fn num_hidden_layers_zero_is_refused() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["num_hidden_layers"] = json!(0);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("config field `num_hidden_layers`: must be at least 1"), "{e}");
    // Fewer layers than the file holds: the rest would be ignored silently.
    cfg["num_hidden_layers"] = json!(1);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("`num_hidden_layers`: 1, but the weights hold 2 blocks"), "{e}");
}

/// Found by scripts/fuzz.sh (config target): `num_hidden_layers` of u64::MAX panicked with "capacity
/// overflow" before any tensor was read.
#[test]
fn fuzz_num_hidden_layers_huge_is_an_error_not_an_allocation() {
    let d = tempfile::tempdir().unwrap();
    whittle_models::testing::tiny_bert(d.path());
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["num_hidden_layers"] = json!(u64::MAX);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("`num_hidden_layers`: 18446744073709551615, but the weights hold only 1 blocks"), "{e}");
}

/// Found by scripts/fuzz.sh (manifest target): a BERT `hidden_size` of 0 divided every head count and
/// panicked on a division by zero while loading.
#[test]
fn fuzz_bert_hidden_size_zero_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    whittle_models::testing::tiny_bert(d.path());
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["hidden_size"] = json!(0);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("config field `hidden_size`: must be at least 1"), "{e}");
}

/// Issue 22 ("Messages"): a config value of the wrong type named the field as `(file)`.
#[test]
fn config_type_error_names_the_field() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["hidden_size"] = json!("32");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("config field `hidden_size`: invalid type") && e.contains("(found \"32\")"), "{e}");
    cfg["hidden_size"] = json!(32);
    cfg["rope_theta"] = json!("big");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap().to_string();
    assert!(e.contains("config field `rope_theta`"), "{e}");
}

#[test]
fn bad_config_values_are_errors() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let cfg = json!({"model_type": "llama", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3});
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap();
    assert!(e.to_string().contains("num_key_value_heads"), "{e}");
    std::fs::write(d.path().join("config.json"), json!({"model_type": "llama"}).to_string()).unwrap();
    let e = load_dir(d.path()).err().unwrap();
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn not_found_and_hub_id_errors() {
    let e = load("/nonexistent/model.gguf", &LoadOptions::default()).err().unwrap();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let e = load("nobody-org/no-such-model", &LoadOptions::default()).err().unwrap();
    assert!(
        e.to_string().contains("models--nobody-org--no-such-model") && e.to_string().contains("never downloads"),
        "{e}"
    );
}

#[test]
fn f16_convert_roundtrip_keeps_shapes() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let l = load_dir(d.path()).unwrap();
    let out = d.path().join("half");
    whittle_models::save::save_hf_dir(&l, &out, DType::F16).unwrap();
    let back = load_dir(&out).unwrap();
    assert_eq!(back.model.block_dims(), l.model.block_dims());
    assert!(back.source.tensors.iter().all(|t| t.dtype == "f16"));
    // Writing over the input is refused.
    assert!(whittle_models::save::save_hf_dir(&back, &out, DType::F16).is_err());
}

#[test]
fn sharded_safetensors_with_index_load_like_one_file() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny_llama(d.path());
    let one = load_dir(d.path()).unwrap();
    // Split the same tensors over two shards with an index.
    let s = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(d.path().join(f), s.path().join(f)).unwrap();
    }
    let (a, b) = t.split_at(t.len() / 2);
    write_safetensors(&s.path().join("model-00001-of-00002.safetensors"), a, None).unwrap();
    write_safetensors(&s.path().join("model-00002-of-00002.safetensors"), b, None).unwrap();
    let mut map = serde_json::Map::new();
    for (n, _) in a {
        map.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
    }
    for (n, _) in b {
        map.insert(n.clone(), json!("model-00002-of-00002.safetensors"));
    }
    std::fs::write(s.path().join("model.safetensors.index.json"), json!({"weight_map": map}).to_string()).unwrap();
    let two = load_dir(s.path()).unwrap();
    let (Model::Llama(x), Model::Llama(y)) = (&one.model, &two.model) else { panic!() };
    let ids = Tensor::new(&[1u32, 4, 8], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let a: Vec<f32> = x.forward(&ids, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = y.forward(&ids, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
    // An index naming a shard outside the directory is refused.
    std::fs::write(
        s.path().join("model.safetensors.index.json"),
        json!({"weight_map": {"x": "../evil.safetensors"}}).to_string(),
    )
    .unwrap();
    assert!(load_dir(s.path()).is_err());
}

#[test]
fn qwen2_is_a_config_difference() {
    let d = tempfile::tempdir().unwrap();
    let mut t = tiny_llama(d.path());
    // Qwen2: biases on q/k/v.
    for i in 0..2 {
        for (p, n) in [("q_proj", [32, 16][i]), ("k_proj", [16, 8][i]), ("v_proj", [16, 8][i])] {
            t.push((format!("model.layers.{i}.self_attn.{p}.bias"), rand(&[n], 70 + i as u64)));
        }
    }
    write_safetensors(&d.path().join("model.safetensors"), &t, None).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = json!("qwen2");
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let l = load_dir(d.path()).unwrap();
    assert_eq!(l.model.family(), "qwen2");
    assert!(l.model.linears().iter().filter(|(n, _)| n.ends_with("q_proj")).all(|(_, lin)| lin.bias.is_some()));
    // Without the biases a qwen2 config is refused, naming the tensor.
    let t: Vec<_> = t.into_iter().filter(|(n, _)| !n.ends_with(".bias")).collect();
    write_safetensors(&d.path().join("model.safetensors"), &t, None).unwrap();
    let e = load_dir(d.path()).err().unwrap();
    assert!(e.to_string().contains("q_proj.bias"), "{e}");
}

#[test]
fn bert_general_masks_take_the_additive_path_and_hide_keys() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert(d.path());
    let l = load_dir(d.path()).unwrap();
    let Model::Bert(m) = &l.model else { panic!() };
    let dev = Device::Cpu;
    let mask = Tensor::new(&[[1u32, 1, 0, 1]], &dev).unwrap(); // not right-padded: the general path
    let types = Tensor::zeros((1, 4), candle_core::DType::U32, &dev).unwrap();
    let run = |hidden_token: u32| -> Vec<Vec<f32>> {
        let ids = Tensor::new(&[[1u32, 5, hidden_token, 2]], &dev).unwrap();
        m.forward(&ids, &types, &mask).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
    };
    let (a, b) = (run(7), run(30));
    for i in [0, 1, 3] {
        let diff = a[i].iter().zip(&b[i]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-6, "position {i} sees the masked key: {diff}");
    }
}

#[test]
fn block_stage_tables_follow_linears_mut_and_the_stages() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let mut l = load_dir(d.path()).unwrap();
    assert!(l.model.block_linears().iter().all(|(n, _)| Model::is_block_linear(n) && !Model::is_head_linear(n)));
    assert_eq!(l.model.block_linears().len() + 1, l.model.linears().len());
    assert_eq!(l.model.block_prefix(1), "model.layers.1.");
    let Model::Llama(m) = &mut l.model else { panic!() };
    let (cos, sin, mask) = m.block_inputs(3).unwrap();
    let hd = m.config.head_dim;
    let mut x = m.embed(&Tensor::new(&[[1u32, 7, 3]], &Device::Cpu).unwrap()).unwrap();
    for b in m.blocks.iter_mut() {
        let names: Vec<&str> = b.linears_mut().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, LlamaBlock::STAGES.concat());
        // Each stage's output is the input of the Linears the table gives it.
        let mut input = b.stage(0, &mut x, None, &cos, &sin, mask.as_ref(), hd).unwrap();
        for (s, names) in LlamaBlock::STAGES.iter().enumerate() {
            let width = input.as_ref().unwrap().dim(2).unwrap();
            for (_, lin) in b.linears().iter().filter(|(n, _)| names.contains(n)) {
                assert_eq!(lin.in_features(), width, "stage {s}");
            }
            input = b.stage(s + 1, &mut x, input.as_ref(), &cos, &sin, mask.as_ref(), hd).unwrap();
        }
        assert!(input.is_none());
    }

    let d = tempfile::tempdir().unwrap();
    tiny_bert(d.path());
    let mut l = load_dir(d.path()).unwrap();
    assert_eq!(l.model.block_prefix(0), "encoder.layer.0.");
    assert!(l.model.linears().iter().all(|(n, _)| Model::is_block_linear(n) != Model::is_head_linear(n)));
    let Model::Bert(m) = &mut l.model else { panic!() };
    let hd = m.config.head_dim;
    let ids = Tensor::new(&[[1u32, 7, 3]], &Device::Cpu).unwrap();
    let mut x = m.embed(&ids, &ids.zeros_like().unwrap()).unwrap();
    let mask = AttnMask::Lengths(&[3]);
    for b in m.blocks.iter_mut() {
        let names: Vec<&str> = b.linears_mut().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, BertBlock::STAGES.concat());
        let mut input = b.stage(0, &mut x, None, &mask, hd).unwrap();
        for (s, names) in BertBlock::STAGES.iter().enumerate() {
            let width = input.as_ref().unwrap().dim(2).unwrap();
            for (_, lin) in b.linears().iter().filter(|(n, _)| names.contains(n)) {
                assert_eq!(lin.in_features(), width, "stage {s}");
            }
            input = b.stage(s + 1, &mut x, input.as_ref(), &mask, hd).unwrap();
        }
        assert!(input.is_none());
    }
}
