//! `fedee bench flamby-heart`: FLamby's Fed-Heart-Disease protocol (du Terrail et al.,
//! NeurIPS 2022 Datasets & Benchmarks) run with fedee's strategies and DP.
//!
//! Protocol, as FLamby's `fed_heart_disease/common.py`: 4 hospitals with FLamby's preparation
//! and fixed per-hospital train/test split (`fedee_site_agent::heart`); the baseline model is a
//! logistic regression; 15 rounds (`get_nb_max_rounds(100)`) of 100 local updates on batches of
//! 4 records; metric: the mean of the four hospitals' test accuracies; 5 seeds (model
//! initialisation, batch order, DP noise). Local training is SGD (FLamby's strategies use SGD,
//! with a learning rate tuned per strategy); fedee uses one learning rate for all, stated in
//! the output. Aggregation is fedee's `strategy::aggregate`; record-level DP is DP-SGD with
//! Poisson sampling (`q = 4/N` per hospital), per-example clipping, fedee's noise sampler, and
//! each hospital's σ calibrated with fedee's RDP accountant so that its ε after all
//! 1 500 steps is the target.
//!
//! Logistic regression's per-example gradients are closed form: with `p = softmax(Wx + b)` and
//! `g = p − onehot(y)`, `∇_W = g xᵀ`, `∇_b = g`, so `‖∇‖² = ‖g‖²(‖x‖² + 1)`.

use std::path::Path;

use crate::heart::{NUM_FEATURES, load_standardized};
use anyhow::{Context, Result};
use fedee_aggregator::strategy::{FedOpt, ServerState, Strategy, aggregate};
use fedee_aggregator::tensors::Tensors;
use fedee_dp::noise::{Sampler, add_noise};
use fedee_dp::rdp::calibrate_sigma;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use serde_json::json;

use crate::table::{self, Cell, col};

/// One strategy's accuracy over the seeds.
#[derive(Serialize)]
struct FlambyRow {
    strategy: String,
    /// What ran (learning rates, server optimizer, DP), chosen on validation with `--tune`.
    configuration: String,
    mean_accuracy: f64,
    std_accuracy: f64,
    per_seed: Vec<f64>,
    /// DP-SGD's σ per hospital, calibrated to the row's ε (empty without DP).
    noise_multipliers: Vec<f64>,
    dp: Option<DpRow>,
    /// The validation grid behind the configuration (`null` without `--tune`).
    tuning: serde_json::Value,
}

#[derive(Serialize)]
struct DpRow {
    epsilon: f64,
    delta: f64,
    clipping_norm: f64,
    unit: &'static str,
}
use tch::{Device, Kind, Tensor};

const HOSPITALS: [&str; 4] = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"];
const ROUNDS: usize = 15;
const LOCAL_UPDATES: u64 = 100;
const BATCH: usize = 4;

/// FLamby's published figures (mean accuracy over the 4 test sets).
pub const PUBLISHED: [(&str, f64); 4] = [
    ("pooled", 0.735),
    ("FedAvg", 0.685),
    ("FedYogi", 0.731),
    ("FedAvg, record-level DP ε = 1", 0.699),
];

struct Site {
    x: Tensor,
    y: Tensor,
    xt: Tensor,
    yt: Tensor,
    n: usize,
}

/// A run's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub strategy: Strategy,
    pub proximal_mu: f64,
    pub lr: f64,
    /// Record-level DP: (ε, δ, clipping norm).
    pub dp: Option<(f64, f64, f64)>,
    /// Train centrally on the union of the hospitals' training data (the pooled reference),
    /// with as many updates per round as the four sites together.
    pub pooled: bool,
    /// Local optimizer Adam (else SGD).
    pub adam: bool,
}

/// How the features reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Features {
    /// As parsed (FLamby's pipeline).
    Raw,
    /// Standardised with each hospital's own training mean and std.
    PerHospital,
    /// Standardised with the mean and std of the union of the training sets.
    Pooled,
}

