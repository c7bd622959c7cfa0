//! The dense codec: `.weight` (out, in) in any float dtype (+ `.bias`), as Hugging Face stores a Linear.

use candle_core::Tensor;

use super::io::{read_bias, LinearReader, Request, Stored};
use crate::linear::Linear;

/// The weight tensors of a dense layer.
pub fn write(w: &Tensor) -> crate::Result<Vec<(&'static str, Stored)>> {
    Ok(vec![("weight", Stored::Tensor(w.clone()))])
}

/// A dense layer: what a Linear is when no other codec claims its tensors.
pub(crate) fn read<R: LinearReader + ?Sized>(q: &Request<R>) -> std::result::Result<Linear, R::Error> {
    let (r, name, expect, bias) = (q.r, q.name, &q.expect, q.bias);
    let w = r.get_weight(&format!("{name}.weight"), expect)?;
    let rows = w.dim(0)?;
    let b = read_bias(r, name, rows, bias)?;
    Ok(Linear::dense(w, b)?)
}
