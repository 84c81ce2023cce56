//! Key sets, and the one generic transform `W' = R · W · C⁻¹` over a model's key spec
//! (`fedee_model::keyspec`).

use std::collections::BTreeMap;
use std::path::Path;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{EncryptError, Key};
use fedee_model::keyspec::{InputKind, KeyDecl, KeyGroup, KeySpec, Optimizer, StateDict};

/// The secret material for one key spec.
///
/// # Security
/// Never send a `KeySet` to the aggregator or the trainer. `Debug` omits all material.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySet {
    /// Architecture the keys were generated for.
    pub architecture: String,
    /// Keys by name.
    pub keys: BTreeMap<String, Key>,
    /// Optional input offset δ (`x' = T x + δ`); inference only.
    #[serde(default)]
    pub input_offset: Option<Vec<f64>>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("architecture", &self.architecture)
            .field("keys", &self.keys.values().collect::<Vec<_>>())
            .field(
                "input_offset",
                &self.input_offset.as_ref().map(|_| "<secret>"),
            )
            .finish()
    }
}

impl KeySet {
    /// Generate keys for `spec`. `groups` overrides the group of named keys (default: the first
    /// group the spec allows, a permutation). `offset` adds a random input offset δ.
    ///
    /// # Errors
    /// [`EncryptError::GroupNotAllowed`] for an override the architecture does not allow, or
    /// [`EncryptError::MissingKey`] for an override naming no declared key.
    pub fn generate<R: Rng + ?Sized>(
        spec: &KeySpec,
        groups: &BTreeMap<String, KeyGroup>,
        offset: bool,
        rng: &mut R,
    ) -> Result<KeySet, EncryptError> {
        if let Some(name) = groups.keys().find(|n| !spec.keys.contains_key(*n)) {
            return Err(EncryptError::MissingKey(name.clone()));
        }
        if offset && spec.input_layer.is_none() {
            return Err(EncryptError::InvalidKey {
                key: "input_offset".into(),
                problem: format!(
                    "the `{}` architecture takes no input offset",
                    spec.architecture
                ),
            });
        }
        let mut keys = BTreeMap::new();
        let mut head_perms: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let shuffled = |n: usize, rng: &mut R| {
            let mut p: Vec<usize> = (0..n).collect();
            rand::seq::SliceRandom::shuffle(p.as_mut_slice(), rng);
            p
        };
        // Keys on their own heads first; keys that follow another key's heads after it.
        let (followers, bases): (Vec<_>, Vec<_>) = spec
            .keys
            .iter()
            .partition(|(_, d)| d.heads.as_ref().is_some_and(|h| h.follows.is_some()));
        for (name, decl) in bases {
            let group = groups.get(name).copied().unwrap_or(decl.allowed[0]);
            check_allowed(name, group, decl)?;
            let key = match &decl.heads {
                None => Key::generate(name, decl.dim, group, rng),
                Some(h) => {
                    if !head_perms.contains_key(&h.group) {
                        let p = shuffled(h.count, rng);
                        head_perms.insert(h.group.clone(), p);
                    }
                    let hp = &head_perms[&h.group];
                    if h.rotary {
                        rotary_key(name, decl, h.count, hp, group, rng)
                    } else {
                        Key::generate_blocked(name, decl.dim, h.count, hp, group, rng)
                    }
                }
            };
            keys.insert(name.clone(), key);
        }
        let mut within: BTreeMap<String, Vec<Vec<usize>>> = BTreeMap::new();
        for (name, decl) in followers {
            let (h, base_name, base_count) = follower(spec, name, decl)?;
            let g = h.count / base_count;
            if !within.contains_key(&h.group) {
                let w = (0..base_count).map(|_| shuffled(g, rng)).collect();
                within.insert(h.group.clone(), w);
            }
            let key = keys[base_name].follow(name, base_count, h.count, &within[&h.group]);
            check_allowed(name, key.group(), decl)?;
            keys.insert(name.clone(), key);
        }
        let input_offset = offset.then(|| {
            let dim = spec.keys[&spec.input].dim;
            (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect()
        });
        Ok(KeySet {
            architecture: spec.architecture.clone(),
            keys,
            input_offset,
        })
    }

    /// Check this key set fits `spec`: every key present, right dimension and allowed group,
    /// valid material.
    ///
    /// # Errors
    /// The first problem found.
    pub fn check(&self, spec: &KeySpec) -> Result<(), EncryptError> {
        let mut head_perms: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (name, decl) in &spec.keys {
            let key = self.key(name)?;
            if key.dim != decl.dim {
                return Err(EncryptError::InvalidKey {
                    key: name.clone(),
                    problem: format!(
                        "dimension {} does not match the model's {}",
                        key.dim, decl.dim
                    ),
                });
            }
            check_allowed(name, key.group(), decl)?;
            key.validate()?;
            if let Some(h) = &decl.heads {
                check_head_structure(spec, self, name, decl, h.count)?;
                let map = key
                    .head_map(h.count)
                    .ok_or_else(|| EncryptError::InvalidKey {
                        key: name.clone(),
                        problem: format!(
                            "must be block-diagonal over {} heads up to a head permutation",
                            h.count
                        ),
                    })?;
                if let Some(other) = head_perms.insert(h.group.as_str(), map.clone())
                    && other != map
                {
                    return Err(EncryptError::InvalidKey {
                        key: name.clone(),
                        problem: format!(
                            "moves heads differently from the other keys of head group `{}` (Q/K and V/O keys of a layer must share the head permutation)",
                            h.group
                        ),
                    });
                }
            }
        }
        if let Some(off) = &self.input_offset {
            let dim = spec.keys[&spec.input].dim;
            if off.len() != dim || off.iter().any(|x| !x.is_finite()) {
                return Err(EncryptError::InvalidKey {
                    key: "input_offset".into(),
                    problem: format!("must be {dim} finite numbers"),
                });
            }
        }
        Ok(())
    }

    fn key(&self, name: &str) -> Result<&Key, EncryptError> {
        self.keys
            .get(name)
            .ok_or_else(|| EncryptError::MissingKey(name.to_owned()))
    }

    /// Write the key set to `path` as JSON, permissions 0600, atomically (temporary file,
    /// fsync, rename, folder fsync); an existing file is replaced only when `replace`.
    ///
    /// # Errors
    /// [`EncryptError::Exists`] for an existing file without `replace`; [`EncryptError::Io`].
    ///
    /// # Security
    /// The file holds the secret keys: never send it to the aggregator or the trainer.
    pub fn save(&self, path: &Path, replace: bool) -> Result<(), EncryptError> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        if !replace && path.exists() {
            return Err(EncryptError::Exists(path.display().to_string()));
        }
        let io = |source| EncryptError::Io {
            path: path.display().to_string(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).expect("key sets serialize");
        let mut f = atomic_write_file::AtomicWriteFile::open(path).map_err(io)?;
        f.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.commit().map_err(io)
    }

    /// Read a key set written by [`KeySet::save`].
    ///
    /// # Errors
    /// [`EncryptError::Io`] or [`EncryptError::Parse`].
    pub fn load(path: &Path) -> Result<KeySet, EncryptError> {
        let bytes = std::fs::read(path).map_err(|source| EncryptError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| EncryptError::Parse {
            path: path.display().to_string(),
            source,
        })
    }
}

/// A rotary key (RoPE heads): heads move whole; each block is the identity for index groups
/// and a RoPE-commuting factor ([`Key::generate_rotary`]) for dense ones.
fn rotary_key<R: Rng + ?Sized>(
    name: &str,
    decl: &KeyDecl,
    count: usize,
    head_perm: &[usize],
    group: KeyGroup,
    rng: &mut R,
) -> Key {
    let hd = decl.dim / count;
    let blocks: Vec<Key> = match group {
        KeyGroup::Orthogonal | KeyGroup::Invertible => (0..count)
            .map(|_| Key::generate_rotary(name, hd, group, rng))
            .collect(),
        _ => vec![Key::identity(name, hd, group); count],
    };
    Key::blocked(name, decl.dim, head_perm, &blocks)
}

/// A follower key's heads, the key it follows, and that key's head count.
fn follower<'a>(
    spec: &'a KeySpec,
    name: &str,
    decl: &'a KeyDecl,
) -> Result<(&'a fedee_model::keyspec::Heads, &'a String, usize), EncryptError> {
    let h = decl.heads.as_ref().expect("a follower has heads");
    let base = h.follows.as_ref().expect("a follower follows");
    let bad = |problem: String| EncryptError::InvalidKey {
        key: name.to_owned(),
        problem,
    };
    let bh = spec
        .keys
        .get(base)
        .and_then(|d| d.heads.as_ref())
        .ok_or_else(|| {
            bad(format!(
                "follows `{base}`, which is not a head-structured key"
            ))
        })?;
    if bh.follows.is_some() || bh.count == 0 || !h.count.is_multiple_of(bh.count) {
        return Err(bad(format!(
            "follows `{base}` ({} heads), which must be a key of its own whose head count divides {}",
            bh.count, h.count
        )));
    }
    Ok((h, base, bh.count))
}

