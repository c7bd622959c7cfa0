//! Test support: where the real models are (fetched once through the project's script) and the
//! golden fixtures.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The model cache (`$WHITTLE_MODELS` or `~/.cache/whittle/models`), fetched by
/// `scripts/fetch-models.sh` on first use so that `cargo test` works on a fresh machine.
pub fn models_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("WHITTLE_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/whittle/models"));
        if !dir.join("all-MiniLM-L6-v2/model.safetensors").exists() || !dir.join(SMOLLM2).exists() {
            // Test binaries run in parallel: serialise the fetch with flock.
            std::fs::create_dir_all(&dir).unwrap();
            let script = repo_root().join("scripts/fetch-models.sh");
            let status = std::process::Command::new("flock")
                .arg(dir.join(".fetch.lock"))
                .arg(&script)
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

pub fn minilm() -> PathBuf {
    models_dir().join("all-MiniLM-L6-v2")
}

pub fn smollm2() -> PathBuf {
    models_dir().join(SMOLLM2)
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = repo_root().join("tests/fixtures").join(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}
