//! SST-2 by a logistic-regression probe on frozen sentence embeddings: a cheap, honest downstream signal
//! for compressed encoders. Train on the first `n_train` rows of `sst2/dev.tsv` (436 by default), score on
//! the rest. Features are standardised with the training statistics; the probe is L2-regularised
//! (λ = 1, bias unpenalised) and fitted by Newton's method to convergence, so the result is deterministic.

use whittle_models::Loaded;

use crate::sts::{embed_all, require_encoder};
use crate::{Error, Metrics, Progress, Result};

/// Training rows taken from the head of the file.
pub const N_TRAIN: usize = 436;
const LAMBDA: f64 = 1.0;
const NEWTON_ITERS: usize = 25;

/// Solves `a x = b` for symmetric positive definite `a` (n×n, row-major) by Cholesky.
fn cholesky_solve(a: &[f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = a[i * n + j] - (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum::<f64>();
            if i == j {
                if s <= 0.0 {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let mut y = vec![0.0; n];
    for i in 0..n {
        y[i] = (b[i] - (0..i).map(|k| l[i * n + k] * y[k]).sum::<f64>()) / l[i * n + i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        x[i] = (y[i] - (i + 1..n).map(|k| l[k * n + i] * x[k]).sum::<f64>()) / l[i * n + i];
    }
    Some(x)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Fits `p(y=1|x) = σ(w·x + b)`; returns the weights with the bias last.
pub fn fit_logistic(x: &[Vec<f64>], y: &[u8]) -> Vec<f64> {
    let d = x[0].len() + 1;
    let mut w = vec![0.0; d];
    for _ in 0..NEWTON_ITERS {
        let mut g = vec![0.0; d];
        let mut h = vec![0.0; d * d];
        for (xi, &yi) in x.iter().zip(y) {
            let z = xi.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + w[d - 1];
            let p = sigmoid(z);
            let r = p - yi as f64;
            let s = p * (1.0 - p);
            for a in 0..d {
                let xa = if a + 1 == d { 1.0 } else { xi[a] };
                g[a] += r * xa;
                for c in 0..=a {
                    let xc = if c + 1 == d { 1.0 } else { xi[c] };
                    h[a * d + c] += s * xa * xc;
                }
            }
        }
        for a in 0..d {
            for c in 0..a {
                h[c * d + a] = h[a * d + c];
            }
            if a + 1 < d {
                g[a] += LAMBDA * w[a];
                h[a * d + a] += LAMBDA;
            } else {
                h[a * d + a] += 1e-9;
            }
        }
        let Some(step) = cholesky_solve(&h, &g, d) else {
            break;
        };
        let norm: f64 = step.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (wi, si) in w.iter_mut().zip(&step) {
            *wi -= si;
        }
        if norm < 1e-10 {
            break;
        }
    }
    w
}

/// Standardises columns with the mean and std of `train`.
fn standardise(train: &mut [Vec<f64>], test: &mut [Vec<f64>]) {
    let d = train[0].len();
    let n = train.len() as f64;
    for j in 0..d {
        let mean = train.iter().map(|r| r[j]).sum::<f64>() / n;
        let sd = (train.iter().map(|r| (r[j] - mean).powi(2)).sum::<f64>() / n).sqrt().max(1e-12);
        for r in train.iter_mut().chain(test.iter_mut()) {
            r[j] = (r[j] - mean) / sd;
        }
    }
}

/// Accuracy (%) of a probe trained on `rows[..n_train]` and scored on the rest.
pub fn classify(
    l: &Loaded,
    rows: &[(String, u8)],
    n_train: usize,
    max_len: usize,
    progress: Progress,
) -> Result<Metrics> {
    require_encoder(l)?;
    if rows.len() <= n_train || n_train < 2 {
        return Err(Error::Usage(format!(
            "classify needs more than {n_train} rows (the first {n_train} train the probe); got {}",
            rows.len()
        )));
    }
    let texts: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let e = embed_all(l, &texts, max_len, progress)?;
    let to64 = |v: &[Vec<f32>]| -> Vec<Vec<f64>> { v.iter().map(|r| r.iter().map(|&x| x as f64).collect()).collect() };
    let (mut tr, mut te) = (to64(&e[..n_train]), to64(&e[n_train..]));
    standardise(&mut tr, &mut te);
    let y: Vec<u8> = rows.iter().map(|r| r.1).collect();
    let w = fit_logistic(&tr, &y[..n_train]);
    let d = w.len();
    let correct = te
        .iter()
        .zip(&y[n_train..])
        .filter(|(x, &yi)| {
            let z = x.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + w[d - 1];
            (z > 0.0) == (yi == 1)
        })
        .count();
    Ok(Metrics {
        task: Some("classify".into()),
        sst2_acc: Some(100.0 * correct as f64 / te.len() as f64),
        items: Some(te.len()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_by_hand() {
        // [[4, 2], [2, 3]] x = [2, 1]  =>  x = [0.5, 0].
        let x = cholesky_solve(&[4.0, 2.0, 2.0, 3.0], &[2.0, 1.0], 2).unwrap();
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1].abs() < 1e-12);
        assert!(cholesky_solve(&[1.0, 2.0, 2.0, 1.0], &[1.0, 1.0], 2).is_none());
    }

    #[test]
    fn probe_separates_separable_data() {
        let x: Vec<Vec<f64>> = (0..40).map(|i| vec![i as f64 - 19.5, ((i * 7) % 5) as f64]).collect();
        let y: Vec<u8> = (0..40).map(|i| (i >= 20) as u8).collect();
        let w = fit_logistic(&x, &y);
        let ok = x.iter().zip(&y).all(|(xi, &yi)| ((xi[0] * w[0] + xi[1] * w[1] + w[2]) > 0.0) == (yi == 1));
        assert!(ok, "{w:?}");
    }
}
