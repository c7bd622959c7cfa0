//! The Linear seam: `y = x · Wᵀ + b` behind one type whatever the weight's representation.

use candle_core::{DType, Tensor};

use crate::Result;

/// How a Linear's weight is stored. Today: dense (f32, f16 or bf16). Quantized, low-rank and sparse
/// representations join as new variants; each knows how to `forward` and how to `dequantize`.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// Dense weight of shape (out_features, in_features), in any float dtype.
    Dense(Tensor),
}

/// A projection `y = x · Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    /// Optional bias, shape (out_features,), f32.
    pub bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// A dense Linear from a weight (out, in) and an optional bias (out,).
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        if let Some(b) = &bias {
            let n = b.dims1()?;
            if n != out_features {
                return Err(crate::Error::Linear {
                    name: String::new(),
                    msg: format!("bias has {n} elements, weight has {out_features} rows"),
                });
            }
        }
        Ok(Self {
            weight: LinearWeight::Dense(weight),
            bias,
            out_features,
            in_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Parameters a dense equivalent of this layer has (weight + bias).
    pub fn num_params(&self) -> usize {
        self.out_features * self.in_features + self.bias.as_ref().map_or(0, |_| self.out_features)
    }

    /// Bytes the weight and bias occupy in memory in their current representation.
    pub fn storage_bytes(&self) -> usize {
        let w = match &self.weight {
            LinearWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        };
        w + self
            .bias
            .as_ref()
            .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }

    /// Short name of the weight's representation, e.g. `f32`.
    pub fn storage_name(&self) -> String {
        match &self.weight {
            LinearWeight::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
        }
    }

    /// The weight as a dense f32 tensor (out, in): the reference every representation must match.
    pub fn dequantize(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(t) => Ok(t.to_dtype(DType::F32)?),
        }
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
                msg: format!(
                    "input has {in_f} features, layer expects {}",
                    self.in_features
                ),
            });
        }
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_f))?; // (N, in)
        let y = match &self.weight {
            LinearWeight::Dense(w) => {
                let w = if w.dtype() == DType::F32 {
                    w.clone()
                } else {
                    w.to_dtype(DType::F32)?
                };
                x2.matmul(&w.t()?)? // (N, out)
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_features;
        Ok(y.reshape(out_dims)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const MAX_LINEAR_ABS_ERR: f32 = 1e-5;

    #[test]
    fn dense_forward_matches_naive() {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap(); // (out=3, in=4)
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
            assert!(
                (y[o] - want).abs() < MAX_LINEAR_ABS_ERR,
                "row {o}: {} vs {want}",
                y[o]
            );
        }
        assert_eq!(l.num_params(), 15);
    }

    #[test]
    fn wrong_input_width_is_an_error() {
        let dev = Device::Cpu;
        let l = Linear::dense(Tensor::zeros((3, 4), DType::F32, &dev).unwrap(), None).unwrap();
        let x = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        assert!(l.forward(&x).is_err());
    }
}
