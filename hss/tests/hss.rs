//! HSS-EE in one process: exact share products, correctness against plain EE and the
//! plaintext model, the source document's scheme shown wrong, and each server's view tested
//! uniform (with negative controls that the same tests must catch).

use fedee_encrypt::{KeySet, decrypt_outputs, encrypt_token_ids, transform_state};
use fedee_hss::client::{HssClient, InProcess, classify, offloaded_state};
use fedee_hss::engine::{Engine, Prepared};
use fedee_hss::ring::QuantLinear;
use fedee_hss::server::{HssModel, LinearRequest, Share};
use fedee_hss::share::{expand, share_with_seed};
use fedee_model::{BertClassifierConfig, BertConfig, Profile, StateDict, bert};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use statrs::distribution::{ChiSquared, Univariate};
use tch::{Device, Kind, Tensor};

fn cfg() -> BertClassifierConfig {
    BertClassifierConfig {
        bert: BertConfig {
            vocab_size: 120,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            max_position_embeddings: 24,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        },
        num_labels: 3,
    }
}

/// A random classifier with weights of standard deviation 0.2 (LayerNorm γ = 1).
fn plaintext(seed: i64) -> StateDict {
    tch::manual_seed(seed);
    cfg()
        .init_random(Kind::Float)
        .into_iter()
        .map(|(n, t)| {
            let t = if n.ends_with("LayerNorm.weight") {
                t
            } else {
                t * 10.0
            };
            (n, t)
        })
        .collect()
}

fn ids(seed: u64, batch: i64, len: i64) -> (Tensor, Tensor) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let v: Vec<i64> = (0..batch * len).map(|_| rng.random_range(0..120)).collect();
    let mut m = vec![1i64; (batch * len) as usize];
    // Padding at the end of every other sequence.
    for b in (1..batch).step_by(2) {
        for t in len - 3..len {
            m[(b * len + t) as usize] = 0;
        }
    }
    (
        Tensor::from_slice(&v).view([batch, len]),
        Tensor::from_slice(&m).view([batch, len]),
    )
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn argmax(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.argmax(-1, false)).unwrap()
}

struct Keyed {
    keys: KeySet,
    ee: StateDict,
}

fn keyed(plain: &StateDict, profile: Profile, seed: u64) -> Keyed {
    let c = cfg();
    let spec = c.key_spec();
    let keys = KeySet::generate(
        &spec,
        &c.key_groups(profile),
        false,
        &mut ChaCha20Rng::seed_from_u64(seed),
    )
    .unwrap();
    let ee = transform_state(&spec, &keys, plain).unwrap();
    Keyed { keys, ee }
}

/// The engines' products equal the element-by-element `wrapping_mul` / `wrapping_add`
/// reference bit for bit, on uniform share words (every limb full) and on the extreme words
/// and weights; int64 both through its small-row kernel (`ring_product`, up to `SMALL_ROWS`
/// rows) and through libtorch's GEMM (more rows).
#[test]
fn engines_are_exact_in_the_ring() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    assert_eq!(fedee_hss::engine::SMALL_ROWS, 16);
    for (out, inp, rows) in [
        (7usize, 384usize, 5usize),
        (33, 1536, 3),
        (4, 1, 2),
        (5, 3072, 2),
        (19, 77, 1),
        (6, 100, 16),
        (6, 100, 17),
        (9, 384, 40),
    ] {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| rng.random_range(-3.0f32..3.0) * if i % 7 == 0 { 100.0 } else { 1.0 })
            .collect();
        let b: Vec<f32> = (0..out).map(|_| rng.random_range(-50.0f32..50.0)).collect();
        let q = QuantLinear::new(&w, out, inp, Some(&b)).unwrap();
        let mut x: Vec<u64> = (0..rows * inp).map(|_| rng.next_u64()).collect();
        x[0] = u64::MAX;
        let second = 1 % x.len();
        x[second] = 1 << 63;
        let want = q.reference(&x, rows, Some(20));
        for engine in [Engine::Limbs(Device::Cpu), Engine::Int64] {
            let got = Prepared::new(q.clone(), engine)
                .apply(&x, rows, Some(20))
                .unwrap();
            assert_eq!(got, want, "{engine:?} at ({rows}, {inp}) × ({inp}, {out})");
        }
        // Without the bias too (server 1).
        let want = q.reference(&x, rows, None);
        let got = Prepared::new(q.clone(), Engine::Limbs(Device::Cpu))
            .apply(&x, rows, None)
            .unwrap();
        assert_eq!(got, want);
    }
    // Largest weights: every row at ±(2^15 − 1) after quantization.
    let q = QuantLinear::new(&[1.0, -1.0, 1.0, -1.0], 2, 2, None).unwrap();
    assert!(
        q.weight
            .iter()
            .all(|w| w.abs() == 32767 || w.abs() == 16384)
    );
    let x = vec![u64::MAX, 1 << 63, (1 << 63) - 1, 12345];
    assert_eq!(
        Prepared::new(q.clone(), Engine::Limbs(Device::Cpu))
            .apply(&x, 2, None)
            .unwrap(),
        q.reference(&x, 2, None)
    );
}

