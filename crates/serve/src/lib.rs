//! whittle-serve: an OpenAI-compatible HTTP server for whittle's models (axum + tokio), and a load
//! generator to measure one from the client side ([`client`]).
//!
//! Layout, as text-embeddings-inference and vLLM split it:
//! - [`server`]: the HTTP layer. It validates, tokenizes, queues and maps failures to statuses and OpenAI's
//!   error envelope ([`error`]); it never runs the model.
//! - one engine thread per model, fed by a channel: [`embed`] (dynamic batches under a token budget, sorted
//!   by length) for encoders, [`decode`] (continuous batching with chunked prefill over
//!   `whittle_models::llama::Llama::forward_step`) for decoders.
//! - [`metrics`]: every metric registered once, rendered at `/metrics` by the `prometheus` crate.
//!
//! [`Server::start`] binds first and loads the model in the background, so `/health` answers 503 while it
//! loads; it answers 200 only after a real one-token forward pass succeeds.

pub mod api;
pub mod client;
pub mod decode;
pub mod detok;
pub mod embed;
pub mod error;
pub mod metrics;
pub mod server;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use whittle_models::{LoadOptions, Loaded, Model};

pub use error::ApiError;
pub use metrics::Metrics;

/// How the server listens, batches and limits.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    /// 0 = any free port (see [`Server::addr`]).
    pub port: u16,
    /// Encoders: tokens in one batch (batches run packed, so real tokens). Decoders: prompt tokens prefilled in one step (chunked prefill).
    pub max_batch_tokens: usize,
    /// Decoders: sequences in the running batch. Encoders: unused (the token budget sizes batches).
    pub max_concurrent: usize,
    /// Requests (embedding inputs) waiting for the engine before new ones get 429.
    pub max_queue: usize,
    /// Past this, a request's work is dropped and it gets 504 (a stream gets an error event).
    pub request_timeout: Duration,
    /// Required as `Authorization: Bearer KEY` on the API routes when set (`/health`, `/metrics` stay open).
    pub api_key: Option<String>,
    /// Larger bodies get 413.
    pub max_body_bytes: usize,
    /// The name clients pass as `model` (default: the model file or directory name).
    pub served_model_name: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch_tokens: 4096,
            max_concurrent: 32,
            max_queue: 1024,
            request_timeout: Duration::from_secs(600),
            api_key: None,
            max_body_bytes: 2 << 20,
            served_model_name: None,
        }
    }
}

impl ServeConfig {
    /// Checks the limits (before anything binds or loads).
    pub fn check(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_concurrent", self.max_concurrent),
            ("max_queue", self.max_queue),
            ("max_body_bytes", self.max_body_bytes),
        ] {
            if v == 0 {
                anyhow::bail!("option `{name}` must be at least 1");
            }
        }
        if self.request_timeout.is_zero() {
            anyhow::bail!("option `request_timeout` must be positive");
        }
        server::bind_addr(&self.host, self.port).map_err(anyhow::Error::msg)?;
        Ok(())
    }
}

/// Where the model comes from.
pub enum ModelSource {
    /// Load `spec` (a MODEL argument) in the background after binding.
    Load { spec: String, options: LoadOptions },
    /// Already loaded (tests).
    Loaded { name: String, model: Box<Loaded> },
}

