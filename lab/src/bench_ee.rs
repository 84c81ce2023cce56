//! `fedee bench ee-overhead`, `transform` and `train`: EE model vs plaintext model, key
//! generation + transform time, and fedee's train step vs PyTorch eager on the same model.
//!
//! Timings are medians over repetitions after warm-up; plaintext and EE steps alternate so
//! that drift (frequency scaling, other load) affects both alike.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use fedee_encrypt::{
    KeySet, StateDict, decrypt_outputs, encrypt_inputs, encrypt_labels, encrypt_token_ids,
    transform_state,
};
use fedee_model::bert::{BertClassifierConfig, BertConfig, Profile};
use fedee_model::{Architecture, Input, MlpConfig, Model, OptimizerSpec};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::table::{self, Cell, col};

/// One model's EE overhead (medians, seconds).
#[derive(Serialize)]
struct OverheadRow {
    model: String,
    parameters: usize,
    batch: i64,
    /// Tokens per sequence (BERT only).
    seq_len: Option<i64>,
    train_step_plain_seconds: f64,
    train_step_ee_seconds: f64,
    train_step_ratio: f64,
    inference_plain_seconds: f64,
    inference_ee_seconds: f64,
    inference_ratio: f64,
    client_encrypt_batch_seconds: f64,
    client_decrypt_outputs_seconds: f64,
    max_abs_logit_diff_after_training: f64,
}

/// Key generation and transform of one model and profile (medians, seconds, one thread).
#[derive(Serialize)]
struct TransformRow {
    model: String,
    profile: String,
    parameters: usize,
    keygen_seconds: f64,
    transform_seconds: f64,
    total_seconds: f64,
    goal_seconds: f64,
    transform_mb_per_s: f64,
}

/// fedee's train step against PyTorch eager's on the same model and batch (medians).
#[derive(Serialize)]
struct TrainRow {
    model: String,
    parameters: usize,
    batch: i64,
    optimizer: OptimizerSpec,
    fedee_step_seconds: f64,
    pytorch_step_seconds: f64,
    speed_ratio: f64,
    pytorch_version: serde_json::Value,
}

/// Median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Seconds of `f`, synchronised on CUDA.
fn timed(device: Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    sync(device);
    let t = Instant::now();
    f()?;
    sync(device);
    Ok(t.elapsed().as_secs_f64())
}

/// The benchmark's models: the MLP of the main job (with a wider hidden layer so that the
/// step is not all call overhead) and MiniLM (all-MiniLM-L6-v2's shapes).
pub struct Models {
    pub mlp: MlpConfig,
    pub mlp_batch: i64,
    pub minilm: BertClassifierConfig,
    pub minilm_batch: i64,
    pub seq_len: i64,
}

