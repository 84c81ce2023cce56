//! The `fedee.v1.Federation` gRPC service.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use fedee_proto::v1::federation_server::{Federation as FederationApi, FederationServer};
use fedee_proto::v1::{
    Chunk, DownloadModelRequest, FeatureStatistics, GetSpecRequest, JoinRequest, JoinResponse,
    LeaveRequest, LeaveResponse, MetricsAck, MetricsReport, NextTaskRequest, PrivacyEntry,
    RoundStatus, SiteMetric, SitePrivacy, SpecResponse, StatisticsRequest, StatisticsResponse,
    StatusRequest, StatusResponse, SubmitUpdateMessage, SubmitUpdateResponse, Task, TaskKind,
    UpdateHeader, submit_update_message,
};
use fedee_proto::{CHUNK_SIZE, ChunkCursor};
use futures::Stream;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status, Streaming};

use crate::blobs::{BlobStore, PendingBlob};
use crate::metrics::{Metrics, Reject};
use crate::round::{Due, State};
use crate::running_mean::RunningMean;
use crate::secure::{Ended, SecureRound};
use crate::store::{LedgerRow, MetricRow, RoundEnd, Store, UpdateMeta, now_ms};
use crate::strategy::{ServerState, aggregate_files, aggregate_mean_in_place};
use crate::tensors::{FileTensors, StreamCheck, Tensors};
use crate::{AggregatorError, Config};
use fedee_dp::DpMode;

mod close;
mod secure_api;

use close::{CloseInputs, CloseJob};
use secure_api::{secagg_code, secagg_response};

/// Check a received update in its file: a valid F32 safetensors header (else
/// [`Reject::Tensors`]), exactly the global model's names and shapes ([`Reject::Layout`]), and
/// only finite values ([`Reject::Tensors`]). Reads the file once in slices.
fn validate(
    pending: PendingBlob,
    names: &[String],
    shapes: &[Vec<usize>],
) -> Result<PendingBlob, (Reject, AggregatorError)> {
    let mut f = FileTensors::open(pending.path(), names, shapes).map_err(|e| match e {
        Ok(e) => (Reject::Tensors, e),
        Err(e) => (Reject::Layout, e),
    })?;
    f.check_finite().map_err(|e| (Reject::Tensors, e))?;
    Ok(pending)
}

/// A federation keeps the spec it started with: a restart must name the same file (or none,
/// if it started without one).
async fn check_spec(
    store: &Store,
    spec: Option<&fedee_spec::SignedSpec>,
) -> Result<(), AggregatorError> {
    let fresh = store.latest_model().await?.is_none();
    let stored = store.spec().await?;
    let bad = |m: String| Err(AggregatorError::Config(m));
    match (stored, spec) {
        (None, None) => Ok(()),
        (None, Some(_)) if fresh => Ok(()),
        (Some((_, sha)), Some(s)) if sha == s.sha256 => Ok(()),
        (None, Some(s)) => bad(format!(
            "this database holds a federation started without a spec, so --spec (sha256 {}) cannot apply to it: use a new --database-url and --blob-dir for the spec's federation",
            &s.sha256[..12]
        )),
        (Some((_, sha)), None) => bad(format!(
            "this federation was started with a federation spec (sha256 {}): restart with the same --spec file",
            &sha[..12.min(sha.len())]
        )),
        (Some((_, sha)), Some(s)) => bad(format!(
            "this federation runs the federation spec with sha256 {}, but --spec has sha256 {}: a spec cannot change once a federation started; restart with the original file, or start a new federation (new --database-url and --blob-dir)",
            &sha[..12.min(sha.len())],
            &s.sha256[..12]
        )),
    }
}

/// The initial model must be the spec's MLP: the same parameter names and shapes.
fn model_fits_spec(
    names: &[String],
    shapes: &[Vec<usize>],
    spec: &fedee_spec::FederationSpec,
) -> Result<(), AggregatorError> {
    let Some(mlp) = spec.mlp() else {
        return Ok(()); // BERT: the checkpoint's shapes are checked by the sites.
    };
    let want = mlp.parameter_shapes();
    let got: std::collections::BTreeMap<String, Vec<usize>> =
        names.iter().cloned().zip(shapes.iter().cloned()).collect();
    if got != want {
        let describe = |m: &std::collections::BTreeMap<String, Vec<usize>>| {
            m.iter()
                .map(|(n, s)| format!("{n} {s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(AggregatorError::Config(format!(
            "the initial model does not fit the federation spec: it has {}, the spec's MLP ({} encoded features, hidden {:?}, {} classes) needs {}; create it with `fedee init-model --spec SPEC --out FILE`",
            describe(&got),
            mlp.in_features,
            mlp.hidden,
            mlp.out_features,
            describe(&want)
        )));
    }
    Ok(())
}

