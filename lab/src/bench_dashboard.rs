//! `fedee bench dashboard`: the operator dashboard's render time on a long federation
//! history (`--sites` × `--rounds`: every site's update, metrics and privacy-ledger entry in
//! every round, a failed round now and then, some rejections), in a SQLite database written
//! for the purpose. Each page and its JSON twin is requested through the dashboard's own
//! router (authentication, database reads, rendering), in process: the figures exclude the
//! network.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use fedee_aggregator::dashboard::{self, Dashboard, data::Info};
use fedee_aggregator::metrics::Metrics;
use fedee_aggregator::store::Store;
use serde::Serialize;
use serde_json::json;
use tower::ServiceExt;

use crate::table::{self, Cell, col};

const TOKEN: &str = "bench-token";

#[derive(Serialize)]
struct Row {
    path: &'static str,
    requests: usize,
    p50_s: f64,
    p95_s: f64,
    max_s: f64,
    bytes: usize,
}

/// Write the history: one transaction (the aggregator's own writes commit one by one).
async fn seed(url: &str, sites: usize, rounds: u32) -> Result<()> {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(url).await?;
    let mut tx = c.begin().await?;
    let now = 1_767_225_600i64;
    let names: Vec<String> = (0..sites).map(|i| format!("hospital-{i:03}")).collect();
    for n in &names {
        sqlx::query("INSERT INTO sites (name, joined_at) VALUES ($1, $2)")
            .bind(n)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    for r in 1..=rounds {
        let opened = now + i64::from(r) * 60;
        let failed = r % 97 == 0;
        sqlx::query("INSERT INTO rounds (round, state, opened_at, deadline_ms, closed_at, rho, epsilon, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(i64::from(r))
            .bind(if failed { "failed" } else { "closed" })
            .bind(opened)
            .bind((opened + 600) * 1000)
            .bind(opened + 40)
            .bind(0.001 * f64::from(r))
            .bind(0.05 * f64::from(r).sqrt())
            .bind(failed.then_some("quorum not met: 2 of 3 sites submitted by the deadline"))
            .execute(&mut *tx)
            .await?;
        for (i, n) in names.iter().enumerate() {
            if failed && i >= 2 {
                continue;
            }
            sqlx::query("INSERT INTO updates (round, site, num_examples, sha256, size_bytes, received_at, seq) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                .bind(i64::from(r))
                .bind(n)
                .bind(100 + i as i64)
                .bind(format!("{r:08}{i:056}"))
                .bind(4_000_000i64)
                .bind(opened + 20)
                .bind(i as i64 + 1)
                .execute(&mut *tx)
                .await?;
            if failed {
                continue;
            }
            let acc = 0.5 + 0.4 * (1.0 - (-f64::from(r) / 200.0).exp()) + 0.001 * (i % 7) as f64;
            sqlx::query("INSERT INTO metrics (model, site, test_accuracy, num_test_examples, balanced_accuracy, macro_f1, validation_accuracy, num_validation_examples) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(i64::from(r) + 1)
                .bind(n)
                .bind(acc)
                .bind(50 + i as i64)
                .bind(acc - 0.02)
                .bind(acc - 0.03)
                .bind(acc - 0.01)
                .bind(20 + i as i64)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO privacy_ledger (site, round, unit, mechanism, sampling_rate, noise_multiplier, steps, epsilon, delta) VALUES ($1, $2, 'patient record', 'DP-SGD (RDP)', 0.05, 1.1, 20, $3, 1e-5)")
                .bind(n)
                .bind(i64::from(r))
                .bind(0.002 * f64::from(r) * (1.0 + 0.01 * (i % 5) as f64))
                .execute(&mut *tx)
                .await?;
        }
    }
    for k in 0..500i64 {
        sqlx::query(
            "INSERT INTO rejections (round, site, kind, reason, at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(1 + k % i64::from(rounds))
        .bind(&names[k as usize % sites])
        .bind(["stale_round", "layout", "duplicate", "invalid_tensors"][k as usize % 4])
        .bind("an update for a round that is not open")
        .bind(now + k)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO rounds (round, state, opened_at, deadline_ms) VALUES ($1, 'open', $2, $3)",
    )
    .bind(i64::from(rounds) + 1)
    .bind(now)
    .bind((now + 600) * 1000)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Render every page `reps` times after one warm-up; print and return the figures.
///
/// # Errors
/// Database or IO failures, or a page that does not answer 200.
pub fn bench(sites: usize, rounds: u32, reps: usize) -> Result<serde_json::Value> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("history.db").display());
        let store = Store::connect(&url).await?;
        let t = Instant::now();
        seed(&url, sites, rounds).await.context("writing the history")?;
        let seeded = t.elapsed();
        eprintln!(
            "dashboard: {sites} sites × {rounds} rounds written in {:.1} s",
            seeded.as_secs_f64()
        );
        let info = Info {
            summary: format!("{rounds} rounds, quorum 3, FedAvg (synthetic history)"),
            spec_sha256: String::new(),
            rounds: rounds + 1,
            min_sites: 3,
            round_timeout_s: 600.0,
            dp_mode: "record".into(),
            privacy_unit: "patient record".into(),
            delta: 1e-5,
            planned_epsilon: 2.0,
            max_epsilon: 10.0,
            secure_aggregation: false,
        };
        let app = Dashboard::new(
            store,
            Metrics::new(),
            info,
            Some(dashboard::token_hash(TOKEN)),
            false,
        )
        .router();
        let mut rows = Vec::new();
        for path in [
            "/",
            "/accuracy",
            "/privacy",
            "/updates",
            "/?fragment=main",
            "/api/overview",
            "/api/accuracy",
            "/api/privacy",
            "/api/updates",
        ] {
            let mut times = Vec::new();
            let mut bytes = 0;
            for i in 0..=reps {
                let req = Request::get(path)
                    .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                    .body(Body::empty())?;
                let t = Instant::now();
                let r = app.clone().oneshot(req).await?;
                let status = r.status();
                let body = axum::body::to_bytes(r.into_body(), 256 << 20).await?;
                let dt = t.elapsed();
                anyhow::ensure!(status == StatusCode::OK, "{path} answered {status}");
                bytes = body.len();
                if i > 0 {
                    times.push(dt);
                }
            }
            times.sort();
            let q = |p: f64| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1];
            rows.push(Row {
                path,
                requests: times.len(),
                p50_s: q(0.5).as_secs_f64(),
                p95_s: q(0.95).as_secs_f64(),
                max_s: times.last().copied().unwrap_or(Duration::ZERO).as_secs_f64(),
                bytes,
            });
            eprintln!("dashboard: {path} done");
        }
        table::print(
            &[
                col("page", "path", Cell::Text),
                col("requests", "requests", Cell::Text),
                col("p50", "p50_s", Cell::Millis),
                col("p95", "p95_s", Cell::Millis),
                col("max", "max_s", Cell::Millis),
                col("bytes", "bytes", Cell::Text),
            ],
            &rows,
        );
        Ok(json!({
            "sites": sites,
            "rounds": rounds,
            "seed_s": seeded.as_secs_f64(),
            "rows": rows,
            "note": "in process through the dashboard's router: authentication, SQLite reads and rendering; no network",
        }))
    })
}

/// A TLS connection to the dashboard at `addr` (trusting `ca`), with `GET path` sent with
/// the bearer `token`.
async fn https_get(
    addr: &str,
    ca: &std::path::Path,
    token: &str,
    path: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::AsyncWriteExt;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    tls.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    Ok(tls)
}

/// An open dashboard page, as a browser keeps one: follow `/events` (signalling `ready` once
/// subscribed) and fetch the overview's `<main>` again on every event, until `stop` changes. Returns the pages fetched and the
/// slowest fetch in seconds.
///
/// # Errors
/// Connection, TLS or HTTP failures (a fetch that does not answer 200).
pub(crate) async fn watch(
    addr: String,
    ca: std::path::PathBuf,
    token: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<(u32, f64)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let events = https_get(&addr, &ca, &token, "/events").await?;
    let mut lines = tokio::io::BufReader::new(events).lines();
    // Subscribed once the response has started (events are not replayed).
    let status = lines.next_line().await?.unwrap_or_default();
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 200"),
        "the dashboard refused the event stream: {status}"
    );
    let _ = ready.send(());
    let (mut fetches, mut worst) = (0u32, 0f64);
    let mut stopping = false;
    loop {
        // After `stop`, the events already on their way are still shown (a page would).
        let line = if stopping {
            match tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await {
                Ok(l) => l?,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                l = lines.next_line() => l?,
                _ = stop.changed() => {
                    stopping = true;
                    continue;
                }
            }
        };
        let Some(line) = line else { break };
        if line != "event: update" {
            continue;
        }
        let t = Instant::now();
        let mut page = https_get(&addr, &ca, &token, "/?fragment=main").await?;
        let mut body = Vec::new();
        page.read_to_end(&mut body).await?;
        anyhow::ensure!(
            body.starts_with(b"HTTP/1.1 200"),
            "the dashboard answered {}",
            String::from_utf8_lossy(&body[..body.len().min(40)])
        );
        worst = worst.max(t.elapsed().as_secs_f64());
        fetches += 1;
    }
    Ok((fetches, worst))
}
