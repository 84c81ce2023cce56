//! Chunked transfer of blobs (safetensors models and updates) over gRPC streams.

use crate::v1::Chunk;
use prost::bytes::Bytes;

/// Bytes per chunk: 1 MiB, well below gRPC's default 4 MiB message limit.
pub const CHUNK_SIZE: usize = 1 << 20;

/// Largest blob accepted by [`Reassembler`]: 4 GiB.
pub const MAX_BLOB_SIZE: u64 = 4 << 30;

/// Why a chunk stream was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    /// A chunk's offset is not where the previous one ended.
    #[error("chunk out of order: expected offset {expected}, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
    /// A chunk declares a different total size than the first one.
    #[error("chunk declares total size {got}, but the stream started with {expected}")]
    SizeChanged { expected: u64, got: u64 },
    /// The stream carries more bytes than declared.
    #[error("stream carries more than its declared {declared} bytes")]
    Overflow { declared: u64 },
    /// The declared size is above the limit.
    #[error("blob of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// A chunk is larger than [`CHUNK_SIZE`].
    #[error("chunk of {size} bytes exceeds the {limit}-byte chunk limit")]
    ChunkTooLarge { size: usize, limit: usize },
    /// The stream ended before all declared bytes arrived.
    #[error("stream truncated: received {received} of {declared} bytes")]
    Truncated { received: u64, declared: u64 },
}

/// The `SubmitUpdate` stream of one update: its header, then `blob` in [`chunks`]. The
/// header's `sha256` must be the blob's (the aggregator checks it).
pub fn update_messages(
    header: crate::v1::UpdateHeader,
    blob: &[u8],
) -> Vec<crate::v1::SubmitUpdateMessage> {
    use crate::v1::submit_update_message::Msg;
    std::iter::once(Msg::Header(header))
        .chain(chunks(blob).into_iter().map(Msg::Chunk))
        .map(|m| crate::v1::SubmitUpdateMessage { msg: Some(m) })
        .collect()
}

/// The messages of one `SubmitMasked` stream: `header`, then the masked words
/// (little-endian) in chunks.
pub fn masked_messages(
    header: crate::v1::SecAggMaskedHeader,
    words: &[u32],
) -> Vec<crate::v1::SubmitMaskedMessage> {
    use crate::v1::submit_masked_message::Msg;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    std::iter::once(Msg::Header(header))
        .chain(chunks(&bytes).into_iter().map(Msg::Chunk))
        .map(|m| crate::v1::SubmitMaskedMessage { msg: Some(m) })
        .collect()
}

/// Split `blob` into chunks of at most [`CHUNK_SIZE`] bytes (one empty chunk for an empty blob).
pub fn chunks(blob: &[u8]) -> Vec<Chunk> {
    let total_size = blob.len() as u64;
    if blob.is_empty() {
        return vec![Chunk {
            offset: 0,
            total_size,
            data: Bytes::new(),
        }];
    }
    blob.chunks(CHUNK_SIZE)
        .enumerate()
        .map(|(i, data)| Chunk {
            offset: (i * CHUNK_SIZE) as u64,
            total_size,
            data: Bytes::copy_from_slice(data),
        })
        .collect()
}

/// Checks a chunk stream's order and sizes as chunks arrive, without holding their bytes: the
/// part of [`Reassembler`] a receiver that writes chunks straight to disk needs.
#[derive(Debug)]
pub struct ChunkCursor {
    limit: u64,
    declared: Option<u64>,
    received: u64,
}

impl ChunkCursor {
    /// A cursor that refuses blobs above `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            declared: None,
            received: 0,
        }
    }

    /// Check the next chunk and count its bytes as received.
    ///
    /// # Errors
    /// Any [`ChunkError`] except `Truncated`; the stream should then be dropped.
    pub fn accept(&mut self, chunk: &Chunk) -> Result<(), ChunkError> {
        if chunk.data.len() > CHUNK_SIZE {
            return Err(ChunkError::ChunkTooLarge {
                size: chunk.data.len(),
                limit: CHUNK_SIZE,
            });
        }
        let declared = match self.declared {
            None => {
                if chunk.total_size > self.limit {
                    return Err(ChunkError::TooLarge {
                        size: chunk.total_size,
                        limit: self.limit,
                    });
                }
                self.declared = Some(chunk.total_size);
                chunk.total_size
            }
            Some(d) if d != chunk.total_size => {
                return Err(ChunkError::SizeChanged {
                    expected: d,
                    got: chunk.total_size,
                });
            }
            Some(d) => d,
        };
        let expected = self.received;
        if chunk.offset != expected {
            return Err(ChunkError::OutOfOrder {
                expected,
                got: chunk.offset,
            });
        }
        if expected + chunk.data.len() as u64 > declared {
            return Err(ChunkError::Overflow { declared });
        }
        self.received += chunk.data.len() as u64;
        Ok(())
    }

    /// The blob's size, once every declared byte has arrived.
    ///
    /// # Errors
    /// [`ChunkError::Truncated`] if bytes are missing (or no chunk arrived at all).
    pub fn finish(&self) -> Result<u64, ChunkError> {
        match self.declared {
            Some(d) if d == self.received => Ok(d),
            _ => Err(ChunkError::Truncated {
                received: self.received,
                declared: self.declared.unwrap_or(0),
            }),
        }
    }
}

/// Reassembles a blob from in-order chunks in memory, checking sizes as they arrive.
#[derive(Debug)]
pub struct Reassembler {
    cursor: ChunkCursor,
    buf: Vec<u8>,
}

impl Reassembler {
    /// A reassembler that refuses blobs above `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            cursor: ChunkCursor::new(limit),
            buf: Vec::new(),
        }
    }

    /// Append one chunk.
    ///
    /// # Errors
    /// Any [`ChunkError`] except `Truncated`; the reassembler should then be dropped.
    pub fn push(&mut self, chunk: Chunk) -> Result<(), ChunkError> {
        let first = self.cursor.declared.is_none();
        self.cursor.accept(&chunk)?;
        if first {
            self.buf.reserve_exact(chunk.total_size as usize);
        }
        self.buf.extend_from_slice(&chunk.data);
        Ok(())
    }

    /// The whole blob, once every declared byte has arrived.
    ///
    /// # Errors
    /// [`ChunkError::Truncated`] if bytes are missing (or no chunk arrived at all).
    pub fn finish(self) -> Result<Vec<u8>, ChunkError> {
        self.cursor.finish()?;
        Ok(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_multi_chunk() {
        let blob: Vec<u8> = (0..(2 * CHUNK_SIZE + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let cs = chunks(&blob);
        assert_eq!(cs.len(), 3);
        let mut r = Reassembler::new(MAX_BLOB_SIZE);
        for c in cs {
            r.push(c).unwrap();
        }
        assert_eq!(r.finish().unwrap(), blob);
    }

    #[test]
    fn rejects_out_of_order_and_truncated() {
        let blob = vec![7u8; CHUNK_SIZE + 5];
        let cs = chunks(&blob);
        let mut r = Reassembler::new(MAX_BLOB_SIZE);
        assert_eq!(
            r.push(cs[1].clone()),
            Err(ChunkError::OutOfOrder {
                expected: 0,
                got: CHUNK_SIZE as u64
            })
        );
        let mut r = Reassembler::new(MAX_BLOB_SIZE);
        r.push(cs[0].clone()).unwrap();
        assert!(matches!(r.finish(), Err(ChunkError::Truncated { .. })));
        let mut r = Reassembler::new(10);
        assert!(matches!(
            r.push(cs[0].clone()),
            Err(ChunkError::TooLarge { .. })
        ));
    }
}
