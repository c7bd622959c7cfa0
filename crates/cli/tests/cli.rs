//! End-to-end tests of the `whittle` binary: help, real-model commands, and bad input.

#[path = "../../models/tests/common/mod.rs"]
mod common;

use std::process::{Command, Output};

fn whittle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whittle")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_command() {
    let o = whittle(&["--help"]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for c in ["inspect", "convert", "embed", "generate"] {
        assert!(s.contains(c), "--help does not list {c}:\n{s}");
    }
    let o = whittle(&["--version"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("whittle "));
}

#[test]
fn missing_file_is_a_clear_error() {
    let o = whittle(&["inspect", "/no/such/model.gguf"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/no/such/model.gguf"), "{}", stderr(&o));
}

#[test]
fn corrupt_gguf_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
    let o = whittle(&["inspect", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("bad.gguf") && e.contains("past the end"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn inspect_minilm_json_counts() {
    let m = common::minilm();
    let o = whittle(&["inspect", m.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["params"]["total"], 22_713_216);
    assert_eq!(v["params"]["head"], 147_840);
    assert_eq!(v["family"], "bert");
    assert_eq!(v["layers"].as_array().unwrap().len(), 6);
}

#[test]
fn inspect_smollm2_shows_q4_1_storage() {
    let m = common::smollm2();
    let o = whittle(&["inspect", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("q4_1") && s.contains("llama") && s.contains("FLOPs/token"), "{s}");
}

#[test]
fn embed_and_generate_json() {
    let o = whittle(&["embed", common::minilm().to_str().unwrap(), "--json", "hello world", "a second text"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["dim"], 384);
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 2);

    let o = whittle(&[
        "generate",
        common::smollm2().to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "-n",
        "4",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fx = common::fixture("smollm2.json");
    let want: Vec<u64> =
        fx["prompts"][0]["greedy32"].as_array().unwrap()[..4].iter().map(|x| x.as_u64().unwrap()).collect();
    let got: Vec<u64> = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(got, want);
}

#[test]
fn wrong_family_for_command_is_an_error() {
    let o = whittle(&["generate", common::minilm().to_str().unwrap(), "--prompt", "hi"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("needs a decoder"), "{}", stderr(&o));
    let o = whittle(&["embed", common::smollm2().to_str().unwrap(), "hi"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("needs an encoder"), "{}", stderr(&o));
}

#[test]
fn convert_does_not_leave_partial_output_on_error() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = whittle(&["convert", "/no/such/dir", "-o", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
}

#[test]
fn eval_bad_input_is_a_clear_error() {
    let smol = common::smollm2();
    let minilm = common::minilm();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["eval", minilm.to_str().unwrap(), "--task", "ppl"], "needs a decoder"),
        (vec!["eval", smol.to_str().unwrap(), "--task", "sts"], "needs a sentence encoder"),
        (vec!["eval", smol.to_str().unwrap(), "--chunks", "0"], "--chunks"),
        (vec!["eval", smol.to_str().unwrap(), "--ctx", "100000"], "larger than the model's context"),
        (vec!["eval", smol.to_str().unwrap(), "--data", "/no/such/file.txt"], "/no/such/file.txt"),
    ];
    for (args, want) in cases {
        let o = whittle(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.jsonl");
    std::fs::write(&p, "{\"text\": \"a b c\"}\n{\"nope\": 1}\n").unwrap();
    let o = whittle(&["eval", smol.to_str().unwrap(), "--task", "cloze", "--data", p.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("bad.jsonl:2"), "{}", stderr(&o));
    let p = d.path().join("bad.tsv");
    std::fs::write(&p, "h\ta\nonly\ttwo\n").unwrap();
    let o = whittle(&["eval", minilm.to_str().unwrap(), "--task", "sts", "--data", p.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("bad.tsv:2"), "{}", stderr(&o));
}

#[test]
fn eval_json_keys_are_stable() {
    let o = whittle(&["eval", common::smollm2().to_str().unwrap(), "--chunks", "1", "--ctx", "128", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["ppl", "ppl_stderr", "tokens"] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert_eq!(v["tokens"], 64);
}

#[test]
fn quantize_bad_input_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let minilm = common::minilm();
    let smol = common::smollm2();
    let out = d.path().join("out");
    let o = whittle(&["quantize", minilm.to_str().unwrap(), "--scheme", "int3-magic", "-o", out.to_str().unwrap()]);
    assert!(
        !o.status.success() && stderr(&o).contains("int3-magic") && stderr(&o).contains("w8a8-dynamic"),
        "{}",
        stderr(&o)
    );
    let o = whittle(&["quantize", minilm.to_str().unwrap(), "--scheme", "q8_0", "-o", out.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains(".gguf"), "{}", stderr(&o));
    let g = d.path().join("x.gguf");
    let o = whittle(&["quantize", minilm.to_str().unwrap(), "--scheme", "q8_0", "-o", g.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("GGUF source"), "{}", stderr(&o));
    let o = whittle(&["quantize", smol.to_str().unwrap(), "--scheme", "w8a8-dynamic", "-o", g.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", stderr(&o));
    std::fs::create_dir(&out).unwrap();
    let o = whittle(&["quantize", minilm.to_str().unwrap(), "--scheme", "w8a8-dynamic", "-o", out.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("--force"), "{}", stderr(&o));
    assert!(!g.exists());
    // GPTQ's flags without GPTQ.
    for flag in ["--calib-int8", "--act-order"] {
        let o = whittle(&["quantize", minilm.to_str().unwrap(), "--scheme", "w4a16", flag, "-o", "/nonexistent/q"]);
        assert!(!o.status.success() && stderr(&o).contains(flag) && stderr(&o).contains("gptq"), "{}", stderr(&o));
    }
    // With --force it writes, and the result reloads and embeds.
    let o = whittle(&[
        "quantize",
        minilm.to_str().unwrap(),
        "--scheme",
        "w8a8-dynamic",
        "-o",
        out.to_str().unwrap(),
        "--force",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = whittle(&["embed", out.to_str().unwrap(), "hello", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn prune_and_mixed_precision_bad_input_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let minilm = common::minilm();
    let smol = common::smollm2();
    let out = d.path().join("out");
    let (m, o) = (minilm.to_str().unwrap(), out.to_str().unwrap());
    let cases: &[(&[&str], &str)] = &[
        (&["prune", m, "--method", "magnitude", "--sparsity", "1.5", "-o", o], "--sparsity 1.5"),
        (&["prune", m, "--method", "magnitude", "--pattern", "3:7", "-o", o], "multiple of M = 7"),
        (&["prune", m, "--method", "magnitude", "--pattern", "4:4", "-o", o], "0 < N < M"),
        (&["prune", m, "--method", "lottery", "--sparsity", "0.5", "-o", o], "magnitude, wanda, sparsegpt"),
        (
            &["prune", m, "--method", "wanda", "--sparsity", "0.5", "--structured", "heads=0.5", "-o", o],
            "separate passes",
        ),
        (&["prune", m, "--structured", "heads=1.0", "-o", o], "[0, 1)"),
        (&["prune", m, "--drop-layers", "0,1,2,3,4,5", "-o", o], "leave none"),
        (&["prune", m, "--drop-layers", "9", "-o", o], "blocks 0..5"),
        (&["prune", m, "-o", o], "--method"),
        (&["prune", m, "--method", "magnitude", "--schedule", "0.5,0.3", "-o", o], "must increase"),
        (&["prune", m, "--method", "magnitude", "--schedule", "0.1", "--sparsity", "0.2", "-o", o], "drop --sparsity"),
        (&["prune", m, "--method", "magnitude", "--sparsity", "0.2", "--max-drop", "2%", "-o", o], "--schedule"),
        (&["prune", m, "--method", "magnitude", "--sparsity", "0.2", "--storage", "csr", "-o", o], "--storage csr"),
        (&["lowrank", m, "-o", o], "--ratio R"),
        (&["lowrank", m, "--ratio", "1.5", "-o", o], "(0, 1]"),
        (&["lowrank", m, "--ratio", "0.5", "--rank", "4", "-o", o], "give one"),
        (&["lowrank", m, "--rank", "999", "-o", o], "--rank 999"),
        (&["lowrank", m, "--method", "pca", "--rank", "4", "-o", o], "svd, asvd, svd-llm"),
        (&["lowrank", m, "--attention-rank", "31", "-o", o], "--attention-rank 31"),
        (&["lowrank", m, "--attention-rank", "8", "--ratio", "0.5", "-o", o], "run `lowrank` again"),
        (&["quantize", m, "--scheme", "w8a8-dynamic", "--target-bpw", "4", "-o", o], "weight-only"),
        (&["quantize", m, "--scheme", "w4a16", "--sensitivity", "s.json", "-o", o], "--target-bpw"),
        (&["quantize", m, "--scheme", "w4a16", "--target-bpw", "4", "--candidates", "4,5", "-o", o], "`5`"),
        (&["sensitivity", m], "LLaMA decoders"),
        (&["lowrank", smol.to_str().unwrap(), "--attention-rank", "8", "-o", o], "rope"),
        (&["share", smol.to_str().unwrap(), "--embedding-rank", "64", "-o", o], "BERT encoder"),
        (&["share", m, "--groups", "0-1", "--calib", "x.txt", "-o", o], "--embedding-rank R"),
    ];
    for (args, want) in cases {
        let r = whittle(args);
        let e = stderr(&r);
        assert!(!r.status.success() && e.contains(want) && !e.contains("panicked"), "{args:?}: {e}");
        assert!(!out.exists(), "{args:?} left an output");
    }
    // An importance matrix of another model: refused, naming the tensor.
    let tiny = d.path().join("tiny");
    whittle_models::testing::tiny_llama(&tiny);
    let text = d.path().join("t.txt");
    std::fs::write(
        &text,
        (0..300).map(|i| format!("w{} w{} w{}", i % 40, (i * 7) % 40, i % 9)).collect::<Vec<_>>().join(" "),
    )
    .unwrap();
    let im = d.path().join("im.gguf");
    let (im_s, tiny_s, text_s) = (im.to_str().unwrap(), tiny.to_str().unwrap(), text.to_str().unwrap());
    let r =
        whittle(&["imatrix", tiny_s, "-o", im_s, "--calib", text_s, "--calib-samples", "2", "--calib-seq-len", "16"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let g = d.path().join("q.gguf");
    let r = whittle(&[
        "quantize",
        smol.to_str().unwrap(),
        "--scheme",
        "q4_k_m",
        "--allow-requantize",
        "--imatrix",
        im_s,
        "-o",
        g.to_str().unwrap(),
    ]);
    let e = stderr(&r);
    assert!(!r.status.success() && e.contains("blk.0.") && e.contains("another model"), "{e}");
    assert!(!g.exists());
}
