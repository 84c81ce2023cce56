//! Secure-aggregation messages between the wire (`fedee.v1.SecAgg*`) and the protocol types
//! of `fedee-secagg`. Every conversion from the wire checks lengths and ranges and names the
//! bad field, so a hostile peer gets a clear refusal instead of a panic.

use crate::v1::{SecAggAdvertise, SecAggNeighbourShare, SecAggResponse, SecAggShare, SecAggUnmask};
use fedee_secagg::{Advertise, EncryptedShare, SiteIndex, UnmaskRequest, UnmaskResponse};

fn index(v: u32, what: &str) -> Result<SiteIndex, String> {
    SiteIndex::try_from(v)
        .ok()
        .filter(|&i| usize::from(i) < fedee_secagg::MAX_SITES)
        .ok_or_else(|| {
            format!(
                "{what} {v} is not a roster index (0..{})",
                fedee_secagg::MAX_SITES
            )
        })
}

fn key(b: &[u8], what: &str) -> Result<[u8; 32], String> {
    b.try_into()
        .map_err(|_| format!("{what} has {} bytes; an X25519 public key has 32", b.len()))
}

/// An advertisement for the wire.
pub fn advertise_to_wire(a: &Advertise) -> SecAggAdvertise {
    SecAggAdvertise {
        site: u32::from(a.site),
        channel_key: a.channel_key.to_vec(),
        mask_key: a.mask_key.to_vec(),
    }
}

/// An advertisement of `round` from the wire.
///
/// # Errors
/// A site index out of range or a key that is not 32 bytes.
pub fn advertise_from_wire(round: u32, a: &SecAggAdvertise) -> Result<Advertise, String> {
    Ok(Advertise {
        round: u64::from(round),
        site: index(a.site, "advertisement site")?,
        channel_key: key(&a.channel_key, "channel_key")?,
        mask_key: key(&a.mask_key, "mask_key")?,
    })
}

/// A sealed share for the wire.
pub fn share_to_wire(s: &EncryptedShare) -> SecAggShare {
    SecAggShare {
        from: u32::from(s.from),
        to: u32::from(s.to),
        ciphertext: s.ciphertext.clone(),
    }
}

/// A sealed share of `round` from the wire.
///
/// # Errors
/// An index out of range or a ciphertext of the wrong length.
pub fn share_from_wire(round: u32, s: &SecAggShare) -> Result<EncryptedShare, String> {
    if s.ciphertext.len() != fedee_secagg::protocol::SEALED_LEN {
        return Err(format!(
            "a sealed share has {} bytes, expected {}",
            s.ciphertext.len(),
            fedee_secagg::protocol::SEALED_LEN
        ));
    }
    Ok(EncryptedShare {
        round: u64::from(round),
        from: index(s.from, "share sender")?,
        to: index(s.to, "share receiver")?,
        ciphertext: s.ciphertext.to_vec(),
    })
}

fn pairs_to_wire(p: &[(SiteIndex, Vec<u8>)]) -> Vec<SecAggNeighbourShare> {
    p.iter()
        .map(|(site, share)| SecAggNeighbourShare {
            site: u32::from(*site),
            share: share.clone(),
        })
        .collect()
}

fn pairs_from_wire(
    p: &[SecAggNeighbourShare],
    what: &str,
) -> Result<Vec<(SiteIndex, Vec<u8>)>, String> {
    p.iter()
        .map(|s| Ok((index(s.site, what)?, s.share.to_vec())))
        .collect()
}

/// An unmask response for the wire.
pub fn unmask_to_wire(r: &UnmaskResponse) -> SecAggUnmask {
    SecAggUnmask {
        seed_shares: pairs_to_wire(&r.seed_shares),
        key_shares: pairs_to_wire(&r.key_shares),
    }
}

/// The unmask response of site `site` for `round` from the wire.
///
/// # Errors
/// An index out of range.
pub fn unmask_from_wire(
    round: u32,
    site: SiteIndex,
    r: &SecAggUnmask,
) -> Result<UnmaskResponse, String> {
    Ok(UnmaskResponse {
        round: u64::from(round),
        site,
        seed_shares: pairs_from_wire(&r.seed_shares, "seed share site")?,
        key_shares: pairs_from_wire(&r.key_shares, "key share site")?,
    })
}

/// The roster of `round` in a response.
///
/// # Errors
/// As [`advertise_from_wire`].
pub fn roster_from_wire(round: u32, r: &SecAggResponse) -> Result<fedee_secagg::Roster, String> {
    Ok(fedee_secagg::Roster {
        round: u64::from(round),
        sites: r
            .roster
            .iter()
            .map(|a| advertise_from_wire(round, a))
            .collect::<Result<_, _>>()?,
    })
}

/// The unmask request of `round` in a response.
///
/// # Errors
/// An index out of range.
pub fn request_from_wire(round: u32, r: &SecAggResponse) -> Result<UnmaskRequest, String> {
    let list = |v: &[u32], what| {
        v.iter()
            .map(|&i| index(i, what))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(UnmaskRequest {
        round: u64::from(round),
        alive: list(&r.alive, "alive site")?,
        dropped: list(&r.dropped, "dropped site")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_fields_are_named() {
        let a = Advertise {
            round: 3,
            site: 2,
            channel_key: [1; 32],
            mask_key: [2; 32],
        };
        assert_eq!(advertise_from_wire(3, &advertise_to_wire(&a)).unwrap(), a);
        let mut w = advertise_to_wire(&a);
        w.mask_key = vec![0u8; 31];
        assert!(
            advertise_from_wire(3, &w)
                .unwrap_err()
                .contains("mask_key has 31 bytes")
        );
        w = advertise_to_wire(&a);
        w.site = 70_000;
        assert!(advertise_from_wire(3, &w).unwrap_err().contains("70000"));
        let s = EncryptedShare {
            round: 3,
            from: 1,
            to: 0,
            ciphertext: vec![9; fedee_secagg::protocol::SEALED_LEN],
        };
        assert_eq!(share_from_wire(3, &share_to_wire(&s)).unwrap(), s);
        let mut short = share_to_wire(&s);
        short.ciphertext = vec![0u8; 5];
        assert!(share_from_wire(3, &short).unwrap_err().contains("5 bytes"));
        let r = UnmaskResponse {
            round: 3,
            site: 1,
            seed_shares: vec![(0, vec![1, 2])],
            key_shares: vec![(2, vec![3])],
        };
        assert_eq!(unmask_from_wire(3, 1, &unmask_to_wire(&r)).unwrap(), r);
    }
}
