//! The allocate step of measure → allocate → apply: one choice per layer (a bit width, a rank) under a
//! budget, by a Lagrangian price λ per unit of size. The caller's `pick(λ)` gives every layer's argmin of
//! cost + λ·size; [`fit`] finds the smallest price whose picks fit the budget. Mixed precision
//! (`quant::mixed`) and low-rank ranks (`compress::lowrank`) allocate through it.

/// How the price is searched: grown from `start` (×4) until the picks fit (giving up past `cap`), then
/// bisected `iterations` times between 0 and that price.
#[derive(Debug, Clone, Copy)]
pub struct Search {
    pub start: f64,
    pub cap: f64,
    pub iterations: usize,
}

/// The picks at (about) the smallest price whose picks' `size` is within `budget`: `Ok` when they fit
/// (the free picks at λ = 0 when those do), `Err` with the picks at the largest price tried when even that
/// one does not.
pub fn fit<P>(pick: impl Fn(f64) -> P, size: impl Fn(&P) -> f64, budget: f64, s: Search) -> Result<P, P> {
    let free = pick(0.0);
    if size(&free) <= budget {
        return Ok(free);
    }
    let (mut lo, mut hi) = (0.0f64, s.start);
    while size(&pick(hi)) > budget {
        hi *= 4.0;
        if hi > s.cap {
            return Err(pick(hi));
        }
    }
    for _ in 0..s.iterations {
        let mid = 0.5 * (lo + hi);
        if size(&pick(mid)) > budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let p = pick(hi);
    if size(&p) <= budget {
        Ok(p)
    } else {
        Err(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_the_budget_at_the_smallest_price() {
        // Two layers, candidates (cost, size): the cheapest fit of total size 3 is one small, one large.
        let layers = [vec![(0.0, 2.0), (1.0, 1.0)], vec![(0.0, 2.0), (5.0, 1.0)]];
        let pick = |lambda: f64| -> Vec<usize> {
            layers
                .iter()
                .map(|c| {
                    (0..c.len())
                        .min_by(|&a, &b| (c[a].0 + lambda * c[a].1).total_cmp(&(c[b].0 + lambda * c[b].1)))
                        .unwrap()
                })
                .collect()
        };
        let size = |p: &Vec<usize>| p.iter().zip(&layers).map(|(&i, c)| c[i].1).sum::<f64>();
        let s = Search { start: 1e-6, cap: 1e6, iterations: 60 };
        assert_eq!(fit(pick, size, 4.0, s), Ok(vec![0, 0]));
        assert_eq!(fit(pick, size, 3.0, s), Ok(vec![1, 0]));
        assert_eq!(fit(pick, size, 1.0, s), Err(vec![1, 1]));
    }
}
