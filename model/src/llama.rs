//! A Llama-family causal LM in tch (SmolLM2, Llama 2/3 shapes): RMSNorm, grouped-query
//! attention with rotary position embeddings, a SwiGLU feed-forward block, tied or separate
//! output embeddings, and a key/value cache for decoding.
//!
//! Shapes: token ids `(B, T)` i64; hidden states `(B, T, d)`; logits `(B, T, V)` in the
//! weights' dtype (f32 as loaded by [`crate::gguf`]). Parameters use the GGUF names with
//! `(out, in)` matrices and Q/K rows in the half-split RoPE order (see [`crate::gguf`]).
//!
//! Math (Touvron et al. 2023, "Llama 2", and Hugging Face's `LlamaForCausalLM`):
//! `RMSNorm(x) = x / √(mean(x²) + ε) ⊙ γ`; RoPE rotates each pair `(i, i + d_h/2)` of a query or
//! key head at position `p` by the angle `p · θ^(−2i/d_h)` (Su et al. 2021); attention is
//! `softmax(QKᵀ/√d_h + causal mask) V` with each KV head shared by `H / H_kv` query heads;
//! `FFN(x) = W_down (SiLU(W_gate x) ⊙ W_up x)`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::keyspec::{Heads, InputKind, KeyDecl, KeyGroup, KeyRef, KeySpec};
use crate::state::Checked;
use crate::{ModelError, StateDict};

/// The architecture of a Llama-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Residual width `d`.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Query heads `H`.
    pub num_heads: usize,
    /// Key/value heads `H_kv` (GQA: `H` is a multiple of it).
    pub num_kv_heads: usize,
    /// Width of one head `d_h` (even).
    pub head_dim: usize,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// Longest context (positions) the model was trained for.
    pub max_position: usize,
    /// Whether the output layer is the embedding table (no `output.weight`).
    pub tied_embeddings: bool,
}