impl Features {
    fn describe(self) -> &'static str {
        match self {
            Features::Raw => "raw (as FLamby)",
            Features::PerHospital => "standardised per hospital",
            Features::Pooled => "standardised with the pooled training statistics",
        }
    }
}

fn load(csv: &Path, features: Features) -> Result<Vec<Site>> {
    let mut parts = HOSPITALS
        .iter()
        .map(|h| {
            match features {
                Features::PerHospital => load_standardized(csv, h),
                Features::Raw | Features::Pooled => crate::heart::load(csv, h),
            }
            .with_context(|| format!("loading {h}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if features == Features::Pooled {
        let mut union = crate::heart::Examples::default();
        for p in &parts {
            union.x.extend_from_slice(&p.train.x);
            union.y.extend_from_slice(&p.train.y);
        }
        let s = crate::heart::Standardizer::fit(&union);
        for p in &mut parts {
            s.apply(&mut p.train);
            s.apply(&mut p.test);
        }
    }
    Ok(parts
        .into_iter()
        .map(|p| {
            let t = |e: &crate::heart::Examples| {
                (
                    Tensor::from_slice(&e.x)
                        .reshape([e.len() as i64, NUM_FEATURES as i64])
                        .to_kind(Kind::Double),
                    Tensor::from_slice(&e.y),
                )
            };
            let (x, y) = t(&p.train);
            let (xt, yt) = t(&p.test);
            Site {
                x,
                y,
                xt,
                yt,
                n: p.train.len(),
            }
        })
        .collect())
}

/// Parameters as `Tensors` (names `b`, `w`) <-> tch.
fn to_tensors(w: &Tensor, b: &Tensor) -> Tensors {
    let v = |t: &Tensor| Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1])).expect("f32");
    Tensors {
        names: vec!["b".into(), "w".into()],
        shapes: vec![vec![2], vec![2, NUM_FEATURES]],
        data: vec![v(b), v(w)],
    }
}

fn from_tensors(t: &Tensors) -> (Tensor, Tensor) {
    let b = Tensor::from_slice(&t.data[0]).to_kind(Kind::Double);
    let w = Tensor::from_slice(&t.data[1])
        .reshape([2, NUM_FEATURES as i64])
        .to_kind(Kind::Double);
    (w, b)
}

/// `g = softmax(xWᵀ + b) − onehot(y)`, `(B, 2)`.
fn residual(w: &Tensor, b: &Tensor, x: &Tensor, y: &Tensor) -> Tensor {
    let p = x.linear(w, Some(b)).softmax(-1, Kind::Double);
    p - y.one_hot(2).to_kind(Kind::Double)
}

