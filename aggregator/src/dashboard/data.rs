//! What the dashboard shows, read from the aggregator's database on each request: one
//! snapshot per page, rendered as HTML by [`super::page`] and served unchanged as JSON under
//! `/api/`. Read-only: nothing here writes.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::AggregatorError;
use crate::store::{MetricRow, RejectionRow, RoundRow, Store, now_ms};

/// Points per chart series at most: longer histories are read thinned (every `step`-th
/// round and each site's latest), so a page costs the same after 10 or 10 000 rounds.
pub const MAX_POINTS: u32 = 300;

/// The thinning step for a history of `last` rounds.
fn step(last: u32) -> u32 {
    last.div_ceil(MAX_POINTS).max(1)
}

/// Rounds listed on the overview.
const RECENT_ROUNDS: usize = 10;
/// Failed rounds listed on the updates page.
const RECENT_FAILURES: usize = 20;
/// Rejections listed on the updates page.
const RECENT_REJECTIONS: u32 = 20;

/// The federation's fixed facts, from the aggregator's configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    /// The federation spec in one line (or the flags' equivalent).
    pub summary: String,
    /// SHA-256 of the spec text, empty without a spec.
    pub spec_sha256: String,
    /// Rounds planned.
    pub rounds: u32,
    /// Quorum: sites that must submit for a round to close.
    pub min_sites: u32,
    /// Seconds a round stays open.
    pub round_timeout_s: f64,
    /// `site` or `record`.
    pub dp_mode: String,
    /// What neighbouring datasets differ in.
    pub privacy_unit: String,
    /// δ at which ε is reported.
    pub delta: f64,
    /// ε one site spends over the whole federation as planned at start (the budget line).
    pub planned_epsilon: f64,
    /// The largest ε the aggregator accepts to start with (`--max-epsilon`).
    pub max_epsilon: f64,
    /// Whether updates arrive masked (secure aggregation).
    pub secure_aggregation: bool,
}

impl Info {
    /// The facts of `c`.
    ///
    /// # Errors
    /// As [`crate::Config::planned_privacy`].
    pub fn of(c: &crate::Config) -> Result<Self, AggregatorError> {
        use crate::strategy::Strategy;
        let planned = c.planned_privacy()?;
        let strategy = match c.strategy {
            Strategy::FedAvg if c.proximal_mu > 0.0 => "FedProx",
            Strategy::FedAvg => "FedAvg",
            Strategy::FedAdam(_) => "FedAdam",
            Strategy::FedYogi(_) => "FedYogi",
            Strategy::Median => "median",
            Strategy::TrimmedMean(_) => "trimmed mean",
        };
        Ok(Self {
            summary: c.spec.as_ref().map_or_else(
                || {
                    format!(
                        "{} rounds, quorum {}, {strategy}; DP {}-level, C = {}, σ = {}, δ = {:e}",
                        c.rounds,
                        c.min_sites,
                        c.dp_mode.as_str(),
                        c.clipping_norm.get(),
                        c.noise_multiplier.get(),
                        c.delta
                    )
                },
                |s| s.spec.summary(),
            ),
            spec_sha256: c
                .spec
                .as_ref()
                .map(|s| s.sha256.clone())
                .unwrap_or_default(),
            rounds: c.rounds,
            min_sites: c.min_sites,
            round_timeout_s: c.round_timeout.as_secs_f64(),
            dp_mode: c.dp_mode.as_str().into(),
            privacy_unit: c.dp_mode.unit().into(),
            delta: c.delta,
            planned_epsilon: planned.epsilon,
            max_epsilon: c.max_epsilon,
            secure_aggregation: c.secure_aggregation.is_some(),
        })
    }
}

/// One joined site on the overview.
#[derive(Debug, Clone, Serialize)]
pub struct SiteStatus {
    /// Name (its certificate's CN under mutual TLS).
    pub name: String,
    /// When it joined (Unix seconds).
    pub joined_at: i64,
    /// Whether it submitted in the open round.
    pub submitted: bool,
    /// Why it left, if it did.
    pub departed: Option<String>,
}

