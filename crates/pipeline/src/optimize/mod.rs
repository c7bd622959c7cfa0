//! `whittle optimize`: recipes (ordered stages from a TOML file, resumable through a stage store), levels
//! and the accuracy-driven search, and the report (`report.json`, a self-contained `report.html`, a
//! terminal summary). It only chains stages and calls `eval` / `bench`: no technique logic lives here.

pub mod goal;
pub mod html;
pub mod recipe;
pub mod search;
pub mod space;
pub mod store;

use std::path::{Path, PathBuf};

use serde::Serialize;
use whittle_core::InvalidOption;
use whittle_models::Loaded;

pub use crate::config::OptimizeConfig;
use crate::{Ctx, Error, Report, Result, Table};
use goal::{MaxDrop, Metric, Objective};
use recipe::{Recipe, RecipeOutcome};
use search::{Goal, Outcome};
use space::Level;

/// A checked request: a recipe to run, or a goal to search for.
pub enum Request {
    Recipe(Recipe),
    Search(Goal),
}

impl OptimizeConfig {
    /// Validates every option (and reads the recipe) before anything is loaded.
    pub fn request(&self) -> Result<Request> {
        let searching = self.level.is_some() || self.max_drop.is_some();
        if let Some(r) = &self.recipe {
            if searching || self.metric.is_some() || self.budget.is_some() || self.max_trials.is_some() {
                return Err(Error::Config(
                    "option `recipe` runs the stages it lists; options `level`, `max_drop`, `metric`, `budget` and `max_trials` belong to the search (give one or the other)".into(),
                ));
            }
            return Ok(Request::Recipe(Recipe::read(r)?));
        }
        let level = match &self.level {
            Some(l) => Level::parse(l)?,
            None if self.max_drop.is_some() => Level::Medium,
            None => {
                return Err(Error::Config(
                    "say what to do: option `recipe` (a TOML file of stages), option `level` (light, medium, full) or option `max_drop` (e.g. 1%)".into(),
                ))
            }
        };
        let max_drop = match &self.max_drop {
            Some(d) => MaxDrop::parse(d)?,
            None => level.default_max_drop(),
        };
        let metric = self.metric.as_deref().map(Metric::parse).transpose()?;
        let objective = Objective::parse(&self.objective)?;
        let budget = match &self.budget {
            Some(b) => goal::parse_duration(b, "budget")?,
            None => level.default_budget(),
        };
        if budget < 30.0 {
            return Err(InvalidOption::new(
                "budget",
                self.budget.as_deref().unwrap_or("?"),
                "is too small to measure even the baseline (at least 30s)",
            )
            .into());
        }
        if self.max_trials == Some(0) {
            return Err(InvalidOption::new("max_trials", 0, "must be at least 1").into());
        }
        if self.eval_windows == 0 {
            return Err(InvalidOption::new("eval_windows", 0, "must be at least 1").into());
        }
        if let Some(p) = &self.peers {
            read_peers(p)?;
        }
        Ok(Request::Search(Goal {
            level,
            // Filled in from the model's family when not given.
            metric: metric.unwrap_or(Metric::Ppl),
            max_drop,
            objective,
            budget,
            max_trials: self.max_trials,
            seed: self.seed,
            eval_windows: self.eval_windows,
        }))
    }
}

/// The peers' JSON lines (`../shared/peers/*.py` print one object per configuration).
pub fn read_peers(path: &Path) -> Result<Vec<serde_json::Value>> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| Error::File { path: path.display().to_string(), msg: format!("reading option `peers`: {e}") })?;
    let mut out = Vec::new();
    for (i, line) in s.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::File {
            path: format!("{}:{}", path.display(), i + 1),
            msg: format!("not a JSON object: {e}"),
        })?;
        if !v.is_object() {
            return Err(Error::File { path: format!("{}:{}", path.display(), i + 1), msg: "not a JSON object".into() });
        }
        out.push(v);
    }
    Ok(out)
}

/// What `optimize` did; the CLI prints it, `report.json` holds it.
#[derive(Serialize)]
pub struct Optimized {
    pub out: PathBuf,
    pub recipe: Option<RecipeOutcome>,
    pub search: Option<Outcome>,
    pub report_html: PathBuf,
    pub report_json: PathBuf,
    #[serde(skip)]
    pub layers_rows: usize,
}

