//! The site agent's federation loop: join, then per round download the global model,
//! evaluate it, train locally, and submit the DP update.

use std::time::Duration;

use fedee_dp::{ClippingNorm, NoiseMultiplier};
use fedee_model::{state_from_safetensors, state_to_safetensors};
use fedee_proto::v1::federation_client::FederationClient;
use fedee_proto::v1::{
    DownloadModelRequest, JoinRequest, MetricsReport, NextTaskRequest, SubmitUpdateMessage,
    TaskKind, UpdateHeader, submit_update_message,
};
use fedee_proto::{MAX_BLOB_SIZE, Reassembler, chunks};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use tch::Device;
use tonic::transport::Channel;

use crate::SiteError;
use crate::task::{LocalTask, RoundSettings};
use crate::train::dp_update;

/// Site agent settings.
pub struct SiteConfig {
    /// Aggregator URL, e.g. `http://127.0.0.1:50051`.
    pub aggregator: String,
    /// Site name (the hospital).
    pub site: String,
    /// What the site trains, on its own data.
    pub task: Box<dyn LocalTask>,
    /// Device global models are loaded to.
    pub device: Device,
    /// Seed for batch shuffling and DP noise; `None` = OS entropy (use in production).
    pub seed: Option<u64>,
    /// How long to wait before asking again when told to wait.
    pub poll_interval: Duration,
    /// Mutual TLS: the site's certificate (its identity) and the consortium CA. `None` =
    /// plaintext (insecure mode).
    pub tls: Option<fedee_proto::pki::TlsFiles>,
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
    move |status| match status.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable => {
            SiteError::Transport { call, status }
        }
        _ => SiteError::Rpc { call, status },
    }
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
pub async fn run(mut cfg: SiteConfig) -> Result<SiteReport, SiteError> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(cfg.aggregator.clone())
        .map_err(|e| SiteError::Tls(format!("aggregator url `{}`: {e}", cfg.aggregator)))?;
    if let Some(t) = &cfg.tls {
        let tls = t.client().map_err(|e| SiteError::Tls(e.to_string()))?;
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| SiteError::Tls(e.to_string()))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| SiteError::Connect {
            url: cfg.aggregator.clone(),
            source,
        })?;
    let mut client = FederationClient::new(channel).max_decoding_message_size(8 << 20);
    client
        .join(JoinRequest {
            site: cfg.site.clone(),
        })
        .await
        .map_err(rpc("Join"))?;
    tracing::info!(site = %cfg.site, train = cfg.task.num_examples(), test = cfg.task.num_test_examples(), "joined");
    let mut rng = match cfg.seed {
        Some(s) => ChaCha20Rng::seed_from_u64(s),
        None => ChaCha20Rng::from_os_rng(),
    };
    let mut report = SiteReport {
        site: cfg.site.clone(),
        evaluations: vec![],
        rounds_trained: vec![],
    };
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
        if evaluated < task.round {
            // Local compute blocks this worker thread, not the runtime's other tasks.
            let acc = tokio::task::block_in_place(|| cfg.task.evaluate(&global))?;
            client
                .report_metrics(MetricsReport {
                    site: cfg.site.clone(),
                    model: task.round,
                    test_accuracy: acc,
                    num_test_examples: cfg.task.num_test_examples(),
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
        let settings = RoundSettings {
            epochs: task.local_epochs,
            batch_size: task.batch_size,
            learning_rate: task.learning_rate,
        };
        let c = ClippingNorm::new(task.clipping_norm)?;
        let sigma = NoiseMultiplier::new(task.noise_multiplier)?;
        let (local, loss) =
            tokio::task::block_in_place(|| cfg.task.train(&global, &settings, &mut rng))?;
        let (update, norm) =
            tokio::task::block_in_place(|| dp_update(&local, &global, c, sigma, &mut rng));
        let blob = state_to_safetensors(&update)?;
        let header = UpdateHeader {
            site: cfg.site.clone(),
            round: task.round,
            num_examples: cfg.task.num_examples(),
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
        tracing::info!(site = %cfg.site, round = task.round, loss, update_norm = norm, bytes = blob.len(), "update submitted");
        report.rounds_trained.push(task.round);
    }
}
