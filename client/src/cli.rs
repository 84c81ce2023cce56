//! The key holder's command line: `fedee finetune` and `fedee predict`. Glue over
//! [`crate::finetune`] and [`crate::predict`]: argument checks, a progress bar on stderr,
//! atomic output files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedee_model::OptimizerSpec;
use fedee_proto::cli::TransportArgs;
use fedee_site_agent::table::RowFilter;
use fedee_trainer::TrainerClient;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tch::Kind;

use crate::finetune::{LocalData, Options, Progress};
use crate::predict::{Job, Rows};
use crate::{Keyed, write_atomically};

/// The trainer and the files every key-holder command needs.
#[derive(clap::Args)]
pub struct Common {
    /// Trainer address (host:port; the scheme follows --tls-dir / --insecure).
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub trainer: String,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// The federation spec (how to read the data file, and the model).
    #[arg(long)]
    pub spec: PathBuf,
    /// The secret key file for the spec's model (`fedee ee keygen --spec SPEC --out KEYS`).
    /// It never leaves this machine.
    #[arg(long)]
    pub keys: PathBuf,
    /// The data file: CSV, TSV, Parquet or JSONL with the spec's columns.
    #[arg(long)]
    pub data: PathBuf,
    /// Keep only the rows whose COLUMN is VALUE, e.g. --where dataset=VA.
    #[arg(long = "where", value_name = "COLUMN=VALUE")]
    pub filter: Option<String>,
}

impl Common {
    fn filter(&self) -> Result<Option<RowFilter>> {
        Ok(self.filter.as_deref().map(str::parse).transpose()?)
    }

    async fn connect(&self) -> Result<TrainerClient> {
        let tls = self.transport.resolve("pharma")?;
        let url = format!("{}://{}", self.transport.scheme(), self.trainer);
        Ok(TrainerClient::connect(&url, tls.as_ref()).await?)
    }
}

/// Fine-tune a model at the trainer under EE on your own data file.
///
/// Reads --data as the spec says and splits it (the spec's validation and test fractions and
/// seed), encrypts --model with --keys and uploads it as a job, streams the encrypted training
/// split for --epochs, reports test metrics (from encrypted predictions) before and after,
/// then downloads the fine-tuned EE model, decrypts it and writes it to --out with the
/// figures its inputs were standardised with (for `fedee predict`). The job stays at the
/// trainer (its id is printed) until the trainer restarts. Nothing is written if the trainer
/// stops part way.
#[derive(clap::Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub common: Common,
    /// The plaintext model to start from (safetensors), e.g. the global model from `fedee
    /// download-model`.
    #[arg(long)]
    pub model: PathBuf,
    /// Where the fine-tuned plaintext model goes (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// Passes over the training split (0: only evaluate, and record the preprocessing).
    #[arg(long, default_value_t = 5)]
    pub epochs: u32,
    /// Examples per batch [default: the spec's training batch size].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    /// Optimizer: adamw (exact under permutation-type keys, the keygen default) or sgd (exact
    /// under orthogonal input keys too).
    #[arg(long, default_value = "adamw", value_parser = ["adamw", "sgd"])]
    pub optimizer: String,
    /// Weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// The dtype the trainer computes in: f32, or f64 for decrypted weights equal to
    /// plaintext training to ~1e-12.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f64"])]
    pub dtype: String,
    /// Seed of the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also fine-tune the plaintext model here on the same batches and print the largest
    /// weight difference from the decrypted EE model (doubles the work; a check of EE).
    #[arg(long)]
    pub verify: bool,
    /// Write the run's figures as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Class probabilities for the records of a data file, from an EE model at the trainer.
