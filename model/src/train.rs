//! Training: a [`Model`] of any [`Architecture`] holding its parameters in a tch `VarStore`,
//! its optimizers, and [`Mlp`], the MLP with feature-tensor conveniences.

use crate::keyspec::StateDict;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::ModelError;
use crate::arch::{Architecture, Input};
use crate::mlp::MlpConfig;
use crate::state::Checked;

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
    /// The optimizer family, for `fedee_encrypt::check_trainable`.
    pub fn family(&self) -> crate::keyspec::Optimizer {
        match self {
            OptimizerSpec::AdamW { .. } => crate::keyspec::Optimizer::AdamW,
            OptimizerSpec::Sgd { .. } => crate::keyspec::Optimizer::Sgd,
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
            let t = t.to_kind(kind).to_device(device);
            if matches!(arch, Architecture::Llama(_)) {
                // Decoding reads every matrix once per token: store them in the layout
                // libtorch's matrix-vector product reads fastest.
                let _ = path.add(last, crate::llama::decode_layout(&t), true);
            } else {
                let _ = path.f_var_copy(last, &t)?;
            }
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

    /// A detached, contiguous (row-major) copy of the parameters.
    pub fn state(&self) -> StateDict {
        self.params
            .iter()
            .map(|(k, v)| {
                let v = v.detach();
                let copy = if v.is_contiguous() {
                    v.copy()
                } else {
                    v.contiguous()
                };
                (k.clone(), copy)
            })
            .collect()
    }

    /// Logits for `input`.
    ///
    /// # Errors
    /// As [`Architecture::forward`].
    pub fn forward(&self, input: &Input) -> Result<Tensor, ModelError> {
        self.arch.forward(Checked::trusted(&self.params), input)
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

    /// The causal LM (with its state) when this model is one, for decoding with a
    /// [`crate::llama::KvCache`].
    pub fn llama(&self) -> Option<(&crate::llama::LlamaConfig, Checked<'_>)> {
        match &self.arch {
            Architecture::Llama(c) => Some((c, Checked::trusted(&self.params))),
            _ => None,
        }
    }

    /// One optimizer step of a causal LM on [`crate::llama::causal_lm_loss`] (the targets are
    /// the input ids shifted by one); returns the loss before the step.
    ///
    /// # Errors
    /// [`ModelError::Config`] if this model is not a causal LM or `input` is not token ids;
    /// as [`crate::llama::causal_lm_loss`].
    pub fn train_step_causal(
        &mut self,
        opt: &mut nn::Optimizer,
        input: &Input,
    ) -> Result<f64, ModelError> {
        let (Some((c, s)), Input::Tokens { ids, mask }) = (self.llama(), input) else {
            return Err(ModelError::Config(format!(
                "a {} model trains on labels: send `y` with the batch",
                self.arch.name()
            )));
        };
        let loss = crate::llama::causal_lm_loss(c, s, ids, mask)?;
        opt.backward_step(&loss);
        Ok(loss.double_value(&[]))
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
        for (k, d) in config.dims().windows(2).enumerate() {
            let _ = nn::linear(
                &root / format!("fc{}", k + 1),
                d[0] as i64,
                d[1] as i64,
                Default::default(),
            );
        }
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
            model: Model::from_state(Architecture::Mlp(config.clone()), state, device, kind)?,
            config,
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
