//! State dicts (name → tensor) to and from safetensors bytes.
//!
//! Only F32 and F64 tensors are written or accepted. Tensors are moved to the CPU for writing.

use fedee_encrypt::StateDict;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tch::{Device, Kind, Tensor};

use crate::ModelError;

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
    safetensors::serialize(views, None).map_err(|e| ModelError::Safetensors(e.to_string()))
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

/// A batch for the trainer: `x (batch, in_features)` f32/f64 and optional labels
/// `y (batch,)` i64, as safetensors bytes.
///
/// # Errors
/// [`ModelError::Dtype`] for other dtypes.
pub fn batch_to_safetensors(x: &Tensor, y: Option<&Tensor>) -> Result<Vec<u8>, ModelError> {
    let mut s = StateDict::new();
    s.insert("x".into(), x.shallow_clone());
    if let Some(y) = y {
        s.insert("y".into(), y.shallow_clone());
    }
    state_to_safetensors(&s)
}

/// Parse a batch written by [`batch_to_safetensors`], checking `x` is `(batch, in_features)`
/// float and `y`, if present, is `(batch,)` i64 with classes in `0..num_classes`.
///
/// # Errors
/// [`ModelError::Name`], [`ModelError::Shape`] or [`ModelError::Dtype`] naming the problem.
pub fn batch_from_safetensors(
    bytes: &[u8],
    device: Device,
    in_features: usize,
    num_classes: usize,
) -> Result<(Tensor, Option<Tensor>), ModelError> {
    let mut t = tensors_from_safetensors(bytes, device)?;
    let x = t.remove("x").ok_or_else(|| ModelError::Name {
        name: "x".into(),
        problem: "is missing from the batch".into(),
    })?;
    if x.kind() == Kind::Int64 {
        return Err(ModelError::Dtype {
            name: "x".into(),
            dtype: "I64".into(),
        });
    }
    let s = x.size();
    if s.len() != 2 || s[1] != in_features as i64 || s[0] == 0 {
        return Err(ModelError::Shape {
            name: "x".into(),
            expected: vec![-1, in_features as i64],
            found: s,
        });
    }
    let y = t.remove("y");
    if let Some(y) = &y {
        if y.kind() != Kind::Int64 {
            return Err(ModelError::Dtype {
                name: "y".into(),
                dtype: format!("{:?}", y.kind()),
            });
        }
        if y.size() != [s[0]] {
            return Err(ModelError::Shape {
                name: "y".into(),
                expected: vec![s[0]],
                found: y.size(),
            });
        }
        let (lo, hi) = (y.min().int64_value(&[]), y.max().int64_value(&[]));
        if lo < 0 || hi >= num_classes as i64 {
            return Err(ModelError::Name {
                name: "y".into(),
                problem: format!(
                    "has class {} outside 0..{num_classes}",
                    if lo < 0 { lo } else { hi }
                ),
            });
        }
    }
    if let Some(extra) = t.keys().next() {
        return Err(ModelError::Name {
            name: extra.clone(),
            problem: "is not part of a batch (x, y)".into(),
        });
    }
    Ok((x, y))
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
    fn rejects_nan_and_garbage() {
        let mut s = StateDict::new();
        s.insert("a".into(), Tensor::from_slice(&[1.0f32, f32::NAN]));
        let bytes = state_to_safetensors(&s).unwrap();
        assert!(state_from_safetensors(&bytes, Device::Cpu).is_err());
        assert!(state_from_safetensors(b"not safetensors", Device::Cpu).is_err());
    }
}
