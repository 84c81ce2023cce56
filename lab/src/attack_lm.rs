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
