//! Llama-family causal LMs from a GGUF file (llama.cpp's format): the architecture from the
//! metadata, every tensor dequantized to f32, and the tokenizer's vocabulary, merges and chat
//! template.
//!
//! The container is parsed by the `ggus` crate; blocks are dequantized by `ggml-quants`
//! (F32, F16, Q8_0 and Q4_1 are supported, which covers SmolLM2's file: Q4_1 weights, a Q8_0
//! embedding table, F32 norms).
//!
//! Layout: GGUF lists dimensions innermost first, so a tensor of GGUF shape `[in, out]` is a
//! row-major `(out, in)` matrix, the PyTorch `nn.Linear` layout. llama.cpp's converter
//! reorders each attention head's Q and K rows into interleaved RoPE pairs `(2i, 2i+1)`;
//! [`load`] puts them back in the `(i, i + d_head/2)` order of Hugging Face's `rotate_half`,
//! which [`crate::llama`] uses ([`RopeLayout`]).

use std::path::Path;

use ggus::ggml_quants::{DataBlock, Q4_1, Q8_0, Quantize, f16};
use ggus::{GGmlType, GGuf, GGufMetaMapExt};
use tch::Tensor;

use crate::llama::LlamaConfig;
use crate::{ModelError, StateDict};

/// How [`load`] orders the rows of Q and K projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Rows `(i, i + d_head/2)` form a RoPE pair (Hugging Face; what the forward expects).
    HalfSplit,
    /// Rows as stored by llama.cpp, pairs `(2i, 2i+1)`: wrong for [`crate::llama`], kept
    /// only to show that the layout matters.
    AsStored,
}

/// What a GGUF file holds for a causal LM.
pub struct GgufModel {
    /// The architecture.
    pub config: LlamaConfig,
    /// Every tensor, f32, under the GGUF names (`token_embd.weight`, `blk.N.attn_q.weight`, …).
    pub state: StateDict,
    /// Tokenizer vocabulary (id order), merges (`"a b"`), and token types (3 = control).
    pub tokens: Vec<String>,
    /// BPE merges, highest priority first.
    pub merges: Vec<String>,
    /// llama.cpp token types per id (1 normal, 3 control, …).
    pub token_types: Vec<i32>,
    /// Beginning and end of sequence ids.
    pub bos: u32,
    /// End of sequence (generation stops on it).
    pub eos: u32,
    /// The Jinja chat template, if the file has one.
    pub chat_template: Option<String>,
}

fn bad(path: &Path, m: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!("{}: {m}", path.display()))
}

/// Read the causal LM in the GGUF file at `path` (architecture `llama`).
///
/// # Errors
/// [`ModelError::Io`] if unreadable; [`ModelError::Config`] naming the problem for a file that
/// is not GGUF v3, is truncated, lacks a metadata key, has another architecture, or holds a
/// tensor type other than F32, F16, Q8_0 or Q4_1.
pub fn load(path: &Path, layout: RopeLayout) -> Result<GgufModel, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    from_bytes(&bytes, layout).map_err(|m| bad(path, m))
}

