//! The key holder's side of the EE causal LM: its keys, the EE model it uploads, and token
//! ids encrypted on the way out and decrypted on the way back.
//!
//! Under the Llama key spec the vocabulary key π is a permutation of token ids: the prompt
//! goes out as `π(id)`, the trainer's sampled ids come back as `π(token)` (its logits are
//! permuted alike, and sampling ranks by value), and `π⁻¹` recovers the text. Both tables are
//! built once, so a token costs two array lookups.
//!
//! # Security
//! The key file, the GGUF's plaintext weights, prompts and answers stay in this process. The
//! trainer receives the EE weights, encrypted ids and sampling settings. With SmolLM2's public
//! weights the trainer can undo π by matching embedding rows (SECURITY.md): for this model EE
//! hides little from a server that knows the base weights.

use std::path::Path;

use fedee_encrypt::{KeySet, KeySpec, StateDict, encrypt_token_ids, transform_state};
use fedee_model::chat::LmTokenizer;
use fedee_model::gguf::{self, GgufModel, RopeLayout};
use fedee_model::llama::LlamaConfig;
use fedee_model::{Architecture, OptimizerSpec};
use fedee_trainer::TrainerClient;
use tch::Tensor;

use crate::{KeyHolderError, Result};

/// Control tokens that end an assistant's turn in common chat templates, besides the
/// model's end-of-sequence token.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"];

/// A causal LM's tokenizer and the key holder's vocabulary tables.
pub struct LmKeys {
    /// The model's architecture.
    pub config: LlamaConfig,
    /// Tokenizer and chat template from the GGUF file.
    pub tokenizer: LmTokenizer,
    spec: KeySpec,
    keys: KeySet,
    /// `enc[id] = π(id)`.
    enc: Vec<i64>,
    /// `dec[π(id)] = id`.
    dec: Vec<u32>,
    /// Plaintext ids that end a turn.
    stop: Vec<u32>,
}

impl LmKeys {
    /// The tables of `keys` for the model `m`.
    ///
    /// # Errors
    /// [`KeyHolderError::Mismatch`] when the keys are for another architecture or another
    /// vocabulary or shape (naming both); tokenizer errors as [`KeyHolderError::Model`].
    pub fn new(m: &GgufModel, keys: KeySet) -> Result<Self> {
        let spec = m.config.key_spec();
        if keys.architecture != spec.architecture {
            return Err(KeyHolderError::Mismatch(format!(
                "the keys are for a `{}` model, not a causal LM: generate keys with `fedee ee keygen --gguf MODEL`",
                keys.architecture
            )));
        }
        keys.check(&spec).map_err(|e| {
            KeyHolderError::Mismatch(format!(
                "the keys do not fit this model ({e}): generate keys for it with `fedee ee keygen --gguf MODEL`"
            ))
        })?;
        let tokenizer = LmTokenizer::from_gguf(m)?;
        let v = m.config.vocab_size as i64;
        let enc: Vec<i64> = Vec::try_from(encrypt_token_ids(
            &spec,
            &keys,
            &Tensor::arange(v, tch::kind::INT64_CPU),
        )?)?;
        let mut dec = vec![0u32; enc.len()];
        for (id, &e) in enc.iter().enumerate() {
            dec[e as usize] = id as u32;
        }
        let mut stop = vec![tokenizer.eos_id];
        stop.extend(END_OF_TURN.iter().filter_map(|t| tokenizer.token_id(t)));
        stop.sort_unstable();
        stop.dedup();
        Ok(Self {
            config: m.config.clone(),
            tokenizer,
            spec,
            keys,
            enc,
            dec,
            stop,
        })
    }

    /// `π(id)` for each id.
    ///
    /// # Panics
    /// For an id outside the vocabulary (the tokenizer only produces ids inside it).
    pub fn encrypt_ids(&self, ids: &[u32]) -> Vec<i64> {
        ids.iter().map(|&i| self.enc[i as usize]).collect()
    }

    /// `π⁻¹(id)`.
    ///
    /// # Errors
    /// [`KeyHolderError::Mismatch`] for an id outside the vocabulary (a faulty or hostile
    /// server).
    pub fn decrypt_id(&self, id: i64) -> Result<u32> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.dec.get(i).copied())
            .ok_or_else(|| {
                KeyHolderError::Mismatch(format!(
                    "the trainer returned token id {id}, outside the vocabulary of {}",
                    self.dec.len()
                ))
            })
    }

    /// The encrypted ids that end a turn (end of sequence, `<|im_end|>`, …).
    pub fn stop_ids(&self) -> Vec<i64> {
        self.encrypt_ids(&self.stop)
    }

    /// Whether the plaintext `id` ends a turn.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop.contains(&id)
    }

    /// The EE model of `state` (the plaintext weights of this model).
    ///
    /// # Errors
    /// As [`transform_state`].
    pub fn encrypt_model(&self, state: &StateDict) -> Result<StateDict> {
        Ok(transform_state(&self.spec, &self.keys, state)?)
    }

    /// The architecture a trainer job of this model declares.
    pub fn architecture(&self) -> Architecture {
        Architecture::Llama(self.config.clone())
    }
}

/// Load the GGUF file `gguf` and the key file `keys`.
///
/// # Errors
/// Unreadable or malformed files, or keys that do not fit the model.
pub fn open(gguf: &Path, keys: &Path) -> Result<(GgufModel, LmKeys)> {
    let m = gguf::load(gguf, RopeLayout::HalfSplit)?;
    let keys = KeySet::load(keys)?;
    let lm = LmKeys::new(&m, keys)?;
    Ok((m, lm))
}

/// Encrypt `m` with `lm`'s keys and upload it to the trainer as a job; returns the job id.
/// The job's optimizer (AdamW, lr 1e-5) only matters if it is later trained.
///
/// # Errors
/// As [`LmKeys::encrypt_model`] and [`TrainerClient::create_job`].
pub async fn upload(client: &mut TrainerClient, m: &GgufModel, lm: &LmKeys) -> Result<String> {
    let ee = lm.encrypt_model(&m.state)?;
    let bytes = fedee_model::state_to_safetensors(&ee)?;
    drop(ee);
    let optimizer = OptimizerSpec::AdamW {
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    Ok(client
        .create_job(&lm.architecture(), &optimizer, "f32", &bytes)
        .await?)
}
