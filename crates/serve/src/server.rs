//! The HTTP layer: it validates requests, queues them for the engine thread and maps every failure to a
//! status and OpenAI's error envelope. No model arithmetic happens here.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use whittle_models::generate::Sampling;
use whittle_models::text::{ChatMessage, ChatTemplate};
use whittle_models::{Loaded, Model};

use crate::api::{self, Input};
use crate::decode::{Finish, GenEvent, GenJob, GenMsg};
use crate::detok::Detok;
use crate::embed::{EmbedJob, EmbedMsg};
use crate::error::ApiError;
use crate::metrics::{GaugeGuard, Metrics};
use crate::ServeConfig;

/// Most inputs in one embeddings request (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

/// The model once loaded, with the channel to its engine thread.
pub struct Ready {
    pub loaded: Arc<Loaded>,
    /// The tokenizer without truncation or padding: lengths are checked, never silently cut.
    tokenizer: tokenizers::Tokenizer,
    pub engine: EngineTx,
    template: Option<ChatTemplate>,
    /// Longest input (encoders) or prompt + generation (decoders), in tokens.
    pub context: usize,
}

pub enum EngineTx {
    Embed(std::sync::mpsc::Sender<EmbedMsg>),
    Generate(std::sync::mpsc::Sender<GenMsg>),
}

impl Ready {
    pub fn new(loaded: Arc<Loaded>, engine: EngineTx) -> Result<Self, String> {
        let mut tokenizer = loaded.tokenizer.clone();
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| e.to_string())?;
        let (context, template) = match &loaded.model {
            Model::Bert(b) => {
                let pos = b.config.max_position_embeddings;
                (loaded.max_seq_length.unwrap_or(pos).min(pos), None)
            }
            Model::Llama(m) => {
                (m.config.max_position_embeddings, Some(ChatTemplate::of(&loaded).map_err(|e| format!("{e:#}"))?))
            }
        };
        Ok(Self { loaded, tokenizer, engine, template, context })
    }

    fn kind(&self) -> &'static str {
        match self.engine {
            EngineTx::Embed(_) => "an encoder (embeddings)",
            EngineTx::Generate(_) => "a decoder (completions)",
        }
    }
}

/// What every handler sees.
pub struct AppState {
    pub cfg: ServeConfig,
    pub metrics: Arc<Metrics>,
    /// The name clients pass as `model`.
    pub model_name: String,
    /// Other names accepted for the model (the path it was loaded from).
    pub aliases: Vec<String>,
    pub ready: OnceLock<Arc<Ready>>,
    pub load_error: OnceLock<String>,
    pub created: u64,
}

type St = State<Arc<AppState>>;

impl AppState {
    fn ready(&self) -> Result<Arc<Ready>, ApiError> {
        if let Some(r) = self.ready.get() {
            return Ok(r.clone());
        }
        match self.load_error.get() {
            Some(e) => Err(ApiError::unavailable(format!("the model failed to load: {e}"))),
            None => Err(ApiError::loading()),
        }
    }

    fn check_model(&self, asked: &Option<String>) -> Result<(), ApiError> {
        match asked {
            Some(m) if m != &self.model_name && !self.aliases.contains(m) => {
                Err(ApiError::model_not_found(m, &self.model_name))
            }
            _ => Ok(()),
        }
    }

    /// 429 when `n` more jobs would overfill the queue (a request is always taken when the queue is empty).
    fn check_queue(&self, n: usize) -> Result<(), ApiError> {
        let depth = self.metrics.queue_depth.get().max(0) as usize;
        if depth > 0 && depth + n > self.cfg.max_queue {
            return Err(ApiError::queue_full(depth));
        }
        Ok(())
    }
}

/// All routes, with the request counter, the API key check and the error envelopes for unknown routes.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/similarity", post(similarity))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        // The body limit is enforced when a handler reads the body ([`body`]), where it becomes a 413 envelope.
        .layer(axum::extract::DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .with_state(state)
}

