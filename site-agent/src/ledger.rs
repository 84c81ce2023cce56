//! The site's privacy ledger: one entry per round of local work, persisted as JSON next to the
//! site (`--ledger`), and the budget check that runs before any training.
//!
//! Every entry is a sampled Gaussian mechanism `(q, σ, steps)`: DP-SGD rounds (record mode,
//! `q` = sampling rate) and site-level rounds (`q = 1`, one step: the Gaussian mechanism on the
//! clipped update). Their Rényi DP adds up over entries ([`fedee_dp::rdp`]); ε at δ is the
//! Balle et al. 2020 conversion. Rounds of distributed DP (secure aggregation with
//! `distributed_dp`) are Skellam releases instead, charged with the bound of
//! [`fedee_dp::skellam::worst_case_round`] at integer orders. Mixing units in one ledger is
//! refused: a ledger protects one unit.

use std::path::{Path, PathBuf};

use fedee_dp::rdp::RdpAccountant;
use fedee_dp::skellam::SkellamRound;
use serde::{Deserialize, Serialize};

use crate::SiteError;

/// One round of local work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Federation round.
    pub round: u32,
    /// Unit of privacy ("patient record" or "site update").
    pub unit: String,
    /// "subsampled_gaussian_rdp", "gaussian_zcdp" or "skellam_rdp".
    pub mechanism: String,
    /// Poisson sampling rate `q` (1 for site-level).
    pub sampling_rate: f64,
    /// Noise multiplier `σ`.
    pub noise_multiplier: f64,
    /// Clipping norm `C`.
    pub clipping_norm: f64,
    /// Mechanism invocations this round.
    pub steps: u64,
    /// Cumulative ε after this round, at `delta` (∞ is stored as the string "inf").
    #[serde(with = "extended_f64")]
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The Rényi order α at which the cumulative RDP gives `epsilon`; 0 when `epsilon` came
    /// from the zCDP conversion (every entry an unsampled Gaussian release).
    #[serde(default)]
    pub rdp_order: f64,
    /// Cumulative RDP at `rdp_order` (ε(δ) = rdp + log((α−1)/α) − (log δ + log α)/(α−1)), or
    /// the cumulative zCDP ρ when `rdp_order` is 0.
    #[serde(default, with = "extended_f64")]
    pub rdp: f64,
    /// When (Unix seconds).
    pub at_unix_s: u64,
    /// A distributed-DP round: the Skellam release charged (then `q`, `σ` and steps only
    /// describe it: `σ` is the central noise multiplier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skellam: Option<SkellamRound>,
}

/// An f64 that may be infinite or NaN, faithfully in JSON: finite values as numbers, the
/// others as the strings "inf", "-inf" and "NaN" (serde_json would write `null`, and read it
/// back as an error or a zero).
mod extended_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        match *x {
            x if x.is_finite() => s.serialize_f64(x),
            x if x.is_nan() => s.serialize_str("NaN"),
            x if x > 0.0 => s.serialize_str("inf"),
            _ => s.serialize_str("-inf"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(f64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Number(x) => Ok(x),
            Repr::Text(t) => match t.as_str() {
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                "NaN" => Ok(f64::NAN),
                other => Err(serde::de::Error::custom(format!(
                    "`{other}` is not a number, \"inf\", \"-inf\" or \"NaN\""
                ))),
            },
        }
    }
}

/// What a round is about to spend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned {
    /// Sampling rate.
    pub sampling_rate: f64,
    /// Noise multiplier.
    pub noise_multiplier: f64,
    /// Steps.
    pub steps: u64,
    /// A Skellam release (distributed DP) instead of the sampled Gaussian.
    pub skellam: Option<SkellamRound>,
}

impl Planned {
    fn charge(&self, acc: &mut RdpAccountant) -> Result<(), SiteError> {
        match self.skellam {
            Some(r) => acc.add_integer_orders(1, |a| r.rdp(a)),
            None => acc.add(self.sampling_rate, self.noise_multiplier, self.steps)?,
        }
        Ok(())
    }
}

