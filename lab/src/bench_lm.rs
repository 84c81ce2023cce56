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

/// Tokens per second if a decode step were only its matrix–vector products: one `linear` of a
/// `(1, in)` vector by every matrix a token reads (the tied output layer included), in the
/// layout decoding uses; the best of 5 passes. What libtorch itself leaves of the bandwidth
/// bound.
fn gemv_ceiling(
    c: &llama::LlamaConfig,
    state: &fedee_model::StateDict,
    device: Device,
    sync: impl Fn(),
) -> f64 {
    let mats: Vec<(&Tensor, Tensor)> = state
        .iter()
        .filter(|(n, t)| t.dim() == 2 && (c.tied_embeddings || n.as_str() != "token_embd.weight"))
        .map(|(_, t)| (t, Tensor::ones([1, t.size()[1]], (Kind::Float, device))))
        .collect();
    let mut best = f64::MAX;
    for r in 0..6 {
        sync();
        let s = Instant::now();
        for (w, x) in &mats {
            let _ = x.linear::<&Tensor>(w, None);
        }
        sync();
        if r > 0 {
            best = best.min(s.elapsed().as_secs_f64());
        }
    }
    1.0 / best
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
    hss_chat: Option<&Path>,
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
        .map(|(k, v)| (k.clone(), llama::decode_layout(&v.to_device(device))))
        .collect();
    let load_seconds = started.elapsed().as_secs_f64();
    let c = &m.config;
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
    // Greedy decoding of `decode` tokens after the short prompt: seconds of one run.
    let decode_once = |state: &fedee_model::StateDict, prompt: &[i64]| -> Result<f64> {
        let s = c.check_state(state)?;
        let mut cache = KvCache::new(c, 1, PROMPTS[0] + decode + 1, Kind::Float, device);
        let x = Tensor::from_slice(prompt).unsqueeze(0).to_device(device);
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
        Ok(t.elapsed().as_secs_f64())
    };
    // Prefill at both lengths and greedy decoding after the short prompt, for one state (the
    // plaintext weights, or the EE weights fed encrypted ids: the same code path).
    let measure = |state: &fedee_model::StateDict, prompts: &[Vec<i64>]| -> Result<[f64; 3]> {
        let s = c.check_state(state)?;
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
        let p36 = prefill(&prompts[0])?;
        let p512 = prefill(&prompts[1])?;
        // Decode: the best of 3 runs.
        let mut best = f64::MAX;
        for _ in 0..3 {
            best = best.min(decode_once(state, &prompts[0])?);
        }
        Ok([p36, p512, decode as f64 / best])
    };
    eprintln!("lm: fedee plaintext prefill and decode ({decode} tokens) …");
    let [p36, p512, mut decode_tps] = measure(&state, &prompts)?;
    let mut rows = vec![Row {
        implementation: "fedee plaintext f32".into(),
        load_seconds,
        prefill_36_tokens_per_s: p36,
        prefill_512_tokens_per_s: p512,
        decode_tokens_per_s: decode_tps,
        peak_rss_mb: crate::bench_aggregate::own_mb("VmHWM:"),
    }];
    // EE (inference profile): keygen and transform, then the same measurements on encrypted
    // ids. Its peak RSS is not separable from the plaintext copy still in memory.
    eprintln!("lm: keygen, transform, EE prefill and decode …");
    let t = Instant::now();
    let spec = c.key_spec();
    let keys = fedee_encrypt::KeySet::generate(
        &spec,
        &c.key_groups(fedee_model::Profile::Inference),
        false,
        &mut <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(1),
    )?;
    let keygen_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let ee: fedee_model::StateDict = fedee_encrypt::transform_state(&spec, &keys, &m.state)?
        .into_iter()
        .map(|(k, v)| (k, llama::decode_layout(&v.to_device(device))))
        .collect();
    let transform_seconds = t.elapsed().as_secs_f64();
    let enc_prompts = prompts
        .iter()
        .map(|p| {
            Ok(Vec::<i64>::try_from(fedee_encrypt::encrypt_token_ids(
                &spec,
                &keys,
                &Tensor::from_slice(p),
            )?)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let [e36, e512, mut ee_decode] = measure(&ee, &enc_prompts)?;
    // The EE/plaintext ratio from alternating runs with both models in memory (3 each, the
    // best of each), so that neither side gets a quieter moment or a different memory state.
    let (mut plain_best, mut ee_best) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        plain_best = plain_best.min(decode_once(&state, &prompts[0])?);
        ee_best = ee_best.min(decode_once(&ee, &enc_prompts[0])?);
    }
    let ee_over_plain = plain_best / ee_best;
    ee_decode = ee_decode.max(decode as f64 / ee_best);
    decode_tps = decode_tps.max(decode as f64 / plain_best);
    rows[0].decode_tokens_per_s = decode_tps;
    drop(ee);
    rows.push(Row {
        implementation: "fedee EE f32".into(),
        load_seconds: load_seconds + keygen_seconds + transform_seconds,
        prefill_36_tokens_per_s: e36,
        prefill_512_tokens_per_s: e512,
        decode_tokens_per_s: ee_decode,
        peak_rss_mb: f64::NAN,
    });
    let proxy_us = proxy_cost_per_token(&m, &keys, &prompts[0], decode)?;
    // Every weight is read once per decoded token (the tied output layer reads the whole
    // embedding table); the embedding lookup's one row is negligible.
    let weight_bytes: i64 = state
        .iter()
        .filter(|(n, _)| c.tied_embeddings || n.as_str() != "token_embd.weight")
        .map(|(_, t)| t.numel() as i64 * 4)
        .sum();
    let bandwidth = read_bandwidth_gb_s(device);
    let bound = bandwidth * 1e9 / weight_bytes as f64;
    let gemv = gemv_ceiling(c, &state, device, sync);
    let mut transformers_version = serde_json::Value::Null;
    let mut through_proxy = serde_json::Value::Null;
    let mut through_hss_proxy = serde_json::Value::Null;
    if let Some(python) = hss_chat {
        eprintln!(
            "lm: time to first token and inter-token latency through the chat proxy with HSS-EE (two in-process servers) …"
        );
        let (ttft, itl, prompt_tokens) = proxy_latency(&m, &keys, python, Through::Hss)?;
        println!(
            "through the chat proxy with HSS-EE (openai client, streaming, {prompt_tokens}-token prompt, 2 answers of up to 32 tokens): time to first token {:.0} ms, inter-token {:.1} ms ({:.1}× the EE decode step)",
            ttft * 1e3,
            itl * 1e3,
            itl * ee_decode
        );
        through_hss_proxy = json!({
            "prompt_tokens": prompt_tokens,
            "time_to_first_token_s": ttft,
            "inter_token_s": itl,
            "over_ee_decode_step": itl * ee_decode,
        });
    }
    if let Some(python) = python {
        eprintln!("lm: time to first token and inter-token latency through the chat proxy …");
        let (ttft, itl, prompt_tokens) = proxy_latency(&m, &keys, python, Through::Trainer)?;
        // The proxy's and gRPC's share: the streamed gap minus the EE decode step measured
        // above.
        let overhead = itl - 1.0 / ee_decode;
        println!(
            "through the chat proxy (openai client, streaming, {prompt_tokens}-token prompt): time to first token {:.0} ms, inter-token {:.1} ms ({:+.2} ms per token over the EE decode step)",
            ttft * 1e3,
            itl * 1e3,
            overhead * 1e3
        );
        through_proxy = json!({
            "prompt_tokens": prompt_tokens,
            "time_to_first_token_s": ttft,
            "inter_token_s": itl,
            "overhead_per_token_s": overhead,
        });
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
        .get(2)
        .map(|t| rows[0].decode_tokens_per_s / t.decode_tokens_per_s);
    println!(
        "EE/plaintext decode {ee_over_plain:.3} (goal ≥ 0.98); keygen {keygen_seconds:.2} s + transform {transform_seconds:.2} s (inference profile); proxy work per token {proxy_us:.0} µs (goal ≤ 1000)"
    );
    println!(
        "{threads} thread(s), {device:?}; weights read per token {:.3} GB, read bandwidth {bandwidth:.1} GB/s → bound {bound:.1} tok/s; fedee decode at {:.0} % of it (goal ≥ 80 %){}",
        weight_bytes as f64 / 1e9,
        100.0 * decode_tps / bound,
        vs_transformers.map_or(String::new(), |r| format!(
            "; fedee/transformers decode {r:.2} (goal ≥ 1.0)"
        ))
    );
    println!(
        "libtorch's matrix-vector products alone over the same weights: {gemv:.1} tok/s ({:.0} % of the bound); fedee decode at {:.0} % of that",
        100.0 * gemv / bound,
        100.0 * decode_tps / gemv
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
        "gemv_only_tokens_per_s": gemv,
        "fedee_over_transformers_decode": vs_transformers,
        "ee_over_plaintext_decode": ee_over_plain,
        "keygen_seconds": keygen_seconds,
        "transform_seconds": transform_seconds,
        "proxy_microseconds_per_token": proxy_us,
        "through_proxy": through_proxy,
        "through_hss_proxy": through_hss_proxy,
        "transformers_version": transformers_version,
        "rows": rows,
    }))
}

/// The chat proxy's own work per generated token, in µs: decrypting the id, incremental
/// detokenization with a stop string, and the SSE chunk's JSON, over the greedy answer to
/// `prompt` (plaintext ids; the tokens are re-encrypted first, as the trainer sends them).
fn proxy_cost_per_token(
    m: &gguf::GgufModel,
    keys: &fedee_encrypt::KeySet,
    prompt: &[i64],
    decode: usize,
) -> Result<f64> {
    let lm = fedee_client::lm::LmKeys::new(m, keys.clone())?;
    let s = m.config.check_state(&m.state)?;
    let (tokens, _) = llama::greedy(&m.config, s, prompt, decode, None)?;
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let wire = lm.encrypt_ids(&ids);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let mut detok =
            fedee_client::chat_proxy::Detokenizer::new(&lm.tokenizer, vec!["\n\nUser:".into()]);
        let t = Instant::now();
        let mut bytes = 0;
        for &w in &wire {
            let id = lm.decrypt_id(w)?;
            let (text, _) = detok.push(id)?;
            let chunk = fedee_client::chat_proxy::chunk_json(
                "chatcmpl-0",
                0,
                "m",
                json!({ "content": text }),
                None,
            );
            bytes += chunk.to_string().len();
        }
        assert!(bytes > 0);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best * 1e6 / wire.len() as f64)
}

