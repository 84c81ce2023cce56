//! fedee model architectures in tch, their safetensors IO, and their EE key specs.
//!
//! * [`mlp`]: an MLP (one or more hidden layers) for tabular data (the federated model of the main job).
//! * [`bert`]: a BERT encoder with mean pooling and a classification head (Hugging Face names).
//! * [`arch`]: both behind one [`Architecture`], the dispatcher over the leaf layers above.
//! * [`state`]: a state dict [`Checked`] against an architecture, which the forwards take.
//! * [`train`]: a trainable [`Model`] of any architecture, its optimizers, and [`Mlp`].
//! * [`io`]: state dicts to and from safetensors bytes, with name/shape/dtype checks.
//! * [`batch`]: trainer batches to and from safetensors bytes, checked against the
//!   architecture.
//! * [`gguf`], [`llama`], [`chat`]: a Llama-family causal LM from a GGUF file, its forward
//!   pass with a key/value cache, and its tokenizer and chat template.
//! * [`sample`]: order-invariant greedy, temperature, top-k and top-p sampling (the server
//!   samples on encrypted logits).
//! * [`keyspec`]: the key-spec types each architecture declares (no key material: the trainer
//!   links this crate and never the one that holds keys).

pub mod arch;
pub mod batch;
pub mod bert;
pub mod chat;
pub mod gguf;
pub mod io;
pub mod keyspec;
pub mod llama;
pub mod mlp;
pub mod sample;
pub mod state;
pub mod text;
pub mod train;

pub use arch::{Architecture, Input};
pub use batch::{batch_from_safetensors, batch_to_safetensors};
pub use bert::{BertClassifierConfig, BertConfig, Profile};
pub use io::{
    safetensors_metadata, state_from_safetensors, state_to_safetensors, state_to_safetensors_with,
};
pub use keyspec::{KeyGroup, KeySpec, StateDict};
pub use mlp::{Activation, MAX_HIDDEN_LAYERS, MlpConfig};
pub use state::Checked;
pub use train::{Mlp, Model, OptimizerSpec, cross_entropy};

/// Errors of model construction, loading and training.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The safetensors bytes could not be parsed (or written).
    #[error("invalid safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// A model file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tensor's dtype is not f32 or f64.
    #[error("tensor `{name}` has dtype {dtype}; fedee models use F32 or F64")]
    Dtype { name: String, dtype: String },
    /// A tensor has the wrong shape for the architecture.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    /// A tensor the architecture needs is missing, or an unknown one is present.
    #[error("tensor `{name}` {problem}")]
    Name { name: String, problem: String },
    /// Invalid configuration.
    #[error("invalid model config: {0}")]
    Config(String),
    /// An error from libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
