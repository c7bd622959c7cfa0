//! Outputs under races and kills (issue 22, "Two runs writing the same output race" and "Leftovers"): two
//! writers to one output, `kill -9` in the middle of a write, `--force` over an output of another kind.

#[path = "../../models/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn whittle() -> Command {
    Command::new(env!("CARGO_BIN_EXE_whittle"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn listing(d: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Two runs writing the same output at the same time: exactly one succeeds, the other is refused with a
/// clear message (busy, or exists once the first has finished), the output is the winner's and complete,
/// and nothing else is left. 20 tries.
#[test]
fn two_concurrent_writers_one_output() {
    let d = tempfile::tempdir().unwrap();
    let tiny = d.path().join("tiny");
    whittle_models::testing::tiny_llama(&tiny);
    let out = d.path().join("out");
    let (busy, exists) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    for i in 0..20 {
        let _ = std::fs::remove_dir_all(&out);
        let spawn = |scheme: &str| {
            whittle()
                .args(["quantize", tiny.to_str().unwrap(), "--scheme", scheme, "-o", out.to_str().unwrap(), "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let a = spawn("w8a8-dynamic");
        let b = spawn("w4a16");
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let won: Vec<&Output> = [&a, &b].into_iter().filter(|o| o.status.success()).collect();
        assert_eq!(won.len(), 1, "try {i}: {} succeeded\n{}\n{}", won.len(), stderr(&a), stderr(&b));
        let lost = if a.status.success() { &b } else { &a };
        let e = stderr(lost);
        // The pid is named once the holder has written it to the lock file (a refusal in between names none).
        if e.contains("another whittle process") && e.contains("is writing this output") {
            busy.set(busy.get() + 1);
        } else if e.contains("exists; set --force to replace it") {
            exists.set(exists.get() + 1);
        } else {
            panic!("try {i}: unclear refusal: {e}");
        }
        // The output is the winner's, whole: it loads, and its manifest names the winner's scheme.
        let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
        let scheme = if std::ptr::eq(won[0], &a) { "w8a8" } else { "w4a16" };
        assert!(cfg.contains(scheme), "try {i}: the output is not the winner's ({scheme})");
        whittle_models::load(out.to_str().unwrap(), &Default::default()).unwrap();
        assert_eq!(listing(d.path()), ["out", "tiny"], "try {i}: leftovers");
    }
    eprintln!(
        "20 of 20: one winner; the other refused as busy {} times, as existing {} times",
        busy.get(),
        exists.get()
    );
}

/// `kill -9` in the middle of a GGUF write leaves this process's temporary (the final name never exists
/// half-written); the next run to the same output removes it and succeeds.
#[test]
fn kill_during_gguf_write_leaves_nothing_after_the_next_run() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out.gguf");
    let args = |c: &mut Command| {
        c.args(["quantize", common::smollm2().to_str().unwrap(), "--scheme", "q8_0", "--allow-requantize", "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut cmd = whittle();
    args(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let tmp = d.path().join(format!(".out.gguf.tmp-{}", child.id()));
    let t0 = Instant::now();
    // Kill once the temporary holds some data.
    while std::fs::metadata(&tmp).map_or(true, |m| m.len() < 1 << 20) {
        assert!(t0.elapsed() < Duration::from_secs(120) && child.try_wait().unwrap().is_none(), "no temporary seen");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(tmp.exists() && !out.exists(), "{:?}", listing(d.path()));
    let mut cmd = whittle();
    args(&mut cmd);
    assert!(cmd.status().unwrap().success());
    assert_eq!(listing(d.path()), ["out.gguf"]);
    whittle_formats::gguf::Gguf::open(&out).unwrap();
}

/// `--force` replacing a file by a directory output left `.NAME.old-PID`.
#[test]
fn force_replacing_a_file_with_a_directory_leaves_no_old_copy() {
    let d = tempfile::tempdir().unwrap();
    let tiny = d.path().join("tiny");
    whittle_models::testing::tiny_llama(&tiny);
    let out = d.path().join("out");
    std::fs::write(&out, "a file").unwrap();
    let o = whittle()
        .args(["quantize", tiny.to_str().unwrap(), "--scheme", "w8a8-dynamic", "--force", "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("model.safetensors").exists());
    assert_eq!(listing(d.path()), ["out", "tiny"]);
    // And back: a directory replaced by a GGUF-named... directory output again, over itself.
    let o =
        whittle().args(["convert", tiny.to_str().unwrap(), "--force", "-o", out.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(listing(d.path()), ["out", "tiny"]);
}

/// `--wait` queues the second writer behind the first instead of refusing it; both then succeed in turn.
#[test]
fn wait_queues_the_second_writer() {
    let d = tempfile::tempdir().unwrap();
    let tiny = d.path().join("tiny");
    whittle_models::testing::tiny_llama(&tiny);
    let out = d.path().join("out");
    let spawn = || {
        whittle()
            .args(["convert", tiny.to_str().unwrap(), "--force", "--wait", "-o", out.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{}\n{}", stderr(&a), stderr(&b));
    assert_eq!(listing(d.path()), ["out", "tiny"]);
}
