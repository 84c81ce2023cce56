//! `fedee hss-server`: its flags and its run, glue over [`crate::service`].

use std::net::SocketAddr;

use anyhow::{Context, Result};
use fedee_proto::cli::{TransportArgs, notice, serve_with_grace, shutdown_on_signals};

/// Run one of the two non-colluding HSS-EE servers.
#[derive(clap::Args)]
pub struct HssServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    /// mTLS as for the trainer: the server's certificate is a service certificate with the
    /// hss role (`fedee certs issue --hss NAME --host HOST`); only client certificates are
    /// served.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// How share products are computed, exactly: `int64` (libtorch's integer matmul, CPU
    /// only; about 2× faster than limbs on CPUs measured) or `limbs` (three 22-bit limbs of the
    /// share in one f64 GEMM; `limbs-cuda` on a GPU, where int64 matmul does not exist).
    #[arg(long, default_value = "int64")]
    pub engine: crate::engine::Engine,
    /// libtorch threads for the share products [default: all logical CPUs].
    #[arg(long)]
    pub threads: Option<i32>,
}

/// Serve until SIGINT or SIGTERM.
///
/// # Errors
/// TLS files missing, the address taken, or the transport failing.
pub async fn serve(h: HssServerArgs) -> Result<()> {
    if let Some(t) = h.threads {
        tch::set_num_threads(t.max(1));
    }
    let config = crate::service::Config {
        engine: h.engine,
        tls: h.transport.resolve("trainer")?,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(h.listen)
        .await
        .with_context(|| format!("binding {}", h.listen))?;
    notice(false, &format!("HSS-EE share engine: {:?}", h.engine));
    notice(
        false,
        &format!("hss-server listening on {}", listener.local_addr()?),
    );
    let token = shutdown_on_signals();
    serve_with_grace(token.clone(), crate::service::run(config, listener, token)).await?;
    notice(false, "HSS server stopped");
    Ok(())
}