/// A round's outcome and cost.
#[derive(Debug, Clone, Serialize)]
pub struct RoundSummary {
    /// Round number.
    pub round: u32,
    /// `open`, `closed` or `failed`.
    pub state: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// Opened (Unix seconds).
    pub opened_at: i64,
    /// Seconds from opening to closing or failing.
    pub duration_s: Option<i64>,
    /// Updates accepted.
    pub updates: u64,
    /// Bytes of the updates accepted.
    pub bytes: u64,
    /// Cumulative ε after it (federation accounting).
    pub epsilon: Option<f64>,
    /// Joined sites that sent nothing in a failed round (the affected sites).
    pub missing: Vec<String>,
}

/// `/` and `/api/overview`.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// The federation.
    pub info: Info,
    /// The server's clock (Unix milliseconds), for countdowns.
    pub now_ms: i64,
    /// The round open now, if any.
    pub current_round: Option<u32>,
    /// `not started`, `waiting for sites` (round 1 before the quorum joined), `open`,
    /// `done`.
    pub stage: String,
    /// The open round's deadline (Unix milliseconds).
    pub deadline_ms: Option<i64>,
    /// Joined sites, by name.
    pub sites: Vec<SiteStatus>,
    /// Sites joined, submitted in the open round, and departed.
    pub joined: usize,
    /// See `joined`.
    pub submitted: usize,
    /// See `joined`.
    pub departed: usize,
    /// The last rounds, newest first.
    pub recent_rounds: Vec<RoundSummary>,
}

/// A named line of `(round, value)` points.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    /// Site name, or `weighted`.
    pub name: String,
    /// Points by round.
    pub points: Vec<(u32, f64)>,
}

/// One metric over rounds.
#[derive(Debug, Clone, Serialize)]
pub struct MetricChart {
    /// `test accuracy`, `balanced accuracy`, `macro-F1`, `AUROC`, `validation accuracy`.
    pub metric: String,
    /// One series per site that reported it.
    pub sites: Vec<Series>,
    /// Weighted by the sites' test (validation) examples.
    pub weighted: Series,
}

/// `/accuracy` and `/api/accuracy`: each global model's metrics as the sites evaluated
/// them. Round `r` is the model that round `r` produced (global model `r + 1`). Histories
/// longer than [`MAX_POINTS`] rounds are thinned (every `step`-th round and each site's
/// latest).
#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    /// Metrics any site reported, each a chart.
    pub charts: Vec<MetricChart>,
}

/// The federation's cumulative privacy after a round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundPrivacy {
    /// Round.
    pub round: u32,
    /// zCDP ρ (0 where the mechanism is not zCDP-accounted).
    pub rho: f64,
    /// ε at δ.
    pub epsilon: f64,
}

/// `/privacy` and `/api/privacy`.
#[derive(Debug, Clone, Serialize)]
pub struct Privacy {
    /// The federation.
    pub info: Info,
    /// Where the per-site figures come from: `site ledgers` (each site's report) or
    /// `federation accounting` (site mode without reports: the aggregator's ε after each round
    /// the site submitted in, an upper bound).
    pub source: String,
    /// ε spent per site over rounds.
    pub sites: Vec<Series>,
    /// The federation's ρ and ε after each ended round.
    pub federation: Vec<RoundPrivacy>,
    /// Sites that left because their budget was spent, with the reason.
    pub budget_departures: Vec<(String, String)>,
}

/// `/updates` and `/api/updates`.
#[derive(Debug, Clone, Serialize)]
pub struct Updates {
    /// Every round, oldest first.
    pub rounds: Vec<RoundSummary>,
    /// Updates accepted in all.
    pub accepted: u64,
    /// Bytes accepted in all.
    pub bytes: u64,
    /// Rejections by class (`identity`, `stale_round`, `layout`, ...).
    pub rejected_by_reason: Vec<(String, u64)>,
    /// The latest rejections, newest first.
    pub recent_rejections: Vec<RejectionRow>,
    /// The latest failed rounds, newest first, with the affected sites.
    pub failures: Vec<RoundSummary>,
}

struct Rounds {
    rows: Vec<RoundRow>,
    totals: BTreeMap<u32, (u64, u64)>,
}

