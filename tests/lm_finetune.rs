//! Encrypted fine-tuning of the causal LM at the trainer: SmolLM2's real weights (its first
//! two blocks, so that f64 training fits a test) fine-tuned for 20 AdamW steps on Drugs.com
//! patient reviews, once in plaintext here and once at the trainer on the EE model
//! (`finetune` profile keys) with encrypted token batches. The decrypted result equals
//! plaintext training, the losses are the same at every step, and the fine-tuned EE job
//! answers (through Generate) with the tokens the plaintext fine-tuned model picks.

use std::path::PathBuf;

use fedee_client::lm::{LmKeys, text_batches, upload};
use fedee_encrypt::KeySet;
use fedee_model::gguf::{self, GgufModel, RopeLayout};
use fedee_model::llama::{self, LlamaConfig};
use fedee_model::{Architecture, Input, Model, OptimizerSpec, Profile};
use fedee_proto::v1::GenerateRequest;
use fedee_trainer::TrainerClient;
use rand::SeedableRng;
use tch::{Device, Kind};
use tokio_util::sync::CancellationToken;

const LAYERS: usize = 2;
const STEPS: usize = 20;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// SmolLM2 with only its first `LAYERS` blocks (real weights throughout).
fn truncated() -> GgufModel {
    let path = root().join("data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `make data`",
        path.display()
    );
    let mut m = gguf::load(&path, RopeLayout::HalfSplit).unwrap();
    m.config = LlamaConfig {
        num_layers: LAYERS,
        ..m.config
    };
    let keep = m.config.shapes();
    m.state.retain(|name, _| keep.contains_key(name));
    m
}

/// The first reviews of the Drugs.com training file, with their condition.
fn reviews(n: usize) -> Vec<String> {
    let path = root().join("data/cache/drugs/drugsComTrain.tsv");
    fedee_lab::drugs::load(&path)
        .unwrap()
        .into_iter()
        .take(n)
        .map(|r| format!("Condition: {}. Review: {}", r.condition, r.text))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_encrypted_adamw_steps_at_the_trainer_equal_plaintext_training() {
    tch::set_num_threads(2);
    let m = truncated();
    let keys = KeySet::generate(
        &m.config.key_spec(),
        &m.config.key_groups(Profile::Finetune),
        false,
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(11),
    )
    .unwrap();
    let lm = LmKeys::new(&m, keys).unwrap();
    let batches = text_batches(&lm.tokenizer, &reviews(2 * STEPS), 2, 32).unwrap();
    assert_eq!(batches.len(), STEPS);
    assert!(
        batches
            .iter()
            .any(|(_, mask)| mask.min().int64_value(&[]) == 0),
        "some batch should be padded"
    );
    let optimizer = OptimizerSpec::AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };

    // Plaintext fine-tuning, f64.
    let arch = Architecture::Llama(m.config.clone());
    let mut plain = Model::from_state(arch, &m.state, Device::Cpu, Kind::Double).unwrap();
    let mut opt = plain.optimizer(&optimizer).unwrap();
    let plain_losses: Vec<f64> = batches
        .iter()
        .map(|(ids, mask)| {
            let input = Input::Tokens {
                ids: ids.shallow_clone(),
                mask: mask.shallow_clone(),
            };
            plain.train_step_causal(&mut opt, &input).unwrap()
        })
        .collect();
    assert!(
        plain_losses[STEPS - 1] < plain_losses[0],
        "training should lower the loss: {plain_losses:?}"
    );

    // The same at the trainer, on the EE model and encrypted batches.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let trainer = tokio::spawn(fedee_trainer::run(
        fedee_trainer::Config::default(),
        listener,
        stop.clone(),
    ));
    let mut client = TrainerClient::connect(&format!("http://{addr}"), None)
        .await
        .unwrap();
    let job = upload(&mut client, &m.state, &lm, Some(&optimizer), "f64")
        .await
        .unwrap();
    let encrypted: Vec<Vec<u8>> = batches
        .iter()
        .map(|(ids, mask)| lm.encrypt_batch(ids, mask).unwrap())
        .collect();
    let ee_losses = client.train(&job, encrypted, |_, _| ()).await.unwrap();
    let bytes = client.export_model(&job).await.unwrap();
    let ee = fedee_model::state_from_safetensors(&bytes, Device::Cpu).unwrap();
    let decrypted = lm.decrypt_model(&ee).unwrap();

    // Losses: the causal LM loss is invariant under π.
    for (s, (a, b)) in plain_losses.iter().zip(&ee_losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-9 * a.abs(),
            "step {s}: plaintext {a}, EE {b}"
        );
    }
    // Weights: largest |difference| relative to the tensor's largest |weight|.
    let trained = plain.state();
    let worst = fedee_model::state::largest_relative_difference(&decrypted, &trained);
    // Training moved the weights by much more than that.
    let moved = (&trained["blk.0.attn_q.weight"]
        - m.state["blk.0.attn_q.weight"].to_kind(Kind::Double))
    .abs()
    .max()
    .double_value(&[]);
    eprintln!(
        "losses {:.4} -> {:.4}; max relative weight difference {:.2e} ({}); attn_q moved by {moved:.2e}",
        plain_losses[0],
        plain_losses[STEPS - 1],
        worst.0,
        worst.1
    );
    assert!(worst.0 <= 1e-4, "{worst:?}");
    assert!(moved > 1e-4, "{moved}");

    // The fine-tuned EE job answers: greedy tokens decrypt to the plaintext fine-tuned model's.
    let prompt: Vec<u32> = lm.tokenizer.encode("Condition: Migraine. Review:").unwrap();
    let ids: Vec<i64> = prompt.iter().map(|&i| i64::from(i)).collect();
    let (want, _) = tch::no_grad(|| {
        let (c, s) = plain.llama().unwrap();
        llama::greedy(c, s, &ids, 8, None)
    })
    .unwrap();
    let mut stream = client
        .generate(GenerateRequest {
            job_id: job.clone(),
            prompt_ids: lm.encrypt_ids(&prompt),
            max_tokens: 8,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut got = vec![];
    while let Some(t) = stream.message().await.unwrap() {
        got.push(i64::from(lm.decrypt_id(t.token_id).unwrap()));
    }
    assert_eq!(got, want);
    stop.cancel();
    let _ = trainer.await;
}
