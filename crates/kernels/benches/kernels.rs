//! `cargo bench -p whittle-kernels`: GFLOP/s (GOP/s for int8) of the Linear kernels at the shapes of
//! all-MiniLM-L6-v2 (batch of 32 sentences ≈ 960 rows; batch 1 ≈ 16 rows) and SmolLM2 decoding (1 row),
//! median of several runs, against the scalar reference where it is cheap enough to time. Then the sparse
//! f32 kernel against the dense one on 50%-sparse weights (2:4 and unstructured), over 48 distinct
//! matrices at batch 1 so the weights come from memory as they do when a model decodes.

use std::time::Instant;

use whittle_kernels::f32::{self as kf32, PackedF32};
use whittle_kernels::half::{self as khalf, Half, HalfWeights};
use whittle_kernels::int8::{self, PackedI8, Rayon};
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
    let shapes = [(960, 384, 384), (960, 1536, 384), (960, 384, 1536), (16, 1536, 384), (1, 1536, 576), (1, 576, 1536)];
    println!("{:>5} {:>5} {:>5} | {:>12} {:>14} {:>14}", "n", "m", "k", "f32 GFLOP/s", "int8 GOP/s", "int8 ref GOP/s");
    for (n, m, k) in shapes {
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut y = vec![0f32; n * m];
        let ops = 2.0 * (n * m * k) as f64;
        let pf = PackedF32::new(&w, m, k);
        let tf = time(9, || kf32::gemm(&pf, &x, n, None, whittle_kernels::as_uninit(&mut y), &Rayon));
        let pi = PackedI8::from_f32(&w, m, k);
        let ti = time(9, || int8::linear_w8a8(&pi, &x, n, None, &mut y, Isa::detect(), &Rayon));
        let tr = if n * m * k <= 16 * 1536 * 384 {
            Some(time(3, || int8::linear_w8a8(&pi, &x, n, None, &mut y, Isa::Ref, &Rayon)))
        } else {
            None
        };
        println!(
            "{n:>5} {m:>5} {k:>5} | {:>12.1} {:>14.1} {:>14}",
            ops / tf / 1e9,
            ops / ti / 1e9,
            tr.map_or("-".into(), |t| format!("{:.1}", ops / t / 1e9))
        );
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
                dense.iter().for_each(|p| kf32::gemm(p, &x, n, None, whittle_kernels::as_uninit(&mut y), &Rayon))
            });
            let ts = time(reps, || {
                sp.iter().for_each(|p| sparse::gemm(p, &x, n, None, whittle_kernels::as_uninit(&mut y), &Rayon))
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
