//! A BERT encoder (post-LayerNorm, absolute positions, GELU; Devlin et al. 2019) in tch, with
//! mean pooling and a classification head, loading Hugging Face safetensors names directly.
//!
//! Shapes: `input_ids`, `attention_mask`: `(batch, seq)` int64; hidden states
//! `(batch, seq, hidden)`; pooled `(batch, hidden)`; logits `(batch, num_labels)`. Parameters
//! are f32 or f64 (all the same dtype).
//!
//! The EE key spec follows SECURITY.md ("The math", BERT): vocabulary permutation
//! `Π_V`, residual permutation `P` (the LayerNorm affine is on the residual path), per layer a
//! Q/K key and a V/O key that are block-diagonal per head with a shared head permutation, an
//! FFN permutation `P_f`, and the label permutation `Π_L`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::keyspec::{Heads, InputKind, KeyDecl, KeyGroup, KeyRef, KeySpec, StateDict};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::ModelError;
use crate::state::Checked;

/// BERT hyper-parameters, read from a Hugging Face `config.json` (other fields are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// Position table size (longest sequence).
    pub max_position_embeddings: usize,
    /// Token-type table size.
    pub type_vocab_size: usize,
    /// LayerNorm ε.
    pub layer_norm_eps: f64,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(flatten)]
    bert: BertConfig,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    position_embedding_type: Option<String>,
    #[serde(default)]
    model_type: Option<String>,
}

impl BertConfig {
    /// Read and check a Hugging Face `config.json`.
    ///
    /// # Errors
    /// [`ModelError::Config`] if the file is unreadable, not a BERT config, or uses features
    /// this encoder does not implement (non-GELU activation, relative positions).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Config(format!("cannot read {}: {e}", path.display())))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| {
            ModelError::Config(format!("{} is not a BERT config.json: {e}", path.display()))
        })?;
        if let Some(t) = hf.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(ModelError::Config(format!(
                "model_type `{t}` is not supported: use a BERT checkpoint"
            )));
        }
        if let Some(a) = hf.hidden_act.as_deref().filter(|a| *a != "gelu") {
            return Err(ModelError::Config(format!(
                "hidden_act `{a}` is not supported: this encoder implements gelu"
            )));
        }
        if let Some(p) = hf
            .position_embedding_type
            .as_deref()
            .filter(|p| *p != "absolute")
        {
            return Err(ModelError::Config(format!(
                "position_embedding_type `{p}` is not supported: use absolute"
            )));
        }
        hf.bert.validate()?;
        Ok(hf.bert)
    }

    /// # Errors
    /// [`ModelError::Config`] if a size is zero or heads do not divide the hidden size.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ModelError::Config(format!(
                "hidden_size {} must be a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.vocab_size == 0
            || self.intermediate_size == 0
            || self.max_position_embeddings == 0
            || self.type_vocab_size == 0
        {
            return Err(ModelError::Config(
                "vocab, intermediate, position and type sizes must be > 0".into(),
            ));
        }
        Ok(())
    }

    /// Expected encoder parameter shapes by Hugging Face name (no pooler).
    pub fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        let (v, h, i) = (
            self.vocab_size as i64,
            self.hidden_size as i64,
            self.intermediate_size as i64,
        );
        let mut m = BTreeMap::new();
        m.insert("embeddings.word_embeddings.weight".into(), vec![v, h]);
        m.insert(
            "embeddings.position_embeddings.weight".into(),
            vec![self.max_position_embeddings as i64, h],
        );
        m.insert(
            "embeddings.token_type_embeddings.weight".into(),
            vec![self.type_vocab_size as i64, h],
        );
        m.insert("embeddings.LayerNorm.weight".into(), vec![h]);
        m.insert("embeddings.LayerNorm.bias".into(), vec![h]);
        for l in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            for (name, shape) in [
                ("attention.self.query.weight", vec![h, h]),
                ("attention.self.query.bias", vec![h]),
                ("attention.self.key.weight", vec![h, h]),
                ("attention.self.key.bias", vec![h]),
                ("attention.self.value.weight", vec![h, h]),
                ("attention.self.value.bias", vec![h]),
                ("attention.output.dense.weight", vec![h, h]),
                ("attention.output.dense.bias", vec![h]),
                ("attention.output.LayerNorm.weight", vec![h]),
                ("attention.output.LayerNorm.bias", vec![h]),
                ("intermediate.dense.weight", vec![i, h]),
                ("intermediate.dense.bias", vec![i]),
                ("output.dense.weight", vec![h, i]),
                ("output.dense.bias", vec![h]),
                ("output.LayerNorm.weight", vec![h]),
                ("output.LayerNorm.bias", vec![h]),
            ] {
                m.insert(format!("{p}{name}"), shape);
            }
        }
        m
    }
}

