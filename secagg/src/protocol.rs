//! The two parties of one round as plain state machines: [`Site`] and [`Server`]. Every
//! method is a pure transition: it checks the whole message first and changes nothing when it
//! refuses one, so a transport can retry or drop a bad message without losing what was
//! already accepted.

use crate::channel::{self, channel_info};
use crate::mask::{self, Sign};
use crate::{Error, Graph, Result, RoundParams, SiteIndex};
use std::collections::{BTreeMap, BTreeSet};
use vsss_rs::{Gf256, IdentifierGf256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Bytes of one GF(256) share of a 32-byte secret: its x-coordinate, then 32 bytes.
pub const SHARE_LEN: usize = 33;
/// Bytes of a share bundle's plaintext: from, to (u16 each), round (u64), two shares.
const BUNDLE_LEN: usize = 2 + 2 + 8 + 2 * SHARE_LEN;
/// Bytes of a sealed share bundle (plaintext + Poly1305 tag).
pub const SEALED_LEN: usize = BUNDLE_LEN + 16;

/// Stage 1, site → server: the site's two public keys for this round.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Advertise {
    /// The round.
    pub round: u64,
    /// The sender's roster position (the server checks it against the mTLS identity).
    pub site: SiteIndex,
    /// X25519 public key of the share channel.
    pub channel_key: [u8; 32],
    /// X25519 public key of the pairwise masks.
    pub mask_key: [u8; 32],
}

/// Stage 1, server → sites: the advertisements that made the deadline.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Roster {
    /// The round.
    pub round: u64,
    /// One advertisement per site, ascending by site.
    pub sites: Vec<Advertise>,
}

/// Stage 2, one site → one neighbour (routed by the server): the sender's shares of its
/// self-mask seed and mask secret key, sealed for the receiver.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncryptedShare {
    /// The round.
    pub round: u64,
    /// The sender.
    pub from: SiteIndex,
    /// The receiver.
    pub to: SiteIndex,
    /// ChaCha20-Poly1305 ciphertext, [`SEALED_LEN`] bytes.
    pub ciphertext: Vec<u8>,
}

/// Stage 4, server → sites: whose masked input arrived and who shared keys but sent none.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnmaskRequest {
    /// The round.
    pub round: u64,
    /// Sites whose masked input is in the sum.
    pub alive: Vec<SiteIndex>,
    /// Sites that shared keys but whose masked input did not arrive.
    pub dropped: Vec<SiteIndex>,
}

/// Stage 4, site → server: shares of the alive neighbours' self-mask seeds and of the
/// dropped neighbours' mask secret keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnmaskResponse {
    /// The round.
    pub round: u64,
    /// The responder.
    pub site: SiteIndex,
    /// `(alive neighbour, share of its self-mask seed)`.
    pub seed_shares: Vec<(SiteIndex, Vec<u8>)>,
    /// `(dropped neighbour, share of its mask secret key)`.
    pub key_shares: Vec<(SiteIndex, Vec<u8>)>,
}

fn mask_info(p: &RoundParams, a: SiteIndex, b: SiteIndex) -> Vec<u8> {
    channel_info(&p.label("mask"), a.min(b), a.max(b))
}

fn check_round(p: &RoundParams, round: u64, what: &str) -> Result<()> {
    if round == p.round {
        Ok(())
    } else {
        Err(Error::Protocol(format!(
            "{what} is for round {round}, this is round {} (stale or replayed)",
            p.round
        )))
    }
}

fn share_id(site: SiteIndex) -> IdentifierGf256 {
    IdentifierGf256(Gf256((site + 1) as u8))
}

/// The plaintext of a share bundle.
struct Bundle {
    from: SiteIndex,
    to: SiteIndex,
    round: u64,
    key_share: Zeroizing<Vec<u8>>,
    seed_share: Zeroizing<Vec<u8>>,
}

