//! The key holder's side of the trainer: pharma fine-tuning an EE model on its own data file
//! ([`finetune`]), and inference clients asking for predictions on their own records
//! ([`predict`]). Both read the data as the federation spec says (the same
//! [`fedee_site_agent::table`] loader the sites use), encrypt inputs and labels with the key
//! file, talk to the trainer through [`fedee_trainer::TrainerClient`], and decrypt what comes
//! back. For a causal LM, [`lm`] holds the vocabulary key and [`chat_proxy`] serves an
//! OpenAI-compatible endpoint that encrypts prompts and decrypts the streamed answers.
//!
//! # Security
//! Keys, plaintext records, plaintext labels and the preprocessing figures stay in this
//! process. The trainer receives the EE model (written without metadata), encrypted batches
//! and encrypted labels, and returns encrypted logits and the EE model; it sees what
//! SECURITY.md lists (shapes, losses, label histograms, value multisets under permutation
//! keys). EE is a change of basis, not semantic encryption.

pub mod chat_proxy;
pub mod cli;
pub mod finetune;
pub mod lm;
pub mod predict;

use std::path::{Path, PathBuf};

use fedee_encrypt::{KeySet, KeySpec, StateDict};
use fedee_model::text::TextTokenizer;
use fedee_model::{Architecture, Input};
use fedee_site_agent::table::{DataError, Preprocessing};
use fedee_spec::{SignedSpec, TaskKind};
use tch::{Device, Kind, Tensor};

