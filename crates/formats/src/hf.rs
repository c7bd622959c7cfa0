//! Hugging Face model directories: `config.json`, `model.safetensors` or sharded
//! `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`, and `tokenizer.json`.
//! Hub ids (`org/name`) are resolved from the local cache only; whittle never downloads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use whittle_core::Stored;

use crate::error::io_err;
use crate::{Error, Result, TensorInfo, TensorSource};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte where the data section starts (8 + header length).
    data_start: usize,
    meta: Metadata,
}

/// An opened HF directory: parsed config and every safetensors shard validated and mapped.
pub struct HfDir {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    shards: Vec<Shard>,
    /// Tensor name -> shard index, in file order of `infos`.
    index: HashMap<String, usize>,
    infos: Vec<TensorInfo>,
    /// Where loaded tensors are put (the CPU unless the loader's run configuration says otherwise).
    pub device: Device,
}

/// Reads and parses a JSON file, naming it in errors.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|err| Error::Json { path: path.to_path_buf(), err })
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}").to_lowercase()
}

fn open_shard(path: &Path) -> Result<Shard> {
    // Mapping a directory fails with ENODEV ("No such device"); say what is wrong instead. Following the
    // link first also reports a symlink loop as such.
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a directory" } else { "not a regular file" };
        return Err(Error::Other { path: path.to_path_buf(), msg: format!("is {kind}, expected a safetensors file") });
    }
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only mapping of a file whittle never writes while reading.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    let (n, meta) = SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), msg: format!("{e}") })?;
    Ok(Shard { path: path.to_path_buf(), mmap, data_start: 8 + n, meta })
}

impl HfDir {
    /// Opens a directory holding `config.json` and safetensors weights.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = read_json(&dir.join("config.json"))?;
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        // `symlink_metadata`: a name that is there but cannot be followed (a symlink loop, a dangling link) is
        // still the weights file, and opening it gives the real reason.
        let present = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        let files: Vec<PathBuf> = if present(&single) {
            vec![single]
        } else if present(&index_path) {
            let idx = read_json(&index_path)?;
            let map = idx
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Other { path: index_path.clone(), msg: "no `weight_map` object".into() })?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains("..") {
                    return Err(Error::Other {
                        path: index_path.clone(),
                        msg: format!("shard name `{f}` is not a plain file name"),
                    });
                }
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            return Err(Error::Other {
                path: dir.clone(),
                msg: "no model.safetensors or model.safetensors.index.json in this directory".into(),
            });
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        let mut infos = Vec::new();
        for f in files {
            let shard = open_shard(&f)?;
            let si = shards.len();
            let mut names: Vec<(String, TensorInfo)> = shard
                .meta
                .tensors()
                .into_iter()
                .map(|(name, ti)| {
                    let info = TensorInfo {
                        name: name.clone(),
                        dtype: dtype_name(ti.dtype),
                        shape: ti.shape.clone(),
                        bytes: ti.data_offsets.1 - ti.data_offsets.0,
                    };
                    (name, info)
                })
                .collect();
            names.sort_by_key(|(n, _)| shard.meta.info(n).map(|i| i.data_offsets.0));
            for (name, info) in names {
                if index.insert(name.clone(), si).is_some() {
                    return Err(Error::Other {
                        path: f.clone(),
                        msg: format!("tensor `{name}` appears in two shards"),
                    });
                }
                infos.push(info);
            }
            shards.push(shard);
        }
        Ok(Self { dir, config, shards, index, infos, device: whittle_core::backend::cpu::device() })
    }

    /// The shard, header entry and bytes of tensor `name`.
    fn locate(&self, name: &str) -> Result<(&Shard, &safetensors::tensor::TensorInfo, &[u8])> {
        let si = *self
            .index
            .get(name)
            .ok_or_else(|| Error::MissingTensor { path: self.dir.clone(), tensor: name.into() })?;
        let sh = &self.shards[si];
        let ti = sh.meta.info(name).expect("indexed");
        let (a, b) = ti.data_offsets;
        Ok((sh, ti, &sh.mmap[sh.data_start + a..sh.data_start + b]))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// Loads a tensor keeping its stored float dtype (f32, f16 or bf16).
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let (sh, ti, raw) = self.locate(name)?;
        let dt = match ti.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            Dtype::I64 => DType::I64,
            Dtype::U8 => DType::U8,
            Dtype::U32 => DType::U32,
            other => {
                return Err(Error::UnknownDtype {
                    path: sh.path.clone(),
                    tensor: name.into(),
                    dtype: dtype_name(other),
                })
            }
        };
        Ok(Tensor::from_raw_buffer(raw, dt, &ti.shape, &self.device)?)
    }
}

