//! A state dict checked against an architecture before any forward pass reads it.

use std::collections::BTreeMap;

use tch::Tensor;

use crate::ModelError;
use crate::keyspec::StateDict;

/// A borrowed state dict whose names and shapes were checked against an architecture's
/// parameter shapes ([`crate::MlpConfig::check_state`], [`crate::BertClassifierConfig::check_state`],
/// [`crate::Architecture::check_state`]). The forward passes take this instead of a bare
/// [`StateDict`], so a missing or misshapen tensor is an error at the boundary rather than a
/// panic inside a layer.
#[derive(Clone, Copy, Debug)]
pub struct Checked<'a>(&'a StateDict);

impl<'a> Checked<'a> {
    /// Check that `state` holds exactly the tensors of `shapes` (no more, no fewer) with those
    /// shapes; `architecture` names the model in the error.
    ///
    /// # Errors
    /// [`ModelError::Name`] for the first missing or unexpected tensor, [`ModelError::Shape`]
    /// for the first tensor of the wrong shape.
    pub fn new(
        shapes: &BTreeMap<String, Vec<i64>>,
        state: &'a StateDict,
        architecture: &str,
    ) -> Result<Self, ModelError> {
        for (name, expected) in shapes {
            let t = state.get(name).ok_or_else(|| ModelError::Name {
                name: name.clone(),
                problem: format!("is missing (a {architecture} model needs it)"),
            })?;
            if &t.size() != expected {
                return Err(ModelError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: t.size(),
                });
            }
        }
        if let Some(name) = state.keys().find(|n| !shapes.contains_key(*n)) {
            return Err(ModelError::Name {
                name: name.clone(),
                problem: format!("is not a parameter of {architecture}"),
            });
        }
        Ok(Self(state))
    }

    /// A state dict this crate checked when it took it in (a [`crate::Model`]'s own
    /// parameters, whose names and shapes never change).
    pub(crate) fn trusted(state: &'a StateDict) -> Self {
        Self(state)
    }

    /// The tensor `name`.
    ///
    /// # Panics
    /// Only on a programming error: a forward pass reading a tensor that its own config's
    /// shapes do not list (the check ran against those shapes).
    pub fn get(self, name: &str) -> &'a Tensor {
        self.0.get(name).unwrap_or_else(|| {
            panic!("checked state has no `{name}`: the forward pass and the shapes disagree")
        })
    }

    /// The underlying state dict.
    pub fn state(self) -> &'a StateDict {
        self.0
    }
}

/// The largest `max |a − b| / max |b|` over the tensors `b` holds, with that tensor's name:
/// how far `a` (e.g. a decrypted EE model after training) is from `b` (the same training in
/// plaintext), relative to each tensor's scale. A tensor `a` lacks counts as infinitely far.
pub fn largest_relative_difference(a: &StateDict, b: &StateDict) -> (f64, String) {
    let mut worst = (0f64, String::new());
    for (name, w) in b {
        let rel = a.get(name).map_or(f64::INFINITY, |d| {
            let scale = w.abs().max().double_value(&[]).max(1e-12);
            (d.to_kind(w.kind()) - w).abs().max().double_value(&[]) / scale
        });
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    worst
}
