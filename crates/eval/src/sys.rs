//! What the process costs the machine: peak resident memory, CPU time, threads and the kernel path.

/// Peak resident set size of this process in MB (`VmHWM`), if the OS tells.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// User + system CPU seconds this process has used (from `/proc/self/stat`, clock ticks of 1/100 s).
pub fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (u, st): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((u + st) / 100.0)
}

/// Worker threads the tensor engine uses (`RAYON_NUM_THREADS`, else every core).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// The matmul kernel path taken on this CPU.
pub fn kernel() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = if std::arch::is_x86_feature_detected!("avx512f") {
            "avx512f"
        } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            "avx2+fma"
        } else {
            "sse2"
        };
        if whittle_kernels::f32::PackedF32::available() {
            return "whittle f32 avx512".to_string();
        }
        format!("candle-gemm f32 ({isa})")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "candle-gemm f32".to_string()
    }
}

/// Measures wall time and CPU utilisation of `f`.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, Option<f64>) {
    let c0 = cpu_seconds();
    let t0 = std::time::Instant::now();
    let out = f();
    let wall = t0.elapsed().as_secs_f64();
    let util = match (c0, cpu_seconds()) {
        (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall),
        _ => None,
    };
    (out, wall, util)
}
