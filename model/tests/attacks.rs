//! The attack suite's algorithms recover keys where the math says they must, and fail where it
//! says they cannot (so the figures in SECURITY.md measure the attacks, not bugs).

use std::collections::BTreeMap;

use fedee_encrypt::attack::frequency::{BigramModel, FrequencyAttack, log_likelihood, score};
use fedee_encrypt::attack::{known_plaintext, matching};
use fedee_encrypt::volume::VolumeMeter;
use fedee_encrypt::{Key, KeyGroup, KeySet, decrypt_state, rotate, transform_state};
use fedee_model::bert::{BertClassifierConfig, BertConfig, Profile};
use fedee_model::{Activation, MlpConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

mod common;
use common::keyset;

fn tiny_bert() -> BertClassifierConfig {
    BertClassifierConfig {
        bert: BertConfig {
            vocab_size: 500,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        },
        num_labels: 3,
    }
}

/// A random "public" BERT whose LayerNorm parameters differ per channel, as trained ones do.
fn public_bert(cfg: &BertClassifierConfig) -> fedee_encrypt::StateDict {
    tch::manual_seed(3);
    cfg.init_random(Kind::Float)
        .into_iter()
        .map(|(n, t)| {
            let t = if n.contains("LayerNorm.") {
                &t + Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1
            } else {
                t
            };
            (n, t)
        })
        .collect()
}

#[test]
fn weight_matching_recovers_every_permutation_of_a_public_model() {
    let cfg = tiny_bert();
    let public = public_bert(&cfg);
    let spec = cfg.key_spec();
    let keys = keyset(&spec, &cfg.key_groups(Profile::Finetune), 1);
    let ee = transform_state(&spec, &keys, &public).unwrap();
    let perm = |n: &str| keys.keys[n].permutation().unwrap().to_vec();
    let residual = matching::match_residual(&public, &ee);
    assert_eq!(matching::as_i64(&residual), perm("residual"));
    let vocab = matching::nearest_rows(
        &matching::unpermute(&ee["embeddings.word_embeddings.weight"], 1, &residual),
        &public["embeddings.word_embeddings.weight"],
    );
    assert_eq!(vocab, perm("vocab"));
    // Control: with a wrong residual guess the vocabulary is not recovered.
    let wrong: Vec<usize> = (0..cfg.bert.hidden_size).collect();
    let vocab = matching::nearest_rows(
        &matching::unpermute(&ee["embeddings.word_embeddings.weight"], 1, &wrong),
        &public["embeddings.word_embeddings.weight"],
    );
    assert!(matching::share_correct(&vocab, &perm("vocab")) < 0.5);
}

#[test]
fn invertible_attention_keys_of_the_inference_profile_fall_to_one_solve() {
    let cfg = tiny_bert();
    let public = public_bert(&cfg);
    let spec = cfg.key_spec();
    let keys = keyset(&spec, &cfg.key_groups(Profile::Inference), 4);
    assert!(
        keys.keys["qk0"].permutation().is_none(),
        "dense key expected"
    );
    let ee = transform_state(&spec, &keys, &public).unwrap();
    let residual = matching::match_residual(&public, &ee);
    let name = "encoder.layer.0.attention.self.query.weight";
    let truth = keys.keys["qk0"].apply(&Tensor::eye(32, (Kind::Double, Device::Cpu)), 0);
    let guess = matching::solve_key(&public[name], &matching::unpermute(&ee[name], 1, &residual));
    assert!(matching::relative_error(&guess, &truth) < 1e-3);
    assert_eq!(matching::rows_recovered(&guess, &truth, 1e-3), 1.0);
    // Control: against another layer's public weight the solve recovers nothing.
    let other = &public["encoder.layer.1.attention.self.query.weight"];
    let guess = matching::solve_key(other, &matching::unpermute(&ee[name], 1, &residual));
    assert!(matching::relative_error(&guess, &truth) > 0.1);
    assert_eq!(matching::rows_recovered(&guess, &truth, 1e-3), 0.0);
}

#[test]
fn hungarian_finds_the_assignment_and_activation_stats_match_channels() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let n = 40usize;
    let mut p: Vec<usize> = (0..n).collect();
    rand::seq::SliceRandom::shuffle(p.as_mut_slice(), &mut rng);
    // Channels with distinct means and deviations, observed as a permuted copy.
    tch::manual_seed(4);
    let scale = Tensor::rand([n as i64], (Kind::Double, Device::Cpu)) + 0.5;
    let shift = Tensor::randn([n as i64], (Kind::Double, Device::Cpu));
    let public = Tensor::randn([20_000, n as i64], (Kind::Double, Device::Cpu)) * &scale + &shift;
    let idx = Tensor::from_slice(&matching::as_i64(&p));
    let observed = Tensor::randn([20_000, n as i64], (Kind::Double, Device::Cpu)) * &scale + &shift;
    let observed = observed.index_select(1, &idx);
    let got = matching::match_activations(
        &matching::channel_stats(&[observed]),
        &matching::channel_stats(&[public]),
    );
    assert_eq!(got, p);
}

