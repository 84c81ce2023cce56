//! The site agent's federation loop: join, then per round download the global model,
//! evaluate it, train locally, and submit the DP update.

use std::time::Duration;

use fedee_dp::{ClippingNorm, NoiseMultiplier};
use fedee_model::{state_from_safetensors, state_to_safetensors};
use fedee_proto::v1::federation_client::FederationClient;
use fedee_proto::v1::{
    DownloadModelRequest, JoinRequest, LeaveRequest, MetricsReport, NextTaskRequest, PrivacyEntry,
    SubmitUpdateMessage, TaskKind, UpdateHeader, submit_update_message,
};
use fedee_proto::{MAX_BLOB_SIZE, Reassembler, chunks};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use tch::Device;
use tonic::transport::Channel;

use crate::SiteError;
use crate::dpsgd::DpSgd;
use crate::ledger::{Entry, Planned};
use crate::task::{LocalTask, RoundSettings};
use crate::train::dp_update;
use fedee_dp::DpMode;

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
    /// How calls that fail at the transport level are retried.
    pub retry: Retry,
    /// Gaussian sampler for the DP noise (fast with grid rounding, or OpenDP's exact one).
    pub noise: fedee_dp::noise::Sampler,
    /// Where the site's privacy ledger is kept (`None`: in memory only).
    pub ledger: Option<std::path::PathBuf>,
    /// The site's ε budget (at the federation's δ): training that would exceed it is refused
    /// and the site stops. `None`: no limit (the spend is still accounted and reported).
    pub epsilon_budget: Option<f64>,
    /// SHA-256 of the federation spec the task was built from ([`fetch_spec`]), named at
    /// Join: the aggregator refuses a site that checked its data against another spec.
    /// `None` for a federation without a spec.
    pub spec_sha256: Option<String>,
}

/// Retries with exponential backoff and jitter for calls that fail at the transport level
/// (aggregator restarting, network loss): attempt `k` (from 0) waits a uniformly random time
/// in `[d/2, d]` with `d = min(cap, base · 2^k)` ("equal jitter"), so sites that lost the
/// aggregator together do not reconnect in lockstep. Refusals (permission denied, invalid
/// update, refused certificates) are not retried. Every call is safe to repeat: joining and
/// metric reports are idempotent, and the aggregator acknowledges a repeated identical update
/// without counting it twice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    /// Attempts per call, the first included (1 = no retry).
    pub attempts: u32,
    /// First backoff.
    pub base: Duration,
    /// Longest backoff.
    pub cap: Duration,
}

