//! `fedee finetune`: fine-tune a model at the trainer under EE on the key holder's own data
//! file. The model is encrypted with the keys and uploaded as a job; each epoch the training
//! split is shuffled, cut into batches, encrypted (inputs with the input key or vocabulary
//! permutation, labels with the label permutation) and streamed; the trainer's EE model is
//! evaluated on the encrypted test split before and after, downloaded, decrypted, and written
//! with its preprocessing figures.
//!
//! Equivariance (SECURITY.md, "EE math"): for keys the optimizer is exact under (signed
//! permutations for AdamW, orthogonal maps for SGD), training the EE model on encrypted
//! batches and decrypting equals training the plaintext model on the plaintext batches, up to
//! floating-point rounding. `verify` checks this by running the plaintext training too.

use std::collections::BTreeMap;

use fedee_encrypt::{StateDict, check_trainable, decrypt_state, transform_state};
use fedee_model::{Model, OptimizerSpec, state_to_safetensors, state_to_safetensors_with};
use fedee_site_agent::metrics::{Metrics, classification};
use fedee_site_agent::table::{DataReport, Preprocessing, RowFilter};
use fedee_trainer::TrainerClient;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tch::{Device, Kind, Tensor};

use crate::{Inputs, KeyHolderError, Keyed, Result, SPEC_SHA256_KEY};

/// A labelled split.
pub struct Split {
    /// Inputs.
    pub inputs: Inputs,
    /// Class indices.
    pub y: Vec<i64>,
}

/// The key holder's data as the spec says: train, validation and test splits, the data
/// report, and (tabular) the preprocessing fitted on the training split.
pub struct LocalData {
    /// Training split.
    pub train: Split,
    /// Validation split (model selection only).
    pub validation: Split,
    /// Test split (reported metrics).
    pub test: Split,
    /// What was read.
    pub report: DataReport,
    /// Imputation and standardisation figures (tabular tasks).
    pub preprocessing: Option<Preprocessing>,
}

impl LocalData {
    /// Read `path` (rows that `filter` selects) as `keyed`'s spec says. Under federated
    /// standardisation the records are standardised with `pooled` (the federation's figures,
    /// [`Keyed::pooled_preprocessing`]) when given, else with this file's own training split's.
    ///
    /// # Errors
    /// [`KeyHolderError::Data`] naming file, line, column and value.
    pub fn load(
        keyed: &Keyed,
        path: &std::path::Path,
        filter: Option<&RowFilter>,
        pooled: Option<&Preprocessing>,
    ) -> Result<Self> {
        let spec = &keyed.spec.spec;
        match &keyed.tokenizer {
            None => {
                let mut d = fedee_site_agent::table::load(spec, path, filter)?;
                if spec.statistics_sigma().is_some() {
                    let figures = pooled.cloned().unwrap_or_else(|| d.preprocessing.clone());
                    d.apply(&figures);
                    d.preprocessing = figures;
                }
                let split = |e: fedee_site_agent::table::Examples| Split {
                    inputs: Inputs::Features {
                        x: e.x,
                        width: d.features,
                    },
                    y: e.y,
                };
                Ok(Self {
                    train: split(d.train),
                    validation: split(d.validation),
                    test: split(d.test),
                    report: d.report,
                    preprocessing: Some(d.preprocessing),
                })
            }
            Some(tok) => {
                let d = fedee_site_agent::table::load_text(spec, path, filter)?;
                let split = |rows: Vec<(String, i64)>| -> Result<Split> {
                    let mut ids = Vec::with_capacity(rows.len());
                    let mut y = Vec::with_capacity(rows.len());
                    for (t, c) in rows {
                        ids.push(tok.ids(&t)?);
                        y.push(c);
                    }
                    Ok(Split {
                        inputs: Inputs::Tokens(ids),
                        y,
                    })
                };
                Ok(Self {
                    train: split(d.train)?,
                    validation: split(d.validation)?,
                    test: split(d.test)?,
                    report: d.report,
                    preprocessing: None,
                })
            }
        }
    }
}

/// How to fine-tune.
#[derive(Debug, Clone)]
pub struct Options {
    /// Passes over the training split (0: only evaluate, and fit the preprocessing).
    pub epochs: u32,
    /// Examples per batch.
    pub batch_size: usize,
    /// The trainer's optimizer (AdamW needs permutation-type input keys, SGD orthogonal ones).
    pub optimizer: OptimizerSpec,
    /// The dtype the trainer trains in: f32 or f64.
    pub kind: Kind,
    /// Seed of the batch order.
    pub seed: u64,
    /// Also train the plaintext model on the same batches here and report the largest weight
    /// difference from the decrypted EE model (costs the training again, locally).
    pub verify: bool,
}

