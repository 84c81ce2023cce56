//! Rounds against the real `fedee aggregator` binary over loopback: deadlines and the quorum
//! (a round closing at its deadline, a round failing and the next starting from the same
//! global model, late updates refused), hostile input (each refused with a clear status while
//! the server keeps serving and keeps what it accepted), and the Prometheus endpoint counting
//! all of it.

mod common;

use std::time::Duration;

use common::{
    Aggregator, download, fedee, metric, noise, raw_safetensors, safetensors_f32, submit,
    update_msgs,
};
use fedee_proto::v1::{JoinRequest, StatusRequest, SubmitUpdateMessage, submit_update_message};
use tonic::Code;

const SHAPE: [usize; 2] = [64, 32];

fn initial_model() -> Vec<u8> {
    safetensors_f32(&[
        ("w", SHAPE.to_vec(), noise(1, 64 * 32, 0.1)),
        ("b", vec![32], vec![0.0; 32]),
    ])
}

fn update(seed: u64) -> Vec<u8> {
    safetensors_f32(&[
        ("w", SHAPE.to_vec(), noise(seed, 64 * 32, 0.01)),
        ("b", vec![32], noise(seed + 100, 32, 0.01)),
    ])
}

fn setup(dir: &std::path::Path) {
    std::fs::write(dir.join("g0.safetensors"), initial_model()).unwrap();
}