/// Counts every response by route template and status, and times it (streams time themselves).
async fn observe(State(s): St, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let route = route.unwrap_or_else(|| "unmatched".into());
    let t0 = Instant::now();
    let _in_flight = GaugeGuard::new(&s.metrics.in_flight);
    let resp = next.run(req).await;
    s.metrics.requests.with_label_values(&[&route, resp.status().as_str()]).inc();
    let stream =
        resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !stream {
        s.metrics.request_duration.with_label_values(&[&route]).observe(t0.elapsed().as_secs_f64());
    }
    resp
}

async fn auth(State(s): St, req: Request, next: Next) -> Response {
    if let Some(key) = &s.cfg.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if given.and_then(|v| v.strip_prefix("Bearer ")) != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// The request body, or 413 past the limit.
async fn body(s: &AppState, req: Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), s.cfg.max_body_bytes).await.map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut too_large = false;
        while let Some(c) = cause {
            too_large |= c.is::<http_body_util::LengthLimitError>();
            cause = c.source();
        }
        if too_large {
            ApiError::body_too_large(s.cfg.max_body_bytes)
        } else {
            ApiError::malformed(format!("reading the body: {e}"))
        }
    })
}

async fn health(State(s): St) -> Response {
    let unavailable = |status: &str, reason: &str| {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": status, "reason": reason}))).into_response()
    };
    let ready = match s.ready() {
        Ok(r) => r,
        Err(e) => return unavailable("unavailable", &e.message),
    };
    let (tx, rx) = oneshot::channel();
    let sent = match &ready.engine {
        EngineTx::Embed(e) => e.send(EmbedMsg::Health(tx)).is_ok(),
        EngineTx::Generate(g) => g.send(GenMsg::Health(tx)).is_ok(),
    };
    if !sent {
        return unavailable("broken", "the engine has stopped");
    }
    match tokio::time::timeout(s.cfg.request_timeout, rx).await {
        Ok(Ok(Ok(()))) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Ok(Ok(Err(e))) => unavailable("broken", &e),
        Ok(Err(_)) => unavailable("broken", "the engine has stopped"),
        Err(_) => unavailable("busy", "the health check timed out"),
    }
}

async fn metrics(State(s): St) -> Response {
    match s.metrics.render() {
        Ok(text) => {
            ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], text)
                .into_response()
        }
        Err(e) => ApiError::internal(format!("rendering metrics: {e}")).into_response(),
    }
}

async fn models(State(s): St) -> Json<Value> {
    let (kind, ctx) = match s.ready.get() {
        Some(r) => (if matches!(r.engine, EngineTx::Embed(_)) { "encoder" } else { "decoder" }, Some(r.context)),
        None => ("loading", None),
    };
    Json(json!({"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": s.created, "owned_by": "whittle",
        "max_model_len": ctx, "kind": kind,
    }]}))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:08x}", rand::random::<u64>(), rand::random::<u32>())
}

/// Token ids of a text (special tokens as the model adds them) or given ids checked against the vocabulary.
fn tokens_of(r: &Ready, input: &Input, add_special: bool, param: &str) -> Result<Vec<u32>, ApiError> {
    match input {
        Input::Text(t) => {
            if r.loaded.model.is_decoder() {
                let ids = whittle_models::text::encode_prompt(&r.loaded, t, false)
                    .map_err(|e| ApiError::invalid(format!("tokenizing `{param}`: {e}"), param))?;
                // Without special tokens: the text alone, without the BOS the model adds.
                let skip = usize::from(!add_special && r.loaded.add_bos && r.loaded.bos_token_id.is_some());
                Ok(ids[skip.min(ids.len())..].to_vec())
            } else {
                let enc = r
                    .tokenizer
                    .encode(t.as_str(), add_special)
                    .map_err(|e| ApiError::invalid(format!("tokenizing `{param}`: {e}"), param))?;
                Ok(enc.get_ids().to_vec())
            }
        }
        Input::Ids(ids) => {
            let vocab = r.loaded.model.vocab_size() as u32;
            if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                return Err(ApiError::invalid(
                    format!("`{param}`: token id {bad} is outside the vocabulary of {vocab}"),
                    param,
                ));
            }
            Ok(ids.clone())
        }
    }
}

