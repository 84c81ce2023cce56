//! One secure-aggregation round at the aggregator, as a plain type with pure transitions on
//! the caller's clock: the protocol's [`Server`] bound to the round's site names, its
//! encoding and its deadlines. The gRPC service is only its adapter; this type is tested
//! without a transport (`tests` below).
//!
//! A round runs the four stages of `fedee-secagg` (advertise keys, share keys, masked input,
//! unmask). Sites advertise and share keys before they train, so the masked-input stage
//! waits for the round's deadline, and the short stages for the spec's `stage_timeout_s`.
//! When the sum is unmasked the round yields the weighted mean of the alive sites' updates
//! ([`Ended::Mean`]), which the strategy (FedAvg, FedProx, FedAdam, FedYogi) applies to the
//! global model as it would a plaintext FedAvg mean.
//!
//! # Security
//! The type holds no secret: what it sees of one site is uniform masked words, public keys
//! and shares sealed for other sites. The mean over at least `t` alive sites is what it
//! learns. A site outside the roster, or a message for another site, is refused.

use fedee_secagg::federation::{Inputs, Setup, index_of, setup};
use fedee_secagg::{
    Advertise, Closed, Deadlines, EncryptedShare, Error, Roster, Server, ServerStage, SiteIndex,
    UnmaskRequest, UnmaskResponse,
};

/// How one round ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// The weighted mean of the alive sites' updates (in the order of the global model's
    /// names, flattened), the total weight (`Σ num_examples`), and how many sites were alive
    /// and dropped.
    Mean {
        /// Flattened mean update, f32.
        mean: Vec<f32>,
        /// `Σ num_examples` of the alive sites.
        total_weight: u64,
        /// Sites whose input is in the mean.
        alive: usize,
        /// Sites that shared keys but sent no input.
        dropped: usize,
    },
    /// The protocol aborted (too few sites at some stage): no output.
    Failed(String),
}

/// What one site may read of the round: the current stage and what the stages closed so far
/// give it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// `advertise`, `share_keys`, `masked_input`, `unmask`, `done` or `failed`.
    pub stage: &'static str,
    /// Every advertisement that made the deadline (once advertising closed).
    pub roster: Vec<Advertise>,
    /// The shares sealed for this site (once key sharing closed).
    pub shares: Vec<EncryptedShare>,
    /// The unmask request (once masked input closed).
    pub request: Option<UnmaskRequest>,
    /// Why the round failed.
    pub reason: String,
}

/// One round's secure aggregation at the aggregator.
#[derive(Debug)]
pub struct SecureRound {
    round: u32,
    roster: Vec<String>,
    degree: u32,
    session: [u8; 32],
    setup: Setup,
    server: Server,
    deadlines: Deadlines,
    published: Option<Roster>,
    request: Option<UnmaskRequest>,
    failed: Option<String>,
    /// SHA-256 of each accepted share, masked-input and unmask message, by stage and site:
    /// an exact repeat (a site retrying after a lost acknowledgement) is acknowledged again
    /// without being applied twice; a different second message is refused by the protocol.
    accepted: std::collections::BTreeMap<(Stage, String), [u8; 32]>,
}

/// The stages whose messages [`SecureRound`] deduplicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Shares,
    Masked,
    Unmask,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

impl SecureRound {
    /// A round for `inputs` (whose `session` must be the `session` given), opened at `now_s`
    /// (seconds on the caller's clock).
    ///
    /// # Errors
    /// [`Error::Params`] for a setup that cannot run (see [`setup`]).
    pub fn open(
        inputs: &Inputs<'_>,
        session: [u8; 32],
        deadlines: Deadlines,
        now_s: u64,
    ) -> Result<Self, Error> {
        assert_eq!(inputs.session, session, "the session bytes of the inputs");
        let setup = setup(inputs)?;
        let mut server = Server::new(setup.params.clone())?;
        server.open_stage_at(now_s);
        Ok(Self {
            round: inputs.round,
            roster: inputs.roster.to_vec(),
            degree: inputs.degree,
            session,
            setup,
            server,
            deadlines,
            published: None,
            request: None,
            failed: None,
            accepted: Default::default(),
        })
    }

    /// The FL round.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// The round's sites, ascending.
    pub fn roster(&self) -> &[String] {
        &self.roster
    }

