//! LLaMA-style decoders (Touvron et al. 2023, <https://arxiv.org/abs/2302.13971>), as in Hugging Face
//! `modeling_llama.py`: pre-RMSNorm blocks, SwiGLU MLP, rotary position embeddings (the "rotate half"
//! convention of HF checkpoints), grouped-query attention, tied or untied embeddings.
//!
//! Mistral and Qwen2 are config differences: Qwen2 adds biases to q/k/v (`attention_bias`); Mistral's
//! sliding window only matters past its 4096-token window, which whittle does not apply yet.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;
use whittle_core::{with_f32_slice, Linear, LinearWeight, RunConfig, Stored};
use whittle_formats::gguf::Gguf;

use crate::bert::push_linear;
use crate::nn::{attention, embed, RmsNorm};
use crate::weights::Weights;
use crate::{Error, Result};

/// `config.json` as Hugging Face writes it for `model_type: llama | mistral | qwen2`.
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `"linear"`).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's smooth per-frequency scaling (HF `"llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Explicit per-frequency divisors (GGUF's `rope_freqs.weight`).
    Divisors(Vec<f32>),
}

/// Resolved LLaMA-family configuration.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Head counts and FFN width of an unpruned block; blocks carry their own.
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
}

impl LlamaConfig {
    pub fn from_hf(c: &HfLlamaConfig, model_type: &str, path: &Path) -> Result<Self> {
        let field = |f: &str, msg: String| Error::Config { path: path.into(), field: f.into(), msg };
        if c.hidden_act != "silu" {
            return Err(field("hidden_act", format!("`{}` is not supported (only `silu`)", c.hidden_act)));
        }
        if c.mlp_bias == Some(true) {
            return Err(field("mlp_bias", "MLP biases are not supported".into()));
        }
        if c.num_attention_heads == 0 {
            return Err(field("num_attention_heads", "must be positive".into()));
        }
        let kv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if kv == 0 || !c.num_attention_heads.is_multiple_of(kv) {
            return Err(field(
                "num_key_value_heads",
                format!("{kv} does not divide num_attention_heads {}", c.num_attention_heads),
            ));
        }
        for (name, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(field(name, "must be at least 1".into()));
            }
        }
        let head_dim = match c.head_dim {
            Some(d) => d,
            None if c.hidden_size.is_multiple_of(c.num_attention_heads) => c.hidden_size / c.num_attention_heads,
            None => {
                return Err(field(
                    "num_attention_heads",
                    format!(
                        "{} does not divide hidden_size {} (and no head_dim is given)",
                        c.num_attention_heads, c.hidden_size
                    ),
                ))
            }
        };
        // RoPE rotates pairs of dimensions.
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(field("head_dim", format!("{head_dim}: must be a positive even number (RoPE rotates pairs)")));
        }
        let rope_scaling = match &c.rope_scaling {
            None | Some(serde_json::Value::Null) => RopeScaling::None,
            Some(v) => {
                let ty = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("");
                let num = |k: &str| -> Result<f64> {
                    v.get(k)
                        .and_then(|x| x.as_f64())
                        .ok_or_else(|| field("rope_scaling", format!("missing number `{k}`")))
                };
                match ty {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: num("factor")? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    },
                    other => {
                        return Err(field(
                            "rope_scaling",
                            format!("type `{other}` is not supported (default, linear, llama3)"),
                        ))
                    }
                }
            }
        };
        Ok(Self {
            model_type: model_type.into(),
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: kv,
            intermediate_size: c.intermediate_size,
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            // transformers' LlamaConfig defaults to untied; Qwen2 checkpoints say so explicitly.
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            attention_bias: c.attention_bias.unwrap_or(model_type == "qwen2"),
        })
    }

    /// Reads `llama.*` (or `deci.*`: per-layer widths) metadata of a GGUF file; per-layer arrays give block
    /// 0's value here, and each block takes its own widths from its tensors.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let a = match g.get("general.architecture").and_then(|v| v.as_str()) {
            Some("deci") => "deci",
            _ => "llama",
        };
        let u = |k: &str| -> Result<usize> { Ok(g.require_u64(&format!("{a}.{k}"))? as usize) };
        let hidden = u("embedding_length")?;
        let heads_key = format!("{a}.attention.head_count");
        let heads = match g.require(&heads_key)? {
            whittle_formats::gguf::Value::Array(v) => v.first().and_then(|x| x.as_u64()).unwrap_or(0) as usize,
            v => v.as_u64().unwrap_or(0) as usize,
        };
        if heads == 0 {
            return Err(Error::Format(g.meta_err(&heads_key, "must be a positive integer".into())));
        }
        let kv = match g.get(&format!("{a}.attention.head_count_kv")) {
            Some(whittle_formats::gguf::Value::Array(v)) => {
                v.first().and_then(|x| x.as_u64()).unwrap_or(heads as u64) as usize
            }
            Some(v) => v.as_u64().unwrap_or(heads as u64) as usize,
            None => heads,
        };
        let head_dim = match g.get(&format!("{a}.attention.key_length")) {
            Some(v) => v.as_u64().unwrap_or(0) as usize,
            None => hidden / heads,
        };
        if let Some(rd) = g.get(&format!("{a}.rope.dimension_count")).and_then(|v| v.as_u64()) {
            if rd as usize != head_dim {
                return Err(Error::Format(g.meta_err(
                    &format!("{a}.rope.dimension_count"),
                    format!("partial rotary embeddings ({rd} of {head_dim} dims) are not supported"),
                )));
            }
        }
        let vocab = match g.get(&format!("{a}.vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => g.tensor("token_embd.weight").map(|t| t.shape()[0]).unwrap_or(0),
        };
        let mut rope_scaling = RopeScaling::None;
        if let Some(ty) = g.get(&format!("{a}.rope.scaling.type")).and_then(|v| v.as_str()) {
            let factor = g.get_f64(&format!("{a}.rope.scaling.factor"))?.unwrap_or(1.0);
            rope_scaling = match ty {
                "none" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor },
                other => {
                    return Err(Error::Format(
                        g.meta_err(&format!("{a}.rope.scaling.type"), format!("`{other}` is not supported")),
                    ))
                }
            };
        }
        if let Some(t) = g.tensor("rope_freqs.weight") {
            let v: Vec<f32> = g.dequantize(t)?.flatten_all()?.to_vec1()?;
            rope_scaling = RopeScaling::Divisors(v);
        }
        Ok(Self {
            model_type: "llama".into(),
            vocab_size: vocab,
            hidden_size: hidden,
            num_layers: u("block_count")?,
            num_heads: heads,
            num_kv_heads: kv,
            intermediate_size: match g.require(&format!("{a}.feed_forward_length"))? {
                whittle_formats::gguf::Value::Array(v) => v.first().and_then(|x| x.as_u64()).unwrap_or(0) as usize,
                _ => u("feed_forward_length")?,
            },
            head_dim,
            rms_norm_eps: g.get_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: g.get_f64(&format!("{a}.rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: g.get(&format!("{a}.context_length")).and_then(|v| v.as_u64()).unwrap_or(2048)
                as usize,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            attention_bias: g.tensor("blk.0.attn_q.bias").is_some(),
        })
    }

    /// RoPE inverse frequencies `θ^(-2i/d)`, rescaled as configured (HF `_compute_default_rope_parameters`
    /// and `_compute_llama3_parameters`), in f32 as transformers computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> =
            (0..d / 2).map(|i| (1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64)) as f32).collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Divisors(div) => base.iter().zip(div).map(|(f, d)| f / d).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen; // neither high nor low frequency (no NaNs here)
                        if medium {
                            let s = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            ((1.0 - s) * scaled / factor + s * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect()
            }
        }
    }

    /// The `config.json` transformers needs to load this model (uniform widths only).
    pub fn to_hf_json(&self, blocks: &[LlamaBlock], bos: Option<u32>, eos: &[u32]) -> serde_json::Value {
        let b0 = blocks.first();
        let mut v = serde_json::json!({
            "architectures": [match self.model_type.as_str() { "qwen2" => "Qwen2ForCausalLM", "mistral" => "MistralForCausalLM", _ => "LlamaForCausalLM" }],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": b0.map_or(self.intermediate_size, |b| b.gate.out_features()),
            "num_hidden_layers": blocks.len(),
            "num_attention_heads": b0.map_or(self.num_heads, |b| b.n_head),
            "num_key_value_heads": b0.map_or(self.num_kv_heads, |b| b.n_kv_head),
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        if let Some(b) = bos {
            v["bos_token_id"] = b.into();
        }
        match eos {
            [] => {}
            [e] => v["eos_token_id"] = (*e).into(),
            many => v["eos_token_id"] = many.into(),
        }
        match &self.rope_scaling {
            RopeScaling::None | RopeScaling::Divisors(_) => {}
            RopeScaling::Linear { factor } => {
                v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": factor,
                    "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings})
            }
        }
        v
    }
}

/// One pre-norm decoder block: `x += attn(norm(x)); x += mlp(norm(x))`.
#[derive(Debug, Clone)]
pub struct LlamaBlock {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub attn_norm: RmsNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub mlp_norm: RmsNorm,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// Keys and values of past positions, one entry per block.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>, // each (B, KV, S, D)
}

impl KvCache {
    pub fn new(n_blocks: usize) -> Self {
        Self { kv: vec![None; n_blocks] }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.kv.first().and_then(|e| e.as_ref()).map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LlamaBlock {
    /// This block's widths (heads, KV heads, head size, FFN neurons).
    pub fn dims(&self, head_dim: usize) -> crate::BlockDims {
        crate::BlockDims { n_head: self.n_head, n_kv_head: self.n_kv_head, head_dim, ffn: self.gate.out_features() }
    }

    /// # Shapes
    /// - `x`: (B, T, C); `cos`, `sin`: (T, D/2); `mask`: (T, S) additive or None; returns (B, T, C)
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
        head_dim: usize,
    ) -> Result<Tensor> {
        let a = self.mix(&self.attn_norm.forward(x)?, cos, sin, mask, cache, head_dim)?;
        let x = (x + self.o.forward(&a)?)?;
        let m = self.gate_up(&self.mlp_norm.forward(&x)?)?;
        Ok((x + self.down.forward(&m)?)?)
    }

    /// The forward in the stages of the layer-wise engine, each ending at the input of the next Linears:
    /// stage 0 maps the block input `x` to q/k/v's input, 1 that to o's, 2 to gate/up's (adding the attention
    /// residual to `x`), 3 to down's, and 4 finishes `x` (the block output) and returns `None`.
    #[allow(clippy::too_many_arguments)]
    pub fn stage(
        &self,
        s: usize,
        x: &mut Tensor,
        input: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        head_dim: usize,
    ) -> Result<Option<Tensor>> {
        let input = || input.ok_or_else(|| Error::Usage(format!("stage {s} of a LLaMA block needs its input")));
        Ok(match s {
            0 => Some(self.attn_norm.forward(x)?),
            1 => Some(self.mix(input()?, cos, sin, mask, &mut None, head_dim)?),
            2 => {
                *x = (&*x + self.o.forward(input()?)?)?;
                Some(self.mlp_norm.forward(x)?)
            }
            3 => Some(self.gate_up(input()?)?),
            _ => {
                *x = (&*x + self.down.forward(input()?)?)?;
                None
            }
        })
    }

    /// Attention from q/k/v's input `hx` (B, T, C) to o's input (B, T, H·D), through the cache when one is
    /// given.
    fn mix(
        &self,
        hx: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
        head_dim: usize,
    ) -> Result<Tensor> {
        let (b, t, _c) = hx.dims3()?;
        let (h, kvh) = (self.n_head, self.n_kv_head);
        let [q, k, v]: [Tensor; 3] =
            Linear::forward_shared(&[&self.q, &self.k, &self.v], hx)?.try_into().expect("three outputs");
        let q = q.reshape((b, t, h, head_dim))?.transpose(1, 2)?.contiguous()?; // (B, H, T, D)
        let k = k.reshape((b, t, kvh, head_dim))?.transpose(1, 2)?.contiguous()?; // (B, KV, T, D)
        let v = v.reshape((b, t, kvh, head_dim))?.transpose(1, 2)?; // (B, KV, T, D)
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?), // (B, KV, S, D)
            None => (k, v.contiguous()?),
        };
        *cache = Some((k.clone(), v.clone()));
        if b == 1 && t == 1 {
            // Decoding one token: fused single-query attention over the cache.
            let s = k.dim(2)?;
            let a = with_f32_slice(&q, |qv| {
                with_f32_slice(&k, |kv| {
                    with_f32_slice(&v, |vv| crate::nn::decode_attention(qv, kv, vv, h, kvh, s, head_dim))
                })
            })???;
            return Ok(Tensor::from_vec(a, (1, 1, h * head_dim), hx.device())?);
        }
        if mask.is_some() {
            // Prefill: `mask` is the causal mask (T, S) of `block_inputs` / `forward_hidden`, applied by position
            // in the fused kernel (no (B, H, T, S) mask add, no repeated kv heads).
            return Ok(whittle_core::ops::causal_attention(&q, &k, &v)?);
        }
        let rep = h / kvh;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(t.clone());
            }
            let (b, kvh, s, d) = t.dims4()?;
            Ok(t.unsqueeze(2)?.expand((b, kvh, rep, s, d))?.reshape((b, kvh * rep, s, d))?)
            // (B, H, S, D)
        };
        let a = attention(&q, &repeat(&k)?, &repeat(&v)?, mask)?; // (B, H, T, D)
        Ok(a.transpose(1, 2)?.reshape((b, t, h * head_dim))?)
    }

    /// One decoding step of `B` independent sequences, each one new token after its own cache: the Linears
    /// run on all `B` rows together (their weights are read once per step), attention per sequence at its
    /// own position. Row `i` computes exactly what [`LlamaBlock::forward`] computes for that sequence alone.
    ///
    /// # Shapes
    /// - `x`: (B, 1, C); `rope[i]`: cos and sin (1, D/2) of sequence `i`'s position; returns (B, 1, C)
    pub fn forward_step(
        &self,
        x: &Tensor,
        rope: &[(Tensor, Tensor)],
        caches: &mut [&mut Option<(Tensor, Tensor)>],
        head_dim: usize,
    ) -> Result<Tensor> {
        let (b, t, _c) = x.dims3()?;
        if t != 1 || rope.len() != b || caches.len() != b {
            return Err(Error::Usage(format!(
                "a decoding step takes one token per sequence: {b}×{t} tokens, {} positions, {} caches",
                rope.len(),
                caches.len()
            )));
        }
        let (h, kvh) = (self.n_head, self.n_kv_head);
        let hx = self.attn_norm.forward(x)?;
        let [q, k, v]: [Tensor; 3] =
            Linear::forward_shared(&[&self.q, &self.k, &self.v], &hx)?.try_into().expect("three outputs");
        let mut mixed = Vec::with_capacity(b);
        for (i, ((cos, sin), cache)) in rope.iter().zip(caches.iter_mut()).enumerate() {
            let qi = q.narrow(0, i, 1)?.reshape((1, 1, h, head_dim))?.transpose(1, 2)?.contiguous()?; // (1, H, 1, D)
            let ki = k.narrow(0, i, 1)?.reshape((1, 1, kvh, head_dim))?.transpose(1, 2)?.contiguous()?; // (1, KV, 1, D)
            let vi = v.narrow(0, i, 1)?.reshape((1, 1, kvh, head_dim))?.transpose(1, 2)?; // (1, KV, 1, D)
            let qi = candle_nn::rotary_emb::rope(&qi, cos, sin)?;
            let ki = candle_nn::rotary_emb::rope(&ki, cos, sin)?;
            let (ki, vi) = match cache.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &ki], 2)?, Tensor::cat(&[&pv, &vi], 2)?), // (1, KV, S, D)
                None => (ki, vi.contiguous()?),
            };
            **cache = Some((ki.clone(), vi.clone()));
            let s = ki.dim(2)?;
            let a = with_f32_slice(&qi, |qv| {
                with_f32_slice(&ki, |kv| {
                    with_f32_slice(&vi, |vv| crate::nn::decode_attention(qv, kv, vv, h, kvh, s, head_dim))
                })
            })???;
            mixed.push(Tensor::from_vec(a, (1, 1, h * head_dim), x.device())?); // (1, 1, H·D)
        }
        let a = Tensor::cat(&mixed, 0)?; // (B, 1, H·D)
        let x = (x + self.o.forward(&a)?)?;
        let m = self.gate_up(&self.mlp_norm.forward(&x)?)?;
        Ok((x + self.down.forward(&m)?)?)
    }

    /// silu(gate(n)) · up(n): down's input (B, T, F) from gate/up's `n`.
    fn gate_up(&self, n: &Tensor) -> Result<Tensor> {
        let [g, u]: [Tensor; 2] = Linear::forward_shared(&[&self.gate, &self.up], n)?.try_into().expect("two outputs");
        Ok(whittle_core::ops::silu_mul(&g, &u)?)
    }

    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.q),
            ("self_attn.k_proj", &self.k),
            ("self_attn.v_proj", &self.v),
            ("self_attn.o_proj", &self.o),
            ("mlp.gate_proj", &self.gate),
            ("mlp.up_proj", &self.up),
            ("mlp.down_proj", &self.down),
        ]
    }

    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("self_attn.q_proj", &mut self.q),
            ("self_attn.k_proj", &mut self.k),
            ("self_attn.v_proj", &mut self.v),
            ("self_attn.o_proj", &mut self.o),
            ("mlp.gate_proj", &mut self.gate),
            ("mlp.up_proj", &mut self.up),
            ("mlp.down_proj", &mut self.down),
        ]
    }
}

