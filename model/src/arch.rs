//! Architectures behind one interface, and a trainable model holding any of them. The trainer
//! uses this: it only needs the architecture's name and config, never keys.

use std::collections::BTreeMap;

use crate::keyspec::{KeySpec, StateDict};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::ModelError;
use crate::bert::{self, BertClassifierConfig};
use crate::mlp::{self, MlpConfig, OptimizerSpec};

/// An architecture and its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture", content = "config", rename_all = "kebab-case")]
pub enum Architecture {
    /// MLP on feature vectors.
    Mlp(MlpConfig),
    /// BERT encoder + mean pooling + linear head on token ids.
    BertClassifier(BertClassifierConfig),
}

/// A batch of model inputs.
#[derive(Debug)]
pub enum Input {
    /// `(batch, in_features)` floats.
    Features(Tensor),
    /// `ids`, `mask`: `(batch, seq)` int64.
    Tokens { ids: Tensor, mask: Tensor },
    /// Client-side embeddings of a BERT classifier: `x (batch, seq, hidden)` float, the
    /// output of the embedding layer ([`crate::bert::embed`], positions already added, token
    /// order possibly shuffled), and `mask (batch, seq)` int64 in the same order. The server
    /// runs only the encoder layers and the head; it receives no token ids.
    Embedded { x: Tensor, mask: Tensor },
}

impl Input {
    /// Number of examples.
    pub fn len(&self) -> i64 {
        match self {
            Input::Features(x) => x.size()[0],
            Input::Tokens { ids, .. } => ids.size()[0],
            Input::Embedded { x, .. } => x.size()[0],
        }
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Architecture {
    /// Name used on the wire and in key specs.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Mlp(_) => MlpConfig::ARCHITECTURE,
            Architecture::BertClassifier(_) => BertClassifierConfig::ARCHITECTURE,
        }
    }

    /// Parameter shapes by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        match self {
            Architecture::Mlp(c) => c.shapes(),
            Architecture::BertClassifier(c) => c.shapes(),
        }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        match self {
            Architecture::Mlp(c) => c.out_features,
            Architecture::BertClassifier(c) => c.num_labels,
        }
    }

    /// The EE key spec.
    pub fn key_spec(&self) -> KeySpec {
        match self {
            Architecture::Mlp(c) => c.key_spec(),
            Architecture::BertClassifier(c) => c.key_spec(),
        }
    }

    /// # Errors
    /// [`ModelError::Name`]/[`ModelError::Shape`] naming the first tensor that does not fit.
    pub fn check_state(&self, state: &StateDict) -> Result<(), ModelError> {
        let shapes = self.shapes();
        for (name, expected) in &shapes {
            let t = state.get(name).ok_or_else(|| ModelError::Name {
                name: name.clone(),
                problem: "is missing".into(),
            })?;
            if &t.size() != expected {
                return Err(ModelError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: t.size(),
                });
            }
        }
        if let Some(name) = state.keys().find(|n| !shapes.contains_key(*n)) {
            return Err(ModelError::Name {
                name: name.clone(),
                problem: format!("is not a parameter of {}", self.name()),
            });
        }
        Ok(())
    }

    /// Logits `(batch, classes)` of any state dict of this architecture (plaintext or EE).
    ///
    /// # Errors
    /// [`ModelError::Config`] if the input kind does not fit the architecture.
    pub fn forward(&self, state: &StateDict, input: &Input) -> Result<Tensor, ModelError> {
        match (self, input) {
            (Architecture::Mlp(c), Input::Features(x)) => Ok(mlp::forward(c, state, x)),
            (Architecture::BertClassifier(c), Input::Tokens { ids, mask }) => {
                Ok(bert::classify(c, state, ids, mask))
            }
            (Architecture::BertClassifier(c), Input::Embedded { x, mask }) => {
                Ok(bert::classify_embedded(c, state, x, mask))
            }
            (a, _) => Err(ModelError::Config(format!(
                "wrong input kind for {}",
                a.name()
            ))),
        }
    }
}

/// Build an optimizer over a `VarStore`.
///
/// # Errors
/// [`ModelError::Torch`] if libtorch refuses it.
pub fn build_optimizer(
    vs: &nn::VarStore,
    spec: &OptimizerSpec,
) -> Result<nn::Optimizer, ModelError> {
    use nn::OptimizerConfig;
    Ok(match spec {
        OptimizerSpec::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } => nn::AdamW {
            beta1: *beta1,
            beta2: *beta2,
            wd: *weight_decay,
            eps: *eps,
            amsgrad: false,
        }
        .build(vs, *lr)?,
        OptimizerSpec::Sgd {
            lr,
            momentum,
            weight_decay,
        } => nn::Sgd {
            momentum: *momentum,
            dampening: 0.0,
            wd: *weight_decay,
            nesterov: false,
        }
        .build(vs, *lr)?,
    })
}

