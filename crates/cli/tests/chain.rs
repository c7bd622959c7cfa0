//! The library API alone chains stages to the same model as the CLI commands run one after the other.

#[path = "../../models/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use whittle_pipeline::stages::{PruneConfig, QuantizeConfig};
use whittle_pipeline::{output, Ctx, Stage};

fn whittle(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_whittle")).args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()))
}

#[test]
fn structured_prune_then_w8a8_through_the_library_equals_the_two_commands() {
    let minilm = common::minilm();
    let d = tempfile::tempdir().unwrap();
    // Library: one model in memory through both stages, saved once.
    let prune =
        PruneConfig { structured: Some("heads=0.25,ffn=0.3".into()), importance: "l2".into(), ..Default::default() };
    let quant = QuantizeConfig { scheme: "w8a8-dynamic".into(), ..Default::default() };
    let mut l = whittle_models::load(minilm.to_str().unwrap(), &Default::default()).unwrap();
    let mut ctx = Ctx::quiet();
    for stage in [&prune as &dyn Stage, &quant] {
        stage.check().unwrap();
        stage.apply(&mut l, &mut ctx).unwrap();
    }
    let lib = d.path().join("lib");
    output::save(&l, &lib, None).unwrap();
    // CLI: two commands, the first one's output the second one's input.
    let (pruned, cli) = (d.path().join("pruned"), d.path().join("cli"));
    let m = minilm.to_str().unwrap();
    whittle(&["prune", m, "--structured", "heads=0.25,ffn=0.3", "--importance", "l2", "-o", pruned.to_str().unwrap()]);
    whittle(&["quantize", pruned.to_str().unwrap(), "--scheme", "w8a8-dynamic", "-o", cli.to_str().unwrap()]);
    for f in ["model.safetensors", "config.json"] {
        assert!(read(&lib, f) == read(&cli, f), "{f} differs between the library chain and the CLI");
    }
    // And the result is a working, smaller encoder.
    let q = whittle_models::load(cli.to_str().unwrap(), &Default::default()).unwrap();
    assert!(q.model.linears().iter().any(|(_, l)| l.storage_name().contains("w8a8")));
    assert!(
        read(&cli, "model.safetensors").len()
            < std::fs::metadata(minilm.join("model.safetensors")).unwrap().len() as usize
    );
}
