//! Record-level differential privacy: DP-SGD (Abadi et al., "Deep Learning with Differential
//! Privacy", CCS 2016, Algorithm 1) for the MLP, with vectorized per-example gradients.
//!
//! Each step samples every local record independently with probability `q` (Poisson
//! sampling), computes each sampled record's gradient, clips it to L2 norm `C`, sums, adds
//! `N(0, (σC)²)` per coordinate, divides by the expected batch size `qN`, and takes an SGD
//! step. Privacy is accounted with [`fedee_dp::rdp::RdpAccountant`] (Poisson-subsampled
//! Gaussian, Mironov et al. 2019), unit: **one patient record**.
//!
//! Per-example gradients are not computed with one backward pass per example. For a Linear
//! layer `z = a Wᵀ + b` the gradient of record `i` is `∂ℓᵢ/∂W = gᵢ aᵢᵀ`, `∂ℓᵢ/∂b = gᵢ`, where
//! `aᵢ` is the layer's input activation and `gᵢ = ∂(Σⱼℓⱼ)/∂zᵢ` its backpropagated gradient (as
//! Opacus does for `nn.Linear`). One backward pass of the summed loss to the pre-activations
//! gives every `gᵢ`; the per-example squared norm is `‖gᵢ‖²(‖aᵢ‖² + 1)` (the "ghost norm"),
//! and the clipped sum is `(f ⊙ g)ᵀ a` with clip factors `fᵢ = min(1, C/‖∇ᵢ‖)`. The same holds
//! layer by layer for an MLP of any depth: `‖∇ᵢ‖² = Σ_layers ‖gᵢ‖²(‖aᵢ‖² + 1)`.

use fedee_dp::noise::{Sampler, add_noise};
use fedee_dp::{ClippingNorm, NoiseMultiplier};
use fedee_encrypt::StateDict;
use fedee_model::{Checked, MlpConfig};
use rand::Rng;
use tch::{Device, Kind, Reduction, Tensor};

use crate::SiteError;

/// DP-SGD parameters.
#[derive(Debug, Clone, Copy)]
pub struct DpSgd {
    /// Per-example gradient clipping norm `C`.
    pub clipping_norm: ClippingNorm,
    /// Noise multiplier `σ` (noise std `σC` on the summed gradient).
    pub noise_multiplier: NoiseMultiplier,
    /// Poisson sampling rate `q` (expected batch size `qN`).
    pub sampling_rate: f64,
    /// Gaussian sampler.
    pub sampler: Sampler,
}

/// The sum over the batch of per-example gradients, each clipped to L2 norm `c`, and the
/// per-example gradient norms before clipping.
///
/// `state`: the MLP's parameters (f32 or f64), checked by [`MlpConfig::check_state`];
/// `x: (B, in_features)`, `y: (B,)` int64. Returns gradients with the parameters' names and
/// shapes, and norms `(B,)`.
pub fn clipped_gradient_sum(
    cfg: &MlpConfig,
    state: Checked<'_>,
    x: &Tensor,
    y: &Tensor,
    c: f64,
) -> (StateDict, Tensor, f64) {
    let layers = cfg.layers();
    // Layer inputs a₀ = x, a_k = act(z_k) (detached), and pre-activations z_k. The first
    // pre-activation is a graph leaf; one backward pass of the summed loss to every z_k gives
    // each layer's per-example gᵢ.
    let mut inputs = vec![x.shallow_clone()];
    let mut pre: Vec<Tensor> = Vec::with_capacity(layers.len());
    for (k, (w, b)) in layers.iter().enumerate() {
        let z = if k == 0 {
            x.linear(state.get(w), Some(state.get(b)))
                .detach()
                .set_requires_grad(true)
        } else {
            let a = cfg.activation.apply(&pre[k - 1]);
            inputs.push(a.detach());
            a.linear(state.get(w), Some(state.get(b)))
        };
        pre.push(z);
    }
    let logits = pre.last().expect("at least two layers");
    let loss = fedee_model::cross_entropy(logits, y); // mean, reported only
    let sum =
        logits
            .log_softmax(-1, logits.kind())
            .nll_loss_nd::<Tensor>(y, None, Reduction::Sum, -100);
    let grads = Tensor::run_backward(&[&sum], &pre.iter().collect::<Vec<_>>(), false, false);
    // ‖∇ᵢ‖² = Σ_layers ‖gᵢ‖² (‖aᵢ‖² + 1)
    let mut sq = Tensor::zeros([x.size()[0]], (x.kind(), x.device()));
    for (g, a) in grads.iter().zip(&inputs) {
        let gn = g.square().sum_dim_intlist(1, false, g.kind());
        let an = a.square().sum_dim_intlist(1, false, a.kind());
        sq += gn * (an + 1.0);
    }
    let norms = sq.sqrt();
    let factors = (c / (&norms + 1e-12)).clamp_max(1.0);
    let mut out = StateDict::new();
    for ((g, a), (w, b)) in grads.iter().zip(&inputs).zip(layers) {
        let fg = g * factors.unsqueeze(1);
        out.insert(w, fg.transpose(0, 1).matmul(a));
        out.insert(b, fg.sum_dim_intlist(0, false, fg.kind()));
    }
    (out, norms, loss.double_value(&[]))
}

