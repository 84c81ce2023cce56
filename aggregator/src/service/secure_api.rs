//! The secure-aggregation adapter: starts a protocol run per round for the active sites,
//! drives its stages on the service's clock, maps the protocol's views and refusals to gRPC,
//! and hands the unmasked mean to the close ([`super::close`]).

use super::*;

impl Federation {
    /// Under secure aggregation, the round rules: once the round is open (round 1: once the
    /// quorum joined) a protocol run starts for the active sites that joined, and each tick
    /// closes a stage that is due; the unmasked mean closes the round, an abort fails it.
    pub(super) async fn secure_step(
        &self,
        st: &mut State,
        now: i64,
    ) -> Result<Option<CloseJob>, AggregatorError> {
        let Some(sa) = &self.config.secure_aggregation else {
            return Ok(None);
        };
        if st.deadline_ms.is_none() {
            return Ok(None);
        }
        let now_s = (now.max(0) / 1000) as u64;
        let open_next = st.round < self.config.rounds;
        if st.secure.as_ref().is_none_or(|r| r.round() != st.round) {
            // Every active enrolled site, joined yet or not: one that has not joined by the
            // end of the advertise stage counts as dropped.
            let roster: Vec<String> = st.active().into_iter().collect();
            let parameters: usize = st.global.data.iter().map(Vec::len).sum();
            let distributed = self.config.distributed_dp();
            let bound = fedee_secagg::federation::update_bound(
                self.config.clipping_norm,
                self.config.noise_multiplier,
                parameters,
                sa.max_update_norm,
                distributed,
            );
            let spec_sha = self.config.spec.as_ref().map_or("", |s| s.sha256.as_str());
            let stage_s = sa.stage_timeout_s.ceil() as u64;
            let deadlines = fedee_secagg::Deadlines {
                advertise_s: stage_s,
                share_keys_s: stage_s,
                masked_input_s: self.config.round_timeout.as_secs().max(1),
                unmask_s: stage_s,
            };
            let opened = fedee_secagg::federation::new_session().and_then(|session| {
                let inputs = fedee_secagg::federation::Inputs {
                    spec_sha256: spec_sha,
                    round: st.round,
                    roster: &roster,
                    degree: sa.degree,
                    session: &session,
                    parameters,
                    bound,
                    max_weight: self.config.max_num_examples,
                    distributed_dp: distributed.then_some(self.config.noise_multiplier.get()),
                };
                SecureRound::open(&inputs, session, deadlines, now_s)
            });
            match opened {
                Ok(r) => {
                    let p = &r.setup().params;
                    tracing::info!(
                        round = st.round,
                        sites = p.sites,
                        degree = p.degree,
                        threshold = p.threshold,
                        words = p.dim,
                        quantization_step = 1.0
                            / r.setup()
                                .skellam
                                .as_ref()
                                .map_or(r.setup().quantizer.scale, |s| s.scale()),
                        distributed_dp = distributed,
                        "secure aggregation started"
                    );
                    st.secure = Some(r);
                }
                Err(e) => {
                    let reason = format!("secure aggregation could not start: {e}");
                    self.fail_round(st, now, &reason, open_next).await?;
                    tracing::warn!(round = st.round - 1, %reason, "round failed");
                    return Ok(None);
                }
            }
        }
        let Some(secure) = st.secure.as_mut() else {
            return Ok(None);
        };
        match secure.tick(now_s) {
            None => Ok(None),
            Some(Ended::Mean { alive, dropped, .. }) if alive < self.config.min_sites as usize => {
                self.metrics.secagg_unmasked(alive, dropped);
                let reason = format!(
                    "quorum not met: the secure sum holds {alive} sites ({dropped} dropped), fewer than the required {}; the global model stays the previous one",
                    self.config.min_sites
                );
                self.fail_round(st, now, &reason, open_next).await?;
                tracing::warn!(round = st.round - 1, %reason, "round failed");
                Ok(None)
            }
            Some(Ended::Mean {
                mean,
                total_weight,
                alive,
                dropped,
            }) => {
                self.metrics.secagg_unmasked(alive, dropped);
                tracing::info!(
                    round = st.round,
                    alive,
                    dropped,
                    "secure aggregation: sum unmasked"
                );
                st.closing = true;
                Ok(Some(CloseJob {
                    round: st.round,
                    now,
                    inputs: CloseInputs::Mean {
                        mean,
                        total_weight,
                        sites: alive,
                    },
                    global: st.global.clone(),
                    server_state: st.server_state_sha.clone(),
                }))
            }
            Some(Ended::Failed(why)) => {
                let reason = format!("{why}; the global model stays the previous one");
                self.fail_round(st, now, &reason, open_next).await?;
                tracing::warn!(round = st.round - 1, %reason, "round failed");
                Ok(None)
            }
        }
    }

