//! Golden tests on the real models against references from `scripts/make_reference.py`
//! (sentence-transformers / transformers). Fixtures: `tests/fixtures/`.

mod common;

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use common::*;
use whittle_formats::{gguf::Gguf, TensorSource};
use whittle_models::generate::{generate, Sampling};
use whittle_models::llama::KvCache;
use whittle_models::{load, names, stats, text, LoadOptions, Loaded, Model};

/// Sentence embeddings vs sentence-transformers, per component.
const MAX_EMBED_ABS_ERR: f32 = 1e-4;
/// Last-position logits vs transformers, relative to the largest |logit|.
const MAX_LOGIT_REL_ERR: f64 = 1e-3;

fn minilm_model() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| load(minilm().to_str().unwrap(), &LoadOptions::default()).unwrap())
}

fn smollm2_model() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    // Transformers runs the GGUF dequantized; so does this reference comparison.
    M.get_or_init(|| {
        load(smollm2().to_str().unwrap(), &LoadOptions { dequantize: true, ..Default::default() }).unwrap()
    })
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let fx = fixture("minilm.json");
    let l = minilm_model();
    let sents: Vec<&str> = fx["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let max_len = fx["max_seq_length"].as_u64().unwrap() as usize;
    assert_eq!(l.max_seq_length, Some(max_len));
    let got = text::embed_texts(l, &sents, max_len, 32).unwrap();
    let mut worst = 0f32;
    for (i, row) in fx["embeddings"].as_array().unwrap().iter().enumerate() {
        for (j, want) in row.as_array().unwrap().iter().enumerate() {
            worst = worst.max((got[i][j] - want.as_f64().unwrap() as f32).abs());
        }
    }
    assert!(worst <= MAX_EMBED_ABS_ERR, "max |Δ| = {worst:e}");
    // Batch composition must not change a sentence's embedding (padding is masked out).
    let alone = text::embed_texts(l, &sents[2..3], max_len, 1).unwrap();
    let d: f32 = alone[0].iter().zip(&got[2]).map(|(a, b)| (a - b).abs()).fold(0., f32::max);
    assert!(d <= MAX_EMBED_ABS_ERR, "padding changed the embedding by {d:e}");
}

/// Packed batches against padded ones on real sentences: the cosine of each sentence's two embeddings.
const MIN_PACKED_COS: f64 = 0.999_999;

/// Issue 20: the padding-free path gives the padded path's embeddings, on the first 320 STS-B test sentences
/// in the bench's batches of 32 (and sorted by length).
#[test]
fn minilm_packed_batches_equal_padded_on_sts_b() {
    use text::{EmbedOptions, Layout};
    let l = minilm_model();
    let tsv = std::fs::read_to_string(repo_root().join("data/stsbenchmark/sts-test.tsv")).unwrap();
    let sents: Vec<&str> =
        tsv.lines().skip(1).flat_map(|r| r.split('\t').skip(5).take(2).collect::<Vec<_>>()).take(320).collect();
    assert_eq!(sents.len(), 320);
    let run = |layout, sort_by_length| {
        text::embed_texts_with(l, &sents, &EmbedOptions { max_len: 128, batch: 32, layout, sort_by_length }).unwrap()
    };
    let padded = run(Layout::Padded, false);
    for (what, got) in [("packed", run(Layout::Packed, false)), ("packed, sorted", run(Layout::Packed, true))] {
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>();
        assert_eq!(got.len(), padded.len(), "{what}: one embedding per sentence");
        for (i, (a, b)) in got.iter().zip(&padded).enumerate() {
            let cos = dot(a, b) / (dot(a, a) * dot(b, b)).sqrt();
            // Written so that NaN fails too.
            assert!(cos >= MIN_PACKED_COS, "{what}: sentence {i}: cos {cos}");
        }
    }
}

#[test]
fn minilm_tokenizer_matches_hf() {
    let fx = fixture("minilm.json");
    let l = minilm_model();
    let max_len = fx["max_seq_length"].as_u64().unwrap() as usize;
    let tok = text::truncating(&l.tokenizer, max_len).unwrap();
    for (s, ids) in fx["sentences"].as_array().unwrap().iter().zip(fx["token_ids"].as_array().unwrap()) {
        let e = tok.encode(s.as_str().unwrap(), true).unwrap();
        assert_eq!(e.get_ids(), ids_of(ids).as_slice(), "{s}");
    }
}

#[test]
fn minilm_parameter_counts_match_transformers() {
    let l = minilm_model();
    let (p, _) = stats::param_counts(&l.model);
    assert_eq!(p.total, 22_713_216);
    assert_eq!(p.total as u64, fixture("minilm.json")["num_parameters"].as_u64().unwrap());
    assert_eq!(p.head, 147_840);
    let mut no_pooler = l.model.clone();
    if let Model::Bert(b) = &mut no_pooler {
        b.pooler = None;
    }
    assert_eq!(stats::param_counts(&no_pooler).0.total, 22_565_376);
    // The file's `embeddings.position_ids` buffer (if any) is not a parameter.
    let linears = l.model.linears();
    assert_eq!(linears.len(), 6 * 6 + 1);
    assert_eq!(linears[0].0, "encoder.layer.0.attention.self.query");
}

