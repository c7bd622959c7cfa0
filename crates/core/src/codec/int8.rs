//! The int8 codecs (w8a8): `.weight` int8 (out, in), symmetric per output channel, and `.weight_scale` f32
//! (out); w8a8-static adds the calibrated activation parameters `.input_scale` and `.input_zero_point`.

use candle_core::Tensor;
use whittle_kernels::int8::PackedI8;

use super::io::{fits, read_bias, LinearReader, Request, Stored};
use crate::backend::cpu;
use crate::linear::Linear;

/// How the int8 formats are stored, for a saved model's `quantization_config`.
pub const FORMATS: [(&str, &str); 2] = [
    ("w8a8-dynamic", "`.weight` int8 (out, in), symmetric per output channel, `.weight_scale` f32 (out); activations quantized per token (asymmetric u8) at run time"),
    ("w8a8-static", "as w8a8-dynamic, plus `.input_scale` f32 [1] and `.input_zero_point` f32 [1]: activations x_u = clamp(round(x / scale) + zero, 0, 255) with the calibrated values"),
];

/// Tensors written in f32 whatever dtype the rest of the model is saved in.
pub const KEEP_F32: [&str; 3] = ["weight_scale", "input_scale", "input_zero_point"];

/// The weight tensors of an int8 layer; `input` = the static activation scale and zero point.
pub fn write(p: &PackedI8, input: Option<(f32, i32)>) -> crate::Result<Vec<(&'static str, Stored)>> {
    let dev = &cpu::device();
    let mut v = vec![
        ("weight", Stored::I8 { shape: vec![p.m, p.k], data: p.q.clone() }),
        ("weight_scale", Stored::Tensor(Tensor::from_vec(p.scale.clone(), p.m, dev)?)),
    ];
    if let Some((scale, zero)) = input {
        v.push(("input_scale", Stored::Tensor(Tensor::new(&[scale], dev)?)));
        v.push(("input_zero_point", Stored::Tensor(Tensor::new(&[zero as f32], dev)?)));
    }
    Ok(v)
}

/// Whether `name` is stored by this codec: an int8 `.weight`.
pub fn claims<R: LinearReader + ?Sized>(r: &R, name: &str) -> bool {
    r.dtype_of(&format!("{name}.weight")).as_deref() == Some("i8")
}

/// A w8a8-dynamic layer, or w8a8-static where `.input_scale` is stored.
pub(crate) fn read<R: LinearReader + ?Sized>(q: &Request<R>) -> std::result::Result<Linear, R::Error> {
    let (r, name, expect, bias) = (q.r, q.name, &q.expect, q.bias);
    let wname = format!("{name}.weight");
    let (shape, q) = r.load_i8(&wname)?;
    if !fits(&shape, expect) {
        return Err(r.shape_err(&wname, expect, &shape));
    }
    let sname = format!("{name}.weight_scale");
    let scale: Vec<f32> = r.get(&sname, &[shape[0]])?.to_vec1()?;
    if scale.iter().any(|v| !v.is_finite()) {
        return Err(r.bad(&sname, "holds NaN or Inf".into()));
    }
    let b = read_bias(r, name, shape[0], bias)?;
    let p = PackedI8::new(q, scale, shape[0], shape[1]);
    // `.input_scale` + `.input_zero_point`: activations with calibrated (static) parameters.
    if r.contains(&format!("{name}.input_scale")) {
        let s: Vec<f32> = r.get(&format!("{name}.input_scale"), &[1])?.to_vec1()?;
        let z: Vec<f32> = r.get(&format!("{name}.input_zero_point"), &[1])?.to_vec1()?;
        if !(s[0].is_finite() && s[0] >= 0.0 && (0.0..=255.0).contains(&z[0])) {
            return Err(
                r.bad(&format!("{name}.input_scale"), format!("scale {} / zero point {} out of range", s[0], z[0]))
            );
        }
        return Ok(Linear::int8_static(p, s[0], z[0] as i32, b)?);
    }
    Ok(Linear::int8_dynamic(p, b)?)
}