/// Progress of a fine-tuning job, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// An epoch begins: `steps` batches in it.
    Epoch {
        /// 1-based epoch.
        epoch: u32,
        /// Batches in the epoch.
        steps: u64,
    },
    /// A step's encrypted loss came back.
    Step {
        /// Step within the job (from 1).
        step: u64,
        /// Mean cross-entropy of the batch.
        loss: f64,
    },
    /// An epoch ended with its mean encrypted loss.
    EpochDone {
        /// 1-based epoch.
        epoch: u32,
        /// Mean loss over its batches.
        loss: f64,
    },
}

/// What a fine-tuning run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The trainer's job (it keeps the fine-tuned EE model for `fedee predict --job`).
    pub job: String,
    /// The spec's SHA-256.
    pub spec_sha256: String,
    /// What was read.
    pub data: DataReport,
    /// Epochs run.
    pub epochs: u32,
    /// Steps run.
    pub steps: u64,
    /// Mean encrypted loss of the last epoch (NaN without epochs).
    pub final_loss: f64,
    /// Test-split metrics of the uploaded model, from encrypted predictions.
    pub test_before: Metrics,
    /// Test-split metrics of the fine-tuned model, from encrypted predictions.
    pub test_after: Metrics,
    /// Validation-split metrics of the fine-tuned model (for choosing epochs or a learning
    /// rate; never the test split); `None` without a validation split.
    pub validation_after: Option<Metrics>,
    /// With `verify`: the largest |Δw| between the decrypted EE model and the same
    /// fine-tuning done in plaintext here.
    pub max_abs_weight_diff: Option<f64>,
    /// With `verify`: test-split metrics of the plaintext fine-tuning, run here.
    pub plaintext_test_after: Option<Metrics>,
    /// With `verify`: the fraction of test examples whose top class from the trainer's
    /// encrypted predictions equals the plaintext fine-tuned model's.
    pub test_argmax_agreement: Option<f64>,
}

/// Metrics of the job's model on `split`, from encrypted batches of `batch_size`, and the
/// decrypted class probabilities `(n, classes)` row-major.
async fn evaluate(
    tc: &mut TrainerClient,
    keyed: &Keyed,
    job: &str,
    split: &Split,
    batch_size: usize,
    kind: Kind,
) -> Result<(Metrics, Vec<f32>)> {
    let n = split.y.len();
    let k = keyed.arch.num_classes();
    let mut scores = Vec::with_capacity(n * k);
    let idx: Vec<usize> = (0..n).collect();
    for b in idx.chunks(batch_size.max(1)) {
        let enc = keyed.encrypt(&split.inputs.batch(b, kind))?;
        let bytes = fedee_model::batch_to_safetensors(&enc, None)?;
        let logits = crate::predict::decrypt_logits(
            keyed,
            &tc.predict(job, bytes)
                .await
                .map_err(|source| KeyHolderError::Interrupted {
                    what: "evaluation".into(),
                    job: job.to_owned(),
                    source,
                })?,
        )?;
        scores.extend(crate::probabilities(&logits)?);
    }
    Ok((classification(&scores, k, &split.y), scores))
}

/// The plaintext model's metrics on `split`, run here, and the fraction of examples whose
/// top class equals the one in `encrypted` (the trainer's decrypted probabilities).
fn compare_plaintext(
    model: &Model,
    split: &Split,
    batch_size: usize,
    kind: Kind,
    encrypted: &[f32],
) -> Result<(Metrics, f64)> {
    let k = model.arch.num_classes();
    let idx: Vec<usize> = (0..split.y.len()).collect();
    let mut scores = Vec::with_capacity(split.y.len() * k);
    for b in idx.chunks(batch_size.max(1)) {
        let logits = tch::no_grad(|| model.forward(&split.inputs.batch(b, kind)))?;
        scores.extend(crate::probabilities(&logits)?);
    }
    let top = |p: &[f32]| -> Vec<usize> {
        p.chunks_exact(k)
            .map(|r| (0..k).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap_or(0))
            .collect()
    };
    let (a, b) = (top(&scores), top(encrypted));
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    Ok((
        classification(&scores, k, &split.y),
        agree as f64 / a.len().max(1) as f64,
    ))
}

