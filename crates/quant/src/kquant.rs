//! llama.cpp's importance-weighted ("imatrix") block quantizers, ported from ggml/src/ggml-quants.c
//! (ggml-org/llama.cpp, commit 01243c58): `quantize_q4_0`, `quantize_q4_1`, `quantize_q5_0`, `quantize_q5_1`,
//! `quantize_q8_0`, `quantize_q2_K` … `quantize_q6_K`. With an importance matrix they run
//! `quantize_row_*_impl`; without one, the reference quantizers `quantize_row_*_ref`. Both are ported, so
//! [`quantize_weighted`] gives what `llama-quantize` writes with and without an importance matrix (its imatrix option).
//!
//! The importance `qw_j` of input column `j` is what llama-imatrix measures (the mean of the squared
//! activation of that channel). Each `_impl` turns it into per-weight weights and fits scales (and mins)
//! that minimise the weighted squared error Σ_j w_j·(x_j − x̂_j)²:
//!
//! | type | `_ref` (no imatrix) | `_impl`: weight `w_j` | `_impl`: search |
//! |------|---------------------|-----------------------|-----------------|
//! | Q4_0 | d = max/−8 | qw·√(σ²+x²), σ² = Σx²/n over the row | `make_qx_quants(32, 8)`, 18 trial scales |
//! | Q4_1 | d = (max−min)/15 | same | `make_qkx3_quants(32, 15, −0.9, 0.05, 36)` |
//! | Q5_0 | d = max/−16 | same | `make_qx_quants(32, 16)` |
//! | Q5_1 | d = (max−min)/31 | same | `make_qkx3_quants(32, 31, −0.9, 0.05, 36)` |
//! | Q8_0 | d = amax/127 | — (ggml ignores the imatrix) | — |
//! | Q2_K | `make_qkx2_quants(16, 3, w=abs(x), −0.5, 0.1, 15, mad)` | qw·√(σ²+x²), σ² = Σx²/256 | `make_qkx3_quants(16, 3, −0.9, 0.05, 36)`, scales by `make_qp_quants(16, 15)` |
//! | Q3_K | `make_q3_quants(16, 4, rmse)` | qw·√(σ²+x²), σ² = 2Σx²/256 | `make_qx_quants(16, 4)`, scales by `make_qx_quants(16, 32)` |
//! | Q4_K | `make_qkx2_quants(32, 15, w=√(Σx²/32)+abs(x), −1, 0.1, 20)` | same as Q3_K | `make_qkx3_quants(32, 15, −0.9, 0.05, 36)`, scales by `make_qp_quants(8, 63)` |
//! | Q5_K | `make_qkx2_quants(32, 31, same w, −0.5, 0.1, 15)` | same as Q3_K | `make_qkx3_quants(32, 31, …)`, scales by `make_qp_quants(8, 63)` |
//! | Q6_K | `make_qx_quants(16, 32, w=x²)` | qw (no σ² term) | `make_qx_quants(16, 32)` |
//!
//! The port keeps ggml's float operation order, its rounding (`nearest_int`: round half to even via the
//! 1.5·2²³ trick, `roundf` and truncating casts where ggml has them) and its fp16 conversion (round to
//! nearest even, the `half` crate), so for the same input it writes the same bytes as ggml compiled without
//! fused multiply-add: `bytes_equal_ggml_golden` pins that against hashes of ggml's own output for every
//! type, with and without imatrix. Upstream builds ggml-quants.c into ggml-base without `-march=native`, so
//! a stock x86-64 llama.cpp has no FMA there; where the baseline has FMA (aarch64) or ggml-quants.c is built
//! with `-march=native`, GCC's default `-ffp-contract=fast` fuses multiply-adds, which moves near-ties and
//! changes a few percent of the blocks (measured: 0–20% by type), never the format or the error level.
//!
//! Where candle's `QTensor::quantize` (whittle's writer today) differs from ggml's `_ref`: candle 0.11 ports an
//! older llama.cpp for Q2_K, Q4_K, Q5_K (`make_qkx1_quants`) and Q6_K (an older `make_qx_quants`), and rounds
//! with `f32::round` (half away from zero) instead of `nearest_int`. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q3_K
//! agree with ggml byte for byte on generic data (see the tests).

// The loops index like ggml's C (`x[16*j + ii]`, `L[j + l + 32]`) so that this port reads line by line
// against upstream; iterator rewrites would hide that correspondence.
#![allow(clippy::needless_range_loop)]

use std::mem::{align_of, size_of};

use half::f16;

use whittle_kernels::ggml::{ty, GgmlType};

/// Weights per K-quant super-block.
const QK_K: usize = 256;

/// ggml's `GROUP_MAX_EPS`: a group whose largest |x| is below this quantizes to all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

// ---------------------------------------------------------------------------------------------------------
// Block formats (ggml-common.h). All fields are bytes, so a block's memory is its file layout (little-endian
// fp16 in `[u8; 2]`).

/// # Safety
/// Implementors are `#[repr(C)]` structs of `u8`/`i8` arrays only: alignment 1, no padding (asserted by
/// size), every byte pattern a valid value. A byte slice of a multiple of the size can then be viewed as
/// a slice of blocks.
unsafe trait Block: Sized {
    /// Weights per block.
    const QK: usize;
}

/// Q4_0, 4.5 bits/weight: x = d·(q − 8), q ∈ [0, 15]; `qs[j]` holds weight j (low nibble) and j+16 (high).
#[repr(C)]
struct BlockQ4_0 {
    d: [u8; 2],
    qs: [u8; 16],
}

/// Q4_1, 5 bits/weight: x = d·q + m, q ∈ [0, 15]; nibbles as Q4_0.
#[repr(C)]
struct BlockQ4_1 {
    d: [u8; 2],
    m: [u8; 2],
    qs: [u8; 16],
}

/// Q5_0, 5.5 bits/weight: x = d·(q − 16), q ∈ [0, 31]; low 4 bits as Q4_0, bit 4 of weight j in bit j of
/// the little-endian `qh`.
#[repr(C)]
struct BlockQ5_0 {
    d: [u8; 2],
    qh: [u8; 4],
    qs: [u8; 16],
}

/// Q5_1, 6 bits/weight: x = d·q + m, q ∈ [0, 31]; bits as Q5_0.
#[repr(C)]
struct BlockQ5_1 {
    d: [u8; 2],
    m: [u8; 2],
    qh: [u8; 4],
    qs: [u8; 16],
}

/// Q8_0, 8.5 bits/weight: x = d·q, q ∈ [−127, 127].
#[repr(C)]
struct BlockQ8_0 {
    d: [u8; 2],
    qs: [i8; 32],
}

/// Q2_K, 2.625 bits/weight: 16 sub-blocks of 16, x = d·sc_j·q − dmin·m_j with q ∈ [0, 3] and 4-bit
/// sc_j (low nibble of `scales[j]`) and m_j (high nibble).
#[repr(C)]
struct BlockQ2K {
    scales: [u8; 16],
    qs: [u8; 64],
    d: [u8; 2],
    dmin: [u8; 2],
}

/// Q3_K, 3.4375 bits/weight: 16 sub-blocks of 16, x = d·(sc_j − 32)·(q − 4) with q ∈ [0, 7] (low 2 bits in
/// `qs`, the third in `hmask`) and 6-bit sc_j packed in 12 bytes.
#[repr(C)]
struct BlockQ3K {
    hmask: [u8; 32],
    qs: [u8; 64],
    scales: [u8; 12],
    d: [u8; 2],
}

/// Q4_K, 4.5 bits/weight: 8 sub-blocks of 32, x = d·sc_j·q − dmin·m_j with q ∈ [0, 15] and 6-bit sc_j,
/// m_j packed in 12 bytes (`get_scale_min_k4`).
#[repr(C)]
struct BlockQ4K {
    d: [u8; 2],
    dmin: [u8; 2],
    scales: [u8; 12],
    qs: [u8; 128],
}

/// Q5_K, 5.5 bits/weight: as Q4_K with q ∈ [0, 31], bit 4 in `qh`.
#[repr(C)]
struct BlockQ5K {
    d: [u8; 2],
    dmin: [u8; 2],
    scales: [u8; 12],
    qh: [u8; 32],
    qs: [u8; 128],
}