async fn embeddings(State(s): St, req: Request) -> Result<Response, ApiError> {
    let b = body(&s, req).await?;
    let r = s.ready()?;
    let EngineTx::Embed(engine) = &r.engine else { return Err(ApiError::wrong_kind("/v1/embeddings", r.kind())) };
    let q: api::EmbeddingsRequest = api::parse(&b)?;
    s.check_model(&q.model)?;
    let base64 = match q.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("encoding_format `{other}` is not one of float, base64"),
                "encoding_format",
            ))
        }
    };
    let dim = r.loaded.model.hidden_size();
    if let Some(d) = q.dimensions.filter(|&d| d != dim) {
        return Err(ApiError::invalid(format!("this model's embeddings have {dim} dimensions, not {d}"), "dimensions"));
    }
    let inputs = api::inputs(&q.input, "input")?;
    let (vectors, prompt_tokens) = embed_inputs(&s, &r, engine, &inputs, "input", |i| format!("input {i}")).await?;
    let mut data = Vec::with_capacity(vectors.len());
    for (index, v) in vectors.into_iter().enumerate() {
        let embedding = if base64 {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            EmbeddingData::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            EmbeddingData::Float(v)
        };
        data.push(EmbeddingOut { object: "embedding", index, embedding });
    }
    let usage = EmbeddingUsage { prompt_tokens, total_tokens: prompt_tokens };
    Ok(Json(EmbeddingsResponse { object: "list", data, model: &s.model_name, usage }).into_response())
}

/// Tokenizes `inputs` (each checked against the context), queues one job per input and waits for their
/// embeddings, in order; also returns the prompt tokens. `param` is the field errors name, `name(i)` the
/// input `i` in their messages.
async fn embed_inputs(
    s: &AppState,
    r: &Ready,
    engine: &std::sync::mpsc::Sender<EmbedMsg>,
    inputs: &[Input],
    param: &str,
    name: impl Fn(usize) -> String,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(format!("{} inputs; at most {MAX_INPUTS} per request", inputs.len()), param));
    }
    let mut rows = Vec::with_capacity(inputs.len());
    for (i, inp) in inputs.iter().enumerate() {
        let ids = tokens_of(r, inp, true, param)?;
        if ids.is_empty() {
            return Err(ApiError::invalid(format!("{} has no tokens", name(i)), param));
        }
        if ids.len() > r.context {
            return Err(ApiError::too_long(
                format!("{} has {} tokens, more than the model's maximum of {} tokens", name(i), ids.len(), r.context),
                param,
            ));
        }
        rows.push(ids);
    }
    s.check_queue(rows.len())?;
    let prompt_tokens: usize = rows.iter().map(|r| r.len()).sum();
    let now = Instant::now();
    let mut waits = Vec::with_capacity(rows.len());
    for ids in rows {
        let (tx, rx) = oneshot::channel();
        s.metrics.queue_depth.inc();
        if engine.send(EmbedMsg::Job(EmbedJob { ids, enqueued: now, reply: tx })).is_err() {
            s.metrics.queue_depth.dec();
            return Err(ApiError::unavailable("the engine has stopped"));
        }
        waits.push(rx);
    }
    s.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
    let all = futures_util::future::join_all(waits);
    let results = tokio::time::timeout(s.cfg.request_timeout, all)
        .await
        .map_err(|_| ApiError::timeout(s.cfg.request_timeout.as_secs_f64()))?;
    let vectors = results
        .into_iter()
        .map(|res| res.map_err(|_| ApiError::internal("the engine dropped the request"))?.map_err(ApiError::internal))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((vectors, prompt_tokens))
}

