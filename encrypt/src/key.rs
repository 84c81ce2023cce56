//! One secret key acting on one axis of a tensor.

use rand::Rng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::EncryptError;
use fedee_model::keyspec::KeyGroup;

/// A key's secret material. Convention: `K` acts on a vector as `(K x)[i] = Σ_j K[i][j] x[j]`;
/// for the index-based groups `(K x)[i] = s[i] · x[perm[i]]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum KeyMaterial {
    /// `(P x)[i] = x[perm[i]]`.
    Permutation { perm: Vec<i64> },
    /// `(S x)[i] = signs[i] · x[perm[i]]`, `signs[i] ∈ {−1, +1}`.
    SignedPermutation { perm: Vec<i64>, signs: Vec<f64> },
    /// `(M x)[i] = scales[i] · x[perm[i]]`, `scales[i] > 0`.
    Monomial { perm: Vec<i64>, scales: Vec<f64> },
    /// Dense `n × n` row-major matrix and its inverse (for orthogonal keys, the transpose).
    Dense {
        group: KeyGroup,
        matrix: Vec<f64>,
        inverse: Vec<f64>,
    },
}

/// A named secret key of dimension `dim`.
///
/// # Security
/// `Debug` prints the name, group and dimension only, never the material, so keys cannot reach
/// logs by accident.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Key {
    /// Name of the key in its key spec (e.g. `input`, `hidden`, `label`).
    pub name: String,
    /// Dimension of the axis it acts on.
    pub dim: usize,
    /// Secret material.
    pub material: KeyMaterial,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("name", &self.name)
            .field("group", &self.group())
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

fn invert_perm(perm: &[i64]) -> Vec<i64> {
    let mut inv = vec![0i64; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    inv
}

fn transpose(m: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = m[i * n + j];
        }
    }
    t
}

impl Key {
    /// Draw a random key of `group` and dimension `dim` from `rng` (use a CSPRNG seeded from the
    /// OS outside tests).
    ///
    /// Orthogonal keys are Haar-random (QR of a Gaussian matrix with the sign fix of Mezzadri
    /// 2007). Invertible keys are `Q·D` with `D` diagonal in `[0.5, 2]`, so they stay well
    /// conditioned. Monomial scales are in `[0.5, 2]`.
    pub fn generate<R: Rng + ?Sized>(name: &str, dim: usize, group: KeyGroup, rng: &mut R) -> Key {
        let mut perm: Vec<i64> = (0..dim as i64).collect();
        perm.shuffle(rng);
        let material = match group {
            KeyGroup::Permutation => KeyMaterial::Permutation { perm },
            KeyGroup::SignedPermutation => KeyMaterial::SignedPermutation {
                perm,
                signs: (0..dim)
                    .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                    .collect(),
            },
            KeyGroup::Monomial => KeyMaterial::Monomial {
                perm,
                scales: (0..dim).map(|_| rng.random_range(0.5..2.0)).collect(),
            },
            KeyGroup::Orthogonal | KeyGroup::Invertible => {
                let g: Vec<f64> = (0..dim * dim).map(|_| StandardNormal.sample(rng)).collect();
                let a = Tensor::from_slice(&g).reshape([dim as i64, dim as i64]);
                let (q, r) = Tensor::linalg_qr(&a, "reduced");
                let q = &q * r.diagonal(0, 0, 1).sign().unsqueeze(0);
                let (matrix, inverse) = if group == KeyGroup::Orthogonal {
                    (q.shallow_clone(), q.transpose(0, 1))
                } else {
                    let d: Vec<f64> = (0..dim).map(|_| rng.random_range(0.5..2.0)).collect();
                    let d = Tensor::from_slice(&d);
                    // T = Q·diag(d); T⁻¹ = diag(1/d)·Qᵀ.
                    (
                        &q * d.unsqueeze(0),
                        q.transpose(0, 1) * d.reciprocal().unsqueeze(1),
                    )
                };
                let to_vec = |t: Tensor| -> Vec<f64> {
                    Vec::<f64>::try_from(t.contiguous().reshape([-1])).expect("f64 tensor")
                };
                KeyMaterial::Dense {
                    group,
                    matrix: to_vec(matrix),
                    inverse: to_vec(inverse),
                }
            }
        };
        Key {
            name: name.to_owned(),
            dim,
            material,
        }
    }

