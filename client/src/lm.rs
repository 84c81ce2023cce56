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

    /// A token batch `(input_ids, attention_mask)` encrypted for the trainer (safetensors
    /// bytes, [`fedee_model::batch_to_safetensors`]): the ids under π, the mask as is. The
    /// causal LM loss is unchanged by π, so the trainer's losses are the plaintext ones.
    ///
    /// # Errors
    /// As [`encrypt_token_ids`].
    pub fn encrypt_batch(&self, ids: &Tensor, mask: &Tensor) -> Result<Vec<u8>> {
        let input = fedee_model::Input::Tokens {
            ids: encrypt_token_ids(&self.spec, &self.keys, ids)?,
            mask: mask.shallow_clone(),
        };
        Ok(fedee_model::batch_to_safetensors(&input, None)?)
    }

    /// The plaintext model of an EE model made with these keys (e.g. one fine-tuned at the
    /// trainer and exported).
    ///
    /// # Errors
    /// As [`fedee_encrypt::decrypt_state`].
    pub fn decrypt_model(&self, ee: &StateDict) -> Result<StateDict> {
        Ok(fedee_encrypt::decrypt_state(&self.spec, &self.keys, ee)?)
    }

    /// Refuse keys under which training with `optimizer` would not stay exact (the
    /// `inference` profile's dense and scaled keys).
    ///
    /// # Errors
    /// [`fedee_encrypt::EncryptError::NotEquivariant`] naming the key.
    pub fn check_trainable(&self, optimizer: &OptimizerSpec) -> Result<()> {
        Ok(fedee_encrypt::check_trainable(
            &self.spec,
            &self.keys,
            optimizer.family(),
        )?)
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

/// Encrypt `state` (the plaintext weights of `lm`'s model) with `lm`'s keys and upload it to
/// the trainer as a job computing in `dtype` (`f32` or `f64`); returns the job id. The
/// optimizer is the one the job trains with; `None` (a job that only serves) records AdamW
/// with lr 1e-5.
///
/// # Errors
/// As [`LmKeys::encrypt_model`] and [`TrainerClient::create_job`].
pub async fn upload(
    client: &mut TrainerClient,
    state: &StateDict,
    lm: &LmKeys,
    optimizer: Option<&OptimizerSpec>,
    dtype: &str,
) -> Result<String> {
    let ee = lm.encrypt_model(state)?;
    let bytes = fedee_model::state_to_safetensors(&ee)?;
    drop(ee);
    let serving = OptimizerSpec::AdamW {
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    Ok(client
        .create_job(
            &lm.architecture(),
            optimizer.unwrap_or(&serving),
            dtype,
            &bytes,
        )
        .await?)
}

/// Token batches for causal LM fine-tuning: each text tokenized as is (no chat template),
/// ended with the end-of-sequence token and cut to `seq_len` tokens; `batch` texts per batch,
/// right-padded (mask 0) to the batch's longest row. Texts shorter than 2 tokens are skipped.
/// Returns `(input_ids, attention_mask)` pairs, `(batch, width)` i64 each.
///
/// # Errors
/// [`KeyHolderError::Mismatch`] for `batch` or `seq_len` too small; tokenizer errors.
pub fn text_batches(
    tokenizer: &LmTokenizer,
    texts: &[String],
    batch: usize,
    seq_len: usize,
) -> Result<Vec<(Tensor, Tensor)>> {
    if batch == 0 || seq_len < 2 {
        return Err(KeyHolderError::Mismatch(format!(
            "batch size {batch} and sequence length {seq_len}: need at least 1 and 2"
        )));
    }
    let mut rows = Vec::new();
    for t in texts {
        let mut ids = tokenizer.encode(t)?;
        ids.push(tokenizer.eos_id);
        ids.truncate(seq_len);
        if ids.len() >= 2 {
            rows.push(ids);
        }
    }
    Ok(rows
        .chunks(batch)
        .map(|chunk| {
            let width = chunk.iter().map(Vec::len).max().unwrap_or(0);
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            for r in chunk {
                ids.extend(r.iter().map(|&i| i64::from(i)));
                ids.extend(std::iter::repeat_n(
                    i64::from(tokenizer.eos_id),
                    width - r.len(),
                ));
                mask.extend(std::iter::repeat_n(1i64, r.len()));
                mask.extend(std::iter::repeat_n(0i64, width - r.len()));
            }
            let shape = [chunk.len() as i64, width as i64];
            (
                Tensor::from_slice(&ids).view(shape),
                Tensor::from_slice(&mask).view(shape),
            )
        })
        .collect())
}

/// The texts of column `column` of a CSV or TSV file (tab-separated when the name ends in
/// `.tsv`), HTML entities decoded and surrounding quotes trimmed; empty cells skipped.
///
/// # Errors
/// An unreadable file, or no such column (naming the columns there).
pub fn read_texts(path: &Path, column: &str) -> Result<Vec<String>> {
    let io = |e: csv::Error| KeyHolderError::Csv {
        path: path.to_owned(),
        source: e,
    };
    let tsv = path.extension().is_some_and(|e| e == "tsv");
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(if tsv { b'\t' } else { b',' })
        .from_path(path)
        .map_err(io)?;
    let headers = rdr.headers().map_err(io)?.clone();
    let col = headers.iter().position(|h| h == column).ok_or_else(|| {
        KeyHolderError::Mismatch(format!(
            "{} has no column `{column}`; its columns are {:?}: pass one with --text-column",
            path.display(),
            headers.iter().collect::<Vec<_>>()
        ))
    })?;
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(io)?;
        let t = rec.get(col).unwrap_or("").trim().trim_matches('"').trim();
        if !t.is_empty() {
            out.push(html_escape::decode_html_entities(t).into_owned());
        }
    }
    Ok(out)
}
