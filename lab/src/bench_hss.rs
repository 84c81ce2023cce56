//! `fedee bench hss`: HSS-EE against plain EE and the plaintext model on MiniLM.
//!
//! Three ways to classify the same drug reviews, in one run: the plaintext model here; plain
//! EE at a `fedee trainer` process (encrypted ids up, encrypted logits down, one round trip);
//! HSS-EE with two `fedee hss-server` processes (every encoder linear map on ring shares,
//! four round trips per layer). All three over mutual TLS on loopback where there is a
//! network. First the correctness of the whole drug-review test split (max |Δ logits|, argmax
//! agreement), then latency at 128 tokens, batch 1 and 16, CPU time per party, bytes and
//! round trips, and latency with a simulated round-trip delay added per round trip.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedee_encrypt::{KeySet, decrypt_outputs, encrypt_token_ids, transform_state};
use fedee_hss::client::{HssClient, classify, offloaded_state};
use fedee_hss::service::Remote;
use fedee_model::{
    Architecture, BertClassifierConfig, BertConfig, Input, OptimizerSpec, Profile, StateDict, bert,
    state_from_safetensors, state_to_safetensors,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::table::{self, Cell, col};

/// Options of `fedee bench hss`.
pub(crate) struct Options<'a> {
    pub minilm_dir: &'a Path,
    pub drugs_dir: &'a Path,
    pub reps: usize,
    pub rtts_ms: &'a [f64],
    pub batches: &'a [i64],
    pub seq_len: i64,
    pub engine: &'a str,
    pub reviews: usize,
    pub server_threads: i32,
}

struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fedee(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        bail!("fedee {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Start `fedee ROLE --listen 127.0.0.1:0 ARGS` and wait for its address.
fn start(dir: &Path, role: &str, args: &[&str]) -> Result<Proc> {
    let mut child = Command::new(std::env::current_exe()?)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .args([role, "--listen", "127.0.0.1:0"])
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let needle = format!("{role} listening on ");
    let addr = loop {
        let line = lines
            .next()
            .with_context(|| format!("{role} exited before listening"))??;
        if let Some(a) = line.strip_prefix(&needle) {
            break a.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    Ok(Proc { child, addr })
}

/// CPU seconds (user + system) of a process so far, from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let after = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the name; ticks of
    // 1/100 s on Linux.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// A classifier on MiniLM: the checkpoint's encoder and a head fitted (logistic regression
/// on the frozen mean-pooled features) to the training reviews, so argmax agreement is
/// measured on a model that classifies.
fn model(o: &Options<'_>) -> Result<(BertClassifierConfig, StateDict, f64)> {
    let bert = BertConfig::from_file(&o.minilm_dir.join("config.json"))?;
    let cfg = BertClassifierConfig {
        bert,
        num_labels: 3,
    };
    let mut state =
        bert::load_pretrained(&o.minilm_dir.join("model.safetensors"), &bert, Device::Cpu)?;
    let tok = fedee_model::text::TextTokenizer::from_file(
        &o.minilm_dir.join("tokenizer.json"),
        o.seq_len as usize,
    )?;
    let train = crate::drugs::load(&o.drugs_dir.join("drugsComTrain.tsv"))?;
    tch::manual_seed(0);
    state.extend(cfg.init_head(Kind::Float));
    let mut feats = Vec::new();
    for chunk in train.chunks(32) {
        let texts: Vec<&str> = chunk.iter().map(|r| r.text.as_str()).collect();
        let (ids, mask) = tok.batch(&texts)?;
        let h = tch::no_grad(|| {
            bert::encode(
                &bert,
                cfg.check_state(&state).expect("checked"),
                &ids,
                &mask,
            )
        });
        feats.push(bert::mean_pool(&h, &mask));
    }
    let x = Tensor::cat(&feats, 0);
    let y = Tensor::from_slice(&train.iter().map(|r| r.label).collect::<Vec<_>>());
    let mut w = Tensor::zeros([3, bert.hidden_size as i64], (Kind::Float, Device::Cpu))
        .set_requires_grad(true);
    let mut b = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let lr = 0.5;
    for _ in 0..500 {
        let loss = x.linear(&w, Some(&b)).cross_entropy_for_logits(&y);
        let (gw, gb) = {
            let g = Tensor::run_backward(&[loss], &[&w, &b], false, false);
            (g[0].shallow_clone(), g[1].shallow_clone())
        };
        tch::no_grad(|| {
            let _ = w.f_sub_(&(gw * lr)).map(|_| ());
            let _ = b.f_sub_(&(gb * lr)).map(|_| ());
        });
    }
    let acc = f64::try_from(
        x.linear(&w, Some(&b))
            .argmax(-1, false)
            .eq_tensor(&y)
            .to_kind(Kind::Float)
            .mean(Kind::Float),
    )?;
    state.insert("classifier.weight".into(), w.detach());
    state.insert("classifier.bias".into(), b.detach());
    Ok((cfg, state, acc))
}

/// Median latency, client CPU and server CPU per inference (s), and the last inference's wire
/// bytes up, down and round trips.
type RunFigures = (f64, f64, f64, (u64, u64, u64));

#[derive(Serialize)]
struct Row {
    mode: String,
    batch: i64,
    tokens: i64,
    latency_s: f64,
    latency_rtt_s: Vec<f64>,
    client_cpu_s: f64,
    server_cpu_s: Option<f64>,
    bytes_up: Option<u64>,
    bytes_down: Option<u64>,
    round_trips: Option<u64>,
    vs_plain_ee: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run the benchmark.
///
/// # Errors
/// Missing data or model files, or any party failing.
pub(crate) fn hss(o: &Options<'_>) -> Result<serde_json::Value> {
    let (cfg, plain, train_acc) = model(o)?;
    eprintln!(
        "hss: MiniLM + a head fitted on the training reviews (train accuracy {train_acc:.3})"
    );
    let spec = cfg.key_spec();
    let keys = KeySet::generate(
        &spec,
        &cfg.key_groups(Profile::Inference),
        false,
        &mut ChaCha20Rng::from_os_rng(),
    )?;
    let ee = transform_state(&spec, &keys, &plain)?;
    let off = offloaded_state(&cfg, &ee);
    let maps = fedee_hss::server::quantize_state(&off)?;
    let expected = fedee_hss::client::weight_frac_bits(&maps);

    let work = tempfile::tempdir()?;
    let dir = work.path();
    fedee(dir, &["certs", "init", "--dir", "pki"])?;
    for (role, name) in [
        ("--hss", "hss0"),
        ("--hss", "hss1"),
        ("--trainer", "trainer"),
    ] {
        fedee(
            dir,
            &[
                "certs",
                "issue",
                "--dir",
                "pki",
                role,
                name,
                "--host",
                "127.0.0.1",
            ],
        )?;
    }
    fedee(
        dir,
        &["certs", "issue", "--dir", "pki", "--client", "pharma"],
    )?;
    let tls = fedee_proto::pki::TlsFiles::in_dir(&dir.join("pki"), "pharma");
    let trainer = start(
        dir,
        "trainer",
        &["--tls-dir", "pki", "--tls-name", "trainer"],
    )?;
    let threads = o.server_threads.to_string();
    let server = |name: &str| {
        start(
            dir,
            "hss-server",
            &[
                "--tls-dir",
                "pki",
                "--tls-name",
                name,
                "--engine",
                o.engine,
                "--threads",
                &threads,
            ],
        )
    };
    let servers = [server("hss0")?, server("hss1")?];
    let url = |a: &str| format!("https://{a}");
    let rt = tokio::runtime::Runtime::new()?;
    let (mut tc, job, remote) = rt.block_on(async {
        let mut tc = fedee_trainer::TrainerClient::connect(&url(&trainer.addr), Some(&tls)).await?;
        let opt = OptimizerSpec::Sgd {
            lr: 1e-3,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let job = tc
            .create_job(
                &Architecture::BertClassifier(cfg),
                &opt,
                "f32",
                &state_to_safetensors(&ee)?,
            )
            .await?;
        let remote = Remote::connect(
            [&url(&servers[0].addr), &url(&servers[1].addr)],
            Some(&tls),
            &off,
            &expected,
        )
        .await?;
        anyhow::Ok((tc, job, remote))
    })?;
    let mut client = HssClient::with_maps(remote, maps);
    let ee_checked = cfg.check_state(&ee)?;
    let plain_checked = cfg.check_state(&plain)?;
    let plain_ee = |tc: &mut fedee_trainer::TrainerClient,
                    enc: &Tensor,
                    mask: &Tensor|
     -> Result<(Tensor, u64, u64)> {
        let batch = fedee_model::batch_to_safetensors(
            &Input::Tokens {
                ids: enc.shallow_clone(),
                mask: mask.shallow_clone(),
            },
            None,
        )?;
        let up = batch.len() as u64;
        let answer = rt.block_on(tc.predict(&job, batch))?;
        let down = answer.len() as u64;
        let z = state_from_safetensors(&answer, Device::Cpu)?
            .remove("logits")
            .context("no logits")?;
        Ok((z, up, down))
    };

    // --- Correctness on the whole test split ---------------------------------------------
    let mut test = crate::drugs::load(&o.drugs_dir.join("drugsComTest.tsv"))?;
    if o.reviews > 0 {
        test.truncate(o.reviews);
    }
    let tok = fedee_model::text::TextTokenizer::from_file(
        &o.minilm_dir.join("tokenizer.json"),
        o.seq_len as usize,
    )?;
    let (mut e_hss_plain, mut e_hss_ee, mut e_ee_plain) = (0f64, 0f64, 0f64);
    let (mut agree_plain, mut agree_ee, mut correct) = (0usize, 0usize, 0usize);
    let t = Instant::now();
    for chunk in test.chunks(16) {
        let texts: Vec<&str> = chunk.iter().map(|r| r.text.as_str()).collect();
        let (ids, mask) = tok.batch(&texts)?;
        let enc = encrypt_token_ids(&spec, &keys, &ids)?;
        let want = tch::no_grad(|| bert::classify(&cfg, plain_checked, &ids, &mask));
        let ee_logits = decrypt_outputs(&spec, &keys, &plain_ee(&mut tc, &enc, &mask)?.0)?;
        let hss = decrypt_outputs(
            &spec,
            &keys,
            &tch::no_grad(|| classify(&mut client, &cfg, ee_checked, &enc, &mask))?,
        )?;
        let d = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        e_hss_plain = e_hss_plain.max(d(&hss, &want));
        e_hss_ee = e_hss_ee.max(d(&hss, &ee_logits));
        e_ee_plain = e_ee_plain.max(d(&ee_logits, &want));
        let am = |t: &Tensor| Vec::<i64>::try_from(t.argmax(-1, false)).unwrap_or_default();
        let (h, p, e) = (am(&hss), am(&want), am(&ee_logits));
        agree_plain += h.iter().zip(&p).filter(|(a, b)| a == b).count();
        agree_ee += h.iter().zip(&e).filter(|(a, b)| a == b).count();
        correct += h.iter().zip(chunk).filter(|(a, r)| **a == r.label).count();
    }
    let n = test.len();
    eprintln!(
        "hss: test split, {n} reviews ({:.0} s): max |Δ logits| HSS-EE vs plaintext {e_hss_plain:.2e}, vs plain EE {e_hss_ee:.2e} (plain EE vs plaintext {e_ee_plain:.2e}); argmax agreement {agree_plain}/{n} and {agree_ee}/{n}; HSS-EE accuracy {:.3}",
        t.elapsed().as_secs_f64(),
        correct as f64 / n as f64
    );
    let correctness = json!({
        "reviews": n,
        "max_abs_logit_diff_hss_vs_plaintext": e_hss_plain,
        "max_abs_logit_diff_hss_vs_plain_ee": e_hss_ee,
        "max_abs_logit_diff_plain_ee_vs_plaintext": e_ee_plain,
        "argmax_agreement_vs_plaintext": agree_plain as f64 / n as f64,
        "argmax_agreement_vs_plain_ee": agree_ee as f64 / n as f64,
        "hss_accuracy": correct as f64 / n as f64,
        "head_train_accuracy": train_acc,
        "key_profile": "inference",
    });

    // --- Latency, CPU, bytes ---------------------------------------------------------------
    let pids: Vec<String> = servers.iter().map(|s| s.child.id().to_string()).collect();
    let tpid = trainer.child.id().to_string();
    let server_cpu = |pids: &[&str]| pids.iter().map(|p| cpu_seconds(p)).sum::<f64>();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut rows = Vec::new();
    for &b in o.batches {
        let ids: Vec<i64> = (0..b * o.seq_len)
            .map(|_| rng.random_range(1000..cfg.bert.vocab_size as i64))
            .collect();
        let ids = Tensor::from_slice(&ids).view([b, o.seq_len]);
        let mask = Tensor::ones([b, o.seq_len], (Kind::Int64, Device::Cpu));
        let enc = encrypt_token_ids(&spec, &keys, &ids)?;
        // Plaintext here.
        let mut lat = Vec::new();
        let c0 = cpu_seconds("self");
        for _ in 0..o.reps + 1 {
            let t = Instant::now();
            let _ = tch::no_grad(|| bert::classify(&cfg, plain_checked, &ids, &mask));
            lat.push(t.elapsed().as_secs_f64());
        }
        let client_cpu = (cpu_seconds("self") - c0) / (o.reps + 1) as f64;
        lat.remove(0);
        rows.push(Row {
            mode: "plaintext, local".into(),
            batch: b,
            tokens: o.seq_len,
            latency_s: median(lat),
            latency_rtt_s: vec![],
            client_cpu_s: client_cpu,
            server_cpu_s: None,
            bytes_up: None,
            bytes_down: None,
            round_trips: None,
            vs_plain_ee: None,
        });
        // Plain EE at the trainer.
        let mut lat = Vec::new();
        let (c0, s0) = (cpu_seconds("self"), server_cpu(&[&tpid]));
        let mut bytes = (0, 0);
        for _ in 0..o.reps + 1 {
            let t = Instant::now();
            let (z, up, down) = plain_ee(&mut tc, &enc, &mask)?;
            let _ = decrypt_outputs(&spec, &keys, &z)?;
            lat.push(t.elapsed().as_secs_f64());
            bytes = (up, down);
        }
        let k = (o.reps + 1) as f64;
        let (client_cpu, srv) = (
            (cpu_seconds("self") - c0) / k,
            (server_cpu(&[&tpid]) - s0) / k,
        );
        lat.remove(0);
        let ee_lat = median(lat);
        rows.push(Row {
            mode: "plain EE, trainer".into(),
            batch: b,
            tokens: o.seq_len,
            latency_s: ee_lat,
            latency_rtt_s: o.rtts_ms.iter().map(|r| ee_lat + r / 1e3).collect(),
            client_cpu_s: client_cpu,
            server_cpu_s: Some(srv),
            bytes_up: Some(bytes.0),
            bytes_down: Some(bytes.1),
            round_trips: Some(1),
            vs_plain_ee: Some(1.0),
        });
        // HSS-EE.
        let run = |client: &mut HssClient<Remote>, rtt: f64, reps: usize| -> Result<RunFigures> {
            client.added_rtt = Duration::from_secs_f64(rtt / 1e3);
            let mut lat = Vec::new();
            let (c0, s0) = (cpu_seconds("self"), server_cpu(&[&pids[0], &pids[1]]));
            let mut traffic = (0, 0, 0);
            for _ in 0..reps + 1 {
                let (before, wire) = (client.traffic, client.servers().wire_bytes);
                let t = Instant::now();
                let z = tch::no_grad(|| classify(client, &cfg, ee_checked, &enc, &mask))?;
                let _ = decrypt_outputs(&spec, &keys, &z)?;
                lat.push(t.elapsed().as_secs_f64());
                let w = client.servers().wire_bytes;
                traffic = (
                    w.0 - wire.0,
                    w.1 - wire.1,
                    client.traffic.round_trips - before.round_trips,
                );
            }
            let k = (reps + 1) as f64;
            let out = (
                (cpu_seconds("self") - c0) / k,
                (server_cpu(&[&pids[0], &pids[1]]) - s0) / k,
            );
            lat.remove(0);
            Ok((median(lat), out.0, out.1, traffic))
        };
        // The client's share of HSS-EE (attention, LayerNorm, GELU, the protocol) runs on one
        // libtorch thread: idle OpenMP workers would otherwise spin on the cores the servers
        // need while the client waits for them.
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        let (hss_lat, client_cpu, srv, (up, down, trips)) = run(&mut client, 0.0, o.reps)?;
        let mut with_rtt = Vec::new();
        for &r in o.rtts_ms {
            with_rtt.push(run(&mut client, r, o.reps.min(3))?.0);
        }
        client.added_rtt = Duration::ZERO;
        tch::set_num_threads(threads);
        rows.push(Row {
            mode: format!("HSS-EE, 2 servers ({})", o.engine),
            batch: b,
            tokens: o.seq_len,
            latency_s: hss_lat,
            latency_rtt_s: with_rtt,
            client_cpu_s: client_cpu,
            server_cpu_s: Some(srv),
            bytes_up: Some(up),
            bytes_down: Some(down),
            round_trips: Some(trips),
            vs_plain_ee: Some(hss_lat / ee_lat),
        });
        eprintln!("hss: batch {b} done");
    }
    let (h, i, l) = (
        cfg.bert.hidden_size as u64,
        cfg.bert.intermediate_size as u64,
        cfg.bert.num_hidden_layers as u64,
    );
    // Per layer and row: up 8·(in) per round trip to server 1 (+32-byte seeds), down 2·8·out.
    let per_row = 8 * (3 * h + i) + 16 * (3 * h + h + i + h);
    let arithmetic: Vec<serde_json::Value> = o
        .batches
        .iter()
        .map(|b| json!({"batch": b, "bytes": l * (per_row * (*b as u64) * o.seq_len as u64 + 4 * 32)}))
        .collect();
    table::print(
        &[
            col("mode", "mode", Cell::Text),
            col("batch", "batch", Cell::Text),
            col("tokens", "tokens", Cell::Text),
            col("latency", "latency_s", Cell::Millis),
            col("+RTT (s)", "latency_rtt_s", Cell::List(3)),
            col("× plain EE", "vs_plain_ee", Cell::Fixed(2)),
            col("client CPU", "client_cpu_s", Cell::Millis),
            col("server CPU (all)", "server_cpu_s", Cell::Millis),
            col("bytes up", "bytes_up", Cell::Text),
            col("bytes down", "bytes_down", Cell::Text),
            col("round trips", "round_trips", Cell::Text),
        ],
        &rows,
    );
    eprintln!("protocol arithmetic (bytes per inference): {arithmetic:?}");
    Ok(json!({
        "correctness": correctness,
        "rows": rows,
        "added_rtt_ms": o.rtts_ms,
        "arithmetic_bytes": arithmetic,
        "engine": o.engine,
        "threads_client_and_trainer": tch::get_num_threads(),
        "threads_per_hss_server": o.server_threads,
        "note": "one machine: the client, the trainer and both HSS servers share its cores; round-trip delay is simulated by a sleep before each round trip",
    }))
}