impl Bundle {
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut v = Zeroizing::new(Vec::with_capacity(BUNDLE_LEN));
        v.extend_from_slice(&self.from.to_le_bytes());
        v.extend_from_slice(&self.to.to_le_bytes());
        v.extend_from_slice(&self.round.to_le_bytes());
        v.extend_from_slice(&self.key_share);
        v.extend_from_slice(&self.seed_share);
        v
    }

    fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != BUNDLE_LEN {
            return Err(Error::Refused(format!(
                "a share bundle of {} bytes, expected {BUNDLE_LEN}",
                b.len()
            )));
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let mut round = [0u8; 8];
        round.copy_from_slice(&b[4..12]);
        Ok(Self {
            from: u16_at(0),
            to: u16_at(2),
            round: u64::from_le_bytes(round),
            key_share: Zeroizing::new(b[12..12 + SHARE_LEN].to_vec()),
            seed_share: Zeroizing::new(b[12 + SHARE_LEN..].to_vec()),
        })
    }
}

/// One holder's shares of one site: `(mask key share, seed share)`.
type SharePair = (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SiteStage {
    Advertised,
    SharedKeys,
    SentInput,
    Unmasked,
}

/// One site's side of one round. Holds the site's secrets; nothing secret leaves it except
/// shares sealed for a neighbour.
pub struct Site {
    params: RoundParams,
    me: SiteIndex,
    channel_secret: StaticSecret,
    mask_secret: StaticSecret,
    seed: Zeroizing<[u8; 32]>,
    advert: Advertise,
    stage: SiteStage,
    /// Neighbours' advertisements from the roster.
    roster: BTreeMap<SiteIndex, Advertise>,
    /// Shares held, from neighbours and its own: `(mask key share, seed share)`.
    held: BTreeMap<SiteIndex, SharePair>,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("round", &self.params.round)
            .field("site", &self.me)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl Site {
    /// Stage 1: fresh keys and self-mask seed for this round, and the advertisement to send.
    ///
    /// # Errors
    /// Parameters that cannot run, or `me` outside the roster.
    pub fn new(
        params: RoundParams,
        me: SiteIndex,
        rng: &mut impl rand_core::CryptoRng,
    ) -> Result<(Self, Advertise)> {
        params.check()?;
        if usize::from(me) >= params.sites {
            return Err(Error::Params(format!(
                "site {me} is outside a roster of {}",
                params.sites
            )));
        }
        let channel_secret = StaticSecret::random_from_rng(rng);
        let mask_secret = StaticSecret::random_from_rng(rng);
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        let advert = Advertise {
            round: params.round,
            site: me,
            channel_key: PublicKey::from(&channel_secret).to_bytes(),
            mask_key: PublicKey::from(&mask_secret).to_bytes(),
        };
        let site = Self {
            params,
            me,
            channel_secret,
            mask_secret,
            seed,
            advert: advert.clone(),
            stage: SiteStage::Advertised,
            roster: BTreeMap::new(),
            held: BTreeMap::new(),
        };
        Ok((site, advert))
    }

    fn expect(&self, stage: SiteStage, what: &str) -> Result<()> {
        if self.stage == stage {
            Ok(())
        } else {
            Err(Error::Protocol(format!(
                "site {} got {what} in stage {:?}",
                self.me, self.stage
            )))
        }
    }

    /// Stage 2: checks the roster and seals shares of this site's secrets for each
    /// neighbour in it.
    ///
    /// # Errors
    /// [`Error::Refused`] for a roster that omits or alters this site's keys, repeats a site
    /// or a public key; [`Error::TooFew`] when fewer than `t` neighbours advertised.
    pub fn share_keys(
        &mut self,
        roster: &Roster,
        rng: &mut impl rand_core::CryptoRng,
    ) -> Result<Vec<EncryptedShare>> {
        self.expect(SiteStage::Advertised, "a roster")?;
        check_round(&self.params, roster.round, "the roster")?;
        check_roster(&self.params, &roster.sites)?;
        if !roster.sites.contains(&self.advert) {
            return Err(Error::Refused(format!(
                "the roster omits or alters site {}'s own keys",
                self.me
            )));
        }
        let graph = self.params.graph();
        let neighbours: BTreeMap<SiteIndex, Advertise> = roster
            .sites
            .iter()
            .filter(|a| graph.adjacent(self.me, a.site))
            .map(|a| (a.site, a.clone()))
            .collect();
        let t = self.params.threshold;
        // The holders: the neighbours and this site itself (Bonawitz et al. share among all
        // users), so t survivors always hold t shares of each survivor's seed.
        let holders: Vec<SiteIndex> = neighbours.keys().copied().chain([self.me]).collect();
        if holders.len() < t {
            return Err(Error::TooFew {
                what: format!(
                    "sites around site {} advertised keys (itself included)",
                    self.me
                ),
                have: holders.len(),
                threshold: t,
            });
        }
        let split = |secret: &[u8], rng: &mut _| {
            let ids = holders.iter().map(|&v| share_id(v));
            Gf256::split_bytes_with_participant_ids_iter(t, holders.len(), secret, rng, ids)
                .map_err(|e| Error::Params(format!("Shamir split: {e}")))
        };
        let mut key_shares = split(self.mask_secret.as_bytes(), &mut *rng)?;
        let mut seed_shares = split(self.seed.as_ref(), &mut *rng)?;
        // The last holder is this site: it keeps its own shares.
        let own = (
            Zeroizing::new(key_shares.pop().unwrap_or_default()),
            Zeroizing::new(seed_shares.pop().unwrap_or_default()),
        );
        let label = self.params.label("channel");
        let mut out = Vec::with_capacity(neighbours.len());
        for ((v, advert), (ks, ss)) in neighbours
            .iter()
            .zip(key_shares.into_iter().zip(seed_shares))
        {
            let info = channel_info(&label, self.me, *v);
            let key = channel::derive(&self.channel_secret, &advert.channel_key, &info)?;
            let bundle = Bundle {
                from: self.me,
                to: *v,
                round: self.params.round,
                key_share: Zeroizing::new(ks),
                seed_share: Zeroizing::new(ss),
            };
            out.push(EncryptedShare {
                round: self.params.round,
                from: self.me,
                to: *v,
                ciphertext: channel::seal(&key, &info, &bundle.encode())?,
            });
        }
        self.roster = neighbours;
        self.held = BTreeMap::from([(self.me, own)]);
        self.stage = SiteStage::SharedKeys;
        Ok(out)
    }

    /// Stage 3: opens the shares addressed to this site and returns its masked input,
    /// `input + PRG(b) + Σ_v ±PRG(s_uv)` over the neighbours whose shares arrived.
    ///
    /// # Errors
    /// [`Error::Refused`] for a share that is misaddressed, repeated, from a non-neighbour,
    /// tampered or unparsable; [`Error::Input`] for a wrong vector length; [`Error::TooFew`]
    /// when fewer than `t` neighbours' shares arrived.
    pub fn masked_input(&mut self, shares: &[EncryptedShare], input: &[u32]) -> Result<Vec<u32>> {
        self.expect(SiteStage::SharedKeys, "encrypted shares")?;
        if input.len() != self.params.dim {
            return Err(Error::Input(format!(
                "an input of {} words, the round's dimension is {}",
                input.len(),
                self.params.dim
            )));
        }
        let label = self.params.label("channel");
        let mut held = self.held.clone();
        for s in shares {
            check_round(&self.params, s.round, "an encrypted share")?;
            if s.to != self.me {
                return Err(Error::Refused(format!(
                    "a share from site {} addressed to site {} reached site {}",
                    s.from, s.to, self.me
                )));
            }
            let Some(advert) = self.roster.get(&s.from) else {
                return Err(Error::Refused(format!(
                    "a share from site {}, which is not a neighbour in the roster",
                    s.from
                )));
            };
            if held.contains_key(&s.from) {
                return Err(Error::Refused(format!("two shares from site {}", s.from)));
            }
            let info = channel_info(&label, s.from, self.me);
            let key = channel::derive(&self.channel_secret, &advert.channel_key, &info)?;
            let b = Bundle::decode(&channel::open(&key, &info, &s.ciphertext)?)?;
            if (b.from, b.to, b.round) != (s.from, self.me, self.params.round) {
                return Err(Error::Refused(format!(
                    "a share bundle sealed as {}→{} round {} arrived as {}→{}",
                    b.from, b.to, b.round, s.from, self.me
                )));
            }
            let mine = share_id(self.me).0.0;
            if b.key_share[0] != mine || b.seed_share[0] != mine {
                return Err(Error::Refused(format!(
                    "site {} sent shares for another x-coordinate",
                    s.from
                )));
            }
            held.insert(s.from, (b.key_share, b.seed_share));
        }
        let t = self.params.threshold;
        if held.len() < t {
            return Err(Error::TooFew {
                what: format!(
                    "sites around site {} shared keys (itself included)",
                    self.me
                ),
                have: held.len(),
                threshold: t,
            });
        }
        let mut masks = Vec::with_capacity(held.len() + 1);
        masks.push((*self.seed, Sign::Plus));
        for v in held.keys().filter(|&&v| v != self.me) {
            let seed = channel::derive(
                &self.mask_secret,
                &self.roster[v].mask_key,
                &mask_info(&self.params, self.me, *v),
            )?;
            masks.push((
                *seed,
                if self.me < *v {
                    Sign::Plus
                } else {
                    Sign::Minus
                },
            ));
        }
        let mut y = input.to_vec();
        mask::apply(&mut y, &masks);
        masks
            .iter_mut()
            .for_each(|(s, _)| zeroize::Zeroize::zeroize(s));
        self.held = held;
        self.stage = SiteStage::SentInput;
        Ok(y)
    }

    /// Stage 4: shares of the alive neighbours' seeds and the dropped neighbours' mask keys.
    /// Answered once per round.
    ///
    /// # Errors
    /// [`Error::Refused`] when the lists overlap, repeat a site, or list this site as
    /// dropped, or when a second request comes; [`Error::TooFew`] when fewer than `t` sites
    /// are alive.
    pub fn unmask(&mut self, req: &UnmaskRequest) -> Result<UnmaskResponse> {
        if self.stage == SiteStage::Unmasked {
            return Err(Error::Refused(format!(
                "site {} already answered an unmask request for round {}",
                self.me, self.params.round
            )));
        }
        self.expect(SiteStage::SentInput, "an unmask request")?;
        check_round(&self.params, req.round, "the unmask request")?;
        let alive = unique(&req.alive, "alive")?;
        let dropped = unique(&req.dropped, "dropped")?;
        let both: Vec<_> = alive.intersection(&dropped).collect();
        if !both.is_empty() {
            return Err(Error::Refused(format!(
                "sites {both:?} are listed both alive and dropped (that would unmask their input)"
            )));
        }
        if dropped.contains(&self.me) || !alive.contains(&self.me) {
            return Err(Error::Refused(format!(
                "site {} sent its input but is not listed alive",
                self.me
            )));
        }
        if alive.len() < self.params.threshold {
            return Err(Error::TooFew {
                what: "sites alive".into(),
                have: alive.len(),
                threshold: self.params.threshold,
            });
        }
        let mut r = UnmaskResponse {
            round: self.params.round,
            site: self.me,
            ..Default::default()
        };
        for (v, (key_share, seed_share)) in &self.held {
            if alive.contains(v) {
                r.seed_shares.push((*v, seed_share.to_vec()));
            } else if dropped.contains(v) {
                r.key_shares.push((*v, key_share.to_vec()));
            }
        }
        self.stage = SiteStage::Unmasked;
        Ok(r)
    }
}

fn unique(list: &[SiteIndex], name: &str) -> Result<BTreeSet<SiteIndex>> {
    let set: BTreeSet<SiteIndex> = list.iter().copied().collect();
    if set.len() == list.len() {
        Ok(set)
    } else {
        Err(Error::Refused(format!("the {name} list repeats a site")))
    }
}

/// Every advertisement of the round, for sites of the roster, once each, with distinct keys.
fn check_roster(p: &RoundParams, adverts: &[Advertise]) -> Result<()> {
    let mut sites = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for a in adverts {
        check_round(p, a.round, "an advertisement")?;
        if usize::from(a.site) >= p.sites {
            return Err(Error::Refused(format!(
                "site {} is outside a roster of {}",
                a.site, p.sites
            )));
        }
        if !sites.insert(a.site) {
            return Err(Error::Refused(format!("site {} advertised twice", a.site)));
        }
        for k in [a.channel_key, a.mask_key] {
            if !keys.insert(k) {
                return Err(Error::Refused(format!(
                    "site {} advertised a public key already in use",
                    a.site
                )));
            }
        }
    }
    Ok(())
}

/// The stage a [`Server`] waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ServerStage {
    /// Stage 1: advertisements.
    Advertise,
    /// Stage 2: encrypted shares.
    ShareKeys,
    /// Stage 3: masked inputs.
    MaskedInput,
    /// Stage 4: unmask responses.
    Unmask,
    /// The sum is unmasked.
    Done,
}

impl ServerStage {
    /// The stage's wire name: `advertise`, `share_keys`, `masked_input`, `unmask`, `done`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Advertise => "advertise",
            Self::ShareKeys => "share_keys",
            Self::MaskedInput => "masked_input",
            Self::Unmask => "unmask",
            Self::Done => "done",
        }
    }
}

