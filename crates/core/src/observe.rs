//! Activation statistics of a Linear's input, gathered while calibration text runs through the model: what
//! static quantization (range observers), SmoothQuant (per-channel max |x|), importance matrices (per-channel
//! mean x²) and output-error reports need.

/// Bins of the signed histogram.
const BINS: usize = 8192;
/// Rows kept to measure a quantized layer's output error.
const SAMPLE_ROWS: usize = 256;

/// Statistics of one Linear input (rows of `k` features).
#[derive(Debug, Clone)]
pub struct ActStats {
    pub k: usize,
    pub rows: usize,
    /// max |x| per input channel.
    pub absmax: Vec<f32>,
    /// Σ x² per input channel.
    pub sumsq: Vec<f64>,
    pub min: f32,
    pub max: f32,
    /// Histogram of x over [-range, range), 8192 bins; the range doubles (merging bin pairs) when exceeded.
    pub hist: Vec<u64>,
    pub range: f32,
    /// The first rows seen (up to 256), for output-error reports and AWQ's scale search.
    pub sample: Vec<f32>,
    /// Set when an input held NaN or Inf.
    pub non_finite: bool,
    /// Σ xᵀx (k × k, row-major), when asked for ([`ActStats::hessian`]): GPTQ's and SVD-LLM's statistic.
    /// `Some` of an empty vector ([`ActStats::channels`]) gathers the per-channel statistics alone.
    /// Only the per-channel statistics and this are gathered then (no histogram, no samples).
    pub xtx: Option<Vec<f64>>,
}

