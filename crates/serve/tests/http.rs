//! End-to-end tests on tiny random models: a real server on 127.0.0.1 with an ephemeral port.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use whittle_models::generate::{generate, Sampling};
use whittle_models::{testing, text, Model};
use whittle_serve::ServeConfig;

/// Embeddings from the server and from `embed_texts` offline differ by batching and padding only.
const MAX_EMBED_ABS_ERR: f32 = 1e-5;

fn tiny_bert() -> (tempfile::TempDir, whittle_serve::Server) {
    let dir = tempfile::tempdir().unwrap();
    testing::tiny_bert(dir.path());
    let s = start(dir.path(), ServeConfig { max_body_bytes: 4096, ..Default::default() });
    (dir, s)
}

fn tiny_llama(cfg: ServeConfig) -> (tempfile::TempDir, whittle_serve::Server) {
    let dir = tempfile::tempdir().unwrap();
    testing::tiny_llama(dir.path());
    let s = start(dir.path(), cfg);
    (dir, s)
}

/// Greedy continuation of `prompt` by `whittle_models::generate` (what `whittle generate` prints).
fn offline_greedy(dir: &std::path::Path, prompt: &str, n: usize, eos: bool) -> String {
    let l = whittle_models::load(dir.to_str().unwrap(), &Default::default()).unwrap();
    let Model::Llama(m) = &l.model else { panic!() };
    let ids = text::encode_prompt(&l, prompt, false).unwrap();
    let stop = if eos { l.eos_token_ids.clone() } else { vec![] };
    let out = generate(m, &ids, n, &stop, &Sampling::default(), |_| {}).unwrap();
    let out: Vec<u32> = out.into_iter().filter(|t| !stop.contains(t)).collect();
    text::decode(&l, &out).unwrap()
}

