//! The sequential mode of the calibration engine: calibration windows → embeddings → block by block,
//! stage by stage in one pass: the inputs of the block's first Linears (q/k/v) over every window are observed
//! and those Linears solved (GPTQ, SparseGPT, ...); their outputs, computed with the solved Linears, give the
//! next Linears' inputs (o), and so on to the block output, which feeds the next block (GPTQ's "true
//! sequential" order: every Linear sees the inputs the quantized model before it produces). Peak memory is the
//! model plus one stage's Hessian plus the calibration activations: the residual stream and one stage's inputs
//! (samples × tokens × width floats each); the last stage's, the MLP's hidden activations and the widest, are
//! made a few windows at a time, twice, instead of being held.

use std::time::Instant;

use candle_core::Tensor;
use whittle_core::observe::ActStats;
use whittle_core::Linear;
use whittle_kernels::int8::PackedI8;
use whittle_models::bert::AttnMask;
use whittle_models::BlockLayout;
use whittle_models::{Loaded, Model};

use crate::observe::{decoder_windows, CalibOptions};
use crate::report::{LayerReport, Report};
use crate::{Error, Result};

/// Per-layer error on the calibration inputs, (1/m)·Σ_rows Δw·H·Δwᵀ / 2 = mean squared output error.
pub fn output_mse(w: &[f32], wq: &[f32], m: usize, k: usize, h: &[f64]) -> Result<f64> {
    let d: Vec<f32> = w.iter().zip(wq).map(|(a, b)| a - b).collect();
    let dev = &whittle_core::backend::cpu::device();
    let dt = Tensor::from_vec(d, (m, k), dev)?;
    let ht = Tensor::from_vec(h.iter().map(|&v| v as f32).collect::<Vec<_>>(), (k, k), dev)?;
    let e = (dt.matmul(&ht)? * &dt)?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(e / 2.0 / m as f64)
}

/// What the engine did, beyond the usual report: the calibration tokens and the peak of the activations.
pub struct LayerwiseReport {
    pub report: Report,
    pub tokens: usize,
    /// Output MSE of plain rounding per layer, beside the report's (GPTQ) one.
    pub rtn_output_mse: Vec<f64>,
    pub activation_bytes: usize,
}

/// Calibration inputs per f32 accumulation of Σ xᵀx.
const PARTS: usize = 8;

/// What a solver sees of one Linear: its block, the statistics of its input on the calibration text (per-channel
/// Σx², max |x|, and Σxᵀx when the engine was asked for Hessians) and that Hessian, 2·XᵀX/n.
pub struct LayerInput<'a> {
    pub block: usize,
    /// The observed input (stage) this Linear reads, shared by q/k/v and by gate/up: solvers may cache per slot.
    pub slot: usize,
    pub stats: &'a ActStats,
    pub hessian: Option<&'a [f64]>,
}

/// A solver: given a Linear's name, the Linear and its input, the replacement and its report (or `None` to
/// leave the layer as it is).
pub type Solved = Option<(Linear, LayerReport)>;

/// The engine (module doc) over a LLaMA decoder or BERT encoder: `solve` is called for every block Linear with
/// the block's float inputs observed (with Hessians when `hessian`); the next block sees the solved block's
/// outputs. Decoders run windows of `co.seq_len` tokens; encoders sentences (one line each, at most
/// `co.seq_len` tokens, batched by length so no padding enters the statistics). A solver's error ends the run
/// and is returned as it is (typed `E`, e.g. the caller's own error type); the engine's own errors convert
/// into `E`.
pub fn run_layerwise<E: From<Error>>(
    l: &mut Loaded,
    text: &str,
    co: &CalibOptions,
    hessian: bool,
    mut solve: impl FnMut(&str, &Linear, &LayerInput) -> std::result::Result<Solved, E>,
    progress: impl FnMut(usize, usize),
) -> std::result::Result<LayerwiseReport, E> {
    let mut failed = None;
    let r = engine(
        l,
        text,
        co,
        hessian,
        |name, lin, input| {
            solve(name, lin, input).map_err(|e| {
                failed = Some(e);
                Error::Text(format!("the solver failed on `{name}`"))
            })
        },
        progress,
    );
    match failed {
        Some(e) => Err(e),
        None => Ok(r?),
    }
}

