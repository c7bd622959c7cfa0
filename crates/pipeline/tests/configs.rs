//! Stage configs deserialise from recipe TOML with the CLI flags' names and defaults; unknown stages and keys
//! are errors; `check` refuses bad combinations before any model is loaded.

use whittle_pipeline::stages::{AnyStage, PruneConfig, QuantizeConfig};
use whittle_pipeline::Stage;

fn stage(toml_text: &str) -> Result<AnyStage, String> {
    toml::from_str::<AnyStage>(toml_text).map_err(|e| e.to_string())
}

#[test]
fn recipes_name_stages_and_keys_as_the_cli_does() {
    let s = stage("stage = \"prune\"\nmethod = \"wanda\"\nsparsity = 0.5\npattern = \"2:4\"\n").unwrap();
    let AnyStage::Prune(p) = &s else { panic!("{s:?}") };
    assert_eq!((p.method.as_deref(), p.sparsity, p.pattern.as_str()), (Some("wanda"), Some(0.5), "2:4"));
    assert_eq!(p.eval_windows, PruneConfig::default().eval_windows);
    assert_eq!(s.name(), "prune");
    s.check().unwrap();
    let q =
        stage("stage = \"quantize\"\nscheme = \"w4a16\"\ngroup_size = 64\noverride = [\".*lm_head=keep\"]\n").unwrap();
    let AnyStage::Quantize(q) = q else { panic!() };
    assert_eq!((q.group_size, q.overrides.len(), q.method.as_str()), (64, 1, "rtn"));
    let d =
        stage("stage = \"distill\"\nteacher = \"t\"\nstudent = \"s\"\n[train]\noutput = \"o\"\nlr = 1e-4\n").unwrap();
    assert_eq!(d.name(), "distill");
    d.check().unwrap();
}

#[test]
fn unknown_stages_keys_and_bad_combinations_are_refused() {
    assert!(stage("stage = \"sparsify\"\n").unwrap_err().contains("sparsify"));
    assert!(stage("stage = \"prune\"\nsparsty = 0.5\n").unwrap_err().contains("sparsty"));
    assert!(stage("stage = \"distill\"\nteacher = \"t\"\n[train]\nlearning_rate = 1\n")
        .unwrap_err()
        .contains("learning_rate"));
    let e =
        stage("stage = \"structured\"\nmethod = \"wanda\"\nstructured = \"heads=0.5\"\n").unwrap().check().unwrap_err();
    assert!(e.to_string().contains("option `method`"), "{e}");
    let bad = |c: QuantizeConfig, want: &str| {
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    };
    bad(QuantizeConfig { scheme: "w4a16".into(), group_size: 48, ..Default::default() }, "option `group_size` 48");
    bad(QuantizeConfig { scheme: "w4a16".into(), act_order: Some(true), ..Default::default() }, "option `act_order`");
    bad(QuantizeConfig { scheme: "w8a8-dynamic".into(), target_bpw: Some(4.0), ..Default::default() }, "weight-only");
    let p = PruneConfig { method: Some("magnitude".into()), sparsity: Some(1.5), ..Default::default() };
    assert!(p.check().unwrap_err().to_string().contains("option `sparsity` 1.5"));
}
