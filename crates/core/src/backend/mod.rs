//! Backends: where a [`crate::Linear`] runs and where tensors live. Today there is one, the CPU
//! ([`cpu`]); a CUDA backend is one more module beside it.
//!
//! Code outside this module takes its device from the run configuration ([`crate::RunConfig::device`]) or
//! from a tensor it already has (`x.device()`); only where there is neither does it call
//! [`cpu::device`].

pub mod cpu;
