//! `fedee predict`: class probabilities for the records of a data file from an EE model at the
//! trainer. Records are read as the spec says (tabular rows imputed and standardised with the
//! figures the model was fine-tuned with; texts tokenized with the checkpoint's tokenizer),
//! encrypted in batches, sent to `Predict`, and the encrypted logits decrypted and turned into
//! probabilities here. One output row per selected input row, in file order; a row that
//! cannot be predicted (a missing feature under `missing = "drop-row"`, an empty text) keeps
//! its place with empty probabilities and a note.

use fedee_encrypt::{StateDict, decrypt_outputs, transform_state};
use fedee_model::{Model, OptimizerSpec, state_from_safetensors, state_to_safetensors};
use fedee_site_agent::table::{Preprocessing, Record, RowFilter};
use fedee_trainer::TrainerClient;
use tch::{Device, Kind, Tensor};

use crate::{Inputs, KeyHolderError, Keyed, Result};

/// Decrypt the `logits` of a `Predict` answer (safetensors bytes).
///
/// # Errors
/// A malformed answer or logits of the wrong shape.
pub fn decrypt_logits(keyed: &Keyed, answer: &[u8]) -> Result<Tensor> {
    let enc = state_from_safetensors(answer, Device::Cpu)?
        .remove("logits")
        .ok_or_else(|| KeyHolderError::Mismatch("the trainer's answer has no `logits`".into()))?;
    Ok(decrypt_outputs(&keyed.key_spec, &keyed.keys, &enc)?)
}

/// Which EE model answers.
pub enum Job {
    /// A job already at the trainer (e.g. the one `fedee finetune` left there).
    Existing(String),
    /// Encrypt this plaintext model and upload it as a new job.
    Upload(StateDict),
}

/// The rows of a file to predict on.
pub struct Rows {
    /// Inputs of the rows that have one.
    pub inputs: Inputs,
    /// Every selected row, in file order.
    pub records: Vec<Record>,
}

impl Rows {
    /// Read `path` (rows that `filter` selects) as `keyed`'s spec says; tabular rows with
    /// `prep`.
    ///
    /// # Errors
    /// [`KeyHolderError::Data`] for unreadable files, missing columns and unparseable cells.
    pub fn load(
        keyed: &Keyed,
        prep: Option<&Preprocessing>,
        path: &std::path::Path,
        filter: Option<&RowFilter>,
        id_column: Option<&str>,
    ) -> Result<Self> {
        let spec = &keyed.spec.spec;
        match (&keyed.tokenizer, prep) {
            (Some(tok), _) => {
                let r = fedee_site_agent::table::load_text_records(spec, path, filter, id_column)?;
                let ids = r
                    .inputs
                    .iter()
                    .map(|t| tok.ids(t))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Self {
                    inputs: Inputs::Tokens(ids),
                    records: r.rows,
                })
            }
            (None, Some(prep)) => {
                let r = fedee_site_agent::table::load_records(spec, prep, path, filter, id_column)?;
                Ok(Self {
                    inputs: Inputs::Features {
                        x: r.inputs.concat(),
                        width: prep.features,
                    },
                    records: r.rows,
                })
            }
            (None, None) => Err(KeyHolderError::Mismatch(
                "a tabular model needs its preprocessing figures".into(),
            )),
        }
    }
}

/// Probabilities for each input, from the trainer's answers.
#[derive(Debug, Clone)]
pub struct Predictions {
    /// The job that answered.
    pub job: String,
    /// `(inputs, classes)` row-major probabilities, in input order.
    pub probabilities: Vec<f32>,
    /// With `verify`: the decrypted answers against the plaintext model run here.
    pub verify: Option<Verify>,
}

impl Predictions {
    /// The top class of each input.
    pub fn classes(&self, k: usize) -> Vec<usize> {
        argmax(&self.probabilities, k)
    }
}

/// Encrypted against plaintext predictions.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Verify {
    /// Largest absolute probability difference.
    pub max_abs_probability_diff: f64,
    /// Fraction of inputs whose top class agrees.
    pub argmax_agreement: f64,
}

impl Verify {
    /// Compare `probabilities` with the plaintext model's `reference`, both `(inputs, k)`.
    fn new(probabilities: &[f32], reference: &[f32], k: usize) -> Self {
        let max_abs_probability_diff = probabilities
            .iter()
            .zip(reference)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        let (ours, theirs) = (argmax(probabilities, k), argmax(reference, k));
        let agree = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count();
        Self {
            max_abs_probability_diff,
            argmax_agreement: agree as f64 / ours.len().max(1) as f64,
        }
    }
}

fn argmax(p: &[f32], k: usize) -> Vec<usize> {
    p.chunks_exact(k)
        .map(|r| {
            (0..k)
                .max_by(|&a, &b| r[a].total_cmp(&r[b]))
                .unwrap_or_default()
        })
        .collect()
}

