//! Block-quantized GEMM: llama.cpp's weight formats (Q8_0, Q4_0 … Q6_K) and grouped int4/int8 run as u8 codes
//! with a scale, and optionally a min, per sub-block of `sb` ∈ {16, 32} weights of a row, against activations
//! quantized to int8 per block of 32 (llama.cpp's Q8_0 activations), with int32 sums inside each sub-block.
//!
//! ```text
//! W[c,k] = scale[c,j] · (q[c,k] + off) + min[c,j]        j = k / sb, q ∈ [0, 255], off a per-format constant
//! x[r,k] ≈ xs[r,b] · xq[r,k]                              b = k / 32, xs = max|x| / 127, xq ∈ [-127, 127]
//! y[r,c] = Σ_j xs[r,b(j)] · ( scale[c,j] · (Σ_{k∈j} q·xq + off·Σ_{k∈j} xq) + min[c,j] · Σ_{k∈j} xq ) + bias[c]
//! ```
//!
//! `off` folds the signed formats into unsigned codes (Q8_0: q = w_q + 128, off = −128; Q4_0: off = −8; Q6_K:
//! off = −32) so that one `vpdpbusd` (u8 × s8) serves every format; formats with a free min (Q4_1, Q4_K, Q2_K,
//! asymmetric int4) add one FMA per sub-block. Codes are stored as densely as their range allows — a byte each
//! (codes up to 255: Q8_0, Q6_K), a nibble (up to 15: Q4_0, Q4_1, Q4_K, Q3_K, Q2_K) or a nibble plus a bit
//! plane (up to 31: Q5_0, Q5_1, Q5_K) — because single-token decoding streams every weight once per token and
//! is bound by memory bandwidth; the kernel widens them to bytes in registers just before `vpdpbusd`.
//!
//! Packed layout: output channels in panels of 16 (panel count padded to a multiple of 4 with zero weights).
//! A k-quad `g` of a panel is 64 codes: channel `c` at `4c..4c+4` = `q[16p+c, 4g..4g+4]`. Bytes: quad `g` of
//! panel `p` is the 64 bytes at `(p·k/4 + g)·64`. Nibbles: quads `2h` (low nibbles) and `2h+1` (high nibbles)
//! share the 64 bytes at `(p·k/8 + h)·64`. Five bits: the nibbles, and bit 4 of quad `g`'s 64 codes in the
//! `u64` at `p·k/4 + g` (bit `4c + i`). Scales and mins are `[panel][sub-block][16]` f32.

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::int8::Parallel;
use crate::Isa;

/// Activation block: one int8 scale per 32 values.
pub const QB: usize = 32;
/// Channels per panel.
pub const MB: usize = 16;
/// Panels are padded to a multiple of this (the widest micro-tile).
const PANEL_ALIGN: usize = 4;
/// Activation rows are padded to a multiple of this (the tallest micro-tile).
const ROW_ALIGN: usize = 4;
/// Rows per parallel task for prompt-sized inputs.
const ROWS_PER_TASK: usize = 64;

/// Unpacked block-quantized weights, row-major: what format readers produce and packing consumes.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// Output channels (rows).
    pub m: usize,
    /// Input features; a multiple of 32.
    pub k: usize,
    /// Weights per sub-block (16 or 32).
    pub sb: usize,
    /// Codes, m × k.
    pub q: Vec<u8>,
    /// Scale per sub-block, m × k/sb.
    pub scale: Vec<f32>,
    /// Min per sub-block, m × k/sb, for formats that have one.
    pub min: Option<Vec<f32>>,
    /// Constant added to every code.
    pub off: i32,
    /// Activation block the format is meant to run with: 32 (llama.cpp's Q8_0 activations) or 256 (its Q8_K
    /// activations, used against K-quants).
    pub act_block: usize,
}

