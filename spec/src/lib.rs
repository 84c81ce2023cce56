//! The federation spec: one declarative TOML file (`federation.toml`) that says what a
//! federation trains and how: the task (label and its classes, feature columns and their
//! types), the data policy (missing values, splits, standardisation), the model, local
//! training, rounds and strategy, and differential privacy.
//!
//! The aggregator validates it before binding any port, stores it and its SHA-256 with the
//! federation, and serves it to sites, which train what it says on their own data and refuse
//! to join when their data cannot satisfy it. `fedee init` scaffolds one from a data file.
//!
//! This crate does no IO and does not link libtorch, so the aggregator can use it.
//!
//! ```toml
//! version = 1
//!
//! [task]
//! kind = "tabular-classification"
//! label = "num"
//! # Class 0 is "0"; class 1 gathers the values "1".."4".
//! classes = ["0", { name = "disease", values = ["1", "2", "3", "4"] }]
//!
//! [[features]]
//! name = "age"
//! type = "numeric"
//!
//! [[features]]
//! name = "cp"
//! type = "categorical"
//! levels = ["asymptomatic", "atypical angina", "non-anginal", "typical angina"]
//!
//! [model]
//! kind = "mlp"
//! hidden = [32]
//!
//! [privacy]
//! mode = "site"
//! noise_multiplier = 1.0
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The spec format this build reads (`version = 1`).
pub const VERSION: u32 = 1;

/// Most hidden layers an MLP may have (`fedee_model` re-exports it for `MlpConfig`).
pub const MAX_HIDDEN_LAYERS: usize = 8;

/// Strategies the aggregator implements (`[federation] strategy`).
pub const STRATEGIES: [&str; 6] = [
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "median",
    "trimmed-mean",
];

/// Cell values read as missing (after trimming whitespace; compared case-insensitively).
pub const MISSING_TOKENS: [&str; 6] = ["", "na", "n/a", "nan", "null", "?"];

/// Spec errors: each names the key, the value and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not TOML, or a key that is unknown, missing or of the wrong type (the message gives
    /// the line and the key).
    #[error("federation spec: {0}")]
    Parse(#[source] toml::de::Error),
    /// The spec cannot be written as TOML (a bug: every spec type serializes).
    #[error("federation spec: cannot write it as TOML: {0}")]
    Serialize(#[source] toml::ser::Error),
    /// A value outside what fedee can run.
    #[error("federation spec: `{key}` = {value}: {problem}; {fix}")]
    Invalid {
        /// Dotted key, e.g. `model.hidden`.
        key: String,
        /// The value as written (TOML-ish).
        value: String,
        /// What is wrong with it.
        problem: String,
        /// What to write instead.
        fix: String,
    },
}

fn invalid(
    key: impl Into<String>,
    value: impl std::fmt::Debug,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> SpecError {
    SpecError::Invalid {
        key: key.into(),
        value: format!("{value:?}"),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// A whole federation spec. Parse and validate with [`FederationSpec::from_toml`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSpec {
    /// Format version; must be [`VERSION`].
    pub version: u32,
    /// What is learned.
    pub task: Task,
    /// Feature columns of a tabular task, in model input order.
    #[serde(default)]
    pub features: Vec<Feature>,
    /// How each site reads and splits its data.
    #[serde(default)]
    pub data: DataPolicy,
    /// The model.
    pub model: ModelSpec,
    /// Local training at each site, per round.
    #[serde(default)]
    pub training: Training,
    /// Rounds, quorum, deadline and strategy.
    #[serde(default)]
    pub federation: Rounds,
    /// Differential privacy.
    pub privacy: Privacy,
}

/// Kind of learning task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Rows of typed feature columns and a label column (CSV).
    TabularClassification,
    /// A text column and a label column (CSV or JSONL).
    TextClassification,
}

/// The task: label column, its classes, and (text tasks) the text column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Tabular or text classification.
    pub kind: TaskKind,
    /// Label column.
    pub label: String,
    /// Classes in model output order (class `i` is logit `i`).
    pub classes: Vec<Class>,
    /// Text column (text tasks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// One class: a label value, or a name gathering several label values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Class {
    /// The class is this label value (and is named after it).
    Value(String),
    /// A named class that gathers these label values.
    Named {
        /// Class name (reports).
        name: String,
        /// Label values that mean this class.
        values: Vec<String>,
    },
}

impl Class {
    /// The class name.
    pub fn name(&self) -> &str {
        match self {
            Self::Value(v) => v,
            Self::Named { name, .. } => name,
        }
    }
    /// The label values that mean this class.
    pub fn values(&self) -> Vec<&str> {
        match self {
            Self::Value(v) => vec![v.as_str()],
            Self::Named { values, .. } => values.iter().map(String::as_str).collect(),
        }
    }
}

/// Type of a feature column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureType {
    /// A number (one model input).
    Numeric,
    /// One of `levels` (one-hot: one model input per level).
    Categorical,
    /// Yes/No, Y/N, true/false or 0/1, case-insensitive (one model input, 0 or 1).
    Boolean,
}

/// A feature column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    /// Column name in the site's file.
    pub name: String,
    /// Column type.
    #[serde(rename = "type")]
    pub kind: FeatureType,
    /// Levels of a categorical column, in one-hot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<String>,
    /// `[low, high]` of a numeric column: public bounds the federated statistics clip values
    /// to (their DP sensitivity). Required for numeric columns under
    /// `standardize = "federated"`; values outside still reach the model unclipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<[f64; 2]>,
}

impl Feature {
    /// Model inputs this column encodes to.
    pub fn width(&self) -> usize {
        match self.kind {
            FeatureType::Categorical => self.levels.len(),
            FeatureType::Numeric | FeatureType::Boolean => 1,
        }
    }
}

/// What a site does with a missing feature value (blank, `NA`, `?`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingPolicy {
    /// Leave the row out (counted in the data report).
    #[default]
    DropRow,
    /// Fill numeric and boolean values with the training split's mean; a missing categorical
    /// value encodes as all-zero.
    Impute,
}

