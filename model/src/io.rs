//! State dicts (name → tensor) to and from safetensors bytes.
//!
//! Only F32 and F64 tensors are written or accepted. Tensors are moved to the CPU for writing.

use std::collections::BTreeMap;

use crate::keyspec::StateDict;
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
    Ok(safetensors::serialize(views, metadata)?)
}

/// The string metadata of safetensors bytes (`__metadata__`; empty when there is none).
///
/// # Errors
/// [`ModelError::Safetensors`] for a malformed header.
pub fn safetensors_metadata(bytes: &[u8]) -> Result<BTreeMap<String, String>, ModelError> {
    let (_, meta) = SafeTensors::read_metadata(bytes)?;
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

pub(crate) fn tensors_from_safetensors(
    bytes: &[u8],
    device: Device,
) -> Result<StateDict, ModelError> {
    let st = SafeTensors::deserialize(bytes)?;
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