/// [`run_layerwise`] with a solver of this crate's errors.
fn engine(
    l: &mut Loaded,
    text: &str,
    co: &CalibOptions,
    hessian: bool,
    mut solve: impl FnMut(&str, &Linear, &LayerInput) -> Result<Solved>,
    mut progress: impl FnMut(usize, usize),
) -> Result<LayerwiseReport> {
    let t0 = Instant::now();
    let mut run = Run { hessian, int8: co.int8, solve: &mut solve, progress: &mut progress };
    let (acc, tokens, activation_bytes) = match &mut l.model {
        Model::Llama(_) => {
            let windows = decoder_windows(l, text, co)?;
            let Model::Llama(m) = &mut l.model else { unreachable!("matched above") };
            let (cos, sin, mask) = m.block_inputs(co.seq_len)?;
            let mut xs: Vec<Tensor> = windows
                .iter()
                .map(|w| m.embed(&Tensor::new(w.as_slice(), m.embed_tokens.device())?.unsqueeze(0)?))
                .collect::<std::result::Result<_, _>>()?;
            let bytes = xs.len() * co.seq_len * m.config.hidden_size * 4;
            let acc = run_blocks(
                &mut m.blocks,
                &mut xs,
                &mut run,
                |b| b.linears_mut().into_iter().collect(),
                |b, s, x, input| Ok(b.stage(s, x, input, &cos, &sin, mask.as_ref(), m.config.head_dim)?),
            )?;
            (acc, windows.len() * co.seq_len, bytes)
        }
        Model::Bert(_) => {
            let mut sentences = encoder_sentences(l, text, co)?;
            let Model::Bert(m) = &mut l.model else { unreachable!("matched above") };
            // Batches of 16 sentences of similar length, each cut to the shortest in its batch: no padding
            // rows reach the Hessians, and the batches keep the threads busy (one sentence at a time spent
            // most of its time in thread synchronisation).
            sentences.sort_by_key(Vec::len);
            let mut xs = Vec::new();
            let mut tokens = 0;
            for batch in sentences.chunks(16) {
                let t = batch.iter().map(Vec::len).min().unwrap_or(0);
                let ids: Vec<u32> = batch.iter().flat_map(|s| s[..t].iter().copied()).collect();
                let ids = Tensor::from_vec(ids, (batch.len(), t), m.embeddings.word.device())?; // (B, T)
                xs.push(m.embed(&ids, &ids.zeros_like()?)?);
                tokens += batch.len() * t;
            }
            let acc = run_blocks(
                &mut m.blocks,
                &mut xs,
                &mut run,
                |b| b.linears_mut().into_iter().collect(),
                |b, s, x, input| {
                    let (n, t, _) = x.dims3()?;
                    Ok(b.stage(s, x, input, &AttnMask::Lengths(&vec![t; n]), m.config.head_dim)?)
                },
            )?;
            (acc, tokens, tokens * m.config.hidden_size * 4)
        }
    };
    Ok(LayerwiseReport {
        report: Report {
            layers: acc.layers,
            linear_bytes_before: acc.before,
            linear_bytes_after: acc.after,
            seconds: t0.elapsed().as_secs_f64(),
        },
        tokens,
        rtn_output_mse: acc.rtn_mse,
        activation_bytes,
    })
}

/// Up to `co.samples` lines of prose (WikiText headings and short lines skipped), tokenized with the model's
/// special tokens and cut to `co.seq_len` tokens.
fn encoder_sentences(l: &Loaded, text: &str, co: &CalibOptions) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|s| s.len() > 20 && !s.starts_with('=')).take(co.samples) {
        let enc = l.tokenizer.encode(line, true).map_err(|e| Error::Text(format!("tokenizing {}: {e}", co.source)))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(co.seq_len);
        out.push(ids);
    }
    if out.is_empty() {
        return Err(Error::Text(format!("calibration text {} has no lines of prose", co.source)));
    }
    Ok(out)
}

/// Totals and per-layer reports across blocks.
#[derive(Default)]
struct Acc {
    layers: Vec<LayerReport>,
    rtn_mse: Vec<f64>,
    before: usize,
    after: usize,
}

/// What the engine's loop does the same for every family: observe Hessians or not, run int8 copies or not,
/// the solver, and progress (blocks done, of).
struct Run<'a, S, P> {
    hessian: bool,
    int8: bool,
    solve: &'a mut S,
    progress: &'a mut P,
}

