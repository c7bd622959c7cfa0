//! `whittle optimize` end to end: a recipe that resumes, a search whose report has one mark per trial and
//! whose rerun replays its trials, and bad inputs that leave nothing behind.

#[path = "../../models/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

fn whittle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whittle")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = whittle(args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout)
}

/// The JSON a `--json` command prints on stdout.
fn ok_json(args: &[&str]) -> serde_json::Value {
    let o = whittle(args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn fails(args: &[&str], want: &[&str]) {
    let o = whittle(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    for w in want {
        assert!(err.contains(w), "{args:?}: `{w}` not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_recipe_runs_keeps_its_stages_and_resumes() {
    let minilm = common::minilm();
    let d = tempfile::tempdir().unwrap();
    let recipe = d.path().join("r.toml");
    std::fs::write(
        &recipe,
        "[[stage]]\nstage = \"quantize\"\nscheme = \"w8a8-dynamic\"\n\n[[stage]]\nstage = \"eval\"\n",
    )
    .unwrap();
    let out = d.path().join("out");
    let (m, r, o) = (minilm.to_str().unwrap(), recipe.to_str().unwrap(), out.to_str().unwrap());
    let first = ok(&["optimize", m, "--recipe", r, "-o", o]);
    assert!(first.contains("2 stages (0 kept"), "{first}");
    assert!(out.join("stages/01-quantize/stage.json").exists() && out.join("stages/02-eval/stage.json").exists());
    assert!(out.join("model/model.safetensors").exists() && out.join("report.html").exists());
    let again = ok(&["optimize", m, "--recipe", r, "-o", o]);
    assert!(again.contains("resuming") && again.contains("2 stages (2 kept"), "{again}");
    // A longer recipe is another run: refused without --force.
    std::fs::write(&recipe, "[[stage]]\nstage = \"quantize\"\nscheme = \"w8a8-static\"\n").unwrap();
    fails(&["optimize", m, "--recipe", r, "-o", o], &["other settings", "--force"]);
    let v = ok_json(&["optimize", m, "--recipe", r, "-o", o, "--force", "--json"]);
    assert_eq!(v["recipe"]["stages"].as_array().unwrap().len(), 1);
}

/// `<circle` elements of each chart (one per measured trial).
fn marks(html: &str) -> Vec<usize> {
    html.split("<svg").skip(1).map(|svg| svg.split("</svg>").next().unwrap().matches("<circle").count()).collect()
}

#[test]
fn a_search_reports_every_trial_and_its_rerun_replays_them() {
    let minilm = common::minilm();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("s");
    let (m, o) = (minilm.to_str().unwrap(), out.to_str().unwrap());
    let args = ["optimize", m, "--level", "light", "--objective", "latency", "--budget", "20m", "-o", o, "--json"];
    let v = ok_json(&[&args[..], &["--max-trials", "1"]].concat());
    let trials = v["search"]["trials"].as_array().unwrap().clone();
    assert_eq!(trials.len(), 1);
    let v2 = ok_json(&[&args[..], &["--max-trials", "2"]].concat());
    let trials2 = v2["search"]["trials"].as_array().unwrap();
    assert_eq!(trials2.len(), 2);
    assert_eq!(trials2[0], trials[0], "the rerun replays the first trial");
    let measured = trials2.iter().filter(|t| !t["figures"].is_null()).count();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(marks(&html), vec![measured; 3], "one mark per measured trial in each chart");
    assert!(!html.contains("<script"), "no JavaScript");
    let chosen = v2["search"]["chosen"].as_u64().unwrap() as usize;
    assert!(v2["search"]["met"].as_bool().unwrap() && trials2[chosen]["passed"].as_bool().unwrap());
    assert!(out.join("model/model.safetensors").exists());
}

#[test]
fn bad_optimize_input_is_refused_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let llama = d.path().join("llama");
    whittle_models::testing::tiny_llama(&llama);
    let m = llama.to_str().unwrap();
    let out = d.path().join("out");
    let o = out.to_str().unwrap();
    let recipe = d.path().join("r.toml");
    std::fs::write(&recipe, "[[stage]]\nstage = \"prune\"\nmethod = \"wanda\"\nsparsity = 0.3\n\n[[stage]]\nstage = \"quantize\"\nsheme = \"w4a16\"\n").unwrap();
    let r = recipe.to_str().unwrap();
    fails(&["optimize", m, "--recipe", r, "-o", o], &["r.toml:6", "sheme"]);
    fails(&["optimize", m, "--max-drop", "-1%", "-o", o], &["--max-drop", "-1%"]);
    fails(&["optimize", m, "--max-drop", "abc", "-o", o], &["--max-drop"]);
    fails(&["optimize", m, "--max-drop", "1%", "--metric", "sts", "-o", o], &["--metric", "llama"]);
    fails(&["optimize", m, "--level", "heavy", "-o", o], &["--level", "light, medium, full"]);
    fails(&["optimize", m, "--level", "light", "--budget", "5s", "-o", o], &["--budget", "too small"]);
    fails(&["optimize", m, "--level", "light", "--recipe", r, "-o", o], &["--recipe"]);
    fails(&["optimize", m, "-o", o], &["--recipe", "--level"]);
    assert!(!out.exists(), "nothing written");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("precious.txt"), b"x").unwrap();
    std::fs::write(&recipe, "[[stage]]\nstage = \"quantize\"\nscheme = \"w8a16\"\n").unwrap();
    fails(&["optimize", m, "--recipe", r, "-o", o], &["not an optimize run", "--force"]);
    assert!(out.join("precious.txt").exists());
    assert!(Path::new(m).join("model.safetensors").exists());
}