/// One offloaded linear map on real-valued inputs decodes within its fixed-point bound.
#[test]
fn offloaded_linear_decodes_within_the_fixed_point_bound() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let (out, inp, rows) = (48usize, 64usize, 6usize);
    let w: Vec<f32> = (0..out * inp)
        .map(|_| rng.random_range(-0.7f32..0.7))
        .collect();
    let b: Vec<f32> = (0..out).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut state = StateDict::new();
    state.insert(
        "lin.weight".into(),
        Tensor::from_slice(&w).view([out as i64, inp as i64]),
    );
    state.insert("lin.bias".into(), Tensor::from_slice(&b));
    let servers = [
        HssModel::from_state(&state, Engine::Limbs(Device::Cpu)).unwrap(),
        HssModel::from_state(&state, Engine::Int64).unwrap(),
    ];
    let mut client =
        HssClient::new(InProcess::new([&servers[0], &servers[1]], false), &state).unwrap();
    assert_eq!(client.weight_frac_bits(), servers[0].weight_frac_bits());
    let x: Vec<f32> = (0..rows * inp)
        .map(|_| rng.random_range(-8.0f32..8.0))
        .collect();
    let xt = Tensor::from_slice(&x).view([2, 3, inp as i64]);
    let y = client
        .linears(&xt.to_kind(Kind::Double), &["lin".into()])
        .unwrap()
        .remove(0);
    assert_eq!(y.size(), [2, 3, out as i64]);
    let exact = xt.to_kind(Kind::Double).linear(
        &state["lin.weight"].to_kind(Kind::Double),
        Some(&state["lin.bias"].to_kind(Kind::Double)),
    );
    let q = QuantLinear::new(&w, out, inp, Some(&b)).unwrap();
    let l1 = x
        .chunks(inp)
        .map(|r| r.iter().map(|v| f64::from(v.abs())).sum::<f64>())
        .fold(0.0, f64::max);
    let f = q.safe_frac_bits(8.0, client.frac_bits).unwrap();
    let bound = q.error_bound(l1, f);
    let err = max_abs(&y, &exact);
    assert!(err <= bound, "error {err:e} above the bound {bound:e}");
    assert!(err > 0.0 && bound < 1e-2, "error {err:e}, bound {bound:e}");
    assert_eq!(client.traffic.round_trips, 1);
    assert_eq!(client.traffic.bytes_up, 32 + 8 * (rows * inp) as u64);
    assert_eq!(client.traffic.bytes_down, 16 * (rows * out) as u64);
}