async fn wait_round(
    c: &mut fedee_proto::v1::federation_client::FederationClient<tonic::transport::Channel>,
    round: u32,
) -> fedee_proto::v1::StatusResponse {
    for _ in 0..500 {
        let st = c.status(StatusRequest {}).await.unwrap().into_inner();
        if st.current_round >= round {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("round {round} never opened");
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_quorum_failed_rounds_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let agg = Aggregator::start(
        dir,
        "127.0.0.1:0",
        &[
            "--insecure",
            "--initial-model",
            "g0.safetensors",
            "--database-url",
            "sqlite://agg.db?mode=rwc",
            // A test of rounds, not of privacy (σ = 0.1 by default).
            "--max-epsilon",
            "inf",
            "--rounds",
            "3",
            "--min-sites",
            "2",
            "--round-timeout",
            "1.5",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let mut c = agg.client().await;
    for s in ["A", "B", "C"] {
        c.join(JoinRequest {
            site: s.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Round 1: two of three sites. Not every enrolled site reported, so the round stays open
    // until its deadline, then closes on the quorum.
    assert_eq!(
        submit(&mut c, update_msgs("A", 1, 10, &update(11)))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        submit(&mut c, update_msgs("B", 1, 30, &update(12)))
            .await
            .unwrap(),
        2
    );
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.current_round, st.rounds[0].state.as_str()), (1, "open"));
    let st = wait_round(&mut c, 2).await;
    assert_eq!(st.rounds[0].state, "closed");
    // C was late: its round-1 update is refused as stale.
    let late = submit(&mut c, update_msgs("C", 1, 20, &update(13)))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert!(late.message().contains("stale round"), "{}", late.message());

    // Round 2: one site only: below the quorum at the deadline, the round fails and round 3
    // starts from the same global model.
    assert_eq!(
        submit(&mut c, update_msgs("A", 2, 10, &update(21)))
            .await
            .unwrap(),
        1
    );
    let st = wait_round(&mut c, 3).await;
    assert_eq!(st.rounds[1].state, "failed");
    assert!(
        st.rounds[1]
            .reason
            .contains("quorum not met: 1 of the required 2"),
        "{}",
        st.rounds[1].reason
    );
    assert_eq!(download(&mut c, 3).await, download(&mut c, 2).await);
    assert_ne!(download(&mut c, 2).await, download(&mut c, 1).await);

    // Round 3: every enrolled site reports, so it closes at once, before its deadline.
    for (i, s) in ["A", "B", "C"].iter().enumerate() {
        submit(&mut c, update_msgs(s, 3, 10, &update(30 + i as u64)))
            .await
            .unwrap();
    }
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(
        st.done,
        "round 3 should close without waiting for its deadline"
    );
    assert_eq!(st.rounds[2].state, "closed");

    let text = agg.scrape().await;
    assert_eq!(
        metric(&text, "fedee_aggregator_rounds_total{outcome=\"closed\"}"),
        2.0
    );
    assert_eq!(
        metric(&text, "fedee_aggregator_rounds_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "fedee_aggregator_updates_accepted_total"),
        6.0
    );
    assert_eq!(
        metric(
            &text,
            "fedee_aggregator_updates_rejected_total{reason=\"stale_round\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "fedee_aggregator_current_round"), 4.0);
    assert_eq!(metric(&text, "fedee_aggregator_sites_joined"), 3.0);
    assert_eq!(
        metric(&text, "fedee_aggregator_round_duration_seconds_count"),
        3.0
    );
    assert_eq!(
        metric(&text, "fedee_aggregator_update_bytes_total"),
        6.0 * update(1).len() as f64
    );
    // `fedee status` shows the failed round and why.
    let out = fedee(&["status", "--insecure", "--aggregator", &agg.addr], dir);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains("failed") && shown.contains("quorum not met"),
        "{shown}"
    );
    let log = agg.log();
    assert!(log.contains("round failed"), "{log}");
}

/// A stream that sends `first` messages, then stalls forever (a client that hangs mid-upload).
fn stalled(
    msgs: Vec<SubmitUpdateMessage>,
    first: usize,
) -> impl futures::Stream<Item = SubmitUpdateMessage> {
    use futures::StreamExt;
    futures::stream::iter(msgs.into_iter().take(first)).chain(futures::stream::pending())
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_is_refused_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let agg = Aggregator::start(
        dir,
        "127.0.0.1:0",
        &[
            "--insecure",
            "--initial-model",
            "g0.safetensors",
            "--database-url",
            "sqlite://agg.db?mode=rwc",
            // A test of rounds, not of privacy (σ = 0.1 by default).
            "--max-epsilon",
            "inf",
            "--rounds",
            "1",
            "--min-sites",
            "2",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let mut c = agg.client().await;
    for s in ["A", "B"] {
        c.join(JoinRequest {
            site: s.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let good = update(5);
    assert_eq!(
        submit(&mut c, update_msgs("A", 1, 10, &good))
            .await
            .unwrap(),
        1
    );
    // Metrics only for global models that exist (rows stay bounded by models × sites).
    let refused = c
        .report_metrics(fedee_proto::v1::MetricsReport {
            site: "A".into(),
            model: 99,
            test_accuracy: 0.5,
            num_test_examples: 10,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("no global model 99"),
        "{refused:?}"
    );

    let with_chunk = |f: &dyn Fn(&mut fedee_proto::v1::Chunk)| {
        let mut m = update_msgs("B", 1, 10, &update(6));
        if let Some(submit_update_message::Msg::Chunk(ch)) = &mut m[1].msg {
            f(ch);
        }
        m
    };
    let lying = raw_safetensors(
        r#"{"w":{"dtype":"F32","shape":[64,32],"data_offsets":[0,8192]},"b":{"dtype":"F32","shape":[32],"data_offsets":[8192,8320]}}"#,
        &[0u8; 64],
    );
    let f64_tensor = raw_safetensors(
        r#"{"b":{"dtype":"F64","shape":[32],"data_offsets":[0,256]},"w":{"dtype":"F32","shape":[64,32],"data_offsets":[256,8448]}}"#,
        &[0u8; 8448],
    );
    let cases: Vec<(&str, Vec<SubmitUpdateMessage>, Code, &str, &str)> = vec![
        (
            "oversized message (5 MiB in one chunk)",
            with_chunk(&|ch| {
                ch.data = vec![0; 5 << 20].into();
                ch.total_size = 5 << 20;
            }),
            Code::OutOfRange,
            "message length too large",
            "stream",
        ),
        (
            "blob larger than the model",
            with_chunk(&|ch| ch.total_size = 1 << 30),
            Code::InvalidArgument,
            "exceeds",
            "stream",
        ),
        (
            "chunk out of order",
            with_chunk(&|ch| ch.offset = 4096),
            Code::InvalidArgument,
            "offset",
            "stream",
        ),
        (
            "truncated stream",
            with_chunk(&|ch| ch.data.truncate(100)),
            Code::InvalidArgument,
            "truncated",
            "stream",
        ),
        (
            "wrong SHA-256",
            {
                let mut m = update_msgs("B", 1, 10, &update(6));
                if let Some(submit_update_message::Msg::Header(h)) = &mut m[0].msg {
                    h.sha256 = "ab".repeat(32);
                }
                m
            },
            Code::InvalidArgument,
            "SHA-256 mismatch",
            "sha256_mismatch",
        ),
        (
            "safetensors header lying about sizes",
            update_msgs("B", 1, 10, &lying),
            Code::InvalidArgument,
            "not valid safetensors",
            "invalid_tensors",
        ),
        (
            "tensor of the wrong dtype",
            update_msgs("B", 1, 10, &f64_tensor),
            Code::InvalidArgument,
            "dtype F64",
            "invalid_tensors",
        ),
    ];
    let mut expected = std::collections::BTreeMap::<&str, f64>::new();
    for (what, m, code, text, reason) in cases {
        let err = submit(&mut c, m).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(text),
            "{what}: `{}` lacks `{text}`",
            err.message()
        );
        if !reason.is_empty() {
            *expected.entry(reason).or_default() += 1.0;
        }
        // The server keeps serving.
        c.status(StatusRequest {}).await.expect(what);
    }
    // A client that stalls mid-upload and gives up: the connection drops, nothing is kept.
    let big = safetensors_f32(&[
        ("w", SHAPE.to_vec(), noise(7, 64 * 32, 0.01)),
        ("b", vec![32], vec![0.0; 32]),
    ]);
    let mut c2 = agg.client().await;
    let hung = tokio::time::timeout(
        Duration::from_millis(300),
        c2.submit_update(stalled(update_msgs("B", 1, 10, &big), 1)),
    )
    .await;
    assert!(hung.is_err(), "the stalled upload should not complete");
    drop(c2);
    // Nothing accepted was lost: A's update is still counted once, and B's good update
    // completes the round.
    assert_eq!(
        submit(&mut c, update_msgs("A", 1, 10, &good))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        submit(&mut c, update_msgs("B", 1, 10, &update(6)))
            .await
            .unwrap(),
        2
    );
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.done && st.rounds[0].state == "closed");
    let text = agg.scrape().await;
    for (reason, n) in expected {
        let got = metric(
            &text,
            &format!("fedee_aggregator_updates_rejected_total{{reason=\"{reason}\"}}"),
        );
        // The stalled upload adds one `stream` rejection when the server notices the reset.
        if reason == "stream" {
            assert!(got == n || got == n + 1.0, "{reason}: {got} vs {n}");
        } else {
            assert_eq!(got, n, "{reason}");
        }
    }
    assert_eq!(
        metric(&text, "fedee_aggregator_updates_accepted_total"),
        2.0
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    // The flags' defaults (site-level σ = 0.1 over 20 rounds) protect nobody: refused
    // before any port is bound, naming the ε and the flag that would accept it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args(["aggregator", "--listen", "127.0.0.1:0", "--insecure"])
        .args(["--initial-model", "g0.safetensors"])
        .args(["--database-url", "sqlite://refused.db?mode=rwc"])
        .current_dir(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("plans ε = ")
            && err.contains("above the limit ε = 10")
            && err.contains("--max-epsilon"),
        "{err}"
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args(["aggregator", "--listen", "127.0.0.1:0", "--insecure"])
        .args([
            "--initial-model",
            "g0.safetensors",
            "--metrics-listen",
            "127.0.0.1:0",
            "--max-epsilon",
            "inf",
        ])
        .args(["--database-url", "sqlite://agg.db?mode=rwc"])
        .current_dir(dir)
        .env("FEDEE_LOG_FORMAT", "json")
        .env_remove("FEDEE_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.map_while(Result::ok) {
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        let msg = v["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        seen.push(msg.clone());
        if msg == "federation started" {
            assert_eq!(v["level"], "INFO");
            assert_eq!(v["fields"]["round"], 1);
        }
        if msg.contains("Prometheus") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.iter().any(|m| m.contains("--insecure")), "{seen:?}");
    assert!(
        seen.iter()
            .any(|m| m.starts_with("aggregator listening on")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|m| m == "federation started"), "{seen:?}");
}
