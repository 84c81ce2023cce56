//! `fedee bench NAME`: benchmarks that print a table and write JSON whose keys carry their
//! units. Figures come from one run on this machine; nothing here is a pass/fail test.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;
use fedee_dp::noise::{Sampler, add_noise};
use rand::SeedableRng;
use serde_json::json;

use crate::table::{self, Cell, col};

/// The models of `ee-overhead` and `train`.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Hidden units of the MLP (13 heart features → HIDDEN → 2 classes; the main job's MLP
    /// has 8, which makes every step pure call overhead).
    #[arg(long, default_value_t = 512)]
    mlp_hidden: usize,
    /// MLP batch size.
    #[arg(long, default_value_t = 64)]
    mlp_batch: i64,
    /// MiniLM's Hugging Face config.json (`make data` fetches it); weights are random, as
    /// values do not change the time of a step.
    #[arg(long, default_value = "data/cache/minilm/config.json")]
    minilm_config: PathBuf,
    /// MiniLM batch size.
    #[arg(long, default_value_t = 16)]
    minilm_batch: i64,
    /// MiniLM sequence length (tokens, all unmasked).
    #[arg(long, default_value_t = 128)]
    seq_len: i64,
    /// Timed repetitions (after 2 warm-up steps); medians are reported.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// libtorch threads [default: all logical CPUs].
    #[arg(long)]
    threads: Option<i32>,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl ModelArgs {
    fn models(&self) -> Result<crate::bench_ee::Models> {
        crate::bench_ee::Models::new(
            self.mlp_hidden,
            self.mlp_batch,
            &self.minilm_config,
            self.minilm_batch,
            self.seq_len,
        )
    }
    fn threads(&self) -> i32 {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as i32))
    }
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// EE overhead: train step and inference of the EE model vs the plaintext model (same
    /// batch, device, dtype) for the MLP and MiniLM, and the client's cost to encrypt a batch
    /// and decrypt outputs. Goal: ratio ≤ 1.02.
    EeOverhead {
        #[command(flatten)]
        models: ModelArgs,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Key generation + EE transform on one core: MiniLM (goal < 1 s) and a random
    /// BERT-base-sized model, 110 M parameters (goal < 5 s), for both key profiles.
    Transform {
        /// MiniLM's Hugging Face config.json (`make data` fetches it).
        #[arg(long, default_value = "data/cache/minilm/config.json")]
        minilm_config: PathBuf,
        /// Timed repetitions; medians are reported.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Secure aggregation (Bonawitz et al. double masking; SecAgg+ with --degrees below
    /// n − 1): one round in memory per cell, every site and the server in this process, per
    /// stage, beside plaintext FedAvg's fold. Sites drop out after sharing keys (the costly
    /// case for the server). Threshold: a strict majority of each site's k + 1 holders.
    Secagg {
        /// Numbers of sites (comma-separated; 3 to 255).
        #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
        sites: Vec<usize>,
        /// Update sizes in parameters (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
        params: Vec<usize>,
        /// Dropout fractions (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.3")]
        dropouts: Vec<f64>,
        /// Neighbours per site (comma-separated; 0 = all, n − 1; odd numbers round down).
        #[arg(long, value_delimiter = ',', default_value = "0,20")]
        degrees: Vec<usize>,
        /// Skip cells that would expand more mask words than this (a 2-core machine expands
        /// about 7e8 per second).
        #[arg(long, default_value_t = 6e10)]
        max_words: f64,
        /// Python with `flwr` for the per-mask comparison with Flower's SecAgg+ primitives
        /// (`make bench` installs it into .venv); skipped if it does not import.
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Also run a whole Flower SecAgg+ round (Flower's simulation runtime, Ray: `pip
        /// install "flwr[simulation]"`) for every cell, beside a plain Flower round of all the
        /// clients; in the secure round the same fraction of clients drops out after sharing
        /// keys (a client mod makes them fail the masked-input stage).
        #[arg(long)]
        flower_rounds: bool,
        /// Then run the heart-disease federation (three site agents, mutual TLS on loopback)
        /// for this many rounds, plaintext and over secure aggregation, and compare seconds
        /// per round (0 skips it).
        #[arg(long, default_value_t = 5)]
        federation_rounds: u32,
        /// Site agents in that federation (3 to 255; beyond three they share the hospitals'
        /// rows).
        #[arg(long, default_value_t = 3)]
        federation_sites: usize,
        /// Hidden layer widths of that federation's MLP instead of the spec's (e.g.
        /// 1024,1024 for about 1 M parameters).
        #[arg(long, value_delimiter = ',')]
        federation_hidden: Option<Vec<usize>>,
        /// heart_disease_uci.csv for --federation-rounds (`make data`).
        #[arg(long, default_value = "data/cache/heart_disease_uci.csv")]
        data: PathBuf,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Aggregation at scale: a `fedee-aggregator` process (libtorch-free; `fedee aggregator` if it is not built) ingests one round from SITES sites
    /// over loopback gRPC with mutual TLS and aggregates it (FedAvg); reports ingest MB/s and
    /// the aggregator's peak RSS, beside Flower's NumPy `aggregate` on the same update files.
    Aggregate {
        /// Numbers of sites (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "4,16,64")]
        sites: Vec<usize>,
        /// Model sizes in parameters (comma-separated; K and M suffixes).
        #[arg(long, value_delimiter = ',', default_value = "1M,22M,100M",
              value_parser = crate::bench_aggregate::parse_params)]
        params: Vec<usize>,
        /// The aggregator's --max-concurrent-uploads.
        #[arg(long, default_value_t = 4)]
        max_concurrent_uploads: usize,
        /// The aggregator's --direct-io: `auto` (rounds over the kernel's background
        /// write-back threshold bypass the page cache), `off`, or a round size in MB (0:
        /// every round). Column `direct` shows what each cell used.
        #[arg(long, default_value = "auto", value_name = "auto|off|MB",
              value_parser = |s: &str| s.parse::<fedee_aggregator::blobs::DirectIo>().map(|_| s.to_owned()))]
        direct_io: String,
        /// Where the aggregator's database and blobs go (needs sites × model size free).
        #[arg(long, default_value = "target/bench-work")]
        work_dir: PathBuf,
        /// Python with `flwr` for the Flower side (`make bench` installs it into .venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Skip the Flower side.
        #[arg(long)]
        no_flower: bool,
        /// Run each cell again with the aggregator's dashboard open: an HTTPS client that
        /// follows its server-sent events and fetches the overview on each, as a browser
        /// does (column `dashboard`; compare `round s`).
        #[arg(long)]
        dashboard: bool,
        /// Skip Flower where it would need more memory than this (MB) [default: 70 % of
        /// MemAvailable].
        #[arg(long)]
        flower_max_mb: Option<f64>,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Local training vs PyTorch: fedee's train step (MLP with SGD as the site agent; MiniLM
    /// with AdamW as the fine-tuning demo) vs the same model in PyTorch eager (Python), same
    /// batch, dtype and thread count, in the same run. Goal: PyTorch time / fedee time ≥ 1.
    Train {
        #[command(flatten)]
        models: ModelArgs,
        /// Python with torch (the project venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The causal LM (SmolLM2-135M-Instruct's GGUF file, f32): load time, prefill tokens/s at
    /// 36 and 512 prompt tokens, decode tokens/s, peak RSS and decode against the read
    /// bandwidth measured in the same run; beside Hugging Face transformers on the same file,
    /// prompt ids and thread count. Goals: fedee/transformers decode ≥ 1.0; decode ≥ 80 % of
    /// the bandwidth bound.
    Lm {
        /// The GGUF file (`make data` fetches it).
        #[arg(
            long,
            default_value = "data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )]
        gguf: PathBuf,
        /// Tokens decoded greedily after a 36-token prompt.
        #[arg(long, default_value_t = 128)]
        decode: usize,
        /// libtorch threads (both sides) [default: all logical CPUs].
        #[arg(long)]
        threads: Option<i32>,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Python with transformers, gguf and accelerate (`make bench` installs them).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Skip the transformers side (and the trainer proxy's latency).
        #[arg(long)]
        no_transformers: bool,
        /// Also time the chat proxy with HSS-EE: two in-process HSS servers hold the EE
        /// model's linear maps (2 streamed answers of up to 32 tokens).
        #[arg(long)]
        hss_chat: bool,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// HSS-EE (two non-colluding servers, linear maps on ring shares) beside plain EE at the
    /// trainer and the plaintext model, on MiniLM with a head fitted to the drug reviews: the
    /// whole test split's logits compared, then latency at --seq-len tokens per batch size,
    /// CPU time per party, bytes, round trips, and latency with a simulated delay added to
    /// each round trip. Goals: HSS-EE within 6× of plain EE on loopback; bytes within 10 % of
    /// the protocol's arithmetic.
    /// The operator dashboard's render time on a long history: every page and its JSON twin
    /// with --sites sites × --rounds rounds of updates, metrics and privacy entries (SQLite),
    /// through the dashboard's router in process. Goal: p95 page render ≤ 200 ms.
    Dashboard {
        /// Sites in the history.
        #[arg(long, default_value_t = 100)]
        sites: usize,
        /// Rounds in the history.
        #[arg(long, default_value_t = 1000)]
        rounds: u32,
        /// Timed requests per page after one warm-up.
        #[arg(long, default_value_t = 40)]
        reps: usize,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    Hss {
        /// MiniLM checkpoint directory (`make data` fetches it).
        #[arg(long, default_value = "data/cache/minilm")]
        minilm_dir: PathBuf,
        /// Drug-review TSV directory (`make data`).
        #[arg(long, default_value = "data/cache/drugs")]
        drugs_dir: PathBuf,
        /// Batch sizes (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        batches: Vec<i64>,
        /// Tokens per sequence in the timed runs (all unmasked).
        #[arg(long, default_value_t = 128)]
        seq_len: i64,
        /// Round-trip delays added, ms (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "0.1,1,20")]
        rtt_ms: Vec<f64>,
        /// Timed repetitions after one warm-up; medians are reported.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// The servers' share engine: int64, limbs or limbs-cuda.
        #[arg(long, default_value = "int64")]
        engine: String,
        /// libtorch threads of each HSS server (the two share this machine's cores; the
        /// trainer and the client use all of them).
        #[arg(long, default_value_t = 1)]
        server_threads: i32,
        /// Compare only the first N test reviews (0: the whole split, 379).
        #[arg(long, default_value_t = 0)]
        reviews: usize,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// DP noise: Gaussian values per second of the fast sampler (one core) and of OpenDP's
    /// exact sampler (on one core, then on every core), on the same machine in the same run.
    Noise {
        /// Values drawn with the fast sampler.
        #[arg(long, default_value_t = 20_000_000)]
        fast_values: usize,
        /// Values drawn with the exact sampler, each way (about 15 s per million per core).
        #[arg(long, default_value_t = 300_000)]
        exact_values: usize,
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// FLamby's Fed-Heart-Disease protocol on all four hospitals (logistic regression, 15
    /// rounds × 100 local updates of batch 4), 5 seeds, every strategy and record-level DP at
    /// ε = 1 (δ = 1e-4), beside FLamby's published figures.
    FlambyHeart {
        /// heart_disease_uci.csv (`make data` fetches it).
        #[arg(long, default_value = "data/cache/heart_disease_uci.csv")]
        data: PathBuf,
        /// Seeds (model initialisation, batch order, DP noise).
        #[arg(long, default_value_t = 5)]
        seeds: u64,
        /// Local SGD learning rate of the runs without DP (one for every strategy).
        #[arg(long, default_value_t = 0.05)]
        lr: f64,
        /// Local DP-SGD learning rate of the record-level DP run.
        #[arg(long, default_value_t = 0.01)]
        dp_lr: f64,
        /// FedAdam / FedYogi server learning rate.
        #[arg(long, default_value_t = 0.03)]
        server_lr: f64,
        /// Local optimizer: Adam (as FLamby's pooled training) instead of SGD.
        #[arg(long)]
        adam: bool,
        /// Raw features, not standardised per hospital (as FLamby).
        #[arg(long, conflicts_with = "pooled_standardization")]
        raw_features: bool,
        /// Standardise every hospital with the mean and std of the union of the four
        /// training sets (the exact figures `standardize = "federated"` estimates under DP)
        /// instead of each hospital's own.
        #[arg(long)]
        pooled_standardization: bool,
        /// Choose each row's learning rates (local × {0.2, 1, 4}, DP × {0.5, 1, 5}, FedAdam /
        /// FedYogi server × {⅓, 1, 3⅓}) on a validation split (20 % of each hospital's training
        /// records, trained on the other 80 %), then train the chosen configuration on the full
        /// training split and report its test accuracy. The test split is never used to choose.
        #[arg(long)]
        tune: bool,
        /// Also write the figures as JSON (`rows` of {strategy, dp, mean_accuracy, per_seed}).
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Today's date (UTC, YYYY-MM-DD), for the record.
fn date() -> String {
    time::OffsetDateTime::now_utc().date().to_string()
}

/// What machine the figures come from: CPU, cores, OS, the libtorch this process loaded and
/// the GPUs `nvidia-smi` lists (name, driver, memory), for the CUDA rows of issue 6.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    json!({
        "cpu": cpu,
        "logical_cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "os": std::env::consts::OS,
        "libtorch": libtorch(),
        "cuda_devices_visible": tch::Cuda::device_count(),
        "gpus": gpus(),
    })
}

/// The libtorch this process runs on: the folder `libtorch_cpu.so` was mapped from (the
/// build's rpath, or `LD_LIBRARY_PATH` on a GPU machine) and the version written in the
/// `torch/version.py` beside it (`2.11.0+cu130`; `null` outside a Python torch package).
fn libtorch() -> serde_json::Value {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let Some(lib) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
    else {
        return serde_json::Value::Null;
    };
    let dir = std::path::Path::new(lib).parent();
    let field = |key: &str| {
        let py = std::fs::read_to_string(dir?.parent()?.join("version.py")).ok()?;
        // `__version__ = '2.11.0+cu130'`, `cuda: Optional[str] = '13.0'` (or `None`).
        py.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_once('='))
            .map(|(_, v)| v.trim().trim_matches('\'').to_owned())
            .filter(|v| v != "None")
    };
    json!({
        "dir": dir.map(|d| d.display().to_string()),
        "version": field("__version__ "),
        "cuda_version": field("cuda:"),
    })
}

/// Each GPU as `nvidia-smi` reports it; empty where it is not installed.
fn gpus() -> Vec<serde_json::Value> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            (f.len() == 3).then(|| {
                json!({
                    "name": f[0],
                    "driver": f[1],
                    "memory_mib": f[2].parse::<u64>().ok(),
                })
            })
        })
        .collect()
}

/// Run `python script CONFIG_JSON` (a peer's side of a benchmark) and parse the one JSON
/// object it prints; `hint` tells how to get what the script needs.
pub(crate) fn python_side(
    python: &std::path::Path,
    script: &str,
    cfg: &serde_json::Value,
    hint: &str,
) -> Result<serde_json::Value> {
    let script = std::path::Path::new(script);
    if !script.exists() {
        anyhow::bail!(
            "{} is missing: run the benchmark from the repository root",
            script.display()
        );
    }
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(cfg.to_string())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed ({}): {} ({hint})",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} printed no JSON", script.display()))
}

