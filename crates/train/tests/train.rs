//! The training engine on a tiny random LLaMA: every trainable tensor gets a gradient that matches finite
//! differences; distillation lowers the loss; a run resumed from a checkpoint ends where an uninterrupted
//! run ends; bad input is refused.

use candle_core::{Device, Tensor};
use whittle_models::testing::tiny_llama;
use whittle_models::{load, LoadOptions, Model};
use whittle_train::llama::TrainLlama;
use whittle_train::{losses, train, Hooks, LlamaObjective, LossOptions, StepLog, TrainOptions, Windows};

fn tiny() -> (tempfile::TempDir, whittle_models::llama::Llama) {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let Model::Llama(m) = l.model else { panic!() };
    (d, m)
}

fn ids() -> Vec<u32> {
    (0..2000u32).map(|i| (i * 7 + i / 3) % 47 + 3).collect()
}

fn opts(max_steps: usize) -> TrainOptions {
    TrainOptions {
        seq_len: 8,
        batch: 2,
        accum: 2,
        lr: 3e-3,
        min_lr_ratio: 0.1,
        warmup: 2,
        decay: "cosine".into(),
        weight_decay: 0.01,
        clip: Some(1.0),
        max_steps,
        seed: 7,
        eval_every: 3,
        ckpt_every: 3,
        patience: 0,
        loss: LossOptions { alpha: 0.7, temperature: 2.0, hidden_map: vec![(0, 1)], hidden_weight: 0.5 },
    }
}

#[test]
fn every_parameter_gets_a_gradient_that_matches_finite_differences() {
    let (_d, m) = tiny();
    let s = TrainLlama::from_model(&m, 8).unwrap();
    let x = Tensor::new(&[[3u32, 5, 9, 11, 4, 7, 8, 20]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[5u32, 9, 11, 4, 7, 8, 20, 6]], &Device::Cpu).unwrap();
    let lo = LossOptions { alpha: 0.5, temperature: 2.0, hidden_map: vec![(0, 1)], hidden_weight: 1.0 };
    // The teacher is the same model with other weights: perturb the student so the KD term is not at rest.
    let t = losses(&s, Some(&m), &x, &y, &lo).unwrap();
    let g = t.total.backward().unwrap();
    for (name, v) in s.vars() {
        let gv = g.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = gv.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n > 0.0, "{name}: zero gradient");
    }
    // Finite differences on a few entries of three tensors (f32: central differences, loose tolerance).
    let loss_at = |s: &TrainLlama| losses(s, Some(&m), &x, &y, &lo).unwrap().total.to_scalar::<f32>().unwrap() as f64;
    for (vi, entry) in [(1usize, 3usize), (3, 10), (9, 5)] {
        let (name, v) = &s.vars()[vi];
        let base: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let analytic = g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[entry] as f64;
        let h = 1e-2f32;
        let at = |delta: f32| {
            let mut w = base.clone();
            w[entry] += delta;
            v.set(&Tensor::from_vec(w, v.dims(), &Device::Cpu).unwrap()).unwrap();
            loss_at(&s)
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
        at(0.0);
        assert!(
            (numeric - analytic).abs() <= 0.05 * analytic.abs().max(1e-2),
            "{name}[{entry}]: finite difference {numeric} vs gradient {analytic}"
        );
    }
}

fn run(
    m: &whittle_models::llama::Llama,
    o: &TrainOptions,
    ckpt: &std::path::Path,
    resume: bool,
    copy_at: Option<(usize, std::path::PathBuf)>,
) -> (Vec<StepLog>, TrainLlama) {
    let s = TrainLlama::from_model(m, o.seq_len).unwrap();
    let data = Windows::new(&ids(), o.seq_len, o.batch, o.seed, "ids").unwrap();
    let mut eval = || Ok(1.0);
    let mut save = || Ok(());
    let ck = ckpt.to_path_buf();
    let mut on_step = |l: &StepLog, _: usize| {
        // Simulates a kill: keep the checkpoint as it is on disk when step `at` has run (it holds step at-1).
        if let Some((at, to)) = &copy_at {
            if l.step == *at {
                let _ = std::fs::remove_dir_all(to);
                std::fs::create_dir_all(to).unwrap();
                for f in std::fs::read_dir(&ck).unwrap() {
                    let f = f.unwrap();
                    std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
                }
            }
        }
    };
    let hooks = Hooks { eval: &mut eval, save_best: &mut save, on_step: &mut on_step };
    let obj = LlamaObjective { student: &s, teacher: Some(m), data: &data, batch: o.batch, loss: &o.loss };
    let out = train(&obj, o, ckpt, resume, None, None, hooks).unwrap();
    (out.history, s)
}

