//! Tiny random models for fast tests (here and in other crates): a 2-block LLaMA with uneven blocks
//! and a 1-block BERT, written as HF directories with a word-level tokenizer.

use std::path::Path;

use candle_core::Tensor;
use serde_json::json;
use whittle_formats::hf::write_safetensors;

/// Deterministic pseudo-random values in [-0.5, 0.5).
pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    // A small LCG: no RNG state shared between tests.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &whittle_core::backend::cpu::device()).unwrap()
}

/// A word-level tokenizer over `[UNK]`, `w1` ... `w{n-1}`.
pub fn word_tokenizer(n: usize) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), json!(0));
    for i in 1..n {
        vocab.insert(format!("w{i}"), json!(i));
    }
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}})
}

/// A 2-block LLaMA with GQA where block 1 is narrower (fewer heads, smaller FFN), as after pruning.
pub fn tiny_llama(dir: &Path) -> Vec<(String, Tensor)> {
    let (v, c, hd) = (50, 32, 8);
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), rand(&[v, c], 1)),
        ("model.norm.weight".into(), (rand(&[c], 2) + 1.0).unwrap()),
    ];
    for (i, (h, kv, f)) in [(4, 2, 48), (2, 1, 24)].into_iter().enumerate() {
        let p = format!("model.layers.{i}.");
        let s = 10 * (i as u64 + 1);
        t.push((format!("{p}input_layernorm.weight"), (rand(&[c], s) + 1.0).unwrap()));
        t.push((format!("{p}post_attention_layernorm.weight"), (rand(&[c], s + 1) + 1.0).unwrap()));
        t.push((format!("{p}self_attn.q_proj.weight"), rand(&[h * hd, c], s + 2)));
        t.push((format!("{p}self_attn.k_proj.weight"), rand(&[kv * hd, c], s + 3)));
        t.push((format!("{p}self_attn.v_proj.weight"), rand(&[kv * hd, c], s + 4)));
        t.push((format!("{p}self_attn.o_proj.weight"), rand(&[c, h * hd], s + 5)));
        t.push((format!("{p}mlp.gate_proj.weight"), rand(&[f, c], s + 6)));
        t.push((format!("{p}mlp.up_proj.weight"), rand(&[f, c], s + 7)));
        t.push((format!("{p}mlp.down_proj.weight"), rand(&[c, f], s + 8)));
    }
    let cfg = json!({"model_type": "llama", "vocab_size": v, "hidden_size": c, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2});
    write_model(dir, &cfg, &t, &word_tokenizer(v));
    t
}

/// A LLaMA wide and long enough that generating thousands of tokens takes a while (seconds), for the
/// server's tests of timeouts, disconnects, the queue and shutdown: 4 blocks of width 256, context 4096, vocab 50.
pub fn slow_llama(dir: &Path) {
    let (v, c, hd, f, layers) = (50, 256, 64, 512, 4);
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), rand(&[v, c], 1)),
        ("model.norm.weight".into(), (rand(&[c], 2) + 1.0).unwrap()),
    ];
    for i in 0..layers {
        let p = format!("model.layers.{i}.");
        let s = 10 * (i as u64 + 1);
        t.push((format!("{p}input_layernorm.weight"), (rand(&[c], s) + 1.0).unwrap()));
        t.push((format!("{p}post_attention_layernorm.weight"), (rand(&[c], s + 1) + 1.0).unwrap()));
        t.push((format!("{p}self_attn.q_proj.weight"), rand(&[4 * hd, c], s + 2)));
        t.push((format!("{p}self_attn.k_proj.weight"), rand(&[2 * hd, c], s + 3)));
        t.push((format!("{p}self_attn.v_proj.weight"), rand(&[2 * hd, c], s + 4)));
        t.push((format!("{p}self_attn.o_proj.weight"), rand(&[c, 4 * hd], s + 5)));
        t.push((format!("{p}mlp.gate_proj.weight"), rand(&[f, c], s + 6)));
        t.push((format!("{p}mlp.up_proj.weight"), rand(&[f, c], s + 7)));
        t.push((format!("{p}mlp.down_proj.weight"), rand(&[c, f], s + 8)));
    }
    let cfg = json!({"model_type": "llama", "vocab_size": v, "hidden_size": c, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2});
    write_model(dir, &cfg, &t, &word_tokenizer(v));
}

/// A 1-block BERT (vocab 40, width 16, 2 heads); `w1`/`w2` act as [CLS]/[SEP].
pub fn tiny_bert(dir: &Path) {
    tiny_bert_sized(dir, 16, 24);
}

/// [`tiny_bert`] with hidden width `c` and FFN width `f` (e.g. multiples of 32 for grouped formats).
pub fn tiny_bert_sized(dir: &Path, c: usize, f: usize) {
    tiny_bert_layers(dir, c, f, 1);
}

/// [`tiny_bert_sized`] with `layers` blocks (different random weights each).
pub fn tiny_bert_layers(dir: &Path, c: usize, f: usize, layers: usize) {
    let v = 40;
    let mut t = vec![
        ("embeddings.word_embeddings.weight".to_string(), rand(&[v, c], 1)),
        ("embeddings.position_embeddings.weight".into(), rand(&[32, c], 2)),
        ("embeddings.token_type_embeddings.weight".into(), rand(&[2, c], 3)),
        ("embeddings.LayerNorm.weight".into(), (rand(&[c], 4) + 1.0).unwrap()),
        ("embeddings.LayerNorm.bias".into(), rand(&[c], 5)),
    ];
    for layer in 0..layers {
        let p = format!("encoder.layer.{layer}.");
        let s = 100 * layer as u64;
        for (j, (n, o, i)) in [
            ("attention.self.query", c, c),
            ("attention.self.key", c, c),
            ("attention.self.value", c, c),
            ("attention.output.dense", c, c),
            ("intermediate.dense", f, c),
            ("output.dense", c, f),
        ]
        .into_iter()
        .enumerate()
        {
            t.push((format!("{p}{n}.weight"), rand(&[o, i], s + 10 + j as u64)));
            t.push((format!("{p}{n}.bias"), rand(&[o], s + 20 + j as u64)));
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            t.push((format!("{p}{n}.weight"), (rand(&[c], s + 30) + 1.0).unwrap()));
            t.push((format!("{p}{n}.bias"), rand(&[c], s + 31)));
        }
    }
    let cfg = json!({"model_type": "bert", "vocab_size": v, "hidden_size": c, "num_hidden_layers": layers,
        "num_attention_heads": 2, "intermediate_size": f, "max_position_embeddings": 32});
    let mut tok = word_tokenizer(v);
    tok["post_processor"] = json!({"type": "BertProcessing", "sep": ["w2", 2], "cls": ["w1", 1]});
    write_model(dir, &cfg, &t, &tok);
}

/// Writes config.json, tokenizer.json and model.safetensors into `dir`.
pub fn write_model(dir: &Path, cfg: &serde_json::Value, t: &[(String, Tensor)], tok: &serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    write_safetensors(&dir.join("model.safetensors"), t, None).unwrap();
}
