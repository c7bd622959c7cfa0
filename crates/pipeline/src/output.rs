//! The one rule for outputs: a writer first claims its output (an exclusive lock beside it, so two runs
//! writing the same name never race: the second is refused at once, or waits with option `wait`), an
//! existing output is replaced only when asked, and the data are written to this process's temporary name
//! in the destination directory and moved onto the final name in one step ([`whittle_formats::out`]).
//! Temporaries of processes that died (`kill -9`) are removed by the next run to the same output.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use whittle_core::{DType, InvalidOption};
pub use whittle_formats::out::Claim;
use whittle_models::Loaded;

use crate::{Error, Result};

/// Claims taken by [`check`], released when [`save`] or [`write_json`] has written that output (or when the
/// process ends: the kernel drops the lock of a dead process).
static HELD: Mutex<Vec<Claim>> = Mutex::new(Vec::new());

/// Claims `out` and refuses it if it exists, unless `force`, before any work starts. The claim is held by
/// this process until [`save`] or [`write_json`] writes `out`; a second process checking the same output
/// meanwhile is refused. Prefer [`check_exclusive`], whose guard also releases the claim on early returns.
pub fn check(out: &Path, force: bool) -> Result<()> {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.iter().any(|c| c.path() == out) {
        return refuse_existing(out, force);
    }
    held.push(check_exclusive(out, force, false)?);
    Ok(())
}

/// Claims `out` (see [`Claim::take`]: another process writing it is an error, or with `wait` this blocks
/// until it is done) and refuses it if it exists, unless `force`. Checked before any work; the guard keeps
/// other processes off `out` until it is dropped, after the output is written.
pub fn check_exclusive(out: &Path, force: bool, wait: bool) -> Result<Claim> {
    let claim = Claim::take(out, wait)?;
    refuse_existing(out, force)?;
    Ok(claim)
}

fn refuse_existing(out: &Path, force: bool) -> Result<()> {
    // A dangling symlink is an existing name too.
    if std::fs::symlink_metadata(out).is_ok() && !force {
        return Err(InvalidOption::new("output", out.display(), "exists; set option `force` to replace it").into());
    }
    Ok(())
}

/// Drops the claim [`check`] took on `out`, if any.
fn release(out: &Path) {
    HELD.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| c.path() != out);
}

/// Writes `l` to the HF directory `out` in f32 (atomically) and tells `report` where it went.
pub fn save(l: &Loaded, out: &Path, report: Option<&mut dyn crate::Report>) -> Result<()> {
    let r = whittle_models::save::save_hf_dir(l, out, DType::F32)
        .map_err(|e| Error::File { path: out.display().to_string(), msg: format!("writing: {e}") });
    release(out);
    r?;
    if let Some(r) = report {
        r.saved(out);
    }
    Ok(())
}

/// Writes `v` as pretty JSON to `path` through a temporary file and a rename (never a half-written file).
pub fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Config(e.to_string()))? + "\n";
    let r = whittle_formats::out::write_file_atomic(path, |f| std::io::Write::write_all(f, text.as_bytes()));
    release(path);
    Ok(r?)
}

/// The names of the outputs this process has claimed through [`check`] and not yet written (for tests).
pub fn held() -> Vec<PathBuf> {
    HELD.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|c| c.path().to_path_buf()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_claims_until_written() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("r.json");
        check(&out, false).unwrap();
        // Checked twice by the same caller: still its own claim.
        check(&out, false).unwrap();
        // Another writer (a guard in this process stands in for another process) is refused.
        let e = check_exclusive(&out, true, false).unwrap_err().to_string();
        assert!(e.contains("another whittle process"), "{e}");
        write_json(&out, &serde_json::json!({"a": 1})).unwrap();
        assert!(!held().contains(&out));
        let e = check_exclusive(&out, false, false).unwrap_err().to_string();
        assert!(e.contains("exists; set option `force`"), "{e}");
        drop(check_exclusive(&out, true, false).unwrap());
        // Only the output is left: no lock file, no temporary.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
