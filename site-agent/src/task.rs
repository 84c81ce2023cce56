//! What a site trains: a [`LocalTask`] owns the site's data and model architecture, evaluates a
//! global model and trains it locally. The federation loop in `client` is the same for all.
//! [`from_spec`] builds the task a federation spec describes on the site's own data.

use fedee_encrypt::StateDict;
use fedee_model::{Activation, Architecture, Input, Mlp, MlpConfig, Model, OptimizerSpec};
use fedee_spec::FederationSpec;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

use crate::SiteError;
use crate::dpsgd::DpSgd;
use crate::metrics::{Metrics, classification};
use crate::table::{DataReport, Examples, Preprocessing, RowFilter, TabularData};
use crate::train::{LocalTraining, to_tensors, train_local};

/// Settings the aggregator sends for one round.
#[derive(Debug, Clone, Copy)]
pub struct RoundSettings {
    /// Passes over the local training split.
    pub epochs: u32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Learning rate.
    pub learning_rate: f64,
    /// FedProx proximal coefficient μ (0 = plain local training).
    pub proximal_mu: f64,
}

/// A split a site holds out from training and evaluates global models on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldOut {
    /// For choosing among models (the federation's model selection); never reported as the
    /// model's quality.
    Validation,
    /// For reporting the chosen model's quality; never used to choose.
    Test,
}

/// A site's local learning problem.
pub trait LocalTask: Send {
    /// Training examples (the FedAvg weight).
    fn num_examples(&self) -> u64;
    /// Examples in a held-out split (0: the site has no such split).
    fn num_held_out(&self, split: HeldOut) -> u64;
    /// Metrics of `global` on a held-out split.
    ///
    /// # Errors
    /// If `global` does not fit the architecture.
    fn evaluate(&mut self, global: &StateDict, split: HeldOut) -> Result<Metrics, SiteError>;
    /// Train from `global`; returns the local model and the last epoch's mean loss.
    ///
    /// # Errors
    /// If `global` does not fit the architecture.
    fn train(
        &mut self,
        global: &StateDict,
        s: &RoundSettings,
        rng: &mut ChaCha20Rng,
    ) -> Result<(StateDict, f64), SiteError>;
    /// Train from `global` with DP-SGD (record-level DP) for `steps` steps; returns the local
    /// model and the mean loss.
    ///
    /// # Errors
    /// [`SiteError::Unsupported`] for tasks whose layers have no vectorized per-example
    /// gradients (all but the MLP).
    fn train_dpsgd(
        &mut self,
        global: &StateDict,
        s: &RoundSettings,
        dp: &DpSgd,
        steps: u64,
        rng: &mut ChaCha20Rng,
    ) -> Result<(StateDict, f64), SiteError> {
        let _ = (global, s, dp, steps, rng);
        Err(SiteError::Unsupported(
            "record-level DP (DP-SGD) has vectorized per-example gradients for the MLP only; run this federation with --dp-mode site".into(),
        ))
    }
    /// Under `standardize = "federated"`: the training split's statistics before noise
    /// ([`crate::statistics::local`]); `None` for tasks that take no federated statistics.
    fn statistics(&self) -> Option<Vec<crate::statistics::FeatureStatistics>> {
        None
    }
    /// Impute and standardise with the federation's pooled figures.
    ///
    /// # Errors
    /// [`SiteError::Unsupported`] for tasks that take no federated statistics.
    fn apply_preprocessing(&mut self, prep: &Preprocessing) -> Result<(), SiteError> {
        let _ = prep;
        Err(SiteError::Unsupported(
            "this task takes no federated statistics".into(),
        ))
    }
}

