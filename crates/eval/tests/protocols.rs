//! Each protocol on tiny models built here, with expected values known by construction or computed by an
//! independent reference path; then one real-model check per task against `scripts/make_reference.py`.

#[path = "../../models/tests/common/mod.rs"]
mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use whittle_eval::{bench, classify, cloze, data, ppl, sts, Error};
use whittle_formats::hf::write_safetensors;
use whittle_models::llama::KvCache;
use whittle_models::testing::{tiny_bert, tiny_llama};
use whittle_models::{load, LoadOptions, Loaded, Model};

const MAX_PPL_REL_ERR: f64 = 1e-9;
const MAX_REAL_PPL_REL_ERR: f64 = 1e-3;
const MAX_STS_ABS_ERR: f64 = 0.05;

/// Transformers dequantizes GGUF weights: so does whittle for the golden comparisons.
fn open(dir: &Path) -> Loaded {
    load(dir.to_str().unwrap(), &LoadOptions { dequantize: true, ..Default::default() }).unwrap()
}

/// The block-format runtime (int8 activations per block, as llama.cpp) against the dequantized model.
const MAX_BLOCK_PPL_REL_ERR: f64 = 0.01;

fn words(n: usize, vocab: usize) -> String {
    (0..n).map(|i| format!("w{}", 3 + (i * 7) % (vocab - 3))).collect::<Vec<_>>().join(" ")
}

fn quiet() -> impl FnMut(usize, usize) {
    |_, _| {}
}

#[test]
fn ppl_of_a_uniform_model_is_the_vocab_size() {
    let d = tempfile::tempdir().unwrap();
    let mut t = tiny_llama(d.path());
    // Zero embeddings (tied head): every logit is 0, so every token has probability 1/50.
    t[0].1 = Tensor::zeros((50, 32), DType::F32, &Device::Cpu).unwrap();
    write_safetensors(&d.path().join("model.safetensors"), &t, None).unwrap();
    let l = open(d.path());
    let o = ppl::PplOptions { ctx: 8, chunks: Some(3) };
    let m = ppl::perplexity(&l, &words(40, 50), &o, Some(&l), &mut quiet()).unwrap();
    assert!((m.ppl.unwrap() - 50.0).abs() < 50.0 * MAX_PPL_REL_ERR, "{m:?}");
    assert_eq!(m.tokens, Some(3 * 4), "second half of each 8-token chunk");
    assert_eq!(m.ppl_stderr, Some(0.0));
    assert_eq!(m.kld_mean, Some(0.0));
}

#[test]
fn ppl_matches_a_full_forward_reference_and_self_kl_is_zero() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let l = open(d.path());
    let text = words(40, 50);
    let o = ppl::PplOptions { ctx: 10, chunks: None };
    let m = ppl::perplexity(&l, &text, &o, Some(&l), &mut quiet()).unwrap();
    assert_eq!(m.chunks, Some(4));
    assert_eq!(m.kld_mean, Some(0.0));
    assert_eq!(m.top1_agree, Some(100.0));
    assert_eq!(m.ppl_ratio, Some(1.0));
    // Reference: logits of every position from `forward`, log-softmax in f64, second half of each chunk.
    let Model::Llama(dec) = &l.model else { panic!() };
    let ids = whittle_models::text::encode_prompt(&l, &text, false).unwrap();
    let (mut nll, mut n) = (0f64, 0usize);
    for c in 0..4 {
        let mut chunk = ids[c * 10..(c + 1) * 10].to_vec();
        chunk[0] = 1;
        let x = Tensor::new(chunk.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits: Vec<Vec<f32>> =
            dec.forward(&x, &mut KvCache::default()).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        for i in 4..9 {
            let row: Vec<f64> = logits[i].iter().map(|&v| v as f64).collect();
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            nll += lse - row[chunk[i + 1] as usize];
            n += 1;
        }
    }
    let want = (nll / n as f64).exp();
    assert_eq!(m.tokens, Some(n));
    assert!((m.ppl.unwrap() - want).abs() < 1e-5 * want, "{} vs {want}", m.ppl.unwrap());
}

