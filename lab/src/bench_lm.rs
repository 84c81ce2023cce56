//! `fedee bench lm`: the causal LM (SmolLM2's GGUF file, f32) in fedee beside Hugging Face
//! transformers on the same file, same prompt ids and thread count, in the same run: load time,
//! prefill tokens/s, decode tokens/s, peak RSS, and decode against the memory-bandwidth bound
//! measured in the same run.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use fedee_model::chat::LmTokenizer;
use fedee_model::gguf::{self, RopeLayout};
use fedee_model::llama::{self, KvCache};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::table::{self, Cell, col};

/// Prompt lengths of the prefill rows.
const PROMPTS: [usize; 2] = [36, 512];

/// A clinical-sounding text, repeated until a prompt is long enough (content does not change
/// the time of a step).
const TEXT: &str = "The patient is a 64-year-old woman with type 2 diabetes, hypertension and \
chronic kidney disease stage 3, admitted with shortness of breath and ankle swelling. ";

/// One implementation's figures.
#[derive(serde::Serialize)]
struct Row {
    implementation: String,
    load_seconds: f64,
    prefill_36_tokens_per_s: f64,
    prefill_512_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    peak_rss_mb: f64,
}

fn vm_hwm_mb() -> f64 {
    crate::bench_aggregate::proc_mb(std::process::id(), "VmHWM:").unwrap_or(f64::NAN)
}

/// Read bandwidth of this machine in GB/s: the best of 5 sums over a 1 GiB f32 tensor with the
/// same thread count.
fn read_bandwidth_gb_s(device: Device) -> f64 {
    let n = 1i64 << 28;
    let t = Tensor::ones([n], (Kind::Float, device));
    let mut best = f64::MAX;
    for _ in 0..5 {
        let s = Instant::now();
        let v = t.sum(Kind::Float).double_value(&[]);
        assert!(v > 0.0);
        best = best.min(s.elapsed().as_secs_f64());
    }
    (n as f64 * 4.0) / best / 1e9
}

