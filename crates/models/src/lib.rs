//! whittle-models: the model families, one file each, and the one `Model` type every pass walks.
//!
//! A [`Model`] is embeddings, a list of blocks and a head; every projection is a
//! [`whittle_core::Linear`]. [`Model::linears`] / [`Model::linears_mut`] visit them by their
//! Hugging Face names (`encoder.layer.3.attention.self.query`, `model.layers.7.mlp.down_proj`, `lm_head`),
//! which are also the names recipes and override regexes match. Structural questions about those names
//! (is this a block's Linear or a head, which block, which stage of a block reads which input) are answered
//! here ([`Model::is_block_linear`], [`Model::block_linears`], [`Model::block_prefix`], [`BlockLayout`]),
//! so passes never match on the names themselves.

pub mod bert;
pub mod error;
pub mod generate;
pub mod layout;
pub mod llama;
pub mod loader;
pub mod names;
pub mod nn;
pub mod save;
pub mod stats;
pub mod testing;
pub mod text;
pub mod weights;

pub use error::{Error, Result};
pub use layout::BlockLayout;
pub use loader::{load, LoadOptions, Loaded, SourceFormat, SourceInfo};

use whittle_core::{Linear, RunConfig};

/// One in-memory model of any supported family.
#[derive(Debug, Clone)]
pub enum Model {
    Bert(bert::Bert),
    Llama(llama::Llama),
}

/// The widths of one block; they may differ between blocks after structured pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockDims {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
}

impl Model {
    /// `bert` or the decoder's `model_type` (`llama`, `mistral`, `qwen2`).
    pub fn family(&self) -> &str {
        match self {
            Model::Bert(_) => "bert",
            Model::Llama(m) => &m.config.model_type,
        }
    }

