//! The Linear seam: `y = x · Wᵀ + b` behind one type whatever the weight's representation.
//!
//! This file is the representation: [`Linear`], its [`LinearWeight`] variants and what a pass asks of them
//! (sizes, names, the dense reference). Running a Linear lives in the backend
//! ([`crate::backend::cpu`]), writing and reading its tensors in [`crate::codec`].

use std::sync::Arc;

use candle_core::{DType, Tensor};
use whittle_kernels::block::{BlockWeights, PackedBlock};
use whittle_kernels::f32::PackedF32;
use whittle_kernels::int8::PackedI8;

use crate::backend::cpu;
use crate::rtn::Rtn;
use crate::run::{Dispatch, RunConfig};
use crate::sparse::SparseLinear;
use crate::Result;

/// How a Linear's weight is stored. Each representation knows how to `forward` and how to `dequantize`.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// Dense weight of shape (out_features, in_features), in any float dtype.
    Dense(Tensor),
    /// int8 weights, symmetric per output channel; activations quantized per token (asymmetric u8) at run time
    /// (`w8a8-dynamic`). Packed once for the int8 GEMM.
    Int8Dynamic(Arc<PackedI8>),
    /// int8 weights as `Int8Dynamic`; activations with one scale and zero point fixed by calibration
    /// (`w8a8-static`).
    Int8Static { p: Arc<PackedI8>, scale: f32, zero: i32 },
    /// Block-quantized weights (llama.cpp's Q8_0 … Q6_K, grouped int4/int8): codes with a scale (and a min)
    /// per sub-block; activations quantized to int8 per 32-block at run time, as llama.cpp does.
    Block(Arc<BlockLinear>),
    /// Pruned f32 weights without their zeros (N:M, bitmap or CSR on disk), run by the sparse kernel.
    Sparse(Arc<SparseLinear>),
    /// A rank-r factorisation `W ≈ U·V`: `v` maps in → r, `u` maps r → out (and holds the bias); two
    /// matmuls, stored as `weight_u` (out, r) and `weight_v` (r, in).
    LowRank(Arc<LowRank>),
}

/// The two factors of a [`LinearWeight::LowRank`] layer, each a dense Linear (so each runs the f32 kernel).
#[derive(Debug, Clone)]
pub struct LowRank {
    pub u: Linear,
    pub v: Linear,
}

/// A block-quantized weight with the name and size of the format it came from.
#[derive(Debug)]
pub struct BlockLinear {
    pub packed: PackedBlock,
    /// Format name, e.g. `q4_k`, `w4a16-g64`.
    pub format: String,
    /// Bits per weight of the format as stored on disk (scales included).
    pub bpw: f64,
    /// Set for whittle's grouped weight-only formats (`w4a16`, `w8a16`), which directories store.
    pub rtn: Option<Rtn>,
}

/// A projection `y = x · Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    /// Optional bias, shape (out_features,), f32.
    pub bias: Option<Tensor>,
    pub(crate) out_features: usize,
    pub(crate) in_features: usize,
    /// A dense f32 weight packed for whittle's f32 kernel, built on first use where the CPU has it.
    pub(crate) packed_f32: std::sync::OnceLock<Arc<PackedF32>>,
    /// Records input statistics during calibration.
    pub(crate) observer: Option<Arc<std::sync::Mutex<crate::observe::ActStats>>>,
    /// The kernels this layer runs with (from the model's [`RunConfig`]).
    pub(crate) dispatch: Dispatch,
}

impl Linear {
    /// A Linear of `weight` (out_features × in_features) and `bias` (checked against out_features), with the
    /// default run configuration until the model's is set.
    fn with_weight(
        weight: LinearWeight,
        bias: Option<Tensor>,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self> {
        Self::check_bias(&bias, out_features)?;
        Ok(Self {
            weight,
            bias,
            out_features,
            in_features,
            packed_f32: Default::default(),
            observer: None,
            dispatch: Dispatch::default(),
        })
    }

    /// A dense Linear from a weight (out, in) and an optional bias (out,).
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Self::with_weight(LinearWeight::Dense(weight), bias, out_features, in_features)
    }

    /// A w8a8-dynamic Linear from packed int8 weights.
    pub fn int8_dynamic(p: PackedI8, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = (p.m, p.k);
        Self::with_weight(LinearWeight::Int8Dynamic(Arc::new(p)), bias, out_features, in_features)
    }

    /// A block-quantized Linear; `format` and `bpw` describe the stored format (e.g. `q4_k`, 4.5).
    pub fn block(w: &BlockWeights, format: &str, bpw: f64, bias: Option<Tensor>) -> Result<Self> {
        let packed = PackedBlock::new(w)
            .map_err(|msg| crate::Error::Linear { name: String::new(), msg: format!("{format}: {msg}") })?;
        Self::with_weight(
            LinearWeight::Block(Arc::new(BlockLinear { packed, format: format.into(), bpw, rtn: None })),
            bias,
            w.m,
            w.k,
        )
    }

