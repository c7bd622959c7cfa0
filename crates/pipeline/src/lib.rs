//! whittle-pipeline: every technique as a **stage** — a typed configuration (serde with
//! `deny_unknown_fields`; with the `cli` feature the same struct is the CLI's argument group, so names, docs
//! and defaults are declared once), one [`Stage::apply`] on a loaded model, and a report implementing
//! [`Report`] (JSON, table rows, summary lines).
//!
//! The orchestration that used to live in the CLI is here: per-family calibration budgets ([`calib`]),
//! progressive schedules and structured pruning's block influence / Taylor saliency ([`stages::prune`]),
//! SmoothQuant → recalibrate → AWQ → rounding and AWQ-before-GPTQ ([`stages::quantize`]), the token weights of
//! the factorised embedding ([`stages::share`]), the training loops' evaluation and best-model saving
//! ([`stages::train`]), and the one output rule ([`output`]). Interfaces (CLI, recipes, server, search) build a
//! config, call a stage and print its report; they hold no technique logic.
//!
//! ```no_run
//! use whittle_pipeline::{stages::{PruneConfig, QuantizeConfig}, Ctx, Stage};
//! let mut l = whittle_models::load("model-dir", &Default::default())?;
//! let prune = PruneConfig { structured: Some("heads=0.25".into()), ..Default::default() };
//! let quant = QuantizeConfig { scheme: "w8a8-dynamic".into(), ..Default::default() };
//! let mut ctx = Ctx::quiet();
//! for stage in [&prune as &dyn Stage, &quant] {
//!     stage.check()?;
//!     let report = stage.apply(&mut l, &mut ctx)?;
//!     println!("{}", report.to_json());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod calib;
pub mod config;
pub mod ctx;
pub mod importance;
pub mod measure;
pub mod optimize;
pub mod output;
pub mod report;
pub mod stages;

pub use ctx::Ctx;
pub use report::{Report, Table};
pub use stages::AnyStage;
use whittle_core::InvalidOption;
use whittle_models::Loaded;

/// Errors of the stages. Options are named as configs spell them (`option `name``), never as CLI flags.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Option(#[from] InvalidOption),
    /// A combination of options that cannot run together, or a model the stage does not apply to.
    #[error("{0}")]
    Config(String),
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error(transparent)]
    Core(#[from] whittle_core::Error),
    #[error(transparent)]
    Model(#[from] whittle_models::Error),
    #[error(transparent)]
    Eval(#[from] whittle_eval::Error),
    #[error(transparent)]
    Quant(#[from] whittle_quant::Error),
    #[error(transparent)]
    Calib(#[from] whittle_calib::Error),
    #[error(transparent)]
    Compress(#[from] whittle_compress::Error),
    #[error(transparent)]
    Train(#[from] whittle_train::Error),
    #[error(transparent)]
    Format(#[from] whittle_formats::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err(Error::Config(..))` from a format string.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::Error::Config(format!($($t)*))) };
}

/// One technique applied to a loaded model.
pub trait Stage {
    /// The stage's name in recipes and reports (`prune`, `quantize`, ...).
    fn name(&self) -> &'static str;
    /// Validates the configuration on its own, before any model is loaded or any work starts.
    fn check(&self) -> Result<()>;
    /// Applies the stage to `l` in place (calibrating on the configured text where the technique needs it).
    fn apply(&self, l: &mut Loaded, ctx: &mut Ctx) -> Result<Box<dyn Report>>;
}
