//! The sparse codec: a pruned weight ([`SparseLinear`]) without its zeros.
//!
//! On disk (`name.` prefix omitted; `weight_shape` i64 `[out, in]` always):
//! - N:M (`weight_nm` i64 `[n, m]`): `weight_values` float (out, in·n/m), the kept weights of each group of
//!   `m` inputs in order; `weight_indices` u8 (out, ⌈in·n/m·b/8⌉), each value's position in its group as a
//!   `b = ⌈log2 m⌉`-bit code, lowest bits first (2:4: 2 bits). A group with fewer than `n` non-zeros stores
//!   zeros at unused positions.
//! - bitmap: `weight_bitmap` u8 (out, ⌈in/8⌉), bit `j % 8` of byte `j / 8` set where input `j` is kept;
//!   `weight_values` float (nnz) in row-major order.
//! - CSR: `weight_values` float (nnz), `weight_col_indices` u8 (nnz, 2) little-endian u16 columns,
//!   `weight_row_ptr` i64 (out + 1).
//!

use candle_core::Tensor;

use super::io::{read_bias, LinearReader, Request, Stored};
use crate::backend::cpu;
use crate::linear::Linear;
use crate::sparse::{code_bits, SparseFormat, SparseLinear};

/// How the sparse layouts are stored, for a saved model's `sparsity_config`.
pub const LAYOUTS: [(&str, &str); 3] = [
    ("N:M-sparse", "`.weight_nm` i64 [n, m]; `.weight_values` float (out, in·n/m), the kept weights of each group of m inputs in order; `.weight_indices` u8 (out, ⌈in·n/m·b/8⌉), each value's position in its group as a b = ⌈log2 m⌉-bit code, lowest bits first; `.weight_shape` i64 [out, in]"),
    ("sparse-bitmap", "`.weight_bitmap` u8 (out, ⌈in/8⌉), bit j%8 of byte j/8 set where input j is kept; `.weight_values` float (nnz), row-major; `.weight_shape` i64 [out, in]"),
    ("sparse-csr", "`.weight_values` float (nnz); `.weight_col_indices` u8 (nnz, 2), little-endian u16 columns; `.weight_row_ptr` i64 (out + 1); `.weight_shape` i64 [out, in]"),
];

/// The tensors `s` writes, as `(suffix, tensor)`.
pub fn write(s: &SparseLinear) -> crate::Result<Vec<(&'static str, Stored)>> {
    let (rows, k) = (s.packed.m, s.packed.k);
    let w = s.packed.dense();
    let dev = &cpu::device();
    let mut v = vec![("weight_shape", Stored::Tensor(Tensor::new(&[rows as i64, k as i64], dev)?))];
    match s.format {
        SparseFormat::NM { n, m } => {
            let per_row = k / m * n;
            let cb = code_bits(m);
            let row_bytes = (per_row * cb).div_ceil(8);
            let mut values = Vec::with_capacity(rows * per_row);
            let mut codes = vec![0u8; rows * row_bytes];
            for r in 0..rows {
                let mut bit = r * row_bytes * 8;
                for g in w[r * k..(r + 1) * k].chunks(m) {
                    // The non-zeros' positions, then unused positions (holding zeros) up to `n`.
                    let nz = (0..m).filter(|&j| g[j] != 0.0);
                    let pos: Vec<usize> = nz.chain((0..m).filter(|&j| g[j] == 0.0)).take(n).collect();
                    let mut pos = pos;
                    pos.sort_unstable();
                    for p in pos {
                        values.push(g[p]);
                        for b in 0..cb {
                            codes[(bit + b) / 8] |= (((p >> b) & 1) as u8) << ((bit + b) % 8);
                        }
                        bit += cb;
                    }
                }
            }
            v.push(("weight_nm", Stored::Tensor(Tensor::new(&[n as i64, m as i64], dev)?)));
            v.push(("weight_values", Stored::Tensor(Tensor::from_vec(values, (rows, per_row), dev)?)));
            v.push(("weight_indices", Stored::Tensor(Tensor::from_vec(codes, (rows, row_bytes), dev)?)));
        }
        SparseFormat::Bitmap => {
            let rb = k.div_ceil(8);
            let mut bitmap = vec![0u8; rows * rb];
            let mut values = Vec::with_capacity(s.packed.nnz());
            for r in 0..rows {
                for j in 0..k {
                    if w[r * k + j] != 0.0 {
                        bitmap[r * rb + j / 8] |= 1 << (j % 8);
                        values.push(w[r * k + j]);
                    }
                }
            }
            let nnz = values.len();
            v.push(("weight_bitmap", Stored::Tensor(Tensor::from_vec(bitmap, (rows, rb), dev)?)));
            v.push(("weight_values", Stored::Tensor(Tensor::from_vec(values, nnz, dev)?)));
        }
        SparseFormat::Csr => {
            let (mut values, mut cols, mut ptr) = (Vec::new(), Vec::new(), vec![0i64]);
            for r in 0..rows {
                for j in 0..k {
                    if w[r * k + j] != 0.0 {
                        values.push(w[r * k + j]);
                        cols.extend((j as u16).to_le_bytes());
                    }
                }
                ptr.push(values.len() as i64);
            }
            let nnz = values.len();
            v.push(("weight_values", Stored::Tensor(Tensor::from_vec(values, nnz, dev)?)));
            v.push(("weight_col_indices", Stored::Tensor(Tensor::from_vec(cols, (nnz, 2), dev)?)));
            v.push(("weight_row_ptr", Stored::Tensor(Tensor::from_vec(ptr, rows + 1, dev)?)));
        }
    }
    Ok(v)
}