///
/// Reads --data as the spec says (tabular rows standardised with the figures --model was
/// fine-tuned with; no label column needed), encrypts the records, asks the trainer, decrypts
/// the answers and writes one CSV row per record to --out: `record` (its line or row),
/// the --id-column value, `predicted`, `p_CLASS` per class, `label` when the file has the
/// label column, and `note` for a row that could not be predicted (a missing feature under
/// the drop-row policy, an empty text). Without --job, --model is encrypted and uploaded as
/// a new job first.
#[derive(clap::Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub common: Common,
    /// The plaintext model (from `fedee finetune`): its preprocessing figures, and the model
    /// uploaded when --job is not given.
    #[arg(long)]
    pub model: PathBuf,
    /// Use this job at the trainer (printed by `fedee finetune`) instead of uploading --model.
    #[arg(long, conflicts_with = "hss")]
    pub job: Option<String>,
    /// HSS-EE instead of the trainer: two non-colluding `fedee hss-server`s, `HOST:PORT,HOST:PORT`.
    /// --model is encrypted here, its encoder linear maps go to both servers, and every batch
    /// runs on ring shares there (each server sees only uniformly random words) with attention,
    /// LayerNorm and GELU here. BERT classifiers; about 60 MB and 24 round trips per
    /// 128-token MiniLM input.
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    pub hss: Option<Vec<String>>,
    /// A column copied into the output to identify each record (e.g. a patient id).
    #[arg(long)]
    pub id_column: Option<String>,
    /// Where the predictions go (CSV).
    #[arg(long, default_value = "predictions.csv")]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// Records per Predict call.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Also run --model here on the plaintext records and print the largest probability
    /// difference (a check of EE).
    #[arg(long)]
    pub verify: bool,
}

fn refuse_overwrite(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!(
            "{} exists: pass --force to replace it, or choose another --out",
            out.display()
        );
    }
    Ok(())
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

fn metrics_line(m: &fedee_site_agent::metrics::Metrics) -> String {
    let auroc = m
        .auroc
        .map(|a| format!(", AUROC {a:.3}"))
        .unwrap_or_default();
    format!(
        "accuracy {:.3}, balanced accuracy {:.3}, macro-F1 {:.3}{auroc}",
        m.accuracy, m.balanced_accuracy, m.macro_f1
    )
}

/// `fedee finetune`.
///
/// # Errors
/// Any [`crate::KeyHolderError`], with context.
pub async fn finetune(args: FinetuneArgs) -> Result<()> {
    refuse_overwrite(&args.out, args.force)?;
    let c = &args.common;
    let keyed = Keyed::open(&c.spec, &c.keys)?;
    let (global, meta) = keyed.read_model(&args.model)?;
    let pooled = keyed.pooled_preprocessing(&args.model, &meta)?;
    if keyed.spec.spec.statistics_sigma().is_some() {
        eprintln!(
            "{}",
            if pooled.is_some() {
                "standardising with the federation's pooled figures (from the global model file)"
            } else {
                "warning: the spec standardises with federated statistics, but the model file carries no pooled figures (download it with `fedee download-model`): standardising with your own training split's figures, which the sites did not use"
            }
        );
    }
    let data = LocalData::load(&keyed, &c.data, c.filter()?.as_ref(), pooled.as_ref())?;
    eprintln!("{}", data.report);
    let optimizer = match args.optimizer.as_str() {
        "sgd" => OptimizerSpec::Sgd {
            lr: args.learning_rate,
            momentum: 0.0,
            weight_decay: args.weight_decay,
        },
        _ => OptimizerSpec::AdamW {
            lr: args.learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: args.weight_decay,
        },
    };
    let opts = Options {
        epochs: args.epochs,
        batch_size: args
            .batch_size
            .unwrap_or(keyed.spec.spec.training.batch_size as usize),
        optimizer,
        kind: if args.dtype == "f64" {
            Kind::Double
        } else {
            Kind::Float
        },
        seed: args.seed,
        verify: args.verify,
    };
    let mut tc = c.connect().await?;
    eprintln!(
        "uploading the EE model of {} to the trainer at {}",
        args.model.display(),
        c.trainer
    );
    let pb = bar(0, "epoch {prefix} [{bar:30}] {pos}/{len} steps, loss {msg}");
    let (tuned, report) =
        crate::finetune::finetune(&mut tc, &keyed, &global, &data, &opts, |p| match p {
            Progress::Epoch { epoch, steps } => {
                pb.set_prefix(format!("{epoch}/{}", opts.epochs));
                pb.set_length(steps);
                pb.set_position(0);
            }
            Progress::Step { loss, .. } => {
                pb.inc(1);
                pb.set_message(format!("{loss:.4}"));
            }
            Progress::EpochDone { epoch, loss } => {
                pb.suspend(|| {
                    eprintln!(
                        "epoch {epoch}/{}: mean encrypted loss {loss:.4}",
                        opts.epochs
                    );
                });
            }
        })
        .await?;
    pb.finish_and_clear();
    let bytes = crate::finetune::model_file(&keyed, &tuned, data.preprocessing.as_ref())?;
    write_atomically(&args.out, |f| std::io::Write::write_all(f, &bytes))?;
    eprintln!(
        "test split ({} records), encrypted predictions: before {}; after {}",
        data.test.y.len(),
        metrics_line(&report.test_before),
        metrics_line(&report.test_after)
    );
    if let Some(v) = &report.validation_after {
        eprintln!("validation split after: {}", metrics_line(v));
    }
    if let Some(d) = report.max_abs_weight_diff {
        eprintln!("verify: decrypted EE model vs plaintext fine-tuning here: max |Δw| = {d:.3e}");
    }
    eprintln!(
        "wrote {} ({} steps); the trainer keeps the EE model as job {} (use `fedee predict --job {}`)",
        args.out.display(),
        report.steps,
        report.job,
        report.job
    );
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report)?;
        write_atomically(path, |f| std::io::Write::write_all(f, &json))?;
    }
    Ok(())
}