/// Stages: q/k/v read the normalised block input, o the attention's mix, gate/up the normalised residual, down
/// the gated MLP activations.
impl crate::layout::BlockLayout for LlamaBlock {
    const STAGES: &'static [&'static [&'static str]] = &[
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        &["self_attn.o_proj"],
        &["mlp.gate_proj", "mlp.up_proj"],
        &["mlp.down_proj"],
    ];
    const PREFIX: &'static str = "model.layers.";
}

/// A LLaMA-family decoder.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor, // (V, C)
    pub blocks: Vec<LlamaBlock>,
    pub norm: RmsNorm,
    /// The output projection; shares `embed_tokens`' storage when `config.tie_word_embeddings`.
    pub lm_head: Linear,
    inv_freq: Vec<f32>,
    /// How the model runs ([`crate::Model::set_run_config`]).
    pub run: RunConfig,
}

/// llama.cpp permutes the rows of Q and K so its interleaved RoPE sees HF's "rotate half" pairs;
/// undo it: (n_head, D/2, 2, cols) -> (n_head, 2, D/2, cols). (transformers' `reverse_permute_weights`.)
fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product();
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// The opposite of [`unpermute_rows`], for writing GGUF.
pub fn permute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product();
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, 2, half, cols))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

impl Llama {
    /// Builds the model from HF-named tensors; `from_gguf` undoes llama.cpp's Q/K row permutation.
    pub fn load(config: LlamaConfig, w: &Weights, from_gguf: bool) -> Result<Self> {
        let c = &config;
        let (hs, hd) = (c.hidden_size, c.head_dim);
        // In the dtype dense weights are kept in: a tied f16 / bf16 table stays 16-bit and serves the head too.
        let embed_tokens = w.get_weight("model.embed_tokens.weight", &[c.vocab_size, hs])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}.");
            let rms = |n: &str| -> Result<RmsNorm> {
                Ok(RmsNorm { weight: w.get(&format!("{p}{n}.weight"), &[hs])?, eps: c.rms_norm_eps })
            };
            let mut q = w.linear_any(&format!("{p}self_attn.q_proj"), None, Some(hs), c.attention_bias)?;
            let mut k = w.linear_any(&format!("{p}self_attn.k_proj"), None, Some(hs), c.attention_bias)?;
            let (qw, kw) = (q.out_features(), k.out_features());
            if qw % hd != 0 || kw % hd != 0 || kw == 0 || (qw / hd) % (kw / hd) != 0 {
                return Err(w.shape_err(&format!("{p}self_attn.k_proj.weight"), &[c.num_kv_heads * hd, hs], &[kw, hs]));
            }
            let (n_head, n_kv_head) = (qw / hd, kw / hd);
            if from_gguf {
                q = unpermute_linear(q, n_head)?;
                k = unpermute_linear(k, n_kv_head)?;
            }
            let v = w.linear(&format!("{p}self_attn.v_proj"), kw, hs, c.attention_bias)?;
            let o = w.linear(&format!("{p}self_attn.o_proj"), hs, qw, false)?;
            let gate = w.linear_any(&format!("{p}mlp.gate_proj"), None, Some(hs), false)?;
            let f = gate.out_features();
            let up = w.linear(&format!("{p}mlp.up_proj"), f, hs, false)?;
            let down = w.linear(&format!("{p}mlp.down_proj"), hs, f, false)?;
            blocks.push(LlamaBlock {
                n_head,
                n_kv_head,
                attn_norm: rms("input_layernorm")?,
                q,
                k,
                v,
                o,
                mlp_norm: rms("post_attention_layernorm")?,
                gate,
                up,
                down,
            });
        }
        let norm = RmsNorm { weight: w.get("model.norm.weight", &[hs])?, eps: c.rms_norm_eps };
        let tied = c.tie_word_embeddings || !w.contains("lm_head.weight");
        let lm_head = if tied {
            // A block-quantized table runs the head in its block format (as llama.cpp does); else f32.
            if w.is_block("model.embed_tokens.weight") {
                w.linear("model.embed_tokens", c.vocab_size, hs, false)?
            } else {
                Linear::dense(embed_tokens.clone(), None)?
            }
        } else {
            w.linear("lm_head", c.vocab_size, hs, false)?
        };
        let mut config = config;
        config.tie_word_embeddings = tied;
        let inv_freq = config.inv_freq();
        Ok(Self { config, embed_tokens, blocks, norm, lm_head, inv_freq, run: RunConfig::default() })
    }

    /// cos and sin of the rotary angles for positions `start..start+t`, (T, D/2) each, f32.
    fn rope_tables(&self, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(t * half);
        for p in start..start + t {
            angles.extend(self.inv_freq.iter().map(|f| p as f32 * f));
        }
        let a = Tensor::from_vec(angles, (t, half), self.embed_tokens.device())?;
        Ok((a.cos()?, a.sin()?))
    }

    /// Token embeddings of `ids` (B, T) -> (B, T, C): the input of block 0.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        embed(&self.embed_tokens, ids)
    }

    /// RoPE tables and causal mask for a fresh sequence of `t` tokens, as [`LlamaBlock::forward`] takes them:
    /// for running blocks one at a time (layer-wise calibration).
    pub fn block_inputs(&self, t: usize) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (cos, sin) = self.rope_tables(0, t)?;
        let mask = if t > 1 {
            let m: Vec<f32> =
                (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
            Some(Tensor::from_vec(m, (t, t), self.embed_tokens.device())?)
        } else {
            None
        };
        Ok((cos, sin, mask))
    }

    /// Runs `ids` after the positions already in `cache`, appending to it; returns final hidden states.
    ///
    /// # Shapes
    /// - `ids`: (B, T) u32; returns (B, T, C)
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        if cache.kv.len() != self.blocks.len() {
            *cache = KvCache::new(self.blocks.len());
        }
        let past = cache.len();
        let (cos, sin) = self.rope_tables(past, t)?;
        // Causal mask over (T, past + T): query i sees keys 0..=past+i.
        let mask = if t > 1 {
            let s = past + t;
            let m: Vec<f32> =
                (0..t).flat_map(|i| (0..s).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY })).collect();
            Some(Tensor::from_vec(m, (t, s), self.embed_tokens.device())?)
        } else {
            None
        };
        let mut x = embed(&self.embed_tokens, ids)?; // (B, T, C)
        for (blk, kv) in self.blocks.iter().zip(cache.kv.iter_mut()) {
            x = blk.forward(&x, &cos, &sin, mask.as_ref(), kv, self.config.head_dim)?;
        }
        self.norm.forward(&x)
    }

    /// Logits for every position: (B, T) u32 -> (B, T, V).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        Ok(self.lm_head.forward(&h)?)
    }

    /// Logits of the last position only: (B, T) u32 -> (B, V).
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?; // (B, C)
        Ok(self.lm_head.forward(&last)?)
    }

    /// One decoding step for several sequences at once (continuous batching): sequence `i` appends
    /// `tokens[i]` after the positions in `caches[i]`; returns the next-token logits of every sequence.
    /// Each row equals [`Llama::forward_last`] of that sequence alone, but every Linear (and the head) runs
    /// once on all rows, so the weights are read once per step rather than once per sequence.
    ///
    /// # Shapes
    /// - `tokens`: B ids; returns (B, V)
    pub fn forward_step(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let b = tokens.len();
        if b == 0 || caches.len() != b {
            return Err(Error::Usage(format!(
                "a decoding step needs one cache per token: {b} tokens, {} caches",
                caches.len()
            )));
        }
        let mut rope = Vec::with_capacity(b);
        for c in caches.iter_mut() {
            if c.kv.len() != self.blocks.len() {
                **c = KvCache::new(self.blocks.len());
            }
            rope.push(self.rope_tables(c.len(), 1)?); // (1, D/2) each
        }
        let ids = Tensor::new(tokens, self.embed_tokens.device())?.unsqueeze(1)?; // (B, 1)
        let mut x = embed(&self.embed_tokens, &ids)?; // (B, 1, C)
        for (j, blk) in self.blocks.iter().enumerate() {
            let mut kv: Vec<&mut Option<(Tensor, Tensor)>> = caches.iter_mut().map(|c| &mut c.kv[j]).collect();
            x = blk.forward_step(&x, &rope, &mut kv, self.config.head_dim)?;
        }
        let h = self.norm.forward(&x)?.squeeze(1)?; // (B, C)
        Ok(self.lm_head.forward(&h)?)
    }

    /// Every parameter with its HF name (the tied head is not repeated).
    pub fn named_tensors(&self) -> Result<Vec<(String, Stored)>> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), Stored::Tensor(self.embed_tokens.clone()))];
        for (i, b) in self.blocks.iter().enumerate() {
            v.push((format!("model.layers.{i}.input_layernorm.weight"), Stored::Tensor(b.attn_norm.weight.clone())));
            for (n, l) in b.linears() {
                push_linear(&mut v, &format!("model.layers.{i}.{n}"), l)?;
            }
            v.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                Stored::Tensor(b.mlp_norm.weight.clone()),
            ));
        }
        v.push(("model.norm.weight".into(), Stored::Tensor(self.norm.weight.clone())));
        if !self.config.tie_word_embeddings {
            push_linear(&mut v, "lm_head", &self.lm_head)?;
        }
        Ok(v)
    }
}