/// Where the proxy's model runs in [`proxy_latency`].
#[derive(Clone, Copy)]
enum Through {
    /// An in-process trainer holding the EE model.
    Trainer,
    /// Two in-process HSS servers holding its linear maps (int64 engine).
    Hss,
}

/// Time to first token and inter-token latency through the chat proxy as an OpenAI client
/// sees them: the EE model at an in-process trainer or two HSS servers (loopback, plaintext
/// gRPC), the proxy in front, and `scripts/bench_proxy_latency.py` streaming greedy answers
/// (5 of up to 64 tokens; through HSS 2 of up to 32). Returns (median time to first token s,
/// mean inter-token s, prompt tokens).
fn proxy_latency(
    m: &gguf::GgufModel,
    keys: &fedee_encrypt::KeySet,
    python: &Path,
    through: Through,
) -> Result<(f64, f64, usize)> {
    let lm = fedee_client::lm::LmKeys::new(m, keys.clone())?;
    // `fedee bench` runs inside the CLI's runtime: serve from a runtime on a thread of its own.
    // Tensors are not `Sync`: hand the thread its own handles to the same storage.
    let state: fedee_model::StateDict = m
        .state
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    let python = python.to_owned();
    let config = m.config.clone();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()?
            .block_on(serve_and_time(state, config, lm, &python, through))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the proxy benchmark thread panicked"))?
}

