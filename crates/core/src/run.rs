//! How a model runs: which integer kernels, how block layers quantize their activations, and on which
//! device. A [`RunConfig`] is given when a model is loaded and carried by the model: every
//! [`crate::Linear`] holds its resolved [`Dispatch`], so two models with different configurations can run
//! side by side in one process (there are no process-wide switches).

use candle_core::Device;
use whittle_kernels::Isa;

/// The run options of a model, as `--kernel`, `--fine-activations`, `--float-activations` and the device
/// choose them.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Forces the integer kernels to one implementation; `None` = the best this CPU has ([`Isa::detect`]).
    pub isa: Option<Isa>,
    /// Quantize the activations of every block layer per 32 values, also those whose format llama.cpp runs
    /// against 256-value activation blocks (K-quants): finer, so slightly more accurate than llama.cpp.
    pub fine_activations: bool,
    /// Run block layers (GGUF types, `wNa16` groups) against f32 activations instead of int8 ones: each
    /// layer's weights dequantized to f32 once (on first use) and an f32 GEMM. What `a16` means and what ONNX
    /// Runtime's `MatMulNBits` computes at `accuracy_level` 0, so a run that must agree with such a runtime
    /// to float rounding uses it; it costs 8× the 4-bit weights' memory and decodes slower.
    pub float_activations: bool,
    /// Where the model's tensors live.
    pub device: Device,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self { isa: None, fine_activations: false, float_activations: false, device: crate::backend::cpu::device() }
    }
}

impl RunConfig {
    /// The per-layer choices this configuration resolves to on this CPU.
    pub fn dispatch(&self) -> Dispatch {
        Dispatch {
            isa: self.isa.unwrap_or_else(Isa::detect),
            fine_activations: self.fine_activations,
            float_activations: self.float_activations,
        }
    }
}

/// What one Linear runs with: the resolved kernel implementation and the activation-block choice. Read on
/// every forward (a copy of two fields; no lock, no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    /// The integer kernels' implementation.
    pub isa: Isa,
    /// See [`RunConfig::fine_activations`].
    pub fine_activations: bool,
    /// See [`RunConfig::float_activations`].
    pub float_activations: bool,
}

impl Default for Dispatch {
    /// The best kernels this CPU has, activation blocks as llama.cpp chooses them.
    fn default() -> Self {
        Dispatch { isa: Isa::detect(), fine_activations: false, float_activations: false }
    }
}

impl Dispatch {
    /// The block kernels exist as AVX-512 VNNI and scalar reference (AVX2 machines use the reference).
    pub fn block_isa(self) -> Isa {
        match self.isa {
            Isa::Avx512Vnni => Isa::Avx512Vnni,
            _ => Isa::Ref,
        }
    }
}