/// Run the benchmark.
///
/// # Errors
/// A missing or unreadable model file, or the transformers side failing.
pub fn lm(
    gguf_path: &Path,
    threads: i32,
    decode: usize,
    python: Option<&Path>,
    device: Device,
) -> Result<serde_json::Value> {
    tch::set_num_threads(threads);
    let _guard = tch::no_grad_guard();
    let started = Instant::now();
    let m = gguf::load(gguf_path, RopeLayout::HalfSplit)
        .with_context(|| format!("loading {} (`make data` fetches it)", gguf_path.display()))?;
    let state: fedee_model::StateDict = m
        .state
        .iter()
        .map(|(k, v)| (k.clone(), v.to_device(device)))
        .collect();
    let load_seconds = started.elapsed().as_secs_f64();
    let c = &m.config;
    let s = c.check_state(&state)?;
    let tok = LmTokenizer::from_gguf(&m)?;
    let mut text = String::new();
    while tok.encode(&text)?.len() < PROMPTS[1] {
        text.push_str(TEXT);
    }
    let all: Vec<i64> = tok.encode(&text)?.into_iter().map(i64::from).collect();
    let prompts: Vec<Vec<i64>> = PROMPTS.iter().map(|&n| all[..n].to_vec()).collect();
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let prefill = |ids: &[i64]| -> Result<f64> {
        let x = Tensor::from_slice(ids).unsqueeze(0).to_device(device);
        let mut best = f64::MAX;
        for r in 0..4 {
            let mut cache = KvCache::new(c, 1, ids.len(), Kind::Float, device);
            sync();
            let t = Instant::now();
            let _ = llama::forward(c, s, &x, &mut cache)?;
            sync();
            if r > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        Ok(ids.len() as f64 / best)
    };
    eprintln!("lm: fedee prefill …");
    let p36 = prefill(&prompts[0])?;
    let p512 = prefill(&prompts[1])?;
    eprintln!("lm: fedee decode {decode} tokens …");
    let mut cache = KvCache::new(c, 1, PROMPTS[0] + decode + 1, Kind::Float, device);
    let x = Tensor::from_slice(&prompts[0])
        .unsqueeze(0)
        .to_device(device);
    let mut next = llama::forward(c, s, &x, &mut cache)?
        .get(0)
        .get(-1)
        .argmax(0, false);
    sync();
    let t = Instant::now();
    for _ in 0..decode {
        let logits = llama::forward(c, s, &next.view([1, 1]), &mut cache)?;
        next = logits.get(0).get(-1).argmax(0, false);
    }
    let _ = next.int64_value(&[]);
    let decode_tps = decode as f64 / t.elapsed().as_secs_f64();
    let mut rows = vec![Row {
        implementation: "fedee plaintext f32".into(),
        load_seconds,
        prefill_36_tokens_per_s: p36,
        prefill_512_tokens_per_s: p512,
        decode_tokens_per_s: decode_tps,
        peak_rss_mb: vm_hwm_mb(),
    }];
    // Every weight is read once per decoded token (the tied output layer reads the whole
    // embedding table); the embedding lookup's one row is negligible.
    let weight_bytes: i64 = state
        .iter()
        .filter(|(n, _)| c.tied_embeddings || n.as_str() != "token_embd.weight")
        .map(|(_, t)| t.numel() as i64 * 4)
        .sum();
    let bandwidth = read_bandwidth_gb_s(device);
    let bound = bandwidth * 1e9 / weight_bytes as f64;
    let mut transformers_version = serde_json::Value::Null;
    if let Some(python) = python {
        eprintln!("lm: transformers (Python) …");
        let cfg = json!({
            "gguf": gguf_path,
            "threads": threads,
            "prompts": {"36": prompts[0], "512": prompts[1]},
            "decode_after": "36",
            "decode": decode,
        });
        let py = crate::bench::python_side(
            python,
            "scripts/bench_transformers_lm.py",
            &cfg,
            "make bench installs transformers, gguf and accelerate into the venv",
        )?;
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        transformers_version = py["transformers_version"].clone();
        rows.push(Row {
            implementation: "transformers f32".into(),
            load_seconds: f(&py["load_seconds"]),
            prefill_36_tokens_per_s: f(&py["prefill"]["36"]),
            prefill_512_tokens_per_s: f(&py["prefill"]["512"]),
            decode_tokens_per_s: f(&py["decode_tokens_per_s"]),
            peak_rss_mb: f(&py["peak_rss_mb"]),
        });
    }
    table::print(
        &[
            col("implementation", "implementation", Cell::Text),
            col("load s", "load_seconds", Cell::Fixed(2)),
            col(
                "prefill 36 tok/s",
                "prefill_36_tokens_per_s",
                Cell::Fixed(1),
            ),
            col(
                "prefill 512 tok/s",
                "prefill_512_tokens_per_s",
                Cell::Fixed(1),
            ),
            col("decode tok/s", "decode_tokens_per_s", Cell::Fixed(2)),
            col("peak RSS MB", "peak_rss_mb", Cell::Fixed(0)),
        ],
        &rows,
    );
    let vs_transformers = rows
        .get(1)
        .map(|t| rows[0].decode_tokens_per_s / t.decode_tokens_per_s);
    println!(
        "{threads} thread(s), {device:?}; weights read per token {:.3} GB, read bandwidth {bandwidth:.1} GB/s → bound {bound:.1} tok/s; fedee decode at {:.0} % of it (goal ≥ 80 %){}",
        weight_bytes as f64 / 1e9,
        100.0 * decode_tps / bound,
        vs_transformers.map_or(String::new(), |r| format!(
            "; fedee/transformers decode {r:.2} (goal ≥ 1.0)"
        ))
    );
    Ok(json!({
        "benchmark": "lm",
        "model": gguf_path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "device": format!("{device:?}"),
        "threads": threads,
        "dtype": "f32",
        "decode_tokens": decode,
        "weight_bytes_per_token": weight_bytes,
        "read_bandwidth_gb_per_s": bandwidth,
        "decode_bound_tokens_per_s": bound,
        "decode_fraction_of_bound": decode_tps / bound,
        "fedee_over_transformers_decode": vs_transformers,
        "transformers_version": transformers_version,
        "rows": rows,
    }))
}
