//! Model updates as flat f32 tensors, read with the `safetensors` crate (no libtorch).

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::AggregatorError;

/// A model or update: named f32 tensors in name order.
///
/// Shapes are row-major; `data[i].len() == shapes[i].iter().product()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensors {
    /// Tensor names, sorted.
    pub names: Vec<String>,
    /// Shape of each tensor.
    pub shapes: Vec<Vec<usize>>,
    /// Values of each tensor.
    pub data: Vec<Vec<f32>>,
}

impl Tensors {
    /// Parse safetensors bytes holding only F32 tensors with finite values.
    ///
    /// # Errors
    /// [`AggregatorError::InvalidUpdate`] for malformed bytes (including headers that lie about
    /// sizes), non-F32 dtypes, or NaN/Inf values, naming the tensor.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, AggregatorError> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| AggregatorError::InvalidUpdate(format!("not valid safetensors: {e}")))?;
        let mut entries = st.tensors();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Tensors {
            names: vec![],
            shapes: vec![],
            data: vec![],
        };
        for (name, view) in entries {
            if view.dtype() != Dtype::F32 {
                return Err(AggregatorError::InvalidUpdate(format!(
                    "tensor `{name}` has dtype {:?}; updates must be F32",
                    view.dtype()
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                return Err(AggregatorError::InvalidUpdate(format!(
                    "tensor `{name}` has a non-finite value ({}) at flat index {i}",
                    data[i]
                )));
            }
            out.names.push(name);
            out.shapes.push(view.shape().to_vec());
            out.data.push(data);
        }
        Ok(out)
    }

    /// Serialize to safetensors bytes.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let bytes: Vec<Vec<u8>> = self
            .data
            .iter()
            .map(|d| d.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = self
            .names
            .iter()
            .zip(&self.shapes)
            .zip(&bytes)
            .map(|((n, s), b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).expect("consistent tensor"),
                )
            });
        safetensors::serialize(views, None).expect("serializing f32 tensors cannot fail")
    }

    /// Check that `self` has exactly the names and shapes of `reference`.
    ///
    /// # Errors
    /// [`AggregatorError::InvalidUpdate`] naming the first missing, unexpected or misshapen
    /// tensor.
    pub fn check_layout(&self, reference: &Tensors) -> Result<(), AggregatorError> {
        for (name, shape) in reference.names.iter().zip(&reference.shapes) {
            match self.names.iter().position(|n| n == name) {
                None => {
                    return Err(AggregatorError::InvalidUpdate(format!(
                        "tensor `{name}` is missing (expected shape {shape:?})"
                    )));
                }
                Some(i) if &self.shapes[i] != shape => {
                    return Err(AggregatorError::InvalidUpdate(format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?}",
                        self.shapes[i]
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = self.names.iter().find(|n| !reference.names.contains(n)) {
            return Err(AggregatorError::InvalidUpdate(format!(
                "tensor `{extra}` is not part of the global model"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(names: &[&str], shapes: &[Vec<usize>], data: Vec<Vec<f32>>) -> Tensors {
        Tensors {
            names: names.iter().map(|s| s.to_string()).collect(),
            shapes: shapes.to_vec(),
            data,
        }
    }

    #[test]
    fn round_trip_and_layout_checks() {
        let a = t(
            &["a", "b"],
            &[vec![2], vec![1, 2]],
            vec![vec![1.0, 2.0], vec![3.0, 4.0]],
        );
        let back = Tensors::from_safetensors(&a.to_safetensors()).unwrap();
        assert_eq!(back, a);
        a.check_layout(&a).unwrap();
        let wrong_shape = t(
            &["a", "b"],
            &[vec![2], vec![2, 1]],
            vec![vec![1.0, 2.0], vec![3.0, 4.0]],
        );
        assert!(
            wrong_shape
                .check_layout(&a)
                .unwrap_err()
                .to_string()
                .contains("`b`")
        );
        let wrong_name = t(
            &["a", "c"],
            &[vec![2], vec![1, 2]],
            vec![vec![1.0, 2.0], vec![3.0, 4.0]],
        );
        assert!(wrong_name.check_layout(&a).is_err());
        let nan = t(&["a"], &[vec![2]], vec![vec![1.0, f32::NAN]]);
        assert!(
            Tensors::from_safetensors(&nan.to_safetensors())
                .unwrap_err()
                .to_string()
                .contains("non-finite")
        );
        assert!(Tensors::from_safetensors(b"\x10\0\0\0\0\0\0\0{}").is_err());
    }
}
