//! A multilayer perceptron for tabular classification, and its EE key spec.
//!
//! `logits = fc(L+1)(act(… act(fc1(x))))` with `x: (batch, in_features)`,
//! `logits: (batch, out_features)` and `L = hidden.len() ≥ 1` hidden layers. Parameters (names
//! as in PyTorch's `nn.Linear`): `fcK.weight (out_K, in_K)` and `fcK.bias (out_K,)` for
//! `K = 1 … L+1`, where `in_1 = in_features`, `out_K = hidden[K-1]` for hidden layers and
//! `out_(L+1) = out_features`.

use std::collections::BTreeMap;

use crate::keyspec::{InputKind, KeyDecl, KeyGroup, KeyRef, KeySpec, StateDict};
use serde::{Deserialize, Deserializer, Serialize};
use tch::Tensor;

use crate::ModelError;
use crate::state::Checked;

/// Hidden-layer activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// ReLU: commutes with permutations and positive scaling (`P·D`).
    Relu,
    /// GELU: commutes with permutations only.
    Gelu,
}

impl Activation {
    /// Apply the activation elementwise.
    pub fn apply(self, z: &Tensor) -> Tensor {
        match self {
            Activation::Relu => z.relu(),
            Activation::Gelu => z.gelu("none"),
        }
    }
}

/// MLP shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Number of input features.
    pub in_features: usize,
    /// Hidden layer sizes, first to last (at least one). Files written before multi-layer
    /// MLPs hold one number here; it is read as a one-element list.
    #[serde(deserialize_with = "one_or_many")]
    pub hidden: Vec<usize>,
    /// Number of classes (logits).
    pub out_features: usize,
    /// Hidden activation.
    pub activation: Activation,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Hidden {
        One(usize),
        Many(Vec<usize>),
    }
    Ok(match Hidden::deserialize(d)? {
        Hidden::One(h) => vec![h],
        Hidden::Many(v) => v,
    })
}

/// Most hidden layers an MLP may have (the federation spec's limit).
pub use fedee_spec::MAX_HIDDEN_LAYERS;

impl MlpConfig {
    /// Architecture name used in key specs and trainer jobs.
    pub const ARCHITECTURE: &'static str = "mlp";

