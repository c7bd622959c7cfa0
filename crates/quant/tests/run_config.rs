//! The run configuration travels with the model: a forced kernel reaches every Linear (also those a pass
//! builds), gives the default kernel's outputs, and two models configured differently run side by side.

use candle_core::{Device, Tensor};
use whittle_core::{Isa, RunConfig};
use whittle_models::llama::KvCache;
use whittle_models::testing::tiny_llama;
use whittle_models::{load, LoadOptions, Loaded, Model};
use whittle_quant::{quantize, Plan};

/// int8 GEMMs sum exactly in i32 whatever the implementation; only the f32 epilogue may round differently.
const MAX_KERNEL_ABS_ERR: f32 = 1e-4;

fn logits(l: &Loaded) -> Vec<f32> {
    let Model::Llama(m) = &l.model else { panic!("a decoder") };
    let ids = Tensor::new(&[1u32, 7, 3, 9, 22, 5][..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.forward(&ids, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn opts(isa: Option<Isa>, fine_activations: bool) -> LoadOptions {
    LoadOptions { run: RunConfig { isa, fine_activations, ..Default::default() }, ..Default::default() }
}

#[test]
fn forced_kernel_matches_default_and_models_coexist() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    // A pass's new Linears inherit the configuration of the ones they replace.
    let mut q = load(d.path().to_str().unwrap(), &opts(Some(Isa::Ref), true)).unwrap();
    quantize(&mut q.model, &Plan::new("w8a8-dynamic", &[]).unwrap(), false, |_, _| {}).unwrap();
    for (name, lin) in q.model.linears() {
        assert!(lin.is_quantized() || name == "lm_head", "{name}");
        assert_eq!((lin.dispatch().isa, lin.dispatch().fine_activations), (Isa::Ref, true), "{name}");
    }
    let out = d.path().join("int8");
    whittle_models::save::save_hf_dir(&q, &out, candle_core::DType::F32).unwrap();

    // The same int8 model twice in one process: the reference kernel and the best this CPU has.
    let reference = load(out.to_str().unwrap(), &opts(Some(Isa::Ref), false)).unwrap();
    let best = load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(reference.model.run_config().isa, Some(Isa::Ref));
    assert!(reference.model.linears().iter().all(|(_, l)| l.dispatch().isa == Isa::Ref));
    assert!(best.model.linears().iter().all(|(_, l)| l.dispatch().isa == Isa::detect()));
    let (a, b) = (logits(&reference), logits(&best));
    let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(err <= MAX_KERNEL_ABS_ERR, "ref vs {}: {err:e}", Isa::detect().name());
    // Interleaved runs give each model's own outputs: nothing is shared between them.
    assert_eq!(logits(&reference), a);
    assert_eq!(logits(&best), b);

    // Setting a configuration on a loaded model reaches every Linear.
    let mut m = best;
    m.model.set_run_config(&RunConfig { isa: Some(Isa::Ref), ..Default::default() });
    assert!(m.model.linears().iter().all(|(_, l)| l.dispatch().isa == Isa::Ref));
    assert_eq!(logits(&m), a);
}
