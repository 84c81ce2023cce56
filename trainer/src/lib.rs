//! The fedee trainer: the compute provider's service that trains and runs EE models on
//! encrypted batches.
//!
//! # Security
//! The trainer never receives keys: its API (`fedee.v1.Trainer`) has no field for them. It
//! sees the EE model's weights, encrypted inputs and encrypted labels, losses, and what
//! SECURITY.md lists under "What the trainer still sees" (shapes, architecture, label
//! histograms, the multiset of values under permutation keys). It does not log tensor
//! contents.

pub mod client;
mod service;

use tch::Device;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use client::TrainerClient;
pub use service::TrainerService;

/// Trainer errors.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// Transport failure.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] fedee_proto::pki::PkiError),
}

/// Trainer settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Device jobs run on (`cpu`, or `cuda` when present).
    pub device: Device,
    /// Largest EE model accepted, in bytes.
    pub max_model_bytes: u64,
    /// Mutual TLS: the trainer's certificate and the CA of its clients. `None` = plaintext.
    pub tls: Option<fedee_proto::pki::TlsFiles>,
    /// Receives every Generate prompt (encrypted token ids) as the trainer got it: what an
    /// audit, or a test checking that no plaintext ids arrive, looks at. `None` keeps nothing.
    pub prompt_log: Option<tokio::sync::mpsc::UnboundedSender<Vec<i64>>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            max_model_bytes: 1 << 30,
            tls: None,
            prompt_log: None,
        }
    }
}

/// Serve the trainer on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// Transport failures.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), TrainerError> {
    // TCP_NODELAY: without it, Nagle's algorithm holds HTTP/2 window updates back behind
    // delayed ACKs and a 1 MiB chunk stream crawls at ~44 MB/s per upload (measured).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &config.tls {
        builder = builder.tls_config(t.server()?)?;
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<fedee_proto::v1::trainer_server::TrainerServer<TrainerService>>()
        .await;
    builder
        .add_service(health_service)
        .add_service(TrainerService::new(config).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}
