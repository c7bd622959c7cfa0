//! The layer-wise calibration engine (ARCHITECTURE.md): calibration windows → embeddings → block by block:
//! observe the inputs of the block's Linears with the float block, solve each Linear (GPTQ), then recompute
//! the block's outputs with the quantized block and continue. Peak memory is the model plus one block's
//! Hessians plus the calibration activations (samples × tokens × width floats).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{Device, Tensor};
use whittle_core::observe::ActStats;
use whittle_core::{Linear, Rtn};
use whittle_models::{Loaded, Model};

use crate::calib::{decoder_windows, CalibOptions};
use crate::gptq::{gptq, GptqOptions};
use crate::{Error, LayerReport, Report, Result};

/// Per-layer error on the calibration inputs, (1/m)·Σ_rows Δw·H·Δwᵀ / 2 = mean squared output error.
fn output_mse(w: &[f32], wq: &[f32], m: usize, k: usize, h: &[f64]) -> Result<f64> {
    let d: Vec<f32> = w.iter().zip(wq).map(|(a, b)| a - b).collect();
    let dt = Tensor::from_vec(d, (m, k), &Device::Cpu)?;
    let ht = Tensor::from_vec(h.iter().map(|&v| v as f32).collect::<Vec<_>>(), (k, k), &Device::Cpu)?;
    let e = (dt.matmul(&ht)? * &dt)?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(e / 2.0 / m as f64)
}

/// What the engine did, beyond the usual report: the calibration tokens and the peak of the activations.
pub struct LayerwiseReport {
    pub report: Report,
    pub tokens: usize,
    /// Output MSE of plain rounding per layer, beside the report's (GPTQ) one.
    pub rtn_output_mse: Vec<f64>,
    pub activation_bytes: usize,
}

/// GPTQ-quantizes the block Linears of a LLaMA model that `scheme_for` maps to a grouped format (others are
/// left as they are), layer by layer on `text`.
pub fn gptq_llama(
    l: &mut Loaded,
    text: &str,
    co: &CalibOptions,
    scheme_for: impl Fn(&str, usize) -> Option<Rtn>,
    go: GptqOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<LayerwiseReport> {
    let t0 = Instant::now();
    let windows = decoder_windows(l, text, co)?;
    let Model::Llama(m) = &mut l.model else {
        return Err(Error::Unsupported("--method gptq is implemented for LLaMA decoders".into()));
    };
    let t = co.seq_len;
    let (cos, sin, mask) = m.block_inputs(t)?;
    let mut xs: Vec<Tensor> = windows
        .iter()
        .map(|w| m.embed(&Tensor::new(w.as_slice(), &Device::Cpu)?.unsqueeze(0)?))
        .collect::<std::result::Result<_, _>>()?;
    let activation_bytes = xs.len() * t * m.config.hidden_size * 4;
    let hd = m.config.head_dim;
    let nb = m.blocks.len();
    let (mut layers, mut rtn_mse) = (Vec::new(), Vec::new());
    let (mut before, mut after) = (0usize, 0usize);
    for bi in 0..nb {
        let p = format!("model.layers.{bi}.");
        let blk = &mut m.blocks[bi];
        // Observe: q (shared by k, v), o, gate (shared by up), down.
        let obs: Vec<Arc<Mutex<ActStats>>> = [&mut blk.q, &mut blk.o, &mut blk.gate, &mut blk.down]
            .into_iter()
            .map(|lin| {
                let k = lin.in_features();
                lin.observe_with(ActStats::hessian(k))
            })
            .collect();
        for x in &xs {
            blk.forward(x, &cos, &sin, mask.as_ref(), &mut None, hd)?;
        }
        for lin in [&mut blk.q, &mut blk.o, &mut blk.gate, &mut blk.down] {
            lin.unobserve();
        }
        let hs: Vec<ActStats> = obs.into_iter().map(|o| o.lock().expect("observer").clone()).collect();
        for s in &hs {
            if s.non_finite {
                return Err(Error::NonFinite(format!("{p}* (inputs on the calibration text)")));
            }
        }
        let names = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ];
        let which = [0, 0, 0, 1, 2, 2, 3];
        let hess: Vec<Vec<f64>> = hs.iter().map(|s| s.mean_hessian().expect("hessian observer")).collect();
        for ((lin, name), &hi) in blk.linears_mut().into_iter().map(|(_, l)| l).zip(names).zip(&which) {
            let full = format!("{p}{name}");
            before += lin.storage_bytes();
            let (mo, k) = (lin.out_features(), lin.in_features());
            let Some(rtn) = scheme_for(&full, k) else {
                after += lin.storage_bytes();
                continue;
            };
            if lin.is_quantized() {
                return Err(Error::AlreadyQuantized(full, lin.storage_name()));
            }
            let ts = Instant::now();
            let w: Vec<f32> = lin.dequantize()?.flatten_all()?.to_vec1()?;
            if w.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite(full));
            }
            let q = gptq(&w, mo, k, &hess[hi], rtn, go, &full)?;
            let wq = q.dequantize();
            let plain = rtn.quantize(&w, mo, k).dequantize();
            let rtn_output_mse = output_mse(&w, &plain, mo, k, &hess[hi])?;
            rtn_mse.push(rtn_output_mse);
            let mse = output_mse(&w, &wq, mo, k, &hess[hi])?;
            let new = Linear::rtn(&q, rtn, lin.bias.clone())?;
            layers.push(LayerReport {
                name: full,
                scheme: format!("{} gptq", rtn.name()),
                params: mo * k,
                bpw: rtn.bpw(),
                weight_rmse: crate::rmse(&w, &wq),
                seconds: ts.elapsed().as_secs_f64(),
                output_mse: Some(mse),
                rtn_output_mse: Some(rtn_output_mse),
                note: String::new(),
            });
            *lin = new;
            after += lin.storage_bytes();
        }
        // The next block sees this block's quantized outputs.
        for x in xs.iter_mut() {
            *x = blk.forward(x, &cos, &sin, mask.as_ref(), &mut None, hd)?;
        }
        progress(bi + 1, nb);
    }
    Ok(LayerwiseReport {
        report: Report {
            layers,
            linear_bytes_before: before,
            linear_bytes_after: after,
            seconds: t0.elapsed().as_secs_f64(),
        },
        tokens: windows.len() * t,
        rtn_output_mse: rtn_mse,
        activation_bytes,
    })
}