/// The server's side of one round: routes shares, folds masked inputs into one running sum
/// as they arrive (memory: one vector), and unmasks the sum. Holds no secret; serializable,
/// so a restarted aggregator can resume a round.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Server {
    params: RoundParams,
    stage: ServerStage,
    adverts: BTreeMap<SiteIndex, Advertise>,
    shares: BTreeMap<SiteIndex, Vec<EncryptedShare>>,
    sum: Vec<u32>,
    alive: BTreeSet<SiteIndex>,
    responses: BTreeMap<SiteIndex, UnmaskResponse>,
    /// The round's neighbour graph, computed once from `params`.
    graph: Graph,
    /// When the current stage opened (the caller's clock, seconds).
    stage_opened: u64,
}

/// How long each stage waits, in seconds, before it closes with whoever answered; a site
/// that misses a stage's deadline counts as dropped from then on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deadlines {
    /// Stage 1, advertise keys.
    pub advertise_s: u64,
    /// Stage 2, share keys.
    pub share_keys_s: u64,
    /// Stage 3, masked input.
    pub masked_input_s: u64,
    /// Stage 4, unmask.
    pub unmask_s: u64,
}

/// What [`Server::tick`] produced when it closed a stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Stage 1 closed: send every site in it the roster.
    Roster(Roster),
    /// Stage 2 closed: send each site [`Server::shares_for`] it.
    SharesRouted,
    /// Stage 3 closed: send every alive site the request.
    Unmask(UnmaskRequest),
    /// Stage 4 closed: the unmasked sum over the alive sites.
    Sum(Vec<u32>),
}

