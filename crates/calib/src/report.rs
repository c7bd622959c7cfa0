//! What a pass reports per layer and in total (the engine's solvers and every quantization or pruning pass).

use serde::Serialize;

/// What happened to one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub scheme: String,
    pub params: usize,
    pub bpw: f64,
    /// Root-mean-square error of the dequantized weight against the original.
    pub weight_rmse: f64,
    pub seconds: f64,
    /// Mean squared error of the layer's output against the float layer on calibration rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_mse: Option<f64>,
    /// The same error with plain round-to-nearest, for methods that improve on it (GPTQ).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtn_output_mse: Option<f64>,
    /// What the pass had to change (e.g. a smaller group where the requested one does not divide the width).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// A pass's report: per layer, and totals.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub layers: Vec<LayerReport>,
    pub linear_bytes_before: usize,
    pub linear_bytes_after: usize,
    pub seconds: f64,
}

/// Root-mean-square difference of two equally long slices.
pub fn rmse(a: &[f32], b: &[f32]) -> f64 {
    (a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len().max(1) as f64).sqrt()
}
