//! `fedee bench secagg`: one secure-aggregation round in memory (every site and the server in
//! this process, no network), per stage, against plaintext FedAvg's fold on the same sizes.
//! Every cell checks that the unmasked sum equals the plaintext sum and stops if not.

use std::time::Instant;

use anyhow::{Result, bail};
use fedee_secagg::{RoundParams, Server, Site, SiteIndex, mask};
use rand::SeedableRng as _;
use serde::Serialize;
use serde_json::{Value, json};

use crate::table::{self, Cell, col};

#[derive(Serialize)]
struct Row {
    sites: usize,
    degree: usize,
    threshold: usize,
    dropout: f64,
    /// Sites left after the dropouts (the table's dropout is their complement).
    #[serde(skip)]
    alive: usize,
    params: usize,
    /// Mean per site, seconds.
    site_advertise_s: f64,
    site_share_keys_s: f64,
    site_masked_input_s: f64,
    site_unmask_s: f64,
    /// Server, seconds: all masked inputs folded into the running sum; the unmask stage.
    server_fold_s: f64,
    server_unmask_s: f64,
    /// One site's stages plus the server's (sites run in parallel on their own machines).
    secure_round_compute_s: f64,
    /// Plaintext FedAvg's fold of the same number of f32 updates.
    plaintext_fold_s: f64,
    upload_bytes_per_site: usize,
    upload_vs_plaintext_f32: f64,
    /// This process's resident memory when the cell starts, and its peak (`VmHWM`, reset
    /// through `/proc/self/clear_refs`) over the protocol's four stages, MB. Every party runs
    /// in this process: the peak holds the server's running sum and unmask buffers, the site
    /// at work's input and masked vector, and the bench's plaintext reference sum.
    rss_start_mb: f64,
    peak_rss_mb: f64,
    /// One site's distributed-DP encoding (clip, rotate, round, Skellam noise), seconds.
    skellam_encode_s: f64,
    /// Central-equivalent ε of 100 rounds at noise multiplier 4, δ = 1e-5, the noise split
    /// over `threshold` sites; and the central Gaussian mechanism's ε at the same z.
    epsilon_skellam: f64,
    epsilon_gaussian: f64,
    /// Measured standard deviation of the noise in the released mean of `sites` updates,
    /// in units of `σC` (first 4 096 coordinates): every site adding the Gaussian `σC`
    /// (≈ 1/√n) and distributed DP (≈ 1/√(n·t)), and the first over the second.
    mean_noise_local_gaussian: f64,
    mean_noise_distributed: f64,
    noise_reduction: f64,
}

