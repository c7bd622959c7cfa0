//! GGUF reader (llama.cpp's model format, v2 and v3), spec:
//! <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.
//!
//! Layout: magic `GGUF`, version u32, tensor count u64, metadata count u64, metadata key/values, tensor
//! infos (name, n_dims, dims with the fastest-varying first, type, offset), padding to `general.alignment`
//! (32 by default), then the tensor data. Every length read from the file is checked against the bytes
//! that remain before anything is allocated, so a corrupt file is an error and never an OOM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use whittle_kernels::ggml::{ty, GgmlType};

use crate::error::io_err;
use crate::{Error, Result, TensorInfo, TensorSource};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) if v >= 0 => v as u64,
            Value::I16(v) if v >= 0 => v as u64,
            Value::I32(v) if v >= 0 => v as u64,
            Value::I64(v) if v >= 0 => v as u64,
            _ => return None,
        })
    }
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::I8(v) => v as i64,
            Value::I16(v) => v as i64,
            Value::I32(v) => v as i64,
            Value::I64(v) => v,
            _ => return self.as_u64().and_then(|v| i64::try_from(v).ok()),
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            Value::F32(v) => v as f64,
            Value::F64(v) => v,
            _ => return self.as_i64().map(|v| v as f64),
        })
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A short human rendering (arrays summarised).
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 60 => format!("{:?}…", &s[..s.floor_char_boundary(60)]),
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} items]", a.len()),
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// candle's dtype for a block type of [`whittle_kernels::ggml::TYPES`] (the table gives names and sizes).
pub fn candle_block_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        ty::Q4_0 => GgmlDType::Q4_0,
        ty::Q4_1 => GgmlDType::Q4_1,
        ty::Q5_0 => GgmlDType::Q5_0,
        ty::Q5_1 => GgmlDType::Q5_1,
        ty::Q8_0 => GgmlDType::Q8_0,
        ty::Q2_K => GgmlDType::Q2K,
        ty::Q3_K => GgmlDType::Q3K,
        ty::Q4_K => GgmlDType::Q4K,
        ty::Q5_K => GgmlDType::Q5K,
        ty::Q6_K => GgmlDType::Q6K,
        _ => return None,
    })
}

/// One tensor's entry in the GGUF header.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// ggml order: fastest-varying dimension first (ne[0] = row length).
    pub ne: Vec<usize>,
    pub type_id: u32,
    pub type_name: &'static str,
    /// Start within the data section.
    pub offset: usize,
    pub bytes: usize,
}

impl GgufTensor {
    /// Row-major shape (ggml dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().copied().collect()
    }
}

/// An open GGUF file: metadata, tensor directory and the memory-mapped bytes.
#[derive(Debug)]
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<GgufTensor>,
    data_start: usize,
    mmap: Mmap,
    /// Where loaded tensors are put (the CPU unless the loader's run configuration says otherwise).
    pub device: Device,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, what: impl Into<String>) -> Error {
        Error::Corrupt { path: self.path.to_path_buf(), offset: self.pos, what: what.into() }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.corrupt(format!("{what} needs {n} bytes but only {} remain", self.buf.len() - self.pos))),
        }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, "u8")?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, "u16")?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, "u32")?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, "u64")?.try_into().unwrap()))
    }
    /// A length field, checked against what remains: `min_item` bytes at least per item.
    fn len(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.u64()?;
        let fits = usize::try_from(n).ok().filter(|&n| n.saturating_mul(min_item.max(1)) <= self.remaining());
        fits.ok_or_else(|| Error::Corrupt {
            path: self.path.to_path_buf(),
            offset: at,
            what: format!("{what} length {n} runs past the end of the file ({} bytes remain)", self.remaining()),
        })
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what, 1)?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::Corrupt {
            path: self.path.to_path_buf(),
            offset: at,
            what: format!("{what} is not valid UTF-8"),
        })
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::String(self.string("string value")?),
            9 => {
                if depth > 4 {
                    return Err(self.corrupt("arrays nested deeper than 4 levels"));
                }
                let item_ty = self.u32()?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => return Err(self.corrupt(format!("unknown array item type {item_ty}"))),
                };
                let n = self.len("array", min)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            _ => return Err(self.corrupt(format!("unknown metadata value type {ty}"))),
        })
    }
}

