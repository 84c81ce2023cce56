//! The site agent's federation loop: join, then per round download the global model,
//! evaluate it, train locally, and submit the DP update.

use std::time::Duration;

use fedee_dp::{ClippingNorm, NoiseMultiplier};
use fedee_model::{StateDict, state_from_safetensors, state_to_safetensors};
use fedee_proto::v1::federation_client::FederationClient;
use fedee_proto::v1::{
    DownloadModelRequest, JoinRequest, LeaveRequest, MetricsReport, NextTaskRequest, PrivacyEntry,
    TaskKind, UpdateHeader,
};
use fedee_proto::{MAX_BLOB_SIZE, Reassembler};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use tch::Device;
use tonic::transport::Channel;

use crate::SiteError;
use crate::dpsgd::DpSgd;
use crate::ledger::Planned;
use crate::policy::RoundPrivacy;
use crate::task::{HeldOut, LocalTask, RoundSettings};
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
    /// Start an empty ledger if `ledger` does not exist (else a missing ledger is an error:
    /// it would forget the privacy already spent).
    pub new_ledger: bool,
    /// What the site accepts (σ, C, modes, δ, ε budget), checked before joining and before
    /// every round, whatever the spec and the aggregator say.
    pub policy: crate::policy::PrivacyPolicy,
    /// The federation spec the task was built from ([`fetch_spec`]). Its hash is named at
    /// Join (the aggregator refuses a site that checked its data against another spec), and
    /// every task's DP settings must be the spec's ([`agreed_privacy`]).
    pub spec: fedee_spec::SignedSpec,
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
    /// Size of the test split.
    pub num_test_examples: u64,
    /// All metrics on the site's test split.
    pub metrics: crate::metrics::Metrics,
    /// Accuracy on the site's validation split (what model selection reads), if it has one.
    pub validation_accuracy: Option<f64>,
    /// Size of the validation split (0 without one).
    pub num_validation_examples: u64,
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

/// The connection to the aggregator and the retry policy: what sites, demos, benches and the
/// CLI's `status` / `download-model` use to talk to the federation.
pub struct Link {
    client: FederationClient<Channel>,
    url: String,
    retry: Retry,
    /// The largest model download accepted (and so allocated), in bytes.
    download_limit: u64,
}

impl Link {
    /// A lazily connected channel to `aggregator` (reconnects after failures).
    ///
    /// # Errors
    /// [`SiteError::Tls`] for a malformed URL or unreadable or unusable certificates.
    ///
    /// # Security
    /// With TLS the aggregator must present a certificate valid for the host dialled and
    /// carrying the `aggregator` role: a trainer's or a site's certificate is refused.
    pub fn connect(
        aggregator: &str,
        tls: Option<&fedee_proto::pki::TlsFiles>,
        retry: Retry,
    ) -> Result<Self, SiteError> {
        let channel = fedee_proto::pki::connect_lazy(
            aggregator,
            tls,
            fedee_proto::pki::Role::Aggregator,
            Duration::from_secs(10),
        )?;
        Ok(Self {
            client: FederationClient::new(channel).max_decoding_message_size(8 << 20),
            url: aggregator.to_owned(),
            retry,
            download_limit: MAX_BLOB_SIZE,
        })
    }

    /// The federation's status (rounds, sites, privacy), retried like every call.
    ///
    /// # Errors
    /// [`SiteError::Transport`] after the retries, [`SiteError::Rpc`] for a refusal.
    pub async fn status(&mut self) -> Result<fedee_proto::v1::StatusResponse, SiteError> {
        Ok(self
            .call("Status", |mut c| async move {
                c.status(fedee_proto::v1::StatusRequest {}).await
            })
            .await?
            .into_inner())
    }

    /// Global model `model` (1 = the initial model, `r + 1` = after round `r`) as safetensors
    /// bytes, reassembled from its chunks with size and SHA-256 checked.
    ///
    /// # Errors
    /// [`SiteError::Transport`] after the retries, [`SiteError::Rpc`] for a refusal or a
    /// corrupt stream (`DATA_LOSS`).
    pub async fn download_model(&mut self, model: u32) -> Result<Vec<u8>, SiteError> {
        let limit = self.download_limit;
        self.call("DownloadModel", |c| download(c, model, limit))
            .await
    }

    /// Refuse (before allocating) any model download above `bytes`: a site that knows its
    /// model's size bounds what a hostile aggregator can make it allocate (the default is
    /// the protocol's largest blob).
    pub fn limit_downloads(&mut self, bytes: u64) {
        self.download_limit = bytes;
    }

