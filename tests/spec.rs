//! Bring your own data, end to end with the real binaries: `fedee init` scaffolds a spec from
//! the UCI heart-disease file, `fedee init-model --spec` builds its model, the aggregator
//! serves the spec, and three sites select their rows of the shared file with `--where`,
//! check them against the spec, and federate. Hostile cases: a model that does not fit the
//! spec, a site whose data cannot satisfy it, a site naming another spec, and a restart with
//! a changed spec are each refused with a clear error, and nothing already accepted is lost.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{Aggregator, fedee, heart_csv};

/// `fedee aggregator --insecure --spec SPEC` on `dir`'s `agg.db` and `blobs`, plus `extra`.
fn spec_aggregator(dir: &Path, spec: &str, extra: &[&str]) -> Aggregator {
    let mut args = vec![
        "--insecure",
        "--spec",
        spec,
        "--database-url",
        DB,
        "--blob-dir",
        "blobs",
    ];
    args.extend(extra);
    Aggregator::start(dir, "127.0.0.1:0", &args)
}

/// The aggregator database of these tests, in each test's directory.
const DB: &str = "sqlite://agg.db?mode=rwc";

/// `fedee init-model --spec SPEC --out g0.safetensors` in `dir`, which must succeed.
fn init_model(dir: &Path, spec: &str) {
    let out = fedee(
        &["init-model", "--spec", spec, "--out", "g0.safetensors"],
        dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file of the repository, as a string path.
fn root_file(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .to_str()
        .unwrap()
        .to_owned()
}

fn clinical(name: &str) -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/cache/clinical")
        .join(name);
    assert!(p.exists(), "{} is missing: run `make data`", p.display());
    p
}

/// Scaffold a spec from `data` with `fedee init`, edit it with `edits` (each must apply), run
/// a federation of `sites` (name, file, `--where`), and return the final status and the
/// (still running) aggregator.
async fn federate(
    dir: &Path,
    data: &Path,
    init: &[&str],
    edits: &[(&str, &str)],
    sites: &[(&str, &Path, &str)],
) -> (fedee_proto::v1::StatusResponse, Aggregator) {
    let mut args = vec![
        "init",
        "--data",
        data.to_str().unwrap(),
        "--out",
        "spec.toml",
    ];
    args.extend(init);
    let out = fedee(&args, dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut spec = std::fs::read_to_string(dir.join("spec.toml")).unwrap();
    for (from, to) in edits {
        assert!(spec.contains(from), "`{from}` not in the scaffold:\n{spec}");
        spec = spec.replacen(from, to, 1);
    }
    std::fs::write(dir.join("spec.toml"), &spec).unwrap();
    init_model(dir, "spec.toml");
    let agg = spec_aggregator(dir, "spec.toml", &["--initial-model", "g0.safetensors"]);
    (run_sites(dir, &agg, sites, "split: train", &[]).await, agg)
}

/// Run `fedee ARGS` in `dir`; it must succeed. Returns its stderr.
fn ok(args: &[&str], dir: &Path) -> String {
    let out = fedee(args, dir);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "fedee {args:?}: {err}");
    err
}

/// The number after `key` in `text` (e.g. `max |Δp| = 1.2e-7`).
fn figure(text: &str, key: &str) -> f64 {
    let rest = &text[text
        .find(key)
        .unwrap_or_else(|| panic!("no `{key}` in {text}"))
        + key.len()..];
    rest.split(|c: char| c.is_whitespace() || c == ',')
        .find(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number after `{key}` in {text}"))
}

/// The key holder after a federation of `rounds` rounds: download the global model, generate
/// keys for `spec.toml`, start a trainer, `fedee finetune --verify --dtype f64` on `data` (rows of
/// `filter`), then `fedee predict --verify` on `records` with the fine-tuned model. Checks
/// that the decrypted EE fine-tuning equals plaintext fine-tuning and that the decrypted
/// predictions equal the plaintext model's; returns the predictions CSV and the trainer.
fn finetune_and_predict(
    dir: &Path,
    agg: &Aggregator,
    rounds: u32,
    data: &Path,
    filter: &str,
    records: &Path,
) -> (String, common::Service) {
    // The model selected on the sites' validation splits (the specs hold out 15 %), one of
    // the models the closed rounds produced.
    let status = fedee(&["status", "--aggregator", &agg.addr, "--insecure"], dir);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let selected = figure(&status, "selected: global model") as u32;
    assert!((2..=rounds + 1).contains(&selected), "{status}");
    let got = ok(
        &[
            "download-model",
            "--aggregator",
            &agg.addr,
            "--insecure",
            "--model",
            "selected",
            "--out",
            "global.safetensors",
        ],
        dir,
    );
    assert!(got.contains(&format!("global model {selected} ")), "{got}");
    ok(
        &["ee", "keygen", "--spec", "spec.toml", "--out", "keys.json"],
        dir,
    );
    // `fedee ee encrypt` / `decrypt` on the spec's model: a different model, then the same.
    let transform = |verb: &str, model: &str, out: &str| {
        ok(
            &[
                "ee",
                verb,
                "--spec",
                "spec.toml",
                "--keys",
                "keys.json",
                "--model",
                model,
                "--out",
                out,
            ],
            dir,
        )
    };
    transform("encrypt", "global.safetensors", "ee.safetensors");
    transform("decrypt", "ee.safetensors", "back.safetensors");
    let max_diff = |a: &str, b: &str| {
        let read = |f: &str| {
            fedee_model::state_from_safetensors(
                &std::fs::read(dir.join(f)).unwrap(),
                tch::Device::Cpu,
            )
            .unwrap()
        };
        let (a, b) = (read(a), read(b));
        assert_eq!(a.len(), b.len());
        a.iter()
            .map(|(k, t)| (t - &b[k]).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    };
    assert!(max_diff("global.safetensors", "ee.safetensors") > 1e-2);
    let back = max_diff("global.safetensors", "back.safetensors");
    assert!(back < 1e-5, "decrypt(encrypt(model)) differs by {back}");
    let out = fedee(
        &[
            "ee",
            "encrypt",
            "--keys",
            "keys.json",
            "--model",
            "global.safetensors",
            "--out",
            "x.safetensors",
        ],
        dir,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--spec"));
    let trainer = common::Service::start_role(dir, "trainer", "127.0.0.1:0", &["--insecure"]);
    let data = data.to_str().unwrap();
    let mut args = vec![
        "finetune",
        "--trainer",
        &trainer.addr,
        "--insecure",
        "--spec",
        "spec.toml",
        "--keys",
        "keys.json",
        "--model",
        "global.safetensors",
        "--data",
        data,
        "--out",
        "tuned.safetensors",
        "--epochs",
        "2",
        "--dtype",
        "f64",
        "--verify",
        "--report",
        "finetune.json",
    ];
    if !filter.is_empty() {
        args.extend(["--where", filter]);
    }
    let err = ok(&args, dir);
    assert!(
        err.contains("split: train") && err.contains("epoch 2/2"),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("finetune.json")).unwrap()).unwrap();
    let dw = report["max_abs_weight_diff"].as_f64().unwrap();
    assert!(
        dw < 1e-9,
        "decrypted EE vs plaintext fine-tuning (f64): {dw}"
    );
    assert!(report["steps"].as_u64().unwrap() > 0, "{report}");
    let err = ok(
        &[
            "predict",
            "--trainer",
            &trainer.addr,
            "--insecure",
            "--spec",
            "spec.toml",
            "--keys",
            "keys.json",
            "--model",
            "tuned.safetensors",
            "--data",
            records.to_str().unwrap(),
            "--out",
            "predictions.csv",
            "--verify",
        ],
        dir,
    );
    assert!(figure(&err, "max |Δp| =") < 1e-4, "{err}");
    assert_eq!(figure(&err, "argmax agreement"), 1.0, "{err}");
    let csv = std::fs::read_to_string(dir.join("predictions.csv")).unwrap();
    (csv, trainer)
}

/// Run `sites` (name, file, `--where`) against `agg` until they finish; each must succeed and
/// print its data report (with `report` in it). Returns the finished federation's status.
async fn run_sites(
    dir: &Path,
    agg: &Aggregator,
    sites: &[(&str, &Path, &str)],
    report: &str,
    extra: &[&str],
) -> fedee_proto::v1::StatusResponse {
    let children: Vec<_> = sites
        .iter()
        .map(|(name, file, filter)| {
            site(dir, &agg.addr, name, file, filter)
                .args(extra)
                .spawn()
                .unwrap()
        })
        .collect();
    for (child, (name, ..)) in children.into_iter().zip(sites) {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {err}");
        assert!(
            err.contains("rows read") && err.contains(report),
            "{name}: {err}"
        );
    }
    let st = agg
        .client()
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.done, "{st:?}");
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clinical_tables_federate_from_scaffolded_specs() {
    // GBSG2 (breast cancer, 686 patients): no site column, so two hospitals each hold half.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = std::fs::read_to_string(clinical("gbsg2.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    // Two hospitals and pharma each hold a third; pharma's new patients come without the label.
    let mut parts = [0, 1, 2].map(|_| format!("{header}\n"));
    for (i, l) in lines.enumerate() {
        parts[i % 3].push_str(&format!("{l}\n"));
    }
    for (name, part) in ["north.csv", "south.csv", "pharma.csv"].iter().zip(&parts) {
        std::fs::write(dir.join(name), part).unwrap();
    }
    let cens = header.split(',').position(|c| c == "cens").unwrap();
    let unlabelled: String = parts[2]
        .lines()
        .map(|l| {
            let mut cells: Vec<&str> = l.split(',').collect();
            cells.remove(cens);
            cells.join(",") + "\n"
        })
        .collect();
    std::fs::write(dir.join("new-patients.csv"), unlabelled).unwrap();
    let (st, agg) = federate(
        dir,
        &dir.join("north.csv"),
        &["--label", "cens"],
        &[
            ("rounds = 20", "rounds = 3"),
            ("mode = \"record\"", "mode = \"site\""),
            // Two hidden layers: four EE keys, through fine-tuning and prediction.
            ("hidden = [32]", "hidden = [16, 8]"),
        ],
        &[
            ("North", &dir.join("north.csv"), ""),
            ("South", &dir.join("south.csv"), ""),
        ],
    )
    .await;
    assert!(
        st.spec_summary.contains("of `cens` (2 classes)") && st.spec_summary.contains("[16, 8] →"),
        "{}",
        st.spec_summary
    );
    assert_eq!(st.rounds.len(), 3);
    assert!(
        st.rounds
            .iter()
            .all(|r| r.state == "closed" && r.site_metrics.len() == 2)
    );
    // Pharma fine-tunes the global model under EE on its third and predicts for new patients.
    let (csv, trainer) = finetune_and_predict(
        dir,
        &agg,
        3,
        &dir.join("pharma.csv"),
        "",
        &dir.join("new-patients.csv"),
    );
    let mut out = csv.lines();
    assert_eq!(
        out.next(),
        Some("record,predicted,p_0,p_1,note"),
        "no label column: {csv}"
    );
    let rows: Vec<&str> = out.collect();
    assert_eq!(
        rows.len(),
        parts[2].lines().count() - 1,
        "one row per record"
    );
    for r in &rows {
        let c: Vec<&str> = r.split(',').collect();
        let (p0, p1): (f64, f64) = (c[2].parse().unwrap(), c[3].parse().unwrap());
        assert!(
            (p0 + p1 - 1.0).abs() < 1e-5 && ["0", "1"].contains(&c[1]),
            "{r}"
        );
    }
    // Hostile: the federation's global model carries no preprocessing; the keys of another
    // model do not fit; a job lost in a trainer restart fails cleanly. No output is written.
    let job = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(dir.join("finetune.json")).unwrap(),
    )
    .unwrap()["job"]
        .as_str()
        .unwrap()
        .to_owned();
    let predict = |model: &str, keys: &str, trainer: &str, job: Option<&str>| {
        let mut a = vec![
            "predict",
            "--trainer",
            trainer,
            "--insecure",
            "--spec",
            "spec.toml",
            "--keys",
            keys,
            "--model",
            model,
            "--data",
            "new-patients.csv",
            "--out",
            "refused.csv",
        ];
        a.extend(job.iter().flat_map(|j| ["--job", *j]));
        let out = fedee(&a, dir);
        assert!(!out.status.success());
        assert!(!dir.join("refused.csv").exists());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = predict("global.safetensors", "keys.json", &trainer.addr, None);
    assert!(err.contains("carries no preprocessing figures"), "{err}");
    ok(
        &[
            "ee",
            "keygen",
            "--bert-config",
            &root_file("data/cache/minilm/config.json"),
            "--out",
            "bert-keys.json",
        ],
        dir,
    );
    let err = predict("tuned.safetensors", "bert-keys.json", &trainer.addr, None);
    assert!(
        err.contains("the key file is for a `bert-classifier` model"),
        "{err}"
    );
    let addr = trainer.addr.clone();
    trainer.sigkill();
    let restarted = common::Service::start_role(dir, "trainer", &addr, &["--insecure"]);
    let err = predict(
        "tuned.safetensors",
        "keys.json",
        &restarted.addr,
        Some(&job),
    );
    assert!(
        err.contains(&format!(
            "prediction stopped at the trainer (job {job}); nothing was written"
        )),
        "{err}"
    );

    // NCCTG lung cancer: the institution column `inst` names the site; missing cells imputed.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lung = clinical("lung.csv");
    let (st, _agg) = federate(
        dir,
        &lung,
        &["--label", "status", "--site-column", "inst"],
        &[
            ("rounds = 20", "rounds = 2"),
            ("min_sites = 2", "min_sites = 3"),
            ("missing = \"drop-row\"", "missing = \"impute\""),
            // Three hidden layers under record-level DP-SGD.
            ("hidden = [32]", "hidden = [16, 8, 8]"),
        ],
        &[
            ("Inst1", &lung, "inst=1.0"),
            ("Inst12", &lung, "inst=12.0"),
            ("Inst13", &lung, "inst=13.0"),
        ],
    )
    .await;
    assert!(
        st.spec_summary.contains("of `status` (2 classes)")
            && st.spec_summary.contains("[16, 8, 8] →"),
        "{}",
        st.spec_summary
    );
    assert!(
        st.rounds
            .iter()
            .all(|r| r.state == "closed" && r.site_metrics.len() == 3)
    );
    let tested: u64 = st.rounds[0]
        .site_metrics
        .iter()
        .map(|m| m.num_test_examples)
        .sum();
    // 25 % of 36, 23 and 20 patients, stratified: 9, 6 and 5, each coarsened to the nearest
    // 10 (at least 10) as it leaves its site.
    assert_eq!(tested, 10 + 10 + 10);
    for m in &st.rounds[0].site_metrics {
        assert_eq!(
            m.test_accuracy,
            (m.test_accuracy * 100.0).round() / 100.0,
            "metrics leave a site rounded to 0.01: {m:?}"
        );
    }
}
use fedee_proto::v1::{GetSpecRequest, JoinRequest, StatusRequest};

const SITES: [&str; 3] = ["Cleveland", "Hungary", "Switzerland"];

fn example_spec(rounds: u32) -> String {
    common::heart_spec(&[("rounds = 10\n", &format!("rounds = {rounds}\n"))])
}

fn site(dir: &Path, addr: &str, name: &str, data: &Path, filter: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedee"));
    c.args(["site", "--insecure", "--aggregator", addr, "--site", name])
        .arg("--data")
        .arg(data)
        .args(["--retries", "2"])
        .args(["--ledger", &format!("{name}.ledger.json"), "--new-ledger"])
        .env("FEDEE_LOG", "warn")
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !filter.is_empty() {
        c.args(["--where", filter]);
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_from_a_spec_on_each_sites_own_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let csv = heart_csv();

    // `fedee init` scaffolds a spec this build accepts, leaving out the id and site columns.
    let out = fedee(
        &[
            "init",
            "--data",
            csv.to_str().unwrap(),
            "--label",
            "num",
            "--site-column",
            "dataset",
            "--out",
            "scaffold.toml",
        ],
        dir,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("record identifier") && err.contains("the site column"),
        "{err}"
    );
    let scaffold = std::fs::read_to_string(dir.join("scaffold.toml")).unwrap();
    let s = fedee_spec::FederationSpec::from_toml(&scaffold).unwrap();
    let names: Vec<&str> = s.features.iter().map(|f| f.name.as_str()).collect();
    assert!(
        !names.contains(&"id") && !names.contains(&"dataset"),
        "{names:?}"
    );
    assert!(names.contains(&"cp") && names.contains(&"fbs"), "{names:?}");
    assert_eq!(s.num_classes(), 5, "num takes the values 0..4");
    let again = fedee(
        &[
            "init",
            "--data",
            csv.to_str().unwrap(),
            "--label",
            "num",
            "--out",
            "scaffold.toml",
        ],
        dir,
    );
    assert!(
        !again.status.success(),
        "an existing spec is not overwritten without --force"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    // The example spec, shortened to two rounds, and its model.
    std::fs::write(dir.join("federation.toml"), example_spec(2)).unwrap();
    init_model(dir, "federation.toml");

    // A model that does not fit the spec (one of another spec's MLP) is refused at start.
    std::fs::write(
        dir.join("other.toml"),
        common::heart_spec(&[("hidden = [8]", "hidden = [5]")]),
    )
    .unwrap();
    assert!(
        fedee(
            &[
                "init-model",
                "--spec",
                "other.toml",
                "--out",
                "demo.safetensors"
            ],
            dir
        )
        .status
        .success()
    );
    let out = fedee(
        &[
            "aggregator",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--spec",
            "federation.toml",
            "--initial-model",
            "demo.safetensors",
            "--database-url",
            "sqlite://bad.db?mode=rwc",
            "--blob-dir",
            "bad-blobs",
        ],
        dir,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("does not fit the federation spec") && err.contains("fc1.weight [5, "),
        "{err}"
    );
    // Flags the spec covers are refused next to it.
    let out = fedee(
        &[
            "aggregator",
            "--insecure",
            "--spec",
            "federation.toml",
            "--rounds",
            "3",
        ],
        dir,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rounds"));
    // A site trains only what a spec says: an aggregator without one is refused.
    {
        let plain = Aggregator::start(
            dir,
            "127.0.0.1:0",
            &[
                "--insecure",
                "--initial-model",
                "g0.safetensors",
                "--database-url",
                "sqlite://nospec.db?mode=rwc",
                "--blob-dir",
                "nospec-blobs",
                "--max-epsilon",
                "inf",
            ],
        );
        let out = site(dir, &plain.addr, "Cleveland", &csv, "dataset=Cleveland")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("serves no federation spec") && err.contains("--spec"),
            "{err}"
        );
    }
    // A site with more training examples than the spec's federation.max_num_examples (its
    // largest FedAvg weight) refuses to join, naming the setting.
    {
        std::fs::write(
            dir.join("small.toml"),
            common::heart_spec(&[("rounds = 10\n", "rounds = 2\nmax_num_examples = 10\n")]),
        )
        .unwrap();
        let small = Aggregator::start(
            dir,
            "127.0.0.1:0",
            &[
                "--insecure",
                "--spec",
                "small.toml",
                "--initial-model",
                "g0.safetensors",
                "--database-url",
                "sqlite://small.db?mode=rwc",
                "--blob-dir",
                "small-blobs",
            ],
        );
        let out = site(dir, &small.addr, "Cleveland", &csv, "dataset=Cleveland")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("federation.max_num_examples = 10") && err.contains("training examples"),
            "{err}"
        );
    }

    let db = DB;
    let agg = spec_aggregator(
        dir,
        "federation.toml",
        &[
            "--initial-model",
            "g0.safetensors",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let mut c = agg.client().await;
    let served = c.get_spec(GetSpecRequest {}).await.unwrap().into_inner();
    assert_eq!(served.toml, example_spec(2));
    assert_eq!(served.sha256.len(), 64);

    // A site whose file lacks the label column refuses to join, and the federation does not
    // count it.
    let bad = dir.join("no-label.csv");
    let text = std::fs::read_to_string(&csv)
        .unwrap()
        .replacen(",num\n", ",outcome\n", 1);
    std::fs::write(&bad, text).unwrap();
    let out = site(dir, &agg.addr, "Cleveland", &bad, "dataset=Cleveland")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot join") && err.contains("no column `num`") && err.contains("`outcome`"),
        "{err}"
    );
    // A site naming another spec is refused at Join.
    let refused = c
        .join(JoinRequest {
            site: "Hungary".into(),
            spec_sha256: "0".repeat(64),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains(&served.sha256),
        "{}",
        refused.message()
    );
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(
        st.sites.is_empty(),
        "refused sites are not members: {:?}",
        st.sites
    );

    // Three sites, each on its own rows of the shared file.
    let children: Vec<_> = SITES
        .iter()
        .map(|s| {
            site(dir, &agg.addr, s, &csv, &format!("dataset={s}"))
                .spawn()
                .unwrap()
        })
        .collect();
    let mut sigmas = vec![];
    for (child, s) in children.into_iter().zip(SITES) {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{s}: {err}");
        assert!(
            err.contains(&format!("where dataset={s}")) && err.contains("classes: 0 = "),
            "{s} prints its data report: {err}"
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["rounds_trained"],
            serde_json::json!([1, 2]),
            "{report}"
        );
        let ledger = report["privacy"].as_array().unwrap();
        assert_eq!(
            ledger[0]["unit"], "patient record",
            "the spec's DP mode: {report}"
        );
        // Each site calibrated its own σ to spend the spec's target ε = 1 over both rounds.
        let eps = ledger[1]["epsilon"].as_f64().unwrap();
        assert!(eps <= 1.0 && eps > 0.95, "{s}: ε = {eps}");
        sigmas.push(ledger[0]["noise_multiplier"].as_f64().unwrap());
    }
    assert!(
        sigmas[2] > sigmas[0] && sigmas[2] > sigmas[1],
        "Switzerland, the smallest site, needs the most noise: {sigmas:?}"
    );
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.done, "{st:?}");
    assert_eq!(st.spec_sha256, served.sha256);
    assert!(st.spec_summary.contains("MLP 16"), "{}", st.spec_summary);
    assert_eq!(st.dp_mode, "record");
    assert_eq!(st.rounds.len(), 2);
    for r in &st.rounds {
        assert_eq!(r.state, "closed");
        assert_eq!(r.site_metrics.len(), 3, "{r:?}");
        for m in &r.site_metrics {
            assert!((0.0..=1.0).contains(&m.test_accuracy) && m.num_test_examples > 0);
            let b = m.balanced_accuracy.unwrap();
            let f = m.macro_f1.unwrap();
            assert!(
                (0.0..=1.0).contains(&b) && (0.0..=1.0).contains(&f),
                "{m:?}"
            );
            // Switzerland's test split holds one class only: no AUROC there.
            assert_eq!(m.auroc.is_some(), m.site != "Switzerland", "{m:?}");
        }
    }
    let scraped = agg.scrape().await;
    for metric in ["test accuracy", "balanced accuracy", "macro-F1", "AUROC"] {
        let series =
            format!("fedee_aggregator_site_test_metric{{site=\"Cleveland\",metric=\"{metric}\"}}");
        assert!(scraped.contains(&series), "{series} missing:\n{scraped}");
    }
    // Out-of-range metrics are refused and change nothing.
    let bad = c
        .report_metrics(fedee_proto::v1::MetricsReport {
            site: "Cleveland".into(),
            model: 1,
            test_accuracy: 0.5,
            num_test_examples: 10,
            auroc: Some(1.5),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("AUROC 1.5"), "{}", bad.message());
    let status = fedee(&["status", "--insecure", "--aggregator", &agg.addr], dir);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("spec: TabularClassification"), "{text}");
    assert!(
        text.contains("weighted: accuracy") && text.contains("macro-F1") && text.contains("AUROC"),
        "{text}"
    );
    drop(agg);

    // A restart with a changed spec is refused; the federation's state is untouched.
    std::fs::write(dir.join("changed.toml"), example_spec(3)).unwrap();
    let out = fedee(
        &[
            "aggregator",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--spec",
            "changed.toml",
            "--database-url",
            db,
            "--blob-dir",
            "blobs",
        ],
        dir,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("a spec cannot change once a federation started"),
        "{err}"
    );
    let agg = spec_aggregator(dir, "federation.toml", &[]);
    let st = agg
        .client()
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.done && st.rounds.len() == 2, "{st:?}");
}

/// A text federation from its spec: all-MiniLM-L6-v2 plus a fresh head, one site on a JSONL
/// export, the other on its rows of the original TSV (`--where condition=Birth Control`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_federation_fine_tunes_a_bert_checkpoint_from_its_spec() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let minilm = root.join("data/cache/minilm");
    let tsv = root.join("data/cache/drugs/drugsComTrain.tsv");
    assert!(
        minilm.join("model.safetensors").exists() && tsv.exists(),
        "run `make data`"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // North's export: 40 reviews of other conditions, as JSONL.
    let rows = fedee_site_agent::table::open(&tsv).unwrap();
    let col = |n: &str| rows.headers.iter().position(|h| h == n).unwrap();
    let (review, rating, condition) = (col("review"), col("rating"), col("condition"));
    // Pharma's: the next 30 of them.
    let (mut north, mut pharma) = (String::new(), String::new());
    for (i, row) in rows
        .filter_map(Result::ok)
        .filter(|(_, r)| r[condition] != "Birth Control")
        .take(70)
        .enumerate()
    {
        let r = row.1;
        let obj = serde_json::json!({"review": r[review], "rating": r[rating], "id": 7});
        if i < 40 { &mut north } else { &mut pharma }.push_str(&format!("{obj}\n"));
    }
    std::fs::write(dir.join("north.jsonl"), north).unwrap();
    std::fs::write(dir.join("pharma.jsonl"), pharma).unwrap();
    let spec = std::fs::read_to_string(root.join("examples/drug-reviews/federation.toml"))
        .unwrap()
        .replace(
            "checkpoint = \"data/cache/minilm\"",
            &format!("checkpoint = {:?}", minilm.to_str().unwrap()),
        )
        .replace("max_tokens = 128", "max_tokens = 32")
        .replace("rounds = 2", "rounds = 1");
    assert!(spec.contains("max_tokens = 32") && spec.contains("rounds = 1"));
    std::fs::write(dir.join("spec.toml"), spec).unwrap();
    init_model(dir, "spec.toml");
    // The example's σ = 1e-5 protects nobody: the coordinator must accept it on purpose.
    let agg = spec_aggregator(
        dir,
        "spec.toml",
        &["--initial-model", "g0.safetensors", "--max-epsilon", "inf"],
    );
    let north = dir.join("north.jsonl");
    let sites = [
        ("North", north.as_path(), ""),
        ("South", tsv.as_path(), "condition=Birth Control"),
    ];
    // The example's σ = 1e-5 gives no meaningful DP: a site's default policy refuses it,
    // and the hospital must accept it explicitly.
    let out = site(dir, &agg.addr, "North", &north, "").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("σ = 0.00001") && err.contains("--min-noise-multiplier"),
        "{err}"
    );
    let accept = ["--min-noise-multiplier", "1e-5", "--epsilon-budget", "inf"];
    let st = run_sites(dir, &agg, &sites, "classes: negative = ", &accept).await;
    assert!(st.spec_summary.contains("BERT from"), "{}", st.spec_summary);
    assert_eq!(st.rounds.len(), 1);
    assert_eq!(st.rounds[0].state, "closed");
    let metrics = &st.rounds[0].site_metrics;
    assert_eq!(metrics.len(), 2, "{metrics:?}");
    for m in metrics {
        assert!(
            m.macro_f1.is_some() && m.auroc.is_none(),
            "three classes: {m:?}"
        );
    }
    // Pharma fine-tunes the federated MiniLM under EE and queries it with encrypted tokens.
    let pharma = dir.join("pharma.jsonl");
    let (csv, _trainer) = finetune_and_predict(dir, &agg, 1, &pharma, "", &pharma);
    let mut out = csv.lines();
    assert_eq!(
        out.next(),
        Some("record,predicted,p_negative,p_neutral,p_positive,label,note"),
        "{csv}"
    );
    assert_eq!(out.count(), 30, "one row per review: {csv}");
    hss_predict_matches_the_trainer(dir, &pharma, &csv);
}

/// `fedee predict --hss A,B` over mutual TLS against two `fedee hss-server`s (one on each
/// share engine): the same predicted classes as the trainer's plain EE answers and the
/// plaintext model's, probabilities within the fixed-point error; a site certificate is
/// refused by an HSS server.
fn hss_predict_matches_the_trainer(dir: &Path, records: &Path, trainer_csv: &str) {
    ok(&["certs", "init", "--dir", "pki"], dir);
    for name in ["hss0", "hss1"] {
        ok(
            &[
                "certs",
                "issue",
                "--dir",
                "pki",
                "--hss",
                name,
                "--host",
                "127.0.0.1",
            ],
            dir,
        );
    }
    ok(
        &["certs", "issue", "--dir", "pki", "--client", "pharma"],
        dir,
    );
    ok(&["certs", "issue", "--dir", "pki", "--site", "North"], dir);
    let servers: Vec<common::Service> = [("hss0", "limbs"), ("hss1", "int64")]
        .iter()
        .map(|(name, engine)| {
            common::Service::start_role(
                dir,
                "hss-server",
                "127.0.0.1:0",
                &["--tls-dir", "pki", "--tls-name", name, "--engine", engine],
            )
        })
        .collect();
    let hss = format!("{},{}", servers[0].addr, servers[1].addr);
    let predict = |tls_name: &str, out: &str| {
        fedee(
            &[
                "predict",
                "--hss",
                &hss,
                "--tls-dir",
                "pki",
                "--tls-name",
                tls_name,
                "--spec",
                "spec.toml",
                "--keys",
                "keys.json",
                "--model",
                "tuned.safetensors",
                "--data",
                records.to_str().unwrap(),
                "--out",
                out,
                "--verify",
                "--batch-size",
                "8",
            ],
            dir,
        )
    };
    let out = predict("pharma", "hss.csv");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("through HSS-EE (96 round trips"), "{err}");
    assert!(figure(&err, "max |Δp| =") < 1e-3, "{err}");
    assert_eq!(figure(&err, "argmax agreement"), 1.0, "{err}");
    let hss_csv = std::fs::read_to_string(dir.join("hss.csv")).unwrap();
    let predicted = |csv: &str| -> Vec<String> {
        csv.lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().to_owned())
            .collect()
    };
    assert_eq!(predicted(&hss_csv), predicted(trainer_csv));
    assert_eq!(predicted(&hss_csv).len(), 30);
    // A site's certificate is not a client's: refused, nothing written.
    let out = predict("North", "site.csv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("serves only client certificates"), "{err}");
    assert!(!dir.join("site.csv").exists());
}

/// Federated standardisation: before round 1 each site sends noisy per-feature statistics
/// once (recorded in its ledger as round 0), the aggregator serves their sums, and training
/// then spends the rest of the spec's ε. Statistics that do not fit the spec are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_standardisation_pools_noisy_statistics_before_round_one() {
    use fedee_proto::v1::{FeatureStatistics, StatisticsRequest};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let csv = heart_csv();
    let spec = example_spec(1).replace("standardize = \"site\"", "standardize = \"federated\"");
    assert!(spec.contains("standardize = \"federated\""));
    std::fs::write(dir.join("spec.toml"), &spec).unwrap();
    init_model(dir, "spec.toml");
    let agg = spec_aggregator(dir, "spec.toml", &["--initial-model", "g0.safetensors"]);
    let mut c = agg.client().await;
    let sha = c
        .get_spec(GetSpecRequest {})
        .await
        .unwrap()
        .into_inner()
        .sha256;
    let ask = |features: Vec<FeatureStatistics>| StatisticsRequest {
        site: "Cleveland".into(),
        features,
    };
    let early = c.submit_statistics(ask(vec![])).await.unwrap_err();
    assert_eq!(early.code(), tonic::Code::NotFound, "{early:?}");
    c.join(JoinRequest {
        site: "Cleveland".into(),
        spec_sha256: sha,
    })
    .await
    .unwrap();
    let stat = |feature: &str, count: f64| FeatureStatistics {
        feature: feature.into(),
        count,
        sum: 1.0,
        sum_squares: 1.0,
    };
    let wrong = c
        .submit_statistics(ask(vec![stat("age", 3.0)]))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
    assert!(
        wrong.message().contains("\"trestbps\""),
        "{}",
        wrong.message()
    );
    let names = [
        "age", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
    ];
    let nan: Vec<_> = names.iter().map(|n| stat(n, f64::NAN)).collect();
    let bad = c.submit_statistics(ask(nan)).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    let waiting = c.submit_statistics(ask(vec![])).await.unwrap().into_inner();
    assert!(
        !waiting.ready && !waiting.submitted && waiting.needed == 3,
        "{waiting:?}"
    );

    let children: Vec<_> = SITES
        .iter()
        .map(|s| {
            site(dir, &agg.addr, s, &csv, &format!("dataset={s}"))
                .spawn()
                .unwrap()
        })
        .collect();
    for (child, s) in children.into_iter().zip(SITES) {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{s}: {err}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ledger = report["privacy"].as_array().unwrap();
        assert_eq!(ledger.len(), 2, "{report}");
        assert_eq!(ledger[0]["round"], 0, "{report}");
        assert_eq!(ledger[0]["mechanism"], "gaussian_statistics_rdp");
        assert_eq!(ledger[0]["noise_multiplier"], 10.0);
        let (stats, total) = (
            ledger[0]["epsilon"].as_f64().unwrap(),
            ledger[1]["epsilon"].as_f64().unwrap(),
        );
        assert!(stats > 0.1 && stats < total, "{s}: {stats} then {total}");
        assert!(
            total <= 1.0 && total > 0.95,
            "{s}: the target ε covers both: {total}"
        );
    }
    let done = c.submit_statistics(ask(vec![])).await.unwrap().into_inner();
    assert!(done.ready && done.submitted && done.sites == 3, "{done:?}");
    let got: Vec<&str> = done.totals.iter().map(|t| t.feature.as_str()).collect();
    assert_eq!(got, names);
    // Noisy, but about the 370 training records of the three sites.
    let n = done.totals[0].count;
    assert!((100.0..600.0).contains(&n), "{n}");
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.done && st.rounds[0].state == "closed", "{st:?}");
    assert_eq!(
        st.pooled_statistics, done.totals,
        "status serves the pooled sums"
    );

    // The key holder standardises with the same pooled figures: `download-model` writes them
    // into the file, and `finetune` uses them whatever rows it holds. Fitting the figures only
    // (`--epochs 0`) on two hospitals' rows gives the same figures; a model file without them
    // (the initial model) falls back to each file's own, which differ.
    let got = ok(
        &[
            "download-model",
            "--aggregator",
            &agg.addr,
            "--insecure",
            "--model",
            "final",
            "--out",
            "global.safetensors",
        ],
        dir,
    );
    assert!(got.contains("pooled standardisation figures"), "{got}");
    ok(
        &["ee", "keygen", "--spec", "spec.toml", "--out", "keys.json"],
        dir,
    );
    let trainer = common::Service::start_role(dir, "trainer", "127.0.0.1:0", &["--insecure"]);
    let csv = csv.to_str().unwrap();
    let figures = |model: &str, hospital: &str| {
        let out = format!("fit-{hospital}-{model}");
        let err = ok(
            &[
                "finetune",
                "--trainer",
                &trainer.addr,
                "--insecure",
                "--spec",
                "spec.toml",
                "--keys",
                "keys.json",
                "--model",
                model,
                "--data",
                csv,
                "--where",
                &format!("dataset={hospital}"),
                "--out",
                &out,
                "--epochs",
                "0",
            ],
            dir,
        );
        let meta =
            fedee_model::safetensors_metadata(&std::fs::read(dir.join(&out)).unwrap()).unwrap();
        (err, meta["fedee.preprocessing"].clone())
    };
    let (err_a, pooled_a) = figures("global.safetensors", "Cleveland");
    let (_, pooled_b) = figures("global.safetensors", "Hungary");
    assert!(err_a.contains("federation's pooled figures"), "{err_a}");
    assert_eq!(
        pooled_a, pooled_b,
        "the same pooled figures for any key holder"
    );
    let (err_c, own_a) = figures("g0.safetensors", "Cleveland");
    let (_, own_b) = figures("g0.safetensors", "Hungary");
    assert!(err_c.contains("carries no pooled figures"), "{err_c}");
    assert_ne!(own_a, own_b, "without them each file's own figures");
    assert_ne!(own_a, pooled_a);
}