/// A BERT encoder with mean pooling and a linear classification head
/// (`classifier.weight (num_labels, hidden)`, `classifier.bias (num_labels,)`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BertClassifierConfig {
    /// Encoder.
    pub bert: BertConfig,
    /// Classes.
    pub num_labels: usize,
}

/// Which keys an EE BERT gets (SECURITY.md, "The math": which groups training keeps exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Every key on trained parameters is a permutation: AdamW stays exact.
    Finetune,
    /// Adds general invertible per-head Q/K and V/O transforms: inference only.
    Inference,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "finetune" => Ok(Self::Finetune),
            "inference" => Ok(Self::Inference),
            _ => Err(format!("unknown profile `{s}`: use finetune or inference")),
        }
    }
}

impl BertClassifierConfig {
    /// Architecture name used in key specs and trainer jobs.
    pub const ARCHITECTURE: &'static str = "bert-classifier";

    /// # Errors
    /// [`ModelError::Config`] for an invalid encoder config or fewer than 2 labels.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.bert.validate()?;
        if self.num_labels < 2 {
            return Err(ModelError::Config(format!(
                "num_labels must be at least 2, got {}",
                self.num_labels
            )));
        }
        Ok(())
    }

    /// Check that `state` holds exactly the classifier's tensors (encoder and head) with
    /// their shapes; the forward passes of this module take the result.
    ///
    /// # Errors
    /// [`ModelError::Name`] or [`ModelError::Shape`] naming the tensor.
    pub fn check_state<'a>(&self, state: &'a StateDict) -> Result<Checked<'a>, ModelError> {
        Checked::new(&self.shapes(), state, Self::ARCHITECTURE)
    }

    /// Parameter shapes: the encoder's and the head's.
    pub fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        let mut m = self.bert.shapes();
        m.insert(
            "classifier.weight".into(),
            vec![self.num_labels as i64, self.bert.hidden_size as i64],
        );
        m.insert("classifier.bias".into(), vec![self.num_labels as i64]);
        m
    }

    /// The key spec (one for both profiles; the profile picks groups, see [`Self::key_groups`]).
    pub fn key_spec(&self) -> KeySpec {
        let c = &self.bert;
        let decl = |dim: usize, allowed: Vec<KeyGroup>, why: &str, heads: Option<Heads>| KeyDecl {
            heads,
            ..KeyDecl::new(dim, allowed, why)
        };
        let mut keys = BTreeMap::new();
        keys.insert(
            "vocab".to_owned(),
            decl(
                c.vocab_size,
                vec![KeyGroup::Permutation],
                "token ids are indices",
                None,
            ),
        );
        keys.insert(
            "residual".to_owned(),
            decl(
                c.hidden_size,
                vec![KeyGroup::Permutation],
                "post-LN: the LayerNorm affine is on the residual path",
                None,
            ),
        );
        keys.insert(
            "label".to_owned(),
            decl(
                self.num_labels,
                vec![KeyGroup::Permutation],
                "softmax and cross-entropy commute with permutations only",
                None,
            ),
        );
        let attn = vec![
            KeyGroup::Permutation,
            KeyGroup::SignedPermutation,
            KeyGroup::Orthogonal,
            KeyGroup::Invertible,
        ];
        let k = |n: &str| Some(KeyRef::new(n));
        let d = |n: &str| Some(KeyRef::dual(n));
        let mut params = BTreeMap::new();
        params.insert(
            "embeddings.word_embeddings.weight".to_owned(),
            vec![d("vocab"), d("residual")],
        );
        params.insert(
            "embeddings.position_embeddings.weight".to_owned(),
            vec![None, d("residual")],
        );
        params.insert(
            "embeddings.token_type_embeddings.weight".to_owned(),
            vec![None, d("residual")],
        );
        params.insert(
            "embeddings.LayerNorm.weight".to_owned(),
            vec![k("residual")],
        );
        params.insert("embeddings.LayerNorm.bias".to_owned(), vec![k("residual")]);
        for l in 0..c.num_hidden_layers {
            let (qk, vo, ffn) = (format!("qk{l}"), format!("vo{l}"), format!("ffn{l}"));
            let heads = Some(Heads::new(c.num_attention_heads, &format!("layer{l}")));
            keys.insert(
                qk.clone(),
                decl(
                    c.hidden_size,
                    attn.clone(),
                    "scores depend on q·k only",
                    heads.clone(),
                ),
            );
            keys.insert(
                vo.clone(),
                decl(
                    c.hidden_size,
                    attn.clone(),
                    "attention mixes values linearly per head",
                    heads,
                ),
            );
            keys.insert(
                ffn.clone(),
                decl(
                    c.intermediate_size,
                    vec![KeyGroup::Permutation],
                    "GELU commutes with permutations only",
                    None,
                ),
            );
            let p = format!("encoder.layer.{l}.");
            let mut add = |n: &str, axes: Vec<Option<KeyRef>>| {
                params.insert(format!("{p}{n}"), axes);
            };
            add("attention.self.query.weight", vec![k(&qk), k("residual")]);
            add("attention.self.query.bias", vec![k(&qk)]);
            add("attention.self.key.weight", vec![d(&qk), k("residual")]);
            add("attention.self.key.bias", vec![d(&qk)]);
            add("attention.self.value.weight", vec![k(&vo), k("residual")]);
            add("attention.self.value.bias", vec![k(&vo)]);
            add("attention.output.dense.weight", vec![k("residual"), k(&vo)]);
            add("attention.output.dense.bias", vec![k("residual")]);
            add("attention.output.LayerNorm.weight", vec![k("residual")]);
            add("attention.output.LayerNorm.bias", vec![k("residual")]);
            add("intermediate.dense.weight", vec![k(&ffn), k("residual")]);
            add("intermediate.dense.bias", vec![k(&ffn)]);
            add("output.dense.weight", vec![k("residual"), k(&ffn)]);
            add("output.dense.bias", vec![k("residual")]);
            add("output.LayerNorm.weight", vec![k("residual")]);
            add("output.LayerNorm.bias", vec![k("residual")]);
        }
        params.insert(
            "classifier.weight".to_owned(),
            vec![k("label"), k("residual")],
        );
        params.insert("classifier.bias".to_owned(), vec![k("label")]);
        KeySpec {
            architecture: Self::ARCHITECTURE.into(),
            keys,
            params,
            input: "vocab".into(),
            input_kind: InputKind::TokenIds,
            output: "label".into(),
            input_layer: None,
        }
    }

    /// Key groups for a profile, to pass to `KeySet::generate`.
    pub fn key_groups(&self, profile: Profile) -> BTreeMap<String, KeyGroup> {
        match profile {
            Profile::Finetune => BTreeMap::new(),
            Profile::Inference => (0..self.bert.num_hidden_layers)
                .flat_map(|l| [format!("qk{l}"), format!("vo{l}")])
                .map(|n| (n, KeyGroup::Invertible))
                .collect(),
        }
    }

    /// A fresh classification head (`N(0, 0.02²)` weights, zero bias, as BERT initialises),
    /// of dtype `kind`. Call `tch::manual_seed` first for reproducibility.
    pub fn init_head(&self, kind: Kind) -> StateDict {
        let (l, h) = (self.num_labels as i64, self.bert.hidden_size as i64);
        let mut s = StateDict::new();
        s.insert(
            "classifier.weight".into(),
            Tensor::randn([l, h], (kind, Device::Cpu)) * 0.02,
        );
        s.insert(
            "classifier.bias".into(),
            Tensor::zeros([l], (kind, Device::Cpu)),
        );
        s
    }

    /// Random parameters for the whole classifier (for tests and synthetic benchmarks):
    /// `N(0, 0.02²)` everywhere except LayerNorm γ = 1.
    pub fn init_random(&self, kind: Kind) -> StateDict {
        self.shapes()
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.ends_with("LayerNorm.weight") {
                    Tensor::ones(&shape, (kind, Device::Cpu))
                } else {
                    Tensor::randn(&shape, (kind, Device::Cpu)) * 0.02
                };
                (name, t)
            })
            .collect()
    }
}