    /// Neighbours per site as the spec states it (0: all others).
    pub fn degree(&self) -> u32 {
        self.degree
    }

    /// The session bytes the sites bind into the round.
    pub fn session(&self) -> &[u8; 32] {
        &self.session
    }

    /// The round's public setup.
    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// `site`'s index in the roster.
    ///
    /// # Errors
    /// [`Error::Refused`] for a site outside the roster.
    pub fn index(&self, site: &str) -> Result<SiteIndex, Error> {
        index_of(&self.roster, site).ok_or_else(|| {
            Error::Refused(format!(
                "site `{site}` is not in round {}'s secure-aggregation roster (it joined after the round opened): wait for the next round",
                self.round
            ))
        })
    }

    /// Stage 1: `site`'s advertisement; its index must be `site`'s own.
    ///
    /// # Errors
    /// As [`Server::receive_advertise`]; [`Error::Refused`] for a site outside the roster.
    pub fn advertise(&mut self, site: &str, a: Advertise) -> Result<(), Error> {
        let me = self.index(site)?;
        self.server.receive_advertise(me, a)
    }

    /// Whether `site` can still take part: it is in the roster, keys are being advertised
    /// and it has not advertised yet.
    pub fn can_start(&self, site: &str) -> bool {
        self.failed.is_none()
            && self.server.stage() == ServerStage::Advertise
            && self.index(site).is_ok_and(|me| !self.server.advertised(me))
    }

    /// Stage 2: `site`'s sealed shares.
    ///
    /// # Errors
    /// As [`Server::receive_shares`].
    pub fn shares(&mut self, site: &str, shares: Vec<EncryptedShare>) -> Result<(), Error> {
        let d = digest(&serde_json::to_vec(&shares).unwrap_or_default());
        self.once(Stage::Shares, site, d, |server, me| {
            server.receive_shares(me, shares)
        })
    }

    /// Apply a message of `stage` from `site` with digest `d` once: an exact repeat is
    /// acknowledged without being applied again.
    fn once(
        &mut self,
        stage: Stage,
        site: &str,
        d: [u8; 32],
        apply: impl FnOnce(&mut Server, SiteIndex) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let me = self.index(site)?;
        let key = (stage, site.to_owned());
        if self.accepted.get(&key) == Some(&d) {
            return Ok(());
        }
        apply(&mut self.server, me)?;
        self.accepted.insert(key, d);
        Ok(())
    }

    /// Stage 3: `site`'s masked input, added into the running sum.
    ///
    /// # Errors
    /// As [`Server::receive_masked`].
    pub fn masked(&mut self, site: &str, y: &[u32]) -> Result<(), Error> {
        // Hashed in slices: no second copy of the vector.
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        let mut buf = Vec::with_capacity(4 << 14);
        for c in y.chunks(1 << 14) {
            buf.clear();
            buf.extend(c.iter().flat_map(|w| w.to_le_bytes()));
            sha2::Digest::update(&mut h, &buf);
        }
        let d = sha2::Digest::finalize(h).into();
        self.once(Stage::Masked, site, d, |server, me| {
            server.receive_masked(me, y)
        })
    }

    /// Stage 4: `site`'s unmask response.
    ///
    /// # Errors
    /// As [`Server::receive_unmask`].
    pub fn unmask(&mut self, site: &str, r: UnmaskResponse) -> Result<(), Error> {
        let d = digest(&serde_json::to_vec(&r).unwrap_or_default());
        self.once(Stage::Unmask, site, d, |server, me| {
            server.receive_unmask(me, r)
        })
    }

    /// The words a masked input has (model parameters + 1).
    pub fn words(&self) -> usize {
        self.setup.params.dim
    }

    /// What `site` may read now.
    pub fn view(&self, site: &str) -> View {
        let mut v = View {
            stage: match &self.failed {
                Some(_) => "failed",
                None => self.server.stage().as_str(),
            },
            reason: self.failed.clone().unwrap_or_default(),
            ..View::default()
        };
        if let Some(r) = &self.published {
            v.roster = r.sites.clone();
        }
        if let Ok(me) = self.index(site)
            && self.failed.is_none()
            && !matches!(
                self.server.stage(),
                ServerStage::Advertise | ServerStage::ShareKeys
            )
        {
            v.shares = self.server.shares_for(me);
        }
        v.request = self.request.clone();
        v
    }