/// Ask the trainer for the class probabilities of `inputs`, `batch_size` per call.
/// `on_batch(done, total)` is called after each batch. With `verify`, that plaintext model is
/// also run here on the plaintext inputs and compared.
///
/// # Errors
/// The trainer refusing the model or a batch; [`KeyHolderError::Interrupted`] when a job
/// stops part way.
pub async fn predict(
    tc: &mut TrainerClient,
    keyed: &Keyed,
    job: Job,
    inputs: &Inputs,
    batch_size: usize,
    verify: Option<&StateDict>,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<Predictions> {
    let job = match job {
        Job::Existing(id) => id,
        Job::Upload(state) => {
            let ee = transform_state(&keyed.key_spec, &keyed.keys, &state)?;
            let kind = state.values().next().map_or(Kind::Float, Tensor::kind);
            let dtype = if kind == Kind::Double { "f64" } else { "f32" };
            // The optimizer is required by CreateJob and unused by Predict.
            let opt = OptimizerSpec::Sgd {
                lr: 1e-3,
                momentum: 0.0,
                weight_decay: 0.0,
            };
            tc.create_job(&keyed.arch, &opt, dtype, &state_to_safetensors(&ee)?)
                .await?
        }
    };
    let kind = verify
        .and_then(|s| s.values().next().map(Tensor::kind))
        .unwrap_or(Kind::Float);
    let plain = verify
        .map(|s| Model::from_state(keyed.arch.clone(), s, Device::Cpu, kind))
        .transpose()?;
    let n = inputs.len();
    let k = keyed.arch.num_classes();
    let mut probabilities = Vec::with_capacity(n * k);
    let mut reference = Vec::new();
    let idx: Vec<usize> = (0..n).collect();
    for b in idx.chunks(batch_size.max(1)) {
        let x = inputs.batch(b, kind);
        let bytes = fedee_model::batch_to_safetensors(&keyed.encrypt(&x)?, None)?;
        let answer =
            tc.predict(&job, bytes)
                .await
                .map_err(|source| KeyHolderError::Interrupted {
                    what: "prediction".into(),
                    job: job.clone(),
                    source,
                })?;
        let logits = decrypt_logits(keyed, &answer)?;
        if logits.size() != [b.len() as i64, k as i64] {
            return Err(KeyHolderError::Mismatch(format!(
                "the trainer answered logits of shape {:?} for a batch of {} ({} classes): job {job} holds another model",
                logits.size(),
                b.len(),
                k
            )));
        }
        probabilities.extend(crate::probabilities(&logits)?);
        if let Some(m) = &plain {
            let l = tch::no_grad(|| m.forward(&x))?;
            reference.extend(crate::probabilities(&l)?);
        }
        on_batch(b[b.len() - 1] + 1, n);
    }
    let verify = plain.map(|_| Verify::new(&probabilities, &reference, k));
    Ok(Predictions {
        job,
        probabilities,
        verify,
    })
}

/// HSS-EE: the class probabilities of `inputs` from two non-colluding HSS servers (`fedee
/// hss-server` at `urls`) instead of the trainer. `state` (the plaintext model) is encrypted
/// here; its encoder linear maps are uploaded to both servers, and each batch runs with every
/// linear map on ring shares at the servers and the rest here (`fedee_hss::client`). Also
/// returns what crossed the wire.
///
/// # Errors
/// A model that is not a BERT classifier, a server unreachable or refusing, and as
/// [`predict`].
///
/// # Security
/// Each server sees uniformly random shares (and the EE model's linear maps), never token ids
/// or activations; two colluding servers see every activation.
#[allow(clippy::too_many_arguments)]
pub async fn predict_hss(
    urls: [&str; 2],
    tls: Option<&fedee_proto::pki::TlsFiles>,
    keyed: &Keyed,
    state: &StateDict,
    inputs: &Inputs,
    batch_size: usize,
    verify: bool,
    mut on_batch: impl FnMut(usize, usize) + Send + 'static,
) -> Result<(Predictions, fedee_hss::client::Traffic)> {
    let fedee_model::Architecture::BertClassifier(cfg) = keyed.arch.clone() else {
        return Err(KeyHolderError::Mismatch(
            "HSS-EE runs BERT classifiers: this spec's model is another architecture".into(),
        ));
    };
    let ee = transform_state(&keyed.key_spec, &keyed.keys, state)?;
    let off = fedee_hss::client::offloaded_state(&cfg, &ee);
    let maps = fedee_hss::server::quantize_state(&off)?;
    let expected = fedee_hss::client::weight_frac_bits(&maps);
    let remote = fedee_hss::service::Remote::connect(urls, tls, &off, &expected).await?;
    let n = inputs.len();
    let k = keyed.arch.num_classes();
    let batches: Vec<Vec<usize>> = (0..n)
        .collect::<Vec<_>>()
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    let mut encrypted = Vec::with_capacity(batches.len());
    let mut plain_inputs = Vec::new();
    for b in &batches {
        let x = inputs.batch(b, Kind::Float);
        encrypted.push(keyed.encrypt(&x)?);
        if verify {
            plain_inputs.push(x);
        }
    }
    let reference = if verify {
        let m = Model::from_state(keyed.arch.clone(), state, Device::Cpu, Kind::Float)?;
        let mut r = Vec::new();
        for x in &plain_inputs {
            r.extend(crate::probabilities(&tch::no_grad(|| m.forward(x))?)?);
        }
        Some(r)
    } else {
        None
    };
    let spec = keyed.key_spec.clone();
    let keys = keyed.keys.clone();
    let (logits, traffic) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut client = fedee_hss::client::HssClient::with_maps(remote, maps);
        let ee_checked = cfg.check_state(&ee)?;
        let mut out = Vec::new();
        for (b, x) in batches.iter().zip(&encrypted) {
            let fedee_model::Input::Tokens { ids, mask } = x else {
                return Err(KeyHolderError::Mismatch("HSS-EE takes token ids".into()));
            };
            let z = tch::no_grad(|| {
                fedee_hss::client::classify(&mut client, &cfg, ee_checked, ids, mask)
            })?;
            out.push(fedee_encrypt::decrypt_outputs(&spec, &keys, &z)?);
            on_batch(b[b.len() - 1] + 1, n);
        }
        Ok((out, client.traffic))
    })
    .await
    .map_err(|e| KeyHolderError::Mismatch(format!("the HSS worker failed: {e}")))??;
    let mut probabilities = Vec::with_capacity(n * k);
    for l in &logits {
        probabilities.extend(crate::probabilities(l)?);
    }
    let verify = reference.map(|reference| Verify::new(&probabilities, &reference, k));
    Ok((
        Predictions {
            job: "hss".into(),
            probabilities,
            verify,
        },
        traffic,
    ))
}

