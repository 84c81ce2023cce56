//! State dicts (name → tensor) to and from safetensors bytes.
//!
//! Only F32 and F64 tensors are written or accepted. Tensors are moved to the CPU for writing.

use std::collections::BTreeMap;

use crate::keyspec::StateDict;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tch::{Device, Kind, Tensor};

use crate::ModelError;
use crate::arch::{Architecture, Input};

fn dtype_of(t: &Tensor, name: &str) -> Result<Dtype, ModelError> {
    match t.kind() {
        Kind::Float => Ok(Dtype::F32),
        Kind::Double => Ok(Dtype::F64),
        Kind::Int64 => Ok(Dtype::I64),
        k => Err(ModelError::Dtype {
            name: name.to_owned(),
            dtype: format!("{k:?}"),
        }),
    }
}

/// Serialize a state dict to safetensors bytes (little-endian, names sorted).
///
/// # Errors
/// [`ModelError::Dtype`] for a tensor that is not f32, f64 or i64.
pub fn state_to_safetensors(state: &StateDict) -> Result<Vec<u8>, ModelError> {
    state_to_safetensors_with(state, &BTreeMap::new())
}

/// [`state_to_safetensors`] with string metadata in the header's `__metadata__` (left out
/// when `metadata` is empty).
///
/// # Errors
/// As [`state_to_safetensors`].
pub fn state_to_safetensors_with(
    state: &StateDict,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(state.len());
    for (name, t) in state {
        let dtype = dtype_of(t, name)?;
        let t = t.to_device(Device::Cpu).contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * dtype.bitsize() / 8];
        t.copy_data_u8(&mut bytes, numel);
        owned.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("consistent view"),
            )
        })
        .collect();
    let metadata = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
    safetensors::serialize(views, metadata).map_err(|e| ModelError::Safetensors(e.to_string()))
}

/// The string metadata of safetensors bytes (`__metadata__`; empty when there is none).
///
/// # Errors
/// [`ModelError::Safetensors`] for a malformed header.
pub fn safetensors_metadata(bytes: &[u8]) -> Result<BTreeMap<String, String>, ModelError> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
    Ok(meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect())
}

/// Parse safetensors bytes into a state dict of F32/F64 tensors on `device`.
///
/// # Errors
/// [`ModelError::Safetensors`] for malformed bytes (including a header that lies about sizes),
/// [`ModelError::Dtype`] for dtypes other than F32/F64, or a tensor with NaN or Inf
/// ([`ModelError::Name`]).
pub fn state_from_safetensors(bytes: &[u8], device: Device) -> Result<StateDict, ModelError> {
    let out = tensors_from_safetensors(bytes, device)?;
    if let Some((name, t)) = out.iter().find(|(_, t)| t.kind() == Kind::Int64) {
        return Err(ModelError::Dtype {
            name: name.clone(),
            dtype: format!("{:?}", t.kind()),
        });
    }
    Ok(out)
}

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
        Architecture::BertClassifier(c) => {
            let (ids, mask) = (take("input_ids")?, take("attention_mask")?);
            for (n, v) in [("input_ids", &ids), ("attention_mask", &mask)] {
                if v.kind() != Kind::Int64 {
                    return Err(ModelError::Dtype {
                        name: n.into(),
                        dtype: format!("{:?}", v.kind()),
                    });
                }
            }
            let s = ids.size();
            if s.len() != 2
                || s[0] == 0
                || s[1] == 0
                || s[1] > c.bert.max_position_embeddings as i64
            {
                return Err(shape_err(
                    "input_ids",
                    vec![-1, c.bert.max_position_embeddings as i64],
                    s,
                ));
            }
            if mask.size() != s {
                return Err(shape_err("attention_mask", s, mask.size()));
            }
            check_range("input_ids", &ids, c.bert.vocab_size as i64)?;
            check_range("attention_mask", &mask, 2)?;
            Input::Tokens { ids, mask }
        }
    };
    let y = t.remove("y");
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

pub(crate) fn tensors_from_safetensors(
    bytes: &[u8],
    device: Device,
) -> Result<StateDict, ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors(e.to_string()))?;
    let mut out = StateDict::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            d => {
                return Err(ModelError::Dtype {
                    name,
                    dtype: format!("{d:?}"),
                });
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?.to_device(device);
        if kind != Kind::Int64 && t.numel() > 0 && !bool::try_from(t.isfinite().all())? {
            return Err(ModelError::Name {
                name,
                problem: "contains NaN or infinite values".into(),
            });
        }
        out.insert(name, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_f64() {
        let mut s = StateDict::new();
        s.insert(
            "a".into(),
            Tensor::randn([3, 4], (Kind::Float, Device::Cpu)),
        );
        s.insert("b".into(), Tensor::randn([5], (Kind::Double, Device::Cpu)));
        let bytes = state_to_safetensors(&s).unwrap();
        let back = state_from_safetensors(&bytes, Device::Cpu).unwrap();
        for (k, v) in &s {
            assert_eq!(back[k].kind(), v.kind());
            assert!(back[k].equal(v), "{k}");
        }
    }

    #[test]
    fn metadata_round_trips_and_stays_optional() {
        let mut s = StateDict::new();
        s.insert("a".into(), Tensor::from_slice(&[1.0f32, 2.0]));
        let meta: BTreeMap<String, String> = [("k".to_owned(), "{\"v\":1}".to_owned())].into();
        let bytes = state_to_safetensors_with(&s, &meta).unwrap();
        assert_eq!(safetensors_metadata(&bytes).unwrap(), meta);
        assert!(state_from_safetensors(&bytes, Device::Cpu).unwrap()["a"].equal(&s["a"]));
        let plain = state_to_safetensors(&s).unwrap();
        assert!(safetensors_metadata(&plain).unwrap().is_empty());
        assert!(safetensors_metadata(b"garbage").is_err());
    }

    #[test]
    fn rejects_nan_and_garbage() {
        let mut s = StateDict::new();
        s.insert("a".into(), Tensor::from_slice(&[1.0f32, f32::NAN]));
        let bytes = state_to_safetensors(&s).unwrap();
        assert!(state_from_safetensors(&bytes, Device::Cpu).is_err());
        assert!(state_from_safetensors(b"not safetensors", Device::Cpu).is_err());
    }
}