/// Which statistics standardise numeric features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standardize {
    /// `(x − mean) / std` with the site's own training split statistics.
    #[default]
    Site,
    /// Raw values.
    None,
    /// `(x − mean) / std` with the federation's pooled statistics: before round 1 each site
    /// sends per-feature count, sum and sum of squares (values clipped to the feature's
    /// `range`, Gaussian noise at `privacy.statistics_noise_multiplier`, recorded in its
    /// privacy ledger); the aggregator sums them and every site standardises and imputes
    /// with the same figures. Record-level privacy only.
    Federated,
}

/// How each site reads and splits its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPolicy {
    /// Missing feature values.
    pub missing: MissingPolicy,
    /// Fraction of each site's rows held out for validation (model selection), stratified.
    pub validation_fraction: f64,
    /// Fraction of each site's rows held out for the test metrics, stratified.
    pub test_fraction: f64,
    /// Seed of the split (the same data gives the same split at every run).
    pub split_seed: u64,
    /// Standardisation of numeric features.
    pub standardize: Standardize,
    /// Text tasks: longest token sequence, special tokens included.
    pub max_tokens: usize,
}

impl Default for DataPolicy {
    fn default() -> Self {
        Self {
            missing: MissingPolicy::DropRow,
            validation_fraction: 0.15,
            test_fraction: 0.25,
            split_seed: 42,
            standardize: Standardize::Site,
            max_tokens: 128,
        }
    }
}

/// Model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A multilayer perceptron over the encoded features.
    Mlp,
    /// A Hugging Face BERT-family checkpoint plus a new classification head.
    Bert,
}

/// The model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model family.
    pub kind: ModelKind,
    /// MLP: hidden layer sizes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<usize>,
    /// MLP: hidden activation, `relu` or `gelu`.
    #[serde(default = "relu")]
    pub activation: String,
    /// BERT: the checkpoint folder (`config.json`, `model.safetensors`, `tokenizer.json`),
    /// as a path at each site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

fn relu() -> String {
    "relu".into()
}

/// Local optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// SGD with `momentum`.
    #[default]
    Sgd,
    /// AdamW (β = 0.9, 0.999; ε = 1e-8) with `weight_decay`.
    Adamw,
}

/// Local training at each site, per round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Training {
    /// Passes over the local training split per round.
    pub epochs: u32,
    /// Mini-batch size (record-level DP: expected Poisson batch size).
    pub batch_size: u32,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Learning rate.
    pub learning_rate: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
}

impl Default for Training {
    fn default() -> Self {
        Self {
            epochs: 2,
            batch_size: 16,
            optimizer: Optimizer::Sgd,
            learning_rate: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
        }
    }
}

/// Rounds, quorum, deadline and strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rounds {
    /// Number of rounds.
    pub rounds: u32,
    /// Quorum: sites that must submit for a round to close.
    pub min_sites: u32,
    /// Seconds a round stays open.
    pub round_timeout_s: f64,
    /// One of [`STRATEGIES`].
    pub strategy: String,
    /// FedAdam / FedYogi server learning rate.
    pub server_lr: f64,
    /// Trimmed mean: fraction dropped at each end, in `[0, 0.5)`.
    pub trim_fraction: f64,
    /// FedProx proximal coefficient μ.
    pub proximal_mu: f64,
    /// The largest `num_examples` (FedAvg weight) one site may report per round. It bounds
    /// how far one site can pull the weighted mean, and the weights' sum. A site with more
    /// training examples is refused at join, naming this setting.
    pub max_num_examples: u64,
    /// Secure aggregation (`[federation.secure_aggregation]`): the aggregator learns only the
    /// sum of the round's updates. `None`: updates are sent in the clear.
    pub secure_aggregation: Option<SecureAggregation>,
}

/// Secure aggregation settings: Bonawitz et al. (CCS 2017) double masking with dropout
/// recovery, over a SecAgg+ neighbour graph (Bell et al., CCS 2020) when `degree` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecureAggregation {
    /// Neighbours per site, `k`: 0 for every other site (the full graph), else an even number
    /// below the roster size (SecAgg+; about 20 keeps the unmask stage cheap at 100+ sites).
    pub degree: u32,
    /// Seconds each short protocol stage (advertise keys, share keys, unmask) waits before a
    /// site that has not answered counts as dropped. The masked input waits for the round's
    /// `round_timeout_s` (sites train meanwhile).
    pub stage_timeout_s: f64,
    /// The L2 norm each site clips its released update to before quantizing it (a
    /// post-processing of the DP release: no privacy cost), so every coordinate lies in
    /// `±max_update_norm`. Default in site mode: the high-probability norm bound of a clipped
    /// and noised update; required in record mode (a DP-SGD update has no bound of its own).
    /// Not used with `distributed_dp` (the bound is then the clipping norm).
    pub max_update_norm: Option<f64>,
    /// Distributed DP with the Skellam mechanism (Agarwal, Kairouz & Liu, NeurIPS 2021):
    /// instead of each site adding the full Gaussian noise `σC` to its own update, each adds
    /// `1/t` of the noise variance (discrete, after a random rotation) so that the sum over
    /// the `t` or more survivors carries noise `σC`: the same site-level ε for the released
    /// sum, with about `n` times less noise in it. Site mode only; the mean is unweighted.
    /// The guarantee needs secure aggregation to hold: one site's upload alone is not private.
    pub distributed_dp: bool,
}

impl Default for SecureAggregation {
    fn default() -> Self {
        Self {
            degree: 0,
            stage_timeout_s: 60.0,
            max_update_norm: None,
            distributed_dp: false,
        }
    }
}

/// Default of [`Rounds::max_num_examples`]: ten million records per site.
pub const DEFAULT_MAX_NUM_EXAMPLES: u64 = 10_000_000;

impl Default for Rounds {
    fn default() -> Self {
        Self {
            rounds: 20,
            min_sites: 2,
            round_timeout_s: 600.0,
            strategy: "fedavg".into(),
            server_lr: 0.01,
            trim_fraction: 0.1,
            proximal_mu: 0.0,
            max_num_examples: DEFAULT_MAX_NUM_EXAMPLES,
            secure_aggregation: None,
        }
    }
}

/// Where differential privacy acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyMode {
    /// Each site clips its whole update and adds Gaussian noise (unit: a site's update).
    Site,
    /// DP-SGD inside each site (unit: one record).
    Record,
}

