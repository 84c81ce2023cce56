//! The site's command line: `fedee site` (join a federation and train on this site's data)
//! and `fedee init` (scaffold a federation spec from a data file). Glue over [`crate::run`],
//! [`crate::client::fetch_spec`], [`crate::task::from_spec`] and [`crate::infer`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedee_proto::cli::{TransportArgs, notice};
use tch::Device;

use crate::table::RowFilter;

/// Run a site agent next to a hospital's data.
///
/// The site fetches the federation spec from the aggregator, reads `--data` as the spec says
/// (`--where COLUMN=VALUE` selects its rows of a shared file), prints a data report, and
/// refuses to join if its data cannot satisfy the spec.
#[derive(clap::Args)]
pub struct SiteArgs {
    /// Aggregator address (host:port; the scheme follows --tls-dir / --insecure).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub aggregator: String,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Site name: its identity at the aggregator (with mutual TLS, the name on its
    /// certificate: DIR/NAME.pem).
    #[arg(long)]
    pub site: String,
    /// The site's data, read as the federation spec says: CSV (header line) or Parquet for
    /// tabular tasks; CSV or JSONL with the text column for text tasks.
    #[arg(long)]
    pub data: PathBuf,
    /// Keep only the rows whose COLUMN is VALUE (one site's rows of a shared file), e.g.
    /// --where dataset=Cleveland.
    #[arg(long = "where", value_name = "COLUMN=VALUE")]
    pub filter: Option<String>,
    /// Device: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Retries of a call that fails at the transport level (aggregator down or restarting),
    /// with exponential backoff from 0.5 s doubling to 30 s, plus jitter; 9 retries wait about
    /// 2.5 minutes in all. Repeats are safe: the aggregator acknowledges an update it already
    /// has without counting it twice. Refusals are never retried.
    #[arg(long, default_value_t = 9)]
    pub retries: u32,
    /// Seconds between two questions to the aggregator while it says wait (the next round,
    /// a secure-aggregation stage). Larger values lighten the aggregator's load with many
    /// sites; they slow each round by up to this much per stage.
    #[arg(long, default_value_t = 0.2, value_parser = poll_seconds)]
    pub poll_interval: f64,
    /// Gaussian sampler for the DP noise: `fast` (CSPRNG + ziggurat, released values rounded
    /// to a grid of about a millionth of the noise std against floating-point attacks) or
    /// `exact` (OpenDP's exact sampler on every core; about 15 core-seconds per million
    /// parameters).
    #[arg(long, default_value = "fast", value_parser = ["fast", "exact"])]
    pub noise: String,
    /// This site's privacy ledger (JSON; one entry per round: unit, mechanism, q, σ, steps,
    /// cumulative ε at δ). Kept across runs: never delete it while the data is in use.
    /// [default: fedee-privacy-ledger-SITE.json]
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// Start an empty ledger when --ledger does not exist, for a site whose data has never
    /// been used in a federation. Without it a missing ledger stops the site (a lost ledger
    /// would forget the privacy already spent). An existing ledger is never reset.
    #[arg(long)]
    pub new_ledger: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// The site's own privacy policy: what it accepts whatever the federation spec or the
/// aggregator says. A federation outside it is refused before the site joins; a round
/// outside it is refused and the site leaves.
#[derive(clap::Args, Clone, Debug)]
pub struct PolicyArgs {
    /// The site's privacy budget ε (at the federation's δ), over its whole ledger. Before
    /// each round the site computes what its ledger would reach; over budget, it refuses to
    /// train and leaves, naming spent, requested and budget. A spec whose target ε is larger
    /// is refused at join. `inf` turns the limit off (the spend is still accounted).
    #[arg(long, default_value_t = crate::policy::DEFAULT_EPSILON_BUDGET)]
    pub epsilon_budget: f64,
    /// Smallest noise multiplier σ the site accepts (of its update in site mode, of DP-SGD's
    /// per-example gradients in record mode).
    #[arg(long, default_value_t = crate::policy::DEFAULT_MIN_NOISE_MULTIPLIER)]
    pub min_noise_multiplier: f64,
    /// Largest clipping norm C the site accepts.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub max_clipping_norm: f64,
    /// Largest δ the site accepts (δ < 1/n for its n training records is required too).
    #[arg(long, default_value_t = crate::policy::DEFAULT_MAX_DELTA)]
    pub max_delta: f64,
    /// DP modes the site takes part in: `site` (unit: a site's update), `record` (DP-SGD;
    /// unit: a patient record), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "site,record")]
    pub dp_modes: Vec<String>,
}

impl PolicyArgs {
    /// The policy these flags set.
    ///
    /// # Errors
    /// An unknown DP mode, or values that are not a policy (named by flag).
    pub fn policy(&self) -> Result<crate::policy::PrivacyPolicy> {
        let p = crate::policy::PrivacyPolicy {
            min_noise_multiplier: self.min_noise_multiplier,
            max_clipping_norm: self.max_clipping_norm,
            modes: self
                .dp_modes
                .iter()
                .map(|m| m.parse())
                .collect::<Result<_, _>>()?,
            max_delta: self.max_delta,
            epsilon_budget: self.epsilon_budget,
        };
        p.validate()?;
        Ok(p)
    }
}

/// Scaffold a commented federation spec from a data file: infers each column's type
/// (numeric, boolean, categorical with its levels), leaves out record identifiers and the
/// site column (saying why), lists the label's values as classes, and prints what it
/// inferred. Edit the file, then start the aggregator with `--spec`.
#[derive(clap::Args)]
pub struct InitArgs {
    /// A data file (CSV with a header line), e.g. one site's export.
    #[arg(long)]
    pub data: PathBuf,
    /// The label column (the class to predict).
    #[arg(long)]
    pub label: String,
    /// The column naming the site in a file shared by several sites (left out of the
    /// features; each site selects its rows with `fedee site --where COLUMN=VALUE`).
    #[arg(long)]
    pub site_column: Option<String>,
    /// Where the spec goes.
    #[arg(long, default_value = "federation.toml")]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

/// `cpu` or `cuda` (checked against what libtorch sees).
///
/// # Errors
/// An unknown name, or `cuda` without a visible CUDA device.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: no CUDA device is visible to libtorch (use --device cpu)");
            }
            Ok(Device::Cuda(0))
        }
        d => bail!("unknown device `{d}`: use cpu or cuda"),
    }
}

