//! What this machine can do at most, measured: streaming read bandwidth, f32 FMA throughput and int8 dot
//! product throughput, on the threads of a [`Parallel`]. The kernels' benchmarks print their own speed beside
//! these figures, and `whittle bench` reports decode speed as a fraction of the bandwidth limit.
//!
//! Each probe runs its loop on every thread at once, several times, and keeps the best repetition (as STREAM
//! does): the limit is what the hardware reached at least once, not what a busy moment left of it.

use std::time::Instant;

use crate::int8::Parallel;

/// A measured limit and how it was measured.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    /// GB/s (bandwidth) or GFLOP/s / GOP/s (compute).
    pub value: f64,
    /// Threads that ran the probe at once.
    pub threads: usize,
    /// Instruction set of the probe's loop: `avx512`, `avx2`, `scalar`.
    pub isa: &'static str,
}

/// Streaming read bandwidth in GB/s: every thread sums its share of a `bytes`-byte buffer (several times the
/// last-level cache: 256 MiB is a good size) with vector loads; best of `reps`. The buffer is freed before
/// returning.
pub fn read_gbps(par: &dyn Parallel, threads: usize, bytes: usize, reps: usize) -> Peak {
    let n = (bytes / 4).max(16 * 1024);
    // Touch every page first, so the timed passes read memory rather than fault pages in.
    let buf: Vec<f32> = (0..n).map(|i| (i & 0xff) as f32).collect();
    // Many slices per thread, so a thread that starts late still gets its share.
    let parts = threads.max(1) * 16;
    let chunk = n.div_ceil(parts).div_ceil(64) * 64;
    let sink = std::sync::atomic::AtomicU32::new(0);
    let mut best = 0f64;
    let (isa, sum): (&'static str, fn(&[f32]) -> f32) = sum_kernel();
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        par.for_each(parts, &|r| {
            for p in r {
                let lo = (p * chunk).min(n);
                let hi = ((p + 1) * chunk).min(n);
                let s = sum(&buf[lo..hi]);
                sink.fetch_add(s.to_bits() & 1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let dt = t.elapsed().as_secs_f64();
        best = best.max((n * 4) as f64 / dt / 1e9);
    }
    std::hint::black_box(sink.into_inner());
    Peak { value: best, threads: threads.max(1), isa }
}

fn sum_kernel() -> (&'static str, fn(&[f32]) -> f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return ("avx512", |x| unsafe { sum_avx512(x) });
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX.
            return ("avx2", |x| unsafe { sum_avx(x) });
        }
    }
    ("scalar", sum_ref)
}

/// Sum of `x` with eight independent accumulators (the scalar reference of the bandwidth probe).
pub fn sum_ref(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut c = x.chunks_exact(8);
    for v in &mut c {
        for (a, b) in acc.iter_mut().zip(v) {
            *a += b;
        }
    }
    acc.iter().sum::<f32>() + c.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_setzero_ps(); 4];
    let mut c = x.chunks_exact(64);
    for v in &mut c {
        let p = v.as_ptr();
        for (j, acc) in a.iter_mut().enumerate() {
            *acc = _mm512_add_ps(*acc, _mm512_loadu_ps(p.add(16 * j)));
        }
    }
    let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    _mm512_reduce_add_ps(s) + c.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn sum_avx(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 4];
    let mut c = x.chunks_exact(32);
    for v in &mut c {
        let p = v.as_ptr();
        for (j, acc) in a.iter_mut().enumerate() {
            *acc = _mm256_add_ps(*acc, _mm256_loadu_ps(p.add(8 * j)));
        }
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    out.iter().sum::<f32>() + c.remainder().iter().sum::<f32>()
}

/// Peak f32 multiply-add throughput in GFLOP/s (an FMA counts 2): independent FMA chains in registers on
/// every thread; best of `reps`.
pub fn fma_gflops(par: &dyn Parallel, threads: usize, reps: usize) -> Peak {
    const ITERS: usize = 500_000;
    let (isa, lanes, kernel): (&'static str, usize, fn(usize) -> f32) = fma_kernel();
    let parts = threads.max(1) * 4;
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        par.for_each(parts, &|r| {
            for _ in r {
                std::hint::black_box(kernel(ITERS));
            }
        });
        let dt = t.elapsed().as_secs_f64();
        // 12 chains × lanes × 2 flops per iteration.
        best = best.max((parts * ITERS * 12 * lanes * 2) as f64 / dt / 1e9);
    }
    Peak { value: best, threads: threads.max(1), isa }
}

fn fma_kernel() -> (&'static str, usize, fn(usize) -> f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return ("avx512", 16, |n| unsafe { fma_avx512(n) });
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return ("avx2", 8, |n| unsafe { fma_avx2(n) });
        }
    }
    ("scalar", 1, fma_ref)
}