/// An MLP on encoded tabular examples (`x (n, in_features)` f32, `y (n,)` class indices),
/// trained with a fresh optimizer each round at the round's learning rate.
pub struct TabularTask {
    cfg: MlpConfig,
    device: Device,
    optimizer: OptimizerSpec,
    train: (Tensor, Tensor),
    validation: (Tensor, Tensor),
    test: (Tensor, Tensor),
    /// Under `standardize = "federated"`: the raw data (missing cells NaN) and its spec,
    /// until the pooled figures arrive.
    raw: Option<(Box<TabularData>, FederationSpec)>,
}

impl TabularTask {
    /// A task over encoded splits (`validation` may be empty); `optimizer`'s learning rate is
    /// replaced by each round's.
    pub fn new(
        train: &Examples,
        validation: &Examples,
        test: &Examples,
        cfg: MlpConfig,
        optimizer: OptimizerSpec,
        device: Device,
    ) -> Self {
        Self {
            device,
            optimizer,
            train: to_tensors(train, cfg.in_features, device, Kind::Float),
            validation: to_tensors(validation, cfg.in_features, device, Kind::Float),
            test: to_tensors(test, cfg.in_features, device, Kind::Float),
            cfg,
            raw: None,
        }
    }
}

/// `o` with learning rate `lr`.
fn with_lr(o: OptimizerSpec, lr: f64) -> OptimizerSpec {
    match o {
        OptimizerSpec::Sgd {
            momentum,
            weight_decay,
            ..
        } => OptimizerSpec::Sgd {
            lr,
            momentum,
            weight_decay,
        },
        OptimizerSpec::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } => OptimizerSpec::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        },
    }
}

/// The MLP a tabular spec describes.
///
/// # Errors
/// [`SiteError::Unsupported`] for a spec without an MLP (text tasks).
pub fn mlp_config(spec: &FederationSpec) -> Result<MlpConfig, SiteError> {
    let m = spec.mlp().ok_or_else(|| {
        SiteError::Unsupported(format!(
            "the federation spec's model is {:?}, not an MLP",
            spec.model.kind
        ))
    })?;
    Ok(MlpConfig {
        in_features: m.in_features,
        hidden: m.hidden,
        out_features: m.out_features,
        activation: if m.activation == "gelu" {
            Activation::Gelu
        } else {
            Activation::Relu
        },
    })
}

/// The local optimizer a spec describes (learning rate set per round).
pub fn optimizer(spec: &FederationSpec) -> OptimizerSpec {
    let t = &spec.training;
    match t.optimizer {
        fedee_spec::Optimizer::Sgd => OptimizerSpec::Sgd {
            lr: t.learning_rate,
            momentum: t.momentum,
            weight_decay: t.weight_decay,
        },
        fedee_spec::Optimizer::Adamw => OptimizerSpec::AdamW {
            lr: t.learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: t.weight_decay,
        },
    }
}

/// [`classification`] metrics of `logits (n, k)` against labels `y (n,)`, on any device.
fn scored(logits: &Tensor, y: &Tensor, k: usize) -> Result<Metrics, SiteError> {
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).contiguous().view(-1);
    let scores = Vec::<f32>::try_from(cpu(&logits.to_kind(Kind::Float)))?;
    let labels = Vec::<i64>::try_from(cpu(y))?;
    Ok(classification(&scores, k, &labels))
}

