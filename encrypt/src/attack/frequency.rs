//! Frequency analysis of encrypted token ids: EE encrypts token ids with one fixed vocabulary
//! permutation, a static substitution cipher (SECURITY.md, "Measured attacks"). A passive server counts
//! ciphertext unigrams and bigrams and matches them against a public reference corpus.
//!
//! The attack (classical substitution-cipher cryptanalysis, e.g. Jakobsen 1995, "A fast method
//! for cryptanalysis of substitution ciphers", Cryptologia 19(3)):
//! 1. unigram rank matching: the `r`-th most frequent ciphertext id is guessed to be the
//!    `r`-th most frequent reference token;
//! 2. bigram hill climbing with simulated annealing: moves that swap the guesses of two
//!    ciphertext ids, or re-assign a ciphertext id to an unused reference token of similar
//!    rank, are kept when they raise the log-likelihood `Σ C'(a, b) · log P_ref(σ(b) | σ(a))`
//!    of the ciphertext bigram counts `C'` under an interpolated bigram model of the
//!    reference (and, early on, sometimes when they lower it, to escape local optima).

use std::collections::HashMap;

use rand::Rng;

/// Token sequences as ids (one `Vec` per text, special tokens included if the server sees
/// them).
pub type Corpus = [Vec<u32>];

/// A bigram language model of a reference corpus: `P(b | a) = (C(a, b) + λ · P(b)) /
/// (C(a) + λ)`, with add-one smoothed unigrams `P(b)`.
#[derive(Debug)]
pub struct BigramModel {
    /// Reference tokens by falling count (ties by id): rank → token.
    pub by_rank: Vec<u32>,
    unigram_log: HashMap<u32, f64>,
    unigram: HashMap<u32, f64>,
    counts: HashMap<u32, f64>,
    bigrams: HashMap<(u32, u32), f64>,
    floor: f64,
    lambda: f64,
}

impl BigramModel {
    /// Count `reference` (bigrams within each sequence only) over a vocabulary of
    /// `vocab_size` ids.
    pub fn new(reference: &Corpus, vocab_size: usize) -> Self {
        let mut counts: HashMap<u32, f64> = HashMap::new();
        let mut bigrams: HashMap<(u32, u32), f64> = HashMap::new();
        let mut total = 0.0;
        for s in reference {
            for (i, &t) in s.iter().enumerate() {
                *counts.entry(t).or_default() += 1.0;
                total += 1.0;
                if i + 1 < s.len() {
                    *bigrams.entry((t, s[i + 1])).or_default() += 1.0;
                }
            }
        }
        let denom = total + vocab_size as f64;
        let unigram: HashMap<u32, f64> = counts
            .iter()
            .map(|(&t, &c)| (t, (c + 1.0) / denom))
            .collect();
        let unigram_log = unigram.iter().map(|(&t, &p)| (t, p.ln())).collect();
        let mut by_rank: Vec<u32> = counts.keys().copied().collect();
        by_rank.sort_by(|a, b| counts[b].total_cmp(&counts[a]).then(a.cmp(b)));
        Self {
            by_rank,
            unigram_log,
            unigram,
            counts,
            bigrams,
            floor: 1.0 / denom,
            lambda: 1.0,
        }
    }

    fn p_uni(&self, b: u32) -> f64 {
        self.unigram.get(&b).copied().unwrap_or(self.floor)
    }

    /// `log P(b | a)`.
    pub fn log_p(&self, a: u32, b: u32) -> f64 {
        let ca = self.counts.get(&a).copied().unwrap_or(0.0);
        let cab = self.bigrams.get(&(a, b)).copied().unwrap_or(0.0);
        if ca == 0.0 {
            return self.unigram_log.get(&b).copied().unwrap_or(self.floor.ln());
        }
        ((cab + self.lambda * self.p_uni(b)) / (ca + self.lambda)).ln()
    }
}

/// What the server observes: ciphertext unigram and bigram counts, indexed densely.
struct Observed {
    /// Dense index → ciphertext id, by falling count.
    ids: Vec<u32>,
    counts: Vec<f64>,
    /// Per dense symbol: (next symbol, count) and (previous symbol, count).
    next: Vec<Vec<(usize, f64)>>,
    prev: Vec<Vec<(usize, f64)>>,
}

