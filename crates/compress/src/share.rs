//! Cross-layer parameter sharing (ALBERT): the blocks of a group use one set of weights, stored once (the
//! file shrinks) and held once in memory (the blocks hold the same tensors). The shared weights are the
//! group's element-wise mean or its most central member; groups are given (`0-1,2-3`) or chosen
//! (`auto`: adjacent blocks merged greedily by the cosine similarity of their weights).

use candle_core::{DType, Tensor};
use serde::Serialize;
use whittle_core::{InvalidOption, Linear};
use whittle_models::{Loaded, Model};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Mean,
    Central,
}

impl Init {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Self::Mean),
            "central" => Ok(Self::Central),
            _ => Err(InvalidOption::new("init", s, "valid: mean, central").into()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub blocks: Vec<usize>,
    /// The member whose weights became the group's (Central), or None (Mean).
    pub central: Option<usize>,
    /// Relative distance ‖W_i − W_shared‖ / ‖W_i‖ over all block weights, per member.
    pub rel_change: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShareReport {
    pub groups: Vec<GroupReport>,
    pub unique_blocks: usize,
    pub params_before: usize,
    pub params_after: usize,
}

/// Option `groups` `s` is invalid: `reason`.
fn bad_groups(s: &str, reason: String) -> Error {
    InvalidOption::new("groups", format!("`{s}`"), reason).into()
}

/// Parses `0-1,2-3` (or `0-1-2`): groups of two or more blocks, each named once, all below `n`.
pub fn parse_groups(s: &str, n: usize) -> Result<Vec<Vec<usize>>> {
    parse(s, Some(n))
}

/// Checks the syntax of `groups` alone (before a model is loaded: block indices are checked by
/// [`parse_groups`]).
pub fn check_groups_syntax(s: &str) -> Result<()> {
    parse(s, None).map(|_| ())
}

fn parse(s: &str, n: Option<usize>) -> Result<Vec<Vec<usize>>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut groups = Vec::new();
    for g in s.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        let index = |v: &str| -> Result<usize> {
            v.trim().parse::<usize>().map_err(|_| {
                InvalidOption::new("groups", format!("`{s}`"), format!("`{v}` is not a block index")).into()
            })
        };
        // `A-B` is the range A..=B (as users read it; issue 22: `0-2` used to mean {0, 2}); `+` joins
        // members that are not adjacent: `0+2`, `0-1+4`.
        let mut members = Vec::new();
        for part in g.split('+') {
            match part.split('-').collect::<Vec<_>>()[..] {
                [one] => members.push(index(one)?),
                [a, b] => {
                    let (a, b) = (index(a)?, index(b)?);
                    if a >= b {
                        return Err(bad_groups(s, format!("`{part}`: a range FIRST-LAST needs FIRST < LAST")));
                    }
                    match n {
                        Some(n) if b >= n => {
                            return Err(bad_groups(s, format!("block {b} does not exist (the model has 0..{})", n - 1)))
                        }
                        Some(_) => members.extend(a..=b),
                        None => members.extend([a, b]),
                    }
                }
                _ => {
                    return Err(bad_groups(
                        s,
                        format!("`{part}`: a range is FIRST-LAST; join blocks that are not adjacent with `+` (0+2)"),
                    ))
                }
            }
        }
        if members.len() < 2 {
            return Err(bad_groups(s, format!("`{g}` names one block; a group shares two or more")));
        }
        for &b in &members {
            if let Some(n) = n.filter(|&n| b >= n) {
                return Err(bad_groups(s, format!("block {b} does not exist (the model has 0..{})", n - 1)));
            }
            if !seen.insert(b) {
                return Err(bad_groups(s, format!("block {b} is named twice")));
            }
        }
        groups.push(members);
    }
    if groups.is_empty() {
        return Err(bad_groups(s, "no groups".into()));
    }
    Ok(groups)
}