/// HSS-EE logits (decrypted) equal plain EE's and the plaintext model's within the
/// fixed-point error, with the same argmax, for both key profiles; limb and int64 servers give
/// bit-identical logits (the share products are exact).
#[test]
fn hss_bert_matches_plain_ee_and_plaintext() {
    let c = cfg();
    let spec = c.key_spec();
    let plain = plaintext(3);
    let (ids, mask) = ids(4, 6, 20);
    let want = bert::classify(&c, c.check_state(&plain).unwrap(), &ids, &mask);
    for (profile, seed) in [(Profile::Finetune, 5), (Profile::Inference, 6)] {
        let k = keyed(&plain, profile, seed);
        let ee = c.check_state(&k.ee).unwrap();
        let enc = encrypt_token_ids(&spec, &k.keys, &ids).unwrap();
        let plain_ee =
            decrypt_outputs(&spec, &k.keys, &bert::classify(&c, ee, &enc, &mask)).unwrap();
        assert!(max_abs(&plain_ee, &want) < 1e-4);
        let off = offloaded_state(&c, &k.ee);
        let mut logits = Vec::new();
        for engine in [Engine::Limbs(Device::Cpu), Engine::Int64] {
            let s = [
                HssModel::from_state(&off, engine).unwrap(),
                HssModel::from_state(&off, engine).unwrap(),
            ];
            let mut client = HssClient::new(InProcess::new([&s[0], &s[1]], false), &off).unwrap();
            let y = decrypt_outputs(
                &spec,
                &k.keys,
                &classify(&mut client, &c, ee, &enc, &mask).unwrap(),
            )
            .unwrap();
            assert_eq!(
                client.traffic.round_trips,
                4 * c.bert.num_hidden_layers as u64
            );
            logits.push(y);
        }
        assert!(
            logits[0].equal(&logits[1]),
            "limb and int64 servers disagree"
        );
        let (e_ee, e_plain) = (max_abs(&logits[0], &plain_ee), max_abs(&logits[0], &want));
        eprintln!(
            "{profile:?}: HSS-EE vs plain EE {e_ee:.2e}, vs plaintext {e_plain:.2e}; logits span {:.2}",
            want.abs().max().double_value(&[])
        );
        assert!(
            e_ee < 1e-3 && e_plain < 1e-3,
            "{profile:?}: {e_ee:e} / {e_plain:e}"
        );
        assert_eq!(argmax(&logits[0]), argmax(&want));
    }
}

/// Every offloaded linear map of a whole forward (both key profiles, f64 activations) decodes
/// within its fixed-point error bound against the exact product of the same inputs.
#[test]
fn every_linear_map_of_a_forward_is_within_its_bound() {
    let c = cfg();
    let spec = c.key_spec();
    let plain = plaintext(15);
    let (ids, mask) = ids(16, 3, 12);
    for (profile, seed) in [(Profile::Finetune, 17), (Profile::Inference, 18)] {
        let k = keyed(&plain, profile, seed);
        let ee64: StateDict =
            k.ee.iter()
                .map(|(n, t)| (n.clone(), t.to_kind(Kind::Double)))
                .collect();
        let ee = c.check_state(&ee64).unwrap();
        let off = offloaded_state(&c, &k.ee);
        let s = [
            HssModel::from_state(&off, Engine::Limbs(Device::Cpu)).unwrap(),
            HssModel::from_state(&off, Engine::Limbs(Device::Cpu)).unwrap(),
        ];
        let mut client = HssClient::new(InProcess::new([&s[0], &s[1]], false), &off).unwrap();
        let enc = encrypt_token_ids(&spec, &k.keys, &ids).unwrap();
        let x = bert::embed(&c.bert, ee, &enc);
        let (mut calls, mut worst) = (0, 0f64);
        bert::encode_embedded_with(&c.bert, ee, &x, &mask, |x, maps| {
            let got = client.linears(x, maps)?;
            let xs = Vec::<f32>::try_from(x.to_kind(Kind::Float).contiguous().view([-1])).unwrap();
            let cols = *x.size().last().unwrap() as usize;
            let largest = xs.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
            let l1 = xs
                .chunks(cols)
                .map(|r| r.iter().map(|v| f64::from(v.abs())).sum::<f64>())
                .fold(0.0, f64::max);
            let qs: Vec<QuantLinear> = maps
                .iter()
                .map(|m| {
                    let w = &k.ee[&format!("{m}.weight")];
                    let (o, i) = (w.size()[0] as usize, w.size()[1] as usize);
                    let wv = Vec::<f32>::try_from(w.contiguous().view([-1])).unwrap();
                    let bv = Vec::<f32>::try_from(&k.ee[&format!("{m}.bias")]).unwrap();
                    QuantLinear::new(&wv, o, i, Some(&bv)).unwrap()
                })
                .collect();
            let f = qs
                .iter()
                .map(|q| q.safe_frac_bits(largest, client.frac_bits).unwrap())
                .min()
                .unwrap();
            for ((m, g), q) in maps.iter().zip(&got).zip(&qs) {
                // The input as the client encoded it (f32 values, exact in f64).
                let x64 = x.to_kind(Kind::Float).to_kind(Kind::Double);
                let exact = x64.linear(
                    &k.ee[&format!("{m}.weight")].to_kind(Kind::Double),
                    Some(&k.ee[&format!("{m}.bias")].to_kind(Kind::Double)),
                );
                let err = max_abs(g, &exact);
                let bound = q.error_bound(l1, f);
                assert!(
                    err <= bound,
                    "{profile:?} {m}: error {err:e} above its bound {bound:e}"
                );
                worst = worst.max(err / bound);
                calls += 1;
            }
            Ok::<_, fedee_hss::HssError>(got)
        })
        .unwrap();
        assert_eq!(calls, 6 * c.bert.num_hidden_layers);
        eprintln!("{profile:?}: every map within its bound (largest error / bound {worst:.3})");
    }
}