    /// A grouped weight-only Linear (`w4a16`, `w8a16`) from weights quantized by [`Rtn::quantize`].
    pub fn rtn(w: &BlockWeights, rtn: Rtn, bias: Option<Tensor>) -> Result<Self> {
        let mut l = Self::block(w, &rtn.name(), rtn.bpw(), bias)?;
        if let LinearWeight::Block(b) = &mut l.weight {
            Arc::get_mut(b).expect("just built").rtn = Some(rtn);
        }
        Ok(l)
    }

    /// A w8a8-static Linear: packed int8 weights and the calibrated activation scale and zero point.
    pub fn int8_static(p: PackedI8, scale: f32, zero: i32, bias: Option<Tensor>) -> Result<Self> {
        let mut l = Self::int8_dynamic(p, bias)?;
        if let LinearWeight::Int8Dynamic(p) = l.weight {
            l.weight = LinearWeight::Int8Static { p, scale, zero };
        }
        Ok(l)
    }

    /// A sparse Linear from a pruned dense weight (out, in); `nm` = `Some((n, m))` for an N:M pattern,
    /// which it checks.
    pub fn sparse(weight: &Tensor, nm: Option<(usize, usize)>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let s = SparseLinear::new(&w, out_features, in_features, nm)
            .map_err(|msg| crate::Error::Linear { name: String::new(), msg })?;
        Self::with_weight(LinearWeight::Sparse(Arc::new(s)), bias, out_features, in_features)
    }

