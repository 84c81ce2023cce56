//! BERT: parity with the Python reference implementation, and EE for transformers
//! (SECURITY.md, "The math": BERT, and which keys training keeps exact).

use std::path::PathBuf;

use fedee_encrypt::{
    EncryptError, Optimizer, StateDict, check_trainable, decrypt_outputs, decrypt_state,
    encrypt_labels, encrypt_token_ids, transform_state,
};
use fedee_model::bert::{self, BertClassifierConfig, BertConfig, Profile};
use fedee_model::{Architecture, Input, Model, ModelError, OptimizerSpec};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

mod common;
use common::keyset;

fn minilm() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/cache/minilm");
    assert!(
        p.join("model.safetensors").exists(),
        "{} is missing: run `make data`",
        p.display()
    );
    p
}

fn load() -> (BertClassifierConfig, StateDict) {
    let dir = minilm();
    let bert = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let cfg = BertClassifierConfig {
        bert,
        num_labels: 3,
    };
    let mut state =
        bert::load_pretrained(&dir.join("model.safetensors"), &bert, Device::Cpu).unwrap();
    tch::manual_seed(0);
    state.extend(cfg.init_head(Kind::Float));
    (cfg, state)
}

#[test]
fn sentence_embeddings_match_the_reference_implementation() {
    let (cfg, state) = load();
    let fx: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/minilm_reference.json")).unwrap();
    let mut worst = 0f64;
    for s in fx["sentences"].as_array().unwrap() {
        let ids: Vec<i64> = s["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let ids = Tensor::from_slice(&ids).unsqueeze(0);
        let mask = ids.ones_like();
        let pooled = bert::mean_pool(
            &bert::encode(&cfg.bert, cfg.check_state(&state).unwrap(), &ids, &mask),
            &mask,
        )
        .squeeze_dim(0);
        let normed = &pooled / pooled.norm();
        for (key, ours) in [("mean_pooled", &pooled), ("normalized", &normed)] {
            let reference: Vec<f32> = s[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let d = (ours - Tensor::from_slice(&reference))
                .abs()
                .max()
                .double_value(&[]);
            worst = worst.max(d);
            assert!(d <= 1e-4, "{key} of {:?}: max abs diff {d}", s["sentence"]);
        }
    }
    eprintln!("max abs diff vs sentence-transformers: {worst:.2e}");
}

#[test]
fn loading_names_tensor_expected_and_found_shape() {
    let dir = minilm();
    let mut bert = BertConfig::from_file(&dir.join("config.json")).unwrap();
    bert.hidden_size = 768;
    bert.num_attention_heads = 12;
    let err =
        bert::load_pretrained(&dir.join("model.safetensors"), &bert, Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Shape { .. }), "{msg}");
    assert!(
        msg.contains("expected shape") && msg.contains("768") && msg.contains("384"),
        "{msg}"
    );
}

fn batch(cfg: &BertClassifierConfig, b: i64, t: i64) -> (Tensor, Tensor) {
    let ids = Tensor::randint_low(
        999,
        cfg.bert.vocab_size as i64,
        [b, t],
        (Kind::Int64, Device::Cpu),
    );
    let ids = ids.index_fill(1, &Tensor::from_slice(&[0i64]), 101); // [CLS]
    let mask = ids.ones_like();
    // Pad the tail of the first row.
    let _ = mask.get(0).narrow(0, t - 3, 3).fill_(0);
    (ids, mask)
}

fn max_rel(a: &StateDict, b: &StateDict) -> f64 {
    a.iter()
        .map(|(k, v)| {
            let scale = b[k].abs().max().double_value(&[]).max(1e-12);
            (v - &b[k]).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

#[test]
fn hidden_states_and_logits_are_equivariant_in_both_profiles() {
    let (cfg, state) = load();
    let spec = cfg.key_spec();
    tch::manual_seed(1);
    let (ids, mask) = batch(&cfg, 3, 12);
    let plain_h = bert::encode(&cfg.bert, cfg.check_state(&state).unwrap(), &ids, &mask);
    let plain_logits = bert::classify(&cfg, cfg.check_state(&state).unwrap(), &ids, &mask);
    for profile in [Profile::Finetune, Profile::Inference] {
        let keys = keyset(&spec, &cfg.key_groups(profile), 5);
        let ee = transform_state(&spec, &keys, &state).unwrap();
        let enc_ids = encrypt_token_ids(&spec, &keys, &ids).unwrap();
        assert!(!enc_ids.equal(&ids));
        // Hidden states come out in the residual basis: h' = P h.
        let h_enc = bert::encode(&cfg.bert, cfg.check_state(&ee).unwrap(), &enc_ids, &mask);
        let residual = keys.keys["residual"].inverse();
        let h_dec = residual.apply(&h_enc, 2);
        let dh = (&h_dec - &plain_h).abs().max().double_value(&[]);
        let logits = decrypt_outputs(
            &spec,
            &keys,
            &bert::classify(&cfg, cfg.check_state(&ee).unwrap(), &enc_ids, &mask),
        )
        .unwrap();
        let dl = (&logits - &plain_logits).abs().max().double_value(&[]);
        eprintln!("{profile:?}: max |Δhidden| {dh:.2e}, max |Δlogit| {dl:.2e}");
        assert!(
            dh <= 1e-4 && dl <= 1e-4,
            "{profile:?}: hidden {dh}, logits {dl}"
        );
        // And the encrypted hidden states are not the plaintext ones.
        assert!((&h_enc - &plain_h).abs().max().double_value(&[]) > 1e-2);
    }
}

/// Run in f64. In f32 the comparison fails on `attention.self.key.bias` only: its exact
/// gradient is zero (softmax ignores a constant per query), so AdamW normalises rounding noise
/// into lr-sized steps that differ between the two bases (measured: max relative difference
/// 2.5e-3, absolute 4.3e-6, with no effect on any output). In f64 that noise stays below
/// Adam's ε.
#[test]
fn twenty_adamw_steps_on_encrypted_batches_match_plaintext_training() {
    let (cfg, state) = load();
    let state: StateDict = state
        .into_iter()
        .map(|(k, v)| (k, v.to_kind(Kind::Double)))
        .collect();
    let spec = cfg.key_spec();
    let arch = Architecture::BertClassifier(cfg);
    let keys = keyset(&spec, &cfg.key_groups(Profile::Finetune), 6);
    check_trainable(&spec, &keys, Optimizer::AdamW).unwrap();
    let opt = OptimizerSpec::AdamW {
        lr: 2e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut plain = Model::from_state(arch.clone(), &state, Device::Cpu, Kind::Double).unwrap();
    let ee_state = transform_state(&spec, &keys, &state).unwrap();
    let mut ee = Model::from_state(arch, &ee_state, Device::Cpu, Kind::Double).unwrap();
    let (mut o1, mut o2) = (plain.optimizer(&opt).unwrap(), ee.optimizer(&opt).unwrap());
    tch::manual_seed(2);
    for step in 0..20 {
        let (ids, mask) = batch(&cfg, 4, 10);
        let y = Tensor::randint(3, [4], (Kind::Int64, Device::Cpu));
        let l1 = plain
            .train_step(
                &mut o1,
                &Input::Tokens {
                    ids: ids.shallow_clone(),
                    mask: mask.shallow_clone(),
                },
                &y,
            )
            .unwrap();
        let enc = Input::Tokens {
            ids: encrypt_token_ids(&spec, &keys, &ids).unwrap(),
            mask,
        };
        let l2 = ee
            .train_step(&mut o2, &enc, &encrypt_labels(&spec, &keys, &y).unwrap())
            .unwrap();
        assert!((l1 - l2).abs() < 1e-4, "step {step}: loss {l1} vs {l2}");
    }
    let back = decrypt_state(&spec, &keys, &ee.state()).unwrap();
    let rel = max_rel(&back, &plain.state());
    let moved = max_rel(&plain.state(), &state);
    eprintln!(
        "20 AdamW steps: max relative parameter difference {rel:.2e} (training moved parameters by {moved:.2e})"
    );
    assert!(
        moved > 1e-3,
        "training must move the parameters for the comparison to mean anything"
    );
    assert!(rel <= 1e-4, "max relative parameter difference {rel}");
}

#[test]
fn inference_profile_is_refused_for_training() {
    let (cfg, _) = load();
    let spec = cfg.key_spec();
    let keys = keyset(&spec, &cfg.key_groups(Profile::Inference), 7);
    let err = check_trainable(&spec, &keys, Optimizer::AdamW).unwrap_err();
    assert!(matches!(err, EncryptError::NotEquivariant { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("AdamW") && msg.contains("general invertible") && msg.contains("qk"),
        "{msg}"
    );
    assert!(check_trainable(&spec, &keys, Optimizer::Sgd).is_err());
}

#[test]
fn keys_that_split_heads_are_rejected() {
    let (cfg, _) = load();
    let spec = cfg.key_spec();
    let mut keys = keyset(&spec, &Default::default(), 8);
    // A vo key that moves heads differently from its layer's qk key breaks attention.
    let other = keyset(&spec, &Default::default(), 9);
    keys.keys.insert("vo0".into(), other.keys["vo0"].clone());
    let err = keys.check(&spec).unwrap_err().to_string();
    assert!(err.contains("vo0") || err.contains("qk0"), "{err}");
}

#[test]
fn tokenizer_matches_the_reference_ids() {
    let tok =
        fedee_model::text::TextTokenizer::from_file(&minilm().join("tokenizer.json"), 128).unwrap();
    let fx: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/minilm_reference.json")).unwrap();
    for s in fx["sentences"].as_array().unwrap() {
        let want: Vec<i64> = s["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(tok.ids(s["sentence"].as_str().unwrap()).unwrap(), want);
    }
    // No padding to 128: a short text stays short; batches pad to their longest with mask 0.
    let (ids, mask) = tok.batch(&["hi", "a longer sentence here"]).unwrap();
    assert_eq!(ids.size(), vec![2, 6]);
    assert_eq!(mask.sum(Kind::Int64).int64_value(&[]), 3 + 6);
}

#[test]
fn client_side_embeddings_in_shuffled_order_give_the_same_logits_and_are_checked() {
    let (cfg, state) = load();
    let spec = cfg.key_spec();
    let keys = keyset(&spec, &Default::default(), 10);
    let ee = transform_state(&spec, &keys, &state).unwrap();
    let arch = Architecture::BertClassifier(cfg);
    tch::manual_seed(4);
    let (ids, mask) = batch(&cfg, 3, 12);
    let enc = encrypt_token_ids(&spec, &keys, &ids).unwrap();
    let _g = tch::no_grad_guard();
    let want = bert::classify(&cfg, cfg.check_state(&ee).unwrap(), &enc, &mask);
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let (x, m) = bert::embed_and_shuffle(
        &cfg.bert,
        cfg.check_state(&ee).unwrap(),
        &enc,
        &mask,
        &mut rng,
    );
    assert_ne!(
        Vec::<i64>::try_from(m.reshape([-1])).unwrap(),
        Vec::<i64>::try_from(mask.reshape([-1])).unwrap(),
        "the mask must move with the shuffled tokens"
    );
    // Through the trainer's batch format, as the trainer parses it.
    let bytes = fedee_model::batch_to_safetensors(
        &Input::Embedded {
            x: x.shallow_clone(),
            mask: m,
        },
        None,
    )
    .unwrap();
    let (input, _) = fedee_model::batch_from_safetensors(&bytes, &arch, Device::Cpu).unwrap();
    assert!(matches!(input, Input::Embedded { .. }));
    let got = arch
        .forward(arch.check_state(&ee).unwrap(), &input)
        .unwrap();
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(
        diff < 1e-4,
        "shuffled client-side embeddings: max |Δ logits| {diff}"
    );
    // Control: shuffling the vectors but not the mask changes the logits.
    let wrong = arch
        .forward(
            arch.check_state(&ee).unwrap(),
            &Input::Embedded {
                x: x.shallow_clone(),
                mask: mask.shallow_clone(),
            },
        )
        .unwrap();
    assert!((&wrong - &want).abs().max().double_value(&[]) > 1e-3);
    // Bad embeddings are refused with the field named.
    let bad = |x: Tensor| {
        let b = fedee_model::batch_to_safetensors(
            &Input::Embedded {
                x,
                mask: mask.shallow_clone(),
            },
            None,
        )
        .unwrap();
        fedee_model::batch_from_safetensors(&b, &arch, Device::Cpu)
            .unwrap_err()
            .to_string()
    };
    let nan = x.copy();
    let _ = nan.get(0).get(0).get(0).fill_(f64::NAN);
    assert!(bad(nan).contains("inputs_embeds"));
    assert!(bad(x.narrow(2, 0, 100)).contains("inputs_embeds"));
}
