//! The accuracy-driven search: the smallest (or fastest) model within `--max-drop` of the original.
//!
//! 1. The baseline is measured once (cached in `OUT/baseline.json`).
//! 2. Every candidate of the level's space gets a predicted objective (exact sizes for GGUF plans, an
//!    estimate for the rest) and, for mixed precision, a predicted loss: the KL divergence each (tensor
//!    group, type) adds on a calibration slice when quantized alone (`OUT/probes.json`), summed.
//! 3. Candidates are measured for real in order of predicted objective — quality on the test split (never
//!    seen by calibration), size on disk, speed with `bench` on this machine — skipping those that cannot
//!    beat the best so far, those predicted to miss the goal (the prediction is rescaled by what the trials
//!    measured), and those at least as aggressive on every knob as one that failed.
//! 4. The best model that meets the goal is kept at `OUT/model` (or `OUT/model.gguf`) as the search goes;
//!    every trial is appended to `OUT/trials.jsonl`, so a rerun after a kill replays them and continues with
//!    the same choices. The search stops at `--budget` or `--max-trials`; when nothing meets the goal the
//!    closest candidate is saved and the outcome says so.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use whittle_eval::{bench as ebench, data, ppl, Metrics};
use whittle_formats::gguf::Gguf;
use whittle_models::Loaded;

use super::goal::{self, Figures, MaxDrop, Metric, Objective};
use super::space::{self, Candidate, Level, Plan};
use super::store::{self, TrialLog};
use crate::config::ImatrixConfig;
use crate::stages::AnyStage;
use crate::{Ctx, Error, Result, Stage};

/// Opens a model; `true` asks for float weights (block formats dequantized), as stages need.
pub type Open<'a> = &'a dyn Fn(&str, bool) -> whittle_models::Result<Loaded>;

/// What the search is asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub level: Level,
    pub metric: Metric,
    pub max_drop: MaxDrop,
    pub objective: Objective,
    /// Seconds.
    pub budget: f64,
    pub max_trials: Option<usize>,
    pub seed: u64,
    /// WikiText-2 test windows per perplexity / KL measurement (decoders).
    pub eval_windows: usize,
}

impl Goal {
    /// What identifies a run (the budget and the trial cap may change between a run and its rerun).
    pub fn settings(&self) -> serde_json::Value {
        serde_json::json!({
            "level": self.level, "metric": self.metric, "max_drop": self.max_drop.to_string(),
            "objective": self.objective, "seed": self.seed, "eval_windows": self.eval_windows,
        })
    }
}

/// One measured candidate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub n: usize,
    pub name: String,
    pub family: String,
    pub knobs: Vec<(String, String)>,
    pub figures: Option<Figures>,
    /// Why the candidate could not be made or measured.
    pub error: Option<String>,
    pub passed: bool,
    /// Quality drop from the baseline, relative and absolute (positive = worse).
    pub drop_rel: f64,
    pub drop_abs: f64,
    pub predicted_bytes: f64,
    pub predicted_kld: Option<f64>,
    pub seconds: f64,
    /// The search clock when the trial ended (seconds since the run began, over all reruns).
    pub clock: f64,
}

/// One mixed-precision probe: a tensor group at one type, the rest at the reference type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub group: String,
    pub gtype: String,
    pub kld: f64,
    pub seconds: f64,
}

/// The search's bookkeeping kept in `OUT/state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Setup {
    baseline: Option<Figures>,
    baseline_seconds: f64,
    imatrix_seconds: f64,
    probes: Vec<Probe>,
}

/// A row of the chosen model's per-layer map.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRow {
    pub layer: String,
    pub storage: String,
    pub bpw: f64,
    /// Stored parameters / dense parameters (below 1 for pruned or factorised layers).
    pub density: f64,
    pub rank: Option<usize>,
    pub shape: (usize, usize),
}

/// What the search did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub model: String,
    pub family: String,
    pub goal: Goal,
    pub baseline: Figures,
    /// The worst acceptable quality.
    pub threshold: f64,
    pub trials: Vec<Trial>,
    pub probes: Vec<Probe>,
    /// Index into `trials` of the model written to `model_path`.
    pub chosen: Option<usize>,
    /// Whether the chosen model meets the goal (false: the closest candidate).
    pub met: bool,
    pub model_path: Option<PathBuf>,
    pub candidates: usize,
    pub setup_seconds: f64,
    pub clock: f64,
    pub stopped: String,
    pub layers: Vec<LayerRow>,
}

