//! Round-to-nearest grouped quantization ([`Rtn`]): the one implementation of the grid (scale, zero point,
//! rounding) that plain RTN, GPTQ and SparseGPT's joint quantization all use, and the packed bit stream
//! whittle's `wNa16` directories store.

use whittle_kernels::block::BlockWeights;

/// A grouped weight-only integer format: `bits`-bit codes, one f32 scale per `group` weights of a row, and
/// with `zero_point` one u8 zero point per group (asymmetric) — else symmetric codes in ±(2^(bits−1)−1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rtn {
    pub bits: u32,
    pub group: usize,
    pub zero_point: bool,
}

impl Rtn {
    /// `w4a16-g64`, `w8a16-g128-asym`.
    pub fn name(&self) -> String {
        format!("w{}a16-g{}{}", self.bits, self.group, if self.zero_point { "-asym" } else { "" })
    }

    /// Bits per weight as stored: codes, f32 scales, u8 zero points.
    pub fn bpw(&self) -> f64 {
        self.bits as f64 + (32.0 + if self.zero_point { 8.0 } else { 0.0 }) / self.group as f64
    }

    /// Scale and zero point (as a float code; 0 when symmetric) of a group with extremes `lo` ≤ 0 ≤ `hi`
    /// and max |w| `amax` (from [`Rtn::range`]).
    pub fn params(&self, lo: f32, hi: f32, amax: f32) -> (f32, f32) {
        if self.zero_point {
            let top = ((1u32 << self.bits) - 1) as f32;
            let s = (hi - lo) / top;
            let z = if s > 0.0 { (-lo / s).round().clamp(0.0, top) } else { 0.0 };
            (s, z)
        } else {
            (amax / ((1i32 << (self.bits - 1)) - 1) as f32, 0.0)
        }
    }

    /// The extremes of a group of weights: `(lo, hi, amax)` with `lo` ≤ 0 ≤ `hi`, for [`Rtn::params`].
    #[inline]
    pub fn range(values: impl IntoIterator<Item = f32>) -> (f32, f32, f32) {
        let (mut lo, mut hi, mut amax) = (0f32, 0f32, 0f32);
        for v in values {
            lo = lo.min(v);
            hi = hi.max(v);
            amax = amax.max(v.abs());
        }
        (lo, hi, amax)
    }

    /// `v` rounded to the nearest point of the grid with scale `s` and zero point `z` (from [`Rtn::params`]):
    /// its stored code and its dequantized value.
    #[inline]
    pub fn round(&self, v: f32, s: f32, z: f32) -> (u8, f32) {
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        if self.zero_point {
            let top = ((1u32 << self.bits) - 1) as f32;
            let q = ((v * inv).round() + z).clamp(0.0, top);
            (q as u8, s * (q - z))
        } else {
            let half = 1i32 << (self.bits - 1);
            let lim = (half - 1) as f32;
            let q = (v * inv).round().clamp(-lim, lim);
            ((q as i32 + half) as u8, s * q)
        }
    }

    /// Quantizes `w` (m × k) by round-to-nearest per group. `k` must be a multiple of `group`, and `group`
    /// of 32.
    pub fn quantize(&self, w: &[f32], m: usize, k: usize) -> BlockWeights {
        let (g, bits) = (self.group, self.bits);
        assert!(
            k.is_multiple_of(g) && g % 32 == 0 && w.len() == m * k,
            "group {g} must divide {k} and be a multiple of 32"
        );
        let per = g / 32; // kernel sub-blocks of 32 per group
        let nsb = k / 32;
        let mut q = vec![0u8; m * k];
        let mut scale = vec![0f32; m * nsb];
        let mut min = if self.zero_point { Some(vec![0f32; m * nsb]) } else { None };
        let half = 1i32 << (bits - 1);
        for r in 0..m {
            for gi in 0..k / g {
                let xs = &w[r * k + gi * g..r * k + (gi + 1) * g];
                let qs = &mut q[r * k + gi * g..r * k + (gi + 1) * g];
                let (lo, hi, amax) = Rtn::range(xs.iter().copied());
                let (s, z) = self.params(lo, hi, amax);
                for (d, &v) in qs.iter_mut().zip(xs) {
                    *d = self.round(v, s, z).0;
                }
                let mn = if self.zero_point { -(s * z) } else { 0.0 };
                for j in 0..per {
                    scale[r * nsb + gi * per + j] = s;
                    if let Some(m) = min.as_mut() {
                        m[r * nsb + gi * per + j] = mn;
                    }
                }
            }
        }
        BlockWeights { m, k, sb: 32, q, scale, min, off: if self.zero_point { 0 } else { -half }, act_block: 32 }
    }