/// `fedee site`: fetch the spec, check the data against it, join and train until done;
/// prints the site's report (JSON) on stdout.
///
/// # Errors
/// Bad flags, data that cannot satisfy the spec (before joining), or the federation loop's
/// errors.
pub async fn run(s: SiteArgs) -> Result<()> {
    let device = parse_device(&s.device)?;
    let filter: Option<RowFilter> = s.filter.as_deref().map(str::parse).transpose()?;
    let tls = s.transport.resolve(&s.site)?;
    let url = format!("{}://{}", s.transport.scheme(), s.aggregator);
    let retry = crate::client::Retry {
        attempts: s.retries + 1,
        ..Default::default()
    };
    let spec = crate::client::fetch_spec(&url, tls.as_ref(), retry).await?;
    let Some(spec) = spec else {
        bail!(
            "the aggregator at {} serves no federation spec, and a site trains only what a spec says: start the aggregator with --spec FILE (`fedee init --data FILE --label COLUMN` scaffolds one)",
            s.aggregator
        );
    };
    notice(
        false,
        &format!(
            "federation spec {}: {}",
            &spec.sha256[..12],
            spec.spec.summary()
        ),
    );
    let (task, report) = crate::task::from_spec(&spec.spec, &s.data, filter.as_ref(), device)
        .with_context(|| {
            format!(
                "site `{}` cannot join: its data does not satisfy the federation spec",
                s.site
            )
        })?;
    notice(false, &report.to_string());
    let ledger = s.ledger.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "fedee-privacy-ledger-{}.json",
            s.site.replace(' ', "_")
        ))
    });
    notice(
        false,
        &format!(
            "privacy ledger: {}",
            std::path::absolute(&ledger)
                .unwrap_or(ledger.clone())
                .display()
        ),
    );
    let report = crate::run(crate::SiteConfig {
        aggregator: url,
        tls,
        site: s.site.clone(),
        task,
        device,
        seed: None,
        poll_interval: Duration::from_secs_f64(s.poll_interval),
        retry,
        noise: s.noise.parse()?,
        ledger: Some(ledger),
        new_ledger: s.new_ledger,
        policy: s.policy.policy()?,
        spec,
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// `fedee init`: write the scaffolded spec and print what was inferred.
///
/// # Errors
/// An unreadable file, a missing label or site column, or an existing --out without --force.
pub fn init(a: InitArgs) -> Result<()> {
    if a.out.exists() && !a.force {
        bail!(
            "{} exists: choose another --out, or pass --force to replace it",
            a.out.display()
        );
    }
    let s = crate::infer::scaffold(&a.data, &a.label, a.site_column.as_deref())?;
    eprintln!(
        "{}: {} rows, {} columns",
        a.data.display(),
        s.rows,
        s.columns.len()
    );
    for c in &s.columns {
        use crate::infer::Inferred;
        let what = match &c.kind {
            Inferred::Label(v) => format!("label, {} classes", v.len()),
            Inferred::Numeric { min, max } => format!("numeric in [{min}, {max}]"),
            Inferred::Boolean => "boolean".into(),
            Inferred::Categorical(l) => format!("categorical, {} levels", l.len()),
            Inferred::Excluded(why) => format!("left out: {why}"),
        };
        let missing = if c.missing > 0 {
            format!(" ({} missing)", c.missing)
        } else {
            String::new()
        };
        eprintln!("  {:<24} {what}{missing}", c.name);
    }
    // The scaffold must be a spec this build accepts (tested); say so if it is not.
    fedee_spec::FederationSpec::from_toml(&s.toml)
        .context("the scaffolded spec does not validate (please report this)")?;
    std::fs::write(&a.out, &s.toml).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {}: check the inferred types and the classes, set the privacy and rounds, then run\n  fedee init-model --spec {} --out global0.safetensors\n  fedee aggregator --spec {} --initial-model global0.safetensors ...",
        a.out.display(),
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

/// `--poll-interval`: seconds in [0.01, 60].
fn poll_seconds(v: &str) -> Result<f64, String> {
    let s: f64 = v
        .parse()
        .map_err(|_| format!("`{v}` is not a number of seconds, e.g. 0.2"))?;
    if (0.01..=60.0).contains(&s) {
        Ok(s)
    } else {
        Err(format!("{s} s is outside 0.01 to 60 seconds"))
    }
}