impl LlamaConfig {
    /// # Errors
    /// [`ModelError::Config`] naming the first inconsistent value.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad(format!(
                "vocabulary {}, width {} and layers {} must be positive",
                self.vocab_size, self.hidden_size, self.num_layers
            ));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head width {} must be even", self.head_dim));
        }
        if !(self.rope_theta > 1.0 && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "RoPE base {} and RMSNorm ε {} must be positive",
                self.rope_theta, self.rms_norm_eps
            ));
        }
        Ok(())
    }

    /// Parameter names (GGUF's: `token_embd.weight`, `blk.N.attn_q.weight`, …) and `(out, in)`
    /// shapes.
    pub fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        let c = self;
        let (d, f, hd) = (
            c.hidden_size as i64,
            c.intermediate_size as i64,
            c.head_dim as i64,
        );
        let (h, kv) = (c.num_heads as i64, c.num_kv_heads as i64);
        let mut s = BTreeMap::new();
        s.insert("token_embd.weight".into(), vec![c.vocab_size as i64, d]);
        s.insert("output_norm.weight".into(), vec![d]);
        if !c.tied_embeddings {
            s.insert("output.weight".into(), vec![c.vocab_size as i64, d]);
        }
        for l in 0..c.num_layers {
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            s.insert(p("attn_norm"), vec![d]);
            s.insert(p("attn_q"), vec![h * hd, d]);
            s.insert(p("attn_k"), vec![kv * hd, d]);
            s.insert(p("attn_v"), vec![kv * hd, d]);
            s.insert(p("attn_output"), vec![d, h * hd]);
            s.insert(p("ffn_norm"), vec![d]);
            s.insert(p("ffn_gate"), vec![f, d]);
            s.insert(p("ffn_up"), vec![f, d]);
            s.insert(p("ffn_down"), vec![d, f]);
        }
        s
    }

    /// Check `state` against [`LlamaConfig::shapes`].
    ///
    /// # Errors
    /// As [`Checked::new`].
    pub fn check_state<'a>(&self, state: &'a StateDict) -> Result<Checked<'a>, ModelError> {
        Checked::new(&self.shapes(), state, "Llama")
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Architecture name in key specs and key files.
    pub const ARCHITECTURE: &'static str = "llama";

    /// The EE key spec (row-vector math in SECURITY.md, "The math"):
    /// - `vocab`, a permutation π of token ids: embedding rows move with it, so the server
    ///   sees encrypted ids and returns logits permuted alike (tied output layer);
    /// - `residual`, a (signed) permutation of the residual stream: every matrix reading it
    ///   (Q/K/V, gate/up, the embedding table) gets it on its columns, every matrix writing it
    ///   (attention output, down) on its rows, RMSNorm weights its unsigned permutation;
    /// - `ffn{l}`, a permutation of layer `l`'s SwiGLU units (gate and up rows, down columns),
    ///   monomial in the inference profile: up rows scaled by `s`, down columns by `1/s`, the
    ///   gate only permuted (SiLU does not commute with scaling);
    /// - attention, per layer: `qk{l}` acts on the key/value heads (K rows; rotary: heads move
    ///   whole, each block the identity, or in the inference profile a RoPE-commuting complex
    ///   factor per frequency pair) and `vo{l}` moves the same heads with a block inside each
    ///   value head (a permutation, or any invertible matrix in the inference profile);
    ///   `q{l}` and `o{l}` follow them on the query heads (Q rows under the dual, attention-output
    ///   columns): each query head stays in its KV head's group, permuted within the group, with
    ///   its KV head's block.
    ///
    /// [`LlamaConfig::key_groups`] picks the groups of a profile.
    pub fn key_spec(&self) -> KeySpec {
        let decl = KeyDecl::new;
        let mut keys = BTreeMap::new();
        keys.insert(
            "vocab".to_owned(),
            decl(
                self.vocab_size,
                vec![KeyGroup::Permutation],
                "token ids are indices",
            ),
        );
        keys.insert(
            "residual".to_owned(),
            decl(
                self.hidden_size,
                vec![KeyGroup::Permutation, KeyGroup::SignedPermutation],
                "RMSNorm commutes with signed permutations only (γ permuted without signs)",
            ),
        );
        let (k, d, abs) = (
            |n: &str| Some(KeyRef::new(n)),
            |n: &str| Some(KeyRef::dual(n)),
            |n: &str| Some(KeyRef::permutation(n)),
        );
        let mut params = BTreeMap::new();
        params.insert(
            "token_embd.weight".to_owned(),
            vec![d("vocab"), d("residual")],
        );
        params.insert("output_norm.weight".to_owned(), vec![abs("residual")]);
        if !self.tied_embeddings {
            params.insert("output.weight".to_owned(), vec![k("vocab"), k("residual")]);
        }
        let (kv_dim, q_dim) = (
            self.num_kv_heads * self.head_dim,
            self.num_heads * self.head_dim,
        );
        for l in 0..self.num_layers {
            let (qk, q, vo, o) = (
                format!("qk{l}"),
                format!("q{l}"),
                format!("vo{l}"),
                format!("o{l}"),
            );
            let kv_heads = Heads::new(self.num_kv_heads, &format!("attn{l}"));
            let q_heads = |base: &str| Heads {
                follows: Some(base.to_owned()),
                ..Heads::new(self.num_heads, &format!("attn-q{l}"))
            };
            let perm = || vec![KeyGroup::Permutation, KeyGroup::Invertible];
            keys.insert(
                qk.clone(),
                KeyDecl {
                    heads: Some(Heads {
                        rotary: true,
                        ..kv_heads.clone()
                    }),
                    ..decl(
                        kv_dim,
                        perm(),
                        "scores depend on q·k per head; RoPE pairs stay in place",
                    )
                },
            );
            keys.insert(
                vo.clone(),
                KeyDecl {
                    heads: Some(kv_heads),
                    ..decl(kv_dim, perm(), "attention mixes values linearly per head")
                },
            );
            keys.insert(
                q.clone(),
                KeyDecl {
                    heads: Some(q_heads(&qk)),
                    ..decl(q_dim, perm(), "query heads stay with their key/value head")
                },
            );
            keys.insert(
                o.clone(),
                KeyDecl {
                    heads: Some(q_heads(&vo)),
                    ..decl(
                        q_dim,
                        perm(),
                        "each query head's output is in its value head's basis",
                    )
                },
            );
            let ffn = format!("ffn{l}");
            keys.insert(
                ffn.clone(),
                decl(
                    self.intermediate_size,
                    vec![KeyGroup::Permutation, KeyGroup::Monomial],
                    "SiLU(gate) ⊙ up: the gate takes permutations only, up positive scales too",
                ),
            );
            let mut add = |n: &str, axes: Vec<Option<KeyRef>>| {
                params.insert(format!("blk.{l}.{n}.weight"), axes);
            };
            add("attn_norm", vec![abs("residual")]);
            add("attn_q", vec![d(&q), k("residual")]);
            add("attn_k", vec![k(&qk), k("residual")]);
            add("attn_v", vec![k(&vo), k("residual")]);
            add("attn_output", vec![k("residual"), k(&o)]);
            add("ffn_norm", vec![abs("residual")]);
            add("ffn_gate", vec![abs(&ffn), k("residual")]);
            add("ffn_up", vec![k(&ffn), k("residual")]);
            add("ffn_down", vec![k("residual"), k(&ffn)]);
        }
        KeySpec {
            architecture: Self::ARCHITECTURE.into(),
            keys,
            params,
            input: "vocab".into(),
            input_kind: InputKind::TokenIds,
            output: "vocab".into(),
            input_layer: None,
        }
    }

    /// Key groups of a profile, to pass to `KeySet::generate`. `Finetune`: signed
    /// permutations on the residual stream and permutations elsewhere, so AdamW steps stay
    /// exact. `Inference`: also RoPE-commuting Q/K factors and invertible V/O blocks per KV
    /// head, and scaled FFN units.
    pub fn key_groups(&self, profile: crate::Profile) -> BTreeMap<String, KeyGroup> {
        let mut g = BTreeMap::from([("residual".to_owned(), KeyGroup::SignedPermutation)]);
        if profile == crate::Profile::Inference {
            for l in 0..self.num_layers {
                g.insert(format!("qk{l}"), KeyGroup::Invertible);
                g.insert(format!("vo{l}"), KeyGroup::Invertible);
                g.insert(format!("ffn{l}"), KeyGroup::Monomial);
            }
        }
        g
    }
}