/// Fine-tune `global` (the plaintext model) at the trainer on `data`'s training split.
/// Returns the decrypted fine-tuned model (the trainer's dtype) and the report.
///
/// # Errors
/// Keys not trainable with the optimizer ([`KeyHolderError::Encrypt`]), the trainer refusing
/// the job, or [`KeyHolderError::Interrupted`] when it stops part way.
pub async fn finetune(
    tc: &mut TrainerClient,
    keyed: &Keyed,
    global: &StateDict,
    data: &LocalData,
    opts: &Options,
    mut progress: impl FnMut(Progress),
) -> Result<(StateDict, Report)> {
    check_trainable(&keyed.key_spec, &keyed.keys, opts.optimizer.family())?;
    let global: StateDict = global
        .iter()
        .map(|(k, v)| (k.clone(), v.to_kind(opts.kind)))
        .collect();
    let ee = state_to_safetensors(&transform_state(&keyed.key_spec, &keyed.keys, &global)?)?;
    let dtype = if opts.kind == Kind::Double {
        "f64"
    } else {
        "f32"
    };
    let job = tc
        .create_job(&keyed.arch, &opts.optimizer, dtype, &ee)
        .await?;
    let interrupted = |what: &str| {
        let job = job.clone();
        let what = what.to_owned();
        move |source| KeyHolderError::Interrupted { what, job, source }
    };
    let (test_before, _) =
        evaluate(tc, keyed, &job, &data.test, opts.batch_size, opts.kind).await?;

    let mut plain = if opts.verify {
        let m = Model::from_state(keyed.arch.clone(), &global, Device::Cpu, opts.kind)?;
        let o = m.optimizer(&opts.optimizer)?;
        Some((m, o))
    } else {
        None
    };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(opts.seed);
    let (mut steps, mut final_loss) = (0u64, f64::NAN);
    for epoch in 1..=opts.epochs {
        let mut idx: Vec<usize> = (0..data.train.y.len()).collect();
        idx.shuffle(&mut rng);
        let mut batches = Vec::new();
        for b in idx.chunks(opts.batch_size.max(1)) {
            let x = data.train.inputs.batch(b, opts.kind);
            let y = Tensor::from_slice(&b.iter().map(|&i| data.train.y[i]).collect::<Vec<_>>());
            if let Some((m, o)) = plain.as_mut() {
                m.train_step(o, &x, &y)?;
            }
            let ye = fedee_encrypt::encrypt_labels(&keyed.key_spec, &keyed.keys, &y)?;
            batches.push(fedee_model::batch_to_safetensors(
                &keyed.encrypt(&x)?,
                Some(&ye),
            )?);
        }
        progress(Progress::Epoch {
            epoch,
            steps: batches.len() as u64,
        });
        let first = steps;
        let losses = tc
            .train(&job, batches, |s, loss| {
                progress(Progress::Step {
                    step: first + s,
                    loss,
                });
            })
            .await
            .map_err(interrupted(&format!("fine-tuning epoch {epoch}")))?;
        steps += losses.len() as u64;
        final_loss = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
        progress(Progress::EpochDone {
            epoch,
            loss: final_loss,
        });
    }
    let (test_after, test_scores) =
        evaluate(tc, keyed, &job, &data.test, opts.batch_size, opts.kind).await?;
    let validation_after = if data.validation.y.is_empty() {
        None
    } else {
        Some(
            evaluate(
                tc,
                keyed,
                &job,
                &data.validation,
                opts.batch_size,
                opts.kind,
            )
            .await?
            .0,
        )
    };
    let tuned_ee = fedee_model::state_from_safetensors(
        &tc.export_model(&job)
            .await
            .map_err(interrupted("downloading the fine-tuned model"))?,
        Device::Cpu,
    )?;
    let tuned = decrypt_state(&keyed.key_spec, &keyed.keys, &tuned_ee)?;
    let max_abs_weight_diff = plain
        .as_ref()
        .map(|(m, _)| max_abs_diff(&tuned, &m.state()));
    let compared = plain
        .as_ref()
        .map(|(m, _)| compare_plaintext(m, &data.test, opts.batch_size, opts.kind, &test_scores))
        .transpose()?;
    Ok((
        tuned,
        Report {
            job,
            spec_sha256: keyed.spec.sha256.clone(),
            data: data.report.clone(),
            epochs: opts.epochs,
            steps,
            final_loss,
            test_before,
            test_after,
            validation_after,
            max_abs_weight_diff,
            plaintext_test_after: compared.map(|c| c.0),
            test_argmax_agreement: compared.map(|c| c.1),
        },
    ))
}

/// Largest |a − b| over the tensors of `a` (both hold the same names).
fn max_abs_diff(a: &StateDict, b: &StateDict) -> f64 {
    a.iter()
        .filter_map(|(k, v)| b.get(k).map(|w| (v, w)))
        .map(|(v, w)| {
            (v.to_kind(Kind::Double) - w.to_kind(Kind::Double))
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// The fine-tuned model as safetensors with its metadata: the spec's SHA-256 and (tabular)
/// the preprocessing figures `fedee predict` standardises new records with.
///
/// # Errors
/// [`KeyHolderError::Model`].
pub fn model_file(
    keyed: &Keyed,
    tuned: &StateDict,
    preprocessing: Option<&Preprocessing>,
) -> Result<Vec<u8>> {
    let mut meta = BTreeMap::new();
    meta.insert(SPEC_SHA256_KEY.to_owned(), keyed.spec.sha256.clone());
    if let Some(p) = preprocessing {
        meta.insert(
            Preprocessing::METADATA_KEY.to_owned(),
            serde_json::to_string(p).expect("preprocessing serializes"),
        );
    }
    Ok(state_to_safetensors_with(tuned, &meta)?)
}