/// Load a Hugging Face BERT checkpoint (safetensors) for `cfg`: every encoder tensor checked
/// by name and shape. A `bert.` prefix is stripped; the pooler, buffers such as
/// `embeddings.position_ids`, and heads of other tasks are ignored.
///
/// # Errors
/// [`ModelError::Name`] for a missing tensor, [`ModelError::Shape`] naming tensor, expected
/// and found shape, or IO/format errors.
pub fn load_pretrained(
    path: &Path,
    cfg: &BertConfig,
    device: Device,
) -> Result<StateDict, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    let all = crate::io::tensors_from_safetensors(&bytes, device)?;
    let mut out = StateDict::new();
    for (name, expected) in cfg.shapes() {
        let t = all
            .get(&name)
            .or_else(|| all.get(&format!("bert.{name}")))
            .ok_or_else(|| ModelError::Name {
                name: name.clone(),
                problem: format!("is missing from {}", path.display()),
            })?;
        if t.size() != expected {
            return Err(ModelError::Shape {
                name,
                expected,
                found: t.size(),
            });
        }
        out.insert(name, t.shallow_clone());
    }
    Ok(out)
}

fn p<'a>(state: Checked<'a>, name: &str) -> &'a Tensor {
    state.get(name)
}

/// Last hidden states `(batch, seq, hidden)` for `ids`, `mask`: `(batch, seq)` int64.
/// Token types are all 0. No dropout (exact, as EE tests require). `state` is a classifier
/// state checked by [`BertClassifierConfig::check_state`] (its encoder tensors are read);
/// the forwards below take the same.
pub fn encode(cfg: &BertConfig, state: Checked<'_>, ids: &Tensor, mask: &Tensor) -> Tensor {
    encode_layers(cfg, state, ids, mask)
        .pop()
        .expect("at least the embedding output")
}

