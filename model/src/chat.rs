//! The causal LM's tokenizer and chat template, built from a GGUF file's metadata.
//!
//! Tokenizer (the `tokenizers` crate): byte-level BPE over the file's vocabulary and merges;
//! pre-tokenization splits digits one by one, then GPT-2's byte-level regex without a prefix
//! space; control tokens (llama.cpp token type 3, e.g. `<|im_start|>`) are special tokens,
//! matched whole in the text. The chat template is the file's Jinja template, rendered by
//! `minijinja`.

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::ModelError;
use crate::gguf::GgufModel;

/// llama.cpp's token type of control tokens.
const CONTROL: i32 = 3;

/// One chat message (`role`: `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: String,
    /// What is said.
    pub content: String,
}

/// Tokenizer and chat template of a causal LM.
pub struct LmTokenizer {
    tokenizer: Tokenizer,
    template: Option<String>,
    bos: String,
    eos: String,
    /// End-of-sequence id.
    pub eos_id: u32,
    /// Vocabulary size.
    pub vocab_size: usize,
}

fn err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!("{what}: {e}"))
}

impl LmTokenizer {
    /// The tokenizer and template of `m`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for merges that are not two tokens, or a vocabulary the BPE
    /// model refuses.
    pub fn from_gguf(m: &GgufModel) -> Result<Self, ModelError> {
        let vocab: tokenizers::models::bpe::Vocab = m
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = m
            .merges
            .iter()
            .map(|s| {
                s.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| err("tokenizer merge", format!("`{s}` is not two tokens")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err("BPE vocabulary", e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = m
            .tokens
            .iter()
            .zip(&m.token_types)
            .filter(|(_, ty)| **ty == CONTROL)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
        Ok(Self {
            tokenizer,
            template: m.chat_template.clone(),
            bos: m.tokens[m.bos as usize].clone(),
            eos: m.tokens[m.eos as usize].clone(),
            eos_id: m.eos,
            vocab_size: m.tokens.len(),
        })
    }

    /// Token ids of `text` (control tokens written in it are matched as such; no BOS added).
    ///
    /// # Errors
    /// [`ModelError::Config`] if the tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| err("tokenizing", e))?
            .get_ids()
            .to_vec())
    }

    /// The id of the token spelled `token` (a control token such as `<|im_end|>`), if the
    /// vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The text of `ids`, control tokens included when `specials`.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32], specials: bool) -> Result<String, ModelError> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(err(
                "decoding",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            ));
        }
        self.tokenizer
            .decode(ids, !specials)
            .map_err(|e| err("decoding", e))
    }

    /// `messages` rendered by the model's chat template, with the assistant's opening when
    /// `add_generation_prompt`.
    ///
    /// # Errors
    /// [`ModelError::Config`] if the model has no template or it fails to render.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template = self
            .template
            .as_deref()
            .ok_or_else(|| err("chat template", "the model file has none"))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template("chat", template)
            .map_err(|e| err("chat template", e))?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => &self.bos,
                    eos_token => &self.eos,
                })
            })
            .map_err(|e| err("chat template", e))
    }
}
