//! `fedee ee attack lm-matching`: weight matching extended to the causal LM. The server holds
//! the EE embedding table `E' = P_π E K` (vocabulary permutation π on the rows, the residual
//! key K on the columns) and knows SmolLM2's public table `E`. It describes every row by
//! something K does not change and matches descriptions, recovering π without K:
//! - K a permutation or signed permutation (the `finetune` and `inference` profiles): each
//!   row's 64 largest absolute values;
//! - K orthogonal (the SliceGPT-style option, not built: simulated here as `E' = P_π E Q` with
//!   a random orthogonal Q, which is what that option would put in the table): each row's 64
//!   largest inner products with every row.
//!
//! Scored with the key holder's π: the share of token ids recovered, and the share of the
//! tokens of Drugs.com reviews (what patients' prompts look like) the server can read.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use fedee_encrypt::attack::matching::{gram_profile, nearest_rows, sorted_abs_rows};
use fedee_encrypt::{KeyGroup, KeySet, encrypt_token_ids, transform_state};
use fedee_model::Profile;
use fedee_model::chat::LmTokenizer;
use fedee_model::gguf::{self, RopeLayout};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde_json::{Value, json};
use tch::{Kind, Tensor};

use crate::table::{self, Cell, col};

#[derive(Args)]
pub struct LmMatchingArgs {
    /// The model (GGUF).
    #[arg(
        long,
        default_value = "data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    gguf: PathBuf,
    /// Victim text: Drugs.com reviews (the test split's file).
    #[arg(long, default_value = "data/cache/drugs/drugsComTest.tsv")]
    reviews: PathBuf,
    /// Largest values (or inner products) per row in a description.
    #[arg(long, default_value_t = 64)]
    k: i64,
    /// Seed of the keys.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Row {
    residual_key: &'static str,
    token_ids_recovered: f64,
    review_tokens_recovered: f64,
    attack_seconds: f64,
}

/// Run the attack.
///
/// # Errors
/// Missing files (naming `make data`), or a failing computation.
pub fn lm_matching(a: &LmMatchingArgs) -> Result<Value> {
    let _guard = tch::no_grad_guard();
    let m = gguf::load(&a.gguf, RopeLayout::HalfSplit)
        .with_context(|| format!("{} (`make data` fetches it)", a.gguf.display()))?;
    let tok = LmTokenizer::from_gguf(&m)?;
    let reviews = crate::drugs::load(&a.reviews)?;
    let mut review_ids = Vec::new();
    for r in &reviews {
        review_ids.extend(tok.encode(&r.text)?.into_iter().map(i64::from));
    }
    let c = &m.config;
    let spec = c.key_spec();
    let public = &m.state["token_embd.weight"];
    let v = c.vocab_size as i64;
    let mut rng = ChaCha20Rng::seed_from_u64(a.seed);
    let mut rows = Vec::new();
    for (name, residual) in [
        ("permutation", Some(KeyGroup::Permutation)),
        ("signed permutation", Some(KeyGroup::SignedPermutation)),
        ("orthogonal (simulated)", None),
    ] {
        let mut groups = c.key_groups(Profile::Finetune);
        groups.insert("residual".into(), residual.unwrap_or(KeyGroup::Permutation));
        let keys = KeySet::generate(&spec, &groups, false, &mut rng)?;
        let ee = match residual {
            Some(_) => transform_state(&spec, &keys, &m.state)?.remove("token_embd.weight"),
            None => {
                // P_π E (the permutation residual key is then replaced by Q): encrypt rows
                // only, through the real vocabulary key.
                let pi = encrypt_token_ids(&spec, &keys, &Tensor::arange(v, tch::kind::INT64_CPU))?;
                let mut rows_only = Tensor::zeros_like(public);
                let _ = rows_only.index_copy_(0, &pi, public);
                let g = Tensor::randn([c.hidden_size as i64; 2], (Kind::Double, tch::Device::Cpu));
                let (q, _) = Tensor::linalg_qr(&g, "reduced");
                Some(
                    rows_only
                        .to_kind(Kind::Double)
                        .matmul(&q)
                        .to_kind(Kind::Float),
                )
            }
        }
        .context("the EE state has no embedding table")?;
        let t = Instant::now();
        let guess = match residual {
            Some(_) => nearest_rows(&sorted_abs_rows(&ee, a.k), &sorted_abs_rows(public, a.k)),
            None => nearest_rows(&gram_profile(&ee, a.k), &gram_profile(public, a.k)),
        };
        let attack_seconds = t.elapsed().as_secs_f64();
        // Truth: EE row π(i) holds public row i.
        let enc: Vec<i64> = Vec::try_from(encrypt_token_ids(
            &spec,
            &keys,
            &Tensor::arange(v, tch::kind::INT64_CPU),
        )?)?;
        let ok: Vec<bool> = (0..v as usize)
            .map(|i| guess[enc[i] as usize] == i as i64)
            .collect();
        let ids = ok.iter().filter(|&&b| b).count() as f64 / v as f64;
        let text = review_ids.iter().filter(|&&i| ok[i as usize]).count() as f64
            / review_ids.len().max(1) as f64;
        eprintln!(
            "lm-matching: {name}: {:.2} % of ids, {:.2} % of review tokens in {attack_seconds:.1} s",
            100.0 * ids,
            100.0 * text
        );
        rows.push(Row {
            residual_key: name,
            token_ids_recovered: ids,
            review_tokens_recovered: text,
            attack_seconds,
        });
    }
    table::print(
        &[
            col("residual key", "residual_key", Cell::Text),
            col("token ids recovered", "token_ids_recovered", Cell::Percent),
            col(
                "review tokens recovered",
                "review_tokens_recovered",
                Cell::Percent,
            ),
            col("attack s", "attack_seconds", Cell::Fixed(1)),
        ],
        &rows,
    );
    println!(
        "{} reviews, {} tokens; descriptions of the {} largest values per row",
        reviews.len(),
        review_ids.len(),
        a.k
    );
    Ok(json!({
        "attack": "lm-matching",
        "model": a.gguf.file_name().map(|n| n.to_string_lossy().into_owned()),
        "vocab_size": v,
        "review_tokens": review_ids.len(),
        "k": a.k,
        "rows": rows,
    }))
}

