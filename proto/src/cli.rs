//! What every fedee service binary shares: the transport flags (mutual TLS or an explicit
//! `--insecure`), logging set-up, operator notices, and graceful shutdown on SIGINT/SIGTERM.
//! Used by the `fedee` CLI and the libtorch-free `fedee-aggregator` binary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio_util::sync::CancellationToken;

use crate::pki::TlsFiles;

/// How a party talks gRPC: mutual TLS (default, required unless --insecure).
#[derive(clap::Args, Clone, Debug)]
pub struct TransportArgs {
    /// Directory of the consortium PKI (from `fedee certs init` and `fedee certs issue`):
    /// mutual TLS with DIR/ca.pem and this party's DIR/NAME.pem and DIR/NAME.key.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// This party's certificate name in --tls-dir [default: aggregator for the aggregator,
    /// trainer for the trainer, the site name for a site, pharma for clients].
    #[arg(long)]
    pub tls_name: Option<String>,
    /// Plaintext gRPC with no authentication: only for a trusted loopback. Prints a warning.
    #[arg(long, conflicts_with = "tls_dir")]
    pub insecure: bool,
}

impl TransportArgs {
    /// The mutual-TLS files for party `default_name` (or --tls-name), checked to exist; `None`
    /// with --insecure (after printing a warning).
    ///
    /// # Errors
    /// Neither --tls-dir nor --insecure given, or a file missing (naming the command that
    /// creates it).
    pub fn resolve(&self, default_name: &str) -> Result<Option<TlsFiles>> {
        if self.insecure {
            notice(
                true,
                "WARNING: --insecure: plaintext gRPC without authentication; anyone who can reach this port can act as any party. Use --tls-dir for mutual TLS.",
            );
            return Ok(None);
        }
        let Some(dir) = &self.tls_dir else {
            bail!(
                "no transport security chosen: pass --tls-dir DIR (create it with `fedee certs init` and `fedee certs issue`) for mutual TLS, or --insecure for plaintext on a trusted loopback"
            );
        };
        let files = TlsFiles::in_dir(dir, self.tls_name.as_deref().unwrap_or(default_name));
        for p in [&files.ca, &files.cert, &files.key] {
            if !p.exists() {
                bail!(
                    "{} does not exist: issue it with `fedee certs issue --dir {}`",
                    p.display(),
                    dir.display()
                );
            }
        }
        Ok(Some(files))
    }

    /// `http` with --insecure, else `https`.
    pub fn scheme(&self) -> &'static str {
        if self.insecure { "http" } else { "https" }
    }
}

/// Whether logs are JSON lines (`FEDEE_LOG_FORMAT=json`).
pub fn json_logs() -> bool {
    std::env::var("FEDEE_LOG_FORMAT").as_deref() == Ok("json")
}

/// A service's operator-facing line (listening address, shutdown, warnings): a plain stderr
/// line, or with JSON logs a log event, so stderr stays one JSON object per line.
pub fn notice(warning: bool, msg: &str) {
    match (json_logs(), warning) {
        (false, _) => eprintln!("{msg}"),
        (true, true) => tracing::warn!("{msg}"),
        (true, false) => tracing::info!("{msg}"),
    }
}

/// Logs to stderr through `tracing`: `FEDEE_LOG` (an `EnvFilter`, e.g. `debug` or
/// `fedee_aggregator=debug`) overrides `default_level`; `FEDEE_LOG_FORMAT=json` for JSON lines.
pub fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FEDEE_LOG").unwrap_or_else(|_| {
        // Refused TLS handshakes (no or bad client certificate) are logged by tonic at debug.
        tracing_subscriber::EnvFilter::new(format!(
            "{default_level},tonic::transport::server::io_stream=debug"
        ))
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json_logs() {
        b.json().init();
    } else {
        b.init();
    }
}

/// A token cancelled on SIGINT or SIGTERM: services then stop accepting work and drain
/// in-flight calls.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let sigterm = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm => {}
        }
        notice(
            false,
            &format!(
                "shutting down: draining in-flight calls (at most {} s)",
                GRACE_PERIOD.as_secs()
            ),
        );
        t.cancel();
    });
    token
}

/// Longest wait for in-flight calls after a shutdown signal.
pub const GRACE_PERIOD: Duration = Duration::from_secs(20);

/// Run a service until it ends, or until `GRACE_PERIOD` after `token` is cancelled.
pub async fn serve_with_grace<E: Into<anyhow::Error>>(
    token: CancellationToken,
    service: impl std::future::Future<Output = Result<(), E>>,
) -> Result<()> {
    let deadline = async {
        token.cancelled().await;
        tokio::time::sleep(GRACE_PERIOD).await;
    };
    tokio::select! {
        r = service => r.map_err(Into::into),
        _ = deadline => {
            notice(true, "grace period over: exiting with calls still in flight");
            Ok(())
        }
    }
}
