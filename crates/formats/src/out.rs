//! Writing outputs so that no reader ever sees half a file and two writers never interleave.
//!
//! Every output kind (HF directories, GGUF files, JSON reports, checkpoints) follows one protocol:
//! - the data go to a temporary sibling named for this process, [`temp_path`] (`.NAME.tmp-PID`), in the
//!   destination directory (so the final rename never crosses file systems);
//! - the temporary is moved onto the final name in one step, [`commit`]: `rename(2)` for a new name, and
//!   `renameat2(RENAME_EXCHANGE)` to replace an existing directory (or a file by a directory), so the final
//!   name always holds either the old or the new output, never nothing or a mixture, and no `.old` copy is
//!   left behind;
//! - before writing, the temporaries of processes that no longer exist are removed ([`clean_stale`]), so a
//!   `kill -9` leaves nothing behind after the next run to the same output;
//! - a writer first takes the output's [`Claim`]: an exclusive `flock` on `.NAME.whittle-lock` beside it.
//!   The kernel drops the lock when the process dies, so a claim never outlives its holder; a second
//!   process writing the same name gets [`Error::Busy`] at once (or waits for the first).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::io_err;
use crate::{Error, Result};

/// The directory an output goes to (`.` for a bare file name).
pub fn parent_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name(out: &Path) -> String {
    out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into())
}

/// This process's temporary name for `out`: `.NAME.tmp-PID` in the same directory.
pub fn temp_path(out: &Path) -> PathBuf {
    parent_dir(out).join(format!(".{}.tmp-{}", file_name(out), std::process::id()))
}

fn lock_path(out: &Path) -> PathBuf {
    parent_dir(out).join(format!(".{}.whittle-lock", file_name(out)))
}

