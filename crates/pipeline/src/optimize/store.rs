//! The output directory of `whittle optimize`: who owns it (`run.json`: the model's content hash and the
//! run's settings), the stage store (`stages/NN-kind/`, each keyed by a hash of its input and its
//! configuration, complete once its `stage.json` exists), the trial log of a search (`trials.jsonl`, one
//! line per measured trial, appended and synced), and the atomic placement of the chosen model.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::File { path: path.display().to_string(), msg: e.to_string() }
}

/// SHA-256 (hex) of a model's files: a GGUF file, or every file of an HF directory (names and contents,
/// in name order; the figures `whittle` saves next to a model are left out).
pub fn model_key(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path).map_err(|e| io_err(path, e))? {
            let p = e.map_err(|e| io_err(path, e))?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            if p.is_file() && !name.starts_with('.') && name != "whittle-results.json" {
                files.push((name, p));
            }
        }
        files.sort();
    } else {
        files.push((String::new(), path.to_path_buf()));
    }
    let mut buf = vec![0u8; 1 << 20];
    for (name, p) in files {
        h.update(name.as_bytes());
        let mut f = std::fs::File::open(&p).map_err(|e| io_err(&p, e))?;
        loop {
            let n = f.read(&mut buf).map_err(|e| io_err(&p, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 (hex) of `parts` joined.
pub fn key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Who a run directory belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunId {
    /// `recipe` or `search`.
    pub kind: String,
    pub model: String,
    /// Content hash of the model.
    pub model_key: String,
    /// Hash of the run's settings (the recipe, or the search's goal, level, seed and space).
    pub settings_key: String,
    /// The settings, readable.
    pub settings: serde_json::Value,
}

/// Prepares `out` for the run `id`: creates it, or resumes it when it holds the same run; refuses a
/// directory holding another run (or anything else) unless `force`, which clears it first. Never touches
/// the model.
pub fn claim(out: &Path, model: &Path, id: &RunId, force: bool) -> Result<bool> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    if let (Some(o), Some(m)) = (canon(out), canon(model)) {
        if m.starts_with(&o) || o == m {
            return Err(io_err(out, "is (or holds) the input model; choose another output directory"));
        }
    }
    let run_json = out.join("run.json");
    if out.exists() {
        if !out.is_dir() {
            return Err(io_err(out, "exists and is not a directory (optimize writes a directory)"));
        }
        let held: Option<RunId> = read_json(&run_json).ok();
        match held {
            Some(h) if h == *id => return Ok(true),
            _ if force => {
                std::fs::remove_dir_all(out).map_err(|e| io_err(out, format!("clearing it for --force: {e}")))?;
            }
            Some(h) => {
                let what = if h.model_key != id.model_key {
                    format!("another model ({})", h.model)
                } else {
                    format!("a {} run with other settings", h.kind)
                };
                return Err(io_err(
                    out,
                    format!(
                        "holds the stages of {what}; use another output directory or set option `force` to replace it"
                    ),
                ));
            }
            None => {
                let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
                if !empty {
                    return Err(io_err(out, "exists and is not an optimize run; set option `force` to replace it"));
                }
            }
        }
    }
    std::fs::create_dir_all(out.join("stages")).map_err(|e| io_err(out, e))?;
    write_json(&run_json, id)?;
    Ok(false)
}

/// Reads JSON from `path`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let s = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&s).map_err(|e| io_err(path, e))
}

/// Writes JSON atomically (a per-process temporary name, then a rename).
pub fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Config(e.to_string()))? + "\n";
    write_atomic(path, text.as_bytes())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename (the output rule of
/// `whittle_formats::out`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(whittle_formats::out::write_file_atomic(path, |f| f.write_all(bytes))?)
}

/// `.NAME.tmp-PID` beside `path`.
pub fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// A stage's record in the store; the stage is complete once this file exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub index: usize,
    pub kind: String,
    /// Recipe line of the stage (0 for stages the search made).
    pub line: usize,
    pub key: String,
    pub config: serde_json::Value,
    pub seconds: f64,
    /// The stage's report (`Report::to_json`), or the figures of an eval / bench step.
    pub report: serde_json::Value,
    pub summary: Vec<String>,
    /// Where the model after this stage is, relative to the stage directory (`model`, `model.gguf`), if
    /// the stage changed the model.
    pub model: Option<String>,
}

/// `OUT/stages/NN-kind`.
pub fn stage_dir(out: &Path, index: usize, kind: &str) -> PathBuf {
    out.join("stages").join(format!("{:02}-{kind}", index + 1))
}