async fn predict_hss(
    args: &PredictArgs,
    keyed: &Keyed,
    state: &fedee_model::StateDict,
    rows: &Rows,
    hss: &[String],
) -> Result<()> {
    let c = &args.common;
    if hss.len() != 2 {
        bail!(
            "--hss takes two servers, HOST:PORT,HOST:PORT; got {}",
            hss.len()
        );
    }
    let tls = c.transport.resolve("pharma")?;
    let urls: Vec<String> = hss
        .iter()
        .map(|a| format!("{}://{a}", c.transport.scheme()))
        .collect();
    let pb = bar(
        rows.inputs.len() as u64,
        "predict (HSS-EE) [{bar:30}] {pos}/{len} records",
    );
    let pb2 = pb.clone();
    let (p, traffic) = crate::predict::predict_hss(
        [&urls[0], &urls[1]],
        tls.as_ref(),
        keyed,
        state,
        &rows.inputs,
        args.batch_size,
        args.verify,
        move |done, _| pb2.set_position(done as u64),
    )
    .await?;
    pb.finish_and_clear();
    crate::predict::write_csv(&args.out, keyed, rows, args.id_column.as_deref(), &p)?;
    eprintln!(
        "wrote {}: {} records predicted through HSS-EE ({} round trips, {:.1} MB up, {:.1} MB down)",
        args.out.display(),
        rows.inputs.len(),
        traffic.round_trips,
        traffic.bytes_up as f64 / 1e6,
        traffic.bytes_down as f64 / 1e6
    );
    if let Some(a) = rows.accuracy(&p, keyed.arch.num_classes()) {
        eprintln!("accuracy against the file's label column: {a:.3}");
    }
    if let Some(v) = p.verify {
        eprintln!(
            "verify: HSS-EE vs plaintext here: max |Δp| = {:.3e}, argmax agreement {:.3}",
            v.max_abs_probability_diff, v.argmax_agreement
        );
    }
    Ok(())
}

/// `fedee predict`.
///
/// # Errors
/// Any [`crate::KeyHolderError`], with context.
pub async fn predict(args: PredictArgs) -> Result<()> {
    refuse_overwrite(&args.out, args.force)?;
    let c = &args.common;
    let keyed = Keyed::open(&c.spec, &c.keys)?;
    let (state, meta) = keyed.read_model(&args.model)?;
    let prep = keyed.preprocessing(&args.model, &meta)?;
    let rows = Rows::load(
        &keyed,
        prep.as_ref(),
        &c.data,
        c.filter()?.as_ref(),
        args.id_column.as_deref(),
    )?;
    if let Some(hss) = &args.hss {
        return predict_hss(&args, &keyed, &state, &rows, hss).await;
    }
    let mut tc = c.connect().await?;
    let job = match &args.job {
        Some(id) => Job::Existing(id.clone()),
        None => Job::Upload(
            state
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
        ),
    };
    let pb = bar(
        rows.inputs.len() as u64,
        "predict [{bar:30}] {pos}/{len} records",
    );
    let p = crate::predict::predict(
        &mut tc,
        &keyed,
        job,
        &rows.inputs,
        args.batch_size,
        args.verify.then_some(&state),
        |done, _| pb.set_position(done as u64),
    )
    .await?;
    pb.finish_and_clear();
    crate::predict::write_csv(&args.out, &keyed, &rows, args.id_column.as_deref(), &p)?;
    eprintln!(
        "wrote {}: {} records predicted, {} without a prediction (see `note`), job {}",
        args.out.display(),
        rows.inputs.len(),
        rows.skipped(),
        p.job
    );
    if let Some(a) = rows.accuracy(&p, keyed.arch.num_classes()) {
        eprintln!("accuracy against the file's label column: {a:.3}");
    }
    if let Some(v) = p.verify {
        eprintln!(
            "verify: encrypted vs plaintext here: max |Δp| = {:.3e}, argmax agreement {:.3}",
            v.max_abs_probability_diff, v.argmax_agreement
        );
    }
    Ok(())
}