/// `POST /v1/similarity` (text-embeddings-inference's `/similarity`): the cosine similarity of
/// `inputs.source_sentence` to each of `inputs.sentences`, all embedded in one round.
async fn similarity(State(s): St, req: Request) -> Result<Response, ApiError> {
    let b = body(&s, req).await?;
    let r = s.ready()?;
    let EngineTx::Embed(engine) = &r.engine else { return Err(ApiError::wrong_kind("/v1/similarity", r.kind())) };
    let q: api::SimilarityRequest = api::parse(&b)?;
    s.check_model(&q.model)?;
    if q.inputs.sentences.is_empty() {
        return Err(ApiError::invalid("`inputs.sentences` is empty", "inputs.sentences"));
    }
    if q.inputs.sentences.len() >= MAX_INPUTS {
        return Err(ApiError::invalid(
            format!("{} sentences; at most {} per request", q.inputs.sentences.len(), MAX_INPUTS - 1),
            "inputs.sentences",
        ));
    }
    let texts: Vec<Input> =
        std::iter::once(&q.inputs.source_sentence).chain(&q.inputs.sentences).map(|t| Input::Text(t.clone())).collect();
    let name = |i: usize| match i {
        0 => "inputs.source_sentence".to_string(),
        i => format!("inputs.sentences[{}]", i - 1),
    };
    let (vectors, prompt_tokens) = embed_inputs(&s, &r, engine, &texts, "inputs", name).await?;
    let (source, others) = vectors.split_first().ok_or_else(|| ApiError::internal("no embeddings came back"))?;
    let data: Vec<Value> = others
        .iter()
        .enumerate()
        .map(|(index, v)| json!({"object": "similarity", "index": index, "similarity": cosine(source, v)}))
        .collect();
    let usage = EmbeddingUsage { prompt_tokens, total_tokens: prompt_tokens };
    Ok(Json(json!({"object": "list", "data": data, "model": s.model_name, "usage": usage})).into_response())
}

/// cos(a, b) in f64; 0 when either vector is zero.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Typed rather than a `serde_json::Value` so the floats print as f32 (shortest round-trip form: about half
/// the bytes of the f64 digits, and faster to write).
#[derive(serde::Serialize)]
struct EmbeddingsResponse<'a> {
    object: &'static str,
    data: Vec<EmbeddingOut>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(serde::Serialize)]
