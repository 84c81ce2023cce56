//! Secure aggregation for fedee: the aggregator learns the sum of the sites' updates and
//! nothing else about any one of them, even when some sites drop out mid-round.
//!
//! The protocol is the double masking of Bonawitz et al., "Practical Secure Aggregation for
//! Privacy-Preserving Machine Learning" (CCS 2017, eprint 2017/281), run over a neighbour
//! graph of degree `k` as in Bell et al., "Secure Single-Server Aggregation with
//! (Poly)Logarithmic Overhead" (CCS 2020, eprint 2020/704; "SecAgg+"); `k = n − 1` is the
//! original protocol. Four stages, each a pure transition of [`Site`] or [`Server`] (no I/O,
//! no clock: the caller owns the transport and passes its time to [`Server::tick`], which
//! closes a stage when everyone expected answered or its [`Deadlines`] entry passed):
//!
//! 1. **advertise keys**: each site sends two X25519 public keys ([`Advertise`]); the server
//!    returns the [`Roster`] of sites that made the deadline.
//! 2. **share keys**: each site Shamir-shares (t-of-k, GF(256), `vsss-rs`) its self-mask seed
//!    `b_u` and its mask secret key among its neighbours, one [`EncryptedShare`] per
//!    neighbour (ChaCha20-Poly1305 under an HKDF-SHA256 key from X25519, bound to the
//!    direction, the round and the pair); the server only routes them.
//! 3. **masked input**: each site sends `y_u = x_u + PRG(b_u) + Σ_v ±PRG(s_uv) (mod 2^32)`
//!    where `s_uv` is the pairwise key agreed with neighbour `v` (`+` when `u < v`). The
//!    server adds the `y_u` into one running sum as they arrive.
//! 4. **unmask**: the server names the sites whose input arrived (alive) and those that
//!    shared keys but sent no input (dropped); each site returns its shares of the alive
//!    neighbours' `b` and of the dropped neighbours' mask keys, never both for one site. The
//!    server rebuilds the secrets, removes the self masks and the dropped sites' pairwise
//!    masks, and is left with `Σ x_u` over the alive sites.
//!
//! Values live in `Z_2^32` with wrapping adds; [`quant`] maps a clipped f32 update (and its
//! weight, `num_examples`) into it so that the sum cannot wrap.
//!
//! # Security
//! Against an honest-but-curious server colluding with fewer than `t` sites, the server's
//! view of one site's masked input is uniform in `Z_2^32^d`: only the sum over at least `t`
//! alive sites can be unmasked. Sites refuse an unmask request whose alive and dropped lists
//! overlap (which would hand over both masks of one site) or which names fewer than `t`
//! alive sites. What is not covered: a server that sends different sites different rosters or
//! lists (Bonawitz's consistency-check round and signatures bound to a PKI are not run;
//! public keys are bound to the site only by the transport's mTLS identity), and the sum
//! itself, which is what differential privacy (crate `fedee-dp`) protects.
//!
//! Secrets (`b_u`, secret keys, pairwise keys) are zeroized on drop and never leave a
//! [`Site`] except as shares encrypted to a neighbour.

pub mod channel;
pub mod federation;
pub mod graph;
pub mod mask;
pub mod protocol;
pub mod quant;

pub use graph::{Graph, RoundParams};
pub use protocol::{
    Advertise, Closed, Deadlines, EncryptedShare, Roster, Server, ServerStage, Site, UnmaskRequest,
    UnmaskResponse,
};
pub use quant::Quantizer;

/// A site's position in a round's roster (0-based). At most [`MAX_SITES`] per round: shares
/// are GF(256) points and each site's x-coordinate is its position + 1.
pub type SiteIndex = u16;

/// The most sites one round can hold (GF(256) has 255 nonzero x-coordinates).
pub const MAX_SITES: usize = 255;

/// Why a protocol step was refused. Every refusal leaves the state as it was, so a corrected
/// message can still be accepted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Parameters that cannot run (too many sites, threshold out of range, …).
    #[error("secure aggregation parameters: {0}")]
    Params(String),
    /// A message for another stage, round or site.
    #[error("secure aggregation: {0}")]
    Protocol(String),
    /// A message that breaks the protocol's safety rules (overlapping lists, duplicate keys,
    /// forged shares): refused, nothing revealed.
    #[error("secure aggregation refused a hostile or inconsistent message: {0}")]
    Refused(String),
    /// Too few sites left to go on; the round ends with no output.
    #[error("secure aggregation aborted: {have} {what}, the threshold is {threshold}")]
    TooFew {
        /// What was counted.
        what: String,
        /// How many there were.
        have: usize,
        /// How many are needed.
        threshold: usize,
    },
    /// A value the quantizer cannot represent.
    #[error("secure aggregation input: {0}")]
    Input(String),
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A ChaCha20 generator seeded from the operating system, for keys, seeds and Shamir
/// coefficients.
///
/// # Errors
/// The operating system's randomness source failed.
pub fn os_rng() -> Result<chacha20::ChaCha20Rng> {
    use rand_core::SeedableRng;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::Params(format!("OS randomness failed: {e}")))?;
    Ok(chacha20::ChaCha20Rng::from_seed(seed))
}