impl Server {
    /// Closes the current stage when every site expected in it has answered, or when its
    /// deadline (`opened + deadline`, on the caller's clock `now` in seconds) has passed;
    /// returns what the stage produced, or `None` while it waits. Unmasking closes early
    /// once every alive site answered, and otherwise waits for its deadline even when the
    /// shares would already suffice, so a slow honest site is not cut off.
    ///
    /// # Errors
    /// [`Error::TooFew`] when a stage closes with too few sites: the round ends with no
    /// output.
    pub fn tick(&mut self, now: u64, d: &Deadlines) -> Result<Option<Closed>> {
        let due = |limit: u64| now >= self.stage_opened.saturating_add(limit);
        let out = match self.stage {
            ServerStage::Advertise => {
                if self.adverts.len() < self.params.sites && !due(d.advertise_s) {
                    return Ok(None);
                }
                Closed::Roster(self.close_advertise()?)
            }
            ServerStage::ShareKeys => {
                if self.shares.len() < self.adverts.len() && !due(d.share_keys_s) {
                    return Ok(None);
                }
                self.close_shares()?;
                Closed::SharesRouted
            }
            ServerStage::MaskedInput => {
                if self.alive.len() < self.shares.len() && !due(d.masked_input_s) {
                    return Ok(None);
                }
                Closed::Unmask(self.close_masked()?)
            }
            ServerStage::Unmask => {
                if self.responses.len() < self.alive.len() && !due(d.unmask_s) {
                    return Ok(None);
                }
                Closed::Sum(self.finish()?)
            }
            ServerStage::Done => return Ok(None),
        };
        self.stage_opened = now;
        Ok(Some(out))
    }

