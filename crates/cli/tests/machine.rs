//! `whittle machine` measures this machine's limits, and `bench` reports a decoder's decoding as a fraction of
//! the measured bandwidth (issue 20, item 3).

use std::process::{Command, Output};

use serde_json::Value;

fn whittle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whittle")).args(args).output().unwrap()
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn machine_reports_its_limits() {
    let v = json(&whittle(&["machine", "--mib", "64", "--reps", "2", "--json"]));
    for k in ["read_gbps", "read_gbps_1thread", "f32_fma_gflops"] {
        assert!(v[k].as_f64().is_some_and(|g| g.is_finite() && g > 0.1), "{k}: {v}");
    }
    let only = json(&whittle(&["machine", "--bandwidth", "--mib", "32", "--reps", "1", "--json"]));
    assert!(only["read_gbps"].as_f64().is_some_and(|g| g > 0.1), "{only}");
    assert!(only.get("f32_fma_gflops").is_none_or(Value::is_null), "--bandwidth ran the compute probes: {only}");
    let bad = whittle(&["machine", "--mib", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--mib"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn bench_reports_decoding_against_the_bandwidth() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("llama");
    whittle_models::testing::tiny_llama(&m);
    let v = json(&whittle(&["bench", m.to_str().unwrap(), "--reps", "2", "--pp", "8", "--tg", "4", "--json"]));
    let (g, tg, bytes) = (v["mem_gbps"].as_f64(), v["tg_tok_s"].as_f64(), v["model_bytes"].as_f64());
    let (g, tg, bytes) = (g.expect("mem_gbps"), tg.expect("tg_tok_s"), bytes.expect("model_bytes"));
    assert!(g > 0.1, "{v}");
    let frac = v["tg_bw_frac"].as_f64().expect("tg_bw_frac");
    assert!((frac - bytes * tg / (g * 1e9)).abs() <= 1e-9 * frac.max(1.0), "{v}");
    // An encoder has no decoding, so no bandwidth figure.
    let e = dir.path().join("bert");
    whittle_models::testing::tiny_bert(&e);
    let v = json(&whittle(&["bench", e.to_str().unwrap(), "--reps", "1", "--json"]));
    assert!(v.get("mem_gbps").is_none() && v.get("tg_bw_frac").is_none(), "{v}");
}