/// Keys and values of the positions seen so far, per layer: `(B, H_kv, T_max, d_h)` each,
/// filled up to [`KvCache::len`].
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new(c: &LlamaConfig, batch: usize, capacity: usize, kind: Kind, device: Device) -> Self {
        let shape = [
            batch as i64,
            c.num_kv_heads as i64,
            capacity as i64,
            c.head_dim as i64,
        ];
        Self {
            k: (0..c.num_layers)
                .map(|_| Tensor::zeros(shape, (kind, device)))
                .collect(),
            v: (0..c.num_layers)
                .map(|_| Tensor::zeros(shape, (kind, device)))
                .collect(),
            len: 0,
            capacity,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions that still fit.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }
}

/// `t` (any shape) with every 2-D tensor stored column-major: the same `(out, in)` matrix, as
/// a transposed view of a contiguous `(in, out)` buffer.
///
/// `linear` then multiplies by the contiguous transpose, and libtorch's CPU matrix–vector
/// path reads that layout about 1.5× faster than the row-major one (measured for SmolLM2's
/// decode shapes on 2 cores: the 49 152 × 576 output layer 10.0 → 4.9 ms); prefill's
/// matrix–matrix products run at the same speed either way. Values, names and shapes are
/// unchanged; [`crate::Model`] stores a causal LM's matrices this way.
pub fn decode_layout(t: &Tensor) -> Tensor {
    if t.dim() == 2 {
        t.tr().contiguous().tr()
    } else {
        t.shallow_clone()
    }
}

