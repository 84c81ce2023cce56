//! The plain round's state and rules, pure: which sites a round waits for, when it closes or
//! fails, when the federation ends, and which updates are stale. The gRPC service
//! (`service.rs`) holds one [`State`] under a lock and acts on what these rules say; the
//! secure-aggregation protocol has its own type ([`crate::secure::SecureRound`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::secure::SecureRound;
use crate::tensors::Tensors;

/// What the round rules say at a moment ([`State::due`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    /// Nothing to do yet.
    Wait,
    /// Aggregate the round's updates.
    Close,
    /// The deadline passed without a quorum.
    Fail,
}

/// In-memory view of the federation, rebuilt from the database at start.
#[derive(Debug)]
pub(crate) struct State {
    /// Sites whose updates a round waits for: enrolled sites (with mutual TLS, `--enroll`;
    /// without TLS, every site that joined).
    pub(crate) enrolled: BTreeSet<String>,
    /// Sites that joined.
    pub(crate) sites: BTreeSet<String>,
    /// The open round (its global model has the same number), or `rounds + 1` when done.
    pub(crate) round: u32,
    pub(crate) global: Arc<Tensors>,
    pub(crate) global_sha: String,
    pub(crate) global_size: u64,
    pub(crate) submitted: BTreeSet<String>,
    /// Unix epoch ms at which the open round ends; `None` while round 1 waits for the quorum.
    pub(crate) deadline_ms: Option<i64>,
    /// When the open round opened (Unix epoch ms), for the round-duration metric.
    pub(crate) opened_ms: i64,
    /// Sites that left for good, with their reasons.
    pub(crate) departed: std::collections::BTreeMap<String, String>,
    /// Blob of the server optimizer state (FedAdam / FedYogi) that goes with `global`.
    pub(crate) server_state_sha: Option<String>,
    /// Why the federation ended early (too few sites remain).
    pub(crate) ended: Option<String>,
    /// The open round is being aggregated (`Federation::run_close` in `service.rs`) with the state lock
    /// released: readers carry on; changes that could touch the round wait for the close
    /// (`Federation::settled`); no update is accepted into the round any more.
    pub(crate) closing: bool,
    /// Under secure aggregation, the protocol run of the open round (or of the last one, until
    /// the next opens); in memory only (a restart fails the open round).
    pub(crate) secure: Option<SecureRound>,
}

impl State {
    /// Enrolled sites that have not left.
    pub(crate) fn active(&self) -> BTreeSet<String> {
        self.enrolled
            .iter()
            .filter(|s| !self.departed.contains_key(*s))
            .cloned()
            .collect()
    }

    /// The plain round rules at `now` (Unix epoch ms): close once the quorum (`min_sites`)
    /// has submitted and either every active site has or the deadline passed; fail at the
    /// deadline without a quorum; otherwise wait.
    pub(crate) fn due(&self, now: i64, min_sites: u32) -> Due {
        let quorum = self.submitted.len() >= min_sites as usize;
        let active = self.active();
        let all = !active.is_empty() && active.is_subset(&self.submitted);
        let expired = self.deadline_ms.is_some_and(|d| now >= d);
        match (quorum && (all || expired), expired) {
            (true, _) => Due::Close,
            (false, true) => Due::Fail,
            (false, false) => Due::Wait,
        }
    }

    /// Why the federation must end: some sites left and fewer than `min_sites` remain.
    pub(crate) fn ended_reason(&self, min_sites: u32) -> Option<String> {
        let active = self.active().len();
        (!self.departed.is_empty() && active < min_sites as usize).then(|| {
            format!(
                "federation ended: {} site(s) left ({}), {active} remain, below the quorum of {min_sites}",
                self.departed.len(),
                self.departed
                    .iter()
                    .map(|(s, r)| format!("{s}: {r}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })
    }

    /// Why an update for `round` is stale (not the open round, or the federation of
    /// `rounds` rounds has finished); `None` when it is for the open round.
    pub(crate) fn stale(&self, round: u32, rounds: u32) -> Option<String> {
        if self.round > rounds {
            Some(format!(
                "stale round: update for round {round} but the federation has finished"
            ))
        } else if round < self.round {
            Some(format!(
                "stale round: update for round {round} but that round has ended (closed or past its deadline) and round {} is open; download model {} and train again",
                self.round, self.round
            ))
        } else if round > self.round {
            Some(format!(
                "stale round: update for round {round} but round {} is open",
                self.round
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn state(enrolled: &[&str], submitted: &[&str], deadline_ms: Option<i64>) -> State {
        State {
            enrolled: names(enrolled),
            sites: names(enrolled),
            round: 3,
            global: Arc::new(Tensors {
                names: vec![],
                shapes: vec![],
                data: vec![],
            }),
            global_sha: String::new(),
            global_size: 0,
            submitted: names(submitted),
            deadline_ms,
            opened_ms: 0,
            departed: Default::default(),
            server_state_sha: None,
            ended: None,
            closing: false,
            secure: None,
        }
    }

    #[test]
    fn a_round_closes_on_everyone_or_on_the_deadline_with_a_quorum_and_fails_without() {
        let abc = ["a", "b", "c"];
        // Everyone submitted: close before the deadline.
        assert_eq!(state(&abc, &abc, Some(100)).due(50, 2), Due::Close);
        // A quorum but not everyone: wait until the deadline, then close.
        assert_eq!(state(&abc, &["a", "b"], Some(100)).due(50, 2), Due::Wait);
        assert_eq!(state(&abc, &["a", "b"], Some(100)).due(100, 2), Due::Close);
        // No quorum at the deadline: fail; before it, wait.
        assert_eq!(state(&abc, &["a"], Some(100)).due(99, 2), Due::Wait);
        assert_eq!(state(&abc, &["a"], Some(100)).due(100, 2), Due::Fail);
        // Round 1 before the quorum joined has no deadline: it only waits.
        assert_eq!(state(&abc, &["a"], None).due(i64::MAX, 2), Due::Wait);
        // A departed site is not waited for.
        let mut st = state(&abc, &["a", "b"], Some(100));
        st.departed.insert("c".into(), "budget".into());
        assert_eq!(st.due(50, 2), Due::Close);
    }

    #[test]
    fn the_federation_ends_below_the_quorum_and_names_who_left() {
        let mut st = state(&["a", "b", "c"], &[], None);
        assert_eq!(st.ended_reason(2), None);
        st.departed.insert("b".into(), "budget spent".into());
        assert_eq!(st.ended_reason(2), None);
        st.departed.insert("c".into(), "crash".into());
        let why = st.ended_reason(2).unwrap();
        assert!(
            why.contains("2 site(s) left") && why.contains("b: budget spent"),
            "{why}"
        );
    }

    #[test]
    fn stale_rounds_are_named() {
        let st = state(&["a"], &[], None);
        assert_eq!(st.stale(3, 10), None);
        assert!(st.stale(2, 10).unwrap().contains("round 3 is open"));
        assert!(st.stale(4, 10).unwrap().contains("round 3 is open"));
        assert!(st.stale(3, 2).unwrap().contains("finished"));
    }
}
