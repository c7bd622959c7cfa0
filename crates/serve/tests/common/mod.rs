//! Test support: servers on 127.0.0.1 with an ephemeral port, over tiny random models or the real ones.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
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

/// A LLaMA slow enough to generate that timeouts, disconnects and the queue can be tested (seconds).
pub fn slow_llama(dir: &Path) {
    whittle_models::testing::slow_llama(dir)
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