/// Runs `optimize` for `model` into `out`: `open(spec, float)` loads a model (float weights when `float`).
pub fn run(
    model: &str,
    c: &OptimizeConfig,
    out: &Path,
    open: &dyn Fn(&str, bool) -> whittle_models::Result<Loaded>,
    ctx: &mut Ctx,
) -> Result<Optimized> {
    let req = c.request()?;
    let peers = c.peers.as_deref().map(read_peers).transpose()?.unwrap_or_default();
    let path = whittle_models::loader::resolve(model)?;
    if let Request::Recipe(r) = &req {
        r.check_model(&path)?;
    }
    let mut req = req;
    if let Request::Search(g) = &mut req {
        // The metric must fit the model (checked before the output directory is touched).
        let l = open(model, false)?;
        let decoder = l.model.is_decoder();
        match &c.metric {
            Some(_) => g.metric.check_fits(decoder, l.model.family())?,
            None => g.metric = Metric::default_for(decoder),
        }
    }
    let model_key = store::model_key(&path)?;
    let (kind, settings) = match &req {
        Request::Recipe(r) => ("recipe", serde_json::json!({ "recipe": r.source, "key": r.key() })),
        Request::Search(g) => ("search", g.settings()),
    };
    let id = store::RunId {
        kind: kind.into(),
        model: model.into(),
        model_key: model_key.clone(),
        settings_key: store::key(&[kind, &settings.to_string()]),
        settings,
    };
    // One run per output directory at a time (a second one is refused while this one holds the lock).
    let _lock = whittle_formats::out::Claim::take(out, false)?;
    if store::claim(out, &path, &id, c.force)? {
        ctx.note(&format!("{}: resuming the run kept there", out.display()));
    }
    let (recipe_out, search_out, family, layers) = match req {
        Request::Recipe(r) => {
            let o = recipe::run(&r, model, &model_key, out, &|s| open(s, false), ctx)?;
            let l = open(&o.model.display().to_string(), false)?;
            let family = l.model.family().to_string();
            (Some(o), None, family, search::layer_map(&l))
        }
        Request::Search(g) => {
            let o = search::search(model, &g, out, open, ctx)?;
            let (family, layers) = (o.family.clone(), o.layers.clone());
            (None, Some(o), family, layers)
        }
    };
    let stages = recipe_out.as_ref().map(|r| r.stages.clone()).unwrap_or_default();
    let html = html::render(&html::Input {
        model,
        family: &family,
        search: search_out.as_ref(),
        stages: &stages,
        layers: &layers,
        peers: &peers,
    })
    .map_err(|e| Error::Config(format!("rendering the report: {e}")))?;
    let report_html = out.join("report.html");
    store::write_atomic(&report_html, html.as_bytes())?;
    let report_json = out.join("report.json");
    let o = Optimized {
        out: out.to_path_buf(),
        recipe: recipe_out,
        search: search_out,
        report_html,
        report_json,
        layers_rows: layers.len(),
    };
    let mut v = serde_json::to_value(&o).map_err(|e| Error::Config(e.to_string()))?;
    v["layers"] = serde_json::to_value(&layers).unwrap_or_default();
    v["peers"] = peers.into();
    store::write_json(&o.report_json, &v)?;
    Ok(o)
}

impl Report for Optimized {
    fn to_json(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&self.report_json).unwrap_or_default()).unwrap_or_default()
    }

    fn table(&self) -> Table {
        if let Some(s) = &self.search {
            let mut t = Table::new(&["model", s.goal.metric.name(), "drop", "MB", "latency", "throughput", "result"]);
            let row = |name: String, f: &goal::Figures, drop: String, res: &str| {
                vec![
                    name,
                    format!("{:.4}", f.quality),
                    drop,
                    format!("{:.2}", f.bytes as f64 / 1e6),
                    f.latency_ms.map_or("-".into(), |l| format!("{l:.2}")),
                    f.throughput.map_or("-".into(), |t| format!("{t:.1}")),
                    res.to_string(),
                ]
            };
            t.row(row("baseline".into(), &s.baseline, "-".into(), ""));
            for tr in &s.trials {
                if let Some(f) = &tr.figures {
                    let res = if Some(tr.n) == s.chosen {
                        "chosen"
                    } else if tr.passed {
                        "met"
                    } else {
                        "missed"
                    };
                    t.row(row(tr.name.clone(), f, format!("{:+.2}%", 100.0 * tr.drop_rel), res));
                }
            }
            return t;
        }
        if let Some(r) = &self.recipe {
            let mut t = Table::new(&["#", "stage", "line", "s", "summary"]);
            for s in &r.stages {
                t.row(vec![
                    (s.index + 1).to_string(),
                    s.kind.clone(),
                    s.line.to_string(),
                    format!("{:.1}", s.seconds),
                    s.summary.last().cloned().unwrap_or_default(),
                ]);
            }
            return t;
        }
        Table::default()
    }

    fn summary(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = &self.search {
            let chosen = s.chosen.map(|c| &s.trials[c]);
            match (chosen, s.met) {
                (Some(t), true) => out.push(format!(
                    "chosen: {} — {} {:.4} ({:+.2}%, goal {}), {:.2} MB ({:.2}x the baseline's size); {} trials in {:.0}s ({})",
                    t.name,
                    s.goal.metric.name(),
                    t.figures.as_ref().map_or(f64::NAN, |f| f.quality),
                    100.0 * t.drop_rel,
                    s.goal.max_drop,
                    t.figures.as_ref().map_or(0.0, |f| f.bytes as f64 / 1e6),
                    t.figures.as_ref().map_or(f64::NAN, |f| f.bytes as f64 / s.baseline.bytes as f64),
                    s.trials.len(),
                    s.clock,
                    s.stopped
                )),
                (Some(t), false) => out.push(format!(
                    "goal NOT met ({} within {}): the closest candidate, {} ({:+.2}%), is saved; {} trials in {:.0}s ({})",
                    s.goal.metric.name(),
                    s.goal.max_drop,
                    t.name,
                    100.0 * t.drop_rel,
                    s.trials.len(),
                    s.clock,
                    s.stopped
                )),
                (None, _) => out.push(format!("no candidate could be measured; {} trials ({})", s.trials.len(), s.stopped)),
            }
            if let Some(p) = &s.model_path {
                out.push(format!("model: {}", p.display()));
            }
        }
        if let Some(r) = &self.recipe {
            out.push(format!(
                "{} stages ({} kept from an earlier run); model: {}",
                r.stages.len(),
                r.resumed,
                r.model.display()
            ));
            for m in &r.measured {
                out.push(format!("measured: {}", recipe::summary_line(m)));
            }
        }
        out.push(format!("report: {} (and {})", self.report_html.display(), self.report_json.display()));
        out
    }
}
