//! The benchmarks stay runnable: `fedee bench aggregate` on a tiny cell (a real aggregator
//! process, mutual TLS, two sites) writes JSON with its figures. Timings are not asserted.

mod common;

use std::process::Command;

#[test]
fn aggregate_bench_runs_a_real_round_and_reports_figures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("aggregate.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args([
            "bench",
            "aggregate",
            "--sites",
            "2",
            "--params",
            "20K",
            "--no-flower",
            "--dashboard",
        ])
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let row = &doc["rows"][0];
    assert_eq!(row["sites"], 2);
    // 4 × (rows × 1024 + 1024) with rows = 20 000 / 4 / 1025 = 4.
    assert_eq!(row["parameters"], 4 * (4 * 1024 + 1024));
    for k in [
        "ingest_mb_per_s",
        "round_seconds",
        "peak_rss_mb",
        "idle_rss_mb",
    ] {
        let v = row[k].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0 && v.is_finite(), "{k} = {v}");
    }
    assert!(row["peak_rss_mb"].as_f64() >= row["idle_rss_mb"].as_f64());
    // The same cell again with the dashboard open: its client fetched a page per event (at
    // least each accepted update and the close).
    let open = &doc["rows"][1];
    assert_eq!(
        (
            row["dashboard_open"].as_bool(),
            open["dashboard_open"].as_bool()
        ),
        (Some(false), Some(true))
    );
    assert!(open["dashboard_fetches"].as_u64().unwrap() >= 3, "{open}");
    assert!(open["round_seconds"].as_f64().unwrap() > 0.0);
    assert!(doc["machine"]["logical_cpus"].as_u64().unwrap() >= 1);
    // The work folder is removed after each cell.
    assert_eq!(
        std::fs::read_dir(dir.path().join("work")).unwrap().count(),
        0
    );
}

/// `fedee bench flamby-heart` stays runnable with pooled standardisation and tuning on
/// validation: one seed, JSON with every strategy's row, its chosen configuration and its
/// validation grid, and the feature preparation named.
#[test]
fn flamby_heart_bench_runs_with_pooled_standardisation() {
    let csv =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/cache/heart_disease_uci.csv");
    assert!(csv.exists(), "run `make data`");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("flamby.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args([
            "bench",
            "flamby-heart",
            "--seeds",
            "1",
            "--pooled-standardization",
            "--tune",
        ])
        .arg("--data")
        .arg(&csv)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        doc["protocol"]["features"],
        "standardised with the pooled training statistics"
    );
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8, "{doc}");
    assert_eq!(doc["protocol"]["tuned_on_validation"], true);
    for r in rows {
        let a = r["mean_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{r}");
        let grid = r["tuning"]["grid"].as_array().unwrap();
        let adaptive = ["FedAdam", "FedYogi"].contains(&r["strategy"].as_str().unwrap());
        assert_eq!(grid.len(), if adaptive { 9 } else { 3 }, "{r}");
        let chosen = r["configuration"].as_str().unwrap();
        let best = grid
            .iter()
            .map(|g| g["validation_accuracy"].as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let row = grid.iter().find(|g| g["configuration"] == chosen).unwrap();
        assert_eq!(row["validation_accuracy"].as_f64().unwrap(), best, "{r}");
    }
    let both = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args([
            "bench",
            "flamby-heart",
            "--raw-features",
            "--pooled-standardization",
        ])
        .output()
        .unwrap();
    assert!(!both.status.success(), "raw and pooled features conflict");
}