#[test]
fn known_plaintext_needs_d_plus_one_pairs_generically_and_one_for_signed_permutations() {
    let d = 6i64;
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    tch::manual_seed(5);
    let x = Tensor::randn([50, d], (Kind::Double, Device::Cpu));
    let (train, test) = (x.narrow(0, 0, 10), x.narrow(0, 10, 40));
    let key = Key::generate("input", d as usize, KeyGroup::Invertible, &mut rng);
    let t = key.apply(&Tensor::eye(d, (Kind::Double, Device::Cpu)), 0);
    let delta = Tensor::randn([d], (Kind::Double, Device::Cpu));
    let enc = |x: &Tensor| x.matmul(&t.tr()) + &delta;
    let full = train.narrow(0, 0, d + 1);
    let r = known_plaintext::generic(&full, &enc(&full));
    let (ke, de) = known_plaintext::errors(&r, &t, &test, &enc(&test));
    assert!(ke < 1e-8 && de < 1e-8, "{ke} {de}");
    let few = train.narrow(0, 0, d / 2);
    let r = known_plaintext::generic(&few, &enc(&few));
    let (ke, de) = known_plaintext::errors(&r, &t, &test, &enc(&test));
    assert!(ke > 0.1 && de > 0.1, "{ke} {de}");

    let key = Key::generate("input", d as usize, KeyGroup::SignedPermutation, &mut rng);
    let s = key.apply(&Tensor::eye(d, (Kind::Double, Device::Cpu)), 0);
    let one = train.narrow(0, 0, 1);
    let r = known_plaintext::structured(&one, &one.matmul(&s.tr()), KeyGroup::SignedPermutation);
    let (ke, _) = known_plaintext::errors(&r, &s, &test, &test.matmul(&s.tr()));
    assert!(ke < 1e-12, "{ke}");
}

/// Text with Zipfian unigrams and bigram structure, like natural text: half the time the next
/// symbol is a Zipf draw, otherwise one of the current symbol's few favourite successors.
fn markov(rng: &mut ChaCha20Rng, next: &[Vec<u32>], len: usize) -> Vec<Vec<u32>> {
    let v = next.len();
    let zipf: Vec<f64> = (1..=v)
        .scan(0.0, |acc, r| {
            *acc += 1.0 / r as f64;
            Some(*acc)
        })
        .collect();
    let total = zipf[v - 1];
    let mut out = Vec::new();
    let mut s = 0u32;
    for _ in 0..len / 50 {
        let mut seq = Vec::new();
        for _ in 0..50 {
            s = if rng.random::<bool>() {
                let u = rng.random::<f64>() * total;
                zipf.partition_point(|&c| c < u).min(v - 1) as u32
            } else {
                let c = &next[s as usize];
                c[rng.random_range(0..c.len())]
            };
            seq.push(s);
        }
        out.push(seq);
    }
    out
}

#[test]
fn hill_climbing_beats_rank_matching_on_a_substitution_cipher() {
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let v = 150u32;
    let next: Vec<Vec<u32>> = (0..v)
        .map(|_| (0..3).map(|_| rng.random_range(0..v)).collect())
        .collect();
    let reference = markov(&mut rng, &next, 200_000);
    let plain = markov(&mut rng, &next, 20_000);
    let mut perm: Vec<u32> = (0..v).collect();
    rand::seq::SliceRandom::shuffle(perm.as_mut_slice(), &mut rng);
    // cipher id c has plaintext perm[c]; encrypt with the inverse.
    let mut inv = vec![0u32; v as usize];
    for (c, &p) in perm.iter().enumerate() {
        inv[p as usize] = c as u32;
    }
    let cipher: Vec<Vec<u32>> = plain
        .iter()
        .map(|s| s.iter().map(|&t| inv[t as usize]).collect())
        .collect();
    let model = BigramModel::new(&reference, v as usize);
    let attack = FrequencyAttack {
        moves: 1_000_000,
        ..Default::default()
    };
    let truth = |c: u32| perm[c as usize];
    let (uni, _) = score(&cipher, &attack.unigram(&cipher, &model), truth);
    let found = attack.run(&cipher, &model, &mut rng);
    let (climb, ids) = score(&cipher, &found, truth);
    // The climb raises the objective it climbs.
    let ll = |g: &fedee_encrypt::attack::frequency::Guess| log_likelihood(&cipher, &model, g);
    assert!(ll(&found) > ll(&attack.unigram(&cipher, &model)));
    assert!(
        climb > 0.9 && climb > uni + 0.2,
        "unigram {uni}, climb {climb}"
    );
    assert!(ids > 0.5, "distinct ids {ids}");
}