impl HfDir {
    /// Loads an int8 tensor (candle has no i8 dtype): its shape and values.
    pub fn load_i8(&self, name: &str) -> Result<(Vec<usize>, Vec<i8>)> {
        let (sh, ti, raw) = self.locate(name)?;
        if ti.dtype != Dtype::I8 {
            return Err(Error::BadTensor {
                path: sh.path.clone(),
                tensor: name.into(),
                msg: format!("expected i8, found {}", dtype_name(ti.dtype)),
            });
        }
        Ok((ti.shape.clone(), raw.iter().map(|&v| v as i8).collect()))
    }
}

impl TensorSource for HfDir {
    fn load_i8(&self, name: &str) -> Result<(Vec<usize>, Vec<i8>)> {
        HfDir::load_i8(self, name)
    }
    fn infos(&self) -> Vec<TensorInfo> {
        self.infos.clone()
    }
    fn load_f32(&self, name: &str) -> Result<Tensor> {
        let t = self.load(name)?;
        if !t.dtype().is_float() {
            let si = self.index[name];
            return Err(Error::BadTensor {
                path: self.shards[si].path.clone(),
                tensor: name.into(),
                msg: format!("expected a float tensor, found {:?}", t.dtype()),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    }
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    fn load_native(&self, name: &str) -> Result<Tensor> {
        self.load(name)
    }
}

/// Where the local HF hub cache is: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache").join("huggingface").join("hub")
}

/// Resolves a hub id `org/name` to a snapshot directory in the local cache.
pub fn resolve_hub_id(id: &str) -> Result<PathBuf> {
    resolve_hub_id_in(id, &hub_cache_dir())
}

pub fn resolve_hub_id_in(id: &str, cache: &Path) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let not_found = || Error::NotInCache { id: id.into(), looked: repo.display().to_string() };
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let p = snapshots.join(rev.trim());
        if p.is_dir() {
            return Ok(p);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|_| not_found())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").exists())
        .collect();
    dirs.sort();
    dirs.pop().ok_or_else(not_found)
}

/// Writes a directory atomically: `fill` writes into a fresh temporary sibling of `out`, which then
/// replaces `out` by rename. On error the temporary directory is removed and `out` is untouched.
pub fn write_dir_atomic(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = crate::out::parent_dir(out);
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    crate::out::clean_stale(out);
    let tmp = crate::out::temp_path(out);
    let _ = crate::out::remove_any(&tmp);
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = fill(&tmp).and_then(|()| sync_dir_tree(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    crate::out::commit(&tmp, out).inspect_err(|_| {
        let _ = crate::out::remove_any(&tmp);
    })
}

/// Flushes the files of `dir` (one level) and `dir` itself to disk, so the rename that publishes them
/// never publishes data still in the page cache only.
fn sync_dir_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::File::open(e.path()).and_then(|f| f.sync_all()).map_err(io_err(e.path()))?;
        }
    }
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_err(dir))
}

/// Writes named tensors to one safetensors file (row-major, their own dtypes).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let stored: Vec<(String, Stored)> = tensors.iter().map(|(n, t)| (n.clone(), Stored::Tensor(t.clone()))).collect();
    write_stored(path, &stored, metadata)
}

struct StoredView<'a>(&'a Stored);

impl safetensors::View for StoredView<'_> {
    fn dtype(&self) -> Dtype {
        match self.0 {
            Stored::Tensor(t) => safetensors::View::dtype(t),
            Stored::I8 { .. } => Dtype::I8,
        }
    }
    fn shape(&self) -> &[usize] {
        match self.0 {
            Stored::Tensor(t) => t.dims(),
            Stored::I8 { shape, .. } => shape,
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.0 {
            Stored::Tensor(t) => safetensors::View::data(t),
            // i8 and u8 share a representation.
            Stored::I8 { data, .. } => std::borrow::Cow::Owned(data.iter().map(|&v| v as u8).collect()),
        }
    }
    fn data_len(&self) -> usize {
        match self.0 {
            Stored::Tensor(t) => safetensors::View::data_len(t),
            Stored::I8 { data, .. } => data.len(),
        }
    }
}

