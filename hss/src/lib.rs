//! HSS-EE: inference on an EE model with two non-colluding servers, done correctly.
//!
//! A scheme in which each server runs the whole network on an additive share of the input is
//! wrong for any nonlinear model (`f(x₀) + f(x₁) ≠ f(x₀ + x₁)` for GELU, softmax, LayerNorm;
//! `tests/hss.rs` shows it). This crate implements the *client-aided linear offload*: the
//! client (the key holder) keeps its data and may see every activation; the two servers hold
//! the EE model's linear maps and compute them on ring shares.
//!
//! - [`ring`]: fixed point in `Z_2^64` (`u64`, wrapping): activations at `2^f`, weights at a
//!   per-row `2^f_w` with `|W̃| < 2^15`.
//! - [`share`]: `X₁ = x̃ − X₀` with `X₀ = ChaCha20(seed)`; server 0 receives only the 32-byte
//!   seed. [`share::Sharer`] draws every seed from the OS and refuses to reuse one.
//! - [`engine`]: `Yᵢ = Xᵢ·W̃ᵀ` exactly with libtorch: three 22-bit limbs of the share in f64
//!   GEMMs (exact while `in · 2^37 < 2^53`; runs on CUDA too), or int64 `matmul` on the CPU.
//! - [`server`]: one server's state (the quantized linear maps) and its one operation.
//! - [`service`]: the `HssServer` gRPC service (`fedee hss-server`) and [`service::Remote`],
//!   the client's transport to two of them.
//! - [`client`]: shares, sends to both servers in one round trip, adds `Y₀ + Y₁`, decodes;
//!   [`client::classify`] runs a BERT classifier with attention, residuals, LayerNorm and GELU
//!   on the client in f32 and every encoder linear map on the servers.
//!
//! # Security
//! Each server's view (a seed, or `x̃ − ChaCha20(seed)`) is uniform in `Z_2^64` whatever the
//! input, against one semi-honest server. Two colluding servers learn every activation.
//! Shapes, the token count and timing leak. With HSS the input's secrecy against one server
//! rests on the shares, not on the EE keys (the servers still hold an EE model, so the weights
//! stay as protected as under plain EE).

pub mod cli;
pub mod client;
pub mod engine;
pub mod ring;
pub mod server;
pub mod service;
pub mod share;

/// Errors of the HSS protocol, on either side.
#[derive(Debug, thiserror::Error)]
pub enum HssError {
    /// A request or model the other side sent does not fit (names the value and the fix).
    #[error("{0}")]
    Invalid(String),
    /// A value cannot be represented (NaN, infinity, out of the fixed-point range).
    #[error("{0}")]
    Range(String),
    /// The servers' transport failed.
    #[error("transport: {0}")]
    Transport(String),
    /// A libtorch error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The client's model forward failed (shapes, context length).
    #[error("model: {0}")]
    Model(#[from] fedee_model::ModelError),
}

/// Result with [`HssError`].
pub type Result<T, E = HssError> = std::result::Result<T, E>;
