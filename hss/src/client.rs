//! The HSS-EE client: shares activations, asks both servers in one round trip, adds and
//! decodes their answers, and runs everything nonlinear itself.
//!
//! Per BERT layer four round trips (Q/K/V together, attention output, FFN in, FFN out): for
//! MiniLM-L6 at 128 tokens 24 round trips and about 59 MB (`8·rows·(in + 2·Σ out)` bytes per
//! round trip; server 0's upload is a 32-byte seed).

use std::collections::BTreeMap;
use std::time::Duration;

use fedee_model::llama::{self, LlamaConfig};
use fedee_model::{BertClassifierConfig, Checked, StateDict, bert};
use tch::{Kind, Tensor};

use crate::ring::{QuantLinear, decode};
use crate::server::{HssModel, LinearRequest, Share, quantize_state};
use crate::share::Sharer;
use crate::{HssError, Result};

/// Default activation scale exponent `f` (lowered per request when the inputs are large).
pub const DEFAULT_FRAC_BITS: u32 = 24;

/// The two servers, one round trip at a time.
pub trait Servers {
    /// Send `requests[i]` to server `i` (concurrently) and return each server's outputs.
    ///
    /// # Errors
    /// A server refusing the request or the transport failing.
    fn round_trip(&mut self, requests: [LinearRequest; 2]) -> Result<[Vec<Vec<u64>>; 2]>;
}

/// Both servers in this process (tests), optionally recording what each receives.
pub struct InProcess<'a> {
    /// Server 0 and server 1.
    pub servers: [&'a HssModel; 2],
    /// Every request each server received, when recording.
    pub views: Option<[Vec<LinearRequest>; 2]>,
}

impl<'a> InProcess<'a> {
    /// Two servers; `record` keeps their views.
    pub fn new(servers: [&'a HssModel; 2], record: bool) -> Self {
        Self {
            servers,
            views: record.then(|| [Vec::new(), Vec::new()]),
        }
    }
}

impl Servers for InProcess<'_> {
    fn round_trip(&mut self, requests: [LinearRequest; 2]) -> Result<[Vec<Vec<u64>>; 2]> {
        // One after the other (libtorch tensors are not `Sync`); real servers run in parallel.
        let [s0, s1] = self.servers;
        let (a, b) = (s0.linear(&requests[0]), s1.linear(&requests[1]));
        if let Some(v) = &mut self.views {
            let [r0, r1] = requests;
            v[0].push(r0);
            v[1].push(r1);
        }
        Ok([a?, b?])
    }
}

/// What crossed the wire: payload bytes (share words, seeds, output words) and round trips.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Round trips (each reaches both servers).
    pub round_trips: u64,
    /// Bytes sent to the servers.
    pub bytes_up: u64,
    /// Bytes received from them.
    pub bytes_down: u64,
}

/// The client side of HSS-EE over `S`.
pub struct HssClient<S> {
    servers: S,
    maps: BTreeMap<String, QuantLinear>,
    sharer: Sharer,
    /// Activation scale exponent wanted (lowered per request if the inputs need it).
    pub frac_bits: u32,
    /// Delay added before each round trip (simulates network latency; zero by default).
    pub added_rtt: Duration,
    /// Traffic so far.
    pub traffic: Traffic,
}

impl<S: Servers> HssClient<S> {
    /// A client for the EE model whose offloaded linear maps are `maps` (the same state the
    /// servers loaded, quantized here the same way).
    ///
    /// # Errors
    /// As [`quantize_state`].
    pub fn new(servers: S, offloaded: &StateDict) -> Result<Self> {
        Ok(Self::with_maps(servers, quantize_state(offloaded)?))
    }

    /// A client for maps already quantized with [`quantize_state`].
    pub fn with_maps(servers: S, maps: BTreeMap<String, QuantLinear>) -> Self {
        Self {
            servers,
            maps,
            sharer: Sharer::new(),
            frac_bits: DEFAULT_FRAC_BITS,
            added_rtt: Duration::ZERO,
            traffic: Traffic::default(),
        }
    }

