//! whittle-kernels: CPU kernels. Every kernel has a scalar `*_ref` twin that is its specification;
//! SIMD versions (AVX-512 VNNI, AVX2) keep its semantics, are picked at run time, and are property-tested
//! against the reference on random shapes with ragged tails.

use std::mem::MaybeUninit;

pub mod act;
pub mod attn;
pub mod block;
pub mod f32;
pub mod ggml;
pub mod half;
pub mod int8;
pub mod peak;
pub mod pool;
pub mod sparse;

/// Which implementation a kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable scalar reference.
    Ref,
    /// AVX2 (`maddubs` with the sign trick).
    Avx2,
    /// AVX-512 with VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl Isa {
    /// The best this CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512Vnni;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Ref
    }

    /// Whether this CPU can run `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Ref => true,
            Isa::Avx2 => matches!(Isa::detect(), Isa::Avx2 | Isa::Avx512Vnni),
            Isa::Avx512Vnni => Isa::detect() == Isa::Avx512Vnni,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Ref => "ref",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }
}

/// Views initialised floats as an output buffer for the kernels, which take possibly-uninitialised output
/// (so callers can skip zero-filling buffers the kernel overwrites anyway).
pub fn as_uninit(y: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the kernels only ever store initialised values, so
    // the slice stays initialised for the caller.
    unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// A vector of `n` floats filled by `fill`, which must write every element (the kernels' contract).
pub fn filled(n: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: `fill` initialised all `n` elements.
    unsafe { v.set_len(n) };
    v
}
