//! Key specs: which secret key acts on which axis of which parameter. Each architecture
//! declares its own ([`crate::MlpConfig::key_spec`], [`crate::BertClassifierConfig::key_spec`]);
//! `fedee-encrypt` holds the key material and applies it. These types carry no secret, so the
//! trainer and the model code use them without linking the crate that defines key sets.
//!
//! The rule (SECURITY.md, "The math"): axis 0 of a parameter is its row (output) axis and gets
//! the key itself, every other axis gets the dual, so a linear `W (out, in)` with row key `R`
//! and column key `C` becomes `W' = R W C⁻¹` (the idea of Git Re-Basin's `PermutationSpec`,
//! Ainsworth et al. 2022).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The group a key is drawn from, weakest to richest (SECURITY.md, "The math").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyGroup {
    /// Index shuffle `P`.
    Permutation,
    /// Shuffle and sign flips `S` (orthogonal).
    SignedPermutation,
    /// `P·D` with `D` positive diagonal.
    Monomial,
    /// Haar-random orthogonal `Q`.
    Orthogonal,
    /// General invertible `T`.
    Invertible,
}

impl std::fmt::Display for KeyGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyGroup::Permutation => "a permutation",
            KeyGroup::SignedPermutation => "a signed permutation",
            KeyGroup::Monomial => "monomial (P·D)",
            KeyGroup::Orthogonal => "orthogonal",
            KeyGroup::Invertible => "general invertible",
        })
    }
}

impl std::str::FromStr for KeyGroup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "permutation" => Ok(Self::Permutation),
            "signed-permutation" => Ok(Self::SignedPermutation),
            "monomial" => Ok(Self::Monomial),
            "orthogonal" => Ok(Self::Orthogonal),
            "invertible" => Ok(Self::Invertible),
            _ => Err(format!(
                "unknown key group `{s}`: use permutation, signed-permutation, monomial, orthogonal or invertible"
            )),
        }
    }
}

/// A model's parameters by name. Tensors are f32 or f64, on any device.
pub type StateDict = BTreeMap<String, Tensor>;

/// A reference from one axis of a parameter to a key. `dual` selects `K⁻ᵀ` instead of `K`
/// (embedding tables and attention `W_k` need it); `permutation` selects the key's index
/// permutation alone, without its signs or scales: for elementwise scales such as RMSNorm's γ
/// (`RMSNorm(S x) = S RMSNorm(x)` for a signed permutation `S` exactly when γ is permuted by
/// `S`'s permutation, not `S`), and for a SwiGLU gate whose up rows are scaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRef {
    /// Name of the key.
    pub key: String,
    /// Use the dual `K⁻ᵀ`.
    #[serde(default)]
    pub dual: bool,
    /// Use the key's permutation alone (no signs, no scales).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permutation: bool,
}

impl KeyRef {
    /// The key itself.
    pub fn new(key: &str) -> Self {
        Self {
            key: key.to_owned(),
            dual: false,
            permutation: false,
        }
    }

    /// The dual `K⁻ᵀ`.
    pub fn dual(key: &str) -> Self {
        Self {
            dual: true,
            ..Self::new(key)
        }
    }

    /// The key's permutation alone, for elementwise scale vectors and unscaled gates.
    pub fn permutation(key: &str) -> Self {
        Self {
            permutation: true,
            ..Self::new(key)
        }
    }
}

/// A key the architecture declares: its dimension and the groups allowed on it by the layers
/// it passes through (e.g. GELU commutes with permutations only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDecl {
    /// Dimension of the axis.
    pub dim: usize,
    /// Groups the architecture allows; the first is the default for key generation.
    pub allowed: Vec<KeyGroup>,
    /// Why the list is what it is (shown in errors).
    pub why: String,
    /// For attention: the axis is `count` heads of `dim / count` units. The key must be
    /// block-diagonal per head (`M_h`, of the key's group) times a head permutation shared by
    /// every key of the same `group` (a layer's Q/K and V/O keys must move heads alike).
    #[serde(default)]
    pub heads: Option<Heads>,
}

impl KeyDecl {
    /// A key of `dim` without head structure.
    pub fn new(dim: usize, allowed: Vec<KeyGroup>, why: &str) -> Self {
        Self {
            dim,
            allowed,
            why: why.into(),
            heads: None,
        }
    }
}

/// Head structure of an attention key (see [`KeyDecl::heads`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heads {
    /// Number of heads.
    pub count: usize,
    /// Keys with the same group name share one head permutation.
    pub group: String,
    /// Rotary heads (RoPE): a head's block must commute with the rotation of every
    /// frequency pair `(i, i + d_h/2)`, so for index groups it is the identity (heads move
    /// whole; pairs cannot be permuted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotary: bool,
    /// Grouped-query attention: this key acts on the query heads of the key/value key it
    /// names (that key's head count divides this one's). Query head slot `s` holds a head of
    /// the group the KV key put in slot `s / G` (`G` query heads per KV head), permuted within
    /// the group by a permutation shared by the keys of this key's `group`, and its block is
    /// that KV head's block: queries and outputs stay with their keys and values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<String>,
}

impl Heads {
    /// `count` heads sharing the permutation of `group`.
    pub fn new(count: usize, group: &str) -> Self {
        Self {
            count,
            group: group.into(),
            rotary: false,
            follows: None,
        }
    }
}

/// What the model's input is, and so how [`KeySpec::input`] encrypts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputKind {
    /// Feature vectors `(batch, features)`: `x' = T x + δ` (`fedee_encrypt::encrypt_inputs`).
    #[default]
    Features,
    /// Token ids `(batch, seq)` under a vocabulary permutation (`fedee_encrypt::encrypt_token_ids`).
    TokenIds,
}

/// Which key acts on which axis of which parameter, and on the model's inputs and outputs.
///
/// Axis 0 of a parameter is its row (output) axis and gets the key itself; every other axis is
/// a column (input) axis and gets the dual, so a linear `W (out, in)` with row key `R` and
/// column key `C` becomes `W' = R W C⁻¹` and a 1-D bias with row key `R` becomes `b' = R b`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySpec {
    /// Architecture name, e.g. `mlp`.
    pub architecture: String,
    /// Declared keys.
    pub keys: BTreeMap<String, KeyDecl>,
    /// Per parameter, one optional key per axis.
    pub params: BTreeMap<String, Vec<Option<KeyRef>>>,
    /// Key on the inputs: the features of `(batch, in_features)` inputs, or the vocabulary
    /// for token ids (see `input_kind`).
    pub input: String,
    /// What the input is.
    #[serde(default)]
    pub input_kind: InputKind,
    /// Key on the outputs (last axis of logits) and on class labels.
    pub output: String,
    /// The first linear layer `(weight, bias)`, into whose bias an input offset δ folds;
    /// `None` when the architecture allows no offset.
    pub input_layer: Option<(String, String)>,
}

/// Training optimizers whose equivariance `fedee_encrypt::check_trainable` knows: SGD is
/// equivariant under orthogonal keys, Adam(W) only under signed permutations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// SGD, with or without momentum and weight decay.
    Sgd,
    /// Adam or AdamW.
    AdamW,
}

impl std::fmt::Display for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Optimizer::Sgd => "SGD",
            Optimizer::AdamW => "AdamW",
        })
    }
}
