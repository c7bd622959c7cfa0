//! A closed-loop load generator for a running server (`whittle bench --url`): `concurrency` clients each
//! send a request, wait for its answer and send the next, for `duration`. Embeddings send one sentence per
//! request; completions stream and time the first token and every token after it. The percentiles are
//! the ones `whittle bench` uses offline (`whittle_eval::stats`).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use whittle_eval::stats::percentile;

/// Which endpoint to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Embeddings,
    Completions,
    Chat,
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "embeddings" => Ok(Self::Embeddings),
            "completions" => Ok(Self::Completions),
            "chat" => Ok(Self::Chat),
            o => Err(format!("endpoint `{o}` is not one of embeddings, completions, chat")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server's base URL (`http://127.0.0.1:8080`).
    pub url: String,
    pub concurrency: usize,
    pub duration: Duration,
    /// None: ask `/v1/models` (`kind`), embeddings for encoders, completions for decoders.
    pub endpoint: Option<Endpoint>,
    /// Texts sent in turn (sentences or prompts).
    pub inputs: Vec<String>,
    /// Generation length per request.
    pub max_tokens: usize,
    pub api_key: Option<String>,
}

/// What a run measured, from the client's side.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub url: String,
    pub endpoint: String,
    pub model: String,
    pub concurrency: usize,
    pub seconds: f64,
    pub requests: usize,
    /// Non-2xx answers, transport failures and error events inside streams.
    pub errors: usize,
    pub requests_per_s: f64,
    /// Embeddings: sentences/s. Generation: generated tokens/s (all streams together).
    pub items_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub latency_p99_ms: f64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub itl_p50_ms: Option<f64>,
    pub itl_p95_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    pub generated_tokens: usize,
    /// Status codes of the failed answers, with counts.
    pub error_statuses: std::collections::BTreeMap<String, usize>,
}

#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    requests: usize,
    items: usize,
    tokens: usize,
    errors: std::collections::BTreeMap<String, usize>,
}