    /// After an accepted protocol message: close the stage at once if everyone it waits for
    /// has answered (rather than at the next tick), run the round's close if that was the
    /// last unmask answer, and answer with what `site` may read now.
    pub(super) async fn after_secure_message(
        &self,
        mut st: tokio::sync::MutexGuard<'_, State>,
        site: &str,
        round: u32,
    ) -> Result<Response<fedee_proto::v1::SecAggResponse>, Status> {
        let job = self.maybe_close(&mut st).await.map_err(internal)?;
        let view = st
            .secure
            .as_ref()
            .filter(|r| r.round() == round)
            .map(|r| r.view(site))
            .unwrap_or_default();
        drop(st);
        self.run_close(job).await.map_err(internal)?;
        Ok(Response::new(secagg_response(view)))
    }

    /// The secure round a message for `round` belongs to.
    pub(super) fn secure_round<'a>(
        &self,
        st: &'a mut State,
        round: u32,
    ) -> Result<&'a mut SecureRound, Status> {
        if self.config.secure_aggregation.is_none() {
            return Err(Status::failed_precondition(
                "this federation does not run secure aggregation: submit updates with SubmitUpdate",
            ));
        }
        match st.secure.as_mut() {
            Some(r) if r.round() == round => Ok(r),
            _ => Err(Status::failed_precondition(format!(
                "stale round: secure aggregation for round {round}, but round {} is open; ask for the next task",
                st.round
            ))),
        }
    }

    /// Refuse a protocol message, with a log line naming the site.
    pub(super) fn secagg_refusal(
        &self,
        site: &str,
        round: u32,
        e: impl std::fmt::Display,
        code: tonic::Code,
    ) -> Status {
        self.metrics.secagg_refused();
        let message = e.to_string();
        tracing::warn!(site, round, reason = %message, "secure aggregation message refused");
        Status::new(code, message)
    }
}

/// A protocol refusal as a status: a message for a stage that has passed is a failed
/// precondition, a hostile or malformed one an invalid argument.
pub(super) fn secagg_code(e: &fedee_secagg::Error) -> tonic::Code {
    match e {
        fedee_secagg::Error::Protocol(_) | fedee_secagg::Error::TooFew { .. } => {
            tonic::Code::FailedPrecondition
        }
        _ => tonic::Code::InvalidArgument,
    }
}

/// The response a site reads: the stage and what the closed stages give it.
pub(super) fn secagg_response(v: crate::secure::View) -> fedee_proto::v1::SecAggResponse {
    use fedee_proto::secagg as wire;
    fedee_proto::v1::SecAggResponse {
        stage: v.stage.into(),
        roster: v.roster.iter().map(wire::advertise_to_wire).collect(),
        shares: v.shares.iter().map(wire::share_to_wire).collect(),
        alive: v
            .request
            .as_ref()
            .map(|r| r.alive.iter().map(|&i| u32::from(i)).collect())
            .unwrap_or_default(),
        dropped: v
            .request
            .as_ref()
            .map(|r| r.dropped.iter().map(|&i| u32::from(i)).collect())
            .unwrap_or_default(),
        reason: v.reason,
    }
}