/// Every trainable tensor of block `i` (Linears dequantized, biases, norms), flattened, in a fixed order.
fn block_tensors(m: &Model, i: usize) -> Result<Vec<Tensor>> {
    let mut v = Vec::new();
    let lin = |l: &Linear, v: &mut Vec<Tensor>| -> Result<()> {
        v.push(l.dequantize()?.to_dtype(DType::F32)?);
        if let Some(b) = &l.bias {
            v.push(b.to_dtype(DType::F32)?);
        }
        Ok(())
    };
    match m {
        Model::Bert(b) => {
            let blk = &b.blocks[i];
            for (_, l) in blk.linears() {
                lin(l, &mut v)?;
            }
            for n in [&blk.attn_norm, &blk.out_norm] {
                v.push(n.weight.clone());
                v.push(n.bias.clone());
            }
        }
        Model::Llama(b) => {
            let blk = &b.blocks[i];
            for (_, l) in blk.linears() {
                lin(l, &mut v)?;
            }
            v.push(blk.attn_norm.weight.clone());
            v.push(blk.mlp_norm.weight.clone());
        }
    }
    Ok(v)
}

/// Writes `ts` (in [`block_tensors`] order) into block `i`.
fn set_block(m: &mut Model, i: usize, ts: &[Tensor]) -> Result<()> {
    let mut it = ts.iter().cloned();
    let mut next = || it.next().expect("same layout");
    let lin = |l: &mut Linear, next: &mut dyn FnMut() -> Tensor| -> Result<()> {
        let w = next();
        let b = l.bias.as_ref().map(|_| next());
        *l = Linear::dense(w, b)?.inheriting(l);
        Ok(())
    };
    match m {
        Model::Bert(b) => {
            let blk = &mut b.blocks[i];
            for (_, l) in blk.linears_mut() {
                lin(l, &mut next)?;
            }
            for n in [&mut blk.attn_norm, &mut blk.out_norm] {
                n.weight = next();
                n.bias = next();
            }
        }
        Model::Llama(b) => {
            let blk = &mut b.blocks[i];
            for (_, l) in blk.linears_mut() {
                lin(l, &mut next)?;
            }
            blk.attn_norm.weight = next();
            blk.mlp_norm.weight = next();
        }
    }
    Ok(())
}

fn flat(ts: &[Tensor]) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    for t in ts {
        v.extend(t.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(v)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64) * (*y as f64);
        na += (*x as f64) * (*x as f64);
        nb += (*y as f64) * (*y as f64);
    }
    d / (na.sqrt() * nb.sqrt()).max(1e-30)
}

fn shapes(ts: &[Tensor]) -> Vec<Vec<usize>> {
    ts.iter().map(|t| t.dims().to_vec()).collect()
}

/// `auto`: start from single blocks and merge the most similar adjacent groups (mean cosine between their
/// blocks' weights, same shapes only) until `unique` groups remain.
pub fn auto_groups(m: &Model, unique: usize) -> Result<Vec<Vec<usize>>> {
    let n = m.n_blocks();
    if unique == 0 || unique >= n {
        return Err(
            InvalidOption::new("unique", unique, format!("must be in 1..{n} (the model has {n} blocks)")).into()
        );
    }
    let w: Vec<Vec<Tensor>> = (0..n).map(|i| block_tensors(m, i)).collect::<Result<_>>()?;
    let f: Vec<Vec<f32>> = w.iter().map(|t| flat(t)).collect::<Result<_>>()?;
    let mut groups: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
    while groups.len() > unique {
        let mut best: Option<(f64, usize)> = None;
        for g in 0..groups.len() - 1 {
            let (a, b) = (&groups[g], &groups[g + 1]);
            if shapes(&w[a[0]]) != shapes(&w[b[0]]) {
                continue;
            }
            let sim: f64 =
                a.iter().flat_map(|&i| b.iter().map(move |&j| (i, j))).map(|(i, j)| cosine(&f[i], &f[j])).sum::<f64>()
                    / (a.len() * b.len()) as f64;
            // Prefer similar pairs, and small groups (balanced sharing).
            let score = sim / (a.len() + b.len()) as f64;
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, g));
            }
        }
        let Some((_, g)) = best else {
            return Err(InvalidOption::new(
                "groups",
                "auto",
                format!("cannot reach {unique} groups (adjacent blocks differ in shape)"),
            )
            .into());
        };
        let b = groups.remove(g + 1);
        groups[g].extend(b);
    }
    Ok(groups.into_iter().filter(|g| g.len() > 1).collect())
}

