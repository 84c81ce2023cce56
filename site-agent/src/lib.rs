//! The fedee site agent: runs next to a hospital's data, trains the global model locally with
//! libtorch, clips and noises its update, and submits it to the aggregator. Only outbound
//! connections; raw records never leave the process.
//!
//! * [`table`]: a site's own tabular data, read as the federation spec says.
//! * [`infer`]: `fedee init`, a commented spec scaffolded from a data file.
//! * [`task`]: what a site trains ([`task::LocalTask`]: an MLP on tabular data, a BERT
//!   classifier), built from the spec by [`task::from_spec`].
//! * [`statistics`]: federated preprocessing (the statistics round before round 1).
//! * [`train`]: local training, the update, clipping and noise.
//! * [`client`]: the federation loop over gRPC.

pub mod cli;
pub mod client;
pub mod dpsgd;
pub mod infer;
pub mod ledger;
pub mod metrics;
pub mod policy;
pub mod secure;
pub mod statistics;
pub mod table;
pub mod task;
pub mod train;

pub use client::{SiteConfig, SiteReport, run};

/// Site agent errors.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The site's data cannot satisfy the federation spec (names file, line, column, value).
    #[error(transparent)]
    Table(#[from] table::DataError),
    /// The federation spec served by the aggregator is invalid or cannot run here.
    #[error(transparent)]
    Spec(#[from] fedee_spec::SpecError),
    /// The aggregator refused a call.
    #[error("aggregator refused {call}: {status}")]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
    /// A call kept failing at the transport level (aggregator down, network, or a refused
    /// TLS handshake) after every retry.
    #[error(
        "{call} failed at the transport level after {attempts} attempt(s): {reason}; is the aggregator running at {url} (check --aggregator)? With mutual TLS a certificate problem also ends here: this site's certificate and ca.pem must come from the consortium CA (fedee certs issue --site NAME), be unexpired, and --tls-dir must point at them"
    )]
    Transport {
        call: &'static str,
        url: String,
        attempts: u32,
        status: tonic::Status,
        /// The status message and its error sources, deduplicated.
        reason: String,
    },
    /// Model error (wrong architecture, bad tensors).
    #[error("model: {0}")]
    Model(#[from] fedee_model::ModelError),
    /// DP parameter error.
    #[error("differential privacy: {0}")]
    Dp(#[from] fedee_dp::DpError),
    /// A model stream from the aggregator was malformed.
    #[error("model download: {0}")]
    Download(#[from] fedee_proto::ChunkError),
    /// The task cannot do what the federation asks.
    #[error("{0}")]
    Unsupported(String),
    /// The privacy ledger cannot be read or written.
    #[error("privacy ledger {path}: cannot {action} it")]
    LedgerIo {
        /// The ledger file (or the folder of its temporary file).
        path: std::path::PathBuf,
        /// What failed: read, write.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The privacy ledger exists but is not one (never reset: that would forget privacy
    /// already spent).
    #[error(
        "{path} is not a fedee privacy ledger; restore it from backup (deleting it would forget privacy already spent)"
    )]
    LedgerCorrupt {
        /// The ledger file.
        path: std::path::PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The privacy ledger does not exist and the site was not told to start one.
    #[error(
        "privacy ledger {path} does not exist: a site that lost its ledger would forget the privacy already spent. Restore it from backup, point --ledger at it, or, for a site whose data has never been used in a federation, pass --new-ledger"
    )]
    LedgerMissing {
        /// The ledger file.
        path: std::path::PathBuf,
    },
    /// The federation asks for another unit of privacy than the ledger protects.
    #[error(
        "this ledger protects `{protects}` but the federation now asks for `{asked}`: use a separate --ledger per unit"
    )]
    LedgerUnit {
        /// The ledger's unit.
        protects: String,
        /// The unit asked for.
        asked: String,
    },
    /// Local training produced a non-finite update: nothing is sent and no privacy is spent.
    #[error(
        "round {round}: local training diverged: tensor `{tensor}` of the update is not finite (mean training loss {loss}); nothing was sent and no privacy was spent. Lower the learning rate (federation spec), or, with site-level DP on a large model, the noise: the global model may have been destroyed by it"
    )]
    Diverged {
        /// The round trained.
        round: u32,
        /// The first tensor (by name) with a NaN or infinite value.
        tensor: String,
        /// The mean training loss of the round.
        loss: f64,
    },
    /// The aggregator asked for something the site did not agree to (names the setting).
    #[error("refusing the aggregator's task: {0}")]
    Refused(String),
    /// The aggregator address or the TLS material cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] fedee_proto::pki::PkiError),
    /// libtorch error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The secure-aggregation protocol refused a step (hostile or inconsistent messages,
    /// parameters that cannot run).
    #[error(transparent)]
    SecureAggregation(#[from] fedee_secagg::Error),
}
