//! `fedee bench aggregate`: a real `fedee aggregator` process ingesting one round of updates
//! from many sites over loopback gRPC with mutual TLS, then aggregating them (FedAvg); beside
//! it, Flower's NumPy `aggregate` on the very same update files, in the same run.
//!
//! Figures per (sites, parameters) cell: ingest throughput (update bytes over the time from
//! the first byte sent to the round close starting: the round's time less the aggregator's
//! own timing of the close), round throughput (the close included), the time to aggregate,
//! the aggregator's peak RSS (`VmHWM` of its process), the slowest answer to a Status request
//! sent every 100 ms meanwhile, and Flower's time and peak RSS.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedee_aggregator::tensors::Tensors;
use fedee_proto::pki::TlsFiles;
use fedee_proto::v1::federation_client::FederationClient;
use fedee_proto::v1::{
    JoinRequest, StatusRequest, SubmitUpdateMessage, UpdateHeader, submit_update_message,
};
use fedee_proto::{CHUNK_SIZE, v1::Chunk};
use serde_json::json;

use crate::table::{self, col};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// Columns of every weight matrix of the synthetic model.
const COLS: usize = 1024;

/// A model layout of about `params` parameters: four `[rows, 1024]` weights and their
/// biases, values from a fixed xorshift stream.
fn synthetic(params: usize, seed: u64) -> Tensors {
    let rows = (params / 4 / (COLS + 1)).max(1);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.01
    };
    let mut t = Tensors {
        names: vec![],
        shapes: vec![],
        data: vec![],
    };
    for i in 0..4 {
        for (suffix, shape) in [("bias", vec![COLS]), ("weight", vec![rows, COLS])] {
            t.names.push(format!("layer{i}.{suffix}"));
            let n = shape.iter().product();
            t.shapes.push(shape);
            t.data.push((0..n).map(|_| next()).collect());
        }
    }
    t
}

/// `VmHWM` / `VmRSS` of this process, in MB; NaN where `/proc` cannot tell (not Linux).
pub(crate) fn own_mb(field: &str) -> f64 {
    proc_mb(std::process::id(), field).unwrap_or(f64::NAN)
}

/// `VmHWM` / `VmRSS` of a process, in MB.
pub(crate) fn proc_mb(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} missing from /proc/{pid}/status"))?;
    Ok(kb * 1024.0 / 1e6)
}

struct Running {
    child: std::process::Child,
    addr: String,
    log: Arc<Mutex<String>>,
    /// Which binary: `fedee-aggregator` or `fedee aggregator`.
    binary: &'static str,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// The value of `KEY=` in the first line of the aggregator's log that contains `marker`.
    fn log_field(&self, marker: &str, key: &str) -> Option<String> {
        self.log
            .lock()
            .expect("log")
            .lines()
            .find(|l| l.contains(marker))
            .and_then(|l| l.split(&format!("{key}=")).nth(1))
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_owned)
    }

    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while !self.log.lock().expect("log").contains(needle) {
            if let Some(s) = self.child.try_wait()? {
                bail!(
                    "aggregator exited ({s}) before `{needle}`:\n{}",
                    self.log.lock().expect("log")
                );
            }
            if t.elapsed() > timeout {
                bail!("aggregator log never showed `{needle}` within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

/// The libtorch-free `fedee-aggregator` binary next to this one (built by `cargo build
/// --workspace`), else `fedee aggregator` with a warning: its RSS then includes libtorch.
fn aggregator_command() -> Result<(Command, &'static str)> {
    let exe = std::env::current_exe()?;
    let lean = exe.with_file_name("fedee-aggregator");
    if lean.is_file() {
        return Ok((Command::new(lean), "fedee-aggregator"));
    }
    eprintln!(
        "aggregate: {} not found (build it with `cargo build --release --workspace`); measuring `fedee aggregator`, whose memory includes libtorch",
        lean.display()
    );
    let mut cmd = Command::new(exe);
    cmd.arg("aggregator");
    Ok((cmd, "fedee aggregator"))
}

fn start_aggregator(
    work: &Path,
    pki: &Path,
    sites: &[String],
    uploads: usize,
    direct_io: &str,
    dashboard: Option<&Path>,
) -> Result<Running> {
    let (mut cmd, binary) = aggregator_command()?;
    if let Some(hash) = dashboard {
        cmd.args([
            "--dashboard-listen",
            "127.0.0.1:0",
            "--dashboard-token-hash",
        ])
        .arg(hash);
    }
    cmd.args(["--listen", "127.0.0.1:0", "--database-url"])
        .arg(format!(
            "sqlite://{}?mode=rwc",
            work.join("agg.db").display()
        ))
        .arg("--blob-dir")
        .arg(work.join("blobs"))
        .arg("--initial-model")
        .arg(work.join("initial.safetensors"))
        .arg("--tls-dir")
        .arg(pki)
        .args(["--rounds", "1", "--round-timeout", "36000"])
        // Synthetic updates: the bench measures throughput, not privacy.
        .args(["--max-epsilon", "inf"])
        .args(["--min-sites", &sites.len().to_string()])
        .args(["--max-concurrent-uploads", &uploads.to_string()])
        .args(["--direct-io", direct_io]);
    for s in sites {
        cmd.args(["--enroll", s]);
    }
    let mut child = cmd
        .env("FEDEE_LOG", "info")
        .env("FEDEE_LOG_FORMAT", "plain")
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let log = Arc::new(Mutex::new(String::new()));
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.wait();
            bail!(
                "aggregator exited before listening:\n{}",
                log.lock().expect("log")
            );
        };
        log.lock().expect("log").push_str(&format!("{line}\n"));
        if let Some(a) = line.strip_prefix("aggregator listening on ") {
            break a.trim().to_owned();
        }
    };
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            sink.lock().expect("log").push_str(&format!("{l}\n"));
        }
    });
    Ok(Running {
        child,
        addr,
        log,
        binary,
    })
}

