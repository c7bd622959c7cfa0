//! Test support: servers on 127.0.0.1 with an ephemeral port, over tiny random models or the real ones.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};
use whittle_models::testing::{rand, word_tokenizer, write_model};
use whittle_serve::{ModelSource, ServeConfig, Server};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Serves the model at `dir` (already loaded, named `tiny`) on a free loopback port.
pub fn start(dir: &Path, cfg: ServeConfig) -> Server {
    let l = whittle_models::load(dir.to_str().unwrap(), &Default::default()).unwrap();
    let cfg = ServeConfig { host: "127.0.0.1".into(), port: 0, ..cfg };
    let s = Server::start(ModelSource::Loaded { name: "tiny".into(), model: Box::new(l) }, cfg).unwrap();
    s.wait_ready(Duration::from_secs(60)).unwrap();
    s
}

/// A LLaMA wide and long enough that generating thousands of tokens takes a while (seconds), for the
/// tests of timeouts, disconnects and the queue: 4 blocks of width 256, context 4096, vocab 50.
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

/// A blocking HTTP client for one server.
pub struct Client {
    pub base: String,
    pub http: reqwest::blocking::Client,
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Client {
    pub fn new(s: &Server) -> Self {
        let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        Self { base: format!("http://{}", s.addr()), http }
    }

    fn answer(r: reqwest::blocking::Response) -> Answer {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, headers, body, text }
    }

    pub fn post(&self, path: &str, body: &str) -> Answer {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        Self::answer(r)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Answer {
        self.post(path, &body.to_string())
    }

    pub fn get(&self, path: &str) -> Answer {
        Self::answer(self.http.get(format!("{}{path}", self.base)).send().unwrap())
    }

    /// The `data:` payloads of a streamed answer, in order (`[DONE]` included).
    pub fn stream(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let r = self.post_json(path, body);
        let events = r.text.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect();
        (r.status, events)
    }
}

/// Asserts OpenAI's error envelope with this status.
pub fn assert_error(a: &Answer, status: u16) {
    assert_eq!(a.status, status, "{}", a.text);
    let e = &a.body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "envelope without a message: {}", a.text);
    for k in ["type", "param", "code"] {
        assert!(e.get(k).is_some(), "envelope without `{k}`: {}", a.text);
    }
}

/// A sample's value from Prometheus text (`name{labels}` exactly as rendered, or a bare name).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Polls `f` until it holds or `secs` pass.
pub fn eventually(secs: f64, mut f: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// The model cache (`$WHITTLE_MODELS` or `~/.cache/whittle/models`), fetched by `scripts/fetch-models.sh`
/// on first use.
pub fn models_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("WHITTLE_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/whittle/models"));
        if !dir.join("all-MiniLM-L6-v2/model.safetensors").exists() || !dir.join(SMOLLM2).exists() {
            std::fs::create_dir_all(&dir).unwrap();
            let status = std::process::Command::new("flock")
                .arg(dir.join(".fetch.lock"))
                .arg(repo_root().join("scripts/fetch-models.sh"))
                .env("WHITTLE_MODELS", &dir)
                .status()
                .expect("running scripts/fetch-models.sh");
            assert!(status.success(), "scripts/fetch-models.sh failed");
        }
        dir
    })
    .clone()
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
