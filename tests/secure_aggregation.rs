//! Secure aggregation end to end: five real site agents and the aggregator over mutual TLS,
//! with the heart-disease spec and `[federation.secure_aggregation]`. One site is killed
//! after it shared its keys (its masked input never arrives: the others' sum is recovered
//! without it), the aggregator is SIGKILLed mid-protocol (the round fails cleanly with a
//! reason and the next one runs), and hostile requests over a site's own certificate are
//! refused by name.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Aggregator, fedee, heart_csv, heart_spec, spec_and_model};
use fedee_proto::pki::{Role, TlsFiles};
use fedee_proto::v1::federation_client::FederationClient;
use fedee_proto::v1::{
    SecAggAdvertise, SecAggMaskedHeader, SecAggRequest, StatusRequest, sec_agg_request,
};

/// (site name, its rows of the shared CSV).
const SITES: [(&str, &str); 5] = [
    ("Cleveland", "Cleveland"),
    ("Cleveland-B", "Cleveland"),
    ("Hungary", "Hungary"),
    ("LongBeach", "VA Long Beach"),
    ("Switzerland", "Switzerland"),
];
/// The site killed mid-round.
const VICTIM: &str = "Cleveland-B";

fn start_site(dir: &Path, addr: &str, name: &str, rows: &str, poll: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args([
            "site",
            "--tls-dir",
            "pki",
            "--aggregator",
            addr,
            "--site",
            name,
        ])
        .arg("--data")
        .arg(heart_csv())
        .args(["--where", &format!("dataset={rows}")])
        // σ = 0.1 protects nobody: this test is about the protocol, not privacy.
        .args(["--min-noise-multiplier", "0.1", "--epsilon-budget", "inf"])
        .args(["--new-ledger", "--retries", "20", "--poll-interval", poll])
        .env("FEDEE_LOG", "info")
        .env("FEDEE_LOG_FORMAT", "plain")
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A federation client with site `name`'s certificate.
async fn as_site(
    dir: &Path,
    addr: &str,
    name: &str,
) -> FederationClient<tonic::transport::Channel> {
    let files = TlsFiles::in_dir(&dir.join("pki"), name);
    let ch = fedee_proto::pki::connect(
        &format!("https://{addr}"),
        Some(&files),
        Role::Aggregator,
        Duration::from_secs(5),
    )
    .await
    .unwrap()
    .unwrap();
    FederationClient::new(ch)
}

#[test]
fn five_sites_over_mtls_survive_a_dropout_and_an_aggregator_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let spec = heart_spec(&[
        ("rounds = 10\n", "rounds = 4\n"),
        ("round_timeout_s = 600\n", "round_timeout_s = 10\n"),
        (
            "strategy = \"fedavg\"\n",
            "strategy = \"fedavg\"\n\n[federation.secure_aggregation]\nstage_timeout_s = 8\n",
        ),
        ("mode = \"record\"\n", "mode = \"site\"\n"),
        ("target_epsilon = 1.0\n", "noise_multiplier = 0.1\n"),
    ]);
    spec_and_model(dir, &spec);
    let mut setup = vec![
        vec!["certs", "init", "--dir", "pki"],
        vec![
            "certs",
            "issue",
            "--dir",
            "pki",
            "--aggregator",
            "aggregator",
        ],
    ];
    for (name, _) in SITES {
        setup.push(vec!["certs", "issue", "--dir", "pki", "--site", name]);
    }
    for args in setup {
        let out = fedee(&args, dir);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut agg_args = vec![
        "--tls-dir",
        "pki",
        "--spec",
        "federation.toml",
        "--initial-model",
        "g0.safetensors",
        "--database-url",
        "sqlite://agg.db?mode=rwc",
        "--max-epsilon",
        "inf",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    for (name, _) in SITES {
        agg_args.extend(["--enroll", name]);
    }
    let agg = Aggregator::start(dir, "127.0.0.1:0", &agg_args);
    let addr = agg.addr.clone();
    // The victim asks every 3 s: once its keys are shared it waits that long before it
    // fetches its shares, trains and sends its masked input, which leaves the test time to
    // kill it in between.
    let mut sites: Vec<(&str, Child)> = SITES
        .iter()
        .map(|&(name, rows)| {
            let poll = if name == VICTIM { "3" } else { "0.1" };
            (name, start_site(dir, &addr, name, rows, poll))
        })
        .collect();
    agg.wait_for_log("round closed round=1 ", Duration::from_secs(120));
    agg.wait_for_log(
        "secure aggregation: shares routed round=2",
        Duration::from_secs(60),
    );
    let victim = sites.iter().position(|(n, _)| *n == VICTIM).unwrap();
    let (_, mut child) = sites.remove(victim);
    child.kill().unwrap();
    let victim_log =
        String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned();
    assert!(
        victim_log.contains("keys shared")
            && !victim_log
                .lines()
                .any(|l| l.contains("masked input sent") && l.contains("round=2")),
        "the victim must die after sharing its keys, before sending round 2's input:\n{victim_log}"
    );
    // Its masked input never comes: the stage closes at its deadline with four alive and one
    // dropped, and the dropped site's pairwise masks are rebuilt from the others' shares.
    agg.wait_for_log(
        "masked inputs in round=2 alive=4 dropped=1",
        Duration::from_secs(60),
    );
    agg.wait_for_log("round closed round=2 ", Duration::from_secs(60));

    // Hostile requests over a real site certificate (the victim's, now unused).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = as_site(dir, &addr, VICTIM).await;
        let round = c
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .current_round;
        // A plaintext update is refused outright.
        let blob = common::safetensors_f32(&[("w", vec![1], vec![0.0])]);
        let err = common::submit(&mut c, common::update_msgs(VICTIM, round, 10, &blob))
            .await
            .unwrap_err();
        assert!(err.message().contains("aggregates securely"), "{err:?}");
        // Another site's name, a malformed key, a masked input of the wrong length.
        let req = |site: &str, key_len: usize| SecAggRequest {
            site: site.into(),
            round,
            msg: Some(sec_agg_request::Msg::Advertise(SecAggAdvertise {
                site: 0,
                channel_key: vec![1; key_len],
                mask_key: vec![2; 32],
            })),
        };
        let err = c.secure_aggregation(req("Hungary", 32)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        let err = c.secure_aggregation(req(VICTIM, 31)).await.unwrap_err();
        assert!(
            err.code() == tonic::Code::InvalidArgument && err.message().contains("31 bytes")
                || err.code() == tonic::Code::FailedPrecondition,
            "{err:?}"
        );
        let msgs = fedee_proto::masked_messages(
            SecAggMaskedHeader {
                site: VICTIM.into(),
                round,
                words: 3,
                privacy: None,
            },
            &[1, 2, 3],
        );
        let err = c
            .submit_masked(futures::stream::iter(msgs))
            .await
            .unwrap_err();
        assert!(
            err.message().contains("3 words") || err.code() == tonic::Code::FailedPrecondition,
            "{err:?}"
        );
    });

    // The operator sees the dropout and the refusals in the metrics.
    let text = rt.block_on(agg.scrape());
    let series =
        |outcome: &str| format!("fedee_aggregator_secagg_sites_total{{outcome=\"{outcome}\"}}");
    assert_eq!(
        common::metric(&text, &series("alive")),
        9.0,
        "5 in round 1, 4 in round 2"
    );
    assert_eq!(common::metric(&text, &series("dropped")), 1.0);
    assert!(common::metric(&text, "fedee_aggregator_secagg_messages_refused_total") >= 2.0);

    // SIGKILL the aggregator in round 3's protocol, then restart it: round 3 fails with the
    // reason, round 4 runs with fresh keys.
    agg.wait_for_log(
        "secure aggregation started round=3",
        Duration::from_secs(60),
    );
    agg.sigkill();
    std::thread::sleep(Duration::from_millis(500));
    let agg = Aggregator::start(dir, &addr, &agg_args);
    agg.wait_for_log(
        "restarted during the round's secure aggregation",
        Duration::from_secs(30),
    );
    let t = Instant::now();
    for (name, child) in sites {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name} failed:\n{err}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let trained: Vec<u64> = report["rounds_trained"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_u64().unwrap())
            .collect();
        assert_eq!(trained, vec![1, 2, 4], "{name}: {report}");
        // The final model was evaluated.
        assert!(
            report["evaluations"].as_array().unwrap().len() >= 4,
            "{report}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(180));
    rt.block_on(async {
        let st = as_site(dir, &addr, "Hungary")
            .await
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(st.done, "{st:?}");
        let states: Vec<&str> = st.rounds.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["closed", "closed", "failed", "closed"], "{st:?}");
        assert!(st.rounds[2].reason.contains("restarted"), "{st:?}");
        // The sites' test accuracy of the last model: learned something.
        let w = st.rounds[3]
            .weighted
            .as_ref()
            .expect("metrics of the last model");
        assert!(w.test_accuracy > 0.6, "{w:?}");
    });
    let log = agg.log();
    // Nothing of a site's update or secrets in the aggregator's log.
    assert!(!log.contains("seed") && !log.contains("secret"), "{log}");
}