async fn connect(addr: &str, pki: &Path, site: &str) -> Result<FederationClient<Channel>> {
    let ch = fedee_proto::pki::connect(
        &format!("https://{addr}"),
        Some(&TlsFiles::in_dir(pki, site)),
        fedee_proto::pki::Role::Aggregator,
        Duration::from_secs(10),
    )
    .await??;
    Ok(FederationClient::new(ch))
}

/// One cell's figures: a row of the table and of the JSON document (units in the names).
#[derive(serde::Serialize)]
struct Cell {
    /// Whether a dashboard page was open (fetched again on every event) during the round.
    dashboard_open: bool,
    /// Pages the open dashboard fetched, and the slowest fetch.
    dashboard_fetches: Option<u32>,
    dashboard_fetch_max_seconds: Option<f64>,
    sites: usize,
    parameters: usize,
    model_mb: f64,
    update_mb_total: f64,
    round_seconds: f64,
    aggregate_seconds: f64,
    ingest_seconds: f64,
    ingest_mb_per_s: f64,
    round_mb_per_s: f64,
    /// Whether this round's updates bypassed the page cache.
    direct_io: bool,
    /// The aggregator's direct-I/O threshold (absent when off or refused by the filesystem).
    direct_io_above_bytes: Option<u64>,
    aggregator_binary: &'static str,
    idle_rss_mb: f64,
    peak_rss_mb: f64,
    peak_rss_goal_mb: f64,
    peak_rss_meets_goal: bool,
    /// What FedAvg holding every update in memory would need.
    naive_fedavg_mb: f64,
    status_max_seconds: f64,
    status_calls: u32,
    /// Sustained write bandwidth of the work folder, probed right after the cell.
    disk_write_mb_per_s: f64,
    ingest_over_disk_write_ratio: f64,
    /// Flower's side as its script reports it (or why it was skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    flower: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flower_over_fedee_aggregate_time_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flower_over_fedee_peak_rss_ratio: Option<f64>,
}

/// How a cell runs: the aggregator's upload slots and direct-I/O setting, Flower beside it,
/// and whether a dashboard page is open.
#[derive(Clone, Copy)]
struct CellOptions<'a> {
    uploads: usize,
    direct_io: &'a str,
    flower: Option<&'a FlowerSide>,
    dashboard: bool,
}