/// The source document's scheme (each server runs the whole EE model on an additive share of
/// the input, the client adds the outputs) is wrong: GELU, softmax and LayerNorm are not
/// additive. HSS-EE on the same input is right.
#[test]
fn running_the_whole_model_on_shares_is_wrong() {
    let c = cfg();
    let spec = c.key_spec();
    let plain = plaintext(7);
    let k = keyed(&plain, Profile::Finetune, 8);
    let ee = c.check_state(&k.ee).unwrap();
    let (ids, mask) = ids(9, 4, 16);
    let enc = encrypt_token_ids(&spec, &k.keys, &ids).unwrap();
    let x = bert::embed(&c.bert, ee, &enc);
    let want = bert::classify_embedded(&c, ee, &x, &mask);
    let r = Tensor::randn(x.size(), (Kind::Float, Device::Cpu)) * 4.0;
    let naive = bert::classify_embedded(&c, ee, &(&x - &r), &mask)
        + bert::classify_embedded(&c, ee, &r, &mask);
    let span = want.abs().max().double_value(&[]);
    let naive_err = max_abs(&naive, &want);
    eprintln!("source scheme: max |Δ logits| {naive_err:.3} (logits up to {span:.3})");
    assert!(
        naive_err > 0.25 * span,
        "the naive scheme came out right: {naive_err}"
    );
    let off = offloaded_state(&c, &k.ee);
    let s = [
        HssModel::from_state(&off, Engine::Int64).unwrap(),
        HssModel::from_state(&off, Engine::Int64).unwrap(),
    ];
    let mut client = HssClient::new(InProcess::new([&s[0], &s[1]], false), &off).unwrap();
    let hss = classify(&mut client, &c, ee, &enc, &mask).unwrap();
    assert!(max_abs(&hss, &want) < 1e-3);
}

// ---- Each server's view --------------------------------------------------------------------

/// A view under test: its bytes, its 64-bit words (bit positions), and its values as numbers.
struct View {
    bytes: Vec<u8>,
    words: Vec<u64>,
    values: Vec<f64>,
}

impl View {
    fn ring(words: &[u64]) -> Self {
        Self {
            bytes: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            words: words.to_vec(),
            values: words.iter().map(|w| *w as f64 / 2f64.powi(64)).collect(),
        }
    }
    fn float(values: &[f64]) -> Self {
        let words: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
        Self {
            bytes: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            words,
            values: values.to_vec(),
        }
    }
}

const ALPHA: f64 = 1e-6;

/// Chi-square of the byte histogram against uniform over 256 values: p-value.
fn bytes_p(v: &View) -> f64 {
    let mut c = [0f64; 256];
    v.bytes.iter().for_each(|b| c[*b as usize] += 1.0);
    let e = v.bytes.len() as f64 / 256.0;
    let chi: f64 = c.iter().map(|o| (o - e).powi(2) / e).sum();
    1.0 - ChiSquared::new(255.0).unwrap().cdf(chi)
}