/// Runs the search for `model` into `out` (already claimed by the caller).
pub fn search(model: &str, goal: &Goal, out: &Path, open: Open, ctx: &mut Ctx) -> Result<Outcome> {
    let path = whittle_models::loader::resolve(model)?;
    let is_gguf = path.is_file() && path.extension().is_some_and(|e| e == "gguf");
    let state_path = out.join("state.json");
    let mut setup: Setup = store::read_json(&state_path).unwrap_or_default();
    store::clean_leftovers(out);

    // 1. The baseline.
    let base_l = open(model, false)?;
    let decoder = base_l.model.is_decoder();
    let family = base_l.model.family().to_string();
    goal.metric.check_fits(decoder, &family)?;
    let baseline = match setup.baseline.clone() {
        Some(b) => b,
        None => {
            ctx.note("measuring the baseline ...");
            let t = Instant::now();
            let b = measure(&base_l, &path, goal, None, ctx)?;
            setup.baseline_seconds = t.elapsed().as_secs_f64();
            setup.baseline = Some(b.clone());
            store::write_json(&state_path, &setup)?;
            b
        }
    };
    if setup.baseline_seconds > goal.budget {
        return Err(Error::Config(format!(
            "option `budget` {:.0}s is too small: measuring the baseline alone took {:.0}s",
            goal.budget, setup.baseline_seconds
        )));
    }
    let threshold = goal.max_drop.threshold(goal.metric, baseline.quality)?;
    ctx.note(&format!(
        "baseline: {} {:.4}, {:.2} MB{}; goal: {} within {} (worst acceptable {:.4}), objective {}",
        goal.metric.name(),
        baseline.quality,
        baseline.bytes as f64 / 1e6,
        speed_text(&baseline, decoder),
        goal.metric.name(),
        goal.max_drop,
        threshold,
        goal.objective.name()
    ));
    ctx.note(&format!("level {}: {}", goal.level.name(), goal.level.describe()));

    // 2. The space.
    let imatrix = out.join("imatrix.gguf");
    let mut cands: Vec<Candidate> = Vec::new();
    if is_gguf && decoder {
        let src = Gguf::open(&path)?;
        cands.extend(space::gguf_candidates(&src, goal.level, &imatrix)?);
    }
    let shape = shape_of(&base_l);
    let distill_s = (goal.budget / 8.0).clamp(60.0, 600.0);
    cands.extend(space::stage_candidates(&shape, goal.level, distill_s, model));
    if is_gguf && decoder && goal.objective == Objective::Size {
        // Directory outputs keep f32 embeddings: they cannot be smaller than a GGUF file type.
        cands.retain(|c| matches!(c.plan, Plan::Gguf(_)));
    }
    // Seeded order among equal predictions.
    let mut rng = rand::rngs::StdRng::seed_from_u64(goal.seed);
    cands.shuffle(&mut rng);
    let predicted = |c: &Candidate| match goal.objective {
        Objective::Size | Objective::Memory => c.bytes,
        Objective::Latency | Objective::Throughput => c.cost,
    };
    cands.sort_by(|a, b| predicted(a).total_cmp(&predicted(b)));
    ctx.note(&format!("{} candidates", cands.len()));

    if cands.iter().any(|c| matches!(c.plan, Plan::Gguf(_))) && !imatrix.exists() {
        ctx.note("importance matrix with the output head (calibration text, 16 windows of 512) ...");
        let t = Instant::now();
        let mut l = open(model, false)?;
        ImatrixConfig { head: true, ..Default::default() }.write(&mut l, &imatrix, ctx)?;
        setup.imatrix_seconds = t.elapsed().as_secs_f64();
        store::write_json(&state_path, &setup)?;
    }

    // 3. Probes for the mixed-precision family.
    let groups = if is_gguf && decoder { space::gguf_groups(&Gguf::open(&path)?) } else { Vec::new() };
    if cands.iter().any(|c| !c.probe.is_empty()) {
        probe_groups(model, &groups, &imatrix, &base_l, out, &mut setup, &state_path, open, ctx)?;
    }
    let probe_kld = |c: &Candidate| -> Option<f64> {
        if c.probe.is_empty() {
            return None;
        }
        let reference = setup.probes.iter().find(|p| p.group == "all")?.kld;
        let mut sum = reference;
        for (g, t, w) in &c.probe {
            if t == space::PROBE_REFERENCE {
                continue;
            }
            let gname = groups.get(*g)?.name;
            let p = setup.probes.iter().find(|p| p.group == gname && &p.gtype == t)?;
            sum += w * (p.kld - reference).max(0.0);
        }
        Some(sum.max(reference))
    };
    // The loss the goal allows, as KL (perplexity ratio = exp(KL) to first order).
    let allowed_kld = match goal.metric {
        Metric::Ppl => Some((threshold / baseline.quality).ln()),
        Metric::Kld => Some(threshold),
        _ => None,
    };
    drop(base_l);

    // 4. Trials.
    let setup_seconds =
        setup.baseline_seconds + setup.imatrix_seconds + setup.probes.iter().map(|p| p.seconds).sum::<f64>();
    let log = TrialLog::new(out);
    let done: Vec<Trial> = log.read();
    let mut trials: Vec<Trial> = Vec::new();
    let mut clock = setup_seconds;
    let mut best: Option<usize> = None;
    let mut closest: Option<usize> = None;
    let mut ratios: Vec<f64> = Vec::new();
    let mut tried = vec![false; cands.len()];
    let trial_dir = out.join("trials");
    let stopped;
    loop {
        if goal.max_trials.is_some_and(|m| trials.len() >= m) {
            stopped = format!("--max-trials {} reached", trials.len());
            break;
        }
        let scale = median(&ratios).unwrap_or(1.0).max(0.05);
        // Sizes are compared prediction to prediction (the predictions leave out the file's metadata).
        let best_obj = best.and_then(|b| match goal.objective {
            Objective::Size | Objective::Memory => Some(trials[b].predicted_bytes),
            _ => trials[b].figures.as_ref().and_then(|f| goal.objective.value(f)),
        });
        let exact = matches!(goal.objective, Objective::Size | Objective::Memory);
        // The speed model is rough: rescale it by what the trials measured (median measured / predicted).
        let raw = |c: &Candidate| match goal.objective {
            Objective::Size | Objective::Memory => c.bytes,
            Objective::Latency => c.cost * baseline.latency_ms.unwrap_or(1.0),
            Objective::Throughput => baseline.throughput.unwrap_or(1.0) / c.cost,
        };
        let speed_scale = if exact {
            1.0
        } else {
            let r: Vec<f64> = trials
                .iter()
                .filter_map(|t| {
                    let v = goal.objective.value(t.figures.as_ref()?)?;
                    let c = cands.iter().find(|c| c.name == t.name)?;
                    Some(v / raw(c))
                })
                .filter(|r| r.is_finite() && *r > 0.0)
                .collect();
            median(&r).unwrap_or(1.0)
        };
        let pick = (0..cands.len()).find(|&i| {
            let c = &cands[i];
            if tried[i] {
                return false;
            }
            // Cannot beat the best: exact predictions are trusted; speed estimates get a 25% margin.
            if let Some(b) = best_obj {
                let p = raw(c) * speed_scale;
                let margin = if exact { 1.0 } else { 1.25 };
                let can_beat =
                    if goal.objective.maximise() { p * margin > b } else { p < b * margin && (!exact || p < b) };
                if !can_beat {
                    return false;
                }
            }
            // Predicted to miss the goal (with 20% slack).
            if let (Some(k), Some(a)) = (probe_kld(c), allowed_kld) {
                if k * scale > 1.2 * a {
                    return false;
                }
            }
            // At least as aggressive as a failure of its family.
            !trials.iter().any(|t| {
                !t.passed
                    && t.family == c.family
                    && cands.iter().find(|o| o.name == t.name).is_some_and(|o| {
                        o.aggr.len() == c.aggr.len() && o.aggr.iter().zip(&c.aggr).all(|(a, b)| b >= a)
                    })
            })
        });
        let Some(i) = pick else {
            stopped = "every remaining candidate is predicted to miss the goal or to be no better than the best".into();
            break;
        };
        tried[i] = true;
        let c = &cands[i];
        let n = trials.len();
        let trial = if let Some(t) = done.iter().find(|t| t.name == c.name) {
            let mut t = t.clone();
            t.n = n;
            clock = t.clock.max(clock + t.seconds);
            t
        } else {
            // Would the trial end past the budget?
            let same: Vec<f64> = trials.iter().filter(|t| t.family == c.family).map(|t| t.seconds).collect();
            let est = median(&same).or_else(|| median(&trials.iter().map(|t| t.seconds).collect::<Vec<_>>()));
            if clock + est.unwrap_or(0.0) > goal.budget {
                stopped = format!("budget {:.0}s reached", goal.budget);
                break;
            }
            let t0 = Instant::now();
            let dir = trial_dir.join(format!("{n:03}"));
            let _ = store::remove_any(&dir);
            let made = run_trial(model, c, &dir, goal, open, ctx);
            let (figures, error) = match made {
                Ok(f) => (Some(f), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let seconds = t0.elapsed().as_secs_f64();
            clock += seconds;
            let (passed, drop_rel, drop_abs) = match &figures {
                Some(f) => {
                    let (r, a) = goal::drop(goal.metric, f.quality, baseline.quality);
                    (goal::meets(goal.metric, f.quality, threshold), r, a)
                }
                None => (false, f64::INFINITY, f64::INFINITY),
            };
            let t = Trial {
                n,
                name: c.name.clone(),
                family: c.family.into(),
                knobs: c.knobs.clone(),
                figures,
                error,
                passed,
                drop_rel,
                drop_abs,
                predicted_bytes: c.bytes,
                predicted_kld: probe_kld(c),
                seconds,
                clock,
            };
            log.append(&t)?;
            t
        };
        // Keep the trial's model only while it is the best (or the closest) so far.
        let dir = trial_dir.join(format!("{:03}", trial.n));
        if let (Some(k), Some(f), Some(_)) = (trial.predicted_kld, &trial.figures, allowed_kld) {
            let observed = match goal.metric {
                Metric::Ppl => (f.quality / baseline.quality).ln(),
                _ => f.quality,
            };
            if k > 0.0 {
                ratios.push((observed / k).max(0.0));
            }
        }
        let obj = trial.figures.as_ref().and_then(|f| goal.objective.value(f));
        let is_best = trial.passed
            && obj.is_some_and(|o| {
                best.and_then(|b| trials[b].figures.as_ref().and_then(|f| goal.objective.value(f)))
                    .is_none_or(|b| goal.objective.better(o, b))
            });
        let is_closest = best.is_none()
            && !trial.passed
            && trial.figures.is_some()
            && closest.is_none_or(|c: usize| trial.drop_abs < trials[c].drop_abs);
        ctx.note(&trial_line(&trial, goal, decoder, best.map(|b| &trials[b]), clock));
        trials.push(trial);
        if is_best {
            if let Some(b) = best.or(closest) {
                let _ = store::remove_any(&trial_dir.join(format!("{b:03}")));
            }
            best = Some(n);
            closest = None;
            place_model(out, &dir, &trials[n], model, &cands, goal, open, ctx)?;
        } else if is_closest {
            if let Some(c) = closest {
                let _ = store::remove_any(&trial_dir.join(format!("{c:03}")));
            }
            closest = Some(n);
        } else {
            let _ = store::remove_any(&dir);
        }
    }
    let chosen = best.or(closest);
    let mut model_path = None;
    let mut layers = Vec::new();
    if let Some(c) = chosen {
        let dir = trial_dir.join(format!("{c:03}"));
        let p = place_model(out, &dir, &trials[c], model, &cands, goal, open, ctx)?;
        if let Ok(l) = open(&p.display().to_string(), false) {
            layers = layer_map(&l);
        }
        model_path = Some(p);
    }
    if best.is_none() {
        ctx.note("no candidate met the goal: the closest one is saved");
    }
    Ok(Outcome {
        model: model.to_string(),
        family,
        goal: goal.clone(),
        baseline,
        threshold,
        trials,
        probes: setup.probes,
        chosen,
        met: best.is_some(),
        model_path,
        candidates: cands.len(),
        setup_seconds,
        clock,
        stopped,
        layers,
    })
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[s.len() / 2])
}

/// The model sizes the stage-plan estimates use.
fn shape_of(l: &Loaded) -> space::Shape {
    let (mut attn, mut mlp, mut all_lin) = (0.0, 0.0, 0.0);
    for (name, lin) in l.model.linears() {
        let p = lin.num_params() as f64;
        all_lin += p;
        if whittle_models::Model::is_block_linear(&name) {
            if name.contains("attention") || name.contains("attn") {
                attn += p;
            } else {
                mlp += p;
            }
        }
    }
    let total: f64 = l.source.tensors.iter().map(|t| t.shape.iter().product::<usize>() as f64).sum();
    space::Shape {
        decoder: l.model.is_decoder(),
        attn_params: attn,
        mlp_params: mlp,
        other_params: (total - attn - mlp).max(all_lin - attn - mlp).max(0.0),
        n_blocks: l.model.n_blocks(),
    }
}

/// Quality at the search's fidelity, size on disk, and a short speed benchmark.
fn measure(l: &Loaded, path: &Path, goal: &Goal, base: Option<&Loaded>, ctx: &Ctx) -> Result<Figures> {
    let decoder = l.model.is_decoder();
    let windows = decoder.then_some(goal.eval_windows);
    let name = path.display().to_string();
    let mut m = crate::measure::evaluate(l, &name, &goal.metric.eval_config(windows), base, ctx)?;
    let o = ebench::BenchOptions { n_sent: 320, n_latency: 60, pp: 128, tg: 32, reps: 3, ..Default::default() };
    let pairs = data::parse_sts(&data::read_text(None, data::STS_TEST)?)?;
    let mut quiet = |_: usize, _: usize| {};
    let speed = ebench::bench(l, &pairs, &o, &mut quiet)?;
    m.merge(speed);
    let quality =
        goal.metric.value(&m).ok_or_else(|| Error::Config(format!("{name}: no {} figure", goal.metric.name())))?;
    let bytes = ebench::weight_bytes(path);
    let (latency_ms, throughput) =
        if decoder { (m.tg_tok_s.map(|t| 1000.0 / t), m.pp_tok_s) } else { (m.p50_ms, m.sent_per_s) };
    m.model_bytes = Some(bytes);
    Ok(Figures { quality, bytes, memory_bytes: bytes, latency_ms, throughput, metrics: m })
}

/// Makes candidate `c` under `dir` and measures it.
fn run_trial(model: &str, c: &Candidate, dir: &Path, goal: &Goal, open: Open, ctx: &mut Ctx) -> Result<Figures> {
    let p = materialise(model, c, dir, open, ctx)?;
    let l = open(&p.display().to_string(), false)?;
    let base = if goal.metric == Metric::Kld { Some(open(model, false)?) } else { None };
    measure(&l, &p, goal, base.as_ref(), ctx)
}

/// Writes candidate `c` to `dir/model.gguf` or `dir/model`; returns the path.
fn materialise(model: &str, c: &Candidate, dir: &Path, open: Open, ctx: &mut Ctx) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::File { path: dir.display().to_string(), msg: e.to_string() })?;
    match &c.plan {
        Plan::Gguf(q) => {
            let p = dir.join("model.gguf");
            crate::stages::quantize::quantize_gguf(model, &p, q)?;
            Ok(p)
        }
        Plan::Stages(stages) => {
            let mut l = open(model, true)?;
            for s in stages {
                let mut s = s.clone();
                if let AnyStage::Distill(d) = &mut s {
                    d.train.output = dir.join("distill-best");
                }
                s.check()?;
                s.apply(&mut l, ctx)?;
            }
            let p = dir.join("model");
            crate::output::save(&l, &p, None)?;
            let _ = store::remove_any(&dir.join("distill-best"));
            Ok(p)
        }
    }
}