impl BlockWeights {
    /// Checks the invariants the kernels rely on.
    pub fn validate(&self) -> Result<(), String> {
        if self.sb != 16 && self.sb != 32 {
            return Err(format!("sub-block of {} weights (16 or 32 supported)", self.sb));
        }
        if !self.k.is_multiple_of(QB) {
            return Err(format!("input width {} is not a multiple of {QB}", self.k));
        }
        if !(self.act_block == 32 || self.act_block == 256) || !self.k.is_multiple_of(self.act_block) {
            return Err(format!("activation block {} for input width {}", self.act_block, self.k));
        }
        let nsb = self.m * self.k / self.sb;
        if self.q.len() != self.m * self.k
            || self.scale.len() != nsb
            || self.min.as_ref().is_some_and(|m| m.len() != nsb)
        {
            return Err("codes, scales or mins do not match the shape".into());
        }
        Ok(())
    }

    /// The rows `rows` (in that order): a row permutation or selection.
    pub fn select_rows(&self, rows: &[usize]) -> BlockWeights {
        let (k, nsb) = (self.k, self.k / self.sb);
        let pick = |v: &[f32]| rows.iter().flat_map(|&r| v[r * nsb..(r + 1) * nsb].iter().copied()).collect();
        BlockWeights {
            m: rows.len(),
            k,
            sb: self.sb,
            q: rows.iter().flat_map(|&r| self.q[r * k..(r + 1) * k].iter().copied()).collect(),
            scale: pick(&self.scale),
            min: self.min.as_deref().map(pick),
            off: self.off,
            act_block: self.act_block,
        }
    }

    /// The weights as f32, m × k.
    pub fn dequantize(&self) -> Vec<f32> {
        let nsb = self.k / self.sb;
        let mut w = vec![0f32; self.m * self.k];
        for (i, (d, &q)) in w.iter_mut().zip(&self.q).enumerate() {
            let j = i / self.sb;
            let mn = self.min.as_ref().map_or(0.0, |m| m[j]);
            *d = self.scale[j] * (q as i32 + self.off) as f32 + mn;
        }
        debug_assert_eq!(self.scale.len(), self.m * nsb);
        w
    }
}

/// Block-quantized weights packed for [`gemm`].
#[derive(Debug, Clone)]
pub struct PackedBlock {
    pub m: usize,
    pub k: usize,
    pub sb: usize,
    pub off: i32,
    pub act_block: usize,
    /// Panels of 16 channels, padded to a multiple of 4.
    pub npanels: usize,
    /// Bits per stored code: 8 (bytes), 4 (nibbles) or 5 (nibbles and a bit plane); see the module docs.
    pub bits: u32,
    data: Vec<u8>,
    /// Bit 4 of every code, one `u64` per 64-code quad (5-bit storage only).
    hi: Vec<u64>,
    scale: Vec<f32>,
    min: Option<Vec<f32>>,
}

impl PackedBlock {
    pub fn new(w: &BlockWeights) -> Result<Self, String> {
        w.validate()?;
        let (m, k, sb) = (w.m, w.k, w.sb);
        let npanels = m.div_ceil(MB).div_ceil(PANEL_ALIGN) * PANEL_ALIGN;
        let nsb = k / sb;
        let bits = match w.q.iter().copied().max().unwrap_or(0) {
            0..=15 => 4,
            16..=31 => 5,
            _ => 8,
        };
        let mut data = vec![0u8; if bits == 8 { npanels * k * MB } else { npanels * k * MB / 2 }];
        let mut hi = vec![0u64; if bits == 5 { npanels * k / 4 } else { 0 }];
        let mut scale = vec![0f32; npanels * nsb * MB];
        let mut min = w.min.as_ref().map(|_| vec![0f32; npanels * nsb * MB]);
        for ch in 0..m {
            let (p, c) = (ch / MB, ch % MB);
            for (kk, &v) in w.q[ch * k..(ch + 1) * k].iter().enumerate() {
                let (g, lane) = (kk / 4, c * 4 + kk % 4);
                if bits == 8 {
                    data[(p * (k / 4) + g) * 64 + lane] = v;
                    continue;
                }
                data[(p * (k / 8) + g / 2) * 64 + lane] |= (v & 0xf) << (4 * (g % 2));
                if bits == 5 {
                    hi[p * (k / 4) + g] |= u64::from(v >> 4 & 1) << lane;
                }
            }
            for j in 0..nsb {
                scale[(p * nsb + j) * MB + c] = w.scale[ch * nsb + j];
                if let (Some(dst), Some(src)) = (min.as_mut(), w.min.as_ref()) {
                    dst[(p * nsb + j) * MB + c] = src[ch * nsb + j];
                }
            }
        }
        Ok(Self { m, k, sb, off: w.off, act_block: w.act_block, npanels, bits, data, hi, scale, min })
    }

