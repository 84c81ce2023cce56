//! The fedee aggregator: the federation service run by the consortium coordinator.
//!
//! It enrols sites, opens rounds, serves the global model, validates and persists sites'
//! updates, aggregates them with FedAvg weighted by `num_examples` or a robust or adaptive rule
//! ([`strategy`]; mean-based rules from a running mean folded as updates are accepted,
//! [`running_mean`], robust rules slice by slice from the blob files), and accounts
//! the privacy spent (site-level unit, zCDP via OpenDP, see `fedee-dp`).
//!
//! # Architecture invariant
//! This crate does not link libtorch: updates are flat f32 tensors read with the `safetensors`
//! crate ([`tensors`]). Aggregation is a pure function; IO lives in [`store`] and [`service`].

pub mod blobs;
pub mod cli;
pub mod dashboard;
pub mod metrics;
mod round;
pub mod running_mean;
pub mod secure;
mod service;
pub mod store;
pub mod strategy;
pub mod tensors;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedee_dp::{ClippingNorm, NoiseMultiplier};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use service::Federation;

/// Aggregator errors.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// Invalid configuration, detected before any port is bound.
    #[error("invalid aggregator config: {0}")]
    Config(String),
    /// An update (or model) that fails validation.
    #[error("invalid update: {0}")]
    InvalidUpdate(String),
    /// Database failure (details are logged, never sent to clients).
    #[error("database: {0}")]
    Database(#[source] sqlx::Error),
    /// The database cannot be opened (the URL without its password).
    #[error("cannot open the database {url}: {source}")]
    DatabaseOpen {
        /// The database URL, password redacted.
        url: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// The database schema cannot be migrated.
    #[error("migrating the database schema: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// The blob store's contents are wrong: a blob missing, corrupt (its bytes hash to
    /// another name), or a name that is not a SHA-256.
    #[error("blob store: {0}")]
    Blob(String),
    /// The blob store's disk failed (names what was being done).
    #[error("blob store: {what}: {source}")]
    BlobIo {
        /// What was being done, naming the file or blob.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A worker task panicked or was cancelled (a bug: please report it with the log).
    #[error("{what} failed: {source}")]
    Worker {
        /// The task.
        what: &'static str,
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Privacy accounting failure.
    /// The aggregated global model has a NaN or ±Inf (every update was finite, but their
    /// weighted mean overflowed f32, or an adaptive strategy diverged): the round fails and
    /// the global model stays the previous one.
    #[error("the aggregated global model is not finite: {0}")]
    NonFiniteModel(String),
    #[error("privacy accounting: {0}")]
    Dp(#[from] fedee_dp::DpError),
    /// Transport failure.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Federation settings. `Default` gives the CLI's defaults (an in-memory-free SQLite file in
/// the working directory, site-level DP with σ = 0.1 over 20 rounds, and so on); `Debug`
/// hides the database password.
#[derive(Clone)]
pub struct Config {
    /// sqlx database URL: `sqlite://aggregator.db?mode=rwc` (embedded) or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`.
    pub database_url: String,
    /// Folder of the content-addressed blob store (global models and updates, by SHA-256).
    pub blob_dir: PathBuf,
    /// How long a round stays open (round 1: from the moment the quorum has joined). At the
    /// deadline the round closes if `min_sites` sites submitted, else it fails.
    pub round_timeout: Duration,
    /// Serve Prometheus metrics at `http://ADDR/metrics`; `None` disables them.
    pub metrics_listen: Option<SocketAddr>,
    /// Number of FedAvg rounds.
    pub rounds: u32,
    /// Quorum: a round closes once at least this many sites submitted and either every
    /// enrolled site did or the deadline passed; without a quorum at the deadline it fails.
    pub min_sites: u32,
    /// Where DP noise is added: `Site` (each site's update; accounted here) or `Record`
    /// (DP-SGD inside each site; sites account and report their ε with each update).
    pub dp_mode: fedee_dp::DpMode,
    /// Clipping norm `C`: of each site's whole update (site mode) or of each example's
    /// gradient (record mode).
    pub clipping_norm: ClippingNorm,
    /// Noise multiplier `σ`: noise std `σC` per coordinate of the update (site mode) or of the
    /// summed clipped gradient of each DP-SGD step (record mode).
    pub noise_multiplier: NoiseMultiplier,
    /// How updates are combined (FedAvg, FedAdam, FedYogi, median, trimmed mean).
    pub strategy: strategy::Strategy,
    /// FedProx proximal coefficient μ sent to sites (0 = plain local training).
    pub proximal_mu: f64,
    /// δ at which ε is reported.
    pub delta: f64,
    /// Local epochs per round.
    pub local_epochs: u32,
    /// Local learning rate.
    pub learning_rate: f64,
    /// Local batch size.
    pub batch_size: u32,
    /// Initial global model (safetensors, F32); required when the database is new.
    pub initial_model: Option<Vec<u8>>,
    /// Mutual TLS: the aggregator's certificate and the consortium CA that verifies sites.
    /// `None` serves plaintext gRPC (the CLI requires `--insecure` for that) and lets any
    /// site join by the name it claims.
    pub tls: Option<fedee_proto::pki::TlsFiles>,
    /// Sites to enrol at start (with TLS, only enrolled sites may join).
    pub enroll: Vec<String>,
    /// Updates received at the same time; further uploads wait (their bytes stay in the
    /// sender's flow-control window). Each upload in progress holds about 2 MiB.
    pub max_concurrent_uploads: usize,
    /// Which rounds' updates are written with direct I/O, bypassing the page cache: by
    /// default those larger than the kernel's background write-back threshold.
    pub direct_io: blobs::DirectIo,
    /// The federation spec, stored with the federation and served to sites (`GetSpec`); the
    /// initial model must have its MLP's parameter shapes. `None`: sites bring their own task.
    pub spec: Option<fedee_spec::SignedSpec>,
    /// The largest ε (at δ, for one site over the whole federation) the aggregator starts
    /// with; [`Config::validate`] refuses a configuration that plans more. Raise it only on
    /// purpose (`f64::INFINITY` accepts anything).
    pub max_epsilon: f64,
    /// The largest `num_examples` an update may carry (its FedAvg weight): larger ones are
    /// refused. From the spec's `federation.max_num_examples` when there is one.
    pub max_num_examples: u64,
    /// Secure aggregation (from the spec's `[federation.secure_aggregation]`): rounds run the
    /// `fedee-secagg` protocol and the aggregator sees only the sum of the updates. `None`:
    /// updates arrive in the clear.
    pub secure_aggregation: Option<fedee_spec::SecureAggregation>,
    /// Serve the operator's dashboard ([`dashboard`]); `None` disables it.
    pub dashboard: Option<DashboardConfig>,
}

/// Where and for whom the dashboard is served.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    /// Address to listen on (HTTPS when the aggregator has TLS).
    pub listen: SocketAddr,
    /// SHA-256 of the bearer token it accepts; `None`: operator certificates only.
    pub token_sha256: Option<[u8; 32]>,
}

/// The largest ε a federation may plan unless the coordinator raises the limit.
pub const DEFAULT_MAX_EPSILON: f64 = 10.0;

/// What a configuration plans to spend, for one site over the whole federation.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedPrivacy {
    /// ε at the configuration's δ (an upper bound in record mode with a fixed σ).
    pub epsilon: f64,
    /// How it was obtained, for the operator.
    pub how: String,
    /// Whether `epsilon` is only a worst case over sites this aggregator cannot see (record
    /// mode with a fixed σ: a site's spend depends on its number of records, and each site
    /// enforces its own budget). Such a plan is printed as a warning, not refused.
    pub worst_case: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "sqlite://fedee-aggregator.db?mode=rwc".into(),
            blob_dir: PathBuf::from("fedee-blobs"),
            round_timeout: Duration::from_secs(600),
            metrics_listen: None,
            rounds: 20,
            min_sites: 3,
            dp_mode: fedee_dp::DpMode::Site,
            clipping_norm: ClippingNorm::new(cli::CLIPPING_NORM).expect("positive"),
            noise_multiplier: NoiseMultiplier::new(cli::NOISE_MULTIPLIER).expect("positive"),
            strategy: strategy::Strategy::FedAvg,
            proximal_mu: 0.0,
            delta: 1e-5,
            local_epochs: cli::LOCAL_EPOCHS,
            learning_rate: cli::LEARNING_RATE,
            batch_size: cli::BATCH_SIZE,
            initial_model: None,
            tls: None,
            enroll: vec![],
            max_concurrent_uploads: 4,
            direct_io: blobs::DirectIo::Auto,
            spec: None,
            max_epsilon: DEFAULT_MAX_EPSILON,
            max_num_examples: fedee_spec::DEFAULT_MAX_NUM_EXAMPLES,
            secure_aggregation: None,
            dashboard: None,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &store::redact_password(&self.database_url))
            .field("blob_dir", &self.blob_dir)
            .field("round_timeout", &self.round_timeout)
            .field("metrics_listen", &self.metrics_listen)
            .field("rounds", &self.rounds)
            .field("min_sites", &self.min_sites)
            .field("dp_mode", &self.dp_mode)
            .field("clipping_norm", &self.clipping_norm)
            .field("noise_multiplier", &self.noise_multiplier)
            .field("strategy", &self.strategy)
            .field("proximal_mu", &self.proximal_mu)
            .field("delta", &self.delta)
            .field("local_epochs", &self.local_epochs)
            .field("learning_rate", &self.learning_rate)
            .field("batch_size", &self.batch_size)
            .field(
                "initial_model",
                &self
                    .initial_model
                    .as_ref()
                    .map(|m| format!("{} bytes", m.len())),
            )
            .field("tls", &self.tls)
            .field("enroll", &self.enroll)
            .field("max_concurrent_uploads", &self.max_concurrent_uploads)
            .field("direct_io", &self.direct_io)
            .field("spec", &self.spec.as_ref().map(|s| &s.sha256))
            .field("max_epsilon", &self.max_epsilon)
            .field("max_num_examples", &self.max_num_examples)
            .field("secure_aggregation", &self.secure_aggregation)
            .finish()
    }
}

impl Config {
    /// This config with the settings a federation spec decides: rounds, quorum, deadline,
    /// strategy, DP mode, `C`, `σ`, δ and local training; the spec is stored with the
    /// federation and served to sites. A target ε becomes `σ` here in site mode (one `σ` for
    /// every round); in record mode each site calibrates its own and tasks carry `σ = 0`.
    ///
    /// # Errors
    /// [`AggregatorError::Config`] for a strategy this build lacks; [`AggregatorError::Dp`]
    /// for a target ε out of reach over the spec's rounds.
    pub fn with_spec(mut self, signed: fedee_spec::SignedSpec) -> Result<Self, AggregatorError> {
        let s = &signed.spec;
        let f = &s.federation;
        let p = &s.privacy;
        self.rounds = f.rounds;
        self.min_sites = f.min_sites;
        self.round_timeout = Duration::from_secs_f64(f.round_timeout_s);
        self.strategy = strategy::Strategy::parse(
            &f.strategy,
            strategy::FedOpt {
                lr: f.server_lr,
                ..Default::default()
            },
            f.trim_fraction,
        )?;
        self.proximal_mu = f.proximal_mu;
        self.max_num_examples = f.max_num_examples;
        self.secure_aggregation = f.secure_aggregation.clone();
        self.dp_mode = match p.mode {
            fedee_spec::PrivacyMode::Site => fedee_dp::DpMode::Site,
            fedee_spec::PrivacyMode::Record => fedee_dp::DpMode::Record,
        };
        self.clipping_norm = ClippingNorm::new(p.clipping_norm)?;
        self.noise_multiplier = match (p.noise_multiplier, p.target_epsilon, p.mode) {
            (Some(sigma), _, _) => NoiseMultiplier::new(sigma)?,
            (None, Some(eps), fedee_spec::PrivacyMode::Site) => {
                fedee_dp::site_level_sigma(f.rounds, eps, p.delta, s.distributed_dp())?
            }
            (None, _, _) => NoiseMultiplier::new(0.0)?,
        };
        self.delta = p.delta;
        self.local_epochs = s.training.epochs;
        self.learning_rate = s.training.learning_rate;
        self.batch_size = s.training.batch_size;
        self.spec = Some(signed);
        Ok(self)
    }

    /// # Errors
    /// [`AggregatorError::Config`] naming the first bad value.
    pub fn validate(&self) -> Result<(), AggregatorError> {
        let bad = |m: String| Err(AggregatorError::Config(m));
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        if self.max_concurrent_uploads == 0 {
            return bad("max concurrent uploads must be at least 1".into());
        }
        if self.min_sites == 0 {
            return bad("min_sites must be at least 1".into());
        }
        if self.max_num_examples == 0 {
            return bad("max num_examples must be at least 1".into());
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad(format!("delta must be in (0, 1), got {}", self.delta));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "learning rate must be positive, got {}",
                self.learning_rate
            ));
        }
        store::Backend::of(&self.database_url)?;
        if self.round_timeout < Duration::from_millis(100) {
            return bad(format!(
                "round timeout must be at least 0.1 s, got {:?}",
                self.round_timeout
            ));
        }
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return bad(format!(
                "proximal mu must be finite and >= 0, got {}",
                self.proximal_mu
            ));
        }
        if self.batch_size == 0 || self.local_epochs == 0 {
            return bad("batch size and local epochs must be at least 1".into());
        }
        if self.secure_aggregation.is_some() {
            if !self.strategy.is_mean_based() {
                return bad(format!(
                    "strategy {:?} needs every site's update, but secure aggregation reveals only their sum: use fedavg, fedprox, fedadam or fedyogi",
                    self.strategy
                ));
            }
            if self.min_sites < 3 {
                return bad(format!(
                    "secure aggregation needs a quorum of at least 3 sites, got min_sites = {}",
                    self.min_sites
                ));
            }
            if self.distributed_dp()
                != self
                    .secure_aggregation
                    .as_ref()
                    .is_some_and(|s| s.distributed_dp)
            {
                return bad(
                    "distributed DP splits site-level noise across sites: use site-level DP (dp mode site)"
                        .into(),
                );
            }
        }
        let planned = self.planned_privacy()?;
        if !planned.worst_case && (planned.epsilon.is_nan() || planned.epsilon > self.max_epsilon) {
            return bad(format!(
                "this configuration plans ε = {:.4} at δ = {:e} for a site ({}), above the limit ε = {}: raise σ (--noise-multiplier or the spec's privacy) or lower the rounds, or, to accept it on purpose, pass --max-epsilon {}",
                planned.epsilon,
                self.delta,
                planned.how,
                self.max_epsilon,
                if planned.epsilon.is_finite() {
                    format!("{:.0}", planned.epsilon.ceil())
                } else {
                    "inf".to_owned()
                }
            ));
        }
        Ok(())
    }

    /// Whether rounds run distributed DP (site mode over secure aggregation with
    /// `distributed_dp`): the sites add Skellam noise that only sums to `σC`.
    pub fn distributed_dp(&self) -> bool {
        self.dp_mode == fedee_dp::DpMode::Site
            && self
                .secure_aggregation
                .as_ref()
                .is_some_and(|s| s.distributed_dp)
    }

    /// Site-level privacy after `rounds` rounds, `(zCDP ρ, ε)` at the configured δ: the
    /// Gaussian mechanism through OpenDP, or under distributed DP the Skellam bound of
    /// [`fedee_dp::skellam::worst_case_round`] over RDP orders (ρ is then reported as 0: not
    /// zCDP-accounted).
    ///
    /// # Errors
    /// [`AggregatorError::Dp`] if the accountant rejects the parameters.
    pub fn site_level_spent(&self, rounds: u32) -> Result<(f64, f64), AggregatorError> {
        if self.distributed_dp() {
            let round = fedee_dp::skellam::worst_case_round(self.noise_multiplier.get());
            return Ok((
                0.0,
                fedee_dp::skellam::spent(round, u64::from(rounds), self.delta),
            ));
        }
        let s = fedee_dp::SiteLevelAccountant::new(
            self.clipping_norm,
            self.noise_multiplier,
            self.delta,
        )?
        .spent(rounds)?;
        Ok((s.rho, s.epsilon))
    }

    /// The ε one site spends over the whole federation under this configuration: site mode,
    /// `rounds` Gaussian releases of its update at `σ` (zCDP through OpenDP, as `Status`
    /// reports it); record mode with a target ε, the target (each site calibrates to it);
    /// record mode with a fixed `σ`, the RDP of `rounds × local_epochs` DP-SGD steps at
    /// sampling rate 1: what a site with at most `batch_size` records spends (a worst case:
    /// larger sites spend less; [`PlannedPrivacy::worst_case`]).
    ///
    /// # Errors
    /// [`AggregatorError::Dp`] for values no mechanism accepts.
    pub fn planned_privacy(&self) -> Result<PlannedPrivacy, AggregatorError> {
        let sigma = self.noise_multiplier.get();
        let target = self
            .spec
            .as_ref()
            .and_then(|s| s.spec.privacy.target_epsilon);
        Ok(match (self.dp_mode, target) {
            (fedee_dp::DpMode::Site, _) if self.distributed_dp() => PlannedPrivacy {
                epsilon: self.site_level_spent(self.rounds)?.1,
                how: format!(
                    "site-level, distributed: {} Skellam releases of the secure sum at central σ = {sigma}",
                    self.rounds
                ),
                worst_case: false,
            },
            (fedee_dp::DpMode::Site, _) => PlannedPrivacy {
                epsilon: self.site_level_spent(self.rounds)?.1,
                how: format!(
                    "site-level: {} releases of its update at σ = {sigma}",
                    self.rounds
                ),
                worst_case: false,
            },
            (fedee_dp::DpMode::Record, Some(t)) => PlannedPrivacy {
                epsilon: t,
                how: "record-level: each site calibrates its σ to the spec's target ε".into(),
                worst_case: false,
            },
            (fedee_dp::DpMode::Record, None) => {
                let steps = u64::from(self.rounds) * u64::from(self.local_epochs);
                let mut acc = fedee_dp::rdp::RdpAccountant::default();
                acc.add(1.0, sigma, steps)?;
                PlannedPrivacy {
                    epsilon: acc.epsilon(self.delta).0,
                    how: format!(
                        "record-level, worst case: {steps} DP-SGD steps at σ = {sigma} for a site with at most {} records; larger sites spend less, and each enforces its own budget",
                        self.batch_size
                    ),
                    worst_case: true,
                }
            }
        })
    }
}

