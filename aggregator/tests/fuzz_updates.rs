//! Property-based fuzzing of update validation (proptest): arbitrary bytes and mutated valid
//! safetensors (flipped bytes, lying headers, truncation) never panic the parser or the layout
//! check, and whatever is accepted is well formed: F32, finite, sizes matching shapes.
//! `FEDEE_FUZZ_CASES` sets the cases per property (default 20 000); each test prints how many
//! it ran.

use std::cell::Cell;

use fedee_aggregator::tensors::Tensors;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

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

fn reference() -> Tensors {
    Tensors {
        names: vec!["bias".into(), "weight".into()],
        shapes: vec![vec![4], vec![4, 3]],
        data: vec![vec![0.5; 4], (0..12).map(|i| i as f32).collect()],
    }
}

fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(t) = Tensors::from_safetensors(bytes) {
        for ((name, shape), data) in t.names.iter().zip(&t.shapes).zip(&t.data) {
            let n: usize = shape.iter().product();
            prop_assert_eq!(n, data.len(), "tensor {}", name);
            prop_assert!(data.iter().all(|x| x.is_finite()), "tensor {}", name);
        }
        // The layout check must decide without panicking.
        let _ = t.check_layout(&reference());
    }
    Ok(())
}

#[test]
fn fuzz_arbitrary_bytes() {
    let runs = Cell::new(0u64);
    runner()
        .run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
            runs.set(runs.get() + 1);
            check(&bytes)
        })
        .unwrap();
    println!(
        "fuzz update validation: {} arbitrary byte strings, no panic",
        runs.get()
    );
}

#[test]
fn fuzz_mutated_valid_updates() {
    let valid = reference().to_safetensors();
    let header_len = 8 + u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let runs = Cell::new(0u64);
    let strategy = (
        // Byte flips anywhere, but mostly in the 8-byte length and the JSON header.
        proptest::collection::vec(
            (
                prop_oneof![3 => 0..header_len, 1 => 0..valid.len()],
                any::<u8>(),
            ),
            1..6,
        ),
        prop_oneof![Just(None), (0..valid.len() + 16).prop_map(Some)],
    );
    runner()
        .run(&strategy, |(flips, cut)| {
            runs.set(runs.get() + 1);
            let mut b = valid.clone();
            for (i, v) in flips {
                b[i] = v;
            }
            if let Some(c) = cut {
                b.resize(c, 0);
            }
            check(&b)
        })
        .unwrap();
    println!(
        "fuzz update validation: {} mutated valid updates, no panic",
        runs.get()
    );
}

#[test]
fn fuzz_lying_headers() {
    // Well-formed JSON headers whose offsets, shapes and dtypes are arbitrary.
    let runs = Cell::new(0u64);
    let dtype = prop_oneof![
        Just("F32"),
        Just("F64"),
        Just("F16"),
        Just("I64"),
        Just("U8")
    ];
    let strategy = (
        dtype,
        proptest::collection::vec(0usize..9, 0..4),
        0usize..200,
        0usize..200,
        0usize..200,
    );
    runner()
        .run(&strategy, |(dtype, shape, start, end, data_len)| {
            runs.set(runs.get() + 1);
            let header = format!(
                r#"{{"weight":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{end}]}}}}"#
            );
            let mut h = header.into_bytes();
            while !h.len().is_multiple_of(8) {
                h.push(b' ');
            }
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(&h);
            b.extend(std::iter::repeat_n(0x3f, data_len));
            check(&b)
        })
        .unwrap();
    println!(
        "fuzz update validation: {} lying safetensors headers, no panic",
        runs.get()
    );
}
