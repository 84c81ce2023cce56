//! Crash recovery against the real binaries: the aggregator killed with SIGKILL mid-round
//! (with one upload in flight) resumes the same round from its database and blob store,
//! accepted updates are neither lost nor counted twice, and the global model is bit-identical
//! to an uninterrupted run, on SQLite and on PostgreSQL. Real site agents ride out an
//! aggregator restart with retries and finish the federation.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Aggregator, download, heart_csv, heart_spec, noise, postgres_database, safetensors_f32,
    spec_and_model, submit, update_msgs,
};
use fedee_proto::v1::{JoinRequest, StatusRequest};
use tonic::Code;

/// A model of ~1.3 M parameters: each update spans several 1 MiB chunks.
fn tensors(seed: u64, scale: f32) -> Vec<u8> {
    safetensors_f32(&[
        (
            "layer.weight",
            vec![1024, 1280],
            noise(seed, 1024 * 1280, scale),
        ),
        ("layer.bias", vec![1280], noise(seed + 1, 1280, scale)),
    ])
}

const SITES: [(&str, u64); 3] = [("Cleveland", 199), ("Hungary", 261), ("Switzerland", 75)];

fn args(db: &str) -> Vec<&str> {
    vec![
        "--insecure",
        "--initial-model",
        "g0.safetensors",
        "--database-url",
        db,
        "--blob-dir",
        "blobs",
        "--rounds",
        "1",
        "--min-sites",
        "3",
        // A test of recovery, not of privacy (σ = 0.1 by default).
        "--max-epsilon",
        "inf",
    ]
}