    /// Starts the deadline clock of the current stage at `now` (seconds); [`Server::new`]
    /// starts it at 0.
    pub fn open_stage_at(&mut self, now: u64) {
        self.stage_opened = now;
    }

    /// A round waiting for advertisements.
    ///
    /// # Errors
    /// Parameters that cannot run.
    pub fn new(params: RoundParams) -> Result<Self> {
        params.check()?;
        let sum = vec![0; params.dim];
        let graph = params.graph();
        Ok(Self {
            params,
            stage: ServerStage::Advertise,
            adverts: BTreeMap::new(),
            shares: BTreeMap::new(),
            sum,
            alive: BTreeSet::new(),
            responses: BTreeMap::new(),
            graph,
            stage_opened: 0,
        })
    }

    /// The stage the server waits in.
    pub fn stage(&self) -> ServerStage {
        self.stage
    }

    /// The round's parameters.
    pub fn params(&self) -> &RoundParams {
        &self.params
    }

    fn expect(&self, stage: ServerStage, what: &str) -> Result<()> {
        if self.stage == stage {
            Ok(())
        } else {
            Err(Error::Protocol(format!(
                "{what} arrived in stage {:?} (its deadline has passed)",
                self.stage
            )))
        }
    }

    /// Whether `site`'s advertisement was accepted.
    pub fn advertised(&self, site: SiteIndex) -> bool {
        self.adverts.contains_key(&site)
    }

