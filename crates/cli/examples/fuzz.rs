//! A stable-toolchain fuzzer for whittle's readers (issue 22, item 3): mutates inputs seeded from the real
//! models (SmolLM2's GGUF metadata and tokenizer, MiniLM-shaped safetensors and configs, the manifests of
//! quantized / sparse / factorised / shared models), the committed recipes (`examples/recipes/`) and the
//! server's request bodies, and feeds them to the readers and, when they load, to a forward pass (recipes:
//! to their stages on a tiny model; bodies: to a real `whittle serve` on loopback, in this process).
//!
//! Findings — each saved under `OUT/crashes/` (and the input being tried is always at `OUT/current-TARGET`,
//! so a hard crash such as an abort leaves it too); every finding becomes a regression test:
//! - a panic (for `http`: a 500, or a connection closed without an answer; and the server must stay up);
//! - an input that costs more than [`HANG_CPU`] of CPU time (the process's CPU time, so the figure holds on a
//!   busy machine where the fuzzer runs at idle priority), or more than [`SLOW_WALL`] of wall time;
//! - any single allocation over [`BIG_ALLOC`] (refused by the allocator below and reported).
//!
//! usage: cargo run --release -p whittle-cli --example fuzz -- TARGET SECONDS [OUT] [SEED]
//! TARGET: gguf | gguf-header | tokenizer | safetensors | safetensors-header | config | manifest | recipe | http
//! (the `-header` targets run the header parsers alone, fast enough for millions of inputs; `gguf` and
//! `safetensors` also load every tensor and run the model). `scripts/fuzz.sh` runs each in turn.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};
use whittle_formats::gguf::{write, Gguf, Value};

/// An input that costs more CPU time than this is a finding (a hang, or work proportional to a lying field).
const HANG_CPU: Duration = Duration::from_secs(1);
/// A wall-clock backstop (at idle priority the wall time also counts the time others held the CPU).
const SLOW_WALL: Duration = Duration::from_secs(60);
/// A single allocation larger than this is a finding (the bound: no allocation over 1 GB).
const BIG_ALLOC: usize = 1 << 30;

