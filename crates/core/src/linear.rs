//! The Linear seam: `y = x · Wᵀ + b` behind one type whatever the weight's representation.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use whittle_kernels::block::{BlockWeights, PackedBlock};
use whittle_kernels::f32::PackedF32;
use whittle_kernels::int8::{quantize_activations, PackedI8, Parallel};
use whittle_kernels::Isa;

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
    Sparse(Arc<crate::sparse::SparseLinear>),
    /// A rank-r factorisation `W ≈ U·V`: `v` maps in → r, `u` maps r → out (and holds the bias); two
    /// matmuls, stored as `weight_u` (out, r) and `weight_v` (r, in).
    LowRank(Arc<LowRank>),
}

/// The two factors of a [`LinearWeight::LowRank`] layer, each a dense Linear (so each runs the f32 kernel).
#[derive(Debug)]
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

/// A grouped weight-only integer format: `bits`-bit codes, one f32 scale per `group` weights of a row, and
/// with `zero_point` one u8 zero point per group (asymmetric) — else symmetric codes in ±(2^(bits−1)−1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rtn {
    pub bits: u32,
    pub group: usize,
    pub zero_point: bool,
}

impl Rtn {
    /// `w4a16-g64`, `w8a16-g128-asym`.
    pub fn name(&self) -> String {
        format!("w{}a16-g{}{}", self.bits, self.group, if self.zero_point { "-asym" } else { "" })
    }

    /// Bits per weight as stored: codes, f32 scales, u8 zero points.
    pub fn bpw(&self) -> f64 {
        self.bits as f64 + (32.0 + if self.zero_point { 8.0 } else { 0.0 }) / self.group as f64
    }

    /// Quantizes `w` (m × k) by round-to-nearest per group. `k` must be a multiple of `group`, and `group`
    /// of 32.
    pub fn quantize(&self, w: &[f32], m: usize, k: usize) -> BlockWeights {
        let (g, bits) = (self.group, self.bits);
        assert!(
            k.is_multiple_of(g) && g % 32 == 0 && w.len() == m * k,
            "group {g} must divide {k} and be a multiple of 32"
        );
        let per = g / 32; // kernel sub-blocks of 32 per group
        let nsb = k / 32;
        let mut q = vec![0u8; m * k];
        let mut scale = vec![0f32; m * nsb];
        let mut min = if self.zero_point { Some(vec![0f32; m * nsb]) } else { None };
        let half = 1i32 << (bits - 1);
        for r in 0..m {
            for gi in 0..k / g {
                let xs = &w[r * k + gi * g..r * k + (gi + 1) * g];
                let qs = &mut q[r * k + gi * g..r * k + (gi + 1) * g];
                let (s, mn) = if self.zero_point {
                    let (lo, hi) = xs.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
                    let top = ((1u32 << bits) - 1) as f32;
                    let s = (hi - lo) / top;
                    let z = if s > 0.0 { (-lo / s).round().clamp(0.0, top) } else { 0.0 };
                    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                    for (d, &v) in qs.iter_mut().zip(xs) {
                        *d = ((v * inv).round() + z).clamp(0.0, top) as u8;
                    }
                    (s, -(s * z))
                } else {
                    let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
                    let lim = (half - 1) as f32;
                    let s = amax / lim;
                    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                    for (d, &v) in qs.iter_mut().zip(xs) {
                        *d = ((v * inv).round().clamp(-lim, lim) as i32 + half) as u8;
                    }
                    (s, 0.0)
                };
                for j in 0..per {
                    scale[r * nsb + gi * per + j] = s;
                    if let Some(m) = min.as_mut() {
                        m[r * nsb + gi * per + j] = mn;
                    }
                }
            }
        }
        BlockWeights { m, k, sb: 32, q, scale, min, off: if self.zero_point { 0 } else { -half }, act_block: 32 }
    }