struct EmbeddingOut {
    object: &'static str,
    index: usize,
    embedding: EmbeddingData,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum EmbeddingData {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(serde::Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// A generation request, validated.
struct Gen {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: Sampling,
    stops: Vec<String>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
}

fn validate(r: &Ready, p: &api::GenParams, prompt: Vec<u32>, default_max: usize) -> Result<Gen, ApiError> {
    if let Some(n) = p.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid(format!("n = {n}: only n = 1 is supported"), "n"));
    }
    if let Some(b) = p.best_of.filter(|&b| b != 1) {
        return Err(ApiError::invalid(format!("best_of = {b}: only 1 is supported"), "best_of"));
    }
    if p.echo == Some(true) {
        return Err(ApiError::invalid("echo is not supported", "echo"));
    }
    if p.logprobs.as_ref().is_some_and(|v| !v.is_null() && v != &Value::Bool(false)) {
        return Err(ApiError::invalid("logprobs are not supported", "logprobs"));
    }
    for (name, v) in [("presence_penalty", p.presence_penalty), ("frequency_penalty", p.frequency_penalty)] {
        if v.is_some_and(|x| x != 0.0) {
            return Err(ApiError::invalid(format!("{name} is not supported (only 0)"), name));
        }
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(format!("temperature {temperature} is not in [0, 2]"), "temperature"));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(format!("top_p {top_p} is not in (0, 1]"), "top_p"));
    }
    let top_k = match p.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid(format!("top_k {k} must be positive (or -1 / 0 for all)"), "top_k")),
    };
    let stops: Vec<String> = match &p.stop {
        None => vec![],
        Some(api::Stop::One(s)) => vec![s.clone()],
        Some(api::Stop::Many(v)) => v.clone(),
    };
    if stops.len() > 4 || stops.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid("stop takes at most 4 non-empty strings", "stop"));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt has no tokens", "prompt"));
    }
    let ctx = r.context;
    if prompt.len() >= ctx {
        return Err(ApiError::too_long(
            format!("the prompt has {} tokens; the model's context is {ctx} tokens", prompt.len()),
            "prompt",
        ));
    }
    let room = ctx - prompt.len();
    let asked = p.max_completion_tokens.or(p.max_tokens);
    let max_tokens = match asked {
        Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1", "max_tokens")),
        Some(m) if m as usize > room => {
            return Err(ApiError::too_long(
                format!(
                    "the prompt has {} tokens and max_tokens is {m}: {} in all, more than the model's context of {ctx} tokens",
                    prompt.len(),
                    prompt.len() as u64 + m
                ),
                "max_tokens",
            ))
        }
        Some(m) => m as usize,
        None => default_max.min(room),
    };
    // Without a seed, sampling is seeded from the clock (greedy ignores it).
    let seed = match p.seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    Ok(Gen {
        prompt,
        max_tokens,
        sampling: Sampling { temperature, top_k, top_p, seed },
        stops,
        ignore_eos: p.ignore_eos.unwrap_or(false),
        stream: p.stream.unwrap_or(false),
        include_usage: p.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(true),
    })
}

async fn completions(State(s): St, req: Request) -> Result<Response, ApiError> {
    let b = body(&s, req).await?;
    let r = s.ready()?;
    if !matches!(r.engine, EngineTx::Generate(_)) {
        return Err(ApiError::wrong_kind("/v1/completions", r.kind()));
    }
    let (q, p): (api::CompletionRequest, _) = api::parse_gen(&b)?;
    s.check_model(&p.model)?;
    let mut inputs = api::inputs(&q.prompt, "prompt")?;
    if inputs.len() != 1 {
        return Err(ApiError::invalid(
            format!("{} prompts: one prompt per request is supported", inputs.len()),
            "prompt",
        ));
    }
    let prompt = tokens_of(&r, &inputs.remove(0), true, "prompt")?;
    // OpenAI's default for completions.
    let g = validate(&r, &p, prompt, 16)?;
    generate(s, r, g, false).await
}

async fn chat(State(s): St, req: Request) -> Result<Response, ApiError> {
    let b = body(&s, req).await?;
    let r = s.ready()?;
    if !matches!(r.engine, EngineTx::Generate(_)) {
        return Err(ApiError::wrong_kind("/v1/chat/completions", r.kind()));
    }
    let (q, p): (api::ChatRequest, _) = api::parse_gen(&b)?;
    s.check_model(&p.model)?;
    let text = render_chat(&r, &q.messages, true)?;
    let prompt = tokens_of(&r, &Input::Text(text), true, "messages")?;
    let g = validate(&r, &p, prompt, usize::MAX)?;
    generate(s, r, g, true).await
}

fn render_chat(r: &Ready, messages: &[api::ChatMessageIn], add_generation_prompt: bool) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages is empty", "messages"));
    }
    let msgs = messages
        .iter()
        .enumerate()
        .map(|(i, m)| Ok(ChatMessage { role: m.role.clone(), content: api::message_text(&m.content, i)? }))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let t = r.template.as_ref().ok_or_else(|| ApiError::invalid("this model has no chat template", "messages"))?;
    t.render(&msgs, add_generation_prompt).map_err(|e| ApiError::invalid(format!("{e:#}"), "messages"))
}