/// Stream a blob file in 1 MiB chunks, read on a blocking thread a few chunks ahead, its
/// SHA-256 checked as it goes: a corrupt file ends the stream with `DATA_LOSS` instead of a
/// clean end. Memory per download is a few chunks, whatever the model size.
fn stream_blob(
    path: std::path::PathBuf,
    sha: String,
) -> impl Stream<Item = Result<Chunk, Status>> + Send + 'static {
    use sha2::Digest;
    use std::io::Read;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Chunk, Status>>(2);
    tokio::task::spawn_blocking(move || {
        let fail = |e: String| {
            tracing::error!(blob = %sha, error = %e, "serving a model failed");
            Status::data_loss(format!("global model blob unreadable or corrupt: {e}"))
        };
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => return tx.blocking_send(Err(fail(e.to_string()))),
        };
        let total_size = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut hasher = sha2::Sha256::new();
        let mut offset = 0u64;
        loop {
            let mut data = vec![0u8; CHUNK_SIZE];
            let mut n = 0;
            while n < CHUNK_SIZE {
                match f.read(&mut data[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return tx.blocking_send(Err(fail(e.to_string()))),
                }
            }
            data.truncate(n);
            hasher.update(&data);
            if n == 0 && offset > 0 {
                return tx.blocking_send(Err(fail("the file shrank while being read".into())));
            }
            let last = (n as u64) < CHUNK_SIZE as u64 || offset + n as u64 == total_size;
            if last && hex::encode(hasher.clone().finalize()) != sha {
                return tx.blocking_send(Err(fail("SHA-256 mismatch".into())));
            }
            tx.blocking_send(Ok(Chunk {
                offset,
                total_size,
                data: data.into(),
            }))?;
            offset += n as u64;
            if last {
                break;
            }
        }
        Ok(())
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The federation service.
#[derive(Debug, Clone)]
pub struct Federation {
    config: Arc<Config>,
    store: Store,
    blobs: BlobStore,
    metrics: Metrics,
    state: Arc<Mutex<State>>,
    /// Uploads received at once (`Config::max_concurrent_uploads`); others wait their turn.
    uploads: Arc<tokio::sync::Semaphore>,
    /// Signalled when a close ends (`State::closing` back to false).
    closed: Arc<tokio::sync::Notify>,
    /// The open round's running weighted mean of plaintext updates (mean-based strategies);
    /// locked after, never while holding, the state lock.
    mean: Arc<Mutex<RunningMean>>,
}

/// The pooled statistics of a federated standardisation: per feature of `expected`, the sums
/// of the first `needed` sites' stored statistics (`rows`: site, JSON); empty until `needed`
/// sites have sent theirs.
fn pooled_statistics(
    expected: &[String],
    rows: &[(String, String)],
    needed: u32,
) -> Result<Vec<FeatureStatistics>, Status> {
    if rows.len() < needed as usize {
        return Ok(vec![]);
    }
    let mut totals: Vec<FeatureStatistics> = expected
        .iter()
        .map(|feature| FeatureStatistics {
            feature: feature.clone(),
            ..Default::default()
        })
        .collect();
    for (_, json) in rows.iter().take(needed as usize) {
        let parsed: Vec<(String, f64, f64, f64)> =
            serde_json::from_str(json).map_err(|e| Status::internal(e.to_string()))?;
        for (t, (_, n, s, ss)) in totals.iter_mut().zip(parsed) {
            t.count += n;
            t.sum += s;
            t.sum_squares += ss;
        }
    }
    Ok(totals)
}

/// Model selection on validation splits: among `models` (those closed rounds produced), the
/// one with the highest accuracy on the sites' validation splits, weighted by their
/// validation examples; ties go to the earlier model. Returns the model and that accuracy, or
/// `None` when no site reported validation metrics for any of them. Test metrics play no part,
/// so the selected model's test accuracy stays an unbiased estimate.
pub fn select_model(metrics: &[MetricRow], models: &[u32]) -> Option<(u32, f64)> {
    let mut best: Option<(u32, f64)> = None;
    for &model in models {
        let (mut sum, mut n) = (0.0, 0u64);
        for m in metrics.iter().filter(|m| m.model == model) {
            if let Some(v) = m.validation_accuracy {
                sum += v * m.num_validation_examples as f64;
                n += m.num_validation_examples;
            }
        }
        if n == 0 {
            continue;
        }
        let acc = sum / n as f64;
        if best.is_none_or(|(_, b)| acc > b) {
            best = Some((model, acc));
        }
    }
    best
}

fn internal(e: AggregatorError) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("internal error (see the aggregator log)")
}

fn valid_site_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c))
}

/// A refused update: the status for the site and the metric label.
type Refusal = (Reject, Status);

/// A [`StreamCheck`] refusal: not valid F32 safetensors or non-finite ([`Reject::Tensors`]),
/// or not the global model's layout ([`Reject::Layout`]).
fn refuse_invalid(e: Result<AggregatorError, AggregatorError>) -> Refusal {
    match e {
        Ok(e) => (Reject::Tensors, Status::invalid_argument(e.to_string())),
        Err(e) => (Reject::Layout, Status::invalid_argument(e.to_string())),
    }
}

fn refuse(reason: Reject) -> impl FnOnce(Status) -> Refusal {
    move |s| (reason, s)
}

/// Run blocking work (disk IO, aggregation) off the async worker threads.
/// Log a catch-up of the running mean that read more than the update just accepted (after a
/// restart, a failed fold), or that the close had to do itself (folds still queued).
fn log_read_back(round: u32, updates: usize, at_close: bool) {
    if updates > 1 || (at_close && updates > 0) {
        tracing::info!(
            round,
            updates,
            at_close,
            "running mean: updates read back from disk (after a restart, a failed fold, or folds still queued)"
        );
    }
}

/// An update's blob, bound to the global model's layout.
fn open_update(
    blobs: &BlobStore,
    u: &UpdateMeta,
    names: &[String],
    shapes: &[Vec<usize>],
) -> Result<FileTensors, AggregatorError> {
    let path = blobs.existing_path(&u.sha256)?;
    FileTensors::open(&path, names, shapes).map_err(|e| e.unwrap_or_else(|e| e))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AggregatorError> + Send + 'static,
) -> Result<T, AggregatorError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| AggregatorError::Worker {
            what: "a blocking worker task",
            source,
        })?
}