/// Rebuilds the dense (rows × k) weight from the disk tensors: `values` always, and `nm` + `indices`,
/// `bitmap`, or `col_indices` + `row_ptr`. Errors name the tensor (suffix) at fault.
pub fn decode(rows: usize, k: usize, values: &[f32], layout: SparseDisk<'_>) -> Decoded {
    let mut w = vec![0f32; rows * k];
    match layout {
        SparseDisk::NM { n, m, indices } => {
            if m == 0 || n == 0 || n > m || !k.is_multiple_of(m) {
                return Err(("weight_nm", format!("{n}:{m} does not fit an input width of {k}")));
            }
            let (per_row, cb) = (k / m * n, code_bits(m));
            let row_bytes = (per_row * cb).div_ceil(8);
            if values.len() != rows * per_row {
                return Err((
                    "weight_values",
                    format!("{} values, expected {} for {n}:{m}", values.len(), rows * per_row),
                ));
            }
            if indices.len() != rows * row_bytes {
                return Err(("weight_indices", format!("{} bytes, expected {}", indices.len(), rows * row_bytes)));
            }
            for r in 0..rows {
                let mut prev = 0;
                for i in 0..per_row {
                    let bit = r * row_bytes * 8 + i * cb;
                    let p = (0..cb)
                        .map(|b| (((indices[(bit + b) / 8] >> ((bit + b) % 8)) & 1) as usize) << b)
                        .sum::<usize>();
                    // Positions rise strictly within a group.
                    if p >= m || (i % n > 0 && p <= prev) {
                        let g = i / n;
                        return Err((
                            "weight_indices",
                            format!("row {r}, group {g}: position {p} is out of range or repeated"),
                        ));
                    }
                    prev = p;
                    w[r * k + (i / n) * m + p] = values[r * per_row + i];
                }
            }
            Ok((w, Some((n, m))))
        }
        SparseDisk::Bitmap(bitmap) => {
            let rb = k.div_ceil(8);
            if bitmap.len() != rows * rb {
                return Err(("weight_bitmap", format!("{} bytes, expected {}", bitmap.len(), rows * rb)));
            }
            let mut at = 0;
            for r in 0..rows {
                for j in 0..k {
                    if bitmap[r * rb + j / 8] & (1 << (j % 8)) != 0 {
                        let v =
                            *values.get(at).ok_or(("weight_values", "fewer values than bitmap bits".to_string()))?;
                        w[r * k + j] = v;
                        at += 1;
                    }
                }
            }
            if at != values.len() {
                return Err(("weight_values", format!("{} values for {at} bitmap bits", values.len())));
            }
            Ok((w, None))
        }
        SparseDisk::Csr { col_indices, row_ptr } => {
            if row_ptr.len() != rows + 1 || row_ptr[0] != 0 || row_ptr[rows] as usize != values.len() {
                return Err(("weight_row_ptr", format!("expected {} offsets from 0 to {}", rows + 1, values.len())));
            }
            if col_indices.len() != 2 * values.len() {
                return Err(("weight_col_indices", format!("{} bytes for {} values", col_indices.len(), values.len())));
            }
            for r in 0..rows {
                let (a, b) = (row_ptr[r], row_ptr[r + 1]);
                if a > b || b as usize > values.len() {
                    return Err(("weight_row_ptr", format!("row {r}: offsets {a}..{b} out of order")));
                }
                for i in a as usize..b as usize {
                    let j = u16::from_le_bytes([col_indices[2 * i], col_indices[2 * i + 1]]) as usize;
                    if j >= k {
                        return Err(("weight_col_indices", format!("row {r}: column {j} ≥ {k}")));
                    }
                    w[r * k + j] = values[i];
                }
            }
            Ok((w, None))
        }
    }
}

