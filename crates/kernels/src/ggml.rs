//! ggml's block formats (llama.cpp's `Q8_0` … `Q6_K`) unpacked into [`BlockWeights`]: codes, scales and mins
//! per sub-block, with the same float arithmetic as ggml's `dequantize_row_*` (so `scale·(q+off)+min` gives
//! its values bit for bit).

use half::f16;

use crate::block::BlockWeights;

/// One ggml tensor type: its id, its name as GGUF tools print it, weights per block and bytes per block
/// (1 weight per "block" for the float types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block: usize,
    pub bytes: usize,
}

/// Defines [`ty`] and [`TYPES`] from one list of (constant, id, name, weights per block, bytes per block).
macro_rules! ggml_types {
    ($($konst:ident = $id:literal, $name:literal, $block:literal, $bytes:literal;)*) => {
        /// ggml type ids (`GGML_TYPE_*`) of the types in [`TYPES`].
        pub mod ty {
            $(pub const $konst: u32 = $id;)*
        }

        /// The ggml tensor types whittle reads and writes: the one table of ids, names and sizes (GGUF
        /// reading, GGUF writing and the block unpacking below all use it).
        pub const TYPES: &[GgmlType] = &[$(GgmlType { id: $id, name: $name, block: $block, bytes: $bytes }),*];
    };
}

ggml_types! {
    F32 = 0, "f32", 1, 4;
    F16 = 1, "f16", 1, 2;
    Q4_0 = 2, "q4_0", 32, 18;
    Q4_1 = 3, "q4_1", 32, 20;
    Q5_0 = 6, "q5_0", 32, 22;
    Q5_1 = 7, "q5_1", 32, 24;
    Q8_0 = 8, "q8_0", 32, 34;
    Q2_K = 10, "q2_k", 256, 84;
    Q3_K = 11, "q3_k", 256, 110;
    Q4_K = 12, "q4_k", 256, 144;
    Q5_K = 13, "q5_k", 256, 176;
    Q6_K = 14, "q6_k", 256, 210;
    BF16 = 30, "bf16", 1, 2;
}

impl GgmlType {
    /// The type with ggml id `id`, for const contexts: an unknown id panics (fails the build there).
    pub const fn of(id: u32) -> GgmlType {
        let mut i = 0;
        while i < TYPES.len() {
            if TYPES[i].id == id {
                return TYPES[i];
            }
            i += 1;
        }
        panic!("not a ggml type of TYPES")
    }

    /// The type with ggml id `id`, if whittle knows it.
    pub fn by_id(id: u32) -> Option<&'static GgmlType> {
        TYPES.iter().find(|t| t.id == id)
    }

    /// The type named `name` (case-insensitive: `q4_k`, `Q4_K`).
    pub fn by_name(name: &str) -> Option<&'static GgmlType> {
        TYPES.iter().find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// Whether the type stores blocks of codes with scales (everything but f32, f16 and bf16).
    pub fn is_block(&self) -> bool {
        self.block > 1
    }
}

