//! Aggregator persistence through sqlx (`Any` driver; SQLite by default).
//!
//! Every accepted update is written here before the site gets its acknowledgement.

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

use crate::AggregatorError;

/// Seconds since the Unix epoch.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Metadata of an accepted update.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateMeta {
    /// Site name.
    pub site: String,
    /// Training examples behind the update.
    pub num_examples: u64,
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
}

/// A round's persisted state.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRow {
    /// Round number (from 1).
    pub round: u32,
    /// `open` or `closed`.
    pub state: String,
    /// Cumulative zCDP ρ after the round closed.
    pub rho: Option<f64>,
    /// Cumulative ε after the round closed.
    pub epsilon: Option<f64>,
}

/// The aggregator's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

fn db(e: sqlx::Error) -> AggregatorError {
    AggregatorError::Database(e.to_string())
}

impl Store {
    /// Connect to `url` (`sqlite://PATH?mode=rwc` or `sqlite::memory:`) and run migrations.
    ///
    /// # Errors
    /// [`AggregatorError::Database`] if the database cannot be opened or migrated.
    pub async fn connect(url: &str) -> Result<Self, AggregatorError> {
        install_default_drivers();
        // One connection: SQLite serialises writers anyway, and an in-memory database must not
        // be split across connections.
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .map_err(db)?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| AggregatorError::Database(e.to_string()))?;
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

    /// Store the initial global model (model 1) and open round 1.
    pub async fn init(&self, sha256: &str, bytes: &[u8]) -> Result<(), AggregatorError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("INSERT INTO models (model, sha256, bytes, created_at) VALUES (1, $1, $2, $3)")
            .bind(sha256)
            .bind(bytes)
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

    /// Bytes of global model `model`.
    pub async fn model_bytes(&self, model: u32) -> Result<Option<Vec<u8>>, AggregatorError> {
        let row = sqlx::query("SELECT bytes FROM models WHERE model = $1")
            .bind(i64::from(model))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(|r| r.try_get::<Vec<u8>, _>("bytes").map_err(db))
            .transpose()
    }

    /// Persist an accepted update.
    pub async fn insert_update(
        &self,
        round: u32,
        site: &str,
        num_examples: u64,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<(), AggregatorError> {
        sqlx::query(
            "INSERT INTO updates (round, site, num_examples, sha256, bytes, received_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(i64::from(round))
        .bind(site)
        .bind(num_examples as i64)
        .bind(sha256)
        .bind(bytes)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Accepted updates of `round`, by site name.
    pub async fn updates(&self, round: u32) -> Result<Vec<UpdateMeta>, AggregatorError> {
        let rows =
            sqlx::query("SELECT site, num_examples FROM updates WHERE round = $1 ORDER BY site")
                .bind(i64::from(round))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(UpdateMeta {
                    site: r.try_get("site").map_err(db)?,
                    num_examples: r.try_get::<i64, _>("num_examples").map_err(db)? as u64,
                })
            })
            .collect()
    }

    /// Bytes of one accepted update.
    pub async fn update_bytes(&self, round: u32, site: &str) -> Result<Vec<u8>, AggregatorError> {
        let row = sqlx::query("SELECT bytes FROM updates WHERE round = $1 AND site = $2")
            .bind(i64::from(round))
            .bind(site)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        row.try_get("bytes").map_err(db)
    }

    /// Close `round`: store the privacy spent and the next global model (`round + 1`), and open
    /// round `round + 1` unless it was the last, all in one transaction.
    pub async fn close_round(
        &self,
        round: u32,
        rho: f64,
        epsilon: f64,
        next_sha256: &str,
        next_bytes: &[u8],
        open_next: bool,
    ) -> Result<(), AggregatorError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("UPDATE rounds SET state = 'closed', closed_at = $1, rho = $2, epsilon = $3 WHERE round = $4")
            .bind(now())
            .bind(rho)
            .bind(epsilon)
            .bind(i64::from(round))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query(
            "INSERT INTO models (model, sha256, bytes, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(i64::from(round + 1))
        .bind(next_sha256)
        .bind(next_bytes)
        .bind(now())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if open_next {
            sqlx::query("INSERT INTO rounds (round, state, opened_at) VALUES ($1, 'open', $2)")
                .bind(i64::from(round + 1))
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// All rounds, in order.
    pub async fn rounds(&self) -> Result<Vec<RoundRow>, AggregatorError> {
        let rows = sqlx::query("SELECT round, state, rho, epsilon FROM rounds ORDER BY round")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(RoundRow {
                    round: r.try_get::<i64, _>("round").map_err(db)? as u32,
                    state: r.try_get("state").map_err(db)?,
                    rho: r.try_get("rho").map_err(db)?,
                    epsilon: r.try_get("epsilon").map_err(db)?,
                })
            })
            .collect()
    }

    /// Record (or replace) a site's evaluation of a global model.
    pub async fn insert_metric(&self, m: &MetricRow) -> Result<(), AggregatorError> {
        sqlx::query(
            "INSERT INTO metrics (model, site, test_accuracy, num_test_examples) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (model, site) DO UPDATE SET test_accuracy = excluded.test_accuracy, \
             num_test_examples = excluded.num_test_examples",
        )
        .bind(i64::from(m.model))
        .bind(&m.site)
        .bind(m.test_accuracy)
        .bind(m.num_test_examples as i64)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// All evaluations.
    pub async fn metrics(&self) -> Result<Vec<MetricRow>, AggregatorError> {
        let rows = sqlx::query("SELECT model, site, test_accuracy, num_test_examples FROM metrics ORDER BY model, site")
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
                })
            })
            .collect()
    }

    /// Record a rejected update (audit trail).
    pub async fn insert_rejection(
        &self,
        round: Option<u32>,
        site: Option<&str>,
        reason: &str,
    ) -> Result<(), AggregatorError> {
        sqlx::query("INSERT INTO rejections (round, site, reason, at) VALUES ($1, $2, $3, $4)")
            .bind(round.map(i64::from))
            .bind(site)
            .bind(reason)
            .bind(now())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
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
