//! `fedee bench NAME`: benchmarks that print a table and write JSON whose keys carry their
//! units. Figures come from one run on this machine; nothing here is a pass/fail test.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;
use fedee_dp::noise::{Sampler, add_noise};
use rand::SeedableRng;
use serde_json::json;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// DP noise: Gaussian values per second of the fast sampler (one core) and of OpenDP's
    /// exact sampler, on the same machine in the same run.
    Noise {
        /// Values drawn with the fast sampler.
        #[arg(long, default_value_t = 20_000_000)]
        fast_values: usize,
        /// Values drawn with the exact sampler (about 6.5 s per million).
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
        #[arg(long)]
        raw_features: bool,
        /// Also write the figures as JSON (`rows` of {strategy, dp, mean_accuracy, per_seed}).
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// What machine the figures come from.
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
    })
}

fn write_json(path: Option<&PathBuf>, v: &serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(v)?)
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Noise {
            fast_values,
            exact_values,
            json,
        } => noise(fast_values, exact_values, json.as_ref()),
        BenchCommand::FlambyHeart {
            data,
            seeds,
            lr,
            dp_lr,
            server_lr,
            adam,
            raw_features,
            json,
        } => {
            let mut doc =
                crate::flamby::bench(&data, seeds, lr, dp_lr, server_lr, adam, raw_features)?;
            doc["machine"] = machine();
            write_json(json.as_ref(), &doc)
        }
    }
}

fn noise(fast_values: usize, exact_values: usize, json_path: Option<&PathBuf>) -> Result<()> {
    let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
    let mut rows = Vec::new();
    for (sampler, n) in [(Sampler::Fast, fast_values), (Sampler::Exact, exact_values)] {
        eprintln!("noise: {n} values with the {sampler:?} sampler …");
        let mut v = vec![0.0f32; n];
        let t = Instant::now();
        add_noise(&mut v, 1.0, sampler, &mut rng)?;
        let s = t.elapsed().as_secs_f64();
        // Keep the result alive and sanity-check it.
        let std = (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n as f64).sqrt();
        rows.push(json!({
            "sampler": format!("{sampler:?}").to_lowercase(),
            "values": n,
            "seconds": s,
            "values_per_s": n as f64 / s,
            "sample_std": std,
        }));
    }
    let ratio = rows[0]["values_per_s"].as_f64().unwrap_or(0.0)
        / rows[1]["values_per_s"].as_f64().unwrap_or(f64::NAN);
    println!(
        "{:<8} {:>12} {:>10} {:>16} {:>10}",
        "sampler", "values", "seconds", "values per s", "std"
    );
    for r in &rows {
        println!(
            "{:<8} {:>12} {:>10.3} {:>16.3e} {:>10.4}",
            r["sampler"].as_str().unwrap_or(""),
            r["values"],
            r["seconds"].as_f64().unwrap_or(0.0),
            r["values_per_s"].as_f64().unwrap_or(0.0),
            r["sample_std"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "fast / exact throughput ratio: {ratio:.0}  (one thread; goal for fast: ≥ 2e7 values/s)"
    );
    write_json(
        json_path,
        &json!({
            "benchmark": "noise",
            "machine": machine(),
            "threads": 1,
            "rows": rows,
            "fast_over_exact_ratio": ratio,
        }),
    )
}