/// Puts trial `t`'s model at `OUT/model(.gguf)` (remaking it from its plan when its files are gone);
/// returns the path.
#[allow(clippy::too_many_arguments)]
fn place_model(
    out: &Path,
    dir: &Path,
    t: &Trial,
    model: &str,
    cands: &[Candidate],
    goal: &Goal,
    open: Open,
    ctx: &mut Ctx,
) -> Result<PathBuf> {
    let _ = goal;
    let best_json = out.join("best.json");
    let held: Option<String> = store::read_json::<serde_json::Value>(&best_json)
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(String::from));
    let src = ["model.gguf", "model"].iter().map(|n| dir.join(n)).find(|p| p.exists());
    let gguf_dst = out.join("model.gguf");
    let dir_dst = out.join("model");
    if held.as_deref() == Some(t.name.as_str()) && src.is_none() {
        if let Some(p) = [&gguf_dst, &dir_dst].into_iter().find(|p| p.exists()) {
            return Ok(p.clone());
        }
    }
    let src = match src {
        Some(s) => s,
        None => {
            let c = cands
                .iter()
                .find(|c| c.name == t.name)
                .ok_or_else(|| Error::Config(format!("no candidate {}", t.name)))?;
            ctx.note(&format!("remaking {} (its files were removed)", t.name));
            materialise(model, c, dir, open, ctx)?
        }
    };
    let gguf = src.extension().is_some_and(|e| e == "gguf");
    let (dst, other) = if gguf { (gguf_dst, dir_dst) } else { (dir_dst, gguf_dst) };
    store::place(&src, &dst)?;
    let _ = store::remove_any(&other);
    store::write_json(&best_json, &serde_json::json!({ "name": t.name, "trial": t.n, "passed": t.passed }))?;
    Ok(dst)
}