/// `fedee download-model`: global model `model` (a number, `final` for the last closed
/// round's, or `selected` for the one chosen on the sites' validation splits) written to
/// `out`; under federated standardisation with the pooled figures in its metadata
/// ([`crate::with_pooled_statistics`]). One Status call answers both.
///
/// # Errors
/// An unknown `model`, no model selected or closed yet, or the aggregator's errors.
pub async fn download_model(
    mut link: fedee_site_agent::client::Link,
    model: &str,
    out: &Path,
) -> Result<()> {
    let st = link.status().await?;
    let model: u32 = match model {
        "selected" if st.selected_model == 0 => bail!(
            "no model is selected yet: no site has reported validation metrics for a closed round (the spec's validation_fraction may be 0); pass a model number or `final`"
        ),
        "selected" => st.selected_model,
        "final" => st
            .rounds
            .iter()
            .filter(|r| r.state == "closed")
            .map(|r| r.round + 1)
            .max()
            .context("no round has closed yet: only model 1 (the initial model) exists")?,
        n => n.parse().with_context(|| {
            format!("--model `{n}`: write a model number, `final` or `selected`")
        })?,
    };
    let mut bytes = link.download_model(model).await?;
    if !st.pooled_statistics.is_empty() {
        // The figures every site standardised with, for the key holder's records.
        bytes = crate::with_pooled_statistics(&bytes, &st.pooled_statistics)?;
        eprintln!(
            "the file carries the federation's pooled standardisation figures ({} features)",
            st.pooled_statistics.len()
        );
    }
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "wrote global model {model} ({} bytes) to {}",
        bytes.len(),
        out.display()
    );
    Ok(())
}

/// The trainer, model and keys of the causal LM commands.
#[derive(clap::Args)]
pub struct LmCommon {
    /// Trainer address (host:port; the scheme follows --tls-dir / --insecure).
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub trainer: String,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// The model (GGUF), e.g. data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.
    #[arg(long)]
    pub gguf: PathBuf,
    /// The key file for this model (`fedee ee keygen --gguf MODEL --out KEYS`). It never
    /// leaves this machine.
    #[arg(long)]
    pub keys: PathBuf,
    /// Use this job at the trainer (printed by an earlier run) instead of encrypting and
    /// uploading the model.
    #[arg(long)]
    pub job: Option<String>,
}

impl LmCommon {
    /// Connect to the trainer and return it with the job: --job, or a new one holding the EE
    /// model of `state` (training with `optimizer` in `dtype`).
    async fn job(
        &self,
        state: &fedee_encrypt::StateDict,
        lm: &crate::lm::LmKeys,
        optimizer: Option<&OptimizerSpec>,
        dtype: &str,
    ) -> Result<(TrainerClient, String)> {
        let tls = self.transport.resolve("pharma")?;
        let url = format!("{}://{}", self.transport.scheme(), self.trainer);
        let mut trainer = TrainerClient::connect(&url, tls.as_ref()).await?;
        let job = match &self.job {
            Some(j) => j.clone(),
            None => {
                let t = std::time::Instant::now();
                let job = crate::lm::upload(&mut trainer, state, lm, optimizer, dtype).await?;
                eprintln!(
                    "encrypted and uploaded the model in {:.1} s: job {job} (pass --job {job} to reuse it)",
                    t.elapsed().as_secs_f64()
                );
                job
            }
        };
        Ok((trainer, job))
    }
}