    /// Closes the current stage if it is due at `now_s`; returns how the round ended when it
    /// just did (once).
    pub fn tick(&mut self, now_s: u64) -> Option<Ended> {
        if self.failed.is_some() {
            return None;
        }
        match self.server.tick(now_s, &self.deadlines) {
            Ok(None) => None,
            Ok(Some(Closed::Roster(r))) => {
                tracing::info!(
                    round = self.round,
                    sites = r.sites.len(),
                    "secure aggregation: keys advertised"
                );
                self.published = Some(r);
                None
            }
            Ok(Some(Closed::SharesRouted)) => {
                tracing::info!(round = self.round, "secure aggregation: shares routed");
                None
            }
            Ok(Some(Closed::Unmask(req))) => {
                tracing::info!(
                    round = self.round,
                    alive = req.alive.len(),
                    dropped = req.dropped.len(),
                    "secure aggregation: masked inputs in"
                );
                self.request = Some(req);
                None
            }
            Ok(Some(Closed::Sum(sum))) => {
                let (alive, dropped) = self
                    .request
                    .as_ref()
                    .map_or((0, 0), |r| (r.alive.len(), r.dropped.len()));
                match self.setup.decode_mean(&sum) {
                    Ok((mean, total_weight)) => Some(Ended::Mean {
                        mean,
                        total_weight,
                        alive,
                        dropped,
                    }),
                    Err(e) => self.fail(e.to_string()),
                }
            }
            Err(e) => self.fail(e.to_string()),
        }
    }