    /// Stage 1: an advertisement from `from`, the site the transport authenticated.
    ///
    /// # Errors
    /// [`Error::Refused`] when it claims another site, repeats a site with other keys, or
    /// reuses a public key.
    pub fn receive_advertise(&mut self, from: SiteIndex, a: Advertise) -> Result<()> {
        self.expect(ServerStage::Advertise, "an advertisement")?;
        if a.site != from {
            return Err(Error::Refused(format!(
                "site {from} advertised keys as site {}",
                a.site
            )));
        }
        if self.adverts.get(&from) == Some(&a) {
            return Ok(());
        }
        let mut all: Vec<Advertise> = self.adverts.values().cloned().collect();
        all.push(a.clone());
        check_roster(&self.params, &all)?;
        self.adverts.insert(from, a);
        Ok(())
    }

    /// Closes stage 1 (its deadline): the roster to send every site.
    ///
    /// # Errors
    /// [`Error::TooFew`] when `t` or fewer sites advertised.
    pub fn close_advertise(&mut self) -> Result<Roster> {
        self.expect(ServerStage::Advertise, "the advertise deadline")?;
        self.at_least(
            self.adverts.len(),
            self.params.threshold + 1,
            "sites advertised keys",
        )?;
        self.stage = ServerStage::ShareKeys;
        Ok(Roster {
            round: self.params.round,
            sites: self.adverts.values().cloned().collect(),
        })
    }

    fn at_least(&self, have: usize, threshold: usize, what: &str) -> Result<()> {
        if have < threshold {
            return Err(Error::TooFew {
                what: what.into(),
                have,
                threshold,
            });
        }
        Ok(())
    }

    /// Stage 2: `from`'s sealed shares, one for each of its neighbours in the roster.
    ///
    /// # Errors
    /// [`Error::Refused`] for shares of another sender, a missing, repeated or
    /// non-neighbour receiver, or a ciphertext of the wrong length.
    pub fn receive_shares(&mut self, from: SiteIndex, shares: Vec<EncryptedShare>) -> Result<()> {
        self.expect(ServerStage::ShareKeys, "encrypted shares")?;
        if !self.adverts.contains_key(&from) {
            return Err(Error::Refused(format!("site {from} is not in the roster")));
        }
        if self.shares.contains_key(&from) {
            return Err(Error::Refused(format!(
                "site {from} already sent its shares"
            )));
        }
        let want: BTreeSet<SiteIndex> = self
            .adverts
            .keys()
            .copied()
            .filter(|&v| self.graph.adjacent(from, v))
            .collect();
        let mut got = BTreeSet::new();
        for s in &shares {
            check_round(&self.params, s.round, "an encrypted share")?;
            if s.from != from || !want.contains(&s.to) || !got.insert(s.to) {
                return Err(Error::Refused(format!(
                    "site {from} sent a share {}→{} that is not one per roster neighbour",
                    s.from, s.to
                )));
            }
            if s.ciphertext.len() != SEALED_LEN {
                return Err(Error::Refused(format!(
                    "a sealed share of {} bytes, expected {SEALED_LEN}",
                    s.ciphertext.len()
                )));
            }
        }
        if got != want {
            return Err(Error::Refused(format!(
                "site {from} sent shares for {} of its {} neighbours",
                got.len(),
                want.len()
            )));
        }
        self.shares.insert(from, shares);
        Ok(())
    }

