//! Prometheus metrics of the aggregator (`prometheus-client`, OpenMetrics text format), served
//! at `GET /metrics` on `--metrics-listen`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `fedee_aggregator_rounds_total` | counter | `outcome` = `closed` \| `failed` |
//! | `fedee_aggregator_current_round` | gauge | |
//! | `fedee_aggregator_sites_joined` | gauge | |
//! | `fedee_aggregator_updates_accepted_total` | counter | |
//! | `fedee_aggregator_updates_rejected_total` | counter | `reason` (see [`Reject`]) |
//! | `fedee_aggregator_update_bytes_total` | counter | (bytes of accepted updates) |
//! | `fedee_aggregator_round_duration_seconds` | histogram | (open to closed or failed) |
//! | `fedee_aggregator_site_test_metric` | gauge | `site`, `metric` (test accuracy, balanced accuracy, macro-F1, AUROC of the latest model a site evaluated) |
//!
//! Counters restart at zero with the process, as Prometheus expects; the database keeps the
//! durable record (rounds, updates, rejections).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Why an update was rejected: the `reason` label, one per failure class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Certificate not allowed to submit (role, name, enrolment).
    Identity,
    /// Site has not joined.
    NotJoined,
    /// Update for a round that is not open (closed, failed, finished, or not yet open).
    StaleRound,
    /// A different update from the same site for the same round.
    Duplicate,
    /// Missing or malformed header.
    Header,
    /// Chunks out of order, oversized, truncated, or a broken stream.
    Stream,
    /// Bytes do not hash to the header's SHA-256.
    Sha256,
    /// Not valid F32 safetensors, or non-finite values.
    Tensors,
    /// Tensor names or shapes differ from the global model.
    Layout,
    /// Aggregator-side failure (database, disk).
    Internal,
}

impl Reject {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::NotJoined => "not_joined",
            Self::StaleRound => "stale_round",
            Self::Duplicate => "duplicate",
            Self::Header => "header",
            Self::Stream => "stream",
            Self::Sha256 => "sha256_mismatch",
            Self::Tensors => "invalid_tensors",
            Self::Layout => "layout",
            Self::Internal => "internal",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteMetricLabels {
    site: String,
    metric: &'static str,
}

/// The aggregator's metrics (cheap to clone: handles to shared atomics).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    rounds: Family<Outcome, Counter>,
    current_round: Gauge,
    sites_joined: Gauge,
    accepted: Counter,
    rejected: Family<Reason, Counter>,
    bytes: Counter,
    round_duration: Histogram,
    site_metrics: Family<SiteMetricLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    secagg_sites: Family<Outcome, Counter>,
    secagg_refused: Counter,
    events: tokio::sync::broadcast::Sender<Event>,
    seq: Arc<std::sync::atomic::AtomicU64>,
}

/// Something the aggregator did, published after it is recorded, for live views (the
/// dashboard's server-sent events). Slow subscribers miss events, never slow the federation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    /// Sequence number, from 1 in each process.
    pub seq: u64,
    /// `round_opened`, `round_closed`, `round_failed`, `update_accepted`, `update_rejected`,
    /// `sites_changed`, `site_metric` or `secure_aggregation`.
    pub kind: &'static str,
    /// The round it concerns, where it has one.
    pub round: Option<u32>,
    /// When it was published (Unix milliseconds).
    pub at_ms: i64,
}

/// Events kept for a subscriber that falls behind (it then skips to the newest).
const EVENT_BUFFER: usize = 256;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("fedee_aggregator");
        let m = Self {
            registry: Arc::new(Registry::default()),
            rounds: Family::default(),
            current_round: Gauge::default(),
            sites_joined: Gauge::default(),
            accepted: Counter::default(),
            rejected: Family::default(),
            bytes: Counter::default(),
            // 0.25 s … ~68 min.
            round_duration: Histogram::new(exponential_buckets(0.25, 2.0, 15)),
            site_metrics: Family::default(),
            secagg_sites: Family::default(),
            secagg_refused: Counter::default(),
            events: tokio::sync::broadcast::channel(EVENT_BUFFER).0,
            seq: Arc::default(),
        };
        r.register("rounds", "Rounds ended, by outcome", m.rounds.clone());
        r.register(
            "current_round",
            "The open round (rounds + 1 when done)",
            m.current_round.clone(),
        );
        r.register(
            "sites_joined",
            "Sites that have joined",
            m.sites_joined.clone(),
        );
        r.register(
            "updates_accepted",
            "Updates accepted and persisted",
            m.accepted.clone(),
        );
        r.register(
            "updates_rejected",
            "Updates rejected, by reason",
            m.rejected.clone(),
        );
        r.register("update_bytes", "Bytes of accepted updates", m.bytes.clone());
        r.register(
            "round_duration_seconds",
            "Seconds from a round opening to it closing or failing",
            m.round_duration.clone(),
        );
        r.register(
            "site_test_metric",
            "A site's test metric of the latest global model it evaluated",
            m.site_metrics.clone(),
        );
        r.register(
            "secagg_sites",
            "Sites of unmasked secure-aggregation sums, by outcome (alive: input in the sum; dropped: shared keys, sent no input)",
            m.secagg_sites.clone(),
        );
        r.register(
            "secagg_messages_refused",
            "Secure-aggregation messages refused (stale, hostile or malformed)",
            m.secagg_refused.clone(),
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn publish(&self, kind: &'static str, round: Option<u32>) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        // No subscriber is not an error.
        let _ = self.events.send(Event {
            seq,
            kind,
            round,
            at_ms: crate::store::now_ms(),
        });
    }

    pub(crate) fn secagg_unmasked(&self, alive: usize, dropped: usize) {
        self.publish("secure_aggregation", None);
        for (outcome, n) in [("alive", alive), ("dropped", dropped)] {
            self.secagg_sites
                .get_or_create(&Outcome { outcome })
                .inc_by(n as u64);
        }
    }

    pub(crate) fn secagg_refused(&self) {
        self.secagg_refused.inc();
    }

    pub(crate) fn set_site_metric(&self, site: &str, metric: &'static str, value: f64) {
        let labels = SiteMetricLabels {
            site: site.to_owned(),
            metric,
        };
        self.site_metrics.get_or_create(&labels).set(value);
        self.publish("site_metric", None);
    }

    pub(crate) fn round_ended(&self, failed: bool, seconds: f64) {
        let outcome = if failed { "failed" } else { "closed" };
        self.rounds.get_or_create(&Outcome { outcome }).inc();
        self.round_duration.observe(seconds.max(0.0));
        self.publish(
            if failed {
                "round_failed"
            } else {
                "round_closed"
            },
            None,
        );
    }

    pub(crate) fn set_round(&self, round: u32) {
        self.current_round.set(i64::from(round));
        self.publish("round_opened", Some(round));
    }

    pub(crate) fn set_sites(&self, n: usize) {
        self.sites_joined.set(n as i64);
        self.publish("sites_changed", None);
    }

    pub(crate) fn accepted(&self, bytes: usize) {
        self.accepted.inc();
        self.bytes.inc_by(bytes as u64);
        self.publish("update_accepted", None);
    }

    pub(crate) fn rejected(&self, reason: Reject) {
        self.rejected
            .get_or_create(&Reason {
                reason: reason.as_str(),
            })
            .inc();
        self.publish("update_rejected", None);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }
}

/// Serve `GET /metrics` on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// IO errors of the HTTP server.
pub async fn serve(
    metrics: Metrics,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
