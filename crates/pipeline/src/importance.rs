//! Per-layer measurements that other stages read: sensitivities (each block Linear's KL cost when quantized
//! alone, read by `quantize --target-bpw`) and importance matrices (Σx² per input channel, llama.cpp's GGUF
//! imatrix format, read by GGUF quantization).

use std::path::Path;

use whittle_core::InvalidOption;
use whittle_models::Loaded;
use whittle_quant::mixed::{self, Sensitivity, SensitivityOptions};

use crate::calib::CalibConfig;
pub use crate::config::{ImatrixConfig, SensitivityConfig};
use crate::{bail, Ctx, Result};

/// `8,4,3,2` → bit widths of the grouped formats (`option` names the option in errors).
pub fn parse_bits(s: &str, option: &'static str) -> Result<Vec<u32>> {
    let v = s
        .split(',')
        .map(|b| {
            b.trim().parse::<u32>().ok().filter(|b| [2, 3, 4, 8].contains(b)).ok_or_else(|| {
                InvalidOption::new(
                    option,
                    format!("`{s}`"),
                    format!("`{b}` is not a bit width of the grouped formats (8, 4, 3, 2)"),
                )
            })
        })
        .collect::<std::result::Result<Vec<u32>, _>>()?;
    if v.is_empty() {
        return Err(InvalidOption::new(option, s, "give at least one bit width").into());
    }
    Ok(v)
}

impl SensitivityConfig {
    /// The measurement's options, checked (before any model is loaded).
    pub fn options(&self) -> Result<SensitivityOptions> {
        if self.group_size == 0 || !self.group_size.is_multiple_of(32) {
            return Err(InvalidOption::new("group_size", self.group_size, "must be a positive multiple of 32").into());
        }
        let candidates = parse_bits(&self.candidates, "candidates")?;
        let probe_bits = parse_bits(&self.probe_bits.to_string(), "probe_bits")?[0];
        self.calibration.check()?;
        Ok(SensitivityOptions { candidates, probe_bits, group_size: self.group_size, zero_point: self.zero_point })
    }

    /// Measures every block Linear of `l` (LLaMA decoders).
    pub fn measure(&self, l: &mut Loaded, ctx: &Ctx) -> Result<Sensitivity> {
        measure(l, &self.calibration, &self.options()?, ctx)
    }
}

/// [`mixed::sensitivity`] on the calibration text of `budget`.
pub fn measure(l: &mut Loaded, calib: &CalibConfig, o: &SensitivityOptions, ctx: &Ctx) -> Result<Sensitivity> {
    let c = calib.resolve_with(2, 256)?;
    let s = mixed::sensitivity(l, &c.text, &c.opts, o, ctx.progress("sensitivity"))?;
    ctx.note(&format!(
        "sensitivity: {} layers on {} tokens of {} in {:.1}s",
        s.layers.len(),
        s.tokens,
        c.opts.source,
        s.seconds
    ));
    Ok(s)
}

/// Reads a `whittle sensitivity` file measured on `l`'s model with these candidate formats.
pub fn read(path: &Path, l: &Loaded, o: &SensitivityOptions) -> Result<Sensitivity> {
    let file = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::File { path: file(), msg: e.to_string() })?;
    let s: Sensitivity = serde_json::from_str(&text)
        .map_err(|e| crate::Error::File { path: file(), msg: format!("not a `whittle sensitivity` JSON file: {e}") })?;
    s.check_matches(&l.model, &file())?;
    if s.group_size != o.group_size || s.zero_point != o.zero_point {
        let zp = |z: bool| if z { " with option `zero_point`" } else { "" };
        bail!(
            "{}: measured with group {}{}, but this run quantizes with option `group_size` {}{}",
            file(),
            s.group_size,
            zp(s.zero_point),
            o.group_size,
            zp(o.zero_point)
        );
    }
    Ok(s)
}

impl ImatrixConfig {
    pub fn check(&self) -> Result<()> {
        self.calibration.check()
    }

    /// Collects Σx² per input channel of every block Linear of the decoder `l` and writes it to `out`
    /// (atomically); returns the number of tensors.
    pub fn write(&self, l: &mut Loaded, out: &Path, ctx: &Ctx) -> Result<usize> {
        if !l.model.is_decoder() {
            bail!("imatrix: llama.cpp's imatrix names GGUF tensors of decoders; this model is an encoder");
        }
        let c = self.calibration.resolve_with(16, 512)?;
        let cal = whittle_calib::observe::calibrate(l, &c.text, &c.opts, ctx.progress("imatrix"))?;
        let chunks = cal.tokens / c.opts.seq_len;
        let head = self.head.then(|| {
            let tied = !l.source.tensors.iter().any(|t| t.name == "output.weight" || t.name == "lm_head.weight");
            if tied {
                "token_embd.weight"
            } else {
                "output.weight"
            }
        });
        let n = whittle_quant::imatrix::write_imatrix(&cal.stats, out, &c.opts.source, chunks, c.opts.seq_len, head)?;
        ctx.note(&format!("{n} tensors, {} tokens of {}, {:.1}s", cal.tokens, c.opts.source, cal.seconds));
        Ok(n)
    }
}