/// The task a federation spec describes, on this site's data file (`filter` selects the
/// site's rows of a shared file). Prints nothing; the caller shows the [`DataReport`].
///
/// # Errors
/// [`SiteError::Table`] when the data cannot satisfy the spec (a missing column, a cell that
/// is not its column's type, a label outside the classes, one class only, too few rows);
/// [`SiteError::Model`] for a BERT checkpoint that cannot be read.
pub fn from_spec(
    spec: &FederationSpec,
    data: &std::path::Path,
    filter: Option<&RowFilter>,
    device: Device,
) -> Result<(Box<dyn LocalTask>, DataReport), SiteError> {
    match spec.task.kind {
        fedee_spec::TaskKind::TabularClassification => {
            let cfg = mlp_config(spec)?;
            let d = crate::table::load(spec, data, filter)?;
            let mut task = TabularTask::new(
                &d.train,
                &d.validation,
                &d.test,
                cfg,
                optimizer(spec),
                device,
            );
            let report = d.report.clone();
            if spec.statistics_sigma().is_some() {
                task.raw = Some((Box::new(d), spec.clone()));
            }
            Ok((Box::new(task), report))
        }
        fedee_spec::TaskKind::TextClassification => {
            let cfg = bert_classifier(spec)?;
            let tok = fedee_model::text::TextTokenizer::from_file(
                &checkpoint(spec).join("tokenizer.json"),
                spec.data.max_tokens,
            )?;
            let d = crate::table::load_text(spec, data, filter)?;
            let ids = |rows: &[(String, i64)]| {
                rows.iter()
                    .map(|(t, y)| Ok((tok.ids(t)?, *y)))
                    .collect::<Result<Vec<_>, fedee_model::ModelError>>()
            };
            let task = TextTask::new(
                Architecture::BertClassifier(cfg),
                ids(&d.train)?,
                ids(&d.validation)?,
                ids(&d.test)?,
                device,
            );
            Ok((Box::new(task), d.report))
        }
    }
}

/// The checkpoint folder of a BERT spec (relative paths are relative to the working
/// directory).
fn checkpoint(spec: &FederationSpec) -> &std::path::Path {
    std::path::Path::new(spec.model.checkpoint.as_deref().unwrap_or_default())
}

/// The BERT classifier a text spec describes: the checkpoint's `config.json` and a head of
/// the spec's classes.
///
/// # Errors
/// [`SiteError::Unsupported`] for a spec without a BERT model; [`SiteError::Model`] for an
/// unreadable `config.json`.
pub fn bert_classifier(
    spec: &FederationSpec,
) -> Result<fedee_model::BertClassifierConfig, SiteError> {
    if spec.model.kind != fedee_spec::ModelKind::Bert {
        return Err(SiteError::Unsupported(format!(
            "the federation spec's model is {:?}, not BERT",
            spec.model.kind
        )));
    }
    Ok(fedee_model::BertClassifierConfig {
        bert: fedee_model::BertConfig::from_file(&checkpoint(spec).join("config.json"))?,
        num_labels: spec.num_classes(),
    })
}

/// The model a spec describes: its MLP, or its BERT classifier.
///
/// # Errors
/// As [`mlp_config`] and [`bert_classifier`].
pub fn architecture(spec: &FederationSpec) -> Result<fedee_model::Architecture, SiteError> {
    Ok(match spec.model.kind {
        fedee_spec::ModelKind::Mlp => fedee_model::Architecture::Mlp(mlp_config(spec)?),
        fedee_spec::ModelKind::Bert => {
            fedee_model::Architecture::BertClassifier(bert_classifier(spec)?)
        }
    })
}

/// An upper bound on the size of a safetensors file of the spec's model, in bytes: its f32
/// values plus a generous header (names, dtypes, shapes and offsets of every tensor).
///
/// # Errors
/// As [`architecture`].
pub fn model_bytes_bound(spec: &FederationSpec) -> Result<u64, SiteError> {
    let shapes = architecture(spec)?.shapes();
    let values: u64 = shapes
        .values()
        .map(|s| s.iter().map(|&d| d.max(0) as u64).product::<u64>())
        .sum();
    let header: u64 = shapes
        .iter()
        .map(|(name, s)| name.len() as u64 + 128 + 24 * s.len() as u64)
        .sum();
    Ok(4 * values + header + 64 * 1024)
}

