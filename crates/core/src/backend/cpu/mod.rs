//! The CPU backend: the device, the thread pool whittle's kernels share with candle, zero-copy access to a
//! CPU tensor's f32 data, and (in `forward`) how each [`crate::LinearWeight`] runs on this CPU's kernels.

use candle_core::{Device, Tensor};
use whittle_kernels::int8::Parallel;

use crate::Result;

mod forward;

/// The CPU device: the one place outside tests that names it.
pub fn device() -> Device {
    Device::Cpu
}

/// Runs kernel work on candle's own thread pool, so whittle's kernels and candle's ops share the same
/// threads instead of two pools fighting over the cores.
pub(crate) struct CandlePool;

impl Parallel for CandlePool {
    fn for_each(&self, n_items: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        candle_core::utils::barrier_pool().execute_chunked(n_items, f);
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