impl Observed {
    fn new(cipher: &Corpus) -> Self {
        let mut count: HashMap<u32, f64> = HashMap::new();
        for s in cipher {
            for &t in s {
                *count.entry(t).or_default() += 1.0;
            }
        }
        let mut ids: Vec<u32> = count.keys().copied().collect();
        ids.sort_by(|a, b| count[b].total_cmp(&count[a]).then(a.cmp(b)));
        let index: HashMap<u32, usize> = ids.iter().enumerate().map(|(i, &t)| (t, i)).collect();
        let mut pairs: HashMap<(usize, usize), f64> = HashMap::new();
        for s in cipher {
            for w in s.windows(2) {
                *pairs.entry((index[&w[0]], index[&w[1]])).or_default() += 1.0;
            }
        }
        let mut next = vec![Vec::new(); ids.len()];
        let mut prev = vec![Vec::new(); ids.len()];
        for (&(a, b), &c) in &pairs {
            next[a].push((b, c));
            prev[b].push((a, c));
        }
        Self {
            counts: ids.iter().map(|t| count[t]).collect(),
            ids,
            next,
            prev,
        }
    }
}

/// Log-likelihood contribution of every observed bigram touching symbols `x` or `y` under
/// the guess `sigma` (each bigram counted once).
fn local_ll(obs: &Observed, model: &BigramModel, sigma: &[u32], x: usize, y: usize) -> f64 {
    let mut ll = 0.0;
    let both = [x, y];
    let syms = if x == y { &both[..1] } else { &both[..] };
    for &s in syms {
        for &(b, c) in &obs.next[s] {
            ll += c * model.log_p(sigma[s], sigma[b]);
        }
        for &(a, c) in &obs.prev[s] {
            // a → s, already counted when a is x or y (as its `next`).
            if a == x || a == y {
                continue;
            }
            ll += c * model.log_p(sigma[a], sigma[s]);
        }
    }
    ll
}

/// Parameters of the hill climb.
#[derive(Debug, Clone, Copy)]
pub struct FrequencyAttack {
    /// Proposed moves in all.
    pub moves: usize,
    /// A re-assignment proposes reference tokens within this many ranks of the current guess.
    pub rank_window: usize,
    /// Simulated annealing: a move that lowers the log-likelihood by `Δ` nats is still taken
    /// with probability `exp(−Δ / T)`, `T` falling geometrically over the run from this many
    /// times the mean count of a ciphertext id to 0.01 (0: greedy hill climbing, which stalls
    /// in local optima far from the key).
    pub start_temperature: f64,
}

impl Default for FrequencyAttack {
    fn default() -> Self {
        Self {
            moves: 2_000_000,
            rank_window: 200,
            start_temperature: 1.5,
        }
    }
}

/// The attacker's guess: ciphertext id → plaintext id, for every id seen in the ciphertext.
pub type Guess = HashMap<u32, u32>;

impl FrequencyAttack {
    /// Guess the plaintext of every ciphertext id in `cipher`: unigram rank matching alone.
    pub fn unigram(&self, cipher: &Corpus, model: &BigramModel) -> Guess {
        let obs = Observed::new(cipher);
        obs.ids
            .iter()
            .enumerate()
            .map(|(r, &c)| (c, model.by_rank.get(r).copied().unwrap_or(model.by_rank[0])))
            .collect()
    }