impl Federation {
    /// The aggregator's database (for read-only views such as the dashboard).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// Open (or resume) the federation in the configured database and blob store.
    ///
    /// # Errors
    /// Invalid config, an unreadable initial model, database or blob-store failures.
    pub async fn start(mut config: Config, metrics: Metrics) -> Result<Self, AggregatorError> {
        config.validate()?;
        // Only needed once; not kept for the life of the service.
        let initial_model = config.initial_model.take();
        // Fail before serving if accounting cannot cover every configured round.
        if config.dp_mode == DpMode::Site {
            let (rho, epsilon) = config.site_level_spent(config.rounds)?;
            tracing::info!(
                rho,
                epsilon,
                delta = config.delta,
                distributed_dp = config.distributed_dp(),
                "privacy after all rounds (site-level unit)"
            );
        } else {
            tracing::info!(
                "record-level DP: each site runs DP-SGD, enforces its own budget and reports its ε with each update"
            );
        }
        let store = Store::connect(&config.database_url).await?;
        let blobs = BlobStore::open_with(&config.blob_dir, config.direct_io)?;
        check_spec(&store, config.spec.as_ref()).await?;
        for name in &config.enroll {
            store.enroll(name).await?;
        }
        let latest = match store.latest_model().await? {
            Some(m) => m,
            None => {
                let bytes = initial_model.as_deref().ok_or_else(|| {
                    AggregatorError::Config(
                        "the database is new: an initial model is required (--initial-model)"
                            .into(),
                    )
                })?;
                // Checked in its file like an update (F32, finite), stored as given.
                let mut w = blobs.writer()?;
                std::io::Write::write_all(&mut w, bytes)
                    .map_err(crate::blobs::io("writing the initial model".into()))?;
                let pending = w.finish();
                let bad =
                    |e: AggregatorError| AggregatorError::Config(format!("initial model: {e}"));
                let (names, shapes) = FileTensors::layout(pending.path()).map_err(bad)?;
                if let Some(spec) = &config.spec {
                    model_fits_spec(&names, &shapes, &spec.spec)?;
                }
                let pending = validate(pending, &names, &shapes).map_err(|(_, e)| bad(e))?;
                let sha = blobs.commit(pending)?;
                if let Some(spec) = &config.spec {
                    store.set_spec(&spec.text, &spec.sha256).await?;
                }
                store.init(&sha).await?;
                1
            }
        };
        let global_sha = store.model_sha(latest).await?.expect("latest model exists");
        drop(initial_model);
        // Read tensor by tensor from the file (no second copy of the model in memory).
        let path = blobs.existing_path(&global_sha)?;
        let global_size = std::fs::metadata(&path)
            .map_err(crate::blobs::io(format!("reading {}", path.display())))?
            .len();
        let global = Tensors::from_file(&path, &global_sha)?;
        let submitted = store
            .updates(latest)
            .await?
            .into_iter()
            .map(|u| u.site)
            .collect();
        let sites: BTreeSet<String> = store.sites().await?.into_iter().collect();
        let enrolled = store.enrolled().await?.into_iter().collect();
        let (opened_s, deadline_ms) = store.round_timing(latest).await?.unwrap_or((0, None));
        let departed: std::collections::BTreeMap<String, String> =
            store.departures().await?.into_iter().collect();
        let state = State {
            enrolled,
            round: latest,
            global: Arc::new(global),
            global_sha,
            global_size,
            submitted,
            deadline_ms,
            opened_ms: opened_s * 1000,
            sites,
            departed,
            ended: None,
            closing: false,
            server_state_sha: store.server_state_sha(latest).await?,
            secure: None,
        };
        let mut state = state;
        state.ended = state.ended_reason(config.min_sites);
        metrics.set_round(latest);
        metrics.set_sites(state.sites.len());
        tracing::info!(
            round = latest,
            rounds = config.rounds,
            updates_in_round = state.submitted.len(),
            direct_io_above_bytes = blobs.direct_io_above(),
            "federation started"
        );
        let svc = Self {
            uploads: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_uploads)),
            closed: Arc::new(tokio::sync::Notify::new()),
            mean: Arc::new(Mutex::new(RunningMean::default())),
            config: Arc::new(config),
            store,
            blobs,
            metrics,
            state: Arc::new(Mutex::new(state)),
        };
        svc.fail_interrupted_secure_round().await?;
        svc.tick().await?;
        Ok(svc)
    }

    /// Under secure aggregation, a round that was open when the aggregator stopped cannot go
    /// on: its protocol state (the running masked sum, the sites' routed shares) lived in
    /// memory, and the sites' secrets for that run are theirs alone. It fails with a reason;
    /// the next round starts from the same global model and fresh keys.
    async fn fail_interrupted_secure_round(&self) -> Result<(), AggregatorError> {
        let mut st = self.state.lock().await;
        if self.config.secure_aggregation.is_none() || self.done(&st) || st.deadline_ms.is_none() {
            return Ok(());
        }
        let reason = "the aggregator restarted during the round's secure aggregation (its protocol state is kept in memory only); the next round starts from the same global model";
        let open_next = st.round < self.config.rounds;
        self.fail_round(&mut st, now_ms(), reason, open_next)
            .await?;
        tracing::warn!(round = st.round - 1, reason, "round failed");
        Ok(())
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> FederationServer<Self> {
        FederationServer::new(self)
    }

    /// Close or fail the open round if it is due (all enrolled sites reported, or the deadline
    /// passed). The server calls this periodically.
    ///
    /// # Errors
    /// Database or blob-store failures; the round then stays open and the next tick retries.
    pub async fn tick(&self) -> Result<(), AggregatorError> {
        let job = self.maybe_close(&mut *self.state.lock().await).await?;
        self.run_close(job).await
    }

    /// The state lock, once no close is running: for changes that could touch the open round
    /// (an update joining it, a site leaving). Readers take the lock directly and do not wait
    /// for a close.
    async fn settled(&self) -> tokio::sync::MutexGuard<'_, State> {
        loop {
            let st = self.state.lock().await;
            if !st.closing {
                return st;
            }
            // Registered before the lock is released; the closer needs the lock to finish,
            // so its signal cannot be missed.
            let done = self.closed.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            drop(st);
            done.await;
        }
    }

    /// Under federated standardisation, the spec's numeric and boolean features in order
    /// (what every site sends and the pooled sums cover); `None` otherwise.
    fn statistics_features(&self) -> Option<Vec<String>> {
        self.config
            .spec
            .as_ref()
            .filter(|s| s.spec.statistics_sigma().is_some())
            .map(|s| {
                s.spec
                    .statistics_features()
                    .into_iter()
                    .map(|f| f.0)
                    .collect()
            })
    }

    fn done(&self, st: &State) -> bool {
        st.round > self.config.rounds || st.ended.is_some()
    }

    fn next_deadline(&self, now: i64) -> i64 {
        now + self.config.round_timeout.as_millis() as i64
    }

    /// The site a request acts for. With mutual TLS it is the CN of the verified client
    /// certificate, which must carry the `site` role, match any name the request claims, and
    /// be enrolled. Without TLS the claimed name is trusted (insecure mode).
    async fn identify<T>(&self, req: &Request<T>, claimed: &str) -> Result<String, Status> {
        let Some(peer) = fedee_proto::pki::peer_identity(req)? else {
            return Ok(claimed.to_owned());
        };
        let deny = |m: String| {
            tracing::warn!(peer = %peer.name, reason = %m, "request refused");
            Status::permission_denied(m)
        };
        if peer.role != fedee_proto::pki::Role::Site {
            return Err(deny(format!(
                "certificate `{}` has role {}, not site",
                peer.name,
                peer.role.as_str()
            )));
        }
        if !claimed.is_empty() && claimed != peer.name {
            return Err(deny(format!(
                "certificate is for site `{}` but the request names `{claimed}`",
                peer.name
            )));
        }
        if !self.store.is_enrolled(&peer.name).await.map_err(internal)? {
            return Err(deny(format!(
                "site `{}` is not enrolled in this federation: the coordinator must enrol it (fedee aggregator --enroll '{}')",
                peer.name, peer.name
            )));
        }
        Ok(peer.name)
    }

    /// Reading the global model and the status needs any certificate of the consortium CA
    /// (a site, the key holder's client, an operator); rustls has already verified it.
    fn authorize_reader<T>(&self, req: &Request<T>) -> Result<(), Status> {
        fedee_proto::pki::peer_identity(req)?;
        Ok(())
    }

    async fn reject(
        &self,
        round: Option<u32>,
        site: Option<&str>,
        (reason, status): Refusal,
    ) -> Status {
        tracing::warn!(?round, site, reason = reason.as_str(), message = status.message(), code = ?status.code(), "update rejected");
        if let Err(e) = self
            .store
            .insert_rejection(round, site, reason.as_str(), status.message())
            .await
        {
            tracing::error!(error = %e, "could not record rejection");
        }
        // After the record, so a live view that re-reads the database sees it.
        self.metrics.rejected(reason);
        status
    }

    /// An update that repeats one already accepted (a site retrying after a lost
    /// acknowledgement) is acknowledged again without being counted twice; a different update
    /// for the same site and round is refused.
    async fn repeat(
        &self,
        prior: &UpdateMeta,
        h: &UpdateHeader,
        sha: &str,
    ) -> Result<SubmitUpdateResponse, Refusal> {
        if prior.sha256 == sha && prior.num_examples == h.num_examples {
            let n = self
                .store
                .updates(h.round)
                .await
                .map_err(|e| (Reject::Internal, internal(e)))?
                .len() as u32;
            tracing::info!(round = h.round, site = %h.site, "repeated update acknowledged again (idempotent resubmission)");
            return Ok(SubmitUpdateResponse {
                round: h.round,
                updates_in_round: n,
            });
        }
        Err((
            Reject::Duplicate,
            Status::already_exists(format!(
                "site `{}` already submitted a different update for round {}; one update per site per round",
                h.site, h.round
            )),
        ))
    }

    /// Validate, persist and acknowledge one update; `seen` receives the header's round and
    /// site as soon as they are known, for the rejection log.
    async fn accept(
        &self,
        mut stream: Streaming<SubmitUpdateMessage>,
        identity: &str,
        seen: &mut Option<(u32, String)>,
    ) -> Result<SubmitUpdateResponse, Refusal> {
        let first = stream
            .message()
            .await
            .map_err(refuse(Reject::Stream))?
            .ok_or_else(|| {
                (
                    Reject::Header,
                    Status::invalid_argument("empty stream: send an UpdateHeader first"),
                )
            })?;
        let Some(submit_update_message::Msg::Header(h)) = first.msg else {
            return Err((
                Reject::Header,
                Status::invalid_argument("the first message must be an UpdateHeader"),
            ));
        };
        *seen = Some((h.round, h.site.clone()));
        if self.config.secure_aggregation.is_some() {
            return Err((
                Reject::Header,
                Status::failed_precondition(
                    "this federation aggregates securely: a site sends its update masked (SecureAggregation, SubmitMasked), never in the clear; upgrade the site agent",
                ),
            ));
        }
        if self.config.tls.is_some() && h.site != identity {
            return Err((
                Reject::Identity,
                Status::permission_denied(format!(
                    "certificate is for site `{identity}` but the update header names `{}`",
                    h.site
                )),
            ));
        }
        if h.num_examples == 0 || h.num_examples > self.config.max_num_examples {
            return Err((
                Reject::Header,
                Status::invalid_argument(format!(
                    "num_examples {} is outside 1..={}: the federation's largest site weight \
                     (federation.max_num_examples in the spec, --max-num-examples without one)",
                    h.num_examples, self.config.max_num_examples
                )),
            ));
        }
        let ledger = self.ledger_entry(&h).map_err(|s| (Reject::Header, s))?;
        let internal = |e| (Reject::Internal, internal(e));
        let prior = self
            .store
            .update(h.round, &h.site)
            .await
            .map_err(internal)?;
        let (expected, round_bytes, mut check) = {
            let st = self.state.lock().await;
            if !st.sites.contains(&h.site) {
                return Err((
                    Reject::NotJoined,
                    Status::not_found(format!("site `{}` has not joined: call Join first", h.site)),
                ));
            }
            if prior.is_none() {
                stale(&st, &h, self.config.rounds)?;
            }
            (
                st.global_size,
                st.global_size * st.active().len().max(1) as u64,
                self.update_check(&st.global),
            )
        };
        // Uploads are received a few at a time: each holds one chunk and a 1 MiB write
        // buffer, so memory does not grow with the number of sites sending at once.
        let _permit = self
            .uploads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| (Reject::Internal, Status::unavailable("shutting down")))?;
        let mut cursor = ChunkCursor::new(expected + 4096);
        let blobs = self.blobs.clone();
        // An update has the global model's layout, so about its size: the updates of a round
        // too large for the page cache to absorb bypass it (direct I/O), see
        // `BlobStore::update_writer`.
        let mut w = blocking(move || blobs.update_writer(round_bytes))
            .await
            .map_err(internal)?;
        while let Some(msg) = stream.message().await.map_err(refuse(Reject::Stream))? {
            match msg.msg {
                Some(submit_update_message::Msg::Chunk(c)) => {
                    cursor.accept(&c).map_err(|e| {
                        (
                            Reject::Stream,
                            Status::invalid_argument(format!("update stream: {e}")),
                        )
                    })?;
                    // Checked (header, layout, finite values) and written straight to the
                    // blob's temporary file, off the async workers.
                    let checked;
                    (w, check, checked) = blocking(move || {
                        let checked = check.feed(&c.data, c.total_size);
                        if checked.is_err() {
                            return Ok((w, check, checked));
                        }
                        std::io::Write::write_all(&mut w, &c.data)
                            .map(|()| (w, check, checked))
                            .map_err(crate::blobs::io("writing an update".into()))
                    })
                    .await
                    .map_err(internal)?;
                    checked.map_err(refuse_invalid)?;
                }
                _ => {
                    return Err((
                        Reject::Header,
                        Status::invalid_argument("after the header, send only chunks"),
                    ));
                }
            }
        }
        let size = cursor.finish().map_err(|e| {
            (
                Reject::Stream,
                Status::invalid_argument(format!("update stream: {e}")),
            )
        })?;
        check.finish().map_err(refuse_invalid)?;
        let pending = w.finish();
        // Nothing of this upload is held in memory any more: the next upload may start
        // receiving while this one's fsync runs.
        drop(_permit);
        let sha = pending.sha256().to_owned();
        if !sha.eq_ignore_ascii_case(&h.sha256) {
            return Err((
                Reject::Sha256,
                Status::invalid_argument(format!(
                    "SHA-256 mismatch: header says {}, received bytes hash to {sha}",
                    h.sha256
                )),
            ));
        }
        if let Some(prior) = prior {
            return self.repeat(&prior, &h, &sha).await;
        }
        // Durable before acknowledged: the blob is on disk (fsynced) before its row commits.
        let blobs = self.blobs.clone();
        blocking(move || blobs.commit(pending))
            .await
            .map_err(internal)?;
        // After any running close: an update that arrives while its round is being
        // aggregated is then refused as stale below, never recorded and left out.
        let mut st = self.settled().await;
        // Re-check under the lock: the round may have moved on, or a concurrent copy won.
        if let Some(prior) = self
            .store
            .update(h.round, &h.site)
            .await
            .map_err(internal)?
        {
            drop(st);
            return self.repeat(&prior, &h, &sha).await;
        }
        stale(&st, &h, self.config.rounds)?;
        let meta = UpdateMeta {
            site: h.site.clone(),
            num_examples: h.num_examples,
            sha256: sha,
        };
        self.store
            .insert_update(h.round, &meta, size)
            .await
            .map_err(internal)?;
        if let Some(l) = &ledger {
            self.store.insert_ledger(l).await.map_err(internal)?;
            tracing::info!(round = h.round, site = %h.site, unit = %l.unit, epsilon = l.epsilon, delta = l.delta, "site privacy spend");
        }
        st.submitted.insert(h.site.clone());
        let updates_in_round = st.submitted.len() as u32;
        self.metrics.accepted(size as usize);
        tracing::info!(round = h.round, site = %h.site, num_examples = h.num_examples, bytes = size, "update accepted");
        if self.config.strategy.is_mean_based() {
            // Folded into the running mean in the background (the acknowledgement means
            // durable, not folded), so the close need not read it back. A failure loses
            // nothing: the close folds whatever the mean lacks from the files.
            let (svc, round, global) = (self.clone(), h.round, st.global.clone());
            tokio::spawn(async move {
                if let Err(e) = svc.fold_accepted(round, global).await {
                    tracing::warn!(round, error = %e, "folding an update into the running mean failed; the close reads it from its file");
                }
            });
        }
        // The update is persisted: a failure to close now is retried by the next tick. The
        // update that completes a round is acknowledged once the round has closed; other
        // requests are not held up meanwhile (the state lock is released for the aggregation).
        let job = self.maybe_close(&mut st).await;
        drop(st);
        if let Err(e) = async { self.run_close(job?).await }.await {
            tracing::error!(error = %e, "closing the round failed; will retry");
        }
        Ok(SubmitUpdateResponse {
            round: h.round,
            updates_in_round,
        })
    }
}