/// Chi-square of the 64 bit positions' counts of ones against Binomial(N, ½): p-value.
fn bits_p(v: &View) -> f64 {
    let n = v.words.len() as f64;
    let chi: f64 = (0..64)
        .map(|b| {
            let ones = v.words.iter().filter(|w| (*w >> b) & 1 == 1).count() as f64;
            (2.0 * ones - n).powi(2) / n
        })
        .sum();
    1.0 - ChiSquared::new(64.0).unwrap().cdf(chi)
}

/// Two-sample Kolmogorov–Smirnov statistic and its critical value at [`ALPHA`].
fn ks(a: &[f64], b: &[f64]) -> (f64, f64) {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    (
        d,
        (-(ALPHA / 2.0).ln() / 2.0).sqrt() * ((n + m) / (n * m)).sqrt(),
    )
}

fn corr(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Which of the four tests a view fails: bytes, bits, KS against the view of another input,
/// correlation with the plaintext.
fn failures(v: &View, other: &View, plain: &[f64]) -> Vec<&'static str> {
    let mut f = Vec::new();
    if bytes_p(v) < ALPHA {
        f.push("bytes");
    }
    if bits_p(v) < ALPHA {
        f.push("bits");
    }
    let (d, crit) = ks(&v.values, &other.values);
    if d >= crit {
        f.push("ks");
    }
    if corr(&v.values, plain).abs() >= 3.0 / (plain.len() as f64).sqrt() {
        f.push("corr");
    }
    f
}

/// Run two very different inputs (one token repeated; random tokens) through HSS-EE and return
/// each server's recorded requests.
fn views(k: &Keyed, ids: &Tensor, mask: &Tensor, seed_of_views: u64) -> [Vec<LinearRequest>; 2] {
    let c = cfg();
    let spec = c.key_spec();
    let off = offloaded_state(&c, &k.ee);
    let s = [
        HssModel::from_state(&off, Engine::Int64).unwrap(),
        HssModel::from_state(&off, Engine::Int64).unwrap(),
    ];
    // Reproducible seeds: 24 requests × 2 servers × 4 tests, the correlation one at 3/√N
    // (about 3σ), would otherwise fail now and then by chance.
    let mut client = HssClient::new(InProcess::new([&s[0], &s[1]], true), &off)
        .unwrap()
        .with_sharer(fedee_hss::share::Sharer::reproducible(seed_of_views));
    let enc = encrypt_token_ids(&spec, &k.keys, ids).unwrap();
    let _logits = classify(&mut client, &c, c.check_state(&k.ee).unwrap(), &enc, mask).unwrap();
    client.servers().views.clone().expect("recording")
}

fn words(r: &LinearRequest) -> &[u64] {
    match &r.share {
        Share::Words(w) => w,
        Share::Seed(_) => panic!("server 1 received a seed"),
    }
}

fn seed(r: &LinearRequest) -> [u8; 32] {
    match &r.share {
        Share::Seed(s) => *s,
        Share::Words(_) => panic!("server 0 received share words"),
    }
}

/// The plaintext `x̃` behind request `i` (what the two servers together would learn), as
/// signed numbers.
fn plaintext_of(v: &[Vec<LinearRequest>; 2], i: usize) -> Vec<f64> {
    let w = words(&v[1][i]);
    expand(&seed(&v[0][i]), w.len())
        .iter()
        .zip(w)
        .map(|(a, b)| a.wrapping_add(*b) as i64 as f64)
        .collect()
}