/// Every hidden state `(batch, seq, hidden)`: the embeddings' LayerNorm output, then each
/// layer's output (`num_hidden_layers + 1` tensors; the last is [`encode`]'s). What a server
/// running the model observes.
pub fn encode_layers(
    cfg: &BertConfig,
    state: Checked<'_>,
    ids: &Tensor,
    mask: &Tensor,
) -> Vec<Tensor> {
    encode_embedded(cfg, state, &embed(cfg, state, ids), mask)
}

/// The embedding layer alone: `LayerNorm(word + position + token type)`, `(batch, seq,
/// hidden)` for `ids (batch, seq)` int64. With client-side embeddings the key holder runs this
/// on its own EE model and sends the result instead of token ids (positions are added here,
/// so the client may then shuffle token order).
pub fn embed(cfg: &BertConfig, state: Checked<'_>, ids: &Tensor) -> Tensor {
    let t = ids.size()[1];
    let h = cfg.hidden_size as i64;
    let dev = ids.device();
    let words = Tensor::embedding(
        p(state, "embeddings.word_embeddings.weight"),
        ids,
        -1,
        false,
        false,
    );
    let pos = Tensor::arange(t, (Kind::Int64, dev));
    let positions = Tensor::embedding(
        p(state, "embeddings.position_embeddings.weight"),
        &pos,
        -1,
        false,
        false,
    );
    let types = p(state, "embeddings.token_type_embeddings.weight").get(0);
    (words + positions.unsqueeze(0) + types).layer_norm(
        [h],
        Some(p(state, "embeddings.LayerNorm.weight")),
        Some(p(state, "embeddings.LayerNorm.bias")),
        cfg.layer_norm_eps,
        false,
    )
}

