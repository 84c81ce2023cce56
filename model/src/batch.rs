//! Trainer batches to and from safetensors bytes, checked against the architecture.

use tch::{Device, Kind, Tensor};

use crate::ModelError;
use crate::arch::{Architecture, Input};
use crate::io::{state_to_safetensors, tensors_from_safetensors};
use crate::keyspec::StateDict;

/// A batch for the trainer as safetensors bytes: features `x (batch, in_features)` f32/f64;
/// tokens `input_ids` and `attention_mask` `(batch, seq)` i64; or client-side embeddings
/// `inputs_embeds (batch, seq, hidden)` f32/f64 with `attention_mask`; plus optional labels
/// `y (batch,)` i64.
///
/// # Errors
/// [`ModelError::Dtype`] for unsupported dtypes.
pub fn batch_to_safetensors(input: &Input, y: Option<&Tensor>) -> Result<Vec<u8>, ModelError> {
    let mut s = StateDict::new();
    match input {
        Input::Features(x) => {
            s.insert("x".into(), x.shallow_clone());
        }
        Input::Tokens { ids, mask } => {
            s.insert("input_ids".into(), ids.to_kind(Kind::Int64));
            s.insert("attention_mask".into(), mask.to_kind(Kind::Int64));
        }
        Input::Embedded { x, mask } => {
            s.insert("inputs_embeds".into(), x.shallow_clone());
            s.insert("attention_mask".into(), mask.to_kind(Kind::Int64));
        }
    }
    if let Some(y) = y {
        s.insert("y".into(), y.shallow_clone());
    }
    state_to_safetensors(&s)
}

fn shape_err(name: &str, expected: Vec<i64>, found: Vec<i64>) -> ModelError {
    ModelError::Shape {
        name: name.into(),
        expected,
        found,
    }
}

fn check_range(name: &str, t: &Tensor, hi: i64) -> Result<(), ModelError> {
    if t.numel() == 0 {
        return Ok(());
    }
    let (lo, top) = (t.min().int64_value(&[]), t.max().int64_value(&[]));
    if lo < 0 || top >= hi {
        return Err(ModelError::Name {
            name: name.into(),
            problem: format!(
                "has value {} outside 0..{hi}",
                if lo < 0 { lo } else { top }
            ),
        });
    }
    Ok(())
}

/// `input_ids` and `attention_mask` `(batch, seq)` i64: non-empty, at most `max_len` long,
/// ids below `vocab`, mask in {0, 1}.
fn token_batch(
    ids: Tensor,
    mask: Tensor,
    max_len: usize,
    vocab: usize,
) -> Result<Input, ModelError> {
    for (n, v) in [("input_ids", &ids), ("attention_mask", &mask)] {
        if v.kind() != Kind::Int64 {
            return Err(ModelError::Dtype {
                name: n.into(),
                dtype: format!("{:?}", v.kind()),
            });
        }
    }
    let s = ids.size();
    if s.len() != 2 || s[0] == 0 || s[1] == 0 || s[1] > max_len as i64 {
        return Err(shape_err("input_ids", vec![-1, max_len as i64], s));
    }
    if mask.size() != s {
        return Err(shape_err("attention_mask", s, mask.size()));
    }
    check_range("input_ids", &ids, vocab as i64)?;
    check_range("attention_mask", &mask, 2)?;
    Ok(Input::Tokens { ids, mask })
}