/// The system allocator, refusing (and recording) any single allocation over [`BIG_ALLOC`]: a reader that
/// handles the failure returns an error and the input is still reported; one that does not aborts, and
/// `scripts/fuzz.sh` keeps the input.
struct Bounded;
static BIGGEST_REFUSED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > BIG_ALLOC {
            BIGGEST_REFUSED.fetch_max(l.size(), Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > BIG_ALLOC {
            BIGGEST_REFUSED.fetch_max(l.size(), Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > BIG_ALLOC {
            BIGGEST_REFUSED.fetch_max(new, Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Bounded = Bounded;

/// The CPU time of the whole process (every thread: the in-process server's too).
fn cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn models_dir() -> PathBuf {
    std::env::var_os("WHITTLE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/whittle/models"))
}

/// Values that break length and index arithmetic.
const INTERESTING: &[u64] =
    &[0, 1, 2, 7, 31, 32, 33, 255, 256, 65535, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 62, u64::MAX];

/// Byte-level mutation of `seed`, concentrated in `hot` (the structural part: headers, tensor directories).
fn mutate_bytes(seed: &[u8], hot: &[(usize, usize)], rng: &mut StdRng) -> Vec<u8> {
    let mut b = seed.to_vec();
    let pos = |rng: &mut StdRng, len: usize| -> usize {
        let (start, end) = hot[rng.random_range(0..hot.len())];
        if rng.random_bool(0.8) && end > start && end <= len {
            rng.random_range(start..end)
        } else {
            rng.random_range(0..len.max(1))
        }
    };
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            break;
        }
        let p = pos(rng, b.len());
        match rng.random_range(0..6) {
            0 => b[p] ^= 1 << rng.random_range(0..8),
            1 => b[p] = rng.random(),
            2 => {
                // A length or offset field: an interesting little-endian u64 (or u32).
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let w = if rng.random_bool(0.5) { 8 } else { 4 };
                let bytes = v.to_le_bytes();
                let end = (p + w).min(b.len());
                b[p..end].copy_from_slice(&bytes[..end - p]);
            }
            3 => b.truncate(p),
            4 => {
                let n = rng.random_range(1..64).min(b.len() - p);
                b.drain(p..p + n);
            }
            _ => {
                let from = pos(rng, b.len());
                let n = rng.random_range(1..64).min(b.len() - from);
                let chunk = b[from..from + n].to_vec();
                b.splice(p..p, chunk);
            }
        }
    }
    b
}

/// A JSON value that configs and manifests do not expect.
fn odd_json(rng: &mut StdRng) -> Json {
    let pool = [
        json!(0),
        json!(-1),
        json!(1),
        json!(3),
        json!(1e308),
        json!(1u64 << 40),
        json!(u64::MAX),
        json!(0.5),
        json!("x"),
        json!(""),
        json!(null),
        json!(true),
        json!([]),
        json!([1, 2]),
        json!({}),
        json!({"a": 1}),
    ];
    pool[rng.random_range(0..pool.len())].clone()
}

/// JSON-aware mutation: replace, delete or add members anywhere in the tree (under `focus` if given).
fn mutate_json(v: &mut Json, rng: &mut StdRng, depth: usize) {
    match v {
        Json::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[rng.random_range(0..keys.len())];
            match rng.random_range(0..5) {
                0 => {
                    m.remove(k);
                }
                1 => {
                    m.insert(format!("{k}_x"), odd_json(rng));
                }
                2 | 3 if depth < 6 => mutate_json(m.get_mut(k).unwrap(), rng, depth + 1),
                _ => {
                    m.insert(k.clone(), odd_json(rng));
                }
            }
        }
        Json::Array(a) if !a.is_empty() => {
            let i = rng.random_range(0..a.len());
            match rng.random_range(0..4) {
                0 => {
                    a.remove(i);
                }
                1 if depth < 6 => mutate_json(&mut a[i], rng, depth + 1),
                _ => a[i] = odd_json(rng),
            }
        }
        other => *other = odd_json(rng),
    }
}

/// Runs a loaded model on a few tokens (the readers' results must also be safe to run).
fn exercise(dir: &Path) {
    let Ok(l) = whittle_models::load(dir.to_str().unwrap(), &Default::default()) else { return };
    match &l.model {
        whittle_models::Model::Llama(m) => {
            let _ = whittle_models::generate::generate(m, &[1, 2, 3], 2, &[], &Default::default(), |_| {});
        }
        whittle_models::Model::Bert(_) => {
            let _ = whittle_models::text::embed_texts(&l, &["w1 w3 w2"], 16, 1);
        }
    }
    let _ = whittle_models::stats::report(&l, 16);
}

fn gguf_seed() -> Vec<u8> {
    // SmolLM2's own metadata (architecture, tokenizer: 49152 tokens, merges, types) over small tensors.
    let g =
        Gguf::open(models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")).expect("SmolLM2 (scripts/fetch-models.sh)");
    let meta: Vec<(&str, Value)> = g.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let q8 = |rows: usize| {
        let mut blk = half::f16::from_f32(0.25).to_le_bytes().to_vec();
        blk.extend((0..32).map(|i| i as u8));
        blk.repeat(rows)
    };
    let f32s = |n: usize| (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect::<Vec<u8>>();
    write::to_bytes(
        &meta,
        &[
            ("token_embd.weight", vec![32, 4], 8, q8(4)),
            ("blk.0.attn_norm.weight", vec![32], 0, f32s(32)),
            ("output_norm.weight", vec![32], 0, f32s(32)),
        ],
    )
}

/// Where a GGUF's structure lies: the header and first metadata (up to the tokenizer arrays), and the
/// tensor directory at the end of the header.
fn gguf_hot(b: &[u8]) -> Vec<(usize, usize)> {
    let tail = b.len().saturating_sub(4096);
    vec![(0, 4096.min(b.len())), (tail, b.len())]
}

fn check_gguf(path: &Path) {
    let Ok(g) = Gguf::open(path) else { return };
    for t in g.tensors.clone() {
        let _ = whittle_formats::TensorSource::load_f32(&g, &t.name);
    }
    let _ = whittle_models::llama::LlamaConfig::from_gguf(&g);
    if let Ok(j) = whittle_formats::tokenizer::gguf_tokenizer_json(&g) {
        if let Ok(t) = whittle_formats::tokenizer::tokenizer_from_json(&j, path) {
            let _ = t.encode("Hello world, the café.", true);
        }
    }
}

/// The tokenizer target: structure-aware mutations of SmolLM2's `tokenizer.ggml.*` metadata.
fn tokenizer_input(g: &Gguf, rng: &mut StdRng) -> Vec<u8> {
    let mut meta: Vec<(String, Value)> = g.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let toks: Vec<usize> =
        meta.iter().enumerate().filter(|(_, (k, _))| k.starts_with("tokenizer.ggml.")).map(|(i, _)| i).collect();
    for _ in 0..rng.random_range(1..=3) {
        let i = toks[rng.random_range(0..toks.len())];
        let v = &mut meta[i].1;
        match (rng.random_range(0..6), v) {
            (0, Value::Array(a)) if !a.is_empty() => {
                let n = rng.random_range(0..a.len());
                a.truncate(n);
            }
            (1, Value::Array(a)) if !a.is_empty() => {
                let j = rng.random_range(0..a.len());
                a[j] = match &a[j] {
                    Value::String(_) => {
                        Value::String(["", " ", "a b c", "Ġ", "\u{0}", "<0xZZ>"][rng.random_range(0..6)].into())
                    }
                    Value::I32(_) => Value::I32([-1, 0, 3, 6, 99, i32::MAX][rng.random_range(0..6)]),
                    _ => Value::U64(INTERESTING[rng.random_range(0..INTERESTING.len())]),
                };
            }
            (2, v) => *v = Value::U64(INTERESTING[rng.random_range(0..INTERESTING.len())]),
            (3, v) => *v = Value::String("gpt2".into()),
            (4, v) => *v = Value::Array(vec![]),
            (_, v) => *v = Value::Bool(rng.random()),
        }
    }
    if rng.random_bool(0.1) {
        let i = toks[rng.random_range(0..toks.len())];
        meta.remove(i);
    }
    let refs: Vec<(&str, Value)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write::to_bytes(&refs, &[("output_norm.weight", vec![32], 0, vec![0; 128])])
}

fn tiny_dirs(work: &Path) -> Vec<PathBuf> {
    let (l, b) = (work.join("seed-llama"), work.join("seed-bert"));
    whittle_models::testing::tiny_llama(&l);
    whittle_models::testing::tiny_bert(&b);
    vec![l, b]
}

/// Seeds for the manifest target: tiny models saved quantized, pruned sparse, factorised and shared, whose
/// config.json carry `quantization_config`, `sparsity_config` and `whittle_shared_blocks`.
fn manifest_dirs(work: &Path) -> Vec<PathBuf> {
    use whittle_pipeline::stages::{LowrankConfig, PruneConfig, QuantizeConfig, ShareConfig};
    use whittle_pipeline::{Ctx, Stage};
    let src = work.join("seed-bert32");
    whittle_models::testing::tiny_bert_layers(&src, 32, 64, 2);
    let stages: Vec<(&str, Box<dyn Stage>)> = vec![
        ("w8a8", Box::new(QuantizeConfig { scheme: "w8a8-dynamic".into(), ..Default::default() })),
        ("w4a16", Box::new(QuantizeConfig { scheme: "w4a16".into(), group_size: 32, ..Default::default() })),
        (
            "sparse",
            Box::new(PruneConfig {
                method: Some("magnitude".into()),
                sparsity: Some(0.5),
                pattern: "2:4".into(),
                ..Default::default()
            }),
        ),
        ("lowrank", Box::new(LowrankConfig { method: "svd".into(), rank: Some(4), ..Default::default() })),
        ("shared", Box::new(ShareConfig { groups: "0-1".into(), ..Default::default() })),
    ];
    let mut dirs = Vec::new();
    for (name, s) in stages {
        let mut l = whittle_models::load(src.to_str().unwrap(), &Default::default()).unwrap();
        if s.apply(&mut l, &mut Ctx::quiet()).is_ok() {
            let d = work.join(format!("seed-{name}"));
            whittle_pipeline::output::save(&l, &d, None).unwrap();
            dirs.push(d);
        }
    }
    dirs
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The header-parser target's GGUF seed: SmolLM2's metadata with its tokenizer arrays cut to 64 entries, so
/// that one input parses in microseconds and a run reaches millions of them.
fn gguf_header_seed() -> Vec<u8> {
    let g =
        Gguf::open(models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")).expect("SmolLM2 (scripts/fetch-models.sh)");
    let meta: Vec<(&str, Value)> = g
        .metadata
        .iter()
        .map(|(k, v)| match v {
            Value::Array(a) => (k.as_str(), Value::Array(a.iter().take(64).cloned().collect())),
            v => (k.as_str(), v.clone()),
        })
        .collect();
    let f32s = |n: usize| (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect::<Vec<u8>>();
    write::to_bytes(
        &meta,
        &[
            ("token_embd.weight", vec![32, 4], 0, f32s(128)),
            ("blk.0.attn_norm.weight", vec![32], 0, f32s(32)),
            ("output_norm.weight", vec![32], 0, f32s(32)),
        ],
    )
}

/// The GGUF header parser alone: the header, metadata and tensor directory, each tensor's byte range, and
/// the model configuration read from the metadata.
fn check_gguf_header(path: &Path) {
    let Ok(g) = Gguf::open(path) else { return };
    for t in &g.tensors {
        let _ = g.raw(t).len();
    }
    let _ = whittle_models::llama::LlamaConfig::from_gguf(&g);
}

/// The safetensors header parser alone (and each tensor's load): names from the seed's own header.
fn check_safetensors_header(dir: &Path, names: &[String]) {
    let Ok(hf) = whittle_formats::hf::HfDir::open(dir) else { return };
    for n in names {
        let _ = hf.load(n);
    }
}

/// The tensor names of a safetensors file's header.
fn safetensors_names(bytes: &[u8]) -> Vec<String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: Json = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    h.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect()
}

/// The committed recipes (`examples/recipes/*.toml`), the recipe target's seeds.
fn recipe_seeds() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/recipes");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    v.sort();
    v
}

/// A recipe mutated as TOML (values replaced, keys added or removed, stages dropped or repeated) most of
/// the time, as bytes otherwise.
fn recipe_input(seeds: &[String], rng: &mut StdRng) -> Vec<u8> {
    let text = &seeds[rng.random_range(0..seeds.len())];
    if rng.random_bool(0.75) {
        let table: toml::Table = toml::from_str(text).unwrap();
        let mut v = serde_json::to_value(&table).unwrap();
        for _ in 0..rng.random_range(1..=3) {
            if let Some(stages) = v.get_mut("stage").and_then(|s| s.as_array_mut()) {
                if !stages.is_empty() && rng.random_bool(0.2) {
                    let i = rng.random_range(0..stages.len());
                    let st = stages[i].clone();
                    match rng.random_range(0..3) {
                        0 => {
                            stages.remove(i);
                        }
                        1 => {
                            let at = rng.random_range(0..=stages.len());
                            stages.insert(at, st)
                        }
                        _ => {
                            let j = rng.random_range(0..stages.len());
                            stages.swap(i, j)
                        }
                    }
                    continue;
                }
            }
            mutate_json(&mut v, rng, 0);
        }
        // Values TOML cannot hold (null) fall back to the unmutated text with a byte mutation.
        if let Ok(t) = toml::Value::try_from(&v).and_then(|t| toml::to_string(&t).map_err(serde::ser::Error::custom)) {
            return t.into_bytes();
        }
    }
    let b = text.as_bytes();
    mutate_bytes(b, &[(0, b.len())], rng)
}

/// Parses and checks a recipe, then applies its model-changing stages (no training) to a tiny model.
fn exercise_recipe(text: &[u8], tiny: &[PathBuf]) {
    use whittle_pipeline::optimize::recipe::{Recipe, Step};
    use whittle_pipeline::stages::AnyStage;
    use whittle_pipeline::{Ctx, Stage};
    let text = String::from_utf8_lossy(text);
    let Ok(r) = Recipe::parse(&text, "fuzz.toml") else { return };
    let _ = r.key();
    // A stage asked to calibrate on many windows legitimately runs through the whole calibration text (its
    // cost is the data's, bounded by `MAX_CALIB_SAMPLES`, not the input's): parsed and checked, not applied.
    fn many_windows(v: &Json) -> bool {
        match v {
            Json::Object(m) => {
                m.iter().any(|(k, v)| (k == "calib_samples" && v.as_u64().is_some_and(|n| n > 64)) || many_windows(v))
            }
            Json::Array(a) => a.iter().any(many_windows),
            _ => false,
        }
    }
    if r.steps.iter().any(|(_, s)| many_windows(&s.config_json())) {
        return;
    }
    for dir in tiny {
        if r.check_model(dir).is_err() {
            continue;
        }
        let Ok(mut l) = whittle_models::load(dir.to_str().unwrap(), &Default::default()) else { continue };
        for (_, step) in &r.steps {
            let _ = step.config_json();
            match step {
                Step::Stage(AnyStage::Distill(_) | AnyStage::Finetune(_)) => {}
                Step::Stage(s) if s.apply(&mut l, &mut Ctx::quiet()).is_err() => break,
                _ => {}
            }
        }
    }
}

/// The http target: a real server per model family in this process, on loopback.
struct Servers {
    bert: whittle_serve::Server,
    llama: whittle_serve::Server,
}

fn start_servers(work: &Path) -> Servers {
    let start = |dir: &Path| {
        let l = whittle_models::load(dir.to_str().unwrap(), &Default::default()).unwrap();
        let cfg = whittle_serve::ServeConfig {
            host: "127.0.0.1".into(),
            port: 0,
            max_body_bytes: 1 << 16,
            request_timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let s = whittle_serve::Server::start(
            whittle_serve::ModelSource::Loaded { name: "tiny".into(), model: Box::new(l) },
            cfg,
        )
        .unwrap();
        s.wait_ready(Duration::from_secs(60)).unwrap();
        s
    };
    let dirs = tiny_dirs(work);
    Servers { llama: start(&dirs[0]), bert: start(&dirs[1]) }
}

/// Valid bodies for every POST route, the http target's seeds: (llama server?, path, body).
fn http_seeds() -> Vec<(bool, &'static str, Json)> {
    vec![
        (false, "/v1/embeddings", json!({"input": ["w1 w3 w2", "w2"], "model": "tiny", "encoding_format": "float"})),
        (false, "/v1/embeddings", json!({"input": [[1, 2, 3], [4]], "dimensions": 8})),
        (false, "/v1/similarity", json!({"inputs": {"source_sentence": "w1 w2", "sentences": ["w2", "w3 w1"]}})),
        (false, "/tokenize", json!({"prompt": "w1 w2", "add_special_tokens": true})),
        (true, "/v1/completions", json!({"prompt": "w1 w2", "max_tokens": 4, "temperature": 0.0, "stop": ["w3"]})),
        (
            true,
            "/v1/completions",
            json!({"prompt": [1, 2, 3], "max_tokens": 3, "n": 2, "seed": 1, "top_p": 0.9,
            "top_k": 5, "logprobs": 2, "echo": true, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            true,
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "w1"},
            {"role": "user", "content": [{"type": "text", "text": "w2 w3"}]}], "max_completion_tokens": 4,
            "frequency_penalty": 0.5, "presence_penalty": 0.1, "stream": false}),
        ),
        (true, "/tokenize", json!({"messages": [{"role": "user", "content": "w1"}], "add_generation_prompt": true})),
        (true, "/detokenize", json!({"tokens": [1, 2, 3]})),
    ]
}

/// One HTTP/1.1 exchange on a fresh connection: the status, or `None` when the connection closed without
/// an answer.
fn http_post(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> Option<u16> {
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(SLOW_WALL)).ok()?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).ok()?;
    c.write_all(body).ok()?;
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let line = out.split(|&b| b == b'\r').next()?;
    std::str::from_utf8(line).ok()?.split(' ').nth(1)?.parse().ok()
}

/// A request body: a seed mutated as JSON most of the time, as bytes otherwise; with its server and path.
fn http_input(seeds: &[(bool, &'static str, Json)], rng: &mut StdRng) -> (bool, &'static str, Vec<u8>) {
    let (llama, path, seed) = &seeds[rng.random_range(0..seeds.len())];
    let mut v = seed.clone();
    if rng.random_bool(0.8) {
        for _ in 0..rng.random_range(1..=3) {
            mutate_json(&mut v, rng, 0);
        }
        (*llama, path, v.to_string().into_bytes())
    } else {
        let b = v.to_string().into_bytes();
        (*llama, path, mutate_bytes(&b, &[(0, b.len())], rng))
    }
}

/// Sends one body; a 500 or an unanswered request is a panic-class finding, and both servers must still
/// answer `/health` afterwards.
fn exercise_http(s: &Servers, llama: bool, path: &str, body: &[u8]) {
    let addr = if llama { s.llama.addr() } else { s.bert.addr() };
    match http_post(addr, path, body) {
        None => panic!("{path}: the connection closed without an answer"),
        Some(500) => panic!("{path}: 500 Internal Server Error"),
        Some(_) => {}
    }
    for a in [s.llama.addr(), s.bert.addr()] {
        let mut c = std::net::TcpStream::connect(a).expect("the server stopped accepting connections");
        c.set_read_timeout(Some(SLOW_WALL)).unwrap();
        c.write_all(format!("GET /health HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 200"), "/health after {path}: {}", out.lines().next().unwrap_or(""));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target = args.get(1).expect("usage: fuzz TARGET SECONDS [OUT] [SEED]").clone();
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(60);
    let out = PathBuf::from(args.get(3).cloned().unwrap_or_else(|| "fuzz".into()));
    let seed: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(0);
    let work = std::env::temp_dir().join(format!("whittle-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(out.join("crashes")).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    // Panics are findings, reported below with their input; keep the default hook quiet.
    let last_panic = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let lp = last_panic.clone();
    std::panic::set_hook(Box::new(move |info| *lp.lock().unwrap() = info.to_string()));

    let smol =
        (target == "tokenizer").then(|| Gguf::open(models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap());
    let dirs: Vec<PathBuf> = match target.as_str() {
        "safetensors" | "config" => tiny_dirs(&work),
        "manifest" => manifest_dirs(&work),
        _ => vec![],
    };
    let gseed = match target.as_str() {
        "gguf" => Some(gguf_seed()),
        "gguf-header" => Some(gguf_header_seed()),
        _ => None,
    };
    // safetensors-header: the tiny models' weights files, each under its own config (written once).
    let st_seeds: Vec<(PathBuf, Vec<u8>, Vec<String>)> = if target == "safetensors-header" {
        tiny_dirs(&work)
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let case = work.join(format!("st-case-{i}"));
                std::fs::create_dir_all(&case).unwrap();
                std::fs::copy(d.join("config.json"), case.join("config.json")).unwrap();
                let b = std::fs::read(d.join("model.safetensors")).unwrap();
                let names = safetensors_names(&b);
                (case, b, names)
            })
            .collect()
    } else {
        vec![]
    };
    let mut st_pick = 0usize;
    let recipes = if target == "recipe" { recipe_seeds() } else { vec![] };
    let recipe_models = if target == "recipe" { tiny_dirs(&work) } else { vec![] };
    let servers = (target == "http").then(|| start_servers(&work));
    let bodies = http_seeds();
    let mut route: (bool, &str) = (false, "");
    let case_dir = work.join("case");
    let (mut runs, mut findings, mut max_cpu) = (0u64, 0u64, Duration::ZERO);
    let t_end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < t_end {
        runs += 1;
        // Build the input (bytes written where the reader will find them).
        let (input_path, bytes): (PathBuf, Vec<u8>) = match target.as_str() {
            "gguf" | "gguf-header" => {
                let s = gseed.as_ref().unwrap();
                (work.join("case.gguf"), mutate_bytes(s, &gguf_hot(s), &mut rng))
            }
            "safetensors-header" => {
                st_pick = rng.random_range(0..st_seeds.len());
                let (case, s, _) = &st_seeds[st_pick];
                let n = u64::from_le_bytes(s[..8].try_into().unwrap()) as usize;
                (case.join("model.safetensors"), mutate_bytes(s, &[(0, 8 + n)], &mut rng))
            }
            "tokenizer" => (work.join("case.gguf"), tokenizer_input(smol.as_ref().unwrap(), &mut rng)),
            "safetensors" => {
                let src = &dirs[rng.random_range(0..dirs.len())];
                copy_dir(src, &case_dir);
                let s = std::fs::read(src.join("model.safetensors")).unwrap();
                let n = u64::from_le_bytes(s[..8].try_into().unwrap()) as usize;
                (case_dir.join("model.safetensors"), mutate_bytes(&s, &[(0, 8 + n)], &mut rng))
            }
            "config" | "manifest" => {
                let src = &dirs[rng.random_range(0..dirs.len())];
                copy_dir(src, &case_dir);
                let text = std::fs::read_to_string(src.join("config.json")).unwrap();
                let bytes = if rng.random_bool(0.8) {
                    let mut v: Json = serde_json::from_str(&text).unwrap();
                    // Manifests: mutate inside the whittle sections most of the time.
                    let focus = ["quantization_config", "sparsity_config", "whittle_shared_blocks"];
                    let key = focus.iter().find(|k| v.get(**k).is_some() && rng.random_bool(0.8));
                    match key {
                        Some(k) if target == "manifest" => mutate_json(v.get_mut(*k).unwrap(), &mut rng, 0),
                        _ => mutate_json(&mut v, &mut rng, 0),
                    }
                    v.to_string().into_bytes()
                } else {
                    let b = text.as_bytes();
                    mutate_bytes(b, &[(0, b.len())], &mut rng)
                };
                (case_dir.join("config.json"), bytes)
            }
            "recipe" => (work.join("case.toml"), recipe_input(&recipes, &mut rng)),
            "http" => {
                let (llama, path, b) = http_input(&bodies, &mut rng);
                route = (llama, path);
                (work.join("case.json"), b)
            }
            t => panic!(
                "unknown target {t}: gguf, gguf-header, tokenizer, safetensors, safetensors-header, config, manifest, \
                 recipe, http"
            ),
        };
        std::fs::write(&input_path, &bytes).unwrap();
        std::fs::write(out.join(format!("current-{target}")), &bytes).unwrap();
        BIGGEST_REFUSED.store(0, Ordering::Relaxed);
        let (t0, c0) = (Instant::now(), cpu_time());
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| match target.as_str() {
            "gguf" | "tokenizer" => check_gguf(&input_path),
            "gguf-header" => check_gguf_header(&input_path),
            "safetensors-header" => check_safetensors_header(&st_seeds[st_pick].0, &st_seeds[st_pick].2),
            "recipe" => exercise_recipe(&bytes, &recipe_models),
            "http" => exercise_http(servers.as_ref().unwrap(), route.0, route.1, &bytes),
            _ => exercise(&case_dir),
        }));
        let (dt, cpu) = (t0.elapsed(), cpu_time().saturating_sub(c0));
        max_cpu = max_cpu.max(cpu);
        let big = BIGGEST_REFUSED.load(Ordering::Relaxed);
        let finding = match r {
            Err(_) => Some(format!("panic: {}", last_panic.lock().unwrap())),
            Ok(()) if big > 0 => Some(format!("an allocation of {big} bytes (over {BIG_ALLOC})")),
            Ok(()) if cpu > HANG_CPU => Some(format!("hang: {cpu:?} of CPU time ({dt:?} wall)")),
            Ok(()) if dt > SLOW_WALL => Some(format!("slow: {dt:?} wall ({cpu:?} of CPU time)")),
            Ok(()) => None,
        };
        if let Some(what) = finding {
            findings += 1;
            let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
            let name = format!("{target}-{h:016x}");
            std::fs::write(out.join("crashes").join(&name), &bytes).unwrap();
            println!("FINDING {name}: {what}");
        }
    }
    let _ = std::fs::remove_file(out.join(format!("current-{target}")));
    let _ = std::fs::remove_dir_all(&work);
    if let Some(s) = servers {
        let _ = s.llama.shutdown();
        let _ = s.bert.shutdown();
    }
    println!("{target}: {runs} inputs in {secs}s, {findings} findings, slowest input {max_cpu:?} of CPU time");
    if findings > 0 {
        std::process::exit(1);
    }
}
