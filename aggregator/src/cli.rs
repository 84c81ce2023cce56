//! The aggregator's command line, shared by `fedee aggregator` and the libtorch-free
//! `fedee-aggregator` binary (same flags, same behaviour; the latter does not load libtorch,
//! which saves about 365 MB of resident memory).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use fedee_dp::{ClippingNorm, NoiseMultiplier};
use fedee_proto::cli::{TransportArgs, notice, serve_with_grace, shutdown_on_signals};

/// Default L2 clipping norm C (of a site's update, or of an example's gradient).
pub const CLIPPING_NORM: f64 = 1.0;
/// Default noise multiplier σ.
pub const NOISE_MULTIPLIER: f64 = 0.1;
/// Default local epochs per round.
pub const LOCAL_EPOCHS: u32 = 2;
/// Default local SGD learning rate.
pub const LEARNING_RATE: f64 = 0.05;
/// Default local batch size.
pub const BATCH_SIZE: u32 = 16;

/// Run the federation service (rounds, FedAvg, privacy accounting).
#[derive(clap::Args)]
pub struct AggregatorArgs {
    /// Address to listen on (port 0 picks a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Database URL: sqlite://PATH?mode=rwc (embedded; the file is created if missing) or
    /// postgres://USER:PASSWORD@HOST:PORT/DATABASE. Holds rounds, sites, update metadata,
    /// metrics and the privacy spent.
    #[arg(
        long,
        env = "FEDEE_DATABASE_URL",
        default_value = "sqlite://fedee-aggregator.db?mode=rwc"
    )]
    pub database_url: String,
    /// Folder of the content-addressed blob store: global models and accepted updates, one
    /// file per SHA-256, fsynced before a site's update is acknowledged. Back it up with the
    /// database.
    #[arg(long, default_value = "fedee-blobs")]
    pub blob_dir: PathBuf,
    /// Seconds a round stays open (round 1: from when --min-sites sites have joined). At the
    /// deadline the round closes if --min-sites sites submitted, else it fails and the next
    /// round starts from the same global model; later updates are rejected as stale.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub round_timeout: f64,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; port 0 picks a
    /// free port, printed at start). Off unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the operator's dashboard at ADDR: live rounds, sites, metrics, privacy and
    /// updates, read-only, with a JSON twin of every page under /api/. HTTPS with the
    /// aggregator's certificate when it runs with TLS (an operator certificate or the token
    /// signs in; site certificates are refused), plain HTTP on --insecure (token only). Off
    /// unless given; the flag alone serves on 127.0.0.1:8443.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8443")]
    pub dashboard_listen: Option<SocketAddr>,
    /// File holding the SHA-256 of the dashboard's bearer token: `fedee certs
    /// dashboard-token --out FILE` makes one and prints the token once (the token itself is
    /// never stored). Without it only operator certificates open the dashboard.
    #[arg(long, value_name = "FILE", requires = "dashboard_listen")]
    pub dashboard_token_hash: Option<PathBuf>,
    /// Initial global model (safetensors, from `fedee init-model`); needed on a new database.
    #[arg(long)]
    pub initial_model: Option<PathBuf>,
    /// Number of FedAvg rounds.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// Quorum: sites that must submit for a round to close (it closes early once every
    /// enrolled site has submitted).
    #[arg(long, default_value_t = 3)]
    pub min_sites: u32,
    /// Where differential privacy acts. `site`: each site clips its whole update to
    /// --clipping-norm and adds Gaussian noise (unit: a site's update; accounted here in zCDP).
    /// `record`: DP-SGD inside each site with per-example clipping to --clipping-norm, noise
    /// multiplier --noise-multiplier and sampling rate batch-size / site examples (unit: a
    /// patient record; each site accounts with an RDP accountant, enforces its own
    /// --epsilon-budget and reports its ε).
    #[arg(long, default_value = "site", value_parser = ["site", "record"])]
    pub dp_mode: String,
    /// How a round's updates are combined: `fedavg` (weighted by num_examples); `fedprox`
    /// (FedAvg aggregation, sites add the proximal term --proximal-mu); `fedadam` / `fedyogi`
    /// (server optimizers, Reddi et al. 2021, learning rate --server-lr); `median` or
    /// `trimmed-mean` (coordinate-wise, robust to a minority of poisoned updates; unweighted;
    /// hold every update in memory).
    #[arg(long, default_value = "fedavg", value_parser = ["fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed-mean"])]
    pub strategy: String,
    /// FedAdam / FedYogi server learning rate η.
    #[arg(long, default_value_t = 0.01)]
    pub server_lr: f64,
    /// Trimmed mean: fraction of values dropped at each end per coordinate, in [0, 0.5).
    #[arg(long, default_value_t = 0.1)]
    pub trim_fraction: f64,
    /// FedProx proximal coefficient μ (sites add μ/2 ‖w − w_global‖² to the local loss).
    #[arg(long, default_value_t = 0.0)]
    pub proximal_mu: f64,
    /// L2 clipping norm C: of each site's update (site mode) or of each example's gradient
    /// (record mode).
    #[arg(long, default_value_t = CLIPPING_NORM)]
    pub clipping_norm: f64,
    /// Noise multiplier σ: Gaussian noise of std σ·C per coordinate.
    #[arg(long, default_value_t = NOISE_MULTIPLIER)]
    pub noise_multiplier: f64,
    /// δ at which ε is reported.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Local epochs per round.
    #[arg(long, default_value_t = LOCAL_EPOCHS)]
    pub local_epochs: u32,
    /// Local SGD learning rate.
    #[arg(long, default_value_t = LEARNING_RATE)]
    pub learning_rate: f64,
    /// Local batch size.
    #[arg(long, default_value_t = BATCH_SIZE)]
    pub batch_size: u32,
    /// Enrol a site (repeatable): with mutual TLS only enrolled sites may join, identified by
    /// their certificate's name.
    #[arg(long = "enroll", value_name = "SITE")]
    pub enroll: Vec<String>,
    /// Updates received at the same time (each holds about 2 MiB while it streams to disk);
    /// further sites wait their turn. Raise it on fast disks with many sites.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent_uploads: usize,
    /// Write updates with direct I/O (O_DIRECT, bypassing the page cache) in rounds whose
    /// updates add up to more than this: `auto` (the size at which Linux starts writing dirty
    /// pages back, vm.dirty_background_ratio of available memory, logged at start), a size
    /// in MB (0: every round), or `off`. A large round then ingests at the disk's direct
    /// write rate instead of being throttled by the page cache's write-back, and its close
    /// reads the updates from disk. Ignored where the filesystem refuses O_DIRECT.
    #[arg(long, value_name = "auto|off|MB", default_value = "auto")]
    pub direct_io: crate::blobs::DirectIo,
    /// Federation spec (TOML; `fedee init --data FILE --label COLUMN` scaffolds one): task,
    /// features, model, local training, rounds, quorum, deadline, strategy and DP. Validated
    /// before any port is bound, stored with the federation (restart with the same file) and
    /// served to sites, which train what it says on their own data. The flags it covers
    /// (--rounds, --min-sites, --round-timeout, --strategy, --dp-mode, --noise-multiplier,
    /// ...) are refused next to it.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "rounds", "min_sites", "round_timeout", "dp_mode", "strategy", "server_lr",
        "trim_fraction", "proximal_mu", "clipping_norm", "noise_multiplier", "delta",
        "local_epochs", "learning_rate", "batch_size", "max_num_examples",
    ])]
    pub spec: Option<PathBuf>,
    /// The largest ε (at δ, for one site over the whole federation) this aggregator starts
    /// with: a configuration that plans more is refused, naming its ε. Raise it only on
    /// purpose (`inf` accepts anything). The planned ε is printed at start.
    #[arg(long, default_value_t = crate::DEFAULT_MAX_EPSILON)]
    pub max_epsilon: f64,
    /// The largest `num_examples` (FedAvg weight) an update may carry; larger ones are
    /// refused. A spec sets it as `federation.max_num_examples`.
    #[arg(long, default_value_t = fedee_spec::DEFAULT_MAX_NUM_EXAMPLES)]
    pub max_num_examples: u64,
    #[command(flatten)]
    pub transport: TransportArgs,
}