/// Differential privacy. The noise has no default: a federation states either the noise
/// multiplier or the ε it may spend over all its rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// Site-level or record-level DP.
    pub mode: PrivacyMode,
    /// Clipping norm `C` (of a site's update, or of an example's gradient).
    #[serde(default = "one")]
    pub clipping_norm: f64,
    /// Noise multiplier `σ` (noise std `σC`), the same at every site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// Instead of `σ`: the ε (at `delta`) the whole federation may spend. Site mode: the
    /// aggregator calibrates one `σ` for all rounds. Record mode: each site calibrates its
    /// own `σ` to its own sampling rate and number of DP-SGD steps, so every site spends at
    /// most this ε.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// δ at which ε is accounted.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// Noise multiplier of the federated statistics (`data.standardize = "federated"`): each
    /// site's per-feature (count, sum, sum of squares) of values scaled by the ranges to
    /// `[−½, ½]` gets Gaussian noise of std `σ_s · √(21d/16)` (`d` numeric and boolean
    /// features; `√(21d/16)` is one record's L2 sensitivity). Spends `α / (2σ_s²)` Rényi DP
    /// once, in every site's ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics_noise_multiplier: Option<f64>,
}

fn one() -> f64 {
    1.0
}
fn default_delta() -> f64 {
    1e-5
}

/// Shape of the MLP a tabular spec describes (what `fedee init-model --spec` builds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlpShape {
    /// Encoded feature columns.
    pub in_features: usize,
    /// Hidden layer sizes.
    pub hidden: Vec<usize>,
    /// Classes.
    pub out_features: usize,
    /// `relu` or `gelu`.
    pub activation: String,
}

impl MlpShape {
    /// Parameter names and shapes (PyTorch `nn.Linear` names: `fc1.weight` `(hidden, in)`,
    /// …, `fcL.bias` `(out,)`).
    pub fn parameter_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let mut dims = vec![self.in_features];
        dims.extend(&self.hidden);
        dims.push(self.out_features);
        let mut out = BTreeMap::new();
        for (i, w) in dims.windows(2).enumerate() {
            out.insert(format!("fc{}.weight", i + 1), vec![w[1], w[0]]);
            out.insert(format!("fc{}.bias", i + 1), vec![w[1]]);
        }
        out
    }
}

/// A validated spec with the exact text it was parsed from and that text's SHA-256: what the
/// aggregator stores and serves, and what a site agrees to when it joins.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedSpec {
    /// The parsed spec.
    pub spec: FederationSpec,
    /// The TOML text as given.
    pub text: String,
    /// SHA-256 of `text` (lowercase hex).
    pub sha256: String,
}

impl SignedSpec {
    /// Sign a spec built or edited in code: it is written as TOML (comments are not kept),
    /// and that text is parsed and validated like a file.
    ///
    /// # Errors
    /// As [`FederationSpec::from_toml`].
    pub fn from_spec(spec: &FederationSpec) -> Result<Self, SpecError> {
        Self::parse(&toml::to_string(spec).map_err(SpecError::Serialize)?)
    }

    /// Parse and validate `text`.
    ///
    /// # Errors
    /// As [`FederationSpec::from_toml`].
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        Ok(Self {
            spec: FederationSpec::from_toml(text)?,
            text: text.to_owned(),
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
        })
    }
}

