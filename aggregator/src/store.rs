//! Aggregator persistence through sqlx (`Any` driver): SQLite (embedded default) or
//! PostgreSQL, with one set of queries and a migration folder per database
//! (`migrations/sqlite`, `migrations/postgres`).
//!
//! The database holds metadata; model and update bytes live in the content-addressed
//! [`crate::blobs::BlobStore`] and are referred to by SHA-256. Every accepted update's row is
//! committed here (after its blob is on disk) before the site gets its acknowledgement.

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

use crate::AggregatorError;

/// Seconds since the Unix epoch.
fn now() -> i64 {
    now_ms() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://PATH?mode=rwc` or `sqlite::memory:`.
    Sqlite,
    /// `postgres://USER@HOST:PORT/DB` (or `postgresql://`).
    Postgres,
}

impl Backend {
    /// The backend of `url`.
    ///
    /// # Errors
    /// [`AggregatorError::Config`] naming the URL and the supported schemes.
    pub fn of(url: &str) -> Result<Self, AggregatorError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(AggregatorError::Config(format!(
                "database url `{url}` is not supported: use sqlite://PATH?mode=rwc (embedded) or postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            )))
        }
    }
}

/// Metadata of an accepted update.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateMeta {
    /// Site name.
    pub site: String,
    /// Training examples behind the update.
    pub num_examples: u64,
    /// SHA-256 of the update's safetensors bytes (its blob name).
    pub sha256: String,
}

/// A site's evaluation of global model `model`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRow {
    /// Global model number.
    pub model: u32,
    /// Site name.
    pub site: String,
    /// Accuracy on the site's test split.
    pub test_accuracy: f64,
    /// Size of the site's test split.
    pub num_test_examples: u64,
    /// Balanced accuracy, if reported.
    pub balanced_accuracy: Option<f64>,
    /// Macro-F1, if reported.
    pub macro_f1: Option<f64>,
    /// AUROC (binary tasks), if reported.
    pub auroc: Option<f64>,
    /// Accuracy on the site's validation split, if it has one.
    pub validation_accuracy: Option<f64>,
    /// Size of the site's validation split (0 without one).
    pub num_validation_examples: u64,
}

/// One round of a site's privacy ledger, as the site reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRow {
    /// Site name.
    pub site: String,
    /// Round.
    pub round: u32,
    /// Unit of privacy.
    pub unit: String,
    /// Mechanism and accountant.
    pub mechanism: String,
    /// Poisson sampling rate.
    pub sampling_rate: f64,
    /// Noise multiplier.
    pub noise_multiplier: f64,
    /// Steps this round.
    pub steps: u64,
    /// Cumulative ε after the round.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

/// A round's persisted state.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRow {
    /// Round number (from 1).
    pub round: u32,
    /// `open`, `closed` (aggregated) or `failed` (quorum not met by the deadline).
    pub state: String,
    /// Why a round failed.
    pub reason: Option<String>,
    /// Cumulative zCDP ρ after the round closed.
    pub rho: Option<f64>,
    /// Cumulative ε after the round closed.
    pub epsilon: Option<f64>,
    /// When the round opened (Unix seconds).
    pub opened_at: i64,
    /// When it closed or failed (Unix seconds).
    pub closed_at: Option<i64>,
    /// Its deadline (Unix milliseconds), once set.
    pub deadline_ms: Option<i64>,
}

/// An accepted update's size and arrival, for the dashboard.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UpdateRow {
    /// Round.
    pub round: u32,
    /// Site name.
    pub site: String,
    /// Bytes of the update as received.
    pub size_bytes: u64,
    /// When it was accepted (Unix seconds).
    pub received_at: i64,
}

/// A rejected update, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RejectionRow {
    /// The round it was meant for, when known.
    pub round: Option<u32>,
    /// The site, when known.
    pub site: Option<String>,
    /// The class (`identity`, `stale_round`, `layout`, ...); `None` for rows recorded before
    /// classes were stored.
    pub kind: Option<String>,
    /// The error sent to the site.
    pub reason: String,
    /// When (Unix seconds).
    pub at: i64,
}

/// The aggregator's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

fn db(e: sqlx::Error) -> AggregatorError {
    AggregatorError::Database(e)
}

