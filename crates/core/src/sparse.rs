//! Pruned weights stored without their zeros: the disk layouts (N:M, bitmap, CSR) and their sizes, and the
//! one packed form in memory that [`whittle_kernels::sparse`]'s kernel runs. Writing and reading the layouts
//! is [`crate::codec::sparse`].
//!
//! Bitmap or CSR is whichever is smaller (CSR only below ~6% density).

use whittle_kernels::sparse::PackedSparse;

/// How a sparse weight is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseFormat {
    /// At most `n` non-zeros in every group of `m` consecutive inputs.
    NM {
        n: usize,
        m: usize,
    },
    Bitmap,
    Csr,
}

/// A pruned weight: the packed non-zeros and the disk layout it came from (or will be written as).
#[derive(Debug)]
pub struct SparseLinear {
    pub packed: PackedSparse,
    pub format: SparseFormat,
}

pub(crate) fn code_bits(m: usize) -> usize {
    (usize::BITS - (m.max(2) - 1).leading_zeros()) as usize
}

/// Bits per weight of a disk layout for an (rows × k) weight with `nnz` non-zeros and `vb`-bit values.
fn disk_bits(format: SparseFormat, rows: usize, k: usize, nnz: usize, vb: usize) -> usize {
    match format {
        SparseFormat::NM { n, m } => {
            let per_row = k / m * n;
            rows * (per_row * vb + (per_row * code_bits(m)).div_ceil(8) * 8)
        }
        SparseFormat::Bitmap => rows * k.div_ceil(8) * 8 + nnz * vb,
        SparseFormat::Csr => nnz * (vb + 16) + (rows + 1) * 64,
    }
}

impl SparseLinear {
    /// Packs `w` (rows × k). With `nm`, checks that every group of `m` inputs has at most `n` non-zeros;
    /// without, picks bitmap or CSR, whichever is smaller.
    pub fn new(w: &[f32], rows: usize, k: usize, nm: Option<(usize, usize)>) -> Result<Self, String> {
        let format = match nm {
            Some((n, m)) => {
                if m == 0 || n == 0 || n > m || !k.is_multiple_of(m) {
                    return Err(format!("{n}:{m} does not fit an input width of {k}"));
                }
                if let Some(g) = w.chunks(m).position(|g| g.iter().filter(|v| **v != 0.0).count() > n) {
                    return Err(format!(
                        "row {}, inputs {}..{}: more than {n} of {m} are non-zero",
                        g * m / k,
                        g * m % k,
                        g * m % k + m
                    ));
                }
                SparseFormat::NM { n, m }
            }
            None => {
                let nnz = w.iter().filter(|v| **v != 0.0).count();
                let (b, c) =
                    (disk_bits(SparseFormat::Bitmap, rows, k, nnz, 32), disk_bits(SparseFormat::Csr, rows, k, nnz, 32));
                if c < b && k <= u16::MAX as usize + 1 {
                    SparseFormat::Csr
                } else {
                    SparseFormat::Bitmap
                }
            }
        };
        Ok(Self { packed: PackedSparse::new(w, rows, k), format })
    }

    /// Bytes on disk with f32 values (as held in memory).
    pub fn storage_bytes(&self) -> usize {
        disk_bits(self.format, self.packed.m, self.packed.k, self.packed.nnz(), 32).div_ceil(8)
    }

    /// `2:4-sparse`, `sparse-bitmap`, `sparse-csr`.
    pub fn name(&self) -> String {
        match self.format {
            SparseFormat::NM { n, m } => format!("{n}:{m}-sparse"),
            SparseFormat::Bitmap => "sparse-bitmap".into(),
            SparseFormat::Csr => "sparse-csr".into(),
        }
    }
}