fn run_cell(
    rt: &tokio::runtime::Runtime,
    work_root: &Path,
    sites: usize,
    params: usize,
    o: &CellOptions<'_>,
) -> Result<Cell> {
    let CellOptions {
        uploads,
        direct_io,
        flower,
        dashboard,
    } = *o;
    let work = tempfile::Builder::new()
        .prefix("fedee-bench-aggregate-")
        .tempdir_in(work_root)
        .with_context(|| format!("creating a work folder in {}", work_root.display()))?;
    let names: Vec<String> = (0..sites).map(|i| format!("site-{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = crate::consortium::pki(work.path(), &refs)?;
    let global = synthetic(params, 1);
    let n_params: usize = global.data.iter().map(Vec::len).sum();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(
            work.path().join("initial.safetensors"),
        )?);
        global.write_safetensors(&mut f)?;
    }
    drop(global);
    // One update template; each site's differs in its last value (the end of the file), so
    // every site sends distinct bytes (the blob store deduplicates identical ones) and the
    // SHA-256 of the shared prefix is computed once.
    let template = synthetic(params, 2).to_safetensors();
    let model_bytes = template.len();
    let prefix = Sha256::new_with_prefix(&template[..model_bytes - 4]);
    let tails: Vec<[u8; 4]> = (0..sites)
        .map(|i| (i as f32 * 1e-3).to_le_bytes())
        .collect();
    let shas: Vec<String> = tails
        .iter()
        .map(|t| hex::encode(prefix.clone().chain_update(t).finalize()))
        .collect();
    // Chunks are zero-copy slices of this one buffer (only each site's last chunk is copied).
    let template = fedee_proto::Bytes::from(template);

    // With an open dashboard: the page a browser keeps, fetched again on every event.
    let token = if dashboard {
        let hash = work.path().join("dashboard-token.sha256");
        Some((fedee_aggregator::dashboard::new_token(&hash, false)?, hash))
    } else {
        None
    };
    let mut agg = start_aggregator(
        work.path(),
        &pki,
        &names,
        uploads,
        direct_io,
        token.as_ref().map(|t| t.1.as_path()),
    )?;
    let watch_at = match &token {
        Some(_) => {
            agg.wait_for("dashboard at https://", Duration::from_secs(20))?;
            let log = agg.log.lock().expect("log").clone();
            Some(
                log.split("dashboard at https://")
                    .nth(1)
                    .and_then(|l| l.split('/').next())
                    .context("no dashboard address in the aggregator's log")?
                    .to_owned(),
            )
        }
        None => None,
    };
    let pid = agg.child.id();
    let rss_idle_mb = proc_mb(pid, "VmRSS:")?;
    eprintln!(
        "aggregate: {sites} sites × {:.1} M parameters ({:.0} MB per update) …",
        n_params as f64 / 1e6,
        model_bytes as f64 / 1e6
    );
    let addr = agg.addr.clone();
    let (t0, _acks, poller, watcher, stop) = rt.block_on(async {
        let mut clients = Vec::new();
        for s in &names {
            let mut c = connect(&addr, &pki, s).await?;
            c.join(JoinRequest {
                site: s.clone(),
                ..Default::default()
            })
            .await?;
            clients.push(c);
        }
        // An operator's dashboard on its own connection, asking for the status every 100 ms
        // through ingest and the round close: how long does an answer take at worst?
        let mut dashboard = connect(&addr, &pki, &names[0]).await?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let poller = tokio::spawn(async move {
            let (mut worst, mut calls) = (0f64, 0u32);
            loop {
                let t = Instant::now();
                dashboard.status(StatusRequest {}).await?;
                worst = worst.max(t.elapsed().as_secs_f64());
                calls += 1;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.changed() => break,
                }
            }
            Ok::<_, anyhow::Error>((worst, calls))
        });
        let watcher = match (&watch_at, &token) {
            (Some(at), Some((t, _))) => {
                let (ready, subscribed) = tokio::sync::oneshot::channel();
                let w = tokio::spawn(crate::bench_dashboard::watch(
                    at.clone(),
                    pki.join("ca.pem"),
                    t.clone(),
                    stop.subscribe(),
                    ready,
                ));
                if subscribed.await.is_err() {
                    // The watcher failed before subscribing: its error says why.
                    w.await??;
                    bail!("the dashboard watcher stopped before subscribing");
                }
                Some(w)
            }
            _ => None,
        };
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (i, mut c) in clients.into_iter().enumerate() {
            let header = UpdateHeader {
                site: names[i].clone(),
                round: 1,
                num_examples: 100 + i as u64,
                sha256: shas[i].clone(),
                privacy: None,
            };
            let (template, tail) = (template.clone(), tails[i]);
            let total = template.len();
            let msgs = futures::stream::iter(
                std::iter::once(submit_update_message::Msg::Header(header))
                    .chain((0..total.div_ceil(CHUNK_SIZE)).map(move |k| {
                        let (a, b) = (k * CHUNK_SIZE, ((k + 1) * CHUNK_SIZE).min(total));
                        let data = if b == total {
                            let mut last = template[a..b].to_vec();
                            let n = last.len();
                            last[n - 4..].copy_from_slice(&tail);
                            last.into()
                        } else {
                            template.slice(a..b)
                        };
                        submit_update_message::Msg::Chunk(Chunk {
                            offset: a as u64,
                            total_size: total as u64,
                            data,
                        })
                    }))
                    .map(|m| SubmitUpdateMessage { msg: Some(m) }),
            );
            tasks.push(tokio::spawn(async move {
                c.submit_update(msgs).await?;
                Ok::<_, anyhow::Error>(t0.elapsed().as_secs_f64())
            }));
        }
        let mut acks = Vec::new();
        for t in tasks {
            acks.push(t.await??);
        }
        Ok::<_, anyhow::Error>((t0, acks, poller, watcher, stop))
    })?;
    agg.wait_for("round closed", Duration::from_secs(3600))?;
    let round_end = Instant::now();
    let (status, watched) = rt.block_on(async {
        // Stop the pollers once the round has closed.
        stop.send(true)?;
        let status = poller.await??;
        let watched = match watcher {
            Some(w) => Some(w.await??),
            None => None,
        };
        Ok::<_, anyhow::Error>((status, watched))
    })?;
    let total_s = round_end.duration_since(t0).as_secs_f64();
    let peak_rss_mb = proc_mb(pid, "VmHWM:")?;
    let field = |k: &str| {
        agg.log_field("round closed", k)
            .with_context(|| format!("no `round closed` log line with {k}"))
    };
    let next_sha = field("global_model")?;
    // Whether this round's updates bypassed the page cache: the aggregator logs its threshold
    // at start (absent when direct I/O is off or the filesystem refuses it) and applies it to
    // model size × sites.
    let direct_above = agg
        .log_field("federation started", "direct_io_above_bytes")
        .and_then(|v| v.parse::<u64>().ok());
    let direct_io = direct_above.is_some_and(|t| (model_bytes * sites) as u64 > t);
    let aggregate_s = field("aggregate_ms")?.parse::<f64>()? / 1e3;
    let model_mb = model_bytes as f64 / 1e6;
    let total_mb = model_mb * sites as f64;
    let rss_goal_mb = 2.5 * model_mb + 100.0;
    let naive_mb = (sites + 2) as f64 * model_mb;
    let aggregator_binary = agg.binary;
    drop(agg);
    // The ceiling the disk sets: every update is written and fsynced before it is
    // acknowledged, so ingest cannot beat the disk's sustained write bandwidth, probed here
    // in the same folder right after the cell (it varies over time on shared disks).
    let disk = disk_write_mb_per_s(work.path(), DISK_PROBE_BYTES)?;
    let ingest_mb_per_s = total_mb / (total_s - aggregate_s);
    let mut row = Cell {
        dashboard_open: dashboard,
        dashboard_fetches: watched.map(|w| w.0),
        dashboard_fetch_max_seconds: watched.map(|w| w.1),
        sites,
        parameters: n_params,
        model_mb,
        update_mb_total: total_mb,
        round_seconds: total_s,
        aggregate_seconds: aggregate_s,
        ingest_seconds: total_s - aggregate_s,
        ingest_mb_per_s,
        round_mb_per_s: total_mb / total_s,
        direct_io,
        direct_io_above_bytes: direct_above,
        aggregator_binary,
        idle_rss_mb: rss_idle_mb,
        peak_rss_mb,
        peak_rss_goal_mb: rss_goal_mb,
        peak_rss_meets_goal: peak_rss_mb <= rss_goal_mb,
        naive_fedavg_mb: naive_mb,
        status_max_seconds: status.0,
        status_calls: status.1,
        disk_write_mb_per_s: disk,
        ingest_over_disk_write_ratio: ingest_mb_per_s / disk,
        flower: None,
        flower_over_fedee_aggregate_time_ratio: None,
        flower_over_fedee_peak_rss_ratio: None,
    };
    if let Some(f) = flower {
        let blobs = work.path().join("blobs");
        let path = |s: &str| blobs.join(&s[..2]).join(s);
        let updates: Vec<(PathBuf, u64)> = shas
            .iter()
            .enumerate()
            .map(|(i, s)| (path(s), 100 + i as u64))
            .collect();
        let fl = f.run(
            &work.path().join("initial.safetensors"),
            &path(&next_sha),
            &updates,
            total_mb,
        )?;
        let get = |k: &str| fl.get(k).and_then(serde_json::Value::as_f64);
        if let (Some(s), Some(r)) = (get("aggregate_seconds"), get("peak_rss_mb")) {
            row.flower_over_fedee_aggregate_time_ratio = Some(s / aggregate_s);
            row.flower_over_fedee_peak_rss_ratio = Some(r / peak_rss_mb);
        }
        row.flower = Some(fl);
    }
    Ok(row)
}