/// Queues a generation and answers it whole or as a stream of server-sent events.
async fn generate(s: Arc<AppState>, r: Arc<Ready>, g: Gen, chat: bool) -> Result<Response, ApiError> {
    let EngineTx::Generate(engine) = &r.engine else {
        return Err(ApiError::wrong_kind(if chat { "/v1/chat/completions" } else { "/v1/completions" }, r.kind()));
    };
    s.check_queue(1)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let arrived = Instant::now();
    let job = GenJob {
        prompt: g.prompt.clone(),
        max_tokens: g.max_tokens,
        sampling: g.sampling.clone(),
        eos: if g.ignore_eos { vec![] } else { r.loaded.eos_token_ids.clone() },
        arrived,
        deadline: arrived + s.cfg.request_timeout,
        events: tx,
    };
    s.metrics.queue_depth.inc();
    if engine.send(GenMsg::Job(job)).is_err() {
        s.metrics.queue_depth.dec();
        return Err(ApiError::unavailable("the engine has stopped"));
    }
    s.metrics.prompt_tokens.inc_by(g.prompt.len() as u64);
    let id = new_id(if chat { "chatcmpl" } else { "cmpl" });
    if g.stream {
        return Ok(stream(s, r, g, rx, id, chat, arrived));
    }
    let mut rx = rx;
    let mut d = Detok::new(&r.loaded, &g.stops);
    let deadline = tokio::time::Instant::from_std(arrived + s.cfg.request_timeout + Duration::from_secs(1));
    let finish = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) | Ok(Some(GenEvent::Timeout)) => return Err(ApiError::timeout(s.cfg.request_timeout.as_secs_f64())),
            Ok(None) => return Err(ApiError::internal("the engine dropped the request")),
            Ok(Some(GenEvent::Error(e))) => return Err(ApiError::internal(e)),
            Ok(Some(GenEvent::Done(f))) => break f,
            // A stop string: dropping `rx` (on return) frees the sequence.
            Ok(Some(GenEvent::Token(t))) if d.push(t).1 => break Finish::Stop,
            Ok(Some(GenEvent::Token(_))) => {}
        }
    };
    let text = d.text().to_string();
    let usage = usage(g.prompt.len(), d.tokens());
    let (object, choice) = if chat {
        (
            "chat.completion",
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish.as_str()}),
        )
    } else {
        ("text_completion", json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str()}))
    };
    Ok(Json(json!({"id": id, "object": object, "created": now_secs(), "model": s.model_name, "choices": [choice], "usage": usage}))
        .into_response())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Streams OpenAI chunks: (chat) a first chunk with the role, one chunk per piece of text, a chunk with the
