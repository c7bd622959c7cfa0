//! ONNX Runtime from Rust: the `ort` crate with `load-dynamic`, so whittle neither links nor downloads ONNX
//! Runtime; the library is loaded when a command first needs it, from (in order):
//!
//! 1. the path given by the caller (`whittle verify --ort-lib PATH`),
//! 2. `ORT_DYLIB_PATH` (the `ort` crate's own variable),
//! 3. the `onnxruntime` Python wheel's `onnxruntime/capi/libonnxruntime.so*` inside the active virtual
//!    environment (`VIRTUAL_ENV`), the test venv (`WHITTLE_TEST_VENV`, `~/.cache/whittle-test-venv`), or
//!    `~/.cache/whittle-peers`.
//!
//! `pip install onnxruntime` into any of those is the whole setup.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::session::Session;
use ort::value::Tensor;

use crate::{Error, Result};

/// The venvs searched for the wheel's library, after `VIRTUAL_ENV`.
fn venvs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("VIRTUAL_ENV") {
        v.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("WHITTLE_TEST_VENV") {
        v.push(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let home = PathBuf::from(home);
        v.push(home.join(".cache/whittle-test-venv"));
        v.push(home.join(".cache/whittle-peers"));
    }
    v
}

/// `libonnxruntime.so*` in a venv's `lib/python3*/site-packages/onnxruntime/capi/`.
fn in_venv(venv: &Path) -> Option<PathBuf> {
    for lib in ["lib", "lib64"] {
        let Ok(rd) = std::fs::read_dir(venv.join(lib)) else { continue };
        let mut pys: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        pys.sort();
        for py in pys.iter().rev() {
            let capi = py.join("site-packages/onnxruntime/capi");
            let Ok(files) = std::fs::read_dir(&capi) else { continue };
            let mut libs: Vec<PathBuf> = files
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so")))
                .collect();
            libs.sort();
            if let Some(l) = libs.into_iter().next() {
                return Some(l);
            }
        }
    }
    None
}

/// Where the ONNX Runtime library is: `explicit`, else `ORT_DYLIB_PATH`, else the wheel in a known venv.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            return Err(Error::File { path: p.into(), msg: "no such file (option `ort_lib`)".into() });
        }
        return Ok(p.into());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(Error::File { path: p, msg: "no such file (ORT_DYLIB_PATH)".into() });
        }
        return Ok(p);
    }
    let searched = venvs();
    if let Some(p) = searched.iter().find_map(|v| in_venv(v)) {
        return Ok(p);
    }
    Err(Error::Runtime(format!(
        "no ONNX Runtime library found: pass option `ort_lib` PATH/libonnxruntime.so, set ORT_DYLIB_PATH, or \
         `pip install onnxruntime` into a venv (searched {})",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )))
}

/// The library this process loaded (ONNX Runtime can be loaded once per process).
static LOADED: Mutex<Option<(PathBuf, ort::environment::Environment)>> = Mutex::new(None);

/// Loads ONNX Runtime (once per process) and returns the path it came from.
pub fn init(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut g = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((p, _)) = g.as_ref() {
        return Ok(p.clone());
    }
    let lib = find_library(explicit)?;
    let env = ort::init_from(&lib)
        .map_err(|e| Error::Runtime(format!("loading {}: {e}", lib.display())))?
        .with_name("whittle")
        .build()
        .map_err(|e| Error::Runtime(format!("{}: {e}", lib.display())))?;
    *g = Some((lib.clone(), env));
    Ok(lib)
}

/// One input tensor.
pub enum Input {
    I64(Vec<usize>, Vec<i64>),
    F32(Vec<usize>, Vec<f32>),
}

/// One output tensor: shape and values (f32).
#[derive(Debug, Clone)]
pub struct Output {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// An ONNX model loaded in ONNX Runtime (CPU).
pub struct OrtModel {
    session: Session,
    pub path: PathBuf,
}

impl OrtModel {
    /// Loads `model` in ONNX Runtime, `threads` intra-op threads (None: ONNX Runtime's default), with its
    /// graph optimizations (fusions) unless `plain`.
    pub fn open(model: &Path, lib: Option<&Path>, threads: Option<usize>) -> Result<Self> {
        Self::open_with(model, lib, threads, false)
    }

    /// [`OrtModel::open`], with ONNX Runtime's graph optimizations disabled when `plain` (every node runs as
    /// written: tells a fusion's numerics from the graph's).
    pub fn open_with(model: &Path, lib: Option<&Path>, threads: Option<usize>, plain: bool) -> Result<Self> {
        init(lib)?;
        let env = LOADED.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, e)| e.clone());
        let env = env.ok_or_else(|| Error::Runtime("not initialised".into()))?;
        let rt = |e: ort::Error| Error::Runtime(format!("{}: {e}", model.display()));
        let mut b = Session::builder(&env).map_err(rt)?;
        if plain {
            b = b
                .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
                .map_err(|e| Error::Runtime(format!("{}: {e}", model.display())))?;
        }
        if let Some(n) = threads {
            b = b.with_intra_threads(n).map_err(|e| Error::Runtime(format!("{}: {e}", model.display())))?;
        }
        let session = b.commit_from_file(model).map_err(rt)?;
        Ok(Self { session, path: model.into() })
    }

    /// The model's input names, in order.
    pub fn input_names(&self) -> Vec<String> {
        self.session.inputs().iter().map(|i| i.name().to_string()).collect()
    }

    /// Runs the model; returns the f32 outputs named in `want`, in that order.
    pub fn run(&mut self, inputs: Vec<(String, Input)>, want: &[&str]) -> Result<Vec<Output>> {
        let path = self.path.clone();
        let rt = |e: ort::Error| Error::Runtime(format!("{}: {e}", path.display()));
        let mut values: Vec<(std::borrow::Cow<'static, str>, ort::session::SessionInputValue<'static>)> =
            Vec::with_capacity(inputs.len());
        for (name, i) in inputs {
            let v: ort::session::SessionInputValue<'static> = match i {
                Input::I64(shape, data) => Tensor::from_array((shape, data)).map_err(rt)?.into(),
                Input::F32(shape, data) => Tensor::from_array((shape, data)).map_err(rt)?.into(),
            };
            values.push((name.into(), v));
        }
        let outs = self.session.run(values).map_err(rt)?;
        want.iter()
            .map(|w| {
                let v = outs.get(w).ok_or_else(|| Error::Runtime(format!("{}: no output `{w}`", path.display())))?;
                let (shape, data) = v.try_extract_tensor::<f32>().map_err(rt)?;
                Ok(Output { shape: shape.iter().map(|&d| d as usize).collect(), data: data.to_vec() })
            })
            .collect()
    }
}