/// Q6_K, 6.5625 bits/weight: 16 sub-blocks of 16, x = d·sc_j·(q − 32) with q ∈ [0, 63] (low 4 bits in `ql`,
/// high 2 in `qh`) and int8 sc_j.
#[repr(C)]
struct BlockQ6K {
    ql: [u8; 128],
    qh: [u8; 64],
    scales: [i8; 16],
    d: [u8; 2],
}

/// `$t` is the block of ggml type `$id`: its size is the type's bytes per block (checked against
/// [`whittle_kernels::ggml::TYPES`] at compile time), its weights the type's block.
macro_rules! block {
    ($t:ty, $id:expr) => {
        const _: () = assert!(size_of::<$t>() == GgmlType::of($id).bytes && align_of::<$t>() == 1);
        // SAFETY: `$t` is `#[repr(C)]` of byte arrays only; the assertion above checks alignment 1 and no padding.
        unsafe impl Block for $t {
            const QK: usize = GgmlType::of($id).block;
        }
    };
}
block!(BlockQ4_0, ty::Q4_0);
block!(BlockQ4_1, ty::Q4_1);
block!(BlockQ5_0, ty::Q5_0);
block!(BlockQ5_1, ty::Q5_1);
block!(BlockQ8_0, ty::Q8_0);
block!(BlockQ2K, ty::Q2_K);
block!(BlockQ3K, ty::Q3_K);
block!(BlockQ4K, ty::Q4_K);
block!(BlockQ5K, ty::Q5_K);
block!(BlockQ6K, ty::Q6_K);

/// Views `bytes` (a whole number of blocks) as blocks.
fn blocks_mut<B: Block>(bytes: &mut [u8]) -> &mut [B] {
    assert!(bytes.len().is_multiple_of(size_of::<B>()));
    // SAFETY: `B: Block` has alignment 1, no padding and no invalid byte patterns, and the length is a
    // whole number of `B`s, so the reinterpretation covers exactly the borrowed bytes.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), bytes.len() / size_of::<B>()) }
}