impl ActStats {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            rows: 0,
            absmax: vec![0.0; k],
            sumsq: vec![0.0; k],
            min: 0.0,
            max: 0.0,
            hist: vec![0; BINS],
            range: 0.0,
            sample: Vec::new(),
            non_finite: false,
            xtx: None,
        }
    }

    /// Only the per-channel statistics (max |x|, Σ x²): no histogram, no samples (Wanda, importance).
    pub fn channels(k: usize) -> Self {
        Self { xtx: Some(Vec::new()), ..Self::new(k) }
    }

    /// Statistics that accumulate Σ xᵀx (and per-channel max |x|, Σ x²), skipping histograms and samples.
    pub fn hessian(k: usize) -> Self {
        Self { xtx: Some(vec![0.0; k * k]), ..Self::new(k) }
    }

    /// H = 2·Σ xᵀx / rows (GPTQ's Hessian of the layer's squared output error).
    pub fn mean_hessian(&self) -> Option<Vec<f64>> {
        let n = self.rows.max(1) as f64;
        self.xtx.as_ref().filter(|x| !x.is_empty()).map(|x| x.iter().map(|v| 2.0 * v / n).collect())
    }

    /// Adds several inputs at once (each rows × k, row-major): with Σ xᵀx, one f32 accumulation over all of
    /// them before the f64 total (what the layer-wise engine uses, a few windows per call).
    pub fn observe_many(&mut self, parts: &[&[f32]]) {
        match self.xtx.as_ref() {
            Some(acc) if !acc.is_empty() => {}
            _ => return parts.iter().for_each(|x| self.observe(x)),
        }
        let k = self.k;
        use rayon::prelude::*;
        if parts.par_iter().any(|x| x.iter().any(|v| !v.is_finite())) {
            self.non_finite = true;
            return;
        }
        let acc = self.xtx.as_mut().expect("checked above");
        let diag0: Vec<f64> = (0..k).map(|j| acc[j * k + j]).collect();
        xtx_add(parts, k, acc);
        let absmax = parts
            .par_iter()
            .map(|x| {
                let mut m = vec![0f32; k];
                for row in x.chunks_exact(k) {
                    for (a, &v) in m.iter_mut().zip(row) {
                        *a = a.max(v.abs());
                    }
                }
                m
            })
            .reduce(|| vec![0f32; k], |a, b| a.iter().zip(&b).map(|(x, y)| x.max(*y)).collect());
        for (a, m) in self.absmax.iter_mut().zip(absmax) {
            *a = a.max(m);
        }
        self.rows += parts.iter().map(|x| x.len() / k).sum::<usize>();
        // Σ x² per channel: what these parts added to the diagonal of Σ xᵀx.
        for j in 0..k {
            self.sumsq[j] += acc[j * k + j] - diag0[j];
        }
    }

    /// Adds `x` (rows × k, row-major).
    pub fn observe(&mut self, x: &[f32]) {
        let k = self.k;
        if matches!(self.xtx.as_ref(), Some(acc) if !acc.is_empty()) {
            return self.observe_many(&[x]);
        }
        if x.iter().any(|v| !v.is_finite()) {
            self.non_finite = true;
            return;
        }
        if self.xtx.is_some() {
            // Per-channel statistics alone (all that `channels` gathers).
            for row in x.chunks_exact(k) {
                for (j, &v) in row.iter().enumerate() {
                    self.absmax[j] = self.absmax[j].max(v.abs());
                    self.sumsq[j] += (v as f64) * (v as f64);
                }
            }
            self.rows += x.len() / k;
            return;
        }
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        if amax > 0.0 && self.range == 0.0 {
            self.range = amax;
        }
        while amax >= self.range && self.range > 0.0 {
            self.grow();
        }
        // Sample rows spread over the batches: up to 32 per call, evenly strided (row 0 included).
        let stride = (x.len() / k / 32).max(1);
        for (ri, row) in x.chunks_exact(k).enumerate() {
            if ri % stride == 0 && self.sample.len() < SAMPLE_ROWS * k {
                self.sample.extend_from_slice(row);
            }
            for (j, &v) in row.iter().enumerate() {
                self.absmax[j] = self.absmax[j].max(v.abs());
                self.sumsq[j] += (v as f64) * (v as f64);
                self.min = self.min.min(v);
                self.max = self.max.max(v);
                if self.range > 0.0 {
                    let b = (((v / self.range) + 1.0) * 0.5 * BINS as f32) as usize;
                    self.hist[b.min(BINS - 1)] += 1;
                }
            }
        }
        self.rows += x.len() / k;
    }

    /// Doubles the histogram's range: bin pairs merge toward the centre.
    fn grow(&mut self) {
        let mut h = vec![0u64; BINS];
        for (i, &c) in self.hist.iter().enumerate() {
            // value at bin i in [-R, R) maps to [-2R, 2R): new index = BINS/4 + i/2
            h[BINS / 4 + i / 2] += c;
        }
        self.hist = h;
        self.range *= 2.0;
    }

    /// Centre value of histogram bin `i`.
    fn bin_value(&self, i: usize) -> f32 {
        ((i as f32 + 0.5) / BINS as f32 * 2.0 - 1.0) * self.range
    }

    /// The value below which a fraction `q` of the observed values lie (from the histogram).
    pub fn quantile(&self, q: f64) -> f32 {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let target = (q * total as f64).ceil() as u64;
        let mut acc = 0;
        for (i, &c) in self.hist.iter().enumerate() {
            acc += c;
            if acc >= target.max(1) {
                return self.bin_value(i);
            }
        }
        self.max
    }

    /// Mean x² per channel (llama.cpp's importance matrix).
    pub fn mean_sq(&self) -> Vec<f32> {
        self.sumsq.iter().map(|s| (s / self.rows.max(1) as f64) as f32).collect()
    }

    /// Expected squared error of quantizing the histogram's values to 8-bit codes over [lo, hi]: rounding
    /// error inside, clipping error outside.
    pub fn quant_mse(&self, lo: f32, hi: f32) -> f64 {
        let step = ((hi - lo) / 255.0).max(f32::MIN_POSITIVE) as f64;
        let mut se = 0f64;
        let mut n = 0u64;
        for (i, &c) in self.hist.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let v = self.bin_value(i) as f64;
            let e = if v < lo as f64 {
                (lo as f64 - v).powi(2)
            } else if v > hi as f64 {
                (v - hi as f64).powi(2)
            } else {
                step * step / 12.0
            };
            se += e * c as f64;
            n += c;
        }
        se / n.max(1) as f64
    }

    /// TensorRT's entropy calibration on |x|: the threshold T whose 128-level quantization of the clipped
    /// distribution has the least KL divergence from it.
    pub fn entropy_threshold(&self) -> f32 {
        // |x| histogram: fold the signed one.
        let half = BINS / 2;
        let mut mag = vec![0f64; half];
        for (i, &c) in self.hist.iter().enumerate() {
            let j = if i >= half { i - half } else { half - 1 - i };
            mag[j] += c as f64;
        }
        let levels = 128;
        let mut best = (f64::INFINITY, half);
        let mut i = levels;
        while i <= half {
            // Reference: first i bins, the tail folded into the last one.
            let mut p: Vec<f64> = mag[..i].to_vec();
            p[i - 1] += mag[i..].iter().sum::<f64>();
            // Candidate: the i bins merged into `levels` groups, each spread back over its non-empty bins.
            let mut q = vec![0f64; i];
            for g in 0..levels {
                let (a, b) = (g * i / levels, ((g + 1) * i / levels).max(g * i / levels + 1));
                let sum: f64 = mag[a..b].iter().sum();
                let nz = mag[a..b].iter().filter(|&&v| v > 0.0).count();
                if nz > 0 {
                    for j in a..b {
                        if mag[j] > 0.0 {
                            q[j] = sum / nz as f64;
                        }
                    }
                }
            }
            if let (Some(p), Some(q)) = (smooth(&p), smooth(&q)) {
                let kl: f64 = p.iter().zip(&q).filter(|(a, _)| **a > 0.0).map(|(a, b)| a * (a / b).ln()).sum();
                if kl < best.0 {
                    best = (kl, i);
                }
            }
            i += 16;
        }
        best.1 as f32 / half as f32 * self.range
    }
}

