//! The real models through the server: MiniLM embeddings equal the offline ones; SmolLM2's streamed chat,
//! several at once through the continuous batch, equals greedy decoding of each prompt alone.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use whittle_models::generate::{generate, Sampling};
use whittle_models::text::{self, ChatMessage, ChatTemplate};
use whittle_models::Model;
use whittle_serve::{ModelSource, ServeConfig, Server};

/// Server vs offline embeddings of the same sentence: only batching and padding differ.
const MAX_EMBED_ABS_ERR: f32 = 1e-4;

fn serve(spec: &std::path::Path) -> Server {
    let cfg = ServeConfig { host: "127.0.0.1".into(), port: 0, ..Default::default() };
    let src = ModelSource::Load { spec: spec.to_str().unwrap().into(), options: Default::default() };
    let s = Server::start(src, cfg).unwrap();
    s.wait_ready(Duration::from_secs(300)).unwrap();
    s
}

#[test]
fn minilm_embeddings_match_offline() {
    let path = models_dir().join("all-MiniLM-L6-v2");
    let s = serve(&path);
    let c = Client::new(&s);
    assert_eq!(c.get("/health").status, 200);
    let sentences = whittle_serve::client::sts_sentences(None).unwrap();
    let some: Vec<&str> = sentences.iter().take(12).map(String::as_str).collect();
    // Concurrent single-sentence requests: the engine batches them.
    let base = c.base.clone();
    let handles: Vec<_> = some
        .iter()
        .map(|t| {
            let (base, t) = (base.clone(), t.to_string());
            std::thread::spawn(move || {
                let r: Value = reqwest::blocking::Client::new()
                    .post(format!("{base}/v1/embeddings"))
                    .json(&json!({"model": "all-MiniLM-L6-v2", "input": t}))
                    .send()
                    .unwrap()
                    .json()
                    .unwrap();
                serde_json::from_value::<Vec<f32>>(r["data"][0]["embedding"].clone()).unwrap()
            })
        })
        .collect();
    let l = whittle_models::load(path.to_str().unwrap(), &Default::default()).unwrap();
    let want = text::embed_texts(&l, &some, 256, 1).unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.join().unwrap();
        assert_eq!(got.len(), 384);
        let err = got.iter().zip(&want[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= MAX_EMBED_ABS_ERR, "sentence {i}: max |Δ| {err}");
    }
}

#[test]
fn smollm2_streamed_chats_match_greedy_decoding_alone() {
    let path = models_dir().join(SMOLLM2);
    let s = serve(&path);
    let c = Client::new(&s);
    assert_eq!(c.get("/health").status, 200);
    let questions = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain."];
    let base = c.base.clone();
    let handles: Vec<_> = questions
        .iter()
        .map(|q| {
            let (base, q) = (base.clone(), q.to_string());
            std::thread::spawn(move || {
                let body = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": q}], "max_tokens": 24,
                    "temperature": 0, "stream": true});
                let r = reqwest::blocking::Client::new()
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .unwrap();
                assert_eq!(r.status(), 200);
                let text = r.text().unwrap();
                text.lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(String::from))
                    .collect::<String>()
            })
        })
        .collect();
    let l = whittle_models::load(path.to_str().unwrap(), &Default::default()).unwrap();
    let Model::Llama(m) = &l.model else { panic!("SmolLM2 is a decoder") };
    let tpl = ChatTemplate::of(&l).unwrap();
    assert!(tpl.is_model_template(), "the GGUF ships its chat template");
    for (q, h) in questions.iter().zip(handles) {
        let prompt = tpl.render(&[ChatMessage { role: "user".into(), content: q.to_string() }], true).unwrap();
        let ids = text::encode_prompt(&l, &prompt, false).unwrap();
        let out = generate(m, &ids, 24, &l.eos_token_ids, &Sampling::default(), |_| {}).unwrap();
        let out: Vec<u32> = out.into_iter().filter(|t| !l.eos_token_ids.contains(t)).collect();
        assert_eq!(h.join().unwrap(), text::decode(&l, &out).unwrap(), "{q}");
    }
}
