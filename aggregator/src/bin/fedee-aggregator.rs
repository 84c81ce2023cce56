//! `fedee-aggregator`: the federation service alone, without libtorch.
//!
//! The same flags and behaviour as `fedee aggregator`; this binary does not link libtorch, so
//! it starts faster and its resident memory is the service's own (about 365 MB less). Use it
//! on the consortium's coordinator; `fedee aggregator` is there for one-binary installs.

use clap::Parser;

/// Run the fedee federation service: enrol sites, open rounds, validate and persist updates,
/// aggregate them (FedAvg by default), and account the privacy spent.
///
/// Typical start (mutual TLS with a PKI from `fedee certs`, an initial model from
/// `fedee init-model`):
///
///   fedee-aggregator --tls-dir pki --initial-model g0.safetensors \
///       --enroll Cleveland --enroll Hungary --enroll Switzerland --min-sites 3 --rounds 20
///
/// The same flags as `fedee aggregator`, without libtorch (about 365 MB less memory).
/// Logs go to stderr (`FEDEE_LOG=debug` for more, `FEDEE_LOG_FORMAT=json` for JSON lines).
#[derive(Parser)]
#[command(name = "fedee-aggregator", version, verbatim_doc_comment)]
struct Cli {
    #[command(flatten)]
    args: fedee_aggregator::cli::AggregatorArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    fedee_proto::cli::init_tracing("info");
    fedee_aggregator::cli::run(cli.args).await
}