/// Local training that diverges (learning rate 1e30) is caught at the site before anything
/// leaves it: the site names the tensor, records no privacy spend, sends no update and
/// leaves the federation with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_whose_training_diverges_sends_nothing_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("federation.toml"),
        common::heart_spec(&[
            ("rounds = 10\n", "rounds = 1\n"),
            ("learning_rate = 0.05", "learning_rate = 1e30"),
        ]),
    )
    .unwrap();
    init_model(dir, "federation.toml");
    let agg = spec_aggregator(
        dir,
        "federation.toml",
        &["--initial-model", "g0.safetensors"],
    );
    agg.wait_for_log("federation started", std::time::Duration::from_secs(30));
    let csv = heart_csv();
    let out = site(dir, &agg.addr, "Cleveland", &csv, "dataset=Cleveland")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("local training diverged") && err.contains("nothing was sent"),
        "{err}"
    );
    let ledger = std::fs::read_to_string(dir.join("Cleveland.ledger.json")).unwrap_or_default();
    assert!(
        !ledger.contains("gaussian"),
        "no privacy spend may be recorded: {ledger}"
    );
    agg.wait_for_log(
        "site left the federation",
        std::time::Duration::from_secs(10),
    );
    assert!(agg.log().contains("diverged"), "{}", agg.log());
    assert!(
        !agg.log().contains("update accepted") && !agg.log().contains("rejected"),
        "{}",
        agg.log()
    );
}