/// The finished record of stage `index` if its key matches; a stale or unfinished directory is removed.
pub fn finished(out: &Path, index: usize, kind: &str, key: &str) -> Option<StageRecord> {
    let dir = stage_dir(out, index, kind);
    let rec: Option<StageRecord> = read_json(&dir.join("stage.json")).ok();
    match rec {
        Some(r) if r.key == key && r.model.as_ref().is_none_or(|m| dir.join(m).exists()) => Some(r),
        _ => {
            let _ = std::fs::remove_dir_all(&dir);
            None
        }
    }
}

/// Places a copy of `src` (a file or an HF directory) at `dst`, atomically: hard links where the file system
/// allows (the store and the output share a directory), copies otherwise; an existing `dst` is replaced.
pub fn place(src: &Path, dst: &Path) -> Result<()> {
    let tmp = tmp_name(dst);
    let _ = remove_any(&tmp);
    let link = |a: &Path, b: &Path| std::fs::hard_link(a, b).or_else(|_| std::fs::copy(a, b).map(|_| ()));
    let r = (|| -> std::io::Result<()> {
        if src.is_dir() {
            std::fs::create_dir_all(&tmp)?;
            for e in std::fs::read_dir(src)? {
                let p = e?.path();
                if p.is_file() {
                    link(&p, &tmp.join(p.file_name().unwrap_or_default()))?;
                }
            }
        } else {
            link(src, &tmp)?;
        }
        let old = dst.with_file_name(format!(
            ".{}.old-{}",
            dst.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        if dst.exists() {
            std::fs::rename(dst, &old)?;
        }
        std::fs::rename(&tmp, dst)?;
        let _ = remove_any(&old);
        Ok(())
    })();
    r.map_err(|e| {
        let _ = remove_any(&tmp);
        io_err(dst, e)
    })
}

/// Removes a file or a directory tree (absent is fine).
pub use whittle_formats::out::remove_any;

/// Removes `.NAME.tmp-PID` / `.NAME.old-PID` leftovers of killed runs in `dir`.
pub fn clean_leftovers(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with('.') && (n.contains(".tmp-") || n.contains(".old-")) {
            let _ = remove_any(&e.path());
        }
    }
}

/// The search's trial log: one JSON object per line, appended and synced after each trial.
pub struct TrialLog {
    path: PathBuf,
}

impl TrialLog {
    pub fn new(out: &Path) -> Self {
        Self { path: out.join("trials.jsonl") }
    }

    /// Every complete line (a line cut by a kill is ignored).
    pub fn read<T: DeserializeOwned>(&self) -> Vec<T> {
        let Ok(s) = std::fs::read_to_string(&self.path) else { return Vec::new() };
        s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    pub fn append(&self, v: &impl Serialize) -> Result<()> {
        let line = serde_json::to_string(v).map_err(|e| Error::Config(e.to_string()))? + "\n";
        let r = (|| {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
            f.write_all(line.as_bytes())?;
            f.sync_all()
        })();
        r.map_err(|e| io_err(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(settings: &str) -> RunId {
        RunId {
            kind: "recipe".into(),
            model: "m".into(),
            model_key: "k".into(),
            settings_key: key(&[settings]),
            settings: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_directory_of_another_run_is_refused_unless_forced() {
        let d = tempfile::tempdir().unwrap();
        let model = d.path().join("model.gguf");
        std::fs::write(&model, b"x").unwrap();
        let out = d.path().join("out");
        assert!(!claim(&out, &model, &id("a"), false).unwrap());
        assert!(claim(&out, &model, &id("a"), false).unwrap(), "same run resumes");
        let e = claim(&out, &model, &id("b"), false).unwrap_err().to_string();
        assert!(e.contains("other settings") && e.contains("force"), "{e}");
        assert!(!claim(&out, &model, &id("b"), true).unwrap());
        let e = claim(d.path(), &model, &id("a"), true).unwrap_err().to_string();
        assert!(e.contains("input model"), "{e}");
        assert!(model.exists());
    }

    #[test]
    fn place_replaces_atomically_and_trial_log_skips_cut_lines() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a"), b"1").unwrap();
        let dst = d.path().join("model");
        place(&src, &dst).unwrap();
        std::fs::write(src.join("b"), b"2").unwrap();
        place(&src, &dst).unwrap();
        assert!(dst.join("b").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2, "no leftovers");
        let log = TrialLog::new(d.path());
        log.append(&serde_json::json!({"a": 1})).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join("trials.jsonl"))
            .unwrap()
            .write_all(b"{\"a\":")
            .unwrap();
        let v: Vec<serde_json::Value> = log.read();
        assert_eq!(v.len(), 1);
    }
}
