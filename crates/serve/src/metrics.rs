//! Every metric the server exports, registered in one place and rendered at `/metrics` in Prometheus' text
//! format by the `prometheus` crate (never formatted by hand).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, 1 ms to 2 min.
const LATENCY: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Inter-token latency buckets in seconds, 1 ms to 5 s.
const STEP: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Batch sizes (sequences or inputs in one forward).
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Tokens in one forward.
const TOKENS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];

/// The server's metrics (cheap to share: every field is a handle into `registry`).
pub struct Metrics {
    pub registry: Registry,
    /// Finished HTTP requests by route template and status code.
    pub requests: IntCounterVec,
    /// Time from a request's arrival to its response's end (streams: until the last event).
    pub request_duration: HistogramVec,
    /// Time a request waited before the engine took it.
    pub queue_time: Histogram,
    /// Time the engine spent on a request (its batch's forward for embeddings; admission to the last token
    /// for generation).
    pub inference_time: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    /// Inputs (embeddings) or sequences (a decoding step) in one forward.
    pub batch_size: Histogram,
    /// Tokens in one forward (padded, for embeddings).
    pub batch_tokens: Histogram,
    /// Requests waiting for the engine.
    pub queue_depth: IntGauge,
    /// HTTP requests being answered (a stream counts until it ends or its client leaves).
    pub in_flight: IntGauge,
    /// Sequences in the decoder's running batch.
    pub running_sequences: IntGauge,
    /// Work the engine dropped because its client left or its time ran out.
    pub cancelled: IntCounterVec,
    /// Bytes of the model's weight files.
    pub model_bytes: IntGauge,
    /// 1 once the model is loaded.
    pub model_loaded: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let h = |name: &str, help: &str, b: &[f64]| {
            let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(b.to_vec())).expect("valid histogram");
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        };
        let g = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).expect("valid gauge");
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        };
        let c = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).expect("valid counter");
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        };
        let requests = IntCounterVec::new(
            Opts::new("whittle_requests_total", "HTTP requests answered, by route and status"),
            &["route", "status"],
        )
        .expect("valid counter");
        r.register(Box::new(requests.clone())).expect("unique metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new("whittle_request_duration_seconds", "Time from arrival to the end of the response")
                .buckets(LATENCY.to_vec()),
            &["route"],
        )
        .expect("valid histogram");
        r.register(Box::new(request_duration.clone())).expect("unique metric");
        let cancelled = IntCounterVec::new(
            Opts::new("whittle_cancelled_total", "Requests whose work was dropped, by reason"),
            &["reason"],
        )
        .expect("valid counter");
        r.register(Box::new(cancelled.clone())).expect("unique metric");
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("process collector registers once");
        Self {
            requests,
            request_duration,
            queue_time: h("whittle_queue_time_seconds", "Time a request waited for the engine", LATENCY),
            inference_time: h("whittle_inference_time_seconds", "Engine time of a request", LATENCY),
            time_to_first_token: h(
                "whittle_time_to_first_token_seconds",
                "Time from arrival to the first generated token",
                LATENCY,
            ),
            inter_token_latency: h(
                "whittle_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a sequence",
                STEP,
            ),
            prompt_tokens: c("whittle_prompt_tokens_total", "Prompt (input) tokens of accepted requests"),
            generated_tokens: c("whittle_generated_tokens_total", "Tokens generated"),
            batch_size: h("whittle_batch_size", "Inputs or sequences in one forward", SIZES),
            batch_tokens: h("whittle_batch_tokens", "Tokens in one forward (padding included)", TOKENS),
            queue_depth: g("whittle_queue_depth", "Requests waiting for the engine"),
            in_flight: g("whittle_requests_in_flight", "HTTP requests being answered"),
            running_sequences: g("whittle_running_sequences", "Sequences in the decoder's running batch"),
            cancelled,
            model_bytes: g("whittle_model_bytes", "Bytes of the model's weight files"),
            model_loaded: g("whittle_model_loaded", "1 once the model is loaded and serving"),
            registry: r,
        }
    }

    /// Everything in Prometheus' text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8(buf).unwrap_or_default())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds one to a gauge for as long as it lives (in-flight requests, queued work).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(g: &IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.requests.with_label_values(&["/v1/embeddings", "200"]).inc();
        m.request_duration.with_label_values(&["/v1/embeddings"]).observe(0.01);
        let text = m.render().unwrap();
        for name in [
            "whittle_requests_total{route=\"/v1/embeddings\",status=\"200\"} 1",
            "whittle_queue_time_seconds_bucket",
            "whittle_time_to_first_token_seconds_bucket",
            "whittle_inter_token_latency_seconds_bucket",
            "whittle_batch_tokens_bucket",
            "whittle_requests_in_flight 0",
            "whittle_model_bytes",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes") && text.contains("process_cpu_seconds_total"));
        {
            let _g = GaugeGuard::new(&m.in_flight);
            assert_eq!(m.in_flight.get(), 1);
        }
        assert_eq!(m.in_flight.get(), 0);
    }
}