    /// Back to the unpacked form (for saving and dequantizing).
    pub fn unpack(&self) -> BlockWeights {
        let (m, k, sb) = (self.m, self.k, self.sb);
        let nsb = k / sb;
        let mut q = vec![0u8; m * k];
        let mut scale = vec![0f32; m * nsb];
        let mut min = self.min.as_ref().map(|_| vec![0f32; m * nsb]);
        for ch in 0..m {
            let (p, c) = (ch / MB, ch % MB);
            for kk in 0..k {
                q[ch * k + kk] = self.code(ch, kk);
            }
            for j in 0..nsb {
                scale[ch * nsb + j] = self.scale[(p * nsb + j) * MB + c];
                if let (Some(dst), Some(src)) = (min.as_mut(), self.min.as_ref()) {
                    dst[ch * nsb + j] = src[(p * nsb + j) * MB + c];
                }
            }
        }
        BlockWeights { m, k, sb, q, scale, min, off: self.off, act_block: self.act_block }
    }

    /// Bytes held in memory by the packed form.
    pub fn resident_bytes(&self) -> usize {
        self.data.len() + 8 * self.hi.len() + 4 * self.scale.len() + self.min.as_ref().map_or(0, |m| 4 * m.len())
    }

    #[inline]
    fn code(&self, ch: usize, kk: usize) -> u8 {
        let (p, g, lane) = (ch / MB, kk / 4, (ch % MB) * 4 + kk % 4);
        if self.bits == 8 {
            return self.data[(p * (self.k / 4) + g) * 64 + lane];
        }
        let nib = self.data[(p * (self.k / 8) + g / 2) * 64 + lane] >> (4 * (g % 2)) & 0xf;
        let top = if self.bits == 5 { (self.hi[p * (self.k / 4) + g] >> lane & 1) as u8 } else { 0 };
        nib | top << 4
    }
}

/// Activations quantized per block of `ab` (32 or 256) values, rows padded to a multiple of 4 with zeros.
pub struct BlockActs {
    pub n: usize,
    pub k: usize,
    pub ab: usize,
    /// n padded × k.
    pub xq: Vec<i8>,
    /// Scale per `ab`-block.
    pub xs: Vec<f32>,
    /// Σ xq per 16 and per 32 values.
    pub xsum16: Vec<i32>,
    pub xsum32: Vec<i32>,
    /// xs · Σ xq per 16 and per 32 values (the min term's factor).
    pub xsx16: Vec<f32>,
    pub xsx32: Vec<f32>,
}

#[inline(always)]
fn round_half_away(v: f32) -> i32 {
    (v + 0.5f32.copysign(v)) as i32
}

/// Quantizes one block (a multiple of 16 values): returns its scale; writes codes.
fn quantize_block_ref(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let s = amax / 127.0;
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (d, &v) in q.iter_mut().zip(x) {
        *d = round_half_away(v * inv).clamp(-127, 127) as i8;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    let mut vmax = _mm512_setzero_ps();
    for c in x.chunks_exact(16) {
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(c.as_ptr())));
    }
    let s = _mm512_reduce_max_ps(vmax) / 127.0;
    let inv = _mm512_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
    let (half, sign) = (_mm512_set1_ps(0.5), _mm512_set1_ps(-0.0));
    for (h, c) in x.chunks_exact(16).enumerate() {
        let v = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), inv);
        let r = crate::act::bits::or(half, crate::act::bits::and(v, sign));
        let i = _mm512_cvttps_epi32(_mm512_add_ps(v, r));
        _mm_storeu_si128(q.as_mut_ptr().add(16 * h) as *mut _, _mm512_cvtsepi32_epi8(i));
    }
    s
}

