//! Property-based fuzzing of chunk reassembly (proptest): arbitrary chunk sequences never
//! panic and are accepted only when they form exactly the declared blob; every honest split of
//! a blob reassembles to the same bytes. `FEDEE_FUZZ_CASES` sets the cases per property
//! (default 20 000); each test prints how many it ran.

use std::cell::Cell;

use fedee_proto::v1::Chunk;
use fedee_proto::{Reassembler, chunks};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn runner() -> TestRunner {
    let cases = std::env::var("FEDEE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        prop_oneof![0u64..64, any::<u64>()],
        prop_oneof![0u64..256, any::<u64>()],
        proptest::collection::vec(any::<u8>(), 0..80),
    )
        .prop_map(|(offset, total_size, data)| Chunk {
            offset,
            total_size,
            data: data.into(),
        })
}

#[test]
fn fuzz_arbitrary_chunk_sequences() {
    let runs = Cell::new(0u64);
    let strategy = (proptest::collection::vec(chunk(), 0..8), 0u64..512);
    runner()
        .run(&strategy, |(seq, limit)| {
            runs.set(runs.get() + 1);
            let mut r = Reassembler::new(limit);
            for c in seq.clone() {
                if r.push(c).is_err() {
                    return Ok(());
                }
            }
            let Ok(blob) = r.finish() else {
                return Ok(());
            };
            // Accepted: contiguous from 0, one declared size within the limit, every byte.
            let declared = seq[0].total_size;
            prop_assert!(declared <= limit);
            prop_assert_eq!(blob.len() as u64, declared);
            let mut expect = Vec::new();
            for c in &seq {
                prop_assert_eq!(c.offset, expect.len() as u64);
                prop_assert_eq!(c.total_size, declared);
                expect.extend_from_slice(&c.data);
            }
            prop_assert_eq!(blob, expect);
            Ok(())
        })
        .unwrap();
    println!(
        "fuzz chunk reassembly: {} arbitrary chunk sequences, no panic",
        runs.get()
    );
}

#[test]
fn fuzz_honest_splits_reassemble_exactly() {
    let runs = Cell::new(0u64);
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..4096),
        proptest::collection::vec(0usize..4096, 0..6),
    );
    runner()
        .run(&strategy, |(blob, cuts)| {
            runs.set(runs.get() + 1);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(blob.len())).collect();
            cuts.extend([0, blob.len()]);
            cuts.sort_unstable();
            cuts.dedup();
            let mut r = Reassembler::new(blob.len() as u64);
            for w in cuts.windows(2) {
                r.push(Chunk {
                    offset: w[0] as u64,
                    total_size: blob.len() as u64,
                    data: fedee_proto::Bytes::copy_from_slice(&blob[w[0]..w[1]]),
                })
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            if blob.is_empty() {
                // An empty blob travels as one empty chunk (see `chunks`).
                r.push(chunks(&blob).remove(0))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            prop_assert_eq!(
                r.finish().map_err(|e| TestCaseError::fail(e.to_string()))?,
                blob
            );
            Ok(())
        })
        .unwrap();
    println!(
        "fuzz chunk reassembly: {} honest splits reassembled exactly",
        runs.get()
    );
}