impl Federation {
    /// Fold `round`'s accepted updates not yet in the running mean (normally the one just
    /// accepted; after a restart, every update the round had) in their acceptance order;
    /// `global` is the round's global model (its layout). A mean already past `round` (its
    /// close ran) is left alone.
    ///
    /// # Errors
    /// Database, IO or blob-corruption errors (the mean is then empty and the close refolds).
    async fn fold_accepted(&self, round: u32, global: Arc<Tensors>) -> Result<(), AggregatorError> {
        let mut mean = self.mean.clone().lock_owned().await;
        if mean.round() > round {
            return Ok(());
        }
        let accepted = self.store.updates(round).await?;
        let blobs = self.blobs.clone();
        let read = blocking(move || {
            mean.catch_up(round, &global, &accepted, |u| {
                open_update(&blobs, u, &global.names, &global.shapes)
            })
        })
        .await?;
        log_read_back(round, read, false);
        Ok(())
    }

    /// The streaming check of an update against `global`'s layout; in site mode also its
    /// norm against [`fedee_dp::noised_update_norm_bound`] (in record mode an update is a
    /// sum of noised DP-SGD steps, with no such bound).
    fn update_check(&self, global: &Tensors) -> StreamCheck {
        let check = StreamCheck::new(&global.names, &global.shapes);
        match self.config.dp_mode {
            DpMode::Site => check.with_max_norm(fedee_dp::noised_update_norm_bound(
                self.config.clipping_norm,
                self.config.noise_multiplier,
                global.data.iter().map(|d| d.len() as u64).sum(),
            )),
            DpMode::Record => check,
        }
    }