/// Writes stored tensors (candle tensors or int8 data) to one safetensors file.
pub fn write_stored(
    path: &Path,
    tensors: &[(String, Stored)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let data: Vec<(&str, StoredView)> = tensors.iter().map(|(n, t)| (n.as_str(), StoredView(t))).collect();
    safetensors::serialize_to_file(data, metadata, path)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), msg: format!("{e}") })?;
    // safetensors creates the file owner-only (0600); a model is as readable as the JSON beside it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(io_err(path))?;
    }
    Ok(())
}

/// Writes a JSON value pretty-printed.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).expect("serialisable");
    std::fs::write(path, s + "\n").map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_model(dir: &Path, tensors: &[(String, Tensor)]) {
        std::fs::write(dir.join("config.json"), "{\"model_type\":\"bert\"}").unwrap();
        write_safetensors(&dir.join("model.safetensors"), tensors, None).unwrap();
    }

    #[test]
    fn roundtrip_and_dtypes() {
        let d = tempfile::tempdir().unwrap();
        let a = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let b = a.to_dtype(DType::BF16).unwrap();
        write_model(d.path(), &[("a".into(), a.clone()), ("b".into(), b)]);
        let m = HfDir::open(d.path()).unwrap();
        assert_eq!(m.infos().len(), 2);
        assert_eq!(m.load_f32("b").unwrap().to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert!(matches!(m.load_f32("zz"), Err(Error::MissingTensor { .. })));
    }

    #[test]
    fn truncated_safetensors_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let a = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        write_model(d.path(), &[("a".into(), a)]);
        let p = d.path().join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = HfDir::open(d.path()).err().unwrap();
        assert!(matches!(e, Error::Safetensors { .. }), "{e}");
        assert!(e.to_string().contains("model.safetensors"));
        // A header length far past the end of the file.
        let mut bad = bytes.clone();
        bad[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(HfDir::open(d.path()), Err(Error::Safetensors { .. })));
    }

    #[test]
    fn missing_files() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(HfDir::open(d.path()), Err(Error::Io { .. })));
        std::fs::write(d.path().join("config.json"), "{").unwrap();
        assert!(matches!(HfDir::open(d.path()), Err(Error::Json { .. })));
    }

    #[test]
    fn hub_id_not_in_cache_says_where() {
        let d = tempfile::tempdir().unwrap();
        let e = resolve_hub_id_in("org/name", d.path()).unwrap_err();
        assert!(e.to_string().contains("models--org--name"), "{e}");
        let snap = d.path().join("models--org--name/snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_hub_id_in("org/name", d.path()).unwrap(), snap);
    }

    /// Issue 22 ("Messages"): a directory named model.safetensors said "No such device".
    #[test]
    fn safetensors_that_is_a_directory_is_named_as_such() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        std::fs::create_dir(d.path().join("model.safetensors")).unwrap();
        let e = HfDir::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("model.safetensors: is a directory, expected a safetensors file"), "{e}");
    }

    /// Issue 22 ("Messages"): a symlink loop said "no model.safetensors in this directory".
    #[test]
    fn safetensors_symlink_loop_is_reported_as_a_loop() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        std::os::unix::fs::symlink("model.safetensors", d.path().join("model.safetensors")).unwrap();
        let e = HfDir::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("model.safetensors: Too many levels of symbolic links"), "{e}");
    }

    /// Issue 22 ("Messages"): OS errors were printed twice by chained printing.
    #[test]
    fn os_error_is_said_once_in_the_chain() {
        let e = read_json(Path::new("/nonexistent/config.json")).unwrap_err();
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.to_string().matches("No such file").count(), 1, "{e}");
    }

    #[test]
    fn atomic_dir_leaves_nothing_on_error() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let r = write_dir_atomic(&out, |tmp| {
            std::fs::write(tmp.join("x"), "1").unwrap();
            Err(Error::Other { path: tmp.into(), msg: "boom".into() })
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        write_dir_atomic(&out, |tmp| {
            let _: () = std::fs::write(tmp.join("x"), "1").unwrap();
            Ok(())
        })
        .unwrap();
        assert!(out.join("x").exists());
    }
}