    /// # Errors
    /// [`ModelError::Config`] if a dimension is zero, there is no hidden layer or more than
    /// [`MAX_HIDDEN_LAYERS`], or there are fewer than 2 classes.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.in_features == 0
            || self.hidden.is_empty()
            || self.hidden.len() > MAX_HIDDEN_LAYERS
            || self.hidden.contains(&0)
            || self.out_features < 2
        {
            return Err(ModelError::Config(format!(
                "in_features and every hidden size must be > 0, with 1 to {MAX_HIDDEN_LAYERS} hidden layers and out_features >= 2, got {self:?}"
            )));
        }
        Ok(())
    }

    /// Layer widths `[in_features, hidden…, out_features]`.
    pub fn dims(&self) -> Vec<usize> {
        let mut dims = vec![self.in_features];
        dims.extend(&self.hidden);
        dims.push(self.out_features);
        dims
    }

    /// Parameter names `(fcK.weight, fcK.bias)` for `K = 1 … L+1`.
    pub fn layers(&self) -> Vec<(String, String)> {
        (1..=self.hidden.len() + 1)
            .map(|k| (format!("fc{k}.weight"), format!("fc{k}.bias")))
            .collect()
    }

    /// Name of the key on hidden layer `k` (1-based): `hidden` for a one-hidden-layer MLP
    /// (as key files have always said), `hidden1`, `hidden2`, … otherwise.
    pub fn hidden_key(&self, k: usize) -> String {
        if self.hidden.len() == 1 {
            "hidden".to_owned()
        } else {
            format!("hidden{k}")
        }
    }

    /// Expected parameter shapes by name: the federation spec's
    /// [`fedee_spec::MlpShape::parameter_shapes`] (one definition, which the libtorch-free
    /// aggregator checks initial models against), as tch sizes.
    pub fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        fedee_spec::MlpShape {
            in_features: self.in_features,
            hidden: self.hidden.clone(),
            out_features: self.out_features,
            activation: String::new(),
        }
        .parameter_shapes()
        .into_iter()
        .map(|(name, shape)| (name, shape.into_iter().map(|d| d as i64).collect()))
        .collect()
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        self.shapes()
            .values()
            .map(|s| s.iter().product::<i64>() as usize)
            .sum()
    }

    /// The EE key spec: `input` on the features (any invertible key is exact for inference;
    /// training needs a signed permutation for AdamW), one key per hidden layer (permutation,
    /// or `P·D` under ReLU; see [`MlpConfig::hidden_key`]), `label` on the classes (a
    /// permutation, since softmax/cross-entropy commute with permutations only). Layer `K`'s
    /// weight carries `(key of its output, key of its input)`, its bias the output key.
    pub fn key_spec(&self) -> KeySpec {
        let hidden_allowed = match self.activation {
            Activation::Relu => vec![KeyGroup::Permutation, KeyGroup::Monomial],
            Activation::Gelu => vec![KeyGroup::Permutation],
        };
        let mut keys = BTreeMap::from([
            (
                "input".to_owned(),
                KeyDecl {
                    dim: self.in_features,
                    allowed: vec![
                        KeyGroup::SignedPermutation,
                        KeyGroup::Permutation,
                        KeyGroup::Monomial,
                        KeyGroup::Orthogonal,
                        KeyGroup::Invertible,
                    ],
                    why: "the input feeds a linear layer only".into(),
                    heads: None,
                },
            ),
            (
                "label".to_owned(),
                KeyDecl {
                    dim: self.out_features,
                    allowed: vec![KeyGroup::Permutation],
                    why: "softmax and cross-entropy commute with permutations only".into(),
                    heads: None,
                },
            ),
        ]);
        // Key names per layer boundary: input, hidden…, label.
        let mut names = vec!["input".to_owned()];
        for (k, &dim) in self.hidden.iter().enumerate() {
            let name = self.hidden_key(k + 1);
            keys.insert(
                name.clone(),
                KeyDecl {
                    dim,
                    allowed: hidden_allowed.clone(),
                    why: format!("{:?} must commute with the hidden key", self.activation),
                    heads: None,
                },
            );
            names.push(name);
        }
        names.push("label".to_owned());
        let k = |n: &str| Some(KeyRef::new(n));
        let mut params = BTreeMap::new();
        for ((w, b), pair) in self.layers().into_iter().zip(names.windows(2)) {
            params.insert(w, vec![k(&pair[1]), k(&pair[0])]);
            params.insert(b, vec![k(&pair[1])]);
        }
        KeySpec {
            architecture: Self::ARCHITECTURE.into(),
            keys,
            params,
            input: "input".into(),
            output: "label".into(),
            input_kind: InputKind::Features,
            input_layer: Some(("fc1.weight".into(), "fc1.bias".into())),
        }
    }

    /// Check that `state` has exactly this architecture's tensors with the right shapes.
    ///
    /// # Errors
    /// [`ModelError::Name`] or [`ModelError::Shape`] naming the tensor.
    pub fn check_state<'a>(&self, state: &'a StateDict) -> Result<Checked<'a>, ModelError> {
        Checked::new(&self.shapes(), state, Self::ARCHITECTURE)
    }
}

/// The forward pass on any state dict of this architecture (plaintext or EE).
///
/// `x`: `(batch, in_features)` of the state's dtype. Returns `(batch, out_features)` logits.
pub fn forward(cfg: &MlpConfig, state: Checked<'_>, x: &Tensor) -> Tensor {
    let layers = cfg.layers();
    let last = layers.len() - 1;
    let mut h = x.shallow_clone();
    for (k, (w, b)) in layers.iter().enumerate() {
        h = h.linear(state.get(w), Some(state.get(b)));
        if k < last {
            h = cfg.activation.apply(&h);
        }
    }
    h
}