    /// Draw share seeds from `sharer` instead of a fresh OS-seeded one.
    pub fn with_sharer(mut self, sharer: Sharer) -> Self {
        self.sharer = sharer;
        self
    }

    /// Each map's per-row weight scale, as the client quantized it: must equal the servers'
    /// [`HssModel::weight_frac_bits`], or they hold another model.
    pub fn weight_frac_bits(&self) -> BTreeMap<String, Vec<u32>> {
        weight_frac_bits(&self.maps)
    }

    /// The transport (e.g. to read the servers' recorded views).
    pub fn servers(&self) -> &S {
        &self.servers
    }

    /// `x·Wᵀ + b` for each map in `maps`, computed by the two servers on shares of `x (…,
    /// in)`: one tensor `(…, out)` per map, of `x`'s dtype.
    ///
    /// # Errors
    /// [`HssError::Invalid`] for an unknown map or mismatched widths; [`HssError::Range`] for
    /// non-finite activations or ones too large for the ring; the servers' errors.
    pub fn linears(&mut self, x: &Tensor, maps: &[String]) -> Result<Vec<Tensor>> {
        let size = x.size();
        let cols = *size
            .last()
            .ok_or_else(|| HssError::Invalid("a 0-d input".into()))? as usize;
        let qs = maps
            .iter()
            .map(|n| {
                self.maps.get(n).filter(|q| q.inp == cols).ok_or_else(|| {
                    HssError::Invalid(format!(
                        "no linear map `{n}` with {cols} inputs in the offloaded model"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Encoding and decoding run as libtorch ops (vectorized), not element by element.
        let xd = x.to_kind(Kind::Double).contiguous().view([-1]);
        if xd.numel() == 0 {
            return Err(HssError::Invalid("an empty activation".into()));
        }
        let rows = xd.numel() / cols.max(1);
        let max_abs = f64::try_from(xd.f_abs()?.f_max()?)?;
        if !max_abs.is_finite() {
            return Err(HssError::Range("a non-finite activation".into()));
        }
        let f = qs
            .iter()
            .map(|q| q.safe_frac_bits(max_abs, self.frac_bits))
            .min()
            .flatten()
            .ok_or_else(|| {
                HssError::Range(format!(
                    "activations up to {max_abs} overflow the ring even at scale 2^0"
                ))
            })?;
        // x̃ = round(x·2^f): |x̃| < 2^61 by `safe_frac_bits`, so the i64 conversion is exact.
        let encoded: Vec<u64> =
            Vec::<i64>::try_from((xd * (f as f64).exp2()).round().to_kind(Kind::Int64))?
                .into_iter()
                .map(|v| v as u64)
                .collect();
        let (seed, words) = self.sharer.share(&encoded);
        self.traffic.round_trips += 1;
        self.traffic.bytes_up += 32 + 8 * words.len() as u64;
        let req = |share| LinearRequest {
            maps: maps.to_vec(),
            rows,
            cols,
            frac_bits: f,
            share,
        };
        let requests = [req(Share::Seed(seed)), req(Share::Words(words))];
        if !self.added_rtt.is_zero() {
            std::thread::sleep(self.added_rtt);
        }
        let [y0, y1] = self.servers.round_trip(requests)?;
        if y0.len() != maps.len() || y1.len() != maps.len() {
            return Err(HssError::Invalid(format!(
                "the servers answered {} and {} outputs for {} maps",
                y0.len(),
                y1.len(),
                maps.len()
            )));
        }
        let mut out = Vec::with_capacity(maps.len());
        for ((q, a), b) in qs.iter().zip(&y0).zip(&y1) {
            if a.len() != rows * q.out || b.len() != rows * q.out {
                return Err(HssError::Invalid(format!(
                    "a server answered {} or {} words for ({rows}, {})",
                    a.len(),
                    b.len(),
                    q.out
                )));
            }
            self.traffic.bytes_down += 16 * (rows * q.out) as u64;
            // Decode at 2^(f + f_wⱼ) per output column.
            let inv: Vec<f64> = q.frac_bits.iter().map(|fw| decode(1, f + fw)).collect();
            let y: Vec<i64> = a
                .iter()
                .zip(b)
                .map(|(a, b)| a.wrapping_add(*b) as i64)
                .collect();
            let y = Tensor::from_slice(&y)
                .to_kind(Kind::Double)
                .view([rows as i64, q.out as i64])
                * Tensor::from_slice(&inv);
            let mut shape = size.clone();
            *shape.last_mut().expect("checked non-empty") = q.out as i64;
            out.push(y.view(&shape[..]).to_kind(x.kind()));
        }
        Ok(out)
    }
}

/// Each map's per-row weight scale exponents, by name: what client and servers compare.
pub fn weight_frac_bits(maps: &BTreeMap<String, QuantLinear>) -> BTreeMap<String, Vec<u32>> {
    maps.iter()
        .map(|(n, q)| (n.clone(), q.frac_bits.clone()))
        .collect()
}

/// The encoder linear maps of a BERT classifier that HSS-EE offloads, by prefix.
pub fn bert_linear_maps(cfg: &BertClassifierConfig) -> Vec<String> {
    (0..cfg.bert.num_hidden_layers)
        .flat_map(bert::layer_linear_groups)
        .flatten()
        .collect()
}

/// The linear maps of a Llama-family causal LM that HSS-EE offloads: every block's Q/K/V,
/// attention output, gate, up and down projections, and the output head (the tied embedding
/// table when the embeddings are tied).
pub fn llama_linear_maps(c: &LlamaConfig) -> Vec<String> {
    (0..c.num_layers)
        .flat_map(llama::layer_linear_groups)
        .flatten()
        .chain([llama::head_map(c).to_owned()])
        .collect()
}

/// The part of an EE state the servers receive: the weights and biases of `maps`.
pub fn offloaded(maps: &[String], ee: &StateDict) -> StateDict {
    maps.iter()
        .flat_map(|m| [format!("{m}.weight"), format!("{m}.bias")])
        .filter_map(|n| ee.get(&n).map(|t| (n, t.shallow_clone())))
        .collect()
}

/// The part of an EE classifier state the servers receive: the weights and biases of
/// [`bert_linear_maps`].
pub fn offloaded_state(cfg: &BertClassifierConfig, ee: &StateDict) -> StateDict {
    offloaded(&bert_linear_maps(cfg), ee)
}

/// Greedy decoding of an EE causal LM through HSS-EE: prefill the encrypted prompt ids, then
/// up to `max_new` decode steps with a key/value cache here, every linear map (the head
/// included) at the two servers; RMSNorm, RoPE, attention and SiLU here. Returns the
/// encrypted ids and each step's encrypted logits `(vocab,)`, as `llama::greedy`.
///
/// # Errors
/// As [`HssClient::linears`]; a prompt that does not fit the context.
pub fn lm_greedy<S: Servers>(
    client: &mut HssClient<S>,
    c: &LlamaConfig,
    ee: Checked<'_>,
    prompt: &[i64],
    max_new: usize,
    stop: Option<i64>,
) -> Result<(Vec<i64>, Vec<Tensor>)> {
    llama::greedy_with(c, ee, prompt, max_new, stop, |x, maps| {
        client.linears(x, maps)
    })
}

/// EE logits `(batch, num_labels)` of a BERT classifier for EE token ids `ids (batch, seq)`
/// and `mask (batch, seq)` int64: embeddings, attention, LayerNorm, GELU and the head here on
/// `ee` (the client's copy of the EE model), every encoder linear map at the two servers.
///
/// # Errors
/// As [`HssClient::linears`].
pub fn classify<S: Servers>(
    client: &mut HssClient<S>,
    cfg: &BertClassifierConfig,
    ee: Checked<'_>,
    ids: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let x = bert::embed(&cfg.bert, ee, ids);
    let hidden =
        bert::encode_embedded_with(&cfg.bert, ee, &x, mask, |x, maps| client.linears(x, maps))?
            .pop()
            .expect("the encoder returns its hidden states");
    Ok(bert::head(ee, &hidden, mask))
}