    /// Draw a key over `count` heads of `dim / count` units: block-diagonal with one random
    /// `M_h` of `group` per head, composed with the head permutation `head_perm` (slot `s` of
    /// the output holds head `head_perm[s]` of the input). Used for attention keys, whose
    /// Q/K and V/O keys of one layer must share the head permutation.
    ///
    /// # Panics
    /// If `dim` is not a multiple of `count` or `head_perm` is not a permutation of `0..count`.
    pub fn generate_blocked<R: Rng + ?Sized>(
        name: &str,
        dim: usize,
        count: usize,
        head_perm: &[usize],
        group: KeyGroup,
        rng: &mut R,
    ) -> Key {
        assert!(
            count > 0 && dim.is_multiple_of(count) && head_perm.len() == count,
            "bad head layout"
        );
        let blocks: Vec<Key> = (0..count)
            .map(|_| Key::generate(name, dim / count, group, rng))
            .collect();
        Key::blocked(name, dim, head_perm, &blocks)
    }

    /// The key whose slot `s` holds head `head_perm[s]` of the input transformed by
    /// `blocks[s]` (all of one group and dimension `dim / count`).
    ///
    /// # Panics
    /// If the blocks are of mixed groups or sizes, or `head_perm` does not match them.
    pub fn blocked(name: &str, dim: usize, head_perm: &[usize], blocks: &[Key]) -> Key {
        let count = blocks.len();
        assert!(
            count > 0 && dim.is_multiple_of(count) && head_perm.len() == count,
            "bad head layout"
        );
        let hd = dim / count;
        let group = blocks[0].group();
        assert!(
            blocks.iter().all(|b| b.dim == hd && b.group() == group),
            "blocks of one group and size"
        );
        let material = match group {
            KeyGroup::Permutation | KeyGroup::SignedPermutation | KeyGroup::Monomial => {
                let mut perm = vec![0i64; dim];
                let mut factor = vec![1.0f64; dim];
                for (s, b) in blocks.iter().enumerate() {
                    let src = head_perm[s];
                    let (bp, bf): (&[i64], Option<&[f64]>) = match &b.material {
                        KeyMaterial::Permutation { perm } => (perm, None),
                        KeyMaterial::SignedPermutation { perm, signs } => (perm, Some(signs)),
                        KeyMaterial::Monomial { perm, scales } => (perm, Some(scales)),
                        KeyMaterial::Dense { .. } => unreachable!("index group"),
                    };
                    for j in 0..hd {
                        perm[s * hd + j] = (src * hd) as i64 + bp[j];
                        factor[s * hd + j] = bf.map_or(1.0, |f| f[j]);
                    }
                }
                match group {
                    KeyGroup::Permutation => KeyMaterial::Permutation { perm },
                    KeyGroup::SignedPermutation => KeyMaterial::SignedPermutation {
                        perm,
                        signs: factor,
                    },
                    _ => KeyMaterial::Monomial {
                        perm,
                        scales: factor,
                    },
                }
            }
            KeyGroup::Orthogonal | KeyGroup::Invertible => {
                let mut matrix = vec![0.0; dim * dim];
                let mut inverse = vec![0.0; dim * dim];
                for (s, b) in blocks.iter().enumerate() {
                    let src = head_perm[s];
                    let KeyMaterial::Dense {
                        matrix: m,
                        inverse: mi,
                        ..
                    } = &b.material
                    else {
                        unreachable!("dense group")
                    };
                    for a in 0..hd {
                        for c in 0..hd {
                            matrix[(s * hd + a) * dim + src * hd + c] = m[a * hd + c];
                            inverse[(src * hd + a) * dim + s * hd + c] = mi[a * hd + c];
                        }
                    }
                }
                KeyMaterial::Dense {
                    group,
                    matrix,
                    inverse,
                }
            }
        };
        Key {
            name: name.to_owned(),
            dim,
            material,
        }
    }