/// Quantizes activations `x` (n × k) per block of `ab` values (32 or 256; k a multiple of `ab`).
pub fn quantize_acts(x: &[f32], n: usize, k: usize, ab: usize, isa: Isa, par: &dyn Parallel) -> BlockActs {
    assert!(ab.is_multiple_of(QB) && k.is_multiple_of(ab), "activation width {k} is not a multiple of the block {ab}");
    assert_eq!(x.len(), n * k);
    let np = n.div_ceil(ROW_ALIGN) * ROW_ALIGN;
    let nb = k / ab;
    let mut xq = vec![0i8; np * k];
    let mut xs = vec![0f32; np * nb];
    let mut xsum16 = vec![0i32; np * k / 16];
    let use512 = isa == Isa::Avx512Vnni;
    {
        let (qp, sp, s16) =
            (Ptr(xq.as_mut_ptr() as usize), Ptr(xs.as_mut_ptr() as usize), Ptr(xsum16.as_mut_ptr() as usize));
        let chunk = 8;
        par.for_each(n.div_ceil(chunk), &|range: Range<usize>| {
            for r in range.start * chunk..(range.end * chunk).min(n) {
                // SAFETY: row r of xq, xs and xsum16 is written by this task only.
                let (q, s, sum) = unsafe {
                    (
                        std::slice::from_raw_parts_mut((qp.0 as *mut i8).add(r * k), k),
                        std::slice::from_raw_parts_mut((sp.0 as *mut f32).add(r * nb), nb),
                        std::slice::from_raw_parts_mut((s16.0 as *mut i32).add(r * k / 16), k / 16),
                    )
                };
                for b in 0..nb {
                    let (xb, qb) = (&x[r * k + b * ab..r * k + (b + 1) * ab], &mut q[b * ab..(b + 1) * ab]);
                    s[b] = match use512 {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: AVX-512 was detected (the caller passes a supported ISA); whole 16-lanes.
                        true => unsafe { quantize_block_avx512(xb, qb) },
                        _ => quantize_block_ref(xb, qb),
                    };
                }
                for (d, c) in sum.iter_mut().zip(q.chunks_exact(16)) {
                    *d = c.iter().map(|&v| v as i32).sum();
                }
            }
        });
    }
    let xsum32: Vec<i32> = xsum16.chunks_exact(2).map(|p| p[0] + p[1]).collect();
    let xsx16: Vec<f32> = xsum16.iter().enumerate().map(|(i, &v)| v as f32 * xs[i * 16 / ab]).collect();
    let xsx32: Vec<f32> = xsum32.iter().enumerate().map(|(i, &v)| v as f32 * xs[i * 32 / ab]).collect();
    BlockActs { n, k, ab, xq, xs, xsum16, xsum32, xsx16, xsx32 }
}

#[derive(Clone, Copy)]
struct Ptr(usize);

/// The specification: the formula of the module docs on unpacked indices.
pub fn gemm_ref(w: &PackedBlock, a: &BlockActs, bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>]) {
    let (m, k, sb) = (w.m, w.k, w.sb);
    let nsb = k / sb;
    for r in 0..a.n {
        for c in 0..m {
            let mut acc = 0f32;
            for j in 0..nsb {
                let mut dot = 0i32;
                let mut xsum = 0i32;
                for kk in j * sb..(j + 1) * sb {
                    let xv = a.xq[r * k + kk] as i32;
                    dot += w.code(c, kk) as i32 * xv;
                    xsum += xv;
                }
                let pi = ((c / MB) * nsb + j) * MB + c % MB;
                let xs = a.xs[r * (k / a.ab) + j * sb / a.ab];
                acc += xs * (w.scale[pi] * (dot + w.off * xsum) as f32);
                if let Some(mn) = &w.min {
                    acc += mn[pi] * (xs * xsum as f32);
                }
            }
            y[r * m + c].write(acc + bias.map_or(0.0, |b| b[c]));
        }
    }
}