#[test]
fn embeddings_in_every_input_shape() {
    let (dir, s) = tiny_bert();
    let c = Client::new(&s);
    let texts = ["w3 w4 w5", "w6", "w7 w8 w9 w10 w11 w12"];
    let r = c.post_json("/v1/embeddings", &json!({"model": "tiny", "input": texts}));
    assert_eq!(r.status, 200, "{}", r.text);
    let data = r.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let l = whittle_models::load(dir.path().to_str().unwrap(), &Default::default()).unwrap();
    let want = text::embed_texts(&l, &texts, 32, 1).unwrap();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        let got: Vec<f32> = serde_json::from_value(d["embedding"].clone()).unwrap();
        let err = got.iter().zip(&want[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= MAX_EMBED_ABS_ERR, "input {i}: {err}");
    }
    // [CLS] w3 w4 w5 [SEP] + [CLS] w6 [SEP] + [CLS] w7..w12 [SEP]
    assert_eq!(r.body["usage"]["prompt_tokens"], 5 + 3 + 8);
    assert_eq!(r.body["object"], "list");

    // base64: the same floats, little-endian.
    let r64 =
        c.post_json("/v1/embeddings", &json!({"model": "tiny", "input": "w3 w4 w5", "encoding_format": "base64"}));
    assert_eq!(r64.status, 200, "{}", r64.text);
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(r64.body["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let alone = c.post_json("/v1/embeddings", &json!({"model": "tiny", "input": "w3 w4 w5"}));
    let plain: Vec<f32> = serde_json::from_value(alone.body["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(floats, plain, "base64 carries the same f32 values as JSON");

    // Token ids: one list, or a list of lists; as given (no special tokens added).
    let ids = c.post_json("/v1/embeddings", &json!({"input": [1, 3, 4, 5, 2]}));
    assert_eq!(ids.status, 200, "{}", ids.text);
    let by_ids: Vec<f32> = serde_json::from_value(ids.body["data"][0]["embedding"].clone()).unwrap();
    assert!(
        by_ids.iter().zip(&plain).all(|(a, b)| (a - b).abs() <= MAX_EMBED_ABS_ERR),
        "ids [CLS] w3 w4 w5 [SEP] = text"
    );
    let lists = c.post_json("/v1/embeddings", &json!({"input": [[1, 3, 2], [1, 4, 4, 2]]}));
    assert_eq!(lists.status, 200);
    assert_eq!(lists.body["data"].as_array().unwrap().len(), 2);
    assert_eq!(lists.body["usage"]["total_tokens"], 7);
}

#[test]
fn bad_requests_get_their_status_and_envelope_and_the_server_keeps_serving() {
    let (_dir, s) = tiny_bert();
    let c = Client::new(&s);
    assert_error(&c.post("/v1/embeddings", "{\"input\": "), 400);
    assert_error(&c.post("/v1/embeddings", "not json"), 400);
    let wrong = c.post("/v1/embeddings", r#"{"input": 42}"#);
    assert_error(&wrong, 422);
    assert_eq!(wrong.body["error"]["param"], "input");
    assert_error(&c.post("/v1/embeddings", r#"{"input": "w3", "encoding_format": 7}"#), 422);
    assert_error(&c.post("/v1/embeddings", r#"{"input": "w3", "encoding_format": "hex"}"#), 400);
    assert_error(&c.post("/v1/embeddings", r#"{"input": []}"#), 400);
    assert_error(&c.post("/v1/embeddings", r#"{"input": [999999]}"#), 400);
    let unknown = c.post("/v1/embeddings", r#"{"model": "gpt-5", "input": "w3"}"#);
    assert_error(&unknown, 404);
    assert_eq!(unknown.body["error"]["code"], "model_not_found");
    assert_error(&c.get("/v1/nothing"), 404);
    assert_error(&c.post("/v1/completions", r#"{"prompt": "w3"}"#), 404);
    assert_error(&c.get("/v1/embeddings"), 405);
    // Longer than the model's 32 positions: 400 naming both lengths.
    let long: Vec<String> = (0..40).map(|i| format!("w{}", 3 + i % 30)).collect();
    let r = c.post_json("/v1/embeddings", &json!({"input": long.join(" ")}));
    assert_error(&r, 400);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("42") && msg.contains("32"), "{msg}");
    // Over the 4096-byte body limit: 413.
    let big = json!({"input": "w3 ".repeat(3000)});
    assert_error(&c.post_json("/v1/embeddings", &big), 413);
    // Still serving.
    assert_eq!(c.post_json("/v1/embeddings", &json!({"input": "w3 w4"})).status, 200);
    assert_eq!(c.get("/health").status, 200);
}

/// Cosine of two vectors, as the test computes it from offline embeddings.
fn cos(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// Server cosine vs the cosine of offline embeddings: batching and padding only.
const MAX_SIMILARITY_ABS_ERR: f64 = 1e-4;

#[test]
fn similarity_scores_each_sentence_against_the_source() {
    let (dir, s) = tiny_bert();
    let c = Client::new(&s);
    let (source, others) = ("w3 w4 w5", ["w3 w4 w5", "w9 w10", "w20 w21 w22 w23 w24"]);
    let r = c.post_json(
        "/v1/similarity",
        &json!({"model": "tiny", "inputs": {"source_sentence": source, "sentences": others}}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["object"], "list");
    let data = r.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let l = whittle_models::load(dir.path().to_str().unwrap(), &Default::default()).unwrap();
    let want = text::embed_texts(&l, &[source, others[0], others[1], others[2]], 32, 1).unwrap();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "similarity");
        let got = d["similarity"].as_f64().unwrap();
        let expect = cos(&want[0], &want[i + 1]);
        assert!((got - expect).abs() <= MAX_SIMILARITY_ABS_ERR, "sentence {i}: {got} vs {expect}");
    }
    assert!((data[0]["similarity"].as_f64().unwrap() - 1.0).abs() <= MAX_SIMILARITY_ABS_ERR, "itself");
    // [CLS] w3 w4 w5 [SEP] twice + [CLS] w9 w10 [SEP] + [CLS] w20..w24 [SEP]
    assert_eq!(r.body["usage"]["prompt_tokens"], 5 + 5 + 4 + 7);

    // Bad requests: their status, OpenAI's envelope, the field named.
    let missing = c.post_json("/v1/similarity", &json!({"input": "w3"}));
    assert_error(&missing, 422);
    let wrong = c.post_json("/v1/similarity", &json!({"inputs": {"source_sentence": "w3", "sentences": "w4"}}));
    assert_error(&wrong, 422);
    assert_eq!(wrong.body["error"]["param"], "inputs.sentences");
    let empty = c.post_json("/v1/similarity", &json!({"inputs": {"source_sentence": "w3", "sentences": []}}));
    assert_error(&empty, 400);
    assert_eq!(empty.body["error"]["param"], "inputs.sentences");
    assert_error(&c.post("/v1/similarity", "{\"inputs\": "), 400);
    let long: Vec<String> = (0..40).map(|i| format!("w{}", 3 + i % 30)).collect();
    let r = c.post_json(
        "/v1/similarity",
        &json!({"inputs": {"source_sentence": "w3", "sentences": ["w4", long.join(" ")]}}),
    );
    assert_error(&r, 400);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("inputs.sentences[1]") && msg.contains("42") && msg.contains("32"), "{msg}");
    let unknown = c.post_json(
        "/v1/similarity",
        &json!({"model": "gpt-5", "inputs": {"source_sentence": "w3", "sentences": ["w4"]}}),
    );
    assert_error(&unknown, 404);
    assert_error(&c.get("/v1/similarity"), 405);
    // Still serving.
    let ok = c.post_json("/v1/similarity", &json!({"inputs": {"source_sentence": "w3", "sentences": ["w4"]}}));
    assert_eq!(ok.status, 200, "{}", ok.text);
}

#[test]
fn similarity_on_a_decoder_is_404() {
    let (_dir, s) = tiny_llama(ServeConfig::default());
    let c = Client::new(&s);
    let r = c.post_json("/v1/similarity", &json!({"inputs": {"source_sentence": "w3", "sentences": ["w4"]}}));
    assert_error(&r, 404);
}

#[test]
fn queue_full_is_429_with_retry_after() {
    let (_dir, s) = tiny_llama(ServeConfig { max_queue: 2, ..Default::default() });
    let c = Client::new(&s);
    // Two requests already waiting (the engine's own bookkeeping is exercised by the slow-model tests).
    s.metrics().queue_depth.set(2);
    let r = c.post_json("/v1/completions", &json!({"prompt": "w3", "max_tokens": 2}));
    assert_error(&r, 429);
    assert_eq!(r.headers["retry-after"], "1");
    s.metrics().queue_depth.set(0);
    assert_eq!(c.post_json("/v1/completions", &json!({"prompt": "w3", "max_tokens": 2})).status, 200);
}

#[test]
fn completions_and_chat_match_offline_greedy_decoding() {
    let (dir, s) = tiny_llama(ServeConfig::default());
    let c = Client::new(&s);
    let want = offline_greedy(dir.path(), "w3 w4 w5", 12, false);
    let r = c.post_json(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "w3 w4 w5", "max_tokens": 12, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["choices"][0]["text"], want.as_str());
    assert_eq!(r.body["choices"][0]["finish_reason"], "length");
    assert_eq!(r.body["usage"]["completion_tokens"], 12);
    assert_eq!(r.body["object"], "text_completion");

    // Streamed: the chunks add up to the same text; a finish chunk, a usage chunk, [DONE].
    let (status, events) = c.stream(
        "/v1/completions",
        &json!({"prompt": "w3 w4 w5", "max_tokens": 12, "temperature": 0, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, want);
    let finish: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], 12);

    // Chat (no template in the tiny model: ChatML) streamed equals generating from the rendered prompt.
    let rendered = c.post_json("/tokenize", &json!({"messages": [{"role": "user", "content": "w3 w4"}]}));
    assert_eq!(rendered.status, 200, "{}", rendered.text);
    let prompt = rendered.body["prompt"].as_str().unwrap().to_string();
    let want_chat = offline_greedy(dir.path(), &prompt, 8, false);
    let (status, events) = c.stream(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "w3 w4"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": true, "stream": true}),
    );
    assert_eq!(status, 200);
    let chunks: Vec<Value> =
        events.iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect();
    assert_eq!(text, want_chat);
    // Non-streamed chat.
    let r = c.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "w3 w4"}], "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["choices"][0]["message"]["content"], want_chat.as_str());
    assert_eq!(r.body["choices"][0]["message"]["role"], "assistant");
}

#[test]
fn concurrent_streams_each_match_their_own_greedy_decoding() {
    let (dir, s) = tiny_llama(ServeConfig::default());
    let prompts = ["w3 w4 w5", "w9", "w10 w11 w12 w13 w14 w15 w16", "w20 w21"];
    let base = format!("http://{}", s.addr());
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (base, p) = (base.clone(), p.to_string());
            std::thread::spawn(move || {
                let r = reqwest::blocking::Client::new()
                    .post(format!("{base}/v1/completions"))
                    .json(&json!({"prompt": p, "max_tokens": 20, "temperature": 0, "ignore_eos": true, "stream": true}))
                    .send()
                    .unwrap()
                    .text()
                    .unwrap();
                r.lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter(|d| *d != "[DONE]")
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .filter_map(|c| c["choices"].get(0)?["text"].as_str().map(String::from))
                    .collect::<String>()
            })
        })
        .collect();
    for (p, h) in prompts.iter().zip(handles) {
        assert_eq!(h.join().unwrap(), offline_greedy(dir.path(), p, 20, false), "prompt {p}");
    }
}

#[test]
fn generation_limits_and_sampling() {
    let (_dir, s) = tiny_llama(ServeConfig::default());
    let c = Client::new(&s);
    let r = c.post_json("/v1/completions", &json!({"prompt": "w3", "n": 2}));
    assert_error(&r, 400);
    assert_eq!(r.body["error"]["param"], "n");
    assert_error(&c.post_json("/v1/completions", &json!({"prompt": "w3", "temperature": 9})), 400);
    assert_error(&c.post_json("/v1/completions", &json!({"prompt": "w3", "top_p": 0})), 400);
    assert_error(&c.post_json("/v1/completions", &json!({"prompt": "w3", "max_tokens": "x"})), 422);
    assert_error(&c.post_json("/v1/completions", &json!({"prompt": ["w3", "w4"]})), 400);
    assert_error(&c.post_json("/v1/chat/completions", &json!({"messages": []})), 400);
    assert_error(&c.post_json("/v1/chat/completions", &json!({"messages": "hi"})), 422);
    assert_error(&c.post_json("/v1/embeddings", &json!({"input": "w3"})), 404);
    // The tiny model's context is 64 positions: prompt and prompt + max_tokens are checked, both named.
    let long: Vec<&str> = std::iter::repeat_n("w3", 70).collect();
    let r = c.post_json("/v1/completions", &json!({"prompt": long.join(" ")}));
    assert_error(&r, 400);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("70") && msg.contains("64"), "{msg}");
    let r = c.post_json("/v1/completions", &json!({"prompt": "w3 w4", "max_tokens": 100}));
    assert_error(&r, 400);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("64"));
    // Seeded sampling repeats; a stop string ends the text before it.
    let body =
        json!({"prompt": "w3 w4", "max_tokens": 10, "temperature": 1.0, "top_k": 20, "seed": 7, "ignore_eos": true});
    let a = c.post_json("/v1/completions", &body);
    let b = c.post_json("/v1/completions", &body);
    assert_eq!(a.status, 200);
    assert_eq!(a.body["choices"][0]["text"], b.body["choices"][0]["text"]);
    let full = c
        .post_json("/v1/completions", &json!({"prompt": "w3", "max_tokens": 12, "temperature": 0, "ignore_eos": true}));
    let text = full.body["choices"][0]["text"].as_str().unwrap().to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    let stop = words[3];
    let cut = c.post_json(
        "/v1/completions",
        &json!({"prompt": "w3", "max_tokens": 12, "temperature": 0, "ignore_eos": true, "stop": [stop]}),
    );
    assert_eq!(cut.body["choices"][0]["finish_reason"], "stop");
    let got = cut.body["choices"][0]["text"].as_str().unwrap();
    assert_eq!(got, &text[..text.find(stop).unwrap()], "text up to the first `{stop}`");
}

#[test]
fn models_tokenize_detokenize_health_metrics() {
    let (_dir, s) = tiny_llama(ServeConfig::default());
    let c = Client::new(&s);
    let m = c.get("/v1/models");
    assert_eq!(m.body["data"][0]["id"], "tiny");
    assert_eq!(m.body["data"][0]["kind"], "decoder");
    let t = c.post_json("/tokenize", &json!({"prompt": "w3 w4 w5"}));
    assert_eq!(t.body["tokens"], json!([3, 4, 5]));
    assert_eq!(t.body["count"], 3);
    let d = c.post_json("/detokenize", &json!({"tokens": [3, 4, 5]}));
    assert_eq!(d.body["prompt"], "w3 w4 w5");
    assert_error(&c.post_json("/detokenize", &json!({"tokens": [5000]})), 400);
    assert_error(&c.post_json("/detokenize", &json!({"tokens": ["a"]})), 422);
    let h = c.get("/health");
    assert_eq!(h.status, 200, "{}", h.text);
    for _ in 0..3 {
        assert_eq!(c.post_json("/v1/completions", &json!({"prompt": "w3", "max_tokens": 3})).status, 200);
    }
    let text = c.get("/metrics").text;
    assert_eq!(metric(&text, "whittle_requests_total{route=\"/v1/completions\",status=\"200\"}"), Some(3.0));
    assert_eq!(metric(&text, "whittle_requests_total{route=\"/tokenize\",status=\"200\"}"), Some(1.0));
    assert_eq!(metric(&text, "whittle_requests_total{route=\"/detokenize\",status=\"400\"}"), Some(1.0));
    assert_eq!(metric(&text, "whittle_prompt_tokens_total"), Some(3.0));
    assert!(metric(&text, "whittle_generated_tokens_total").unwrap() >= 3.0);
    assert_eq!(metric(&text, "whittle_time_to_first_token_seconds_count"), Some(3.0));
    assert_eq!(metric(&text, "whittle_model_loaded"), Some(1.0));
    assert!(metric(&text, "process_resident_memory_bytes").unwrap() > 0.0);
}

#[test]
fn api_key_is_required_when_set() {
    let (_dir, s) = tiny_llama(ServeConfig { api_key: Some("sesame".into()), ..Default::default() });
    let c = Client::new(&s);
    assert_error(&c.post_json("/v1/completions", &json!({"prompt": "w3", "max_tokens": 2})), 401);
    let r = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .bearer_auth("sesame")
        .json(&json!({"prompt": "w3", "max_tokens": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.get("/health").status, 200, "health stays open");
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    slow_llama(dir.path());
    let s = start(dir.path(), ServeConfig::default());
    let c = Client::new(&s);
    let mut r = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .json(&json!({"prompt": "w3 w4", "max_tokens": 4000, "ignore_eos": true, "stream": true, "temperature": 0}))
        .send()
        .unwrap();
    let mut first = [0u8; 64];
    use std::io::Read;
    assert!(r.read(&mut first).unwrap() > 0, "the stream started");
    assert_eq!(s.metrics().running_sequences.get(), 1);
    drop(r);
    assert!(eventually(10.0, || s.metrics().running_sequences.get() == 0 && s.metrics().in_flight.get() == 0));
    let text = c.get("/metrics").text;
    assert_eq!(metric(&text, "whittle_cancelled_total{reason=\"client_gone\"}"), Some(1.0));
    assert!(metric(&text, "whittle_generated_tokens_total").unwrap() < 4000.0, "stopped early");
    assert_eq!(c.post_json("/v1/completions", &json!({"prompt": "w3", "max_tokens": 2})).status, 200);
}

#[test]
fn the_request_timeout_cancels_the_work() {
    let dir = tempfile::tempdir().unwrap();
    slow_llama(dir.path());
    let s = start(dir.path(), ServeConfig { request_timeout: Duration::from_millis(300), ..Default::default() });
    let c = Client::new(&s);
    let r = c.post_json("/v1/completions", &json!({"prompt": "w3", "max_tokens": 4000, "ignore_eos": true}));
    assert_error(&r, 504);
    assert!(eventually(5.0, || s.metrics().running_sequences.get() == 0));
    let text = c.get("/metrics").text;
    assert_eq!(metric(&text, "whittle_cancelled_total{reason=\"timeout\"}"), Some(1.0));
}

#[test]
fn a_full_running_batch_queues_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    slow_llama(dir.path());
    let s = start(dir.path(), ServeConfig { max_concurrent: 1, max_queue: 1, ..Default::default() });
    let base = format!("http://{}", s.addr());
    let long = |base: String, n: usize| {
        std::thread::spawn(move || {
            reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()
                .unwrap()
                .post(format!("{base}/v1/completions"))
                .json(&json!({"prompt": "w3", "max_tokens": n, "ignore_eos": true}))
                .send()
                .map(|r| r.status().as_u16())
        })
    };
    let a = long(base.clone(), 1500);
    assert!(eventually(10.0, || s.metrics().running_sequences.get() == 1));
    let b = long(base.clone(), 10);
    assert!(eventually(10.0, || s.metrics().queue_depth.get() == 1), "the second waits");
    let c = Client::new(&s);
    let r = c.post_json("/v1/completions", &json!({"prompt": "w3", "max_tokens": 2}));
    assert_error(&r, 429);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(a.join().unwrap().unwrap(), 200);
    assert_eq!(b.join().unwrap().unwrap(), 200);
    assert_eq!(s.metrics().queue_depth.get(), 0);
}
