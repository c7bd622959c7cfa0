//! What `whittle inspect` reports: parameters by component, bytes by storage type, FLOPs per token.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{BlockDims, Loaded, Model};

/// Parameter counts by component. Tied embeddings count once, as `sum(p.numel())` does in PyTorch,
/// and buffers (BERT's `position_ids`) are not parameters.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ParamCounts {
    pub embeddings: usize,
    pub attention: usize,
    pub mlp: usize,
    pub norms: usize,
    pub head: usize,
    pub total: usize,
}

/// One row of the per-layer table.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub index: usize,
    #[serde(flatten)]
    pub dims: BlockDims,
    pub attention_params: usize,
    pub mlp_params: usize,
    pub norm_params: usize,
}

/// Everything `inspect` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source: String,
    pub format: String,
    pub family: String,
    pub config: serde_json::Value,
    pub params: ParamCounts,
    /// Bytes in the source file by storage type (`f32`, `q4_1`, ...), and tensor count.
    pub storage: BTreeMap<String, (usize, usize)>,
    pub file_bytes: usize,
    /// Forward FLOPs of one token that attends to `seq` positions.
    pub flops_per_token: u64,
    pub seq: usize,
    pub layers: Vec<LayerRow>,
}

fn n(t: &candle_core::Tensor) -> usize {
    t.elem_count()
}

pub fn param_counts(model: &Model) -> (ParamCounts, Vec<LayerRow>) {
    let mut p = ParamCounts::default();
    // Per block: (attention, MLP, norm) parameters.
    let blocks: Vec<(usize, usize, usize)> = match model {
        Model::Bert(m) => {
            let e = &m.embeddings;
            p.embeddings = n(&e.word) + e.word_v.as_ref().map_or(0, n) + n(&e.position) + n(&e.token_type);
            p.norms += e.norm.num_params();
            p.head = m.pooler.as_ref().map_or(0, |l| l.num_params());
            m.blocks
                .iter()
                .map(|b| {
                    let attn = [&b.query, &b.key, &b.value, &b.attn_out].iter().map(|l| l.num_params()).sum();
                    (
                        attn,
                        b.intermediate.num_params() + b.output.num_params(),
                        b.attn_norm.num_params() + b.out_norm.num_params(),
                    )
                })
                .collect()
        }
        Model::Llama(m) => {
            p.embeddings = n(&m.embed_tokens);
            p.norms += m.norm.num_params();
            p.head = if m.config.tie_word_embeddings { 0 } else { m.lm_head.num_params() };
            m.blocks
                .iter()
                .map(|b| {
                    let attn = [&b.q, &b.k, &b.v, &b.o].iter().map(|l| l.num_params()).sum();
                    let mlp = b.gate.num_params() + b.up.num_params() + b.down.num_params();
                    (attn, mlp, b.attn_norm.num_params() + b.mlp_norm.num_params())
                })
                .collect()
        }
    };
    let dims = model.block_dims();
    let mut rows = Vec::with_capacity(blocks.len());
    for (i, (attn, mlp, norms)) in blocks.into_iter().enumerate() {
        rows.push(LayerRow { index: i, dims: dims[i], attention_params: attn, mlp_params: mlp, norm_params: norms });
        p.attention += attn;
        p.mlp += mlp;
        p.norms += norms;
    }
    p.total = p.embeddings + p.attention + p.mlp + p.norms + p.head;
    (p, rows)
}

/// Multiply-adds × 2 of one token's forward pass when it attends to `seq` positions: every block
/// Linear (2·in·out), the attention scores and weighted sum (2 · 2·seq·heads·head_dim per block), and
/// for decoders the LM head (2·C·V). Norms, activations and softmax are not counted.
pub fn flops_per_token(model: &Model, seq: usize) -> u64 {
    let mut f: u64 = 0;
    for (name, l) in model.linears() {
        if name == "pooler.dense" {
            continue; // runs once per sequence, not per token
        }
        f += 2 * (l.in_features() * l.out_features()) as u64;
    }
    for d in model.block_dims() {
        f += 4 * (seq * d.n_head * d.head_dim) as u64;
    }
    f
}

pub fn report(l: &Loaded, seq: usize) -> Report {
    let (params, layers) = param_counts(&l.model);
    let mut storage: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in &l.source.tensors {
        let e = storage.entry(t.dtype.clone()).or_default();
        e.0 += t.bytes;
        e.1 += 1;
    }
    let config = match &l.model {
        Model::Bert(m) => m.config.to_hf_json(&m.blocks),
        Model::Llama(m) => m.config.to_hf_json(&m.blocks, l.bos_token_id, &l.eos_token_ids),
    };
    Report {
        source: l.source.path.display().to_string(),
        format: format!("{:?}", l.source.format),
        family: l.model.family().to_string(),
        config,
        params,
        file_bytes: l.source.tensors.iter().map(|t| t.bytes).sum(),
        storage,
        flops_per_token: flops_per_token(&l.model, seq),
        seq,
        layers,
    }
}
