//! A stable-toolchain fuzzer for whittle's readers (issue 22, item 3): mutates inputs seeded from the real
//! models (SmolLM2's GGUF metadata and tokenizer, MiniLM-shaped safetensors and configs, the manifests of
//! quantized / sparse / factorised / shared models) and feeds them to the readers and, when they load, to a
//! forward pass. A panic, or an input that takes longer than [`SLOW`], is a finding: its bytes are saved
//! under `OUT/crashes/` (and the input being tried is always at `OUT/current-TARGET`, so a hard crash such
//! as an abort on a huge allocation leaves it too). Every finding becomes a regression test.
//!
//! usage: cargo run --release -p whittle-cli --example fuzz -- TARGET SECONDS [OUT] [SEED]
//! TARGET: gguf | tokenizer | safetensors | config | manifest. `scripts/fuzz.sh` runs each in turn.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};
use whittle_formats::gguf::{write, Gguf, Value};

/// An input slower than this is a finding (a hang, or work proportional to a lying field).
const SLOW: Duration = Duration::from_secs(10);

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
    let gseed = (target == "gguf").then(gguf_seed);
    let case_dir = work.join("case");
    let (mut runs, mut findings) = (0u64, 0u64);
    let t_end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < t_end {
        runs += 1;
        // Build the input (bytes written where the reader will find them).
        let (input_path, bytes): (PathBuf, Vec<u8>) = match target.as_str() {
            "gguf" => {
                let s = gseed.as_ref().unwrap();
                (work.join("case.gguf"), mutate_bytes(s, &gguf_hot(s), &mut rng))
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
            t => panic!("unknown target {t}: gguf, tokenizer, safetensors, config, manifest"),
        };
        std::fs::write(&input_path, &bytes).unwrap();
        std::fs::write(out.join(format!("current-{target}")), &bytes).unwrap();
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| match target.as_str() {
            "gguf" | "tokenizer" => check_gguf(&input_path),
            _ => exercise(&case_dir),
        }));
        let dt = t0.elapsed();
        let finding = match r {
            Err(_) => Some(format!("panic: {}", last_panic.lock().unwrap())),
            Ok(()) if dt > SLOW => Some(format!("slow: {dt:?}")),
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
    println!("{target}: {runs} inputs in {secs}s, {findings} findings");
    if findings > 0 {
        std::process::exit(1);
    }
}