/// `fedee bench secagg` stays runnable: a small grid (one cell with dropouts on a sparse
/// graph), every unmasked sum checked inside the bench, JSON with the per-stage figures and
/// the Skellam columns. Flower's side is skipped when its Python does not import.
#[test]
fn secagg_bench_runs_a_round_per_cell() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("secagg.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args(["bench", "secagg", "--sites", "12", "--params", "5000"])
        .args([
            "--dropouts",
            "0,0.25",
            "--degrees",
            "0,4",
            "--python",
            "/nonexistent",
            "--federation-rounds",
            "2",
        ])
        .arg("--data")
        .arg(common::heart_csv())
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    // The networked federation, plaintext, secure, secure with distributed DP: each
    // finishes, the sites evaluated the final model, and the aggregator's ε reaches the
    // spec's target ε = 8 without passing it (Gaussian zCDP, or Skellam RDP).
    let fed = doc["federation"]["rows"].as_array().unwrap();
    assert_eq!(fed.len(), 3, "{doc}");
    assert_eq!(fed[1]["mode"], "secure aggregation");
    assert_eq!(fed[2]["mode"], "secure + distributed DP");
    for r in fed {
        let acc = r["final_accuracy"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&acc), "{r}");
        assert!(r["seconds_per_round"].as_f64().unwrap() > 0.0, "{r}");
        let eps = r["epsilon"].as_f64().unwrap_or(-1.0);
        assert!((7.0..=8.0).contains(&eps), "{r}");
        // The sites' ledgers charge what the aggregator charges (site mode: the same zCDP
        // conversion; distributed DP: the same Skellam bound), so no site passes the target.
        let site = r["max_site_epsilon"].as_f64().unwrap();
        assert!(site <= 8.0 && (site - eps).abs() < 1e-9, "{r}");
    }
    // Each site's ledger recorded the mechanism it ran.
    for (r, mechanism) in fed
        .iter()
        .zip(["gaussian_zcdp", "gaussian_zcdp", "skellam_rdp"])
    {
        assert_eq!(r["site_mechanisms"], serde_json::json!([mechanism]), "{r}");
    }
    let rows = doc["rows"].as_array().unwrap();
    let aborted = doc["aborted"].as_array().unwrap();
    // 2 dropout rates × 2 graphs; a sparse cell may abort (too few holders), never vanish.
    assert_eq!(rows.len() + aborted.len(), 4, "{doc}");
    assert!(
        rows.iter()
            .any(|r| r["degree"] == 11 && r["dropout"] == 0.25)
    );
    for r in rows {
        // Distributed DP leaves √t times less noise in the mean than every site adding σC
        // (measured on 4 096 coordinates: a standard deviation within a few percent).
        let (n, t) = (
            r["sites"].as_f64().unwrap(),
            r["threshold"].as_f64().unwrap(),
        );
        let local = r["mean_noise_local_gaussian"].as_f64().unwrap();
        let reduction = r["noise_reduction"].as_f64().unwrap();
        assert!((local * n.sqrt() - 1.0).abs() < 0.05, "{r}");
        assert!((reduction / t.sqrt() - 1.0).abs() < 0.1, "{r}");
        for k in ["site_masked_input_s", "server_unmask_s", "epsilon_skellam"] {
            let v = r[k].as_f64().unwrap_or(-1.0);
            assert!(v > 0.0 && v.is_finite(), "{k} = {v}");
        }
        let up = r["upload_vs_plaintext_f32"].as_f64().unwrap();
        assert!((1.0..1.2).contains(&up), "upload ratio {up}");
        // The cell's peak resident memory (Linux resets it per cell) is a reading, not NaN
        // (null), and not below the memory the cell started with (1 MB of page-level slack).
        let (start, peak) = (
            r["rss_start_mb"].as_f64().unwrap_or(-1.0),
            r["peak_rss_mb"].as_f64().unwrap_or(-1.0),
        );
        assert!(
            start > 0.0 && peak + 1.0 >= start,
            "RSS at start {start} MB, peak {peak} MB"
        );
    }
    assert_eq!(doc["mask_costs"][0]["params"], 5000);
}

/// `fedee bench hss` stays runnable: a few reviews at 32 tokens, batch 1. HSS-EE agrees with
/// plain EE and the plaintext model on every review, and its traffic is the protocol's
/// arithmetic (gRPC framing within 10 %).
#[test]
fn hss_bench_compares_the_three_ways_and_counts_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("hss.json");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args([
            "bench",
            "hss",
            "--reviews",
            "16",
            "--batches",
            "1",
            "--reps",
            "1",
        ])
        .args(["--rtt-ms", "1", "--seq-len", "32", "--minilm-dir"])
        .arg(root.join("data/cache/minilm"))
        .arg("--drugs-dir")
        .arg(root.join("data/cache/drugs"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let c = &doc["correctness"];
    assert_eq!(c["reviews"], 16);
    assert_eq!(c["argmax_agreement_vs_plain_ee"], 1.0, "{c}");
    assert_eq!(c["argmax_agreement_vs_plaintext"], 1.0, "{c}");
    assert!(
        c["max_abs_logit_diff_hss_vs_plain_ee"].as_f64().unwrap() < 1e-2,
        "{c}"
    );
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{doc}");
    let hss = &rows[2];
    assert_eq!(hss["round_trips"], 24, "{hss}");
    let bytes = hss["bytes_up"].as_f64().unwrap() + hss["bytes_down"].as_f64().unwrap();
    let arithmetic = doc["arithmetic_bytes"][0]["bytes"].as_f64().unwrap();
    assert!(
        (1.0..1.1).contains(&(bytes / arithmetic)),
        "{bytes} bytes on the wire vs {arithmetic}"
    );
    assert_eq!(hss["latency_rtt_s"].as_array().unwrap().len(), 1);
}

/// `fedee bench dashboard` stays runnable on a small history: every page and JSON twin
/// answers, with percentiles in order and the pages' sizes.
#[test]
fn dashboard_bench_renders_every_page_of_a_history() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("dashboard.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args([
            "bench",
            "dashboard",
            "--sites",
            "4",
            "--rounds",
            "700",
            "--reps",
            "3",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 9);
    for r in rows {
        let (p50, p95) = (r["p50_s"].as_f64().unwrap(), r["p95_s"].as_f64().unwrap());
        assert!(p50 > 0.0 && p50 <= p95, "{r}");
        assert!(r["bytes"].as_u64().unwrap() > 500, "{r}");
    }
}