#[test]
fn rotation_rekeys_without_changing_the_plaintext_model() {
    let cfg = MlpConfig {
        in_features: 5,
        hidden: vec![8],
        out_features: 2,
        activation: Activation::Relu,
    };
    let spec = cfg.key_spec();
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let groups: BTreeMap<String, KeyGroup> = [("input".to_owned(), KeyGroup::SignedPermutation)]
        .into_iter()
        .collect();
    let keys = KeySet::generate(&spec, &groups, false, &mut rng).unwrap();
    tch::manual_seed(7);
    let plain: fedee_encrypt::StateDict = cfg
        .shapes()
        .into_iter()
        .map(|(n, s)| (n, Tensor::randn(&s, (Kind::Float, Device::Cpu))))
        .collect();
    let ee = transform_state(&spec, &keys, &plain).unwrap();
    let (new, ee2) = rotate(&spec, &keys, &ee, &mut rng).unwrap();
    assert_ne!(new, keys);
    assert_eq!(new.keys["input"].group(), KeyGroup::SignedPermutation);
    let back = decrypt_state(&spec, &new, &ee2).unwrap();
    let diff = |a: &fedee_encrypt::StateDict, b: &fedee_encrypt::StateDict| {
        a.iter()
            .map(|(k, v)| (v - &b[k]).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    };
    assert!(diff(&back, &plain) < 1e-5);
    assert!(diff(&ee2, &ee) > 1e-3, "the EE model must change");
}

#[test]
fn the_volume_meter_counts_across_runs_and_warns_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let mut m = VolumeMeter::open(&keys).unwrap();
    assert_eq!(m.add(600).unwrap(), 600);
    assert!(VolumeMeter::warning(600, 1000).is_none());
    let mut m = VolumeMeter::open(&keys).unwrap();
    assert_eq!(m.tokens(), 600);
    let total = m.add(600).unwrap();
    let w = VolumeMeter::warning(total, 1000).unwrap();
    assert!(w.contains("1200") && w.contains("fedee ee rotate"), "{w}");
    std::fs::write(dir.path().join("keys.json.usage.json"), "{").unwrap();
    assert!(VolumeMeter::open(&keys).is_err());
}

#[test]
fn embedding_rows_give_the_vocabulary_permutation_whatever_the_residual_key() {
    // A public table E (500 tokens × 32) and E' = P_π E K for K a signed permutation and an
    // orthogonal matrix: descriptions K does not change find π; descriptions it does change
    // (the signed-permutation description under an orthogonal K) do not.
    tch::manual_seed(3);
    let (v, d) = (500i64, 32i64);
    let e = Tensor::randn([v, d], (Kind::Float, Device::Cpu));
    let pi = Tensor::randperm(v, (Kind::Int64, Device::Cpu));
    let mut rows = Tensor::zeros_like(&e);
    let _ = rows.index_copy_(0, &pi, &e);
    let signs = (Tensor::randint(2, [d], (Kind::Float, Device::Cpu)) * 2.0 - 1.0)
        * Tensor::eye(d, (Kind::Float, Device::Cpu));
    let perm = Tensor::eye(d, (Kind::Float, Device::Cpu))
        .index_select(0, &Tensor::randperm(d, (Kind::Int64, Device::Cpu)));
    let signed = rows.matmul(&signs.matmul(&perm));
    let (q, _) = Tensor::linalg_qr(
        &Tensor::randn([d, d], (Kind::Double, Device::Cpu)),
        "reduced",
    );
    let orthogonal = rows.matmul(&q.to_kind(Kind::Float));
    let truth: Vec<i64> = Vec::try_from(&pi).unwrap();
    let share = |guess: Vec<i64>| {
        (0..v as usize)
            .filter(|&i| guess[truth[i] as usize] == i as i64)
            .count() as f64
            / v as f64
    };
    let by_abs = |t: &Tensor| {
        matching::nearest_rows(
            &matching::sorted_abs_rows(t, 16),
            &matching::sorted_abs_rows(&e, 16),
        )
    };
    let by_gram = |t: &Tensor| {
        matching::nearest_rows(
            &matching::gram_profile(t, 16),
            &matching::gram_profile(&e, 16),
        )
    };
    assert_eq!(share(by_abs(&signed)), 1.0);
    assert_eq!(share(by_gram(&orthogonal)), 1.0);
    assert!(share(by_abs(&orthogonal)) < 0.1);
}