/// The initial global model of a spec (f32, CPU): a fresh MLP, or the BERT checkpoint's
/// weights with a fresh classification head; `seed` draws the fresh weights.
///
/// # Errors
/// A checkpoint that cannot be read or does not fit its `config.json`.
pub fn initial_model(spec: &FederationSpec, seed: i64) -> Result<StateDict, SiteError> {
    tch::manual_seed(seed);
    match spec.model.kind {
        fedee_spec::ModelKind::Mlp => {
            Ok(Mlp::new(mlp_config(spec)?, Device::Cpu, Kind::Float)?.state())
        }
        fedee_spec::ModelKind::Bert => {
            let cfg = bert_classifier(spec)?;
            let mut state = fedee_model::bert::load_pretrained(
                &checkpoint(spec).join("model.safetensors"),
                &cfg.bert,
                Device::Cpu,
            )?;
            state.extend(cfg.init_head(Kind::Float));
            Ok(state)
        }
    }
}

impl TabularTask {
    /// Refuse to use raw data before the federation's figures are applied.
    fn ready(&self) -> Result<(), SiteError> {
        match self.raw {
            Some(_) => Err(SiteError::Unsupported(
                "the federated statistics have not been applied yet (standardize = \"federated\")"
                    .into(),
            )),
            None => Ok(()),
        }
    }

    fn held_out(&self, split: HeldOut) -> &(Tensor, Tensor) {
        match split {
            HeldOut::Validation => &self.validation,
            HeldOut::Test => &self.test,
        }
    }

    /// A copy of `state` as f32 on this task's device.
    fn on_device(&self, state: &StateDict) -> StateDict {
        state
            .iter()
            .map(|(k, v)| (k.clone(), v.to_kind(Kind::Float).to_device(self.device)))
            .collect()
    }
}

impl LocalTask for TabularTask {
    fn num_examples(&self) -> u64 {
        self.train.1.size()[0] as u64
    }
    fn statistics(&self) -> Option<Vec<crate::statistics::FeatureStatistics>> {
        let (d, spec) = self.raw.as_ref()?;
        Some(crate::statistics::local(spec, &d.train, d.features))
    }
    fn apply_preprocessing(&mut self, prep: &Preprocessing) -> Result<(), SiteError> {
        let Some((mut d, spec)) = self.raw.take() else {
            return Err(SiteError::Unsupported(
                "this site's spec does not standardise with federated statistics".into(),
            ));
        };
        prep.check(&spec)?;
        d.apply(prep);
        self.train = to_tensors(&d.train, self.cfg.in_features, self.device, Kind::Float);
        self.validation = to_tensors(
            &d.validation,
            self.cfg.in_features,
            self.device,
            Kind::Float,
        );
        self.test = to_tensors(&d.test, self.cfg.in_features, self.device, Kind::Float);
        Ok(())
    }
    fn num_held_out(&self, split: HeldOut) -> u64 {
        self.held_out(split).1.size()[0] as u64
    }
    fn evaluate(&mut self, global: &StateDict, split: HeldOut) -> Result<Metrics, SiteError> {
        self.ready()?;
        let m = Mlp::from_state(self.cfg.clone(), global, self.device, Kind::Float)?;
        let (x, y) = self.held_out(split);
        let logits = tch::no_grad(|| m.forward(x));
        scored(&logits, y, self.cfg.out_features)
    }
    fn train(
        &mut self,
        global: &StateDict,
        s: &RoundSettings,
        rng: &mut ChaCha20Rng,
    ) -> Result<(StateDict, f64), SiteError> {
        self.ready()?;
        let mut m = Mlp::from_state(self.cfg.clone(), global, self.device, Kind::Float)?;
        let local = LocalTraining {
            epochs: s.epochs,
            batch_size: s.batch_size,
            optimizer: with_lr(self.optimizer, s.learning_rate),
        };
        let anchor = self.on_device(global);
        let proximal = (s.proximal_mu > 0.0).then_some((&anchor, s.proximal_mu));
        let loss = train_local(&mut m, &self.train.0, &self.train.1, &local, proximal, rng)?;
        Ok((m.state(), loss))
    }
    fn train_dpsgd(
        &mut self,
        global: &StateDict,
        s: &RoundSettings,
        dp: &DpSgd,
        steps: u64,
        rng: &mut ChaCha20Rng,
    ) -> Result<(StateDict, f64), SiteError> {
        self.ready()?;
        self.cfg.check_state(global)?;
        let mut state = self.on_device(global);
        let loss = crate::dpsgd::train(
            &self.cfg,
            &mut state,
            (&self.train.0, &self.train.1),
            steps,
            s.learning_rate,
            dp,
            rng,
        )?;
        Ok((state, loss))
    }
}