/// finish reason, a usage chunk with no choices (unless `stream_options.include_usage` is false), `[DONE]`.
/// A client that leaves closes the channel, and the engine drops the sequence at its next step.
fn stream(
    s: Arc<AppState>,
    r: Arc<Ready>,
    g: Gen,
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
    id: String,
    chat: bool,
    arrived: Instant,
) -> Response {
    let (out, out_rx) = mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
    let in_flight = GaugeGuard::new(&s.metrics.in_flight);
    let created = now_secs();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let object = if chat { "chat.completion.chunk" } else { "text_completion" };
        let chunk = |delta: Option<&str>, finish: Option<&str>| -> Event {
            let choice = if chat {
                let d = match delta {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            };
            Event::default().data(
                json!({"id": id, "object": object, "created": created, "model": s.model_name, "choices": [choice]})
                    .to_string(),
            )
        };
        let send = |e: Event| {
            let out = out.clone();
            async move { out.send(Ok(e)).await.is_ok() }
        };
        if chat {
            let first = json!({"id": id, "object": object, "created": created, "model": s.model_name,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]});
            if !send(Event::default().data(first.to_string())).await {
                return;
            }
        }
        let mut d = Detok::new(&r.loaded, &g.stops);
        let deadline = tokio::time::Instant::from_std(arrived + s.cfg.request_timeout + Duration::from_secs(1));
        let finish = loop {
            let ev = tokio::select! {
                _ = out.closed() => return, // the client left: dropping `rx` frees the sequence
                ev = tokio::time::timeout_at(deadline, rx.recv()) => ev,
            };
            let failure = match ev {
                Ok(Some(GenEvent::Token(t))) => {
                    let (delta, stopped) = d.push(t);
                    if !delta.is_empty() && !send(chunk(Some(&delta), None)).await {
                        return;
                    }
                    if stopped {
                        break Finish::Stop;
                    }
                    continue;
                }
                Ok(Some(GenEvent::Done(f))) => {
                    let rest = d.flush();
                    if !rest.is_empty() && !send(chunk(Some(&rest), None)).await {
                        return;
                    }
                    break f;
                }
                Err(_) | Ok(Some(GenEvent::Timeout)) => ApiError::timeout(s.cfg.request_timeout.as_secs_f64()),
                Ok(Some(GenEvent::Error(e))) => ApiError::internal(e),
                Ok(None) => ApiError::internal("the engine dropped the request"),
            };
            // Headers are sent: a failure midway is an error event in the envelope, then the end.
            let _ = send(Event::default().data(failure.body().to_string())).await;
            let _ = send(Event::default().data("[DONE]")).await;
            return;
        };
        drop(rx);
        if !send(chunk(None, Some(finish.as_str()))).await {
            return;
        }
        if g.include_usage {
            let u = json!({"id": id, "object": object, "created": created, "model": s.model_name, "choices": [],
                "usage": usage(g.prompt.len(), d.tokens())});
            if !send(Event::default().data(u.to_string())).await {
                return;
            }
        }
        let _ = send(Event::default().data("[DONE]")).await;
        let route = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        s.metrics.request_duration.with_label_values(&[route]).observe(arrived.elapsed().as_secs_f64());
    });
    let events = tokio_stream::wrappers::ReceiverStream::new(out_rx);
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

async fn tokenize(State(s): St, req: Request) -> Result<Response, ApiError> {
    let b = body(&s, req).await?;
    let r = s.ready()?;
    let q: api::TokenizeRequest = api::parse(&b)?;
    s.check_model(&q.model)?;
    let add_special = q.add_special_tokens.unwrap_or(true);
    let text = match (&q.prompt, &q.messages) {
        (Some(p), None) => p.clone(),
        (None, Some(m)) => render_chat(&r, m, q.add_generation_prompt.unwrap_or(true))?,
        _ => return Err(ApiError::invalid("give exactly one of `prompt` or `messages`", "prompt")),
    };
    let ids = tokens_of(&r, &Input::Text(text.clone()), add_special, "prompt")?;
    let mut v = json!({"count": ids.len(), "max_model_len": r.context, "tokens": ids});
    if q.messages.is_some() {
        v["prompt"] = Value::String(text);
    }
    Ok(Json(v).into_response())
}

async fn detokenize(State(s): St, req: Request) -> Result<Response, ApiError> {
    let b = body(&s, req).await?;
    let r = s.ready()?;
    let q: api::DetokenizeRequest = api::parse(&b)?;
    s.check_model(&q.model)?;
    let vocab = r.loaded.model.vocab_size() as u32;
    if let Some(bad) = q.tokens.iter().find(|&&i| i >= vocab) {
        return Err(ApiError::invalid(format!("token id {bad} is outside the vocabulary of {vocab}"), "tokens"));
    }
    let text = whittle_models::text::decode(&r.loaded, &q.tokens)
        .map_err(|e| ApiError::invalid(format!("{e:#}"), "tokens"))?;
    Ok(Json(json!({"prompt": text})).into_response())
}

/// Addresses a server was asked to listen on, checked.
pub fn bind_addr(host: &str, port: u16) -> Result<SocketAddr, String> {
    let ip: std::net::IpAddr = host.parse().map_err(|_| format!("--host `{host}` is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}
