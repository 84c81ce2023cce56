//! Equivariant encryption (EE): a secret change of basis applied to a model's parameters and
//! to its inputs and outputs, so that `decrypt(F'(encrypt(x))) = F(x)`.
//!
//! Source of the math: SECURITY.md, "The math" (one rule for every parameter,
//! `W' = R · W · C⁻¹`, the idea of Git Re-Basin's `PermutationSpec`, Ainsworth et al. 2022).
//!
//! * [`Key`]: one secret key acting on one axis (permutation, signed permutation, monomial,
//!   orthogonal, invertible).
//! * [`KeySpec`]: declared by each architecture (the types live in `fedee_model::keyspec`,
//!   re-exported here); which key acts on which axis of which parameter, and on the model's
//!   inputs and outputs.
//! * [`KeySet`]: the secret material for a spec (serde; written 0600 by [`KeySet::save`]).
//! * [`transform_state`] / [`decrypt_state`]: the one generic transform.
//! * [`encrypt_inputs`], [`encrypt_labels`], [`decrypt_outputs`], [`decrypt_labels`].
//! * [`check_trainable`]: refuses key/optimizer pairs that break training equivariance.
//! * [`verify_inference`]: the equivariance verifier.
//!
//! # Security
//! EE is a change of basis, not semantically secure encryption. A server holding an EE model
//! still sees shapes and architecture, the multiset of activation values under permutation
//! keys, losses, label histograms, and deterministic ciphertext (equal inputs give equal
//! encrypted inputs). `d + 1` known plaintext/ciphertext pairs recover an input key by a linear
//! solve, and public base weights allow weight matching. See SECURITY.md.

pub mod attack;
mod key;
mod spec;
pub mod volume;

pub use fedee_model::keyspec::{
    Heads, InputKind, KeyDecl, KeyGroup, KeyRef, KeySpec, Optimizer, StateDict,
};
pub use key::{Key, KeyMaterial};
pub use spec::{
    KeySet, check_trainable, decrypt_labels, decrypt_outputs, decrypt_state, encrypt_indices,
    encrypt_inputs, encrypt_labels, encrypt_token_ids, rotate, transform_state, verify_inference,
};

/// Errors of key generation, transformation and verification.
#[derive(Debug, thiserror::Error)]
pub enum EncryptError {
    /// A parameter in the state dict has no entry in the key spec, or vice versa.
    #[error("parameter `{name}` {problem}")]
    Parameter { name: String, problem: String },
    /// A tensor's axis does not match its key's dimension.
    #[error(
        "parameter `{name}` axis {axis} has size {found}, but key `{key}` has dimension {expected}"
    )]
    Shape {
        name: String,
        axis: usize,
        key: String,
        expected: usize,
        found: i64,
    },
    /// The key set lacks a key the spec names.
    #[error(
        "key `{0}` is named by the key spec but missing from the key set (generate keys for this spec with `fedee ee keygen`)"
    )]
    MissingKey(String),
    /// A key of a group the architecture does not allow on that axis.
    #[error("key `{key}` is {group}, but this architecture allows only {allowed} there ({why})")]
    GroupNotAllowed {
        key: String,
        group: KeyGroup,
        allowed: String,
        why: String,
    },
    /// A key/optimizer pair that breaks training equivariance (SECURITY.md, "The math").
    #[error(
        "refusing to train with {optimizer}: key `{key}` is {group}, and {optimizer} is not equivariant under {group} keys, so training would silently diverge from plaintext training; {fix}"
    )]
    NotEquivariant {
        key: String,
        group: KeyGroup,
        optimizer: Optimizer,
        fix: String,
    },
    /// The input offset δ must be zero for training.
    #[error(
        "refusing to train with an input offset δ ≠ 0: no optimizer is equivariant under an offset; generate training keys without --offset"
    )]
    OffsetInTraining,
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A key file exists where a new one would be written.
    #[error(
        "key file {0} exists: choose another path, or pass --force to replace it (the old keys then no longer decrypt anything made with them)"
    )]
    Exists(String),
    /// A key file is not valid JSON for a key set.
    #[error("key file {path} is not a valid fedee key set: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    /// Invalid key material (e.g. a permutation with repeated indices).
    #[error("invalid key `{key}`: {problem}")]
    InvalidKey { key: String, problem: String },
    /// An error from libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
