//! Set-up shared by the model crate's integration tests.

use fedee_encrypt::{KeyGroup, KeySet, KeySpec};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use std::collections::BTreeMap;

/// Keys for `spec` with `groups`, drawn from a seeded ChaCha20 (no device key).
pub fn keyset(spec: &KeySpec, groups: &BTreeMap<String, KeyGroup>, seed: u64) -> KeySet {
    KeySet::generate(spec, groups, false, &mut ChaCha20Rng::seed_from_u64(seed)).unwrap()
}
