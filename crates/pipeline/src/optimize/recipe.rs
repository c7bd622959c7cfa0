//! Recipes: a TOML file of ordered stages, each a `[[stage]]` table whose `stage` key names the technique
//! and whose other keys are that command's options (the CLI flags' names with underscores, the same
//! defaults; `override = ["re:REGEX=SCHEME"]` for per-layer schemes of `quantize`):
//!
//! ```toml
//! [[stage]]
//! stage = "prune"
//! method = "wanda"
//! sparsity = 0.3
//!
//! [[stage]]
//! stage = "quantize"
//! scheme = "w8a8-dynamic"
//!
//! [[stage]]
//! stage = "eval"
//! ```
//!
//! Everything is checked before any work starts — unknown keys and stages, option values, and the order
//! (GPTQ after a factorisation, pruning a quantized model, GGUF file types anywhere but on a GGUF source)
//! — and errors name the recipe's line. [`run`] applies the stages through the store of
//! [`super::store`]: each stage's output is kept under `OUT/stages/NN-kind/`, keyed by a hash of its input
//! and configuration, so a rerun (after a kill, or with a longer recipe) skips what is finished.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use whittle_eval::Metrics;
use whittle_models::Loaded;

use super::store::{self, StageRecord};
use crate::config::{BenchConfig, EvalConfig};
use crate::stages::{AnyStage, QuantizeConfig};
use crate::{bail, Ctx, Error, Result, Stage};

/// One step of a recipe.
#[derive(Debug, Clone)]
pub enum Step {
    /// A stage on the model in memory.
    Stage(AnyStage),
    /// A llama.cpp file type written from the GGUF source (`quantize` with a GGUF `scheme`).
    Gguf(QuantizeConfig),
    /// Measure quality (`eval`).
    Eval(EvalConfig),
    /// Measure speed (`bench`).
    Bench(BenchConfig),
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Stage(s) => s.name(),
            Self::Gguf(_) => "quantize",
            Self::Eval(_) => "eval",
            Self::Bench(_) => "bench",
        }
    }

    /// Whether the step changes the model.
    pub fn changes_model(&self) -> bool {
        matches!(self, Self::Stage(_) | Self::Gguf(_))
    }

    /// The configuration as JSON (what the stage's key hashes).
    pub fn config_json(&self) -> serde_json::Value {
        let v = match self {
            Self::Stage(AnyStage::Prune(c) | AnyStage::Structured(c)) => serde_json::to_value(c),
            Self::Stage(AnyStage::Lowrank(c)) => serde_json::to_value(c),
            Self::Stage(AnyStage::Share(c)) => serde_json::to_value(c),
            Self::Stage(AnyStage::Quantize(c)) | Self::Gguf(c) => serde_json::to_value(c),
            Self::Stage(AnyStage::Distill(c)) => serde_json::to_value(c),
            Self::Stage(AnyStage::Finetune(c)) => serde_json::to_value(c),
            Self::Eval(c) => serde_json::to_value(c),
            Self::Bench(c) => serde_json::to_value(c),
        };
        let mut v = v.unwrap_or(serde_json::Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert("stage".into(), self.kind().into());
        }
        v
    }
}

/// A parsed, checked recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The file it came from (for messages).
    pub source: String,
    /// Each step with its line in the file.
    pub steps: Vec<(usize, Step)>,
}

/// The stages `optimize` knows, for messages.
const KINDS: &str = "prune, structured, lowrank, share, distill, finetune, quantize, eval, bench";