/// (name, weights per block, bytes per block) of a block type this module reads (`None` for float types).
pub fn type_info(type_id: u32) -> Option<(&'static str, usize, usize)> {
    GgmlType::by_id(type_id).filter(|t| t.is_block()).map(|t| (t.name, t.block, t.bytes))
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Sub-block size, offset and whether the format has mins.
fn layout(type_id: u32) -> (usize, i32, bool) {
    match type_id {
        2 => (32, -8, false),
        3 => (32, 0, true),
        6 => (32, -16, false),
        7 => (32, 0, true),
        8 => (32, -128, false),
        10 => (16, 0, true),
        11 => (16, -4, false),
        12 | 13 => (32, 0, true),
        14 => (16, -32, false),
        _ => unreachable!("checked by type_info"),
    }
}

/// Unpacks an (m × k) tensor of ggml type `type_id` from its raw bytes.
pub fn unpack(type_id: u32, bytes: &[u8], m: usize, k: usize) -> Result<BlockWeights, String> {
    let (name, qk, bb) = type_info(type_id).ok_or_else(|| format!("ggml type {type_id} is not a block type"))?;
    if !k.is_multiple_of(qk) {
        return Err(format!("{name}: row width {k} is not a multiple of its block size {qk}"));
    }
    if bytes.len() != m * k / qk * bb {
        return Err(format!("{name}: {} bytes for a {m} × {k} tensor (expected {})", bytes.len(), m * k / qk * bb));
    }
    let (sb, off, has_min) = layout(type_id);
    let mut q = vec![0u8; m * k];
    let mut scale = vec![0f32; m * k / sb];
    let mut min = vec![0f32; if has_min { m * k / sb } else { 0 }];
    let spb = qk / sb; // sub-blocks per block
    for (bi, blk) in bytes.chunks_exact(bb).enumerate() {
        let qs = &mut q[bi * qk..(bi + 1) * qk];
        let sc = &mut scale[bi * spb..(bi + 1) * spb];
        let mn: &mut [f32] = if has_min { &mut min[bi * spb..(bi + 1) * spb] } else { &mut [] };
        match type_id {
            2 | 3 => {
                let o = if type_id == 2 { 2 } else { 4 };
                sc[0] = f16_at(blk, 0);
                if type_id == 3 {
                    mn[0] = f16_at(blk, 2);
                }
                for j in 0..16 {
                    qs[j] = blk[o + j] & 0xF;
                    qs[j + 16] = blk[o + j] >> 4;
                }
            }
            6 | 7 => {
                let o = if type_id == 6 { 2 } else { 4 };
                sc[0] = f16_at(blk, 0);
                if type_id == 7 {
                    mn[0] = f16_at(blk, 2);
                }
                let qh = u32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    qs[j] = (blk[o + 4 + j] & 0xF) | h0;
                    qs[j + 16] = (blk[o + 4 + j] >> 4) | h1;
                }
            }
            8 => {
                sc[0] = f16_at(blk, 0);
                for j in 0..32 {
                    qs[j] = (blk[2 + j] as i8 as i32 + 128) as u8;
                }
            }
            10 => {
                let (scales, qb) = (&blk[0..16], &blk[16..80]);
                let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
                for s in 0..16 {
                    let (n, j, half) = (s / 8, (s % 8) / 2, s % 2);
                    sc[s] = d * (scales[s] & 0xF) as f32;
                    mn[s] = -(dmin * (scales[s] >> 4) as f32);
                    for l in 0..16 {
                        qs[16 * s + l] = (qb[n * 32 + half * 16 + l] >> (2 * j)) & 3;
                    }
                }
            }
            11 => {
                let (hm, qb, raw) = (&blk[0..32], &blk[32..96], &blk[96..108]);
                let d = f16_at(blk, 108);
                let scales = q3k_scales(raw);
                for s in 0..16 {
                    let (n, j, half) = (s / 8, (s % 8) / 2, s % 2);
                    sc[s] = d * (scales[s] as i32 - 32) as f32;
                    let bit = 1u8 << (n * 4 + j);
                    for l in 0..16 {
                        let li = half * 16 + l;
                        let lo = (qb[n * 32 + li] >> (2 * j)) & 3;
                        qs[16 * s + l] = lo + if hm[li] & bit != 0 { 4 } else { 0 };
                    }
                }
            }
            12 | 13 => {
                let (d, dmin, raw) = (f16_at(blk, 0), f16_at(blk, 2), &blk[4..16]);
                let (qh, ql) = if type_id == 13 { (&blk[16..48], &blk[48..176]) } else { (&blk[0..0], &blk[16..144]) };
                for s in 0..8 {
                    let (scv, mv) = scale_min_k4(s, raw);
                    sc[s] = d * scv as f32;
                    mn[s] = -(dmin * mv as f32);
                    let (chunk, hi) = (s / 2, s % 2);
                    for l in 0..32 {
                        let b = ql[chunk * 32 + l];
                        let mut v = if hi == 0 { b & 0xF } else { b >> 4 };
                        if type_id == 13 && qh[l] & (1u8 << s) != 0 {
                            v += 16;
                        }
                        qs[32 * s + l] = v;
                    }
                }
            }
            14 => {
                let (ql, qh, scales) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                let d = f16_at(blk, 208);
                for s in 0..16 {
                    sc[s] = d * scales[s] as i8 as f32;
                }
                for n in 0..2 {
                    let (ql, qh) = (&ql[n * 64..], &qh[n * 32..]);
                    let y = &mut qs[n * 128..];
                    for l in 0..32 {
                        y[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                        y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                        y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
            }
            _ => unreachable!(),
        }
    }
    // llama.cpp runs K-quants against Q8_K activations (one scale per 256), the rest against Q8_0 (per 32).
    let act_block = if qk == 256 { 256 } else { 32 };
    Ok(BlockWeights { m, k, sb, q, scale, min: has_min.then_some(min), off, act_block })
}

/// Q4_K/Q5_K: 6-bit scale and min of sub-block `j` from the 12 packed bytes (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q3_K: the 16 6-bit scales (biased by 32) from 12 packed bytes.
fn q3k_scales(raw: &[u8]) -> [u8; 16] {
    let (kmask1, kmask2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let a = |i: usize| u32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]]);
    let (a0, a1, tmp) = (a(0), a(1), a(2));
    let aux = [
        (a0 & kmask2) | ((tmp & kmask1) << 4),
        (a1 & kmask2) | (((tmp >> 2) & kmask1) << 4),
        ((a0 >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4),
        ((a1 >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4),
    ];
    let mut out = [0u8; 16];
    for (i, v) in aux.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    out
}