impl Default for Retry {
    /// 10 attempts, 0.5 s doubling to at most 30 s: about 2.5 minutes before giving up.
    fn default() -> Self {
        Self {
            attempts: 10,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }
}

impl Retry {
    /// The wait before retry number `k` (from 0), with jitter.
    pub fn backoff(&self, k: u32) -> Duration {
        let d = self
            .base
            .saturating_mul(2u32.saturating_pow(k.min(30)))
            .min(self.cap);
        d.mul_f64(rand::random_range(0.5..=1.0))
    }
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
    /// The privacy ledger after the run.
    pub privacy: Vec<crate::ledger::Entry>,
    /// Why the site stopped before the federation finished (e.g. its privacy budget).
    pub stopped: Option<String>,
}

/// Whether a failed call may succeed if repeated: the aggregator was unreachable, restarted
/// mid-call, or failed internally. A TLS handshake refused over a certificate is final.
fn retryable(status: &tonic::Status) -> bool {
    use tonic::Code::{Aborted, Cancelled, DeadlineExceeded, Internal, Unavailable, Unknown};
    if !matches!(
        status.code(),
        Unavailable | Unknown | Cancelled | DeadlineExceeded | Aborted | Internal
    ) {
        return false;
    }
    // rustls reports certificate refusals as alerts in the error's source chain.
    let text = source_chain(status).to_lowercase();
    !(text.contains("alert") || text.contains("certificate"))
}

/// The status message followed by each distinct message of its error sources.
fn source_chain(status: &tonic::Status) -> String {
    let mut out = status.message().to_owned();
    let mut e: Option<&dyn std::error::Error> = std::error::Error::source(status);
    while let Some(err) = e {
        let text = err.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        e = err.source();
    }
    out
}

/// The connection to the aggregator and the retry policy.
struct Link {
    client: FederationClient<Channel>,
    url: String,
    retry: Retry,
}

impl Link {
    /// A lazily connected channel to `aggregator` (reconnects after failures).
    fn connect(
        aggregator: &str,
        tls: Option<&fedee_proto::pki::TlsFiles>,
        retry: Retry,
    ) -> Result<Self, SiteError> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(aggregator.to_owned())
            .map_err(|e| SiteError::Tls(format!("aggregator url `{aggregator}`: {e}")))?;
        if let Some(t) = tls {
            let tls = t.client().map_err(|e| SiteError::Tls(e.to_string()))?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| SiteError::Tls(e.to_string()))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self {
            client: FederationClient::new(channel).max_decoding_message_size(8 << 20),
            url: aggregator.to_owned(),
            retry,
        })
    }

    /// Run `f` until it succeeds, fails with a refusal, or the attempts are spent.
    async fn call<T, F, Fut>(&mut self, call: &'static str, mut f: F) -> Result<T, SiteError>
    where
        F: FnMut(FederationClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match f(self.client.clone()).await {
                Ok(v) => return Ok(v),
                Err(status) if retryable(&status) && attempt < self.retry.attempts => {
                    let wait = self.retry.backoff(attempt - 1);
                    tracing::warn!(call, attempt, wait_s = wait.as_secs_f64(), code = ?status.code(), error = %status.message(), "call failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(status) if retryable(&status) || is_transport(&status) => {
                    return Err(SiteError::Transport {
                        call,
                        url: self.url.clone(),
                        attempts: attempt,
                        reason: source_chain(&status),
                        status,
                    });
                }
                Err(status) => return Err(SiteError::Rpc { call, status }),
            }
        }
    }
}

fn is_transport(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable
    )
}

async fn download(
    mut client: FederationClient<Channel>,
    model: u32,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .download_model(DownloadModelRequest { model })
        .await?
        .into_inner();
    let mut r = Reassembler::new(MAX_BLOB_SIZE);
    while let Some(c) = stream.message().await? {
        r.push(c)
            .map_err(|e| tonic::Status::data_loss(format!("model {model} stream: {e}")))?;
    }
    r.finish()
        .map_err(|e| tonic::Status::data_loss(format!("model {model} stream: {e}")))
}

/// The federation spec the aggregator serves, parsed and validated, with its hash checked
/// against the served one; `None` when the federation runs without a spec. Retried like every
/// call (the aggregator may start after the site).
///
/// # Errors
/// Transport failures after every retry, a refusal, or a spec this build cannot run
/// ([`SiteError::Spec`]).
pub async fn fetch_spec(
    aggregator: &str,
    tls: Option<&fedee_proto::pki::TlsFiles>,
    retry: Retry,
) -> Result<Option<fedee_spec::SignedSpec>, SiteError> {
    let mut link = Link::connect(aggregator, tls, retry)?;
    let served = link
        .call("GetSpec", |mut c| async move {
            c.get_spec(fedee_proto::v1::GetSpecRequest {}).await
        })
        .await?
        .into_inner();
    if served.toml.is_empty() {
        return Ok(None);
    }
    let spec = fedee_spec::SignedSpec::parse(&served.toml)?;
    if spec.sha256 != served.sha256 {
        return Err(SiteError::Unsupported(format!(
            "the aggregator served a federation spec whose SHA-256 is {} but named it {}: refusing to train on it",
            spec.sha256, served.sha256
        )));
    }
    Ok(Some(spec))
}

