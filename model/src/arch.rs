//! Every architecture behind one [`Architecture`]: the dispatcher over the leaf layers
//! ([`crate::mlp`], [`crate::bert`]). The trainer uses this: it only needs the architecture
//! and its config, never keys.

use std::collections::BTreeMap;

use crate::keyspec::{KeySpec, StateDict};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::ModelError;
use crate::bert::{self, BertClassifierConfig};
use crate::llama::{self, LlamaConfig};
use crate::mlp::{self, MlpConfig};
use crate::state::Checked;

/// An architecture and its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture", content = "config", rename_all = "kebab-case")]
pub enum Architecture {
    /// MLP on feature vectors.
    Mlp(MlpConfig),
    /// BERT encoder + mean pooling + linear head on token ids.
    BertClassifier(BertClassifierConfig),
    /// Llama-family causal LM on token ids: logits over the vocabulary at every position.
    Llama(LlamaConfig),
}

/// A batch of model inputs.
#[derive(Debug)]
pub enum Input {
    /// `(batch, in_features)` floats.
    Features(Tensor),
    /// `ids`, `mask`: `(batch, seq)` int64.
    Tokens { ids: Tensor, mask: Tensor },
    /// Client-side embeddings of a BERT classifier: `x (batch, seq, hidden)` float, the
    /// output of the embedding layer ([`crate::bert::embed`], positions already added, token
    /// order possibly shuffled), and `mask (batch, seq)` int64 in the same order. The server
    /// runs only the encoder layers and the head; it receives no token ids.
    Embedded { x: Tensor, mask: Tensor },
}

impl Input {
    /// Number of examples.
    pub fn len(&self) -> i64 {
        match self {
            Input::Features(x) => x.size()[0],
            Input::Tokens { ids, .. } => ids.size()[0],
            Input::Embedded { x, .. } => x.size()[0],
        }
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Architecture {
    /// Name used on the wire and in key specs.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Mlp(_) => MlpConfig::ARCHITECTURE,
            Architecture::BertClassifier(_) => BertClassifierConfig::ARCHITECTURE,
            Architecture::Llama(_) => LlamaConfig::ARCHITECTURE,
        }
    }