async fn rounds(store: &Store) -> Result<Rounds, AggregatorError> {
    Ok(Rounds {
        rows: store.rounds().await?,
        totals: store.update_totals().await?,
    })
}

impl Rounds {
    fn summary(&self, r: &RoundRow, missing: Vec<String>) -> RoundSummary {
        let (updates, bytes) = self.totals.get(&r.round).copied().unwrap_or((0, 0));
        RoundSummary {
            round: r.round,
            state: r.state.clone(),
            reason: r.reason.clone(),
            opened_at: r.opened_at,
            duration_s: r.closed_at.map(|c| c - r.opened_at),
            updates,
            bytes,
            epsilon: r.epsilon,
            missing,
        }
    }

    /// Summaries of `rows`, the failed ones naming the joined sites that sent nothing.
    async fn summaries<'a>(
        &self,
        store: &Store,
        rows: impl Iterator<Item = &'a RoundRow>,
        sites: &[String],
    ) -> Result<Vec<RoundSummary>, AggregatorError> {
        let mut out = Vec::new();
        for r in rows {
            let missing = if r.state == "failed" {
                let sent: BTreeSet<String> = store
                    .updates(r.round)
                    .await?
                    .into_iter()
                    .map(|u| u.site)
                    .collect();
                sites
                    .iter()
                    .filter(|s| !sent.contains(*s))
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            out.push(self.summary(r, missing));
        }
        Ok(out)
    }
}

/// The overview's snapshot.
///
/// # Errors
/// Database failures.
pub async fn overview(store: &Store, info: &Info) -> Result<Overview, AggregatorError> {
    let rounds = rounds(store).await?;
    let joined = store.sites_joined().await?;
    let departures: BTreeMap<String, String> = store.departures().await?.into_iter().collect();
    let open = rounds.rows.iter().rev().find(|r| r.state == "open");
    let submitted: BTreeSet<String> = match open {
        Some(r) => store
            .updates(r.round)
            .await?
            .into_iter()
            .map(|u| u.site)
            .collect(),
        None => BTreeSet::new(),
    };
    let stage = match open {
        Some(r) if r.deadline_ms.is_none() => "waiting for sites",
        Some(_) => "open",
        None if rounds.rows.is_empty() => "not started",
        None => "done",
    };
    let names: Vec<String> = joined.iter().map(|(n, _)| n.clone()).collect();
    let recent = rounds
        .summaries(store, rounds.rows.iter().rev().take(RECENT_ROUNDS), &names)
        .await?;
    let sites: Vec<SiteStatus> = joined
        .into_iter()
        .map(|(name, joined_at)| SiteStatus {
            submitted: submitted.contains(&name),
            departed: departures.get(&name).cloned(),
            name,
            joined_at,
        })
        .collect();
    Ok(Overview {
        info: info.clone(),
        now_ms: now_ms(),
        current_round: open.map(|r| r.round),
        stage: stage.into(),
        deadline_ms: open.and_then(|r| r.deadline_ms),
        joined: sites.len(),
        submitted: sites.iter().filter(|s| s.submitted).count(),
        departed: departures.len(),
        sites,
        recent_rounds: recent,
    })
}

type Getter = fn(&MetricRow) -> Option<f64>;

/// The metrics a site may report, with the weight each is averaged by.
const METRICS: [(&str, Getter, bool); 5] = [
    ("test accuracy", |m| Some(m.test_accuracy), false),
    ("balanced accuracy", |m| m.balanced_accuracy, false),
    ("macro-F1", |m| m.macro_f1, false),
    ("AUROC", |m| m.auroc, false),
    ("validation accuracy", |m| m.validation_accuracy, true),
];

