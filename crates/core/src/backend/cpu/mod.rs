//! The CPU backend: the device, the kernels' thread pool, zero-copy access to a
//! CPU tensor's f32 data, and (in `forward`) how each [`crate::LinearWeight`] runs on this CPU's kernels.

use candle_core::{Device, Tensor};
use whittle_kernels::int8::Parallel;

use crate::Result;

mod forward;

/// The CPU device: the one place outside tests that names it.
pub fn device() -> Device {
    Device::Cpu
}

/// Runs kernel work on whittle's kernel pool (`whittle_kernels::pool`), sized like candle's (`--threads`,
/// `RAYON_NUM_THREADS`, else every core). Its regions wait only for the workers that joined them, so a
/// core taken by another process slows a forward pass instead of stalling every op (issue 22).
pub(crate) struct KernelPool;

impl Parallel for KernelPool {
    fn for_each(&self, n_items: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        whittle_kernels::pool::global(candle_core::utils::get_num_threads).run(n_items, f);
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

/// The contiguous data of an f16 or bf16 CPU tensor as bit patterns, without copying; `None` for other
/// dtypes and devices.
pub fn with_half_slice<R>(t: &Tensor, f: impl FnOnce(whittle_kernels::half::Half, &[u16]) -> R) -> Result<Option<R>> {
    use half::slice::HalfFloatSliceExt;
    use whittle_kernels::half::Half;
    let t = t.contiguous()?;
    let (st, layout) = t.storage_and_layout();
    let range = layout.start_offset()..layout.start_offset() + t.elem_count();
    Ok(match &*st {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F16(v)) => Some(f(Half::F16, v[range].reinterpret_cast())),
        candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => Some(f(Half::Bf16, v[range].reinterpret_cast())),
        _ => None,
    })
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
