//! End to end: `fedee demo` at small size, through the real gRPC services on loopback,
//! asserting on its JSON report.

use std::path::PathBuf;
use std::process::Command;

fn data() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/cache/heart_disease_uci.csv");
    assert!(
        p.exists(),
        "{} is missing: run `make data` (make test does it)",
        p.display()
    );
    p
}

#[test]
fn demo_runs_the_main_job_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args(["demo", "--finetune-epochs", "3", "--data"])
        .arg(data())
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    // Progress: one line per round and per fine-tune epoch.
    assert_eq!(stderr.matches("closed: ε =").count(), 10, "{stderr}");
    assert_eq!(stderr.matches("fine-tune epoch").count(), 3, "{stderr}");

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 10, "the example spec's rounds");
    assert_eq!(
        r["secure_aggregation"], true,
        "the main job aggregates securely"
    );
    for (i, round) in rounds.iter().enumerate() {
        assert_eq!(round["round"], i as u64 + 1);
        let sites = round["site_accuracy"].as_object().unwrap();
        assert_eq!(
            sites.len(),
            3,
            "three sites report accuracy every round: {round}"
        );
        assert!(
            sites.contains_key("Cleveland")
                && sites.contains_key("Hungary")
                && sites.contains_key("Switzerland")
        );
        let w = round["weighted_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&w));
    }
    // ε grows with rounds (composition) up to the spec's target.
    let eps: Vec<f64> = rounds
        .iter()
        .map(|r| r["epsilon"].as_f64().unwrap())
        .collect();
    assert!(eps.windows(2).all(|w| w[1] > w[0]), "{eps:?}");
    // Record-level DP: every site calibrated its own σ to spend at most ε = 1 over the
    // whole federation; the smallest site (Switzerland) needed the most noise.
    let p = &r["privacy"];
    assert_eq!(p["unit"], "patient record");
    assert_eq!(p["target_epsilon"], 1.0);
    let max = p["max_epsilon"].as_f64().unwrap();
    assert!(max <= 1.0 + 1e-9 && max > 0.99, "{p}");
    let sites = p["sites"].as_object().unwrap();
    assert_eq!(sites.len(), 3, "{p}");
    let sigma = |s: &str| sites[s]["noise_multiplier"].as_f64().unwrap();
    assert!(
        sigma("Switzerland") > sigma("Cleveland") && sigma("Cleveland") > 1.0,
        "{p}"
    );
    for s in sites.values() {
        assert!(s["epsilon"].as_f64().unwrap() <= 1.0 + 1e-9, "{p}");
    }
    // Learning happened under ε ≤ 1: the weighted majority-class baseline is about 0.61.
    assert!(
        r["final_weighted_accuracy"].as_f64().unwrap() > 0.65,
        "{}",
        r["final_weighted_accuracy"]
    );
    assert_eq!(r["data"]["Cleveland"]["rows_used"], 304, "{}", r["data"]);
    // Pharma receives the model selected on the sites' validation splits: one that a closed
    // round produced, whose weighted test accuracy the report gives.
    let selected = r["selected_model"].as_u64().unwrap();
    let rounds = r["rounds"].as_array().unwrap().len() as u64;
    assert!(
        (2..=rounds + 1).contains(&selected),
        "selected {selected} of {rounds} rounds"
    );
    let acc = r["selected_weighted_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{acc}");

    let ft = &r["ee_finetune"];
    assert!(ft["steps"].as_u64().unwrap() >= 3);
    assert!(ft["max_abs_weight_diff"].as_f64().unwrap() <= 1e-5, "{ft}");
    let inf = &r["ee_inference"];
    assert_eq!(
        inf["records"], r["data"]["VA Long Beach"]["test"],
        "{}",
        r["data"]
    );
    assert!(inf["records"].as_u64().unwrap() > 20);
    assert_eq!(inf["argmax_agreement"].as_f64().unwrap(), 1.0);
    assert!(
        inf["max_abs_probability_diff"].as_f64().unwrap() <= 1e-5,
        "{inf}"
    );
    assert!(r["wall_seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn demo_explains_missing_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args(["demo", "--data"])
        .arg(dir.path().join("nope.csv"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("make data"), "{stderr}");
}

/// EE fine-tuning of the real all-MiniLM-L6-v2 through the trainer service, at small size
/// (48 reviews, 32 tokens, one epoch), plus the federation carrying the model for 2 rounds.
#[test]
fn drug_review_demo_fine_tunes_minilm_under_ee() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("data/cache/minilm/model.safetensors").exists(),
        "run `make data`"
    );
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("drug.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .current_dir(&root)
        .args([
            "demo",
            "--task",
            "drug-reviews",
            "--limit",
            "48",
            "--max-len",
            "32",
            "--text-epochs",
            "1",
            "--report",
        ])
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    assert!(
        stderr.contains("weight matching"),
        "the demo must warn that public base weights break EE"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["prediction_agreement"].as_f64().unwrap(), 1.0, "{r}");
    for side in ["ee", "plaintext"] {
        let acc = r[side]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc) && r[side]["macro_f1"].as_f64().is_some());
    }
    assert_eq!(r["ee"]["accuracy"], r["plaintext"]["accuracy"]);
    assert!(
        r["max_abs_weight_diff"].as_f64().unwrap() < 1e-3,
        "{}",
        r["max_abs_weight_diff"]
    );
    assert!(
        r["bytes_uploaded"].as_u64().unwrap() > 80_000_000,
        "the whole MiniLM EE model is uploaded"
    );
    assert!(r["keygen_transform_seconds"].as_f64().unwrap() > 0.0);
    // Client-side embeddings in shuffled order through the trainer: same logits as ids.
    let e = &r["client_side_embeddings"];
    assert!(
        e["max_abs_logit_diff_vs_ids"].as_f64().unwrap() < 1e-4,
        "{e}"
    );
    assert!(e["bytes_embedded"].as_u64().unwrap() > 50 * e["bytes_ids"].as_u64().unwrap());
    assert!(r["tokens_under_one_key"].as_u64().unwrap() > 96);
    assert!(r["encrypted_step_seconds"].as_f64().unwrap() > 0.0);
    // The platform path: every party read its own file as the spec says.
    let data = r["data"].as_object().unwrap();
    for party in [
        "mental-health",
        "other-conditions",
        "reproductive-health",
        "pharma",
    ] {
        let d = &data[party];
        assert!(
            d["train"].as_u64().unwrap() > 0 && d["test"].as_u64().unwrap() > 0,
            "{party}: {d}"
        );
    }
    assert_eq!(data["pharma"]["rows_used"], 48, "--limit 48");
    assert_eq!(
        r["spec_sha256"].as_str().unwrap().len(),
        64,
        "the report names the spec it ran"
    );
    // Federation: two rounds, every hospital reporting each round.
    let f = &r["federation"];
    assert!(
        f["update_bytes"].as_u64().unwrap() > 80_000_000,
        "about 90 MB per update"
    );
    let rounds = f["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "{f}");
    for round in rounds.iter().filter(|r| {
        r["site_accuracy"]
            .as_object()
            .is_some_and(|a| !a.is_empty())
    }) {
        assert_eq!(
            round["site_accuracy"].as_object().unwrap().len(),
            3,
            "{round}"
        );
    }
    assert_eq!(f["privacy_unit"], "site update");
}