    /// The ledger entry an update carries: required in record mode (unit "patient record",
    /// finite ε ≥ 0, δ as configured), optional in site mode.
    fn ledger_entry(&self, h: &UpdateHeader) -> Result<Option<LedgerRow>, Status> {
        self.privacy_entry(&h.site, h.round, h.privacy.as_ref())
    }

    /// As [`Federation::ledger_entry`], for `site`'s report `p` in `round` (an update's or a
    /// masked input's).
    fn privacy_entry(
        &self,
        site: &str,
        round: u32,
        p: Option<&PrivacyEntry>,
    ) -> Result<Option<LedgerRow>, Status> {
        let Some(p) = p else {
            return if self.config.dp_mode == DpMode::Record {
                Err(Status::invalid_argument(
                    "record-level DP: the update header must carry the site's privacy entry (ε spent, δ); upgrade the site agent",
                ))
            } else {
                Ok(None)
            };
        };
        let unit = self.config.dp_mode.unit();
        if p.unit != unit {
            return Err(Status::invalid_argument(format!(
                "privacy entry is for unit `{}` but this federation protects `{unit}` (--dp-mode {})",
                p.unit,
                self.config.dp_mode.as_str()
            )));
        }
        if !(p.epsilon.is_finite() && p.epsilon >= 0.0) || p.delta != self.config.delta {
            return Err(Status::invalid_argument(format!(
                "privacy entry must have a finite ε ≥ 0 at δ = {}, got ε = {} at δ = {}",
                self.config.delta, p.epsilon, p.delta
            )));
        }
        Ok(Some(LedgerRow {
            site: site.to_owned(),
            round,
            unit: p.unit.clone(),
            mechanism: p.mechanism.clone(),
            sampling_rate: p.sampling_rate,
            noise_multiplier: p.noise_multiplier,
            steps: p.steps,
            epsilon: p.epsilon,
            delta: p.delta,
        }))
    }
}

impl Federation {
    /// Site `site` leaves for good. Rounds stop waiting for it; below the quorum the open
    /// round fails and the federation ends.
    async fn depart(&self, site: &str, reason: &str) -> Result<bool, AggregatorError> {
        self.store.insert_departure(site, reason).await?;
        // After any running close: leaving can fail or end the round being aggregated.
        let mut st = self.settled().await;
        st.departed
            .entry(site.to_owned())
            .or_insert_with(|| reason.to_owned());
        tracing::warn!(site, reason, "site left the federation");
        if st.ended.is_some() {
            return Ok(true);
        }
        if let Some(why) = st.ended_reason(self.config.min_sites) {
            if st.round <= self.config.rounds {
                self.fail_round(&mut st, now_ms(), &why, false).await?;
            }
            tracing::warn!(reason = %why, "federation ended");
            st.ended = Some(why);
            return Ok(true);
        }
        let job = self.maybe_close(&mut st).await?;
        drop(st);
        self.run_close(job).await?;
        Ok(false)
    }
}