impl Gguf {
    /// Opens and validates a GGUF file: header, metadata, tensor directory and every tensor's bounds.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        // SAFETY: the file is opened read-only and whittle never writes to a file it reads; a file
        // truncated by another process while mapped is outside what any reader can guard against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
        let mut c = Cursor { buf: &mmap, pos: 0, path: &path };
        let magic: [u8; 4] = match c.take(4, "magic") {
            Ok(m) => m.try_into().unwrap(),
            Err(_) => {
                let mut m = [0u8; 4];
                m[..mmap.len()].copy_from_slice(&mmap);
                return Err(Error::BadMagic { path, magic: m });
            }
        };
        if &magic != b"GGUF" {
            return Err(Error::BadMagic { path, magic });
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedVersion { path, version });
        }
        // A tensor info is at least 8 (name len) + 4 + 8 + 4 + 8 bytes; a key/value at least 8 + 4 + 1.
        let n_tensors = c.len("tensor count", 32)?;
        let n_kv = c.len("metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32()?;
            let v = c.value(ty, 0).map_err(|e| match e {
                Error::Corrupt { path, offset, what } => {
                    Error::Corrupt { path, offset, what: format!("{what} (in metadata `{key}`)") }
                }
                e => e,
            })?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::BadTensor {
                    path,
                    tensor: name,
                    msg: format!("{n_dims} dimensions (1 to 4 allowed)"),
                });
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(c.u64()? as usize);
            }
            let type_id = c.u32()?;
            let offset = c.u64()? as usize;
            let Some(&GgmlType { name: type_name, block: bs, bytes: type_size, .. }) = GgmlType::by_id(type_id) else {
                return Err(Error::UnknownDtype { path, tensor: name, dtype: format!("ggml type id {type_id}") });
            };
            let elems = ne.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bytes = match elems {
                Some(e) if ne[0] % bs == 0 => (e / bs).checked_mul(type_size),
                _ => None,
            };
            let Some(bytes) = bytes else {
                return Err(Error::BadTensor {
                    path,
                    tensor: name,
                    msg: format!("dims {ne:?} are invalid for {type_name} (row length must be a multiple of {bs})"),
                });
            };
            tensors.push(GgufTensor { name, ne, type_id, type_name, offset, bytes });
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(Error::Metadata {
                        path,
                        key: "general.alignment".into(),
                        msg: format!("{} is not a power of two", v.summary()),
                    })
                }
            },
        };
        let data_start = c.pos.div_ceil(align) * align;
        let data_len = mmap.len().saturating_sub(data_start);
        for t in &tensors {
            let end = t.offset.saturating_add(t.bytes);
            if end > data_len {
                return Err(Error::TensorOutOfBounds {
                    path,
                    tensor: t.name.clone(),
                    start: t.offset,
                    end,
                    len: data_len,
                });
            }
            // ggml requires it (gguf.c refuses such files), and block kernels read the data in place.
            if t.offset % align != 0 {
                return Err(Error::BadTensor {
                    path,
                    tensor: t.name.clone(),
                    msg: format!("data offset {} is not a multiple of general.alignment {align}", t.offset),
                });
            }
        }
        // Two tensors sharing bytes (or one name twice) mean a corrupt directory: each would read the other.
        let mut by_offset: Vec<&GgufTensor> = tensors.iter().collect();
        by_offset.sort_by_key(|t| (t.offset, t.bytes));
        for w in by_offset.windows(2) {
            if w[0].offset + w[0].bytes > w[1].offset && w[0].bytes > 0 && w[1].bytes > 0 {
                return Err(Error::BadTensor {
                    path,
                    tensor: w[1].name.clone(),
                    msg: format!(
                        "data [{}, {}) overlaps tensor `{}` [{}, {})",
                        w[1].offset,
                        w[1].offset + w[1].bytes,
                        w[0].name,
                        w[0].offset,
                        w[0].offset + w[0].bytes
                    ),
                });
            }
        }
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::BadTensor {
                path,
                tensor: w[0].to_string(),
                msg: "appears twice in the tensor directory".into(),
            });
        }
        Ok(Self { path, version, metadata, tensors, data_start, mmap, device: whittle_core::backend::cpu::device() })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required metadata value, or an error naming the key.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| Error::Metadata {
            path: self.path.clone(),
            key: key.into(),
            msg: "missing".into(),
        })
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.meta_err(key, format!("expected an unsigned integer, found {}", v.summary())))
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, format!("expected a number, found {}", v.summary()))),
        }
    }

    pub fn meta_err(&self, key: &str, msg: String) -> Error {
        Error::Metadata { path: self.path.clone(), key: key.into(), msg }
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn raw(&self, t: &GgufTensor) -> &[u8] {
        let s = self.data_start + t.offset;
        &self.mmap[s..s + t.bytes]
    }

    /// Loads a tensor as f32 with its row-major shape, dequantizing block types.
    pub fn dequantize(&self, t: &GgufTensor) -> Result<Tensor> {
        let shape = t.shape();
        let raw = self.raw(t);
        let dev = &self.device;
        let out = match t.type_id {
            ty::F32 => Tensor::from_raw_buffer(raw, DType::F32, &shape, dev)?,
            ty::F16 => Tensor::from_raw_buffer(raw, DType::F16, &shape, dev)?.to_dtype(DType::F32)?,
            ty::BF16 => Tensor::from_raw_buffer(raw, DType::BF16, &shape, dev)?.to_dtype(DType::F32)?,
            id => {
                let dt = candle_block_dtype(id).expect("validated in open");
                // Block types: candle copies the blocks out of the mapping (the data section is
                // `general.alignment`-aligned and the map page-aligned, so the blocks' f16 fields are
                // aligned) and dequantizes with ggml's reference formulas.
                let q = qtensor_from_ggml(dt, raw, shape.clone(), dev)?;
                q.dequantize(dev)?
            }
        };
        Ok(out)
    }
}

