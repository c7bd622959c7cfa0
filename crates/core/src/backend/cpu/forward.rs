//! The CPU forward of every [`LinearWeight`]: whittle's f32, sparse, int8 and block kernels where the CPU
//! has them, candle's matmul otherwise. The kernel implementation and activation blocks come from each
//! layer's [`Dispatch`] (its model's run configuration).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use whittle_kernels::block::{BlockActs, PackedBlock};
use whittle_kernels::f32::PackedF32;
use whittle_kernels::half::HalfWeights;
use whittle_kernels::int8::{quantize_activations, PackedI8};

use super::{with_f32_slice, with_half_slice, KernelPool};
use crate::linear::{Linear, LinearWeight};
use crate::run::Dispatch;
use crate::Result;

impl Linear {
    /// Several Linears on the same input (q/k/v, gate/up): int8 layers share one quantization of `x`.
    ///
    /// # Shapes
    /// - `x`: (..., in_features); returns one (..., out_features_i) per layer
    pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        if layers.iter().any(|l| l.observer.is_some()) {
            return layers.iter().map(|l| l.forward(x)).collect();
        }
        let in_f = *x.dims().last().unwrap_or(&0);
        let d0 = match layers.first() {
            Some(l) => l.dispatch,
            None => return Ok(Vec::new()),
        };
        let ab = layers.first().and_then(|l| l.act_block());
        let all_block = layers.iter().all(|l| l.act_block().is_some() && l.act_block() == ab && l.in_features == in_f);
        if let (true, true, Some(ab)) = (all_block, layers.len() >= 2, ab) {
            let dims = x.dims().to_vec();
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let acts = with_f32_slice(&x.reshape((rows, in_f))?, |xs| {
                whittle_kernels::block::quantize_acts(xs, rows, in_f, ab, d0.block_isa(), &KernelPool)
            })?;
            return layers.iter().map(|l| l.block_forward(&acts, &dims, x.device())).collect();
        }
        let int8: Vec<&Arc<PackedI8>> = layers
            .iter()
            .filter_map(|l| if let LinearWeight::Int8Dynamic(p) = &l.weight { Some(p) } else { None })
            .collect();
        if int8.len() != layers.len() || layers.len() < 2 || layers.iter().any(|l| l.in_features != in_f) {
            return layers.iter().map(|l| l.forward(x)).collect();
        }
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let kp = int8[0].kp;
        let xa = with_f32_slice(&x.reshape((rows, in_f))?, |xs| {
            whittle_kernels::int8::quantize_activations(xs, rows, in_f, kp, &KernelPool)
        })?;
        let mut out = Vec::with_capacity(layers.len());
        for (l, p) in layers.iter().zip(int8) {
            let bias: Option<Vec<f32>> = match &l.bias {
                Some(b) => Some(b.to_vec1()?),
                None => None,
            };
            let y = whittle_kernels::filled(rows * l.out_features, |y| {
                whittle_kernels::int8::gemm(p, &xa, rows, bias.as_deref(), y, l.dispatch.isa, &KernelPool)
            });
            let mut od = dims.clone();
            *od.last_mut().unwrap() = l.out_features;
            out.push(Tensor::from_vec(y, od, x.device())?);
        }
        Ok(out)
    }

    /// `y = x · Wᵀ + b`.
    ///
    /// # Shapes
    /// - `x`: (..., in_features), f32
    /// - returns (..., out_features), f32
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_f = *dims.last().unwrap_or(&0);
        if in_f != self.in_features {
            return Err(crate::Error::Linear {
                name: String::new(),
                msg: format!("input has {in_f} features, layer expects {}", self.in_features),
            });
        }
        let rows: usize = dims[..dims.len() - 1].iter().product();
        self.record(x)?;
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_features;
        let x2 = x.reshape((rows, in_f))?; // (N, in)
        let float_block = matches!(self.weight, LinearWeight::Block(_)) && self.dispatch.float_activations;
        let y = match &self.weight {
            LinearWeight::Dense(w) if w.dtype() == DType::F32 && PackedF32::available() && x.device().is_cpu() => {
                self.f32_gemm(|| Ok(w.flatten_all()?.to_vec1()?), &x2, rows)?
            }
            // `float_activations`: the block weights dequantized to f32 once, against f32 activations.
            LinearWeight::Block(_) if float_block && PackedF32::available() && x.device().is_cpu() => {
                self.f32_gemm(|| Ok(self.dequantize()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?), &x2, rows)?
            }
            LinearWeight::Block(_) if float_block => {
                let y = x2.matmul(&self.dequantize()?.to_dtype(DType::F32)?.to_device(x.device())?.t()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            LinearWeight::Dense(w) if matches!(w.dtype(), DType::F16 | DType::BF16) && x.device().is_cpu() => {
                // Kept 16-bit: widened on the fly by the half kernel (never copied to f32).
                let bias: Option<Vec<f32>> = match &self.bias {
                    Some(b) => Some(b.to_vec1()?),
                    None => None,
                };
                let y = with_half_slice(w, |kind, data| {
                    let hw = HalfWeights { kind, m: self.out_features, k: self.in_features, data };
                    with_f32_slice(&x2, |xs| {
                        whittle_kernels::filled(rows * self.out_features, |y| {
                            whittle_kernels::half::gemm(&hw, xs, rows, bias.as_deref(), y, &KernelPool)
                        })
                    })
                })?
                .expect("a CPU f16/bf16 tensor")?;
                Tensor::from_vec(y, (rows, self.out_features), x.device())?
            }
            LinearWeight::Sparse(s) if whittle_kernels::sparse::PackedSparse::available() && x.device().is_cpu() => {
                let bias: Option<Vec<f32>> = match &self.bias {
                    Some(b) => Some(b.to_vec1()?),
                    None => None,
                };
                let y = with_f32_slice(&x2, |xs| {
                    whittle_kernels::filled(rows * self.out_features, |y| {
                        whittle_kernels::sparse::gemm(&s.packed, xs, rows, bias.as_deref(), y, &KernelPool)
                    })
                })?;
                Tensor::from_vec(y, (rows, self.out_features), x.device())?
            }
            LinearWeight::LowRank(lr) => {
                let h = lr.v.forward(&x2)?;
                return Ok(lr.u.forward(&h)?.reshape(out_dims)?);
            }
            LinearWeight::Sparse(_) => {
                let y = x2.matmul(&self.dequantize()?.to_device(x.device())?.t()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            LinearWeight::Dense(w) => {
                let w = if w.dtype() == DType::F32 { w.clone() } else { w.to_dtype(DType::F32)? };
                let y = x2.matmul(&w.t()?)?; // (N, out)
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            LinearWeight::Block(b) => {
                let ab = act_block_for(&b.packed, self.dispatch);
                let acts = with_f32_slice(&x2, |xs| {
                    whittle_kernels::block::quantize_acts(xs, rows, in_f, ab, self.dispatch.block_isa(), &KernelPool)
                })?;
                return self.block_forward(&acts, x.dims(), x.device());
            }
            LinearWeight::Int8Static { p, scale, zero } => {
                let bias: Option<Vec<f32>> = match &self.bias {
                    Some(b) => Some(b.to_vec1()?),
                    None => None,
                };
                let y = with_f32_slice(&x2, |xs| {
                    let xa = whittle_kernels::int8::quantize_activations_static(xs, rows, p.k, p.kp, *scale, *zero);
                    whittle_kernels::filled(rows * self.out_features, |y| {
                        whittle_kernels::int8::gemm(p, &xa, rows, bias.as_deref(), y, self.dispatch.isa, &KernelPool)
                    })
                })?;
                Tensor::from_vec(y, (rows, self.out_features), x.device())?
            }
            LinearWeight::Int8Dynamic(p) => {
                let bias: Option<Vec<f32>> = match &self.bias {
                    Some(b) => Some(b.to_vec1()?),
                    None => None,
                };
                let y = with_f32_slice(&x2, |xs| {
                    let xa = quantize_activations(xs, rows, p.k, p.kp, &KernelPool);
                    whittle_kernels::filled(rows * self.out_features, |y| {
                        whittle_kernels::int8::gemm(p, &xa, rows, bias.as_deref(), y, self.dispatch.isa, &KernelPool)
                    })
                })?;
                Tensor::from_vec(y, (rows, self.out_features), x.device())?
            }
        };
        Ok(y.reshape(out_dims)?)
    }
}

/// The activation block a block layer quantizes its input with: the format's, or 32 with fine activations.
fn act_block_for(p: &PackedBlock, d: Dispatch) -> usize {
    if d.fine_activations {
        32
    } else {
        p.act_block
    }
}

impl Linear {
    /// The activation block a block layer quantizes its input with (`None`: not a block layer, or one run
    /// against f32 activations).
    fn act_block(&self) -> Option<usize> {
        match &self.weight {
            LinearWeight::Block(b) if !self.dispatch.float_activations => Some(act_block_for(&b.packed, self.dispatch)),
            _ => None,
        }
    }

    /// whittle's f32 GEMM of `x2` (N, in) against this layer's f32 weights, packed on first use from
    /// `weights()` (row-major (out, in)) and kept; returns (N, out).
    fn f32_gemm(&self, weights: impl FnOnce() -> Result<Vec<f32>>, x2: &Tensor, rows: usize) -> Result<Tensor> {
        let p = match self.packed_f32.get() {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(PackedF32::new(&weights()?, self.out_features, self.in_features));
                self.packed_f32.get_or_init(|| p).clone()
            }
        };
        let bias: Option<Vec<f32>> = match &self.bias {
            Some(b) => Some(b.to_vec1()?),
            None => None,
        };
        let y = with_f32_slice(x2, |xs| {
            whittle_kernels::filled(rows * self.out_features, |y| {
                whittle_kernels::f32::gemm(&p, xs, rows, bias.as_deref(), y, &KernelPool)
            })
        })?;
        Ok(Tensor::from_vec(y, (rows, self.out_features), x2.device())?)
    }

    /// A block layer on activations already quantized per 32-block; `dims` is the input's shape.
    fn block_forward(&self, acts: &BlockActs, dims: &[usize], dev: &Device) -> Result<Tensor> {
        let LinearWeight::Block(b) = &self.weight else { unreachable!("block_forward on a non-block layer") };
        let bias: Option<Vec<f32>> = match &self.bias {
            Some(b) => Some(b.to_vec1()?),
            None => None,
        };
        let y = whittle_kernels::filled(acts.n * self.out_features, |y| {
            whittle_kernels::block::gemm(&b.packed, acts, bias.as_deref(), y, self.dispatch.block_isa(), &KernelPool)
        });
        let mut od = dims.to_vec();
        *od.last_mut().unwrap() = self.out_features;
        Ok(Tensor::from_vec(y, od, dev)?)
    }

    /// Records `x` into the calibration observer, if any.
    fn record(&self, x: &Tensor) -> Result<()> {
        if let Some(o) = &self.observer {
            let x2 = x.reshape(((), self.in_features))?;
            with_f32_slice(&x2, |xs| o.lock().expect("observer lock").observe(xs))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_LINEAR_ABS_ERR: f32 = 1e-5;
    /// int8 weights and activations: error relative to the output scale.
    const MAX_W8A8_REL_ERR: f32 = 0.02;

    #[test]
    fn dense_forward_matches_naive() {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 12., &dev).unwrap().reshape((3, 4)).unwrap(); // (out=3, in=4)
        let b = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
        let l = Linear::dense(w.clone(), Some(b)).unwrap();
        let x = Tensor::new(&[[[1f32, 0., -1., 2.]]], &dev).unwrap(); // (1,1,4)
        let y = l.forward(&x).unwrap();
        assert_eq!(y.dims(), &[1, 1, 3]);
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let wv: Vec<Vec<f32>> = w.to_vec2().unwrap();
        let xv = [1f32, 0., -1., 2.];
        for o in 0..3 {
            let want: f32 = wv[o].iter().zip(xv).map(|(a, b)| a * b).sum::<f32>() + (o + 1) as f32;
            assert!((y[o] - want).abs() < MAX_LINEAR_ABS_ERR, "row {o}: {} vs {want}", y[o]);
        }
        assert_eq!(l.num_params(), 15);
    }

    /// `float_activations`: a 4-bit block Linear equals the dense f32 Linear on its dequantized weights
    /// (both through whittle's f32 GEMM: identical products and order), prefill and decoding rows, and
    /// shared-input layers (q/k/v) take the same path; without it the int8 activations differ by their
    /// rounding, so the two runs really are different.
    #[test]
    fn block_forward_on_float_activations_is_the_dense_forward_of_its_dequantization() {
        /// Same weights and activations, same kernel: only the packing route could differ.
        const MAX_FLOAT_ACTS_ABS_ERR: f32 = 1e-5;
        let dev = Device::Cpu;
        let (m, k) = (40, 96);
        let w: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let rtn = crate::rtn::Rtn { bits: 4, group: 32, zero_point: false };
        let mut q = Linear::rtn(&rtn.quantize(&w, m, k), rtn, None).unwrap();
        let dense = Linear::dense(q.dequantize().unwrap(), None).unwrap();
        let int8 = q.clone();
        let mut d = q.dispatch();
        d.float_activations = true;
        q.set_dispatch(d);
        for rows in [1, 7] {
            let x = (Tensor::arange(0f32, (rows * k) as f32, &dev).unwrap().reshape((rows, k)).unwrap() * 0.11)
                .unwrap()
                .cos()
                .unwrap();
            let want = dense.forward(&x).unwrap();
            let err = |y: &Tensor| (&want - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err(&q.forward(&x).unwrap()) <= MAX_FLOAT_ACTS_ABS_ERR, "rows {rows}");
            for y in Linear::forward_shared(&[&q, &q], &x).unwrap() {
                assert!(err(&y) <= MAX_FLOAT_ACTS_ABS_ERR, "rows {rows}, shared input");
            }
            assert!(err(&int8.forward(&x).unwrap()) > MAX_FLOAT_ACTS_ABS_ERR, "int8 activations round");
        }
    }

    #[test]
    fn int8_forward_is_close_to_dense() {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 64. * 48., &dev).unwrap().reshape((64, 48)).unwrap().sin().unwrap();
        let b = Tensor::arange(0f32, 64., &dev).unwrap();
        let dense = Linear::dense(w.clone(), Some(b.clone())).unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let q = Linear::int8_dynamic(PackedI8::from_f32(&wv, 64, 48), Some(b)).unwrap();
        let x = (Tensor::arange(0f32, 3. * 5. * 48., &dev).unwrap().reshape((3, 5, 48)).unwrap() * 0.01)
            .unwrap()
            .cos()
            .unwrap();
        let (a, c) = (dense.forward(&x).unwrap(), q.forward(&x).unwrap());
        assert_eq!(c.dims(), &[3, 5, 64]);
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let err = (a - c).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= MAX_W8A8_REL_ERR * scale, "{err} vs scale {scale}");
        assert_eq!(q.bits_per_weight(), 8.0 + 32.0 / 48.0);
        let d = q.dequantize().unwrap();
        let werr = (d - &w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(werr <= 1.0 / 127.0 / 2.0 + 1e-6);
    }

    /// A dense f16 / bf16 Linear stays 16-bit and equals the f32 Linear on its widened weights (decoding rows
    /// and prefill rows; bf16 prefill on AVX512-BF16 rounds activations to bf16, hence its own budget).
    #[test]
    fn half_dense_matches_f32_on_widened_weights() {
        /// Same exact products, another summation order.
        const MAX_HALF_LINEAR_ABS_ERR: f32 = 1e-4;
        /// bf16 activations (8-bit mantissa): error relative to the output scale.
        const MAX_BF16_ACTS_REL_ERR: f32 = 1e-2;
        let dev = Device::Cpu;
        let w =
            (Tensor::arange(0f32, 40. * 70., &dev).unwrap().reshape((40, 70)).unwrap() * 0.37).unwrap().sin().unwrap();
        let b = Tensor::arange(0f32, 40., &dev).unwrap();
        for dt in [DType::F16, DType::BF16] {
            let wh = w.to_dtype(dt).unwrap();
            let half = Linear::dense(wh.clone(), Some(b.clone())).unwrap();
            let wide = Linear::dense(wh.to_dtype(DType::F32).unwrap(), Some(b.clone())).unwrap();
            assert_eq!(half.storage_name(), format!("{dt:?}").to_lowercase());
            assert_eq!(half.storage_bytes(), 40 * 70 * 2 + 40 * 4);
            for rows in [1, 3, 9, 40] {
                let x = (Tensor::arange(0f32, (rows * 70) as f32, &dev).unwrap().reshape((rows, 70)).unwrap() * 0.11)
                    .unwrap()
                    .cos()
                    .unwrap();
                let (a, c) = (wide.forward(&x).unwrap(), half.forward(&x).unwrap());
                assert_eq!(c.dims(), &[rows, 40]);
                let err = (&a - &c).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let bf16_acts = dt == DType::BF16
                    && rows > whittle_kernels::half::GEMV_MAX_ROWS
                    && whittle_kernels::half::bf16_dot_available();
                let tol = if bf16_acts { MAX_BF16_ACTS_REL_ERR * scale } else { MAX_HALF_LINEAR_ABS_ERR };
                assert!(err <= tol, "{dt:?} rows {rows}: {err} (scale {scale})");
            }
        }
    }

    #[test]
    fn wrong_input_width_is_an_error() {
        let dev = Device::Cpu;
        let l = Linear::dense(Tensor::zeros((3, 4), DType::F32, &dev).unwrap(), None).unwrap();
        let x = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        assert!(l.forward(&x).is_err());
    }

    /// Every ggml block type unpacks to the values candle's (ggml's reference) dequantizer gives, and the
    /// block Linear's product is close to the dense product on those values.
    #[test]
    fn ggml_block_types_unpack_exactly_and_run() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let (m, k) = (24, 512);
        let w = (Tensor::arange(0f32, (m * k) as f32, &dev).unwrap().reshape((m, k)).unwrap() * 0.37)
            .unwrap()
            .sin()
            .unwrap();
        let x = (Tensor::arange(0f32, (3 * k) as f32, &dev).unwrap().reshape((3, k)).unwrap() * 0.11)
            .unwrap()
            .cos()
            .unwrap();
        let types = [
            (GgmlDType::Q4_0, 2),
            (GgmlDType::Q4_1, 3),
            (GgmlDType::Q5_0, 6),
            (GgmlDType::Q5_1, 7),
            (GgmlDType::Q8_0, 8),
            (GgmlDType::Q2K, 10),
            (GgmlDType::Q3K, 11),
            (GgmlDType::Q4K, 12),
            (GgmlDType::Q5K, 13),
            (GgmlDType::Q6K, 14),
        ];
        for (dt, id) in types {
            let q = QTensor::quantize(&w, dt).unwrap();
            let want: Vec<f32> = q.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let bw = whittle_kernels::ggml::unpack(id, &q.data().unwrap(), m, k).unwrap();
            let got = bw.dequantize();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{dt:?} [{i}]: {g} vs {w}");
            }
            let (name, _, _) = whittle_kernels::ggml::type_info(id).unwrap();
            let lin = Linear::block(&bw, name, 4.5, None).unwrap();
            let dense = Linear::dense(Tensor::from_vec(want, (m, k), &dev).unwrap(), None).unwrap();
            let (a, b) = (dense.forward(&x).unwrap(), lin.forward(&x).unwrap());
            let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err <= 0.02 * scale, "{dt:?}: {err} vs {scale}");
        }
    }
}