fn write_json(path: Option<&PathBuf>, v: &serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(v)?)
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

fn mem_available_mb() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(8000.0, |kb| kb * 1024.0 / 1e6)
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    let with_machine = |mut doc: serde_json::Value| {
        doc["machine"] = machine();
        doc["date"] = json!(date());
        eprintln!("machine: {}", doc["machine"]);
        doc
    };
    match cmd {
        BenchCommand::EeOverhead { models, json } => {
            tch::set_num_threads(models.threads());
            let device = fedee_site_agent::cli::parse_device(&models.device)?;
            let doc = crate::bench_ee::ee_overhead(&models.models()?, models.reps, device)?;
            write_json(json.as_ref(), &with_machine(doc))
        }
        BenchCommand::Transform {
            minilm_config,
            reps,
            json,
        } => {
            let models = crate::bench_ee::Models::new(8, 1, &minilm_config, 1, 1)?;
            let doc = crate::bench_ee::transform(&models, reps)?;
            write_json(json.as_ref(), &with_machine(doc))
        }
        BenchCommand::Aggregate {
            sites,
            params,
            max_concurrent_uploads,
            direct_io,
            work_dir,
            python,
            no_flower,
            dashboard,
            flower_max_mb,
            json,
        } => {
            let flower = (!no_flower)
                .then(|| {
                    crate::bench_aggregate::flower_side(
                        &python,
                        flower_max_mb.unwrap_or_else(|| 0.7 * mem_available_mb()),
                    )
                })
                .flatten();
            // Its own runtime, on its own thread (the CLI's runtime drives this one).
            let doc = std::thread::scope(|s| {
                s.spawn(|| {
                    crate::bench_aggregate::bench(
                        &sites,
                        &params,
                        max_concurrent_uploads,
                        &direct_io,
                        &work_dir,
                        flower,
                        dashboard,
                    )
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the aggregate benchmark panicked"))?
            })?;
            write_json(json.as_ref(), &with_machine(doc))
        }
        BenchCommand::Train {
            models,
            python,
            json,
        } => {
            let device = fedee_site_agent::cli::parse_device(&models.device)?;
            let doc = crate::bench_ee::train(
                &models.models()?,
                models.reps,
                models.threads(),
                &python,
                device,
            )?;
            write_json(json.as_ref(), &with_machine(doc))
        }
        BenchCommand::Lm {
            gguf,
            decode,
            threads,
            device,
            python,
            no_transformers,
            hss_chat,
            json,
        } => {
            let device = fedee_site_agent::cli::parse_device(&device)?;
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get() as i32)
            });
            let python_path = python;
            let python = (!no_transformers).then_some(python_path.as_path());
            let hss_chat = hss_chat.then_some(python_path.as_path());
            let doc = crate::bench_lm::lm(&gguf, threads, decode, python, hss_chat, device)?;
            write_json(json.as_ref(), &with_machine(doc))
        }
        BenchCommand::Dashboard {
            sites,
            rounds,
            reps,
            json,
        } => {
            // Its own thread: the bench runs its own runtime.
            let doc = std::thread::scope(|s| {
                s.spawn(|| crate::bench_dashboard::bench(sites, rounds, reps.max(1)))
                    .join()
            })
            .map_err(|_| anyhow::anyhow!("the dashboard bench panicked"))??;
            write_json(json.as_ref(), &with_machine(doc))
        }
        BenchCommand::Hss {
            minilm_dir,
            drugs_dir,
            batches,
            seq_len,
            rtt_ms,
            reps,
            engine,
            reviews,
            server_threads,
            json,
        } => {
            let o = crate::bench_hss::Options {
                minilm_dir: &minilm_dir,
                drugs_dir: &drugs_dir,
                reps: reps.max(1),
                rtts_ms: &rtt_ms,
                batches: &batches,
                seq_len,
                engine: &engine,
                reviews,
                server_threads,
            };
            // Its own thread: the bench runs its own runtime and blocks on it per round trip.
            let doc = std::thread::scope(|s| s.spawn(|| crate::bench_hss::hss(&o)).join())
                .map_err(|_| anyhow::anyhow!("the HSS bench panicked"))??;
            write_json(json.as_ref(), &with_machine(doc))
        }
        BenchCommand::Secagg {
            sites,
            params,
            dropouts,
            degrees,
            max_words,
            python,
            federation_rounds,
            federation_sites,
            federation_hidden,
            data,
            flower_rounds,
            json,
        } => {
            let mut doc = crate::bench_secagg::secagg(
                &sites,
                &params,
                &dropouts,
                &degrees,
                max_words,
                &python,
                flower_rounds,
            )?;
            if federation_rounds > 0 {
                doc["federation"] = crate::bench_secagg::federation_rounds(
                    &data,
                    federation_rounds,
                    federation_sites,
                    federation_hidden.as_deref(),
                )?;
            }
            write_json(json.as_ref(), &with_machine(doc))
        }
        BenchCommand::Noise {
            fast_values,
            exact_values,
            json,
        } => write_json(
            json.as_ref(),
            &with_machine(noise(fast_values, exact_values)?),
        ),
        BenchCommand::FlambyHeart {
            data,
            seeds,
            lr,
            dp_lr,
            server_lr,
            adam,
            raw_features,
            pooled_standardization,
            tune,
            json,
        } => {
            let features = if raw_features {
                crate::flamby::Features::Raw
            } else if pooled_standardization {
                crate::flamby::Features::Pooled
            } else {
                crate::flamby::Features::PerHospital
            };
            let mut doc = crate::flamby::bench(
                &data,
                &crate::flamby::Options {
                    seeds,
                    lr,
                    dp_lr,
                    server_lr,
                    adam,
                    features,
                    tune,
                },
            )?;
            doc["machine"] = machine();
            write_json(json.as_ref(), &doc)
        }
    }
}