/// One round, uninterrupted: the reference global model 2.
async fn uninterrupted(dir: &Path, db: &str) -> Vec<u8> {
    let agg = Aggregator::start(dir, "127.0.0.1:0", &args(db));
    let mut c = agg.client().await;
    for (s, _) in SITES {
        c.join(JoinRequest {
            site: s.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for (i, (s, n)) in SITES.iter().enumerate() {
        submit(&mut c, update_msgs(s, 1, *n, &tensors(10 + i as u64, 0.01)))
            .await
            .unwrap();
    }
    download(&mut c, 2).await
}

/// The same round with a SIGKILL after two accepted updates and during a third upload.
async fn interrupted(dir: &Path, db: &str) -> Vec<u8> {
    let agg = Aggregator::start(dir, "127.0.0.1:0", &args(db));
    let addr = agg.addr.clone();
    let mut c = agg.client().await;
    for (s, _) in SITES {
        c.join(JoinRequest {
            site: s.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for (i, (s, n)) in SITES[..2].iter().enumerate() {
        let k = submit(&mut c, update_msgs(s, 1, *n, &tensors(10 + i as u64, 0.01)))
            .await
            .unwrap();
        assert_eq!(k, i as u32 + 1);
    }
    // The third site starts uploading (header and first chunk) and hangs.
    let third = update_msgs(SITES[2].0, 1, SITES[2].1, &tensors(12, 0.01));
    assert!(third.len() > 2, "the update must span several chunks");
    let mut c3 = agg.client().await;
    let partial = {
        use futures::StreamExt;
        futures::stream::iter(third[..2].to_vec()).chain(futures::stream::pending())
    };
    let upload = tokio::spawn(async move { c3.submit_update(partial).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    agg.sigkill();
    let cut = upload
        .await
        .unwrap()
        .expect_err("the upload was cut by the kill");
    assert_ne!(cut.code(), Code::Ok);

    // Restart on the same database, blob store and port.
    let agg = Aggregator::start(dir, &addr, &args(db));
    agg.wait_for_log("federation started", Duration::from_secs(30));
    assert!(
        agg.log()
            .contains("federation started round=1 rounds=1 updates_in_round=2"),
        "{}",
        agg.log()
    );
    let mut c = agg.client().await;
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.current_round, st.rounds[0].state.as_str()), (1, "open"));
    // A site whose acknowledgement was lost resubmits: acknowledged, not counted twice.
    let again = submit(
        &mut c,
        update_msgs(SITES[1].0, 1, SITES[1].1, &tensors(11, 0.01)),
    )
    .await
    .unwrap();
    assert_eq!(again, 2, "a resubmitted update must not be counted twice");
    // A different update from the same site is refused.
    let other = submit(
        &mut c,
        update_msgs(SITES[0].0, 1, SITES[0].1, &tensors(99, 0.01)),
    )
    .await
    .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");
    // The third site uploads again, from scratch. The running mean of the first two was in
    // memory only: it is folded again from their files, in their recorded order.
    assert_eq!(submit(&mut c, third).await.unwrap(), 3);
    agg.wait_for_log(
        "running mean: updates read back from disk (after a restart, a failed fold, or folds still queued) round=1 updates=3",
        Duration::from_secs(10),
    );
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.done && st.rounds[0].state == "closed", "{st:?}");
    download(&mut c, 2).await
}

async fn check_bit_identical(sqlite: bool, dir: &Path, reference_db: &str, crash_db: &str) {
    std::fs::write(dir.join("g0.safetensors"), tensors(1, 0.1)).unwrap();
    let ref_dir = dir.join("reference");
    let crash_dir = dir.join("crash");
    for d in [&ref_dir, &crash_dir] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(dir.join("g0.safetensors"), d.join("g0.safetensors")).unwrap();
    }
    let a = uninterrupted(&ref_dir, reference_db).await;
    let b = interrupted(&crash_dir, crash_db).await;
    let which = if sqlite { "SQLite" } else { "PostgreSQL" };
    assert_eq!(a.len(), b.len(), "{which}");
    assert!(
        a == b,
        "{which}: global model after the crash differs from the uninterrupted run"
    );
    // And the round did move the model.
    assert_ne!(a, tensors(1, 0.1));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_round_resumes_bit_identical_on_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    check_bit_identical(
        true,
        tmp.path(),
        "sqlite://agg.db?mode=rwc",
        "sqlite://agg.db?mode=rwc",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_round_resumes_bit_identical_on_postgres() {
    let Some(reference) = postgres_database("reference").await else {
        return;
    };
    let crash = postgres_database("crash").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    check_bit_identical(false, tmp.path(), &reference, &crash).await;
}

#[test]
fn site_agents_survive_an_aggregator_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The heart example over 40 rounds, with site-level DP (σ = 0.1: this test is about
    // recovery, not privacy).
    let spec = heart_spec(&[
        ("rounds = 10\n", "rounds = 40\n"),
        ("mode = \"record\"\n", "mode = \"site\"\n"),
        ("target_epsilon = 1.0\n", "noise_multiplier = 0.1\n"),
    ]);
    spec_and_model(dir, &spec);
    let agg_args = [
        "--insecure",
        "--spec",
        "federation.toml",
        "--initial-model",
        "g0.safetensors",
        "--database-url",
        "sqlite://agg.db?mode=rwc",
        "--max-epsilon",
        "inf",
    ];
    let agg = Aggregator::start(dir, "127.0.0.1:0", &agg_args);
    let addr = agg.addr.clone();
    let csv = heart_csv();
    let sites: Vec<_> = ["Cleveland", "Hungary", "Switzerland"]
        .iter()
        .map(|s| {
            std::process::Command::new(env!("CARGO_BIN_EXE_fedee"))
                .args(["site", "--insecure", "--aggregator", &addr, "--site", s])
                .arg("--data")
                .arg(&csv)
                .args(["--where", &format!("dataset={s}")])
                // σ = 0.1 over 40 rounds protects nobody: accepted explicitly.
                .args(["--min-noise-multiplier", "0.1", "--epsilon-budget", "inf"])
                .arg("--new-ledger")
                .args(["--retries", "20"])
                .env("FEDEE_LOG", "warn")
                .current_dir(dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Kill the aggregator as soon as a few rounds have closed, mid-federation.
    agg.wait_for_log("round closed round=3 ", Duration::from_secs(120));
    agg.sigkill();
    std::thread::sleep(Duration::from_millis(1500));
    let agg = Aggregator::start(dir, &addr, &agg_args);
    agg.wait_for_log("federation started", Duration::from_secs(30));
    let resumed_at: u32 = agg
        .log()
        .split("federation started round=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("restart logs the round it resumes");
    assert!(
        resumed_at < 40,
        "the kill should land mid-federation, resumed at {resumed_at}"
    );
    let t = Instant::now();
    for child in sites {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "site failed:\n{err}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let trained = report["rounds_trained"].as_array().unwrap();
        assert_eq!(
            trained.last().and_then(serde_json::Value::as_u64),
            Some(40),
            "{report}"
        );
        // Every round was trained once by every site, even across the restart.
        let mut seen = std::collections::BTreeSet::new();
        assert!(
            trained.iter().all(|r| seen.insert(r.as_u64().unwrap())),
            "{report}"
        );
        assert!(
            err.contains("retrying"),
            "the site should have retried:\n{err}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(240));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = agg.client().await;
        let st = c.status(StatusRequest {}).await.unwrap().into_inner();
        assert!(st.done, "{st:?}");
        assert_eq!(st.rounds.len(), 40);
        assert!(st.rounds.iter().all(|r| r.state == "closed"), "{st:?}");
    });
}
