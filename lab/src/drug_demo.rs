//! `fedee demo --task drug-reviews`: pharma fine-tunes all-MiniLM-L6-v2 plus a fresh 3-class
//! head on Drugs.com reviews at a trainer that sees neither text nor labels (EE, `finetune`
//! profile), evaluates on encrypted test batches, downloads and decrypts, and compares with the
//! same fine-tuning in plaintext.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedee_encrypt::{
    KeySet, Optimizer, StateDict, check_trainable, decrypt_outputs, decrypt_state, encrypt_labels,
    encrypt_token_ids, transform_state,
};
use fedee_model::bert::{self, BertClassifierConfig, BertConfig, Profile};
use fedee_model::text::{TextTokenizer, pad};
use fedee_model::{
    Architecture, Input, Model, OptimizerSpec, batch_to_safetensors, state_from_safetensors,
    state_to_safetensors,
};
use fedee_site_agent::drugs::{self, CLASSES, Review};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use tokio_util::sync::CancellationToken;

use crate::demo::DemoArgs;
use fedee_proto::pki::TlsFiles;

#[derive(Serialize)]
struct Scores {
    accuracy: f64,
    macro_f1: f64,
}

#[derive(Serialize)]
struct StepSeconds {
    encrypted: f64,
    plaintext: f64,
    ratio: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    profile: Profile,
    train_reviews: usize,
    test_reviews: usize,
    max_len: usize,
    batch_size: usize,
    epochs: u32,
    steps: usize,
    optimizer: OptimizerSpec,
    ee: Scores,
    plaintext: Scores,
    majority_baseline_accuracy: f64,
    prediction_agreement: f64,
    max_abs_weight_diff: f64,
    keygen_transform_seconds: f64,
    step_seconds: StepSeconds,
    bytes_uploaded: usize,
    device: String,
    security_note: String,
    /// Distinct plaintext tokens (train and test reviews, each once) encrypted under the one
    /// vocabulary key of this run: the ciphertext volume the frequency attack works on.
    tokens_under_one_key: u64,
    /// Test-set inference again with client-side embeddings in shuffled token order.
    client_side_embeddings: EmbeddedInference,
    /// The client's default warning threshold (`fedee ee tokenize --max-tokens-per-key`).
    token_limit_per_key: u64,
    federation: Option<FederationReport>,
    wall_seconds: f64,
}

/// Test-set inference through the trainer with client-side embeddings (shuffled token order)
/// instead of token ids, on the same batches.
#[derive(Debug, Default, Serialize)]
struct EmbeddedInference {
    /// Max |logits(embedded, shuffled) − logits(ids)| over the test set.
    max_abs_logit_diff_vs_ids: f64,
    /// Padded tokens sent.
    tokens: u64,
    /// Batch bytes on the wire (safetensors), with ids and with embeddings.
    bytes_ids: u64,
    bytes_embedded: u64,
}

const SECURITY_NOTE: &str = "all-MiniLM-L6-v2's weights are public: a server holding the EE model and the public base model can recover the vocabulary and residual permutations by weight matching (ee-math.md, SECURITY.md). The claim that the trainer sees no text or labels holds only with base weights the server never saw in plaintext, key rotation, and bounded ciphertext volume per key; token ids are a substitution cipher open to frequency analysis.";

fn scores(pred: &[i64], gold: &[i64]) -> Scores {
    let n = gold.len().max(1) as f64;
    let accuracy = pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / n;
    let mut f1 = 0.0;
    for c in 0..CLASSES.len() as i64 {
        let tp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p == c && **g == c)
            .count() as f64;
        let fp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p == c && **g != c)
            .count() as f64;
        let fneg = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p != c && **g == c)
            .count() as f64;
        let (prec, rec) = (tp / (tp + fp).max(1.0), tp / (tp + fneg).max(1.0));
        f1 += if prec + rec > 0.0 {
            2.0 * prec * rec / (prec + rec)
        } else {
            0.0
        };
    }
    Scores {
        accuracy,
        macro_f1: f1 / CLASSES.len() as f64,
    }
}

