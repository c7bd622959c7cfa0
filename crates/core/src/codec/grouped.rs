//! The grouped weight-only codec (`w4a16-g64`, `w8a16-g128-asym`, …: [`Rtn`]): `.weight_packed` u8 codes,
//! `.weight_scale` f32 per group, `.weight_zero_point` u8 per group when asymmetric, `.weight_shape`.

use candle_core::Tensor;

use super::io::{read_bias, LinearReader, Request, Stored};
use crate::backend::cpu;
use crate::linear::{BlockLinear, Linear};
use crate::rtn::Rtn;

/// How the grouped formats are stored, for a saved model's `quantization_config`.
pub const FORMAT: (&str, &str) = (
    "wNa16-gG[-asym]",
    "`.weight_packed` u8 (out, in·N/8): N-bit codes, lowest bits first; `.weight_scale` f32 (out, in/G); `.weight_zero_point` u8 (out, in/G) when asymmetric (w = s·(q − z)), else w = s·(q − 2^(N−1)); `.weight_shape` i64 [out, in]",
);

/// The weight tensors of a grouped layer (out × in).
pub fn write(b: &BlockLinear, rtn: Rtn) -> crate::Result<Vec<(&'static str, Stored)>> {
    let (m, k) = (b.packed.m, b.packed.k);
    let (packed, scale, zero) = rtn.pack(&b.packed.unpack());
    let dev = &cpu::device();
    let mut v = vec![
        ("weight_packed", Stored::Tensor(Tensor::from_vec(packed, (m, k * rtn.bits as usize / 8), dev)?)),
        ("weight_scale", Stored::Tensor(Tensor::from_vec(scale, (m, k / rtn.group), dev)?)),
        ("weight_shape", Stored::Tensor(Tensor::new(&[m as i64, k as i64], dev)?)),
    ];
    if let Some(z) = zero {
        v.push(("weight_zero_point", Stored::Tensor(Tensor::from_vec(z, (m, k / rtn.group), dev)?)));
    }
    Ok(v)
}

/// Whether `name` is stored by this codec: a `.weight_packed`.
pub fn claims<R: LinearReader + ?Sized>(r: &R, name: &str) -> bool {
    r.contains(&format!("{name}.weight_packed"))
}

/// A grouped layer: sizes from `weight_shape`, bits from the packed width, group from the scales' width.
pub(crate) fn read<R: LinearReader + ?Sized>(q: &Request<R>) -> std::result::Result<Linear, R::Error> {
    let (r, name, expect, bias) = (q.r, q.name, &q.expect, q.bias);
    let field = |suffix: &str| format!("{name}.{suffix}");
    let shape: Vec<i64> = r.load_native(&field("weight_shape"))?.to_dtype(candle_core::DType::I64)?.to_vec1()?;
    let [m, k] = shape[..] else {
        return Err(r.bad(&field("weight_shape"), format!("expected [out, in], got {shape:?}")));
    };
    let (m, k) = (m as usize, k as usize);
    if expect.iter().zip([m, k]).any(|(e, g)| *e != 0 && *e != g) {
        return Err(r.shape_err(&field("weight_shape"), expect, &[m, k]));
    }
    let packed = r.load_native(&field("weight_packed"))?;
    let (pm, pk) = packed.dims2()?;
    let packed: Vec<u8> = packed.flatten_all()?.to_vec1()?;
    let scale = r.load_f32(&field("weight_scale"))?;
    let (_, ng) = scale.dims2()?;
    let scale: Vec<f32> = scale.flatten_all()?.to_vec1()?;
    if scale.iter().any(|v| !v.is_finite()) {
        return Err(r.bad(&field("weight_scale"), "holds NaN or Inf".into()));
    }
    let zero: Option<Vec<u8>> = if r.contains(&field("weight_zero_point")) {
        Some(r.load_native(&field("weight_zero_point"))?.flatten_all()?.to_vec1()?)
    } else {
        None
    };
    let bits = if k > 0 && pm == m { (pk * 8 / k) as u32 } else { 0 };
    if ng == 0 || k % ng != 0 || !matches!(bits, 2 | 3 | 4 | 8) {
        return Err(
            r.bad(&field("weight_packed"), format!("({pm}, {pk}) packed with {ng} groups does not fit ({m}, {k})"))
        );
    }
    let rtn = Rtn { bits, group: k / ng, zero_point: zero.is_some() };
    let bw = rtn
        .unpack(m, k, &packed, &scale, zero.as_deref())
        .ok_or_else(|| r.bad(&field("weight_packed"), format!("sizes do not fit {} for ({m}, {k})", rtn.name())))?;
    let b = read_bias(r, name, m, bias)?;
    Ok(Linear::rtn(&bw, rtn, b)?)
}