    /// A low-rank Linear `x·(U·V)ᵀ + b` from U (out, r) and V (r, in).
    pub fn low_rank(u: Tensor, v: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, r) = u.dims2()?;
        let (r2, in_features) = v.dims2()?;
        if r != r2 || r == 0 {
            return Err(crate::Error::Linear {
                name: String::new(),
                msg: format!("low-rank factors ({out_features}, {r}) and ({r2}, {in_features}) do not chain"),
            });
        }
        let lr = LowRank { u: Linear::dense(u, bias.clone())?, v: Linear::dense(v, None)? };
        Self::with_weight(LinearWeight::LowRank(Arc::new(lr)), bias, out_features, in_features)
    }

    /// A low-rank Linear from two factor Linears of any representation (quantized factors included):
    /// `v` maps in → r, `u` maps r → out; `bias` is the layer's (it is applied by `u`).
    pub fn low_rank_of(mut u: Linear, v: Linear, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = (u.out_features, v.in_features);
        if u.in_features != v.out_features || u.in_features == 0 {
            return Err(crate::Error::Linear {
                name: String::new(),
                msg: format!(
                    "low-rank factors ({out_features}, {}) and ({}, {in_features}) do not chain",
                    u.in_features, v.out_features
                ),
            });
        }
        u.bias = bias.clone();
        Self::with_weight(LinearWeight::LowRank(Arc::new(LowRank { u, v })), bias, out_features, in_features)
    }

    /// The two factors (U, V) of a low-rank layer, U without the bias.
    pub fn factors(&self) -> Option<(Linear, Linear)> {
        match &self.weight {
            LinearWeight::LowRank(lr) => {
                let mut u = lr.u.clone();
                u.bias = None;
                Some((u, lr.v.clone()))
            }
            _ => None,
        }
    }

    /// The rank of a low-rank layer.
    pub fn rank(&self) -> Option<usize> {
        match &self.weight {
            LinearWeight::LowRank(lr) => Some(lr.v.out_features),
            _ => None,
        }
    }

    /// Parameters as stored (a low-rank layer: r·(in + out) + bias; otherwise as [`Linear::num_params`]).
    pub fn stored_params(&self) -> usize {
        match &self.weight {
            LinearWeight::LowRank(lr) => lr.u.num_params() + lr.v.num_params(),
            _ => self.num_params(),
        }
    }

    /// Starts recording input statistics (calibration); returns the shared record.
    pub fn observe(&mut self) -> Arc<std::sync::Mutex<crate::observe::ActStats>> {
        let o = Arc::new(std::sync::Mutex::new(crate::observe::ActStats::new(self.in_features)));
        self.observer = Some(o.clone());
        o
    }

    /// Starts recording into `stats` (e.g. [`crate::observe::ActStats::hessian`]).
    pub fn observe_with(&mut self, stats: crate::observe::ActStats) -> Arc<std::sync::Mutex<crate::observe::ActStats>> {
        let o = Arc::new(std::sync::Mutex::new(stats));
        self.observer = Some(o.clone());
        o
    }

    /// Stops recording.
    pub fn unobserve(&mut self) {
        self.observer = None;
    }

    /// The device of the layer's tensors: a dense weight's, else the bias's; packed (int8, block, sparse)
    /// weights live on the CPU.
    pub fn device(&self) -> candle_core::Device {
        match (&self.weight, &self.bias) {
            (LinearWeight::Dense(w), _) => w.device().clone(),
            (LinearWeight::LowRank(lr), _) => lr.u.device(),
            (_, Some(b)) => b.device().clone(),
            _ => cpu::device(),
        }
    }

    /// The kernels this layer runs with.
    pub fn dispatch(&self) -> Dispatch {
        self.dispatch
    }

    /// Runs this layer (and a low-rank layer's factors) with `d`.
    pub fn set_dispatch(&mut self, d: Dispatch) {
        self.dispatch = d;
        if let LinearWeight::LowRank(lr) = &mut self.weight {
            if lr.u.dispatch != d || lr.v.dispatch != d {
                let lr = Arc::make_mut(lr);
                lr.u.set_dispatch(d);
                lr.v.set_dispatch(d);
            }
        }
    }

    /// Runs this layer as `rc` says.
    pub fn set_run_config(&mut self, rc: &RunConfig) {
        self.set_dispatch(rc.dispatch());
    }

    /// This layer, running with the kernels of `from` (the layer it replaces): what a pass calls on the
    /// Linear it builds, so the model's run configuration carries over.
    pub fn inheriting(mut self, from: &Linear) -> Self {
        self.set_dispatch(from.dispatch);
        self
    }

    fn check_bias(bias: &Option<Tensor>, out: usize) -> Result<()> {
        if let Some(b) = bias {
            let n = b.dims1()?;
            if n != out {
                return Err(crate::Error::Linear {
                    name: String::new(),
                    msg: format!("bias has {n} elements, weight has {out} rows"),
                });
            }
        }
        Ok(())
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

    /// Bytes the weight (with its scales) and bias occupy in their current representation.
    pub fn storage_bytes(&self) -> usize {
        let w = match &self.weight {
            LinearWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            LinearWeight::Int8Dynamic(p) => p.stored_bytes(),
            LinearWeight::Int8Static { p, .. } => p.stored_bytes() + 8,
            LinearWeight::Block(b) => (b.bpw * (self.out_features * self.in_features) as f64 / 8.0).round() as usize,
            LinearWeight::Sparse(s) => s.storage_bytes(),
            LinearWeight::LowRank(lr) => {
                let b = lr.u.bias.as_ref().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes());
                lr.u.storage_bytes() - b + lr.v.storage_bytes()
            }
        };
        w + self.bias.as_ref().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }

    /// Bits per weight of the weight as stored (scales included, bias not).
    pub fn bits_per_weight(&self) -> f64 {
        let b = self.bias.as_ref().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes());
        8.0 * (self.storage_bytes() - b) as f64 / (self.out_features * self.in_features) as f64
    }

    /// Short name of the weight's representation, e.g. `f32`, `w8a8-dynamic`.
    pub fn storage_name(&self) -> String {
        match &self.weight {
            LinearWeight::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            LinearWeight::Int8Dynamic(_) => "w8a8-dynamic".into(),
            LinearWeight::Int8Static { .. } => "w8a8-static".into(),
            LinearWeight::Block(b) => b.format.clone(),
            LinearWeight::Sparse(s) => s.name(),
            LinearWeight::LowRank(lr) if lr.u.is_quantized() || lr.v.is_quantized() => {
                format!("low-rank-{} {}", lr.v.out_features, lr.v.storage_name())
            }
            LinearWeight::LowRank(lr) => format!("low-rank-{}", lr.v.out_features),
        }
    }

    /// Whether the weight is quantized (sparse f32 weights are not: a quantization pass may take them).
    pub fn is_quantized(&self) -> bool {
        match &self.weight {
            LinearWeight::Dense(_) | LinearWeight::Sparse(_) => false,
            LinearWeight::LowRank(lr) => lr.u.is_quantized() || lr.v.is_quantized(),
            _ => true,
        }
    }

    pub fn is_sparse(&self) -> bool {
        matches!(self.weight, LinearWeight::Sparse(_))
    }

    /// The weight as a dense f32 tensor (out, in): the reference every representation must match.
    pub fn dequantize(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            LinearWeight::Int8Dynamic(p) | LinearWeight::Int8Static { p, .. } => {
                let v: Vec<f32> = p.q.iter().enumerate().map(|(i, &q)| q as f32 * p.scale[i / p.k]).collect();
                Ok(Tensor::from_vec(v, (p.m, p.k), &cpu::device())?)
            }
            LinearWeight::Block(b) => {
                Ok(Tensor::from_vec(b.packed.unpack().dequantize(), (b.packed.m, b.packed.k), &cpu::device())?)
            }
            LinearWeight::Sparse(s) => {
                Ok(Tensor::from_vec(s.packed.dense(), (s.packed.m, s.packed.k), &cpu::device())?)
            }
            LinearWeight::LowRank(lr) => Ok(lr.u.dequantize()?.matmul(&lr.v.dequantize()?)?),
        }
    }
}
