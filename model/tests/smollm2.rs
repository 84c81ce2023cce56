//! SmolLM2-135M-Instruct from its GGUF file against Hugging Face transformers loading the same
//! file (`tests/fixtures/smollm2_reference.json`, made by `scripts/smollm2_reference.py`):
//! tokenizer ids, the chat template, greedy tokens, and logits over the prompt and 16 decode
//! steps.

use std::path::PathBuf;

use fedee_model::chat::{ChatMessage, LmTokenizer};
use fedee_model::gguf::{self, RopeLayout};
use fedee_model::llama;
use serde::Deserialize;

#[derive(Deserialize)]
struct Text {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Step {
    top_ids: Vec<i64>,
    top_logits: Vec<f64>,
    subset_logits: Vec<f64>,
    logsumexp: f64,
}

#[derive(Deserialize)]
struct Reference {
    texts: Vec<Text>,
    messages: Vec<ChatMessage>,
    chat: String,
    prompt_ids: Vec<i64>,
    generated_ids: Vec<i64>,
    subset_ids: Vec<i64>,
    steps: Vec<Step>,
}

fn reference() -> Reference {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run `make data`", p.display());
    p
}

/// Largest |logit − reference| over each step's top-32 and 512 fixed ids, and over the
/// log-sum-exp of the whole vocabulary.
fn max_logit_error(r: &Reference, steps: &[tch::Tensor]) -> f64 {
    let mut worst = 0f64;
    for (s, got) in r.steps.iter().zip(steps) {
        let got: Vec<f64> = Vec::try_from(got.to_kind(tch::Kind::Double)).unwrap();
        for (ids, want) in [
            (&s.top_ids, &s.top_logits),
            (&r.subset_ids, &s.subset_logits),
        ] {
            for (&i, &w) in ids.iter().zip(want) {
                worst = worst.max((got[i as usize] - w).abs());
            }
        }
        let m = got.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + got.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        worst = worst.max((lse - s.logsumexp).abs());
    }
    worst
}

#[test]
fn tokenizer_and_chat_template_match_the_reference() {
    let r = reference();
    let m = gguf::load(&model_path(), RopeLayout::HalfSplit).unwrap();
    let tok = LmTokenizer::from_gguf(&m).unwrap();
    for t in &r.texts {
        assert_eq!(tok.encode(&t.text).unwrap(), t.ids, "{:?}", t.text);
        assert_eq!(tok.decode(&t.ids, true).unwrap(), t.text);
    }
    let chat = tok.render_chat(&r.messages, true).unwrap();
    assert_eq!(chat, r.chat);
    let ids: Vec<i64> = tok
        .encode(&chat)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(ids, r.prompt_ids);
    assert_eq!(tok.eos_id, 2);
    // A truncated file is an error naming the problem, not a panic.
    let bytes = std::fs::read(model_path()).unwrap();
    for cut in [10, 4096, bytes.len() / 2, bytes.len() - 1] {
        let e = gguf::from_bytes(&bytes[..cut], RopeLayout::HalfSplit)
            .err()
            .unwrap_or_else(|| panic!("{cut} bytes accepted"));
        assert!(e.contains("GGUF") || e.contains("tensor"), "{cut}: {e}");
    }
}

#[test]
fn greedy_tokens_and_logits_match_transformers_and_the_wrong_rope_layout_does_not() {
    tch::set_num_threads(2);
    let r = reference();
    let _guard = tch::no_grad_guard();
    let m = gguf::load(&model_path(), RopeLayout::HalfSplit).unwrap();
    let s = m.config.check_state(&m.state).unwrap();
    let steps = r.steps.len();
    let (tokens, logits) = llama::greedy(&m.config, s, &r.prompt_ids, steps, None).unwrap();
    assert_eq!(tokens, r.generated_ids);
    let err = max_logit_error(&r, &logits);
    eprintln!(
        "max |logit − transformers| over prefill + {} decode steps: {err:.2e}",
        steps - 1
    );
    assert!(err <= 1e-3, "max logit error {err}");

    // llama.cpp's interleaved Q/K rows read as half-split pairs: the model breaks.
    let wrong = gguf::load(&model_path(), RopeLayout::AsStored).unwrap();
    let s = wrong.config.check_state(&wrong.state).unwrap();
    let (tokens, logits) = llama::greedy(&wrong.config, s, &r.prompt_ids, steps, None).unwrap();
    let err = max_logit_error(&r, &logits);
    eprintln!("with the stored RoPE layout: max logit error {err:.2}");
    assert!(err > 1.0 && tokens != r.generated_ids, "error {err}");
}