/// Whether `name` is stored by this codec: a `.weight_values`.
pub fn claims<R: LinearReader + ?Sized>(r: &R, name: &str) -> bool {
    r.contains(&format!("{name}.weight_values"))
}

/// A sparse layer: N:M, bitmap or CSR, whichever layout tensors are stored.
pub(crate) fn read<R: LinearReader + ?Sized>(q: &Request<R>) -> std::result::Result<Linear, R::Error> {
    let (r, name, expect, bias) = (q.r, q.name, &q.expect, q.bias);
    let field = |suffix: &str| format!("{name}.{suffix}");
    let ints = |suffix: &str| -> std::result::Result<Vec<i64>, R::Error> {
        Ok(r.load_native(&field(suffix))?.to_dtype(candle_core::DType::I64)?.flatten_all()?.to_vec1()?)
    };
    let bytes = |suffix: &str| -> std::result::Result<Vec<u8>, R::Error> {
        let t = r.load_native(&field(suffix))?;
        if t.dtype() != candle_core::DType::U8 {
            return Err(r.bad(&field(suffix), format!("expected u8, got {:?}", t.dtype())));
        }
        Ok(t.flatten_all()?.to_vec1()?)
    };
    let shape = ints("weight_shape")?;
    let [m, k] = shape[..] else {
        return Err(r.bad(&field("weight_shape"), format!("expected [out, in], got {shape:?}")));
    };
    if m <= 0 || k <= 0 {
        return Err(r.bad(&field("weight_shape"), format!("expected positive sizes, got {shape:?}")));
    }
    let (m, k) = (m as usize, k as usize);
    if expect.iter().zip([m, k]).any(|(e, g)| *e != 0 && *e != g) {
        return Err(r.shape_err(&field("weight_shape"), expect, &[m, k]));
    }
    let values: Vec<f32> = r.load_f32(&field("weight_values"))?.flatten_all()?.to_vec1()?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err(r.bad(&field("weight_values"), "holds NaN or Inf".into()));
    }
    let (u8s, ptr);
    let layout = if r.contains(&field("weight_nm")) {
        let nm = ints("weight_nm")?;
        let [n, mm] = nm[..] else { return Err(r.bad(&field("weight_nm"), format!("expected [n, m], got {nm:?}"))) };
        if !(1..=64).contains(&mm) || n < 1 {
            return Err(r.bad(&field("weight_nm"), format!("{n}:{mm} is not an N:M pattern")));
        }
        u8s = bytes("weight_indices")?;
        SparseDisk::NM { n: n as usize, m: mm as usize, indices: &u8s }
    } else if r.contains(&field("weight_bitmap")) {
        u8s = bytes("weight_bitmap")?;
        SparseDisk::Bitmap(&u8s)
    } else {
        u8s = bytes("weight_col_indices")?;
        ptr = ints("weight_row_ptr")?;
        SparseDisk::Csr { col_indices: &u8s, row_ptr: &ptr }
    };
    let (w, nm) = decode(m, k, &values, layout).map_err(|(suffix, msg)| r.bad(&field(suffix), msg))?;
    let b = read_bias(r, name, m, bias)?;
    let w = Tensor::from_vec(w, (m, k), &cpu::device())?;
    Ok(Linear::sparse(&w, nm, b)?)
}