fn fp16(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn fp32(h: [u8; 2]) -> f32 {
    f16::from_le_bytes(h).to_f32()
}

// ---------------------------------------------------------------------------------------------------------
// Public entry point.

/// Quantizes `rows` rows of `cols` f32 values (row-major) to ggml type `type_id` (ids as in
/// [`whittle_kernels::ggml::ty`]: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K), with `imatrix` = per-column importance
/// (len `cols`) as llama-quantize's imatrix option gives it, or `None` for ggml's reference quantizers.
/// Returns the ggml block bytes (`rows · cols / block · block_bytes`), byte layout identical to ggml's.
///
/// Q8_0 has no importance-weighted variant in ggml; its imatrix is ignored, as there. Rows are quantized
/// independently, in parallel over the available cores.
///
/// # Shapes
/// `x`: (rows, cols); `imatrix`: (cols,); result: (rows, cols / QK) blocks.
pub fn quantize_weighted(
    type_id: u32,
    x: &[f32],
    rows: usize,
    cols: usize,
    imatrix: Option<&[f32]>,
) -> Result<Vec<u8>, String> {
    let (name, qk, block_bytes) = whittle_kernels::ggml::type_info(type_id).ok_or_else(|| {
        format!(
            "quantize_weighted: ggml type {type_id} is not a block type (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k … q6_k)"
        )
    })?;
    if !cols.is_multiple_of(qk) {
        return Err(format!("quantize_weighted: {name} needs a row width that is a multiple of {qk}; got {cols}"));
    }
    if x.len() != rows * cols {
        return Err(format!("quantize_weighted: {name}: {} values for a {rows} × {cols} tensor", x.len()));
    }
    if let Some(w) = imatrix {
        if w.len() != cols {
            return Err(format!(
                "quantize_weighted: {name}: imatrix has {} entries for a row width of {cols}",
                w.len()
            ));
        }
    }
    let mut out = vec![0u8; rows * (cols / qk) * block_bytes];
    if out.is_empty() {
        return Ok(out);
    }
    match type_id {
        ty::Q4_0 => run::<BlockQ4_0>(x, cols, imatrix, &mut out, q4_0_ref, q4_0_impl),
        ty::Q4_1 => run::<BlockQ4_1>(x, cols, imatrix, &mut out, q4_1_ref, q4_1_impl),
        ty::Q5_0 => run::<BlockQ5_0>(x, cols, imatrix, &mut out, q5_0_ref, q5_0_impl),
        ty::Q5_1 => run::<BlockQ5_1>(x, cols, imatrix, &mut out, q5_1_ref, q5_1_impl),
        ty::Q8_0 => run::<BlockQ8_0>(x, cols, imatrix, &mut out, q8_0_ref, |x, y, _qw| q8_0_ref(x, y)),
        ty::Q2_K => run::<BlockQ2K>(x, cols, imatrix, &mut out, q2_k_ref, q2_k_impl),
        ty::Q3_K => run::<BlockQ3K>(x, cols, imatrix, &mut out, q3_k_ref, q3_k_impl),
        ty::Q4_K => run::<BlockQ4K>(x, cols, imatrix, &mut out, q4_k_ref, q4_k_impl),
        ty::Q5_K => run::<BlockQ5K>(x, cols, imatrix, &mut out, q5_k_ref, q5_k_impl),
        ty::Q6_K => run::<BlockQ6K>(
            x,
            cols,
            imatrix,
            &mut out,
            |x, y| q6_k_impl(x, y, None),
            |x, y, qw| q6_k_impl(x, y, Some(qw)),
        ),
        _ => return Err(format!("quantize_weighted: no quantizer for {name}")),
    }
    Ok(out)
}

/// Quantizes every row of `x` (width `cols`) into `out` with `ref_row` (no imatrix) or `impl_row`, one
/// contiguous band of rows per core (rows are independent in ggml too).
fn run<B: Block>(
    x: &[f32],
    cols: usize,
    imatrix: Option<&[f32]>,
    out: &mut [u8],
    ref_row: fn(&[f32], &mut [B]),
    impl_row: fn(&[f32], &mut [B], &[f32]),
) {
    let row_bytes = cols / B::QK * size_of::<B>();
    let rows = x.len() / cols;
    let band = |x: &[f32], out: &mut [u8]| {
        for (xr, yr) in x.chunks_exact(cols).zip(out.chunks_exact_mut(row_bytes)) {
            let y = blocks_mut::<B>(yr);
            match imatrix {
                None => ref_row(xr, y),
                Some(qw) => impl_row(xr, y, qw),
            }
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows);
    if threads <= 1 {
        band(x, out);
        return;
    }
    let per = rows.div_ceil(threads);
    let band = &band;
    std::thread::scope(|s| {
        for (xb, ob) in x.chunks(per * cols).zip(out.chunks_mut(per * row_bytes)) {
            s.spawn(move || band(xb, ob));
        }
    });
}

// ---------------------------------------------------------------------------------------------------------
// Helpers (ggml-quants.c "Helper functions"), same operation order as upstream.

/// ggml's `nearest_int`: adding 1.5·2²³ leaves round-half-to-even(fval) in the low mantissa bits. Valid for
/// |fval| ≤ 2²²−1; outside that it returns the same garbage as ggml's release build (whose `assert` is off).
#[inline]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `make_qx_quants`: symmetric codes `L = l + nmax`, l ∈ [−nmax, nmax−1], for n values, scale
/// chosen among −(nmax + 0.1·is)/max, is ∈ [−9, 9], by the weighted least-squares fit Σw·x·l / Σw·l² with
/// weights `qw` or (rmse_type 1) x², 2: 1, 3: |x|, 4: √|x|. Returns the scale (x ≈ scale·l).
fn make_qx_quants(n: usize, nmax: i32, x: &[f32], codes: &mut [i8], rmse_type: i32, qw: Option<&[f32]>) -> f32 {
    let (x, codes) = (&x[..n], &mut codes[..n]);
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    if rmse_type == 0 {
        for (c, &v) in codes.iter_mut().zip(x) {
            let l = nearest_int(iscale * v);
            *c = (nmax + l.clamp(-nmax, nmax - 1)) as i8;
        }
        return 1.0 / iscale;
    }
    let (rmse_type, return_early) = if rmse_type < 0 { (-rmse_type, true) } else { (rmse_type, false) };
    let weight = |i: usize| match qw {
        Some(qw) => qw[i],
        None => match rmse_type {
            1 => x[i] * x[i],
            2 => 1.0,
            3 => x[i].abs(),
            _ => x[i].abs().sqrt(),
        },
    };
    let mut sumlx = 0f32;
    let mut suml2 = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        codes[i] = (l + nmax) as i8;
        let w = weight(i);
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    if return_early {
        return if suml2 > 0.0 { 0.5 * (scale + 1.0 / iscale) } else { 1.0 / iscale };
    }
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for i in 0..n {
            let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
            let w = weight(i);
            sumlx += w * x[i] * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (c, &v) in codes.iter_mut().zip(x) {
                let l = nearest_int(iscale * v);
                *c = (nmax + l.clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants` (Q3_K `_ref`): symmetric codes as [`make_qx_quants`]; with `do_rmse`, up to 5
/// coordinate-descent sweeps on the x²-weighted fit.
fn make_q3_quants(n: usize, nmax: i32, x: &[f32], codes: &mut [i8], do_rmse: bool) -> f32 {
    let (x, codes) = (&x[..n], &mut codes[..n]);
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    if do_rmse {
        let mut sumlx = 0f32;
        let mut suml2 = 0f32;
        for i in 0..n {
            let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
            codes[i] = l as i8;
            let w = x[i] * x[i];
            sumlx += w * x[i] * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        for _itry in 0..5 {
            let mut n_changed = 0;
            for i in 0..n {
                let w = x[i] * x[i];
                let li = codes[i] as f32;
                let mut slx = sumlx - w * x[i] * li;
                if slx > 0.0 {
                    let mut sl2 = suml2 - w * li * li;
                    let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                    if new_l != codes[i] as i32 {
                        slx += w * x[i] * new_l as f32;
                        sl2 += w * new_l as f32 * new_l as f32;
                        if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                            codes[i] = new_l as i8;
                            sumlx = slx;
                            suml2 = sl2;
                            n_changed += 1;
                        }
                    }
                }
            }
            if n_changed == 0 {
                break;
            }
        }
        for c in codes.iter_mut() {
            *c += nmax as i8;
        }
        return if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    }
    for (c, &v) in codes.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *c = (l + nmax) as i8;
    }
    1.0 / iscale
}

/// ggml's `make_qkx2_quants` (K-quant `_ref`s): asymmetric codes q ∈ [0, nmax], x ≈ scale·q − the_min,
/// searched over iscale = (rmin + rdelta·is + nmax)/(max − min), is ∈ [0, nstep], each refit by weighted
/// least squares. Returns (scale, the_min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    n: usize,
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    codes: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let (x, weights, codes, laux) = (&x[..n], &weights[..n], &mut codes[..n], &mut laux[..n]);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min));
        codes[i] = l.clamp(0, nmax) as u8;
        let diff = scale * codes[i] as f32 + min - x[i];
        let diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                let diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                codes.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qkx3_quants` (the `_impl`s of Q2_K, Q4_K, Q5_K, Q4_1, Q5_1): as [`make_qkx2_quants`], with
/// weights x² when `weights` is `None`, and the code of each trial clamped to [0, nmax] before rounding
/// (upstream's guard against an inf/NaN `iscale·(x − min)`). Returns (scale, the_min).
#[allow(clippy::too_many_arguments)]
fn make_qkx3_quants(
    n: usize,
    nmax: i32,
    x: &[f32],
    weights: Option<&[f32]>,
    codes: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let (x, codes, laux) = (&x[..n], &mut codes[..n], &mut laux[..n]);
    let weight = |i: usize| weights.map_or(x[i] * x[i], |w| w[i]);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weight(0);
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weight(i);
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        codes.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min));
        codes[i] = l.clamp(0, nmax) as u8;
        let diff = scale * codes[i] as f32 + min - x[i];
        let diff = if use_mad { diff.abs() } else { diff * diff };
        best_mad += weight(i) * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let fmax = nmax as f32;
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let v = iscale * (x[i] - min);
            let l = if v > 0.0 { nearest_int(if v < fmax { v } else { fmax }) } else { 0 };
            laux[i] = l as u8;
            let (w, l) = (weight(i), l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                let diff = if use_mad { diff.abs() } else { diff * diff };
                mad += weight(i) * diff;
            }
            if mad < best_mad {
                codes.copy_from_slice(laux);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qp_quants`: non-negative codes q ∈ [0, nmax] for non-negative x (the sub-block scales or
/// mins of a K-quant super-block), x ≈ scale·q, weighted by `quant_weights`: 8 trial scales
/// (0.1·is + nmax)/max, then up to 5 coordinate-descent sweeps. Returns the scale.
fn make_qp_quants(n: usize, nmax: i32, x: &[f32], codes: &mut [u8], quant_weights: &[f32]) -> f32 {
    let (x, codes, qw) = (&x[..n], &mut codes[..n], &quant_weights[..n]);
    let mut max = 0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0f32;
    for i in 0..n {
        let diff = x[i] - scale * codes[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0f32;
        for i in 0..n {
            let l = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut sumlx = 0f32;
    let mut suml2 = 0f32;
    for i in 0..n {
        // ggml sums the int code but stores it truncated to uint8_t; a negative code is kept that way.
        let l = nearest_int(iscale * x[i]).min(nmax);
        codes[i] = l as u8;
        let w = qw[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _itry in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = qw[i];
            let li = codes[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != codes[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        codes[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Σx² of a row or super-block, summed in order as ggml does.
fn sum_sq(x: &[f32]) -> f32 {
    let mut s = 0f32;
    for &v in x {
        s += v * v;
    }
    s
}

/// Q2_K/Q3_K: four 2-bit codes per byte, weights j, j+32, j+64, j+96 of each 128.
fn pack_2bit(codes: &[u8; QK_K], qs: &mut [u8; 64]) {
    for j in (0..QK_K).step_by(128) {
        for l in 0..32 {
            qs[j / 4 + l] =
                codes[j + l] | (codes[j + l + 32] << 2) | (codes[j + l + 64] << 4) | (codes[j + l + 96] << 6);
        }
    }
}

/// Q3_K: stores the 6-bit biased scale `l` ∈ [0, 63] of sub-block j.
fn set_q3k_scale(scales: &mut [u8; 12], j: usize, l: i32) {
    if j < 8 {
        scales[j] = (l & 0xF) as u8;
    } else {
        scales[j - 8] |= ((l & 0xF) << 4) as u8;
    }
    let l = l >> 4;
    scales[j % 4 + 8] |= (l << (2 * (j / 4))) as u8;
}

/// Q3_K: the signed scale (sc − 32) of sub-block j.
fn q3k_scale(scales: &[u8; 12], j: usize) -> i32 {
    let sc = if j < 8 { scales[j] & 0xF } else { scales[j - 8] >> 4 };
    (sc | (((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32
}

/// Q3_K: re-quantizes with the stored scales, splits off the high bit into `hmask` (bit b of byte m for
/// weight 32·b + m) and packs the low two bits.
fn q3k_finish(x: &[f32], y: &mut BlockQ3K, codes: &mut [i8; QK_K]) {
    for j in 0..QK_K / 16 {
        let d = fp32(y.d) * q3k_scale(&y.scales, j) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
            codes[16 * j + ii] = (l + 4) as i8;
        }
    }
    y.hmask.fill(0);
    let mut m = 0;
    let mut hm = 1u8;
    let mut low = [0u8; QK_K];
    for j in 0..QK_K {
        if codes[j] > 3 {
            y.hmask[m] |= hm;
            codes[j] -= 4;
        }
        low[j] = codes[j] as u8;
        m += 1;
        if m == QK_K / 8 {
            m = 0;
            hm <<= 1;
        }
    }
    pack_2bit(&low, &mut y.qs);
}

/// Q4_K/Q5_K: stores the 6-bit scale `ls` and min `lm` of sub-block j in the 12 packed bytes.
fn set_scale_min_k4(scales: &mut [u8; 12], j: usize, ls: u8, lm: u8) {
    if j < 4 {
        scales[j] = ls;
        scales[j + 4] = lm;
    } else {
        scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
        scales[j - 4] |= (ls >> 4) << 6;
        scales[j] |= (lm >> 4) << 6;
    }
}

/// ggml's `get_scale_min_k4`.
fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K/Q5_K: re-quantizes the super-block with its stored 6-bit scales and mins; codes ∈ [0, nmax].
fn k4_requantize(x: &[f32], d: [u8; 2], dmin: [u8; 2], scales: &[u8; 12], nmax: i32, codes: &mut [u8; QK_K]) {
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let d = fp32(d) * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = fp32(dmin) * m as f32;
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
            codes[32 * j + ii] = l as u8;
        }
    }
}

/// Q4_K: two codes per byte, weights j (low nibble) and j+32 (high) of each 64.
fn pack_q4k(codes: &[u8; QK_K], qs: &mut [u8; 128]) {
    for j in (0..QK_K).step_by(64) {
        for l in 0..32 {
            qs[j / 2 + l] = codes[j + l] | (codes[j + l + 32] << 4);
        }
    }
}

/// Q5_K: low nibbles as Q4_K, bit 4 of weight 64·n + j in bit 2n of `qh[j]` (weight +32: bit 2n+1).
fn pack_q5k(codes: &[u8; QK_K], qh: &mut [u8; 32], ql: &mut [u8; 128]) {
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for n in (0..QK_K).step_by(64) {
        for j in 0..32 {
            let mut l1 = codes[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = codes[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[n / 2 + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// Q5_0/Q5_1: low nibbles of weights j and j+16 in `qs[j]`, bit 4 of weight j in bit j of `qh`.
fn pack_q5(codes: &[u8; 32], qs: &mut [u8; 16]) -> [u8; 4] {
    let mut qh = 0u32;
    for j in 0..16 {
        let (xi0, xi1) = (codes[j], codes[j + 16]);
        qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= ((xi0 as u32 & 0x10) >> 4) << j;
        qh |= ((xi1 as u32 & 0x10) >> 4) << (j + 16);
    }
    qh.to_le_bytes()
}

/// The row weights w_j = qw_j·√(σ² + x_j²) of the `_impl`s (all but Q6_K).
fn weights_sigma(qw: &[f32], x: &[f32], sigma2: f32, w: &mut [f32]) {
    for ((w, &q), &v) in w.iter_mut().zip(qw).zip(x) {
        *w = q * (sigma2 + v * v).sqrt();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

/// `quantize_row_q4_0_ref`.
fn q4_0_ref(x: &[f32], y: &mut [BlockQ4_0]) {
    for (yb, xb) in y.iter_mut().zip(x.chunks_exact(32)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = fp16(d);
        for j in 0..16 {
            let x0 = xb[j] * id;
            let x1 = xb[16 + j] * id;
            let xi0 = ((x0 + 8.5) as i8).min(15) as u8;
            let xi1 = ((x1 + 8.5) as i8).min(15) as u8;
            yb.qs[j] = xi0 | (xi1 << 4);
        }
    }
}

/// `quantize_row_q4_0_impl` with quant_weights.
fn q4_0_impl(x: &[f32], y: &mut [BlockQ4_0], qw: &[f32]) {
    let sigma2 = sum_sq(x) / x.len() as f32;
    let (mut weight, mut codes) = ([0f32; 32], [0i8; 32]);
    for (ib, (yb, xb)) in y.iter_mut().zip(x.chunks_exact(32)).enumerate() {
        weights_sigma(&qw[32 * ib..32 * ib + 32], xb, sigma2, &mut weight);
        let d = make_qx_quants(32, 8, xb, &mut codes, 1, Some(&weight));
        yb.d = fp16(d);
        for j in 0..16 {
            yb.qs[j] = codes[j] as u8 | ((codes[j + 16] as u8) << 4);
        }
    }
}

/// `quantize_row_q4_1_ref`.
fn q4_1_ref(x: &[f32], y: &mut [BlockQ4_1]) {
    for (yb, xb) in y.iter_mut().zip(x.chunks_exact(32)) {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in xb {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = fp16(d);
        yb.m = fp16(min);
        for j in 0..16 {
            let x0 = (xb[j] - min) * id;
            let x1 = (xb[16 + j] - min) * id;
            let xi0 = ((x0 + 0.5) as i8).min(15) as u8;
            let xi1 = ((x1 + 0.5) as i8).min(15) as u8;
            yb.qs[j] = xi0 | (xi1 << 4);
        }
    }
}

/// `quantize_row_q4_1_impl` with quant_weights.
fn q4_1_impl(x: &[f32], y: &mut [BlockQ4_1], qw: &[f32]) {
    let sigma2 = sum_sq(x) / x.len() as f32;
    let (mut weight, mut codes, mut laux) = ([0f32; 32], [0u8; 32], [0u8; 32]);
    for (ib, (yb, xb)) in y.iter_mut().zip(x.chunks_exact(32)).enumerate() {
        weights_sigma(&qw[32 * ib..32 * ib + 32], xb, sigma2, &mut weight);
        let (d, min) = make_qkx3_quants(32, 15, xb, Some(&weight), &mut codes, &mut laux, -0.9, 0.05, 36, false);
        yb.d = fp16(d);
        yb.m = fp16(-min);
        for j in 0..16 {
            yb.qs[j] = codes[j] | (codes[j + 16] << 4);
        }
    }
}

/// `quantize_row_q5_0_ref`.
fn q5_0_ref(x: &[f32], y: &mut [BlockQ5_0]) {
    for (yb, xb) in y.iter_mut().zip(x.chunks_exact(32)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = fp16(d);
        let mut codes = [0u8; 32];
        for j in 0..32 {
            codes[j] = ((xb[j] * id + 16.5) as i8).min(31) as u8;
        }
        yb.qh = pack_q5(&codes, &mut yb.qs);
    }
}

/// `quantize_row_q5_0_impl` with quant_weights.
fn q5_0_impl(x: &[f32], y: &mut [BlockQ5_0], qw: &[f32]) {
    let sigma2 = sum_sq(x) / x.len() as f32;
    let (mut weight, mut codes) = ([0f32; 32], [0i8; 32]);
    for (ib, (yb, xb)) in y.iter_mut().zip(x.chunks_exact(32)).enumerate() {
        weights_sigma(&qw[32 * ib..32 * ib + 32], xb, sigma2, &mut weight);
        let d = make_qx_quants(32, 16, xb, &mut codes, 1, Some(&weight));
        yb.d = fp16(d);
        yb.qh = pack_q5(&codes.map(|c| c as u8), &mut yb.qs);
    }
}

/// `quantize_row_q5_1_ref`.
fn q5_1_ref(x: &[f32], y: &mut [BlockQ5_1]) {
    for (yb, xb) in y.iter_mut().zip(x.chunks_exact(32)) {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in xb {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = fp16(d);
        yb.m = fp16(min);
        let mut codes = [0u8; 32];
        for j in 0..32 {
            codes[j] = ((xb[j] - min) * id + 0.5) as u8;
        }
        yb.qh = pack_q5(&codes, &mut yb.qs);
    }
}

/// `quantize_row_q5_1_impl` with quant_weights.
fn q5_1_impl(x: &[f32], y: &mut [BlockQ5_1], qw: &[f32]) {
    let sigma2 = sum_sq(x) / x.len() as f32;
    let (mut weight, mut codes, mut laux) = ([0f32; 32], [0u8; 32], [0u8; 32]);
    for (ib, (yb, xb)) in y.iter_mut().zip(x.chunks_exact(32)).enumerate() {
        weights_sigma(&qw[32 * ib..32 * ib + 32], xb, sigma2, &mut weight);
        let (d, min) = make_qkx3_quants(32, 31, xb, Some(&weight), &mut codes, &mut laux, -0.9, 0.05, 36, false);
        yb.d = fp16(d);
        yb.m = fp16(-min);
        yb.qh = pack_q5(&codes, &mut yb.qs);
    }
}

/// `quantize_row_q8_0_ref` (also `quantize_q8_0` with quant_weights, which ggml ignores).
fn q8_0_ref(x: &[f32], y: &mut [BlockQ8_0]) {
    for (yb, xb) in y.iter_mut().zip(x.chunks_exact(32)) {
        let mut amax = 0f32;
        for &v in xb {
            amax = if amax > v.abs() { amax } else { v.abs() };
        }
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = fp16(d);
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// K-quants.

/// `quantize_row_q2_K_ref`.
fn q2_k_ref(x: &[f32], y: &mut [BlockQ2K]) {
    const Q4SCALE: f32 = 15.0;
    let (mut codes, mut laux, mut weights) = ([0u8; QK_K], [0u8; 16], [0f32; 16]);
    let (mut mins, mut scales) = ([0f32; QK_K / 16], [0f32; QK_K / 16]);
    for (yb, x) in y.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..QK_K / 16 {
            let xs = &x[16 * j..16 * j + 16];
            for l in 0..16 {
                weights[l] = xs[l].abs();
            }
            (scales[j], mins[j]) =
                make_qkx2_quants(16, 3, xs, &weights, &mut codes[16 * j..], &mut laux, -0.5, 0.1, 15, true);
            if scales[j] > max_scale {
                max_scale = scales[j];
            }
            if mins[j] > max_min {
                max_min = mins[j];
            }
        }
        if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for j in 0..QK_K / 16 {
                yb.scales[j] = nearest_int(iscale * scales[j]) as u8;
            }
            yb.d = fp16(max_scale / Q4SCALE);
        } else {
            yb.scales.fill(0);
            yb.d = fp16(0.0);
        }
        if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for j in 0..QK_K / 16 {
                let l = nearest_int(iscale * mins[j]);
                yb.scales[j] |= (l << 4) as u8;
            }
            yb.dmin = fp16(max_min / Q4SCALE);
        } else {
            yb.dmin = fp16(0.0);
        }
        q2k_finish(x, fp32(yb.d), fp32(yb.dmin), yb, &mut codes);
    }
}

/// Q2_K: re-quantizes with the stored 4-bit scales and mins (`dm`, `mm` the decoded fp16 super-scales) and packs.
fn q2k_finish(x: &[f32], dm: f32, mm: f32, y: &mut BlockQ2K, codes: &mut [u8; QK_K]) {
    for j in 0..QK_K / 16 {
        let d = dm * (y.scales[j] & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let m = mm * (y.scales[j] >> 4) as f32;
        for ii in 0..16 {
            let l = nearest_int((x[16 * j + ii] + m) / d).clamp(0, 3);
            codes[16 * j + ii] = l as u8;
        }
    }
    pack_2bit(codes, &mut y.qs);
}

/// `quantize_row_q2_K_impl`.
fn q2_k_impl(x: &[f32], y: &mut [BlockQ2K], quant_weights: &[f32]) {
    let (mut codes, mut laux, mut weight) = ([0u8; QK_K], [0u8; 16], [0f32; 16]);
    let (mut mins, mut scales, mut sw) = ([0f32; QK_K / 16], [0f32; QK_K / 16], [0f32; QK_K / 16]);
    let (mut ls, mut lm) = ([0u8; QK_K / 16], [0u8; QK_K / 16]);
    for (i, (yb, x)) in y.iter_mut().zip(x.chunks_exact(QK_K)).enumerate() {
        sw.fill(0.0);
        let sigma2 = sum_sq(x) / QK_K as f32;
        for j in 0..QK_K / 16 {
            let xs = &x[16 * j..16 * j + 16];
            let qw = &quant_weights[QK_K * i + 16 * j..QK_K * i + 16 * j + 16];
            weights_sigma(qw, xs, sigma2, &mut weight);
            for &w in &weight {
                sw[j] += w;
            }
            (scales[j], mins[j]) =
                make_qkx3_quants(16, 3, xs, Some(&weight), &mut codes[16 * j..], &mut laux, -0.9, 0.05, 36, false);
        }
        let dm = make_qp_quants(QK_K / 16, 15, &scales, &mut ls, &sw);
        let mm = make_qp_quants(QK_K / 16, 15, &mins, &mut lm, &sw);
        yb.d = fp16(dm);
        yb.dmin = fp16(mm);
        for j in 0..QK_K / 16 {
            yb.scales[j] = ls[j] | (lm[j] << 4);
        }
        // ggml's `requantize` is a constant true.
        q2k_finish(x, fp32(yb.d), fp32(yb.dmin), yb, &mut codes);
    }
}

/// `quantize_row_q3_K_ref`.
fn q3_k_ref(x: &[f32], y: &mut [BlockQ3K]) {
    let mut codes = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    for (yb, x) in y.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (mut max_scale, mut amax) = (0f32, 0f32);
        for j in 0..QK_K / 16 {
            scales[j] = make_q3_quants(16, 4, &x[16 * j..], &mut codes[16 * j..], true);
            let scale = scales[j].abs();
            if scale > amax {
                amax = scale;
                max_scale = scales[j];
            }
        }
        yb.scales.fill(0);
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for j in 0..QK_K / 16 {
                // ggml stores nearest_int in an int8_t before clamping.
                let l = nearest_int(iscale * scales[j]) as i8;
                let l = l.clamp(-32, 31) as i32 + 32;
                set_q3k_scale(&mut yb.scales, j, l);
            }
            yb.d = fp16(1.0 / iscale);
        } else {
            yb.d = fp16(0.0);
        }
        q3k_finish(x, yb, &mut codes);
    }
}

/// `quantize_row_q3_K_impl` with quant_weights.
fn q3_k_impl(x: &[f32], y: &mut [BlockQ3K], quant_weights: &[f32]) {
    let mut codes = [0i8; QK_K];
    let (mut scales, mut weight, mut sw) = ([0f32; QK_K / 16], [0f32; 16], [0f32; QK_K / 16]);
    let mut ls = [0i8; QK_K / 16];
    for (i, (yb, x)) in y.iter_mut().zip(x.chunks_exact(QK_K)).enumerate() {
        let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
        for j in 0..QK_K / 16 {
            let xs = &x[16 * j..16 * j + 16];
            weights_sigma(&quant_weights[QK_K * i + 16 * j..], xs, sigma2, &mut weight);
            sw[j] = sum_plain(&weight);
            scales[j] = make_qx_quants(16, 4, xs, &mut codes[16 * j..], 1, Some(&weight));
        }
        yb.scales.fill(0);
        let d_block = make_qx_quants(QK_K / 16, 32, &scales, &mut ls, 1, Some(&sw));
        for j in 0..QK_K / 16 {
            set_q3k_scale(&mut yb.scales, j, ls[j] as i32);
        }
        yb.d = fp16(d_block);
        q3k_finish(x, yb, &mut codes);
    }
}

/// Σw in order.
fn sum_plain(w: &[f32]) -> f32 {
    let mut s = 0f32;
    for &v in w {
        s += v;
    }
    s
}

/// `quantize_row_q4_K_ref`.
fn q4_k_ref(x: &[f32], y: &mut [BlockQ4K]) {
    let (mut codes, mut laux, mut weights) = ([0u8; QK_K], [0u8; 32], [0f32; 32]);
    let (mut mins, mut scales) = ([0f32; QK_K / 32], [0f32; QK_K / 32]);
    for (yb, x) in y.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (max_scale, max_min) =
            k4_ref_scales(x, 15, -1.0, 0.1, 20, &mut weights, &mut codes, &mut laux, &mut scales, &mut mins);
        k4_ref_pack_scales(max_scale, max_min, &scales, &mins, &mut yb.scales, &mut yb.d, &mut yb.dmin);
        k4_requantize(x, yb.d, yb.dmin, &yb.scales, 15, &mut codes);
        pack_q4k(&codes, &mut yb.qs);
    }
}

/// Q4_K/Q5_K `_ref`: per sub-block of 32, weights √(Σx²/32) + |x| and `make_qkx2_quants`; returns the
/// largest scale and min.
#[allow(clippy::too_many_arguments)]
fn k4_ref_scales(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    weights: &mut [f32; 32],
    codes: &mut [u8; QK_K],
    laux: &mut [u8; 32],
    scales: &mut [f32; QK_K / 32],
    mins: &mut [f32; QK_K / 32],
) -> (f32, f32) {
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let av_x = (sum_sq(xs) / 32.0).sqrt();
        for l in 0..32 {
            weights[l] = av_x + xs[l].abs();
        }
        (scales[j], mins[j]) =
            make_qkx2_quants(32, nmax, xs, weights, &mut codes[32 * j..], laux, rmin, rdelta, nstep, false);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    (max_scale, max_min)
}

/// Q4_K/Q5_K `_ref`: 6-bit scales and mins relative to the largest of each, d = max_scale/63.
fn k4_ref_pack_scales(
    max_scale: f32,
    max_min: f32,
    scales: &[f32; QK_K / 32],
    mins: &[f32; QK_K / 32],
    out: &mut [u8; 12],
    d: &mut [u8; 2],
    dmin: &mut [u8; 2],
) {
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    for j in 0..QK_K / 32 {
        // ggml assigns nearest_int to a uint8_t, then takes MIN(63, ·).
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        set_scale_min_k4(out, j, ls, lm);
    }
    *d = fp16(max_scale / 63.0);
    *dmin = fp16(max_min / 63.0);
}

/// Q4_K/Q5_K `_impl`: weights qw·√(σ² + x²) with σ² = 2Σx²/256, `make_qkx3_quants` per sub-block, then the
/// 8 scales and 8 mins by `make_qp_quants(8, 63)` weighted by each sub-block's Σw. Returns (d, dmin).
fn k4_impl_scales(
    x: &[f32],
    qw: &[f32],
    nmax: i32,
    codes: &mut [u8; QK_K],
    ls: &mut [u8; QK_K / 32],
    lm: &mut [u8; QK_K / 32],
) -> (f32, f32) {
    let (mut laux, mut weights) = ([0u8; 32], [0f32; 32]);
    let (mut sw, mut mins, mut scales) = ([0f32; QK_K / 32], [0f32; QK_K / 32], [0f32; QK_K / 32]);
    let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        weights_sigma(&qw[32 * j..32 * j + 32], xs, sigma2, &mut weights);
        sw[j] = sum_plain(&weights);
        (scales[j], mins[j]) =
            make_qkx3_quants(32, nmax, xs, Some(&weights), &mut codes[32 * j..], &mut laux, -0.9, 0.05, 36, false);
    }
    let d_block = make_qp_quants(QK_K / 32, 63, &scales, ls, &sw);
    let m_block = make_qp_quants(QK_K / 32, 63, &mins, lm, &sw);
    (d_block, m_block)
}

/// `quantize_row_q4_K_impl` with quant_weights.
fn q4_k_impl(x: &[f32], y: &mut [BlockQ4K], quant_weights: &[f32]) {
    let (mut codes, mut ls, mut lm) = ([0u8; QK_K], [0u8; QK_K / 32], [0u8; QK_K / 32]);
    for (i, (yb, x)) in y.iter_mut().zip(x.chunks_exact(QK_K)).enumerate() {
        let qw = &quant_weights[QK_K * i..QK_K * (i + 1)];
        let (d_block, m_block) = k4_impl_scales(x, qw, 15, &mut codes, &mut ls, &mut lm);
        for j in 0..QK_K / 32 {
            set_scale_min_k4(&mut yb.scales, j, ls[j], lm[j]);
        }
        yb.d = fp16(d_block);
        yb.dmin = fp16(m_block);
        k4_requantize(x, yb.d, yb.dmin, &yb.scales, 15, &mut codes);
        pack_q4k(&codes, &mut yb.qs);
    }
}

/// `quantize_row_q5_K_ref`.
fn q5_k_ref(x: &[f32], y: &mut [BlockQ5K]) {
    let (mut codes, mut laux, mut weights) = ([0u8; QK_K], [0u8; 32], [0f32; 32]);
    let (mut mins, mut scales) = ([0f32; QK_K / 32], [0f32; QK_K / 32]);
    for (yb, x) in y.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (max_scale, max_min) =
            k4_ref_scales(x, 31, -0.5, 0.1, 15, &mut weights, &mut codes, &mut laux, &mut scales, &mut mins);
        k4_ref_pack_scales(max_scale, max_min, &scales, &mins, &mut yb.scales, &mut yb.d, &mut yb.dmin);
        k4_requantize(x, yb.d, yb.dmin, &yb.scales, 31, &mut codes);
        pack_q5k(&codes, &mut yb.qh, &mut yb.qs);
    }
}

/// `quantize_row_q5_K_impl` with quant_weights.
fn q5_k_impl(x: &[f32], y: &mut [BlockQ5K], quant_weights: &[f32]) {
    let (mut codes, mut ls, mut lm) = ([0u8; QK_K], [0u8; QK_K / 32], [0u8; QK_K / 32]);
    for (i, (yb, x)) in y.iter_mut().zip(x.chunks_exact(QK_K)).enumerate() {
        let qw = &quant_weights[QK_K * i..QK_K * (i + 1)];
        let (d_block, m_block) = k4_impl_scales(x, qw, 31, &mut codes, &mut ls, &mut lm);
        for j in 0..QK_K / 32 {
            set_scale_min_k4(&mut yb.scales, j, ls[j].min(63), lm[j].min(63));
        }
        yb.d = fp16(d_block);
        yb.dmin = fp16(m_block);
        k4_requantize(x, yb.d, yb.dmin, &yb.scales, 31, &mut codes);
        pack_q5k(&codes, &mut yb.qh, &mut yb.qs);
    }
}

/// `quantize_row_q6_K_impl`; with `None` it is `quantize_row_q6_K_ref` (upstream's two bodies are the same
/// but for the weights passed to `make_qx_quants`: x² or the imatrix, with no σ² term).
fn q6_k_impl(x: &[f32], y: &mut [BlockQ6K], quant_weights: Option<&[f32]>) {
    let mut codes = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    for (i, (yb, x)) in y.iter_mut().zip(x.chunks_exact(QK_K)).enumerate() {
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..QK_K / 16 {
            let qw = quant_weights.map(|qw| &qw[QK_K * i + 16 * ib..QK_K * i + 16 * ib + 16]);
            let scale = make_qx_quants(16, 32, &x[16 * ib..], &mut codes[16 * ib..], 1, qw);
            scales[ib] = scale;
            let abs_scale = scale.abs();
            if abs_scale > max_abs_scale {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            yb.ql.fill(0);
            yb.qh.fill(0);
            yb.scales.fill(0);
            yb.d = fp16(0.0);
            continue;
        }
        let iscale = -128.0 / max_scale;
        yb.d = fp16(1.0 / iscale);
        for ib in 0..QK_K / 16 {
            yb.scales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..QK_K / 16 {
            let d = fp32(yb.d) * yb.scales[j] as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let l = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
                codes[16 * j + ii] = (l + 32) as i8;
            }
        }
        let l = codes.map(|c| c as u8);
        for (n, j) in (0..QK_K).step_by(128).enumerate() {
            let (ql, qh) = (&mut yb.ql[64 * n..64 * n + 64], &mut yb.qh[32 * n..32 * n + 32]);
            for k in 0..32 {
                let q1 = l[j + k] & 0xF;
                let q2 = l[j + k + 32] & 0xF;
                let q3 = l[j + k + 64] & 0xF;
                let q4 = l[j + k + 96] & 0xF;
                ql[k] = q1 | (q3 << 4);
                ql[k + 32] = q2 | (q4 << 4);
                qh[k] = (l[j + k] >> 4)
                    | ((l[j + k + 32] >> 4) << 2)
                    | ((l[j + k + 64] >> 4) << 4)
                    | ((l[j + k + 96] >> 4) << 6);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Every type this module writes, with its name.
    const ALL: &[(u32, &str)] = &[
        (ty::Q4_0, "q4_0"),
        (ty::Q4_1, "q4_1"),
        (ty::Q5_0, "q5_0"),
        (ty::Q5_1, "q5_1"),
        (ty::Q8_0, "q8_0"),
        (ty::Q2_K, "q2_k"),
        (ty::Q3_K, "q3_k"),
        (ty::Q4_K, "q4_k"),
        (ty::Q5_K, "q5_k"),
        (ty::Q6_K, "q6_k"),
    ];

    /// Types whose `_ref` candle 0.11 ports from the same ggml as this file: bytes must match exactly.
    const SAME_REF_AS_CANDLE: &[u32] = &[ty::Q4_0, ty::Q4_1, ty::Q5_0, ty::Q5_1, ty::Q8_0, ty::Q3_K];

    /// Types where candle 0.11's quantizer predates ggml's current `_ref` (Q2_K/Q4_K/Q5_K: `make_qkx1_quants`
    /// instead of `make_qkx2_quants`; Q6_K: an older `make_qx_quants` with refinement sweeps).
    const OLDER_REF_IN_CANDLE: &[u32] = &[ty::Q2_K, ty::Q4_K, ty::Q5_K, ty::Q6_K];

    /// Where candle's `_ref` differs, our RMSE / candle's RMSE must lie within 1 ± this: the same format and
    /// the same kind of fit, so the error is of the same size (measured: 0.96–1.02).
    const MAX_REF_RMSE_RATIO_DEVIATION_VS_CANDLE: f64 = 0.05;

    /// Types whose imatrix `_impl` candle 0.11 ports from the same ggml algorithm (make_qkx3 + make_qp).
    const SAME_IMPL_AS_CANDLE: &[u32] = &[ty::Q2_K, ty::Q4_K, ty::Q5_K];

    /// Share of blocks that must be byte-identical to candle's port of the same `_impl`. Candle rounds with
    /// `f32::round` (ties away from zero) where ggml's `nearest_int` rounds ties to even, and the trial scale
    /// is = 8 of `make_qkx3_quants` puts a sub-block's max exactly on nmax − 0.5, so a few blocks differ
    /// (measured 0.875–0.97; with candle's rounding swapped in, this port matched candle on every block).
    const MIN_SAME_BLOCK_SHARE_VS_CANDLE_IMPL: f64 = 0.80;

    /// …and those blocks must cost the same: |our Σ imp·err² / candle's − 1| ≤ this.
    const MAX_WEIGHTED_ERR_DEVIATION_VS_CANDLE_IMPL: f64 = 0.02;

    /// RMSE budgets relative to the RMS of N(0, 1) weights, per type, with or without imatrix (the measured
    /// worst of the two, 16 × 512, is in the comment; budgets leave ~15%).
    fn max_rel_rmse(t: u32) -> f64 {
        match t {
            ty::Q4_0 => 0.100,  // 0.0861
            ty::Q4_1 => 0.092,  // 0.0785
            ty::Q5_0 => 0.050,  // 0.0426
            ty::Q5_1 => 0.045,  // 0.0382
            ty::Q8_0 => 0.0062, // 0.0053
            ty::Q2_K => 0.345,  // 0.2968
            ty::Q3_K => 0.180,  // 0.1546
            ty::Q4_K => 0.087,  // 0.0750
            ty::Q5_K => 0.043,  // 0.0371
            ty::Q6_K => 0.0215, // 0.0185
            _ => unreachable!(),
        }
    }

    /// With the importance vector below, Σ imp·err² of the imatrix path must be at most this share of the
    /// `_ref` path's: it optimises that very objective (measured 0.30–0.54).
    const MAX_WEIGHTED_ERR_RATIO_IMATRIX_VS_REF: f64 = 0.80;

    fn dtype(t: u32) -> GgmlDType {
        whittle_formats::gguf::candle_block_dtype(t).expect("a block type")
    }

    /// splitmix64 → N(0, 1) by Box–Muller; deterministic, no dependency.
    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u1, u2) = (next().max(1e-300), next());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }

    /// LLM-like importance: 1 on most columns, 100× on every 37th (outlier channels), mild spread elsewhere.
    fn importance(cols: usize) -> Vec<f32> {
        (0..cols).map(|j| if j % 37 == 5 { 100.0 } else { 1.0 + (j % 7) as f32 * 0.1 }).collect()
    }

    fn candle_bytes(t: u32, x: &[f32], rows: usize, cols: usize, imatrix: Option<&[f32]>) -> Vec<u8> {
        let w = Tensor::from_slice(x, (rows, cols), &Device::Cpu).unwrap();
        let q = match imatrix {
            None => QTensor::quantize(&w, dtype(t)).unwrap(),
            Some(imp) => QTensor::quantize_imatrix(&w, imp, dtype(t)).unwrap(),
        };
        q.data().unwrap().to_vec()
    }

    fn decode(t: u32, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
        whittle_kernels::ggml::unpack(t, bytes, rows, cols).unwrap().dequantize()
    }

    fn rmse(a: &[f32], b: &[f32]) -> f64 {
        crate::rmse(a, b)
    }

    /// Σ_j imp_j·(x − x̂)² over all rows.
    fn weighted_err(x: &[f32], xq: &[f32], imp: &[f32]) -> f64 {
        let cols = imp.len();
        x.iter().zip(xq).enumerate().map(|(i, (a, b))| imp[i % cols] as f64 * ((a - b) as f64).powi(2)).sum()
    }

    fn shapes(t: u32) -> [(usize, usize); 2] {
        if whittle_kernels::ggml::type_info(t).unwrap().1 == QK_K {
            [(8, 256), (8, 512)]
        } else {
            [(8, 512), (5, 96)]
        }
    }

    /// The golden input of type `t`: 64 × 1024 N(0, 1) with heavy-tailed rows (x³), outlier columns (×20),
    /// small rows (×1e-3), a zero row, a constant row and a sparse row; and a non-uniform importance.
    fn golden_case(t: u32) -> (Vec<f32>, Vec<f32>) {
        let (rows, cols) = GOLDEN_SHAPE;
        let mut x = gaussian(rows * cols, 100 + t as u64);
        for (i, v) in x.iter_mut().enumerate() {
            let (r, c) = (i / cols, i % cols);
            if r % 4 == 1 {
                *v = v.powi(3);
            }
            if r % 4 == 2 && c % 37 == 5 {
                *v *= 20.0;
            }
            if r % 8 == 3 {
                *v *= 1e-3;
            }
            match r {
                7 => *v = 0.0,
                15 => *v = -0.3,
                23 => *v = if c % 3 == 0 { 0.5 } else { 0.0 },
                _ => {}
            }
        }
        let imp = importance(cols).iter().enumerate().map(|(j, w)| w * (1.0 + (j % 11) as f32 * 0.37)).collect();
        (x, imp)
    }

    const GOLDEN_SHAPE: (usize, usize) = (64, 1024);

    /// FNV-1a 64 of ggml's own output on [`golden_case`]: (type, without imatrix, with imatrix).
    ///
    /// Produced once from llama.cpp's ggml-quants.c as vendored in the llama-cpp-python 0.3.36 sdist (PyPI):
    /// `gcc -O2 -c ggml/src/ggml-quants.c -Iggml/include -Iggml/src -Iggml/src/ggml-cpu`, linked with a small
    /// C main that reads the raw little-endian f32 rows (then the imatrix) written by `dump_golden_inputs`
    /// and calls `quantize_<type>(x, y, 64, 1024, imatrix or NULL)` (stubs for `ggml_abort`,
    /// `ggml_row_size`, `ggml_type_size`, `ggml_type_name`), hashing what it writes. Plain `-O3` gives the
    /// same bytes; `-march=native` (FMA contraction) does not, see the module doc.
    const GGML_GOLDEN_FNV: &[(u32, u64, u64)] = &[
        (ty::Q4_0, 0xeeaa_d3eb_8f31_eb24, 0x3a57_72b0_313d_ab67),
        (ty::Q4_1, 0xed7b_73c2_189f_1037, 0xbbec_802c_aff8_9b23),
        (ty::Q5_0, 0xd4d8_15fa_45d3_9459, 0x3ef8_4c7c_0bf4_e678),
        (ty::Q5_1, 0x1240_7511_aa4b_8b46, 0xb187_5a4a_5e48_ab85),
        (ty::Q8_0, 0xb658_f8ca_f1ea_c994, 0xb658_f8ca_f1ea_c994),
        (ty::Q2_K, 0xa0ac_d5c5_468b_21e3, 0x6b1f_f398_8262_9977),
        (ty::Q3_K, 0x488a_5497_ab04_c3d0, 0x5f66_8f80_e2e6_ae8b),
        (ty::Q4_K, 0xdcb0_4aec_f362_e194, 0x2cc9_56ba_fa0b_1a8d),
        (ty::Q5_K, 0x8cd9_fe56_afcf_9bf7, 0xfaea_16c9_04ef_9b8c),
        (ty::Q6_K, 0x992b_ed95_5e5c_c73d, 0x2974_9dee_5934_d8d5),
    ];

    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
    }

    #[test]
    fn bytes_equal_ggml_golden() {
        let (rows, cols) = GOLDEN_SHAPE;
        for &(t, want_ref, want_impl) in GGML_GOLDEN_FNV {
            let (x, imp) = golden_case(t);
            for (qw, want) in [(None, want_ref), (Some(imp.as_slice()), want_impl)] {
                let got = fnv1a(&quantize_weighted(t, &x, rows, cols, qw).unwrap());
                assert_eq!(got, want, "{} (imatrix: {}): bytes differ from ggml's", type_name(t), qw.is_some());
            }
        }
    }

    /// Writes the golden inputs (`<type>_<0|1>.in`: rows then, for 1, the imatrix) to regenerate
    /// [`GGML_GOLDEN_FNV`]: `cargo test --release -p whittle-quant --lib kquant -- --ignored dump_golden`.
    #[test]
    #[ignore]
    fn dump_golden_inputs() {
        let dir = std::env::temp_dir().join("whittle-kquant-golden");
        std::fs::create_dir_all(&dir).unwrap();
        for &(t, name) in ALL {
            let (x, imp) = golden_case(t);
            for (k, qw) in [None, Some(&imp)].into_iter().enumerate() {
                let bytes: Vec<u8> = x.iter().chain(qw.into_iter().flatten()).flat_map(|v| v.to_le_bytes()).collect();
                std::fs::write(dir.join(format!("{name}_{k}.in")), bytes).unwrap();
            }
        }
        eprintln!("wrote {}", dir.display());
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (v, want) in [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (3.49, 3), (-3.51, -4), (7.0, 7)] {
            assert_eq!(nearest_int(v), want, "nearest_int({v})");
        }
    }

    #[test]
    fn ref_matches_candle_bytes() {
        for &t in SAME_REF_AS_CANDLE {
            for (seed, (rows, cols)) in shapes(t).into_iter().enumerate() {
                let x = gaussian(rows * cols, 11 + seed as u64);
                let ours = quantize_weighted(t, &x, rows, cols, None).unwrap();
                let theirs = candle_bytes(t, &x, rows, cols, None);
                assert!(ours == theirs, "{}: {rows}×{cols} bytes differ from candle", type_name(t));
            }
        }
    }

    #[test]
    fn ref_error_matches_candle_where_candle_is_older() {
        for &t in OLDER_REF_IN_CANDLE {
            for (seed, (rows, cols)) in shapes(t).into_iter().enumerate() {
                let x = gaussian(rows * cols, 21 + seed as u64);
                let ours = rmse(&x, &decode(t, &quantize_weighted(t, &x, rows, cols, None).unwrap(), rows, cols));
                let theirs = rmse(&x, &decode(t, &candle_bytes(t, &x, rows, cols, None), rows, cols));
                let ratio = ours / theirs;
                assert!(
                    (ratio - 1.0).abs() <= MAX_REF_RMSE_RATIO_DEVIATION_VS_CANDLE,
                    "{}: RMSE {ours:.5} vs candle {theirs:.5} (ratio {ratio:.3})",
                    type_name(t)
                );
            }
        }
    }

    #[test]
    fn imatrix_matches_candle_impl_port() {
        for &t in SAME_IMPL_AS_CANDLE {
            let (rows, cols) = (8, 512);
            let x = gaussian(rows * cols, 31);
            let imp = importance(cols);
            let ours = quantize_weighted(t, &x, rows, cols, Some(&imp)).unwrap();
            let theirs = candle_bytes(t, &x, rows, cols, Some(&imp));
            let bb = whittle_kernels::ggml::type_info(t).unwrap().2;
            let same = ours.chunks(bb).zip(theirs.chunks(bb)).filter(|(a, b)| a == b).count();
            let share = same as f64 / (ours.len() / bb) as f64;
            assert!(
                share >= MIN_SAME_BLOCK_SHARE_VS_CANDLE_IMPL,
                "{}: only {share:.3} of blocks match candle",
                type_name(t)
            );
            let e_ours = weighted_err(&x, &decode(t, &ours, rows, cols), &imp);
            let e_theirs = weighted_err(&x, &decode(t, &theirs, rows, cols), &imp);
            assert!(
                (e_ours / e_theirs - 1.0).abs() <= MAX_WEIGHTED_ERR_DEVIATION_VS_CANDLE_IMPL,
                "{}: weighted error {e_ours:.4} vs candle's {e_theirs:.4}",
                type_name(t)
            );
        }
    }

    #[test]
    fn rmse_within_budget() {
        let (rows, cols) = (16, 512);
        let x = gaussian(rows * cols, 41);
        let imp = importance(cols);
        let rms = (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
        for &(t, name) in ALL {
            for qw in [None, Some(imp.as_slice())] {
                let rel = rmse(&x, &decode(t, &quantize_weighted(t, &x, rows, cols, qw).unwrap(), rows, cols)) / rms;
                let budget = max_rel_rmse(t);
                assert!(rel <= budget, "{name} (imatrix: {}): relative RMSE {rel:.4} > {budget}", qw.is_some());
            }
        }
    }

    #[test]
    fn imatrix_lowers_weighted_error() {
        let (rows, cols) = (16, 512);
        let x = gaussian(rows * cols, 51);
        let imp = importance(cols);
        for &(t, name) in ALL {
            let none = quantize_weighted(t, &x, rows, cols, None).unwrap();
            let some = quantize_weighted(t, &x, rows, cols, Some(&imp)).unwrap();
            if t == ty::Q8_0 {
                assert!(none == some, "q8_0 has no imatrix variant: bytes must not change");
                continue;
            }
            let e_none = weighted_err(&x, &decode(t, &none, rows, cols), &imp);
            let e_some = weighted_err(&x, &decode(t, &some, rows, cols), &imp);
            assert!(
                e_some <= MAX_WEIGHTED_ERR_RATIO_IMATRIX_VS_REF * e_none,
                "{name}: weighted error with imatrix {e_some:.4} vs without {e_none:.4}"
            );
        }
    }

    #[test]
    fn rows_are_independent() {
        // Many rows go through the threaded split; each must equal that row quantized alone.
        let (rows, cols) = (7, 256);
        let x = gaussian(rows * cols, 61);
        let imp = importance(cols);
        for &(t, name) in ALL {
            for qw in [None, Some(imp.as_slice())] {
                let all = quantize_weighted(t, &x, rows, cols, qw).unwrap();
                let one: Vec<u8> = x.chunks(cols).flat_map(|r| quantize_weighted(t, r, 1, cols, qw).unwrap()).collect();
                assert!(all == one, "{name}: rows quantized together differ from rows alone");
            }
        }
    }

    #[test]
    fn degenerate_rows() {
        // Zero, constant, tiny and one-spike rows: no panic, zeros stay exactly zero, errors stay small.
        let cols = 256;
        let mut x = vec![0f32; cols];
        x.extend(std::iter::repeat_n(0.75f32, cols));
        x.extend(std::iter::repeat_n(1e-20f32, cols));
        x.extend((0..cols).map(|j| if j == 77 { 3.0 } else { 0.0 }));
        let rows = 4;
        let imp = importance(cols);
        for &(t, name) in ALL {
            for qw in [None, Some(imp.as_slice())] {
                let xq = decode(t, &quantize_weighted(t, &x, rows, cols, qw).unwrap(), rows, cols);
                assert!(xq.iter().all(|v| v.is_finite()), "{name}: non-finite output");
                assert!(xq[..cols].iter().all(|&v| v == 0.0), "{name}: zero row decodes to non-zero");
                let err = rmse(&x[cols..2 * cols], &xq[cols..2 * cols]);
                assert!(err <= 0.75 * max_rel_rmse(t), "{name}: constant row error {err}");
            }
        }
    }

    #[test]
    fn ragged_width_is_an_error() {
        for &(t, name) in ALL {
            let qk = whittle_kernels::ggml::type_info(t).unwrap().1;
            let cols = qk + 16;
            let x = vec![0.5f32; 2 * cols];
            let err = quantize_weighted(t, &x, 2, cols, None).unwrap_err();
            assert!(err.contains(name) && err.contains(&cols.to_string()), "{name}: unhelpful error `{err}`");
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let x = vec![0.5f32; 2 * 256];
        assert!(quantize_weighted(ty::Q4_K, &x, 3, 256, None).unwrap_err().contains("values"));
        assert!(quantize_weighted(ty::Q4_K, &x, 2, 256, Some(&[1.0; 255])).unwrap_err().contains("imatrix"));
        assert!(quantize_weighted(ty::F16, &x, 2, 256, None).is_err());
        assert_eq!(quantize_weighted(ty::Q4_K, &[], 0, 256, None).unwrap(), Vec::<u8>::new());
    }

    /// Rough timings for the report (`cargo test --release -p whittle-quant --lib kquant -- --ignored --nocapture`):
    /// median of 3 runs; not a benchmark.
    #[test]
    #[ignore]
    fn timing_report() {
        for (t, rows, cols) in [(ty::Q4_K, 576, 1536), (ty::Q5_0, 1536, 576), (ty::Q6_K, 576, 1536)] {
            let x = gaussian(rows * cols, 71);
            let imp = importance(cols);
            for qw in [None, Some(imp.as_slice())] {
                let mut ms: Vec<f64> = (0..3)
                    .map(|_| {
                        let t0 = std::time::Instant::now();
                        std::hint::black_box(quantize_weighted(t, &x, rows, cols, qw).unwrap());
                        t0.elapsed().as_secs_f64() * 1e3
                    })
                    .collect();
                ms.sort_by(f64::total_cmp);
                eprintln!("{} {rows}x{cols} imatrix={}: {:.1} ms", type_name(t), qw.is_some(), ms[1]);
            }
        }
    }

    fn type_name(t: u32) -> &'static str {
        whittle_kernels::ggml::GgmlType::by_id(t).map_or("?", |i| i.name)
    }
}