/// A running server on its own thread and tokio runtime.
pub struct Server {
    addr: SocketAddr,
    state: Arc<server::AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// Binds, starts serving (503 until the model is ready) and loads the model.
    pub fn start(source: ModelSource, cfg: ServeConfig) -> anyhow::Result<Server> {
        cfg.check()?;
        let addr = server::bind_addr(&cfg.host, cfg.port).map_err(anyhow::Error::msg)?;
        let listener = std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (name, aliases) = match &source {
            ModelSource::Load { spec, .. } => {
                let p = std::path::Path::new(spec.trim_end_matches('/'));
                let file = p.file_name().map(|f| f.to_string_lossy().to_string());
                let stem = file.as_ref().map(|f| f.trim_end_matches(".gguf").to_string());
                // Clients may also name the model by the MODEL argument or its file name.
                (stem.unwrap_or_else(|| spec.clone()), [Some(spec.clone()), file].into_iter().flatten().collect())
            }
            ModelSource::Loaded { name, .. } => (name.clone(), vec![]),
        };
        let state = Arc::new(server::AppState {
            model_name: cfg.served_model_name.clone().unwrap_or(name),
            aliases,
            cfg: cfg.clone(),
            metrics: Arc::new(Metrics::new()),
            ready: OnceLock::new(),
            load_error: OnceLock::new(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new().name("whittle-serve-http".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("whittle-http")
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let app = server::router(st.clone());
                // Load after binding: /health says 503 meanwhile.
                let loader = std::thread::Builder::new().name("whittle-load".into()).spawn({
                    let st = st.clone();
                    move || load(st, source)
                })?;
                let shutdown = async move {
                    tokio::select! {
                        _ = rx => {}
                        _ = signal() => {}
                    }
                };
                axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
                // Every in-flight request has finished: stop the engine (it exits when its channel closes).
                drop(loader);
                Ok(())
            })
        })?;
        Ok(Server { addr, state, shutdown: Some(tx), thread: Some(thread) })
    }

    /// The address it listens on (the real port when started with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Blocks until the model is loaded (Ok) or failed to load (Err), or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < timeout {
            if self.state.ready.get().is_some() {
                return Ok(());
            }
            if let Some(e) = self.state.load_error.get() {
                anyhow::bail!("{e}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("the model did not load within {timeout:?}")
    }

    /// Runs until SIGTERM / Ctrl-C; in-flight requests finish first.
    pub fn wait(mut self) -> anyhow::Result<()> {
        self.join()
    }

    /// Stops accepting, lets in-flight requests finish, and returns.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join()
    }

    fn join(&mut self) -> anyhow::Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.join();
    }
}

/// SIGTERM or Ctrl-C.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Loads the model, starts its engine thread and publishes it.
fn load(st: Arc<server::AppState>, source: ModelSource) {
    let loaded = match source {
        ModelSource::Loaded { model, .. } => *model,
        ModelSource::Load { spec, options } => match whittle_models::load(&spec, &options) {
            Ok(l) => l,
            Err(e) => {
                let _ = st.load_error.set(format!("loading model `{spec}`: {e:#}"));
                return;
            }
        },
    };
    st.metrics.model_bytes.set(whittle_eval::bench::model_bytes(&loaded) as i64);
    let loaded = Arc::new(loaded);
    let m = st.metrics.clone();
    let cfg = &st.cfg;
    let engine = match &loaded.model {
        Model::Bert(_) => {
            let (tx, rx) = std::sync::mpsc::channel();
            let (l, budget) = (loaded.clone(), cfg.max_batch_tokens);
            std::thread::Builder::new()
                .name("whittle-embed".into())
                .spawn(move || embed::run(l, rx, budget, m))
                .map(|_| server::EngineTx::Embed(tx))
        }
        Model::Llama(_) => {
            let (tx, rx) = std::sync::mpsc::channel();
            let lim = decode::DecodeLimits { max_concurrent: cfg.max_concurrent, prefill_chunk: cfg.max_batch_tokens };
            let l = loaded.clone();
            std::thread::Builder::new()
                .name("whittle-decode".into())
                .spawn(move || decode::run(l, rx, lim, m))
                .map(|_| server::EngineTx::Generate(tx))
        }
    };
    let ready = engine.map_err(|e| e.to_string()).and_then(|e| server::Ready::new(loaded, e));
    match ready {
        Ok(r) => {
            let _ = st.ready.set(Arc::new(r));
            st.metrics.model_loaded.set(1);
        }
        Err(e) => {
            let _ = st.load_error.set(e);
        }
    }
}
