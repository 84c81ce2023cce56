//! One round of a fedee federation as secure-aggregation parameters: what the aggregator and
//! every site derive alike from the federation spec's hash, the round, the roster and the
//! aggregator's session bytes, so that neither side takes the other's word for the threshold
//! or the encoding.

use crate::{Error, MAX_SITES, Quantizer, Result, RoundParams, SiteIndex};
use sha2::{Digest, Sha256};

/// The public setup of one round.
#[derive(Clone, Debug, PartialEq)]
pub struct Setup {
    /// Graph, threshold and vector length.
    pub params: RoundParams,
    /// The fixed-point encoding of the updates and their weights.
    pub quantizer: Quantizer,
}

/// What a round's setup is derived from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// SHA-256 of the federation spec (hex).
    pub spec_sha256: &'a str,
    /// The round.
    pub round: u32,
    /// The round's sites, ascending names; a site's index is its position.
    pub roster: &'a [String],
    /// Neighbours per site (0: all others).
    pub degree: u32,
    /// The aggregator's random bytes for this protocol run.
    pub session: &'a [u8],
    /// Model parameters (the masked vector has one more word, the weight).
    pub parameters: usize,
    /// L2 norm every update is clipped to, so every coordinate lies in `±bound`.
    pub bound: f64,
    /// The largest weight (`num_examples`) a site may send.
    pub max_weight: u64,
}

/// The setup of one round from its [`Inputs`].
///
/// The threshold is a strict majority of the `k + 1` holders of a site's shares,
/// `t = ⌊(k + 1)/2⌋ + 1`; the context binds keys, shares and masks to
/// `SHA-256(spec ‖ round ‖ session ‖ roster)`.
///
/// # Errors
/// [`Error::Params`] for a roster that is not ascending and unique or holds fewer than 3 or
/// more than 255 sites, or an encoding that cannot hold `roster.len()` sites with these
/// weights.
pub fn setup(i: &Inputs<'_>) -> Result<Setup> {
    let Inputs {
        spec_sha256,
        round,
        roster,
        degree,
        session,
        parameters,
        bound,
        max_weight,
    } = *i;
    let n = roster.len();
    if !(3..=MAX_SITES).contains(&n) {
        return Err(Error::Params(format!(
            "a roster of {n} sites: secure aggregation needs 3 to {MAX_SITES}"
        )));
    }
    if roster.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Params(
            "the roster's site names must be unique and ascending".into(),
        ));
    }
    let k = if degree == 0 || degree as usize >= n - 1 {
        n - 1
    } else {
        degree as usize
    };
    let mut h = Sha256::new();
    h.update(b"fedee-secagg/v1/federation");
    h.update((spec_sha256.len() as u64).to_le_bytes());
    h.update(spec_sha256.as_bytes());
    h.update(u64::from(round).to_le_bytes());
    h.update((session.len() as u64).to_le_bytes());
    h.update(session);
    for name in roster {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
    }
    let params = RoundParams {
        context: h.finalize().into(),
        round: u64::from(round),
        sites: n,
        degree: k,
        threshold: k.div_ceil(2) + 1,
        dim: parameters + 1,
    };
    params.check()?;
    let max_weight = u32::try_from(max_weight).map_err(|_| {
        Error::Params(format!(
            "max_num_examples {max_weight} does not fit the 32-bit masked weight: lower it to at most {}",
            u32::MAX as usize / n
        ))
    })?;
    let quantizer = Quantizer::new(n, bound, max_weight)?;
    Ok(Setup { params, quantizer })
}

/// Fresh random session bytes for one protocol run (the aggregator draws them per round).
///
/// # Errors
/// The operating system's randomness source failed.
pub fn new_session() -> Result<[u8; 32]> {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).map_err(|e| Error::Params(format!("OS randomness failed: {e}")))?;
    Ok(s)
}

/// The index of `site` in `roster`, if it is in it.
pub fn index_of(roster: &[String], site: &str) -> Option<SiteIndex> {
    roster
        .iter()
        .position(|s| s == site)
        .map(|i| i as SiteIndex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("site{i:03}")).collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn setup(
        spec_sha256: &str,
        round: u32,
        roster: &[String],
        degree: u32,
        session: &[u8],
        parameters: usize,
        bound: f64,
        max_weight: u64,
    ) -> Result<Setup> {
        super::setup(&Inputs {
            spec_sha256,
            round,
            roster,
            degree,
            session,
            parameters,
            bound,
            max_weight,
        })
    }

    #[test]
    fn both_sides_derive_the_same_setup_and_it_binds_every_input() {
        let r = names(5);
        let a = setup("abc", 3, &r, 0, b"s", 10, 2.0, 1000).unwrap();
        assert_eq!(a, setup("abc", 3, &r, 0, b"s", 10, 2.0, 1000).unwrap());
        assert_eq!(
            (a.params.degree, a.params.threshold, a.params.dim),
            (4, 3, 11)
        );
        for other in [
            setup("abd", 3, &r, 0, b"s", 10, 2.0, 1000),
            setup("abc", 4, &r, 0, b"s", 10, 2.0, 1000),
            setup("abc", 3, &r, 0, b"t", 10, 2.0, 1000),
            setup("abc", 3, &names(6)[1..], 0, b"s", 10, 2.0, 1000),
        ] {
            assert_ne!(other.unwrap().params.context, a.params.context);
        }
        let plus = setup("abc", 3, &names(50), 20, b"s", 10, 2.0, 1000).unwrap();
        assert_eq!((plus.params.degree, plus.params.threshold), (20, 11));
    }

    #[test]
    fn bad_rosters_and_weights_are_refused_by_name() {
        fn e(r: &[String]) -> String {
            setup("x", 1, r, 0, b"", 4, 1.0, 10)
                .unwrap_err()
                .to_string()
        }
        assert!(e(&names(2)).contains("3 to 255"));
        let mut unsorted = names(4);
        unsorted.swap(0, 1);
        assert!(e(&unsorted).contains("ascending"));
        let mut dup = names(4);
        dup[1] = dup[0].clone();
        assert!(e(&dup).contains("unique"));
        let w = setup("x", 1, &names(4), 0, b"", 4, 1.0, u64::from(u32::MAX))
            .unwrap_err()
            .to_string();
        assert!(w.contains("max weight"), "{w}");
        assert_eq!(index_of(&names(4), "site002"), Some(2));
        assert_eq!(index_of(&names(4), "nobody"), None);
    }
}