    /// The stored tensors of `w` (from [`Rtn::quantize`]): codes packed as a little-endian bit stream (each row
    /// k·bits/8 bytes), scales (m, k/group) and, asymmetric, zero points (m, k/group) u8.
    pub fn pack(&self, w: &BlockWeights) -> (Vec<u8>, Vec<f32>, Option<Vec<u8>>) {
        let (m, k, g) = (w.m, w.k, self.group);
        let bits = self.bits as usize;
        let mut packed = vec![0u8; w.q.len() * bits / 8];
        for (i, &v) in w.q.iter().enumerate() {
            let bit = i * bits;
            let word = (v as u16) << (bit % 8);
            packed[bit / 8] |= word as u8;
            if bit % 8 + bits > 8 {
                packed[bit / 8 + 1] |= (word >> 8) as u8;
            }
        }
        let nsb = k / 32;
        let scale: Vec<f32> = (0..m * k / g).map(|i| w.scale[(i / (k / g)) * nsb + (i % (k / g)) * (g / 32)]).collect();
        let zero = w.min.as_ref().map(|mn| {
            (0..m * k / g)
                .map(|i| {
                    let j = (i / (k / g)) * nsb + (i % (k / g)) * (g / 32);
                    if w.scale[j] > 0.0 {
                        (-mn[j] / w.scale[j]).round() as u8
                    } else {
                        0
                    }
                })
                .collect()
        });
        (packed, scale, zero)
    }

    /// The inverse of [`Rtn::pack`]; `None` when the sizes do not fit (m, k).
    pub fn unpack(
        &self,
        m: usize,
        k: usize,
        packed: &[u8],
        scale: &[f32],
        zero: Option<&[u8]>,
    ) -> Option<BlockWeights> {
        let (g, bits) = (self.group, self.bits);
        if !k.is_multiple_of(g) || g % 32 != 0 || packed.len() * 8 != m * k * bits as usize || scale.len() != m * k / g
        {
            return None;
        }
        if zero.is_some_and(|z| z.len() != scale.len()) || zero.is_some() != self.zero_point {
            return None;
        }
        let (b, mask) = (bits as usize, (1u16 << bits) - 1);
        let q: Vec<u8> = (0..m * k)
            .map(|i| {
                let bit = i * b;
                let lo = packed[bit / 8] as u16;
                let hi = if bit % 8 + b > 8 { (packed[bit / 8 + 1] as u16) << 8 } else { 0 };
                (((lo | hi) >> (bit % 8)) & mask) as u8
            })
            .collect();
        let nsb = k / 32;
        let at = |i: usize| (i / nsb) * (k / g) + (i % nsb) / (g / 32);
        let sc: Vec<f32> = (0..m * nsb).map(|i| scale[at(i)]).collect();
        let min = zero.map(|z| (0..m * nsb).map(|i| -(scale[at(i)] * z[at(i)] as f32)).collect());
        let off = if self.zero_point { 0 } else { -(1i32 << (bits - 1)) };
        Some(BlockWeights { m, k, sb: 32, q, scale: sc, min, off, act_block: 32 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtn_groups_roundtrip_and_bound_the_error() {
        let (m, k) = (5, 128);
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        for (bits, group, zero_point) in
            [(4, 32, false), (4, 64, true), (8, 128, false), (8, 32, true), (3, 64, true), (2, 32, false)]
        {
            let rtn = Rtn { bits, group, zero_point };
            let bw = rtn.quantize(&w, m, k);
            let d = bw.dequantize();
            let levels = if zero_point { (1 << bits) - 1 } else { (1 << (bits - 1)) - 1 } as f32;
            let step = if zero_point { 1.0 / levels } else { 0.5 / levels };
            let err = d.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= step * 0.5 + 1e-6, "{}: {err} vs step {step}", rtn.name());
            let (p, s, z) = rtn.pack(&bw);
            let back = rtn.unpack(m, k, &p, &s, z.as_deref()).unwrap();
            assert_eq!(back.dequantize(), d, "{}", rtn.name());
        }
    }
}