/// Refuse an update whose round is not the open one.
fn stale(st: &State, h: &UpdateHeader, rounds: u32) -> Result<(), Refusal> {
    match st.stale(h.round, rounds) {
        None => Ok(()),
        Some(msg) => Err((Reject::StaleRound, Status::failed_precondition(msg))),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

#[tonic::async_trait]
impl FederationApi for Federation {
    async fn get_spec(
        &self,
        _req: Request<GetSpecRequest>,
    ) -> Result<Response<SpecResponse>, Status> {
        // Any consortium peer may read it (the TLS layer verified its certificate).
        Ok(Response::new(match &self.config.spec {
            Some(s) => SpecResponse {
                toml: s.text.clone(),
                sha256: s.sha256.clone(),
            },
            None => SpecResponse::default(),
        }))
    }

    #[tracing::instrument(skip_all, fields(site = %req.get_ref().site))]
    async fn submit_statistics(
        &self,
        req: Request<StatisticsRequest>,
    ) -> Result<Response<StatisticsResponse>, Status> {
        let claimed = req.get_ref().site.clone();
        let site = self.identify(&req, &claimed).await?;
        let Some(expected) = self.statistics_features() else {
            return Err(Status::failed_precondition(
                "this federation's spec does not standardise with federated statistics (data.standardize = \"federated\")",
            ));
        };
        if !self.state.lock().await.sites.contains(&site) {
            return Err(Status::not_found(format!("site `{site}` has not joined")));
        }
        let features = &req.get_ref().features;
        if !features.is_empty() {
            let names: Vec<&str> = features.iter().map(|f| f.feature.as_str()).collect();
            if names != expected.iter().map(String::as_str).collect::<Vec<_>>() {
                return Err(Status::invalid_argument(format!(
                    "statistics must cover the spec's numeric and boolean features {expected:?} in order; got {} entries",
                    names.len()
                )));
            }
            if let Some(f) = features.iter().find(|f| {
                ![f.count, f.sum, f.sum_squares]
                    .iter()
                    .all(|v| v.is_finite())
            }) {
                return Err(Status::invalid_argument(format!(
                    "statistics of `{}` are not finite numbers",
                    f.feature
                )));
            }
            let json = serde_json::to_string(
                &features
                    .iter()
                    .map(|f| (f.feature.as_str(), f.count, f.sum, f.sum_squares))
                    .collect::<Vec<_>>(),
            )
            .map_err(|e| Status::internal(e.to_string()))?;
            let stored = self
                .store
                .insert_statistics(&site, &json)
                .await
                .map_err(internal)?;
            tracing::info!(stored, "statistics received");
        }
        let rows = self.store.statistics().await.map_err(internal)?;
        let needed = self.config.min_sites;
        Ok(Response::new(StatisticsResponse {
            ready: rows.len() >= needed as usize,
            sites: rows.len() as u32,
            needed,
            submitted: rows.iter().any(|(s, _)| *s == site),
            totals: pooled_statistics(&expected, &rows, needed)?,
        }))
    }

    #[tracing::instrument(skip_all, fields(site = %req.get_ref().site))]
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let claimed = req.get_ref().site.clone();
        let site = self.identify(&req, &claimed).await?;
        let ours = self.config.spec.as_ref().map_or("", |s| s.sha256.as_str());
        let theirs = req.get_ref().spec_sha256.as_str();
        if theirs != ours {
            // A peer's string goes into logs and replies only if it looks like a hash.
            let theirs = if theirs.len() <= 64 && theirs.bytes().all(|b| b.is_ascii_hexdigit()) {
                theirs
            } else {
                "(not a SHA-256)"
            };
            tracing::warn!(
                spec = ours,
                site_spec = theirs,
                "join refused: spec mismatch"
            );
            return Err(Status::failed_precondition(if ours.is_empty() {
                format!(
                    "site `{site}` joined with federation spec {theirs}, but this federation runs without a spec"
                )
            } else {
                format!(
                    "site `{site}` must join with the federation spec it checked its data against (GetSpec); it named `{theirs}`, this federation runs spec {ours}: restart the site so it reads the current spec"
                )
            }));
        }
        if !valid_site_name(&site) {
            return Err(Status::invalid_argument(format!(
                "site name `{site}` is invalid: use 1-128 letters, digits, spaces, '-', '_' or '.'"
            )));
        }
        if self.config.tls.is_none() {
            // Insecure mode: a site enrols itself by joining.
            self.store.enroll(&site).await.map_err(internal)?;
        }
        self.store.add_site(&site).await.map_err(internal)?;
        let job = {
            let mut st = self.state.lock().await;
            st.sites.insert(site.clone());
            st.enrolled.insert(site.clone());
            self.metrics.set_sites(st.sites.len());
            // Round 1's deadline starts once the quorum has joined.
            self.maybe_close(&mut st).await.map_err(internal)?
        };
        self.run_close(job).await.map_err(internal)?;
        tracing::info!("site joined");
        Ok(Response::new(JoinResponse {
            site,
            min_sites: self.config.min_sites,
            total_rounds: self.config.rounds,
            spec_sha256: ours.to_owned(),
        }))
    }

    async fn next_task(&self, req: Request<NextTaskRequest>) -> Result<Response<Task>, Status> {
        let claimed = req.get_ref().site.clone();
        let site = self.identify(&req, &claimed).await?;
        let mut st = self.state.lock().await;
        if !st.sites.contains(&site) {
            return Err(Status::not_found(format!(
                "site `{site}` has not joined: call Join first"
            )));
        }
        if let Some(job) = self.maybe_close(&mut st).await.map_err(internal)? {
            drop(st);
            self.run_close(Some(job)).await.map_err(internal)?;
            st = self.state.lock().await;
        }
        let c = &self.config;
        let mut secure_aggregation = None;
        let kind = if self.done(&st) {
            TaskKind::Done
        } else if st.closing || st.submitted.contains(&site) {
            // While the round is being aggregated there is nothing to train on yet.
            TaskKind::Wait
        } else if c.secure_aggregation.is_some() {
            // A site trains in a secure round only if it can still take part: it is in the
            // roster and keys are being advertised (a site that restarted mid-protocol lost
            // its secrets and waits for the next round).
            match st.secure.as_ref().filter(|r| r.round() == st.round) {
                Some(r) if r.can_start(&site) => {
                    secure_aggregation = Some(fedee_proto::v1::SecAggTask {
                        roster: r.roster().to_vec(),
                        degree: r.degree(),
                        session: r.session().to_vec(),
                    });
                    TaskKind::Train
                }
                _ => TaskKind::Wait,
            }
        } else {
            TaskKind::Train
        };
        Ok(Response::new(Task {
            kind: kind as i32,
            round: st.round,
            clipping_norm: c.clipping_norm.get(),
            noise_multiplier: c.noise_multiplier.get(),
            dp_mode: c.dp_mode.as_str().into(),
            delta: c.delta,
            proximal_mu: c.proximal_mu,
            local_epochs: c.local_epochs,
            learning_rate: c.learning_rate,
            batch_size: c.batch_size,
            deadline_unix_ms: st.deadline_ms.map_or(0, |d| d.max(0) as u64),
            secure_aggregation,
        }))
    }

    type DownloadModelStream = ChunkStream;

    async fn download_model(
        &self,
        req: Request<DownloadModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.authorize_reader(&req)?;
        let model = req.into_inner().model;
        let sha = self
            .store
            .model_sha(model)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("global model {model} does not exist yet")))?;
        let blobs = self.blobs.clone();
        let path = blocking(move || blobs.existing_path(&sha).map(|p| (p, sha)))
            .await
            .map_err(internal)?;
        let stream = stream_blob(path.0, path.1);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn submit_update(
        &self,
        req: Request<Streaming<SubmitUpdateMessage>>,
    ) -> Result<Response<SubmitUpdateResponse>, Status> {
        let identity = self.identify(&req, "").await;
        let mut seen = None;
        let identity = match identity {
            Ok(id) => id,
            Err(s) => return Err(self.reject(None, None, (Reject::Identity, s)).await),
        };
        match self.accept(req.into_inner(), &identity, &mut seen).await {
            Ok(r) => Ok(Response::new(r)),
            Err(s) => Err(self
                .reject(
                    seen.as_ref().map(|x| x.0),
                    seen.as_ref().map(|x| x.1.as_str()),
                    s,
                )
                .await),
        }
    }

    async fn report_metrics(
        &self,
        req: Request<MetricsReport>,
    ) -> Result<Response<MetricsAck>, Status> {
        let claimed = req.get_ref().site.clone();
        self.identify(&req, &claimed).await?;
        let m = req.into_inner();
        let values = [
            ("test accuracy", Some(m.test_accuracy)),
            ("balanced accuracy", m.balanced_accuracy),
            ("macro-F1", m.macro_f1),
            ("AUROC", m.auroc),
            ("validation accuracy", m.validation_accuracy),
        ];
        if m.validation_accuracy.is_some() != (m.num_validation_examples > 0) {
            return Err(Status::invalid_argument(format!(
                "validation accuracy {:?} with {} validation examples: send both or neither",
                m.validation_accuracy, m.num_validation_examples
            )));
        }
        for (name, v) in values {
            if let Some(v) = v
                && !(0.0..=1.0).contains(&v)
            {
                return Err(Status::invalid_argument(format!(
                    "{name} {v} is not in [0, 1]"
                )));
            }
        }
        if !self.state.lock().await.sites.contains(&m.site) {
            return Err(Status::not_found(format!(
                "site `{}` has not joined",
                m.site
            )));
        }
        // Only global models that exist: metric rows are bounded by models × sites.
        if self
            .store
            .model_sha(m.model)
            .await
            .map_err(internal)?
            .is_none()
        {
            return Err(Status::invalid_argument(format!(
                "there is no global model {}: report metrics of a model you downloaded",
                m.model
            )));
        }
        self.store
            .insert_metric(&MetricRow {
                model: m.model,
                site: m.site,
                test_accuracy: m.test_accuracy,
                num_test_examples: m.num_test_examples,
                balanced_accuracy: m.balanced_accuracy,
                macro_f1: m.macro_f1,
                auroc: m.auroc,
                validation_accuracy: m.validation_accuracy,
                num_validation_examples: m.num_validation_examples,
            })
            .await
            .map_err(internal)?;
        for (name, v) in values {
            if let Some(v) = v {
                self.metrics.set_site_metric(&claimed, name, v);
            }
        }
        Ok(Response::new(MetricsAck {}))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let claimed = req.get_ref().site.clone();
        let site = self.identify(&req, &claimed).await?;
        if !self.state.lock().await.sites.contains(&site) {
            return Err(Status::not_found(format!("site `{site}` has not joined")));
        }
        let reason = req.into_inner().reason;
        let reason = if reason.trim().is_empty() {
            "no reason given".to_owned()
        } else {
            reason.chars().take(1000).collect()
        };
        let federation_ended = self.depart(&site, &reason).await.map_err(internal)?;
        Ok(Response::new(LeaveResponse { federation_ended }))
    }

    #[tracing::instrument(skip_all, fields(site = %req.get_ref().site, round = req.get_ref().round))]
    async fn secure_aggregation(
        &self,
        req: Request<fedee_proto::v1::SecAggRequest>,
    ) -> Result<Response<fedee_proto::v1::SecAggResponse>, Status> {
        use fedee_proto::secagg as wire;
        use fedee_proto::v1::sec_agg_request::Msg;
        let claimed = req.get_ref().site.clone();
        let site = self.identify(&req, &claimed).await?;
        let m = req.into_inner();
        let round = m.round;
        let bad = |e: String| self.secagg_refusal(&site, round, e, tonic::Code::InvalidArgument);
        let mut st = self.state.lock().await;
        let secure = self.secure_round(&mut st, round)?;
        let applied = match &m.msg {
            None => Ok(()),
            Some(Msg::Advertise(a)) => {
                secure.advertise(&site, wire::advertise_from_wire(round, a).map_err(bad)?)
            }
            Some(Msg::Shares(s)) => {
                let shares = s
                    .shares
                    .iter()
                    .map(|x| wire::share_from_wire(round, x))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(bad)?;
                secure.shares(&site, shares)
            }
            Some(Msg::Unmask(u)) => {
                let me = secure
                    .index(&site)
                    .map_err(|e| self.secagg_refusal(&site, round, &e, secagg_code(&e)))?;
                secure.unmask(&site, wire::unmask_from_wire(round, me, u).map_err(bad)?)
            }
        };
        applied.map_err(|e| self.secagg_refusal(&site, round, &e, secagg_code(&e)))?;
        if m.msg.is_some() {
            return self.after_secure_message(st, &site, round).await;
        }
        Ok(Response::new(secagg_response(secure.view(&site))))
    }

    async fn submit_masked(
        &self,
        req: Request<Streaming<fedee_proto::v1::SubmitMaskedMessage>>,
    ) -> Result<Response<fedee_proto::v1::SecAggResponse>, Status> {
        use fedee_proto::v1::submit_masked_message::Msg;
        let identity = self.identify(&req, "").await?;
        let mut stream = req.into_inner();
        let Some(Msg::Header(h)) = stream.message().await?.and_then(|m| m.msg) else {
            return Err(Status::invalid_argument(
                "the first message must be a SecAggMaskedHeader",
            ));
        };
        let site = if self.config.tls.is_some() {
            if h.site != identity {
                return Err(Status::permission_denied(format!(
                    "certificate is for site `{identity}` but the masked input names `{}`",
                    h.site
                )));
            }
            identity
        } else {
            h.site.clone()
        };
        let round = h.round;
        let refuse = |e: &dyn std::fmt::Display, code| self.secagg_refusal(&site, round, e, code);
        let ledger = self
            .privacy_entry(&site, round, h.privacy.as_ref())
            .map_err(|s| refuse(&s.message(), tonic::Code::InvalidArgument))?;
        let words = {
            let mut st = self.state.lock().await;
            let secure = self.secure_round(&mut st, round)?;
            secure
                .index(&site)
                .map_err(|e| refuse(&e, secagg_code(&e)))?;
            secure.words()
        };
        if h.words != words as u64 {
            return Err(refuse(
                &format!(
                    "the masked input declares {} words; this round's has {words} (the model's parameters + 1)",
                    h.words
                ),
                tonic::Code::InvalidArgument,
            ));
        }
        // One masked vector in memory per upload slot, whatever the number of sites.
        let _permit = self
            .uploads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let mut blob = fedee_proto::Reassembler::new(words as u64 * 4);
        while let Some(msg) = stream.message().await? {
            match msg.msg {
                Some(Msg::Chunk(c)) => blob.push(c).map_err(|e| {
                    refuse(
                        &format!("masked input stream: {e}"),
                        tonic::Code::InvalidArgument,
                    )
                })?,
                _ => {
                    return Err(refuse(
                        &"after the header, send only chunks",
                        tonic::Code::InvalidArgument,
                    ));
                }
            }
        }
        let bytes = blob.finish().map_err(|e| {
            refuse(
                &format!("masked input stream: {e}"),
                tonic::Code::InvalidArgument,
            )
        })?;
        if bytes.len() != words * 4 {
            return Err(refuse(
                &format!(
                    "the masked input has {} bytes, expected {} ({words} words)",
                    bytes.len(),
                    words * 4
                ),
                tonic::Code::InvalidArgument,
            ));
        }
        let y: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        drop(bytes);
        let mut st = self.state.lock().await;
        let secure = self.secure_round(&mut st, round)?;
        secure
            .masked(&site, &y)
            .map_err(|e| refuse(&e, secagg_code(&e)))?;
        self.metrics.accepted(words * 4);
        tracing::info!(round, site = %site, bytes = words * 4, "masked input added to the sum");
        if let Some(l) = &ledger {
            self.store.insert_ledger(l).await.map_err(internal)?;
            tracing::info!(round, site = %site, unit = %l.unit, epsilon = l.epsilon, delta = l.delta, "site privacy spend");
        }
        self.after_secure_message(st, &site, round).await
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        // Operators (and insecure mode, which has no identities) see every site's figures;
        // other certificates the federation's.
        let per_site = match fedee_proto::pki::peer_identity(&req)? {
            None => true,
            Some(p) => p.role == fedee_proto::pki::Role::Operator,
        };
        // Hold the state lock while reading, so rounds, metrics and the current round form one
        // consistent snapshot (a round cannot close in between).
        let st = self.state.lock().await;
        let rounds = self.store.rounds().await.map_err(internal)?;
        let metrics = self.store.metrics().await.map_err(internal)?;
        // Latest entry per site (rows come ordered by site, then round).
        let mut latest = std::collections::BTreeMap::new();
        for l in self.store.ledger().await.map_err(internal)? {
            latest.insert(l.site.clone(), l);
        }
        let site_privacy = latest
            .into_values()
            .map(|l| SitePrivacy {
                site: l.site,
                round: l.round,
                entry: Some(PrivacyEntry {
                    unit: l.unit,
                    mechanism: l.mechanism,
                    sampling_rate: l.sampling_rate,
                    noise_multiplier: l.noise_multiplier,
                    steps: l.steps,
                    epsilon: l.epsilon,
                    delta: l.delta,
                }),
            })
            .collect();
        let closed: Vec<u32> = rounds
            .iter()
            .filter(|r| r.state == "closed")
            .map(|r| r.round + 1)
            .collect();
        let (selected_model, selected_validation_accuracy) =
            select_model(&metrics, &closed).unwrap_or((0, 0.0));
        let pooled = match self.statistics_features() {
            Some(expected) => {
                let rows = self.store.statistics().await.map_err(internal)?;
                pooled_statistics(&expected, &rows, self.config.min_sites)?
            }
            None => vec![],
        };
        let rounds = rounds
            .into_iter()
            .map(|r| {
                // Round r produced global model r + 1.
                let site_metrics: Vec<SiteMetric> = metrics
                    .iter()
                    .filter(|m| m.model == r.round + 1)
                    .map(|m| SiteMetric {
                        site: m.site.clone(),
                        test_accuracy: m.test_accuracy,
                        num_test_examples: m.num_test_examples,
                        balanced_accuracy: m.balanced_accuracy,
                        macro_f1: m.macro_f1,
                        auroc: m.auroc,
                        validation_accuracy: m.validation_accuracy,
                        num_validation_examples: m.num_validation_examples,
                    })
                    .collect();
                RoundStatus {
                    round: r.round,
                    // In memory only: the database says "open" until the close is recorded.
                    state: if st.closing && r.round == st.round && r.state == "open" {
                        "closing".into()
                    } else {
                        r.state
                    },
                    weighted: crate::view::weighted(&site_metrics),
                    site_metrics,
                    rho: r.rho.unwrap_or(0.0),
                    epsilon: r.epsilon.unwrap_or(0.0),
                    reason: r.reason.unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(StatusResponse {
            sites: st.sites.iter().cloned().collect(),
            rounds,
            current_round: st.round,
            done: self.done(&st),
            privacy_unit: self.config.dp_mode.unit().into(),
            delta: self.config.delta,
            clipping_norm: self.config.clipping_norm.get(),
            noise_multiplier: self.config.noise_multiplier.get(),
            dp_mode: self.config.dp_mode.as_str().into(),
            site_privacy,
            departed: st
                .departed
                .iter()
                .map(|(s, r)| format!("{s}: {r}"))
                .collect(),
            ended_reason: st.ended.clone().unwrap_or_default(),
            spec_sha256: self
                .config
                .spec
                .as_ref()
                .map(|s| s.sha256.clone())
                .unwrap_or_default(),
            spec_summary: self
                .config
                .spec
                .as_ref()
                .map(|s| s.spec.summary())
                .unwrap_or_default(),
            selected_model,
            selected_validation_accuracy,
            pooled_statistics: pooled,
            per_site: true,
        }))
        .map(|r| {
            if per_site {
                r
            } else {
                Response::new(crate::view::federation_view(r.into_inner()))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: u32, site: &str, test: f64, val: Option<(f64, u64)>) -> MetricRow {
        MetricRow {
            model,
            site: site.into(),
            test_accuracy: test,
            num_test_examples: 10,
            balanced_accuracy: None,
            macro_f1: None,
            auroc: None,
            validation_accuracy: val.map(|v| v.0),
            num_validation_examples: val.map_or(0, |v| v.1),
        }
    }

    #[test]
    fn the_model_is_selected_on_weighted_validation_accuracy_never_on_test() {
        let m = vec![
            // Model 2: best on test, worse on validation.
            row(2, "a", 0.99, Some((0.60, 10))),
            row(2, "b", 0.99, Some((0.70, 30))),
            // Model 3: the small site is perfect, the large one better than in model 2.
            row(3, "a", 0.10, Some((1.00, 10))),
            row(3, "b", 0.10, Some((0.75, 30))),
            // Model 4: not produced by a closed round.
            row(4, "a", 1.0, Some((1.0, 10))),
            row(4, "b", 1.0, Some((1.0, 30))),
        ];
        let (model, acc) = select_model(&m, &[2, 3]).unwrap();
        assert_eq!(model, 3);
        assert!((acc - (10.0 + 0.75 * 30.0) / 40.0).abs() < 1e-12, "{acc}");
        // Weighted by validation examples: unweighted means (0.75 vs 0.60) would pick model 2.
        let w = vec![
            row(2, "a", 0.5, Some((0.9, 10))),
            row(2, "b", 0.5, Some((0.6, 90))),
            row(3, "a", 0.5, Some((0.5, 10))),
            row(3, "b", 0.5, Some((0.7, 90))),
        ];
        assert_eq!(select_model(&w, &[2, 3]).unwrap().0, 3);
        // A tie goes to the earlier model.
        let tie = vec![
            row(2, "a", 0.5, Some((0.8, 5))),
            row(3, "a", 0.9, Some((0.8, 5))),
        ];
        assert_eq!(select_model(&tie, &[2, 3]).unwrap().0, 2);
        // Without validation metrics there is nothing to select on.
        let none = vec![row(2, "a", 0.9, None), row(3, "a", 0.95, None)];
        assert_eq!(select_model(&none, &[2, 3]), None);
        assert_eq!(select_model(&m, &[]), None);
    }
}
