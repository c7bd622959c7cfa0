//! Pruning whole tiny models: every method and pattern gives the sparsity asked for, structured removal
//! really shrinks the blocks, and the pruned models save and load back with identical outputs.

use candle_core::{Device, Tensor};
use whittle_compress::pass::{prune_model, Method, PruneOptions};
use whittle_compress::structured::{prune_structured, Importance, Structured};
use whittle_compress::Pattern;
use whittle_models::llama::KvCache;
use whittle_models::testing::{tiny_bert_sized, tiny_llama};
use whittle_models::{load, text, LoadOptions, Loaded, Model};
use whittle_quant::calib::{calibrate, CalibOptions};

fn tiny_text() -> String {
    (0..400)
        .map(|i| format!("w{} w{} w{} w{} w{} w{}", i % 50, (i * 7) % 50, (i * 3) % 50, 5, 9, i % 13))
        .collect::<Vec<_>>()
        .join("\n")
}

fn logits(l: &Loaded) -> Vec<f32> {
    let x = Tensor::new(&[1u32, 5, 9, 3, 7, 11, 2], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    match &l.model {
        Model::Llama(m) => m.forward(&x, &mut KvCache::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
        Model::Bert(_) => text::embed_texts(l, &["w3 w4 w5 w6", "w9 w10"], 16, 2).unwrap().concat(),
    }
}

fn reload_same(l: &Loaded) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("pruned");
    whittle_models::save::save_hf_dir(l, &out, candle_core::DType::F32).unwrap();
    let back = load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(logits(l), logits(&back), "outputs after save and load");
}

fn zeros_per_row(l: &Loaded) -> Vec<f64> {
    l.model
        .linears()
        .into_iter()
        .filter(|(n, _)| n.contains("layer"))
        .map(|(_, lin)| {
            let w: Vec<f32> = lin.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            w.iter().filter(|v| **v == 0.0).count() as f64 / w.len() as f64
        })
        .collect()
}

#[test]
fn unstructured_and_nm_on_both_families_reload_identically() {
    let co = CalibOptions { samples: 4, seq_len: 16, source: "tiny".into(), int8: false };
    for family in ["llama", "bert"] {
        for method in [Method::Magnitude, Method::Wanda, Method::SparseGpt] {
            for (pattern, want) in [(Pattern::Unstructured, 0.5), (Pattern::NM { n: 2, m: 4 }, 0.5)] {
                let d = tempfile::tempdir().unwrap();
                if family == "llama" {
                    tiny_llama(d.path());
                } else {
                    tiny_bert_sized(d.path(), 32, 64);
                }
                let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
                // Sparse storage everywhere but one case, which keeps the dense path covered.
                let sparse = !(family == "bert" && method == Method::Magnitude);
                let o = PruneOptions { method, sparsity: 0.5, pattern, global: false, damp: 0.01, quant: None, sparse };
                let r = prune_model(&mut l, &o, &tiny_text(), &co, |_, _| {}).unwrap();
                assert!(!r.layers.is_empty());
                let want_name = if pattern == Pattern::Unstructured { "sparse-bitmap" } else { "2:4-sparse" };
                for (n, lin) in l.model.linears().into_iter().filter(|(n, _)| n.contains("layer")) {
                    let name = lin.storage_name();
                    assert_eq!(name, if sparse { want_name } else { "f32" }, "{family} {method:?} {n}");
                    if sparse {
                        // 1 bit per weight of layout + half the f32 values, instead of 32 bits per weight.
                        assert!(lin.bits_per_weight() < 17.5, "{n}: {} bpw", lin.bits_per_weight());
                    }
                }
                for z in zeros_per_row(&l) {
                    assert!((z - want).abs() < 0.02, "{family} {method:?} {pattern}: {z}");
                }
                reload_same(&l);
            }
        }
    }
}

#[test]
fn structured_removal_shrinks_blocks_and_reloads() {
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let co = CalibOptions { samples: 4, seq_len: 16, source: "tiny".into(), int8: false };
    let stats = calibrate(&mut l, &tiny_text(), &co, |_, _| {}).unwrap().stats;
    let s = Structured { heads: 0.5, ffn: 0.5, layers: 0, drop_layers: vec![] };
    let r = prune_structured(&mut l.model, &s, Importance::Activation, false, Some(&stats), &[], None).unwrap();
    let Model::Llama(m) = &l.model else { panic!() };
    // Block 0: 2 KV groups of 2 query heads, FFN 48; block 1: 1 KV group (kept: at least one), FFN 24.
    assert_eq!((m.blocks[0].n_kv_head, m.blocks[0].n_head, m.blocks[0].gate.out_features()), (1, 2, 24));
    assert_eq!((m.blocks[1].n_kv_head, m.blocks[1].gate.out_features()), (1, 12));
    assert!(r.blocks[1].note.contains("kept 1"), "{:?}", r.blocks[1].note);
    assert!(r.params_after < r.params_before);
    reload_same(&l);
    // Dropping a block; dropping every block or one twice is an error.
    let e = prune_structured(&mut l.model, &Structured::default(), Importance::L2, false, None, &[0, 1], None);
    assert!(e.unwrap_err().to_string().contains("leave none"));
    let e = prune_structured(&mut l.model, &Structured::default(), Importance::L2, false, None, &[1, 1], None);
    assert!(e.unwrap_err().to_string().contains("twice"));
    prune_structured(&mut l.model, &Structured::default(), Importance::L2, false, None, &[1], None).unwrap();
    assert_eq!(l.model.n_blocks(), 1);
    reload_same(&l);
    // BERT heads and neurons.
    let d = tempfile::tempdir().unwrap();
    tiny_bert_sized(d.path(), 32, 64);
    let mut b = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let s = Structured { heads: 0.5, ffn: 0.25, layers: 0, drop_layers: vec![] };
    prune_structured(&mut b.model, &s, Importance::L2, false, None, &[], None).unwrap();
    let Model::Bert(m) = &b.model else { panic!() };
    assert_eq!((m.blocks[0].n_head, m.blocks[0].intermediate.out_features()), (1, 48));
    reload_same(&b);
}

#[test]
fn a_schedule_stops_at_the_first_step_over_the_bound_and_keeps_the_last_good_model() {
    use whittle_compress::schedule::{run_schedule, Quality};
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let co = CalibOptions { samples: 2, seq_len: 16, source: "tiny".into(), int8: false };
    let mut o = PruneOptions {
        method: Method::Wanda,
        sparsity: 0.0,
        pattern: Pattern::Unstructured,
        global: false,
        damp: 0.01,
        quant: None,
        sparse: true,
    };
    // Quality: the fraction of non-zero block weights, so a step's drop is its sparsity.
    let eval = |l: &Loaded| {
        let z = zeros_per_row(l);
        let dense = 1.0 - z.iter().sum::<f64>() / z.len() as f64;
        Ok(Quality { name: "density".into(), value: dense, lower_is_better: false, per_second: 1.0 })
    };
    let prune = |l: &mut Loaded, a: f64| {
        o.sparsity = a;
        prune_model(l, &o, &tiny_text(), &co, |_, _| {}).map(|_| ())
    };
    let h = run_schedule(&mut l, &[0.1, 0.3, 0.5, 0.7], Some(0.35), prune, eval, |_| {}).unwrap();
    let kept: Vec<bool> = h.iter().map(|s| s.kept).collect();
    assert_eq!(kept, [true, true, true, false], "{h:?}");
    assert!((h[2].removed - 0.3).abs() < 0.02 && h[2].bytes < h[0].bytes, "{h:?}");
    // The model left is step 2's (30%), not step 3's.
    // (Per-row counts round down on these narrow layers: 0.25–0.3.)
    for z in zeros_per_row(&l) {
        assert!((0.2..=0.31).contains(&z), "{z}");
    }
}

#[test]
fn low_rank_factorisation_saves_parameters_and_reloads_on_both_families() {
    use whittle_compress::lowrank::{lowrank_model, LowRankOptions, Method, Target};
    let co = CalibOptions { samples: 4, seq_len: 16, source: "tiny".into(), int8: false };
    for family in ["llama", "bert"] {
        for method in [Method::Svd, Method::Asvd, Method::SvdLlm] {
            let d = tempfile::tempdir().unwrap();
            if family == "llama" {
                tiny_llama(d.path());
            } else {
                tiny_bert_sized(d.path(), 32, 64);
            }
            let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
            let before = logits(&l);
            let o = LowRankOptions { method, target: Target::Ratio(0.7), alpha: 0.5, damp: 0.01 };
            let r = lowrank_model(&mut l, &o, &tiny_text(), &co, |_, _| {}).unwrap();
            assert!(r.params_after as f64 <= 0.7 * r.params_before as f64, "{family} {method:?}: {r:?}");
            assert!(r.layers.iter().any(|x| x.rank.is_some()));
            for x in r.layers.iter().filter(|x| x.rank.is_some()) {
                assert!(x.params_after < x.params_before && x.output_rel_err.is_finite(), "{x:?}");
            }
            let after = logits(&l);
            assert_ne!(before, after);
            reload_same(&l);
            // At full energy nothing is worth factorising: the model stays as it was.
            let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
            let o = LowRankOptions { method, target: Target::Energy(1.0), alpha: 0.5, damp: 0.01 };
            let r = lowrank_model(&mut l, &o, &tiny_text(), &co, |_, _| {}).unwrap();
            assert!(r.layers.iter().all(|x| x.rank.is_none()) && logits(&l) == before, "{family} {method:?}");
        }
    }
    // Bad targets are refused, naming the flag.
    let d = tempfile::tempdir().unwrap();
    tiny_llama(d.path());
    let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    for (t, flag) in [
        (Target::Ratio(1.5), "option `ratio`"),
        (Target::Ratio(0.0), "option `ratio`"),
        (Target::Rank(100_000), "option `rank`"),
    ] {
        let o = LowRankOptions { method: Method::Svd, target: t, alpha: 0.5, damp: 0.01 };
        let e = lowrank_model(&mut l, &o, &tiny_text(), &co, |_, _| {}).unwrap_err().to_string();
        assert!(e.contains(flag), "{e}");
    }
}

#[test]
fn shared_blocks_are_stored_once_and_reload_identically() {
    use whittle_compress::share::{auto_groups, share_blocks, Init};
    for family in ["llama", "bert"] {
        for init in [Init::Mean, Init::Central] {
            let d = tempfile::tempdir().unwrap();
            if family == "llama" {
                tiny_llama(d.path());
            } else {
                whittle_models::testing::tiny_bert_layers(d.path(), 32, 64, 2);
            }
            let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
            if family == "llama" {
                // The tiny LLaMA's two blocks have different widths: sharing them is refused.
                let e = auto_groups(&l.model, 1).unwrap_err().to_string();
                assert!(e.contains("differ in shape"), "{e}");
                let e = share_blocks(&mut l, &[vec![0, 1]], init).unwrap_err().to_string();
                assert!(e.contains("different shapes"), "{e}");
                continue;
            }
            let groups = auto_groups(&l.model, 1).unwrap();
            assert_eq!(groups, vec![vec![0, 1]]);
            let r = share_blocks(&mut l, &groups, init).unwrap();
            assert_eq!(r.unique_blocks, 1);
            assert!(r.params_after * 2 == r.params_before, "{r:?}");
            if init == Init::Central {
                assert!(r.groups[0].rel_change.contains(&0.0), "{r:?}");
            }
            let dense = d.path().join("dense");
            let shared = d.path().join("shared");
            let orig = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
            whittle_models::save::save_hf_dir(&orig, &dense, candle_core::DType::F32).unwrap();
            whittle_models::save::save_hf_dir(&l, &shared, candle_core::DType::F32).unwrap();
            let size = |p: &std::path::Path| std::fs::metadata(p.join("model.safetensors")).unwrap().len();
            assert!(size(&shared) < size(&dense), "{family}: {} vs {}", size(&shared), size(&dense));
            let back = load(shared.to_str().unwrap(), &LoadOptions::default()).unwrap();
            assert_eq!(back.shared_blocks.get(&1), Some(&0));
            assert_eq!(logits(&l), logits(&back), "{family} {init:?}");
        }
    }
}

#[test]
fn factorised_embeddings_weight_tokens_and_reload() {
    use whittle_compress::share::factorise_embeddings;
    let d = tempfile::tempdir().unwrap();
    whittle_models::testing::tiny_bert_sized(d.path(), 32, 64);
    let open = || load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let table = |l: &whittle_models::Loaded| -> Vec<Vec<f32>> {
        let Model::Bert(m) = &l.model else { panic!() };
        m.embeddings.word_table().unwrap().to_vec2().unwrap()
    };
    let orig = table(&open());
    let uniform = vec![1.0; 40];
    let mut errs = Vec::new();
    for r in [4, 12] {
        let mut l = open();
        let rep = factorise_embeddings(&mut l, r, &uniform).unwrap();
        assert_eq!((rep.params_before, rep.params_after), (40 * 32, r * (40 + 32)));
        assert!((rep.rel_err - rep.weighted_rel_err).abs() < 1e-9, "{rep:?}");
        // The reported error is the table's.
        let t = table(&l);
        let (num, den): (f64, f64) = orig.iter().zip(&t).fold((0.0, 0.0), |(n, d), (a, b)| {
            let e: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            (n + e, d + a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>())
        });
        assert!(((num / den).sqrt() - rep.rel_err).abs() < 1e-4, "{} vs {rep:?}", (num / den).sqrt());
        errs.push(rep.rel_err);
        // Saved as two tensors, and reloaded to the same outputs.
        let out = d.path().join(format!("emb{r}"));
        whittle_models::save::save_hf_dir(&l, &out, candle_core::DType::F32).unwrap();
        let back = load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
        let Model::Bert(bm) = &back.model else { panic!() };
        assert_eq!(bm.embeddings.word.dims(), &[40, r]);
        assert_eq!(logits(&l), logits(&back));
        // Twice is refused.
        let mut back = back;
        let e = factorise_embeddings(&mut back, r, &uniform).unwrap_err().to_string();
        assert!(e.contains("already factorised"), "{e}");
    }
    assert!(errs[1] < errs[0], "{errs:?}");
    // A heavily weighted token keeps its row far better than under uniform weights.
    let row_err = |w: &[f64]| {
        let mut l = open();
        factorise_embeddings(&mut l, 4, w).unwrap();
        orig[7].iter().zip(&table(&l)[7]).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
    };
    let mut heavy = uniform.clone();
    heavy[7] = 1e4;
    assert!(row_err(&heavy) < 0.01 * row_err(&uniform), "{} vs {}", row_err(&heavy), row_err(&uniform));
    // Ranks that save nothing, the wrong number of weights, and a decoder are refused.
    for (r, w) in [(0, 40), (18, 40), (4, 39)] {
        let e = factorise_embeddings(&mut open(), r, &vec![1.0; w]).unwrap_err().to_string();
        assert!(e.contains("option `embedding_rank`") || e.contains("39 values"), "{e}");
    }
    let dl = tempfile::tempdir().unwrap();
    tiny_llama(dl.path());
    let mut ll = load(dl.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let e = factorise_embeddings(&mut ll, 4, &uniform).unwrap_err().to_string();
    assert!(e.contains("BERT"), "{e}");
}

#[test]
fn attention_rank_factorises_scores_and_reloads() {
    use whittle_compress::attention::attention_rank;
    use whittle_compress::lowrank::Method;
    let co = CalibOptions { samples: 8, seq_len: 16, source: "tiny".into(), int8: false };
    let d = tempfile::tempdir().unwrap();
    tiny_bert_sized(d.path(), 32, 64);
    let base = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let Model::Bert(bm) = &base.model else { panic!() };
    let hd = bm.config.head_dim;
    let before = logits(&base);
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt();
    let mut errs = Vec::new();
    for (method, r) in [(Method::SvdLlm, hd - 2), (Method::SvdLlm, 2), (Method::Svd, hd - 2)] {
        let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
        let rep = attention_rank(&mut l, r, method, 0.01, &tiny_text(), &co, |_, _| {}).unwrap();
        assert!(rep.params_after < rep.params_before, "{rep:?}");
        let Model::Bert(m) = &l.model else { panic!() };
        assert_eq!(m.blocks[0].query.out_features(), m.blocks[0].n_head * (r + 1));
        assert_eq!(m.blocks[0].value.out_features(), m.blocks[0].n_head * hd);
        let after = logits(&l);
        errs.push((rep.blocks[0].score_rel_err, dist(&before, &after)));
        reload_same(&l);
        // Heads cannot be pruned any more, and the scores cannot be factorised twice.
        let e = attention_rank(&mut l, 1, method, 0.01, &tiny_text(), &co, |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("already low-rank"), "{e}");
    }
    // More rank, smaller score error and a closer model.
    assert!(errs[0].0 < errs[1].0 && errs[0].1 < errs[1].1, "{errs:?}");
    // Bad ranks and LLaMA are refused with the option named.
    let mut l = load(d.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    for r in [0, hd - 1, 1000] {
        let e = attention_rank(&mut l, r, Method::Svd, 0.01, &tiny_text(), &co, |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("option `attention_rank`"), "{e}");
    }
    let d2 = tempfile::tempdir().unwrap();
    tiny_llama(d2.path());
    let mut ll = load(d2.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let e = attention_rank(&mut ll, 2, Method::Svd, 0.01, &tiny_text(), &co, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("rope"), "{e}");
}
