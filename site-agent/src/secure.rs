//! The site's side of a secure-aggregation round over the federation's API: keys are
//! advertised and shared before local training ([`SecureRun::begin`]); the clipped update is
//! quantized, masked and sent, and the unmask request answered after it
//! ([`SecureRun::finish`]).
//!
//! The site derives the round's setup itself (threshold, graph, quantizer) from the spec it
//! agreed to and the roster and session bytes in the task, and refuses a task whose degree
//! differs from the spec's; the `fedee-secagg` [`Site`] refuses rosters that alter its keys
//! and unmask requests whose alive and dropped lists overlap or are too short.
//!
//! # Security
//! The update leaves the site only masked (uniform in `Z_2^32` to the aggregator); the site's
//! self-mask seed and mask secret key leave only as Shamir shares sealed for its neighbours.

use std::time::Duration;

use fedee_model::StateDict;
use fedee_proto::secagg as wire;
use fedee_proto::v1::{
    SecAggMaskedHeader, SecAggRequest, SecAggResponse, SecAggTask, sec_agg_request::Msg,
};
use fedee_secagg::federation::{Inputs, Setup, index_of, setup};
use fedee_secagg::{EncryptedShare, Site};

use crate::SiteError;
use crate::client::Link;

/// One round's protocol run at a site, between key sharing and the masked input.
pub struct SecureRun {
    name: String,
    round: u32,
    setup: Setup,
    site: Site,
    shares: Vec<EncryptedShare>,
    poll: Duration,
}

/// What the site agreed to, for [`SecureRun::begin`].
pub struct Agreed<'a> {
    /// The spec's secure-aggregation settings.
    pub settings: &'a fedee_spec::SecureAggregation,
    /// SHA-256 of the spec (hex).
    pub spec_sha256: &'a str,
    /// The largest weight a site may send (the spec's `max_num_examples`).
    pub max_weight: u64,
    /// The L2 norm the update is clipped to before quantizing.
    pub bound: f64,
    /// Distributed DP: the central noise multiplier of the Skellam mechanism.
    pub distributed_dp: Option<f64>,
}

