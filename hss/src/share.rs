//! Additive shares in `Z_2^64` with a seed for server 0.
//!
//! `X₀ = ChaCha20(seed)` (`rand_chacha::ChaCha20Rng`, the keystream read as little-endian
//! `u64`s) and `X₁ = x̃ − X₀`. Server 0 receives the 32-byte seed, server 1 the words of `X₁`.
//! Each is uniform in `Z_2^64` alone; the two together give `x̃`.
//!
//! # Security
//! A seed must never be used twice: with `X₁ = x̃ − X₀` and `X₁' = x̃' − X₀`, server 1 learns
//! `x̃ − x̃'`. [`Sharer`] draws every seed from the operating system and refuses a repeat.

use std::collections::HashSet;

use rand::{RngCore, SeedableRng, TryRngCore};

/// A 32-byte ChaCha20 seed.
pub type Seed = [u8; 32];

/// `ChaCha20(seed)`: the first `len` words.
pub fn expand(seed: &Seed, len: usize) -> Vec<u64> {
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(*seed);
    (0..len).map(|_| rng.next_u64()).collect()
}

/// `x̃ − ChaCha20(seed)`: server 1's share for a given seed. The primitive under
/// [`Sharer::share`]; calling it twice with one seed leaks the difference of the inputs.
pub fn share_with_seed(x: &[u64], seed: &Seed) -> Vec<u64> {
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(*seed);
    x.iter().map(|v| v.wrapping_sub(rng.next_u64())).collect()
}

/// The client's source of shares: a fresh OS-random seed per shared matrix, never reused.
#[derive(Default)]
pub struct Sharer {
    used: HashSet<Seed>,
    /// Seeds from this stream instead of the OS (reproducible tests only).
    stream: Option<rand_chacha::ChaCha20Rng>,
}

impl Sharer {
    /// A new sharer with no seeds used.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sharer whose seeds come from a ChaCha20 stream seeded with `seed`, for tests whose
    /// statistics must not depend on the run. Anyone who knows `seed` can undo the shares:
    /// never for real inputs.
    pub fn reproducible(seed: u64) -> Self {
        Self {
            used: HashSet::new(),
            stream: Some(rand_chacha::ChaCha20Rng::seed_from_u64(seed)),
        }
    }

    /// Split `x̃` into `(seed for server 0, words for server 1)`.
    ///
    /// # Panics
    /// If the operating system's random source fails, or (which would mean a broken random
    /// source) a seed repeats: the seed is never reused.
    pub fn share(&mut self, x: &[u64]) -> (Seed, Vec<u64>) {
        let mut seed = [0u8; 32];
        match &mut self.stream {
            Some(r) => r.fill_bytes(&mut seed),
            None => rand::rngs::OsRng
                .try_fill_bytes(&mut seed)
                .expect("the operating system's random source failed"),
        }
        assert!(
            self.used.insert(seed),
            "a share seed repeated: refusing to reuse it (the random source is broken)"
        );
        let words = share_with_seed(x, &seed);
        (seed, words)
    }

    /// Seeds drawn so far.
    pub fn seeds_used(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_seeds_differ() {
        let x: Vec<u64> = (0..1000u64).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
        let mut s = Sharer::new();
        let (seed, x1) = s.share(&x);
        let x0 = expand(&seed, x.len());
        let sum: Vec<u64> = x0
            .iter()
            .zip(&x1)
            .map(|(a, b)| a.wrapping_add(*b))
            .collect();
        assert_eq!(sum, x);
        let (seed2, _) = s.share(&x);
        assert_ne!(seed, seed2);
        assert_eq!(s.seeds_used(), 2);
    }

    /// ChaCha20 with an all-zero key and nonce (RFC 8439 A.1 vector 1): the first word.
    #[test]
    fn expansion_is_chacha20() {
        let w = expand(&[0; 32], 2);
        assert_eq!(
            w[0].to_le_bytes(),
            [0x76, 0xb8, 0xe0, 0xad, 0xa0, 0xf1, 0x3d, 0x90]
        );
    }
}