    /// Parameter shapes by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        match self {
            Architecture::Mlp(c) => c.shapes(),
            Architecture::BertClassifier(c) => c.shapes(),
            Architecture::Llama(c) => c.shapes(),
        }
    }

    /// Number of classes (a causal LM's: its vocabulary).
    pub fn num_classes(&self) -> usize {
        match self {
            Architecture::Mlp(c) => c.out_features,
            Architecture::BertClassifier(c) => c.num_labels,
            Architecture::Llama(c) => c.vocab_size,
        }
    }

    /// The EE key spec.
    pub fn key_spec(&self) -> KeySpec {
        match self {
            Architecture::Mlp(c) => c.key_spec(),
            Architecture::BertClassifier(c) => c.key_spec(),
            Architecture::Llama(c) => c.key_spec(),
        }
    }

    /// Key groups of a profile, to pass to `KeySet::generate` (an MLP's keys take their
    /// defaults whatever the profile).
    pub fn key_groups(&self, profile: crate::Profile) -> BTreeMap<String, crate::KeyGroup> {
        match self {
            Architecture::Mlp(_) => BTreeMap::new(),
            Architecture::BertClassifier(c) => c.key_groups(profile),
            Architecture::Llama(c) => c.key_groups(profile),
        }
    }

    /// Check `state` against this architecture: exactly its tensors, with its shapes.
    ///
    /// # Errors
    /// [`ModelError::Name`]/[`ModelError::Shape`] naming the first tensor that does not fit.
    pub fn check_state<'a>(&self, state: &'a StateDict) -> Result<Checked<'a>, ModelError> {
        Checked::new(&self.shapes(), state, self.name())
    }

    /// Validate the configuration (dimensions, number of classes).
    ///
    /// # Errors
    /// [`ModelError::Config`] naming the bad value.
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            Architecture::Mlp(c) => c.validate(),
            Architecture::BertClassifier(c) => c.validate(),
            Architecture::Llama(c) => c.validate(),
        }
    }

    /// The configuration alone as JSON (what a trainer job carries next to [`Self::name`]).
    pub fn config_json(&self) -> String {
        match self {
            Architecture::Mlp(c) => serde_json::to_string(c),
            Architecture::BertClassifier(c) => serde_json::to_string(c),
            Architecture::Llama(c) => serde_json::to_string(c),
        }
        .expect("configs serialize")
    }

    /// The architecture named `name` with the configuration `config_json` (the inverse of
    /// [`Self::name`] and [`Self::config_json`]), validated.
    ///
    /// # Errors
    /// [`ModelError::Config`] for an unknown name, a config that does not parse (naming the
    /// field), or one that fails [`Self::validate`].
    pub fn from_parts(name: &str, config_json: &str) -> Result<Self, ModelError> {
        let config: serde_json::Value = serde_json::from_str(config_json)
            .map_err(|e| ModelError::Config(format!("config of `{name}` is not JSON: {e}")))?;
        let tagged = serde_json::json!({ "architecture": name, "config": config });
        let arch: Self = serde_json::from_value(tagged)
            .map_err(|e| ModelError::Config(format!("architecture `{name}`: {e}")))?;
        arch.validate()?;
        Ok(arch)
    }

    /// Logits `(batch, classes)` of a state dict of this architecture (plaintext or EE),
    /// checked by [`Self::check_state`]; for a causal LM `(batch, seq, vocabulary)`, the
    /// next-token logits at every position.
    ///
    /// # Errors
    /// [`ModelError::Config`] if the input kind does not fit the architecture.
    pub fn forward(&self, state: Checked<'_>, input: &Input) -> Result<Tensor, ModelError> {
        match (self, input) {
            (Architecture::Mlp(c), Input::Features(x)) => Ok(mlp::forward(c, state, x)),
            (Architecture::BertClassifier(c), Input::Tokens { ids, mask }) => {
                Ok(bert::classify(c, state, ids, mask))
            }
            (Architecture::BertClassifier(c), Input::Embedded { x, mask }) => {
                Ok(bert::classify_embedded(c, state, x, mask))
            }
            (Architecture::Llama(c), Input::Tokens { ids, .. }) => llama::logits(c, state, ids),
            (a, _) => Err(ModelError::Config(format!(
                "wrong input kind for {}",
                a.name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlp::Activation;
    use tch::{Device, Kind};

    fn mlp() -> Architecture {
        Architecture::Mlp(MlpConfig {
            in_features: 3,
            hidden: vec![4, 2],
            out_features: 2,
            activation: Activation::Relu,
        })
    }

    #[test]
    fn parts_round_trip_and_bad_parts_are_named() {
        let a = mlp();
        assert_eq!(
            Architecture::from_parts(a.name(), &a.config_json()).unwrap(),
            a
        );
        let err = |name: &str, json: &str| {
            Architecture::from_parts(name, json)
                .unwrap_err()
                .to_string()
        };
        let e = err("resnet", &a.config_json());
        assert!(e.contains("resnet") && e.contains("mlp"), "{e}");
        let e = err(
            "mlp",
            r#"{"in_features":3,"hidden":[4],"out_features":2,"activation":"relu","extra":1}"#,
        );
        assert!(e.contains("extra"), "{e}");
        let e = err(
            "mlp",
            r#"{"in_features":3,"hidden":[4],"out_features":1,"activation":"relu"}"#,
        );
        assert!(e.contains("out_features"), "{e}");
        assert!(err("mlp", "not json").contains("not JSON"));
    }

    #[test]
    fn forward_needs_a_checked_state_and_the_check_names_the_tensor() {
        let a = mlp();
        let state: StateDict = a
            .shapes()
            .into_iter()
            .map(|(n, s)| (n, Tensor::randn(&s, (Kind::Float, Device::Cpu))))
            .collect();
        let x = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let logits = a
            .forward(a.check_state(&state).unwrap(), &Input::Features(x))
            .unwrap();
        assert_eq!(logits.size(), [5, 2]);

        let copy =
            |s: &StateDict| -> StateDict { s.iter().map(|(k, v)| (k.clone(), v.copy())).collect() };
        let mut missing = copy(&state);
        missing.remove("fc2.weight");
        let e = a.check_state(&missing).err().unwrap().to_string();
        assert!(e.contains("fc2.weight") && e.contains("missing"), "{e}");

        let mut wrong = copy(&state);
        wrong.insert(
            "fc3.bias".into(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        );
        let e = a.check_state(&wrong).err().unwrap().to_string();
        assert!(
            e.contains("fc3.bias") && e.contains("[2]") && e.contains("[3]"),
            "{e}"
        );

        let mut extra = state;
        extra.insert(
            "fc9.bias".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        );
        let e = a.check_state(&extra).err().unwrap().to_string();
        assert!(
            e.contains("fc9.bias") && e.contains("not a parameter"),
            "{e}"
        );
    }
}
