//! Closing a round: the rules that make a close due, the aggregation (from the round's running
//! mean, the persisted updates, or a secure-aggregation round's unmasked mean) outside the state
//! lock, and
//! what is recorded when a round closes or fails (global model, privacy spent, next round).

use super::*;

/// Check the next global model is finite and write it (and the server state) to the blob
/// store.
pub(super) fn write_next(
    blobs: &BlobStore,
    next: Tensors,
    state: Option<ServerState>,
    started: std::time::Instant,
) -> Result<Aggregated, AggregatorError> {
    for (name, d) in next.names.iter().zip(&next.data) {
        if let Some(i) = d.iter().position(|x| !x.is_finite()) {
            return Err(AggregatorError::NonFiniteModel(format!(
                "tensor `{name}` is {} at flat index {i}",
                d[i]
            )));
        }
    }
    let write = |f: &dyn Fn(&mut crate::blobs::BlobWriter) -> std::io::Result<()>| {
        let mut w = blobs.writer()?;
        f(&mut w).map_err(crate::blobs::io("writing a model".into()))?;
        let size = w.len();
        Ok::<_, AggregatorError>((blobs.commit(w.finish())?, size))
    };
    let (sha, size) = write(&|w| next.write_safetensors(w))?;
    let state_sha = state
        .map(|s| write(&|w| s.write_safetensors(w)).map(|r| r.0))
        .transpose()?;
    Ok(Aggregated {
        next,
        sha,
        size,
        state_sha,
        started,
    })
}

/// The persisted FedAdam/FedYogi server state `sha` (`None` for other strategies, or before
/// the first close: zero moments).
fn read_state(
    blobs: &BlobStore,
    strategy: crate::strategy::Strategy,
    sha: Option<&str>,
    global: &Tensors,
) -> Result<Option<ServerState>, AggregatorError> {
    match (sha, strategy.is_stateful()) {
        (Some(sha), true) => {
            let path = blobs.existing_path(sha)?;
            let (names, shapes) = ServerState::names(global);
            let mut f =
                FileTensors::open(&path, &names, &shapes).map_err(|e| e.unwrap_or_else(|e| e))?;
            Ok(Some(ServerState::from_file(&mut f, global, sha)?))
        }
        _ => Ok(None),
    }
}

/// What a close's aggregation produced: the next global model and its blob, the server
/// state's blob, and when the close started (for the log).
pub(super) struct Aggregated {
    pub(super) next: Tensors,
    pub(super) sha: String,
    pub(super) size: u64,
    pub(super) state_sha: Option<String>,
    pub(super) started: std::time::Instant,
}

/// A round close that is due: what the aggregation reads, taken under the state lock
/// ([`Federation::maybe_close`]) and run without it ([`Federation::run_close`]).
#[must_use = "a due close must be run, or the round stays closing"]
pub(super) struct CloseJob {
    pub(super) round: u32,
    pub(super) now: i64,
    pub(super) inputs: CloseInputs,
    pub(super) global: Arc<Tensors>,
    pub(super) server_state: Option<String>,
}

/// What a round aggregates.
pub(super) enum CloseInputs {
    /// The persisted plaintext updates.
    Updates(Vec<UpdateMeta>),
    /// The unmasked weighted mean of a secure-aggregation round (flattened in the global
    /// model's name order), its total weight and number of sites.
    Mean {
        mean: Vec<f32>,
        total_weight: u64,
        sites: usize,
    },
}

impl CloseInputs {
    /// Sites aggregated and their `Σ num_examples`.
    pub(super) fn counts(&self) -> (usize, u64) {
        match self {
            // Each weight is at most `max_num_examples`, so the sum cannot wrap; saturate anyway.
            Self::Updates(u) => (
                u.len(),
                u.iter().fold(0u64, |t, u| t.saturating_add(u.num_examples)),
            ),
            Self::Mean {
                total_weight,
                sites,
                ..
            } => (*sites, *total_weight),
        }
    }
}

impl Federation {
    /// The round rules. A round closes (FedAvg) when the quorum (`min_sites`) has submitted
    /// and either every enrolled site has, or the deadline passed. At the deadline without a
    /// quorum it fails: the next round starts from the same global model.
    ///
    /// A due close is returned, with the round marked closing, for the caller to run with
    /// [`Federation::run_close`] after releasing the state lock; `None` when nothing (more) is
    /// due, or a close is already running.
    pub(super) async fn maybe_close(
        &self,
        st: &mut State,
    ) -> Result<Option<CloseJob>, AggregatorError> {
        if self.done(st) || st.closing {
            return Ok(None);
        }
        let now = now_ms();
        if st.deadline_ms.is_none() && st.sites.len() >= self.config.min_sites as usize {
            let d = self.next_deadline(now);
            self.store.set_deadline(st.round, d).await?;
            st.deadline_ms = Some(d);
            tracing::info!(
                round = st.round,
                deadline_in_s = self.config.round_timeout.as_secs_f64(),
                "quorum joined; round deadline set"
            );
        }
        if self.config.secure_aggregation.is_some() {
            return self.secure_step(st, now).await;
        }
        let due = st.due(now, self.config.min_sites);
        if due == Due::Close {
            let updates = self.store.updates(st.round).await?;
            st.closing = true;
            Ok(Some(CloseJob {
                round: st.round,
                now,
                inputs: CloseInputs::Updates(updates),
                global: st.global.clone(),
                server_state: st.server_state_sha.clone(),
            }))
        } else if due == Due::Fail {
            self.fail(st, now).await.map(|()| None)
        } else {
            Ok(None)
        }
    }