impl TensorSource for Gguf {
    fn infos(&self) -> Vec<TensorInfo> {
        self.tensors
            .iter()
            .map(|t| TensorInfo { name: t.name.clone(), dtype: t.type_name.into(), shape: t.shape(), bytes: t.bytes })
            .collect()
    }
    fn load_f32(&self, name: &str) -> Result<Tensor> {
        let t =
            self.tensor(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: name.into() })?;
        self.dequantize(t)
    }
    /// f16 and bf16 tensors as stored (one copy out of the mapping, 2 bytes per value); others as f32.
    fn load_native(&self, name: &str) -> Result<Tensor> {
        let t =
            self.tensor(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: name.into() })?;
        let dtype = match t.type_id {
            ty::F16 => DType::F16,
            ty::BF16 => DType::BF16,
            _ => return self.dequantize(t),
        };
        Ok(Tensor::from_raw_buffer(self.raw(t), dtype, &t.shape(), &self.device)?)
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        self.tensor(name).is_some()
    }
    fn raw_block(&self, name: &str) -> Option<(u32, Vec<usize>, &[u8])> {
        let t = self.tensor(name)?;
        GgmlType::by_id(t.type_id)?.is_block().then(|| (t.type_id, t.shape(), self.raw(t)))
    }
}

/// Serialises a minimal GGUF (v3) file: used by tests to build well-formed and corrupt inputs.
pub mod write {
    use super::Value;

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn type_of(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => put_str(out, s),
            Value::Array(a) => {
                out.extend(a.first().map_or(4, type_of).to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    put_value(out, x);
                }
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }

    /// Writes a GGUF v3 file atomically (this process's temporary sibling, then rename: see
    /// [`crate::out`]), streaming the tensor data.
    pub fn write_file(
        path: &std::path::Path,
        metadata: &[(&str, Value)],
        tensors: &[(&str, Vec<u64>, u32, Vec<u8>)],
    ) -> crate::Result<()> {
        use std::io::Write;
        crate::out::write_file_atomic(path, |file| {
            let mut f = std::io::BufWriter::new(file);
            let lens: Vec<(&str, &[u64], u32, usize)> =
                tensors.iter().map(|(n, ne, ty, d)| (*n, ne.as_slice(), *ty, d.len())).collect();
            f.write_all(&header(metadata, &lens))?;
            for (_, _, _, data) in tensors {
                f.write_all(data)?;
                f.write_all(&[0u8; 32][..(32 - data.len() % 32) % 32])?;
            }
            f.flush()
        })
    }

    /// The header of a GGUF v3 file up to the (32-aligned) start of the data: `tensors` give
    /// (name, ggml dims fastest-first, ggml type id, data length); data are laid out in order, 32-aligned.
    fn header(metadata: &[(&str, Value)], tensors: &[(&str, &[u64], u32, usize)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend(type_of(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, ne, ty, len) in tensors {
            put_str(&mut out, name);
            out.extend((ne.len() as u32).to_le_bytes());
            for d in ne.iter() {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (*len as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out
    }

    /// A whole GGUF v3 file in memory. `tensors`: (name, ggml dims fastest-first, ggml type id, raw bytes).
    pub fn to_bytes(metadata: &[(&str, Value)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let lens: Vec<(&str, &[u64], u32, usize)> =
            tensors.iter().map(|(n, ne, ty, d)| (*n, ne.as_slice(), *ty, d.len())).collect();
        let mut out = header(metadata, &lens);
        for (_, _, _, data) in tensors {
            out.extend(data);
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn sample() -> Vec<u8> {
        write::to_bytes(
            &[("general.architecture", Value::String("llama".into())), ("x.n", Value::U32(7))],
            &[("a", vec![2, 3], 0, f32_bytes(&[0., 1., 2., 3., 4., 5.]))],
        )
    }

    fn open_bytes(bytes: &[u8]) -> Result<Gguf> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        Gguf::open(&p)
    }

    /// f16 and bf16 tensors load 16-bit as stored (`load_native`) and widened exactly (`load_f32`).
    #[test]
    fn half_tensors_load_native_and_f32() {
        let vals = [0.5f32, -1.25, 3.0, 65504.0, 1e-3, 0.0];
        let f16: Vec<u8> = vals.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let bf16: Vec<u8> = vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let bytes = write::to_bytes(
            &[("general.architecture", Value::String("llama".into()))],
            &[("h", vec![3, 2], ty::F16, f16), ("b", vec![3, 2], ty::BF16, bf16)],
        );
        let g = open_bytes(&bytes).unwrap();
        for (name, dt) in [("h", DType::F16), ("b", DType::BF16)] {
            let n = g.load_native(name).unwrap();
            assert_eq!((n.dtype(), n.dims()), (dt, &[2usize, 3][..]), "{name}");
            let wide: Vec<f32> = g.load_f32(name).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let back: Vec<f32> = n.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(wide, back, "{name}");
        }
        // Other types come back as f32.
        let g = open_bytes(&sample()).unwrap();
        assert_eq!(g.load_native("a").unwrap().dtype(), DType::F32);
    }

    #[test]
    fn reads_metadata_and_tensor() {
        let g = open_bytes(&sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get("x.n").unwrap().as_u64(), Some(7));
        let t = g.load_f32("a").unwrap();
        assert_eq!(t.dims(), &[3, 2]); // ggml [2,3] = 3 rows of 2
        assert_eq!(t.to_vec2::<f32>().unwrap()[2], vec![4., 5.]);
    }

    #[test]
    fn bad_magic() {
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(open_bytes(&b), Err(Error::BadMagic { .. })));
        assert!(matches!(open_bytes(b"GG"), Err(Error::BadMagic { .. })));
    }

    #[test]
    fn lying_length_is_an_error_not_an_allocation() {
        let mut b = sample();
        // The first metadata key's length field sits right after the 24-byte header.
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = open_bytes(&b).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        let mut b = sample();
        b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes()); // tensor count
        assert!(matches!(open_bytes(&b), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn truncated_data_is_out_of_bounds() {
        let b = sample();
        let e = open_bytes(&b[..b.len() - 12]).unwrap_err(); // 8 bytes of padding + 4 of data
        assert!(matches!(e, Error::TensorOutOfBounds { ref tensor, .. } if tensor == "a"), "{e}");
        let e = open_bytes(&b[..40]).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    }

    #[test]
    fn unknown_dtype() {
        let b = write::to_bytes(&[], &[("w", vec![32], 99, vec![0; 32])]);
        let e = open_bytes(&b).unwrap_err();
        assert!(matches!(e, Error::UnknownDtype { ref tensor, .. } if tensor == "w"), "{e}");
    }

    #[test]
    fn q8_0_dequantizes() {
        // One Q8_0 block: f16 scale 0.5, then 32 int8 quants q_i = i - 16.
        let mut blk = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        blk.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let b = write::to_bytes(&[], &[("q", vec![32], 8, blk)]);
        let g = open_bytes(&b).unwrap();
        let v: Vec<f32> = g.load_f32("q").unwrap().to_vec1().unwrap();
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, (i as f32 - 16.) * 0.5);
        }
    }

    /// Two f32 tensors `a` (6 values, at 0) and `b` (2 values, at 32), and the position of `b`'s offset field.
    fn two_tensors() -> (Vec<u8>, usize) {
        let b =
            write::to_bytes(&[], &[("a", vec![2, 3], 0, f32_bytes(&[0.; 6])), ("b", vec![2], 0, f32_bytes(&[1., 2.]))]);
        let name_b = [&1u64.to_le_bytes()[..], b"b"].concat();
        let at = b.windows(9).position(|w| w == name_b.as_slice()).unwrap();
        // name (8 + 1), n_dims (4), one dim (8), type (4), then the offset.
        (b, at + 9 + 4 + 8 + 4)
    }

    /// Issue 22 ("Corrupt data accepted"): an offset of 7 loaded, and generate printed nothing.
    #[test]
    fn gguf_offset_not_a_multiple_of_alignment_is_an_error() {
        let (mut b, at) = two_tensors();
        assert_eq!(u64::from_le_bytes(b[at..at + 8].try_into().unwrap()), 32);
        b[at..at + 8].copy_from_slice(&7u64.to_le_bytes());
        let e = open_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("tensor `b`") && e.contains("offset 7 is not a multiple of general.alignment 32"), "{e}");
    }

    #[test]
    fn gguf_overlapping_tensors_are_an_error() {
        let (mut b, at) = two_tensors();
        b[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
        let e = open_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("tensor `a`") && e.contains("overlaps tensor `b`"), "{e}");
    }

    #[test]
    fn unsupported_version() {
        let mut b = sample();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(open_bytes(&b), Err(Error::UnsupportedVersion { version: 1, .. })));
    }
}
