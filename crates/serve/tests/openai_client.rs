//! The official OpenAI Python client (from PyPI) against whittle serve, changed only by `base_url`: embeddings,
//! a completion and a streamed chat completion; then /metrics through prometheus_client's parser.
//! The venv comes from `scripts/test-deps.sh` (`$WHITTLE_TEST_VENV`, default `~/.cache/whittle-test-venv`).

mod common;

use std::path::PathBuf;

use common::*;
use whittle_models::testing;
use whittle_serve::ServeConfig;

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("WHITTLE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/whittle-test-venv"));
    let py = venv.join("bin/python");
    if !py.exists() {
        // As the model fetch does: set the venv up on first use (pip reaches PyPI), serialised by flock.
        let status = std::process::Command::new("flock")
            .arg(std::env::temp_dir().join("whittle-test-venv.lock"))
            .arg(repo_root().join("scripts/test-deps.sh"))
            .env("WHITTLE_TEST_VENV", &venv)
            .status()
            .expect("running scripts/test-deps.sh");
        assert!(status.success(), "scripts/test-deps.sh failed");
    }
    assert!(py.exists(), "{} is missing after scripts/test-deps.sh", py.display());
    py
}

#[test]
fn the_official_openai_client_works_unchanged() {
    let py = venv_python();
    let (e, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    testing::tiny_bert(e.path());
    testing::tiny_llama(d.path());
    let enc = start(e.path(), ServeConfig::default());
    let dec = start(d.path(), ServeConfig::default());
    let out = std::process::Command::new(py)
        .arg(repo_root().join("crates/serve/tests/py/openai_client.py"))
        .arg(format!("http://{}", enc.addr()))
        .arg(format!("http://{}", dec.addr()))
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "stdout:\n{so}\nstderr:\n{se}");
    assert_eq!(so.trim(), "ok");
}