#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let fx = fixture("smollm2.json");
    let l = smollm2_model();
    for case in fx["tokenizer"].as_array().unwrap().iter().chain(fx["prompts"].as_array().unwrap()) {
        let t = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        assert_eq!(text::encode_prompt(l, t, false).unwrap(), want, "{t:?}");
        assert_eq!(
            text::decode(l, &want).unwrap().replace("<|im_start|>", "").replace("<|im_end|>", ""),
            t.replace("<|im_start|>", "").replace("<|im_end|>", "")
        );
    }
}

#[test]
fn smollm2_logits_match_transformers() {
    let fx = fixture("smollm2.json");
    let Model::Llama(m) = &smollm2_model().model else { panic!() };
    for p in fx["prompts"].as_array().unwrap() {
        let ids = ids_of(&p["ids"]);
        let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits: Vec<f32> =
            m.forward_last(&x, &mut KvCache::default()).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        let scale = p["max_abs_logit"].as_f64().unwrap();
        let mut worst = 0f64;
        for (i, want) in ids_of(&p["top20_ids"]).iter().zip(p["top20_logits"].as_array().unwrap()) {
            worst = worst.max((logits[*i as usize] as f64 - want.as_f64().unwrap()).abs());
        }
        let maxl = logits.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let lse = maxl + logits.iter().map(|&v| (v as f64 - maxl).exp()).sum::<f64>().ln();
        worst = worst.max((lse - p["logsumexp"].as_f64().unwrap()).abs());
        assert!(
            worst <= MAX_LOGIT_REL_ERR * scale,
            "{:?}: max |Δ| {worst:e} > {:e}",
            p["text"],
            MAX_LOGIT_REL_ERR * scale
        );
        // The same logits come out of prefill + one-token steps through the KV cache.
        let mut cache = KvCache::default();
        let n = ids.len();
        let pre = Tensor::new(&ids[..n - 1], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        m.forward_last(&pre, &mut cache).unwrap();
        let last = Tensor::new(&ids[n - 1..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let inc: Vec<f32> = m.forward_last(&last, &mut cache).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        let d = inc.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!((d as f64) <= MAX_LOGIT_REL_ERR * scale, "KV cache path differs by {d:e}");
    }
}

#[test]
fn smollm2_greedy_matches_transformers() {
    let fx = fixture("smollm2.json");
    let l = smollm2_model();
    let Model::Llama(m) = &l.model else { panic!() };
    for p in fx["prompts"].as_array().unwrap() {
        let want = ids_of(&p["greedy32"]);
        let got = generate(m, &ids_of(&p["ids"]), 32, &l.eos_token_ids, &Sampling::default(), |_| {}).unwrap();
        assert_eq!(got, want, "{:?}", p["text"]);
    }
}

#[test]
fn smollm2_parameter_count_matches_transformers() {
    let l = smollm2_model();
    let (p, rows) = stats::param_counts(&l.model);
    assert_eq!(p.total as u64, fixture("smollm2.json")["num_parameters"].as_u64().unwrap());
    assert_eq!(p.head, 0, "SmolLM2 ties its embeddings");
    assert_eq!(rows.len(), 30);
    assert_eq!((rows[0].dims.n_head, rows[0].dims.n_kv_head, rows[0].dims.ffn), (9, 3, 1536));
}

#[test]
fn gguf_name_table_is_a_bijection_on_smollm2() {
    let g = Gguf::open(smollm2()).unwrap();
    let mut seen = std::collections::HashSet::new();
    for info in g.infos() {
        let hf = names::gguf_to_hf(&info.name).unwrap_or_else(|| panic!("no HF name for {}", info.name));
        assert_eq!(names::hf_to_gguf(&hf).as_deref(), Some(info.name.as_str()));
        assert!(seen.insert(hf.clone()), "{hf} mapped twice");
    }
    assert_eq!(seen.len(), g.infos().len());
}

#[test]
fn convert_gguf_to_hf_reloads_with_identical_logits() {
    let l = smollm2_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    whittle_models::save::save_hf_dir(l, &out, candle_core::DType::F32).unwrap();
    let back = load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(stats::param_counts(&back.model).0, stats::param_counts(&l.model).0);
    let (Model::Llama(a), Model::Llama(b)) = (&l.model, &back.model) else { panic!() };
    let ids = text::encode_prompt(l, "The capital of France is", false).unwrap();
    assert_eq!(text::encode_prompt(&back, "The capital of France is", false).unwrap(), ids);
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let la: Vec<f32> = a.forward_last(&x, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let lb: Vec<f32> = b.forward_last(&x, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(la, lb, "an f32 HF copy must reproduce the logits bit for bit");
}
