//! EE for the causal LM (SmolLM2-135M-Instruct): the server runs prefill and 16 greedy decode
//! steps on encrypted token ids with the EE model; after π⁻¹ its logits equal the plaintext
//! model's and its tokens decrypt to the same text, for each key part alone and all combined.
//! Negative control: RMSNorm weights under the signed key (not its permutation) break it.

use std::path::PathBuf;

use fedee_encrypt::{
    Key, KeyMaterial, KeySet, decrypt_labels, decrypt_outputs, encrypt_token_ids, transform_state,
};
use fedee_model::gguf::{self, RopeLayout};
use fedee_model::keyspec::KeySpec;
use fedee_model::{Profile, llama};
use rand::SeedableRng;
use tch::Tensor;

const STEPS: usize = 17;

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run `make data`", p.display());
    p
}

fn identity(k: &Key) -> Key {
    Key {
        name: k.name.clone(),
        dim: k.dim,
        material: KeyMaterial::Permutation {
            perm: (0..k.dim as i64).collect(),
        },
    }
}

/// `full` with every key `keep` rejects replaced by the identity.
fn only(full: &KeySet, keep: impl Fn(&str) -> bool) -> KeySet {
    let mut k = full.clone();
    for (name, key) in k.keys.iter_mut() {
        if !keep(name) {
            *key = identity(key);
        }
    }
    k
}

/// Greedy tokens (decrypted) and the largest |decrypted EE logit − plaintext logit|.
fn run_ee(
    m: &gguf::GgufModel,
    spec: &KeySpec,
    keys: &KeySet,
    prompt: &[i64],
    plain: &[Tensor],
) -> (Vec<i64>, f64) {
    let ee = transform_state(spec, keys, &m.state).unwrap();
    let s = m.config.check_state(&ee).unwrap();
    let enc = encrypt_token_ids(spec, keys, &Tensor::from_slice(prompt)).unwrap();
    let enc: Vec<i64> = Vec::try_from(&enc).unwrap();
    let (tokens, logits) = llama::greedy(&m.config, s, &enc, STEPS, None).unwrap();
    let tokens = decrypt_labels(spec, keys, &Tensor::from_slice(&tokens)).unwrap();
    let mut worst = 0f64;
    for (e, p) in logits.iter().zip(plain) {
        let d = decrypt_outputs(spec, keys, e).unwrap();
        worst = worst.max((d - p).abs().max().double_value(&[]));
    }
    (Vec::try_from(&tokens).unwrap(), worst)
}