    /// A block that commutes with RoPE's rotations on a head of `dim` values: each frequency
    /// pair `(i, i + dim/2)`, read as the complex number `x_i + i·x_{i+dim/2}`, is multiplied
    /// by `r·e^{iφ}` (a fresh φ per pair; `r` = 1 for orthogonal keys, in `[0.5, 2]` for
    /// invertible ones). Its dual, `(1/r)·e^{iφ}`, goes on the query side, so `q·k` is kept
    /// at every pair of positions (RoPE multiplies the same pairs by `e^{iθp}`, and complex
    /// multiplication commutes).
    ///
    /// # Panics
    /// If `dim` is odd or `group` is not dense.
    pub fn generate_rotary<R: Rng + ?Sized>(
        name: &str,
        dim: usize,
        group: KeyGroup,
        rng: &mut R,
    ) -> Key {
        assert!(
            dim.is_multiple_of(2) && matches!(group, KeyGroup::Orthogonal | KeyGroup::Invertible),
            "rotary blocks are dense and of even size"
        );
        let h = dim / 2;
        let (mut m, mut mi) = (vec![0.0; dim * dim], vec![0.0; dim * dim]);
        for i in 0..h {
            let phi = rng.random_range(0.0..std::f64::consts::TAU);
            let r = if group == KeyGroup::Invertible {
                rng.random_range(0.5..2.0)
            } else {
                1.0
            };
            let (c, s) = (phi.cos(), phi.sin());
            let (a, b) = (i, i + h);
            // r·[[c, −s], [s, c]] and its inverse [[c, s], [−s, c]]/r.
            m[a * dim + a] = r * c;
            m[a * dim + b] = -r * s;
            m[b * dim + a] = r * s;
            m[b * dim + b] = r * c;
            mi[a * dim + a] = c / r;
            mi[a * dim + b] = s / r;
            mi[b * dim + a] = -s / r;
            mi[b * dim + b] = c / r;
        }
        Key {
            name: name.to_owned(),
            dim,
            material: KeyMaterial::Dense {
                group,
                matrix: m,
                inverse: mi,
            },
        }
    }

