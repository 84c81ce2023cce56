//! Record-level DP end to end with the real binaries: an aggregator in `--dp-mode record` and
//! three site agents running DP-SGD, each with its own ε budget and ledger. Each site trains
//! exactly as many rounds as its budget allows, then refuses with a message naming spent,
//! requested and budget, and leaves; the aggregator shows every site's spend, and once fewer
//! sites than the quorum remain it fails the open round and ends the federation.

mod common;

use std::time::Duration;

use common::{Aggregator, fedee, heart_csv, heart_spec, spec_and_model};
use fedee_dp::rdp::RdpAccountant;
use fedee_proto::v1::StatusRequest;

const SITES: [&str; 3] = ["Cleveland", "Hungary", "Switzerland"];
const BATCH: u64 = 16;
const EPOCHS: u64 = 2;
const SIGMA: f64 = 1.0;
const DELTA: f64 = 1e-5;

/// ε of `rounds` DP-SGD rounds on `n` records, as the site will account them.
fn epsilon(n: u64, rounds: u64) -> f64 {
    let mut acc = RdpAccountant::default();
    acc.add(
        (BATCH as f64 / n as f64).min(1.0),
        SIGMA,
        rounds * EPOCHS * n.div_ceil(BATCH),
    )
    .unwrap();
    acc.epsilon(DELTA).0
}

#[tokio::test(flavor = "multi_thread")]
async fn sites_stop_at_their_record_level_budget_and_the_aggregator_shows_their_spend() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The heart example at a fixed σ = 1 over 4 rounds (its quorum is 3 sites, batch 16, 2
    // local epochs, C = 1).
    let spec = heart_spec(&[
        ("rounds = 10\n", "rounds = 4\n"),
        ("target_epsilon = 1.0\n", "noise_multiplier = 1.0\n"),
    ]);
    spec_and_model(dir, &spec);
    let parsed = fedee_spec::FederationSpec::from_toml(&spec).unwrap();
    assert_eq!(
        (parsed.training.batch_size, parsed.training.epochs),
        (BATCH as u32, EPOCHS as u32)
    );
    let agg = Aggregator::start(
        dir,
        "127.0.0.1:0",
        &[
            "--insecure",
            "--spec",
            "federation.toml",
            "--initial-model",
            "g0.safetensors",
            "--database-url",
            "sqlite://agg.db?mode=rwc",
        ],
    );
    let csv = heart_csv();
    // Each site's budget allows exactly two rounds on its own data.
    let mut children = vec![];
    let mut expected = vec![];
    for s in SITES {
        let filter = format!("dataset={s}");
        let (task, _) = fedee_site_agent::task::from_spec(
            &parsed,
            &csv,
            Some(&filter.parse().unwrap()),
            tch::Device::Cpu,
        )
        .unwrap();
        let n = task.num_examples();
        let (e2, e3) = (epsilon(n, 2), epsilon(n, 3));
        assert!(e3 > e2 * 1.01);
        let budget = e2 * (1.0 + 1e-9);
        println!(
            "{s}: {n} training records, ε after 2 rounds {e2:.3}, after 3 {e3:.3} (δ = {DELTA})"
        );
        expected.push((s, e2, budget));
        children.push(
            std::process::Command::new(env!("CARGO_BIN_EXE_fedee"))
                .args(["site", "--insecure", "--aggregator", &agg.addr, "--site", s])
                .arg("--data")
                .arg(&csv)
                .args(["--where", &filter])
                .args(["--epsilon-budget", &budget.to_string()])
                .args(["--ledger", &format!("{s}.ledger.json"), "--new-ledger"])
                .env("FEDEE_LOG", "warn")
                .current_dir(dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let mut refusals = 0;
    for (child, (s, e2, budget)) in children.into_iter().zip(&expected) {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{s}: {err}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["rounds_trained"],
            serde_json::json!([1, 2]),
            "{report}"
        );
        // A site either refused round 3 itself (and left), or was told the federation had
        // ended because another site left first.
        if let Some(stopped) = report["stopped"].as_str() {
            assert!(
                stopped.contains("refusing to train")
                    && stopped.contains(&format!("budget of ε = {budget}"))
                    && stopped.contains("round 3"),
                "{stopped}"
            );
            refusals += 1;
        }
        let ledger: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{s}.ledger.json"))).unwrap(),
        )
        .unwrap();
        let entries = ledger.as_array().unwrap();
        assert_eq!(entries.len(), 2, "{ledger}");
        assert_eq!(entries[1]["unit"], "patient record");
        let (alpha, rdp) = (
            entries[1]["rdp_order"].as_f64().unwrap(),
            entries[1]["rdp"].as_f64().unwrap(),
        );
        // The recorded RDP at the recorded order converts back to the recorded ε.
        let eps = rdp - (DELTA.ln() + alpha.ln()) / (alpha - 1.0) + ((alpha - 1.0) / alpha).ln();
        assert!(
            (eps - entries[1]["epsilon"].as_f64().unwrap()).abs() < 1e-9,
            "{ledger}"
        );
        let got = entries[1]["epsilon"].as_f64().unwrap();
        assert!((got - e2).abs() < 1e-9 * e2, "{s}: ledger ε {got} vs {e2}");
    }
    // Each site left when its budget was spent; below the quorum the federation ended: round 3
    // failed and round 4 never opened.
    let mut c = agg.client().await;
    let mut st = c.status(StatusRequest {}).await.unwrap().into_inner();
    for _ in 0..200 {
        if st.done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        st = c.status(StatusRequest {}).await.unwrap().into_inner();
    }
    assert!(st.done, "{st:?}");
    let states: Vec<&str> = st.rounds.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(states, ["closed", "closed", "failed"]);
    assert!(
        st.rounds[2].reason.contains("federation ended"),
        "{}",
        st.rounds[2].reason
    );
    assert!(
        st.ended_reason.contains("below the quorum of 3"),
        "{}",
        st.ended_reason
    );
    assert!(refusals >= 1);
    assert_eq!(st.departed.len(), refusals, "{:?}", st.departed);
    assert!(st.departed.iter().all(|d| d.contains("privacy budget")));
    assert_eq!(st.privacy_unit, "patient record");
    assert_eq!(st.dp_mode, "record");
    assert_eq!(st.site_privacy.len(), 3);
    for sp in &st.site_privacy {
        let (_, e2, _) = expected.iter().find(|e| e.0 == sp.site).unwrap();
        let e = sp.entry.as_ref().unwrap();
        assert_eq!(
            (sp.round, e.unit.as_str(), e.delta),
            (2, "patient record", DELTA)
        );
        assert!((e.epsilon - e2).abs() < 1e-9 * e2);
    }
    // The round's ε is the worst site's.
    let worst = expected.iter().map(|e| e.1).fold(0.0, f64::max);
    assert!((st.rounds[1].epsilon - worst).abs() < 1e-9 * worst);
    let out = fedee(&["status", "--insecure", "--aggregator", &agg.addr], dir);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("DP mode: record") && shown.contains("unit: patient record"),
        "{shown}"
    );
}