/// `y (n × m) = dequant(x) · Wᵀ + b` on pre-quantized activations. Writes every element of `y`.
pub fn gemm(
    w: &PackedBlock,
    a: &BlockActs,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    isa: Isa,
    par: &dyn Parallel,
) {
    assert!(isa.supported(), "kernel {} is not supported on this CPU", isa.name());
    assert_eq!(a.k, w.k, "activation width");
    assert_eq!(y.len(), a.n * w.m);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && a.n > 0 {
        return gemm_vnni(w, a, bias, y, par);
    }
    gemm_ref(w, a, bias, y)
}

#[cfg(target_arch = "x86_64")]
fn gemm_vnni(w: &PackedBlock, a: &BlockActs, bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>], par: &dyn Parallel) {
    let mut bvec = vec![0f32; w.npanels * MB];
    if let Some(b) = bias {
        bvec[..w.m].copy_from_slice(b);
    }
    let yp = Ptr(y.as_mut_ptr() as usize);
    let n = a.n;
    let t = Tile { w, a, bias: &bvec, y: yp.0 as *mut f32 };
    if n == 1 {
        // Decoding: one row, tasks over panel groups: four panels per micro-tile when that splits evenly over
        // two threads, else two (an odd count of 4-panel tasks leaves one thread idle at the end).
        if (w.npanels / 4).is_multiple_of(2) {
            par.for_each(w.npanels / 4, &|range: Range<usize>| {
                for g in range {
                    // SAFETY: AVX-512 VNNI checked by `gemm`; the tile writes row 0, panels 4g..4g+4 only.
                    unsafe { t.dispatch::<1, 4>(0, 4 * g) };
                }
            });
        } else {
            par.for_each(w.npanels / 2, &|range: Range<usize>| {
                for g in range {
                    // SAFETY: as above, panels 2g..2g+2.
                    unsafe { t.dispatch::<1, 2>(0, 2 * g) };
                }
            });
        }
        return;
    }
    let row_tasks = n.div_ceil(ROWS_PER_TASK);
    let pairs = w.npanels / 2;
    par.for_each(row_tasks * pairs, &|range: Range<usize>| {
        for task in range {
            let (rt, pair) = (task / pairs, task % pairs);
            let r1 = ((rt + 1) * ROWS_PER_TASK).min(n);
            let mut r = rt * ROWS_PER_TASK;
            while r < r1 {
                // SAFETY: as above; rows r..r+4 (padded activations exist; stores skip rows ≥ n), panels
                // 2·pair..2·pair+2, which no other task writes.
                unsafe { t.dispatch::<4, 2>(r, 2 * pair) };
                r += 4;
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    w: &'a PackedBlock,
    a: &'a BlockActs,
    /// Padded to whole panels.
    bias: &'a [f32],
    y: *mut f32,
}

// SAFETY: tasks write disjoint rectangles of `y`.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Tile<'_> {}

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    #[inline(always)]
    unsafe fn dispatch<const MR: usize, const NP: usize>(&self, r0: usize, p0: usize) {
        match (self.w.bits, self.w.sb, self.w.min.is_some()) {
            (8, 16, false) => self.run::<MR, NP, 16, false, 8>(r0, p0),
            (8, 16, true) => self.run::<MR, NP, 16, true, 8>(r0, p0),
            (8, _, false) => self.run::<MR, NP, 32, false, 8>(r0, p0),
            (8, _, true) => self.run::<MR, NP, 32, true, 8>(r0, p0),
            (5, 16, false) => self.run::<MR, NP, 16, false, 5>(r0, p0),
            (5, 16, true) => self.run::<MR, NP, 16, true, 5>(r0, p0),
            (5, _, false) => self.run::<MR, NP, 32, false, 5>(r0, p0),
            (5, _, true) => self.run::<MR, NP, 32, true, 5>(r0, p0),
            (_, 16, false) => self.run::<MR, NP, 16, false, 4>(r0, p0),
            (_, 16, true) => self.run::<MR, NP, 16, true, 4>(r0, p0),
            (_, _, false) => self.run::<MR, NP, 32, false, 4>(r0, p0),
            (_, _, true) => self.run::<MR, NP, 32, true, 4>(r0, p0),
        }
    }

    /// The 64 codes of quad `kq` of panel `p` as bytes (widened from nibbles and the bit plane if stored so).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn codes<const BITS: u32>(&self, p: usize, kq: usize) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let (w, k) = (self.w, self.w.k);
        if BITS == 8 {
            return _mm512_loadu_si512(w.data.as_ptr().add((p * (k / 4) + kq) * 64) as *const _);
        }
        let v = _mm512_loadu_si512(w.data.as_ptr().add((p * (k / 8) + kq / 2) * 64) as *const _);
        let v = if kq.is_multiple_of(2) { v } else { _mm512_srli_epi16::<4>(v) };
        let q = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
        if BITS == 5 {
            let top = *w.hi.get_unchecked(p * (k / 4) + kq);
            return _mm512_mask_add_epi8(q, top, q, _mm512_set1_epi8(0x10));
        }
        q
    }

    /// MR rows × NP panels: i32 sums per sub-block in registers, scaled into f32 accumulators.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // register tiles indexed by row and panel
    unsafe fn run<const MR: usize, const NP: usize, const SB: usize, const MIN: bool, const BITS: u32>(
        &self,
        r0: usize,
        p0: usize,
    ) {
        use std::arch::x86_64::*;
        let (w, a) = (self.w, self.a);
        let k = w.k;
        let nsb = k / SB;
        let (nb, ab) = (k / a.ab, a.ab);
        let (xsum, xsx) = if SB == 16 { (&a.xsum16, &a.xsx16) } else { (&a.xsum32, &a.xsx32) };
        let mut facc = [[_mm512_setzero_ps(); NP]; MR];
        let xq = a.xq.as_ptr();
        for j in 0..nsb {
            let mut iacc = [[_mm512_setzero_si512(); NP]; MR];
            if w.off != 0 {
                for i in 0..MR {
                    let o = _mm512_set1_epi32(w.off * *xsum.get_unchecked((r0 + i) * nsb + j));
                    for p in 0..NP {
                        iacc[i][p] = o;
                    }
                }
            }
            for g in 0..SB / 4 {
                let kq = j * (SB / 4) + g;
                let mut wv = [_mm512_setzero_si512(); NP];
                for p in 0..NP {
                    wv[p] = self.codes::<BITS>(p0 + p, kq);
                }
                for i in 0..MR {
                    let x = _mm512_set1_epi32((xq.add((r0 + i) * k + kq * 4) as *const i32).read_unaligned());
                    for p in 0..NP {
                        iacc[i][p] = _mm512_dpbusd_epi32(iacc[i][p], wv[p], x);
                    }
                }
            }
            let mut sc = [_mm512_setzero_ps(); NP];
            for p in 0..NP {
                sc[p] = _mm512_loadu_ps(w.scale.as_ptr().add(((p0 + p) * nsb + j) * MB));
            }
            for i in 0..MR {
                let xs = _mm512_set1_ps(*a.xs.get_unchecked((r0 + i) * nb + j * SB / ab));
                for p in 0..NP {
                    facc[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[i][p]), _mm512_mul_ps(sc[p], xs), facc[i][p]);
                }
            }
            if MIN {
                let mn = w.min.as_ref().unwrap_unchecked().as_ptr();
                for p in 0..NP {
                    let m = _mm512_loadu_ps(mn.add(((p0 + p) * nsb + j) * MB));
                    for i in 0..MR {
                        let t = _mm512_set1_ps(*xsx.get_unchecked((r0 + i) * nsb + j));
                        facc[i][p] = _mm512_fmadd_ps(m, t, facc[i][p]);
                    }
                }
            }
        }
        let m = w.m;
        for i in 0..MR {
            if r0 + i >= a.n {
                break;
            }
            for p in 0..NP {
                let c0 = (p0 + p) * MB;
                if c0 >= m {
                    break;
                }
                let valid = (m - c0).min(MB);
                let mask: __mmask16 = if valid >= MB { 0xffff } else { ((1u32 << valid) - 1) as u16 };
                let v = _mm512_add_ps(facc[i][p], _mm512_loadu_ps(self.bias.as_ptr().add(c0)));
                _mm512_mask_storeu_ps(self.y.add((r0 + i) * m + c0), mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::{Rayon, Serial};
    use rand::{Rng, SeedableRng};

    /// Same i32 sums; only the order of f32 accumulation differs.
    const MAX_BLOCK_GEMM_REL_ERR: f32 = 1e-5;

    fn random_weights(
        rng: &mut rand::rngs::StdRng,
        m: usize,
        k: usize,
        sb: usize,
        bits: u32,
        min: bool,
    ) -> BlockWeights {
        let nsb = m * k / sb;
        BlockWeights {
            m,
            k,
            sb,
            q: (0..m * k).map(|_| rng.random_range(0..(1u32 << bits)) as u8).collect(),
            scale: (0..nsb).map(|_| rng.random::<f32>() * 0.02 - 0.005).collect(),
            min: min.then(|| (0..nsb).map(|_| rng.random::<f32>() * 0.1 - 0.05).collect()),
            off: if min { 0 } else { -(1 << (bits - 1)) },
            act_block: 32,
        }
    }

    #[test]
    fn simd_matches_ref_and_dequantized_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let shapes = [(1, 16, 32), (1, 100, 64), (2, 33, 96), (5, 70, 160), (70, 64, 256), (9, 200, 32)];
        for &(n, m, k) in &shapes {
            for (sb, bits, min) in [(32, 8, false), (32, 4, true), (16, 6, false), (16, 2, true), (32, 5, false)] {
                let bw = random_weights(&mut rng, m, k, sb, bits, min);
                let p = PackedBlock::new(&bw).unwrap();
                assert_eq!(p.unpack().q, bw.q);
                let want_bits = match bits {
                    0..=4 => 4,
                    5 => 5,
                    _ => 8,
                };
                assert!(p.bits <= want_bits, "{bits}-bit codes stored in {} bits", p.bits);
                let x: Vec<f32> = (0..n * k).map(|_| (rng.random::<f32>() - 0.5) * 4.0).collect();
                let b: Vec<f32> = (0..m).map(|_| rng.random::<f32>()).collect();
                let ab = if k % 256 == 0 && sb == 16 { 256 } else { 32 };
                let acts = quantize_acts(&x, n, k, ab, Isa::Ref, &Serial);
                let want = crate::filled(n * m, |y| gemm_ref(&p, &acts, Some(&b), y));
                // Against the float product of dequantized weights and activations.
                let wd = bw.dequantize();
                for r in 0..n {
                    for c in 0..m {
                        let e: f32 = (0..k).map(|kk| a_deq(&acts, r, kk) * wd[c * k + kk]).sum::<f32>() + b[c];
                        let got = want[r * m + c];
                        assert!((e - got).abs() <= 1e-4 * e.abs().max(1.0), "ref n{n} m{m} k{k} sb{sb}: {got} vs {e}");
                    }
                }
                if Isa::Avx512Vnni.supported() {
                    let acts2 = quantize_acts(&x, n, k, ab, Isa::Avx512Vnni, &Rayon);
                    assert_eq!(acts2.xq, acts.xq);
                    let got = crate::filled(n * m, |y| gemm(&p, &acts2, Some(&b), y, Isa::Avx512Vnni, &Rayon));
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= MAX_BLOCK_GEMM_REL_ERR * w.abs().max(1.0),
                            "vnni n{n} m{m} k{k} sb{sb} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    fn a_deq(a: &BlockActs, r: usize, kk: usize) -> f32 {
        a.xq[r * a.k + kk] as f32 * a.xs[r * (a.k / a.ab) + kk / a.ab]
    }

    #[test]
    fn bad_shapes_are_refused() {
        let w =
            BlockWeights { m: 1, k: 48, sb: 16, q: vec![0; 48], scale: vec![0.0; 3], min: None, off: 0, act_block: 32 };
        assert!(PackedBlock::new(&w).unwrap_err().contains("multiple of 32"));
        let w =
            BlockWeights { m: 1, k: 64, sb: 64, q: vec![0; 64], scale: vec![0.0; 1], min: None, off: 0, act_block: 32 };
        assert!(PackedBlock::new(&w).is_err());
    }
}