/// The accuracy page's snapshot.
///
/// # Errors
/// Database failures.
pub async fn accuracy(store: &Store) -> Result<Accuracy, AggregatorError> {
    // Round r produced model r + 1.
    let last = store.rounds().await?.last().map_or(1, |r| r.round + 1);
    let every = step(last);
    let rows = store.metrics_every(every).await?;
    let mut charts = Vec::new();
    for (metric, get, by_validation) in METRICS {
        let mut sites: BTreeMap<&str, Vec<(u32, f64)>> = BTreeMap::new();
        // Per model: Σ value·weight and Σ weight.
        let mut weighted: BTreeMap<u32, (f64, u64)> = BTreeMap::new();
        for m in &rows {
            let Some(v) = get(m) else { continue };
            let round = m.model.saturating_sub(1);
            sites.entry(&m.site).or_default().push((round, v));
            // A site's latest model off the grid stands for that site only.
            if (m.model - 1) % every != 0 && m.model != last {
                continue;
            }
            let w = if by_validation {
                m.num_validation_examples
            } else {
                m.num_test_examples
            };
            let e = weighted.entry(round).or_default();
            e.0 += v * w as f64;
            e.1 += w;
        }
        if sites.is_empty() {
            continue;
        }
        for points in sites.values_mut() {
            points.sort_by_key(|p| p.0);
        }
        charts.push(MetricChart {
            metric: metric.into(),
            sites: sites
                .into_iter()
                .map(|(name, points)| Series {
                    name: name.into(),
                    points,
                })
                .collect(),
            weighted: Series {
                name: "weighted".into(),
                points: weighted
                    .into_iter()
                    .filter(|(_, (_, w))| *w > 0)
                    .map(|(r, (s, w))| (r, s / w as f64))
                    .collect(),
            },
        });
    }
    Ok(Accuracy { charts })
}

/// The privacy page's snapshot.
///
/// # Errors
/// Database failures.
pub async fn privacy(store: &Store, info: &Info) -> Result<Privacy, AggregatorError> {
    let rounds = store.rounds().await?;
    let every = step(rounds.last().map_or(1, |r| r.round));
    let ledger = store.ledger_every(every).await?;
    let federation: Vec<RoundPrivacy> = rounds
        .iter()
        .filter_map(|r| {
            r.epsilon.map(|epsilon| RoundPrivacy {
                round: r.round,
                rho: r.rho.unwrap_or(0.0),
                epsilon,
            })
        })
        .collect();
    let mut sites: BTreeMap<String, Vec<(u32, f64)>> = BTreeMap::new();
    let source = if ledger.is_empty() {
        // Site mode without reports: every site that submitted in a round has spent at most
        // the federation's ε after it.
        let eps: BTreeMap<u32, f64> = federation.iter().map(|p| (p.round, p.epsilon)).collect();
        for u in store.update_rows(1).await? {
            if (u.round - 1) % every != 0 && u.round != rounds.len() as u32 {
                continue;
            }
            if let Some(e) = eps.get(&u.round) {
                sites.entry(u.site).or_default().push((u.round, *e));
            }
        }
        "federation accounting"
    } else {
        for l in ledger {
            sites.entry(l.site).or_default().push((l.round, l.epsilon));
        }
        "site ledgers"
    };
    let budget_departures = store
        .departures()
        .await?
        .into_iter()
        .filter(|(_, reason)| reason.contains("budget"))
        .collect();
    Ok(Privacy {
        info: info.clone(),
        source: source.into(),
        sites: sites
            .into_iter()
            .map(|(name, mut points)| {
                points.sort_by_key(|p| p.0);
                Series { name, points }
            })
            .collect(),
        federation,
        budget_departures,
    })
}

/// The updates page's snapshot.
///
/// # Errors
/// Database failures.
pub async fn updates(store: &Store) -> Result<Updates, AggregatorError> {
    let rounds = rounds(store).await?;
    let sites: Vec<String> = store.sites().await?;
    let failed: Vec<&RoundRow> = rounds.rows.iter().filter(|r| r.state == "failed").collect();
    let failures = rounds
        .summaries(
            store,
            failed.into_iter().rev().take(RECENT_FAILURES),
            &sites,
        )
        .await?;
    let all: Vec<RoundSummary> = rounds
        .rows
        .iter()
        .map(|r| rounds.summary(r, Vec::new()))
        .collect();
    Ok(Updates {
        accepted: all.iter().map(|r| r.updates).sum(),
        bytes: all.iter().map(|r| r.bytes).sum(),
        rounds: all,
        rejected_by_reason: store.rejection_counts().await?,
        recent_rejections: store.rejections(RECENT_REJECTIONS).await?,
        failures,
    })
}
