//! Tokenization for BERT models with the Hugging Face `tokenizers` crate (the model's own
//! `tokenizer.json`), without padding to a fixed length: batches are padded to their longest
//! sequence here, with id 0 and attention mask 0.

use std::path::Path;

use tch::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

use crate::ModelError;

/// A tokenizer producing `(batch, seq)` id and mask tensors.
pub struct TextTokenizer {
    inner: Tokenizer,
    max_len: usize,
}

impl TextTokenizer {
    /// Load `tokenizer.json`, truncating to `max_len` tokens (special tokens included).
    ///
    /// # Errors
    /// [`ModelError::Config`] if the file cannot be loaded.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, ModelError> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| {
            ModelError::Config(format!("cannot load tokenizer {}: {e}", path.display()))
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Config(format!("tokenizer truncation: {e}")))?;
        Ok(Self { inner, max_len })
    }

    /// Longest sequence produced.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of one text (with `[CLS]` and `[SEP]`).
    ///
    /// # Errors
    /// [`ModelError::Config`] if the tokenizer fails.
    pub fn ids(&self, text: &str) -> Result<Vec<i64>, ModelError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Config(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// `(ids, mask)`, each `(batch, longest)` int64, for `texts`.
    ///
    /// # Errors
    /// As [`TextTokenizer::ids`].
    pub fn batch(&self, texts: &[&str]) -> Result<(Tensor, Tensor), ModelError> {
        let seqs: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| self.ids(t))
            .collect::<Result<_, _>>()?;
        Ok(pad(&seqs))
    }
}

/// Pad sequences to the longest with id 0 / mask 0: `(batch, longest)` int64 each.
pub fn pad(seqs: &[Vec<i64>]) -> (Tensor, Tensor) {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; seqs.len() * t];
    let mut mask = vec![0i64; seqs.len() * t];
    for (r, s) in seqs.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
        mask[r * t..r * t + s.len()].iter_mut().for_each(|m| *m = 1);
    }
    let shape = [seqs.len() as i64, t as i64];
    (
        Tensor::from_slice(&ids).reshape(shape),
        Tensor::from_slice(&mask).reshape(shape),
    )
}
