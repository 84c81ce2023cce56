//! The site agent's federation loop: join, then per round download the global model,
//! evaluate it, train locally, and submit the DP update.

use std::time::Duration;

use fedee_dp::{ClippingNorm, NoiseMultiplier};
use fedee_model::{Mlp, MlpConfig, OptimizerSpec, state_from_safetensors, state_to_safetensors};
use fedee_proto::v1::federation_client::FederationClient;
use fedee_proto::v1::{
    DownloadModelRequest, JoinRequest, MetricsReport, NextTaskRequest, SubmitUpdateMessage,
    TaskKind, UpdateHeader, submit_update_message,
};
use fedee_proto::{MAX_BLOB_SIZE, Reassembler, chunks};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use tch::{Device, Kind};
use tonic::transport::Channel;

use crate::SiteError;
use crate::heart::{NUM_FEATURES, Partition};
use crate::train::{LocalTraining, dp_update, to_tensors, train_local};

/// Site agent settings.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    /// Aggregator URL, e.g. `http://127.0.0.1:50051`.
    pub aggregator: String,
    /// Site name (the hospital).
    pub site: String,
    /// The site's standardised data.
    pub data: Partition,
    /// Model architecture (must match the global model's tensors).
    pub model: MlpConfig,
    /// `cpu` or `cuda`.
    pub device: Device,
    /// Seed for batch shuffling and DP noise; `None` = OS entropy (use in production).
    pub seed: Option<u64>,
    /// How long to wait before asking again when told to wait.
    pub poll_interval: Duration,
}

/// A site's evaluation of one global model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Evaluation {
    /// Global model number (model 1 = initial; model r + 1 = result of round r).
    pub model: u32,
    /// Accuracy on the site's test split.
    pub test_accuracy: f64,
}

/// What a site did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SiteReport {
    /// Site name.
    pub site: String,
    /// Evaluations of every global model it saw.
    pub evaluations: Vec<Evaluation>,
    /// Rounds it submitted updates for.
    pub rounds_trained: Vec<u32>,
}

fn rpc(call: &'static str) -> impl Fn(tonic::Status) -> SiteError {
    move |status| SiteError::Rpc { call, status }
}

async fn download(
    client: &mut FederationClient<Channel>,
    model: u32,
) -> Result<Vec<u8>, SiteError> {
    let mut stream = client
        .download_model(DownloadModelRequest { model })
        .await
        .map_err(rpc("DownloadModel"))?
        .into_inner();
    let mut r = Reassembler::new(MAX_BLOB_SIZE);
    while let Some(c) = stream.message().await.map_err(rpc("DownloadModel"))? {
        r.push(c)?;
    }
    Ok(r.finish()?)
}

/// Run the site until the federation is done.
///
/// # Errors
/// Connection failures, refusals by the aggregator, or model errors; each names the cause.
pub async fn run(cfg: SiteConfig) -> Result<SiteReport, SiteError> {
    let mut client = FederationClient::connect(cfg.aggregator.clone())
        .await
        .map_err(|source| SiteError::Connect {
            url: cfg.aggregator.clone(),
            source,
        })?;
    client
        .join(JoinRequest {
            site: cfg.site.clone(),
        })
        .await
        .map_err(rpc("Join"))?;
    tracing::info!(site = %cfg.site, train = cfg.data.train.len(), test = cfg.data.test.len(), "joined");
    let mut rng = match cfg.seed {
        Some(s) => ChaCha20Rng::seed_from_u64(s),
        None => ChaCha20Rng::from_os_rng(),
    };
    let mut report = SiteReport {
        site: cfg.site.clone(),
        evaluations: vec![],
        rounds_trained: vec![],
    };
    let (xtr, ytr) = to_tensors(&cfg.data.train, NUM_FEATURES, cfg.device, Kind::Float);
    let (xte, yte) = to_tensors(&cfg.data.test, NUM_FEATURES, cfg.device, Kind::Float);
    let mut evaluated = 0u32;
    loop {
        let task = client
            .next_task(NextTaskRequest {
                site: cfg.site.clone(),
            })
            .await
            .map_err(rpc("NextTask"))?
            .into_inner();
        let kind = TaskKind::try_from(task.kind).unwrap_or(TaskKind::Unspecified);
        if kind == TaskKind::Wait || kind == TaskKind::Unspecified {
            tokio::time::sleep(cfg.poll_interval).await;
            continue;
        }
        let bytes = download(&mut client, task.round).await?;
        let global = state_from_safetensors(&bytes, cfg.device)?;
        let mut model = Mlp::from_state(cfg.model, &global, cfg.device, Kind::Float)?;
        if evaluated < task.round {
            let acc = model.accuracy(&xte, &yte);
            client
                .report_metrics(MetricsReport {
                    site: cfg.site.clone(),
                    model: task.round,
                    test_accuracy: acc,
                    num_test_examples: cfg.data.test.len() as u64,
                })
                .await
                .map_err(rpc("ReportMetrics"))?;
            report.evaluations.push(Evaluation {
                model: task.round,
                test_accuracy: acc,
            });
            evaluated = task.round;
        }
        if kind == TaskKind::Done {
            tracing::info!(site = %cfg.site, "federation done");
            return Ok(report);
        }
        let local = LocalTraining {
            epochs: task.local_epochs,
            batch_size: task.batch_size,
            optimizer: OptimizerSpec::Sgd {
                lr: task.learning_rate,
                momentum: 0.9,
                weight_decay: 0.0,
            },
        };
        let c = ClippingNorm::new(task.clipping_norm)?;
        let sigma = NoiseMultiplier::new(task.noise_multiplier)?;
        let loss = train_local(&mut model, &xtr, &ytr, &local, &mut rng)?;
        let (update, norm) = dp_update(&model.state(), &global, c, sigma, &mut rng);
        let blob = state_to_safetensors(&update)?;
        let header = UpdateHeader {
            site: cfg.site.clone(),
            round: task.round,
            num_examples: cfg.data.train.len() as u64,
            sha256: hex::encode(Sha256::digest(&blob)),
        };
        let msgs: Vec<SubmitUpdateMessage> =
            std::iter::once(submit_update_message::Msg::Header(header))
                .chain(
                    chunks(&blob)
                        .into_iter()
                        .map(submit_update_message::Msg::Chunk),
                )
                .map(|m| SubmitUpdateMessage { msg: Some(m) })
                .collect();
        client
            .submit_update(futures::stream::iter(msgs))
            .await
            .map_err(rpc("SubmitUpdate"))?;
        tracing::info!(site = %cfg.site, round = task.round, loss, update_norm = norm, "update submitted");
        report.rounds_trained.push(task.round);
    }
}