    /// The stored tensors of `w` (from [`Rtn::quantize`]): codes packed as a little-endian bit stream (each row
    /// k·bits/8 bytes), scales (m, k/group) and, asymmetric, zero points (m, k/group) u8.
    pub fn pack(&self, w: &BlockWeights) -> (Vec<u8>, Vec<f32>, Option<Vec<u8>>) {
        let (m, k, g) = (w.m, w.k, self.group);
        let bits = self.bits as usize;
        let mut packed = vec![0u8; w.q.len() * bits / 8];
        for (i, &v) in w.q.iter().enumerate() {
            let bit = i * bits;
            let word = (v as u16) << (bit % 8);
            packed[bit / 8] |= word as u8;
            if bit % 8 + bits > 8 {
                packed[bit / 8 + 1] |= (word >> 8) as u8;
            }
        }
        let nsb = k / 32;
        let scale: Vec<f32> = (0..m * k / g).map(|i| w.scale[(i / (k / g)) * nsb + (i % (k / g)) * (g / 32)]).collect();
        let zero = w.min.as_ref().map(|mn| {
            (0..m * k / g)
                .map(|i| {
                    let j = (i / (k / g)) * nsb + (i % (k / g)) * (g / 32);
                    if w.scale[j] > 0.0 {
                        (-mn[j] / w.scale[j]).round() as u8
                    } else {
                        0
                    }
                })
                .collect()
        });
        (packed, scale, zero)
    }

    /// The inverse of [`Rtn::pack`]; `None` when the sizes do not fit (m, k).
    pub fn unpack(
        &self,
        m: usize,
        k: usize,
        packed: &[u8],
        scale: &[f32],
        zero: Option<&[u8]>,
    ) -> Option<BlockWeights> {
        let (g, bits) = (self.group, self.bits);
        if !k.is_multiple_of(g) || g % 32 != 0 || packed.len() * 8 != m * k * bits as usize || scale.len() != m * k / g
        {
            return None;
        }
        if zero.is_some_and(|z| z.len() != scale.len()) || zero.is_some() != self.zero_point {
            return None;
        }
        let (b, mask) = (bits as usize, (1u16 << bits) - 1);
        let q: Vec<u8> = (0..m * k)
            .map(|i| {
                let bit = i * b;
                let lo = packed[bit / 8] as u16;
                let hi = if bit % 8 + b > 8 { (packed[bit / 8 + 1] as u16) << 8 } else { 0 };
                (((lo | hi) >> (bit % 8)) & mask) as u8
            })
            .collect();
        let nsb = k / 32;
        let at = |i: usize| (i / nsb) * (k / g) + (i % nsb) / (g / 32);
        let sc: Vec<f32> = (0..m * nsb).map(|i| scale[at(i)]).collect();
        let min = zero.map(|z| (0..m * nsb).map(|i| -(scale[at(i)] * z[at(i)] as f32)).collect());
        let off = if self.zero_point { 0 } else { -(1i32 << (bits - 1)) };
        Some(BlockWeights { m, k, sb: 32, q, scale: sc, min, off, act_block: 32 })
    }
}

/// A projection `y = x · Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    /// Optional bias, shape (out_features,), f32.
    pub bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
    /// A dense f32 weight packed for whittle's f32 kernel, built on first use where the CPU has it.
    packed_f32: std::sync::OnceLock<Arc<PackedF32>>,
    /// Records input statistics during calibration.
    observer: Option<Arc<std::sync::Mutex<crate::observe::ActStats>>>,
}

/// A tensor as it is written to disk: a candle tensor, or int8 data candle has no dtype for.
#[derive(Debug, Clone)]
pub enum Stored {
    Tensor(Tensor),
    I8 { shape: Vec<usize>, data: Vec<i8> },
}

static KERNEL: AtomicU8 = AtomicU8::new(0);

/// Runs kernel work on candle's own thread pool, so whittle's kernels and candle's ops share the same
/// threads instead of two pools fighting over the cores.
pub(crate) struct CandlePool;

impl Parallel for CandlePool {
    fn for_each(&self, n_items: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        candle_core::utils::barrier_pool().execute_chunked(n_items, f);
    }
}