/// 12 independent multiply-add chains of `n` steps (the scalar reference of the compute probe).
pub fn fma_ref(n: usize) -> f32 {
    let mut a = [0f32; 12];
    let (m, c) = (std::hint::black_box(0.999_f32), std::hint::black_box(1e-3_f32));
    for _ in 0..n {
        for v in a.iter_mut() {
            *v = v.mul_add(m, c);
        }
    }
    a.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(n: usize) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm512_set1_ps(std::hint::black_box(0.999));
    let c = _mm512_set1_ps(std::hint::black_box(1e-3));
    let mut a = [_mm512_setzero_ps(); 12];
    for _ in 0..n {
        for v in a.iter_mut() {
            *v = _mm512_fmadd_ps(*v, m, c);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in a {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(n: usize) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(std::hint::black_box(0.999));
    let c = _mm256_set1_ps(std::hint::black_box(1e-3));
    let mut a = [_mm256_setzero_ps(); 12];
    for _ in 0..n {
        for v in a.iter_mut() {
            *v = _mm256_fmadd_ps(*v, m, c);
        }
    }
    let mut s = _mm256_setzero_ps();
    for v in a {
        s = _mm256_add_ps(s, v);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

/// Peak int8 dot-product throughput in GOP/s (a multiply-add counts 2): independent `vpdpbusd` chains on
/// every thread (AVX-512 VNNI); `None` where the CPU has no VNNI.
pub fn vnni_gops(par: &dyn Parallel, threads: usize, reps: usize) -> Option<Peak> {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::detect() == crate::Isa::Avx512Vnni {
        const ITERS: usize = 500_000;
        let parts = threads.max(1) * 4;
        let mut best = 0f64;
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            par.for_each(parts, &|r| {
                for _ in r {
                    // SAFETY: the CPU has AVX-512 VNNI (checked above).
                    std::hint::black_box(unsafe { vnni_avx512(ITERS) });
                }
            });
            let dt = t.elapsed().as_secs_f64();
            // 12 chains × 64 multiply-adds × 2 ops per iteration.
            best = best.max((parts * ITERS * 12 * 64 * 2) as f64 / dt / 1e9);
        }
        return Some(Peak { value: best, threads: threads.max(1), isa: "avx512-vnni" });
    }
    let _ = (par, threads, reps);
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_avx512(n: usize) -> i32 {
    use std::arch::x86_64::*;
    let x = _mm512_set1_epi8(std::hint::black_box(3));
    let w = _mm512_set1_epi8(std::hint::black_box(-2));
    let mut a = [_mm512_setzero_si512(); 12];
    for _ in 0..n {
        for v in a.iter_mut() {
            *v = _mm512_dpbusd_epi32(*v, x, w);
        }
    }
    let mut s = _mm512_setzero_si512();
    for v in a {
        s = _mm512_add_epi32(s, v);
    }
    _mm512_reduce_add_epi32(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::Serial;

    #[test]
    fn sums_match_the_reference() {
        for n in [0, 1, 15, 64, 1000, 4099] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let want: f32 = x.iter().sum();
            let (_, sum) = sum_kernel();
            assert_eq!(sum(&x), want, "n = {n}");
            assert_eq!(sum_ref(&x), want, "n = {n}");
        }
    }

    #[test]
    fn fma_chains_agree_with_the_reference() {
        let (_, lanes, k) = fma_kernel();
        let (want, got) = (fma_ref(1000), k(1000) / lanes as f32);
        assert!((want - got).abs() <= 1e-4 * want.abs(), "{want} vs {got}");
    }

    #[test]
    fn probes_report_positive_finite_figures() {
        let bw = read_gbps(&Serial, 1, 4 << 20, 2);
        assert!(bw.value.is_finite() && bw.value > 0.1, "{bw:?}");
        let f = fma_gflops(&Serial, 1, 1);
        assert!(f.value.is_finite() && f.value > 0.1, "{f:?}");
        if let Some(v) = vnni_gops(&Serial, 1, 1) {
            assert!(v.value.is_finite() && v.value > 0.1, "{v:?}");
        }
    }
}