/// Runs the grid; cells whose mask expansion exceeds `max_words` are skipped and listed.
///
/// # Errors
/// A protocol step failing (it should not: the bench checks the unmasked sum).
pub fn secagg(
    sites: &[usize],
    params: &[usize],
    dropouts: &[f64],
    degrees: &[usize],
    max_words: f64,
    python: &std::path::Path,
    flower_rounds: bool,
) -> Result<Value> {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let mut aborted = Vec::new();
    for &n in sites {
        for &d in params {
            let mut ks: Vec<usize> = degrees
                .iter()
                .map(|&k| if k == 0 || k >= n - 1 { n - 1 } else { k & !1 })
                .collect();
            ks.dedup();
            for &drop in dropouts {
                for &k in &ks {
                    let dropped = (drop * n as f64).round() as usize;
                    // Sites expand k + 2 vectors each (input, self mask, k pairwise); the
                    // server n − dropped self masks and the dropped sites' pairwise masks.
                    let words = (n * (k + 2) + (n - dropped) + dropped * k) as f64 * d as f64;
                    if words > max_words {
                        skipped.push(format!("n={n} d={d} dropout={drop} k={k}"));
                        continue;
                    }
                    eprintln!("secagg: n={n} d={d} dropout={drop} k={k} …");
                    match cell(n, d, dropped, drop, k) {
                        Ok(row) => rows.push(row),
                        // Too few survivors around some site: the round ends with no output,
                        // as the protocol must; the cell is listed, not measured.
                        Err(e)
                            if matches!(
                                e.downcast_ref::<fedee_secagg::Error>(),
                                Some(fedee_secagg::Error::TooFew { .. })
                            ) =>
                        {
                            aborted.push(format!("n={n} d={d} dropout={drop} k={k}: {e}"));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    table::print(
        &[
            col("sites", "sites", Cell::Text),
            col("k", "degree", Cell::Text),
            col("drop", "dropout", Cell::Percent),
            col("params", "params", Cell::Text),
            col("site: keys", "site_advertise_s", Cell::Millis),
            col("site: share", "site_share_keys_s", Cell::Millis),
            col("site: mask", "site_masked_input_s", Cell::Millis),
            col("site: unmask", "site_unmask_s", Cell::Millis),
            col("server: fold", "server_fold_s", Cell::Millis),
            col("server: unmask", "server_unmask_s", Cell::Millis),
            col("round", "secure_round_compute_s", Cell::Millis),
            col("plain fold", "plaintext_fold_s", Cell::Millis),
            col("upload ×", "upload_vs_plaintext_f32", Cell::Fixed(4)),
            col("RSS start MB", "rss_start_mb", Cell::Fixed(0)),
            col("peak RSS MB", "peak_rss_mb", Cell::Fixed(0)),
            col("Skellam enc", "skellam_encode_s", Cell::Millis),
            col("ε Skellam", "epsilon_skellam", Cell::Fixed(5)),
            col("ε Gauss", "epsilon_gaussian", Cell::Fixed(5)),
            col(
                "mean noise local",
                "mean_noise_local_gaussian",
                Cell::Fixed(4),
            ),
            col("distributed", "mean_noise_distributed", Cell::Fixed(4)),
            col("reduction ×", "noise_reduction", Cell::Fixed(2)),
        ],
        &rows,
    );
    for a in &aborted {
        println!("aborted: {a}");
    }
    if !skipped.is_empty() {
        println!("skipped (over --max-words): {}", skipped.join("; "));
    }
    let masks = mask_costs(params, python)?;
    let flower = if flower_rounds {
        whole_flower_rounds(&rows, python)
    } else {
        Vec::new()
    };
    Ok(json!({
        "benchmark": "secagg",
        "mask_costs": masks,
        "flower_rounds": flower,
        "threads": rayon::current_num_threads(),
        "rows": rows,
        "skipped": skipped,
        "aborted": aborted,
    }))
}

#[derive(Serialize)]
struct FlowerRoundRow {
    sites: usize,
    degree: usize,
    params: usize,
    /// Fraction of the sites that drop out after sharing keys (on both sides).
    dropout: f64,
    /// fedee's secure round compute (one site's stages plus the server's), seconds.
    fedee_secure_round_s: f64,
    /// Every party's work one after another, as Flower's simulation runs it on these cores:
    /// every site's first two stages, the survivors' last two, and the server's, seconds.
    fedee_all_parties_s: f64,
    /// A whole Flower round as its ServerApp sees it, with `SecAggPlusWorkflow` and plain.
    flower_secure_round_s: f64,
    flower_plain_round_s: f64,
    /// What SecAgg+ adds to a Flower round: secure − plain.
    flower_secagg_added_s: f64,
    /// That over fedee's work of all parties.
    flower_added_over_fedee: f64,
}

/// A whole Flower SecAgg+ round (`scripts/bench_flower_secagg_round.py`, Flower's simulation
/// runtime) for each measured cell, `num_shares = k + 1`, the same fraction of clients
/// dropping out after sharing keys. Cells whose script fails (Flower's simulation extra
/// missing, out of memory) are reported and skipped.
fn whole_flower_rounds(rows: &[Row], python: &std::path::Path) -> Vec<FlowerRoundRow> {
    let mut out = Vec::new();
    for r in rows {
        eprintln!(
            "secagg: a whole Flower SecAgg+ round, n={} d={} num_shares={} dropout={} …",
            r.sites,
            r.params,
            r.degree + 1,
            r.dropout
        );
        let o = std::process::Command::new(python)
            .arg("scripts/bench_flower_secagg_round.py")
            .args([r.sites, r.params, r.degree + 1].map(|v| v.to_string()))
            .arg(r.dropout.to_string())
            .output();
        let v: Option<Value> = match o {
            Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                eprintln!(
                    "secagg: Flower's round failed: {}",
                    err.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
                );
                None
            }
            Err(e) => {
                eprintln!("secagg: cannot run {}: {e}", python.display());
                None
            }
        };
        let Some(v) = v else { continue };
        let (sec, plain) = (
            v["secure_round_s"].as_f64().unwrap_or(f64::NAN),
            v["plain_round_s"].as_f64().unwrap_or(f64::NAN),
        );
        if v["dropped"].as_u64().unwrap_or(0) as usize != r.sites - r.alive {
            eprintln!("secagg: Flower's round dropped another number of clients: {v}");
            continue;
        }
        let mut row = FlowerRoundRow {
            sites: r.sites,
            degree: r.degree,
            params: r.params,
            dropout: r.dropout,
            fedee_secure_round_s: r.secure_round_compute_s,
            fedee_all_parties_s: r.sites as f64 * (r.site_advertise_s + r.site_share_keys_s)
                + r.alive as f64 * (r.site_masked_input_s + r.site_unmask_s)
                + r.server_fold_s
                + r.server_unmask_s,
            flower_secure_round_s: sec,
            flower_plain_round_s: plain,
            flower_secagg_added_s: sec - plain,
            flower_added_over_fedee: 0.0,
        };
        row.flower_added_over_fedee = row.flower_secagg_added_s / row.fedee_all_parties_s;
        out.push(row);
    }
    table::print(
        &[
            col("sites", "sites", Cell::Text),
            col("k", "degree", Cell::Text),
            col("params", "params", Cell::Text),
            col("drop", "dropout", Cell::Percent),
            col("fedee: secure round", "fedee_secure_round_s", Cell::Millis),
            col("fedee: all parties", "fedee_all_parties_s", Cell::Millis),
            col(
                "Flower: SecAgg+ round",
                "flower_secure_round_s",
                Cell::Millis,
            ),
            col("Flower: plain round", "flower_plain_round_s", Cell::Millis),
            col(
                "Flower: added by SecAgg+",
                "flower_secagg_added_s",
                Cell::Millis,
            ),
            col(
                "added / fedee all parties",
                "flower_added_over_fedee",
                Cell::Fixed(1),
            ),
        ],
        &out,
    );
    out
}

/// Reads this process's resident memory in MB, then resets its peak to the current value
/// (Linux: `5` to `/proc/self/clear_refs`); NaN where either step fails.
fn reset_peak_rss() -> f64 {
    let rss = crate::bench_aggregate::own_mb("VmRSS:");
    if std::fs::write("/proc/self/clear_refs", "5").is_ok() {
        rss
    } else {
        f64::NAN
    }
}

fn cell(n: usize, d: usize, dropped: usize, drop: f64, k: usize) -> Result<Row> {
    let t = k.div_ceil(2) + 1;
    let p = RoundParams {
        context: [7; 32],
        round: 1,
        sites: n,
        degree: k,
        threshold: t.max(2),
        dim: d + 1,
    };
    let rss_start = reset_peak_rss();
    let mut rng = fedee_secagg::os_rng()?;
    let mut server = Server::new(p.clone())?;
    let mut ss = Vec::with_capacity(n);
    let mut upload = vec![0usize; n];
    let clock = Instant::now();
    for i in 0..n as SiteIndex {
        let (s, a) = Site::new(p.clone(), i, &mut rng)?;
        upload[usize::from(i)] += 2 + 8 + 64;
        server.receive_advertise(i, a)?;
        ss.push(s);
    }
    let advertise = clock.elapsed().as_secs_f64() / n as f64;
    let roster = server.close_advertise()?;
    let mut share = 0.0;
    for (i, s) in ss.iter_mut().enumerate() {
        let t0 = Instant::now();
        let sh = s.share_keys(&roster, &mut rng)?;
        share += t0.elapsed().as_secs_f64();
        upload[i] += sh.iter().map(|x| x.ciphertext.len() + 12).sum::<usize>();
        server.receive_shares(i as SiteIndex, sh)?;
    }
    server.close_shares()?;
    // The dropped sites are spread over the roster; they share keys, then send nothing.
    let is_dropped = |i: usize| {
        dropped > 0 && i.is_multiple_of((n / dropped).max(1)) && i / (n / dropped).max(1) < dropped
    };
    let (mut masked, mut fold) = (0.0, 0.0);
    let mut plain = vec![0u32; d + 1];
    for (i, s) in ss.iter_mut().enumerate() {
        if is_dropped(i) {
            continue;
        }
        let x = mask::expand(&[i as u8; 32], d + 1);
        let t0 = Instant::now();
        let y = s.masked_input(&server.shares_for(i as SiteIndex), &x)?;
        masked += t0.elapsed().as_secs_f64();
        plain
            .iter_mut()
            .zip(&x)
            .for_each(|(a, b)| *a = a.wrapping_add(*b));
        upload[i] += 4 * y.len();
        let t0 = Instant::now();
        server.receive_masked(i as SiteIndex, &y)?;
        fold += t0.elapsed().as_secs_f64();
    }
    let req = server.close_masked()?;
    let alive = req.alive.len();
    let mut unmask = 0.0;
    for &i in &req.alive {
        let t0 = Instant::now();
        let r = ss[usize::from(i)].unmask(&req)?;
        unmask += t0.elapsed().as_secs_f64();
        // Each share travels with the site it belongs to.
        let share_bytes = std::mem::size_of::<SiteIndex>() + fedee_secagg::protocol::SHARE_LEN;
        upload[usize::from(i)] += (r.seed_shares.len() + r.key_shares.len()) * share_bytes;
        server.receive_unmask(i, r)?;
    }
    let t0 = Instant::now();
    let sum = server.finish()?;
    let server_unmask = t0.elapsed().as_secs_f64();
    if sum != plain {
        bail!("the unmasked sum differs from the plaintext sum (n={n}, d={d})");
    }
    let peak_rss = crate::bench_aggregate::own_mb("VmHWM:");
    std::mem::drop(ss);
    // Plaintext FedAvg's fold: n weighted f32 updates into one f32 sum.
    let update: Vec<f32> = (0..d).map(|j| j as f32 * 1e-9).collect();
    let mut acc = vec![0f32; d];
    let t0 = Instant::now();
    for i in 0..alive {
        let w = 1.0 + i as f32;
        acc.iter_mut().zip(&update).for_each(|(a, u)| *a += w * u);
    }
    let plaintext_fold = t0.elapsed().as_secs_f64();
    std::hint::black_box(&acc);
    // Per-site means.
    let (share, masked, unmask) = (
        share / n as f64,
        masked / alive as f64,
        unmask / alive as f64,
    );
    let up = upload
        .iter()
        .enumerate()
        .filter(|(i, _)| !is_dropped(*i))
        .map(|(_, b)| *b)
        .max()
        .unwrap_or(0);
    let (skellam_encode, epsilon_skellam, epsilon_gaussian) = distributed_dp(n, d, p.threshold)?;
    let (local, distributed) = mean_noise(n, d.min(4096), p.threshold)?;
    let row = Row {
        sites: n,
        degree: k,
        threshold: p.threshold,
        dropout: drop,
        alive,
        params: d,
        site_advertise_s: advertise,
        site_share_keys_s: share,
        site_masked_input_s: masked,
        site_unmask_s: unmask,
        server_fold_s: fold,
        server_unmask_s: server_unmask,
        secure_round_compute_s: advertise + share + masked + unmask + fold + server_unmask,
        plaintext_fold_s: plaintext_fold,
        upload_bytes_per_site: up,
        upload_vs_plaintext_f32: up as f64 / (4.0 * d as f64),
        rss_start_mb: rss_start,
        peak_rss_mb: peak_rss,
        skellam_encode_s: skellam_encode,
        epsilon_skellam,
        epsilon_gaussian,
        mean_noise_local_gaussian: local,
        mean_noise_distributed: distributed,
        noise_reduction: local / distributed,
    };
    Ok(row)
}

/// The noise in the mean of `n` all-zero updates of `d` values at σ = 4, C = 1, measured as a
/// standard deviation in units of `σC`: each site adding `N(0, (σC)²)` (the plain site-level
/// mechanism, whether or not secure aggregation hides the single updates), and each adding
/// its Skellam share with threshold `t` through encode, the wrapping sum and decode.
fn mean_noise(n: usize, d: usize, t: usize) -> Result<(f64, f64)> {
    let (c, z) = (1.0, 4.0);
    let dp = fedee_dp::skellam::Skellam {
        dim: d,
        clip: c,
        noise_multiplier: z,
        sites: n,
        min_survivors: t,
        rotation_seed: [3; 32],
    };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let mut local = vec![0f64; d];
    let mut sum = vec![0u32; dp.padded_dim()];
    for _ in 0..n {
        let mut x = vec![0f32; d];
        fedee_dp::add_gaussian_noise(
            &mut x,
            fedee_dp::ClippingNorm::new(c)?,
            fedee_dp::NoiseMultiplier::new(z)?,
            fedee_dp::noise::Sampler::Fast,
            &mut rng,
        )?;
        local
            .iter_mut()
            .zip(&x)
            .for_each(|(a, &v)| *a += f64::from(v));
        let w = dp.encode(&vec![0f32; d], &mut rng)?;
        sum.iter_mut()
            .zip(&w)
            .for_each(|(a, &b)| *a = a.wrapping_add(b));
    }
    let distributed: Vec<f64> = dp.decode_sum(&sum)?.into_iter().map(f64::from).collect();
    let std = |v: &[f64]| {
        let m = n as f64 * z * c;
        (v.iter().map(|a| (a / m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    Ok((std(&local), std(&distributed)))
}

/// One site's Skellam encoding time for `d` parameters, and the central-equivalent ε (100
/// rounds, z = 4, δ = 1e-5, noise split over `t` sites) beside the Gaussian mechanism's.
fn distributed_dp(n: usize, d: usize, t: usize) -> Result<(f64, f64, f64)> {
    use fedee_dp::rdp::{epsilon_from_rdp, rdp_step};
    let dp = fedee_dp::skellam::Skellam {
        dim: d,
        clip: 1.0,
        noise_multiplier: 4.0,
        sites: n,
        min_survivors: t,
        rotation_seed: [2; 32],
    };
    dp.check()?;
    let x: Vec<f32> = (0..d).map(|i| ((i % 13) as f32 - 6.0) * 1e-4).collect();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let t0 = Instant::now();
    std::hint::black_box(dp.encode(&x, &mut rng)?);
    let encode = t0.elapsed().as_secs_f64();
    let (eps, _) = dp.epsilon(100, 1e-5);
    let orders = fedee_dp::skellam::orders();
    let gauss: Vec<f64> = orders
        .iter()
        .map(|&a| 100.0 * rdp_step(1.0, 4.0, a))
        .collect();
    Ok((encode, eps, epsilon_from_rdp(&orders, &gauss, 1e-5).0))
}

#[derive(Serialize)]
struct MaskRow {
    params: usize,
    fedee_mask_s: f64,
    flower_mask_s: Option<f64>,
    flower_over_fedee_mask: Option<f64>,
    fedee_quantize_and_mask_s: f64,
    flower_quantize_and_mask_s: Option<f64>,
}

/// One mask's expansion, and quantizing plus masking one update, in fedee and in Flower's
/// SecAgg+ (`scripts/bench_flower_secagg.py`, its primitives only), best of 3 each.
fn mask_costs(params: &[usize], python: &std::path::Path) -> Result<Vec<MaskRow>> {
    let best = |f: &mut dyn FnMut()| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let flower: Option<Value> = {
        let script = std::path::Path::new("scripts/bench_flower_secagg.py");
        let mut cmd = std::process::Command::new(python);
        cmd.arg(script).args(params.iter().map(ToString::to_string));
        match cmd.output() {
            Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
            _ => {
                eprintln!(
                    "secagg: Flower's side not run (`{} {}` failed; `make bench` installs flwr)",
                    python.display(),
                    script.display()
                );
                None
            }
        }
    };
    let mut rows = Vec::new();
    for (i, &d) in params.iter().enumerate() {
        let q = fedee_secagg::Quantizer::new(100, 8.0, 1000)?;
        let x: Vec<f32> = (0..d).map(|j| ((j % 97) as f32 - 48.0) * 1e-4).collect();
        let mut rng = fedee_secagg::os_rng()?;
        // The protocol adds masks into a vector it already holds (Flower's returns a new
        // array each time, which its timing includes).
        let mut acc = vec![0u32; d + 1];
        let fedee_mask = best(&mut || {
            mask::apply(&mut acc, &[([1; 32], mask::Sign::Plus)]);
            std::hint::black_box(&acc);
        });
        let fedee_both = best(&mut || {
            let mut v = q.encode(&x, 1000, &mut rng).expect("in range");
            mask::apply(&mut v, &[([1; 32], mask::Sign::Plus)]);
            std::hint::black_box(v);
        });
        let f = |k: &str| flower.as_ref().and_then(|v| v["rows"][i][k].as_f64());
        let flower_mask = f("flower_mask_s");
        rows.push(MaskRow {
            params: d,
            fedee_mask_s: fedee_mask,
            flower_mask_s: flower_mask,
            flower_over_fedee_mask: flower_mask.map(|m| m / fedee_mask),
            fedee_quantize_and_mask_s: fedee_both,
            flower_quantize_and_mask_s: f("flower_quantize_and_mask_s"),
        });
    }
    table::print(
        &[
            col("params", "params", Cell::Text),
            col("fedee: one mask", "fedee_mask_s", Cell::Millis),
            col("Flower: one mask", "flower_mask_s", Cell::Millis),
            col("Flower / fedee", "flower_over_fedee_mask", Cell::Fixed(1)),
            col(
                "fedee: quantize + mask",
                "fedee_quantize_and_mask_s",
                Cell::Millis,
            ),
            col(
                "Flower: quantize + mask",
                "flower_quantize_and_mask_s",
                Cell::Millis,
            ),
        ],
        &rows,
    );
    Ok(rows)
}

/// One mode's figures of [`federation_rounds`].
#[derive(Serialize)]
struct FederationRow {
    mode: &'static str,
    sites: usize,
    rounds: u32,
    params: usize,
    /// Wall time from the aggregator's start to the last round closed and evaluated, over
    /// the rounds.
    seconds_per_round: f64,
    /// Weighted test accuracy of the final model.
    final_accuracy: f64,
    /// Site-level ε after the last round, at δ = 1e-5, and the noise multiplier σ.
    epsilon: f64,
    noise_multiplier: f64,
    /// The mechanisms the sites' ledgers recorded, and the largest ε a site's ledger reached.
    site_mechanisms: Vec<String>,
    max_site_epsilon: f64,
}

/// The heart-disease federation (three site agents training on their own rows, the
/// aggregator, mutual TLS on loopback, in this process) run three times from the same
/// initial model at the same site-level target ε: plaintext FedAvg (each site adds the
/// Gaussian noise σC), FedAvg over secure aggregation (the same noise), and secure
/// aggregation with distributed DP (Skellam noise that only sums to σC). Reports seconds
/// per round, the final model's weighted test accuracy and the ε reached for each, and the
/// secure/plaintext latency ratio.
///
/// `sites` site agents train on the three hospitals' rows in turn (more than three: the
/// rows are shared, `Cleveland-3`, …); `hidden` replaces the spec's hidden layers (a larger
/// model: `1024,1024` gives about 1.06 M parameters).
///
/// # Errors
/// Missing data, fewer than 3 sites, or a federation that fails.
pub fn federation_rounds(
    data: &std::path::Path,
    rounds: u32,
    sites: usize,
    hidden: Option<&[usize]>,
) -> Result<Value> {
    use crate::consortium::{Consortium, Site, demo_policy, read_spec};
    const HOSPITALS: [&str; 3] = ["Cleveland", "Hungary", "Switzerland"];
    if !(3..=fedee_secagg::MAX_SITES).contains(&sites) {
        bail!(
            "--federation-sites {sites}: use 3 to {}",
            fedee_secagg::MAX_SITES
        );
    }
    let names: Vec<(String, &str)> = (0..sites)
        .map(|i| {
            let h = HOSPITALS[i % 3];
            (
                if i < 3 {
                    h.to_owned()
                } else {
                    format!("{h}-{i}")
                },
                h,
            )
        })
        .collect();
    let cert_names: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    if !data.exists() {
        bail!(
            "{} does not exist: run `make data` (or pass --data PATH to heart_disease_uci.csv)",
            data.display()
        );
    }
    let mut spec = read_spec(std::path::Path::new(
        "examples/heart-disease/federation.toml",
    ))?;
    spec.federation.rounds = rounds;
    spec.federation.min_sites = sites as u32;
    if let Some(h) = hidden {
        spec.model.hidden = h.to_vec();
    }
    spec.federation.round_timeout_s = 120.0;
    // The hospitals have at most a few hundred rows each: a tight bound on a site's weight
    // keeps the secure quantizer fine at any number of sites (n · max weight · scale < 2³¹).
    spec.federation.max_num_examples = 1_000;
    // Site-level DP at ε = 8 over all the rounds (σ calibrated by the aggregator), within a
    // site's default budget.
    spec.privacy.mode = fedee_spec::PrivacyMode::Site;
    spec.privacy.noise_multiplier = None;
    spec.privacy.target_epsilon = Some(8.0);
    let initial = fedee_site_agent::task::initial_model(&spec, 7)?;
    let params: usize = initial.values().map(|t| t.numel()).sum();
    let mut rows = Vec::new();
    for (mode, secure, distributed_dp) in [
        ("plaintext", false, false),
        ("secure aggregation", true, false),
        ("secure + distributed DP", true, true),
    ] {
        let mut spec = spec.clone();
        if secure {
            spec.federation.secure_aggregation = Some(fedee_spec::SecureAggregation {
                stage_timeout_s: 30.0,
                distributed_dp,
                ..Default::default()
            });
        }
        let signed = fedee_spec::SignedSpec::from_spec(&spec)?;
        let policy = demo_policy(&spec);
        let agents: Vec<Site> = names
            .iter()
            .map(|(name, hospital)| Site {
                name: name.clone(),
                data: data.to_owned(),
                filter: Some(fedee_site_agent::table::RowFilter {
                    column: "dataset".into(),
                    value: (*hospital).into(),
                }),
                seed: None,
                policy: policy.clone(),
            })
            .collect();
        eprintln!(
            "secagg: {rounds} rounds of the heart federation, {sites} sites, {params} parameters, {mode} …"
        );
        let consortium = Consortium::new(&cert_names, tch::Device::Cpu)?;
        let t0 = Instant::now();
        let fed = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(consortium.federate(&signed, &initial, &agents))
        })?;
        let seconds_per_round = t0.elapsed().as_secs_f64() / f64::from(rounds);
        let final_accuracy = fed
            .status
            .rounds
            .last()
            .and_then(|r| r.weighted.as_ref())
            .map_or(f64::NAN, |w| w.test_accuracy);
        let epsilon = fed.status.rounds.last().map_or(f64::NAN, |r| r.epsilon);
        let noise_multiplier = fed.status.noise_multiplier;
        let ledgers = fed.sites.values().flat_map(|r| &r.privacy);
        let site_mechanisms: Vec<String> = ledgers
            .clone()
            .map(|e| e.mechanism.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let max_site_epsilon = ledgers.map(|e| e.epsilon).fold(0.0, f64::max);
        consortium.shutdown.cancel();
        rows.push(FederationRow {
            mode,
            sites,
            rounds,
            params,
            seconds_per_round,
            final_accuracy,
            epsilon,
            noise_multiplier,
            site_mechanisms,
            max_site_epsilon,
        });
    }
    table::print(
        &[
            col("mode", "mode", Cell::Text),
            col("sites", "sites", Cell::Text),
            col("rounds", "rounds", Cell::Text),
            col("params", "params", Cell::Text),
            col("s / round", "seconds_per_round", Cell::Fixed(3)),
            col("final acc", "final_accuracy", Cell::Fixed(3)),
            col("ε", "epsilon", Cell::Fixed(3)),
            col("σ", "noise_multiplier", Cell::Fixed(3)),
        ],
        &rows,
    );
    let ratio = rows[1].seconds_per_round / rows[0].seconds_per_round;
    println!("secure / plaintext round latency: {ratio:.2}×");
    Ok(json!({
        "benchmark": "secagg-federation",
        "rows": rows,
        "secure_over_plaintext": ratio,
    }))
}