impl FederationSpec {
    /// Parse TOML and validate every value.
    ///
    /// # Errors
    /// [`SpecError::Parse`] for bad TOML or unknown, missing or mistyped keys;
    /// [`SpecError::Invalid`] for the first value fedee cannot run, naming key, value and fix.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: Self = toml::from_str(text).map_err(SpecError::Parse)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Check every value.
    ///
    /// # Errors
    /// [`SpecError::Invalid`] naming the first bad key, its value and the fix.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != VERSION {
            return Err(invalid(
                "version",
                self.version,
                "this fedee reads spec version 1",
                "write version = 1",
            ));
        }
        self.validate_task()?;
        self.validate_model()?;
        self.validate_data()?;
        self.validate_training()?;
        self.validate_rounds()?;
        self.validate_privacy()
    }

    fn validate_task(&self) -> Result<(), SpecError> {
        let t = &self.task;
        if t.label.trim().is_empty() {
            return Err(invalid(
                "task.label",
                &t.label,
                "the label column has no name",
                "name the column that holds the class",
            ));
        }
        if t.classes.len() < 2 {
            return Err(invalid(
                "task.classes",
                t.classes.iter().map(Class::name).collect::<Vec<_>>(),
                "a classifier needs at least two classes",
                "list every label value, e.g. classes = [\"no\", \"yes\"]",
            ));
        }
        let (mut names, mut values) = (BTreeSet::new(), BTreeSet::new());
        for (i, c) in t.classes.iter().enumerate() {
            let key = format!("task.classes[{i}]");
            if c.name().trim().is_empty() || c.values().iter().any(|v| v.trim().is_empty()) {
                return Err(invalid(
                    key,
                    c.name(),
                    "a class name or label value is empty",
                    "write the value as it appears in the label column",
                ));
            }
            if c.values().is_empty() {
                return Err(invalid(
                    key,
                    c.name(),
                    "the class gathers no label values",
                    "give it values = [\"…\"]",
                ));
            }
            if !names.insert(c.name().to_owned()) {
                return Err(invalid(
                    key,
                    c.name(),
                    "two classes have this name",
                    "give each class its own name",
                ));
            }
            for v in c.values() {
                if !values.insert(v.trim().to_owned()) {
                    return Err(invalid(
                        key,
                        v,
                        "this label value belongs to two classes",
                        "list each label value in one class only",
                    ));
                }
            }
        }
        match t.kind {
            TaskKind::TabularClassification => {
                if t.text.is_some() {
                    return Err(invalid(
                        "task.text",
                        &t.text,
                        "a tabular task has no text column",
                        "remove task.text, or use kind = \"text-classification\"",
                    ));
                }
                if self.features.is_empty() {
                    return Err(invalid(
                        "features",
                        "[]",
                        "a tabular task needs feature columns",
                        "add [[features]] tables (fedee init --data FILE --label COLUMN writes them)",
                    ));
                }
                let mut seen = BTreeSet::new();
                for (i, f) in self.features.iter().enumerate() {
                    let key = format!("features[{i}]");
                    if f.name.trim().is_empty() || !seen.insert(f.name.as_str()) {
                        return Err(invalid(
                            format!("{key}.name"),
                            &f.name,
                            "feature names must be non-empty and unique",
                            "name each column once",
                        ));
                    }
                    if f.name == t.label {
                        return Err(invalid(
                            format!("{key}.name"),
                            &f.name,
                            "the label column cannot also be a feature",
                            "remove it from [[features]]",
                        ));
                    }
                    match f.kind {
                        FeatureType::Categorical => {
                            let unique: BTreeSet<_> = f.levels.iter().collect();
                            if f.levels.is_empty()
                                || unique.len() != f.levels.len()
                                || f.levels.iter().any(|l| l.trim().is_empty())
                            {
                                return Err(invalid(
                                    format!("{key}.levels"),
                                    &f.levels,
                                    "a categorical column needs its distinct, non-empty levels",
                                    "list each value the column takes once",
                                ));
                            }
                        }
                        FeatureType::Numeric | FeatureType::Boolean if !f.levels.is_empty() => {
                            return Err(invalid(
                                format!("{key}.levels"),
                                &f.levels,
                                "only categorical columns have levels",
                                "remove levels, or write type = \"categorical\"",
                            ));
                        }
                        _ => {}
                    }
                }
            }
            TaskKind::TextClassification => {
                if t.text.as_deref().is_none_or(|s| s.trim().is_empty()) {
                    return Err(invalid(
                        "task.text",
                        &t.text,
                        "a text task reads one text column",
                        "write text = \"COLUMN\"",
                    ));
                }
                if !self.features.is_empty() {
                    return Err(invalid(
                        "features",
                        self.features.len(),
                        "a text task reads its text column only",
                        "remove the [[features]] tables",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), SpecError> {
        let m = &self.model;
        match (m.kind, self.task.kind) {
            (ModelKind::Mlp, TaskKind::TabularClassification) => {
                if m.checkpoint.is_some() {
                    return Err(invalid(
                        "model.checkpoint",
                        &m.checkpoint,
                        "an MLP is built from the spec, not loaded",
                        "remove model.checkpoint",
                    ));
                }
                if m.hidden.is_empty() || m.hidden.len() > MAX_HIDDEN_LAYERS {
                    return Err(invalid(
                        "model.hidden",
                        &m.hidden,
                        format!("an MLP needs 1 to {MAX_HIDDEN_LAYERS} hidden layers"),
                        "list the hidden layer sizes, e.g. hidden = [32] or hidden = [64, 32]",
                    ));
                }
                if m.hidden.iter().any(|&h| h == 0 || h > 1 << 16) {
                    return Err(invalid(
                        "model.hidden",
                        &m.hidden,
                        "hidden sizes must be between 1 and 65536",
                        "e.g. hidden = [32]",
                    ));
                }
                if !matches!(m.activation.as_str(), "relu" | "gelu") {
                    return Err(invalid(
                        "model.activation",
                        &m.activation,
                        "unknown activation",
                        "write \"relu\" or \"gelu\"",
                    ));
                }
            }
            (ModelKind::Bert, TaskKind::TextClassification) => {
                if m.checkpoint.as_deref().is_none_or(|c| c.trim().is_empty()) {
                    return Err(invalid(
                        "model.checkpoint",
                        &m.checkpoint,
                        "a BERT model starts from a checkpoint folder",
                        "write checkpoint = \"PATH\" (a folder with config.json, model.safetensors and tokenizer.json)",
                    ));
                }
                if !m.hidden.is_empty() {
                    return Err(invalid(
                        "model.hidden",
                        &m.hidden,
                        "BERT's sizes come from its config.json",
                        "remove model.hidden",
                    ));
                }
            }
            (kind, task) => {
                return Err(invalid(
                    "model.kind",
                    kind,
                    format!("{task:?} runs with an MLP (tabular) or BERT (text) model only"),
                    "use kind = \"mlp\" for tabular-classification, \"bert\" for text-classification",
                ));
            }
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<(), SpecError> {
        let d = &self.data;
        let fraction = |key: &str, v: f64| {
            if v.is_finite() && (0.0..0.5).contains(&v) {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    v,
                    "must be a fraction in [0, 0.5)",
                    "e.g. 0.15",
                ))
            }
        };
        fraction("data.validation_fraction", d.validation_fraction)?;
        fraction("data.test_fraction", d.test_fraction)?;
        if d.test_fraction <= 0.0 {
            return Err(invalid(
                "data.test_fraction",
                d.test_fraction,
                "sites report test metrics, so a test split is needed",
                "e.g. test_fraction = 0.25",
            ));
        }
        if d.standardize == Standardize::Federated {
            if self.privacy.mode != PrivacyMode::Record {
                return Err(invalid(
                    "data.standardize",
                    "federated",
                    "the federated statistics protect patient records, and site-level privacy has no record unit to account them in",
                    "use privacy.mode = \"record\", or standardize = \"site\"",
                ));
            }
            match self.privacy.statistics_noise_multiplier {
                Some(s) if s.is_finite() && s > 0.0 => {}
                s => {
                    return Err(invalid(
                        "privacy.statistics_noise_multiplier",
                        s,
                        "standardize = \"federated\" needs the noise of the statistics round",
                        "e.g. statistics_noise_multiplier = 5.0",
                    ));
                }
            }
            for f in self
                .features
                .iter()
                .filter(|f| f.kind == FeatureType::Numeric)
            {
                match f.range {
                    Some([lo, hi]) if lo.is_finite() && hi.is_finite() && lo < hi => {}
                    r => {
                        return Err(invalid(
                            format!("features.{}.range", f.name),
                            r,
                            "standardize = \"federated\" needs public bounds for every numeric feature (the statistics clip to them)",
                            "e.g. range = [0, 120] for an age in years",
                        ));
                    }
                }
            }
        }
        if self.task.kind == TaskKind::TextClassification && !(8..=4096).contains(&d.max_tokens) {
            return Err(invalid(
                "data.max_tokens",
                d.max_tokens,
                "must be between 8 and 4096",
                "e.g. max_tokens = 128",
            ));
        }
        Ok(())
    }

    fn validate_training(&self) -> Result<(), SpecError> {
        let t = &self.training;
        if t.epochs == 0 || t.epochs > 10_000 {
            return Err(invalid(
                "training.epochs",
                t.epochs,
                "must be between 1 and 10000",
                "e.g. epochs = 2",
            ));
        }
        if t.batch_size == 0 {
            return Err(invalid(
                "training.batch_size",
                t.batch_size,
                "must be at least 1",
                "e.g. batch_size = 16",
            ));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return Err(invalid(
                "training.learning_rate",
                t.learning_rate,
                "must be a positive number",
                "e.g. learning_rate = 0.05",
            ));
        }
        if !(t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum)) {
            return Err(invalid(
                "training.momentum",
                t.momentum,
                "must be in [0, 1)",
                "e.g. momentum = 0.9",
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(invalid(
                "training.weight_decay",
                t.weight_decay,
                "must be >= 0",
                "e.g. weight_decay = 0.01",
            ));
        }
        Ok(())
    }

    fn validate_rounds(&self) -> Result<(), SpecError> {
        let r = &self.federation;
        if r.rounds == 0 {
            return Err(invalid(
                "federation.rounds",
                r.rounds,
                "must be at least 1",
                "e.g. rounds = 20",
            ));
        }
        if r.max_num_examples == 0 {
            return Err(invalid(
                "federation.max_num_examples",
                r.max_num_examples,
                "must be at least 1",
                format!("e.g. max_num_examples = {DEFAULT_MAX_NUM_EXAMPLES}"),
            ));
        }
        if r.min_sites == 0 {
            return Err(invalid(
                "federation.min_sites",
                r.min_sites,
                "must be at least 1",
                "e.g. min_sites = 2",
            ));
        }
        if !(r.round_timeout_s.is_finite() && r.round_timeout_s >= 0.1) {
            return Err(invalid(
                "federation.round_timeout_s",
                r.round_timeout_s,
                "must be at least 0.1 seconds",
                "e.g. round_timeout_s = 600",
            ));
        }
        if !STRATEGIES.contains(&r.strategy.as_str()) {
            return Err(invalid(
                "federation.strategy",
                &r.strategy,
                "unknown strategy",
                format!("use one of {}", STRATEGIES.join(", ")),
            ));
        }
        if !(r.server_lr.is_finite() && r.server_lr > 0.0) {
            return Err(invalid(
                "federation.server_lr",
                r.server_lr,
                "must be positive",
                "e.g. server_lr = 0.01",
            ));
        }
        if !(r.trim_fraction.is_finite() && (0.0..0.5).contains(&r.trim_fraction)) {
            return Err(invalid(
                "federation.trim_fraction",
                r.trim_fraction,
                "must be in [0, 0.5)",
                "e.g. trim_fraction = 0.1",
            ));
        }
        if !(r.proximal_mu.is_finite() && r.proximal_mu >= 0.0) {
            return Err(invalid(
                "federation.proximal_mu",
                r.proximal_mu,
                "must be >= 0",
                "e.g. proximal_mu = 0.01",
            ));
        }
        if let Some(sa) = &r.secure_aggregation {
            self.validate_secure_aggregation(sa)?;
        }
        Ok(())
    }

    fn validate_secure_aggregation(&self, sa: &SecureAggregation) -> Result<(), SpecError> {
        let r = &self.federation;
        if matches!(r.strategy.as_str(), "median" | "trimmed-mean") {
            return Err(invalid(
                "federation.strategy",
                &r.strategy,
                "a coordinate-wise median or trimmed mean needs every site's update, and secure aggregation reveals only their sum",
                "use fedavg, fedprox, fedadam or fedyogi, or remove [federation.secure_aggregation]",
            ));
        }
        if r.min_sites < 3 {
            return Err(invalid(
                "federation.min_sites",
                r.min_sites,
                "secure aggregation needs at least 3 sites (with 2, each learns the other's update from the sum)",
                "min_sites = 3",
            ));
        }
        if sa.degree % 2 == 1 {
            return Err(invalid(
                "federation.secure_aggregation.degree",
                sa.degree,
                "must be even (a Harary graph) or 0 for the full graph",
                "e.g. degree = 20",
            ));
        }
        if !(sa.stage_timeout_s.is_finite() && sa.stage_timeout_s >= 1.0) {
            return Err(invalid(
                "federation.secure_aggregation.stage_timeout_s",
                sa.stage_timeout_s,
                "must be at least 1 second",
                "e.g. stage_timeout_s = 60",
            ));
        }
        if sa.distributed_dp {
            if self.privacy.mode != PrivacyMode::Site {
                return Err(invalid(
                    "federation.secure_aggregation.distributed_dp",
                    true,
                    "distributed DP splits site-level noise across sites; record-level DP (DP-SGD) noises each site's training instead",
                    "set privacy.mode = \"site\", or distributed_dp = false",
                ));
            }
            if let Some(b) = sa.max_update_norm {
                return Err(invalid(
                    "federation.secure_aggregation.max_update_norm",
                    b,
                    "distributed DP clips every update to privacy.clipping_norm",
                    "remove max_update_norm",
                ));
            }
            return Ok(());
        }
        match (sa.max_update_norm, self.privacy.mode) {
            (Some(b), _) if !(b.is_finite() && b > 0.0) => Err(invalid(
                "federation.secure_aggregation.max_update_norm",
                b,
                "must be a positive number",
                "e.g. max_update_norm = 10.0",
            )),
            (None, PrivacyMode::Record) => Err(invalid(
                "federation.secure_aggregation.max_update_norm",
                "missing",
                "record-level DP updates have no norm bound of their own, and secure aggregation quantizes within one",
                "set max_update_norm, e.g. 10.0 (sites clip their update to it; no privacy cost)",
            )),
            _ => Ok(()),
        }
    }

    fn validate_privacy(&self) -> Result<(), SpecError> {
        let p = &self.privacy;
        if !(p.clipping_norm.is_finite() && p.clipping_norm > 0.0) {
            return Err(invalid(
                "privacy.clipping_norm",
                p.clipping_norm,
                "must be a positive number",
                "e.g. clipping_norm = 1.0",
            ));
        }
        match (p.noise_multiplier, p.target_epsilon) {
            (Some(s), None) if !(s.is_finite() && s > 0.0) => {
                return Err(invalid(
                    "privacy.noise_multiplier",
                    s,
                    "σ must be positive: without noise there is no differential privacy",
                    "e.g. noise_multiplier = 1.0",
                ));
            }
            (None, Some(e)) if !(e.is_finite() && e > 0.0 && e <= 100.0) => {
                return Err(invalid(
                    "privacy.target_epsilon",
                    e,
                    "the target ε must be in (0, 100]",
                    "e.g. target_epsilon = 1.0",
                ));
            }
            (Some(_), Some(_)) | (None, None) => {
                return Err(invalid(
                    "privacy",
                    (p.noise_multiplier, p.target_epsilon),
                    "state exactly one of noise_multiplier (σ) and target_epsilon (ε over the whole federation)",
                    "e.g. target_epsilon = 1.0",
                ));
            }
            _ => {}
        }
        if !(p.delta.is_finite() && p.delta > 0.0 && p.delta < 1e-2) {
            return Err(invalid(
                "privacy.delta",
                p.delta,
                "δ must be in (0, 0.01) (and below 1/n for n records)",
                "e.g. delta = 1e-5",
            ));
        }
        if p.mode == PrivacyMode::Record && self.model.kind != ModelKind::Mlp {
            return Err(invalid(
                "privacy.mode",
                "record",
                "record-level DP (DP-SGD) has vectorized per-example gradients for the MLP only",
                "use mode = \"site\" for BERT models",
            ));
        }
        Ok(())
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.task.classes.len()
    }

    /// The class index of a label cell (trimmed), if it is one of the classes' values.
    pub fn class_of(&self, label: &str) -> Option<usize> {
        let label = label.trim();
        self.task
            .classes
            .iter()
            .position(|c| c.values().iter().any(|v| v.trim() == label))
    }

    /// The features the federated statistics cover (numeric and boolean, in spec order):
    /// name, offset in the encoded row, and the public `[low, high]` values are clipped to
    /// (`[0, 1]` for booleans).
    pub fn statistics_features(&self) -> Vec<(String, usize, [f64; 2])> {
        let mut offset = 0;
        let mut out = Vec::new();
        for f in &self.features {
            match f.kind {
                FeatureType::Numeric => {
                    out.push((f.name.clone(), offset, f.range.unwrap_or([0.0, 1.0])));
                }
                FeatureType::Boolean => out.push((f.name.clone(), offset, [0.0, 1.0])),
                FeatureType::Categorical => {}
            }
            offset += f.width();
        }
        out
    }

    /// Whether rounds run distributed DP: site-level DP over secure aggregation with
    /// `distributed_dp` (validation refuses it in record mode).
    pub fn distributed_dp(&self) -> bool {
        self.privacy.mode == PrivacyMode::Site
            && self
                .federation
                .secure_aggregation
                .as_ref()
                .is_some_and(|s| s.distributed_dp)
    }

    /// The statistics round's noise multiplier, when the spec standardises with federated
    /// statistics.
    pub fn statistics_sigma(&self) -> Option<f64> {
        (self.data.standardize == Standardize::Federated)
            .then_some(self.privacy.statistics_noise_multiplier)
            .flatten()
    }

    /// Model inputs of the encoded features (one per numeric or boolean column, one per
    /// level of a categorical column).
    pub fn in_features(&self) -> usize {
        self.features.iter().map(Feature::width).sum()
    }

    /// Names of the encoded model inputs, in order (`cp=asymptomatic` for a one-hot level).
    pub fn input_names(&self) -> Vec<String> {
        self.features
            .iter()
            .flat_map(|f| match f.kind {
                FeatureType::Categorical => {
                    f.levels.iter().map(|l| format!("{}={l}", f.name)).collect()
                }
                _ => vec![f.name.clone()],
            })
            .collect()
    }

    /// The MLP of a tabular spec; `None` for other models.
    pub fn mlp(&self) -> Option<MlpShape> {
        (self.model.kind == ModelKind::Mlp).then(|| MlpShape {
            in_features: self.in_features(),
            hidden: self.model.hidden.clone(),
            out_features: self.num_classes(),
            activation: self.model.activation.clone(),
        })
    }

    /// One line per setting, for logs and `fedee status`.
    pub fn summary(&self) -> String {
        let model = match self.mlp() {
            Some(m) => format!(
                "MLP {} → {:?} → {} ({})",
                m.in_features, m.hidden, m.out_features, m.activation
            ),
            None => format!(
                "BERT from {} + {}-class head",
                self.model.checkpoint.as_deref().unwrap_or("?"),
                self.num_classes()
            ),
        };
        let p = &self.privacy;
        let noise = match (p.noise_multiplier, p.target_epsilon) {
            (Some(s), _) => format!("σ = {s}"),
            (None, Some(e)) => format!("target ε = {e} (σ calibrated)"),
            (None, None) => "no noise".into(),
        };
        format!(
            "{:?} of `{}` ({} classes); model {model}; {} rounds, quorum {}, {}; DP {:?}-level, C = {}, {noise}, δ = {:e}",
            self.task.kind,
            self.task.label,
            self.num_classes(),
            self.federation.rounds,
            self.federation.min_sites,
            match &self.federation.secure_aggregation {
                None => self.federation.strategy.clone(),
                Some(sa) => format!(
                    "{} over secure aggregation{}{}",
                    self.federation.strategy,
                    if sa.degree == 0 {
                        String::new()
                    } else {
                        format!(" (k = {})", sa.degree)
                    },
                    if sa.distributed_dp {
                        " with distributed DP (Skellam)"
                    } else {
                        ""
                    }
                ),
            },
            p.mode,
            p.clipping_norm,
            p.delta
        )
    }
}

/// Whether a trimmed cell means "missing" ([`MISSING_TOKENS`], case-insensitive).
pub fn is_missing(cell: &str) -> bool {
    let c = cell.trim();
    MISSING_TOKENS.iter().any(|m| c.eq_ignore_ascii_case(m))
}

/// A boolean cell: Yes/No, Y/N, true/false, T/F or 0/1 (trimmed, case-insensitive).
pub fn parse_bool(cell: &str) -> Option<bool> {
    match cell.trim().to_ascii_lowercase().as_str() {
        "yes" | "y" | "true" | "t" | "1" | "1.0" => Some(true),
        "no" | "n" | "false" | "f" | "0" | "0.0" => Some(false),
        _ => None,
    }
}

/// A numeric cell (trimmed); non-finite values are not numbers here.
pub fn parse_number(cell: &str) -> Option<f64> {
    cell.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEART: &str = r#"
version = 1
[task]
kind = "tabular-classification"
label = "num"
classes = ["0", { name = "disease", values = ["1", "2", "3", "4"] }]

[[features]]
name = "age"
type = "numeric"

[[features]]
name = "cp"
type = "categorical"
levels = ["asymptomatic", "typical angina"]

[[features]]
name = "fbs"
type = "boolean"

[model]
kind = "mlp"
hidden = [8]

[privacy]
mode = "record"
noise_multiplier = 1.0
"#;

    fn with(replace: &str, by: &str) -> Result<FederationSpec, SpecError> {
        assert!(HEART.contains(replace), "{replace}");
        FederationSpec::from_toml(&HEART.replacen(replace, by, 1))
    }

    fn key_of(e: SpecError) -> String {
        match e {
            SpecError::Invalid { key, .. } => key,
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn parses_a_tabular_spec_with_defaults() {
        let s = FederationSpec::from_toml(HEART).unwrap();
        assert_eq!(s.in_features(), 4);
        assert_eq!(s.num_classes(), 2);
        assert_eq!(s.class_of(" 3 "), Some(1));
        assert_eq!(s.class_of("0"), Some(0));
        assert_eq!(s.class_of("5"), None);
        assert_eq!(
            s.input_names(),
            ["age", "cp=asymptomatic", "cp=typical angina", "fbs"]
        );
        assert_eq!(s.federation.strategy, "fedavg");
        assert_eq!(s.privacy.delta, 1e-5);
        let shapes = s.mlp().unwrap().parameter_shapes();
        assert_eq!(shapes["fc1.weight"], vec![8, 4]);
        assert_eq!(shapes["fc2.weight"], vec![2, 8]);
        assert_eq!(shapes["fc2.bias"], vec![2]);
        assert!(s.summary().contains("MLP 4"));
    }

    #[test]
    fn a_spec_edited_in_code_signs_and_round_trips() {
        let mut s = FederationSpec::from_toml(HEART).unwrap();
        s.federation.rounds = 3;
        let signed = SignedSpec::from_spec(&s).unwrap();
        assert_eq!(signed.spec, s);
        s.federation.rounds = 0;
        assert!(SignedSpec::from_spec(&s).is_err(), "still validated");
    }

    #[test]
    fn signed_spec_hashes_the_text_as_given() {
        let a = SignedSpec::parse(HEART).unwrap();
        let b = SignedSpec::parse(&format!("{HEART}\n# a comment\n")).unwrap();
        assert_eq!(a.spec, b.spec);
        assert_ne!(
            a.sha256, b.sha256,
            "the hash covers the text, comments included"
        );
        assert_eq!(a.sha256.len(), 64);
    }

    #[test]
    fn federated_standardisation_needs_ranges_record_mode_and_its_noise() {
        let fed = |age: &str, privacy: &str| {
            FederationSpec::from_toml(
                &HEART
                    .replacen("name = \"age\"\ntype = \"numeric\"", age, 1)
                    .replacen(
                        "[model]",
                        "[data]\nstandardize = \"federated\"\n\n[model]",
                        1,
                    )
                    .replacen("mode = \"record\"\nnoise_multiplier = 1.0", privacy, 1),
            )
        };
        let age = "name = \"age\"\ntype = \"numeric\"\nrange = [0, 120]";
        let ok = "mode = \"record\"\nnoise_multiplier = 1.0\nstatistics_noise_multiplier = 5.0";
        let s = fed(age, ok).unwrap();
        assert_eq!(s.statistics_sigma(), Some(5.0));
        assert_eq!(
            s.statistics_features(),
            vec![
                ("age".into(), 0, [0.0, 120.0]),
                ("fbs".into(), 3, [0.0, 1.0])
            ]
        );
        assert_eq!(
            FederationSpec::from_toml(HEART).unwrap().statistics_sigma(),
            None
        );
        let key = |r: Result<FederationSpec, SpecError>| key_of(r.unwrap_err());
        assert_eq!(
            key(fed("name = \"age\"\ntype = \"numeric\"", ok)),
            "features.age.range"
        );
        let flipped = "name = \"age\"\ntype = \"numeric\"\nrange = [120, 0]";
        assert_eq!(key(fed(flipped, ok)), "features.age.range");
        let no_noise = "mode = \"record\"\nnoise_multiplier = 1.0";
        assert_eq!(
            key(fed(age, no_noise)),
            "privacy.statistics_noise_multiplier"
        );
        let site = "mode = \"site\"\nnoise_multiplier = 1.0\nstatistics_noise_multiplier = 5.0";
        assert_eq!(key(fed(age, site)), "data.standardize");
    }

    #[test]
    fn every_bad_value_is_named_with_a_fix() {
        let cases = [
            ("version = 1", "version = 2", "version"),
            ("hidden = [8]", "hidden = []", "model.hidden"),
            ("hidden = [8]", "hidden = [0]", "model.hidden"),
            (
                "hidden = [8]",
                "hidden = [8, 8, 8, 8, 8, 8, 8, 8, 8]",
                "model.hidden",
            ),
            (
                "noise_multiplier = 1.0",
                "noise_multiplier = 0.0",
                "privacy.noise_multiplier",
            ),
            (
                "noise_multiplier = 1.0",
                "noise_multiplier = nan",
                "privacy.noise_multiplier",
            ),
            (
                "noise_multiplier = 1.0",
                "target_epsilon = -1.0",
                "privacy.target_epsilon",
            ),
            (
                "noise_multiplier = 1.0",
                "noise_multiplier = 1.0\ntarget_epsilon = 1.0",
                "privacy",
            ),
            ("noise_multiplier = 1.0", "", "privacy"),
            (
                "mode = \"record\"",
                "mode = \"record\"\ndelta = 1.0",
                "privacy.delta",
            ),
            (
                "classes = [\"0\", { name = \"disease\", values = [\"1\", \"2\", \"3\", \"4\"] }]",
                "classes = [\"0\"]",
                "task.classes",
            ),
            (
                "values = [\"1\", \"2\"",
                "values = [\"0\", \"2\"",
                "task.classes[1]",
            ),
            ("name = \"cp\"", "name = \"age\"", "features[1].name"),
            ("name = \"age\"", "name = \"num\"", "features[0].name"),
            (
                "levels = [\"asymptomatic\", \"typical angina\"]",
                "levels = []",
                "features[1].levels",
            ),
            (
                "type = \"boolean\"",
                "type = \"boolean\"\nlevels = [\"x\"]",
                "features[2].levels",
            ),
            ("kind = \"mlp\"", "kind = \"bert\"", "model.kind"),
            (
                "[model]",
                "[federation]\nstrategy = \"krum\"\n[model]",
                "federation.strategy",
            ),
            (
                "[model]",
                "[training]\nlearning_rate = -1\n[model]",
                "training.learning_rate",
            ),
            (
                "[model]",
                "[data]\ntest_fraction = 0.0\n[model]",
                "data.test_fraction",
            ),
            (
                "[model]",
                "[federation]\nrounds = 0\n[model]",
                "federation.rounds",
            ),
            (
                "[model]",
                "[federation]\nmin_sites = 3\nstrategy = \"median\"\n[federation.secure_aggregation]\nmax_update_norm = 1.0\n[model]",
                "federation.strategy",
            ),
            (
                "[model]",
                "[federation]\nmin_sites = 2\n[federation.secure_aggregation]\nmax_update_norm = 1.0\n[model]",
                "federation.min_sites",
            ),
            (
                "[model]",
                "[federation]\nmin_sites = 3\n[federation.secure_aggregation]\ndegree = 3\nmax_update_norm = 1.0\n[model]",
                "federation.secure_aggregation.degree",
            ),
            (
                "[model]",
                "[federation]\nmin_sites = 3\n[federation.secure_aggregation]\nstage_timeout_s = 0.5\nmax_update_norm = 1.0\n[model]",
                "federation.secure_aggregation.stage_timeout_s",
            ),
            (
                "[model]",
                "[federation]\nmin_sites = 3\n[federation.secure_aggregation]\n[model]",
                "federation.secure_aggregation.max_update_norm",
            ),
            (
                "[model]",
                "[federation]\nmin_sites = 3\n[federation.secure_aggregation]\nmax_update_norm = -1.0\n[model]",
                "federation.secure_aggregation.max_update_norm",
            ),
            (
                "[model]",
                "[federation]\nmin_sites = 3\n[federation.secure_aggregation]\ndistributed_dp = true\n[model]",
                "federation.secure_aggregation.distributed_dp",
            ),
            (
                "mode = \"record\"\nnoise_multiplier = 1.0",
                "mode = \"site\"\nnoise_multiplier = 1.0\n[federation]\nmin_sites = 3\n[federation.secure_aggregation]\ndistributed_dp = true\nmax_update_norm = 2.0",
                "federation.secure_aggregation.max_update_norm",
            ),
        ];
        for (from, to, key) in cases {
            let e = with(from, to).expect_err(to);
            let text = e.to_string();
            assert_eq!(key_of(e), key, "{to}: {text}");
            assert!(text.contains("; "), "a fix follows the problem: {text}");
        }
    }

    #[test]
    fn secure_aggregation_is_read_with_defaults_and_summarised() {
        let s = with(
            "[model]",
            "[federation]\nmin_sites = 3\n[federation.secure_aggregation]\ndegree = 20\nmax_update_norm = 2.5\n[model]",
        )
        .unwrap();
        let sa = s.federation.secure_aggregation.as_ref().unwrap();
        assert_eq!(
            (sa.degree, sa.stage_timeout_s, sa.max_update_norm),
            (20, 60.0, Some(2.5))
        );
        assert!(
            s.summary().contains("secure aggregation (k = 20)"),
            "{}",
            s.summary()
        );
        assert_eq!(
            FederationSpec::from_toml(HEART)
                .unwrap()
                .federation
                .secure_aggregation,
            None
        );
        let d = with(
            "mode = \"record\"\nnoise_multiplier = 1.0",
            "mode = \"site\"\nnoise_multiplier = 1.0\n[federation]\nmin_sites = 3\n[federation.secure_aggregation]\ndistributed_dp = true",
        )
        .unwrap();
        assert!(
            d.summary().contains("with distributed DP (Skellam)"),
            "{}",
            d.summary()
        );
        assert!(!sa.distributed_dp);
    }

    #[test]
    fn unknown_and_missing_keys_are_parse_errors_naming_the_key() {
        let e = with("hidden = [8]", "hidden = [8]\nhiden = 3").unwrap_err();
        assert!(matches!(e, SpecError::Parse(_)));
        assert!(e.to_string().contains("hiden"), "{e}");
        let e = with("mode = \"record\"", "").unwrap_err();
        assert!(e.to_string().contains("mode"), "{e}");
    }

    #[test]
    fn text_specs_need_a_text_column_and_a_checkpoint() {
        let text = r#"
version = 1
[task]
kind = "text-classification"
label = "rating"
text = "review"
classes = ["neg", "pos"]
[model]
kind = "bert"
checkpoint = "minilm"
[privacy]
mode = "site"
noise_multiplier = 1.0
"#;
        let s = FederationSpec::from_toml(text).unwrap();
        assert!(s.mlp().is_none());
        let e = FederationSpec::from_toml(&text.replace("text = \"review\"\n", "")).unwrap_err();
        assert_eq!(key_of(e), "task.text");
        let e =
            FederationSpec::from_toml(&text.replace("checkpoint = \"minilm\"\n", "")).unwrap_err();
        assert_eq!(key_of(e), "model.checkpoint");
        let e = FederationSpec::from_toml(&text.replace("mode = \"site\"", "mode = \"record\""))
            .unwrap_err();
        assert_eq!(key_of(e), "privacy.mode");
    }

    #[test]
    fn messy_cells() {
        for m in ["", "  ", "NA", "na", "?", " N/A ", "NaN", "null"] {
            assert!(is_missing(m), "{m:?}");
        }
        assert!(!is_missing("0"));
        for (c, b) in [("Yes", true), (" y ", true), ("TRUE", true), ("1", true)] {
            assert_eq!(parse_bool(c), Some(b), "{c}");
        }
        for (c, b) in [("no", false), ("N", false), ("False", false), ("0", false)] {
            assert_eq!(parse_bool(c), Some(b), "{c}");
        }
        assert_eq!(parse_bool("maybe"), None);
        assert_eq!(parse_number(" 3.5 "), Some(3.5));
        assert_eq!(parse_number("inf"), None);
        assert_eq!(parse_number("12a"), None);
    }
}