/// The encoder layers on embedded input `x (batch, seq, hidden)` (from [`embed`]) with
/// `mask (batch, seq)`: every hidden state, as [`encode_layers`]. Without a causal mask the
/// layers are equivariant to reordering the tokens (with their mask entries).
pub fn encode_embedded(
    cfg: &BertConfig,
    state: Checked<'_>,
    x: &Tensor,
    mask: &Tensor,
) -> Vec<Tensor> {
    let local = |x: &Tensor, maps: &[String]| -> Result<Vec<Tensor>, std::convert::Infallible> {
        Ok(maps
            .iter()
            .map(|n| {
                x.linear(
                    p(state, &format!("{n}.weight")),
                    Some(p(state, &format!("{n}.bias"))),
                )
            })
            .collect())
    };
    match encode_embedded_with(cfg, state, x, mask, local) {
        Ok(out) => out,
        Err(never) => match never {},
    }
}

/// The linear maps of encoder layer `l`, by Hugging Face prefix (`NAME.weight (out, in)`,
/// `NAME.bias (out,)`), in the groups [`encode_embedded_with`] asks for together: the
/// Q/K/V projections (one input), the attention output, the FFN in, the FFN out.
pub fn layer_linear_groups(l: usize) -> [Vec<String>; 4] {
    let pre = format!("encoder.layer.{l}.");
    let n = |s: &str| format!("{pre}{s}");
    [
        vec![
            n("attention.self.query"),
            n("attention.self.key"),
            n("attention.self.value"),
        ],
        vec![n("attention.output.dense")],
        vec![n("intermediate.dense")],
        vec![n("output.dense")],
    ]
}

/// [`encode_embedded`] with the encoder's linear maps computed by `linear`: called four times
/// per layer (the groups of [`layer_linear_groups`]) with an input `(batch, seq, in)` and the
/// maps' names, it returns `x·Wᵀ + b` for each, `(batch, seq, out)`. Attention, residuals,
/// LayerNorm and GELU run here, on `state`'s tensors (its linear weights are not read).
/// This is how HSS-EE offloads the linear algebra to two servers (`fedee-hss`).
///
/// # Errors
/// The first error `linear` returns.
pub fn encode_embedded_with<E>(
    cfg: &BertConfig,
    state: Checked<'_>,
    x: &Tensor,
    mask: &Tensor,
    mut linear: impl FnMut(&Tensor, &[String]) -> Result<Vec<Tensor>, E>,
) -> Result<Vec<Tensor>, E> {
    let (b, t) = (x.size()[0], x.size()[1]);
    let h = cfg.hidden_size as i64;
    let (nh, hd) = (
        cfg.num_attention_heads as i64,
        (cfg.hidden_size / cfg.num_attention_heads) as i64,
    );
    let kind = x.kind();
    let ln = |x: &Tensor, prefix: &str| {
        x.layer_norm(
            [h],
            Some(p(state, &format!("{prefix}.weight"))),
            Some(p(state, &format!("{prefix}.bias"))),
            cfg.layer_norm_eps,
            false,
        )
    };
    let mut x = x.shallow_clone();
    let min = if kind == Kind::Double {
        f64::MIN
    } else {
        f64::from(f32::MIN)
    };
    let ext: Tensor = (mask.to_kind(kind).neg() + 1.0) * min;
    let ext = ext.view([b, 1, 1, t]);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = Vec::with_capacity(cfg.num_hidden_layers + 1);
    for l in 0..cfg.num_hidden_layers {
        out.push(x.shallow_clone());
        let pre = format!("encoder.layer.{l}.");
        let [qkv, attn_out, ffn_in, ffn_out] = layer_linear_groups(l);
        let heads = |x: &Tensor| x.view([b, t, nh, hd]).transpose(1, 2);
        let mut qkv = linear(&x, &qkv)?;
        assert_eq!(qkv.len(), 3, "`linear` must return one output per map");
        let (v, k, q) = (qkv.swap_remove(2), qkv.swap_remove(1), qkv.swap_remove(0));
        let (q, k, v) = (heads(&q), heads(&k), heads(&v));
        let scores = q.matmul(&k.transpose(-1, -2)) * scale + &ext;
        let ctx = scores
            .softmax(-1, kind)
            .matmul(&v)
            .transpose(1, 2)
            .contiguous()
            .view([b, t, h]);
        x = ln(
            &(first(linear(&ctx, &attn_out)?) + &x),
            &format!("{pre}attention.output.LayerNorm"),
        );
        let inter = first(linear(&x, &ffn_in)?).gelu("none");
        x = ln(
            &(first(linear(&inter, &ffn_out)?) + &x),
            &format!("{pre}output.LayerNorm"),
        );
    }
    out.push(x);
    Ok(out)
}