/// Parse a batch written by [`batch_to_safetensors`] for `arch`, checking names, dtypes,
/// shapes and ranges (token ids within the vocabulary, sequence within the position table,
/// embeddings finite and `hidden` wide, mask in {0, 1}, labels within the classes). A BERT
/// batch holding `inputs_embeds` is read as [`Input::Embedded`].
///
/// # Errors
/// [`ModelError::Name`], [`ModelError::Shape`] or [`ModelError::Dtype`] naming the problem.
pub fn batch_from_safetensors(
    bytes: &[u8],
    arch: &Architecture,
    device: Device,
) -> Result<(Input, Option<Tensor>), ModelError> {
    let mut t = tensors_from_safetensors(bytes, device)?;
    let embedded = t.contains_key("inputs_embeds");
    let mut take = |name: &str| {
        t.remove(name).ok_or_else(|| ModelError::Name {
            name: name.into(),
            problem: "is missing from the batch".into(),
        })
    };
    let input = match arch {
        Architecture::Mlp(c) => {
            let x = take("x")?;
            if x.kind() == Kind::Int64 {
                return Err(ModelError::Dtype {
                    name: "x".into(),
                    dtype: "I64".into(),
                });
            }
            let s = x.size();
            if s.len() != 2 || s[1] != c.in_features as i64 || s[0] == 0 {
                return Err(shape_err("x", vec![-1, c.in_features as i64], s));
            }
            Input::Features(x)
        }
        Architecture::BertClassifier(c) if embedded => {
            let (x, mask) = (take("inputs_embeds")?, take("attention_mask")?);
            if !matches!(x.kind(), Kind::Float | Kind::Double) {
                return Err(ModelError::Dtype {
                    name: "inputs_embeds".into(),
                    dtype: format!("{:?}", x.kind()),
                });
            }
            if mask.kind() != Kind::Int64 {
                return Err(ModelError::Dtype {
                    name: "attention_mask".into(),
                    dtype: format!("{:?}", mask.kind()),
                });
            }
            let s = x.size();
            let h = c.bert.hidden_size as i64;
            if s.len() != 3 || s[0] == 0 || s[1] == 0 || s[2] != h {
                return Err(shape_err("inputs_embeds", vec![-1, -1, h], s));
            }
            if mask.size() != s[..2] {
                return Err(shape_err("attention_mask", s[..2].to_vec(), mask.size()));
            }
            if !bool::try_from(x.isfinite().all()).unwrap_or(false) {
                return Err(ModelError::Name {
                    name: "inputs_embeds".into(),
                    problem: "contains NaN or infinite values".into(),
                });
            }
            check_range("attention_mask", &mask, 2)?;
            Input::Embedded { x, mask }
        }
        Architecture::Llama(c) => {
            let (ids, mask) = (take("input_ids")?, take("attention_mask")?);
            let input = token_batch(ids, mask, c.max_position, c.vocab_size)?;
            if let Input::Tokens { mask, .. } = &input {
                // Right padding only: a counted target must never have seen a padded position.
                let bad = mask
                    .narrow(1, 1, mask.size()[1] - 1)
                    .gt_tensor(&mask.narrow(1, 0, mask.size()[1] - 1));
                if mask.numel() > 0
                    && (bool::try_from(bad.any()).unwrap_or(true)
                        || bool::try_from(mask.select(1, 0).eq(0).any()).unwrap_or(true))
                {
                    return Err(ModelError::Name {
                        name: "attention_mask".into(),
                        problem: "must be ones then zeros in every row (right padding, first token real): a causal LM pads at the end".into(),
                    });
                }
            }
            input
        }
        Architecture::BertClassifier(c) => token_batch(
            take("input_ids")?,
            take("attention_mask")?,
            c.bert.max_position_embeddings,
            c.bert.vocab_size,
        )?,
    };
    let y = t.remove("y");
    if y.is_some() && matches!(arch, Architecture::Llama(_)) {
        return Err(ModelError::Name {
            name: "y".into(),
            problem: "is not part of a causal LM batch: the targets are input_ids shifted by one"
                .into(),
        });
    }
    if let Some(y) = &y {
        if y.kind() != Kind::Int64 {
            return Err(ModelError::Dtype {
                name: "y".into(),
                dtype: format!("{:?}", y.kind()),
            });
        }
        if y.size() != [input.len()] {
            return Err(shape_err("y", vec![input.len()], y.size()));
        }
        check_range("y", y, arch.num_classes() as i64)?;
    }
    if let Some(extra) = t.keys().next() {
        return Err(ModelError::Name {
            name: extra.clone(),
            problem: "is not part of a batch".into(),
        });
    }
    Ok((input, y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::LlamaConfig;

    #[test]
    fn a_causal_lm_batch_is_right_padded_token_ids_without_labels() {
        let arch = Architecture::Llama(LlamaConfig {
            vocab_size: 10,
            hidden_size: 4,
            num_layers: 1,
            intermediate_size: 8,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position: 6,
            tied_embeddings: true,
        });
        let ids = Tensor::from_slice2(&[[1i64, 2, 3], [4, 5, 0]]);
        let parse = |mask: &[[i64; 3]; 2], y: Option<&Tensor>| {
            let input = Input::Tokens {
                ids: ids.shallow_clone(),
                mask: Tensor::from_slice2(mask),
            };
            batch_from_safetensors(
                &batch_to_safetensors(&input, y).unwrap(),
                &arch,
                Device::Cpu,
            )
        };
        let (input, y) = parse(&[[1, 1, 1], [1, 1, 0]], None).unwrap();
        assert!(matches!(input, Input::Tokens { .. }) && y.is_none());
        for mask in [[[1, 1, 1], [0, 1, 1]], [[1, 0, 1], [1, 1, 1]]] {
            let e = parse(&mask, None).unwrap_err().to_string();
            assert!(e.contains("right padding"), "{mask:?}: {e}");
        }
        let e = parse(
            &[[1, 1, 1], [1, 1, 1]],
            Some(&Tensor::from_slice(&[1i64, 2])),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("shifted by one"), "{e}");
        let long = Input::Tokens {
            ids: Tensor::zeros([1, 7], (Kind::Int64, Device::Cpu)),
            mask: Tensor::ones([1, 7], (Kind::Int64, Device::Cpu)),
        };
        let e = batch_from_safetensors(
            &batch_to_safetensors(&long, None).unwrap(),
            &arch,
            Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("input_ids") && e.contains("[1, 7]"), "{e}");
    }
}