/// The per-(group, type) KL probes of the mixed-precision family.
#[allow(clippy::too_many_arguments)]
fn probe_groups(
    model: &str,
    groups: &[space::Group],
    imatrix: &Path,
    base: &Loaded,
    out: &Path,
    setup: &mut Setup,
    state_path: &Path,
    open: Open,
    ctx: &mut Ctx,
) -> Result<()> {
    let (_, valid) = data::read_text(None, data::WIKI_VALID)?;
    let o = ppl::PplOptions { ctx: 512, chunks: Some(2) };
    let mut jobs: Vec<(String, String, Vec<String>)> = vec![("all".into(), space::PROBE_REFERENCE.into(), Vec::new())];
    for g in groups {
        for t in g.types.iter().filter(|t| **t != space::PROBE_REFERENCE) {
            jobs.push((g.name.into(), t.to_string(), vec![format!("{}={t}", g.regex)]));
        }
    }
    let todo = jobs.iter().filter(|(g, t, _)| !setup.probes.iter().any(|p| &p.group == g && &p.gtype == t)).count();
    if todo > 0 {
        ctx.note(&format!("probing {todo} (tensor group, type) pairs: KL on 2 calibration windows ..."));
    }
    let tmp = out.join("probe.gguf");
    for (g, t, overrides) in jobs {
        if setup.probes.iter().any(|p| p.group == g && p.gtype == t) {
            continue;
        }
        let t0 = Instant::now();
        let q = crate::stages::QuantizeConfig {
            scheme: space::PROBE_REFERENCE.into(),
            overrides,
            allow_requantize: true,
            imatrix: Some(imatrix.to_path_buf()),
            ..Default::default()
        };
        crate::stages::quantize::quantize_gguf(model, &tmp, &q)?;
        let l = open(&tmp.display().to_string(), false)?;
        let mut quiet = |_: usize, _: usize| {};
        let m: Metrics = ppl::perplexity(&l, &valid, &o, Some(base), &mut quiet)?;
        let kld = m.kld_mean.unwrap_or(f64::NAN);
        ctx.note(&format!("  probe {g}={t}: KL {kld:.5}"));
        setup.probes.push(Probe { group: g, gtype: t, kld, seconds: t0.elapsed().as_secs_f64() });
        store::write_json(state_path, setup)?;
    }
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// The chosen model's Linears: storage, bits, density, rank.
pub fn layer_map(l: &Loaded) -> Vec<LayerRow> {
    l.model
        .linears()
        .into_iter()
        .map(|(name, lin)| LayerRow {
            layer: name,
            storage: lin.storage_name(),
            bpw: lin.bits_per_weight(),
            density: lin.stored_params() as f64 / lin.num_params().max(1) as f64,
            rank: lin.rank(),
            shape: (lin.out_features(), lin.in_features()),
        })
        .collect()
}

fn speed_text(f: &Figures, decoder: bool) -> String {
    match (decoder, f.throughput, f.latency_ms) {
        (false, Some(t), Some(l)) => format!(", {t:.0} sent/s, p50 {l:.2} ms"),
        (true, Some(t), Some(l)) => format!(", pp {t:.0} tok/s, tg {:.0} tok/s", 1000.0 / l),
        _ => String::new(),
    }
}

/// The progress line of a trial.
fn trial_line(t: &Trial, goal: &Goal, decoder: bool, best: Option<&Trial>, clock: f64) -> String {
    let fig = match &t.figures {
        Some(f) => format!(
            "{} {:.4} ({:+.2}%) {} | {:.2} MB{}",
            goal.metric.name(),
            f.quality,
            100.0 * t.drop_rel,
            if t.passed { "ok" } else { "miss" },
            f.bytes as f64 / 1e6,
            speed_text(f, decoder)
        ),
        None => format!("failed: {}", t.error.as_deref().unwrap_or("?")),
    };
    let best = best
        .and_then(|b| b.figures.as_ref().map(|f| (b, f)))
        .and_then(|(b, f)| goal.objective.value(f).map(|v| (b, v)))
        .map(|(b, v)| {
            let v = if matches!(goal.objective, Objective::Size | Objective::Memory) { v / 1e6 } else { v };
            format!("best {v:.2} ({})", b.name)
        })
        .unwrap_or_else(|| "no best yet".into());
    format!("trial {:>3} [{:>5.0}s / {:.0}s] {:<48} {fig} | {best}", t.n + 1, clock, goal.budget, t.name)
}
