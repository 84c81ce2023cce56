//! The round's public parameters and its neighbour graph.

use crate::{Error, MAX_SITES, Result, SiteIndex};
use sha2::{Digest, Sha256};

/// The neighbour lists of one round ([`RoundParams::graph`]), each ascending.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Graph(Vec<Vec<SiteIndex>>);

impl Graph {
    /// The neighbours of `site`, ascending (empty outside the roster).
    pub fn neighbours(&self, site: SiteIndex) -> &[SiteIndex] {
        self.0.get(usize::from(site)).map_or(&[], Vec::as_slice)
    }

    /// Whether `a` and `b` are neighbours.
    pub fn adjacent(&self, a: SiteIndex, b: SiteIndex) -> bool {
        self.neighbours(a).binary_search(&b).is_ok()
    }
}

/// What every party of one round agrees on before it starts.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoundParams {
    /// Binds keys, shares and masks to one federation (for example the SHA-256 of its name).
    pub context: [u8; 32],
    /// The FL round; a message of another round is refused.
    pub round: u64,
    /// Sites in the roster, `n` (3..=255).
    pub sites: usize,
    /// Neighbours per site, `k`: `n − 1` for the full graph (Bonawitz et al.), or an even
    /// number below it for the Harary graph of SecAgg+.
    pub degree: usize,
    /// Shares needed to rebuild a site's secrets, `t`, with `(k + 1)/2 < t ≤ k`: a majority
    /// of the `k + 1` holders (the neighbours and the site itself), so a server that tells
    /// two groups of them different alive/dropped lists cannot get `t` shares of both of a
    /// site's secrets.
    pub threshold: usize,
    /// Length of the masked vector, in `u32` words (the update's length plus one for its
    /// weight).
    pub dim: usize,
}

impl RoundParams {
    /// Full-graph parameters with a two-thirds threshold: `k = n − 1`,
    /// `t = ⌊2k/3⌋ + 1`.
    pub fn full(context: [u8; 32], round: u64, sites: usize, dim: usize) -> Self {
        let degree = sites.saturating_sub(1);
        Self {
            context,
            round,
            sites,
            degree,
            threshold: 2 * degree / 3 + 1,
            dim,
        }
    }

    /// Checks the parameters can run.
    ///
    /// # Errors
    /// [`Error::Params`] naming the value and the allowed range.
    pub fn check(&self) -> Result<()> {
        let (n, k, t) = (self.sites, self.degree, self.threshold);
        if !(3..=MAX_SITES).contains(&n) {
            return Err(Error::Params(format!(
                "{n} sites: a round holds 3 to {MAX_SITES} (GF(256) shares; with 2 each learns the other's update from the sum)"
            )));
        }
        if k == 0 || k > n - 1 || (k < n - 1 && k % 2 == 1) {
            return Err(Error::Params(format!(
                "degree {k} with {n} sites: use n − 1 = {} (full graph) or an even number below it",
                n - 1
            )));
        }
        if 2 * t <= k + 1 || t > k || t < 2 {
            return Err(Error::Params(format!(
                "threshold {t} with degree {k}: it must be a majority of the k + 1 holders (the neighbours and the site itself), {} to {k}",
                k.div_ceil(2) + 1
            )));
        }
        if self.dim == 0 {
            return Err(Error::Params("an empty vector (dim 0)".into()));
        }
        Ok(())
    }

    /// The neighbour graph, computed once. Full graph: every other site. Otherwise the
    /// Harary graph `H(k, n)`: sites on a ring in an order drawn from `context` and `round`
    /// (public), each joined to the `k/2` nearest on either side, so every site has exactly
    /// `k` neighbours and the graph is `k`-connected.
    pub fn graph(&self) -> Graph {
        let n = self.sites;
        if self.degree + 1 >= n {
            return Graph(
                (0..n)
                    .map(|me| {
                        (0..n)
                            .filter(|&v| v != me)
                            .map(|v| v as SiteIndex)
                            .collect()
                    })
                    .collect(),
            );
        }
        let ring = self.ring();
        let half = self.degree / 2;
        let mut lists = vec![Vec::new(); n];
        for (pos, &site) in ring.iter().enumerate() {
            let mut out: Vec<SiteIndex> = (1..=half)
                .flat_map(|d| [ring[(pos + d) % n], ring[(pos + n - d) % n]])
                .collect();
            out.sort_unstable();
            out.dedup();
            lists[usize::from(site)] = out;
        }
        Graph(lists)
    }

    /// The sites in ring order: sorted by `SHA-256(context ‖ round ‖ site)`.
    fn ring(&self) -> Vec<SiteIndex> {
        let mut keyed: Vec<([u8; 32], SiteIndex)> = (0..self.sites)
            .map(|s| {
                let mut h = Sha256::new();
                h.update(b"fedee-secagg/v1/ring");
                h.update(self.context);
                h.update(self.round.to_le_bytes());
                h.update((s as u64).to_le_bytes());
                (h.finalize().into(), s as SiteIndex)
            })
            .collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, s)| s).collect()
    }

    /// The domain-separation prefix shared by every key derivation of this round.
    pub(crate) fn label(&self, what: &str) -> Vec<u8> {
        let mut v = format!("fedee-secagg/v1/{what}").into_bytes();
        v.extend_from_slice(&self.context);
        v.extend_from_slice(&self.round.to_le_bytes());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harary_graph_is_symmetric_and_regular() {
        for (n, k) in [(10, 4), (11, 6), (50, 20), (7, 6), (4, 2)] {
            let p = RoundParams {
                context: [1; 32],
                round: 3,
                sites: n,
                degree: k,
                threshold: k.div_ceil(2) + 1,
                dim: 1,
            };
            p.check().unwrap();
            let g = p.graph();
            for s in 0..n as SiteIndex {
                let nb = g.neighbours(s);
                assert_eq!(nb.len(), k, "site {s} of {n}");
                assert!(!nb.contains(&s));
                for &v in nb {
                    assert!(g.adjacent(v, s), "{s}–{v} not symmetric");
                }
            }
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let ok = RoundParams::full([0; 32], 1, 5, 10);
        ok.check().unwrap();
        let e = RoundParams {
            degree: 3,
            sites: 10,
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("degree 3"), "{e}");
        // 2t = k + 1: two groups of t holders could each rebuild one of a site's secrets.
        let e = RoundParams {
            sites: 6,
            degree: 5,
            threshold: 3,
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(
            e.to_string().contains("majority of the k + 1 holders"),
            "{e}"
        );
        RoundParams {
            sites: 6,
            degree: 5,
            threshold: 4,
            ..ok.clone()
        }
        .check()
        .unwrap();
        let e = RoundParams {
            threshold: 2,
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("threshold 2"), "{e}");
        let e = RoundParams {
            sites: 256,
            degree: 255,
            threshold: 200,
            ..ok
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("256 sites"), "{e}");
    }
}