/// The engine's loop (module doc): for each block, stage by stage, observe the stage's input over every
/// calibration input `xs`, solve the Linears reading it (the block type's [`BlockLayout::STAGES`]; `linears`
/// gives them in that order), and run the stage with them; `xs` ends as the solved block's outputs. The
/// forward runs on `run`, a copy of the block whose Linears are the solved ones, or int8 copies of them.
fn run_blocks<B, S, P>(
    blocks: &mut [B],
    xs: &mut [Tensor],
    eng: &mut Run<S, P>,
    linears: impl Fn(&mut B) -> Vec<(&'static str, &mut Linear)>,
    stage: impl Fn(&B, usize, &mut Tensor, Option<&Tensor>) -> Result<Option<Tensor>>,
) -> Result<Acc>
where
    B: Clone + BlockLayout,
    S: FnMut(&str, &Linear, &LayerInput) -> Result<Solved>,
    P: FnMut(usize, usize),
{
    let (hessian, int8) = (eng.hessian, eng.int8);
    let nb = blocks.len();
    // Stages with observed inputs (the one after the last finishes the block), and each Linear's, in the
    // order of `linears`.
    let n_stages = B::STAGES.len();
    let stages: Vec<(&str, usize)> =
        B::STAGES.iter().enumerate().flat_map(|(s, names)| names.iter().map(move |n| (*n, s))).collect();
    let mut acc = Acc::default();
    let runner = |l: &Linear| -> Result<Linear> {
        if !int8 {
            return Ok(l.clone());
        }
        let (m, k) = (l.out_features(), l.in_features());
        let w: Vec<f32> = l.dequantize()?.flatten_all()?.to_vec1()?;
        Ok(Linear::int8_dynamic(PackedI8::from_f32(&w, m, k), l.bias.clone())?.inheriting(l))
    };
    for (bi, blk) in blocks.iter_mut().enumerate() {
        let p = B::prefix(bi);
        let mut run = blk.clone();
        if int8 {
            for (_, l) in linears(&mut run) {
                *l = runner(l)?;
            }
        }
        let mut inputs: Vec<Tensor> = Vec::with_capacity(xs.len());
        for x in xs.iter_mut() {
            inputs.push(stage(&run, 0, x, None)?.expect("stage 0 gives an input"));
        }
        for s in 0..n_stages {
            // The last stage's inputs (the MLP's hidden activations, the widest) are streamed: made a few
            // windows at a time to be observed, then made again to run the stage, never held for every
            // window (a quarter of the stage's compute for a third of the engine's peak memory).
            let streamed = s == n_stages - 1;
            let mut st: Option<ActStats> = None;
            let mut observe = |part: &[Tensor]| -> Result<()> {
                let k = part.first().map_or(Ok(0), |t| t.dim(candle_core::D::Minus1))?;
                let st = st.get_or_insert_with(|| if hessian { ActStats::hessian(k) } else { ActStats::channels(k) });
                Ok(whittle_core::backend::cpu::with_f32_slices(part, |v| st.observe_many(v))?)
            };
            if streamed {
                for (xp, part) in xs.chunks(PARTS).zip(inputs.chunks(PARTS)) {
                    let made: Vec<Tensor> = xp
                        .iter()
                        .zip(part)
                        .map(|(x, i)| Ok(stage(&run, s, &mut x.clone(), Some(i))?.expect("the stage gives an input")))
                        .collect::<Result<_>>()?;
                    observe(&made)?;
                }
            } else {
                for part in inputs.chunks(PARTS) {
                    observe(part)?;
                }
            }
            let st = st.unwrap_or_else(|| ActStats::channels(0));
            if st.non_finite {
                return Err(Error::NonFinite(format!("{p}* (inputs on the calibration text)")));
            }
            let hess = st.mean_hessian();
            let mut ls = linears(blk);
            let mut rs = linears(&mut run);
            for (i, ((name, lin), (_, r))) in ls.iter_mut().zip(rs.iter_mut()).enumerate() {
                debug_assert_eq!(stages[i].0, *name, "the stage table follows `linears`");
                if stages[i].1 != s {
                    continue;
                }
                let full = format!("{p}{name}");
                acc.before += lin.storage_bytes();
                let input = LayerInput { block: bi, slot: s, stats: &st, hessian: hess.as_deref() };
                if let Some((new, report)) = (eng.solve)(&full, lin, &input)? {
                    acc.layers.push(report);
                    **r = runner(&new)?;
                    **lin = new;
                }
                acc.after += lin.storage_bytes();
            }
            if s + 1 == n_stages - 1 {
                continue; // the streamed stage makes its inputs from these
            }
            // The next stage's inputs, computed with the solved Linears (each window's old input dropped as
            // its new one is made).
            let mut next = Vec::with_capacity(inputs.len());
            for (x, input) in xs.iter_mut().zip(std::mem::take(&mut inputs)) {
                let input = match streamed {
                    true => stage(&run, s, &mut x.clone(), Some(&input))?.expect("the stage gives an input"),
                    false => input,
                };
                if let Some(n) = stage(&run, s + 1, x, Some(&input))? {
                    next.push(n);
                }
            }
            inputs = next;
        }
        (eng.progress)(bi + 1, nb);
    }
    Ok(acc)
}