/// A BERT text classifier on tokenized examples (AdamW, fresh state each round).
pub struct TextTask {
    arch: Architecture,
    device: Device,
    train: Vec<(Vec<i64>, i64)>,
    validation: Vec<(Vec<i64>, i64)>,
    test: Vec<(Vec<i64>, i64)>,
}

impl TextTask {
    /// A task over token-id sequences and labels (`validation` may be empty).
    pub fn new(
        arch: Architecture,
        train: Vec<(Vec<i64>, i64)>,
        validation: Vec<(Vec<i64>, i64)>,
        test: Vec<(Vec<i64>, i64)>,
        device: Device,
    ) -> Self {
        Self {
            arch,
            device,
            train,
            validation,
            test,
        }
    }

    fn held_out(&self, split: HeldOut) -> &[(Vec<i64>, i64)] {
        match split {
            HeldOut::Validation => &self.validation,
            HeldOut::Test => &self.test,
        }
    }

    fn batch(&self, rows: &[&(Vec<i64>, i64)]) -> (Input, Tensor) {
        let seqs: Vec<Vec<i64>> = rows.iter().map(|r| r.0.clone()).collect();
        let (ids, mask) = fedee_model::text::pad(&seqs);
        let y = Tensor::from_slice(&rows.iter().map(|r| r.1).collect::<Vec<_>>())
            .to_device(self.device);
        (
            Input::Tokens {
                ids: ids.to_device(self.device),
                mask: mask.to_device(self.device),
            },
            y,
        )
    }
}

impl LocalTask for TextTask {
    fn num_examples(&self) -> u64 {
        self.train.len() as u64
    }
    fn num_held_out(&self, split: HeldOut) -> u64 {
        self.held_out(split).len() as u64
    }
    fn evaluate(&mut self, global: &StateDict, split: HeldOut) -> Result<Metrics, SiteError> {
        let m = Model::from_state(self.arch.clone(), global, self.device, Kind::Float)?;
        let (mut logits, mut labels) = (vec![], vec![]);
        for rows in self.held_out(split).iter().collect::<Vec<_>>().chunks(32) {
            let (input, y) = self.batch(rows);
            logits.push(tch::no_grad(|| m.forward(&input))?);
            labels.push(y);
        }
        if logits.is_empty() {
            return Ok(classification(&[], self.arch.num_classes(), &[]));
        }
        scored(
            &Tensor::cat(&logits, 0),
            &Tensor::cat(&labels, 0),
            self.arch.num_classes(),
        )
    }
    fn train(
        &mut self,
        global: &StateDict,
        s: &RoundSettings,
        rng: &mut ChaCha20Rng,
    ) -> Result<(StateDict, f64), SiteError> {
        let mut m = Model::from_state(self.arch.clone(), global, self.device, Kind::Float)?;
        let spec = OptimizerSpec::AdamW {
            lr: s.learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = m.optimizer(&spec)?;
        let mut last = 0.0;
        for _ in 0..s.epochs {
            let mut rows: Vec<&(Vec<i64>, i64)> = self.train.iter().collect();
            rows.shuffle(rng);
            let (mut sum, mut n) = (0.0, 0);
            for b in rows.chunks(s.batch_size.max(1) as usize) {
                let (input, y) = self.batch(b);
                sum += m.train_step(&mut opt, &input, &y)?;
                n += 1;
            }
            last = sum / f64::from(n.max(1));
        }
        Ok((m.state(), last))
    }
}