    /// Whether this block commutes with RoPE's rotations (see [`Key::generate_rotary`]): the
    /// identity for index groups, `r·R(φ)` on each frequency pair for dense ones.
    pub fn is_rotary_block(&self) -> bool {
        match &self.material {
            KeyMaterial::Dense { matrix, .. } => {
                let (n, h) = (self.dim, self.dim / 2);
                if !n.is_multiple_of(2) {
                    return false;
                }
                let scale = matrix.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-300);
                let near = |x: f64, y: f64| (x - y).abs() <= 1e-9 * scale;
                let only_pairs = (0..n).all(|i| {
                    (0..n).all(|j| j == i || j == (i + h) % n || matrix[i * n + j] == 0.0)
                });
                only_pairs
                    && (0..h).all(|i| {
                        let (a, b) = (i, i + h);
                        near(matrix[a * n + a], matrix[b * n + b])
                            && near(matrix[a * n + b], -matrix[b * n + a])
                    })
            }
            _ => self.material == Key::identity(&self.name, self.dim, self.group()).material,
        }
    }

    /// The identity of `group` on `dim` values.
    pub fn identity(name: &str, dim: usize, group: KeyGroup) -> Key {
        let perm: Vec<i64> = (0..dim as i64).collect();
        let material = match group {
            KeyGroup::Permutation => KeyMaterial::Permutation { perm },
            KeyGroup::SignedPermutation => KeyMaterial::SignedPermutation {
                perm,
                signs: vec![1.0; dim],
            },
            KeyGroup::Monomial => KeyMaterial::Monomial {
                perm,
                scales: vec![1.0; dim],
            },
            KeyGroup::Orthogonal | KeyGroup::Invertible => {
                let mut m = vec![0.0; dim * dim];
                for i in 0..dim {
                    m[i * dim + i] = 1.0;
                }
                KeyMaterial::Dense {
                    group,
                    matrix: m.clone(),
                    inverse: m,
                }
            }
        };
        Key {
            name: name.to_owned(),
            dim,
            material,
        }
    }

    /// If the key is block-diagonal over `count` heads up to a head permutation: that
    /// permutation (slot → source head) and each slot's block.
    pub fn blocks(&self, count: usize) -> Option<(Vec<usize>, Vec<Key>)> {
        let map = self.head_map(count)?;
        let (hd, n) = (self.dim / count, self.dim);
        let blocks = map
            .iter()
            .enumerate()
            .map(|(s, &src)| {
                let material = match &self.material {
                    KeyMaterial::Permutation { perm } => KeyMaterial::Permutation {
                        perm: (0..hd)
                            .map(|j| perm[s * hd + j] - (src * hd) as i64)
                            .collect(),
                    },
                    KeyMaterial::SignedPermutation { perm, signs } => {
                        KeyMaterial::SignedPermutation {
                            perm: (0..hd)
                                .map(|j| perm[s * hd + j] - (src * hd) as i64)
                                .collect(),
                            signs: signs[s * hd..(s + 1) * hd].to_vec(),
                        }
                    }
                    KeyMaterial::Monomial { perm, scales } => KeyMaterial::Monomial {
                        perm: (0..hd)
                            .map(|j| perm[s * hd + j] - (src * hd) as i64)
                            .collect(),
                        scales: scales[s * hd..(s + 1) * hd].to_vec(),
                    },
                    KeyMaterial::Dense {
                        group,
                        matrix,
                        inverse,
                    } => {
                        let (mut m, mut mi) = (vec![0.0; hd * hd], vec![0.0; hd * hd]);
                        for a in 0..hd {
                            for c in 0..hd {
                                m[a * hd + c] = matrix[(s * hd + a) * n + src * hd + c];
                                mi[a * hd + c] = inverse[(src * hd + a) * n + s * hd + c];
                            }
                        }
                        KeyMaterial::Dense {
                            group: *group,
                            matrix: m,
                            inverse: mi,
                        }
                    }
                };
                Key {
                    name: self.name.clone(),
                    dim: hd,
                    material,
                }
            })
            .collect();
        Some((map, blocks))
    }

    /// The key on `count` query heads that follows this key on `self_count` key/value heads
    /// (see `Heads::follows`): slot `s` holds query head `map[s / G]·G + within[s / G][s % G]`
    /// with the block of KV slot `s / G`, `G = count / self_count`.
    ///
    /// # Panics
    /// If this key is not block-diagonal over `self_count` heads or `within` is not
    /// `self_count` permutations of `0..G`.
    pub fn follow(
        &self,
        name: &str,
        self_count: usize,
        count: usize,
        within: &[Vec<usize>],
    ) -> Key {
        let (map, blocks) = self.blocks(self_count).expect("a head-blocked key");
        let g = count / self_count;
        assert!(within.len() == self_count && within.iter().all(|w| w.len() == g));
        let head_perm: Vec<usize> = (0..count)
            .map(|s| map[s / g] * g + within[s / g][s % g])
            .collect();
        let slots: Vec<Key> = (0..count).map(|s| blocks[s / g].clone()).collect();
        let hd = self.dim / self_count;
        Key::blocked(name, hd * count, &head_perm, &slots)
    }

    /// If the key is block-diagonal over `count` heads up to a head permutation, that
    /// permutation (slot → source head); otherwise `None`.
    pub fn head_map(&self, count: usize) -> Option<Vec<usize>> {
        if count == 0 || !self.dim.is_multiple_of(count) {
            return None;
        }
        let hd = self.dim / count;
        let mut map = vec![usize::MAX; count];
        match &self.material {
            KeyMaterial::Permutation { perm }
            | KeyMaterial::SignedPermutation { perm, .. }
            | KeyMaterial::Monomial { perm, .. } => {
                for s in 0..count {
                    let src = perm[s * hd] as usize / hd;
                    if (0..hd).any(|j| perm[s * hd + j] as usize / hd != src) {
                        return None;
                    }
                    map[s] = src;
                }
            }
            KeyMaterial::Dense { matrix, .. } => {
                let n = self.dim;
                for s in 0..count {
                    let row = &matrix[s * hd * n..(s * hd + 1) * n];
                    let src = row.iter().position(|&x| x != 0.0)? / hd;
                    for a in 0..hd {
                        let r = &matrix[(s * hd + a) * n..(s * hd + a + 1) * n];
                        if r.iter()
                            .enumerate()
                            .any(|(c, &x)| x != 0.0 && c / hd != src)
                        {
                            return None;
                        }
                    }
                    map[s] = src;
                }
            }
        }
        let mut seen = vec![false; count];
        for &m in &map {
            if std::mem::replace(&mut seen[m], true) {
                return None;
            }
        }
        Some(map)
    }

    /// The key's group.
    pub fn group(&self) -> KeyGroup {
        match &self.material {
            KeyMaterial::Permutation { .. } => KeyGroup::Permutation,
            KeyMaterial::SignedPermutation { .. } => KeyGroup::SignedPermutation,
            KeyMaterial::Monomial { .. } => KeyGroup::Monomial,
            KeyMaterial::Dense { group, .. } => *group,
        }
    }

    /// Check the material is a valid key of dimension `dim`.
    ///
    /// # Errors
    /// [`EncryptError::InvalidKey`] naming the problem.
    pub fn validate(&self) -> Result<(), EncryptError> {
        let bad = |problem: String| EncryptError::InvalidKey {
            key: self.name.clone(),
            problem,
        };
        let check_perm = |perm: &[i64]| -> Result<(), EncryptError> {
            if perm.len() != self.dim {
                return Err(bad(format!(
                    "permutation has {} entries, expected {}",
                    perm.len(),
                    self.dim
                )));
            }
            let mut seen = vec![false; self.dim];
            for &p in perm {
                if p < 0 || p as usize >= self.dim || std::mem::replace(&mut seen[p as usize], true)
                {
                    return Err(bad(format!("index {p} is out of range or repeated")));
                }
            }
            Ok(())
        };
        match &self.material {
            KeyMaterial::Permutation { perm } => check_perm(perm),
            KeyMaterial::SignedPermutation { perm, signs } => {
                check_perm(perm)?;
                if signs.len() != self.dim || signs.iter().any(|s| s.abs() != 1.0) {
                    return Err(bad("signs must be ±1, one per index".into()));
                }
                Ok(())
            }
            KeyMaterial::Monomial { perm, scales } => {
                check_perm(perm)?;
                if scales.len() != self.dim || scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err(bad(
                        "scales must be positive and finite, one per index".into()
                    ));
                }
                Ok(())
            }
            KeyMaterial::Dense {
                matrix, inverse, ..
            } => {
                if matrix.len() != self.dim * self.dim || inverse.len() != self.dim * self.dim {
                    return Err(bad(format!(
                        "matrix must have {}×{} entries",
                        self.dim, self.dim
                    )));
                }
                if matrix.iter().chain(inverse).any(|x| !x.is_finite()) {
                    return Err(bad("matrix has NaN or infinite entries".into()));
                }
                Ok(())
            }
        }
    }

    /// The index permutation of an index-group key, without signs or scales; dense keys keep
    /// their material (a spec asks for this only on keys restricted to index groups).
    pub fn permutation_part(&self) -> Key {
        let material = match &self.material {
            KeyMaterial::SignedPermutation { perm, .. } | KeyMaterial::Monomial { perm, .. } => {
                KeyMaterial::Permutation { perm: perm.clone() }
            }
            m => m.clone(),
        };
        Key {
            name: self.name.clone(),
            dim: self.dim,
            material,
        }
    }

    /// `K⁻¹`.
    pub fn inverse(&self) -> Key {
        let material = match &self.material {
            KeyMaterial::Permutation { perm } => KeyMaterial::Permutation {
                perm: invert_perm(perm),
            },
            // (S x)[i] = s[i] x[p[i]]  ⇒  (S⁻¹ y)[j] = s[q[j]] y[q[j]] with q = p⁻¹.
            KeyMaterial::SignedPermutation { perm, signs } => {
                let inv = invert_perm(perm);
                let signs = inv.iter().map(|&i| signs[i as usize]).collect();
                KeyMaterial::SignedPermutation { perm: inv, signs }
            }
            KeyMaterial::Monomial { perm, scales } => {
                let inv = invert_perm(perm);
                let scales = inv.iter().map(|&i| 1.0 / scales[i as usize]).collect();
                KeyMaterial::Monomial { perm: inv, scales }
            }
            KeyMaterial::Dense {
                group,
                matrix,
                inverse,
            } => KeyMaterial::Dense {
                group: *group,
                matrix: inverse.clone(),
                inverse: matrix.clone(),
            },
        };
        Key {
            name: self.name.clone(),
            dim: self.dim,
            material,
        }
    }

    /// The dual `K⁻ᵀ`: the key that acts on the column axis of a matrix transformed by `K`.
    /// Orthogonal groups (permutation, signed permutation, orthogonal) are their own dual.
    pub fn dual(&self) -> Key {
        let material = match &self.material {
            KeyMaterial::Permutation { .. } | KeyMaterial::SignedPermutation { .. } => {
                self.material.clone()
            }
            // (P·D)⁻ᵀ: same permutation, reciprocal scales.
            KeyMaterial::Monomial { perm, scales } => KeyMaterial::Monomial {
                perm: perm.clone(),
                scales: scales.iter().map(|s| 1.0 / s).collect(),
            },
            KeyMaterial::Dense {
                group,
                matrix,
                inverse,
            } => KeyMaterial::Dense {
                group: *group,
                matrix: transpose(inverse, self.dim),
                inverse: transpose(matrix, self.dim),
            },
        };
        Key {
            name: self.name.clone(),
            dim: self.dim,
            material,
        }
    }

    /// Left-multiply `t` by `K` along `axis`: `out[.., i, ..] = Σ_j K[i][j] · t[.., j, ..]`.
    ///
    /// `t`: any shape with `t.size()[axis] == dim`, floating dtype (f32 or f64), any device.
    /// The result has `t`'s shape, dtype and device.
    pub fn apply(&self, t: &Tensor, axis: usize) -> Tensor {
        let dev = t.device();
        let ax = axis as i64;
        let along = |v: &[f64]| {
            let mut shape = vec![1i64; t.dim()];
            shape[axis] = self.dim as i64;
            Tensor::from_slice(v)
                .to_kind(t.kind())
                .to_device(dev)
                .reshape(shape)
        };
        match &self.material {
            KeyMaterial::Permutation { perm } => {
                t.index_select(ax, &Tensor::from_slice(perm).to_device(dev))
            }
            KeyMaterial::SignedPermutation { perm, signs: s }
            | KeyMaterial::Monomial { perm, scales: s } => {
                t.index_select(ax, &Tensor::from_slice(perm).to_device(dev)) * along(s)
            }
            KeyMaterial::Dense { matrix, .. } => {
                let n = self.dim as i64;
                let k = Tensor::from_slice(matrix)
                    .reshape([n, n])
                    .to_kind(t.kind())
                    .to_device(dev);
                // Move `axis` last, multiply by Kᵀ on the right, move it back.
                t.transpose(ax, -1)
                    .matmul(&k.transpose(0, 1))
                    .transpose(ax, -1)
                    .contiguous()
            }
        }
    }

    /// The index map of a permutation key, `(K x)[i] = x[perm[i]]` (for labels: `perm[i] = y`
    /// where `i` is the encrypted class of `y`). `None` for other groups.
    ///
    /// # Security
    /// Secret material: for scoring attacks and key-holder tools only.
    pub fn permutation(&self) -> Option<&[i64]> {
        match &self.material {
            KeyMaterial::Permutation { perm } => Some(perm),
            _ => None,
        }
    }

    pub(crate) fn inverse_permutation(&self) -> Option<Vec<i64>> {
        self.permutation().map(invert_perm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tch::Kind;

    fn dense(k: &Key) -> Tensor {
        k.apply(
            &Tensor::eye(k.dim as i64, (Kind::Double, tch::Device::Cpu)),
            0,
        )
    }

    #[test]
    fn inverse_and_dual_hold_for_every_group() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        for g in [
            KeyGroup::Permutation,
            KeyGroup::SignedPermutation,
            KeyGroup::Monomial,
            KeyGroup::Orthogonal,
            KeyGroup::Invertible,
        ] {
            let k = Key::generate("k", 7, g, &mut rng);
            k.validate().unwrap();
            let m = dense(&k);
            let inv = dense(&k.inverse());
            let eye = Tensor::eye(7, (Kind::Double, tch::Device::Cpu));
            let e1 = (m.matmul(&inv) - &eye).abs().max().double_value(&[]);
            assert!(e1 < 1e-12, "{g}: K K⁻¹ off by {e1}");
            let dual = dense(&k.dual());
            let e2 = (dual.transpose(0, 1).matmul(&m) - &eye)
                .abs()
                .max()
                .double_value(&[]);
            assert!(e2 < 1e-12, "{g}: dual off by {e2}");
            // Applying along axis 1 equals right-multiplying by Kᵀ.
            let x = Tensor::randn([3, 7], (Kind::Double, tch::Device::Cpu));
            let e3 = (k.apply(&x, 1) - x.matmul(&m.transpose(0, 1)))
                .abs()
                .max()
                .double_value(&[]);
            assert!(e3 < 1e-12, "{g}: apply along axis 1 off by {e3}");
        }
    }

    #[test]
    fn blocked_keys_keep_heads_together() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let hp = vec![2usize, 0, 3, 1];
        for g in [
            KeyGroup::Permutation,
            KeyGroup::SignedPermutation,
            KeyGroup::Invertible,
        ] {
            let k = Key::generate_blocked("qk", 12, 4, &hp, g, &mut rng);
            k.validate().unwrap();
            assert_eq!(k.head_map(4), Some(hp.clone()), "{g}");
            assert_eq!(k.dual().head_map(4), Some(hp.clone()), "{g} dual");
            let m = dense(&k);
            let e = (m.matmul(&dense(&k.inverse()))
                - Tensor::eye(12, (Kind::Double, tch::Device::Cpu)))
            .abs()
            .max()
            .double_value(&[]);
            assert!(e < 1e-12, "{g}: {e}");
        }
        // An unstructured key is not a head key.
        let k = Key::generate(
            "x",
            12,
            KeyGroup::Permutation,
            &mut rand_chacha::ChaCha20Rng::seed_from_u64(9),
        );
        assert_eq!(k.head_map(4), None);
    }

    #[test]
    fn debug_hides_material() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let k = Key::generate("input", 5, KeyGroup::SignedPermutation, &mut rng);
        let s = format!("{k:?}");
        assert!(
            s.contains("input") && !s.contains("perm") && !s.contains("signs"),
            "{s}"
        );
    }

    #[test]
    fn validate_rejects_repeated_indices() {
        let k = Key {
            name: "x".into(),
            dim: 3,
            material: KeyMaterial::Permutation {
                perm: vec![0, 0, 2],
            },
        };
        assert!(k.validate().is_err());
    }
}