#[test]
fn ppl_bad_input() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let l = open(d.path());
    let text = words(40, 50);
    let e = ppl::perplexity(&l, &text, &ppl::PplOptions { ctx: 128, chunks: None }, None, &mut quiet()).unwrap_err();
    assert!(e.to_string().contains("larger than the model's context"), "{e}");
    let e = ppl::perplexity(&l, &text, &ppl::PplOptions { ctx: 8, chunks: Some(0) }, None, &mut quiet()).unwrap_err();
    assert!(e.to_string().contains("option `chunks`"), "{e}");
    let e = ppl::perplexity(&l, "w3 w4", &ppl::PplOptions { ctx: 8, chunks: None }, None, &mut quiet()).unwrap_err();
    assert!(e.to_string().contains("fewer than option `ctx`"), "{e}");
    let b = tempfile::tempdir().unwrap();
    tiny_bert(b.path());
    let enc = open(b.path());
    assert!(matches!(
        ppl::perplexity(&enc, &text, &ppl::PplOptions::default(), None, &mut quiet()),
        Err(Error::Usage(_))
    ));
    let pairs = vec![("w3".to_string(), "w4".to_string(), 1.0)];
    assert!(matches!(sts::sts(&l, &pairs, 16, None, &mut quiet()), Err(Error::Usage(_))));
}

#[test]
fn sts_is_100_when_gold_follows_the_model() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert(d.path());
    let l = open(d.path());
    let raw: Vec<(String, String)> =
        (0..12).map(|i| (words(3 + i % 4, 40), format!("w{} w{}", 5 + i, 9 + (i * 3) % 20))).collect();
    let pairs: Vec<data::StsPair> = raw
        .iter()
        .map(|(a, b)| {
            let e = whittle_models::text::embed_texts(&l, &[a, b], 16, 2).unwrap();
            let cos: f32 = e[0].iter().zip(&e[1]).map(|(x, y)| x * y).sum();
            (a.clone(), b.clone(), cos as f64)
        })
        .collect();
    let m = sts::sts(&l, &pairs, 16, Some(&l), &mut quiet()).unwrap();
    assert!((m.sts_spearman.unwrap() - 100.0).abs() < 1e-9, "{m:?}");
    assert!((m.cos_min.unwrap() - 1.0).abs() < 1e-6);
    // Reversed gold scores: -100.
    let rev: Vec<data::StsPair> = pairs.iter().map(|(a, b, s)| (a.clone(), b.clone(), -s)).collect();
    assert!((sts::sts(&l, &rev, 16, None, &mut quiet()).unwrap().sts_spearman.unwrap() + 100.0).abs() < 1e-9);
}

#[test]
fn classify_is_deterministic_and_bounded() {
    let d = tempfile::tempdir().unwrap();
    tiny_bert(d.path());
    let l = open(d.path());
    let rows: Vec<(String, u8)> =
        (0..30).map(|i| (words(2 + i % 5, 40) + &format!(" w{}", 3 + i % 2 * 17), (i % 2) as u8)).collect();
    let a = classify::classify(&l, &rows, 20, 16, &mut quiet()).unwrap();
    let b = classify::classify(&l, &rows, 20, 16, &mut quiet()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.items, Some(10));
    let acc = a.sst2_acc.unwrap();
    assert!((0.0..=100.0).contains(&acc) && (acc * 10.0 / 100.0).fract().abs() < 1e-9, "{acc}");
    assert!(classify::classify(&l, &rows[..5], 20, 16, &mut quiet()).is_err());
}

#[test]
fn cloze_scores_the_models_own_continuations_as_correct() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let l = open(d.path());
    let Model::Llama(dec) = &l.model else { panic!() };
    let mut lines = Vec::new();
    for i in 0..4 {
        let ctx = words(4 + i, 50);
        let ids = whittle_models::text::encode_prompt(&l, &ctx, false).unwrap();
        let next = whittle_models::generate::generate(dec, &ids, 1, &[], &Default::default(), |_| {}).unwrap();
        let word = l.tokenizer.id_to_token(next[0]).unwrap();
        lines.push(format!("{ctx} {word}"));
    }
    lines.push(format!("{} w0nonexistent", words(5, 50)));
    let m = cloze::cloze(&l, &lines, None, &mut quiet()).unwrap();
    assert_eq!(m.cloze_acc, Some(80.0), "4 of 5 lines are the model's own greedy words");
    assert_eq!(cloze::cloze(&l, &lines, Some(2), &mut quiet()).unwrap().items, Some(2));
}