    pub fn is_decoder(&self) -> bool {
        matches!(self, Model::Llama(_))
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Model::Bert(m) => m.config.vocab_size,
            Model::Llama(m) => m.config.vocab_size,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Model::Bert(m) => m.config.hidden_size,
            Model::Llama(m) => m.config.hidden_size,
        }
    }

    /// The positions the model has: BERT's learned position embeddings, the context a LLaMA was trained for.
    pub fn max_positions(&self) -> usize {
        match self {
            Model::Bert(m) => m.config.max_position_embeddings,
            Model::Llama(m) => m.config.max_position_embeddings,
        }
    }

    pub fn n_blocks(&self) -> usize {
        match self {
            Model::Bert(m) => m.blocks.len(),
            Model::Llama(m) => m.blocks.len(),
        }
    }

    /// Widths of every block, in order.
    pub fn block_dims(&self) -> Vec<BlockDims> {
        match self {
            Model::Bert(m) => m.blocks.iter().map(|b| b.dims(m.config.head_dim)).collect(),
            Model::Llama(m) => m.blocks.iter().map(|b| b.dims(m.config.head_dim)).collect(),
        }
    }

    /// The parameters of each block's Linears, in block order.
    pub fn block_params(&self) -> Vec<usize> {
        let sum = |ls: &[(&str, &Linear)]| ls.iter().map(|(_, l)| l.num_params()).sum();
        match self {
            Model::Bert(m) => m.blocks.iter().map(|b| sum(&b.linears())).collect(),
            Model::Llama(m) => m.blocks.iter().map(|b| sum(&b.linears())).collect(),
        }
    }

    /// Every Linear with its HF name, blocks first in order, then the head.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = Vec::new();
        match self {
            Model::Bert(m) => {
                for (i, b) in m.blocks.iter().enumerate() {
                    let p = bert::BertBlock::PREFIX;
                    v.extend(b.linears().into_iter().map(|(n, l)| (format!("{p}{i}.{n}"), l)));
                }
                if let Some(p) = &m.pooler {
                    v.push(("pooler.dense".into(), p));
                }
            }
            Model::Llama(m) => {
                for (i, b) in m.blocks.iter().enumerate() {
                    let p = llama::LlamaBlock::PREFIX;
                    v.extend(b.linears().into_iter().map(|(n, l)| (format!("{p}{i}.{n}"), l)));
                }
                v.push(("lm_head".into(), &m.lm_head));
            }
        }
        v
    }

    /// Every Linear, mutably, in the order and with the names of [`Model::linears`].
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        match self {
            Model::Bert(m) => {
                for (i, b) in m.blocks.iter_mut().enumerate() {
                    let p = bert::BertBlock::PREFIX;
                    v.extend(b.linears_mut().into_iter().map(|(n, l)| (format!("{p}{i}.{n}"), l)));
                }
                if let Some(p) = &mut m.pooler {
                    v.push(("pooler.dense".into(), p));
                }
            }
            Model::Llama(m) => {
                for (i, b) in m.blocks.iter_mut().enumerate() {
                    let p = llama::LlamaBlock::PREFIX;
                    v.extend(b.linears_mut().into_iter().map(|(n, l)| (format!("{p}{i}.{n}"), l)));
                }
                v.push(("lm_head".into(), &mut m.lm_head));
            }
        }
        v
    }

    /// Whether the Linear named `name` (as [`Model::linears`] names them) belongs to a block, rather than to
    /// the head (`lm_head`, BERT's `pooler.dense`).
    pub fn is_block_linear(name: &str) -> bool {
        name.starts_with(llama::LlamaBlock::PREFIX) || name.starts_with(bert::BertBlock::PREFIX)
    }

    /// Whether the Linear named `name` is a head after the blocks (`lm_head`, BERT's `pooler.dense`), which
    /// passes leave in its precision unless told otherwise.
    pub fn is_head_linear(name: &str) -> bool {
        name == "lm_head" || name.starts_with("pooler.")
    }

    /// The start of block `i`'s names: `model.layers.3.`, `encoder.layer.3.`.
    pub fn block_prefix(&self, i: usize) -> String {
        match self {
            Model::Bert(_) => bert::BertBlock::prefix(i),
            Model::Llama(_) => llama::LlamaBlock::prefix(i),
        }
    }

    /// The blocks' Linears with their names: [`Model::linears`] without the head.
    pub fn block_linears(&self) -> Vec<(String, &Linear)> {
        self.linears().into_iter().filter(|(n, _)| Self::is_block_linear(n)).collect()
    }

    /// The blocks' Linears, mutably: [`Model::linears_mut`] without the head.
    pub fn block_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.linears_mut().into_iter().filter(|(n, _)| Self::is_block_linear(n)).collect()
    }

    /// Makes block `b` share block `leader`'s weights (the same tensors: one copy in memory).
    pub fn share_block(&mut self, b: usize, leader: usize) {
        match self {
            Model::Bert(m) => m.blocks[b] = m.blocks[leader].clone(),
            Model::Llama(m) => m.blocks[b] = m.blocks[leader].clone(),
        }
    }

    /// Runs the model as `rc` says: every Linear takes its kernels and activation blocks, and tensors the
    /// model makes go to its device. Two models with different configurations run side by side. (Weights
    /// already loaded stay where they are: the device is chosen when loading, [`LoadOptions::run`].)
    pub fn set_run_config(&mut self, rc: &RunConfig) {
        for (_, l) in self.linears_mut() {
            l.set_run_config(rc);
        }
        match self {
            Model::Bert(m) => m.run = rc.clone(),
            Model::Llama(m) => m.run = rc.clone(),
        }
    }

    /// The run configuration the model was loaded (or last set) with.
    pub fn run_config(&self) -> &RunConfig {
        match self {
            Model::Bert(m) => &m.run,
            Model::Llama(m) => &m.run,
        }
    }

    /// The device the model's tensors live on.
    pub fn device(&self) -> &candle_core::Device {
        &self.run_config().device
    }

    /// Every parameter tensor with its HF name, in its stored form, as `save` writes them.
    pub fn named_tensors(&self) -> Result<Vec<(String, whittle_core::Stored)>> {
        match self {
            Model::Bert(m) => m.named_tensors(),
            Model::Llama(m) => m.named_tensors(),
        }
    }
}
