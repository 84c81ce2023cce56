//! Property-based fuzzing (proptest) of what a site receives from the aggregator before it
//! trains: arbitrary `Task` messages against the spec it agreed to, arbitrary spec texts,
//! and specs with arbitrary privacy numbers against the site's default policy. Nothing
//! panics, and whatever the site accepts is exactly what the spec and the policy allow.
//! `FEDEE_FUZZ_CASES` sets the cases per property (default 20 000); each test prints how
//! many it ran.

use std::cell::Cell;

use fedee_proto::v1::{Task, TaskKind};
use fedee_site_agent::client::{agreed_privacy, spec_privacy};
use fedee_site_agent::policy::PrivacyPolicy;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn runner() -> TestRunner {
    runner_per(1)
}

/// A runner with `1/per` of the cases (for properties whose cases calibrate σ).
fn runner_per(per: u32) -> TestRunner {
    let cases = std::env::var("FEDEE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(20_000)
        / per;
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// A small spec with `privacy` as its `[privacy]` table.
fn spec_text(privacy: &str) -> String {
    format!(
        r#"version = 1
[task]
kind = "tabular-classification"
label = "y"
classes = ["0", "1"]
[[features]]
name = "x"
type = "numeric"
[model]
kind = "mlp"
hidden = [4]
[training]
epochs = 2
batch_size = 8
[federation]
rounds = 3
[privacy]
{privacy}
"#
    )
}

/// Floats a hostile peer would send: the spec's own values, near misses, and anything.
fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(1.0),
        Just(1e-5),
        Just(0.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-1.0),
        Just(1e300),
        any::<f64>(),
    ]
}

#[test]
fn fuzz_arbitrary_tasks_against_the_agreed_spec() {
    let runs = Cell::new(0u64);
    let spec = fedee_spec::FederationSpec::from_toml(&spec_text(
        "mode = \"site\"\nclipping_norm = 1.0\nnoise_multiplier = 1.0\ndelta = 1e-5",
    ))
    .unwrap();
    let agreed = spec_privacy(&spec, 1000).unwrap();
    let strategy = (
        (float(), float(), float()),
        (
            prop_oneof![Just(2u32), any::<u32>()],
            prop_oneof![Just(8u32), any::<u32>()],
        ),
        prop_oneof![
            Just("site".to_owned()),
            Just("record".to_owned()),
            ".{0,12}"
        ],
        (any::<i32>(), any::<u32>(), any::<f64>(), any::<u64>()),
    );
    runner()
        .run(
            &strategy,
            |((sigma, c, delta), (epochs, batch), mode, (kind, round, lr, deadline))| {
                runs.set(runs.get() + 1);
                let task = Task {
                    kind,
                    round,
                    clipping_norm: c,
                    noise_multiplier: sigma,
                    local_epochs: epochs,
                    learning_rate: lr,
                    batch_size: batch,
                    deadline_unix_ms: deadline,
                    dp_mode: mode.clone(),
                    delta,
                    ..Task::default()
                };
                let _ = TaskKind::try_from(kind);
                if agreed_privacy(&task, &spec, &agreed).is_ok() {
                    // Accepted: every DP setting and the local training are the spec's.
                    prop_assert_eq!(mode.as_str(), "site");
                    prop_assert_eq!(c, 1.0);
                    prop_assert_eq!(delta, 1e-5);
                    prop_assert!((sigma - 1.0).abs() <= 1e-9, "σ = {sigma}");
                    prop_assert_eq!((epochs, batch), (2, 8));
                }
                Ok(())
            },
        )
        .unwrap();
    println!(
        "fuzz site tasks: {} arbitrary tasks against the agreed spec, no panic, none accepted off the spec",
        runs.get()
    );
}

#[test]
fn fuzz_arbitrary_spec_privacy_against_the_default_policy() {
    let runs = Cell::new(0u64);
    let policy = PrivacyPolicy::default();
    // Calibrating σ to a target ε bisects over RDP: a twentieth of the cases.
    let strategy = (
        prop_oneof![Just("site"), Just("record")],
        float(),
        prop_oneof![Just(None), float().prop_map(Some)],
        prop_oneof![Just(None), float().prop_map(Some)],
        float(),
        prop_oneof![Just(1000u64), any::<u64>()],
    );
    runner_per(20)
        .run(&strategy, |(mode, c, sigma, target, delta, n)| {
            runs.set(runs.get() + 1);
            let mut privacy =
                format!("mode = \"{mode}\"\nclipping_norm = {c:?}\ndelta = {delta:?}");
            if let Some(s) = sigma {
                privacy += &format!("\nnoise_multiplier = {s:?}");
            }
            if let Some(t) = target {
                privacy += &format!("\ntarget_epsilon = {t:?}");
            }
            // TOML has no NaN/inf spelled as Rust prints them: such specs fail to parse.
            let Ok(signed) = fedee_spec::SignedSpec::parse(&spec_text(&privacy)) else {
                return Ok(());
            };
            let spec = &signed.spec;
            if policy.check_target(spec).is_err() {
                return Ok(());
            }
            let Ok(agreed) = spec_privacy(spec, n) else {
                return Ok(());
            };
            if policy.check(&agreed, n).is_ok() {
                // Joined: within the policy, whatever the spec said.
                prop_assert!(agreed.noise_multiplier >= policy.min_noise_multiplier);
                prop_assert!(agreed.noise_multiplier.is_finite());
                prop_assert!(agreed.delta > 0.0 && agreed.delta <= policy.max_delta);
                prop_assert!(n == 0 || agreed.delta < 1.0 / n as f64);
                prop_assert!(agreed.clipping_norm > 0.0 && agreed.clipping_norm.is_finite());
            }
            Ok(())
        })
        .unwrap();
    println!(
        "fuzz site policy: {} specs with arbitrary privacy numbers, no panic, none joined outside the policy",
        runs.get()
    );
}

#[test]
fn fuzz_arbitrary_spec_texts() {
    let runs = Cell::new(0u64);
    let valid = spec_text("mode = \"record\"\ntarget_epsilon = 1.0");
    let strategy = prop_oneof![
        ".{0,600}",
        // A valid spec with a stretch replaced by arbitrary text.
        (0usize..valid.len(), 0usize..40, ".{0,40}").prop_map(move |(at, len, with)| {
            let mut s = valid.clone();
            let at = (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
            let end = (at + len).min(s.len());
            let end = (end..=s.len())
                .find(|&i| s.is_char_boundary(i))
                .unwrap_or(s.len());
            s.replace_range(at..end, &with);
            s
        }),
    ];
    runner()
        .run(&strategy, |text| {
            runs.set(runs.get() + 1);
            if let Ok(signed) = fedee_spec::SignedSpec::parse(&text) {
                let _ = spec_privacy(&signed.spec, 100);
            }
            Ok(())
        })
        .unwrap();
    println!("fuzz spec texts: {} arbitrary texts, no panic", runs.get());
}