/// Bytes the disk probe writes (1 GiB: past the point where page-cache writes are throttled
/// to the disk's pace).
const DISK_PROBE_BYTES: usize = 1 << 30;

/// Sustained write bandwidth of the file system holding `dir`, in MB/s: `bytes` written in
/// 1 MiB chunks to a new file, then fsynced, as the blob store writes an update.
fn disk_write_mb_per_s(dir: &Path, bytes: usize) -> Result<f64> {
    use std::io::Write;
    let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i * 31 % 251) as u8).collect();
    let mut f = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("disk probe in {}", dir.display()))?;
    let t = Instant::now();
    for _ in 0..bytes.div_ceil(chunk.len()) {
        f.write_all(&chunk)?;
    }
    f.as_file().sync_all()?;
    Ok(bytes as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// Flower's aggregation, run by the venv's Python on the same update files.
pub struct FlowerSide {
    python: PathBuf,
    script: PathBuf,
    /// Skip cells whose updates and Flower's weighted copies would not fit in this many MB.
    max_mb: f64,
}

impl FlowerSide {
    fn run(
        &self,
        global: &Path,
        next: &Path,
        updates: &[(PathBuf, u64)],
        total_mb: f64,
    ) -> Result<serde_json::Value> {
        // Flower holds every update as NumPy arrays and `aggregate` makes a weighted copy of
        // each: about twice the update volume.
        let need = 2.0 * total_mb;
        if need > self.max_mb {
            eprintln!(
                "aggregate: Flower skipped: it would need about {need:.0} MB (limit {:.0} MB, --flower-max-mb)",
                self.max_mb
            );
            return Ok(
                json!({"skipped": format!("needs about {need:.0} MB of memory; limit {:.0} MB", self.max_mb)}),
            );
        }
        let out = Command::new(&self.python)
            .arg(&self.script)
            .arg(global)
            .arg(next)
            .args(updates.iter().map(|(p, n)| format!("{}:{n}", p.display())))
            .output()
            .with_context(|| format!("running {}", self.python.display()))?;
        if !out.status.success() {
            bail!(
                "Flower side failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("Flower side printed no JSON")
    }
}

/// Parse `1M`, `22M`, `100M`, `5000` as a parameter count.
pub fn parse_params(s: &str) -> Result<usize, String> {
    let (num, mult) = match s.strip_suffix(['M', 'm']) {
        Some(n) => (n, 1e6),
        None => match s.strip_suffix(['K', 'k']) {
            Some(n) => (n, 1e3),
            None => (s, 1.0),
        },
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .map(|v| (v * mult) as usize)
        .ok_or_else(|| format!("`{s}` is not a parameter count (examples: 1M, 22M, 5000)"))
}

/// Run every cell; print a table; return the JSON document.
pub fn bench(
    sites: &[usize],
    params: &[usize],
    uploads: usize,
    direct_io: &str,
    work_root: &Path,
    flower: Option<FlowerSide>,
    dashboard: bool,
) -> Result<serde_json::Value> {
    std::fs::create_dir_all(work_root)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut cells = Vec::new();
    for &p in params {
        for &s in sites {
            for open in [false, true] {
                if open && !dashboard {
                    continue;
                }
                let flower = (!open).then_some(flower.as_ref()).flatten();
                let o = CellOptions {
                    uploads,
                    direct_io,
                    flower,
                    dashboard: open,
                };
                let cell = run_cell(&rt, work_root, s, p, &o)?;
                eprintln!(
                    "aggregate: {s} sites × {:.0} MB{}: {:.0} MB/s ingest, round {:.2} s, aggregated in {:.2} s, peak RSS {:.0} MB",
                    cell.model_mb,
                    if open { " (dashboard open)" } else { "" },
                    cell.ingest_mb_per_s,
                    cell.round_seconds,
                    cell.aggregate_seconds,
                    cell.peak_rss_mb
                );
                cells.push(cell);
            }
        }
    }
    {
        use table::Cell::{Fixed, Text};
        table::print(
            &[
                col("sites", "sites", Text),
                col("params", "parameters", Text),
                col("dashboard", "dashboard_open", Text),
                col("round s", "round_seconds", Fixed(2)),
                col("model MB", "model_mb", Fixed(1)),
                col("ingest MB/s", "ingest_mb_per_s", Fixed(0)),
                col("round MB/s", "round_mb_per_s", Fixed(0)),
                col("aggregate s", "aggregate_seconds", Fixed(2)),
                col("peak RSS MB", "peak_rss_mb", Fixed(0)),
                col("goal MB", "peak_rss_goal_mb", Fixed(0)),
                col("naive MB", "naive_fedavg_mb", Fixed(0)),
                col("Flower s", "flower/aggregate_seconds", Fixed(2)),
                col("Flower RSS MB", "flower/peak_rss_mb", Fixed(0)),
                col(
                    "time Flower/fedee",
                    "flower_over_fedee_aggregate_time_ratio",
                    Fixed(2),
                ),
                col(
                    "RSS Flower/fedee",
                    "flower_over_fedee_peak_rss_ratio",
                    Fixed(2),
                ),
                col("disk MB/s", "disk_write_mb_per_s", Fixed(0)),
                col("status max s", "status_max_seconds", Fixed(2)),
                col("direct I/O", "direct_io", Text),
            ],
            &cells,
        );
    }
    println!(
        "peak RSS: VmHWM of the `{}` process. Goal: ≤ 2.5 × model + 100 MB whatever the \
         number of sites; ingest ≥ 300 MB/s. Client and aggregator share this machine's cores. \
         disk: sustained write bandwidth of the work folder (1 GiB + fsync, probed after each \
         cell), the ceiling for durable ingest. status: the slowest answer to a Status request \
         sent every 100 ms through ingest and the round close. direct I/O: whether the \
         round's updates bypassed the page cache (--direct-io).",
        cells.first().map(|c| c.aggregator_binary).unwrap_or("-")
    );
    Ok(json!({
        "benchmark": "aggregate",
        "strategy": "fedavg",
        "transport": "gRPC over loopback, mutual TLS (rustls), 1 MiB chunks",
        "max_concurrent_uploads": uploads,
        "direct_io_setting": direct_io,
        "rows": cells,
    }))
}

/// The Flower side, if the venv has `flwr` (`make bench` installs it).
pub fn flower_side(python: &Path, max_mb: f64) -> Option<FlowerSide> {
    let script = PathBuf::from("scripts/bench_flower.py");
    let ok = Command::new(python)
        .args(["-c", "import flwr.server.strategy.aggregate"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok || !script.exists() {
        eprintln!(
            "aggregate: Flower not run: `{} -c 'import flwr'` failed or {} is missing (run from the repository root; `make bench` installs flwr into .venv)",
            python.display(),
            script.display()
        );
        return None;
    }
    Some(FlowerSide {
        python: python.to_owned(),
        script,
        max_mb,
    })
}