#[test]
fn distillation_lowers_the_loss_and_a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let (d, teacher) = tiny();
    // The student: the teacher with its FFN weights scaled down (a damaged copy to recover).
    let mut student = teacher.clone();
    for b in &mut student.blocks {
        let w = (b.up.dequantize().unwrap() * 0.3).unwrap();
        b.up = whittle_core::Linear::dense(w, None).unwrap();
    }
    let o = opts(8);
    let (full, trained) = run(&student, &o, &d.path().join("ck-full"), false, Some((5, d.path().join("ck-at-4"))));
    assert_eq!(full.len(), 8);
    // On a fixed batch, the trained student's loss is below the initial one's.
    let (x, y) = Windows::new(&ids(), 8, 2, 7, "ids").unwrap().batch(0, 2).unwrap();
    let at = |s: &TrainLlama| losses(s, Some(&teacher), &x, &y, &o.loss).unwrap().total.to_scalar::<f32>().unwrap();
    let initial = TrainLlama::from_model(&student, 8).unwrap();
    assert!(at(&trained) < at(&initial), "{} vs {}", at(&trained), at(&initial));
    assert!(full.iter().all(|l| l.kd >= -1e-4 && l.hidden >= 0.0 && l.ce > 0.0), "{full:?}");
    // The copy holds step 3 (checkpoints every 3 steps); resuming redoes steps 4..8.
    let (resumed, _) = run(&student, &o, &d.path().join("ck-at-4"), true, None);
    assert_eq!(resumed.len(), 8);
    assert!((resumed[7].loss - full[7].loss).abs() <= 1e-4, "{} vs {}", resumed[7].loss, full[7].loss);
    // Another student (a different FFN width) or other options: refused.
    let s2 = {
        let mut m = student.clone();
        m.blocks.truncate(1);
        TrainLlama::from_model(&m, 8).unwrap()
    };
    let mut opt = whittle_train::AdamW::new(&s2.vars().into_iter().map(|(_, v)| v).collect::<Vec<_>>(), 0.0).unwrap();
    let data = Windows::new(&ids(), 8, 2, 7, "ids").unwrap();
    let obj2 = LlamaObjective { student: &s2, teacher: Some(&teacher), data: &data, batch: 2, loss: &o.loss };
    let e = whittle_train::load_checkpoint(&d.path().join("ck-full"), &obj2, &mut opt).err().unwrap().to_string();
    assert!(e.contains("different student"), "{e}");
    let s = TrainLlama::from_model(&student, 8).unwrap();
    let (mut ev, mut sv, mut os) = (|| Ok(1.0), || Ok(()), |_: &StepLog, _: usize| {});
    let hooks = Hooks { eval: &mut ev, save_best: &mut sv, on_step: &mut os };
    let o2 = TrainOptions { lr: 1e-4, ..o.clone() };
    let obj = LlamaObjective { student: &s, teacher: Some(&teacher), data: &data, batch: 2, loss: &o2.loss };
    let e = train(&obj, &o2, &d.path().join("ck-full"), true, None, None, hooks);
    assert!(e.err().unwrap().to_string().contains("other training options"));
    // Too little data, a bad learning rate.
    assert!(Windows::new(&ids()[..20], 8, 4, 7, "short.txt").err().unwrap().to_string().contains("short.txt"));
    assert!(TrainOptions { lr: f64::NAN, ..o }.check().is_err());
}

#[test]
fn sentence_distillation_trains_every_encoder_weight_and_shared_blocks_train_once() {
    use whittle_train::bert::{SentenceObjective, TrainBert};
    use whittle_train::Objective;
    let d = tempfile::tempdir().unwrap();
    whittle_models::testing::tiny_bert_layers(d.path(), 16, 24, 2);
    let l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let Model::Bert(m) = &l.model else { panic!() };
    let sentences: Vec<(Vec<u32>, Vec<u32>)> = (0..8u32)
        .map(|i| ((0..(3 + i % 4)).map(|j| 3 + (i + j) % 30).collect(), vec![0; (3 + i % 4) as usize]))
        .collect();
    let targets: Vec<Vec<f32>> =
        (0..8).map(|i| (0..16).map(|j| ((i * 16 + j) as f32 * 0.37).sin()).collect()).collect();
    for shared in [Default::default(), [(1usize, 0usize)].into_iter().collect()] {
        let s = TrainBert::from_model(m, &shared).unwrap();
        let obj = SentenceObjective {
            student: &s,
            sentences: sentences.clone(),
            targets: targets.clone(),
            batch: 4,
            seed: 1,
            mse_weight: 1.0,
        };
        let names: Vec<String> = obj.vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.iter().any(|n| n.starts_with("encoder.layer.1.")), shared.is_empty(), "{names:?}");
        let t = obj.loss(0).unwrap();
        assert!(t.kd > 0.0 && t.hidden > 0.0);
        let g = t.total.backward().unwrap();
        for (name, v) in obj.vars() {
            let n = g
                .get(v.as_tensor())
                .map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
                .unwrap_or(0.0);
            // Position embeddings beyond the longest sentence and unused token types get no gradient.
            if !name.contains("position_embeddings")
                && !name.contains("token_type")
                && !name.contains("word_embeddings")
            {
                assert!(n > 0.0, "{name}: zero gradient (shared: {shared:?})");
            }
        }
    }
}