/// Run the aggregator until its rounds are done or SIGINT/SIGTERM (then drain in-flight calls
/// for at most [`fedee_proto::cli::GRACE_PERIOD`]).
///
/// # Errors
/// Bad flags (naming the flag), an unreadable initial model, a port that cannot be bound, or
/// the service failing (see [`crate::AggregatorError`]).
pub async fn run(a: AggregatorArgs) -> Result<()> {
    let spec = match a.spec.clone() {
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("reading the federation spec {}", p.display()))?;
            let spec = fedee_spec::SignedSpec::parse(&text)
                .with_context(|| format!("{} is not a valid federation spec", p.display()))?;
            notice(
                false,
                &format!(
                    "federation spec {} (sha256 {}): {}",
                    p.display(),
                    &spec.sha256[..12],
                    spec.spec.summary()
                ),
            );
            Some(spec)
        }
        None => None,
    };
    let initial_model = a
        .initial_model
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("reading initial model {}", p.display())))
        .transpose()?;
    let config = crate::Config {
        database_url: a.database_url,
        blob_dir: a.blob_dir,
        round_timeout: Duration::try_from_secs_f64(a.round_timeout).map_err(|_| {
            anyhow::anyhow!(
                "--round-timeout must be a positive number of seconds, got {}",
                a.round_timeout
            )
        })?,
        metrics_listen: a.metrics_listen,
        rounds: a.rounds,
        min_sites: a.min_sites,
        clipping_norm: ClippingNorm::new(a.clipping_norm)?,
        noise_multiplier: NoiseMultiplier::new(a.noise_multiplier)?,
        dp_mode: a.dp_mode.parse()?,
        strategy: crate::strategy::Strategy::parse(
            &a.strategy,
            crate::strategy::FedOpt {
                lr: a.server_lr,
                ..Default::default()
            },
            a.trim_fraction,
        )?,
        proximal_mu: a.proximal_mu,
        delta: a.delta,
        local_epochs: a.local_epochs,
        learning_rate: a.learning_rate,
        batch_size: a.batch_size,
        initial_model,
        tls: a.transport.resolve("aggregator")?,
        enroll: a.enroll,
        max_concurrent_uploads: a.max_concurrent_uploads,
        direct_io: a.direct_io,
        spec: None,
        max_epsilon: a.max_epsilon,
        max_num_examples: a.max_num_examples,
        secure_aggregation: None,
        dashboard: match a.dashboard_listen {
            Some(listen) => Some(crate::DashboardConfig {
                listen,
                token_sha256: a
                    .dashboard_token_hash
                    .as_deref()
                    .map(crate::dashboard::read_token_hash)
                    .transpose()?,
            }),
            None => None,
        },
    };
    let config = match spec {
        Some(s) => config.with_spec(s)?,
        None => config,
    };
    config.validate()?;
    let planned = config.planned_privacy()?;
    let loud = planned.worst_case && planned.epsilon > config.max_epsilon;
    notice(
        loud,
        &format!(
            "{}privacy: a site spends up to ε = {:.4} at δ = {:e} over {} rounds ({}; unit: {})",
            if loud { "WARNING: " } else { "" },
            planned.epsilon,
            config.delta,
            config.rounds,
            planned.how,
            config.dp_mode.unit()
        ),
    );
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    notice(
        false,
        &format!("aggregator listening on {}", listener.local_addr()?),
    );
    let token = shutdown_on_signals();
    serve_with_grace(token.clone(), crate::run(config, listener, token)).await?;
    notice(false, "aggregator stopped");
    Ok(())
}