fn update_meta(r: &sqlx::any::AnyRow) -> Result<UpdateMeta, AggregatorError> {
    Ok(UpdateMeta {
        site: r.try_get("site").map_err(db)?,
        num_examples: r.try_get::<i64, _>("num_examples").map_err(db)? as u64,
        sha256: r.try_get("sha256").map_err(db)?,
    })
}

/// A database URL with any password replaced by `***`, for error messages and logs.
pub fn redact_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// How a round ends (see [`Store::end_round`]).
#[derive(Debug)]
pub struct RoundEnd<'a> {
    /// The round.
    pub round: u32,
    /// `closed` or `failed`.
    pub state: &'static str,
    /// Why it failed.
    pub reason: Option<&'a str>,
    /// Cumulative zCDP ρ after the round.
    pub rho: f64,
    /// Cumulative ε after the round.
    pub epsilon: f64,
    /// Blob name of global model `round + 1`.
    pub next_sha256: &'a str,
    /// Blob name of the server optimizer state that goes with it (FedAdam / FedYogi).
    pub server_state_sha256: Option<&'a str>,
    /// Open round `round + 1` with this deadline (`None`: it was the last round).
    pub open_next_with_deadline_ms: Option<i64>,
}

impl Store {
    /// Connect to `url` (`sqlite://PATH?mode=rwc`, `sqlite::memory:` or `postgres://…`) and
    /// run the migrations of that database.
    ///
    /// # Errors
    /// [`AggregatorError::Config`] for an unsupported URL; [`AggregatorError::Database`] if the
    /// database cannot be reached, opened or migrated.
    pub async fn connect(url: &str) -> Result<Self, AggregatorError> {
        let backend = Backend::of(url)?;
        install_default_drivers();
        // SQLite: one connection (it serialises writers anyway, and an in-memory database must
        // not be split across connections). PostgreSQL: a small pool.
        let max = if backend == Backend::Sqlite { 1 } else { 8 };
        let sqlite = backend == Backend::Sqlite;
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(std::time::Duration::from_secs(10))
            // SQLite: write-ahead log with `synchronous = FULL`, so a commit is one fsync of
            // the log (durable before the update is acknowledged) instead of the rollback
            // journal's several; readers do not block the writer.
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = FULL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|source| AggregatorError::DatabaseOpen {
                url: redact_password(url),
                source,
            })?;
        let migrated = match backend {
            Backend::Sqlite => sqlx::migrate!("../migrations/sqlite").run(&pool).await,
            Backend::Postgres => sqlx::migrate!("../migrations/postgres").run(&pool).await,
        };
        migrated.map_err(AggregatorError::Migrate)?;
        Ok(Self { pool })
    }

    /// Enrol a site (idempotent).
    pub async fn add_site(&self, name: &str) -> Result<(), AggregatorError> {
        sqlx::query(
            "INSERT INTO sites (name, joined_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Allow site `name` to join (idempotent).
    pub async fn enroll(&self, name: &str) -> Result<(), AggregatorError> {
        sqlx::query("INSERT INTO enrolments (name, enrolled_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(now())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Whether site `name` is enrolled.
    pub async fn is_enrolled(&self, name: &str) -> Result<bool, AggregatorError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM enrolments WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(row.try_get::<i64, _>("n").map_err(db)? > 0)
    }

    /// Enrolled sites, by name.
    pub async fn enrolled(&self) -> Result<Vec<String>, AggregatorError> {
        let rows = sqlx::query("SELECT name FROM enrolments ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("name").map_err(db))
            .collect()
    }

    /// Sites that joined, by name.
    pub async fn sites(&self) -> Result<Vec<String>, AggregatorError> {
        let rows = sqlx::query("SELECT name FROM sites ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("name").map_err(db))
            .collect()
    }

    /// The stored federation spec: `(toml, sha256)`.
    pub async fn spec(&self) -> Result<Option<(String, String)>, AggregatorError> {
        let row = sqlx::query("SELECT toml, sha256 FROM federation_spec WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(|r| {
            Ok((
                r.try_get::<String, _>("toml").map_err(db)?,
                r.try_get::<String, _>("sha256").map_err(db)?,
            ))
        })
        .transpose()
    }

    /// Store the federation spec, before the initial model. Idempotent: a start that crashed
    /// between this and [`Store::init`] retries with the same spec (a different one is
    /// refused before this is reached).
    pub async fn set_spec(&self, toml: &str, sha256: &str) -> Result<(), AggregatorError> {
        sqlx::query(
            "INSERT INTO federation_spec (id, sha256, toml, stored_at) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(sha256)
        .bind(toml)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Record the initial global model (model 1, already in the blob store) and open round 1
    /// (its deadline is set once the quorum has joined).
    pub async fn init(&self, sha256: &str) -> Result<(), AggregatorError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("INSERT INTO models (model, sha256, created_at) VALUES (1, $1, $2)")
            .bind(sha256)
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("INSERT INTO rounds (round, state, opened_at) VALUES (1, 'open', $1)")
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// Number of the newest global model, if any.
    pub async fn latest_model(&self) -> Result<Option<u32>, AggregatorError> {
        let row = sqlx::query("SELECT MAX(model) AS m FROM models")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(row
            .try_get::<Option<i64>, _>("m")
            .map_err(db)?
            .map(|m| m as u32))
    }

    /// SHA-256 (blob name) of global model `model`.
    pub async fn model_sha(&self, model: u32) -> Result<Option<String>, AggregatorError> {
        let row = sqlx::query("SELECT sha256 FROM models WHERE model = $1")
            .bind(i64::from(model))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(|r| r.try_get::<String, _>("sha256").map_err(db))
            .transpose()
    }

    /// Blob name of the server optimizer state stored with global model `model`, if any.
    pub async fn server_state_sha(&self, model: u32) -> Result<Option<String>, AggregatorError> {
        let row = sqlx::query("SELECT server_state_sha256 FROM models WHERE model = $1")
            .bind(i64::from(model))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(row
            .map(|r| {
                r.try_get::<Option<String>, _>("server_state_sha256")
                    .map_err(db)
            })
            .transpose()?
            .flatten())
    }

    /// Record an accepted update whose blob is already in the blob store.
    pub async fn insert_update(
        &self,
        round: u32,
        meta: &UpdateMeta,
        size_bytes: u64,
    ) -> Result<(), AggregatorError> {
        sqlx::query(
            "INSERT INTO updates (round, site, num_examples, sha256, size_bytes, received_at, seq) \
             SELECT $1, $2, $3, $4, $5, $6, COALESCE(MAX(seq), 0) + 1 FROM updates WHERE round = $1",
        )
        .bind(i64::from(round))
        .bind(&meta.site)
        .bind(meta.num_examples as i64)
        .bind(&meta.sha256)
        .bind(size_bytes as i64)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Accepted updates of `round`, in the order they were accepted (the order the running
    /// sum folds them in; rows from before that order was recorded come first, by site name).
    pub async fn updates(&self, round: u32) -> Result<Vec<UpdateMeta>, AggregatorError> {
        let rows = sqlx::query(
            "SELECT site, num_examples, sha256 FROM updates WHERE round = $1 \
             ORDER BY COALESCE(seq, 0), site",
        )
        .bind(i64::from(round))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(update_meta).collect()
    }

    /// Site `site`'s accepted update for `round`, if any.
    pub async fn update(
        &self,
        round: u32,
        site: &str,
    ) -> Result<Option<UpdateMeta>, AggregatorError> {
        let row = sqlx::query(
            "SELECT site, num_examples, sha256 FROM updates WHERE round = $1 AND site = $2",
        )
        .bind(i64::from(round))
        .bind(site)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(update_meta).transpose()
    }

    /// When `round` opened (Unix epoch s) and its deadline (Unix epoch ms, if set); `None` if
    /// the round does not exist.
    pub async fn round_timing(
        &self,
        round: u32,
    ) -> Result<Option<(i64, Option<i64>)>, AggregatorError> {
        let row = sqlx::query("SELECT opened_at, deadline_ms FROM rounds WHERE round = $1")
            .bind(i64::from(round))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(|r| {
            Ok((
                r.try_get::<i64, _>("opened_at").map_err(db)?,
                r.try_get::<Option<i64>, _>("deadline_ms").map_err(db)?,
            ))
        })
        .transpose()
    }

    /// Set the deadline of `round` (Unix epoch ms).
    pub async fn set_deadline(&self, round: u32, deadline_ms: i64) -> Result<(), AggregatorError> {
        sqlx::query("UPDATE rounds SET deadline_ms = $1 WHERE round = $2")
            .bind(deadline_ms)
            .bind(i64::from(round))
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// End `round` as `closed` (aggregated) or `failed` (with `reason`): store the privacy
    /// spent and the next global model (`round + 1`, blob already stored; for a failed round
    /// the same blob as the round's own), and open round `round + 1` with `next_deadline_ms`
    /// unless it was the last, all in one transaction.
    pub async fn end_round(&self, end: &RoundEnd<'_>) -> Result<(), AggregatorError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("UPDATE rounds SET state = $1, reason = $2, closed_at = $3, rho = $4, epsilon = $5 WHERE round = $6")
            .bind(end.state)
            .bind(end.reason)
            .bind(now())
            .bind(end.rho)
            .bind(end.epsilon)
            .bind(i64::from(end.round))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("INSERT INTO models (model, sha256, created_at, server_state_sha256) VALUES ($1, $2, $3, $4)")
            .bind(i64::from(end.round + 1))
            .bind(end.next_sha256)
            .bind(now())
            .bind(end.server_state_sha256)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if let Some(deadline) = end.open_next_with_deadline_ms {
            sqlx::query(
                "INSERT INTO rounds (round, state, opened_at, deadline_ms) VALUES ($1, 'open', $2, $3)",
            )
            .bind(i64::from(end.round + 1))
            .bind(now())
            .bind(deadline)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// All rounds, in order.
    pub async fn rounds(&self) -> Result<Vec<RoundRow>, AggregatorError> {
        let rows = sqlx::query(
            "SELECT round, state, reason, rho, epsilon, opened_at, closed_at, deadline_ms \
             FROM rounds ORDER BY round",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(RoundRow {
                    round: r.try_get::<i64, _>("round").map_err(db)? as u32,
                    state: r.try_get("state").map_err(db)?,
                    reason: r.try_get("reason").map_err(db)?,
                    rho: r.try_get("rho").map_err(db)?,
                    epsilon: r.try_get("epsilon").map_err(db)?,
                    opened_at: r.try_get("opened_at").map_err(db)?,
                    closed_at: r.try_get("closed_at").map_err(db)?,
                    deadline_ms: r.try_get("deadline_ms").map_err(db)?,
                })
            })
            .collect()
    }

    /// Record a site's privacy-ledger entry (idempotent per site and round).
    pub async fn insert_ledger(&self, r: &LedgerRow) -> Result<(), AggregatorError> {
        sqlx::query(
            "INSERT INTO privacy_ledger (site, round, unit, mechanism, sampling_rate, noise_multiplier, steps, epsilon, delta) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (site, round) DO NOTHING",
        )
        .bind(&r.site)
        .bind(i64::from(r.round))
        .bind(&r.unit)
        .bind(&r.mechanism)
        .bind(r.sampling_rate)
        .bind(r.noise_multiplier)
        .bind(r.steps as i64)
        .bind(r.epsilon)
        .bind(r.delta)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Every ledger entry, by site then round.
    pub async fn ledger(&self) -> Result<Vec<LedgerRow>, AggregatorError> {
        self.ledger_every(1).await
    }

    /// As [`Store::ledger`], thinned for charts: rounds `1, 1 + step, …` and each site's
    /// latest.
    pub async fn ledger_every(&self, step: u32) -> Result<Vec<LedgerRow>, AggregatorError> {
        let rows = sqlx::query(
            "SELECT p.site, p.round, p.unit, p.mechanism, p.sampling_rate, p.noise_multiplier, \
             p.steps, p.epsilon, p.delta FROM privacy_ledger p \
             JOIN (SELECT site, MAX(round) AS last FROM privacy_ledger GROUP BY site) l ON l.site = p.site \
             WHERE (p.round - 1) % $1 = 0 OR p.round = l.last ORDER BY p.site, p.round",
        )
        .bind(i64::from(step.max(1)))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(LedgerRow {
                    site: r.try_get("site").map_err(db)?,
                    round: r.try_get::<i64, _>("round").map_err(db)? as u32,
                    unit: r.try_get("unit").map_err(db)?,
                    mechanism: r.try_get("mechanism").map_err(db)?,
                    sampling_rate: r.try_get("sampling_rate").map_err(db)?,
                    noise_multiplier: r.try_get("noise_multiplier").map_err(db)?,
                    steps: r.try_get::<i64, _>("steps").map_err(db)? as u64,
                    epsilon: r.try_get("epsilon").map_err(db)?,
                    delta: r.try_get("delta").map_err(db)?,
                })
            })
            .collect()
    }

    /// Store `site`'s statistics (JSON) unless it has some already; returns whether these were
    /// stored.
    pub async fn insert_statistics(&self, site: &str, json: &str) -> Result<bool, AggregatorError> {
        let r = sqlx::query(
            "INSERT INTO site_statistics (site, seq, features, stored_at) \
             SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3 FROM site_statistics WHERE true \
             ON CONFLICT (site) DO NOTHING",
        )
        .bind(site)
        .bind(json)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Every site's statistics (site, JSON), in the order they were stored.
    pub async fn statistics(&self) -> Result<Vec<(String, String)>, AggregatorError> {
        self.text_pairs("SELECT site, features AS second FROM site_statistics ORDER BY seq")
            .await
    }

    /// The rows of `sql`, which selects two text columns named `site` and `second`.
    async fn text_pairs(
        &self,
        sql: &'static str,
    ) -> Result<Vec<(String, String)>, AggregatorError> {
        let rows = sqlx::query(sql).fetch_all(&self.pool).await.map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("site").map_err(db)?,
                    r.try_get("second").map_err(db)?,
                ))
            })
            .collect()
    }

    /// Record that `site` left the federation (idempotent: the first reason stays).
    pub async fn insert_departure(&self, site: &str, reason: &str) -> Result<(), AggregatorError> {
        sqlx::query(
            "INSERT INTO departures (site, reason, at) VALUES ($1, $2, $3) ON CONFLICT (site) DO NOTHING",
        )
        .bind(site)
        .bind(reason)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Sites that left, with their reasons, by name.
    pub async fn departures(&self) -> Result<Vec<(String, String)>, AggregatorError> {
        self.text_pairs("SELECT site, reason AS second FROM departures ORDER BY site")
            .await
    }

    /// Record (or replace) a site's evaluation of a global model.
    pub async fn insert_metric(&self, m: &MetricRow) -> Result<(), AggregatorError> {
        sqlx::query(
            "INSERT INTO metrics (model, site, test_accuracy, num_test_examples, balanced_accuracy, macro_f1, auroc, \
             validation_accuracy, num_validation_examples) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (model, site) DO UPDATE SET test_accuracy = excluded.test_accuracy, \
             num_test_examples = excluded.num_test_examples, balanced_accuracy = excluded.balanced_accuracy, \
             macro_f1 = excluded.macro_f1, auroc = excluded.auroc, \
             validation_accuracy = excluded.validation_accuracy, \
             num_validation_examples = excluded.num_validation_examples",
        )
        .bind(i64::from(m.model))
        .bind(&m.site)
        .bind(m.test_accuracy)
        .bind(m.num_test_examples as i64)
        .bind(m.balanced_accuracy)
        .bind(m.macro_f1)
        .bind(m.auroc)
        .bind(m.validation_accuracy)
        .bind(m.num_validation_examples as i64)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// All evaluations.
    pub async fn metrics(&self) -> Result<Vec<MetricRow>, AggregatorError> {
        self.metrics_every(1).await
    }

    /// As [`Store::metrics`], thinned for charts: models `1, 1 + step, 1 + 2·step, …` and each
    /// site's latest.
    pub async fn metrics_every(&self, step: u32) -> Result<Vec<MetricRow>, AggregatorError> {
        let rows = sqlx::query(
            "SELECT m.model, m.site, m.test_accuracy, m.num_test_examples, m.balanced_accuracy, \
             m.macro_f1, m.auroc, m.validation_accuracy, m.num_validation_examples FROM metrics m \
             JOIN (SELECT site, MAX(model) AS last FROM metrics GROUP BY site) l ON l.site = m.site \
             WHERE (m.model - 1) % $1 = 0 OR m.model = l.last ORDER BY m.model, m.site",
        )
        .bind(i64::from(step.max(1)))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(MetricRow {
                    model: r.try_get::<i64, _>("model").map_err(db)? as u32,
                    site: r.try_get("site").map_err(db)?,
                    test_accuracy: r.try_get("test_accuracy").map_err(db)?,
                    num_test_examples: r.try_get::<i64, _>("num_test_examples").map_err(db)? as u64,
                    balanced_accuracy: r.try_get("balanced_accuracy").map_err(db)?,
                    macro_f1: r.try_get("macro_f1").map_err(db)?,
                    auroc: r.try_get("auroc").map_err(db)?,
                    validation_accuracy: r.try_get("validation_accuracy").map_err(db)?,
                    num_validation_examples: r
                        .try_get::<i64, _>("num_validation_examples")
                        .map_err(db)? as u64,
                })
            })
            .collect()
    }

    /// Record a rejected update (audit trail) of class `kind`.
    pub async fn insert_rejection(
        &self,
        round: Option<u32>,
        site: Option<&str>,
        kind: &str,
        reason: &str,
    ) -> Result<(), AggregatorError> {
        sqlx::query(
            "INSERT INTO rejections (round, site, kind, reason, at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(round.map(i64::from))
        .bind(site)
        .bind(kind)
        .bind(reason)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// The latest `limit` rejections, newest first.
    pub async fn rejections(&self, limit: u32) -> Result<Vec<RejectionRow>, AggregatorError> {
        let rows = sqlx::query(
            "SELECT round, site, kind, reason, at FROM rejections ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(RejectionRow {
                    round: r
                        .try_get::<Option<i64>, _>("round")
                        .map_err(db)?
                        .map(|v| v as u32),
                    site: r.try_get("site").map_err(db)?,
                    kind: r.try_get("kind").map_err(db)?,
                    reason: r.try_get("reason").map_err(db)?,
                    at: r.try_get("at").map_err(db)?,
                })
            })
            .collect()
    }

    /// Rejections per class (`unclassified` for rows from before classes were stored).
    pub async fn rejection_counts(&self) -> Result<Vec<(String, u64)>, AggregatorError> {
        let rows = sqlx::query(
            "SELECT COALESCE(kind, 'unclassified') AS kind, COUNT(*) AS n FROM rejections \
             GROUP BY COALESCE(kind, 'unclassified') ORDER BY kind",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("kind").map_err(db)?,
                    r.try_get::<i64, _>("n").map_err(db)? as u64,
                ))
            })
            .collect()
    }

    /// Accepted updates' sizes and arrivals from round `from_round` on, by round then site.
    pub async fn update_rows(&self, from_round: u32) -> Result<Vec<UpdateRow>, AggregatorError> {
        let rows = sqlx::query(
            "SELECT round, site, size_bytes, received_at FROM updates WHERE round >= $1 \
             ORDER BY round, site",
        )
        .bind(i64::from(from_round))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(UpdateRow {
                    round: r.try_get::<i64, _>("round").map_err(db)? as u32,
                    site: r.try_get("site").map_err(db)?,
                    size_bytes: r.try_get::<i64, _>("size_bytes").map_err(db)? as u64,
                    received_at: r.try_get("received_at").map_err(db)?,
                })
            })
            .collect()
    }

    /// Per round: updates accepted and their bytes.
    pub async fn update_totals(
        &self,
    ) -> Result<std::collections::BTreeMap<u32, (u64, u64)>, AggregatorError> {
        let rows = sqlx::query(
            "SELECT round, COUNT(*) AS n, CAST(SUM(size_bytes) AS BIGINT) AS bytes FROM updates GROUP BY round",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>("round").map_err(db)? as u32,
                    (
                        r.try_get::<i64, _>("n").map_err(db)? as u64,
                        r.try_get::<i64, _>("bytes").map_err(db)? as u64,
                    ),
                ))
            })
            .collect()
    }

    /// Joined sites and when they joined (Unix seconds), by name.
    pub async fn sites_joined(&self) -> Result<Vec<(String, i64)>, AggregatorError> {
        let rows = sqlx::query("SELECT name, joined_at FROM sites ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("name").map_err(db)?,
                    r.try_get("joined_at").map_err(db)?,
                ))
            })
            .collect()
    }

    /// Number of rejections recorded.
    pub async fn rejection_count(&self) -> Result<i64, AggregatorError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM rejections")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        row.try_get("n").map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A start that crashed after storing the spec but before the initial model retries
    /// cleanly; the stored spec is the first one.
    #[tokio::test]
    async fn storing_the_spec_twice_keeps_the_first() {
        let store = Store::connect("sqlite::memory:").await.unwrap();
        assert_eq!(store.spec().await.unwrap(), None);
        store.set_spec("version = 1", "aa").await.unwrap();
        store.set_spec("version = 1", "aa").await.unwrap();
        assert_eq!(
            store.spec().await.unwrap(),
            Some(("version = 1".to_owned(), "aa".to_owned()))
        );
    }
}