impl Rows {
    /// Rows without a prediction (their notes say why).
    pub fn skipped(&self) -> usize {
        self.records.iter().filter(|r| r.input.is_err()).count()
    }

    /// Accuracy of `p` over the rows whose label column holds one of the classes, if any.
    pub fn accuracy(&self, p: &Predictions, k: usize) -> Option<f64> {
        let top = p.classes(k);
        let labelled: Vec<(usize, i64)> = self
            .records
            .iter()
            .filter_map(|r| Some((*r.input.as_ref().ok()?, r.label?)))
            .collect();
        (!labelled.is_empty()).then(|| {
            labelled
                .iter()
                .filter(|(i, y)| top[*i] as i64 == *y)
                .count() as f64
                / labelled.len() as f64
        })
    }
}

/// Write one CSV row per record: `record` (line or row in the input file), the `--id-column`
/// value if any, `predicted` (class name), `p_CLASS` per class, `label` when the file had the
/// label column, and `note` (why a row has no prediction).
///
/// # Errors
/// [`KeyHolderError::Csv`] / [`KeyHolderError::Io`]; the file is written atomically.
pub fn write_csv(
    path: &std::path::Path,
    keyed: &Keyed,
    rows: &Rows,
    id_column: Option<&str>,
    p: &Predictions,
) -> Result<()> {
    let classes: Vec<&str> = keyed
        .spec
        .spec
        .task
        .classes
        .iter()
        .map(|c| c.name())
        .collect();
    let k = classes.len();
    let has_labels = rows.records.iter().any(|r| r.label.is_some());
    let mut w = csv::Writer::from_writer(Vec::new());
    let csv_err = |source| KeyHolderError::Csv {
        path: path.to_owned(),
        source,
    };
    let mut header = vec!["record".to_owned()];
    header.extend(id_column.map(str::to_owned));
    header.push("predicted".into());
    header.extend(classes.iter().map(|c| format!("p_{c}")));
    if has_labels {
        header.push("label".into());
    }
    header.push("note".into());
    w.write_record(&header).map_err(csv_err)?;
    for r in &rows.records {
        let mut line = vec![r.at.to_string()];
        if id_column.is_some() {
            line.push(r.id.clone().unwrap_or_default());
        }
        match &r.input {
            Ok(i) => {
                let probs = &p.probabilities[i * k..(i + 1) * k];
                line.push(classes[argmax(probs, k)[0]].to_owned());
                line.extend(probs.iter().map(|v| format!("{v:.6}")));
            }
            Err(_) => {
                line.push(String::new());
                line.extend(std::iter::repeat_n(String::new(), k));
            }
        }
        if has_labels {
            line.push(
                r.label
                    .map(|c| classes[c as usize].to_owned())
                    .unwrap_or_default(),
            );
        }
        line.push(r.input.as_ref().err().cloned().unwrap_or_default());
        w.write_record(&line).map_err(csv_err)?;
    }
    let bytes = w.into_inner().map_err(|e| KeyHolderError::Io {
        path: path.to_owned(),
        source: e.into_error(),
    })?;
    crate::write_atomically(path, |f| std::io::Write::write_all(f, &bytes))
}