    fn fail(&mut self, reason: String) -> Option<Ended> {
        self.failed = Some(reason.clone());
        Some(Ended::Failed(reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedee_secagg::{Site, os_rng};

    const DEADLINES: Deadlines = Deadlines {
        advertise_s: 10,
        share_keys_s: 10,
        masked_input_s: 100,
        unmask_s: 10,
    };

    fn roster(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("hospital-{i}")).collect()
    }

    fn round(names: &[String], session: [u8; 32], dim: usize) -> SecureRound {
        round_with(names, session, dim, None)
    }

    fn round_with(
        names: &[String],
        session: [u8; 32],
        dim: usize,
        distributed_dp: Option<f64>,
    ) -> SecureRound {
        let inputs = Inputs {
            spec_sha256: "spec",
            round: 4,
            roster: names,
            degree: 0,
            session: &session,
            parameters: dim,
            bound: 1.0,
            max_weight: 1000,
            distributed_dp,
        };
        SecureRound::open(&inputs, session, DEADLINES, 0).unwrap()
    }

    /// Runs a round with `n` sites where the sites in `crash` stop after sharing keys;
    /// returns how it ended and the plaintext weighted mean of the others.
    fn run(n: usize, crash: &[usize]) -> (Ended, Vec<f64>) {
        run_with(n, crash, None)
    }

    /// [`run`], under distributed DP at central noise multiplier `z` when given (the mean is
    /// then unweighted).
    fn run_with(n: usize, crash: &[usize], z: Option<f64>) -> (Ended, Vec<f64>) {
        let names = roster(n);
        let session = [7u8; 32];
        let dim = 6;
        let mut agg = round_with(&names, session, dim, z);
        let mut rng = os_rng().unwrap();
        let mut sites = vec![];
        for (i, name) in names.iter().enumerate() {
            let (s, a) = Site::new(agg.setup().params.clone(), i as SiteIndex, &mut rng).unwrap();
            agg.advertise(name, a).unwrap();
            sites.push(s);
        }
        assert_eq!(agg.tick(1), None);
        let roster_msg = Roster {
            round: 4,
            sites: agg.view(&names[0]).roster,
        };
        assert_eq!(roster_msg.sites.len(), n);
        for (s, name) in sites.iter_mut().zip(&names) {
            let out = s.share_keys(&roster_msg, &mut rng).unwrap();
            agg.shares(name, out.clone()).unwrap();
            agg.shares(name, out).unwrap();
        }
        assert_eq!(agg.tick(2), None);
        let mut want = vec![0f64; dim];
        let mut total = 0u64;
        for (i, (s, name)) in sites.iter_mut().zip(&names).enumerate() {
            if crash.contains(&i) {
                continue;
            }
            let x: Vec<f32> = (0..dim)
                .map(|j| ((i * dim + j) as f32 * 0.013).sin() * 0.3)
                .collect();
            let w = 10 * (i as u32 + 1);
            let counted = if z.is_some() { 1 } else { w };
            for (a, &v) in want.iter_mut().zip(&x) {
                *a += f64::from(counted) * f64::from(v);
            }
            total += u64::from(counted);
            let (enc, _) = agg.setup().encode(x, w, &mut rng).unwrap();
            let y = s.masked_input(&agg.view(name).shares, &enc).unwrap();
            agg.masked(name, &y).unwrap();
            // A retry after a lost acknowledgement is acknowledged, not added twice; a
            // different second input is refused.
            agg.masked(name, &y).unwrap();
            let mut other = y.clone();
            other[0] ^= 1;
            let e = agg.masked(name, &other).unwrap_err().to_string();
            assert!(e.contains("already sent"), "{e}");
        }
        // The masked-input stage waits for the crashed sites until its deadline.
        let mut t = 3;
        if !crash.is_empty() {
            assert_eq!(agg.tick(t), None);
            t = 2 + 101;
        }
        let ended = agg.tick(t);
        if let Some(Ended::Failed(_)) = ended {
            return (ended.unwrap(), vec![]);
        }
        assert_eq!(ended, None);
        let req = agg.view(&names[0]).request.unwrap();
        for (i, (s, name)) in sites.iter_mut().zip(&names).enumerate() {
            if !crash.contains(&i) {
                let answer = s.unmask(&req).unwrap();
                agg.unmask(name, answer.clone()).unwrap();
                agg.unmask(name, answer).unwrap();
            }
        }
        let ended = agg.tick(t + 1).expect("every alive site answered");
        assert_eq!(agg.view(&names[0]).stage, "done");
        (ended, want.iter().map(|a| a / total as f64).collect())
    }

    #[test]
    fn a_round_yields_the_weighted_mean_with_and_without_dropouts() {
        for crash in [vec![], vec![1], vec![0, 4]] {
            let (ended, want) = run(5, &crash);
            let Ended::Mean {
                mean,
                alive,
                dropped,
                total_weight,
            } = ended
            else {
                panic!("{ended:?}")
            };
            assert_eq!((alive, dropped), (5 - crash.len(), crash.len()));
            assert!(total_weight > 0);
            for (m, w) in mean.iter().zip(&want) {
                assert!((f64::from(*m) - w).abs() < 1e-4, "{m} vs {w}");
            }
        }
    }

    #[test]
    fn distributed_dp_yields_the_unweighted_mean_of_the_survivors() {
        // A tiny central noise (z = 1e-5, C = 1) so the mean is checked to 1e-4.
        let (ended, want) = run_with(5, &[2], Some(1e-5));
        let Ended::Mean {
            mean,
            alive,
            total_weight,
            ..
        } = ended
        else {
            panic!("{ended:?}")
        };
        assert_eq!((alive, total_weight, mean.len()), (4, 4, 6));
        for (m, w) in mean.iter().zip(&want) {
            assert!((f64::from(*m) - w).abs() < 1e-4, "{m} vs {w}");
        }
    }

    #[test]
    fn too_few_survivors_fail_the_round_with_no_output() {
        // t = 3 of 5: two survivors cannot unmask.
        let (ended, _) = run(5, &[0, 1, 2]);
        assert!(
            matches!(&ended, Ended::Failed(r) if r.contains("threshold")),
            "{ended:?}"
        );
    }

    #[test]
    fn sites_outside_the_roster_and_impostors_are_refused() {
        let names = roster(4);
        let mut agg = round(&names, [1; 32], 3);
        let mut rng = os_rng().unwrap();
        let (_, a) = Site::new(agg.setup().params.clone(), 2, &mut rng).unwrap();
        let e = agg
            .advertise("newcomer", a.clone())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not in round 4") && e.contains("newcomer"),
            "{e}"
        );
        // Site 0's connection cannot advertise as site 2.
        let e = agg.advertise(&names[0], a.clone()).unwrap_err().to_string();
        assert!(e.contains("advertised keys as site 2"), "{e}");
        // Site 2 itself can, after the refusals.
        agg.advertise(&names[2], a).unwrap();
        assert_eq!(agg.view(&names[2]).stage, "advertise");
    }
}
