//! GPTQ over the calibration engine's sequential mode ([`whittle_calib::sequential`], re-exported here): each
//! block Linear solved against the Hessian of its inputs as the quantized model before it produces them.

use std::time::Instant;

use whittle_core::{Linear, Rtn};
use whittle_models::Loaded;

use whittle_calib::observe::CalibOptions;
pub use whittle_calib::sequential::*;

use crate::gptq::{gptq_prepared, prepare, GptqOptions, Prepared};
use crate::{Error, LayerReport, Result};

/// GPTQ-quantizes the block Linears of a LLaMA decoder or BERT encoder that `scheme_for` maps to a grouped
/// format (others are left as they are), layer by layer on `text`.
pub fn gptq_model(
    l: &mut Loaded,
    text: &str,
    co: &CalibOptions,
    scheme_for: impl Fn(&str, usize) -> Option<Rtn>,
    go: GptqOptions,
    progress: impl FnMut(usize, usize),
) -> Result<LayerwiseReport> {
    // One factorisation per observed input and block (q/k/v share one, gate/up another).
    let mut prepared: Option<(usize, Vec<Option<Prepared>>)> = None;
    let mut rtn_mse = Vec::new();
    let solve = |full: &str, lin: &Linear, x: &LayerInput| -> Result<Solved> {
        let (mo, k) = (lin.out_features(), lin.in_features());
        let Some(rtn) = scheme_for(full, k) else { return Ok(None) };
        if lin.is_quantized() {
            return Err(Error::AlreadyQuantized(full.into(), lin.storage_name()));
        }
        let h = x.hessian.expect("the engine observes Hessians for GPTQ");
        let ts = Instant::now();
        let w: Vec<f32> = lin.dequantize()?.flatten_all()?.to_vec1()?;
        if w.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite(full.into()));
        }
        if prepared.as_ref().is_none_or(|p| p.0 != x.block) {
            prepared = Some((x.block, Vec::new()));
        }
        let slots = &mut prepared.as_mut().expect("set above").1;
        if slots.len() <= x.slot {
            slots.resize_with(x.slot + 1, || None);
        }
        if slots[x.slot].is_none() {
            slots[x.slot] = Some(prepare(h, k, go, full)?);
        }
        let q = gptq_prepared(&w, mo, slots[x.slot].as_ref().expect("prepared above"), rtn, go)?;
        let wq = q.dequantize();
        let plain = rtn.quantize(&w, mo, k).dequantize();
        let rtn_output_mse = output_mse(&w, &plain, mo, k, h)?;
        rtn_mse.push(rtn_output_mse);
        let mse = output_mse(&w, &wq, mo, k, h)?;
        let report = LayerReport {
            name: full.into(),
            scheme: format!("{} gptq", rtn.name()),
            params: mo * k,
            bpw: rtn.bpw(),
            weight_rmse: crate::rmse(&w, &wq),
            seconds: ts.elapsed().as_secs_f64(),
            output_mse: Some(mse),
            rtn_output_mse: Some(rtn_output_mse),
            note: String::new(),
        };
        Ok(Some((Linear::rtn(&q, rtn, lin.bias.clone())?.inheriting(lin), report)))
    };
    let mut r = run_layerwise(l, text, co, true, solve, progress)?;
    r.rtn_output_mse = rtn_mse;
    Ok(r)
}