/// HTTP/2 stream and connection flow-control window of the aggregator, in bytes.
const UPLOAD_WINDOW: u32 = 256 << 10;

/// Serve the federation on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// Invalid config, database or transport failures.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AggregatorError> {
    let tls = config
        .tls
        .as_ref()
        .map(|t| t.server())
        .transpose()
        .map_err(|e| AggregatorError::Config(format!("TLS: {e}")))?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            AggregatorError::Config(format!("cannot bind the metrics address {addr}: {e}"))
        })?),
        None => None,
    };
    let dashboard = match &config.dashboard {
        Some(d) => {
            if d.token_sha256.is_none() && config.tls.is_none() {
                return Err(AggregatorError::Config(
                    "the dashboard needs a token (--dashboard-token-hash) without TLS: there are no operator certificates to check".into(),
                ));
            }
            let https = config
                .tls
                .as_ref()
                .map(|t| t.https_server_config())
                .transpose()
                .map_err(|e| AggregatorError::Config(format!("dashboard TLS: {e}")))?;
            let listener = TcpListener::bind(d.listen).await.map_err(|e| {
                AggregatorError::Config(format!(
                    "cannot bind the dashboard address {}: {e}",
                    d.listen
                ))
            })?;
            Some((
                listener,
                https,
                d.token_sha256,
                dashboard::data::Info::of(&config)?,
            ))
        }
        None => None,
    };
    let metrics = metrics::Metrics::new();
    let svc = Federation::start(config, metrics.clone()).await?;
    if let Some((l, https, token, info)) = dashboard {
        let addr = l
            .local_addr()
            .map_err(|e| AggregatorError::Config(e.to_string()))?;
        let scheme = if https.is_some() { "https" } else { "http" };
        tracing::info!(url = %format!("{scheme}://{addr}/"), "serving the dashboard");
        fedee_proto::cli::notice(false, &format!("dashboard at {scheme}://{addr}/"));
        let d =
            dashboard::Dashboard::new(svc.store(), metrics.clone(), info, token, https.is_some());
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = dashboard::serve(d, l, https, token).await {
                tracing::error!(error = %e, "dashboard stopped");
            }
        });
    }
    if let Some(l) = metrics_listener {
        let addr = l
            .local_addr()
            .map_err(|e| AggregatorError::Config(e.to_string()))?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(metrics, l, token).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    // Deadlines: close or fail the open round when due, even if no site calls in.
    let ticker = svc.clone();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                _ = every.tick() => {
                    if let Err(e) = ticker.tick().await {
                        tracing::error!(error = %e, "round check failed; retrying");
                    }
                }
            }
        }
    });
    // TCP_NODELAY: without it, Nagle's algorithm holds HTTP/2 window updates back behind
    // delayed ACKs and a 1 MiB chunk stream crawls at ~44 MB/s per upload (measured).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    // Small HTTP/2 flow-control windows: a site waiting for an upload slot
    // (`max_concurrent_uploads`) can park at most this much data in the aggregator's memory,
    // so memory does not grow with the number of sites (hyper's default is 1 MiB each).
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(UPLOAD_WINDOW))
        .initial_connection_window_size(Some(UPLOAD_WINDOW));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    // Standard gRPC health checking (grpc.health.v1) for load balancers and orchestrators.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<fedee_proto::v1::federation_server::FederationServer<Federation>>()
        .await;
    builder
        .add_service(health_service)
        .add_service(svc.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}