/// A local OpenAI-compatible endpoint for an EE causal LM at a trainer, or at two
/// non-colluding HSS servers with --hss (key holder side).
///
/// Loads the GGUF model (tokenizer, chat template, and the weights to encrypt) and the key
/// file; without --job, encrypts the model and uploads it to the trainer as a new job (its id
/// is printed: pass it with --job next time). Then serves `GET /v1/models` and `POST
/// /v1/chat/completions` (streaming or not) on --listen. Point any OpenAI client there:
///
///   OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=unused python my_app.py
///
/// Prompts are tokenized and encrypted here; the trainer sees only encrypted token ids.
#[derive(clap::Args)]
pub struct ChatProxyArgs {
    #[command(flatten)]
    pub lm: LmCommon,
    /// Address to serve the OpenAI API on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Serve on a non-loopback --listen address. The proxy answers in plaintext without
    /// authentication: only do this inside a trusted network.
    #[arg(long)]
    pub allow_remote: bool,
    /// The model id clients send [default: the GGUF file's stem].
    #[arg(long)]
    pub model_name: Option<String>,
    /// HSS-EE instead of the trainer: two non-colluding `fedee hss-server`s,
    /// `HOST:PORT,HOST:PORT`. The model is encrypted here and its linear maps go to both
    /// servers; each token's linear algebra runs there on ring shares (each server sees only
    /// uniformly random words, not even encrypted ids) and the rest of the model, sampling
    /// included, runs here. About 121 round trips per generated token with SmolLM2; one
    /// generation at a time.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "A,B",
        conflicts_with = "job"
    )]
    pub hss: Option<Vec<String>>,
}