    /// Unigram rank matching, then bigram hill climbing (module docs). Deterministic for a
    /// given `rng` state.
    pub fn run<R: Rng + ?Sized>(&self, cipher: &Corpus, model: &BigramModel, rng: &mut R) -> Guess {
        let obs = Observed::new(cipher);
        let n = obs.ids.len();
        if n == 0 || model.by_rank.is_empty() {
            return Guess::new();
        }
        // Candidate plaintexts: the reference tokens by rank; sigma[s] is the guess of symbol s.
        let cands = &model.by_rank;
        let mut sigma: Vec<u32> = (0..n).map(|r| cands[r.min(cands.len() - 1)]).collect();
        // Which symbol holds each candidate (rank → symbol), if any.
        let rank_of: HashMap<u32, usize> = cands.iter().enumerate().map(|(r, &t)| (t, r)).collect();
        let mut holder: Vec<Option<usize>> = vec![None; cands.len()];
        for (s, t) in sigma.iter().enumerate() {
            holder[rank_of[t]] = Some(s);
        }
        // Symbols seen only once carry little signal: propose moves for every symbol, but
        // weight the choice towards frequent ones (they decide most ciphertext tokens).
        let total: f64 = obs.counts.iter().map(|c| c.sqrt()).sum();
        let cum: Vec<f64> = obs
            .counts
            .iter()
            .scan(0.0, |acc, c| {
                *acc += c.sqrt() / total;
                Some(*acc)
            })
            .collect();
        let t_end: f64 = 0.01;
        let t0 = self.start_temperature * obs.counts.iter().sum::<f64>() / n as f64;
        let cool = if t0 > t_end {
            (t_end / t0).powf(1.0 / self.moves.max(1) as f64)
        } else {
            0.0
        };
        let mut temp = t0;
        for _ in 0..self.moves {
            temp *= cool;
            let threshold = if temp > 0.0 {
                // Accept when after − before > T·ln(u): always for gains.
                temp * rng.random::<f64>().max(1e-300).ln()
            } else {
                0.0
            };
            let u: f64 = rng.random();
            let x = cum.partition_point(|&c| c < u).min(n - 1);
            let rx = rank_of[&sigma[x]];
            let lo = rx.saturating_sub(self.rank_window);
            let hi = (rx + self.rank_window + 1).min(cands.len());
            let r = rng.random_range(lo..hi);
            if r == rx {
                continue;
            }
            match holder[r] {
                Some(y) => {
                    let before = local_ll(&obs, model, &sigma, x, y);
                    sigma.swap(x, y);
                    let after = local_ll(&obs, model, &sigma, x, y);
                    // Unigram terms are unchanged by a swap.
                    if after - before > threshold {
                        holder.swap(rx, r);
                    } else {
                        sigma.swap(x, y);
                    }
                }
                None => {
                    let before = local_ll(&obs, model, &sigma, x, x)
                        + obs.counts[x] * model.p_uni(sigma[x]).ln();
                    let old = sigma[x];
                    sigma[x] = cands[r];
                    let after = local_ll(&obs, model, &sigma, x, x)
                        + obs.counts[x] * model.p_uni(sigma[x]).ln();
                    if after - before > threshold {
                        holder[rx] = None;
                        holder[r] = Some(x);
                    } else {
                        sigma[x] = old;
                    }
                }
            }
        }
        obs.ids.iter().copied().zip(sigma).collect()
    }
}

/// The log-likelihood of `cipher`'s bigrams under `model` when decoded with `guess` (ids the
/// guess lacks decode to themselves): the objective the hill climb raises.
pub fn log_likelihood(cipher: &Corpus, model: &BigramModel, guess: &Guess) -> f64 {
    let g = |c: u32| guess.get(&c).copied().unwrap_or(c);
    cipher
        .iter()
        .flat_map(|s| s.windows(2))
        .map(|w| model.log_p(g(w[0]), g(w[1])))
        .sum()
}

/// How much of a ciphertext a guess decodes: the share of ciphertext tokens whose guess is
/// their plaintext, and the share of distinct ciphertext ids guessed right.
///
/// `truth(c)` is the plaintext id of ciphertext id `c` (the key holder's view, for scoring).
pub fn score(cipher: &Corpus, guess: &Guess, truth: impl Fn(u32) -> u32) -> (f64, f64) {
    let (mut right, mut all) = (0usize, 0usize);
    for s in cipher {
        for &c in s {
            all += 1;
            right += usize::from(guess.get(&c) == Some(&truth(c)));
        }
    }
    let distinct = guess.len().max(1);
    let ok = guess.iter().filter(|&(&c, &p)| truth(c) == p).count();
    (
        right as f64 / all.max(1) as f64,
        ok as f64 / distinct as f64,
    )
}
