//! Calibration text and budgets, declared once for every stage that calibrates: the text (default
//! WikiText-2 valid, never the test split) and how much of it each family runs by default.

use whittle_calib::observe::CalibOptions;
use whittle_core::InvalidOption;
use whittle_eval::data;
use whittle_models::Loaded;

pub use crate::config::CalibConfig;
use crate::Result;

/// Default calibration windows for decoders (of 512 tokens); Wanda needs only per-channel norms, which 4
/// windows already estimate well.
pub const DECODER_SAMPLES: usize = 16;
pub const WANDA_DECODER_SAMPLES: usize = 4;
/// Default calibration windows for `method` gptq on decoders (with the calibration forward in int8, see
/// `QuantizeConfig::calib_int8`). GPTQ's result moves with the windows it sees: SmolLM2 w4a16 g64
/// act-order, WikiText-2 PPL (f32 29.04, RTN 43.42): 16 windows 37.26, 32 windows 38.57, with int8
/// calibration 64 windows 37.29 and 128 windows 36.65, i.e. 43%, 34%, 43% and 47% of RTN's increase
/// removed. 128 is the count that does so reliably; llm-compressor's default is 512 samples.
pub const GPTQ_DECODER_SAMPLES: usize = 128;
/// Default calibration sentences for encoders (of at most 128 tokens).
pub const ENCODER_SAMPLES: usize = 256;

/// The text and options a calibrating stage runs on.
pub struct Calib {
    pub text: String,
    pub opts: CalibOptions,
}

impl CalibConfig {
    /// Refuses empty budgets (before any model is loaded).
    pub fn check(&self) -> Result<()> {
        self.check_ranges()
    }

    /// Reads the text and fills the family's defaults: decoders `decoder_samples` windows of 512 tokens,
    /// encoders 256 sentences of at most 128.
    pub fn resolve(&self, l: &Loaded, decoder_samples: usize) -> Result<Calib> {
        let decoder = l.model.is_decoder();
        let samples = if decoder { decoder_samples } else { ENCODER_SAMPLES };
        let ctx = l.model.max_positions();
        // Windows past the model's positions would run where RoPE / position embeddings never were (and grow
        // the attention quadratically): refused before the text is read.
        if let Some(n) = self.calib_seq_len.filter(|&n| n > ctx) {
            return Err(InvalidOption::new(
                "calib_seq_len",
                n,
                format!("longer than the model's context of {ctx} positions"),
            )
            .into());
        }
        self.resolve_with(samples, (if decoder { 512 } else { 128 }).min(ctx))
    }

    /// Reads the text, with these defaults for what the config leaves open.
    pub fn resolve_with(&self, samples: usize, seq_len: usize) -> Result<Calib> {
        self.check()?;
        let (source, text) = data::read_text(self.calib.as_deref(), data::WIKI_VALID)?;
        let opts = CalibOptions {
            samples: self.calib_samples.unwrap_or(samples),
            seq_len: self.calib_seq_len.unwrap_or(seq_len),
            source,
            int8: false,
        };
        Ok(Calib { text, opts })
    }
}