/// A decoded dense weight with its N:M pattern, or the tensor suffix at fault and why.
pub type Decoded = Result<(Vec<f32>, Option<(usize, usize)>), (&'static str, String)>;

/// The layout tensors of a sparse weight as read from disk.
pub enum SparseDisk<'a> {
    NM { n: usize, m: usize, indices: &'a [u8] },
    Bitmap(&'a [u8]),
    Csr { col_indices: &'a [u8], row_ptr: &'a [i64] },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(w: &[f32], rows: usize, k: usize, nm: Option<(usize, usize)>) -> SparseFormat {
        let s = SparseLinear::new(w, rows, k, nm).unwrap();
        let t = write(&s).unwrap();
        let get = |n: &str| match &t.iter().find(|(s, _)| *s == n).unwrap().1 {
            Stored::Tensor(t) => t.flatten_all().unwrap(),
            _ => unreachable!(),
        };
        let values: Vec<f32> = get("weight_values").to_vec1().unwrap();
        let (u8s, ptr): (Vec<u8>, Vec<i64>);
        let layout = match s.format {
            SparseFormat::NM { n, m } => {
                u8s = get("weight_indices").to_vec1().unwrap();
                SparseDisk::NM { n, m, indices: &u8s }
            }
            SparseFormat::Bitmap => {
                u8s = get("weight_bitmap").to_vec1().unwrap();
                SparseDisk::Bitmap(&u8s)
            }
            SparseFormat::Csr => {
                u8s = get("weight_col_indices").to_vec1().unwrap();
                ptr = get("weight_row_ptr").to_vec1().unwrap();
                SparseDisk::Csr { col_indices: &u8s, row_ptr: &ptr }
            }
        };
        let (back, _) = decode(rows, k, &values, layout).unwrap();
        assert_eq!(back, w);
        let stored_bits: usize = t
            .iter()
            .filter(|(n, _)| !matches!(*n, "weight_shape" | "weight_nm"))
            .map(|(_, s)| match s {
                Stored::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes() * 8,
                _ => 0,
            })
            .sum();
        assert_eq!(stored_bits.div_ceil(8), s.storage_bytes(), "{:?}", s.format);
        s.format
    }

    #[test]
    fn every_layout_round_trips_and_is_as_big_as_it_says() {
        let (rows, k) = (5, 24);
        // 2:4 with some groups holding a single non-zero, 50% unstructured, and 3% unstructured.
        let nm: Vec<f32> = (0..rows * k)
            .map(|i| if i % 4 == i / 4 % 4 || (i % 4 == 3 && i % 3 == 0) { i as f32 + 1.0 } else { 0.0 })
            .collect();
        assert_eq!(round_trip(&nm, rows, k, Some((2, 4))), SparseFormat::NM { n: 2, m: 4 });
        let half: Vec<f32> = (0..rows * k).map(|i| if (i * 7) % 11 < 5 { -(i as f32) - 1.0 } else { 0.0 }).collect();
        assert_eq!(round_trip(&half, rows, k, None), SparseFormat::Bitmap);
        let few: Vec<f32> = (0..4 * 512).map(|i| if i % 64 == 7 { 2.0 } else { 0.0 }).collect();
        assert_eq!(round_trip(&few, 4, 512, None), SparseFormat::Csr);
        assert_eq!(round_trip(&few, 4, 512, Some((1, 8))), SparseFormat::NM { n: 1, m: 8 });
    }

    #[test]
    fn bad_patterns_and_layouts_are_named() {
        let w = [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        assert!(SparseLinear::new(&w, 1, 8, Some((2, 4))).unwrap_err().contains("inputs 0..4"));
        assert!(SparseLinear::new(&w, 1, 8, Some((2, 3))).is_err());
        let e = decode(1, 8, &[1.0; 4], SparseDisk::NM { n: 2, m: 4, indices: &[0b0000_0000] }).unwrap_err();
        assert_eq!(e.0, "weight_indices");
        let e = decode(1, 8, &[1.0; 3], SparseDisk::Bitmap(&[0b11])).unwrap_err();
        assert_eq!(e.0, "weight_values");
        let e = decode(1, 8, &[1.0], SparseDisk::Csr { col_indices: &[9, 0], row_ptr: &[0, 1] }).unwrap_err();
        assert_eq!(e.0, "weight_col_indices");
    }
}
