//! Mask expansion: a 32-byte seed becomes a vector of `u32` words, ChaCha20's keystream
//! (`chacha20::ChaCha20Rng`, 20 rounds, stream 0) read as little-endian words.
//!
//! Long vectors are expanded in parallel chunks: each chunk seeks to its word position, so the
//! result does not depend on the chunking or the thread count.

use rand_core::{Rng, SeedableRng};
use rayon::prelude::*;

/// Words per parallel chunk (256 KiB).
const CHUNK: usize = 1 << 16;

/// Whether a mask is added or subtracted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    /// `acc += mask`
    Plus,
    /// `acc −= mask`
    Minus,
}

fn apply_chunk(acc: &mut [u32], start: usize, masks: &[([u8; 32], Sign)]) {
    let mut buf = vec![0u8; acc.len() * 4];
    for (seed, sign) in masks {
        let mut rng = chacha20::ChaCha20Rng::from_seed(*seed);
        rng.set_word_pos(start as u128);
        rng.fill_bytes(&mut buf);
        let words = buf
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match sign {
            Sign::Plus => acc
                .iter_mut()
                .zip(words)
                .for_each(|(a, m)| *a = a.wrapping_add(m)),
            Sign::Minus => acc
                .iter_mut()
                .zip(words)
                .for_each(|(a, m)| *a = a.wrapping_sub(m)),
        }
    }
    buf.iter_mut().for_each(|b| *b = 0);
}

/// `acc ± PRG(seed)` for every `(seed, sign)`, in place, in parallel over chunks of `acc`
/// (each chunk applies all masks while it is in cache).
pub fn apply(acc: &mut [u32], masks: &[([u8; 32], Sign)]) {
    acc.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| apply_chunk(chunk, i * CHUNK, masks));
}

/// `PRG(seed)`: the first `len` words.
pub fn expand(seed: &[u8; 32], len: usize) -> Vec<u32> {
    let mut v = vec![0u32; len];
    apply(&mut v, &[(*seed, Sign::Plus)]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8439 appendix A.1, test vector 1: key and nonce all zero, block 0.
    #[test]
    fn keystream_matches_rfc8439() {
        let ks = expand(&[0; 32], 16);
        let bytes: Vec<u8> = ks.iter().flat_map(|w| w.to_le_bytes()).collect();
        let want = "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7\
                    da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586";
        let got: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn chunked_expansion_equals_one_stream() {
        let seed = [7u8; 32];
        let n = 3 * CHUNK + 123;
        let par = expand(&seed, n);
        let mut rng = chacha20::ChaCha20Rng::from_seed(seed);
        let seq: Vec<u32> = (0..n).map(|_| rng.next_u32()).collect();
        assert_eq!(par, seq);
        let mut acc = par.clone();
        apply(&mut acc, &[(seed, Sign::Minus)]);
        assert!(acc.iter().all(|&w| w == 0));
    }
}