/// `fedee chat-proxy`: serve until Ctrl-C.
///
/// # Errors
/// Unreadable files, keys that do not fit, an unreachable trainer, a busy port.
pub async fn chat_proxy(args: ChatProxyArgs) -> Result<()> {
    use crate::chat_proxy::{Backend, HssLm, Proxy, is_loopback, serve};
    if !is_loopback(&args.listen) && !args.allow_remote {
        bail!(
            "--listen {} is not a loopback address: the proxy serves decrypted answers without authentication; pass --allow-remote to serve it anyway",
            args.listen
        );
    }
    let started = std::time::Instant::now();
    let (m, lm) = crate::lm::open(&args.lm.gguf, &args.lm.keys)?;
    eprintln!(
        "loaded {} ({} layers, vocabulary {}) in {:.1} s",
        args.lm.gguf.display(),
        m.config.num_layers,
        m.config.vocab_size,
        started.elapsed().as_secs_f64()
    );
    let backend = match &args.hss {
        None => {
            let (client, job) = args.lm.job(&m.state, &lm, None, "f32").await?;
            Backend::Trainer { client, job }
        }
        Some(hss) => {
            let [a, b] = &hss[..] else {
                bail!(
                    "--hss takes two servers, HOST:PORT,HOST:PORT; got {}",
                    hss.len()
                );
            };
            let tls = args.lm.transport.resolve("pharma")?;
            let scheme = args.lm.transport.scheme();
            let (a, b) = (format!("{scheme}://{a}"), format!("{scheme}://{b}"));
            let t = std::time::Instant::now();
            let hss = HssLm::connect([&a, &b], tls.as_ref(), &lm, &m.config, &m.state).await?;
            eprintln!(
                "encrypted the model and uploaded its linear maps to {a} and {b} in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            Backend::Hss(std::sync::Arc::new(std::sync::Mutex::new(hss)))
        }
    };
    drop(m);
    let model = args.model_name.unwrap_or_else(|| {
        args.lm
            .gguf
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fedee-lm".into())
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "serving model `{model}` at http://{}/v1 (OpenAI API; Ctrl-C stops)",
        listener.local_addr()?
    );
    let proxy = Proxy { lm, backend, model };
    serve(listener, proxy, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// Fine-tune an EE causal LM at the trainer on your own texts (key holder side).
///
/// Reads the --text-column of --data (CSV, or TSV by extension), tokenizes each text (ended
/// with the end-of-sequence token, cut to --seq-len), encrypts the token ids with --keys and
/// streams --steps batches to the trainer, which trains the EE model with AdamW on the causal
/// LM loss (the same loss as plaintext: the vocabulary key only renames tokens). Without
/// --job the model is encrypted and uploaded first. The fine-tuned job stays at the trainer:
/// serve it with `fedee chat-proxy --job JOB`. Keys must be of the finetune profile.
#[derive(clap::Args)]
pub struct LmFinetuneArgs {
    #[command(flatten)]
    pub lm: LmCommon,
    /// The texts: a CSV or TSV file.
    #[arg(long)]
    pub data: PathBuf,
    /// The column holding the texts.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Optimizer steps (batches); the texts are cycled when they run out.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Texts per batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Longest text in tokens (longer ones are cut).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// The dtype the trainer computes in (f64 doubles memory; decrypted weights then equal
    /// plaintext training to ~1e-12).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f64"])]
    pub dtype: String,
    /// Also train the plaintext model here on the same batches, download and decrypt the EE
    /// model, and print the largest relative weight difference (a check of EE; doubles the
    /// work and holds two models).
    #[arg(long)]
    pub verify: bool,
}

/// `fedee lm-finetune`.
///
/// # Errors
/// Unreadable files, keys that do not fit or are not trainable, the trainer's refusals.
pub async fn lm_finetune(args: LmFinetuneArgs) -> Result<()> {
    let (m, lm) = crate::lm::open(&args.lm.gguf, &args.lm.keys)?;
    let optimizer = OptimizerSpec::AdamW {
        lr: args.learning_rate,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: args.weight_decay,
    };
    lm.check_trainable(&optimizer)?;
    let texts = crate::lm::read_texts(&args.data, &args.text_column)?;
    let mut batches =
        crate::lm::text_batches(&lm.tokenizer, &texts, args.batch_size, args.seq_len)?;
    if batches.is_empty() {
        bail!("{} has no text of 2 tokens or more", args.data.display());
    }
    let n = batches.len();
    batches = (0..args.steps)
        .map(|i| {
            let (ids, mask) = &batches[i % n];
            (ids.shallow_clone(), mask.shallow_clone())
        })
        .collect();
    let tokens: i64 = batches
        .iter()
        .map(|(_, m)| m.sum(Kind::Int64).int64_value(&[]))
        .sum();
    eprintln!(
        "{} texts in {n} batches of up to {}; training {} steps on {tokens} tokens",
        texts.len(),
        args.batch_size,
        batches.len()
    );
    let (mut trainer, job) = args
        .lm
        .job(&m.state, &lm, Some(&optimizer), &args.dtype)
        .await?;
    let encrypted = batches
        .iter()
        .map(|(ids, mask)| lm.encrypt_batch(ids, mask))
        .collect::<crate::Result<Vec<_>>>()?;
    let pb = bar(batches.len() as u64, "train [{bar:30}] {pos}/{len} {msg}");
    let t = std::time::Instant::now();
    let losses = trainer
        .train(&job, encrypted, |_, loss| {
            pb.inc(1);
            pb.set_message(format!("loss {loss:.4}"));
        })
        .await?;
    pb.finish_and_clear();
    eprintln!(
        "trained {} steps in {:.1} s: loss {:.4} -> {:.4}",
        losses.len(),
        t.elapsed().as_secs_f64(),
        losses.first().copied().unwrap_or(f64::NAN),
        losses.last().copied().unwrap_or(f64::NAN)
    );
    if args.verify {
        if args.lm.job.is_some() {
            bail!("--verify starts from the GGUF weights: it cannot check a continued --job");
        }
        let kind = if args.dtype == "f64" {
            Kind::Double
        } else {
            Kind::Float
        };
        let mut plain =
            fedee_model::Model::from_state(lm.architecture(), &m.state, tch::Device::Cpu, kind)?;
        let mut opt = plain.optimizer(&optimizer)?;
        for (ids, mask) in &batches {
            let input = fedee_model::Input::Tokens {
                ids: ids.shallow_clone(),
                mask: mask.shallow_clone(),
            };
            plain.train_step_causal(&mut opt, &input)?;
        }
        let ee = fedee_model::state_from_safetensors(
            &trainer.export_model(&job).await?,
            tch::Device::Cpu,
        )?;
        let worst = fedee_model::state::largest_relative_difference(
            &lm.decrypt_model(&ee)?,
            &plain.state(),
        );
        eprintln!(
            "verify: largest weight difference from plaintext training, relative to the tensor's largest weight: {:.2e} ({})",
            worst.0, worst.1
        );
    }
    println!("{job}");
    eprintln!(
        "the fine-tuned EE model is job {job} at the trainer: serve it with `fedee chat-proxy --gguf {} --keys {} --job {job}`",
        args.lm.gguf.display(),
        args.lm.keys.display()
    );
    Ok(())
}