#[test]
fn ee_logits_and_greedy_tokens_equal_plaintext_for_each_key_part() {
    tch::set_num_threads(2);
    let _guard = tch::no_grad_guard();
    let m = gguf::load(&model_path(), RopeLayout::HalfSplit).unwrap();
    let tok = fedee_model::chat::LmTokenizer::from_gguf(&m).unwrap();
    let chat = tok
        .render_chat(
            &[fedee_model::chat::ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    let prompt: Vec<i64> = tok
        .encode(&chat)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let s = m.config.check_state(&m.state).unwrap();
    let (plain_tokens, plain_logits) = llama::greedy(&m.config, s, &prompt, STEPS, None).unwrap();

    let spec = m.config.key_spec();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(20);
    let full = KeySet::generate(
        &spec,
        &m.config.key_groups(Profile::Finetune),
        false,
        &mut rng,
    )
    .unwrap();
    full.check(&spec).unwrap();
    type Keep<'a> = &'a dyn Fn(&str) -> bool;
    let attention = |n: &str| {
        ["qk", "q", "vo", "o"]
            .iter()
            .any(|p| n.strip_prefix(p).is_some_and(|r| r.parse::<u32>().is_ok()))
    };
    // Each part of a key set alone (the others replaced by the identity): the plaintext tokens
    // and logits within 1e-4.
    let check = |keyset: &KeySet, parts: &[(&str, Keep)]| {
        for &(label, keep) in parts {
            let keys = only(keyset, keep);
            let (tokens, err) = run_ee(&m, &spec, &keys, &prompt, &plain_logits);
            eprintln!(
                "{label}: max |logit − plaintext| over prefill + {} decode steps: {err:.2e}",
                STEPS - 1
            );
            assert_eq!(tokens, plain_tokens, "{label}");
            assert!(err <= 1e-4, "{label}: {err}");
        }
    };
    let parts: [(&str, Keep); 5] = [
        ("vocabulary π", &|n| n == "vocab"),
        ("residual signed permutation", &|n| n == "residual"),
        ("FFN permutations", &|n| n.starts_with("ffn")),
        (
            "attention heads (KV groups, query heads within them, V/O inside heads)",
            &attention,
        ),
        ("all combined", &|_| true),
    ];
    check(&full, &parts);
    // The inference profile: RoPE-commuting complex factors on Q/K, invertible V/O blocks per
    // KV head, scaled FFN units; each new part alone, then all keys.
    let inference = KeySet::generate(
        &spec,
        &m.config.key_groups(Profile::Inference),
        false,
        &mut rng,
    )
    .unwrap();
    inference.check(&spec).unwrap();
    // Attention keys of a layer share head permutations, so they are tested together.
    let parts: [(&str, Keep); 3] = [
        (
            "inference: attention (RoPE-commuting Q/K factors, invertible V/O blocks)",
            &attention,
        ),
        ("inference: FFN scaling", &|n| n.starts_with("ffn")),
        ("inference: all combined", &|_| true),
    ];
    check(&inference, &parts);

    // The EE model is not the plaintext one: the prompt ids and weights changed.
    let ee = transform_state(&spec, &full, &m.state).unwrap();
    for name in [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.attn_v.weight",
        "blk.0.attn_output.weight",
        "blk.0.ffn_down.weight",
        "output_norm.weight",
    ] {
        assert!(
            !ee[name].allclose(&m.state[name], 1e-6, 1e-6, false),
            "{name} unchanged"
        );
    }
    let enc = encrypt_token_ids(&spec, &full, &Tensor::from_slice(&prompt)).unwrap();
    assert_ne!(Vec::<i64>::try_from(&enc).unwrap(), prompt);

    // Negative control: RMSNorm weights transformed by the signed key itself.
    let mut signed = spec.clone();
    for axes in signed.params.values_mut() {
        for a in axes.iter_mut().flatten() {
            a.permutation = false;
        }
    }
    let keys = only(&full, |n| n == "residual");
    let (tokens, err) = run_ee(&m, &signed, &keys, &prompt, &plain_logits);
    eprintln!("signed RMSNorm weights: max logit error {err:.2}");
    assert!(err > 1.0 && tokens != plain_tokens, "error {err}");

    // Negative control: an orthogonal residual key without folding RMSNorm's γ into the next
    // maps (γ is then rotated like a vector).
    let mut orthogonal = spec.clone();
    orthogonal
        .keys
        .get_mut("residual")
        .unwrap()
        .allowed
        .push(fedee_model::keyspec::KeyGroup::Orthogonal);
    let groups = std::collections::BTreeMap::from([(
        "residual".to_owned(),
        fedee_model::keyspec::KeyGroup::Orthogonal,
    )]);
    let keys = KeySet::generate(&orthogonal, &groups, false, &mut rng).unwrap();
    let keys = only(&keys, |n| n == "residual");
    let (tokens, err) = run_ee(&m, &orthogonal, &keys, &prompt, &plain_logits);
    eprintln!("unfolded orthogonal residual key: max logit error {err:.2}");
    assert!(err > 1.0 && tokens != plain_tokens, "error {err}");

    // Negative control: Q/K keys that permute inside a head move RoPE pairs.
    let head_control =
        |label: &str, edit: &dyn Fn(&mut fedee_model::keyspec::Heads), refusal: &str| {
            let mut wrong = spec.clone();
            for d in wrong.keys.values_mut() {
                if let Some(h) = d.heads.as_mut() {
                    edit(h);
                }
            }
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(21);
            let keys = KeySet::generate(
                &wrong,
                &m.config.key_groups(Profile::Finetune),
                false,
                &mut rng,
            )
            .unwrap();
            let keys = only(&keys, attention);
            let e = transform_state(&spec, &keys, &m.state)
                .unwrap_err()
                .to_string();
            assert!(e.contains(refusal), "{label}: {e}");
            let (tokens, err) = run_ee(&m, &wrong, &keys, &prompt, &plain_logits);
            eprintln!("{label}: max logit error {err:.2}");
            assert!(err > 1.0 && tokens != plain_tokens, "{label}: error {err}");
        };
    head_control(
        "RoPE pairs permuted inside heads",
        &|h| h.rotary = false,
        "rotary head",
    );
    // Negative control: query heads permuted freely, across KV groups (heads move whole, so
    // only the grouping is wrong).
    head_control(
        "query heads moved across KV groups",
        &|h| {
            h.rotary = true;
            h.follows = None;
        },
        "out of the group",
    );
}
