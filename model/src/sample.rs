//! Choosing the next token from a causal LM's logits: greedy, temperature, top-k and top-p
//! (nucleus) sampling, made *order-invariant* so that a server can sample on encrypted
//! logits.
//!
//! Under EE the server's logits are the plaintext logits with the vocabulary permuted by the
//! secret π. Every rule here depends only on the logit *values*: candidates are ranked by
//! value (a stable sort, so only exact ties fall back to the id order), and the random draw
//! walks that ranking. So for the same seed the server picks `π(token)` exactly when plaintext
//! sampling picks `token`, and the key holder decrypts the same text (up to ties and float
//! rounding of the EE forward, ~1e-5 on the logits).
//!
//! Sources: temperature and top-k as in Fan et al. 2018 ("Hierarchical Neural Story
//! Generation"), top-p as in Holtzman et al. 2020 ("The Curious Case of Neural Text
//! Degeneration"); the order of the filters (temperature, then top-k, then top-p) is Hugging
//! Face's `generate`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::{Kind, Tensor};

use crate::ModelError;

/// How to pick each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (0 < top_p ≤ 1; 1 keeps all).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Seed of the draws (ChaCha20): the same seed and logits give the same tokens.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// # Errors
    /// [`ModelError::Config`] naming a temperature outside `[0, 100]` or a top-p outside
    /// `(0, 1]` (NaN included).
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(0.0..=100.0).contains(&self.temperature) {
            return Err(ModelError::Config(format!(
                "temperature {} must be between 0 (greedy) and 100",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Config(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Draws tokens under one [`Sampling`].
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha20Rng,
}

impl Sampler {
    /// A sampler seeded with `sampling.seed`.
    pub fn new(sampling: Sampling) -> Self {
        Self {
            sampling,
            rng: ChaCha20Rng::seed_from_u64(sampling.seed),
        }
    }

    /// The next token id from `logits` `(V,)` (any float dtype, any device).
    ///
    /// # Errors
    /// [`ModelError::Config`] for logits that are not one non-empty row, or that hold NaN.
    pub fn sample(&mut self, logits: &Tensor) -> Result<i64, ModelError> {
        let v = match logits.size()[..] {
            [v] if v > 0 => v,
            ref s => {
                return Err(ModelError::Config(format!(
                    "logits must be one row (V,), got shape {s:?}"
                )));
            }
        };
        let z = logits;
        if bool::try_from(z.isnan().any()).unwrap_or(true) {
            return Err(ModelError::Config("the logits hold NaN".into()));
        }
        let s = self.sampling;
        // Ranked by value, highest first; the stable sort breaks exact ties by id.
        let keep = if s.top_k == 0 {
            v
        } else {
            (s.top_k as i64).min(v)
        };
        if s.temperature == 0.0 {
            // argmax returns the first maximum: ties go to the lowest id, as in the ranking.
            return Ok(z.argmax(0, false).int64_value(&[]));
        }
        let (sorted, idx) = z.sort_stable(true, 0, true);
        let (sorted, idx) = (sorted.narrow(0, 0, keep), idx.narrow(0, 0, keep));
        let p: Vec<f64> =
            Vec::try_from((sorted.to_kind(Kind::Double) / s.temperature).softmax(0, Kind::Double))
                .map_err(ModelError::Torch)?;
        let ids: Vec<i64> = Vec::try_from(&idx).map_err(ModelError::Torch)?;
        // Nucleus: the shortest ranked prefix reaching top_p (at least one token).
        let mut n = p.len();
        if s.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in p.iter().enumerate() {
                acc += q;
                if acc >= s.top_p {
                    n = i + 1;
                    break;
                }
            }
        }
        let total: f64 = p[..n].iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (q, id) in p[..n].iter().zip(&ids) {
            if u < *q {
                return Ok(*id);
            }
            u -= q;
        }
        Ok(ids[n - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(seed: i64, v: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([v], (Kind::Float, tch::Device::Cpu)) * 3.0
    }

    #[test]
    fn sampling_commutes_with_a_vocabulary_permutation() {
        let v = 1000;
        let perm = Tensor::randperm(v, (Kind::Int64, tch::Device::Cpu));
        let perm_v: Vec<i64> = Vec::try_from(&perm).unwrap();
        for s in [
            Sampling::default(),
            Sampling {
                temperature: 0.8,
                top_p: 0.9,
                top_k: 0,
                seed: 7,
            },
            Sampling {
                temperature: 1.3,
                top_p: 1.0,
                top_k: 40,
                seed: 8,
            },
        ] {
            let (mut plain, mut enc) = (Sampler::new(s), Sampler::new(s));
            let mut distinct = std::collections::BTreeSet::new();
            for step in 0..200 {
                let z = logits(step, v);
                // Encrypted logits: z'[π(i)] = z[i].
                let mut ze = Tensor::zeros([v], (Kind::Float, tch::Device::Cpu));
                let _ = ze.index_put_(&[Some(&perm)], &z, false);
                let a = plain.sample(&z).unwrap();
                let b = enc.sample(&ze).unwrap();
                assert_eq!(perm_v[a as usize], b, "{s:?} step {step}");
                distinct.insert(a);
            }
            // Temperature sampling must not collapse to argmax (it would pass the test above).
            if s.temperature > 0.0 {
                let greedy: std::collections::BTreeSet<i64> = (0..200)
                    .map(|st| logits(st, v).argmax(0, false).int64_value(&[]))
                    .collect();
                assert!(distinct != greedy, "{s:?} sampled only argmax tokens");
            }
        }
    }

    #[test]
    fn filters_keep_what_they_say_and_the_draws_follow_the_probabilities() {
        // p = softmax([ln 0.5, ln 0.3, ln 0.2]) = [0.5, 0.3, 0.2].
        let z = Tensor::from_slice(&[0.2f64.ln(), 0.5f64.ln(), 0.3f64.ln()]);
        let count = |s: Sampling| {
            let mut sm = Sampler::new(s);
            let mut c = [0usize; 3];
            for _ in 0..20_000 {
                c[sm.sample(&z).unwrap() as usize] += 1;
            }
            c.map(|x| x as f64 / 20_000.0)
        };
        let base = Sampling {
            temperature: 1.0,
            ..Sampling::default()
        };
        let f = count(base);
        for (got, want) in f.iter().zip([0.2, 0.5, 0.3]) {
            assert!((got - want).abs() < 0.02, "{f:?}");
        }
        // top_k = 2 keeps 0.5 and 0.3, renormalized to 5/8 and 3/8.
        let f = count(Sampling { top_k: 2, ..base });
        assert_eq!(f[0], 0.0, "{f:?}");
        assert!((f[1] - 0.625).abs() < 0.02, "{f:?}");
        // top_p = 0.5 keeps the first token alone; 0.6 the first two.
        assert_eq!(count(Sampling { top_p: 0.5, ..base }), [0.0, 1.0, 0.0]);
        let f = count(Sampling { top_p: 0.6, ..base });
        assert_eq!(f[0], 0.0, "{f:?}");
        // Greedy, and the same seed draws the same tokens.
        assert_eq!(Sampler::new(Sampling::default()).sample(&z).unwrap(), 1);
        let seq = |seed| {
            let mut sm = Sampler::new(Sampling { seed, ..base });
            (0..50).map(|_| sm.sample(&z).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(seq(3), seq(3));
        assert_ne!(seq(3), seq(4));
    }

    #[test]
    fn bad_settings_and_logits_are_named() {
        let bad = |s: Sampling| s.validate().unwrap_err().to_string();
        assert!(
            bad(Sampling {
                temperature: -1.0,
                ..Sampling::default()
            })
            .contains("temperature -1")
        );
        assert!(
            bad(Sampling {
                top_p: 0.0,
                ..Sampling::default()
            })
            .contains("top_p 0")
        );
        assert!(
            bad(Sampling {
                top_p: f64::NAN,
                ..Sampling::default()
            })
            .contains("top_p NaN")
        );
        let mut s = Sampler::new(Sampling::default());
        let e = s
            .sample(&Tensor::from_slice(&[1.0f32, f32::NAN]))
            .unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
        let e = s
            .sample(&Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)))
            .unwrap_err();
        assert!(e.to_string().contains("[2, 3]"), "{e}");
    }
}