#[derive(Args)]
pub struct LmFrequencyArgs {
    /// The model (GGUF).
    #[arg(
        long,
        default_value = "data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    gguf: PathBuf,
    /// Folder with drugsComTrain.tsv (the attacker's reference) and drugsComTest.tsv (the
    /// victim's prompts).
    #[arg(long, default_value = "data/cache/drugs")]
    drugs_dir: PathBuf,
    /// Victim conversations: prompts from test-split reviews, answered by the EE model.
    #[arg(long, default_value_t = 64)]
    conversations: usize,
    /// Reference conversations the attacker generates with the public model from train-split
    /// reviews.
    #[arg(long, default_value_t = 96)]
    reference_conversations: usize,
    /// Review tokens quoted in each prompt (reviews are cut to this many; shorter ones are
    /// skipped, so a batch's prompts have one length).
    #[arg(long, default_value_t = 48)]
    review_tokens: usize,
    /// Longest answer, in tokens (greedy decoding; an answer ends at the end of its turn).
    #[arg(long, default_value_t = 96)]
    max_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Ciphertext volumes of generated tokens, comma-separated (larger than what was
    /// generated: measured on all of it).
    #[arg(long, value_delimiter = ',', default_value = "1000,3000,100000")]
    volumes: Vec<usize>,
    /// Hill-climbing moves per run (greedy and annealed runs; the likelier guess is kept).
    #[arg(long, default_value_t = 1_000_000)]
    moves: usize,
    /// Seed of the keys and of the attack's random choices.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The question put to the model about each review; `{review}` is where the review goes.
const QUESTION: &str = "Here is a patient's review of a drug.\n\n{review}\n\nIn two sentences: how did the treatment go for this patient?";

/// One user turn quoting each review's first `n` tokens, as ids, with the assistant's
/// opening: every prompt has the same length. Reviews shorter than `n` tokens are skipped.
fn review_prompts(
    tok: &LmTokenizer,
    reviews: &[crate::drugs::Review],
    n: usize,
    count: usize,
) -> Result<Vec<Vec<i64>>> {
    let marker = "\u{1}review\u{1}";
    let rendered = tok.render_chat(
        &[fedee_model::chat::ChatMessage {
            role: "user".into(),
            content: QUESTION.replace("{review}", marker),
        }],
        true,
    )?;
    let (pre, post) = rendered
        .split_once(marker)
        .context("the chat template dropped the user's message")?;
    let (pre, post) = (tok.encode(pre)?, tok.encode(post)?);
    let mut out = Vec::new();
    for r in reviews {
        if out.len() == count {
            break;
        }
        let body = tok.encode(r.text.trim())?;
        if body.len() >= n {
            let ids = pre.iter().chain(&body[..n]).chain(&post);
            out.push(ids.map(|&i| i64::from(i)).collect());
        }
    }
    Ok(out)
}

/// Greedy answers to `prompts` (equal lengths), `batch` at a time with a KV cache; each
/// answer ends before its first id in `stop` or after `max_tokens`.
fn answers(
    c: &fedee_model::llama::LlamaConfig,
    state: &fedee_model::StateDict,
    prompts: &[Vec<i64>],
    max_tokens: usize,
    batch: usize,
    stop: &[i64],
) -> Result<Vec<Vec<i64>>> {
    use fedee_model::llama::{self, KvCache};
    let s = c.check_state(state)?;
    let mut out = Vec::new();
    for chunk in prompts.chunks(batch.max(1)) {
        let (b, t) = (chunk.len(), chunk[0].len());
        let flat: Vec<i64> = chunk.concat();
        let mut cache = KvCache::new(c, b, t + max_tokens, Kind::Float, tch::Device::Cpu);
        let x = Tensor::from_slice(&flat).view([b as i64, t as i64]);
        let mut next = llama::forward(c, s, &x, &mut cache)?
            .select(1, -1)
            .argmax(-1, false);
        let mut seqs = vec![Vec::new(); b];
        let mut open = vec![true; b];
        for step in 0..max_tokens {
            let ids: Vec<i64> = Vec::try_from(&next)?;
            for (i, &id) in ids.iter().enumerate() {
                if open[i] && stop.contains(&id) {
                    open[i] = false;
                } else if open[i] {
                    seqs[i].push(id);
                }
            }
            if step + 1 == max_tokens || !open.iter().any(|&o| o) {
                break;
            }
            next = llama::forward(c, s, &next.view([b as i64, 1]), &mut cache)?
                .select(1, -1)
                .argmax(-1, false);
        }
        out.extend(seqs);
        eprintln!("lm-frequency: {} of {} answers", out.len(), prompts.len());
    }
    Ok(out)
}

#[derive(serde::Serialize)]
struct FrequencyRow {
    ciphertext: &'static str,
    reference: &'static str,
    ciphertext_tokens: usize,
    distinct_ciphertext_ids: usize,
    unigram_token_share: f64,
    hill_climb_token_share: f64,
    hill_climb_distinct_id_share: f64,
    attack_seconds: f64,
}

/// Run the frequency attack on what an EE chat server sees.
///
/// # Errors
/// Missing files (naming `make data`), or a failing computation.
pub fn lm_frequency(a: &LmFrequencyArgs) -> Result<Value> {
    use fedee_encrypt::attack::frequency::{BigramModel, FrequencyAttack, log_likelihood, score};
    let _guard = tch::no_grad_guard();
    let m = gguf::load(&a.gguf, RopeLayout::HalfSplit)
        .with_context(|| format!("{} (`make data` fetches it)", a.gguf.display()))?;
    let c = &m.config;
    let keys = KeySet::generate(
        &c.key_spec(),
        &c.key_groups(Profile::Inference),
        false,
        &mut ChaCha20Rng::seed_from_u64(a.seed),
    )?;
    let lm = fedee_client::lm::LmKeys::new(&m, keys)?;
    let tok = LmTokenizer::from_gguf(&m)?;
    let load = |f: &str| {
        let p = a.drugs_dir.join(f);
        crate::drugs::load(&p).with_context(|| format!("{} (`make data` fetches it)", p.display()))
    };
    let (train, test) = (load("drugsComTrain.tsv")?, load("drugsComTest.tsv")?);
    let victim = review_prompts(&tok, &test, a.review_tokens, a.conversations)?;
    let reference = review_prompts(&tok, &train, a.review_tokens, a.reference_conversations)?;
    let stop_plain: Vec<i64> = {
        let eos = [tok.eos_id];
        let enc = lm.stop_ids();
        // The plaintext stop ids, recovered from the key holder's table.
        let mut ids = Vec::with_capacity(enc.len() + eos.len());
        for e in enc {
            ids.push(i64::from(lm.decrypt_id(e)?));
        }
        ids.extend(eos.iter().map(|&e| i64::from(e)));
        ids
    };
    // The victim: encrypted prompts answered by the EE model (inference profile), as the
    // trainer serves them; what the server sees is ciphertext ids.
    eprintln!(
        "lm-frequency: the EE model answers {} encrypted prompts of {} tokens …",
        victim.len(),
        victim.first().map_or(0, Vec::len)
    );
    let ee = lm.encrypt_model(&m.state)?;
    let enc_prompts: Vec<Vec<i64>> = victim
        .iter()
        .map(|p| lm.encrypt_ids(&p.iter().map(|&i| i as u32).collect::<Vec<_>>()))
        .collect();
    let enc_answers = answers(c, &ee, &enc_prompts, a.max_tokens, a.batch, &lm.stop_ids())?;
    drop(ee);
    // The attacker's strongest reference: the public model's answers to other reviews.
    eprintln!(
        "lm-frequency: the public model answers {} reference prompts …",
        reference.len()
    );
    let ref_answers = answers(c, &m.state, &reference, a.max_tokens, a.batch, &stop_plain)?;
    let review_text: Vec<Vec<i64>> = train
        .iter()
        .map(|r| Ok(tok.encode(&r.text)?.into_iter().map(i64::from).collect()))
        .collect::<Result<_>>()?;
    let conversations = |p: &[Vec<i64>], ans: &[Vec<i64>]| -> Vec<Vec<i64>> {
        p.iter()
            .zip(ans)
            .map(|(p, a)| [p.as_slice(), a].concat())
            .collect()
    };
    let enc_conversations = conversations(&enc_prompts, &enc_answers);
    let ref_conversations = conversations(&reference, &ref_answers);
    let truth = |e: u32| lm.decrypt_id(i64::from(e)).unwrap_or(u32::MAX);
    let to_u32 = |s: &[Vec<i64>]| -> Vec<Vec<u32>> {
        s.iter()
            .map(|v| v.iter().map(|&t| t as u32).collect())
            .collect()
    };
    let attack = FrequencyAttack {
        moves: a.moves,
        ..Default::default()
    };
    let count = |s: &[Vec<i64>]| s.iter().map(Vec::len).sum::<usize>();
    eprintln!(
        "lm-frequency: {} answer tokens ({} in conversations); references: {} public-model answer tokens, {} review-text tokens",
        count(&enc_answers),
        count(&enc_conversations),
        count(&ref_answers),
        count(&review_text)
    );
    type Setting<'a> = (&'static str, &'static str, &'a [Vec<i64>], &'a [Vec<i64>]);
    let settings: [Setting; 4] = [
        ("answers", "review text", &enc_answers, &review_text),
        (
            "answers",
            "public model's answers",
            &enc_answers,
            &ref_answers,
        ),
        (
            "conversations",
            "review text",
            &enc_conversations,
            &review_text,
        ),
        (
            "conversations",
            "public model's conversations",
            &enc_conversations,
            &ref_conversations,
        ),
    ];
    let mut rows = Vec::new();
    for (view, name, cipher, refs) in settings {
        let model = BigramModel::new(&to_u32(refs), c.vocab_size);
        let total = count(cipher);
        let mut volumes: Vec<usize> = a.volumes.iter().map(|&v| v.min(total)).collect();
        volumes.dedup();
        for v in volumes {
            let cipher = to_u32(&crate::attack::take_tokens(cipher, v));
            let t = Instant::now();
            let uni = attack.unigram(&cipher, &model);
            let mut rng = ChaCha20Rng::seed_from_u64(a.seed);
            let greedy = FrequencyAttack {
                start_temperature: 0.0,
                ..attack
            }
            .run(&cipher, &model, &mut rng);
            let annealed = attack.run(&cipher, &model, &mut rng);
            let ll = |g| log_likelihood(&cipher, &model, g);
            let climbed = if ll(&annealed) > ll(&greedy) {
                annealed
            } else {
                greedy
            };
            let attack_seconds = t.elapsed().as_secs_f64();
            let (ut, _) = score(&cipher, &uni, truth);
            let (ct, ci) = score(&cipher, &climbed, truth);
            eprintln!(
                "lm-frequency: {view} vs {name}, {v} tokens: {:.1} % decoded ({attack_seconds:.1} s)",
                100.0 * ct
            );
            rows.push(FrequencyRow {
                ciphertext: view,
                reference: name,
                ciphertext_tokens: v,
                distinct_ciphertext_ids: uni.len(),
                unigram_token_share: ut,
                hill_climb_token_share: ct,
                hill_climb_distinct_id_share: ci,
                attack_seconds,
            });
        }
    }
    table::print(
        &[
            col("ciphertext", "ciphertext", Cell::Text),
            col("reference", "reference", Cell::Text),
            col("tokens", "ciphertext_tokens", Cell::Text),
            col("distinct", "distinct_ciphertext_ids", Cell::Text),
            col("unigram tok", "unigram_token_share", Cell::Percent),
            col("climb tok", "hill_climb_token_share", Cell::Percent),
            col("climb ids", "hill_climb_distinct_id_share", Cell::Percent),
            col("s", "attack_seconds", Cell::Fixed(1)),
        ],
        &rows,
    );
    let sample = enc_answers
        .first()
        .map(|s| {
            let ids: Vec<u32> = s.iter().map(|&e| truth(e as u32)).collect();
            tok.decode(&ids, false)
        })
        .transpose()?
        .unwrap_or_default();
    println!("a victim answer, decrypted by the key holder: {sample:?}");
    Ok(json!({
        "attack": "lm-frequency",
        "model": a.gguf.file_name().map(|n| n.to_string_lossy().into_owned()),
        "question": QUESTION,
        "review_tokens": a.review_tokens,
        "max_tokens": a.max_tokens,
        "victim_conversations": victim.len(),
        "reference_conversations": reference.len(),
        "answer_tokens": count(&enc_answers),
        "reference_answer_tokens": count(&ref_answers),
        "moves": a.moves,
        "rows": rows,
    }))
}
