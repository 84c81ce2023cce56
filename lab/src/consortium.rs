//! What both demos run: a fresh consortium PKI, an aggregator serving a federation spec, site
//! agents each reading its own data file as the spec says, and a trainer. These are the library
//! calls of `fedee certs`, `fedee aggregator --spec`, `fedee site --data [--where]` and
//! `fedee trainer`, on loopback ports in one process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedee_model::{StateDict, state_to_safetensors};
use fedee_proto::pki::TlsFiles;
use fedee_proto::v1::StatusResponse;
use fedee_site_agent::client::{Link, Retry};
use fedee_site_agent::policy::PrivacyPolicy;
use fedee_site_agent::table::{DataReport, RowFilter};
use fedee_spec::{FederationSpec, SignedSpec};
use serde::Serialize;
use tch::Device;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One site of a demo federation: its name (certificate), its data file and the rows of it
/// that are its own (`fedee site --data PATH --where COLUMN=VALUE`).
pub(crate) struct Site {
    pub name: String,
    pub data: PathBuf,
    pub filter: Option<RowFilter>,
    /// Seed of the site's shuffling and DP noise (debugging only; `None` draws from the OS).
    pub seed: Option<u64>,
    /// What the site accepts ([`demo_policy`]).
    pub policy: PrivacyPolicy,
}

/// The privacy policy of a demo's sites: the default (`fedee site`'s), loosened, loudly,
/// only where the demo's own spec asks for less protection, as a hospital would have to do
/// with explicit flags.
pub(crate) fn demo_policy(spec: &fedee_spec::FederationSpec) -> PrivacyPolicy {
    let mut p = PrivacyPolicy::default();
    let privacy = &spec.privacy;
    if let Some(s) = privacy.noise_multiplier
        && s < p.min_noise_multiplier
    {
        eprintln!(
            "[demo] WARNING: the spec's σ = {s} gives no meaningful differential privacy; the demo's sites accept it explicitly (fedee site --min-noise-multiplier {s} --epsilon-budget inf)"
        );
        p.min_noise_multiplier = s;
        p.epsilon_budget = f64::INFINITY;
    }
    if let Some(t) = privacy.target_epsilon
        && t > p.epsilon_budget
    {
        eprintln!(
            "[demo] the spec targets ε = {t}, above a site's default budget of ε = {}; the demo's sites accept it explicitly (fedee site --epsilon-budget {t} --min-noise-multiplier 0)",
            p.epsilon_budget
        );
        p.epsilon_budget = t;
        p.min_noise_multiplier = 0.0;
    }
    p
}

/// A finished federation: the aggregator's last status, each site's data report, and the
/// link the status came through (to download models). The aggregator keeps serving until
/// the consortium's shutdown token is cancelled.
pub(crate) struct Federation {
    pub status: StatusResponse,
    pub data: BTreeMap<String, DataReport>,
    /// Each site's own report (its ledger: σ, q and steps stay at the site).
    pub sites: BTreeMap<String, fedee_site_agent::SiteReport>,
    pub link: Link,
    pub aggregator: JoinHandle<Result<(), fedee_aggregator::AggregatorError>>,
}

/// One round's test accuracy per site and weighted by test examples.
#[derive(Serialize)]
pub(crate) struct RoundReport {
    pub round: u32,
    pub site_accuracy: BTreeMap<String, f64>,
    pub weighted_accuracy: f64,
    pub epsilon: f64,
}

/// A scratch folder for one demo run, with the consortium's PKI in `pki/`: a CA, server
/// certificates for the aggregator and the trainer, a client certificate for pharma (the key
/// holder), and one site certificate per site.
pub(crate) struct Consortium {
    pub work: PathBuf,
    pub pki: PathBuf,
    pub shutdown: CancellationToken,
    pub device: Device,
}

impl Consortium {
    pub(crate) fn new(sites: &[&str], device: Device) -> Result<Self> {
        let work = std::env::temp_dir().join(format!(
            "fedee-demo-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        Ok(Self {
            pki: pki(&work, sites)?,
            work,
            shutdown: CancellationToken::new(),
            device,
        })
    }

