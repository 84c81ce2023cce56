//! EE on the MLP: round trip, inference equivariance for every allowed key group, training
//! equivariance of AdamW and SGD, and refusal of pairs that break it (SECURITY.md,
//! "The math").

use std::collections::BTreeMap;

use fedee_encrypt::{
    EncryptError, KeyGroup, KeySet, Optimizer, StateDict, check_trainable, decrypt_state,
    encrypt_inputs, encrypt_labels, transform_state, verify_inference,
};
use fedee_model::mlp::forward;
use fedee_model::{Activation, Mlp, MlpConfig, OptimizerSpec};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

fn cfg() -> MlpConfig {
    MlpConfig {
        in_features: 15,
        hidden: vec![32],
        out_features: 2,
        activation: Activation::Relu,
    }
}

/// Three hidden layers of different widths, so a key applied to the wrong layer cannot fit.
fn deep() -> MlpConfig {
    MlpConfig {
        hidden: vec![16, 8, 12],
        out_features: 3,
        ..cfg()
    }
}

fn max_diff(a: &StateDict, b: &StateDict) -> f64 {
    a.iter()
        .map(|(k, v)| (v - &b[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

fn model(kind: Kind, seed: i64) -> Mlp {
    tch::manual_seed(seed);
    Mlp::new(cfg(), Device::Cpu, kind).unwrap()
}

fn keys(cfg: &MlpConfig, groups: &[(&str, KeyGroup)], offset: bool, seed: u64) -> KeySet {
    let groups: BTreeMap<String, KeyGroup> =
        groups.iter().map(|(n, g)| ((*n).to_owned(), *g)).collect();
    KeySet::generate(
        &cfg.key_spec(),
        &groups,
        offset,
        &mut ChaCha20Rng::seed_from_u64(seed),
    )
    .unwrap()
}

#[test]
fn round_trip_restores_the_model() {
    let m = model(Kind::Double, 1);
    let spec = cfg().key_spec();
    for (groups, offset) in [
        (vec![], false),
        (
            vec![
                ("input", KeyGroup::Invertible),
                ("hidden", KeyGroup::Monomial),
            ],
            true,
        ),
    ] {
        let k = keys(&cfg(), &groups, offset, 3);
        let ee = transform_state(&spec, &k, &m.state()).unwrap();
        assert!(
            max_diff(&ee, &m.state()) > 1e-3,
            "the EE model must differ from the plaintext one"
        );
        let back = decrypt_state(&spec, &k, &ee).unwrap();
        let d = max_diff(&back, &m.state());
        assert!(d < 1e-12, "round trip off by {d}");
    }
}

#[test]
fn inference_is_equivariant_for_every_allowed_group() {
    for activation in [Activation::Relu, Activation::Gelu] {
        let cfg = MlpConfig {
            activation,
            ..cfg()
        };
        tch::manual_seed(5);
        let m = Mlp::new(cfg.clone(), Device::Cpu, Kind::Double).unwrap();
        let spec = cfg.key_spec();
        let x = Tensor::randn([64, 15], (Kind::Double, Device::Cpu));
        for input in [
            KeyGroup::Permutation,
            KeyGroup::SignedPermutation,
            KeyGroup::Orthogonal,
            KeyGroup::Invertible,
        ] {
            for hidden in spec.keys["hidden"].allowed.clone() {
                for offset in [false, true] {
                    let k = keys(&cfg, &[("input", input), ("hidden", hidden)], offset, 11);
                    let d = verify_inference(&spec, &k, &m.state(), &x, |s, x| {
                        forward(&cfg, cfg.check_state(s).unwrap(), x)
                    })
                    .unwrap();
                    assert!(
                        d < 1e-10,
                        "{activation:?} input {input} hidden {hidden} offset {offset}: {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn wrong_key_does_not_decrypt() {
    let m = model(Kind::Double, 2);
    let spec = cfg().key_spec();
    let k1 = keys(&cfg(), &[], false, 1);
    let k2 = keys(&cfg(), &[], false, 2);
    let ee = transform_state(&spec, &k1, &m.state()).unwrap();
    let wrong = decrypt_state(&spec, &k2, &ee).unwrap();
    assert!(max_diff(&wrong, &m.state()) > 1e-3);
}

#[test]
fn architecture_refuses_groups_that_break_its_layers() {
    let gelu = MlpConfig {
        activation: Activation::Gelu,
        ..cfg()
    };
    let err = KeySet::generate(
        &gelu.key_spec(),
        &BTreeMap::from([("hidden".to_owned(), KeyGroup::Monomial)]),
        false,
        &mut ChaCha20Rng::seed_from_u64(0),
    )
    .unwrap_err();
    assert!(matches!(err, EncryptError::GroupNotAllowed { .. }), "{err}");
    assert!(err.to_string().contains("hidden"), "{err}");
}

/// Train the plaintext model and its EE twin on the same batches; return the max abs
/// difference between the decrypted EE parameters and the plaintext ones.
fn train_both(kind: Kind, opt: OptimizerSpec, k: &KeySet, steps: usize) -> f64 {
    train_both_on(&cfg(), kind, opt, k, steps)
}

fn train_both_on(cfg: &MlpConfig, kind: Kind, opt: OptimizerSpec, k: &KeySet, steps: usize) -> f64 {
    let spec = cfg.key_spec();
    check_trainable(&spec, k, opt.family()).unwrap();
    tch::manual_seed(7);
    let mut plain = Mlp::new(cfg.clone(), Device::Cpu, kind).unwrap();
    let ee_state = transform_state(&spec, k, &plain.state()).unwrap();
    let mut ee = Mlp::from_state(cfg.clone(), &ee_state, Device::Cpu, kind).unwrap();
    let mut o1 = plain.optimizer(&opt).unwrap();
    let mut o2 = ee.optimizer(&opt).unwrap();
    tch::manual_seed(8);
    let (n, d) = (cfg.out_features as i64, cfg.in_features as i64);
    for _ in 0..steps {
        let x = Tensor::randn([16, d], (kind, Device::Cpu));
        let y = Tensor::randint(n, [16], (Kind::Int64, Device::Cpu));
        let l1 = plain.train_step(&mut o1, &x, &y);
        let l2 = ee.train_step(
            &mut o2,
            &encrypt_inputs(&spec, k, &x).unwrap(),
            &encrypt_labels(&spec, k, &y).unwrap(),
        );
        assert!((l1 - l2).abs() < 1e-4, "losses differ: {l1} vs {l2}");
    }
    let back = decrypt_state(&spec, k, &ee.state()).unwrap();
    max_diff(&back, &plain.state())
}

#[test]
fn a_deep_mlp_has_one_key_per_hidden_layer_and_stays_equivariant() {
    let cfg = deep();
    let spec = cfg.key_spec();
    let names: Vec<&str> = spec.keys.keys().map(String::as_str).collect();
    assert_eq!(names, ["hidden1", "hidden2", "hidden3", "input", "label"]);
    assert_eq!(
        spec.params["fc2.weight"]
            .iter()
            .map(|k| k.as_ref().unwrap().key.clone())
            .collect::<Vec<_>>(),
        ["hidden2", "hidden1"]
    );
    assert_eq!(cfg.shapes()["fc4.weight"], [3, 12]);
    assert_eq!(cfg.shapes().len(), 8);

    // Inference under every allowed group of every hidden key, with offsets.
    tch::manual_seed(5);
    let m = Mlp::new(cfg.clone(), Device::Cpu, Kind::Double).unwrap();
    let x = Tensor::randn([32, 15], (Kind::Double, Device::Cpu));
    for hidden in [KeyGroup::Permutation, KeyGroup::Monomial] {
        for offset in [false, true] {
            let groups = [
                ("input", KeyGroup::Invertible),
                ("hidden1", hidden),
                ("hidden2", hidden),
                ("hidden3", hidden),
            ];
            let k = keys(&cfg, &groups, offset, 12);
            let ee = transform_state(&spec, &k, &m.state()).unwrap();
            assert!(
                max_diff(&ee, &m.state()) > 1e-3,
                "every layer is transformed"
            );
            let d = verify_inference(&spec, &k, &m.state(), &x, |s, x| {
                forward(&cfg, cfg.check_state(s).unwrap(), x)
            })
            .unwrap();
            assert!(d < 1e-10, "hidden {hidden} offset {offset}: {d}");
            let back = decrypt_state(&spec, &k, &ee).unwrap();
            assert!(max_diff(&back, &m.state()) < 1e-12);
        }
    }

    // Training: AdamW under signed permutations, SGD under an orthogonal input key.
    let k = keys(&cfg, &[("input", KeyGroup::SignedPermutation)], false, 13);
    let d = train_both_on(&cfg, Kind::Double, ADAMW, &k, 10);
    assert!(d < 1e-10, "AdamW drift {d}");
    let k = keys(&cfg, &[("input", KeyGroup::Orthogonal)], false, 14);
    let d = train_both_on(&cfg, Kind::Double, SGD, &k, 10);
    assert!(d < 1e-10, "SGD drift {d}");

    // A key file for the one-hidden-layer MLP does not fit the deep one.
    let shallow = keys(&self::cfg(), &[], false, 15);
    assert!(transform_state(&spec, &shallow, &m.state()).is_err());
}

const ADAMW: OptimizerSpec = OptimizerSpec::AdamW {
    lr: 1e-2,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 1e-2,
};
const SGD: OptimizerSpec = OptimizerSpec::Sgd {
    lr: 0.1,
    momentum: 0.9,
    weight_decay: 1e-3,
};

#[test]
fn twenty_adamw_steps_are_equivariant() {
    let k = keys(&cfg(), &[("input", KeyGroup::SignedPermutation)], false, 21);
    let d64 = train_both(Kind::Double, ADAMW, &k, 20);
    assert!(d64 < 1e-10, "f64 AdamW drift {d64}");
    let d32 = train_both(Kind::Float, ADAMW, &k, 20);
    assert!(d32 < 1e-4, "f32 AdamW drift {d32}");
}

#[test]
fn sgd_is_equivariant_under_an_orthogonal_input_key() {
    let k = keys(&cfg(), &[("input", KeyGroup::Orthogonal)], false, 23);
    let d = train_both(Kind::Double, SGD, &k, 20);
    assert!(d < 1e-10, "SGD drift {d}");
}

#[test]
fn adamw_under_an_orthogonal_key_is_refused_and_really_diverges() {
    let spec = cfg().key_spec();
    let k = keys(&cfg(), &[("input", KeyGroup::Orthogonal)], false, 24);
    let err = check_trainable(&spec, &k, Optimizer::AdamW).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EncryptError::NotEquivariant { .. }), "{msg}");
    assert!(
        msg.contains("input") && msg.contains("orthogonal") && msg.contains("AdamW"),
        "{msg}"
    );
    // The refusal is warranted: training anyway drifts far from plaintext training.
    let mut plain = model(Kind::Double, 7);
    let mut ee = Mlp::from_state(
        cfg(),
        &transform_state(&spec, &k, &plain.state()).unwrap(),
        Device::Cpu,
        Kind::Double,
    )
    .unwrap();
    let (mut o1, mut o2) = (
        plain.optimizer(&ADAMW).unwrap(),
        ee.optimizer(&ADAMW).unwrap(),
    );
    for _ in 0..20 {
        let x = Tensor::randn([16, 15], (Kind::Double, Device::Cpu));
        let y = Tensor::randint(2, [16], (Kind::Int64, Device::Cpu));
        plain.train_step(&mut o1, &x, &y);
        ee.train_step(
            &mut o2,
            &encrypt_inputs(&spec, &k, &x).unwrap(),
            &encrypt_labels(&spec, &k, &y).unwrap(),
        );
    }
    let d = max_diff(
        &decrypt_state(&spec, &k, &ee.state()).unwrap(),
        &plain.state(),
    );
    assert!(d > 1e-4, "expected divergence, got {d}");
}

#[test]
fn every_disallowed_pair_is_refused() {
    let spec = cfg().key_spec();
    for (group, opt, ok) in [
        (KeyGroup::Permutation, Optimizer::AdamW, true),
        (KeyGroup::SignedPermutation, Optimizer::AdamW, true),
        (KeyGroup::Orthogonal, Optimizer::AdamW, false),
        (KeyGroup::Monomial, Optimizer::AdamW, false),
        (KeyGroup::Invertible, Optimizer::AdamW, false),
        (KeyGroup::Orthogonal, Optimizer::Sgd, true),
        (KeyGroup::Monomial, Optimizer::Sgd, false),
        (KeyGroup::Invertible, Optimizer::Sgd, false),
    ] {
        let k = keys(&cfg(), &[("input", group)], false, 30);
        assert_eq!(
            check_trainable(&spec, &k, opt).is_ok(),
            ok,
            "{group} with {opt}"
        );
    }
    let k = keys(&cfg(), &[("hidden", KeyGroup::Monomial)], false, 31);
    assert!(check_trainable(&spec, &k, Optimizer::Sgd).is_err());
    let k = keys(&cfg(), &[], true, 32);
    assert!(matches!(
        check_trainable(&spec, &k, Optimizer::Sgd),
        Err(EncryptError::OffsetInTraining)
    ));
}

#[test]
fn key_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("fedee-keytest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("k.json");
    let k = keys(&cfg(), &[], false, 40);
    k.save(&path, false).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(KeySet::load(&path).unwrap(), k);
    // Never silently replaced: the old keys are what decrypts the old EE model.
    let other = keys(&cfg(), &[], false, 41);
    assert!(matches!(
        other.save(&path, false),
        Err(fedee_encrypt::EncryptError::Exists(_))
    ));
    assert_eq!(KeySet::load(&path).unwrap(), k);
    other.save(&path, true).unwrap();
    assert_eq!(KeySet::load(&path).unwrap(), other);
    std::fs::remove_dir_all(&dir).unwrap();
}