/// Errors of the key holder's commands.
#[derive(Debug, thiserror::Error)]
pub enum KeyHolderError {
    /// The data file cannot satisfy the spec.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The spec's model cannot be built here.
    #[error(transparent)]
    Site(#[from] fedee_site_agent::SiteError),
    /// The spec cannot be read.
    #[error(transparent)]
    Spec(#[from] fedee_spec::SpecError),
    /// A model or batch is malformed.
    #[error("model: {0}")]
    Model(#[from] fedee_model::ModelError),
    /// Encrypting or decrypting failed (keys that do not fit, a group not trainable).
    #[error("EE: {0}")]
    Encrypt(#[from] fedee_encrypt::EncryptError),
    /// The trainer cannot be reached or refused a call before a job started.
    #[error(transparent)]
    Trainer(#[from] fedee_trainer::client::ClientError),
    /// A job stopped part way (the trainer restarted or refused a batch); nothing was written.
    #[error(
        "{what} stopped at the trainer (job {job}); nothing was written. A trainer keeps jobs in memory: after a restart, run the command again"
    )]
    Interrupted {
        /// What was running.
        what: String,
        /// The job.
        job: String,
        /// The trainer's error.
        #[source]
        source: fedee_trainer::client::ClientError,
    },
    /// HSS-EE failed (a server unreachable or refusing, a model that does not fit).
    #[error("HSS-EE: {0}")]
    Hss(#[from] fedee_hss::HssError),
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The predictions file cannot be written.
    #[error("writing {path}: {source}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: csv::Error,
    },
    /// Files that do not belong together (keys for another model, a model without its
    /// preprocessing, a model of another spec), naming both sides and the fix.
    #[error("{0}")]
    Mismatch(String),
    /// libtorch error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result of the key holder's functions.
pub type Result<T, E = KeyHolderError> = std::result::Result<T, E>;

/// Metadata key of the spec's SHA-256 in a model written by `fedee finetune`.
pub const SPEC_SHA256_KEY: &str = "fedee.spec_sha256";

/// Metadata key under which a global model downloaded from a federation with federated
/// standardisation carries the pooled statistics its sites standardised with (JSON list of
/// `[feature, count, sum, sum_squares]`).
pub const POOLED_STATISTICS_KEY: &str = "fedee.pooled_statistics";

/// `bytes` (a global model's safetensors) with the federation's pooled statistics in its
/// metadata, so the key holder standardises its records with the figures every site used.
///
/// # Errors
/// [`KeyHolderError::Model`] for bytes that are not a model.
pub fn with_pooled_statistics(
    bytes: &[u8],
    pooled: &[fedee_proto::v1::FeatureStatistics],
) -> Result<Vec<u8>> {
    let mut meta = fedee_model::safetensors_metadata(bytes)?;
    let rows: Vec<(&str, f64, f64, f64)> = pooled
        .iter()
        .map(|f| (f.feature.as_str(), f.count, f.sum, f.sum_squares))
        .collect();
    meta.insert(
        POOLED_STATISTICS_KEY.to_owned(),
        serde_json::to_string(&rows).expect("numbers serialize"),
    );
    let state = fedee_model::state_from_safetensors(bytes, Device::Cpu)?;
    Ok(fedee_model::state_to_safetensors_with(&state, &meta)?)
}

/// A federation spec, its model's architecture, and the key file for that model: what every
/// key-holder command starts from.
pub struct Keyed {
    /// The spec (with its text's SHA-256).
    pub spec: SignedSpec,
    /// The model the spec describes.
    pub arch: Architecture,
    /// Which key acts on which axis of which tensor.
    pub key_spec: KeySpec,
    /// The secret keys.
    pub keys: KeySet,
    /// The checkpoint's tokenizer (text tasks).
    pub tokenizer: Option<TextTokenizer>,
}

impl Keyed {
    /// Read the spec and the key file and check that the keys fit the spec's model.
    ///
    /// # Errors
    /// An unreadable or invalid spec or key file; [`KeyHolderError::Mismatch`] for keys of
    /// another architecture or size.
    pub fn open(spec: &Path, keys: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(spec).map_err(|source| KeyHolderError::Io {
            path: spec.to_owned(),
            source,
        })?;
        Self::new(SignedSpec::parse(&text)?, KeySet::load(keys)?)
    }

    /// [`Keyed::open`] on a spec and keys already in memory.
    ///
    /// # Errors
    /// As [`Keyed::open`].
    pub fn new(spec: SignedSpec, keys: KeySet) -> Result<Self> {
        let (arch, tokenizer) = match spec.spec.task.kind {
            TaskKind::TabularClassification => (
                Architecture::Mlp(fedee_site_agent::task::mlp_config(&spec.spec)?),
                None,
            ),
            TaskKind::TextClassification => {
                let cfg = fedee_site_agent::task::bert_classifier(&spec.spec)?;
                let dir = Path::new(spec.spec.model.checkpoint.as_deref().unwrap_or_default());
                (
                    Architecture::BertClassifier(cfg),
                    Some(TextTokenizer::from_file(
                        &dir.join("tokenizer.json"),
                        spec.spec.data.max_tokens,
                    )?),
                )
            }
        };
        if keys.architecture != arch.name() {
            return Err(KeyHolderError::Mismatch(format!(
                "the key file is for a `{}` model, the spec's model is `{}`: generate keys with `fedee ee keygen --spec SPEC --out KEYS`",
                keys.architecture,
                arch.name()
            )));
        }
        let key_spec = arch.key_spec();
        keys.check(&key_spec).map_err(|e| {
            KeyHolderError::Mismatch(format!(
                "the key file does not fit the spec's model ({e}): generate keys with `fedee ee keygen --spec SPEC --out KEYS`"
            ))
        })?;
        Ok(Self {
            spec,
            arch,
            key_spec,
            keys,
            tokenizer,
        })
    }

    /// Read a plaintext model file, check it fits the spec's model, and return it with its
    /// metadata.
    ///
    /// # Errors
    /// An unreadable file; [`KeyHolderError::Model`] for a model of other shapes;
    /// [`KeyHolderError::Mismatch`] for a model fine-tuned under another spec.
    pub fn read_model(
        &self,
        path: &Path,
    ) -> Result<(StateDict, std::collections::BTreeMap<String, String>)> {
        let bytes = std::fs::read(path).map_err(|source| KeyHolderError::Io {
            path: path.to_owned(),
            source,
        })?;
        let meta = fedee_model::safetensors_metadata(&bytes)?;
        if let Some(sha) = meta.get(SPEC_SHA256_KEY)
            && *sha != self.spec.sha256
        {
            return Err(KeyHolderError::Mismatch(format!(
                "{} was fine-tuned under the spec with SHA-256 {sha}, this spec's is {}: pass the spec it was trained under",
                path.display(),
                self.spec.sha256
            )));
        }
        let state = fedee_model::state_from_safetensors(&bytes, Device::Cpu)?;
        self.arch.check_state(&state).map_err(|e| {
            KeyHolderError::Mismatch(format!(
                "{} is not the spec's model ({}): {e}",
                path.display(),
                self.spec.spec.summary()
            ))
        })?;
        Ok((state, meta))
    }

    /// Under federated standardisation, the federation's pooled preprocessing from a global
    /// model's metadata ([`POOLED_STATISTICS_KEY`], written by `fedee download-model`);
    /// `None` when the spec standardises per site or the file carries none.
    ///
    /// # Errors
    /// [`KeyHolderError::Mismatch`] for metadata that does not parse or cover the spec's
    /// features.
    pub fn pooled_preprocessing(
        &self,
        path: &Path,
        meta: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<Preprocessing>> {
        let Some(json) = meta.get(POOLED_STATISTICS_KEY) else {
            return Ok(None);
        };
        if self.spec.spec.statistics_sigma().is_none() {
            return Ok(None);
        }
        let bad = |e: String| {
            KeyHolderError::Mismatch(format!(
                "{}: the `{POOLED_STATISTICS_KEY}` metadata {e}",
                path.display()
            ))
        };
        let rows: Vec<(String, f64, f64, f64)> =
            serde_json::from_str(json).map_err(|e| bad(format!("is not valid JSON: {e}")))?;
        let totals: Vec<fedee_site_agent::statistics::FeatureStatistics> = rows
            .into_iter()
            .map(|(feature, count, sum, sum_squares)| {
                fedee_site_agent::statistics::FeatureStatistics {
                    feature,
                    count,
                    sum,
                    sum_squares,
                }
            })
            .collect();
        fedee_site_agent::statistics::preprocessing(&self.spec.spec, &totals)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    /// The preprocessing a tabular model was fine-tuned with (its metadata), checked against
    /// the spec; `None` for text models.
    ///
    /// # Errors
    /// [`KeyHolderError::Mismatch`] for a tabular model without it (a global model straight
    /// from the federation, whose sites standardise with their own figures).
    pub fn preprocessing(
        &self,
        path: &Path,
        meta: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<Preprocessing>> {
        if self.tokenizer.is_some() {
            return Ok(None);
        }
        let Some(json) = meta.get(Preprocessing::METADATA_KEY) else {
            return Err(KeyHolderError::Mismatch(format!(
                "{} carries no preprocessing figures (the training-split means and standard deviations its inputs were standardised with): a global model from the federation has none, because each site standardises with its own. Run `fedee finetune` on it first (`--epochs 0` only fits the figures on your data and writes them into the model)",
                path.display()
            )));
        };
        let prep: Preprocessing = serde_json::from_str(json).map_err(|e| {
            KeyHolderError::Mismatch(format!(
                "{}: the `{}` metadata is not valid preprocessing JSON: {e}",
                path.display(),
                Preprocessing::METADATA_KEY
            ))
        })?;
        prep.check(&self.spec.spec)?;
        Ok(Some(prep))
    }

    /// Encrypt a plaintext batch with the keys: features with the input key, token ids with
    /// the vocabulary permutation (the mask is left as is).
    ///
    /// # Errors
    /// [`KeyHolderError::Encrypt`].
    pub fn encrypt(&self, input: &Input) -> Result<Input> {
        Ok(match input {
            Input::Features(x) => Input::Features(fedee_encrypt::encrypt_inputs(
                &self.key_spec,
                &self.keys,
                x,
            )?),
            Input::Tokens { ids, mask } => Input::Tokens {
                ids: fedee_encrypt::encrypt_token_ids(&self.key_spec, &self.keys, ids)?,
                mask: mask.shallow_clone(),
            },
            Input::Embedded { .. } => {
                return Err(KeyHolderError::Mismatch(
                    "client-side embeddings are not encrypted here".into(),
                ));
            }
        })
    }
}

/// Model inputs of one data set, before batching: encoded feature rows or token ids.
pub enum Inputs {
    /// `(n, width)` row-major features, imputed and standardised.
    Features {
        /// Features, row-major.
        x: Vec<f32>,
        /// Inputs per example.
        width: usize,
    },
    /// Token ids per example (with the special tokens).
    Tokens(Vec<Vec<i64>>),
}

impl Inputs {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            Inputs::Features { x, width } => x.len() / width.max(&1),
            Inputs::Tokens(t) => t.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `idx` as a plaintext batch of `kind` floats (features) on the CPU.
    pub fn batch(&self, idx: &[usize], kind: Kind) -> Input {
        match self {
            Inputs::Features { x, width } => {
                let mut rows = Vec::with_capacity(idx.len() * width);
                for &i in idx {
                    rows.extend_from_slice(&x[i * width..(i + 1) * width]);
                }
                Input::Features(
                    Tensor::from_slice(&rows)
                        .reshape([idx.len() as i64, *width as i64])
                        .to_kind(kind),
                )
            }
            Inputs::Tokens(t) => {
                let seqs: Vec<Vec<i64>> = idx.iter().map(|&i| t[i].clone()).collect();
                let (ids, mask) = fedee_model::text::pad(&seqs);
                Input::Tokens { ids, mask }
            }
        }
    }
}

/// Write `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a partial file and a failure leaves no file.
///
/// # Errors
/// [`KeyHolderError::Io`].
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let io = |source| KeyHolderError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    write(tmp.as_file_mut()).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Softmax probabilities `(n, k)` of logits, as f32 rows.
fn probabilities(logits: &Tensor) -> Result<Vec<f32>> {
    let p = logits.to_kind(Kind::Double).softmax(-1, Kind::Double);
    Ok(Vec::<f32>::try_from(
        p.to_kind(Kind::Float).contiguous().view(-1),
    )?)
}
