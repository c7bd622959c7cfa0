//! whittle-core: the tensor facade over candle, devices, errors and the `Linear` seam.
//!
//! Every projection inside a Transformer block is a [`Linear`]. Passes (quantize, prune, low-rank, ...)
//! walk a model and replace the representation behind a `Linear`; the runtime only ever calls
//! [`Linear::forward`], so a new representation is one new variant of [`LinearWeight`].

pub mod error;
pub mod linear;
pub mod observe;
pub mod ops;
pub mod sparse;

pub use candle_core;
pub use candle_core::{DType, Device, Tensor};
pub use error::{option_words, Error, InvalidOption, Result};
pub use linear::{
    kernel, set_fine_activations, set_kernel, with_f32_slice, BlockLinear, Linear, LinearWeight, LowRank, Rtn, Stored,
};
pub use whittle_kernels::Isa;