/// The ledger (in memory, and on disk when it has a path).
#[derive(Debug, Clone)]
pub struct Ledger {
    path: Option<PathBuf>,
    entries: Vec<Entry>,
}

impl Ledger {
    /// Open the ledger at `path`; `None` keeps it in memory only. A missing file starts an
    /// empty ledger only when `create` (`fedee site --new-ledger`); an existing one is never
    /// reset.
    ///
    /// # Errors
    /// [`SiteError::LedgerMissing`] for a missing file without `create`;
    /// [`SiteError::LedgerIo`] / [`SiteError::LedgerCorrupt`] if the file exists but cannot
    /// be read or parsed (never silently reset: that would forget privacy already spent).
    pub fn open(path: Option<&Path>, create: bool) -> Result<Self, SiteError> {
        let entries = match path {
            Some(p) if !p.exists() && !create => {
                return Err(SiteError::LedgerMissing { path: p.to_owned() });
            }
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p).map_err(|source| SiteError::LedgerIo {
                    path: p.to_owned(),
                    action: "read",
                    source,
                })?;
                serde_json::from_str(&text).map_err(|source| SiteError::LedgerCorrupt {
                    path: p.to_owned(),
                    source,
                })?
            }
            _ => vec![],
        };
        Ok(Self {
            path: path.map(Path::to_path_buf),
            entries,
        })
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Cumulative ε at `delta` of the recorded entries plus `next`.
    ///
    /// # Errors
    /// [`SiteError::Dp`] for out-of-range parameters.
    pub fn epsilon_with(&self, next: Option<Planned>, delta: f64) -> Result<f64, SiteError> {
        Ok(self.spend_with(next, delta)?.0)
    }

    /// Cumulative `(ε, α, RDP(α))` at `delta` of the recorded entries plus `next`, where `α`
    /// is the order that gives the smallest ε.
    ///
    /// # Errors
    /// [`SiteError::Dp`] for out-of-range parameters.
    pub fn spend_with(
        &self,
        next: Option<Planned>,
        delta: f64,
    ) -> Result<(f64, f64, f64), SiteError> {
        self.spend_after(next.as_slice(), delta)
    }

    /// Cumulative `(ε, α, RDP(α))` at `delta` of the recorded entries plus every `next`.
    ///
    /// # Errors
    /// [`SiteError::Dp`] for out-of-range parameters.
    pub fn spend_after(&self, next: &[Planned], delta: f64) -> Result<(f64, f64, f64), SiteError> {
        let mut acc = RdpAccountant::default();
        for e in &self.entries {
            Planned {
                sampling_rate: e.sampling_rate,
                noise_multiplier: e.noise_multiplier,
                steps: e.steps,
                skellam: e.skellam,
            }
            .charge(&mut acc)?;
        }
        for p in next {
            p.charge(&mut acc)?;
        }
        let (eps, order) = acc.epsilon(delta);
        let rdp = acc
            .orders()
            .iter()
            .position(|&a| a == order)
            .map_or(f64::INFINITY, |i| acc.rdp()[i]);
        // A ledger of unsampled Gaussian releases only (site-level rounds) is ρ-zCDP with
        // ρ = Σ steps/(2σ²): the aggregator's accountant converts that over every order, a
        // hair tighter than the grid of orders, and a site must not find itself over a
        // budget equal to the spec's target where the aggregator is not. Both are valid
        // bounds; the smaller is reported (its order then 0, and `rdp` then holds ρ).
        let gaussian = |q: f64, s: Option<SkellamRound>| q == 1.0 && s.is_none();
        if self
            .entries
            .iter()
            .all(|e| gaussian(e.sampling_rate, e.skellam))
            && next.iter().all(|p| gaussian(p.sampling_rate, p.skellam))
        {
            let rho: f64 = self
                .entries
                .iter()
                .map(|e| (e.steps, e.noise_multiplier))
                .chain(next.iter().map(|p| (p.steps, p.noise_multiplier)))
                .map(|(steps, s)| steps as f64 / (2.0 * s * s))
                .sum();
            let z = fedee_dp::zcdp_epsilon(rho, delta)?;
            if z < eps {
                return Ok((z, 0.0, rho));
            }
        }
        Ok((eps, order, rdp))
    }

    /// Whether the ledger already has an entry for `round`.
    pub fn has_round(&self, round: u32) -> bool {
        self.entries.iter().any(|e| e.round == round)
    }

    /// Record `planned` as `round`'s entry (its cumulative ε, Rényi order and RDP computed
    /// here, stamped now) and persist; returns the cumulative ε.
    ///
    /// # Errors
    /// As [`Ledger::spend_with`] and [`Ledger::record`].
    pub fn record_planned(
        &mut self,
        round: u32,
        unit: &str,
        mechanism: &str,
        planned: Planned,
        clipping_norm: f64,
        delta: f64,
    ) -> Result<f64, SiteError> {
        let (epsilon, rdp_order, rdp) = self.spend_with(Some(planned), delta)?;
        self.record(Entry {
            round,
            unit: unit.into(),
            mechanism: mechanism.into(),
            sampling_rate: planned.sampling_rate,
            noise_multiplier: planned.noise_multiplier,
            clipping_norm,
            steps: planned.steps,
            epsilon,
            delta,
            rdp_order,
            rdp,
            at_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            skellam: planned.skellam,
        })?;
        Ok(epsilon)
    }

    /// Append an entry and persist the ledger (written to a temporary file, fsynced, renamed).
    ///
    /// # Errors
    /// [`SiteError::Ledger`] if the unit differs from earlier entries or the file cannot be
    /// written.
    pub fn record(&mut self, e: Entry) -> Result<(), SiteError> {
        if let Some(first) = self.entries.first()
            && first.unit != e.unit
        {
            return Err(SiteError::LedgerUnit {
                protects: first.unit.clone(),
                asked: e.unit,
            });
        }
        self.entries.push(e);
        if let Some(p) = &self.path {
            use std::io::Write;
            let write = |source| SiteError::LedgerIo {
                path: p.to_owned(),
                action: "write",
                source,
            };
            // Temporary file, fsync, rename, folder fsync: a crash leaves the old ledger or
            // the new one, never a torn or vanished file.
            let mut f = atomic_write_file::AtomicWriteFile::open(p).map_err(write)?;
            let text = serde_json::to_string_pretty(&self.entries).expect("entries serialize");
            f.write_all(text.as_bytes()).map_err(write)?;
            f.commit().map_err(write)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(round: u32, unit: &str) -> Entry {
        Entry {
            round,
            unit: unit.into(),
            mechanism: "subsampled_gaussian_rdp".into(),
            sampling_rate: 0.1,
            noise_multiplier: 1.0,
            clipping_norm: 1.0,
            steps: 20,
            epsilon: 0.0,
            delta: 1e-5,
            rdp_order: 0.0,
            rdp: 0.0,
            at_unix_s: 0,
            skellam: None,
        }
    }

    #[test]
    fn a_skellam_round_is_charged_at_integer_orders_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger.json");
        let mut l = Ledger::open(Some(&p), true).unwrap();
        let round = fedee_dp::skellam::worst_case_round(1.0);
        let planned = Planned {
            sampling_rate: 1.0,
            noise_multiplier: 1.0,
            steps: 1,
            skellam: Some(round),
        };
        let gaussian = Planned {
            skellam: None,
            ..planned
        };
        for r in 1..=3 {
            l.record_planned(r, "site update", "skellam_rdp", planned, 1.0, 1e-5)
                .unwrap();
        }
        let again = Ledger::open(Some(&p), false).unwrap();
        assert_eq!(again.entries()[2].skellam, Some(round));
        let (eps, order, _) = again.spend_with(None, 1e-5).unwrap();
        assert_eq!(
            order.fract(),
            0.0,
            "Skellam's bound holds at integer orders"
        );
        // Three Gaussian releases at σ = 1 over the same integer orders: within 1e-5.
        let mut g = Ledger::open(None, true).unwrap();
        for r in 1..=3 {
            g.record_planned(r, "site update", "gaussian_zcdp", gaussian, 1.0, 1e-5)
                .unwrap();
        }
        let (ge, _, _) = g.spend_with(None, 1e-5).unwrap();
        assert!(
            eps >= ge * 0.999 && eps <= ge * 1.03,
            "Skellam {eps} vs Gaussian {ge}"
        );
        // Old ledgers (no `skellam` field) still read.
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"skellam\""));
    }

    #[test]
    fn a_missing_ledger_is_refused_unless_asked_and_infinity_survives_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger.json");
        let err = Ledger::open(Some(&p), false).unwrap_err();
        assert!(
            matches!(&err, SiteError::LedgerMissing { .. })
                && err.to_string().contains("--new-ledger"),
            "{err}"
        );
        let mut l = Ledger::open(Some(&p), true).unwrap();
        l.record(Entry {
            epsilon: f64::INFINITY,
            rdp: f64::INFINITY,
            ..entry(1, "site update")
        })
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"epsilon\": \"inf\""), "{text}");
        // Reopened (with or without --new-ledger), ∞ is still ∞, and the budget sees it.
        let again = Ledger::open(Some(&p), false).unwrap();
        assert_eq!(again.entries()[0].epsilon, f64::INFINITY);
        assert_eq!(again.entries()[0].rdp, f64::INFINITY);
        assert!(!crate::policy::within_budget(
            again.entries()[0].epsilon,
            1e9
        ));
    }

    #[test]
    fn persists_replays_and_refuses_corruption_and_mixed_units() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger.json");
        let mut l = Ledger::open(Some(&p), true).unwrap();
        let planned = Planned {
            sampling_rate: 0.1,
            noise_multiplier: 1.0,
            steps: 20,
            skellam: None,
        };
        let e1 = l.epsilon_with(Some(planned), 1e-5).unwrap();
        l.record(entry(1, "patient record")).unwrap();
        // Reopened from disk: the spend is remembered, and grows with the next round.
        let l2 = Ledger::open(Some(&p), true).unwrap();
        assert_eq!(l2.entries().len(), 1);
        assert!((l2.epsilon_with(None, 1e-5).unwrap() - e1).abs() < 1e-12);
        assert!(l2.epsilon_with(Some(planned), 1e-5).unwrap() > e1);
        assert!(l2.has_round(1) && !l2.has_round(2));
        let mut l3 = l2.clone();
        let mixed = l3.record(entry(2, "site update")).unwrap_err();
        assert!(
            matches!(&mixed, SiteError::LedgerUnit { protects, .. } if protects == "patient record"),
            "{mixed}"
        );
        // record_planned records what epsilon_with foresaw.
        let foreseen = l3.epsilon_with(Some(planned), 1e-5).unwrap();
        let recorded = l3
            .record_planned(
                2,
                "patient record",
                "subsampled_gaussian_rdp",
                planned,
                1.0,
                1e-5,
            )
            .unwrap();
        assert_eq!(recorded, foreseen);
        assert_eq!(l3.entries()[1].epsilon, recorded);
        std::fs::write(&p, "{not json").unwrap();
        let err = Ledger::open(Some(&p), true).unwrap_err();
        assert!(
            err.to_string().contains("forget privacy already spent"),
            "{err}"
        );
        assert!(
            std::error::Error::source(&err).is_some(),
            "the parser's error is kept as the source"
        );
    }
}