/// `fedee status`'s text: sites, rounds, the spec, privacy per site, and each round's metrics
/// per site and weighted by test examples.
pub fn render_status(st: &fedee_proto::v1::StatusResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();

    let sigma = if st.noise_multiplier == 0.0 && st.dp_mode == "record" {
        "σ calibrated at each site".to_owned()
    } else {
        format!("σ = {}", st.noise_multiplier)
    };
    let _ = writeln!(
        out,
        "sites: {}\nround: {}{}\nprivacy unit: {}; C = {}, {sigma}, δ = {:e}",
        st.sites.join(", "),
        st.current_round,
        if st.done { " (done)" } else { "" },
        st.privacy_unit,
        st.clipping_norm,
        st.delta
    );
    if !st.spec_sha256.is_empty() {
        let _ = writeln!(
            out,
            "spec: {} (sha256 {})",
            st.spec_summary,
            &st.spec_sha256[..12.min(st.spec_sha256.len())]
        );
    }
    let _ = writeln!(
        out,
        "DP mode: {}",
        if st.dp_mode.is_empty() {
            "site"
        } else {
            &st.dp_mode
        }
    );
    for d in &st.departed {
        let _ = writeln!(out, "  left: {d}");
    }
    if !st.ended_reason.is_empty() {
        let _ = writeln!(out, "{}", st.ended_reason);
    }
    for sp in &st.site_privacy {
        if let Some(e) = &sp.entry {
            let _ = writeln!(
                out,
                "  {} after round {}: ε = {:.4} at δ = {:e} (unit: {}; {})",
                sp.site, sp.round, e.epsilon, e.delta, e.unit, e.mechanism
            );
        }
    }
    if !st.per_site {
        let _ = writeln!(
            out,
            "(per-site figures are shown to operator certificates only: fedee certs issue --operator NAME)"
        );
    }
    for r in &st.rounds {
        let accs: Vec<String> = r
            .site_metrics
            .iter()
            .map(|m| format!("{} {:.3}", m.site, m.test_accuracy))
            .collect();
        let weighted = r.weighted.as_ref().map(weighted_line).unwrap_or_default();
        let why = if r.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reason)
        };
        // ρ is 0 where the mechanism is not zCDP-accounted (record level, distributed DP).
        let rho = if r.rho == 0.0 && r.epsilon > 0.0 {
            "—".to_owned()
        } else {
            format!("{:.4}", r.rho)
        };
        let _ = writeln!(
            out,
            "round {:>3} {:<6} ρ = {rho:<10} ε = {:<10.4} {}{why}{weighted}",
            r.round,
            r.state,
            r.epsilon,
            accs.join(", ")
        );
    }
    if st.selected_model > 0 {
        let _ = writeln!(
            out,
            "selected: global model {} (round {}), validation accuracy {:.3} weighted over the sites' validation splits; its test metrics above are the estimate to report (`fedee download-model --model selected`)",
            st.selected_model,
            st.selected_model - 1,
            st.selected_validation_accuracy
        );
    }
    out
}