/// Normalises `v` and gives its zero entries a small mass taken from the others (the reference entropy
/// calibration's smoothing, eps = 1e-4), so the KL divergence stays finite.
/// `acc += Σ xᵀx` (k × k, row-major, f64) over `parts` (each rows × k, row-major): the lower triangle by
/// faer's triangular GEMM in f32 (half the work of a full product; the parts summed in f32), added to both
/// triangles of `acc` tile by tile.
fn xtx_add(parts: &[&[f32]], k: usize, acc: &mut [f64]) {
    use faer::linalg::matmul::triangular::{matmul, BlockStructure};
    let mut low = vec![0f32; k * k];
    let par = faer::Par::rayon(rayon::current_num_threads());
    for (i, x) in parts.iter().enumerate() {
        let xm = faer::MatRef::from_row_major_slice(x, x.len() / k, k);
        let dst = faer::MatMut::from_row_major_slice_mut(&mut low, k, k);
        let how = if i == 0 { faer::Accum::Replace } else { faer::Accum::Add };
        matmul(
            dst,
            BlockStructure::TriangularLower,
            how,
            xm.transpose(),
            BlockStructure::Rectangular,
            xm,
            BlockStructure::Rectangular,
            1.0f32,
            par,
        );
    }
    const T: usize = 32;
    for i0 in (0..k).step_by(T) {
        for j0 in (0..=i0).step_by(T) {
            for i in i0..(i0 + T).min(k) {
                for j in j0..(j0 + T).min(i + 1) {
                    let v = low[i * k + j] as f64;
                    acc[i * k + j] += v;
                    if j != i {
                        acc[j * k + i] += v;
                    }
                }
            }
        }
    }
}

fn smooth(v: &[f64]) -> Option<Vec<f64>> {
    const EPS: f64 = 1e-4;
    let total: f64 = v.iter().sum();
    let nz = v.iter().filter(|&&x| x > 0.0).count();
    if total <= 0.0 || nz == 0 {
        return None;
    }
    let zeros = v.len() - nz;
    let take = EPS * zeros as f64 / nz as f64;
    if take >= 1.0 / nz as f64 {
        return None;
    }
    Some(v.iter().map(|&x| if x > 0.0 { x / total - take } else { EPS }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_histogram_and_observers() {
        let mut s = ActStats::new(4);
        // Two batches, the second wider: the histogram range grows.
        s.observe(&[0.1, -0.2, 0.3, 0.0, 0.2, -0.1, 0.05, 0.01]);
        s.observe(&[1.0, -2.0, 0.5, 0.25]);
        assert_eq!(s.rows, 3);
        assert_eq!(s.absmax, vec![1.0, 2.0, 0.5, 0.25]);
        assert!((s.min + 2.0).abs() < 1e-6 && (s.max - 1.0).abs() < 1e-6);
        assert_eq!(s.hist.iter().sum::<u64>(), 12);
        assert!(s.range >= 2.0);
        assert!((s.mean_sq()[1] - (0.04 + 0.01 + 4.0) / 3.0).abs() < 1e-6);
        assert!(s.quantile(1.0) > 0.9 && s.quantile(0.0) < -1.9);
        // Clipping everything costs more than covering the range.
        assert!(s.quant_mse(-2.0, 1.0) < s.quant_mse(-0.1, 0.1));
        let mut bad = ActStats::new(2);
        bad.observe(&[f32::NAN, 1.0]);
        assert!(bad.non_finite);
    }

    #[test]
    fn entropy_clips_a_long_tail() {
        let mut s = ActStats::new(1);
        // A triangular bulk on ±2 (exact quantiles) and a few huge outliers.
        let n = 50000;
        let mut v: Vec<f32> = (0..n)
            .map(|i| {
                let t = 2.0 * (i as f32 + 0.5) / n as f32 - 1.0;
                2.0 * t.signum() * (1.0 - (1.0 - t.abs()).sqrt())
            })
            .collect();
        v.extend([50.0, -40.0, 45.0]);
        s.observe(&v);
        let t = s.entropy_threshold();
        assert!(t > 0.5 && t < 25.0, "{t}");
    }
}