/// Whether process `pid` exists (Linux: `/proc/PID`). Elsewhere every process counts as alive, so nothing
/// that might be in use is removed.
pub fn pid_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes `p` whatever it is (file, link or directory tree); a missing `p` is not an error.
pub fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the temporaries of `out` left by processes that no longer exist (`.NAME.tmp-PID`, and the
/// `.NAME.old-PID` of earlier versions) and returns what it removed.
pub fn clean_stale(out: &Path) -> Vec<PathBuf> {
    let dir = parent_dir(out);
    let name = file_name(out);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let pid = [format!(".{name}.tmp-"), format!(".{name}.old-")]
            .iter()
            .find_map(|p| n.strip_prefix(p.as_str()))
            .and_then(|rest| rest.parse::<u32>().ok());
        if pid.is_some_and(|p| !pid_alive(p)) && remove_any(&e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// The exclusive right to write one output, held until dropped (or the process dies).
#[derive(Debug)]
pub struct Claim {
    out: PathBuf,
    lock: PathBuf,
    _file: File,
}

impl Claim {
    /// Takes the claim on `out`. Another live claim makes it [`Error::Busy`], or, with `wait`, blocks until
    /// that one is released. Creates the destination directory, and removes the stale temporaries of `out`.
    pub fn take(out: &Path, wait: bool) -> Result<Claim> {
        let dir = parent_dir(out);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock = lock_path(out);
        let file = loop {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock)
                .map_err(io_err(&lock))?;
            match f.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) if wait => f.lock().map_err(io_err(&lock))?,
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = f.read_to_string(&mut holder);
                    let holder = holder.trim().parse::<u32>().map_or_else(|_| String::new(), |p| format!(" (pid {p})"));
                    return Err(Error::Busy { path: out.to_path_buf(), holder });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock)(e)),
            }
            // The previous holder unlinks the lock file before releasing it: a lock on an unlinked file
            // protects nothing, so start again with the file now at that name.
            let same = match (f.metadata(), std::fs::metadata(&lock)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same {
                f.set_len(0).and_then(|()| f.rewind()).map_err(io_err(&lock))?;
                write!(f, "{}", std::process::id()).map_err(io_err(&lock))?;
                break f;
            }
        };
        clean_stale(out);
        // The fixed temporary names of earlier versions (`NAME.gguf.tmp`, `NAME.json.tmp`): with the claim held
        // nobody else is writing `out`.
        for ext in ["gguf.tmp", "json.tmp"] {
            let legacy = out.with_extension(ext);
            if legacy.file_stem() == out.file_stem()
                && out.extension().is_some_and(|e| ext.starts_with(&*e.to_string_lossy()))
            {
                let _ = std::fs::remove_file(legacy);
            }
        }
        Ok(Claim { out: out.to_path_buf(), lock, _file: file })
    }

    /// The output this claim is for.
    pub fn path(&self) -> &Path {
        &self.out
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Unlink while still holding the lock; a waiter on the old file sees it was unlinked and retries.
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// `renameat2(from, to, RENAME_EXCHANGE)`: swaps two existing names atomically (any types).
#[cfg(target_os = "linux")]
fn exchange(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; the syscall only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Moves the finished temporary `tmp` onto `out`, replacing whatever is there in one step (see the module
/// docs); the replaced output is removed afterwards.
pub fn commit(tmp: &Path, out: &Path) -> Result<()> {
    let existing = std::fs::symlink_metadata(out).ok();
    let plain_rename = match &existing {
        None => true,
        // rename(2) replaces a file (or link) by a file atomically.
        Some(m) => !m.is_dir() && !std::fs::symlink_metadata(tmp).map_err(io_err(tmp))?.is_dir(),
    };
    if plain_rename {
        return std::fs::rename(tmp, out).map_err(io_err(out));
    }
    match exchange(tmp, out) {
        Ok(()) => {
            // `tmp` now holds the replaced output; a kill here leaves it for the next run's `clean_stale`.
            remove_any(tmp).map_err(io_err(tmp))
        }
        Err(_) => {
            // No RENAME_EXCHANGE (old kernel, some file systems): move the old output aside under this
            // process's name, which `clean_stale` removes if we die before the end.
            let old = parent_dir(out).join(format!(".{}.old-{}", file_name(out), std::process::id()));
            std::fs::rename(out, &old).map_err(io_err(out))?;
            std::fs::rename(tmp, out).map_err(io_err(out))?;
            remove_any(&old).map_err(io_err(&old))
        }
    }
}

/// Writes the file `out` through [`temp_path`] and [`commit`]: `fill` gets the open temporary file; it is
/// synced before the rename. On error the temporary is removed and `out` is untouched.
pub fn write_file_atomic(out: &Path, fill: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    clean_stale(out);
    let tmp = temp_path(out);
    let result = (|| {
        let _ = remove_any(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        fill(&mut f)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = remove_any(&tmp);
        return Err(io_err(&tmp)(e));
    }
    commit(&tmp, out).inspect_err(|_| {
        let _ = remove_any(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_busy_and_names_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out.gguf");
        let a = Claim::take(&out, false).unwrap();
        // flock locks belong to the open file description, so a second open in this process conflicts too.
        let e = Claim::take(&out, false).unwrap_err().to_string();
        assert!(e.contains("out.gguf") && e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(a);
        let b = Claim::take(&out, false).unwrap();
        drop(b);
        // No lock file is left once released.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn waiting_claim_gets_it_after_release() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("o");
        let a = Claim::take(&out, false).unwrap();
        let out2 = out.clone();
        let t = std::thread::spawn(move || Claim::take(&out2, true).map(|_| ()));
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(a);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("m");
        // PIDs above the kernel's maximum (4194304) never exist.
        let dead = d.path().join(".m.tmp-4194305");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("model.safetensors"), "x").unwrap();
        std::fs::write(d.path().join(".m.old-4194306"), "x").unwrap();
        let mine = temp_path(&out);
        std::fs::write(&mine, "x").unwrap();
        let other = d.path().join(".mm.tmp-4194305");
        std::fs::write(&other, "x").unwrap();
        assert_eq!(clean_stale(&out).len(), 2);
        assert!(!dead.exists() && mine.exists() && other.exists());
    }

    #[test]
    fn commit_replaces_any_kind_without_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("o");
        // A file replaced by a directory (the `.old-PID` leftover of issue 22), then by a file.
        std::fs::write(&out, "old").unwrap();
        let tmp = temp_path(&out);
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("x"), "new").unwrap();
        commit(&tmp, &out).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("x")).unwrap(), "new");
        write_file_atomic(&out, |f| f.write_all(b"file")).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "file");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_leaves_output_and_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("o.json");
        std::fs::write(&out, "before").unwrap();
        let e = write_file_atomic(&out, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "before");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