/// `cos` and `sin` of the RoPE angles of positions `start..start + t`: `(t, d_h)` each, the
/// `d_h/2` frequencies repeated for both halves (Hugging Face's layout).
fn rope_tables(
    c: &LlamaConfig,
    start: usize,
    t: usize,
    kind: Kind,
    device: Device,
) -> (Tensor, Tensor) {
    let half = c.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| (1.0 / c.rope_theta.powf((2 * i) as f64 / c.head_dim as f64)) as f32)
        .collect();
    let inv = Tensor::from_slice(&inv).to_device(device);
    let pos = Tensor::arange_start(start as i64, (start + t) as i64, (Kind::Float, device));
    let freqs = pos.outer(&inv);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

/// `x ⊙ cos + rotate_half(x) ⊙ sin` over the last dimension (`rotate_half(x) = [−x₂, x₁]`).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    x * cos + Tensor::cat(&[&x2.neg(), &x1], -1) * sin
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let var = x.pow_tensor_scalar(2).mean_dim(-1, true, None);
    x * (var + eps).rsqrt() * w
}

/// The linear maps of block `l`, by GGUF prefix (`NAME.weight (out, in)`, no bias), in the
/// groups [`hidden_states_with`] asks for together: Q/K/V (one input), the attention output,
/// gate and up (one input), down.
pub fn layer_linear_groups(l: usize) -> [Vec<String>; 4] {
    let n = |s: &str| format!("blk.{l}.{s}");
    [
        vec![n("attn_q"), n("attn_k"), n("attn_v")],
        vec![n("attn_output")],
        vec![n("ffn_gate"), n("ffn_up")],
        vec![n("ffn_down")],
    ]
}

/// The output head's linear map: `token_embd` when the embeddings are tied, else `output`.
pub fn head_map(c: &LlamaConfig) -> &'static str {
    if c.tied_embeddings {
        "token_embd"
    } else {
        "output"
    }
}

/// Logits `(B, T, V)` of the next token after each of `ids` `(B, T)`, appending the positions
/// to `cache` (which must have room for them).
///
/// # Errors
/// [`ModelError::Config`] if the ids do not fit the cache or the context.
pub fn forward(
    c: &LlamaConfig,
    s: Checked<'_>,
    ids: &Tensor,
    cache: &mut KvCache,
) -> Result<Tensor, ModelError> {
    forward_with(c, s, ids, cache, local(s))
}

/// The plain linear maps of `s` (what [`forward`] uses).
fn local<'a>(
    s: Checked<'a>,
) -> impl FnMut(&Tensor, &[String]) -> Result<Vec<Tensor>, ModelError> + 'a {
    move |x: &Tensor, maps: &[String]| {
        Ok(maps
            .iter()
            .map(|n| x.linear::<&Tensor>(s.get(&format!("{n}.weight")), None))
            .collect())
    }
}

/// [`forward`] with every linear map (the blocks' and the head's) computed by `linear`, as
/// [`hidden_states_with`]; the embedding lookup, RMSNorm, RoPE, attention and SiLU run here.
///
/// # Errors
/// As [`forward`], and the first error `linear` returns.
pub fn forward_with<E: From<ModelError>>(
    c: &LlamaConfig,
    s: Checked<'_>,
    ids: &Tensor,
    cache: &mut KvCache,
    mut linear: impl FnMut(&Tensor, &[String]) -> Result<Vec<Tensor>, E>,
) -> Result<Tensor, E> {
    let hidden = hidden_states_with(c, s, ids, cache, &mut linear)?;
    Ok(first(linear(&hidden, &[head_map(c).to_owned()])?))
}

fn first(mut v: Vec<Tensor>) -> Tensor {
    assert_eq!(v.len(), 1, "`linear` must return one output per map");
    v.swap_remove(0)
}

