//! Helpers for end-to-end tests that drive the real `fedee` binary over loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedee_proto::Reassembler;
use fedee_proto::v1::federation_client::FederationClient;
use fedee_proto::v1::{DownloadModelRequest, SubmitUpdateMessage, UpdateHeader};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// Run `fedee ARGS` in `dir` to completion.
pub fn fedee(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// A running `fedee aggregator` whose stderr is collected; killed (SIGKILL) on drop.
pub type Aggregator = Service;

/// A running fedee service (`fedee aggregator` or `fedee trainer`) whose stderr is
/// collected; killed (SIGKILL) on drop.
pub struct Service {
    pub child: Child,
    pub addr: String,
    pub metrics: Option<String>,
    pub log: Arc<Mutex<String>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// Start `fedee aggregator --listen LISTEN ARGS` in `dir` (FEDEE_LOG=info) and wait until
    /// it listens (and serves metrics, if `--metrics-listen` is among the args).
    pub fn start(dir: &Path, listen: &str, args: &[&str]) -> Self {
        Self::start_role(dir, "aggregator", listen, args)
    }

    /// Start `fedee ROLE --listen LISTEN ARGS` (`aggregator` or `trainer`) in `dir` and wait
    /// until it prints `ROLE listening on ADDR`.
    pub fn start_role(dir: &Path, role: &str, listen: &str, args: &[&str]) -> Self {
        let wants_metrics = args.contains(&"--metrics-listen");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fedee"))
            .args([role, "--listen", listen])
            .args(args)
            .current_dir(dir)
            .env("FEDEE_LOG", "info")
            .env("FEDEE_LOG_FORMAT", "plain")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() || (wants_metrics && metrics.is_none()) {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                panic!("{role} exited before listening:\n{}", log.lock().unwrap());
            };
            if let Some(a) = line.strip_prefix(&format!("{role} listening on ")) {
                addr = Some(a.trim().to_owned());
            }
            if line.contains("serving Prometheus metrics") {
                metrics = line
                    .split("addr=")
                    .nth(1)
                    .and_then(|a| a.split_whitespace().next())
                    .map(str::to_owned);
            }
            log.lock().unwrap().push_str(&format!("{line}\n"));
        }
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                sink.lock().unwrap().push_str(&format!("{l}\n"));
            }
        });
        Self {
            child,
            addr: addr.unwrap(),
            metrics,
            log,
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let t = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                t.elapsed() < timeout,
                "aggregator log never showed `{needle}`:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn client(&self) -> FederationClient<Channel> {
        let url = format!("http://{}", self.addr);
        for _ in 0..200 {
            if let Ok(c) = FederationClient::connect(url.clone()).await {
                return c.max_decoding_message_size(64 << 20);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot connect to {url}");
    }

    /// `GET /metrics` over plain HTTP/1.1.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self
            .metrics
            .as_ref()
            .expect("started with --metrics-listen");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }
}

/// The value of the first metric line starting with `series` (name plus labels).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("metric `{series}` missing from:\n{text}"))
}

/// Safetensors bytes of F32 tensors, built without the aggregator's code (the tests check it).
pub fn safetensors_f32(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    let mut sorted: Vec<_> = tensors.iter().collect();
    sorted.sort_by_key(|t| t.0);
    for (name, shape, values) in sorted {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    raw_safetensors(&serde_json::Value::Object(header).to_string(), &data)
}

/// Safetensors framing around any header text and data (for lying headers).
pub fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// A deterministic pseudo-random vector (xorshift), values in [-scale, scale].
pub fn noise(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Header + 1 MiB chunks of an update.
pub fn update_msgs(site: &str, round: u32, n: u64, blob: &[u8]) -> Vec<SubmitUpdateMessage> {
    let header = UpdateHeader {
        site: site.into(),
        round,
        num_examples: n,
        sha256: hex::encode(Sha256::digest(blob)),
        privacy: None,
    };
    fedee_proto::update_messages(header, blob)
}

pub async fn submit(
    c: &mut FederationClient<Channel>,
    m: Vec<SubmitUpdateMessage>,
) -> Result<u32, tonic::Status> {
    c.submit_update(futures::stream::iter(m))
        .await
        .map(|r| r.into_inner().updates_in_round)
}

pub async fn download(c: &mut FederationClient<Channel>, model: u32) -> Vec<u8> {
    let mut s = c
        .download_model(DownloadModelRequest { model })
        .await
        .unwrap()
        .into_inner();
    let mut r = Reassembler::new(1 << 30);
    while let Some(ch) = s.message().await.unwrap() {
        r.push(ch).unwrap();
    }
    r.finish().unwrap()
}

/// A fresh, empty PostgreSQL database for one test, from `FEDEE_TEST_POSTGRES_URL` (an admin
/// URL; `.ci/run` starts a throwaway server and sets it). `None` (with a note) when unset
/// outside CI; in CI (`CI` set) a missing server fails the test.
pub async fn postgres_database(tag: &str) -> Option<String> {
    let Ok(admin) = std::env::var("FEDEE_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must test PostgreSQL: FEDEE_TEST_POSTGRES_URL is unset (.ci/run starts a server and sets it)"
        );
        eprintln!(
            "note: FEDEE_TEST_POSTGRES_URL unset: PostgreSQL part of `{tag}` not run (.ci/run runs it)"
        );
        return None;
    };
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to FEDEE_TEST_POSTGRES_URL: {e}"));
    let name = format!(
        "fedee_{tag}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}

/// The data directory of the repository.
pub fn heart_csv() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/cache/heart_disease_uci.csv");
    assert!(
        p.exists(),
        "{} is missing: run `make data` (make test does it)",
        p.display()
    );
    p
}

/// The heart-disease example spec (`examples/heart-disease/federation.toml`) with each
/// `(from, to)` edit applied once; every `from` must occur in it, so an edit cannot miss
/// silently when the example changes.
pub fn heart_spec(edits: &[(&str, &str)]) -> String {
    let path = PathBuf::from(heart_example());
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "{} has no `{from}`", path.display());
        text = text.replacen(from, to, 1);
    }
    text
}

/// Write `spec` to DIR/federation.toml and run `fedee init-model --spec federation.toml --out
/// g0.safetensors` there, which must succeed.
pub fn spec_and_model(dir: &Path, spec: &str) {
    std::fs::write(dir.join("federation.toml"), spec).unwrap();
    let out = fedee(
        &[
            "init-model",
            "--spec",
            "federation.toml",
            "--out",
            "g0.safetensors",
        ],
        dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The path of the heart-disease example spec, as a string.
pub fn heart_example() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/heart-disease/federation.toml")
        .to_str()
        .unwrap()
        .to_owned()
}