async fn serve_and_time(
    state: fedee_model::StateDict,
    config: fedee_model::llama::LlamaConfig,
    lm: fedee_client::lm::LmKeys,
    python: &Path,
    through: Through,
) -> Result<(f64, f64, usize)> {
    use fedee_client::chat_proxy::{Backend, HssLm};
    {
        let stop = tokio_util::sync::CancellationToken::new();
        let mut servers = vec![];
        let backend = match through {
            Through::Trainer => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let stop = stop.clone();
                servers.push(tokio::spawn(async move {
                    fedee_trainer::run(fedee_trainer::Config::default(), listener, stop)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))
                }));
                let mut client =
                    fedee_trainer::TrainerClient::connect(&format!("http://{addr}"), None).await?;
                let job = fedee_client::lm::upload(&mut client, &state, &lm, None, "f32").await?;
                Backend::Trainer { client, job }
            }
            Through::Hss => {
                let mut urls = vec![];
                for _ in 0..2 {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    urls.push(format!("http://{}", listener.local_addr()?));
                    let stop = stop.clone();
                    servers.push(tokio::spawn(async move {
                        fedee_hss::service::run(Default::default(), listener, stop)
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))
                    }));
                }
                let hss = HssLm::connect([&urls[0], &urls[1]], None, &lm, &config, &state).await?;
                Backend::Hss(std::sync::Arc::new(std::sync::Mutex::new(hss)))
            }
        };
        drop(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let proxy_addr = listener.local_addr()?;
        let proxy_stop = stop.clone();
        let proxy = tokio::spawn(fedee_client::chat_proxy::serve(
            listener,
            fedee_client::chat_proxy::Proxy {
                lm,
                backend,
                model: "bench".into(),
            },
            async move { proxy_stop.cancelled().await },
        ));
        let cfg = json!({
            "base_url": format!("http://{proxy_addr}/v1"),
            "model": "bench",
            "requests": if matches!(through, Through::Hss) { 2 } else { 5 },
            "max_tokens": if matches!(through, Through::Hss) { 32 } else { 64 },
        });
        let python = python.to_owned();
        let py = tokio::task::spawn_blocking(move || {
            crate::bench::python_side(
                &python,
                "scripts/bench_proxy_latency.py",
                &cfg,
                "make test installs the openai client into the venv",
            )
        })
        .await??;
        stop.cancel();
        for s in servers {
            let _ = s.await;
        }
        let _ = proxy.await;
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
                .unwrap_or_default()
        };
        let mut ttft = floats(&py["ttft_s"]);
        ttft.sort_by(f64::total_cmp);
        let gaps = floats(&py["inter_token_s"]);
        anyhow::ensure!(
            !ttft.is_empty() && !gaps.is_empty(),
            "no tokens streamed: {py}"
        );
        Ok((
            ttft[ttft.len() / 2],
            gaps.iter().sum::<f64>() / gaps.len() as f64,
            py["prompt_tokens"].as_u64().unwrap_or(0) as usize,
        ))
    }
}
