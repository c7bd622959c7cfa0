//! The ggml block codec (llama.cpp's Q4_0 … Q6_K) for reading: a GGUF tensor of a known block type, kept in
//! its block format. (A GGUF file is written by `whittle_quant`'s GGUF writer; a directory stores these
//! layers dequantized, see [`super::write`].)

use super::io::{fits, read_bias, LinearReader, Request};
use crate::linear::Linear;

/// A block-quantized layer, or `None` where `name.weight` is not a ggml block type this reader keeps.
pub(crate) fn read<R: LinearReader + ?Sized>(q: &Request<R>) -> std::result::Result<Option<Linear>, R::Error> {
    let (r, name, expect, bias) = (q.r, q.name, &q.expect, q.bias);
    let wname = format!("{name}.weight");
    let Some((type_id, shape, raw)) = r.raw_block(&wname) else { return Ok(None) };
    let Some((fmt, qk, bb)) = whittle_kernels::ggml::type_info(type_id) else { return Ok(None) };
    if !fits(&shape, expect) {
        return Err(r.shape_err(&wname, expect, &shape));
    }
    let bw = whittle_kernels::ggml::unpack(type_id, raw, shape[0], shape[1]).map_err(|msg| r.bad(&wname, msg))?;
    let b = read_bias(r, name, shape[0], bias)?;
    Ok(Some(Linear::block(&bw, fmt, 8.0 * bb as f64 / qk as f64, b)?))
}