fn accuracy(w: &Tensor, b: &Tensor, x: &Tensor, y: &Tensor) -> f64 {
    x.linear(w, Some(b))
        .argmax(-1, false)
        .eq_tensor(y)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

/// Local training: `LOCAL_UPDATES` SGD steps on batches of `BATCH` (cyclic shuffled epochs),
/// or DP-SGD steps with Poisson sampling; returns the update `local − global`.
fn local_update(
    site: &Site,
    global: &(Tensor, Tensor),
    run: &Run,
    sigma: f64,
    updates: u64,
    rng: &mut ChaCha20Rng,
) -> Result<Tensors> {
    let (mut w, mut b) = (global.0.copy(), global.1.copy());
    let (mut mw, mut vw, mut mb, mut vb) = (
        w.zeros_like(),
        w.zeros_like(),
        b.zeros_like(),
        b.zeros_like(),
    );
    let mut t = 0i32;
    let n = site.n;
    let mut order: Vec<i64> = vec![];
    for _ in 0..updates {
        let (gw, gb) = if let Some((_, _, c)) = run.dp {
            // DP-SGD: Poisson sample, per-example clip to C, sum, noise σC, / expected batch.
            let q = BATCH as f64 / n as f64;
            let idx: Vec<i64> = (0..n as i64).filter(|_| rng.random::<f64>() < q).collect();
            let (mut gw, mut gb) = (
                Tensor::zeros([2, NUM_FEATURES as i64], (Kind::Double, Device::Cpu)),
                Tensor::zeros([2], (Kind::Double, Device::Cpu)),
            );
            if !idx.is_empty() {
                let bi = Tensor::from_slice(&idx);
                let (x, y) = (site.x.index_select(0, &bi), site.y.index_select(0, &bi));
                let g = residual(&w, &b, &x, &y);
                let norms = (g.square().sum_dim_intlist(1, false, Kind::Double)
                    * (x.square().sum_dim_intlist(1, false, Kind::Double) + 1.0))
                    .sqrt();
                let f = (c / (norms + 1e-12)).clamp_max(1.0).unsqueeze(1);
                let fg = g * f;
                gw = fg.transpose(0, 1).matmul(&x);
                gb = fg.sum_dim_intlist(0, false, Kind::Double);
            }
            let mut flat: Vec<f32> = Vec::<f32>::try_from(
                Tensor::cat(&[gw.reshape([-1]), gb.shallow_clone()], 0).to_kind(Kind::Float),
            )?;
            add_noise(&mut flat, sigma * c, Sampler::Fast, rng)?;
            let all = Tensor::from_slice(&flat).to_kind(Kind::Double) / (q * n as f64);
            let k = (2 * NUM_FEATURES) as i64;
            (
                all.narrow(0, 0, k).reshape([2, NUM_FEATURES as i64]),
                all.narrow(0, k, 2),
            )
        } else {
            let mut idx = vec![];
            while idx.len() < BATCH {
                if order.is_empty() {
                    order = (0..n as i64).collect();
                    use rand::seq::SliceRandom;
                    order.shuffle(rng);
                }
                idx.push(order.pop().expect("non-empty"));
            }
            let bi = Tensor::from_slice(&idx);
            let (x, y) = (site.x.index_select(0, &bi), site.y.index_select(0, &bi));
            let g = residual(&w, &b, &x, &y);
            (
                g.transpose(0, 1).matmul(&x) / BATCH as f64,
                g.sum_dim_intlist(0, false, Kind::Double) / BATCH as f64,
            )
        };
        // FedProx: gradient of μ/2 ‖w − w_global‖².
        let (gw, gb) = if run.proximal_mu > 0.0 {
            (
                gw + (&w - &global.0) * run.proximal_mu,
                gb + (&b - &global.1) * run.proximal_mu,
            )
        } else {
            (gw, gb)
        };
        if run.adam {
            // Adam (Kingma & Ba 2015), β = (0.9, 0.999), ε = 1e-8; fresh state each round.
            t += 1;
            for (p, g, m, v) in [
                (&mut w, gw, &mut mw, &mut vw),
                (&mut b, gb, &mut mb, &mut vb),
            ] {
                *m = &*m * 0.9 + &g * 0.1;
                *v = &*v * 0.999 + g.square() * 0.001;
                let mhat = &*m / (1.0 - 0.9f64.powi(t));
                let vhat = &*v / (1.0 - 0.999f64.powi(t));
                *p -= mhat / (vhat.sqrt() + 1e-8) * run.lr;
            }
        } else {
            w -= gw * run.lr;
            b -= gb * run.lr;
        }
    }
    Ok(to_tensors(&(w - &global.0), &(b - &global.1)))
}

/// One federated run; returns the mean of the hospitals' test accuracies.
/// `sigmas`: each hospital's DP noise multiplier (empty without DP).
fn run_once(all_sites: &[Site], run: &Run, sigmas: &[f64], seed: u64) -> Result<f64> {
    let pooled;
    let (sites, updates) = if run.pooled {
        let cat =
            |f: fn(&Site) -> &Tensor| Tensor::cat(&all_sites.iter().map(f).collect::<Vec<_>>(), 0);
        pooled = [Site {
            x: cat(|s| &s.x),
            y: cat(|s| &s.y),
            xt: cat(|s| &s.xt),
            yt: cat(|s| &s.yt),
            n: all_sites.iter().map(|s| s.n).sum(),
        }];
        (&pooled[..], LOCAL_UPDATES * all_sites.len() as u64)
    } else {
        (all_sites, LOCAL_UPDATES)
    };
    tch::manual_seed(seed as i64);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    // PyTorch's nn.Linear initialisation: U(−1/√in, 1/√in).
    let bound = 1.0 / (NUM_FEATURES as f64).sqrt();
    let w =
        (Tensor::rand([2, NUM_FEATURES as i64], (Kind::Double, Device::Cpu)) * 2.0 - 1.0) * bound;
    let b = (Tensor::rand([2], (Kind::Double, Device::Cpu)) * 2.0 - 1.0) * bound;
    let mut global = to_tensors(&w, &b);
    // Without DP the noise multipliers are 0 (no noise is drawn).
    let sigmas: Vec<f64> = if sigmas.is_empty() {
        vec![0.0; sites.len()]
    } else {
        sigmas.to_vec()
    };
    let mut state: Option<ServerState> = None;
    for _ in 0..ROUNDS {
        let g = from_tensors(&global);
        let updates = sites
            .iter()
            .zip(&sigmas)
            .map(|(s, &sigma)| {
                Ok((
                    s.n as u64,
                    local_update(s, &g, run, sigma, updates, &mut rng)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let pairs: Vec<(u64, &Tensors)> = updates.iter().map(|(n, u)| (*n, u)).collect();
        let (next, s) = aggregate(run.strategy, &global, &pairs, state.take());
        global = next;
        state = s;
    }
    let (w, b) = from_tensors(&global);
    Ok(all_sites
        .iter()
        .map(|s| accuracy(&w, &b, &s.xt, &s.yt))
        .sum::<f64>()
        / all_sites.len() as f64)
}

/// Each hospital's training split cut into training (80 %) and validation (20 %, a fixed
/// shuffle): `x`/`y` train, `xt`/`yt` validate. The test split is not touched.
fn validation_split(sites: &[Site]) -> Vec<Site> {
    let mut rng = ChaCha20Rng::seed_from_u64(0xF1A3B);
    sites
        .iter()
        .map(|s| {
            use rand::seq::SliceRandom;
            let mut idx: Vec<i64> = (0..s.n as i64).collect();
            idx.shuffle(&mut rng);
            let n_val = (s.n / 5).max(1);
            let (val, train) = idx.split_at(n_val);
            let pick = |t: &Tensor, i: &[i64]| t.index_select(0, &Tensor::from_slice(i));
            Site {
                x: pick(&s.x, train),
                y: pick(&s.y, train),
                xt: pick(&s.x, val),
                yt: pick(&s.y, val),
                n: train.len(),
            }
        })
        .collect()
}

/// The candidates of a row's grid: the local learning rate × {0.2, 1, 4} (DP: × {0.5, 1, 5}),
/// and for FedAdam / FedYogi the server learning rate × {⅓, 1, 3⅓} too.
fn candidates(run: &Run) -> Vec<Run> {
    let local: &[f64] = if run.dp.is_some() {
        &[0.5, 1.0, 5.0]
    } else {
        &[0.2, 1.0, 4.0]
    };
    let server: &[f64] = match run.strategy {
        Strategy::FedAdam(_) | Strategy::FedYogi(_) => &[1.0 / 3.0, 1.0, 10.0 / 3.0],
        _ => &[1.0],
    };
    let mut out = vec![];
    for &l in local {
        for &sv in server {
            let mut r = *run;
            r.lr = run.lr * l;
            r.strategy = match run.strategy {
                Strategy::FedAdam(o) => Strategy::FedAdam(FedOpt { lr: o.lr * sv, ..o }),
                Strategy::FedYogi(o) => Strategy::FedYogi(FedOpt { lr: o.lr * sv, ..o }),
                other => other,
            };
            out.push(r);
        }
    }
    out
}

/// A row's configuration in words.
fn describe(run: &Run) -> String {
    let server = match run.strategy {
        Strategy::FedAdam(o) | Strategy::FedYogi(o) => format!(", server lr {:.3}", o.lr),
        _ => String::new(),
    };
    format!("lr {:.3}{server}", run.lr)
}

/// The σ of each site for a DP run (empty without DP).
fn sigmas_for(sites: &[Site], run: &Run) -> Result<Vec<f64>> {
    match run.dp {
        Some((eps, delta, _)) => sites
            .iter()
            .map(|st| {
                calibrate_sigma(
                    BATCH as f64 / st.n as f64,
                    ROUNDS as u64 * LOCAL_UPDATES,
                    eps,
                    delta,
                )
                .map_err(anyhow::Error::from)
            })
            .collect(),
        None => Ok(vec![]),
    }
}

/// The candidate of `run`'s grid with the best mean validation accuracy over `seeds` (ties: the
/// first), and the grid's figures.
fn choose_on_validation(
    validation: &[Site],
    run: &Run,
    seeds: u64,
) -> Result<(Run, serde_json::Value)> {
    let mut best: Option<(f64, Run)> = None;
    let mut grid = vec![];
    for c in candidates(run) {
        let sigmas = sigmas_for(validation, &c)?;
        let acc = (0..seeds)
            .map(|s| run_once(validation, &c, &sigmas, s))
            .sum::<Result<f64>>()?
            / seeds.max(1) as f64;
        grid.push(json!({"configuration": describe(&c), "validation_accuracy": acc}));
        if best.is_none_or(|(b, _)| acc > b) {
            best = Some((acc, c));
        }
    }
    let (acc, chosen) = best.context("an empty grid")?;
    Ok((chosen, json!({"validation_accuracy": acc, "grid": grid})))
}

/// The flags of `fedee bench flamby-heart`.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Seeds per row.
    pub seeds: u64,
    /// Local learning rate without DP.
    pub lr: f64,
    /// Local DP-SGD learning rate.
    pub dp_lr: f64,
    /// FedAdam / FedYogi server learning rate.
    pub server_lr: f64,
    /// Local Adam instead of SGD.
    pub adam: bool,
    /// Feature preparation.
    pub features: Features,
    /// Choose learning rates on a validation split.
    pub tune: bool,
}

/// Run the benchmark: print the table, return the JSON document.
pub fn bench(csv: &Path, o: &Options) -> Result<serde_json::Value> {
    let Options {
        seeds,
        lr,
        dp_lr,
        server_lr,
        adam,
        features,
        tune,
    } = *o;
    let sites = load(csv, features)?;
    let validation = if tune {
        validation_split(&sites)
    } else {
        vec![]
    };
    let fedopt = FedOpt {
        lr: server_lr,
        ..FedOpt::default()
    };
    let rows_spec: Vec<(&str, Run)> = vec![
        (
            "pooled (central training)",
            Run {
                strategy: Strategy::FedAvg,
                proximal_mu: 0.0,
                lr,
                dp: None,
                pooled: true,
                adam,
            },
        ),
        (
            "FedAvg",
            Run {
                strategy: Strategy::FedAvg,
                proximal_mu: 0.0,
                lr,
                dp: None,
                pooled: false,
                adam,
            },
        ),
        (
            "FedProx (μ = 0.1)",
            Run {
                strategy: Strategy::FedAvg,
                proximal_mu: 0.1,
                lr,
                dp: None,
                pooled: false,
                adam,
            },
        ),
        (
            "FedAdam",
            Run {
                strategy: Strategy::FedAdam(fedopt),
                proximal_mu: 0.0,
                lr,
                dp: None,
                pooled: false,
                adam,
            },
        ),
        (
            "FedYogi",
            Run {
                strategy: Strategy::FedYogi(fedopt),
                proximal_mu: 0.0,
                lr,
                dp: None,
                pooled: false,
                adam,
            },
        ),
        (
            "median",
            Run {
                strategy: Strategy::Median,
                proximal_mu: 0.0,
                lr,
                dp: None,
                pooled: false,
                adam,
            },
        ),
        (
            "trimmed mean (β = 0.25)",
            Run {
                strategy: Strategy::TrimmedMean(0.25),
                proximal_mu: 0.0,
                lr,
                dp: None,
                pooled: false,
                adam,
            },
        ),
        (
            "FedAvg, record-level DP ε = 1",
            Run {
                strategy: Strategy::FedAvg,
                proximal_mu: 0.0,
                lr: dp_lr,
                dp: Some((1.0, 1e-4, 1.0)),
                pooled: false,
                adam,
            },
        ),
    ];
    println!(
        "FLamby Fed-Heart-Disease: 4 hospitals, logistic regression, {ROUNDS} rounds × {LOCAL_UPDATES} local {} updates (batch {BATCH}, lr {lr}; DP-SGD lr {dp_lr}, C = 1), {seeds} seeds; mean of per-hospital test accuracies",
        if adam { "Adam" } else { "SGD" }
    );
    let mut rows = vec![];
    for (name, run) in &rows_spec {
        let (run, tuning) = if tune {
            choose_on_validation(&validation, run, seeds)?
        } else {
            (*run, json!(null))
        };
        let run = &run;
        let config = describe(run);
        let sigmas = sigmas_for(&sites, run)?;
        let per_seed = (0..seeds)
            .map(|s| run_once(&sites, run, &sigmas, s))
            .collect::<Result<Vec<f64>>>()?;
        let mean = per_seed.iter().sum::<f64>() / per_seed.len() as f64;
        let std = (per_seed.iter().map(|a| (a - mean).powi(2)).sum::<f64>()
            / per_seed.len() as f64)
            .sqrt();
        eprintln!("flamby-heart: {name}: mean accuracy {mean:.3} (std {std:.3})");
        rows.push(FlambyRow {
            noise_multipliers: sigmas,
            strategy: (*name).to_owned(),
            dp: run.dp.map(|(epsilon, delta, clipping_norm)| DpRow {
                epsilon,
                delta,
                clipping_norm,
                unit: "patient record",
            }),
            mean_accuracy: mean,
            std_accuracy: std,
            per_seed,
            configuration: config,
            tuning,
        });
    }
    table::print(
        &[
            col("strategy", "strategy", Cell::Text),
            col("mean", "mean_accuracy", Cell::Fixed(3)),
            col("std", "std_accuracy", Cell::Fixed(3)),
            col("per seed", "per_seed", Cell::List(3)),
            col(
                "σ per hospital (Cleveland, Hungary, Switzerland, VA)",
                "noise_multipliers",
                Cell::List(3),
            ),
            col("configuration", "configuration", Cell::Text),
        ],
        &rows,
    );
    println!(
        "FLamby published: {}",
        PUBLISHED
            .iter()
            .map(|(n, a)| format!("{n} {a}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(json!({
        "benchmark": "flamby-heart",
        "protocol": {"hospitals": HOSPITALS, "model": "logistic regression", "rounds": ROUNDS, "local_updates": LOCAL_UPDATES, "batch_size": BATCH, "local_optimizer": if adam { "adam" } else { "sgd" }, "features": features.describe(), "learning_rate": lr, "dp_learning_rate": dp_lr, "dp_clipping_norm": 1.0, "server_learning_rate": server_lr, "seeds": seeds, "metric": "mean of per-hospital test accuracies", "tuned_on_validation": tune},
        "published": PUBLISHED.iter().map(|(n, a)| json!({"strategy": n, "mean_accuracy": a})).collect::<Vec<_>>(),
        "rows": rows,
    }))
}