impl SecureRun {
    /// Stages 1 and 2 of round `round` for site `name`: advertise fresh keys, then share them
    /// with the neighbours once the roster is out. `None` when the round failed or moved on
    /// meanwhile (the caller asks for the next task).
    ///
    /// # Errors
    /// [`SiteError::Refused`] for a task that departs from the spec or leaves this site out;
    /// [`SiteError::SecureAggregation`] for a roster the protocol refuses; transport errors.
    pub async fn begin(
        link: &mut Link,
        name: &str,
        round: u32,
        task: &SecAggTask,
        agreed: &Agreed<'_>,
        parameters: usize,
        poll: Duration,
    ) -> Result<Option<Self>, SiteError> {
        if task.degree != agreed.settings.degree {
            return Err(SiteError::Refused(format!(
                "the task's secure-aggregation degree {} differs from the spec's {}",
                task.degree, agreed.settings.degree
            )));
        }
        if task.session.len() > 64 {
            return Err(SiteError::Refused(format!(
                "a secure-aggregation session of {} bytes (at most 64)",
                task.session.len()
            )));
        }
        let me = index_of(&task.roster, name).ok_or_else(|| {
            SiteError::Refused(format!(
                "the secure-aggregation roster of round {round} leaves out this site `{name}`"
            ))
        })?;
        let setup = setup(&Inputs {
            spec_sha256: agreed.spec_sha256,
            round,
            roster: &task.roster,
            degree: task.degree,
            session: &task.session,
            parameters,
            bound: agreed.bound,
            max_weight: agreed.max_weight,
            distributed_dp: agreed.distributed_dp,
        })?;
        let mut rng = fedee_secagg::os_rng()?;
        let (mut site, advert) = Site::new(setup.params.clone(), me, &mut rng)?;
        let msg = Msg::Advertise(wire::advertise_to_wire(&advert));
        let Some(_) = send(link, name, round, Some(msg)).await? else {
            return Ok(None);
        };
        let Some(r) = wait_past(link, name, round, &["advertise"], poll).await? else {
            return Ok(None);
        };
        let roster = wire::roster_from_wire(round, &r).map_err(SiteError::Refused)?;
        let sealed = site.share_keys(&roster, &mut rng)?;
        let msg = Msg::Shares(fedee_proto::v1::SecAggShares {
            shares: sealed.iter().map(wire::share_to_wire).collect(),
        });
        let Some(_) = send(link, name, round, Some(msg)).await? else {
            return Ok(None);
        };
        let Some(r) = wait_past(link, name, round, &["advertise", "share_keys"], poll).await?
        else {
            return Ok(None);
        };
        let shares = r
            .shares
            .iter()
            .map(|s| wire::share_from_wire(round, s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SiteError::Refused)?;
        tracing::info!(
            site = name,
            round,
            sites = roster.sites.len(),
            threshold = setup.params.threshold,
            "secure aggregation: keys shared"
        );
        Ok(Some(Self {
            name: name.to_owned(),
            round,
            setup,
            site,
            shares,
            poll,
        }))
    }

    /// Stages 3 and 4: clip `flat` (the update flattened by [`flatten`]) to the bound,
    /// quantize it with weight `num_examples` (under distributed DP: rotate, round and add
    /// this site's share of the Skellam noise, weight 1), mask and send it with the site's
    /// `privacy`
    /// report (as with a plaintext update), then answer the unmask
    /// request. Returns whether the masked input was accepted (the round then counts as
    /// trained: the update has left the site, whatever the round's outcome).
    ///
    /// # Errors
    /// [`SiteError::SecureAggregation`] for an unmask request the protocol refuses (the site
    /// then reveals nothing); transport errors.
    pub async fn finish(
        mut self,
        link: &mut Link,
        flat: Vec<f32>,
        num_examples: u64,
        privacy: fedee_proto::v1::PrivacyEntry,
    ) -> Result<bool, SiteError> {
        let (name, round) = (self.name.clone(), self.round);
        let weight = u32::try_from(num_examples).map_err(|_| {
            SiteError::Refused(format!("num_examples {num_examples} does not fit 32 bits"))
        })?;
        if let Some(step) = self.setup.coarse_step(weight) {
            tracing::warn!(site = %name, round, step, bound = self.setup.quantizer.clip, num_examples, max_num_examples = self.setup.quantizer.max_weight, "secure aggregation encodes this site's update coarsely (step above 1e-4 of the bound): lower federation.max_num_examples toward the largest site's num_examples");
        }
        let mut rng = fedee_secagg::os_rng()?;
        // Clipping to the quantizer's bound post-processes the site's DP release (no privacy
        // cost); under distributed DP the clip to C and the Skellam noise are the release.
        let (encoded, norm) = self.setup.encode(flat, weight, &mut rng)?;
        let bound = self.setup.quantizer.clip;
        if norm > bound {
            tracing::info!(site = %name, round, norm, bound, "update clipped to the secure-aggregation bound");
        }
        let masked = self.site.masked_input(&self.shares, &encoded)?;
        drop(encoded);
        let header = SecAggMaskedHeader {
            site: name.clone(),
            round,
            words: masked.len() as u64,
            privacy: Some(privacy),
        };
        match link.submit_masked(header, &masked).await {
            Ok(_) => {}
            Err(SiteError::Rpc { status, .. })
                if status.code() == tonic::Code::FailedPrecondition =>
            {
                tracing::warn!(site = %name, round, reason = status.message(), "masked input not accepted; moving on to the next task");
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        tracing::info!(site = %name, round, bytes = masked.len() * 4, "secure aggregation: masked input sent");
        // The update has left the site (masked): from here on the round counts as trained.
        // What remains is answering the unmask request, if the round gets that far.
        let stages = ["advertise", "share_keys", "masked_input"];
        if let Some(r) = wait_past(link, &name, round, &stages, self.poll).await?
            && r.stage == "unmask"
        {
            let req = wire::request_from_wire(round, &r).map_err(SiteError::Refused)?;
            let answer = self.site.unmask(&req)?;
            let msg = Msg::Unmask(wire::unmask_to_wire(&answer));
            send(link, &name, round, Some(msg)).await?;
            tracing::info!(site = %name, round, alive = req.alive.len(), dropped = req.dropped.len(), "secure aggregation: unmask request answered");
        }
        Ok(true)
    }
}

/// `update`'s values as f32, tensor after tensor in name order (the order of the global
/// model's names at the aggregator).
///
/// # Errors
/// A tensor libtorch cannot convert.
pub fn flatten(update: &StateDict) -> Result<Vec<f32>, SiteError> {
    let mut flat = Vec::new();
    for t in update.values() {
        flat.extend(Vec::<f32>::try_from(
            t.to_kind(tch::Kind::Float)
                .to_device(tch::Device::Cpu)
                .reshape([-1]),
        )?);
    }
    Ok(flat)
}

/// One `SecureAggregation` call; `None` when the round has moved on or failed.
async fn send(
    link: &mut Link,
    site: &str,
    round: u32,
    msg: Option<Msg>,
) -> Result<Option<SecAggResponse>, SiteError> {
    let req = SecAggRequest {
        site: site.to_owned(),
        round,
        msg,
    };
    match link.secure_aggregation(&req).await {
        Ok(r) if r.stage == "failed" => {
            tracing::warn!(site, round, reason = %r.reason, "secure aggregation failed; moving on to the next task");
            Ok(None)
        }
        Ok(r) => Ok(Some(r)),
        Err(SiteError::Rpc { status, .. }) if status.code() == tonic::Code::FailedPrecondition => {
            tracing::warn!(
                site,
                round,
                reason = status.message(),
                "secure aggregation moved on; asking for the next task"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Poll, one interval apart starting one interval from now (a stage closes on the
/// aggregator's next tick, not at once), until the protocol's stage is none of `stages`;
/// `None` when the round moved on or failed.
async fn wait_past(
    link: &mut Link,
    site: &str,
    round: u32,
    stages: &[&str],
    poll: Duration,
) -> Result<Option<SecAggResponse>, SiteError> {
    loop {
        tokio::time::sleep(poll).await;
        let Some(r) = send(link, site, round, None).await? else {
            return Ok(None);
        };
        if !stages.contains(&r.stage.as_str()) {
            return Ok(Some(r));
        }
    }
}
