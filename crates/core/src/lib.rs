//! whittle-core: the tensor facade over candle, devices, errors and the `Linear` seam.
//!
//! Every projection inside a Transformer block is a [`Linear`]. Passes (quantize, prune, low-rank, ...)
//! walk a model and replace the representation behind a `Linear`; the runtime only ever calls
//! [`Linear::forward`], so a new representation is one new variant of [`LinearWeight`], one codec
//! ([`codec`]) and its forward in each backend ([`backend`]).
//!
//! - [`linear`]: the representation ([`Linear`], [`LinearWeight`], [`LowRank`], [`BlockLinear`]).
//! - [`rtn`]: round-to-nearest grouped quantization ([`Rtn`]), the one grid every quantizer rounds to.
//! - [`sparse`]: pruned weights without their zeros.
//! - [`codec`]: writing and reading each representation's tensors.
//! - [`backend`]: where Linears run ([`backend::cpu`]: the device, kernel dispatch, the forward).
//! - [`run`]: the run configuration a model carries ([`RunConfig`], resolved per layer to a [`Dispatch`]).

pub mod backend;
pub mod codec;
pub mod error;
pub mod linear;
pub mod observe;
pub mod ops;
pub mod rtn;
pub mod run;
pub mod sparse;

pub use backend::cpu::with_f32_slice;
pub use candle_core;
pub use candle_core::{DType, Device, Tensor};
pub use codec::Stored;
pub use error::{option_words, Error, InvalidOption, Result};
pub use linear::{BlockLinear, Linear, LinearWeight, LowRank};
pub use rtn::Rtn;
pub use run::{Dispatch, RunConfig};
pub use whittle_kernels::Isa;
