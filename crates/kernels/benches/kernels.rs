//! `cargo bench -p whittle-kernels`: first the machine's limits (streaming read bandwidth, f32 FMA and int8
//! VNNI throughput, measured by `whittle_kernels::peak` on the same thread pool the models use); then
//! GFLOP/s (GOP/s for int8) of the Linear kernels at the shapes of all-MiniLM-L6-v2 (batch of 32 sentences
//! ≈ 960 rows; batch 1 ≈ 16 rows) and SmolLM2 decoding (1 row), median of several runs, each beside the
//! peak it is bound by; the decode-shaped (1-row) products over 48 distinct matrices so the weights come
//! from memory as they do when a model decodes, in GB/s of weights read beside the bandwidth. Then the
//! sparse f32 kernel against the dense one on 50%-sparse weights (2:4 and unstructured).

use std::time::Instant;

use whittle_kernels::block::{self, BlockWeights, PackedBlock};
use whittle_kernels::f32::{self as kf32, PackedF32};
use whittle_kernels::half::{self as khalf, Half, HalfWeights};
use whittle_kernels::int8::{self, PackedI8};
use whittle_kernels::peak;
use whittle_kernels::pool::Pool;
use whittle_kernels::sparse::{self, PackedSparse};
use whittle_kernels::Isa;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    // `cargo bench -p whittle-kernels -- half`: only the half-precision comparison.
    if std::env::args().any(|a| a == "half") {
        return half_vs_f32();
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = Pool::new(threads);
    let bw1 = peak::read_gbps(&int8::Serial, 1, 256 << 20, 5);
    let bw = peak::read_gbps(&pool, threads, 256 << 20, 5);
    let fma = peak::fma_gflops(&pool, threads, 5);
    let vnni = peak::vnni_gops(&pool, threads, 5);
    println!("machine limits ({threads} threads, best of 5):");
    println!("  read bandwidth   {:>7.1} GB/s ({} thread: {:.1} GB/s; {})", bw.value, 1, bw1.value, bw.isa);
    println!("  f32 FMA          {:>7.1} GFLOP/s ({})", fma.value, fma.isa);
    if let Some(v) = vnni {
        println!("  int8 dot product {:>7.1} GOP/s ({})", v.value, v.isa);
    }
    let ipeak = vnni.map_or(fma.value, |v| v.value);
    println!();

    // Batched shapes are compute-bound: each kernel beside its compute peak.
    let shapes = [(960, 384, 384), (960, 1536, 384), (960, 384, 1536), (16, 1536, 384)];
    println!(
        "{:>5} {:>5} {:>5} | {:>12} {:>7} | {:>11} {:>7} | {:>14}",
        "n", "m", "k", "f32 GFLOP/s", "% peak", "int8 GOP/s", "% peak", "int8 ref GOP/s"
    );
    for (n, m, k) in shapes {
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut y = vec![0f32; n * m];
        let ops = 2.0 * (n * m * k) as f64;
        let pf = PackedF32::new(&w, m, k);
        let tf = time(9, || kf32::gemm(&pf, &x, n, None, whittle_kernels::as_uninit(&mut y), &pool));
        let pi = PackedI8::from_f32(&w, m, k);
        let ti = time(9, || int8::linear_w8a8(&pi, &x, n, None, &mut y, Isa::detect(), &pool));
        let tr = if n * m * k <= 16 * 1536 * 384 {
            Some(time(3, || int8::linear_w8a8(&pi, &x, n, None, &mut y, Isa::Ref, &pool)))
        } else {
            None
        };
        let (gf, gi) = (ops / tf / 1e9, ops / ti / 1e9);
        println!(
            "{n:>5} {m:>5} {k:>5} | {gf:>12.1} {:>6.0}% | {gi:>11.1} {:>6.0}% | {:>14}",
            100.0 * gf / fma.value,
            100.0 * gi / ipeak,
            tr.map_or("-".into(), |t| format!("{:.1}", ops / t / 1e9))
        );
    }
    println!();

    // Decode-shaped products are bandwidth-bound: GB/s of weights (as held in memory) beside the bandwidth.
    // Enough distinct matrices per format that their bytes are 8× the last-level cache (256 MiB).
    const STREAM: usize = 256 << 20;
    println!("1-row products over distinct matrices ({} MiB per cell, weights from memory); GB/s of weights read, % of {:.1} GB/s", STREAM >> 20, bw.value);
    println!(
        "{:>5} {:>5} | {:>16} | {:>16} | {:>16} | {:>18}",
        "m", "k", "f32", "int8 (w8a8)", "q8_0 blocks", "q4_k (q4_1) blocks"
    );
    for (m, k) in [(1536, 576), (576, 1536), (576, 576)] {
        let x: Vec<f32> = (0..k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut y = vec![0f32; m];
        let copies = |bytes_each: usize| STREAM.div_ceil(bytes_each);
        let cell = |bytes: usize, t: f64| {
            let g = bytes as f64 / t / 1e9;
            format!("{g:>7.1} ({:>4.0}%)", 100.0 * g / bw.value)
        };
        let pf: Vec<PackedF32> = (0..copies(m * k * 4))
            .map(|c| {
                PackedF32::new(
                    &(0..m * k).map(|i| (((i + 31 * c) * 7919) % 1000) as f32 / 1000.0 - 0.5).collect::<Vec<_>>(),
                    m,
                    k,
                )
            })
            .collect();
        let tf =
            time(15, || pf.iter().for_each(|p| kf32::gemm(p, &x, 1, None, whittle_kernels::as_uninit(&mut y), &pool)));
        let f32_cell = cell(pf.len() * m * k * 4, tf);
        drop(pf);
        let pi: Vec<PackedI8> = (0..copies(m * k))
            .map(|c| {
                let q = (0..m * k).map(|i| (((i + 7 * c) * 2654435761usize) % 255) as i8).collect();
                PackedI8::new(q, (0..m).map(|r| 1e-3 * (1 + r % 7) as f32).collect(), m, k)
            })
            .collect();
        let ti = time(15, || pi.iter().for_each(|p| int8::linear_w8a8(p, &x, 1, None, &mut y, Isa::detect(), &pool)));
        let int8_cell = cell(pi.iter().map(PackedI8::stored_bytes).sum(), ti);
        drop(pi);
        let blocks = |sb: usize, levels: u32, with_min: bool, act_block: usize| -> Vec<PackedBlock> {
            let mut v: Vec<PackedBlock> = Vec::new();
            let mut bytes = 0;
            for c in 0.. {
                if bytes >= STREAM {
                    break;
                }
                let w = BlockWeights {
                    m,
                    k,
                    sb,
                    q: (0..m * k).map(|i| (((i + 7 * c) * 2654435761usize) % levels as usize) as u8).collect(),
                    scale: (0..m * k / sb).map(|i| 1e-3 * (1 + i % 7) as f32).collect(),
                    min: with_min.then(|| (0..m * k / sb).map(|i| 1e-4 * (i % 5) as f32).collect()),
                    off: if with_min { 0 } else { -128 },
                    act_block,
                };
                v.push(PackedBlock::new(&w).expect("valid block weights"));
                bytes += v[c].resident_bytes();
            }
            v
        };
        let block_cell = |pb: Vec<PackedBlock>| {
            let isa = Isa::detect();
            let t = time(15, || {
                pb.iter().for_each(|p| {
                    let a = block::quantize_acts(&x, 1, k, p.act_block, isa, &pool);
                    block::gemm(p, &a, None, whittle_kernels::as_uninit(&mut vec![0f32; m]), isa, &pool)
                })
            });
            cell(pb.iter().map(PackedBlock::resident_bytes).sum(), t)
        };
        let q8 = block_cell(blocks(32, 256, false, 32));
        // Q4_K needs k a multiple of 256 (llama.cpp falls back to 32-blocks otherwise, as here: Q4_1's layout).
        let q4 = block_cell(blocks(32, 16, true, if k % 256 == 0 { 256 } else { 32 }));
        println!("{m:>5} {k:>5} | {f32_cell:>16} | {int8_cell:>16} | {q8:>16} | {q4:>18}");
    }

    println!();
    println!(
        "{:>5} {:>5} {:>5} {:>12} | {:>8} {:>9} {:>14}",
        "n", "m", "k", "pattern", "dense ms", "sparse ms", "sparse/dense"
    );
    for (n, m, k) in [(512, 1536, 576), (512, 576, 1536), (1, 1536, 576), (1, 576, 1536)] {
        let copies = if n == 1 { 48 } else { 1 };
        for pattern in ["2:4", "unstructured"] {
            let ws: Vec<Vec<f32>> = (0..copies)
                .map(|c| {
                    (0..m * k)
                        .map(|i| {
                            let h = (i + c * 31usize).wrapping_mul(2654435761) % 1000;
                            let keep = if pattern == "2:4" { (i % 4 + c) % 4 < 2 } else { h.is_multiple_of(2) };
                            if keep {
                                (h as f32) / 1000.0 - 0.5
                            } else {
                                0.0
                            }
                        })
                        .collect()
                })
                .collect();
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
            let mut y = vec![0f32; n * m];
            let dense: Vec<PackedF32> = ws.iter().map(|w| PackedF32::new(w, m, k)).collect();
            let sp: Vec<PackedSparse> = ws.iter().map(|w| PackedSparse::new(w, m, k)).collect();
            let reps = if n == 1 { 31 } else { 9 };
            let td = time(reps, || {
                dense.iter().for_each(|p| kf32::gemm(p, &x, n, None, whittle_kernels::as_uninit(&mut y), &pool))
            });
            let ts = time(reps, || {
                sp.iter().for_each(|p| sparse::gemm(p, &x, n, None, whittle_kernels::as_uninit(&mut y), &pool))
            });
            println!(
                "{n:>5} {m:>5} {k:>5} {pattern:>12} | {:>8.3} {:>9.3} {:>14.2}",
                td * 1e3 / copies as f64,
                ts * 1e3 / copies as f64,
                ts / td
            );
        }
    }

    half_vs_f32();
}

/// The half kernel against the packed f32 kernel on the same weights, on whittle's pool: decoding (1 row,
/// 48 distinct matrices so weights stream from memory, GB/s of weights read) and prefill (512 rows, GFLOP/s).
fn half_vs_f32() {
    struct P;
    impl int8::Parallel for P {
        fn for_each(&self, n: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
            whittle_kernels::pool::global(|| std::thread::available_parallelism().map_or(1, |c| c.get())).run(n, f)
        }
    }
    println!();
    println!(
        "{:>5} {:>5} {:>5} | {:>10} {:>10} {:>10} | {:>10} {:>10}",
        "n", "m", "k", "f32", "f16", "bf16", "f32 GB/s", "f16 GB/s"
    );
    for (n, m, k) in
        [(1, 1536, 576), (1, 576, 1536), (1, 49152, 576), (512, 1536, 576), (512, 576, 1536), (512, 192, 576)]
    {
        let copies = if n == 1 && std::env::var_os("HOT").is_none() { (48 * 1536 * 576 / (m * k)).max(2) } else { 1 };
        let ws: Vec<Vec<f32>> = (0..copies)
            .map(|c| (0..m * k).map(|i| ((i + c * 31) * 7919 % 1000) as f32 / 1000.0 - 0.5).collect())
            .collect();
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut y = vec![0f32; n * m];
        let dense: Vec<PackedF32> = ws.iter().map(|w| PackedF32::new(w, m, k)).collect();
        let h: Vec<Vec<u16>> = ws.iter().map(|w| w.iter().map(|&v| Half::F16.from_f32(v)).collect()).collect();
        let b: Vec<Vec<u16>> = ws.iter().map(|w| w.iter().map(|&v| Half::Bf16.from_f32(v)).collect()).collect();
        let reps = if n == 1 { 31 } else { 9 };
        let tf = time(reps, || {
            dense.iter().for_each(|p| kf32::gemm(p, &x, n, None, whittle_kernels::as_uninit(&mut y), &P))
        });
        let run = |hs: &Vec<Vec<u16>>, kind, y: &mut Vec<f32>| {
            time(reps, || {
                hs.iter().for_each(|d| {
                    khalf::gemm(&HalfWeights { kind, m, k, data: d }, &x, n, None, whittle_kernels::as_uninit(y), &P)
                })
            })
        };
        let th = run(&h, Half::F16, &mut y);
        let tb = run(&b, Half::Bf16, &mut y);
        let per = |t: f64| t / copies as f64;
        let unit = |t: f64| if n == 1 { per(t) * 1e6 } else { 2.0 * (n * m * k) as f64 / per(t) / 1e9 };
        println!(
            "{n:>5} {m:>5} {k:>5} | {:>10.1} {:>10.1} {:>10.1} | {:>10.1} {:>10.1}   ({})",
            unit(tf),
            unit(th),
            unit(tb),
            (4 * m * k) as f64 / per(tf) / 1e9,
            (2 * m * k) as f64 / per(th) / 1e9,
            if n == 1 { "µs per matrix" } else { "GFLOP/s" }
        );
    }
}