/// `\n    weighted: accuracy …, balanced …, macro-F1 …, AUROC …, validation accuracy …`: the
/// metrics the aggregator weighted over the sites that reported them.
fn weighted_line(w: &fedee_proto::v1::SiteMetric) -> String {
    let parts: Vec<String> = [
        ("accuracy", Some(w.test_accuracy)),
        ("balanced accuracy", w.balanced_accuracy),
        ("macro-F1", w.macro_f1),
        ("AUROC", w.auroc),
        ("validation accuracy", w.validation_accuracy),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.map(|v| format!("{name} {v:.3}")))
    .collect();
    format!("\n    weighted: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use fedee_proto::v1::{RoundStatus, StatusResponse};

    #[test]
    fn a_round_without_zcdp_accounting_shows_no_rho() {
        let round = |round, rho, epsilon| RoundStatus {
            round,
            state: "closed".into(),
            rho,
            epsilon,
            ..RoundStatus::default()
        };
        let text = super::render_status(&StatusResponse {
            rounds: vec![round(1, 0.5, 3.2), round(2, 0.0, 4.1), round(3, 0.0, 0.0)],
            ..StatusResponse::default()
        });
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("round  ")).collect();
        assert!(lines[0].contains("ρ = 0.5000"), "{text}");
        assert!(
            lines[1].contains("ρ = —") && lines[1].contains("ε = 4.1"),
            "{text}"
        );
        assert!(lines[2].contains("ρ = 0.0000"), "{text}");
    }
}