/// Drives the server for `cfg.duration` and reports (blocking; runs its own tokio runtime).
pub fn run(cfg: &LoadConfig) -> anyhow::Result<LoadReport> {
    if cfg.concurrency == 0 || cfg.inputs.is_empty() || cfg.duration.is_zero() {
        anyhow::bail!("the load test needs at least one client, one input and a positive duration");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(drive(cfg))
}

async fn drive(cfg: &LoadConfig) -> anyhow::Result<LoadReport> {
    let base = cfg.url.trim_end_matches('/').to_string();
    let http = reqwest::Client::builder().pool_max_idle_per_host(cfg.concurrency).build()?;
    let auth = |r: reqwest::RequestBuilder| match &cfg.api_key {
        Some(k) => r.bearer_auth(k),
        None => r,
    };
    let models: Value = auth(http.get(format!("{base}/v1/models")))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {base}/v1/models: {e}"))?
        .error_for_status()?
        .json()
        .await?;
    let entry = &models["data"][0];
    let model = entry["id"].as_str().unwrap_or_default().to_string();
    let endpoint = match (cfg.endpoint, entry["kind"].as_str()) {
        (Some(e), _) => e,
        (None, Some("encoder")) => Endpoint::Embeddings,
        (None, Some("decoder")) => Endpoint::Completions,
        _ => anyhow::bail!("{base}/v1/models does not say the model's kind: pass the endpoint"),
    };
    let t0 = Instant::now();
    let end = t0 + cfg.duration;
    let mut tasks = Vec::new();
    for c in 0..cfg.concurrency {
        let (http, base, model) = (http.clone(), base.clone(), model.clone());
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut i = c;
            while Instant::now() < end {
                let input = &cfg.inputs[i % cfg.inputs.len()];
                i += cfg.concurrency;
                one(&http, &base, &model, endpoint, input, &cfg, &mut t).await;
            }
            t
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await?;
        all.latencies.extend(t.latencies);
        all.ttft.extend(t.ttft);
        all.itl.extend(t.itl);
        all.requests += t.requests;
        all.items += t.items;
        all.tokens += t.tokens;
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let pct = |v: &[f64], p: f64| if v.is_empty() { f64::NAN } else { percentile(v, p) };
    let opt = |v: &[f64], p: f64| (!v.is_empty()).then(|| percentile(v, p));
    Ok(LoadReport {
        url: base,
        endpoint: format!("{endpoint:?}").to_lowercase(),
        model,
        concurrency: cfg.concurrency,
        seconds: secs,
        requests: all.requests,
        errors: all.errors.values().sum(),
        requests_per_s: all.requests as f64 / secs,
        items_per_s: all.items as f64 / secs,
        latency_p50_ms: pct(&all.latencies, 50.0),
        latency_p95_ms: pct(&all.latencies, 95.0),
        latency_p99_ms: pct(&all.latencies, 99.0),
        ttft_p50_ms: opt(&all.ttft, 50.0),
        ttft_p95_ms: opt(&all.ttft, 95.0),
        ttft_p99_ms: opt(&all.ttft, 99.0),
        itl_p50_ms: opt(&all.itl, 50.0),
        itl_p95_ms: opt(&all.itl, 95.0),
        itl_p99_ms: opt(&all.itl, 99.0),
        generated_tokens: all.tokens,
        error_statuses: all.errors,
    })
}

/// One request; its outcome goes into `t`.
async fn one(
    http: &reqwest::Client,
    base: &str,
    model: &str,
    endpoint: Endpoint,
    input: &str,
    cfg: &LoadConfig,
    t: &mut Tally,
) {
    let (path, body) = match endpoint {
        Endpoint::Embeddings => ("/v1/embeddings", json!({"model": model, "input": input})),
        Endpoint::Completions => (
            "/v1/completions",
            json!({"model": model, "prompt": input, "max_tokens": cfg.max_tokens, "temperature": 0, "stream": true,
                "ignore_eos": true}),
        ),
        Endpoint::Chat => (
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": input}], "max_tokens": cfg.max_tokens,
                "temperature": 0, "stream": true, "ignore_eos": true}),
        ),
    };
    let mut req = http.post(format!("{base}{path}")).json(&body);
    if let Some(k) = &cfg.api_key {
        req = req.bearer_auth(k);
    }
    let t0 = Instant::now();
    t.requests += 1;
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            *t.errors.entry(format!("transport: {}", if e.is_connect() { "connect" } else { "other" })).or_default() +=
                1;
            return;
        }
    };
    let status = resp.status();
    if !status.is_success() {
        *t.errors.entry(status.as_u16().to_string()).or_default() += 1;
        let _ = resp.bytes().await;
        return;
    }
    if endpoint == Endpoint::Embeddings {
        match resp.bytes().await {
            Ok(_) => {
                t.items += 1;
                t.latencies.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            Err(_) => *t.errors.entry("transport: body".into()).or_default() += 1,
        }
        return;
    }
    // Server-sent events: time every chunk that carries text; the usage chunk gives the token count.
    let mut stream = resp.bytes_stream();
    let (mut buf, mut last, mut first, mut tokens, mut failed) = (Vec::<u8>::new(), None::<Instant>, true, 0, false);
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            failed = true;
            break;
        };
        buf.extend_from_slice(&chunk);
        while let Some(p) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..p + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data: ") else { continue };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
                if v.get("error").is_some() {
                    failed = true;
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = n as usize;
                }
                let c = &v["choices"][0];
                let piece = c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).unwrap_or("");
                if !piece.is_empty() {
                    let now = Instant::now();
                    if first {
                        t.ttft.push(now.duration_since(t0).as_secs_f64() * 1e3);
                        first = false;
                    } else if let Some(l) = last {
                        t.itl.push(now.duration_since(l).as_secs_f64() * 1e3);
                    }
                    last = Some(now);
                }
            }
        }
    }
    if failed {
        *t.errors.entry("stream error".into()).or_default() += 1;
        return;
    }
    t.latencies.push(t0.elapsed().as_secs_f64() * 1e3);
    t.tokens += tokens;
    t.items += tokens;
}

/// The texts a load test sends: the sentences of an STS-B TSV (`data`, default the STS-B test split compiled
/// into whittle), sentence1, sentence2, sentence1, … as `whittle bench` reads them offline.
pub fn sts_sentences(data: Option<&std::path::Path>) -> anyhow::Result<Vec<String>> {
    use whittle_eval::data;
    let pairs = data::parse_sts(&data::read_text(data, data::STS_TEST)?)?;
    Ok(pairs.into_iter().flat_map(|(a, b, _)| [a, b]).collect())
}

/// A duration as `60s`, `2m`, `500ms` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (e.g. 60s, 2m, 500ms)"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("`{s}` must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(
            parse_duration("0s").is_err() && parse_duration("fast").is_err() && parse_duration("5 parsecs").is_err()
        );
    }

    #[test]
    fn sts_sentences_alternate() {
        let s = sts_sentences(None).unwrap();
        assert!(s.len() > 2000, "STS-B test has 1379 pairs");
        assert_ne!(s[0], s[1]);
    }
}