/// Run `steps` DP-SGD steps with learning rate `lr` on `state` (updated in place) over the
/// site's examples `(x (n, in_features), y (n,))`.
/// Returns the mean loss over the steps that sampled at least one record.
///
/// # Errors
/// [`SiteError::Dp`] for a bad sampling rate or a noise-sampler failure, [`SiteError::Model`]
/// if `state` does not fit `cfg`.
pub fn train<R: Rng + ?Sized>(
    cfg: &MlpConfig,
    state: &mut StateDict,
    (x, y): (&Tensor, &Tensor),
    steps: u64,
    lr: f64,
    dp: &DpSgd,
    rng: &mut R,
) -> Result<f64, SiteError> {
    let n = y.size()[0] as usize;
    let q = dp.sampling_rate;
    if !(q > 0.0 && q <= 1.0) {
        return Err(SiteError::Dp(fedee_dp::DpError::Parameter(format!(
            "sampling rate q must be in (0, 1], got {q}"
        ))));
    }
    let c = dp.clipping_norm.get();
    let std = c * dp.noise_multiplier.get();
    let expected = q * n as f64;
    let (mut loss_sum, mut counted) = (0.0, 0u64);
    for _ in 0..steps {
        let idx: Vec<i64> = (0..n as i64).filter(|_| rng.random::<f64>() < q).collect();
        let mut grad = if idx.is_empty() {
            state
                .iter()
                .map(|(k, v)| (k.clone(), v.zeros_like()))
                .collect::<StateDict>()
        } else {
            let bi = Tensor::from_slice(&idx).to_device(x.device());
            let (g, _, loss) = clipped_gradient_sum(
                cfg,
                cfg.check_state(state)?,
                &x.index_select(0, &bi),
                &y.index_select(0, &bi),
                c,
            );
            loss_sum += loss;
            counted += 1;
            g
        };
        tch::no_grad(|| -> Result<(), SiteError> {
            for (name, g) in grad.iter_mut() {
                // Noise on the CPU from the site's CSPRNG, then to the parameter's device.
                let mut flat = Vec::<f32>::try_from(
                    g.to_kind(Kind::Float).to_device(Device::Cpu).reshape([-1]),
                )
                .expect("f32 gradient");
                add_noise(&mut flat, std, dp.sampler, rng)?;
                let noisy = Tensor::from_slice(&flat).reshape(g.size());
                let p = state
                    .get_mut(name)
                    .expect("the gradient has the state's names");
                *p = &*p - noisy.to_kind(p.kind()).to_device(p.device()) * (lr / expected);
            }
            Ok(())
        })?;
    }
    Ok(if counted == 0 {
        f64::NAN
    } else {
        loss_sum / counted as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedee_model::{Activation, Mlp};

    /// Reference: one backward pass per example, full parameter gradients, clipped and summed.
    fn loop_reference(
        cfg: &MlpConfig,
        state: &StateDict,
        x: &Tensor,
        y: &Tensor,
        c: f64,
    ) -> (StateDict, Vec<f64>) {
        let mut sum: StateDict = state
            .iter()
            .map(|(k, v)| (k.clone(), v.zeros_like()))
            .collect();
        let mut norms = vec![];
        for i in 0..x.size()[0] {
            let params: StateDict = state
                .iter()
                .map(|(k, v)| (k.clone(), v.detach().set_requires_grad(true)))
                .collect();
            let xi = x.narrow(0, i, 1);
            let yi = y.narrow(0, i, 1);
            let logits = fedee_model::mlp::forward(cfg, cfg.check_state(&params).unwrap(), &xi);
            let loss = fedee_model::cross_entropy(&logits, &yi);
            let names: Vec<&String> = params.keys().collect();
            let tensors: Vec<&Tensor> = params.values().collect();
            let g = Tensor::run_backward(&[&loss], &tensors, false, false);
            let norm = g
                .iter()
                .map(|t| t.square().sum(Kind::Double).double_value(&[]))
                .sum::<f64>()
                .sqrt();
            norms.push(norm);
            let f = (c / norm).min(1.0);
            for (n, gi) in names.iter().zip(g) {
                let s = sum.get_mut(*n).unwrap();
                *s = &*s + gi * f;
            }
        }
        (sum, norms)
    }

    #[test]
    fn vectorized_per_example_gradients_match_a_loop_of_backward_passes() {
        tch::manual_seed(3);
        let cases = [
            (Activation::Relu, vec![5]),
            (Activation::Gelu, vec![5]),
            (Activation::Relu, vec![6, 4, 5]),
            (Activation::Gelu, vec![4, 6]),
        ];
        for (activation, hidden) in cases {
            let cfg = MlpConfig {
                in_features: 7,
                hidden,
                out_features: 3,
                activation,
            };
            let m = Mlp::new(cfg.clone(), Device::Cpu, Kind::Double).unwrap();
            let state = m.state();

            let x = Tensor::randn([9, 7], (Kind::Double, Device::Cpu)) * 3.0;
            let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1, 2]);
            for c in [0.05, 1.0, 100.0] {
                let (v, norms, _) =
                    clipped_gradient_sum(&cfg, cfg.check_state(&state).unwrap(), &x, &y, c);
                let (r, ref_norms) = loop_reference(&cfg, &state, &x, &y, c);
                let norms = Vec::<f64>::try_from(&norms).unwrap();
                for (a, b) in norms.iter().zip(&ref_norms) {
                    assert!(
                        (a - b).abs() < 1e-10 * b.max(1.0),
                        "{activation:?}: norm {a} vs {b}"
                    );
                }
                for (k, t) in &r {
                    let d = (&v[k] - t).abs().max().double_value(&[]);
                    assert!(d < 1e-10, "{activation:?} C={c} {k}: max diff {d}");
                    assert_eq!(v[k].size(), t.size());
                }
            }
        }
    }
}