fn unpermute_linear(l: Linear, n_head: usize) -> Result<Linear> {
    let b = match &l.bias {
        Some(b) => Some(unpermute_rows(b, n_head)?),
        None => None,
    };
    if let LinearWeight::Block(bl) = &l.weight {
        // Whole rows move: permute the codes, scales and mins of each row.
        let rows = l.out_features();
        let idx = Tensor::arange(0u32, rows as u32, &l.device())?.to_dtype(DType::F32)?.reshape((rows, 1))?;
        let perm: Vec<usize> =
            unpermute_rows(&idx, n_head)?.flatten_all()?.to_vec1::<f32>()?.iter().map(|&v| v as usize).collect();
        let bw = bl.packed.unpack().select_rows(&perm);
        return Ok(Linear::block(&bw, &bl.format, bl.bpw, b)?);
    }
    // A dense weight keeps its dtype (an f16 q_proj stays f16).
    let w = match &l.weight {
        LinearWeight::Dense(t) => unpermute_rows(t, n_head)?,
        _ => unpermute_rows(&l.dequantize()?, n_head)?,
    };
    Ok(Linear::dense(w, b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A batched decoding step equals each sequence decoded alone (the same arithmetic per row).
    #[test]
    fn forward_step_matches_one_sequence_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        crate::testing::tiny_llama(dir.path());
        let l = crate::load(dir.path().to_str().unwrap(), &Default::default()).unwrap();
        let crate::Model::Llama(m) = &l.model else { panic!("tiny_llama is a decoder") };
        let dev = m.embed_tokens.device().clone();
        let prompts: [&[u32]; 3] = [&[1, 5, 9], &[1, 7], &[1, 3, 4, 8, 11]];
        let mut alone: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(m.blocks.len())).collect();
        let mut batched = alone.clone();
        let mut next: Vec<u32> = Vec::new();
        for (p, (a, b)) in prompts.iter().zip(alone.iter_mut().zip(batched.iter_mut())) {
            let ids = Tensor::new(*p, &dev).unwrap().unsqueeze(0).unwrap();
            let la: Vec<f32> = m.forward_last(&ids, a).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
            m.forward_last(&ids, b).unwrap();
            next.push(crate::generate::argmax(&la));
        }
        for step in 0..6 {
            // Sequence 1 leaves after step 2: the batch shrinks, as in continuous batching.
            let live: Vec<usize> = if step < 3 { vec![0, 1, 2] } else { vec![0, 2] };
            let toks: Vec<u32> = live.iter().map(|&i| next[i]).collect();
            let mut refs: Vec<&mut KvCache> =
                batched.iter_mut().enumerate().filter(|(i, _)| live.contains(i)).map(|(_, c)| c).collect();
            let rows: Vec<Vec<f32>> = m.forward_step(&toks, &mut refs).unwrap().to_vec2().unwrap();
            for (r, &i) in live.iter().enumerate() {
                let ids = Tensor::new(&[next[i]], &dev).unwrap().unsqueeze(0).unwrap();
                let want: Vec<f32> =
                    m.forward_last(&ids, &mut alone[i]).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
                let err = want.iter().zip(&rows[r]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err <= MAX_STEP_ABS_ERR, "step {step}, sequence {i}: max |Δlogit| {err}");
                assert_eq!(crate::generate::argmax(&want), crate::generate::argmax(&rows[r]));
                next[i] = crate::generate::argmax(&want);
                assert_eq!(alone[i].len(), batched[i].len());
            }
        }
        let mut none: Vec<&mut KvCache> = Vec::new();
        assert!(m.forward_step(&[], &mut none).is_err(), "an empty step is an error, not a panic");
    }

    /// Rows of a batched GEMM may sum in another order than a single row; logits stay this close.
    const MAX_STEP_ABS_ERR: f32 = 1e-4;

    /// f16 weights stay f16 (Linears, the embedding table and the tied head), `dtype: F32` widens them, and
    /// both give the same logits; `dtype: BF16` rounds an f32 model's weights to bf16 at load.
    #[test]
    fn half_weights_stay_half_unless_asked() {
        let (src, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        crate::testing::tiny_llama(src.path());
        let l = crate::load(src.path().to_str().unwrap(), &Default::default()).unwrap();
        let out = dir.path().join("f16");
        crate::save::save_hf_dir(&l, &out, DType::F16).unwrap();
        let load = |p: &std::path::Path, dtype| {
            let o = crate::LoadOptions { dtype, ..Default::default() };
            let crate::Model::Llama(m) = crate::load(p.to_str().unwrap(), &o).unwrap().model else { unreachable!() };
            m
        };
        let (half, wide) = (load(&out, None), load(&out, Some(DType::F32)));
        assert_eq!(half.embed_tokens.dtype(), DType::F16);
        assert_eq!(half.blocks[0].q.storage_name(), "f16");
        assert_eq!(half.blocks[1].down.storage_name(), "f16");
        if half.config.tie_word_embeddings {
            assert_eq!(half.lm_head.storage_name(), "f16");
        }
        assert_eq!(wide.embed_tokens.dtype(), DType::F32);
        assert_eq!(wide.blocks[0].q.storage_name(), "f32");
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu).unwrap();
        let a = half.forward(&ids, &mut KvCache::new(half.blocks.len())).unwrap();
        let b = wide.forward(&ids, &mut KvCache::new(wide.blocks.len())).unwrap();
        let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= MAX_STEP_ABS_ERR, "f16 kept vs widened: max |Δlogit| {err}");
        let bf = load(src.path(), Some(DType::BF16));
        assert_eq!(bf.blocks[0].gate.storage_name(), "bf16");
        assert_eq!(bf.embed_tokens.dtype(), DType::BF16);
    }

    #[test]
    fn permute_roundtrip() {
        let w = Tensor::arange(0f32, 48., &Device::Cpu).unwrap().reshape((8, 6)).unwrap();
        let back = unpermute_rows(&permute_rows(&w, 2).unwrap(), 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let p = permute_rows(&w, 2).unwrap().to_vec2::<f32>().unwrap();
        // Head 0 has rows 0..4 = halves [0,1] and [2,3]; interleaved: 0,2,1,3.
        assert_eq!(p[1], w.to_vec2::<f32>().unwrap()[2]);
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies() {
        let hf: HfLlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "hidden_size": 128, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
        .unwrap();
        let c = LlamaConfig::from_hf(&hf, "llama", Path::new("config.json")).unwrap();
        let mut plain = c.clone();
        plain.rope_scaling = RopeScaling::None;
        let (a, b) = (c.inv_freq(), plain.inv_freq());
        assert_eq!(a[0], b[0]); // highest frequency untouched
        assert!((a[31] - b[31] / 8.0).abs() < 1e-12); // lowest divided by the factor
    }
}
