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
        .args(["demo", "--rounds", "4", "--finetune-epochs", "3", "--data"])
        .arg(data())
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    // Progress: one line per round and per fine-tune epoch.
    assert_eq!(stderr.matches("closed: ε =").count(), 4, "{stderr}");
    assert_eq!(stderr.matches("fine-tune epoch").count(), 3, "{stderr}");

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4);
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
    // ε grows with rounds (composition) and is finite with σ > 0.
    let eps: Vec<f64> = rounds
        .iter()
        .map(|r| r["epsilon"].as_f64().unwrap())
        .collect();
    assert!(
        eps.windows(2).all(|w| w[1] > w[0]) && eps[3].is_finite(),
        "{eps:?}"
    );
    let p = &r["privacy"];
    assert_eq!(p["unit"], "site update");
    let sigma = p["noise_multiplier"].as_f64().unwrap();
    assert!(sigma > 0.0);
    assert!(
        (p["rho"].as_f64().unwrap() - 4.0 / (2.0 * sigma * sigma)).abs()
            < 1e-6 * p["rho"].as_f64().unwrap()
    );
    // Learning happened: better than always predicting one class would need > 0.5 on these sites.
    assert!(
        r["final_weighted_accuracy"].as_f64().unwrap() > 0.6,
        "{}",
        r["final_weighted_accuracy"]
    );

    let ft = &r["ee_finetune"];
    assert!(ft["steps"].as_u64().unwrap() >= 3);
    assert!(ft["max_abs_weight_diff"].as_f64().unwrap() <= 1e-5, "{ft}");
    let inf = &r["ee_inference"];
    assert_eq!(inf["records"].as_u64().unwrap(), 44);
    assert_eq!(inf["argmax_agreement"].as_f64().unwrap(), 1.0);
    assert!(inf["max_abs_logit_diff"].as_f64().unwrap() <= 1e-5, "{inf}");
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
    let s = &r["step_seconds"];
    assert!(s["encrypted"].as_f64().unwrap() > 0.0 && s["ratio"].as_f64().unwrap() > 0.0);
    let f = &r["federation"];
    assert_eq!(f["rounds"], 2);
    assert_eq!(f["sites"].as_object().unwrap().len(), 3);
    assert!(
        f["update_bytes"].as_u64().unwrap() > 80_000_000,
        "about 90 MB per update"
    );
    assert_eq!(f["site_accuracy"].as_array().unwrap().len(), 2);
}