    /// Closes stage 2.
    ///
    /// # Errors
    /// [`Error::TooFew`] when `t` or fewer sites shared keys.
    pub fn close_shares(&mut self) -> Result<()> {
        self.expect(ServerStage::ShareKeys, "the share-keys deadline")?;
        self.at_least(
            self.shares.len(),
            self.params.threshold + 1,
            "sites shared keys",
        )?;
        self.stage = ServerStage::MaskedInput;
        Ok(())
    }

    /// The sealed shares addressed to `site`, to send it with the stage-3 request.
    pub fn shares_for(&self, site: SiteIndex) -> Vec<EncryptedShare> {
        self.shares
            .values()
            .flatten()
            .filter(|s| s.to == site)
            .cloned()
            .collect()
    }

    /// Stage 3: `from`'s masked input, added into the running sum at once.
    ///
    /// # Errors
    /// [`Error::Refused`] from a site that did not share keys or already sent its input;
    /// [`Error::Input`] for a wrong length.
    pub fn receive_masked(&mut self, from: SiteIndex, y: &[u32]) -> Result<()> {
        self.expect(ServerStage::MaskedInput, "a masked input")?;
        if !self.shares.contains_key(&from) {
            return Err(Error::Refused(format!(
                "a masked input from site {from}, which did not share keys"
            )));
        }
        if self.alive.contains(&from) {
            return Err(Error::Refused(format!(
                "site {from} already sent its masked input"
            )));
        }
        if y.len() != self.params.dim {
            return Err(Error::Input(format!(
                "site {from} sent {} words, the round's dimension is {}",
                y.len(),
                self.params.dim
            )));
        }
        self.sum
            .iter_mut()
            .zip(y)
            .for_each(|(a, b)| *a = a.wrapping_add(*b));
        self.alive.insert(from);
        Ok(())
    }

    /// Closes stage 3: the unmask request for every alive site.
    ///
    /// # Errors
    /// [`Error::TooFew`] when fewer than `t` inputs arrived: the round ends with no output.
    pub fn close_masked(&mut self) -> Result<UnmaskRequest> {
        self.expect(ServerStage::MaskedInput, "the masked-input deadline")?;
        self.at_least(
            self.alive.len(),
            self.params.threshold,
            "masked inputs arrived",
        )?;
        self.stage = ServerStage::Unmask;
        Ok(self.unmask_request())
    }

    fn unmask_request(&self) -> UnmaskRequest {
        UnmaskRequest {
            round: self.params.round,
            alive: self.alive.iter().copied().collect(),
            dropped: self
                .shares
                .keys()
                .copied()
                .filter(|v| !self.alive.contains(v))
                .collect(),
        }
    }

