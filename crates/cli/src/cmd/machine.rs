//! `machine`: this machine's limits, measured — streaming read bandwidth, f32 FMA and int8 dot-product
//! throughput — on the kernel pool's threads. `bench` runs `machine --bandwidth --json` in a child process
//! between a decoder's repetitions (so the probe's buffer never counts in the model's peak memory) and
//! reports decoding as a fraction of the bandwidth.

use std::io::Write;

use anyhow::Result;
use serde::Serialize;
use whittle_kernels::peak;

#[derive(clap::Args)]
pub struct Args {
    /// Only the read-bandwidth probe (what `bench` asks for)
    #[arg(long)]
    pub bandwidth: bool,
    /// Bytes the bandwidth probe streams per pass, in MiB (several times the last-level cache)
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=4096))]
    pub mib: u64,
    /// Passes of each probe; the best counts (as STREAM reports)
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub reps: u64,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Limits {
    threads: usize,
    read_gbps: f64,
    read_gbps_1thread: Option<f64>,
    f32_fma_gflops: Option<f64>,
    int8_dot_gops: Option<f64>,
    isa: &'static str,
}

pub fn run(a: &Args) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let pool = whittle_kernels::pool::global(|| threads);
    let (bytes, reps) = ((a.mib as usize) << 20, a.reps as usize);
    let bw = peak::read_gbps(pool, threads, bytes, reps);
    let mut l = Limits {
        threads,
        read_gbps: bw.value,
        read_gbps_1thread: None,
        f32_fma_gflops: None,
        int8_dot_gops: None,
        isa: bw.isa,
    };
    if !a.bandwidth {
        l.read_gbps_1thread = Some(peak::read_gbps(&whittle_kernels::int8::Serial, 1, bytes, reps).value);
        let f = peak::fma_gflops(pool, threads, reps);
        l.f32_fma_gflops = Some(f.value);
        l.isa = f.isa;
        l.int8_dot_gops = peak::vnni_gops(pool, threads, reps).map(|p| p.value);
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&l)?)?;
        return Ok(());
    }
    writeln!(out, "threads            {}", l.threads)?;
    writeln!(out, "read bandwidth     {:.1} GB/s (best of {reps} passes over {} MiB)", l.read_gbps, a.mib)?;
    if let Some(v) = l.read_gbps_1thread {
        writeln!(out, "  one thread       {v:.1} GB/s")?;
    }
    if let Some(v) = l.f32_fma_gflops {
        writeln!(out, "f32 FMA            {v:.1} GFLOP/s ({})", l.isa)?;
    }
    if let Some(v) = l.int8_dot_gops {
        writeln!(out, "int8 dot product   {v:.1} GOP/s (avx512-vnni)")?;
    }
    Ok(())
}
