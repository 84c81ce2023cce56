//! Key agreement and the pairwise channel that carries shares between two sites through the
//! server.
//!
//! Keys: X25519 (`x25519-dalek`), then HKDF-SHA256 (RFC 5869) with the round's label and
//! both site positions in `info`. Channel: ChaCha20-Poly1305 (RFC 8439) with the round and
//! the ordered pair as associated data. Each channel key is derived for one direction of one
//! pair in one round and seals exactly one message, so a fixed all-zero nonce is never reused
//! under a key.

use crate::{Error, Result, SiteIndex};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// A 32-byte key derived from `X25519(my_secret, their_public)` with `info`.
///
/// # Errors
/// [`Error::Refused`] when the peer's public key is a low-order point (the shared secret
/// would be all zeros, known to anyone).
pub fn derive(
    my_secret: &StaticSecret,
    their_public: &[u8; 32],
    info: &[u8],
) -> Result<Zeroizing<[u8; 32]>> {
    let shared = my_secret.diffie_hellman(&PublicKey::from(*their_public));
    if !shared.was_contributory() {
        return Err(Error::Refused(
            "a public key is a low-order point (the shared secret would be public)".into(),
        ));
    }
    let mut out = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, shared.as_bytes())
        .expand(info, out.as_mut())
        .map_err(|e| Error::Params(format!("HKDF: {e}")))?;
    Ok(out)
}

/// `info` (and associated data) of the channel from `from` to `to`.
pub(crate) fn channel_info(label: &[u8], from: SiteIndex, to: SiteIndex) -> Vec<u8> {
    let mut v = label.to_vec();
    v.extend_from_slice(&from.to_le_bytes());
    v.extend_from_slice(&to.to_le_bytes());
    v
}

/// Seals `msg` under `key` with associated data `aad` (16-byte tag appended).
pub fn seal(key: &[u8; 32], aad: &[u8], msg: &[u8]) -> Result<Vec<u8>> {
    ChaCha20Poly1305::new(key.into())
        .encrypt(&Nonce::default(), Payload { msg, aad })
        .map_err(|_| Error::Params("ChaCha20-Poly1305 refused to seal".into()))
}

/// Opens a ciphertext sealed by [`seal`].
///
/// # Errors
/// [`Error::Refused`] when the ciphertext or its associated data was altered, or it was
/// sealed for another pair, direction or round.
pub fn open(key: &[u8; 32], aad: &[u8], ct: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    ChaCha20Poly1305::new(key.into())
        .decrypt(&Nonce::default(), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| {
            Error::Refused(
                "an encrypted share failed authentication (tampered, or sealed for another pair or round)"
                    .into(),
            )
        })
}