    /// Run a due close (if any) without holding the state lock, then record it under the
    /// lock. Whatever happens, the round stops being marked closing and waiters are woken; on
    /// failure the round stays open and the next tick retries. The close runs as its own task,
    /// so a caller that goes away (a site hanging up on its upload) does not cut it short.
    ///
    /// # Errors
    /// Blob-store or database failures.
    pub(super) async fn run_close(&self, job: Option<CloseJob>) -> Result<(), AggregatorError> {
        let Some(job) = job else {
            return Ok(());
        };
        let svc = self.clone();
        match tokio::spawn(async move { svc.close(job).await }).await {
            Ok(r) => r,
            Err(source) => {
                // It panicked before it could clear the mark: the round stays open.
                self.end_closing(&mut *self.state.lock().await);
                Err(AggregatorError::Worker {
                    what: "the round close task",
                    source,
                })
            }
        }
    }

    /// [`Federation::run_close`]'s task.
    pub(super) async fn close(&self, mut job: CloseJob) -> Result<(), AggregatorError> {
        let aggregated = self.aggregate(&mut job).await;
        let mut st = self.state.lock().await;
        let r = match aggregated {
            Ok(a) => self.finish_close(&mut st, &job, a).await,
            // Deterministic in the persisted updates: retrying would fail the same way.
            Err(e @ AggregatorError::NonFiniteModel(_)) => {
                let reason = format!("{e}; the global model stays the previous one");
                let open_next = job.round < self.config.rounds;
                let r = self.fail_round(&mut st, job.now, &reason, open_next).await;
                tracing::error!(round = job.round, %reason, "round failed");
                r
            }
            Err(e) => Err(e),
        };
        self.end_closing(&mut st);
        r
    }

    /// Clear the closing mark (under the state lock) and wake what waits in
    /// [`Federation::settled`].
    pub(super) fn end_closing(&self, st: &mut State) {
        st.closing = false;
        self.closed.notify_waiters();
    }

    /// Aggregate a round and write the next global model (and server state) to the blob
    /// store; the state lock is not held. FedAvg, FedAdam and FedYogi take the round's running
    /// mean, folding first whatever it lacks (after a restart, all of the round's updates, in
    /// their acceptance order); Median and trimmed mean read every update from its file. A
    /// secure round's mean is moved out of the job, not copied (its counts stay for the
    /// record).
    pub(super) async fn aggregate(
        &self,
        job: &mut CloseJob,
    ) -> Result<Aggregated, AggregatorError> {
        let (blobs, global) = (self.blobs.clone(), job.global.clone());
        let metas = match &mut job.inputs {
            CloseInputs::Updates(u) => u.clone(),
            CloseInputs::Mean { mean, .. } => {
                let mean = std::mem::take(mean);
                return self.aggregate_secure_mean(job, mean).await;
            }
        };
        let strategy = self.config.strategy;
        let server_state = job.server_state.clone();
        let started = std::time::Instant::now();
        if strategy.is_mean_based() {
            let (mut mean, round) = (self.mean.clone().lock_owned().await, job.round);
            return blocking(move || {
                let read = mean.catch_up(round, &global, &metas, |u| {
                    open_update(&blobs, u, &global.names, &global.shapes)
                })?;
                // Taken out: a retried close (after an IO error below) folds from the files.
                let taken = std::mem::replace(&mut *mean, RunningMean::new(round + 1));
                drop(mean);
                log_read_back(round, read, true);
                let prior = read_state(&blobs, strategy, server_state.as_deref(), &global)?;
                let (next, state) = taken.finish(strategy, &global, prior);
                write_next(&blobs, next, state, started)
            })
            .await;
        }
        // Median and trimmed mean, slice by slice from the files (and the persisted server
        // state): memory does not grow with the number of sites.
        blocking(move || {
            let mut files = metas
                .iter()
                .map(|u| {
                    let f = open_update(&blobs, u, &global.names, &global.shapes)?;
                    Ok((u.num_examples, f))
                })
                .collect::<Result<Vec<_>, AggregatorError>>()?;
            let (next, state) = aggregate_files(strategy, &global, &mut files, None)?;
            // Inputs are checked against their names before anything is written.
            for ((_, f), u) in files.iter_mut().zip(&metas) {
                f.verify_sha256(&u.sha256)?;
            }
            write_next(&blobs, next, state, started)
        })
        .await
    }