/// The head structure [`KeySet::generate`] gives: rotary keys move heads whole; a follower
/// keeps every query head in its KV head's group with that KV head's block.
fn check_head_structure(
    spec: &KeySpec,
    keys: &KeySet,
    name: &str,
    decl: &KeyDecl,
    count: usize,
) -> Result<(), EncryptError> {
    let h = decl.heads.as_ref().expect("heads");
    let key = keys.key(name)?;
    let bad = |problem: String| EncryptError::InvalidKey {
        key: name.to_owned(),
        problem,
    };
    if h.rotary {
        let (_, blocks) = key
            .blocks(count)
            .ok_or_else(|| bad(format!("must be block-diagonal over {count} heads")))?;
        if !blocks.iter().all(Key::is_rotary_block) {
            return Err(bad(
                "mixes values inside a rotary head (RoPE pairs cannot be permuted or mixed)".into(),
            ));
        }
    }
    if h.follows.is_some() {
        let (h, base_name, base_count) = follower(spec, name, decl)?;
        let g = h.count / base_count;
        let base = keys.key(base_name)?;
        let (base_map, _) = base
            .blocks(base_count)
            .ok_or_else(|| bad(format!("follows `{base_name}`, which is not head-blocked")))?;
        let map = key
            .head_map(h.count)
            .ok_or_else(|| bad(format!("must be block-diagonal over {} heads", h.count)))?;
        let within = (0..base_count)
            .map(|k| {
                (0..g)
                    .map(|j| {
                        map[k * g + j]
                            .checked_sub(base_map[k] * g)
                            .filter(|&w| w < g)
                            .ok_or_else(|| {
                                bad(format!(
                                    "moves query head {} out of the group of key/value head {} (a query head must stay with its keys and values)",
                                    map[k * g + j],
                                    base_map[k]
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        if key.material != base.follow(name, base_count, h.count, &within).material {
            return Err(bad(format!(
                "its head blocks are not those of `{base_name}`"
            )));
        }
    }
    Ok(())
}

fn check_allowed(name: &str, group: KeyGroup, decl: &KeyDecl) -> Result<(), EncryptError> {
    if decl.allowed.contains(&group) {
        return Ok(());
    }
    Err(EncryptError::GroupNotAllowed {
        key: name.to_owned(),
        group,
        allowed: decl
            .allowed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        why: decl.why.clone(),
    })
}

fn check_names(spec: &KeySpec, state: &StateDict) -> Result<(), EncryptError> {
    if let Some(name) = state.keys().find(|n| !spec.params.contains_key(*n)) {
        return Err(EncryptError::Parameter {
            name: name.clone(),
            problem: format!(
                "is not in the `{}` key spec (is this the right architecture?)",
                spec.architecture
            ),
        });
    }
    if let Some(name) = spec.params.keys().find(|n| !state.contains_key(*n)) {
        return Err(EncryptError::Parameter {
            name: name.clone(),
            problem: "is in the key spec but missing from the model".into(),
        });
    }
    Ok(())
}

/// Apply every key (no offset) to every parameter.
fn apply_keys(spec: &KeySpec, keys: &KeySet, state: &StateDict) -> Result<StateDict, EncryptError> {
    check_names(spec, state)?;
    let mut out = StateDict::new();
    for (name, t) in state {
        let axes = &spec.params[name];
        if axes.len() != t.dim() {
            return Err(EncryptError::Parameter {
                name: name.clone(),
                problem: format!(
                    "has {} axes, but the key spec describes {}",
                    t.dim(),
                    axes.len()
                ),
            });
        }
        let mut t = t.shallow_clone();
        for (axis, kref) in axes.iter().enumerate() {
            let Some(kref) = kref else { continue };
            let key = keys.key(&kref.key)?;
            let perm;
            let key = if kref.permutation {
                perm = key.permutation_part();
                &perm
            } else {
                key
            };
            let found = t.size()[axis];
            if found != key.dim as i64 {
                return Err(EncryptError::Shape {
                    name: name.clone(),
                    axis,
                    key: kref.key.clone(),
                    expected: key.dim,
                    found,
                });
            }
            // Row axis: K. Column axes: K⁻ᵀ. A dual reference flips that.
            t = if kref.dual != (axis > 0) {
                key.dual().apply(&t, axis)
            } else {
                key.apply(&t, axis)
            };
        }
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// Transform a plaintext state dict into the EE model: every parameter `W' = R W C⁻¹` per the
/// spec, then the input offset folded into the first bias, `b' = R b − W' δ` (SECURITY.md,
/// "The math").
///
/// # Errors
/// Name, axis or shape mismatches between `state`, `spec` and `keys`, each naming the parameter.
pub fn transform_state(
    spec: &KeySpec,
    keys: &KeySet,
    state: &StateDict,
) -> Result<StateDict, EncryptError> {
    keys.check(spec)?;
    let mut out = apply_keys(spec, keys, state)?;
    if let (Some(delta), Some((w, b))) = (&keys.input_offset, &spec.input_layer) {
        let shift = offset_shift(&out[w], delta);
        let nb = &out[b] - shift;
        out.insert(b.clone(), nb);
    }
    Ok(out)
}

/// `W' δ` for an offset δ.
fn offset_shift(w: &Tensor, delta: &[f64]) -> Tensor {
    let d = Tensor::from_slice(delta)
        .to_kind(w.kind())
        .to_device(w.device());
    w.matmul(&d)
}

/// Decrypt an EE state dict back to plaintext: undo the offset fold, then apply every inverse
/// key.
///
/// # Errors
/// As [`transform_state`].
pub fn decrypt_state(
    spec: &KeySpec,
    keys: &KeySet,
    state: &StateDict,
) -> Result<StateDict, EncryptError> {
    keys.check(spec)?;
    let mut state: StateDict = state
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    if let (Some(delta), Some((w, b))) = (&keys.input_offset, &spec.input_layer) {
        let (Some(wt), Some(bt)) = (state.get(w), state.get(b)) else {
            return Err(EncryptError::Parameter {
                name: w.clone(),
                problem: "missing from the model".into(),
            });
        };
        let nb = bt + offset_shift(wt, delta);
        state.insert(b.clone(), nb);
    }
    let inverse = KeySet {
        architecture: keys.architecture.clone(),
        keys: keys
            .keys
            .iter()
            .map(|(n, k)| (n.clone(), k.inverse()))
            .collect(),
        input_offset: None,
    };
    apply_keys(spec, &inverse, &state)
}

/// Re-key an EE model without retraining: decrypt with `old`, draw fresh keys of the same
/// groups (and an offset if `old` had one) from `rng`, transform. Returns the new keys and the
/// new EE model; `decrypt_state(new_keys, new_model)` equals `decrypt_state(old, ee)` up to
/// float rounding.
///
/// # Security
/// What a server learned about the old key (by frequency analysis or matching) does not carry
/// over to the new one, but the new EE model is again open to weight matching when the base
/// model is public. Every client must switch keys at once: ciphertext under the old key does
/// not work with the new model.
///
/// # Errors
/// As [`transform_state`] and [`decrypt_state`].
pub fn rotate<R: Rng + ?Sized>(
    spec: &KeySpec,
    old: &KeySet,
    ee: &StateDict,
    rng: &mut R,
) -> Result<(KeySet, StateDict), EncryptError> {
    let plain = decrypt_state(spec, old, ee)?;
    let groups = old
        .keys
        .iter()
        .map(|(n, k)| (n.clone(), k.group()))
        .collect();
    let new = KeySet::generate(spec, &groups, old.input_offset.is_some(), rng)?;
    let out = transform_state(spec, &new, &plain)?;
    Ok((new, out))
}

/// Encrypt inputs: `x' = T x + δ` row by row.
///
/// `x`: `(batch, in_features)`, f32 or f64. Returns the same shape and dtype.
///
/// # Security
/// Deterministic: equal rows give equal ciphertext rows. `in_features + 1` known pairs recover
/// `T` and `δ` by one linear solve (SECURITY.md, "Measured attacks").
///
/// # Errors
/// [`EncryptError::Shape`] if the last axis does not match the input key.
pub fn encrypt_inputs(spec: &KeySpec, keys: &KeySet, x: &Tensor) -> Result<Tensor, EncryptError> {
    let key = keys.key(&spec.input)?;
    let axis = last_axis(x, key, "inputs")?;
    let y = key.apply(x, axis);
    Ok(match &keys.input_offset {
        Some(d) => {
            y + Tensor::from_slice(d)
                .to_kind(x.kind())
                .to_device(x.device())
        }
        None => y,
    })
}

/// Decrypt outputs: `z = K_out⁻¹ z'` row by row.
///
/// `z`: `(batch, out_features)` encrypted logits. Returns plaintext logits, same shape.
///
/// # Errors
/// [`EncryptError::Shape`] if the last axis does not match the output key.
pub fn decrypt_outputs(spec: &KeySpec, keys: &KeySet, z: &Tensor) -> Result<Tensor, EncryptError> {
    let key = keys.key(&spec.output)?.inverse();
    let axis = last_axis(z, &key, "outputs")?;
    Ok(key.apply(z, axis))
}

fn last_axis(t: &Tensor, key: &Key, what: &str) -> Result<usize, EncryptError> {
    let axis = t.dim().saturating_sub(1);
    let found = t.size().get(axis).copied().unwrap_or(0);
    if found != key.dim as i64 {
        return Err(EncryptError::Shape {
            name: what.into(),
            axis,
            key: key.name.clone(),
            expected: key.dim,
            found,
        });
    }
    Ok(axis)
}

fn index_perm(keys: &KeySet, name: &str, inverse: bool) -> Result<Tensor, EncryptError> {
    let key = keys.key(name)?;
    let perm = if inverse {
        key.inverse_permutation()
    } else {
        key.permutation().map(<[i64]>::to_vec)
    };
    let perm = perm.ok_or_else(|| EncryptError::InvalidKey {
        key: name.to_owned(),
        problem: format!(
            "indices (labels, token ids) need a permutation key, but this key is {}",
            key.group()
        ),
    })?;
    Ok(Tensor::from_slice(&perm))
}

fn map_indices(
    keys: &KeySet,
    name: &str,
    inverse: bool,
    idx: &Tensor,
) -> Result<Tensor, EncryptError> {
    let perm = index_perm(keys, name, inverse)?.to_device(idx.device());
    let n = perm.size()[0];
    let flat = idx.to_kind(Kind::Int64).reshape([-1]);
    if flat.numel() > 0 {
        let (lo, hi) = (flat.min().int64_value(&[]), flat.max().int64_value(&[]));
        if lo < 0 || hi >= n {
            return Err(EncryptError::InvalidKey {
                key: name.to_owned(),
                problem: format!("index {} is outside 0..{n}", if lo < 0 { lo } else { hi }),
            });
        }
    }
    Ok(perm.index_select(0, &flat).reshape(idx.size()))
}

/// Encrypt token ids under the vocabulary permutation `Π_V` (the encrypted tokenizer's last
/// step): `id' = Π_V⁻¹[id]`, so that the embedding row of `id'` in `E' = Π_V E Pᵀ` is the
/// residual-keyed row of `id`. Special tokens are permuted like every other id.
///
/// `ids`: any shape, int64. Returns the same shape.
///
/// # Security
/// A substitution cipher: equal ids give equal encrypted ids, so token frequencies and
/// positions stay visible (SECURITY.md, "Measured attacks": frequency analysis).
///
/// # Errors
/// [`EncryptError::InvalidKey`] if the input key is not a permutation or an id is out of range.
pub fn encrypt_token_ids(
    spec: &KeySpec,
    keys: &KeySet,
    ids: &Tensor,
) -> Result<Tensor, EncryptError> {
    map_indices(keys, &spec.input, true, ids)
}

/// Encrypt class labels under the output permutation `Π_L`: `y' = Π_L⁻¹[y]`, so that the one-hot
/// vector transforms as `e_{y'} = Π_L e_y` and `CE(Π_L z, y') = CE(z, y)`.
///
/// `y`: `(batch,)` int64 class indices. Returns `(batch,)` int64.
///
/// # Errors
/// [`EncryptError::InvalidKey`] if the output key is not a permutation.
pub fn encrypt_labels(spec: &KeySpec, keys: &KeySet, y: &Tensor) -> Result<Tensor, EncryptError> {
    map_indices(keys, &spec.output, true, y)
}

/// Inverse of [`encrypt_labels`] (e.g. for argmax of encrypted logits): `y = Π_L[y']`.
///
/// # Errors
/// As [`encrypt_labels`].
pub fn decrypt_labels(spec: &KeySpec, keys: &KeySet, y: &Tensor) -> Result<Tensor, EncryptError> {
    map_indices(keys, &spec.output, false, y)
}

/// Refuse a key set under which training with `optimizer` would not stay equivariant
/// (SECURITY.md, "The math"): AdamW needs (signed) permutations on every trained
/// parameter; SGD also accepts orthogonal keys; no optimizer accepts monomial or general
/// invertible keys, or an input offset.
///
/// # Errors
/// [`EncryptError::NotEquivariant`] naming the key, its group, the optimizer and the fix, or
/// [`EncryptError::OffsetInTraining`].
pub fn check_trainable(
    spec: &KeySpec,
    keys: &KeySet,
    optimizer: Optimizer,
) -> Result<(), EncryptError> {
    keys.check(spec)?;
    if keys.input_offset.is_some() {
        return Err(EncryptError::OffsetInTraining);
    }
    let used: std::collections::BTreeSet<&str> = spec
        .params
        .values()
        .flatten()
        .flatten()
        .map(|r| r.key.as_str())
        .collect();
    for name in used {
        let key = keys.key(name)?;
        let group = key.group();
        let ok = match optimizer {
            Optimizer::AdamW => {
                matches!(group, KeyGroup::Permutation | KeyGroup::SignedPermutation)
            }
            Optimizer::Sgd => {
                matches!(
                    group,
                    KeyGroup::Permutation | KeyGroup::SignedPermutation | KeyGroup::Orthogonal
                )
            }
        };
        if !ok {
            let fix = match (optimizer, group) {
                (Optimizer::AdamW, KeyGroup::Orthogonal) => {
                    format!("use a signed permutation for key `{name}`, or train with SGD")
                }
                (Optimizer::AdamW, _) => format!("use a (signed) permutation for key `{name}`"),
                (Optimizer::Sgd, _) => {
                    format!("use a (signed) permutation or an orthogonal key for `{name}`")
                }
            };
            return Err(EncryptError::NotEquivariant {
                key: name.to_owned(),
                group,
                optimizer,
                fix,
            });
        }
    }
    Ok(())
}

/// The equivariance verifier: runs `forward` on the plaintext model and on the EE model with
/// encrypted inputs, decrypts, and returns the max absolute difference of the outputs.
///
/// `forward(state, x)` maps `(batch, in_features)` to `(batch, out_features)`.
///
/// # Errors
/// As [`transform_state`] and [`encrypt_inputs`].
pub fn verify_inference(
    spec: &KeySpec,
    keys: &KeySet,
    state: &StateDict,
    x: &Tensor,
    forward: impl Fn(&StateDict, &Tensor) -> Tensor,
) -> Result<f64, EncryptError> {
    let ee = transform_state(spec, keys, state)?;
    let plain = forward(state, x);
    let x_enc = match spec.input_kind {
        InputKind::Features => encrypt_inputs(spec, keys, x)?,
        InputKind::TokenIds => encrypt_token_ids(spec, keys, x)?,
    };
    let enc = forward(&ee, &x_enc);
    let dec = decrypt_outputs(spec, keys, &enc)?;
    Ok((dec - plain)
        .abs()
        .max()
        .to_kind(Kind::Double)
        .double_value(&[]))
}

/// Encrypt indices (token ids, labels) under the permutation key `key` of `keys`:
/// `i' = K⁻¹[i]`. [`encrypt_token_ids`] and [`encrypt_labels`] are this with the spec's keys.
///
/// # Errors
/// As [`encrypt_token_ids`].
pub fn encrypt_indices(keys: &KeySet, key: &str, idx: &Tensor) -> Result<Tensor, EncryptError> {
    map_indices(keys, key, true, idx)
}
