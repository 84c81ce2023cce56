//! The `fedee.v1.Federation` gRPC service.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use fedee_dp::SiteLevelAccountant;
use fedee_proto::v1::federation_server::{Federation as FederationApi, FederationServer};
use fedee_proto::v1::{
    Chunk, DownloadModelRequest, JoinRequest, JoinResponse, MetricsAck, MetricsReport,
    NextTaskRequest, RoundStatus, SiteMetric, StatusRequest, StatusResponse, SubmitUpdateMessage,
    SubmitUpdateResponse, Task, TaskKind, submit_update_message,
};
use fedee_proto::{Reassembler, chunks};
use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status, Streaming};

use crate::fedavg::FedAvg;
use crate::store::{MetricRow, Store};
use crate::tensors::Tensors;
use crate::{AggregatorError, Config};

/// In-memory view of the federation, rebuilt from the database at start.
#[derive(Debug)]
struct State {
    sites: BTreeSet<String>,
    /// The open round (its global model has the same number), or `rounds + 1` when done.
    round: u32,
    global: Tensors,
    global_size: u64,
    submitted: BTreeSet<String>,
}

/// The federation service.
#[derive(Debug, Clone)]
pub struct Federation {
    config: Arc<Config>,
    store: Store,
    accountant: SiteLevelAccountant,
    state: Arc<Mutex<State>>,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
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

impl Federation {
    /// Open (or resume) the federation in the configured database.
    ///
    /// # Errors
    /// Invalid config, an unreadable initial model, or database failures.
    pub async fn start(config: Config) -> Result<Self, AggregatorError> {
        config.validate()?;
        let accountant =
            SiteLevelAccountant::new(config.clipping_norm, config.noise_multiplier, config.delta)?;
        // Fail before serving if accounting cannot cover every configured round.
        let budget = accountant.spent(config.rounds)?;
        tracing::info!(
            rho = budget.rho,
            epsilon = budget.epsilon,
            delta = budget.delta,
            "privacy after all rounds (site-level unit)"
        );
        let store = Store::connect(&config.database_url).await?;
        for name in &config.enroll {
            store.enroll(name).await?;
        }
        let latest = match store.latest_model().await? {
            Some(m) => m,
            None => {
                let bytes = config.initial_model.as_deref().ok_or_else(|| {
                    AggregatorError::Config(
                        "the database is new: an initial model is required (--initial-model)"
                            .into(),
                    )
                })?;
                let t = Tensors::from_safetensors(bytes)
                    .map_err(|e| AggregatorError::Config(format!("initial model: {e}")))?;
                store
                    .init(&sha256_hex(&t.to_safetensors()), &t.to_safetensors())
                    .await?;
                1
            }
        };
        let bytes = store
            .model_bytes(latest)
            .await?
            .expect("latest model exists");
        let global = Tensors::from_safetensors(&bytes)?;
        let submitted = store
            .updates(latest)
            .await?
            .into_iter()
            .map(|u| u.site)
            .collect();
        let sites = store.sites().await?.into_iter().collect();
        let state = State {
            sites,
            round: latest,
            global,
            global_size: bytes.len() as u64,
            submitted,
        };
        tracing::info!(round = latest, rounds = config.rounds, "federation started");
        let svc = Self {
            config: Arc::new(config),
            store,
            accountant,
            state: Arc::new(Mutex::new(state)),
        };
        {
            let mut st = svc.state.lock().await;
            svc.maybe_close(&mut st).await?;
        }
        Ok(svc)
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> FederationServer<Self> {
        FederationServer::new(self)
    }

    fn done(&self, st: &State) -> bool {
        st.round > self.config.rounds
    }

    /// Close the open round if every enrolled site submitted and the quorum is met.
    async fn maybe_close(&self, st: &mut State) -> Result<(), AggregatorError> {
        if self.done(st)
            || st.submitted.len() < self.config.min_sites as usize
            || st.submitted.len() < st.sites.len()
        {
            return Ok(());
        }
        let round = st.round;
        let updates = self.store.updates(round).await?;
        let total: u64 = updates.iter().map(|u| u.num_examples).sum();
        let mut avg = FedAvg::new(&st.global, total);
        for u in &updates {
            let t = Tensors::from_safetensors(&self.store.update_bytes(round, &u.site).await?)?;
            avg.add(u.num_examples, &t);
        }
        let next = avg.finish(&st.global);
        let bytes = next.to_safetensors();
        let spent = self.accountant.spent(round)?;
        let open_next = round < self.config.rounds;
        self.store
            .close_round(
                round,
                spent.rho,
                spent.epsilon,
                &sha256_hex(&bytes),
                &bytes,
                open_next,
            )
            .await?;
        tracing::info!(
            round,
            sites = updates.len(),
            num_examples = total,
            rho = spent.rho,
            epsilon = spent.epsilon,
            "round closed"
        );
        st.round = round + 1;
        st.global = next;
        st.global_size = bytes.len() as u64;
        st.submitted.clear();
        Ok(())
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

    async fn reject(&self, round: Option<u32>, site: Option<&str>, status: Status) -> Status {
        tracing::warn!(?round, site, reason = status.message(), code = ?status.code(), "update rejected");
        if let Err(e) = self
            .store
            .insert_rejection(round, site, status.message())
            .await
        {
            tracing::error!(error = %e, "could not record rejection");
        }
        status
    }

    /// Validate, persist and acknowledge one update; `seen` receives the header's round and
    /// site as soon as they are known, for the rejection log.
    async fn accept(
        &self,
        mut stream: Streaming<SubmitUpdateMessage>,
        identity: &str,
        seen: &mut Option<(u32, String)>,
    ) -> Result<SubmitUpdateResponse, Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty stream: send an UpdateHeader first"))?;
        let Some(submit_update_message::Msg::Header(h)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first message must be an UpdateHeader",
            ));
        };
        *seen = Some((h.round, h.site.clone()));
        if self.config.tls.is_some() && h.site != identity {
            return Err(Status::permission_denied(format!(
                "certificate is for site `{identity}` but the update header names `{}`",
                h.site
            )));
        }
        let (limit, round_now) = {
            let st = self.state.lock().await;
            if !st.sites.contains(&h.site) {
                return Err(Status::not_found(format!(
                    "site `{}` has not joined: call Join first",
                    h.site
                )));
            }
            if self.done(&st) {
                return Err(Status::failed_precondition(format!(
                    "stale round: update for round {} but the federation has finished",
                    h.round
                )));
            }
            if h.round != st.round {
                return Err(Status::failed_precondition(format!(
                    "stale round: update for round {} but round {} is open; download model {} and train again",
                    h.round, st.round, st.round
                )));
            }
            if st.submitted.contains(&h.site) {
                return Err(Status::already_exists(format!(
                    "site `{}` already submitted an update for round {}; one update per site per round",
                    h.site, h.round
                )));
            }
            (st.global_size + 4096, st.round)
        };
        if h.num_examples == 0 {
            return Err(Status::invalid_argument("num_examples must be at least 1"));
        }
        let mut r = Reassembler::new(limit);
        while let Some(msg) = stream.message().await? {
            match msg.msg {
                Some(submit_update_message::Msg::Chunk(c)) => {
                    r.push(c)
                        .map_err(|e| Status::invalid_argument(format!("update stream: {e}")))?;
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "after the header, send only chunks",
                    ));
                }
            }
        }
        let bytes = r
            .finish()
            .map_err(|e| Status::invalid_argument(format!("update stream: {e}")))?;
        let sha = sha256_hex(&bytes);
        if !sha.eq_ignore_ascii_case(&h.sha256) {
            return Err(Status::invalid_argument(format!(
                "SHA-256 mismatch: header says {}, received bytes hash to {sha}",
                h.sha256
            )));
        }
        let update = Tensors::from_safetensors(&bytes)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut st = self.state.lock().await;
        update
            .check_layout(&st.global)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Re-check under the lock: the round may have moved on, or a concurrent duplicate won.
        if st.round != round_now || st.submitted.contains(&h.site) {
            return Err(Status::failed_precondition(format!(
                "stale round: round {} closed while the update was in flight",
                h.round
            )));
        }
        self.store
            .insert_update(h.round, &h.site, h.num_examples, &sha, &bytes)
            .await
            .map_err(internal)?;
        st.submitted.insert(h.site.clone());
        let updates_in_round = st.submitted.len() as u32;
        tracing::info!(round = h.round, site = %h.site, num_examples = h.num_examples, bytes = bytes.len(), "update accepted");
        self.maybe_close(&mut st).await.map_err(internal)?;
        Ok(SubmitUpdateResponse {
            round: h.round,
            updates_in_round,
        })
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