/// The final hidden states `(B, T, d)` (after the output RMSNorm), as [`forward`].
///
/// # Errors
/// As [`forward`].
pub fn hidden_states(
    c: &LlamaConfig,
    s: Checked<'_>,
    ids: &Tensor,
    cache: &mut KvCache,
) -> Result<Tensor, ModelError> {
    hidden_states_with(c, s, ids, cache, local(s))
}

/// [`hidden_states`] with the blocks' linear maps computed by `linear`: called four times per
/// block (the groups of [`layer_linear_groups`]) with an input `(B, T, in)` and the maps'
/// names, it returns `x·Wᵀ` for each, `(B, T, out)`. This is how HSS-EE offloads the linear
/// algebra to two servers (`fedee-hss`); `s`'s block weights are then not read.
///
/// # Errors
/// As [`hidden_states`], and the first error `linear` returns.
pub fn hidden_states_with<E: From<ModelError>>(
    c: &LlamaConfig,
    s: Checked<'_>,
    ids: &Tensor,
    cache: &mut KvCache,
    mut linear: impl FnMut(&Tensor, &[String]) -> Result<Vec<Tensor>, E>,
) -> Result<Tensor, E> {
    let (b, t) = ids.size2().map_err(ModelError::Torch)?;
    let t_us = t as usize;
    if t_us == 0 || t_us > cache.remaining() || cache.len + t_us > c.max_position {
        return Err(ModelError::Config(format!(
            "{t} new positions after {} do not fit (cache room {}, context {})",
            cache.len,
            cache.remaining(),
            c.max_position
        ))
        .into());
    }
    let embd = s.get("token_embd.weight");
    let (kind, device) = (embd.kind(), embd.device());
    let mut x = Tensor::embedding(embd, ids, -1, false, false);
    let (cos, sin) = rope_tables(c, cache.len, t_us, kind, device);
    let (h, kv, hd) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
    let past = cache.len as i64;
    let total = past + t;
    // Causal mask over (new positions) × (all positions): only when a new position could see
    // a later one.
    let mask = (t > 1).then(|| {
        let q = Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(1);
        let k = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
        k.le_tensor(&q)
    });
    for l in 0..c.num_layers {
        let w = |n: &str| s.get(&format!("blk.{l}.{n}.weight"));
        let [qkv, attn_out, gate_up, down] = layer_linear_groups(l);
        let a = rms_norm(&x, w("attn_norm"), c.rms_norm_eps);
        let mut qkv = linear(&a, &qkv)?;
        assert_eq!(qkv.len(), 3, "`linear` must return one output per map");
        let (v, k, q) = (qkv.swap_remove(2), qkv.swap_remove(1), qkv.swap_remove(0));
        let q = q.view([b, t, h, hd]).transpose(1, 2);
        let k = k.view([b, t, kv, hd]).transpose(1, 2);
        let v = v.view([b, t, kv, hd]).transpose(1, 2);
        let (q, k) = (rope(&q, &cos, &sin), rope(&k, &cos, &sin));
        cache.k[l].narrow(2, past, t).copy_(&k);
        cache.v[l].narrow(2, past, t).copy_(&v);
        let keys = cache.k[l].narrow(2, 0, total);
        let values = cache.v[l].narrow(2, 0, total);
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &keys,
            &values,
            mask.as_ref(),
            0.0,
            false,
            None,
            kv != h,
        );
        let o = o.transpose(1, 2).reshape([b, t, h * hd]);
        // Not in place: autograd keeps `x` for RMSNorm's backward.
        x = x.g_add(&first(linear(&o, &attn_out)?));
        let f = rms_norm(&x, w("ffn_norm"), c.rms_norm_eps);
        let mut gu = linear(&f, &gate_up)?;
        assert_eq!(gu.len(), 2, "`linear` must return one output per map");
        let (up, gate) = (gu.swap_remove(1), gu.swap_remove(0));
        x = x.g_add(&first(linear(&(gate.silu() * up), &down)?));
    }
    cache.len += t_us;
    Ok(rms_norm(&x, s.get("output_norm.weight"), c.rms_norm_eps))
}