#[test]
fn bench_reports_every_field() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let l = open(d.path());
    let o = bench::BenchOptions { pp: 16, tg: 8, reps: 2, ..Default::default() };
    let m = bench::bench(&l, &[], &o, &mut quiet()).unwrap();
    assert!(m.pp_tok_s.unwrap() > 0.0 && m.tg_tok_s.unwrap() > 0.0);
    assert_eq!(m.bpw, Some(32.0));
    assert!(m.model_bytes.unwrap() > 0 && m.peak_rss_mb.unwrap() > 0.0 && m.threads.unwrap() >= 1);
    assert!(
        bench::bench(&l, &[], &bench::BenchOptions { pp: 100, ..o.clone() }, &mut quiet()).is_err(),
        "pp past the context"
    );
    let b = tempfile::tempdir().unwrap();
    tiny_bert(b.path());
    let enc = open(b.path());
    let pairs: Vec<data::StsPair> = (0..10).map(|i| (words(3 + i, 40), words(2 + i, 40), 1.0)).collect();
    let o = bench::BenchOptions { n_sent: 20, n_latency: 5, reps: 1, batch: 4, ..Default::default() };
    let m = bench::bench(&enc, &pairs, &o, &mut quiet()).unwrap();
    assert_eq!(m.items, Some(20));
    assert!(m.sent_per_s.unwrap() > 0.0 && m.p50_ms.unwrap() <= m.p99_ms.unwrap());
}

// ---- real models, small subsets, against scripts/make_reference.py ----

fn reference() -> serde_json::Value {
    common::fixture("eval.json")
}

#[test]
fn real_smollm2_ppl_two_chunks_matches_transformers() {
    let l = open(&common::smollm2());
    let (_, text) = data::read_text(None, data::WIKI_TEST).unwrap();
    let m = ppl::perplexity(&l, &text, &ppl::PplOptions { ctx: 512, chunks: Some(2) }, None, &mut quiet()).unwrap();
    let r = &reference()["ppl_smollm2_q4_1_2x512"];
    let want = r["ppl"].as_f64().unwrap();
    assert_eq!(m.tokens, Some(r["tokens"].as_u64().unwrap() as usize));
    assert!((m.ppl.unwrap() - want).abs() <= MAX_REAL_PPL_REL_ERR * want, "{} vs {want}", m.ppl.unwrap());
    let b = load(common::smollm2().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let mb = ppl::perplexity(&b, &text, &ppl::PplOptions { ctx: 512, chunks: Some(2) }, None, &mut quiet()).unwrap();
    let (got, deq) = (mb.ppl.unwrap(), m.ppl.unwrap());
    assert!(got != deq && (got - deq).abs() <= MAX_BLOCK_PPL_REL_ERR * deq, "block {got} vs dequantized {deq}");
}

#[test]
fn real_smollm2_cloze_first_20_matches_transformers() {
    let l = open(&common::smollm2());
    let lines = data::parse_jsonl_texts(&data::read_text(None, data::CLOZE).unwrap()).unwrap();
    let m = cloze::cloze(&l, &lines, Some(20), &mut quiet()).unwrap();
    assert_eq!(m.cloze_acc, reference()["cloze_smollm2_q4_1_first20"]["cloze_acc"].as_f64());
}

#[test]
fn real_minilm_sts_first_200_matches_pytorch() {
    let l = open(&common::minilm());
    let pairs = data::parse_sts(&data::read_text(None, data::STS_TEST).unwrap()).unwrap();
    let m = sts::sts(&l, &pairs[..200], 128, None, &mut quiet()).unwrap();
    let want = reference()["sts_minilm_first200"]["sts_spearman"].as_f64().unwrap();
    assert!((m.sts_spearman.unwrap() - want).abs() <= MAX_STS_ABS_ERR, "{} vs {want}", m.sts_spearman.unwrap());
}

#[test]
fn real_minilm_sst2_probe_beats_chance_clearly() {
    let l = open(&common::minilm());
    let rows = data::parse_sst2(&data::read_text(None, data::SST2_DEV).unwrap()).unwrap();
    let m = classify::classify(&l, &rows, classify::N_TRAIN, 128, &mut quiet()).unwrap();
    // all-MiniLM-L6-v2 probes give ~76% here; a broken encoder or probe falls to ~50%.
    assert!(m.sst2_acc.unwrap() > 70.0, "{m:?}");
}
