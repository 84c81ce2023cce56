//! The `fedee.v1` gRPC API, generated from `proto/fedee.proto` at build time.
//!
//! Generated types stay at the gRPC edge: services convert them into domain types.
//! [`chunks`] splits a blob into ≤ 1 MiB [`v1::Chunk`]s and [`Reassembler`] puts them back
//! together, rejecting out-of-order, oversized and truncated streams.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("fedee.v1");
}

mod chunk;
pub mod cli;
pub mod pki;
pub mod secagg;
pub use chunk::{
    CHUNK_SIZE, ChunkCursor, ChunkError, MAX_BLOB_SIZE, Reassembler, chunks, masked_messages,
    update_messages,
};
/// The byte buffer type of [`v1::Chunk::data`] (cheap to clone and slice).
pub use prost::bytes::Bytes;
