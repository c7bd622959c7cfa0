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

/// Clock ticks per second of `/proc/stat` and `/proc/PID/stat` (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// The machine's CPU counters (`/proc/stat`'s `cpu` line) and this process's CPU time at one moment, to tell
/// afterwards how much CPU *other* processes took meanwhile ([`CpuDelta`]).
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    at: std::time::Instant,
    /// Ticks the machine's CPUs spent running anything (user, nice, system, irq, softirq).
    busy: u64,
    /// Ticks taken by the hypervisor for other guests (`steal`).
    steal: u64,
    /// All ticks (busy, idle, iowait, steal).
    total: u64,
    /// This process's user + system ticks, all threads.
    own: u64,
    cpus: usize,
}

impl CpuSample {
    /// Now, or `None` where `/proc` does not tell (not Linux).
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        Self::parse(&stat, &own, std::time::Instant::now())
    }

    /// From the text of `/proc/stat` and `/proc/self/stat`.
    pub fn parse(stat: &str, self_stat: &str, at: std::time::Instant) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        // user nice system idle iowait irq softirq steal [guest guest_nice: already inside user and nice]
        let f: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = f[..] else { return None };
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        let rest = &self_stat[self_stat.rfind(')')? + 2..];
        let p: Vec<&str> = rest.split_whitespace().collect();
        let own = p.get(11)?.parse::<u64>().ok()? + p.get(12)?.parse::<u64>().ok()?;
        Some(Self {
            at,
            busy: user + nice + system + irq + softirq,
            steal,
            total: user + nice + system + idle + iowait + irq + softirq + steal,
            own,
            cpus: cpus.max(1),
        })
    }
}

/// What the machine did between two [`CpuSample`]s, additive over several intervals (the repetitions of
/// a benchmark): how much CPU other processes took while we measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuDelta {
    pub wall_s: f64,
    busy: u64,
    own: u64,
    steal: u64,
    total: u64,
    pub cpus: usize,
}

impl CpuDelta {
    pub fn between(a: &CpuSample, b: &CpuSample) -> Self {
        Self {
            wall_s: b.at.duration_since(a.at).as_secs_f64(),
            busy: b.busy.saturating_sub(a.busy),
            own: b.own.saturating_sub(a.own),
            steal: b.steal.saturating_sub(a.steal),
            total: b.total.saturating_sub(a.total),
            cpus: b.cpus,
        }
    }

    /// `self` followed by `o`.
    pub fn add(&mut self, o: &CpuDelta) {
        self.wall_s += o.wall_s;
        self.busy += o.busy;
        self.own += o.own;
        self.steal += o.steal;
        self.total += o.total;
        self.cpus = self.cpus.max(o.cpus);
    }

    /// Cores' worth of CPU that other processes used on average (the machine's busy time less ours, per
    /// second of wall time): 1.0 = another process held a whole core throughout.
    pub fn other_cores(&self) -> f64 {
        if self.wall_s <= 0.0 {
            return 0.0;
        }
        (self.busy.saturating_sub(self.own) as f64 / USER_HZ / self.wall_s).max(0.0)
    }

    /// Share of the machine's CPU time the hypervisor gave other guests.
    pub fn steal_frac(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.steal as f64 / self.total as f64
        }
    }
}

/// Runs `f` and says what the machine did meanwhile (`None` without `/proc`).
pub fn watched<T>(f: impl FnOnce() -> T) -> (T, Option<CpuDelta>) {
    let a = CpuSample::now();
    let out = f();
    let d = match (a, CpuSample::now()) {
        (Some(a), Some(b)) => Some(CpuDelta::between(&a, &b)),
        _ => None,
    };
    (out, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const STAT_A: &str =
        "cpu  1000 0 200 5000 10 0 5 0 0 0\ncpu0 500 0 100 2500 5 0 2 0 0 0\ncpu1 500 0 100 2500 5 0 3 0 0 0\nintr 1\n";
    // One second later (200 ticks on 2 CPUs): 150 busy ticks, of which this process took 50 and another
    // process 100 (one whole core); 10 ticks stolen.
    const STAT_B: &str = "cpu  1120 0 230 5040 10 0 5 10 0 0\ncpu0 560 0 115 2520 5 0 2 5 0 0\ncpu1 560 0 115 2520 5 0 3 5 0 0\nintr 2\n";
    const SELF_A: &str = "42 (my (odd) name) R 1 1 1 0 -1 0 0 0 0 0 300 100 0 0 20 0 4 0 1 1 1";
    const SELF_B: &str = "42 (my (odd) name) R 1 1 1 0 -1 0 0 0 0 0 340 110 0 0 20 0 4 0 1 1 1";

    /// Tick counts are whole numbers: the arithmetic is exact up to f64 rounding.
    const EPS: f64 = 1e-9;

    #[test]
    fn other_processes_cpu_is_the_machines_busy_time_less_ours() {
        let t0 = Instant::now();
        let a = CpuSample::parse(STAT_A, SELF_A, t0).unwrap();
        let b = CpuSample::parse(STAT_B, SELF_B, t0 + Duration::from_secs(1)).unwrap();
        let d = CpuDelta::between(&a, &b);
        assert_eq!(d.cpus, 2);
        assert!((d.other_cores() - 1.0).abs() < EPS, "{}", d.other_cores());
        assert!((d.steal_frac() - 10.0 / 200.0).abs() < EPS, "{}", d.steal_frac());
        // Two such seconds average to the same; a quiet second halves it.
        let mut two = d;
        two.add(&d);
        assert!((two.other_cores() - 1.0).abs() < EPS);
        let quiet = CpuDelta::between(&a, &CpuSample { at: t0 + Duration::from_secs(1), ..a });
        two.add(&quiet);
        assert!((two.other_cores() - 2.0 / 3.0).abs() < EPS, "{}", two.other_cores());
        assert!(CpuSample::parse("intr 1\n", SELF_A, t0).is_none());
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_busy_child_process_shows_as_other_cpu() {
        let mut child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        let (_, d) = watched(|| std::thread::sleep(Duration::from_millis(1500)));
        child.kill().unwrap();
        child.wait().unwrap();
        let d = d.unwrap();
        // The loop runs on an otherwise idle core most of the time; a loaded machine only adds to it.
        assert!(d.other_cores() >= 0.5, "a busy loop beside a sleeping process: {:.2} cores", d.other_cores());
    }
}
