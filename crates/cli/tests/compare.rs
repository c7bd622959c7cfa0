//! `whittle compare` measures speed with its models' repetitions taking turns (A, B, A, B, …), reports their
//! spread, and warns when other processes took CPU meanwhile (issue 22, item 6).

use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn whittle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whittle")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Two tiny encoders of different widths (so their speeds differ), as HF directories.
fn two_encoders(dir: &std::path::Path) -> (String, String) {
    let (a, b) = (dir.join("a"), dir.join("b"));
    whittle_models::testing::tiny_bert(&a);
    whittle_models::testing::tiny_bert_sized(&b, 32, 64);
    (a.to_str().unwrap().to_string(), b.to_str().unwrap().to_string())
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn compare_interleaves_repetitions_and_reports_their_spread() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_encoders(dir.path());
    let json = dir.path().join("rows.json");
    let reps = 4;
    let o = whittle(&["compare", &a, &b, "--reps", &reps.to_string(), "-o", json.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.len(), 2);
    let (sa, sb) = (floats(&rows[0]["rep_starts_s"]), floats(&rows[1]["rep_starts_s"]));
    assert_eq!((sa.len(), sb.len()), (reps, reps));
    // A0 < B0 < A1 < B1 < …: each of B's repetitions starts between A's and A's next.
    for r in 0..reps {
        assert!(sa[r] < sb[r], "repetition {r}: A at {:.3} s, B at {:.3} s: {sa:?} {sb:?}", sa[r], sb[r]);
        if r + 1 < reps {
            assert!(sb[r] < sa[r + 1], "B's repetition {r} ran after A's next: {sa:?} {sb:?}");
        }
    }
    // The median and the spread come from the repetitions.
    for row in &rows {
        let rates = floats(&row["sent_per_s_reps"]);
        assert_eq!(rates.len(), reps);
        let (lo, hi) = (rates.iter().cloned().fold(f64::INFINITY, f64::min), rates.iter().cloned().fold(0.0, f64::max));
        assert_eq!(floats(&row["sent_per_s_range"]), vec![lo, hi]);
        let p50 = row["sent_per_s"].as_f64().unwrap();
        assert!(lo <= p50 && p50 <= hi);
        assert!(row["other_cpu"].as_f64().is_some_and(|c| c >= 0.0), "{row}");
    }
    let table = String::from_utf8_lossy(&o.stdout);
    let header = table.lines().next().unwrap();
    assert!(header.contains("sent/s min–max"), "{header}");
    let lo_hi = floats(&rows[1]["sent_per_s_range"]);
    assert!(table.contains(&format!("{:.1}–{:.1}", lo_hi[0], lo_hi[1])), "{table}");
}

/// A busy loop beside `compare`: the run is flagged and the warning says how it knows.
#[test]
fn compare_warns_when_the_machine_was_busy() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_encoders(dir.path());
    let mut hog = Command::new("sh").args(["-c", "while :; do :; done"]).stdout(Stdio::null()).spawn().unwrap();
    let o = whittle(&["compare", &a, &b, "--reps", "3", "--json"]);
    hog.kill().unwrap();
    hog.wait().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("warning: the machine was busy while"), "no busy warning with a busy loop running:\n{err}");
    assert!(err.contains("/proc/stat"), "the warning does not say how it measured: {err}");
    let rows: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let busy = rows.iter().map(|r| r["other_cpu"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(busy >= whittle_eval::bench::BUSY_OTHER_CORES, "other processes' CPU {busy:.2} with a busy loop");
}