/// A trainable model of any [`Architecture`]: parameters in a tch `VarStore`.
pub struct Model {
    /// Architecture.
    pub arch: Architecture,
    vs: nn::VarStore,
    params: StateDict,
}

impl Model {
    /// A model holding a copy of `state`, as `kind` on `device`.
    ///
    /// # Errors
    /// If `state` does not fit `arch`.
    pub fn from_state(
        arch: Architecture,
        state: &StateDict,
        device: Device,
        kind: Kind,
    ) -> Result<Self, ModelError> {
        arch.check_state(state)?;
        let mut vs = nn::VarStore::new(device);
        // New variables take the store's kind: set it first, or f64 state would be truncated.
        vs.set_kind(kind);
        for (name, t) in state {
            // tch variable names cannot contain '.': nest paths instead ("a.b.c" = a / b, "c").
            let mut parts: Vec<&str> = name.split('.').collect();
            let last = parts.pop().expect("non-empty name");
            let path = parts.iter().fold(vs.root(), |p, s| p / *s);
            let _ = path.f_var_copy(last, &t.to_kind(kind).to_device(device))?;
        }
        let params: StateDict = vs.variables().into_iter().collect();
        if let Some((name, t)) = params.iter().find(|(_, t)| t.kind() != kind) {
            return Err(ModelError::Dtype {
                name: name.clone(),
                dtype: format!("{:?} (wanted {kind:?})", t.kind()),
            });
        }
        Ok(Self { arch, vs, params })
    }

    /// A detached copy of the parameters.
    pub fn state(&self) -> StateDict {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.detach().copy()))
            .collect()
    }

    /// Logits for `input`.
    ///
    /// # Errors
    /// As [`Architecture::forward`].
    pub fn forward(&self, input: &Input) -> Result<Tensor, ModelError> {
        self.arch.forward(&self.params, input)
    }

    /// An optimizer over this model's parameters.
    ///
    /// # Errors
    /// As [`build_optimizer`].
    pub fn optimizer(&self, spec: &OptimizerSpec) -> Result<nn::Optimizer, ModelError> {
        build_optimizer(&self.vs, spec)
    }

    /// One optimizer step; returns the batch's mean cross-entropy before the step.
    ///
    /// # Errors
    /// As [`Architecture::forward`].
    pub fn train_step(
        &mut self,
        opt: &mut nn::Optimizer,
        input: &Input,
        y: &Tensor,
    ) -> Result<f64, ModelError> {
        self.train_step_proximal(opt, input, y, None)
    }

    /// One optimizer step on the cross-entropy plus, with `Some((anchor, μ))`, the FedProx
    /// proximal term `μ/2 Σ ‖w − anchor‖²` (Li et al., "Federated Optimization in
    /// Heterogeneous Networks", MLSys 2020, eq. 2); `anchor` is the round's global model on
    /// this model's device and dtype. Returns the batch's mean cross-entropy before the step.
    ///
    /// # Errors
    /// As [`Architecture::forward`]; [`ModelError::Name`] if `anchor` lacks a parameter.
    pub fn train_step_proximal(
        &mut self,
        opt: &mut nn::Optimizer,
        input: &Input,
        y: &Tensor,
        proximal: Option<(&StateDict, f64)>,
    ) -> Result<f64, ModelError> {
        let ce = cross_entropy(&self.forward(input)?, y);
        let mut loss = ce.shallow_clone();
        if let Some((anchor, mu)) = proximal.filter(|p| p.1 > 0.0) {
            for (name, p) in &self.params {
                let a = anchor.get(name).ok_or_else(|| ModelError::Name {
                    name: name.clone(),
                    problem: "is missing from the FedProx anchor".into(),
                })?;
                loss += (p - a).square().sum(p.kind()) * (mu / 2.0);
            }
        }
        opt.backward_step(&loss);
        Ok(ce.double_value(&[]))
    }
}

/// Mean cross-entropy of `logits (batch, classes)` against `y (batch,)` int64, computed in the
/// logits' dtype. (tch's `cross_entropy_for_logits` computes the log-softmax in f32 whatever
/// the dtype, which silently limited f64 training to f32 precision.)
pub fn cross_entropy(logits: &Tensor, y: &Tensor) -> Tensor {
    logits.log_softmax(-1, logits.kind()).nll_loss(y)
}
