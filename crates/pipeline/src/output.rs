//! The one rule for outputs: an existing output is replaced only when asked, the model is written atomically
//! (a temporary name in the destination directory, renamed at the end), and sizes are read back from disk.

use std::path::Path;

use whittle_core::{DType, InvalidOption};
use whittle_models::Loaded;

use crate::{Error, Result};

/// Refuses an existing `out` unless `force` (checked before any work starts).
pub fn check(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        return Err(InvalidOption::new("output", out.display(), "exists; set option `force` to replace it").into());
    }
    Ok(())
}

/// Writes `l` to the HF directory `out` in f32 (atomically) and tells `report` where it went.
pub fn save(l: &Loaded, out: &Path, report: Option<&mut dyn crate::Report>) -> Result<()> {
    whittle_models::save::save_hf_dir(l, out, DType::F32)
        .map_err(|e| Error::File { path: out.display().to_string(), msg: format!("writing: {e}") })?;
    if let Some(r) = report {
        r.saved(out);
    }
    Ok(())
}

/// Writes `v` as pretty JSON to `path` through a temporary file and a rename (never a half-written file).
pub fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let io = |e: std::io::Error| Error::File { path: path.display().to_string(), msg: e.to_string() };
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Config(e.to_string()))? + "\n";
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
