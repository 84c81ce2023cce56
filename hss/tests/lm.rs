//! HSS-EE for the causal LM (SmolLM2-135M-Instruct, inference key profile): greedy decoding
//! with every linear map (Q/K/V, attention output, gate/up, down, the tied head) at two
//! in-process servers on ring shares gives the plain EE model's tokens, with logits within the
//! fixed-point error.

use std::path::PathBuf;

use fedee_encrypt::{KeySet, decrypt_labels, encrypt_token_ids, transform_state};
use fedee_hss::client::{HssClient, InProcess, llama_linear_maps, lm_greedy, offloaded};
use fedee_hss::engine::Engine;
use fedee_hss::server::HssModel;
use fedee_model::gguf::{self, RopeLayout};
use fedee_model::{Profile, llama};
use rand::SeedableRng;
use tch::{Device, Tensor};

const STEPS: usize = 16;

#[test]
fn hss_greedy_decoding_gives_the_plain_ee_tokens() {
    tch::set_num_threads(2);
    let _guard = tch::no_grad_guard();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `make data`",
        path.display()
    );
    let m = gguf::load(&path, RopeLayout::HalfSplit).unwrap();
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
    let c = m.config;
    let spec = c.key_spec();
    let keys = KeySet::generate(
        &spec,
        &c.key_groups(Profile::Inference),
        false,
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(21),
    )
    .unwrap();
    let ee = transform_state(&spec, &keys, &m.state).unwrap();
    let s = c.check_state(&ee).unwrap();
    let enc: Vec<i64> =
        Vec::try_from(&encrypt_token_ids(&spec, &keys, &Tensor::from_slice(&prompt)).unwrap())
            .unwrap();
    let (ee_tokens, ee_logits) = llama::greedy(&c, s, &enc, STEPS, None).unwrap();

    let off = offloaded(&llama_linear_maps(&c), &ee);
    let servers = [
        HssModel::from_state(&off, Engine::Limbs(Device::Cpu)).unwrap(),
        HssModel::from_state(&off, Engine::Limbs(Device::Cpu)).unwrap(),
    ];
    let mut client =
        HssClient::new(InProcess::new([&servers[0], &servers[1]], false), &off).unwrap();
    let (tokens, logits) = lm_greedy(&mut client, &c, s, &enc, STEPS, None).unwrap();
    let worst = logits
        .iter()
        .zip(&ee_logits)
        .map(|(a, b)| (a - b).abs().max().double_value(&[]))
        .fold(0f64, f64::max);
    let span = ee_logits[0].abs().max().double_value(&[]);
    let text = |t: &[i64]| {
        let d: Vec<i64> =
            Vec::try_from(&decrypt_labels(&spec, &keys, &Tensor::from_slice(t)).unwrap()).unwrap();
        tok.decode(&d.iter().map(|v| *v as u32).collect::<Vec<_>>(), false)
            .unwrap_or_default()
    };
    eprintln!(
        "HSS-EE vs plain EE over prefill + {} decode steps: max |Δ logit| {worst:.2e} (logits up to {span:.1}); {} round trips, {:.1} MB; text: {:?}",
        STEPS - 1,
        client.traffic.round_trips,
        (client.traffic.bytes_up + client.traffic.bytes_down) as f64 / 1e6,
        text(&tokens)
    );
    assert_eq!(tokens, ee_tokens);
    assert!(worst < 0.05 && worst > 0.0, "{worst}");
    // One prefill and STEPS − 1 decode forwards, each 4 round trips per block and one for
    // the head.
    assert_eq!(
        client.traffic.round_trips,
        (STEPS as u64) * (4 * c.num_layers as u64 + 1)
    );
}