fn first(mut outputs: Vec<Tensor>) -> Tensor {
    assert_eq!(outputs.len(), 1, "`linear` must return one output per map");
    outputs.swap_remove(0)
}

/// Mean of `hidden (batch, seq, hidden)` over unmasked positions: `(batch, hidden)`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(hidden.kind()).unsqueeze(-1);
    (hidden * &m).sum_dim_intlist(1, false, hidden.kind())
        / m.sum_dim_intlist(1, false, hidden.kind()).clamp_min(1e-9)
}

/// Logits `(batch, num_labels)` of the classifier.
pub fn classify(
    cfg: &BertClassifierConfig,
    state: Checked<'_>,
    ids: &Tensor,
    mask: &Tensor,
) -> Tensor {
    classify_embedded(cfg, state, &embed(&cfg.bert, state, ids), mask)
}

/// Logits `(batch, num_labels)` from client-side embeddings `x (batch, seq, hidden)` (the
/// output of [`embed`], token order possibly shuffled together with `mask (batch, seq)`):
/// the encoder layers, mean pooling and the head. Equal to [`classify`] on the unshuffled
/// ids up to float rounding (mean pooling and attention without a causal mask ignore order).
pub fn classify_embedded(
    cfg: &BertClassifierConfig,
    state: Checked<'_>,
    x: &Tensor,
    mask: &Tensor,
) -> Tensor {
    let h = encode_embedded(&cfg.bert, state, x, mask)
        .pop()
        .expect("encode_embedded returns the hidden states");
    head(state, &h, mask)
}

/// The classification head on the last hidden states `(batch, seq, hidden)`: mean pooling,
/// then the linear head: logits `(batch, num_labels)`.
pub fn head(state: Checked<'_>, hidden: &Tensor, mask: &Tensor) -> Tensor {
    mean_pool(hidden, mask).linear(
        p(state, "classifier.weight"),
        Some(p(state, "classifier.bias")),
    )
}

/// Client side of token-order shuffling: embed EE token ids `ids (batch, seq)` int64 with
/// the EE model's embedding layer (`ee` needs only the `embeddings.*` tensors), then shuffle
/// every sequence's positions with `rng`, moving the mask entries along. Returns
/// `(x (batch, seq, hidden), mask (batch, seq))` for [`crate::Input::Embedded`].
///
/// # Security
/// The server then receives vectors instead of token ids and no position order: it cannot
/// read ids directly, nor use bigram statistics. Equal tokens still give equal vectors up to
/// their position embedding, and with a public base model the vectors can be matched to the
/// public embedding table once the residual key is known (SECURITY.md, attack 1); this
/// defence only helps with private base weights. Cost: `4 × hidden + 8` bytes per token on
/// the wire instead of 16, and the client keeps the embedding tables.
pub fn embed_and_shuffle<R: rand::Rng + ?Sized>(
    cfg: &BertConfig,
    ee: Checked<'_>,
    ids: &Tensor,
    mask: &Tensor,
    rng: &mut R,
) -> (Tensor, Tensor) {
    use rand::seq::SliceRandom;
    let x = embed(cfg, ee, ids);
    let (b, len) = (ids.size()[0], ids.size()[1]);
    let mut order = Vec::with_capacity((b * len) as usize);
    for _ in 0..b {
        let mut o: Vec<i64> = (0..len).collect();
        o.shuffle(rng);
        order.extend(o);
    }
    let order = Tensor::from_slice(&order)
        .view([b, len])
        .to_device(ids.device());
    let xs = x.gather(
        1,
        &order.unsqueeze(-1).expand([b, len, x.size()[2]], false),
        false,
    );
    (xs, mask.gather(1, &order, false))
}
