//! A one-hidden-layer MLP for tabular classification, and its EE key spec.
//!
//! `logits = fc2(act(fc1(x)))` with `x: (batch, in_features)`, `logits: (batch, out_features)`.
//! Parameters (names as in PyTorch's `nn.Linear`): `fc1.weight (hidden, in_features)`,
//! `fc1.bias (hidden,)`, `fc2.weight (out_features, hidden)`, `fc2.bias (out_features,)`.

use std::collections::BTreeMap;

use fedee_encrypt::{InputKind, KeyDecl, KeyGroup, KeyRef, KeySpec, StateDict};
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::ModelError;
use crate::arch::{Architecture, Input, Model};

/// Hidden-layer activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// ReLU: commutes with permutations and positive scaling (`P·D`).
    Relu,
    /// GELU: commutes with permutations only.
    Gelu,
}

/// MLP shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Number of input features.
    pub in_features: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Number of classes (logits).
    pub out_features: usize,
    /// Hidden activation.
    pub activation: Activation,
}

impl MlpConfig {
    /// Architecture name used in key specs and trainer jobs.
    pub const ARCHITECTURE: &'static str = "mlp";

    /// # Errors
    /// [`ModelError::Config`] if a dimension is zero or there are fewer than 2 classes.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.in_features == 0 || self.hidden == 0 || self.out_features < 2 {
            return Err(ModelError::Config(format!(
                "in_features, hidden must be > 0 and out_features >= 2, got {self:?}"
            )));
        }
        Ok(())
    }

    /// Expected parameter shapes by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        let (i, h, o) = (
            self.in_features as i64,
            self.hidden as i64,
            self.out_features as i64,
        );
        BTreeMap::from([
            ("fc1.weight".into(), vec![h, i]),
            ("fc1.bias".into(), vec![h]),
            ("fc2.weight".into(), vec![o, h]),
            ("fc2.bias".into(), vec![o]),
        ])
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        self.shapes()
            .values()
            .map(|s| s.iter().product::<i64>() as usize)
            .sum()
    }

    /// The EE key spec: `input` on the features (any invertible key is exact for inference;
    /// training needs a signed permutation for AdamW), `hidden` on the hidden units
    /// (permutation, or `P·D` under ReLU), `label` on the classes (a permutation, since
    /// softmax/cross-entropy commute with permutations only).
    pub fn key_spec(&self) -> KeySpec {
        let hidden_allowed = match self.activation {
            Activation::Relu => vec![KeyGroup::Permutation, KeyGroup::Monomial],
            Activation::Gelu => vec![KeyGroup::Permutation],
        };
        let keys = BTreeMap::from([
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
                "hidden".to_owned(),
                KeyDecl {
                    dim: self.hidden,
                    allowed: hidden_allowed,
                    why: format!("{:?} must commute with the hidden key", self.activation),
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
        let k = |n: &str| Some(KeyRef::new(n));
        let params = BTreeMap::from([
            ("fc1.weight".to_owned(), vec![k("hidden"), k("input")]),
            ("fc1.bias".to_owned(), vec![k("hidden")]),
            ("fc2.weight".to_owned(), vec![k("label"), k("hidden")]),
            ("fc2.bias".to_owned(), vec![k("label")]),
        ]);
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
    pub fn check_state(&self, state: &StateDict) -> Result<(), ModelError> {
        crate::arch::Architecture::Mlp(*self).check_state(state)
    }
}

/// The forward pass on any state dict of this architecture (plaintext or EE).
///
/// `x`: `(batch, in_features)` of the state's dtype. Returns `(batch, out_features)` logits.
pub fn forward(cfg: &MlpConfig, state: &StateDict, x: &Tensor) -> Tensor {
    let h = x.linear(&state["fc1.weight"], Some(&state["fc1.bias"]));
    let h = match cfg.activation {
        Activation::Relu => h.relu(),
        Activation::Gelu => h.gelu("none"),
    };
    h.linear(&state["fc2.weight"], Some(&state["fc2.bias"]))
}

/// A trainable MLP: a [`Model`] of [`Architecture::Mlp`] with feature-tensor conveniences.
pub struct Mlp {
    /// Shape.
    pub config: MlpConfig,
    model: Model,
}

impl Mlp {
    /// A freshly initialised MLP (PyTorch's default `nn.Linear` init) of dtype `kind`.
    /// Call `tch::manual_seed` first for reproducible weights.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an invalid config.
    pub fn new(config: MlpConfig, device: Device, kind: Kind) -> Result<Self, ModelError> {
        config.validate()?;
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let (i, h, o) = (
            config.in_features as i64,
            config.hidden as i64,
            config.out_features as i64,
        );
        let _ = nn::linear(&root / "fc1", i, h, Default::default());
        let _ = nn::linear(&root / "fc2", h, o, Default::default());
        let init: StateDict = vs.variables().into_iter().collect();
        Self::from_state(config, &init, device, kind)
    }

    /// An MLP holding a copy of `state`, converted to `kind` on `device`.
    ///
    /// # Errors
    /// [`ModelError::Name`]/[`ModelError::Shape`] if `state` does not fit `config`.
    pub fn from_state(
        config: MlpConfig,
        state: &StateDict,
        device: Device,
        kind: Kind,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(Self {
            config,
            model: Model::from_state(Architecture::Mlp(config), state, device, kind)?,
        })
    }

    /// A detached copy of the parameters.
    pub fn state(&self) -> StateDict {
        self.model.state()
    }

    /// Logits `(batch, out_features)` for `x: (batch, in_features)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.model
            .forward(&Input::Features(x.shallow_clone()))
            .expect("features fit the MLP")
    }

    /// An optimizer over this model's parameters.
    ///
    /// # Errors
    /// [`ModelError::Torch`] if libtorch refuses the optimizer.
    pub fn optimizer(&self, spec: &OptimizerSpec) -> Result<nn::Optimizer, ModelError> {
        self.model.optimizer(spec)
    }

    /// One optimizer step on a batch; returns the mean cross-entropy before the step.
    ///
    /// `x`: `(batch, in_features)`, `y`: `(batch,)` int64 class indices.
    pub fn train_step(&mut self, opt: &mut nn::Optimizer, x: &Tensor, y: &Tensor) -> f64 {
        self.model
            .train_step(opt, &Input::Features(x.shallow_clone()), y)
            .expect("features fit the MLP")
    }

    /// As [`Mlp::train_step`] with the FedProx proximal term `μ/2 Σ ‖w − anchor‖²`
    /// (see [`Model::train_step_proximal`]).
    pub fn train_step_proximal(
        &mut self,
        opt: &mut nn::Optimizer,
        x: &Tensor,
        y: &Tensor,
        anchor: &StateDict,
        mu: f64,
    ) -> f64 {
        self.model
            .train_step_proximal(
                opt,
                &Input::Features(x.shallow_clone()),
                y,
                Some((anchor, mu)),
            )
            .expect("features and anchor fit the MLP")
    }

    /// Accuracy of argmax predictions on `(x, y)`.
    pub fn accuracy(&self, x: &Tensor, y: &Tensor) -> f64 {
        tch::no_grad(|| {
            let pred = self.forward(x).argmax(-1, false);
            pred.eq_tensor(y)
                .to_kind(Kind::Double)
                .mean(Kind::Double)
                .double_value(&[])
        })
    }
}

/// Optimizer and its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerSpec {
    /// AdamW (Loshchilov & Hutter 2019).
    AdamW {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// SGD with momentum.
    Sgd {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    },
}

impl OptimizerSpec {
    /// The optimizer family, for [`fedee_encrypt::check_trainable`].
    pub fn family(&self) -> fedee_encrypt::Optimizer {
        match self {
            OptimizerSpec::AdamW { .. } => fedee_encrypt::Optimizer::AdamW,
            OptimizerSpec::Sgd { .. } => fedee_encrypt::Optimizer::Sgd,
        }
    }
}