/// Logits `(B, T, V)` of the next token after each position of `ids` `(B, T)`, without a
/// cache (training and scoring; gradients flow).
///
/// # Errors
/// As [`forward`].
pub fn logits(c: &LlamaConfig, s: Checked<'_>, ids: &Tensor) -> Result<Tensor, ModelError> {
    let (b, t) = ids.size2().map_err(ModelError::Torch)?;
    let embd = s.get("token_embd.weight");
    let mut cache = KvCache::new(c, b as usize, t as usize, embd.kind(), embd.device());
    forward(c, s, ids, &mut cache)
}

/// The causal LM loss: mean cross-entropy of predicting `ids[:, t+1]` from `ids[:, ..=t]`
/// over the positions where `mask[:, t+1]` is 1 (`ids`, `mask`: `(B, T)` i64, each row of
/// `mask` ones then zeros, so no counted position sees padding), in the weights' dtype.
/// Hugging Face's `labels = input_ids` with padding ignored.
///
/// A vocabulary permutation π applied to `ids` (and to the embedding rows) leaves it
/// unchanged, so EE training under the `finetune` profile minimizes the same loss.
///
/// # Errors
/// As [`forward`]; [`ModelError::Config`] for a batch with fewer than 2 tokens in a row.
pub fn causal_lm_loss(
    c: &LlamaConfig,
    s: Checked<'_>,
    ids: &Tensor,
    mask: &Tensor,
) -> Result<Tensor, ModelError> {
    let t = ids.size().get(1).copied().unwrap_or(0);
    if t < 2 {
        return Err(ModelError::Config(format!(
            "a causal LM batch needs at least 2 tokens per row to have a target, got {t}"
        )));
    }
    let z = logits(c, s, &ids.narrow(1, 0, t - 1))?;
    let logp = z.log_softmax(-1, z.kind());
    let target = ids.narrow(1, 1, t - 1);
    let nll = -logp.gather(2, &target.unsqueeze(-1), false).squeeze_dim(-1);
    let weight = mask.narrow(1, 1, t - 1).to_kind(z.kind());
    let count = weight.sum(z.kind());
    if count.double_value(&[]) < 1.0 {
        return Err(ModelError::Config(
            "the batch has no target token (every row's mask ends after its first token)".into(),
        ));
    }
    Ok((nll * &weight).sum(z.kind()) / count)
}

/// Greedy decoding of one sequence: the prompt `ids` are prefilled, then up to `max_new`
/// tokens are appended, stopping after `stop`. Returns the new tokens and each step's logits
/// `(V,)` (prefill's last position first).
///
/// # Errors
/// As [`forward`].
pub fn greedy(
    c: &LlamaConfig,
    s: Checked<'_>,
    ids: &[i64],
    max_new: usize,
    stop: Option<i64>,
) -> Result<(Vec<i64>, Vec<Tensor>), ModelError> {
    greedy_with(c, s, ids, max_new, stop, local(s))
}

/// Why a [`Generation`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop id was produced (it is the last token).
    Stop,
    /// `max_new` tokens were produced, or the cache (the context) is full.
    Length,
}