impl Recipe {
    /// Reads and checks the recipe at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::File { path: path.display().to_string(), msg: format!("reading the recipe: {e}") })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks recipe `text` (named `source` in errors).
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let err = |line: usize, msg: String| Error::File { path: format!("{source}:{line}"), msg };
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            err(line, format!("not a valid TOML recipe: {}", e.message()))
        })?;
        if let Some(k) = table.keys().find(|k| k.as_str() != "stage" && k.as_str() != "description") {
            let line = find_line(text, k).unwrap_or(1);
            return Err(err(line, format!("unknown key `{k}` (a recipe is a list of [[stage]] tables)")));
        }
        let headers: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[stage]]"))
            .map(|(i, _)| i + 1)
            .collect();
        let stages = match table.get("stage") {
            Some(toml::Value::Array(a)) => a.clone(),
            Some(_) => {
                return Err(err(find_line(text, "stage").unwrap_or(1), "`stage` must be [[stage]] tables".into()))
            }
            None => return Err(err(1, "no stages: add [[stage]] tables (see examples/recipes/)".into())),
        };
        let mut steps = Vec::new();
        for (i, v) in stages.into_iter().enumerate() {
            let line = headers.get(i).copied().unwrap_or(0);
            let toml::Value::Table(t) = v else {
                return Err(err(line, format!("stage {} is not a table", i + 1)));
            };
            let kind = match t.get("stage") {
                Some(toml::Value::String(s)) => s.clone(),
                _ => return Err(err(line, format!("stage {} has no `stage = \"...\"` key (one of {KINDS})", i + 1))),
            };
            let what = |e: &dyn std::fmt::Display| err(line, format!("stage `{kind}`: {e}"));
            let step =
                match kind.as_str() {
                    "eval" | "bench" => {
                        let mut t = t.clone();
                        t.remove("stage");
                        if kind == "eval" {
                            Step::Eval(EvalConfig::deserialize(toml::Value::Table(t)).map_err(|e| what(&e))?)
                        } else {
                            Step::Bench(BenchConfig::deserialize(toml::Value::Table(t)).map_err(|e| what(&e))?)
                        }
                    }
                    "export" => return Err(err(
                        line,
                        "stage `export` is not available yet (whittle export is planned); end the recipe at the model"
                            .into(),
                    )),
                    "prune" | "structured" | "lowrank" | "share" | "quantize" | "distill" | "finetune" => {
                        match AnyStage::deserialize(toml::Value::Table(t)).map_err(|e| what(&e))? {
                            AnyStage::Quantize(q) if q.gguf_ftype().is_some() => Step::Gguf(q),
                            s => Step::Stage(s),
                        }
                    }
                    other => return Err(err(line, format!("unknown stage `{other}` (one of {KINDS})"))),
                };
            match &step {
                Step::Stage(s) => {
                    // The teacher defaults to the model being optimised, the output to the stage directory.
                    let mut s = s.clone();
                    if let AnyStage::Distill(d) = &mut s {
                        if d.teacher.is_empty() {
                            d.teacher = "(the model)".into();
                        }
                    }
                    if let AnyStage::Distill(crate::stages::DistillConfig { train, .. })
                    | AnyStage::Finetune(crate::stages::FinetuneConfig { train, .. }) = &mut s
                    {
                        if train.output.as_os_str().is_empty() {
                            train.output = "(the stage directory)".into();
                        }
                    }
                    s.check().map_err(|e| what(&e))?
                }
                Step::Gguf(q) => q.check().map_err(|e| what(&e))?,
                _ => {}
            }
            steps.push((line, step));
        }
        let r = Self { source: source.to_string(), steps };
        r.check_order().map_err(|(line, msg)| err(line, msg))?;
        Ok(r)
    }

    /// The order rules: what cannot follow what.
    fn check_order(&self) -> std::result::Result<(), (usize, String)> {
        let mut quantized: Option<usize> = None;
        let mut factorised: Option<usize> = None;
        let mut changed: Option<usize> = None;
        let mut gguf: Option<usize> = None;
        for (line, step) in &self.steps {
            let line = *line;
            if let Some(g) = gguf.filter(|_| step.changes_model()) {
                return Err((line, format!("stage `{}` after the GGUF file type of line {g}: a GGUF file type is the last change of a recipe (only eval and bench may follow)", step.kind())));
            }
            match step {
                Step::Gguf(_) => {
                    if let Some(c) = changed {
                        return Err((line, format!("a GGUF file type is written from the GGUF source's own tensors, but line {c} changed the model first; quantize to a directory scheme (w4a16, w8a16, ...) after other stages")));
                    }
                    gguf = Some(line);
                }
                Step::Stage(s) => {
                    if let AnyStage::Quantize(q) = s {
                        if q.method != "rtn" {
                            if let Some(f) = factorised {
                                return Err((line, format!("quantize with method `{}` after the factorisation of line {f}: GPTQ and AWQ round dense weights (low-rank factors are quantized with method rtn)", q.method)));
                            }
                        }
                        if let Some(p) = quantized.filter(|_| !q.allow_requantize) {
                            return Err((line, format!("a second quantize after line {p}: the weights are already quantized (set allow_requantize = true to requantize from their dequantized values)")));
                        }
                        quantized = Some(line);
                    } else if let Some(p) = quantized {
                        return Err((line, format!("stage `{}` after the quantization of line {p}: prune, factorise, share and train the float model, then quantize", s.name())));
                    }
                    if matches!(s, AnyStage::Lowrank(_)) {
                        factorised = Some(line);
                    }
                    changed = Some(line);
                }
                Step::Eval(_) | Step::Bench(_) => {}
            }
        }
        if changed.is_none() && gguf.is_none() {
            return Err((
                self.steps.first().map_or(1, |s| s.0),
                "the recipe changes nothing: add a stage that compresses or quantizes".into(),
            ));
        }
        Ok(())
    }

    /// Checks what depends on the model file: GGUF file types need a GGUF source.
    pub fn check_model(&self, model: &Path) -> Result<()> {
        for (line, step) in &self.steps {
            if matches!(step, Step::Gguf(_)) && model.extension().is_none_or(|e| e != "gguf") {
                return Err(Error::File {
                    path: format!("{}:{line}", self.source),
                    msg: format!(
                        "a GGUF file type needs a GGUF model; {} is not one (use a directory scheme such as w4a16)",
                        model.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// A stable hash of the steps (the run's identity).
    pub fn key(&self) -> String {
        let parts: Vec<String> = self.steps.iter().map(|(_, s)| s.config_json().to_string()).collect();
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        store::key(&refs)
    }
}

/// The 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The first line that starts with `key` (for errors about top-level keys).
fn find_line(text: &str, key: &str) -> Option<usize> {
    text.lines().position(|l| l.trim_start().starts_with(key)).map(|i| i + 1)
}

/// What a recipe run did, stage by stage.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecipeOutcome {
    pub stages: Vec<StageRecord>,
    /// Stages taken from the store of an earlier run.
    pub resumed: usize,
    /// The model written: `OUT/model` or `OUT/model.gguf`.
    pub model: PathBuf,
    /// The figures of the eval and bench steps, in order.
    pub measured: Vec<Metrics>,
}

/// Applies `recipe` to `model` (opened with `open`), keeping each stage's output in `out`'s store and the
/// final model at `OUT/model` (or `OUT/model.gguf`).
pub fn run(
    recipe: &Recipe,
    model: &str,
    model_key: &str,
    out: &Path,
    open: &dyn Fn(&str) -> whittle_models::Result<Loaded>,
    ctx: &mut Ctx,
) -> Result<RecipeOutcome> {
    let mut key = model_key.to_string();
    let mut current: Option<Loaded> = None;
    // Where the model as of the last finished stage is on disk (the source at first).
    let mut on_disk = PathBuf::from(model);
    let mut records = Vec::new();
    let mut resumed = 0;
    let mut measured = Vec::new();
    let mut fresh = false;
    for (i, (line, step)) in recipe.steps.iter().enumerate() {
        let mut step = step.clone();
        if let Step::Stage(AnyStage::Distill(d)) = &mut step {
            if d.teacher.is_empty() {
                d.teacher = model.to_string();
            }
        }
        let config = step.config_json();
        key = store::key(&[&key, &config.to_string()]);
        let kind = step.kind();
        let dir = store::stage_dir(out, i, kind);
        if !fresh {
            if let Some(rec) = store::finished(out, i, kind, &key) {
                ctx.note(&format!("stage {} ({kind}, line {line}): finished earlier, kept ({})", i + 1, dir.display()));
                if let Some(m) = &rec.model {
                    on_disk = dir.join(m);
                    current = None;
                }
                if !step.changes_model() {
                    measured.push(serde_json::from_value(rec.report.clone()).unwrap_or_default());
                }
                records.push(rec);
                resumed += 1;
                continue;
            }
        }
        fresh = true;
        let _ = store::remove_any(&dir);
        let tmp = store::tmp_name(&dir);
        let _ = store::remove_any(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::File { path: tmp.display().to_string(), msg: e.to_string() })?;
        ctx.note(&format!("stage {} ({kind}, line {line}) ...", i + 1));
        let t0 = Instant::now();
        let (report, summary, model_name) = match &step {
            Step::Gguf(q) => {
                let dst = tmp.join("model.gguf");
                let r = crate::stages::quantize::quantize_gguf(&on_disk.display().to_string(), &dst, q)?;
                current = None;
                (r.to_json(), r.summary(), Some("model.gguf"))
            }
            Step::Stage(s) => {
                let mut l = match current.take() {
                    Some(l) => l,
                    None => open(&on_disk.display().to_string())?,
                };
                let mut s = s.clone();
                if let AnyStage::Distill(crate::stages::DistillConfig { train, .. })
                | AnyStage::Finetune(crate::stages::FinetuneConfig { train, .. }) = &mut s
                {
                    if train.output.as_os_str().is_empty() {
                        train.output = tmp.join("best");
                    }
                }
                let mut r = s.apply(&mut l, ctx)?;
                let _ = store::remove_any(&tmp.join("best"));
                crate::output::save(&l, &tmp.join("model"), Some(r.as_mut()))?;
                current = Some(l);
                (r.to_json(), r.summary(), Some("model"))
            }
            Step::Eval(c) => {
                let l = loaded(&mut current, &on_disk, open)?;
                let m = crate::measure::evaluate(l, &on_disk.display().to_string(), c, None, ctx)?;
                let s = vec![summary_line(&m)];
                measured.push(m.clone());
                (serde_json::to_value(&m).unwrap_or_default(), s, None)
            }
            Step::Bench(c) => {
                let l = loaded(&mut current, &on_disk, open)?;
                let m = crate::measure::bench(l, &on_disk.display().to_string(), c, ctx)?;
                let s = vec![summary_line(&m)];
                measured.push(m.clone());
                (serde_json::to_value(&m).unwrap_or_default(), s, None)
            }
        };
        let rec = StageRecord {
            index: i,
            kind: kind.to_string(),
            line: *line,
            key: key.clone(),
            config,
            seconds: t0.elapsed().as_secs_f64(),
            report,
            summary,
            model: model_name.map(String::from),
        };
        store::write_json(&tmp.join("stage.json"), &rec)?;
        std::fs::rename(&tmp, &dir).map_err(|e| Error::File { path: dir.display().to_string(), msg: e.to_string() })?;
        for s in &rec.summary {
            ctx.note(&format!("  {s}"));
        }
        if let Some(m) = &rec.model {
            on_disk = dir.join(m);
            if let Some(l) = current.as_mut() {
                // Later stages and measurements see the model as saved.
                l.source.path = on_disk.clone();
            }
        }
        records.push(rec);
    }
    let gguf = on_disk.extension().is_some_and(|e| e == "gguf");
    let dst = out.join(if gguf { "model.gguf" } else { "model" });
    if on_disk == Path::new(model) {
        bail!("the recipe changed nothing");
    }
    store::place(&on_disk, &dst)?;
    Ok(RecipeOutcome { stages: records, resumed, model: dst, measured })
}

fn loaded<'a>(
    current: &'a mut Option<Loaded>,
    path: &Path,
    open: &dyn Fn(&str) -> whittle_models::Result<Loaded>,
) -> Result<&'a Loaded> {
    if current.is_none() {
        *current = Some(open(&path.display().to_string())?);
    }
    Ok(current.as_ref().expect("just set"))
}

/// One line of figures.
pub fn summary_line(m: &Metrics) -> String {
    let mut parts = Vec::new();
    let f = |name: &str, v: Option<f64>, d: usize| v.map(|v| format!("{name} {v:.d$}"));
    parts.extend(f("ppl", m.ppl, 4));
    parts.extend(f("kld", m.kld_mean, 5));
    parts.extend(f("cloze %", m.cloze_acc, 2));
    parts.extend(f("sts", m.sts_spearman, 2));
    parts.extend(f("sst2 %", m.sst2_acc, 2));
    parts.extend(f("sent/s", m.sent_per_s, 1));
    parts.extend(f("p50 ms", m.p50_ms, 2));
    parts.extend(f("pp tok/s", m.pp_tok_s, 1));
    parts.extend(f("tg tok/s", m.tg_tok_s, 1));
    parts.extend(m.model_bytes.map(|b| format!("{:.2} MB", b as f64 / 1e6)));
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> std::result::Result<Recipe, String> {
        Recipe::parse(t, "r.toml").map_err(|e| e.to_string())
    }

    /// Found by scripts/fuzz.sh (recipe target, input recipe-3690ff8e26834311): `calib_samples` of 2^40 was
    /// accepted, and the stage then calibrated on the whole text (its window arithmetic, `samples × seq_len`,
    /// one step from overflowing).
    #[test]
    fn fuzz_recipe_calib_samples_huge_is_refused_with_its_line() {
        let e = parse(
            "[[stage]]\nallow_requantize = true\ngroup_size = 32\nmethod = \"gptq\"\nscheme = \"w4a16\"\nstage = \"quantize\"\n\n[stage.calibration]\ncalib_samples = 1099511627776\n",
        )
        .unwrap_err();
        assert!(e.contains("r.toml:"), "{e}");
        assert!(e.contains("`calib_samples` 1099511627776: must be at most 65536"), "{e}");
    }

    #[test]
    fn a_recipe_parses_into_checked_steps() {
        let r = parse(
            "# comment\n[[stage]]\nstage = \"prune\"\nmethod = \"wanda\"\nsparsity = 0.3\n\n[[stage]]\nstage = \"quantize\"\nscheme = \"w8a8-dynamic\"\noverride = [\"re:.*output.*=w8a16\"]\n\n[[stage]]\nstage = \"eval\"\nchunks = 2\n",
        )
        .unwrap();
        let kinds: Vec<(usize, &str)> = r.steps.iter().map(|(l, s)| (*l, s.kind())).collect();
        assert_eq!(kinds, vec![(2, "prune"), (7, "quantize"), (12, "eval")]);
        assert_eq!(r.key(), parse("[[stage]]\nstage=\"prune\"\nmethod=\"wanda\"\nsparsity=0.3\n[[stage]]\nstage=\"quantize\"\nscheme=\"w8a8-dynamic\"\noverride=[\"re:.*output.*=w8a16\"]\n[[stage]]\nstage=\"eval\"\nchunks=2\n").unwrap().key());
    }

    #[test]
    fn bad_recipes_name_the_line() {
        let e = parse("[[stage]]\nstage = \"prune\"\nmethod = \"wanda\"\nsparsity = 0.3\n\n[[stage]]\nstage = \"quantize\"\nscheem = \"w8a8-dynamic\"\n").unwrap_err();
        assert!(e.contains("r.toml:6") && e.contains("scheem"), "{e}");
        let e = parse("[[stage]]\nstage = \"squash\"\n").unwrap_err();
        assert!(e.contains("r.toml:1") && e.contains("unknown stage `squash`"), "{e}");
        let e = parse("[[stage]]\nstage = \"lowrank\"\nratio = 0.8\n[[stage]]\nstage = \"quantize\"\nscheme = \"w4a16\"\nmethod = \"gptq\"\n").unwrap_err();
        assert!(e.contains("r.toml:4") && e.contains("factorisation of line 1"), "{e}");
        let e = parse("[[stage]]\nstage = \"quantize\"\nscheme = \"w8a8-dynamic\"\n[[stage]]\nstage = \"prune\"\nmethod = \"magnitude\"\nsparsity = 0.5\n").unwrap_err();
        assert!(e.contains("r.toml:4") && e.contains("after the quantization of line 1"), "{e}");
        let e = parse("[[stage]]\nstage = \"prune\"\nmethod = \"wanda\"\nsparsity = 0.3\n[[stage]]\nstage = \"quantize\"\nscheme = \"q4_k_m\"\n").unwrap_err();
        assert!(e.contains("r.toml:5") && e.contains("GGUF"), "{e}");
        let e = parse("[[stage]]\nstage = \"quantize\"\nscheme = \"w8a8-static\"\nsmoothquant = 5.0\n").unwrap_err();
        assert!(e.contains("r.toml:1") && e.contains("smoothquant"), "{e}");
        let e = parse("[[stage]]\nstage = \"eval\"\n").unwrap_err();
        assert!(e.contains("changes nothing"), "{e}");
        let e = parse("stages = 1\n").unwrap_err();
        assert!(e.contains("r.toml:1") && e.contains("unknown key `stages`"), "{e}");
        let e = parse("[[stage]]\nstage = \"export\"\n").unwrap_err();
        assert!(e.contains("not available yet"), "{e}");
        let e = parse("[[stage]\n").unwrap_err();
        assert!(e.contains("r.toml:1") && e.contains("TOML"), "{e}");
    }

    #[test]
    fn every_example_recipe_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/recipes");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            Recipe::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
        assert!(n >= 5);
    }
}