    /// Stage 4: one alive site's shares.
    ///
    /// # Errors
    /// [`Error::Refused`] from a site that is not alive or answered already, or shares of the
    /// wrong kind for a site, for a non-neighbour, repeated, or of the wrong length or
    /// x-coordinate.
    pub fn receive_unmask(&mut self, from: SiteIndex, r: UnmaskResponse) -> Result<()> {
        self.expect(ServerStage::Unmask, "an unmask response")?;
        check_round(&self.params, r.round, "an unmask response")?;
        if r.site != from || !self.alive.contains(&from) {
            return Err(Error::Refused(format!(
                "an unmask response from site {from} (as site {}), which is not alive",
                r.site
            )));
        }
        if self.responses.contains_key(&from) {
            return Err(Error::Refused(format!("site {from} already answered")));
        }
        let req = self.unmask_request();
        let mut seen = BTreeSet::new();
        for (list, kind, targets) in [
            (&r.seed_shares, "seed", &req.alive),
            (&r.key_shares, "mask key", &req.dropped),
        ] {
            for (v, share) in list {
                let holder = self.graph.adjacent(from, *v) || (*v == from && kind == "seed");
                if !targets.contains(v) || !holder || !seen.insert(*v) {
                    return Err(Error::Refused(format!(
                        "site {from} sent a {kind} share of site {v}, which it may not (not a neighbour in that list, or repeated)"
                    )));
                }
                if share.len() != SHARE_LEN || share[0] != share_id(from).0.0 {
                    return Err(Error::Refused(format!(
                        "site {from}'s {kind} share of site {v} does not parse ({} bytes)",
                        share.len()
                    )));
                }
            }
        }
        self.responses.insert(from, r);
        Ok(())
    }

    /// Rebuilds the secrets and returns the unmasked sum over the alive sites.
    ///
    /// # Errors
    /// [`Error::TooFew`] when some secret has fewer than `t` shares (more responses may still
    /// come: the state is kept); [`Error::Refused`] when shares rebuild a mask key that does
    /// not match its advertised public key.
    pub fn finish(&mut self) -> Result<Vec<u32>> {
        self.expect(ServerStage::Unmask, "finish")?;
        let t = self.params.threshold;
        let collect = |site: SiteIndex, seeds: bool| -> Vec<Vec<u8>> {
            self.responses
                .values()
                .filter_map(|r| {
                    let list = if seeds { &r.seed_shares } else { &r.key_shares };
                    list.iter()
                        .find(|(v, _)| *v == site)
                        .map(|(_, s)| s.clone())
                })
                .collect()
        };
        let rebuild = |site: SiteIndex, seeds: bool| -> Result<Zeroizing<[u8; 32]>> {
            let shares = collect(site, seeds);
            let what = if seeds { "seed" } else { "mask key" };
            if shares.len() < t {
                return Err(Error::TooFew {
                    what: format!("shares of site {site}'s {what}"),
                    have: shares.len(),
                    threshold: t,
                });
            }
            let combine = |s: &[Vec<u8>]| {
                Gf256::combine_bytes(s).map_err(|e| {
                    Error::Refused(format!(
                        "shares of site {site}'s {what} do not combine: {e}"
                    ))
                })
            };
            let secret = Zeroizing::new(combine(&shares[..t])?);
            // With more than t shares, a second subset must agree (a corrupted share shows).
            if shares.len() > t && *combine(&shares[shares.len() - t..])? != *secret {
                return Err(Error::Refused(format!(
                    "shares of site {site}'s {what} are inconsistent (a corrupted share)"
                )));
            }
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(&secret);
            Ok(out)
        };
        let req = self.unmask_request();
        let mut masks = Vec::new();
        for &u in &req.alive {
            masks.push((*rebuild(u, true)?, Sign::Minus));
        }
        for &v in &req.dropped {
            let secret = StaticSecret::from(*rebuild(v, false)?);
            if PublicKey::from(&secret).to_bytes() != self.adverts[&v].mask_key {
                return Err(Error::Refused(format!(
                    "shares of site {v}'s mask key rebuild a key that is not the one it advertised"
                )));
            }
            for &u in req.alive.iter().filter(|&&u| self.graph.adjacent(u, v)) {
                let seed = channel::derive(
                    &secret,
                    &self.adverts[&u].mask_key,
                    &mask_info(&self.params, u, v),
                )?;
                // u added +PRG when u < v: take it away.
                masks.push((*seed, if u < v { Sign::Minus } else { Sign::Plus }));
            }
        }
        let mut sum = self.sum.clone();
        mask::apply(&mut sum, &masks);
        masks
            .iter_mut()
            .for_each(|(s, _)| zeroize::Zeroize::zeroize(s));
        self.stage = ServerStage::Done;
        Ok(sum)
    }

    /// The running sum of masked inputs so far (what the server sees).
    pub fn masked_sum(&self) -> &[u32] {
        &self.sum
    }
}