/// Forces the integer kernels to one implementation (`None` = the best this CPU has). For `--kernel`.
pub fn set_kernel(isa: Option<Isa>) {
    let v = match isa {
        None => 0,
        Some(Isa::Ref) => 1,
        Some(Isa::Avx2) => 2,
        Some(Isa::Avx512Vnni) => 3,
    };
    KERNEL.store(v, Ordering::Relaxed);
}

/// The integer kernel in use.
pub fn kernel() -> Isa {
    match KERNEL.load(Ordering::Relaxed) {
        1 => Isa::Ref,
        2 => Isa::Avx2,
        3 => Isa::Avx512Vnni,
        _ => Isa::detect(),
    }
}

/// The contiguous f32 data of a CPU tensor, without copying when possible.
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, layout) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(cpu) => {
            let s = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(f(&s[start..start + t.elem_count()]))
        }
        _ => {
            drop(st);
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            Ok(f(&v))
        }
    }
}

/// [`with_f32_slice`] for several CPU tensors at once.
pub fn with_f32_slices<R>(ts: &[Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let cs: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<std::result::Result<_, _>>()?;
    let guards: Vec<_> = cs.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(cs.len());
    for ((st, layout), t) in guards.iter().zip(&cs) {
        match &**st {
            candle_core::Storage::Cpu(cpu) => {
                let s = cpu.as_slice::<f32>()?;
                slices.push(&s[layout.start_offset()..layout.start_offset() + t.elem_count()]);
            }
            _ => {
                return Err(crate::Error::Linear {
                    name: String::new(),
                    msg: "with_f32_slices needs CPU tensors".into(),
                })
            }
        }
    }
    Ok(f(&slices))
}

impl Linear {
    /// A dense Linear from a weight (out, in) and an optional bias (out,).
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Self::check_bias(&bias, out_features)?;
        Ok(Self {
            weight: LinearWeight::Dense(weight),
            bias,
            out_features,
            in_features,
            packed_f32: Default::default(),
            observer: None,
        })
    }

    /// A w8a8-dynamic Linear from packed int8 weights.
    pub fn int8_dynamic(p: PackedI8, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = (p.m, p.k);
        Self::check_bias(&bias, out_features)?;
        Ok(Self {
            weight: LinearWeight::Int8Dynamic(Arc::new(p)),
            bias,
            out_features,
            in_features,
            packed_f32: Default::default(),
            observer: None,
        })
    }

    /// A block-quantized Linear; `format` and `bpw` describe the stored format (e.g. `q4_k`, 4.5).
    pub fn block(w: &BlockWeights, format: &str, bpw: f64, bias: Option<Tensor>) -> Result<Self> {
        let packed = PackedBlock::new(w)
            .map_err(|msg| crate::Error::Linear { name: String::new(), msg: format!("{format}: {msg}") })?;
        Self::check_bias(&bias, w.m)?;
        Ok(Self {
            weight: LinearWeight::Block(Arc::new(BlockLinear { packed, format: format.into(), bpw, rtn: None })),
            bias,
            out_features: w.m,
            in_features: w.k,
            packed_f32: Default::default(),
            observer: None,
        })
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
        Self::check_bias(&bias, out_features)?;
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let s = crate::sparse::SparseLinear::new(&w, out_features, in_features, nm)
            .map_err(|msg| crate::Error::Linear { name: String::new(), msg })?;
        Ok(Self {
            weight: LinearWeight::Sparse(Arc::new(s)),
            bias,
            out_features,
            in_features,
            packed_f32: Default::default(),
            observer: None,
        })
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
        Self::check_bias(&bias, out_features)?;
        let lr = LowRank { u: Linear::dense(u, bias.clone())?, v: Linear::dense(v, None)? };
        Ok(Self {
            weight: LinearWeight::LowRank(Arc::new(lr)),
            bias,
            out_features,
            in_features,
            packed_f32: Default::default(),
            observer: None,
        })
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
        Self::check_bias(&bias, out_features)?;
        u.bias = bias.clone();
        Ok(Self {
            weight: LinearWeight::LowRank(Arc::new(LowRank { u, v })),
            bias,
            out_features,
            in_features,
            packed_f32: Default::default(),
            observer: None,
        })
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

    fn record(&self, x: &Tensor) -> Result<()> {
        if let Some(o) = &self.observer {
            let x2 = x.reshape(((), self.in_features))?;
            with_f32_slice(&x2, |xs| o.lock().expect("observer lock").observe(xs))?;
        }
        Ok(())
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
                Ok(Tensor::from_vec(v, (p.m, p.k), &Device::Cpu)?)
            }
            LinearWeight::Block(b) => {
                Ok(Tensor::from_vec(b.packed.unpack().dequantize(), (b.packed.m, b.packed.k), &Device::Cpu)?)
            }
            LinearWeight::Sparse(s) => Ok(Tensor::from_vec(s.packed.dense(), (s.packed.m, s.packed.k), &Device::Cpu)?),
            LinearWeight::LowRank(lr) => Ok(lr.u.dequantize()?.matmul(&lr.v.dequantize()?)?),
        }
    }

    /// The tensors this layer writes, as `(suffix, tensor)`: `weight`, `weight_scale`, `bias`.
    pub fn stored(&self) -> Result<Vec<(String, Stored)>> {
        let mut v = match &self.weight {
            LinearWeight::LowRank(_) => self.stored_low_rank()?,
            _ => self.stored_weight()?.into_iter().map(|(n, t)| (n.to_string(), t)).collect(),
        };
        if let Some(b) = &self.bias {
            v.push(("bias".into(), Stored::Tensor(b.clone())));
        }
        Ok(v)
    }

    /// The weight tensors of a layer that is not low-rank.
    fn stored_weight(&self) -> Result<Vec<(&'static str, Stored)>> {
        Ok(match &self.weight {
            LinearWeight::Dense(t) => vec![("weight", Stored::Tensor(t.clone()))],
            LinearWeight::Int8Dynamic(p) => vec![
                ("weight", Stored::I8 { shape: vec![p.m, p.k], data: p.q.clone() }),
                ("weight_scale", Stored::Tensor(Tensor::from_vec(p.scale.clone(), p.m, &Device::Cpu)?)),
            ],
            LinearWeight::Int8Static { p, scale, zero } => vec![
                ("weight", Stored::I8 { shape: vec![p.m, p.k], data: p.q.clone() }),
                ("weight_scale", Stored::Tensor(Tensor::from_vec(p.scale.clone(), p.m, &Device::Cpu)?)),
                ("input_scale", Stored::Tensor(Tensor::new(&[*scale], &Device::Cpu)?)),
                ("input_zero_point", Stored::Tensor(Tensor::new(&[*zero as f32], &Device::Cpu)?)),
            ],
            LinearWeight::Block(b) => match b.rtn {
                Some(rtn) => {
                    let (m, k) = (self.out_features, self.in_features);
                    let (packed, scale, zero) = rtn.pack(&b.packed.unpack());
                    let dev = &Device::Cpu;
                    let mut v = vec![
                        (
                            "weight_packed",
                            Stored::Tensor(Tensor::from_vec(packed, (m, k * rtn.bits as usize / 8), dev)?),
                        ),
                        ("weight_scale", Stored::Tensor(Tensor::from_vec(scale, (m, k / rtn.group), dev)?)),
                        ("weight_shape", Stored::Tensor(Tensor::new(&[m as i64, k as i64], dev)?)),
                    ];
                    if let Some(z) = zero {
                        v.push(("weight_zero_point", Stored::Tensor(Tensor::from_vec(z, (m, k / rtn.group), dev)?)));
                    }
                    v
                }
                // GGUF block formats are written by the GGUF writer; a directory gets their dequantized weights.
                None => vec![("weight", Stored::Tensor(self.dequantize()?))],
            },
            LinearWeight::Sparse(s) => s.stored()?,
            LinearWeight::LowRank(_) => unreachable!("stored_low_rank"),
        })
    }

    /// The factors of a low-rank layer as stored. f32 factors: `weight_u` (out, r) and `weight_v` (r, in).
    /// Quantized factors: each as a Linear of its own under `u.` and `v.` (e.g. `u.weight_packed`); the
    /// bias once, as the layer's.
    fn stored_low_rank(&self) -> Result<Vec<(String, Stored)>> {
        let (u, v) = self.factors().expect("a low-rank layer");
        if let (LinearWeight::Dense(ut), LinearWeight::Dense(vt)) = (&u.weight, &v.weight) {
            return Ok(vec![
                ("weight_u".into(), Stored::Tensor(ut.clone())),
                ("weight_v".into(), Stored::Tensor(vt.clone())),
            ]);
        }
        let mut out = Vec::new();
        for (p, f) in [("u", u), ("v", v)] {
            out.extend(f.stored()?.into_iter().map(|(n, t)| (format!("{p}.{n}"), t)));
        }
        Ok(out)
    }

    /// Several Linears on the same input (q/k/v, gate/up): int8 layers share one quantization of `x`.
    ///
    /// # Shapes
    /// - `x`: (..., in_features); returns one (..., out_features_i) per layer
    pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        if layers.iter().any(|l| l.observer.is_some()) {
            return layers.iter().map(|l| l.forward(x)).collect();
        }
        let in_f = *x.dims().last().unwrap_or(&0);
        let ab = layers.first().and_then(|l| l.act_block());
        let all_block = layers.iter().all(|l| l.act_block().is_some() && l.act_block() == ab && l.in_features == in_f);
        if let (true, true, Some(ab)) = (all_block, layers.len() >= 2, ab) {
            let dims = x.dims().to_vec();
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let acts = with_f32_slice(&x.reshape((rows, in_f))?, |xs| {
                whittle_kernels::block::quantize_acts(xs, rows, in_f, ab, block_isa(), &CandlePool)
            })?;
            return layers.iter().map(|l| l.block_forward(&acts, &dims)).collect();
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
        let (kp, isa) = (int8[0].kp, kernel());
        let xa = with_f32_slice(&x.reshape((rows, in_f))?, |xs| {
            whittle_kernels::int8::quantize_activations(xs, rows, in_f, kp, &CandlePool)
        })?;
        let mut out = Vec::with_capacity(layers.len());
        for (l, p) in layers.iter().zip(int8) {
            let bias: Option<Vec<f32>> = match &l.bias {
                Some(b) => Some(b.to_vec1()?),
                None => None,
            };
            let y = whittle_kernels::filled(rows * l.out_features, |y| {
                whittle_kernels::int8::gemm(p, &xa, rows, bias.as_deref(), y, isa, &CandlePool)
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
        let y = match &self.weight {
            LinearWeight::Dense(w) if w.dtype() == DType::F32 && PackedF32::available() && x.device().is_cpu() => {
                let p = match self.packed_f32.get() {
                    Some(p) => p.clone(),
                    None => {
                        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
                        let p = Arc::new(PackedF32::new(&wv, self.out_features, self.in_features));
                        self.packed_f32.get_or_init(|| p).clone()
                    }
                };
                let bias: Option<Vec<f32>> = match &self.bias {
                    Some(b) => Some(b.to_vec1()?),
                    None => None,
                };
                let y = with_f32_slice(&x2, |xs| {
                    whittle_kernels::filled(rows * self.out_features, |y| {
                        whittle_kernels::f32::gemm(&p, xs, rows, bias.as_deref(), y, &CandlePool)
                    })
                })?;
                Tensor::from_vec(y, (rows, self.out_features), x.device())?
            }
            LinearWeight::Sparse(s) if whittle_kernels::sparse::PackedSparse::available() && x.device().is_cpu() => {
                let bias: Option<Vec<f32>> = match &self.bias {
                    Some(b) => Some(b.to_vec1()?),
                    None => None,
                };
                let y = with_f32_slice(&x2, |xs| {
                    whittle_kernels::filled(rows * self.out_features, |y| {
                        whittle_kernels::sparse::gemm(&s.packed, xs, rows, bias.as_deref(), y, &CandlePool)
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
                let ab = act_block_for(&b.packed);
                let acts = with_f32_slice(&x2, |xs| {
                    whittle_kernels::block::quantize_acts(xs, rows, in_f, ab, block_isa(), &CandlePool)
                })?;
                return self.block_forward(&acts, x.dims());
            }
            LinearWeight::Int8Static { p, scale, zero } => {
                let bias: Option<Vec<f32>> = match &self.bias {
                    Some(b) => Some(b.to_vec1()?),
                    None => None,
                };
                let y = with_f32_slice(&x2, |xs| {
                    let xa = whittle_kernels::int8::quantize_activations_static(xs, rows, p.k, p.kp, *scale, *zero);
                    whittle_kernels::filled(rows * self.out_features, |y| {
                        whittle_kernels::int8::gemm(p, &xa, rows, bias.as_deref(), y, kernel(), &CandlePool)
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
                    let xa = quantize_activations(xs, rows, p.k, p.kp, &CandlePool);
                    whittle_kernels::filled(rows * self.out_features, |y| {
                        whittle_kernels::int8::gemm(p, &xa, rows, bias.as_deref(), y, kernel(), &CandlePool)
                    })
                })?;
                Tensor::from_vec(y, (rows, self.out_features), x.device())?
            }
        };
        Ok(y.reshape(out_dims)?)
    }
}

/// The block kernels exist as AVX-512 VNNI and scalar reference (AVX2 machines use the reference).
fn block_isa() -> Isa {
    match kernel() {
        Isa::Avx512Vnni => Isa::Avx512Vnni,
        _ => Isa::Ref,
    }
}

static FINE_ACTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Quantize the activations of every block layer per 32 values, also those whose format llama.cpp runs
/// against 256-value activation blocks (K-quants): finer, so slightly more accurate than llama.cpp.
pub fn set_fine_activations(on: bool) {
    FINE_ACTS.store(on, Ordering::Relaxed);
}

fn act_block_for(p: &PackedBlock) -> usize {
    if FINE_ACTS.load(Ordering::Relaxed) {
        32
    } else {
        p.act_block
    }
}

impl Linear {
    /// The activation block a block layer quantizes its input with.
    fn act_block(&self) -> Option<usize> {
        match &self.weight {
            LinearWeight::Block(b) => Some(act_block_for(&b.packed)),
            _ => None,
        }
    }

    /// A block layer on activations already quantized per 32-block; `dims` is the input's shape.
    fn block_forward(&self, acts: &whittle_kernels::block::BlockActs, dims: &[usize]) -> Result<Tensor> {
        let LinearWeight::Block(b) = &self.weight else { unreachable!("block_forward on a non-block layer") };
        let bias: Option<Vec<f32>> = match &self.bias {
            Some(b) => Some(b.to_vec1()?),
            None => None,
        };
        let y = whittle_kernels::filled(acts.n * self.out_features, |y| {
            whittle_kernels::block::gemm(&b.packed, acts, bias.as_deref(), y, block_isa(), &CandlePool)
        });
        let mut od = dims.to_vec();
        *od.last_mut().unwrap() = self.out_features;
        Ok(Tensor::from_vec(y, od, &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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

    #[test]
    fn rtn_groups_roundtrip_and_bound_the_error() {
        let (m, k) = (5, 128);
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        for (bits, group, zero_point) in
            [(4, 32, false), (4, 64, true), (8, 128, false), (8, 32, true), (3, 64, true), (2, 32, false)]
        {
            let rtn = Rtn { bits, group, zero_point };
            let bw = rtn.quantize(&w, m, k);
            let d = bw.dequantize();
            let levels = if zero_point { (1 << bits) - 1 } else { (1 << (bits - 1)) - 1 } as f32;
            let step = if zero_point { 1.0 / levels } else { 0.5 / levels };
            let err = d.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= step * 0.5 + 1e-6, "{}: {err} vs step {step}", rtn.name());
            let (p, s, z) = rtn.pack(&bw);
            let back = rtn.unpack(m, k, &p, &s, z.as_deref()).unwrap();
            assert_eq!(back.dequantize(), d, "{}", rtn.name());
        }
    }
}
