//! Codecs: how each [`LinearWeight`] variant is written to a Hugging Face directory and read back. Each
//! variant's codec both writes and reads its tensors (`name.weight`, `name.weight_packed`, …), so a loader
//! asks [`read`] instead of guessing from tensor names, and a saved model's description of its formats
//! ([`quantization_formats`], [`sparse_layouts`]) comes from the same place.
//!
//! - [`dense`]: `.weight` in any float dtype.
//! - [`int8`]: w8a8-dynamic / w8a8-static.
//! - [`grouped`]: `wNa16-gG[-asym]` ([`crate::Rtn`]).
//! - [`sparse`]: N:M, bitmap, CSR.
//! - [`ggml`]: llama.cpp's block types, read from GGUF (written by the GGUF writer).
//! - low-rank (here, as it is two Linears): f32 factors as `.weight_u` (out, r) and `.weight_v` (r, in);
//!   quantized factors each as a Linear of its own under `.u.` and `.v.`; the bias once, as the layer's.

use crate::linear::{Linear, LinearWeight};
use crate::Result;

pub mod dense;
pub mod ggml;
pub mod grouped;
pub mod int8;
pub mod io;
pub mod sparse;

pub use io::{LinearReader, Stored};

/// The tensors `l` writes, as `(suffix, tensor)`: `weight`, `weight_scale`, …, `bias`.
pub fn write(l: &Linear) -> Result<Vec<(String, Stored)>> {
    let mut v = match &l.weight {
        LinearWeight::LowRank(_) => write_low_rank(l)?,
        _ => write_weight(l)?.into_iter().map(|(n, t)| (n.to_string(), t)).collect(),
    };
    if let Some(b) = &l.bias {
        v.push(("bias".into(), Stored::Tensor(b.clone())));
    }
    Ok(v)
}

/// The weight tensors of a layer that is not low-rank.
fn write_weight(l: &Linear) -> Result<Vec<(&'static str, Stored)>> {
    match &l.weight {
        LinearWeight::Dense(t) => dense::write(t),
        LinearWeight::Int8Dynamic(p) => int8::write(p, None),
        LinearWeight::Int8Static { p, scale, zero } => int8::write(p, Some((*scale, *zero))),
        LinearWeight::Block(b) => match b.rtn {
            Some(rtn) => grouped::write(b, rtn),
            // GGUF block formats are written by the GGUF writer; a directory gets their dequantized weights.
            None => dense::write(&l.dequantize()?),
        },
        LinearWeight::Sparse(s) => sparse::write(s),
        LinearWeight::LowRank(_) => unreachable!("write_low_rank"),
    }
}

/// The factors of a low-rank layer as stored. f32 factors: `weight_u` (out, r) and `weight_v` (r, in).
/// Quantized factors: each as a Linear of its own under `u.` and `v.` (e.g. `u.weight_packed`); the
/// bias once, as the layer's.
fn write_low_rank(l: &Linear) -> Result<Vec<(String, Stored)>> {
    let (u, v) = l.factors().expect("a low-rank layer");
    if let (LinearWeight::Dense(ut), LinearWeight::Dense(vt)) = (&u.weight, &v.weight) {
        return Ok(vec![
            ("weight_u".into(), Stored::Tensor(ut.clone())),
            ("weight_v".into(), Stored::Tensor(vt.clone())),
        ]);
    }
    let mut out = Vec::new();
    for (p, f) in [("u", u), ("v", v)] {
        out.extend(write(&f)?.into_iter().map(|(n, t)| (format!("{p}.{n}"), t)));
    }
    Ok(out)
}

/// Reads the Linear `name` (`name.weight` …, with `name.bias` when `bias` is true or it is stored): the codec
/// whose tensors are stored decodes it. `out`/`inp` are the expected sizes, `None` accepting any (widths
/// pruning may change).
pub fn read<R: LinearReader + ?Sized>(
    r: &R,
    name: &str,
    out: Option<usize>,
    inp: Option<usize>,
    bias: bool,
) -> std::result::Result<Linear, R::Error> {
    let expect = [out.unwrap_or(0), inp.unwrap_or(0)];
    let q = io::Request { r, name, expect, bias };
    if let Some(l) = ggml::read(&q)? {
        return Ok(l);
    }
    // `.weight_u` (out, r) + `.weight_v` (r, in): a low-rank factorisation.
    if r.contains(&format!("{name}.weight_u")) {
        let u = r.get(&format!("{name}.weight_u"), &[expect[0], 0])?;
        let v = r.get(&format!("{name}.weight_v"), &[u.dim(1)?, expect[1]])?;
        let b = io::read_bias(r, name, u.dim(0)?, bias)?;
        return Ok(Linear::low_rank(u, v, b)?);
    }
    // `.u.*` + `.v.*`: a low-rank factorisation with quantized factors, each stored as a Linear.
    if ["weight", "weight_packed", "weight_shape"].iter().any(|t| r.contains(&format!("{name}.v.{t}"))) {
        let u = read(r, &format!("{name}.u"), out, None, false)?;
        let v = read(r, &format!("{name}.v"), Some(u.in_features()), inp, false)?;
        let b = io::read_bias(r, name, u.out_features(), bias)?;
        return Ok(Linear::low_rank_of(u, v, b)?);
    }
    if sparse::claims(r, name) {
        return sparse::read(&q);
    }
    if grouped::claims(r, name) {
        return grouped::read(&q);
    }
    if int8::claims(r, name) {
        return int8::read(&q);
    }
    dense::read(&q)
}

/// The quantized formats a directory stores, `(name, description)`, for its `quantization_config`.
pub fn quantization_formats() -> Vec<(&'static str, &'static str)> {
    let mut v = int8::FORMATS.to_vec();
    v.push(grouped::FORMAT);
    v
}

/// The sparse layouts a directory stores, `(name, description)`, for its `sparsity_config`.
pub fn sparse_layouts() -> Vec<(&'static str, &'static str)> {
    sparse::LAYOUTS.to_vec()
}

/// Whether a tensor with this suffix keeps f32 when a model is saved in another float dtype (quantization
/// scales and calibrated activation parameters).
pub fn keeps_f32(name: &str) -> bool {
    int8::KEEP_F32.iter().any(|s| name.strip_suffix(s).is_some_and(|p| p.ends_with('.')))
}