/// Shares the weights within each group of `groups` (see the module doc); records the sharing in `l`
/// so that saving stores each shared block once.
pub fn share_blocks(l: &mut Loaded, groups: &[Vec<usize>], init: Init) -> Result<ShareReport> {
    let n = l.model.n_blocks();
    let per_block: Vec<usize> =
        (0..n).map(|i| Ok(block_tensors(&l.model, i)?.iter().map(|t| t.elem_count()).sum())).collect::<Result<_>>()?;
    let params_before: usize = per_block.iter().sum();
    let mut reports = Vec::new();
    for g in groups {
        let ws: Vec<Vec<Tensor>> = g.iter().map(|&i| block_tensors(&l.model, i)).collect::<Result<_>>()?;
        if let Some(j) = (1..g.len()).find(|&j| shapes(&ws[j]) != shapes(&ws[0])) {
            return Err(Error::Usage(format!(
                "option `groups`: blocks {} and {} have different shapes and cannot share",
                g[0], g[j]
            )));
        }
        let (shared, central) = match init {
            Init::Mean => {
                let mean: Vec<Tensor> = (0..ws[0].len())
                    .map(|t| {
                        let mut acc = ws[0][t].clone();
                        for w in &ws[1..] {
                            acc = (acc + &w[t])?;
                        }
                        Ok((acc / g.len() as f64)?)
                    })
                    .collect::<Result<_>>()?;
                (mean, None)
            }
            Init::Central => {
                let f: Vec<Vec<f32>> = ws.iter().map(|w| flat(w)).collect::<Result<_>>()?;
                let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
                let c = (0..g.len())
                    .min_by(|&a, &b| {
                        let da: f64 = f.iter().map(|o| dist(&f[a], o)).sum();
                        let db: f64 = f.iter().map(|o| dist(&f[b], o)).sum();
                        da.total_cmp(&db)
                    })
                    .expect("non-empty group");
                (ws[c].clone(), Some(g[c]))
            }
        };
        let sf = flat(&shared)?;
        let rel_change = ws
            .iter()
            .map(|w| {
                let f = flat(w)?;
                let num: f64 = f.iter().zip(&sf).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                let den: f64 = f.iter().map(|a| (*a as f64).powi(2)).sum();
                Ok((num / den.max(1e-30)).sqrt())
            })
            .collect::<Result<_>>()?;
        let leader = g[0];
        set_block(&mut l.model, leader, &shared)?;
        for &b in &g[1..] {
            l.model.share_block(b, leader);
            l.shared_blocks.insert(b, leader);
        }
        reports.push(GroupReport { blocks: g.clone(), central, rel_change });
    }
    let aliases: usize = l.shared_blocks.keys().map(|&b| per_block[b]).sum();
    Ok(ShareReport {
        groups: reports,
        unique_blocks: n - l.shared_blocks.len(),
        params_before,
        params_after: params_before - aliases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 22 ("Messages"): `--groups 0-2` meant blocks {0, 2}; users read it as the range 0..=2.
    #[test]
    fn share_groups_dash_is_a_range() {
        assert_eq!(parse_groups("0-2", 6).unwrap(), vec![vec![0, 1, 2]]);
        assert_eq!(parse_groups("0+2,3-5", 6).unwrap(), vec![vec![0, 2], vec![3, 4, 5]]);
        assert_eq!(parse_groups("0-1+4", 6).unwrap(), vec![vec![0, 1, 4]]);
    }

    #[test]
    fn groups_parse_or_name_the_problem() {
        assert_eq!(parse_groups("0-1, 2+3+4", 6).unwrap(), vec![vec![0, 1], vec![2, 3, 4]]);
        for (bad, want) in [
            ("0-1,1-2", "named twice"),
            ("0-9", "does not exist"),
            ("3", "one block"),
            ("a-1", "not a block"),
            ("0-2-4", "a range is FIRST-LAST"),
            ("2-0", "FIRST < LAST"),
        ] {
            let e = parse_groups(bad, 6).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}

/// What [`factorise_embeddings`] did.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingReport {
    pub rank: usize,
    pub params_before: usize,
    pub params_after: usize,
    /// ‖E − U·V‖ / ‖E‖ with rows weighted as the factorisation weighted them, and unweighted.
    pub weighted_rel_err: f64,
    pub rel_err: f64,
    pub seconds: f64,
}

/// ALBERT's factorised embedding (Lan et al. 2019) for a BERT encoder: the word embedding table E (V × C)
/// becomes U (V × r) · V (r × C). V's rows are the top r eigenvectors of Eᵀ·diag(w)·E, with `weights` w per
/// token (e.g. 1 + its count in calibration text: frequent tokens are kept most exactly), and U = E·Vᵀ, each
/// row's projection onto them (the best U for that V, whatever the weights). Saves parameters when
/// r < V·C / (V + C).
pub fn factorise_embeddings(l: &mut Loaded, rank: usize, weights: &[f64]) -> Result<EmbeddingReport> {
    let t0 = std::time::Instant::now();
    let Model::Bert(m) = &mut l.model else {
        return Err(Error::Usage(
            "option `embedding_rank` factorises a BERT encoder's word embeddings (a decoder's are tied to its output head)"
                .into(),
        ));
    };
    let e = &mut m.embeddings;
    if e.word_v.is_some() {
        return Err(Error::Usage("option `embedding_rank`: the word embeddings are already factorised".into()));
    }
    let (v, c) = e.word.dims2()?;
    if rank == 0 || rank * (v + c) >= v * c {
        let reason = format!("a {v}×{c} table saves parameters only with a rank in 1..{}", (v * c).div_ceil(v + c));
        return Err(InvalidOption::new("embedding_rank", rank, reason).into());
    }
    if weights.len() != v {
        return Err(Error::Usage(format!("embedding weights: {} values for {v} tokens", weights.len())));
    }
    let table: Vec<f32> = e.word.flatten_all()?.to_vec1()?;
    // Gram matrix G = Σ_i w_i e_iᵀ e_i (C × C) in f64.
    let mut g = faer::Mat::<f64>::zeros(c, c);
    for (row, &w) in table.chunks_exact(c).zip(weights) {
        for a in 0..c {
            let wa = w * row[a] as f64;
            for b in 0..=a {
                g[(a, b)] += wa * row[b] as f64;
            }
        }
    }
    for a in 0..c {
        for b in 0..a {
            g[(b, a)] = g[(a, b)];
        }
    }
    let svd = g.as_ref().thin_svd().map_err(|err| Error::Usage(format!("embedding SVD failed ({err:?})")))?;
    // V: the top `rank` singular vectors as rows (r × C); U = E·Vᵀ (V × r).
    let vt: Vec<f32> =
        (0..rank).flat_map(|i| (0..c).map(move |j| (i, j))).map(|(i, j)| svd.U()[(j, i)] as f32).collect();
    let mut u = vec![0f32; v * rank];
    let (mut num, mut den, mut wnum, mut wden) = (0f64, 0f64, 0f64, 0f64);
    for (i, row) in table.chunks_exact(c).enumerate() {
        let ui = &mut u[i * rank..(i + 1) * rank];
        for (k, uk) in ui.iter_mut().enumerate() {
            *uk = row.iter().zip(&vt[k * c..(k + 1) * c]).map(|(a, b)| a * b).sum();
        }
        // Row error ‖e − u·V‖² = ‖e‖² − ‖u‖² (V's rows are orthonormal).
        let (en, un): (f64, f64) =
            (row.iter().map(|&a| (a as f64).powi(2)).sum(), ui.iter().map(|&a| (a as f64).powi(2)).sum());
        let err = (en - un).max(0.0);
        (num, den, wnum, wden) = (num + err, den + en, wnum + weights[i] * err, wden + weights[i] * en);
    }
    e.word = Tensor::from_vec(u, (v, rank), e.word.device())?;
    e.word_v = Some(Tensor::from_vec(vt, (rank, c), e.word.device())?);
    Ok(EmbeddingReport {
        rank,
        params_before: v * c,
        params_after: rank * (v + c),
        weighted_rel_err: (wnum / wden.max(1e-30)).sqrt(),
        rel_err: (num / den.max(1e-30)).sqrt(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
