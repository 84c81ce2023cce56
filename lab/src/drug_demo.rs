//! `fedee demo --task drug-reviews`: the text twin of the main job, on the same platform path
//! (`examples/drug-reviews/federation.toml`: all-MiniLM-L6-v2 plus a fresh 3-class head).
//!
//! 1. Three hospitals, each with its own TSV export of Drugs.com reviews (grouped by the
//!    condition treated), run FedAvg rounds of the whole classifier (about 90 MB per update,
//!    streamed) with the calls of `fedee aggregator --spec` and `fedee site --data`.
//! 2. Pharma, holding its own reviews, generates `finetune`-profile keys and fine-tunes the
//!    global model at a trainer that sees neither text nor labels, with the calls of
//!    `fedee finetune --verify` (the same fine-tuning runs in plaintext to compare).
//! 3. Encrypted inference on pharma's test reviews, with token ids and again with
//!    client-side embeddings in shuffled token order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::drugs::{self, CLASSES};
use anyhow::{Context, Result, bail};
use fedee_client::Inputs;
use fedee_client::finetune::{LocalData, Options, Progress};
use fedee_encrypt::{KeySet, transform_state};
use fedee_model::bert::{self, Profile};
use fedee_model::{Input, OptimizerSpec, batch_to_safetensors, state_from_safetensors};
use fedee_site_agent::metrics::Metrics;
use fedee_site_agent::table::DataReport;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use tch::{Device, Kind};

use crate::consortium::{Consortium, RoundReport, Site, chosen_model, read_spec, round_reports};
use crate::demo::DemoArgs;

/// The spec this demo runs unless `--spec` names another.
pub(crate) const SPEC: &str = "examples/drug-reviews/federation.toml";

/// The three hospitals of the federated part, by the conditions their reviews treat.
const SITE_GROUPS: [&str; 3] = ["mental-health", "other-conditions", "reproductive-health"];

const SECURITY_NOTE: &str = "all-MiniLM-L6-v2's weights are public: a server holding the EE model and the public base model can recover the vocabulary and residual permutations by weight matching (SECURITY.md). The claim that the trainer sees no text or labels holds only with base weights the server never saw in plaintext, key rotation, and bounded ciphertext volume per key; token ids are a substitution cipher open to frequency analysis.";

#[derive(Serialize)]
struct Report {
    spec_sha256: String,
    model: String,
    profile: Profile,
    /// Each hospital's data report and pharma's.
    data: BTreeMap<String, DataReport>,
    federation: Option<FederationReport>,
    epochs: u32,
    steps: u64,
    batch_size: usize,
    max_len: usize,
    optimizer: OptimizerSpec,
    /// Pharma's test split: the trainer's encrypted predictions, decrypted.
    ee: Metrics,
    /// Pharma's test split: the same fine-tuning in plaintext.
    plaintext: Metrics,
    /// Pharma's validation split after fine-tuning (for choosing epochs or a learning rate).
    validation: Option<Metrics>,
    majority_baseline_accuracy: f64,
    prediction_agreement: f64,
    max_abs_weight_diff: f64,
    keygen_transform_seconds: f64,
    /// Mean wall time of one encrypted training step at the trainer, gRPC included (the
    /// plaintext-vs-EE step ratio is `fedee bench ee`'s).
    encrypted_step_seconds: f64,
    bytes_uploaded: usize,
    /// Tokens of pharma's reviews encrypted under the one vocabulary key of this run: the
    /// ciphertext volume the frequency attack works on.
    tokens_under_one_key: u64,
    /// The client's default warning threshold (`fedee ee tokenize --max-tokens-per-key`).
    token_limit_per_key: u64,
    client_side_embeddings: EmbeddedInference,
    device: String,
    security_note: String,
    wall_seconds: f64,
}

#[derive(Serialize)]
struct FederationReport {
    rounds: Vec<RoundReport>,
    update_bytes: usize,
    privacy_unit: String,
    clipping_norm: f64,
    delta: f64,
    epsilon: f64,
    privacy_note: String,
    seconds: f64,
}

/// Test-set inference through the trainer with client-side embeddings (shuffled token order)
/// instead of token ids, on the same batches.
#[derive(Debug, Default, Serialize)]
struct EmbeddedInference {
    /// Max |logits(embedded, shuffled) − logits(ids)| over the test set.
    max_abs_logit_diff_vs_ids: f64,
    /// Padded tokens sent.
    tokens: u64,
    /// Batch bytes on the wire (safetensors), with ids and with embeddings.
    bytes_ids: u64,
    bytes_embedded: u64,
}