/// Run the site until the federation is done.
///
/// # Errors
/// Connection failures, refusals by the aggregator, or model errors; each names the cause.
pub async fn run(mut cfg: SiteConfig) -> Result<SiteReport, SiteError> {
    // Connect on first use and reconnect after failures (the aggregator may start later or
    // restart); each call is retried per `cfg.retry`.
    let mut link = Link::connect(&cfg.aggregator, cfg.tls.as_ref(), cfg.retry)?;
    let site = cfg.site.clone();
    let spec_sha256 = cfg.spec_sha256.clone().unwrap_or_default();
    link.call("Join", |mut c| {
        let req = JoinRequest {
            site: site.clone(),
            spec_sha256: spec_sha256.clone(),
        };
        async move { c.join(req).await }
    })
    .await?;
    tracing::info!(site = %cfg.site, train = cfg.task.num_examples(), test = cfg.task.num_test_examples(), "joined");
    let mut rng = match cfg.seed {
        Some(s) => ChaCha20Rng::seed_from_u64(s),
        None => ChaCha20Rng::from_os_rng(),
    };
    let mut report = SiteReport {
        site: cfg.site.clone(),
        evaluations: vec![],
        rounds_trained: vec![],
        privacy: vec![],
        stopped: None,
    };
    let mut ledger = crate::ledger::Ledger::open(cfg.ledger.as_deref())?;
    let mut evaluated = 0u32;
    loop {
        let task = link
            .call("NextTask", |mut c| {
                let site = site.clone();
                async move { c.next_task(NextTaskRequest { site }).await }
            })
            .await?
            .into_inner();
        let kind = TaskKind::try_from(task.kind).unwrap_or(TaskKind::Unspecified);
        if kind == TaskKind::Wait || kind == TaskKind::Unspecified {
            tokio::time::sleep(cfg.poll_interval).await;
            continue;
        }
        let round = task.round;
        let bytes = link.call("DownloadModel", |c| download(c, round)).await?;
        let global = state_from_safetensors(&bytes, cfg.device)?;
        if evaluated < task.round {
            // Local compute blocks this worker thread, not the runtime's other tasks.
            let acc = tokio::task::block_in_place(|| cfg.task.evaluate(&global))?;
            let metrics = MetricsReport {
                site: cfg.site.clone(),
                model: task.round,
                test_accuracy: acc,
                num_test_examples: cfg.task.num_test_examples(),
            };
            link.call("ReportMetrics", |mut c| {
                let metrics = metrics.clone();
                async move { c.report_metrics(metrics).await }
            })
            .await?;
            report.evaluations.push(Evaluation {
                model: task.round,
                test_accuracy: acc,
            });
            evaluated = task.round;
        }
        if kind == TaskKind::Done {
            tracing::info!(site = %cfg.site, "federation done");
            report.privacy = ledger.entries().to_vec();
            return Ok(report);
        }
        let settings = RoundSettings {
            epochs: task.local_epochs,
            batch_size: task.batch_size,
            learning_rate: task.learning_rate,
            proximal_mu: task.proximal_mu,
        };
        let c = ClippingNorm::new(task.clipping_norm)?;
        let sigma = NoiseMultiplier::new(task.noise_multiplier)?;
        // An aggregator that sends no mode or δ predates record-level DP: site mode, δ = 1e-5.
        let mode: DpMode = if task.dp_mode.is_empty() {
            DpMode::Site
        } else {
            task.dp_mode.parse()?
        };
        let delta = if task.delta > 0.0 { task.delta } else { 1e-5 };
        let n = cfg.task.num_examples();
        let planned = match mode {
            DpMode::Site => Planned {
                sampling_rate: 1.0,
                noise_multiplier: sigma.get(),
                steps: 1,
            },
            DpMode::Record => {
                let b = u64::from(settings.batch_size.max(1));
                Planned {
                    sampling_rate: (b as f64 / n.max(1) as f64).min(1.0),
                    noise_multiplier: sigma.get(),
                    steps: u64::from(settings.epochs) * n.div_ceil(b),
                }
            }
        };
        let spent = ledger.epsilon_with(None, delta)?;
        let (after, rdp_order, rdp) = ledger.spend_with(Some(planned), delta)?;
        if let Some(budget) = cfg.epsilon_budget
            && after > budget
        {
            let msg = format!(
                "privacy budget: site `{}` has spent ε = {spent:.4} (δ = {delta:e}, unit: {}); round {} would bring it to ε = {after:.4}, over its budget of ε = {budget}; refusing to train",
                cfg.site,
                mode.unit(),
                task.round
            );
            tracing::warn!("{msg}");
            let (site, reason) = (cfg.site.clone(), msg.clone());
            link.call("Leave", |mut c| {
                let req = LeaveRequest {
                    site: site.clone(),
                    reason: reason.clone(),
                };
                async move { c.leave(req).await }
            })
            .await?;
            report.privacy = ledger.entries().to_vec();
            report.stopped = Some(msg);
            return Ok(report);
        }
        let (update, norm, loss) = match mode {
            DpMode::Site => {
                let (local, loss) =
                    tokio::task::block_in_place(|| cfg.task.train(&global, &settings, &mut rng))?;
                let (update, norm) = tokio::task::block_in_place(|| {
                    dp_update(&local, &global, c, sigma, cfg.noise, &mut rng)
                })?;
                (update, norm, loss)
            }
            DpMode::Record => {
                let dp = DpSgd {
                    clipping_norm: c,
                    noise_multiplier: sigma,
                    sampling_rate: planned.sampling_rate,
                    sampler: cfg.noise,
                };
                let (local, loss) = tokio::task::block_in_place(|| {
                    cfg.task
                        .train_dpsgd(&global, &settings, &dp, planned.steps, &mut rng)
                })?;
                // DP-SGD already protects every record: the update is released as trained.
                let update: fedee_encrypt::StateDict = global
                    .iter()
                    .map(|(k, g)| {
                        (
                            k.clone(),
                            (&local[k] - g)
                                .to_kind(tch::Kind::Float)
                                .to_device(tch::Device::Cpu),
                        )
                    })
                    .collect();
                (update, f64::NAN, loss)
            }
        };
        let mechanism = match mode {
            DpMode::Site => "gaussian_zcdp",
            DpMode::Record => "subsampled_gaussian_rdp",
        };
        // Recorded before the update leaves the site: a crash after this point over-counts,
        // never under-counts.
        ledger.record(Entry {
            round: task.round,
            unit: mode.unit().into(),
            mechanism: mechanism.into(),
            sampling_rate: planned.sampling_rate,
            noise_multiplier: planned.noise_multiplier,
            clipping_norm: c.get(),
            steps: planned.steps,
            epsilon: after,
            delta,
            rdp_order,
            rdp,
            at_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })?;
        tracing::info!(site = %cfg.site, round = task.round, unit = mode.unit(), epsilon = after, delta, "privacy spent");
        let privacy = PrivacyEntry {
            unit: mode.unit().into(),
            mechanism: mechanism.into(),
            sampling_rate: planned.sampling_rate,
            noise_multiplier: planned.noise_multiplier,
            steps: planned.steps,
            epsilon: after,
            delta,
        };
        let blob = state_to_safetensors(&update)?;
        let header = UpdateHeader {
            site: cfg.site.clone(),
            round: task.round,
            num_examples: cfg.task.num_examples(),
            sha256: hex::encode(Sha256::digest(&blob)),
            privacy: Some(privacy),
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
        let submitted = link
            .call("SubmitUpdate", |mut c| {
                let msgs = msgs.clone();
                async move { c.submit_update(futures::stream::iter(msgs)).await }
            })
            .await;
        match submitted {
            Ok(_) => {}
            // The round ended (deadline) while this site trained: take the next task.
            Err(SiteError::Rpc { status, .. })
                if status.code() == tonic::Code::FailedPrecondition =>
            {
                tracing::warn!(site = %cfg.site, round = task.round, reason = status.message(), "update not accepted; moving on to the next task");
                continue;
            }
            Err(e) => return Err(e),
        }
        tracing::info!(site = %cfg.site, round = task.round, loss, update_norm = norm, bytes = blob.len(), "update submitted");
        report.rounds_trained.push(task.round);
    }
}