/// As [`load`], from the file's bytes; errors as text.
///
/// # Errors
/// As [`load`].
pub fn from_bytes(bytes: &[u8], layout: RopeLayout) -> Result<GgufModel, String> {
    // ggus indexes past the end of a truncated file instead of returning an error: its panic
    // is turned into one.
    let gguf = std::panic::catch_unwind(|| GGuf::new(bytes))
        .map_err(|_| "not a complete GGUF file (truncated or malformed)".to_string())?
        .map_err(|e| format!("not a GGUF v3 file: {e}"))?;
    let meta = |what: &str, e: ggus::GGufMetaError| format!("metadata `{what}`: {e:?}");
    let arch = gguf
        .general_architecture()
        .map_err(|e| meta("general.architecture", e))?;
    if arch != "llama" {
        return Err(format!(
            "architecture `{arch}`: fedee runs Llama-family models (`llama`) only"
        ));
    }
    let get = |k: &str| {
        gguf.get_usize(&format!("llama.{k}"))
            .map_err(|e| meta(&format!("llama.{k}"), e))
    };
    let getf = |k: &str| {
        gguf.get_f32(&format!("llama.{k}"))
            .map_err(|e| meta(&format!("llama.{k}"), e))
    };
    let tokens = gguf
        .tokenizer_ggml_tokens()
        .map_err(|e| meta("tokenizer.ggml.tokens", e))?
        .map(|t| t.map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tokenizer.ggml.tokens: {e:?}"))?;
    let heads = get("attention.head_count")?;
    let hidden = get("embedding_length")?;
    let config = LlamaConfig {
        vocab_size: tokens.len(),
        hidden_size: hidden,
        num_layers: get("block_count")?,
        intermediate_size: get("feed_forward_length")?,
        num_heads: heads,
        num_kv_heads: get("attention.head_count_kv")?,
        head_dim: get("rope.dimension_count").unwrap_or(hidden / heads.max(1)),
        rope_theta: f64::from(getf("rope.freq_base")?),
        rms_norm_eps: f64::from(getf("attention.layer_norm_rms_epsilon")?),
        max_position: get("context_length")?,
        tied_embeddings: !gguf.tensors.contains_key("output.weight"),
    };
    config.validate().map_err(|e| e.to_string())?;
    let merges = gguf
        .tokenizer_ggml_merges()
        .map_err(|e| meta("tokenizer.ggml.merges", e))?
        .map(|t| t.map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tokenizer.ggml.merges: {e:?}"))?;
    let token_types = gguf
        .tokenizer_ggml_token_type()
        .map_err(|e| meta("tokenizer.ggml.token_type", e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tokenizer.ggml.token_type: {e:?}"))?;
    let id = |k: &str| {
        gguf.get_u32(k).map_err(|e| meta(k, e)).and_then(|v| {
            ((v as usize) < tokens.len())
                .then_some(v)
                .ok_or_else(|| format!("{k} = {v} is not a token id"))
        })
    };
    let (bos, eos) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
    );
    let chat_template = gguf
        .get_str("tokenizer.chat_template")
        .ok()
        .map(str::to_owned);

    let mut state = StateDict::new();
    for (name, t) in &gguf.tensors {
        let info = t.to_info();
        let shape: Vec<i64> = info.shape().iter().rev().map(|&d| d as i64).collect();
        let numel: usize = info.shape().iter().product::<u64>() as usize;
        let data = &gguf.data[info.offset()..info.offset() + info.nbytes()];
        let values =
            dequantize(info.ty(), data, numel).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let mut tensor = Tensor::from_slice(&values).reshape(&shape);
        if layout == RopeLayout::HalfSplit {
            if name.ends_with("attn_q.weight") {
                tensor = unpermute(&tensor, config.num_heads);
            } else if name.ends_with("attn_k.weight") {
                tensor = unpermute(&tensor, config.num_kv_heads);
            }
        }
        state.insert((*name).to_owned(), tensor);
    }
    config.check_state(&state).map_err(|e| e.to_string())?;
    Ok(GgufModel {
        config,
        state,
        tokens,
        merges,
        token_types,
        bos,
        eos,
        chat_template,
    })
}

/// Rows of each head from llama.cpp's interleaved pairs `(2i, 2i+1)` back to `(i, i + d/2)`:
/// the inverse of the converter's `permute` (`reshape(heads, d/2, 2, in).swapaxes(1, 2)`).
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.size2().expect("2-D projection");
    let heads = heads as i64;
    w.reshape([heads, rows / heads / 2, 2, cols])
        .transpose(1, 2)
        .reshape([rows, cols])
}

/// `numel` f32 values from GGUF data of type `ty`.
fn dequantize(ty: GGmlType, data: &[u8], numel: usize) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; numel];
    let blocks = |size: usize, count: usize| {
        if !numel.is_multiple_of(count) || data.len() != numel / count * size {
            Err(format!(
                "{numel} values of {ty:?} need {} bytes, found {}",
                numel.div_ceil(count) * size,
                data.len()
            ))
        } else {
            Ok(data.chunks_exact(size))
        }
    };
    let h = |b: &[u8]| f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
    match ty {
        GGmlType::F32 => {
            for (o, b) in out.iter_mut().zip(blocks(4, 1)?) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GGmlType::F16 => {
            for (o, b) in out.iter_mut().zip(blocks(2, 1)?) {
                *o = h(b).to_f32();
            }
        }
        GGmlType::Q8_0 => {
            for (o, b) in out
                .chunks_exact_mut(Q8_0::COUNT)
                .zip(blocks(34, Q8_0::COUNT)?)
            {
                let blk = Q8_0 {
                    delta: h(b),
                    quants: std::array::from_fn(|i| b[2 + i] as i8),
                };
                o.copy_from_slice(&Quantize::<f32, 32>::dequantize(&blk));
            }
        }
        GGmlType::Q4_1 => {
            for (o, b) in out
                .chunks_exact_mut(Q4_1::COUNT)
                .zip(blocks(20, Q4_1::COUNT)?)
            {
                let blk = Q4_1 {
                    delta_min: ggus::ggml_quants::DeltaMin {
                        delta: h(b),
                        min: h(&b[2..]),
                    },
                    quants: std::array::from_fn(|i| b[4 + i]),
                };
                o.copy_from_slice(&Quantize::<f32, 32>::dequantize(&blk));
            }
        }
        other => {
            return Err(format!(
                "type {other:?} is not supported (F32, F16, Q8_0 and Q4_1 are)"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggus::ggml_quants::QuantExt;
    use tch::Kind;

    fn block_bytes_q4_1(b: &Q4_1) -> Vec<u8> {
        let mut v = b.delta_min.delta.to_bits().to_le_bytes().to_vec();
        v.extend(b.delta_min.min.to_bits().to_le_bytes());
        v.extend(b.quants);
        v
    }

    /// Synthetic blocks: values quantized by ggml-quants, serialized in GGUF's byte layout,
    /// come back from [`dequantize`] as ggml-quants' own dequantization, and within the
    /// quantization step of the originals.
    #[test]
    fn q4_1_and_q8_0_blocks_dequantize_from_their_byte_layout() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
            .collect();
        let mut q4 = vec![Q4_1::ZEROS, Q4_1::ZEROS];
        Q4_1::quantize_slice(&mut q4, &x).unwrap();
        let bytes: Vec<u8> = q4.iter().flat_map(block_bytes_q4_1).collect();
        assert_eq!(bytes.len(), 40);
        let got = dequantize(GGmlType::Q4_1, &bytes, 64).unwrap();
        let mut want = vec![0f32; 64];
        Q4_1::dequantize_slice(&mut want, &q4).unwrap();
        assert_eq!(got, want);
        let step = 2.3 / 15.0;
        assert!(x.iter().zip(&got).all(|(a, b)| (a - b).abs() <= step));
        // The low nibble of byte j is value j, the high nibble value j + 16.
        let mut one = vec![0u8; 20];
        one[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        one[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        one[4] = 0x3a;
        let v = dequantize(GGmlType::Q4_1, &one, 32).unwrap();
        assert_eq!(
            (v[0], v[16], v[1]),
            (0.5 * 10.0 - 1.0, 0.5 * 3.0 - 1.0, -1.0)
        );

        let mut q8 = vec![Q8_0::ZEROS, Q8_0::ZEROS];
        Q8_0::quantize_slice(&mut q8, &x).unwrap();
        let bytes: Vec<u8> = q8
            .iter()
            .flat_map(|b| {
                let mut v = b.delta.to_bits().to_le_bytes().to_vec();
                v.extend(b.quants.iter().map(|&q| q as u8));
                v
            })
            .collect();
        let got = dequantize(GGmlType::Q8_0, &bytes, 64).unwrap();
        Q8_0::dequantize_slice(&mut want, &q8).unwrap();
        assert_eq!(got, want);
        assert!(
            x.iter()
                .zip(&got)
                .all(|(a, b)| (a - b).abs() <= 1.1 / 127.0)
        );
        // Wrong lengths and unsupported types are errors, not panics.
        assert!(
            dequantize(GGmlType::Q8_0, &bytes[..60], 64)
                .unwrap_err()
                .contains("68 bytes")
        );
        assert!(
            dequantize(GGmlType::Q4K, &bytes, 64)
                .unwrap_err()
                .contains("not supported")
        );
    }

    /// The un-permutation inverts llama.cpp's converter permutation row for row.
    #[test]
    fn unpermute_inverts_the_converters_rope_permutation() {
        let (heads, hd, cols) = (3i64, 8i64, 5i64);
        let w = Tensor::arange(heads * hd * cols, (Kind::Float, tch::Device::Cpu))
            .reshape([heads * hd, cols]);
        // llama.cpp: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let permuted = w
            .reshape([heads, 2, hd / 2, cols])
            .transpose(1, 2)
            .reshape([heads * hd, cols]);
        assert!(permuted != w);
        assert_eq!(unpermute(&permuted, heads as usize), w);
    }

    #[test]
    fn truncated_and_foreign_files_are_errors() {
        assert!(from_bytes(b"GGUF", RopeLayout::HalfSplit).is_err());
        assert!(from_bytes(b"not a gguf file at all, definitely", RopeLayout::HalfSplit).is_err());
    }
}