    /// Join the federation as `site`, agreeing to the spec with this SHA-256 (empty: none).
    ///
    /// # Errors
    /// As [`Link::status`]; a refusal names the reason (unknown site, other spec, …).
    pub async fn join(&mut self, site: &str, spec_sha256: String) -> Result<(), SiteError> {
        let req = JoinRequest {
            site: site.to_owned(),
            spec_sha256,
        };
        self.call("Join", |mut c| {
            let req = req.clone();
            async move { c.join(req).await }
        })
        .await
        .map(drop)
    }

    /// The site's next task (wait, train round `r`, or done).
    ///
    /// # Errors
    /// As [`Link::status`].
    pub async fn next_task(&mut self, site: &str) -> Result<fedee_proto::v1::Task, SiteError> {
        let site = site.to_owned();
        Ok(self
            .call("NextTask", |mut c| {
                let site = site.clone();
                async move { c.next_task(NextTaskRequest { site }).await }
            })
            .await?
            .into_inner())
    }

    /// Report a global model's test metrics (idempotent at the aggregator).
    ///
    /// # Errors
    /// As [`Link::status`].
    pub async fn report_metrics(&mut self, metrics: MetricsReport) -> Result<(), SiteError> {
        self.call("ReportMetrics", |mut c| {
            let metrics = metrics.clone();
            async move { c.report_metrics(metrics).await }
        })
        .await
        .map(drop)
    }

    /// Leave the federation, saying why.
    ///
    /// # Errors
    /// As [`Link::status`].
    pub async fn leave(&mut self, site: &str, reason: &str) -> Result<(), SiteError> {
        let req = LeaveRequest {
            site: site.to_owned(),
            reason: reason.to_owned(),
        };
        self.call("Leave", |mut c| {
            let req = req.clone();
            async move { c.leave(req).await }
        })
        .await
        .map(drop)
    }

    /// Submit one update: `header` (its `sha256` must be `blob`'s), then `blob` in chunks.
    /// A repeat of an acknowledged update is acknowledged again without counting twice.
    ///
    /// # Errors
    /// As [`Link::status`]; `FAILED_PRECONDITION` when the round has ended.
    pub async fn submit_update(
        &mut self,
        header: UpdateHeader,
        blob: &[u8],
    ) -> Result<(), SiteError> {
        let msgs = fedee_proto::update_messages(header, blob);
        self.call("SubmitUpdate", |mut c| {
            let msgs = msgs.clone();
            async move { c.submit_update(futures::stream::iter(msgs)).await }
        })
        .await
        .map(drop)
    }

    /// One `SecureAggregation` call.
    ///
    /// # Errors
    /// As [`Link::status`]; `FAILED_PRECONDITION` when the round has moved on.
    pub async fn secure_aggregation(
        &mut self,
        req: &fedee_proto::v1::SecAggRequest,
    ) -> Result<fedee_proto::v1::SecAggResponse, SiteError> {
        Ok(self
            .call("SecureAggregation", |mut c| {
                let req = req.clone();
                async move { c.secure_aggregation(req).await }
            })
            .await?
            .into_inner())
    }

    /// Send one masked input: `header`, then `words` in chunks.
    ///
    /// # Errors
    /// As [`Link::status`]; `FAILED_PRECONDITION` when the round has moved on.
    pub async fn submit_masked(
        &mut self,
        header: fedee_proto::v1::SecAggMaskedHeader,
        words: &[u32],
    ) -> Result<fedee_proto::v1::SecAggResponse, SiteError> {
        let msgs = fedee_proto::masked_messages(header, words);
        Ok(self
            .call("SubmitMasked", |mut c| {
                let msgs = msgs.clone();
                async move { c.submit_masked(futures::stream::iter(msgs)).await }
            })
            .await?
            .into_inner())
    }