#[test]
fn each_server_sees_uniform_shares_and_the_controls_are_caught() {
    let plain = plaintext(11);
    let k = keyed(&plain, Profile::Inference, 12);
    let (batch, len) = (4, 16);
    let same = Tensor::full([batch, len], 5, (Kind::Int64, Device::Cpu));
    let (rand_ids, _) = ids(13, batch, len);
    let mask = Tensor::ones([batch, len], (Kind::Int64, Device::Cpu));
    let a = views(&k, &same, &mask, 101);
    let b = views(&k, &rand_ids, &mask, 102);

    // Server 0 receives only seeds, all distinct; server 1 only words.
    let mut seeds: Vec<[u8; 32]> = a[0].iter().chain(&b[0]).map(seed).collect();
    let n = seeds.len();
    seeds.sort();
    seeds.dedup();
    assert_eq!(seeds.len(), n, "a seed was reused");
    assert_eq!(n, 2 * 4 * cfg().bert.num_hidden_layers);

    // Every request of server 1 (and server 0's expanded X₀): uniform, indistinguishable
    // across inputs, uncorrelated with the plaintext.
    for i in 0..a[1].len() {
        let (va, vb) = (View::ring(words(&a[1][i])), View::ring(words(&b[1][i])));
        let plain_a = plaintext_of(&a, i);
        let f = failures(&va, &vb, &plain_a);
        assert!(f.is_empty(), "server 1's view of request {i} fails {f:?}");
        let x0 = View::ring(&expand(&seed(&a[0][i]), va.words.len()));
        let f = failures(
            &x0,
            &View::ring(&expand(&seed(&b[0][i]), va.words.len())),
            &plain_a,
        );
        assert!(f.is_empty(), "server 0's view of request {i} fails {f:?}");
    }

    // The difference of two of server 1's views is uniform too (fresh seeds).
    let (pa, pb) = (plaintext_of(&a, 0), plaintext_of(&b, 0));
    let diff: Vec<u64> = words(&a[1][0])
        .iter()
        .zip(words(&b[1][0]))
        .map(|(x, y)| x.wrapping_sub(*y))
        .collect();
    let plain_diff: Vec<f64> = pa.iter().zip(&pb).map(|(x, y)| x - y).collect();
    let other: Vec<u64> = words(&a[1][1]).to_vec();
    let f = failures(
        &View::ring(&diff),
        &View::ring(&other[..diff.len().min(other.len())]),
        &plain_diff,
    );
    assert!(f.is_empty(), "fresh-seed difference fails {f:?}");

    // Control 1: a reused seed. Server 1's two views then differ by x̃_a − x̃_b.
    let enc = |p: &[f64]| -> Vec<u64> { p.iter().map(|v| *v as i64 as u64).collect() };
    let s = [42u8; 32];
    let (ra, rb) = (
        share_with_seed(&enc(&pa), &s),
        share_with_seed(&enc(&pb), &s),
    );
    let diff: Vec<u64> = ra
        .iter()
        .zip(&rb)
        .map(|(x, y)| x.wrapping_sub(*y))
        .collect();
    let f = failures(
        &View::ring(&diff),
        &View::ring(&other[..diff.len().min(other.len())]),
        &plain_diff,
    );
    assert!(
        f.contains(&"bytes") && f.contains(&"bits") && f.contains(&"corr"),
        "reused seed caught only by {f:?}"
    );
    // Each of the two views alone still looks uniform: the leak is in the pair.
    assert!(failures(&View::ring(&ra), &View::ring(&rb), &pa).is_empty());

    // Control 2: float shares with a small mask (x₁ = x + N(0, 0.1²)).
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let f_bits = 24f64.exp2();
    let noisy = |p: &[f64], rng: &mut ChaCha20Rng| -> Vec<f64> {
        p.iter()
            .map(|v| {
                v / f_bits
                    + 0.1
                        * (rng.random::<f64>() + rng.random::<f64>() + rng.random::<f64>() - 1.5)
                        * 2.0
            })
            .collect()
    };
    // The "very different" second input: all zeros (server 1's ring view of it is as uniform
    // as any other, checked first).
    let zeros = vec![0f64; pa.len()];
    let zero_share = fedee_hss::share::Sharer::reproducible(103)
        .share(&enc(&zeros))
        .1;
    let f = failures(&View::ring(words(&a[1][0])), &View::ring(&zero_share), &pa);
    assert!(
        f.is_empty(),
        "server 1's view vs an all-zero input fails {f:?}"
    );
    let (fa, fz) = (noisy(&pa, &mut rng), noisy(&zeros, &mut rng));
    let f = failures(&View::float(&fa), &View::float(&fz), &pa);
    assert_eq!(
        f,
        ["bytes", "bits", "ks", "corr"],
        "float shares caught only by {f:?}"
    );
}