impl Finish {
    /// OpenAI's name for it (`finish_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One autoregressive generation with a KV cache: the prompt is prefilled by the first
/// [`Generation::step_with`], then each call decodes the token chosen by the last one. Tokens
/// are drawn by a [`crate::sample::Sampler`], which is permutation-equivariant, so the same
/// loop runs on plaintext or EE ids (the caller gives the ids and stop ids in the model's
/// vocabulary). Used by the trainer's `Generate` and by HSS-EE at the key holder.
pub struct Generation {
    cache: KvCache,
    sampler: crate::sample::Sampler,
    input: Vec<i64>,
    produced: usize,
    max_new: usize,
    stop: Vec<i64>,
    device: Device,
}

impl Generation {
    /// A generation of up to `max_new` tokens after `prompt`, ending early at any of `stop`.
    /// The cache holds `prompt.len() + max_new` positions, at most the context.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an empty prompt, a prompt that leaves no room in the
    /// context, `max_new` = 0, or an invalid `sampling`.
    pub fn new(
        c: &LlamaConfig,
        prompt: Vec<i64>,
        max_new: usize,
        stop: Vec<i64>,
        sampling: crate::sample::Sampling,
        (kind, device): (Kind, Device),
    ) -> Result<Self, ModelError> {
        sampling.validate()?;
        if prompt.is_empty() || prompt.len() >= c.max_position {
            return Err(ModelError::Config(format!(
                "the prompt has {} tokens; it needs 1 to {} (the context is {})",
                prompt.len(),
                c.max_position - 1,
                c.max_position
            )));
        }
        if max_new == 0 {
            return Err(ModelError::Config("max_tokens must be at least 1".into()));
        }
        let capacity = (prompt.len() + max_new).min(c.max_position);
        Ok(Self {
            cache: KvCache::new(c, 1, capacity, kind, device),
            sampler: crate::sample::Sampler::new(sampling),
            input: prompt,
            produced: 0,
            max_new,
            stop,
            device,
        })
    }

    /// The next token, and why the generation ended if this is the last one (do not call
    /// again after that).
    ///
    /// # Errors
    /// As [`forward_with`], and [`ModelError::Config`] for NaN logits.
    pub fn step_with<E: From<ModelError>>(
        &mut self,
        c: &LlamaConfig,
        s: Checked<'_>,
        linear: impl FnMut(&Tensor, &[String]) -> Result<Vec<Tensor>, E>,
    ) -> Result<(i64, Option<Finish>), E> {
        let ids = Tensor::from_slice(&self.input)
            .unsqueeze(0)
            .to_device(self.device);
        let logits = forward_with(c, s, &ids, &mut self.cache, linear)?;
        let token = self.sampler.sample(&logits.get(0).get(-1))?;
        self.produced += 1;
        self.input = vec![token];
        let finish = if self.stop.contains(&token) {
            Some(Finish::Stop)
        } else if self.produced >= self.max_new || self.cache.remaining() == 0 {
            Some(Finish::Length)
        } else {
            None
        };
        Ok((token, finish))
    }

    /// [`Generation::step_with`] with `s`'s own linear maps.
    ///
    /// # Errors
    /// As [`Generation::step_with`].
    pub fn step(
        &mut self,
        c: &LlamaConfig,
        s: Checked<'_>,
    ) -> Result<(i64, Option<Finish>), ModelError> {
        self.step_with(c, s, local(s))
    }
}

/// [`greedy`] with every linear map computed by `linear` (as [`forward_with`]).
///
/// # Errors
/// As [`greedy`], and the first error `linear` returns.
pub fn greedy_with<E: From<ModelError>>(
    c: &LlamaConfig,
    s: Checked<'_>,
    ids: &[i64],
    max_new: usize,
    stop: Option<i64>,
    mut linear: impl FnMut(&Tensor, &[String]) -> Result<Vec<Tensor>, E>,
) -> Result<(Vec<i64>, Vec<Tensor>), E> {
    let embd = s.get("token_embd.weight");
    let mut cache = KvCache::new(c, 1, ids.len() + max_new, embd.kind(), embd.device());
    let (mut out, mut steps) = (Vec::new(), Vec::new());
    // The prompt first, then each token as it is chosen.
    let mut input = Tensor::from_slice(ids).unsqueeze(0);
    while out.len() < max_new {
        let logits = forward_with(c, s, &input, &mut cache, &mut linear)?;
        let last = logits.get(0).get(-1);
        let next = last.argmax(0, false).int64_value(&[]);
        steps.push(last);
        out.push(next);
        if Some(next) == stop {
            break;
        }
        input = Tensor::from_slice(&[next]).unsqueeze(0);
    }
    Ok((out, steps))
}