    /// Apply the strategy to a secure-aggregation round's unmasked mean (flattened in the
    /// global model's name order): the mean is what FedAvg of the alive sites' updates gives.
    pub(super) async fn aggregate_secure_mean(
        &self,
        job: &CloseJob,
        mean: Vec<f32>,
    ) -> Result<Aggregated, AggregatorError> {
        let (blobs, global) = (self.blobs.clone(), job.global.clone());
        let strategy = self.config.strategy;
        let server_state = job.server_state.clone();
        let started = std::time::Instant::now();
        blocking(move || {
            let total: usize = global.data.iter().map(Vec::len).sum();
            assert_eq!(mean.len(), total, "flattened length");
            let prior = read_state(&blobs, strategy, server_state.as_deref(), &global)?;
            // Per tensor, for the same in-place path as the running mean.
            let mut at = 0;
            let per_tensor: Vec<Vec<f32>> = global
                .data
                .iter()
                .map(|g| {
                    at += g.len();
                    mean[at - g.len()..at].to_vec()
                })
                .collect();
            drop(mean);
            let (next, state) = aggregate_mean_in_place(strategy, &global, prior, per_tensor);
            write_next(&blobs, next, state, started)
        })
        .await
    }

    /// Record a closed round (under the state lock) and open the next.
    pub(super) async fn finish_close(
        &self,
        st: &mut State,
        job: &CloseJob,
        a: Aggregated,
    ) -> Result<(), AggregatorError> {
        let Aggregated {
            next,
            sha,
            size,
            state_sha,
            started,
        } = a;
        let (round, now) = (job.round, job.now);
        let (sites, total) = job.inputs.counts();
        let (rho, epsilon) = self.round_privacy(round).await?;
        let open_next = round < self.config.rounds;
        self.store
            .end_round(&RoundEnd {
                round,
                state: "closed",
                reason: None,
                rho,
                epsilon,
                next_sha256: &sha,
                server_state_sha256: state_sha.as_deref(),
                open_next_with_deadline_ms: open_next.then(|| self.next_deadline(now)),
            })
            .await?;
        tracing::info!(
            round,
            sites,
            num_examples = total,
            rho,
            epsilon,
            global_model = %sha,
            aggregate_ms = started.elapsed().as_millis() as u64,
            "round closed"
        );
        self.metrics
            .round_ended(false, (now - st.opened_ms) as f64 / 1000.0);
        st.global = Arc::new(next);
        st.global_sha = sha;
        st.server_state_sha = state_sha;
        st.global_size = size;
        self.advance(st, now, open_next);
        Ok(())
    }

    /// The deadline passed without a quorum.
    pub(super) async fn fail(&self, st: &mut State, now: i64) -> Result<(), AggregatorError> {
        let reason = format!(
            "quorum not met: {} of the required {} sites submitted before the deadline",
            st.submitted.len(),
            self.config.min_sites
        );
        let open_next = st.round < self.config.rounds;
        self.fail_round(st, now, &reason, open_next).await?;
        tracing::warn!(round = st.round - 1, %reason, "round failed; the next round starts from the same global model");
        Ok(())
    }

    /// End the open round as failed with `reason`: the next global model is the current one,
    /// and round + 1 opens only if `open_next`. The round's privacy is charged anyway (updates
    /// that did arrive were seen by the aggregator).
    pub(super) async fn fail_round(
        &self,
        st: &mut State,
        now: i64,
        reason: &str,
        open_next: bool,
    ) -> Result<(), AggregatorError> {
        let (rho, epsilon) = self.round_privacy(st.round).await?;
        self.store
            .end_round(&RoundEnd {
                round: st.round,
                state: "failed",
                reason: Some(reason),
                rho,
                epsilon,
                next_sha256: &st.global_sha,
                server_state_sha256: st.server_state_sha.as_deref(),
                open_next_with_deadline_ms: open_next.then(|| self.next_deadline(now)),
            })
            .await?;
        self.metrics
            .round_ended(true, (now - st.opened_ms) as f64 / 1000.0);
        self.advance(st, now, open_next);
        Ok(())
    }

    /// Privacy after `round`: site mode, zCDP ρ and ε of the site-level mechanism composed over
    /// the rounds; record mode, ρ = 0 (not zCDP-accounted) and the largest ε any site reported.
    pub(super) async fn round_privacy(&self, round: u32) -> Result<(f64, f64), AggregatorError> {
        match self.config.dp_mode {
            DpMode::Site => Ok(self.config.site_level_spent(round)?),
            DpMode::Record => Ok((
                0.0,
                self.store
                    .ledger()
                    .await?
                    .iter()
                    .filter(|l| l.round <= round)
                    .map(|l| l.epsilon)
                    .fold(0.0, f64::max),
            )),
        }
    }

    pub(super) fn advance(&self, st: &mut State, now: i64, open_next: bool) {
        st.round += 1;
        st.submitted.clear();
        st.opened_ms = now;
        st.deadline_ms = open_next.then(|| self.next_deadline(now));
        self.metrics.set_round(st.round);
    }
}