    /// One `SubmitStatistics` call (an empty list only asks).
    ///
    /// # Errors
    /// As [`Link::status`]; a refusal names the bad statistics.
    pub async fn submit_statistics(
        &mut self,
        req: &fedee_proto::v1::StatisticsRequest,
    ) -> Result<fedee_proto::v1::StatisticsResponse, SiteError> {
        Ok(self
            .call("SubmitStatistics", |mut c| {
                let req = req.clone();
                async move { c.submit_statistics(req).await }
            })
            .await?
            .into_inner())
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
    limit: u64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .download_model(DownloadModelRequest { model })
        .await?
        .into_inner();
    let mut r = Reassembler::new(limit);
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

/// The DP settings a spec sets for a site with `n` training records: its mode, `C`, δ and
/// σ. For a spec with a target ε, site mode calibrates σ as the aggregator does (one σ for
/// all rounds), and record mode calibrates this site's own σ to its sampling rate
/// `batch / n` and `rounds × epochs × ⌈n / batch⌉` DP-SGD steps, after the federated
/// statistics' spend.
///
/// # Errors
/// [`SiteError::Refused`] for a spec that states no noise; [`SiteError::Dp`] for values no
/// mechanism accepts.
pub fn spec_privacy(spec: &fedee_spec::FederationSpec, n: u64) -> Result<RoundPrivacy, SiteError> {
    let p = &spec.privacy;
    let t = &spec.training;
    let mode = match p.mode {
        fedee_spec::PrivacyMode::Site => DpMode::Site,
        fedee_spec::PrivacyMode::Record => DpMode::Record,
    };
    let distributed = spec.distributed_dp();
    let sigma = match (p.noise_multiplier, p.target_epsilon, mode) {
        (Some(s), _, _) => s,
        (None, Some(eps), DpMode::Site) => {
            fedee_dp::site_level_sigma(spec.federation.rounds, eps, p.delta, distributed)?.get()
        }
        (None, Some(eps), DpMode::Record) => {
            let b = u64::from(t.batch_size);
            let q = (b as f64 / n.max(1) as f64).min(1.0);
            let steps = u64::from(spec.federation.rounds) * u64::from(t.epochs) * n.div_ceil(b);
            // The federated statistics (spent once before round 1) leave less for training.
            let mut spent = fedee_dp::rdp::RdpAccountant::default();
            if let Some(s) = spec.statistics_sigma() {
                spent.add(1.0, s, 1)?;
            }
            let s = fedee_dp::rdp::calibrate_sigma_after(&spent, q, steps, eps, p.delta)?;
            tracing::info!(
                sigma = s,
                q,
                steps,
                target_epsilon = eps,
                "σ calibrated to this site's data"
            );
            s
        }
        (None, None, _) => {
            return Err(SiteError::Refused(
                "the federation spec states no noise".into(),
            ));
        }
    };
    Ok(RoundPrivacy {
        mode,
        clipping_norm: p.clipping_norm,
        noise_multiplier: sigma,
        delta: p.delta,
        distributed,
    })
}

/// The ε (at the spec's δ) this site's ledger would reach after every round of the
/// federation: what it has spent already, the federated statistics if the spec has them,
/// and `rounds` rounds at `agreed` with the spec's epochs and batch size on `n` records.
///
/// # Errors
/// [`SiteError::Dp`] for values no mechanism accepts.
pub fn federation_epsilon(
    spec: &fedee_spec::FederationSpec,
    agreed: &RoundPrivacy,
    n: u64,
    ledger: &crate::ledger::Ledger,
) -> Result<f64, SiteError> {
    let mut future = Vec::new();
    if let Some(s) = spec.statistics_sigma() {
        future.push(Planned {
            sampling_rate: 1.0,
            noise_multiplier: s,
            steps: 1,
            skellam: None,
        });
    }
    let settings = RoundSettings {
        epochs: spec.training.epochs,
        batch_size: spec.training.batch_size,
        learning_rate: 0.0,
        proximal_mu: 0.0,
    };
    let round = plan(agreed, &settings, n)?;
    future.extend(std::iter::repeat_n(round, spec.federation.rounds as usize));
    Ok(ledger.spend_after(&future, agreed.delta)?.0)
}

/// The DP settings of one round's task, which must be exactly what the site agreed to:
/// `agreed` ([`spec_privacy`]) for mode, `C`, δ and σ, and the spec's epochs and batch size.
/// In record mode with a target ε the task carries σ = 0 (each site calibrates its own).
///
/// # Errors
/// [`SiteError::Refused`] naming the setting when the task departs from the spec.
///
/// # Security
/// A site that agreed to a spec spends no more than the spec allows, whatever the
/// aggregator's tasks say (a changed σ mid-federation, a NaN, a δ ≥ 1 are refused).
pub fn agreed_privacy(
    task: &fedee_proto::v1::Task,
    spec: &fedee_spec::FederationSpec,
    agreed: &RoundPrivacy,
) -> Result<(), SiteError> {
    let refuse = |what: &str, sent: String, agreed: String| {
        Err(SiteError::Refused(format!(
            "round {}: the aggregator sent {what} = {sent}, but the federation spec this site agreed to says {agreed}; the site does not train on settings it did not agree to",
            task.round
        )))
    };
    if task.dp_mode != agreed.mode.as_str() {
        return refuse(
            "dp_mode",
            format!("{:?}", task.dp_mode),
            agreed.mode.as_str().into(),
        );
    }
    if task.clipping_norm != agreed.clipping_norm {
        return refuse(
            "clipping_norm",
            format!("{:?}", task.clipping_norm),
            format!("{:?}", agreed.clipping_norm),
        );
    }
    if task.delta != agreed.delta {
        return refuse(
            "delta",
            format!("{:?}", task.delta),
            format!("{:?}", agreed.delta),
        );
    }
    let t = &spec.training;
    if task.local_epochs != t.epochs || task.batch_size != t.batch_size {
        return refuse(
            "epochs / batch size",
            format!("{} / {}", task.local_epochs, task.batch_size),
            format!("{} / {}", t.epochs, t.batch_size),
        );
    }
    // Record mode with a target ε: the task carries 0 and the site decides.
    let expected = if spec.privacy.noise_multiplier.is_none() && agreed.mode == DpMode::Record {
        0.0
    } else {
        agreed.noise_multiplier
    };
    // A NaN σ compares false, so it fails this check.
    let same = (task.noise_multiplier - expected).abs() <= 1e-9 * expected.max(1.0);
    if !same {
        return refuse(
            "noise_multiplier",
            format!("{:?}", task.noise_multiplier),
            format!("{expected:?}"),
        );
    }
    Ok(())
}

/// The statistics round of `standardize = "federated"`: unless the aggregator already has
/// this site's statistics (a restart) or the sums are final, compute them, add noise, record
/// the release in the ledger, and send them; then wait for the pooled sums and standardise
/// the task's data with them.
///
/// # Errors
/// A budget the release would exceed ([`SiteError::Refused`]), ledger failures, refusals by
/// the aggregator.
async fn federated_statistics(
    link: &mut Link,
    cfg: &mut SiteConfig,
    ledger: &mut crate::ledger::Ledger,
    sigma: f64,
    rng: &mut ChaCha20Rng,
) -> Result<(), SiteError> {
    use fedee_proto::v1::{FeatureStatistics as Wire, StatisticsRequest};
    let spec = cfg.spec.spec.clone();
    let site = cfg.site.clone();
    let ask = |features: Vec<Wire>| StatisticsRequest {
        site: site.clone(),
        features,
    };
    let req = ask(vec![]);
    let mut answer = link.submit_statistics(&req).await?;
    if !answer.ready && !answer.submitted {
        let mut stats = cfg.task.statistics().ok_or_else(|| {
            SiteError::Unsupported("this task cannot compute federated statistics".into())
        })?;
        let delta = spec.privacy.delta;
        let planned = crate::ledger::Planned {
            sampling_rate: 1.0,
            noise_multiplier: sigma,
            steps: 1,
            skellam: None,
        };
        let after = ledger.epsilon_with(Some(planned), delta)?;
        let budget = cfg.policy.epsilon_budget;
        if !crate::policy::within_budget(after, budget) {
            return Err(SiteError::Refused(format!(
                "the federated statistics would bring this site's ε to {after:.3}, over its budget {budget} (--epsilon-budget)"
            )));
        }
        if let Some(target) = spec.privacy.target_epsilon
            && after >= target
        {
            return Err(SiteError::Refused(format!(
                "the federated statistics alone would spend ε = {after:.3} of the spec's target_epsilon = {target}, leaving nothing for training: raise privacy.statistics_noise_multiplier (now {sigma})"
            )));
        }
        let sensitivity = crate::statistics::sensitivity(&spec);
        crate::statistics::add_noise(&mut stats, sigma, sensitivity, cfg.noise, rng)?;
        // Recorded before the statistics leave the site.
        ledger.record_planned(
            0,
            DpMode::Record.unit(),
            "gaussian_statistics_rdp",
            planned,
            sensitivity,
            delta,
        )?;
        tracing::info!(site = %cfg.site, epsilon = after, delta, "federated statistics sent");
        let req = ask(stats
            .into_iter()
            .map(|s| Wire {
                feature: s.feature,
                count: s.count,
                sum: s.sum,
                sum_squares: s.sum_squares,
            })
            .collect());
        answer = link.submit_statistics(&req).await?;
    }
    let req = ask(vec![]);
    while !answer.ready {
        tokio::time::sleep(cfg.poll_interval).await;
        answer = link.submit_statistics(&req).await?;
    }
    let totals: Vec<crate::statistics::FeatureStatistics> = answer
        .totals
        .into_iter()
        .map(|t| crate::statistics::FeatureStatistics {
            feature: t.feature,
            count: t.count,
            sum: t.sum,
            sum_squares: t.sum_squares,
        })
        .collect();
    let prep = crate::statistics::preprocessing(&spec, &totals)?;
    let figures: Vec<String> = prep
        .columns
        .iter()
        .map(|c| format!("{} {:.3} ± {:.3}", c.name, c.mean, c.std))
        .collect();
    tracing::info!(site = %cfg.site, sites = answer.needed, figures = %figures.join(", "), "standardising with the federation's pooled statistics (mean ± std)");
    cfg.task.apply_preprocessing(&prep)
}

/// Run the site until the federation is done: join, the statistics round when the spec asks
/// for one, then per task: download the global model, evaluate it once, plan the round's
/// privacy spend against the site's budget, train (the training step), record, submit.
///
/// # Errors
/// Connection failures, refusals by the aggregator, or model errors; each names the cause.
pub async fn run(mut cfg: SiteConfig) -> Result<SiteReport, SiteError> {
    // Connect on first use and reconnect after failures (the aggregator may start later or
    // restart); each call is retried per `cfg.retry`.
    let mut link = Link::connect(&cfg.aggregator, cfg.tls.as_ref(), cfg.retry)?;
    // The site's own policy, checked before it joins: the spec's settings and what the site
    // will spend (its ledger so far plus the federation's planned rounds).
    let n = cfg.task.num_examples();
    let max_n = cfg.spec.spec.federation.max_num_examples;
    if crate::policy::coarse_count(n) > max_n {
        return Err(SiteError::Unsupported(format!(
            "this site has {} training examples (reported as {}), more than the federation's \
             federation.max_num_examples = {max_n}: ask the coordinator to raise it in the spec, \
             or train on a sample of at most {max_n} rows",
            n,
            crate::policy::coarse_count(n)
        )));
    }
    cfg.policy.validate()?;
    cfg.policy.check_target(&cfg.spec.spec)?;
    let agreed = spec_privacy(&cfg.spec.spec, n)?;
    cfg.policy.check(&agreed, n)?;
    let mut ledger = crate::ledger::Ledger::open(cfg.ledger.as_deref(), cfg.new_ledger)?;
    let planned_total = federation_epsilon(&cfg.spec.spec, &agreed, n, &ledger)?;
    let budget = cfg.policy.epsilon_budget;
    if planned_total > budget {
        tracing::warn!(
            site = %cfg.site,
            planned_epsilon = planned_total,
            budget,
            "the federation's rounds would take this site's ledger past its ε budget: it will train while the budget allows, then leave"
        );
    } else {
        tracing::info!(site = %cfg.site, planned_epsilon = planned_total, budget, delta = agreed.delta, "privacy planned within budget");
    }
    link.limit_downloads(crate::task::model_bytes_bound(&cfg.spec.spec)?);
    link.join(&cfg.site, cfg.spec.sha256.clone()).await?;
    tracing::info!(
        site = %cfg.site,
        train = cfg.task.num_examples(),
        validation = cfg.task.num_held_out(HeldOut::Validation),
        test = cfg.task.num_held_out(HeldOut::Test),
        "joined"
    );
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
    if let Some(sigma) = cfg.spec.spec.statistics_sigma() {
        federated_statistics(&mut link, &mut cfg, &mut ledger, sigma, &mut rng).await?;
    }
    let mut evaluated = 0u32;
    loop {
        let task = link.next_task(&cfg.site).await?;
        let kind = TaskKind::try_from(task.kind).unwrap_or(TaskKind::Unspecified);
        if kind == TaskKind::Wait || kind == TaskKind::Unspecified {
            tokio::time::sleep(cfg.poll_interval).await;
            continue;
        }
        let global = state_from_safetensors(&link.download_model(task.round).await?, cfg.device)?;
        if evaluated < task.round {
            // Local compute blocks this worker thread, not the runtime's other tasks.
            let e =
                tokio::task::block_in_place(|| evaluate(cfg.task.as_mut(), &global, task.round))?;
            report
                .evaluations
                .push(report_metrics(&mut link, &cfg.site, e).await?);
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
        // `agreed` passed the site's policy before joining; the task must match it exactly.
        if let Err(e) = agreed_privacy(&task, &cfg.spec.spec, &agreed) {
            tracing::warn!(site = %cfg.site, round = task.round, "{e}");
            link.leave(&cfg.site, &e.to_string()).await?;
            return Err(e);
        }
        let (c, sigma, mode, delta) = (
            ClippingNorm::new(agreed.clipping_norm)?,
            NoiseMultiplier::new(agreed.noise_multiplier)?,
            agreed.mode,
            agreed.delta,
        );
        let planned = plan(&agreed, &settings, n)?;
        let spent = ledger.epsilon_with(None, delta)?;
        let after = ledger.epsilon_with(Some(planned), delta)?;
        if !crate::policy::within_budget(after, budget) {
            let msg = format!(
                "privacy budget: site `{}` has spent ε = {spent:.4} (δ = {delta:e}, unit: {}); round {} would bring it to ε = {after:.4}, over its budget of ε = {budget}; refusing to train",
                cfg.site,
                mode.unit(),
                task.round
            );
            tracing::warn!("{msg}");
            link.leave(&cfg.site, &msg).await?;
            report.privacy = ledger.entries().to_vec();
            report.stopped = Some(msg);
            return Ok(report);
        }
        // Secure aggregation: keys are advertised and shared before training, so a site that
        // fails while training counts as dropped and the others' sum is still recovered.
        let secure = match (
            &task.secure_aggregation,
            &cfg.spec.spec.federation.secure_aggregation,
        ) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                let e = SiteError::Refused(format!(
                    "round {} {} secure aggregation, but the federation spec {} it",
                    task.round,
                    if task.secure_aggregation.is_some() {
                        "runs"
                    } else {
                        "skips"
                    },
                    if task.secure_aggregation.is_some() {
                        "does not ask for"
                    } else {
                        "asks for"
                    },
                ));
                link.leave(&cfg.site, &e.to_string()).await?;
                return Err(e);
            }
            (Some(t), Some(settings)) => {
                let parameters: usize = global.values().map(|t| t.numel()).sum();
                let agreed = crate::secure::Agreed {
                    settings,
                    spec_sha256: &cfg.spec.sha256,
                    max_weight: cfg.spec.spec.federation.max_num_examples,
                    bound: fedee_secagg::federation::update_bound(
                        c,
                        sigma,
                        parameters,
                        settings.max_update_norm,
                        agreed.distributed,
                    ),
                    distributed_dp: agreed.distributed.then_some(sigma.get()),
                };
                match crate::secure::SecureRun::begin(
                    &mut link,
                    &cfg.site,
                    task.round,
                    t,
                    &agreed,
                    parameters,
                    cfg.poll_interval,
                )
                .await
                {
                    Ok(Some(run)) => Some(run),
                    Ok(None) => continue,
                    // A task that departs from the spec, or a roster the protocol refuses:
                    // leave, naming why (nothing secret has left the site).
                    Err(e @ (SiteError::Refused(_) | SiteError::SecureAggregation(_))) => {
                        tracing::warn!(site = %cfg.site, round = task.round, "{e}");
                        link.leave(&cfg.site, &e.to_string()).await?;
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let (update, norm, loss) = tokio::task::block_in_place(|| {
            train_update(
                &mut cfg,
                &global,
                &settings,
                mode,
                // Distributed DP: the update is only clipped here; the Skellam noise is added
                // as it is encoded for the secure sum.
                (
                    c,
                    if agreed.distributed {
                        NoiseMultiplier::new(0.0)?
                    } else {
                        sigma
                    },
                ),
                planned,
                &mut rng,
            )
        })?;
        // Checked before anything is recorded or sent: a diverged model is the site's to
        // report, not the aggregator's to find.
        let diverged = update
            .iter()
            .find(|(_, t)| !bool::try_from(t.isfinite().all()).unwrap_or(false))
            .map(|(n, _)| n.clone());
        if let Some(tensor) = diverged {
            let e = SiteError::Diverged {
                round: task.round,
                tensor,
                loss,
            };
            tracing::error!(site = %cfg.site, "{e}");
            link.leave(&cfg.site, &e.to_string()).await?;
            return Err(e);
        }
        let mechanism = match (mode, agreed.distributed) {
            (DpMode::Site, true) => "skellam_rdp",
            (DpMode::Site, false) => "gaussian_zcdp",
            (DpMode::Record, _) => "subsampled_gaussian_rdp",
        };
        // Recorded before the update leaves the site: a crash after this point over-counts,
        // never under-counts.
        ledger.record_planned(task.round, mode.unit(), mechanism, planned, c.get(), delta)?;
        tracing::info!(site = %cfg.site, round = task.round, unit = mode.unit(), epsilon = after, delta, "privacy spent");
        // What the site reports of its spend: unit, mechanism, ε and δ; q, σ and steps
        // (which reveal the number of records) stay in its ledger.
        let privacy = PrivacyEntry {
            unit: mode.unit().into(),
            mechanism: mechanism.into(),
            sampling_rate: 0.0,
            noise_multiplier: 0.0,
            steps: 0,
            epsilon: after,
            delta,
        };
        if let Some(run) = secure {
            let weight = crate::policy::coarse_count(cfg.task.num_examples());
            let flat = crate::secure::flatten(&update)?;
            drop(update);
            if run.finish(&mut link, flat, weight, privacy).await? {
                tracing::info!(site = %cfg.site, round = task.round, loss, update_norm = norm, "masked update submitted");
                report.rounds_trained.push(task.round);
            }
            continue;
        }
        let blob = state_to_safetensors(&update)?;
        let header = UpdateHeader {
            site: cfg.site.clone(),
            round: task.round,
            // The FedAvg weight, coarsened; q, σ and steps (which reveal the number of
            // records) stay in the site's ledger.
            num_examples: crate::policy::coarse_count(cfg.task.num_examples()),
            sha256: hex::encode(Sha256::digest(&blob)),
            privacy: Some(privacy),
        };
        match link.submit_update(header, &blob).await {
            Ok(()) => {}
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

/// Global model `model` on the site's held-out splits (validation only when it has one).
fn evaluate(
    task: &mut dyn LocalTask,
    global: &StateDict,
    model: u32,
) -> Result<Evaluation, SiteError> {
    let metrics = task.evaluate(global, HeldOut::Test)?;
    let num_validation_examples = task.num_held_out(HeldOut::Validation);
    let validation_accuracy = if num_validation_examples > 0 {
        Some(task.evaluate(global, HeldOut::Validation)?.accuracy)
    } else {
        None
    };
    Ok(Evaluation {
        model,
        test_accuracy: metrics.accuracy,
        num_test_examples: task.num_held_out(HeldOut::Test),
        metrics,
        validation_accuracy,
        num_validation_examples,
    })
}

/// Report an evaluation of a global model to the aggregator.
async fn report_metrics(
    link: &mut Link,
    site: &str,
    e: Evaluation,
) -> Result<Evaluation, SiteError> {
    use crate::policy::{coarse_count, coarse_metric};
    // Coarsened as they leave the site (SECURITY.md, "What a site sends").
    link.report_metrics(MetricsReport {
        site: site.to_owned(),
        model: e.model,
        test_accuracy: coarse_metric(e.metrics.accuracy),
        num_test_examples: coarse_count(e.num_test_examples),
        balanced_accuracy: Some(coarse_metric(e.metrics.balanced_accuracy)),
        macro_f1: Some(coarse_metric(e.metrics.macro_f1)),
        auroc: e.metrics.auroc.map(coarse_metric),
        validation_accuracy: e.validation_accuracy.map(coarse_metric),
        num_validation_examples: coarse_count(e.num_validation_examples),
    })
    .await?;
    Ok(e)
}

/// What one round will spend under the `agreed` settings: one release of the whole update
/// (site mode; a Skellam release bounded by [`fedee_dp::skellam::worst_case_round`] under
/// distributed DP) or `epochs · ⌈n / b⌉` DP-SGD steps at sampling rate `b / n` (record
/// mode).
///
/// # Errors
/// [`SiteError::Dp`] for a negative or non-finite σ.
pub fn plan(agreed: &RoundPrivacy, settings: &RoundSettings, n: u64) -> Result<Planned, SiteError> {
    let sigma = NoiseMultiplier::new(agreed.noise_multiplier)?.get();
    Ok(match agreed.mode {
        DpMode::Site => Planned {
            sampling_rate: 1.0,
            noise_multiplier: sigma,
            steps: 1,
            skellam: agreed
                .distributed
                .then(|| fedee_dp::skellam::worst_case_round(sigma)),
        },
        DpMode::Record => {
            let b = u64::from(settings.batch_size.max(1));
            Planned {
                sampling_rate: (b as f64 / n.max(1) as f64).min(1.0),
                noise_multiplier: sigma,
                steps: u64::from(settings.epochs) * n.div_ceil(b),
                skellam: None,
            }
        }
    })
}

/// The training step: local training from `global`, then the update the site releases, its
/// norm before clipping (NaN under DP-SGD) and the mean training loss. Site mode clips the
/// whole update to `C` and adds `N(0, (σC)²)`; record mode runs DP-SGD, which already protects
/// every record, and releases the update as trained.
fn train_update(
    cfg: &mut SiteConfig,
    global: &StateDict,
    settings: &RoundSettings,
    mode: DpMode,
    (c, sigma): (ClippingNorm, NoiseMultiplier),
    planned: Planned,
    rng: &mut ChaCha20Rng,
) -> Result<(StateDict, f64, f64), SiteError> {
    match mode {
        DpMode::Site => {
            let (local, loss) = cfg.task.train(global, settings, rng)?;
            let (update, norm) = dp_update(&local, global, c, sigma, cfg.noise, rng)?;
            Ok((update, norm, loss))
        }
        DpMode::Record => {
            let dp = DpSgd {
                clipping_norm: c,
                noise_multiplier: sigma,
                sampling_rate: planned.sampling_rate,
                sampler: cfg.noise,
            };
            let (local, loss) = cfg
                .task
                .train_dpsgd(global, settings, &dp, planned.steps, rng)?;
            let update: StateDict = global
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
            Ok((update, f64::NAN, loss))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedee_proto::v1::Task;

    fn spec(privacy: &str) -> fedee_spec::FederationSpec {
        fedee_spec::FederationSpec::from_toml(&format!(
            r#"
version = 1
[task]
kind = "tabular-classification"
label = "y"
classes = ["0", "1"]
[[features]]
name = "x"
type = "numeric"
[model]
kind = "mlp"
hidden = [4]
[training]
epochs = 2
batch_size = 10
[federation]
rounds = 5
[privacy]
{privacy}
"#
        ))
        .unwrap()
    }

    fn task(mode: &str, sigma: f64) -> Task {
        Task {
            round: 1,
            dp_mode: mode.into(),
            clipping_norm: 1.0,
            noise_multiplier: sigma,
            delta: 1e-5,
            local_epochs: 2,
            batch_size: 10,
            ..Task::default()
        }
    }

    #[test]
    fn a_task_that_departs_from_the_spec_is_refused() {
        let s = spec("mode = \"site\"\nnoise_multiplier = 2.0");
        let agreed = spec_privacy(&s, 100).unwrap();
        assert_eq!(
            (agreed.noise_multiplier, agreed.mode, agreed.delta),
            (2.0, DpMode::Site, 1e-5)
        );
        agreed_privacy(&task("site", 2.0), &s, &agreed).unwrap();
        let hostile = [
            Task {
                noise_multiplier: 0.0,
                ..task("site", 2.0)
            },
            Task {
                noise_multiplier: 1.0,
                ..task("site", 2.0)
            },
            Task {
                noise_multiplier: f64::NAN,
                ..task("site", 2.0)
            },
            Task {
                clipping_norm: 100.0,
                ..task("site", 2.0)
            },
            Task {
                delta: 1.0,
                ..task("site", 2.0)
            },
            Task {
                delta: 1e300,
                ..task("site", 2.0)
            },
            Task {
                local_epochs: 50,
                ..task("site", 2.0)
            },
            task("record", 2.0),
            task("", 2.0),
        ];
        for t in hostile {
            let e = agreed_privacy(&t, &s, &agreed).unwrap_err();
            assert!(
                matches!(&e, SiteError::Refused(m) if m.contains("federation spec this site agreed to")),
                "{t:?}: {e}"
            );
        }
    }

    #[test]
    fn a_target_epsilon_is_calibrated_to_the_sites_own_data() {
        let s = spec("mode = \"record\"\ntarget_epsilon = 1.0");
        let a = spec_privacy(&s, 40).unwrap();
        let b = spec_privacy(&s, 4000).unwrap();
        agreed_privacy(&task("record", 0.0), &s, &a).unwrap();
        assert!(
            a.noise_multiplier > b.noise_multiplier,
            "a small site needs more noise: {a:?} {b:?}"
        );
        for (n, sigma) in [(40u64, a.noise_multiplier), (4000, b.noise_multiplier)] {
            let q = 10.0 / n as f64;
            let steps = 5 * 2 * n.div_ceil(10);
            let mut acc = fedee_dp::rdp::RdpAccountant::default();
            acc.add(q, sigma, steps).unwrap();
            let eps = acc.epsilon(1e-5).0;
            assert!(eps <= 1.0 && eps > 0.99, "n = {n}: ε = {eps}");
        }
        // The aggregator must not send its own σ here.
        let e = agreed_privacy(&task("record", 3.0), &s, &a).unwrap_err();
        assert!(matches!(e, SiteError::Refused(_)), "{e}");
        // Site mode: one σ for every site, the aggregator's calibration checked.
        let s = spec("mode = \"site\"\ntarget_epsilon = 1.0");
        let sigma = fedee_dp::SiteLevelAccountant::calibrate(5, 1.0, 1e-5)
            .unwrap()
            .get();
        let agreed = spec_privacy(&s, 40).unwrap();
        assert_eq!(agreed.noise_multiplier, sigma);
        agreed_privacy(&task("site", sigma), &s, &agreed).unwrap();
        assert!(agreed_privacy(&task("site", sigma * 0.5), &s, &agreed).is_err());
    }
}