/// One sampler's throughput.
#[derive(serde::Serialize)]
struct NoiseRow {
    sampler: String,
    threads: usize,
    values: usize,
    seconds: f64,
    values_per_s: f64,
    /// Standard deviation of the noise drawn (1 expected): a check that it ran.
    sample_std: f64,
}

fn noise(fast_values: usize, exact_values: usize) -> Result<serde_json::Value> {
    let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
    let mut rows = Vec::new();
    // The fast sampler runs on the caller's thread (one CSPRNG stream); the exact one on
    // rayon's pool, measured with one thread and with every core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (sampler, n, threads) in [
        (Sampler::Fast, fast_values, 1),
        (Sampler::Exact, exact_values, 1),
        (Sampler::Exact, exact_values, cores),
    ] {
        eprintln!("noise: {n} values with the {sampler:?} sampler on {threads} thread(s) …");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let mut v = vec![0.0f32; n];
        let t = Instant::now();
        pool.install(|| add_noise(&mut v, 1.0, sampler, &mut rng))?;
        let s = t.elapsed().as_secs_f64();
        // Keep the result alive and sanity-check it.
        let sample_std = (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n as f64).sqrt();
        rows.push(NoiseRow {
            sampler: format!("{sampler:?}").to_lowercase(),
            threads,
            values: n,
            seconds: s,
            values_per_s: n as f64 / s,
            sample_std,
        });
    }
    let ratio = rows[0].values_per_s / rows[1].values_per_s;
    let speedup = rows[2].values_per_s / rows[1].values_per_s;
    table::print(
        &[
            col("sampler", "sampler", Cell::Text),
            col("threads", "threads", Cell::Text),
            col("values", "values", Cell::Text),
            col("seconds", "seconds", Cell::Fixed(3)),
            col("values per s", "values_per_s", Cell::Sci(3)),
            col("std", "sample_std", Cell::Fixed(4)),
        ],
        &rows,
    );
    println!(
        "fast / exact throughput ratio, one thread each: {ratio:.0}  (goal for fast: ≥ 2e7 values/s); exact on {cores} threads / 1 thread: {speedup:.2}"
    );
    Ok(json!({
        "benchmark": "noise",
        "rows": rows,
        "fast_over_exact_ratio": ratio,
        "exact_parallel_speedup_ratio": speedup,
    }))
}