/// Condition group of a review: which hospital of the federated part holds it.
fn condition_group(condition: &str) -> &'static str {
    let c = condition.to_lowercase();
    if c.contains("contracept")
        || c.contains("birth control")
        || c.contains("uterine")
        || c.contains("menstrua")
    {
        "reproductive-health"
    } else if [
        "depress", "anxiety", "bipolar", "insomnia", "adhd", "schizo", "panic", "ptsd", "ocd",
        "smoking", "alcohol", "opiate",
    ]
    .iter()
    .any(|k| c.contains(k))
    {
        "mental-health"
    } else {
        "other-conditions"
    }
}

/// A party's export: the reviews of `source` that `keep` selects (the first `limit` of
/// them), HTML entities decoded, written to `out` as a TSV with the spec's columns
/// `review` and `rating` (and `condition`). What a hospital's own ETL would hand `fedee site`.
fn export(
    source: &Path,
    out: &Path,
    limit: Option<usize>,
    keep: impl Fn(&str) -> bool,
) -> Result<()> {
    let reviews = drugs::load(source)?;
    let mut w = csv::WriterBuilder::new()
        .delimiter(b'\t')
        .from_path(out)
        .with_context(|| format!("writing {}", out.display()))?;
    w.write_record(["review", "rating", "condition"])?;
    for r in reviews
        .iter()
        .filter(|r| keep(&r.condition))
        .take(limit.unwrap_or(usize::MAX))
    {
        w.write_record([
            r.text.as_str(),
            CLASSES[r.label as usize],
            r.condition.as_str(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

fn tokens(inputs: &Inputs) -> u64 {
    match inputs {
        Inputs::Tokens(t) => t.iter().map(|s| s.len() as u64).sum(),
        Inputs::Features { .. } => 0,
    }
}

/// Run the drug-review demo.
///
/// # Errors
/// Missing model or data files (with the command that fetches them), data that cannot
/// satisfy the spec, or any party failing.
pub async fn run(args: &DemoArgs) -> Result<()> {
    let start = Instant::now();
    let device = fedee_site_agent::cli::parse_device(&args.device)?;
    let (train_tsv, test_tsv) = (
        args.drugs_dir.join("drugsComTrain.tsv"),
        args.drugs_dir.join("drugsComTest.tsv"),
    );
    for p in [
        &args.model_dir.join("model.safetensors"),
        &train_tsv,
        &test_tsv,
    ] {
        if !p.exists() {
            bail!(
                "{} does not exist: run `make data` (or pass --model-dir / --drugs-dir)",
                p.display()
            );
        }
    }
    let mut spec = read_spec(args.spec.as_deref().unwrap_or(Path::new(SPEC)))?;
    spec.model.checkpoint = Some(args.model_dir.display().to_string());
    spec.data.max_tokens = args.max_len;
    spec.federation.rounds = args.federation_rounds.max(1);
    spec.federation.min_sites = SITE_GROUPS.len() as u32;
    let signed = fedee_spec::SignedSpec::from_spec(&spec)?;
    eprintln!("[demo] note: {SECURITY_NOTE}");

    // The parties' own files: each hospital's reviews (the test file, by condition group) and
    // pharma's (the train file).
    let consortium = Consortium::new(&SITE_GROUPS, device)?;
    let pharma_tsv = consortium.work.join("pharma.tsv");
    export(&train_tsv, &pharma_tsv, args.limit, |_| true)?;
    let policy = crate::consortium::demo_policy(&spec);
    let mut sites = Vec::new();
    for group in SITE_GROUPS {
        let file = consortium.work.join(format!("{group}.tsv"));
        export(&test_tsv, &file, args.limit.map(|n| n / 3), |c| {
            condition_group(c) == group
        })?;
        sites.push(Site {
            name: group.to_owned(),
            data: file,
            filter: None,
            seed: None,
            policy: policy.clone(),
        });
    }

    // --- 1. Federation ----------------------------------------------------------------
    let initial = fedee_site_agent::task::initial_model(&spec, args.seed as i64)?;
    let bytes_uploaded = fedee_model::state_to_safetensors(&initial)?.len();
    let mut data_reports = BTreeMap::new();
    let (global, federation, aggregator) = if args.federation_rounds > 0 {
        let t = Instant::now();
        let mut fed = consortium.federate(&signed, &initial, &sites).await?;
        data_reports.append(&mut fed.data);
        let st = &fed.status;
        let global = state_from_safetensors(
            &fed.link
                .download_model(chosen_model(st, spec.federation.rounds))
                .await?,
            Device::Cpu,
        )?;
        let report = FederationReport {
            rounds: round_reports(st),
            update_bytes: bytes_uploaded,
            privacy_unit: st.privacy_unit.clone(),
            clipping_norm: st.clipping_norm,
            delta: st.delta,
            epsilon: st.rounds.last().map_or(0.0, |r| r.epsilon),
            privacy_note: "site-level DP on a 22.7M-parameter update: any σ that keeps the model useful gives a meaningless ε; this part demonstrates carrying the model, not privacy".into(),
            seconds: t.elapsed().as_secs_f64(),
        };
        eprintln!(
            "[demo] federation of the classifier: {} rounds, {:.1} MB per update, {:.0} s",
            spec.federation.rounds,
            bytes_uploaded as f64 / 1e6,
            report.seconds
        );
        (global, Some(report), Some(fed.aggregator))
    } else {
        (initial, None, None)
    };

    // --- 2. Pharma: EE fine-tuning at the trainer (the calls of `fedee finetune`) -------
    let t0 = Instant::now();
    let key_spec = fedee_site_agent::task::bert_classifier(&spec)?.key_spec();
    let keys = KeySet::generate(
        &key_spec,
        &BTreeMap::new(),
        false,
        &mut ChaCha20Rng::from_os_rng(),
    )?;
    drop(transform_state(&key_spec, &keys, &global)?);
    let keygen_transform_seconds = t0.elapsed().as_secs_f64();
    eprintln!(
        "[demo] pharma: keygen + transform of MiniLM ({} keys, finetune profile): {keygen_transform_seconds:.2} s",
        keys.keys.len()
    );
    let keyed = fedee_client::Keyed::new(signed.clone(), keys)?;
    let data = LocalData::load(&keyed, &pharma_tsv, None, None)?;
    data_reports.insert("pharma".into(), data.report.clone());
    let majority = (0..CLASSES.len() as i64)
        .max_by_key(|c| data.train.y.iter().filter(|y| *y == c).count())
        .unwrap_or(0);
    let majority_baseline_accuracy = data.test.y.iter().filter(|y| **y == majority).count() as f64
        / data.test.y.len().max(1) as f64;
    let tokens_under_one_key =
        tokens(&data.train.inputs) + tokens(&data.validation.inputs) + tokens(&data.test.inputs);
    let token_limit_per_key = fedee_encrypt::volume::DEFAULT_TOKEN_LIMIT;
    if let Some(w) =
        fedee_encrypt::volume::VolumeMeter::warning(tokens_under_one_key, token_limit_per_key)
    {
        eprintln!("[demo] {w}");
    }
    let (mut tc, trainer) = consortium.trainer().await?;
    let optimizer = OptimizerSpec::AdamW {
        lr: args.text_lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let opts = Options {
        epochs: args.text_epochs,
        batch_size: args.text_batch,
        optimizer,
        kind: Kind::Float,
        seed: args.seed,
        verify: true,
    };
    let (mut epoch_start, mut encrypted_seconds) = (Instant::now(), 0.0);
    let (tuned, ft) =
        fedee_client::finetune::finetune(&mut tc, &keyed, &global, &data, &opts, |p| match p {
            Progress::Epoch { .. } => epoch_start = Instant::now(),
            Progress::Step { step, loss } if step % 10 == 0 => {
                eprintln!("[demo]   encrypted step {step}: loss {loss:.4}");
            }
            Progress::EpochDone { epoch, loss } => {
                encrypted_seconds += epoch_start.elapsed().as_secs_f64();
                eprintln!(
                    "[demo] encrypted fine-tune epoch {epoch}/{}: mean loss {loss:.4}",
                    args.text_epochs
                );
            }
            Progress::Step { .. } => {}
        })
        .await?;
    let (Some(max_abs_weight_diff), Some(plaintext), Some(prediction_agreement)) = (
        ft.max_abs_weight_diff,
        ft.plaintext_test_after,
        ft.test_argmax_agreement,
    ) else {
        bail!("fine-tuning ran without its plaintext check");
    };

    // --- 3. Encrypted inference with ids, then with client-side embeddings ---------------
    let tuned_ee = state_from_safetensors(&tc.export_model(&ft.job).await?, Device::Cpu)?;
    let cfg = fedee_site_agent::task::bert_classifier(&spec)?;
    let embedded =
        embedded_inference(&mut tc, &keyed, &ft.job, &cfg, &tuned_ee, &data.test.inputs).await?;
    drop(tuned);

    consortium.shutdown.cancel();
    if let Some(a) = aggregator {
        a.await.context("aggregator task panicked")??;
    }
    trainer.await.context("trainer task panicked")??;
    let ee = ft.test_after;
    eprintln!(
        "[demo] pharma's test split: EE accuracy {:.3} macro-F1 {:.3}; plaintext accuracy {:.3} macro-F1 {:.3}; majority baseline {majority_baseline_accuracy:.3}; prediction agreement {prediction_agreement:.3}; max |Δw| {max_abs_weight_diff:.2e}",
        ee.accuracy, ee.macro_f1, plaintext.accuracy, plaintext.macro_f1
    );
    eprintln!(
        "[demo] inference with client-side embeddings, shuffled token order (the trainer gets no token ids): max |Δ logits| vs ids {:.1e}; {:.0} bytes per token on the wire vs {:.0} with ids",
        embedded.max_abs_logit_diff_vs_ids,
        embedded.bytes_embedded as f64 / embedded.tokens.max(1) as f64,
        embedded.bytes_ids as f64 / embedded.tokens.max(1) as f64
    );
    let report = Report {
        spec_sha256: signed.sha256.clone(),
        model: "all-MiniLM-L6-v2 + mean pooling + linear head".into(),
        profile: Profile::Finetune,
        data: data_reports,
        federation,
        epochs: args.text_epochs,
        steps: ft.steps,
        batch_size: args.text_batch,
        max_len: args.max_len,
        optimizer,
        ee,
        plaintext,
        validation: ft.validation_after,
        majority_baseline_accuracy,
        prediction_agreement,
        max_abs_weight_diff,
        keygen_transform_seconds,
        encrypted_step_seconds: encrypted_seconds / ft.steps.max(1) as f64,
        bytes_uploaded,
        tokens_under_one_key,
        token_limit_per_key,
        client_side_embeddings: embedded,
        device: format!("{device:?}"),
        security_note: SECURITY_NOTE.into(),
        wall_seconds: start.elapsed().as_secs_f64(),
    };
    let path: PathBuf = args
        .report
        .clone()
        .unwrap_or_else(|| "drug-reviews-report.json".into());
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "[demo] report written to {} ({:.1} s)",
        path.display(),
        report.wall_seconds
    );
    Ok(())
}

/// Predict `inputs` at the trainer twice per batch: with encrypted token ids, and with the
/// key holder's client-side embeddings of them in shuffled token order (the defence against
/// frequency analysis, SECURITY.md). `tuned_ee` is the job's fine-tuned EE model, whose
/// embedding tables the client embeds with.
async fn embedded_inference(
    tc: &mut fedee_trainer::TrainerClient,
    keyed: &fedee_client::Keyed,
    job: &str,
    cfg: &fedee_model::BertClassifierConfig,
    tuned_ee: &fedee_model::StateDict,
    inputs: &Inputs,
) -> Result<EmbeddedInference> {
    let tuned = cfg.check_state(tuned_ee)?;
    let mut out = EmbeddedInference::default();
    let mut rng = ChaCha20Rng::from_os_rng();
    let idx: Vec<usize> = (0..inputs.len()).collect();
    for b in idx.chunks(32) {
        let enc = keyed.encrypt(&inputs.batch(b, Kind::Float))?;
        let Input::Tokens { ids, mask } = &enc else {
            bail!("a text task gives token batches");
        };
        let batch = batch_to_safetensors(&enc, None)?;
        out.bytes_ids += batch.len() as u64;
        out.tokens += ids.numel() as u64;
        let logits = fedee_client::predict::decrypt_logits(keyed, &tc.predict(job, batch).await?)?;
        let (x, m) =
            tch::no_grad(|| bert::embed_and_shuffle(&cfg.bert, tuned, ids, mask, &mut rng));
        let batch = batch_to_safetensors(&Input::Embedded { x, mask: m }, None)?;
        out.bytes_embedded += batch.len() as u64;
        let shuffled =
            fedee_client::predict::decrypt_logits(keyed, &tc.predict(job, batch).await?)?;
        out.max_abs_logit_diff_vs_ids = out
            .max_abs_logit_diff_vs_ids
            .max((&shuffled - &logits).abs().max().double_value(&[]));
    }
    Ok(out)
}