impl Models {
    /// `(name, architecture, batch size)` of each benchmarked model.
    fn rows(&self) -> [(&'static str, Architecture, i64); 2] {
        [
            ("mlp", Architecture::Mlp(self.mlp.clone()), self.mlp_batch),
            (
                "minilm",
                Architecture::BertClassifier(self.minilm),
                self.minilm_batch,
            ),
        ]
    }

    /// MLP 13 → `hidden` → 2 (the heart features), MiniLM from `minilm_config`.
    ///
    /// # Errors
    /// If the MiniLM config.json cannot be read (`make data` fetches it).
    pub fn new(
        hidden: usize,
        mlp_batch: i64,
        minilm_config: &Path,
        minilm_batch: i64,
        seq_len: i64,
    ) -> Result<Self> {
        let bert = BertConfig::from_file(minilm_config).with_context(|| {
            format!(
                "reading MiniLM's config ({}); `make data` fetches it",
                minilm_config.display()
            )
        })?;
        Ok(Self {
            mlp: MlpConfig {
                in_features: crate::heart::NUM_FEATURES,
                hidden: vec![hidden],
                out_features: 2,
                activation: fedee_model::Activation::Relu,
            },
            mlp_batch,
            minilm: BertClassifierConfig {
                bert,
                num_labels: 3,
            },
            minilm_batch,
            seq_len,
        })
    }
}

fn random_state(arch: &Architecture) -> StateDict {
    tch::manual_seed(7);
    match arch {
        Architecture::Mlp(c) => fedee_model::Mlp::new(c.clone(), Device::Cpu, Kind::Float)
            .expect("valid MLP config")
            .state(),
        Architecture::BertClassifier(c) => c.init_random(Kind::Float),
        Architecture::Llama(_) => unreachable!("`fedee bench lm` measures the causal LM"),
    }
}

/// A plaintext batch for `arch`: features or token ids (all positions unmasked), labels.
fn batch(arch: &Architecture, n: i64, seq: i64, device: Device) -> (Input, Tensor) {
    tch::manual_seed(11);
    let classes = arch.num_classes() as i64;
    let y = Tensor::randint(classes, [n], (Kind::Int64, device));
    let input = match arch {
        Architecture::Mlp(c) => Input::Features(Tensor::randn(
            [n, c.in_features as i64],
            (Kind::Float, device),
        )),
        Architecture::BertClassifier(c) => Input::Tokens {
            ids: Tensor::randint(c.bert.vocab_size as i64, [n, seq], (Kind::Int64, device)),
            mask: Tensor::ones([n, seq], (Kind::Int64, device)),
        },
        Architecture::Llama(_) => unreachable!("`fedee bench lm` measures the causal LM"),
    };
    (input, y)
}

fn optimizer(arch: &Architecture) -> OptimizerSpec {
    match arch {
        // The site agent's local optimizer.
        Architecture::Mlp(_) => OptimizerSpec::Sgd {
            lr: 0.05,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        // The transformer demo's fine-tuning optimizer.
        Architecture::BertClassifier(_) | Architecture::Llama(_) => OptimizerSpec::AdamW {
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    }
}

/// EE overhead for one model: train step and inference of the EE model vs the plaintext model
/// (same batch, device, dtype), and the client's encrypt/decrypt cost per batch.
fn overhead_row(
    name: &str,
    arch: Architecture,
    n: i64,
    seq: i64,
    reps: usize,
    device: Device,
) -> Result<OverheadRow> {
    let state = random_state(&arch);
    let spec = arch.key_spec();
    let groups = arch.key_groups(Profile::Finetune);
    let keys = KeySet::generate(&spec, &groups, false, &mut ChaCha20Rng::seed_from_u64(3))?;
    let ee_state = transform_state(&spec, &keys, &state)?;
    let mut plain = Model::from_state(arch.clone(), &state, device, Kind::Float)?;
    let mut ee = Model::from_state(arch.clone(), &ee_state, device, Kind::Float)?;
    let opt = optimizer(&arch);
    let (mut popt, mut eopt) = (plain.optimizer(&opt)?, ee.optimizer(&opt)?);
    let (input, y) = batch(&arch, n, seq, device);
    let encrypt = |input: &Input, y: &Tensor| -> Result<(Input, Tensor)> {
        let enc = match input {
            Input::Features(x) => Input::Features(encrypt_inputs(&spec, &keys, x)?),
            Input::Tokens { ids, mask } => Input::Tokens {
                ids: encrypt_token_ids(&spec, &keys, ids)?,
                mask: mask.shallow_clone(),
            },
            Input::Embedded { .. } => {
                anyhow::bail!("the EE overhead bench sends ids, not embeddings")
            }
        };
        Ok((enc, encrypt_labels(&spec, &keys, y)?))
    };
    let (ee_input, ee_y) = encrypt(&input, &y)?;
    let (mut tp, mut te, mut ip, mut ie, mut enc, mut dec) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in 0..reps + 2 {
        let mut step_plain = || {
            timed(device, || {
                plain
                    .train_step(&mut popt, &input, &y)
                    .map(drop)
                    .map_err(Into::into)
            })
        };
        let mut step_ee = || {
            timed(device, || {
                ee.train_step(&mut eopt, &ee_input, &ee_y)
                    .map(drop)
                    .map_err(Into::into)
            })
        };
        // Alternate which model goes first, so order effects (caches, allocator) cancel.
        let (a, b) = if r % 2 == 0 {
            let a = step_plain()?;
            (a, step_ee()?)
        } else {
            let b = step_ee()?;
            (step_plain()?, b)
        };
        let (c, d, z) = tch::no_grad(|| -> Result<_> {
            // Alternate the order here too.
            let mut z = None;
            let mut run_ee = || {
                timed(device, || {
                    z = Some(ee.forward(&ee_input)?);
                    Ok(())
                })
            };
            let run_plain = || {
                timed(device, || {
                    plain.forward(&input).map(drop).map_err(Into::into)
                })
            };
            let (c, d) = if r % 2 == 0 {
                let c = run_plain()?;
                (c, run_ee()?)
            } else {
                let d = run_ee()?;
                (run_plain()?, d)
            };
            Ok((c, d, z.expect("forward ran")))
        })?;
        let e = timed(device, || encrypt(&input, &y).map(drop))?;
        let f = timed(device, || {
            decrypt_outputs(&spec, &keys, &z)
                .map(drop)
                .map_err(Into::into)
        })?;
        if r >= 2 {
            tp.push(a);
            te.push(b);
            ip.push(c);
            ie.push(d);
            enc.push(e);
            dec.push(f);
        }
    }
    // The EE model computes the same function: check it on this batch (SECURITY.md, "The math").
    let agree = tch::no_grad(|| -> Result<f64> {
        let p = plain.forward(&input)?;
        let e = decrypt_outputs(&spec, &keys, &ee.forward(&ee_input)?)?;
        Ok((p - e).abs().max().double_value(&[]))
    })?;
    let (tp, te, ip, ie) = (
        median(&mut tp),
        median(&mut te),
        median(&mut ip),
        median(&mut ie),
    );
    Ok(OverheadRow {
        model: name.to_owned(),
        parameters: state.values().map(Tensor::numel).sum(),
        batch: n,
        seq_len: matches!(arch, Architecture::BertClassifier(_)).then_some(seq),
        train_step_plain_seconds: tp,
        train_step_ee_seconds: te,
        train_step_ratio: te / tp,
        inference_plain_seconds: ip,
        inference_ee_seconds: ie,
        inference_ratio: ie / ip,
        client_encrypt_batch_seconds: median(&mut enc),
        client_decrypt_outputs_seconds: median(&mut dec),
        max_abs_logit_diff_after_training: agree,
    })
}

/// `fedee bench ee-overhead`.
pub fn ee_overhead(models: &Models, reps: usize, device: Device) -> Result<serde_json::Value> {
    let mut rows = Vec::new();
    for (name, arch, n) in models.rows() {
        // Sub-millisecond MLP steps need many repetitions for a stable median.
        let reps = if name == "mlp" { 100 * reps } else { reps };
        eprintln!("ee-overhead: {name}, batch {n}, {reps} repetitions …");
        rows.push(overhead_row(name, arch, n, models.seq_len, reps, device)?);
    }
    table::print(
        &[
            col("model", "model", Cell::Text),
            col("params", "parameters", Cell::Text),
            col("train plain", "train_step_plain_seconds", Cell::Millis),
            col("train EE", "train_step_ee_seconds", Cell::Millis),
            col("ratio", "train_step_ratio", Cell::Fixed(3)),
            col("infer plain", "inference_plain_seconds", Cell::Millis),
            col("infer EE", "inference_ee_seconds", Cell::Millis),
            col("ratio", "inference_ratio", Cell::Fixed(3)),
            col("encrypt", "client_encrypt_batch_seconds", Cell::Millis),
            col("decrypt", "client_decrypt_outputs_seconds", Cell::Millis),
        ],
        &rows,
    );
    println!(
        "goal: EE / plaintext ≤ 1.02 (medians; encrypt/decrypt are the client's cost per batch)"
    );
    Ok(json!({
        "benchmark": "ee-overhead",
        "device": format!("{device:?}"),
        "threads": tch::get_num_threads(),
        "dtype": "f32",
        "rows": rows,
    }))
}

/// `fedee bench transform`: key generation and EE transform on one core.
pub fn transform(models: &Models, reps: usize) -> Result<serde_json::Value> {
    tch::set_num_threads(1);
    let base = BertClassifierConfig {
        bert: BertConfig {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        },
        num_labels: 3,
    };
    let mut rows = Vec::new();
    for (name, cfg, goal) in [
        ("minilm", models.minilm, 1.0),
        ("bert-base (random)", base, 5.0),
    ] {
        eprintln!("transform: {name}: building the plaintext model …");
        let state = cfg.init_random(Kind::Float);
        let params: usize = state.values().map(Tensor::numel).sum();
        let spec = cfg.key_spec();
        for profile in [Profile::Finetune, Profile::Inference] {
            let (mut kg, mut tr) = (vec![], vec![]);
            for r in 0..reps {
                let mut rng = ChaCha20Rng::seed_from_u64(r as u64);
                let t = Instant::now();
                let keys = KeySet::generate(&spec, &cfg.key_groups(profile), false, &mut rng)?;
                kg.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                let ee = transform_state(&spec, &keys, &state)?;
                tr.push(t.elapsed().as_secs_f64());
                drop(ee);
            }
            let (kg, tr) = (median(&mut kg), median(&mut tr));
            rows.push(TransformRow {
                model: name.to_owned(),
                profile: format!("{profile:?}").to_lowercase(),
                parameters: params,
                keygen_seconds: kg,
                transform_seconds: tr,
                total_seconds: kg + tr,
                goal_seconds: goal,
                transform_mb_per_s: 4.0 * params as f64 / 1e6 / tr,
            });
        }
    }
    table::print(
        &[
            col("model", "model", Cell::Text),
            col("profile", "profile", Cell::Text),
            col("params", "parameters", Cell::Text),
            col("keygen s", "keygen_seconds", Cell::Fixed(3)),
            col("transform s", "transform_seconds", Cell::Fixed(3)),
            col("total s", "total_seconds", Cell::Fixed(3)),
            col("goal s", "goal_seconds", Cell::Fixed(1)),
            col("MB/s", "transform_mb_per_s", Cell::Fixed(0)),
        ],
        &rows,
    );
    println!("one thread (tch::set_num_threads(1)); medians of {reps}");
    Ok(json!({"benchmark": "transform", "threads": 1, "dtype": "f32", "rows": rows}))
}

/// `fedee bench train`: fedee's train step vs PyTorch eager (Python) on the same model, batch,
/// dtype and thread count, in the same run.
pub fn train(
    models: &Models,
    reps: usize,
    threads: i32,
    python: &Path,
    device: Device,
) -> Result<serde_json::Value> {
    tch::set_num_threads(threads);
    let mut rows = Vec::new();
    for (name, arch, n) in models.rows() {
        eprintln!("train: {name}: fedee (tch) …");
        let state = random_state(&arch);
        let mut model = Model::from_state(arch.clone(), &state, device, Kind::Float)?;
        let mut opt = model.optimizer(&optimizer(&arch))?;
        let (input, y) = batch(&arch, n, models.seq_len, device);
        let reps = if name == "mlp" { 100 * reps } else { reps };
        let mut t = vec![];
        for r in 0..reps + 2 {
            let s = timed(device, || {
                model
                    .train_step(&mut opt, &input, &y)
                    .map(drop)
                    .map_err(Into::into)
            })?;
            if r >= 2 {
                t.push(s);
            }
        }
        let fedee_s = median(&mut t);
        eprintln!("train: {name}: PyTorch eager (Python) …");
        let cfg = json!({
            "model": name,
            "arch": arch,
            "batch": n,
            "seq_len": models.seq_len,
            "reps": reps,
            "threads": threads,
            "device": if device.is_cuda() { "cuda" } else { "cpu" },
        });
        let py = crate::bench::python_side(
            python,
            "scripts/bench_torch_train.py",
            &cfg,
            "the project venv has torch",
        )?;
        let torch_s = py["step_seconds"].as_f64().context("step_seconds")?;
        rows.push(TrainRow {
            model: name.to_owned(),
            parameters: state.values().map(Tensor::numel).sum(),
            batch: n,
            optimizer: optimizer(&arch),
            fedee_step_seconds: fedee_s,
            pytorch_step_seconds: torch_s,
            speed_ratio: torch_s / fedee_s,
            pytorch_version: py["torch_version"].clone(),
        });
    }
    table::print(
        &[
            col("model", "model", Cell::Text),
            col("params", "parameters", Cell::Text),
            col("batch", "batch", Cell::Text),
            col("fedee step", "fedee_step_seconds", Cell::Millis),
            col("PyTorch step", "pytorch_step_seconds", Cell::Millis),
            col("PyTorch/fedee", "speed_ratio", Cell::Fixed(3)),
        ],
        &rows,
    );
    println!(
        "{threads} thread(s), f32, {device:?}, medians of {reps}; goal: PyTorch/fedee ≥ 1.0 (fedee no slower)"
    );
    Ok(json!({
        "benchmark": "train",
        "device": format!("{device:?}"),
        "threads": threads,
        "dtype": "f32",
        "rows": rows,
    }))
}