fn max_abs_diff(a: &StateDict, b: &StateDict) -> f64 {
    a.iter()
        .map(|(k, v)| (v - &b[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

/// Run the drug-review demo.
///
/// # Errors
/// Missing model or data files (with the command that fetches them), or any party failing.
pub async fn run(args: &DemoArgs) -> Result<()> {
    let start = Instant::now();
    let device = fedee_site_agent::cli::parse_device(&args.device)?;
    let model_dir = &args.model_dir;
    let drugs_dir = &args.drugs_dir;
    for p in [
        model_dir.join("model.safetensors"),
        drugs_dir.join("drugsComTrain.tsv"),
    ] {
        if !p.exists() {
            bail!(
                "{} does not exist: run `make data` (or pass --model-dir / --drugs-dir)",
                p.display()
            );
        }
    }
    let bert_cfg = BertConfig::from_file(&model_dir.join("config.json"))?;
    let cfg = BertClassifierConfig {
        bert: bert_cfg,
        num_labels: CLASSES.len(),
    };
    let arch = Architecture::BertClassifier(cfg);
    let tok = TextTokenizer::from_file(&model_dir.join("tokenizer.json"), args.max_len)?;
    let mut train = drugs::load(&drugs_dir.join("drugsComTrain.tsv"))?;
    let mut test = drugs::load(&drugs_dir.join("drugsComTest.tsv"))?;
    if let Some(n) = args.limit {
        train.truncate(n);
        test.truncate(n);
    }
    let majority = (0..CLASSES.len() as i64)
        .max_by_key(|c| train.iter().filter(|r| r.label == *c).count())
        .unwrap_or(0);
    let majority_baseline_accuracy =
        test.iter().filter(|r| r.label == majority).count() as f64 / test.len() as f64;
    eprintln!(
        "[demo] drug reviews: {} train / {} test; majority class `{}` scores {majority_baseline_accuracy:.3} on test",
        train.len(),
        test.len(),
        CLASSES[majority as usize]
    );
    eprintln!("[demo] note: {SECURITY_NOTE}");

    // Plaintext starting point: public MiniLM plus a fresh head.
    let mut state =
        bert::load_pretrained(&model_dir.join("model.safetensors"), &cfg.bert, Device::Cpu)?;
    tch::manual_seed(args.seed as i64);
    state.extend(cfg.init_head(Kind::Float));

    // Keys and the EE model (pharma side).
    let t0 = Instant::now();
    let spec = cfg.key_spec();
    let keys = KeySet::generate(
        &spec,
        &cfg.key_groups(Profile::Finetune),
        false,
        &mut ChaCha20Rng::from_os_rng(),
    )?;
    check_trainable(&spec, &keys, Optimizer::AdamW)?;
    let ee_state = transform_state(&spec, &keys, &state)?;
    let keygen_transform_seconds = t0.elapsed().as_secs_f64();
    let ee_bytes = state_to_safetensors(&ee_state)?;
    eprintln!(
        "[demo] keygen + transform of MiniLM ({} keys, finetune profile): {keygen_transform_seconds:.2} s; EE model {:.1} MB",
        keys.keys.len(),
        ee_bytes.len() as f64 / 1e6
    );

    // The trainer (compute provider).
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let work = std::env::temp_dir().join(format!(
        "fedee-drug-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let pki = crate::demo::demo_pki(&work, &SITE_GROUPS)?;
    let pharma_tls = TlsFiles::in_dir(&pki, "pharma");
    let trainer = tokio::spawn(fedee_trainer::run(
        fedee_trainer::Config {
            device,
            tls: Some(TlsFiles::in_dir(&pki, "trainer")),
            ..Default::default()
        },
        listener,
        shutdown.clone(),
    ));
    let mut tc = crate::demo::connect_trainer_with_retry(&url, Some(&pharma_tls)).await?;
    let opt = OptimizerSpec::AdamW {
        lr: args.text_lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let job = tc.create_job(&arch, &opt, "f32", &ee_bytes).await?;
    eprintln!(
        "[demo] trainer at {url}: EE model uploaded ({} bytes, streamed in 1 MiB chunks), job {job}",
        ee_bytes.len()
    );

    // Tokenize once; the same batch order for both runs.
    let tokenize = |rs: &[Review]| -> Result<Vec<Vec<i64>>> {
        rs.iter()
            .map(|r| tok.ids(&r.text).map_err(Into::into))
            .collect()
    };
    let (train_ids, test_ids) = (tokenize(&train)?, tokenize(&test)?);
    // Exposure under the one key of this run (the demo keeps it throughout to show exactness;
    // a deployment rotates with `fedee ee rotate` past the limit, SECURITY.md).
    let tokens_under_one_key: u64 = train_ids
        .iter()
        .chain(&test_ids)
        .map(|s| s.len() as u64)
        .sum();
    let token_limit_per_key = fedee_encrypt::volume::DEFAULT_TOKEN_LIMIT;
    if let Some(w) =
        fedee_encrypt::volume::VolumeMeter::warning(tokens_under_one_key, token_limit_per_key)
    {
        eprintln!(
            "[demo] {w} (The demo keeps one key so that the encrypted and plaintext runs can be compared.)"
        );
    }
    let mut rng = ChaCha20Rng::seed_from_u64(args.seed);
    let bs = args.text_batch;
    let order: Vec<Vec<usize>> = (0..args.text_epochs)
        .map(|_| {
            let mut idx: Vec<usize> = (0..train.len()).collect();
            idx.shuffle(&mut rng);
            idx
        })
        .collect();
    let make = |rows: &[usize]| {
        let seqs: Vec<Vec<i64>> = rows.iter().map(|&i| train_ids[i].clone()).collect();
        let (ids, mask) = pad(&seqs);
        let y = Tensor::from_slice(&rows.iter().map(|&i| train[i].label).collect::<Vec<_>>());
        (ids, mask, y)
    };
    let steps_per_epoch = train.len().div_ceil(bs);

    // Encrypted fine-tuning at the trainer.
    let t_enc = Instant::now();
    for (e, idx) in order.iter().enumerate() {
        let mut batches = Vec::new();
        for rows in idx.chunks(bs) {
            let (ids, mask, y) = make(rows);
            let input = Input::Tokens {
                ids: encrypt_token_ids(&spec, &keys, &ids)?,
                mask,
            };
            batches.push(batch_to_safetensors(
                &input,
                Some(&encrypt_labels(&spec, &keys, &y)?),
            )?);
        }
        let epoch = e + 1;
        let losses = tc
            .train(&job, batches, |step, loss| {
                let s = (step as usize - 1) % steps_per_epoch + 1;
                if s.is_multiple_of(10) || s == steps_per_epoch {
                    eprintln!("[demo]   encrypted epoch {epoch} step {s}/{steps_per_epoch}: loss {loss:.4}");
                }
            })
            .await?;
        let mean = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
        eprintln!(
            "[demo] encrypted fine-tune epoch {epoch}/{}: mean loss {mean:.4}",
            args.text_epochs
        );
    }
    let enc_seconds = t_enc.elapsed().as_secs_f64();

    // The same fine-tuning in plaintext, locally.
    let mut plain = Model::from_state(arch.clone(), &state, device, Kind::Float)?;
    let mut popt = plain.optimizer(&opt)?;
    let t_plain = Instant::now();
    for (e, idx) in order.iter().enumerate() {
        let mut sum = 0.0;
        for rows in idx.chunks(bs) {
            let (ids, mask, y) = make(rows);
            let input = Input::Tokens {
                ids: ids.to_device(device),
                mask: mask.to_device(device),
            };
            sum += plain.train_step(&mut popt, &input, &y.to_device(device))?;
        }
        eprintln!(
            "[demo] plaintext fine-tune epoch {}/{}: mean loss {:.4}",
            e + 1,
            args.text_epochs,
            sum / steps_per_epoch as f64
        );
    }
    let plain_seconds = t_plain.elapsed().as_secs_f64();
    let steps = steps_per_epoch * args.text_epochs as usize;

    // Evaluation: encrypted test batches at the trainer vs plaintext locally.
    let mut ee_pred = Vec::new();
    let mut plain_pred = Vec::new();
    // Download the fine-tuned EE model: the client needs its current embedding tables to
    // embed on its side (the trainer fine-tuned them).
    let tuned_ee = state_from_safetensors(&tc.export_model(&job).await?, Device::Cpu)?;
    let mut embedded = EmbeddedInference::default();
    let mut shuffle_rng = ChaCha20Rng::from_os_rng();
    for rows in (0..test.len()).collect::<Vec<_>>().chunks(32) {
        let seqs: Vec<Vec<i64>> = rows.iter().map(|&i| test_ids[i].clone()).collect();
        let (ids, mask) = pad(&seqs);
        let enc = Input::Tokens {
            ids: encrypt_token_ids(&spec, &keys, &ids)?,
            mask: mask.shallow_clone(),
        };
        let batch = batch_to_safetensors(&enc, None)?;
        let padded_tokens = ids.numel() as u64;
        embedded.bytes_ids += batch.len() as u64;
        let out = tc.predict(&job, batch).await?;
        let logits = state_from_safetensors(&out, Device::Cpu)?
            .remove("logits")
            .context("Predict returned no logits")?;
        // The same batch as client-side embeddings in shuffled token order (the defence
        // against frequency analysis, SECURITY.md): the trainer gets vectors, no ids.
        let Input::Tokens { ids: enc_ids, .. } = &enc else {
            unreachable!("token batch")
        };
        let tuned = cfg.check_state(&tuned_ee)?;
        let (xs, ms) = tch::no_grad(|| {
            bert::embed_and_shuffle(&cfg.bert, tuned, enc_ids, &mask, &mut shuffle_rng)
        });
        let emb_batch = batch_to_safetensors(&Input::Embedded { x: xs, mask: ms }, None)?;
        embedded.bytes_embedded += emb_batch.len() as u64;
        let out = tc.predict(&job, emb_batch).await?;
        let emb_logits = state_from_safetensors(&out, Device::Cpu)?
            .remove("logits")
            .context("Predict returned no logits")?;
        embedded.max_abs_logit_diff_vs_ids = embedded
            .max_abs_logit_diff_vs_ids
            .max((&emb_logits - &logits).abs().max().double_value(&[]));
        embedded.tokens += padded_tokens;
        ee_pred.extend(Vec::<i64>::try_from(
            decrypt_outputs(&spec, &keys, &logits)?.argmax(-1, false),
        )?);
        let input = Input::Tokens {
            ids: ids.to_device(device),
            mask: mask.to_device(device),
        };
        let pl = tch::no_grad(|| plain.forward(&input))?;
        plain_pred.extend(Vec::<i64>::try_from(
            pl.argmax(-1, false).to_device(Device::Cpu),
        )?);
    }
    let gold: Vec<i64> = test.iter().map(|r| r.label).collect();
    let agreement = ee_pred
        .iter()
        .zip(&plain_pred)
        .filter(|(a, b)| a == b)
        .count() as f64
        / gold.len() as f64;
    let (ee, pl) = (scores(&ee_pred, &gold), scores(&plain_pred, &gold));

    // Decrypt the fine-tuned EE model.
    let tuned = decrypt_state(&spec, &keys, &tuned_ee)?;
    let plain_state: StateDict = plain
        .state()
        .into_iter()
        .map(|(k, v)| (k, v.to_device(Device::Cpu)))
        .collect();
    let max_abs_weight_diff = max_abs_diff(&tuned, &plain_state);
    shutdown.cancel();
    trainer.await.context("trainer task panicked")??;

    let federation = if args.federation_rounds > 0 {
        let with_condition = |rs: &[Review], ids: &[Vec<i64>]| -> Vec<(Vec<i64>, i64, String)> {
            rs.iter()
                .zip(ids)
                .map(|(r, i)| (i.clone(), r.label, r.condition.clone()))
                .collect()
        };
        let f = federate(
            args,
            &pki,
            arch,
            &state,
            &with_condition(&train, &train_ids),
            &with_condition(&test, &test_ids),
            device,
        )
        .await?;
        eprintln!(
            "[demo] federation of the classifier: {} rounds, {:.1} MB per update, {:.0} s",
            f.rounds,
            f.update_bytes as f64 / 1e6,
            f.seconds
        );
        Some(f)
    } else {
        None
    };

    eprintln!(
        "[demo] test: EE accuracy {:.3} macro-F1 {:.3}; plaintext accuracy {:.3} macro-F1 {:.3}; majority baseline {:.3}; prediction agreement {agreement:.3}; max |Δw| {max_abs_weight_diff:.2e}",
        ee.accuracy, ee.macro_f1, pl.accuracy, pl.macro_f1, majority_baseline_accuracy
    );
    let (se, sp) = (enc_seconds / steps as f64, plain_seconds / steps as f64);
    eprintln!(
        "[demo] inference with client-side embeddings, shuffled token order (the trainer gets no token ids): max |Δ logits| vs ids {:.1e}; {:.0} bytes per token on the wire vs {:.0} with ids",
        embedded.max_abs_logit_diff_vs_ids,
        embedded.bytes_embedded as f64 / embedded.tokens.max(1) as f64,
        embedded.bytes_ids as f64 / embedded.tokens.max(1) as f64
    );
    eprintln!(
        "[demo] step time: encrypted (trainer, incl. gRPC) {se:.3} s, plaintext {sp:.3} s, ratio {:.2}",
        se / sp
    );
    let report = Report {
        model: "all-MiniLM-L6-v2 + mean pooling + linear head".into(),
        profile: Profile::Finetune,
        train_reviews: train.len(),
        test_reviews: test.len(),
        max_len: args.max_len,
        batch_size: bs,
        epochs: args.text_epochs,
        steps,
        optimizer: opt,
        ee,
        plaintext: pl,
        majority_baseline_accuracy,
        prediction_agreement: agreement,
        max_abs_weight_diff,
        keygen_transform_seconds,
        step_seconds: StepSeconds {
            encrypted: se,
            plaintext: sp,
            ratio: se / sp,
        },
        bytes_uploaded: ee_bytes.len(),
        device: format!("{device:?}"),
        security_note: SECURITY_NOTE.into(),
        tokens_under_one_key,
        token_limit_per_key,
        client_side_embeddings: embedded,
        federation,
        wall_seconds: start.elapsed().as_secs_f64(),
    };
    let path = args
        .report
        .clone()
        .unwrap_or_else(|| "drug-reviews-report.json".into());
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "[demo] report written to {} ({:.1} s)",
        path.display(),
        report.wall_seconds
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The three sites of the federated part, by condition group.
const SITE_GROUPS: [&str; 3] = ["mental-health", "other-conditions", "reproductive-health"];

/// Condition group of a review: the three sites of the federated part.
fn condition_group(condition: &str) -> &'static str {
    let c = condition.to_lowercase();
    if c.contains("contracept")
        || c.contains("birth control")
        || c.contains("uterine")
        || c.contains("menstrua")
    {
        "reproductive-health"
    } else if [
        "depress", "anxiety", "bipolar", "insomnia", "adhd", "schizo", "panic", "ptsd", "ocd",
        "smoking", "alcohol", "opiate",
    ]
    .iter()
    .any(|k| c.contains(k))
    {
        "mental-health"
    } else {
        "other-conditions"
    }
}

#[derive(Serialize)]
pub(crate) struct FederationReport {
    rounds: u32,
    sites: BTreeMap<String, (usize, usize)>,
    update_bytes: usize,
    site_accuracy: Vec<BTreeMap<String, f64>>,
    clipping_norm: f64,
    noise_multiplier: f64,
    epsilon: f64,
    delta: f64,
    privacy_note: String,
    seconds: f64,
}

/// Three sites holding reviews split by condition group run FedAvg rounds of the classifier
/// over gRPC; each update is the whole model (about 90 MB), streamed in 1 MiB chunks.
pub(crate) async fn federate(
    args: &DemoArgs,
    pki: &std::path::Path,
    arch: Architecture,
    initial: &StateDict,
    train: &[(Vec<i64>, i64, String)],
    test: &[(Vec<i64>, i64, String)],
    device: Device,
) -> Result<FederationReport> {
    let start = Instant::now();
    let (c, sigma, delta) = (10.0, 1e-5, 1e-5);
    let work = std::env::temp_dir().join(format!(
        "fedee-drugfed-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&work)?;
    let config = fedee_aggregator::Config {
        database_url: format!("sqlite://{}?mode=rwc", work.join("aggregator.db").display()),
        blob_dir: work.join("blobs"),
        round_timeout: std::time::Duration::from_secs(1800),
        metrics_listen: None,
        rounds: args.federation_rounds,
        min_sites: 3,
        clipping_norm: fedee_dp::ClippingNorm::new(c)?,
        noise_multiplier: fedee_dp::NoiseMultiplier::new(sigma)?,
        dp_mode: fedee_dp::DpMode::Site,
        strategy: fedee_aggregator::strategy::Strategy::FedAvg,
        proximal_mu: 0.0,
        delta,
        local_epochs: 1,
        learning_rate: args.text_lr,
        batch_size: args.text_batch as u32,
        initial_model: Some(state_to_safetensors(initial)?),
        tls: Some(TlsFiles::in_dir(pki, "aggregator")),
        enroll: SITE_GROUPS.iter().map(|s| (*s).to_owned()).collect(),
        max_concurrent_uploads: 4,
        direct_io: fedee_aggregator::blobs::DirectIo::Auto,
        spec: None,
    };
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let agg = tokio::spawn(fedee_aggregator::run(config, listener, shutdown.clone()));
    let mut sites = BTreeMap::new();
    let mut handles = Vec::new();
    for group in SITE_GROUPS {
        let pick = |rows: &[(Vec<i64>, i64, String)]| -> Vec<(Vec<i64>, i64)> {
            rows.iter()
                .filter(|r| condition_group(&r.2) == group)
                .map(|r| (r.0.clone(), r.1))
                .collect()
        };
        let (tr, te) = (pick(train), pick(test));
        eprintln!(
            "[demo] federated site {group}: {} train / {} test reviews",
            tr.len(),
            te.len()
        );
        sites.insert(group.to_owned(), (tr.len(), te.len()));
        let task = fedee_site_agent::task::TextTask::new(arch.clone(), tr, te, device);
        handles.push(tokio::spawn(fedee_site_agent::run(
            fedee_site_agent::SiteConfig {
                aggregator: url.clone(),
                site: group.to_owned(),
                task: Box::new(task),
                device,
                seed: None,
                poll_interval: std::time::Duration::from_millis(100),
                retry: fedee_site_agent::client::Retry::default(),
                noise: fedee_dp::noise::Sampler::Fast,
                ledger: None,
                epsilon_budget: None,
                spec: None,
                tls: Some(TlsFiles::in_dir(pki, group)),
            },
        )));
    }
    let mut fed = fedee_site_agent::client::Link::connect(
        &url,
        Some(&TlsFiles::in_dir(pki, "pharma")),
        fedee_site_agent::client::Retry::default(),
    )?;
    let mut printed = 0;
    loop {
        let st = fed.status().await?;
        printed = crate::demo::print_closed_rounds(&st, printed, args.federation_rounds);
        if st.done || handles.iter().any(|h| h.is_finished()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    for h in handles {
        h.await
            .context("site task panicked")?
            .context("site agent failed")?;
    }
    let st = fed.status().await?;
    if !st.done {
        bail!("the drug-review federation did not finish");
    }
    // Model 1 (before any round) and the model each round produced.
    let mut site_accuracy = Vec::new();
    for r in &st.rounds {
        site_accuracy.push(
            r.site_metrics
                .iter()
                .map(|m| (m.site.clone(), m.test_accuracy))
                .collect(),
        );
    }
    let update_bytes = fed.download_model(1).await?.len();
    let epsilon = st.rounds.last().map(|r| r.epsilon).unwrap_or(0.0);
    shutdown.cancel();
    agg.await.context("aggregator task panicked")??;
    let _ = std::fs::remove_dir_all(&work);
    Ok(FederationReport {
        rounds: args.federation_rounds,
        sites,
        update_bytes,
        site_accuracy,
        clipping_norm: c,
        noise_multiplier: sigma,
        epsilon,
        delta,
        privacy_note: "site-level DP on a 22M-parameter update: any σ that keeps the model useful gives a meaningless ε; this part demonstrates carrying the model, not privacy".into(),
        seconds: start.elapsed().as_secs_f64(),
    })
}