#[tonic::async_trait]
impl FederationApi for Federation {
    #[tracing::instrument(skip_all, fields(site = %req.get_ref().site))]
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let claimed = req.get_ref().site.clone();
        let site = self.identify(&req, &claimed).await?;
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
        self.state.lock().await.sites.insert(site.clone());
        tracing::info!("site joined");
        Ok(Response::new(JoinResponse {
            site,
            min_sites: self.config.min_sites,
            total_rounds: self.config.rounds,
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
        self.maybe_close(&mut st).await.map_err(internal)?;
        let c = &self.config;
        let kind = if self.done(&st) {
            TaskKind::Done
        } else if st.submitted.contains(&site) {
            TaskKind::Wait
        } else {
            TaskKind::Train
        };
        Ok(Response::new(Task {
            kind: kind as i32,
            round: st.round,
            clipping_norm: c.clipping_norm.get(),
            noise_multiplier: c.noise_multiplier.get(),
            local_epochs: c.local_epochs,
            learning_rate: c.learning_rate,
            batch_size: c.batch_size,
        }))
    }

    type DownloadModelStream = ChunkStream;

    async fn download_model(
        &self,
        req: Request<DownloadModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.authorize_reader(&req)?;
        let model = req.into_inner().model;
        let bytes = self
            .store
            .model_bytes(model)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("global model {model} does not exist yet")))?;
        let stream = futures::stream::iter(chunks(&bytes).into_iter().map(Ok));
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
            Err(s) => return Err(self.reject(None, None, s).await),
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
        if !(0.0..=1.0).contains(&m.test_accuracy) {
            return Err(Status::invalid_argument(format!(
                "test accuracy {} is not in [0, 1]",
                m.test_accuracy
            )));
        }
        if !self.state.lock().await.sites.contains(&m.site) {
            return Err(Status::not_found(format!(
                "site `{}` has not joined",
                m.site
            )));
        }
        self.store
            .insert_metric(&MetricRow {
                model: m.model,
                site: m.site,
                test_accuracy: m.test_accuracy,
                num_test_examples: m.num_test_examples,
            })
            .await
            .map_err(internal)?;
        Ok(Response::new(MetricsAck {}))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.authorize_reader(&req)?;
        // Hold the state lock while reading, so rounds, metrics and the current round form one
        // consistent snapshot (a round cannot close in between).
        let st = self.state.lock().await;
        let rounds = self.store.rounds().await.map_err(internal)?;
        let metrics = self.store.metrics().await.map_err(internal)?;
        let rounds = rounds
            .into_iter()
            .map(|r| RoundStatus {
                round: r.round,
                state: r.state,
                // Round r produced global model r + 1.
                site_metrics: metrics
                    .iter()
                    .filter(|m| m.model == r.round + 1)
                    .map(|m| SiteMetric {
                        site: m.site.clone(),
                        test_accuracy: m.test_accuracy,
                        num_test_examples: m.num_test_examples,
                    })
                    .collect(),
                rho: r.rho.unwrap_or(0.0),
                epsilon: r.epsilon.unwrap_or(0.0),
            })
            .collect();
        Ok(Response::new(StatusResponse {
            sites: st.sites.iter().cloned().collect(),
            rounds,
            current_round: st.round,
            done: self.done(&st),
            privacy_unit: SiteLevelAccountant::UNIT.into(),
            delta: self.config.delta,
            clipping_norm: self.config.clipping_norm.get(),
            noise_multiplier: self.config.noise_multiplier.get(),
        }))
    }
}