    /// The TLS files of `name`'s certificate.
    pub(crate) fn tls(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.pki, name)
    }

    /// Run the federation `signed` describes from `initial` with `sites`, printing one line
    /// per closed round, until it is done.
    ///
    /// # Errors
    /// A site whose data cannot satisfy the spec (before anything starts), a site agent that
    /// fails, or a federation that stops before its last round.
    pub(crate) async fn federate(
        &self,
        signed: &SignedSpec,
        initial: &StateDict,
        sites: &[Site],
    ) -> Result<Federation> {
        let spec: &FederationSpec = &signed.spec;
        let rounds = spec.federation.rounds;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}", listener.local_addr()?);
        let config = fedee_aggregator::Config {
            database_url: format!(
                "sqlite://{}?mode=rwc",
                self.work.join("aggregator.db").display()
            ),
            blob_dir: self.work.join("blobs"),
            initial_model: Some(state_to_safetensors(initial)?),
            tls: Some(self.tls("aggregator")),
            enroll: sites.iter().map(|s| s.name.clone()).collect(),
            // The coordinator accepts what the demo's sites accept ([`demo_policy`]).
            max_epsilon: sites
                .iter()
                .map(|s| s.policy.epsilon_budget)
                .fold(fedee_aggregator::DEFAULT_MAX_EPSILON, f64::max),
            ..fedee_aggregator::Config::default()
        }
        .with_spec(signed.clone())?;
        // Refused settings (a planned ε over the limit, …) fail here, not as a silent
        // aggregator task the sites then retry against for minutes.
        config.validate()?;
        let aggregator = tokio::spawn(fedee_aggregator::run(
            config,
            listener,
            self.shutdown.clone(),
        ));
        eprintln!(
            "[demo] aggregator at {url}; spec {}: {}",
            &signed.sha256[..12],
            spec.summary()
        );
        let mut data = BTreeMap::new();
        let mut agents = Vec::new();
        for s in sites {
            let (task, report) =
                fedee_site_agent::task::from_spec(spec, &s.data, s.filter.as_ref(), self.device)
                    .with_context(|| format!("site {}", s.name))?;
            eprintln!(
                "[demo] site {}: {} train / {} validation / {} test records",
                s.name, report.train, report.validation, report.test
            );
            data.insert(s.name.clone(), report);
            agents.push(tokio::spawn(fedee_site_agent::run(
                fedee_site_agent::SiteConfig {
                    aggregator: url.clone(),
                    site: s.name.clone(),
                    task,
                    device: self.device,
                    seed: s.seed,
                    poll_interval: Duration::from_millis(20),
                    retry: Retry::default(),
                    noise: fedee_dp::noise::Sampler::Fast,
                    ledger: None,
                    new_ledger: false,
                    policy: s.policy.clone(),
                    spec: signed.clone(),
                    tls: Some(self.tls(&s.name)),
                },
            )));
        }
        // The coordinator watches with the operator's certificate (every site's figures).
        let mut link = Link::connect(&url, Some(&self.tls("operator")), Retry::default())?;
        let mut printed = 0;
        loop {
            let st = link.status().await?;
            printed = print_closed_rounds(&st, printed, rounds);
            // A site that finishes early has failed: stop waiting and report it below.
            if st.done || agents.iter().any(|a| a.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut reports = BTreeMap::new();
        for a in agents {
            let r = a
                .await
                .context("site task panicked")?
                .context("site agent failed")?;
            reports.insert(r.site.clone(), r);
        }
        // Sites report their evaluation of the final model before they finish: read the
        // status only now.
        let status = link.status().await?;
        print_closed_rounds(&status, printed, rounds);
        if !status.done {
            bail!(
                "the federation did not finish: round {} of {rounds}",
                status.current_round
            );
        }
        Ok(Federation {
            status,
            data,
            sites: reports,
            link,
            aggregator,
        })
    }

    /// Start a trainer and connect to it as pharma.
    ///
    /// # Errors
    /// The trainer cannot bind or be reached.
    pub(crate) async fn trainer(
        &self,
    ) -> Result<(
        fedee_trainer::TrainerClient,
        JoinHandle<Result<(), fedee_trainer::TrainerError>>,
    )> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}", listener.local_addr()?);
        let handle = tokio::spawn(fedee_trainer::run(
            fedee_trainer::Config {
                device: self.device,
                tls: Some(self.tls("trainer")),
                ..Default::default()
            },
            listener,
            self.shutdown.clone(),
        ));
        let tls = self.tls("pharma");
        let mut last = None;
        for _ in 0..50 {
            match fedee_trainer::TrainerClient::connect(&url, Some(&tls)).await {
                Ok(c) => {
                    eprintln!("[demo] trainer at {url}");
                    return Ok((c, handle));
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "cannot reach the trainer at {url}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )
    }
}

impl Drop for Consortium {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// A fresh consortium PKI in `dir/pki` (see [`Consortium`]); returns its folder.
///
/// # Errors
/// The files cannot be written.
pub(crate) fn pki(dir: &Path, sites: &[&str]) -> Result<PathBuf> {
    use fedee_proto::pki::{CertRequest, Role, init_ca, issue};
    let pki = dir.join("pki");
    init_ca(&pki, "fedee demo consortium", 2, false)?;
    let parties = [
        (Role::Aggregator, "aggregator"),
        (Role::Trainer, "trainer"),
        (Role::Client, "pharma"),
        (Role::Operator, "operator"),
    ];
    for (role, name) in parties
        .into_iter()
        .chain(sites.iter().map(|s| (Role::Site, *s)))
    {
        issue(&pki, &CertRequest::new(role, name, 1), false)?;
    }
    Ok(pki)
}

/// Each round's accuracy per site and weighted by test examples.
pub(crate) fn round_reports(st: &StatusResponse) -> Vec<RoundReport> {
    st.rounds
        .iter()
        .map(|r| RoundReport {
            round: r.round,
            site_accuracy: r
                .site_metrics
                .iter()
                .map(|m| (m.site.clone(), m.test_accuracy))
                .collect(),
            // The aggregator's own weighting (by test examples).
            weighted_accuracy: r.weighted.as_ref().map_or(0.0, |w| w.test_accuracy),
            epsilon: r.epsilon,
        })
        .collect()
}

/// The global model to hand on: the one selected on the sites' validation splits, or (when
/// no site reported validation metrics) the last round's. Prints which and why.
pub(crate) fn chosen_model(st: &StatusResponse, rounds: u32) -> u32 {
    if st.selected_model > 0 {
        eprintln!(
            "[demo] selected global model {} (round {}) on the sites' validation splits: weighted validation accuracy {:.3}",
            st.selected_model,
            st.selected_model - 1,
            st.selected_validation_accuracy
        );
        st.selected_model
    } else {
        eprintln!("[demo] no validation metrics: using the last round's model");
        rounds + 1
    }
}

/// Print one line per round closed since `printed`; returns the last round printed.
pub(crate) fn print_closed_rounds(st: &StatusResponse, printed: u32, total: u32) -> u32 {
    let mut last = printed;
    for r in st
        .rounds
        .iter()
        .filter(|r| r.state == "closed" && r.round > printed)
    {
        eprintln!(
            "[demo] round {}/{total} closed: ε = {:.3e} (δ = {:e}, unit: {})",
            r.round, r.epsilon, st.delta, st.privacy_unit
        );
        last = r.round;
    }
    last
}

/// Read a federation spec file.
///
/// # Errors
/// An unreadable file or an invalid spec, naming the file.
pub(crate) fn read_spec(path: &Path) -> Result<FederationSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the federation spec {}", path.display()))?;
    FederationSpec::from_toml(&text)
        .with_context(|| format!("{} is not a valid federation spec", path.display()))
}
