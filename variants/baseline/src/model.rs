//! The Llama-architecture transformer, on candle CPU tensors with f32 activations.
//!
//! [`LlamaModel::from_gguf`] reads the hyperparameters ([`LlamaConfig`]) from the GGUF metadata
//! and wraps every projection of the file in a [`Matrix`]: Q4_1 and Q8_0 blocks stay in the
//! host's mapping and are dequantized row by row as a matmul runs (other types are dequantized
//! to f32 once, at load). The token embedding also stays in the mapping and only the rows a
//! chunk needs are dequantized ([`EmbeddingTable`]); the output layer is `output.weight` when
//! the file has one and otherwise the (tied) embedding table.
//!
//! One forward pass ([`LlamaModel::forward_hidden`]) takes a chunk of tokens at a position and
//! runs, for every block: RMSNorm, the Q/K/V projections, interleaved RoPE ([`RopeTables`]),
//! causal grouped-query [`attention`] over a [`KvCache`] that is preallocated and written in
//! place, the output projection and residual, then RMSNorm and the SwiGLU MLP with its residual.
//!
//! Every step computes each token's row the same way whatever the chunk size (the matmuls work
//! weight row by weight row, and attention is a plain loop per query rather than a blocked
//! matmul), so a prompt run in one chunk gives bit-for-bit the logits it gives token by token:
//! scoring a generated sequence reproduces its greedy choices exactly. Activations are never
//! rounded below f32 (see [`crate::matmul`] for why that matters to the quality gates).
//!
//! This file is the model: its weights ([`LlamaModel`]), `from_gguf` and the forward pass. The
//! parts live beside it: loading and checking the weights in [`crate::load`], the KV cache in
//! [`crate::kv_cache`], attention in [`crate::attention`], RMSNorm and RoPE in
//! [`crate::layers`], and the matmul kernels in [`crate::matmul`].

use candle_core::{Device, Tensor};
use plugin_api::ModelView;

use crate::attention::{attention, AttentionShape};
use crate::kv_cache::{check_chunk, KvCache};
use crate::layers::{tensor_to_vec, RmsNorm, RopeTables};
use crate::load::{load_matrix, load_vector, EmbeddingTable, LlamaConfig};
use crate::matmul::Matrix;

/// Why the model could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `general.architecture` is not `llama`.
    #[error("unsupported architecture '{0}': this variant runs Llama-architecture GGUF only")]
    UnsupportedArchitecture(String),
    /// A metadata key the model needs is absent (or has the wrong type).
    #[error("GGUF metadata key '{0}' is missing or is not a number")]
    MissingMetadata(String),
    /// The hyperparameters are inconsistent.
    #[error("invalid model hyperparameters: {0}")]
    InvalidConfig(String),
    /// A tensor the model needs is absent.
    #[error("GGUF tensor '{0}' is missing")]
    MissingTensor(String),
    /// A tensor exists but cannot be used as it is.
    #[error("GGUF tensor '{name}': {problem}")]
    BadTensor {
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {token} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A chunk would run past the context length.
    #[error("positions {start}..{end} exceed the context length {context}")]
    ContextOverflow {
        /// First position of the chunk.
        start: usize,
        /// One past its last position.
        end: usize,
        /// The model's context length.
        context: usize,
    },
    /// A chunk does not continue the cached sequence.
    #[error("position {pos} is past the end of the cached sequence ({cached} positions)")]
    PositionGap {
        /// The requested start position.
        pos: usize,
        /// How many positions the cache holds.
        cached: usize,
    },
    /// A forward pass was asked for no tokens.
    #[error("a forward pass needs at least one token")]
    EmptyChunk,
    /// candle reported an error.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// One transformer block's weights.
#[derive(Debug)]
struct Block {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
}

/// A Llama-architecture model over a GGUF file, with its KV cache.
#[derive(Debug)]
pub struct LlamaModel {
    cfg: LlamaConfig,
    embedding: EmbeddingTable,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    output: Matrix,
    rope: RopeTables,
    cache: KvCache,
}

impl LlamaModel {
    /// Builds the model over the host's GGUF view (Llama architecture only).
    pub fn from_gguf(view: &'static ModelView) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_view(view)?;
        let (d, ff) = (cfg.n_embd, cfg.n_ff);
        let (q_dim, kv_dim) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let name = |part: &str| format!("blk.{i}.{part}.weight");
                Ok(Block {
                    attn_norm: load_vector(view, &name("attn_norm"), d)?,
                    wq: load_matrix(view, &name("attn_q"), q_dim, d)?,
                    wk: load_matrix(view, &name("attn_k"), kv_dim, d)?,
                    wv: load_matrix(view, &name("attn_v"), kv_dim, d)?,
                    wo: load_matrix(view, &name("attn_output"), d, q_dim)?,
                    ffn_norm: load_vector(view, &name("ffn_norm"), d)?,
                    w_gate: load_matrix(view, &name("ffn_gate"), ff, d)?,
                    w_up: load_matrix(view, &name("ffn_up"), ff, d)?,
                    w_down: load_matrix(view, &name("ffn_down"), d, ff)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let output_name = if view.tensor("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        Ok(Self {
            embedding: EmbeddingTable::new(view, &cfg)?,
            output_norm: load_vector(view, "output_norm.weight", d)?,
            output: load_matrix(view, output_name, cfg.vocab_size, d)?,
            rope: RopeTables::new(cfg.rope_dim, cfg.rope_base, cfg.context_len),
            cache: KvCache::new(&cfg),
            blocks,
            cfg,
        })
    }

    /// The KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }
}

/// What generation and scoring need of a model, whichever way it computes: the hand-written
/// CPU [`LlamaModel`] or the candle-ops [`TensorLlama`](crate::tensor_model::TensorLlama).
pub trait Transformer: Send {
    /// The hyperparameters.
    fn config(&self) -> &LlamaConfig;

    /// Forgets the cached sequence; the next forward pass must start at position 0.
    fn reset(&mut self);

    /// Preallocates the KV cache for a sequence of `n` positions (it grows anyway if needed).
    fn reserve(&mut self, n: usize) -> Result<(), ModelError>;

    /// Runs `tokens` (at positions `pos..`, `pos <=` the cached length; a smaller `pos` rewinds
    /// the cache) and returns the final-normed hidden states `(tokens.len(), n_embd)`. Feed rows
    /// of it to [`Transformer::logits`].
    fn forward_hidden(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor, ModelError>;

    /// The logits `(rows, vocab)` for final-normed hidden states `(rows, n_embd)`.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError>;

    /// Runs `tokens` (at positions `pos..`) and returns the logits `(vocab,)` after the last one.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor, ModelError> {
        let hidden = self.forward_hidden(tokens, pos)?;
        let last = hidden.narrow(0, tokens.len() - 1, 1)?;
        Ok(self.logits(&last)?.squeeze(0)?)
    }
}

impl Transformer for LlamaModel {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn reset(&mut self) {
        self.cache.clear();
    }

    fn reserve(&mut self, n: usize) -> Result<(), ModelError> {
        self.cache
            .reserve(self.cfg.n_layer, n.min(self.cfg.context_len));
        Ok(())
    }

    fn forward_hidden(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor, ModelError> {
        let end = check_chunk(&self.cfg, self.cache.len(), tokens.len(), pos)?;
        self.cache.len = pos;
        self.cache.reserve(self.cfg.n_layer, end);

        let mut x = self.embedding.lookup(tokens)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let attn = attention_block(&self.cfg, &self.rope, &mut self.cache, block, i, &x, pos)?;
            x = (x + attn)?;
            let h = x.apply_op1_no_bwd(&RmsNorm {
                weight: &block.ffn_norm,
                eps: self.cfg.rms_eps,
            })?;
            let gate = block.w_gate.forward(&h)?;
            let up = block.w_up.forward(&h)?;
            let mlp = block.w_down.forward(&(gate.silu()? * up)?)?;
            x = (x + mlp)?;
        }
        self.cache.len = end;
        Ok(x.apply_op1_no_bwd(&RmsNorm {
            weight: &self.output_norm,
            eps: self.cfg.rms_eps,
        })?)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.output.forward(hidden)?)
    }
}

/// The attention half of block `i` for the chunk `x` `(t, n_embd)` at `pos`: norm, Q/K/V,
/// RoPE, cache update, attention and output projection. Returns the residual update.
fn attention_block(
    cfg: &LlamaConfig,
    rope: &RopeTables,
    cache: &mut KvCache,
    block: &Block,
    i: usize,
    x: &Tensor,
    pos: usize,
) -> Result<Tensor, ModelError> {
    let (t, hd) = (x.dim(0)?, cfg.head_dim);
    let h = x.apply_op1_no_bwd(&RmsNorm {
        weight: &block.attn_norm,
        eps: cfg.rms_eps,
    })?;
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    tensor_to_vec(&block.wq.forward(&h)?, &mut q)?;
    tensor_to_vec(&block.wk.forward(&h)?, &mut k)?;
    tensor_to_vec(&block.wv.forward(&h)?, &mut v)?;
    rope.rotate(&mut q, cfg.n_head, hd, pos);
    rope.rotate(&mut k, cfg.n_kv_head, hd, pos);
    cache.store(i, pos, &k, &v);
    let mut y = vec![0f32; t * cfg.n_head * hd];
    let shape = AttentionShape {
        n_head: cfg.n_head,
        n_kv_head: cfg.n_kv_head,
        head_dim: hd,
        capacity: cache.capacity,
    };
    // Multiply-adds in this call; below about a million a thread costs more than it saves.
    let work = t * (pos + t) * cfg.n_head * hd;
    let threads = if work < 1 << 20 {
        1
    } else {
        // The pool this call runs in: the host's thread count when it set one.
        rayon::current_num_threads()
    };
    attention(&q, &cache.k[i], &cache.v[i], shape, pos, threads, &mut y);
    let y = Tensor::from_vec(y, (t, cfg.n_head * hd), &Device::Cpu)?;
    Ok(block.wo.forward(&y)?)
}

#[cfg(test)]
/// A tiny random Llama model in GGUF form (Q8_0 projections and embedding, F32 norms), for
/// tests that need a whole model without the real file.
pub(crate) mod tiny {
    use abi_stable::std_types::{RSlice, RVec};
    use plugin_api::{MetaValue, MetadataEntry, ModelView, TensorInfo};

    /// Vocabulary size of the tiny model.
    pub const VOCAB: usize = 16;

    /// A leaked view of a 2-block model: width 32, 2 query heads sharing 1 KV head, FFN 64.
    pub fn view(architecture: &str, context: u64) -> &'static ModelView {
        let (d, ff, n_layer) = (32u64, 64u64, 2);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut bytes = Vec::new();
        let mut tensors = Vec::new();
        let mut add = |name: String, ggml_type: u32, dims: Vec<u64>, data: Vec<u8>| {
            while bytes.len() % 32 != 0 {
                bytes.push(0);
            }
            tensors.push(TensorInfo {
                name: name.into(),
                ggml_type,
                dims: dims.into(),
                offset: bytes.len() as u64,
                size: data.len() as u64,
            });
            bytes.extend(data);
        };
        let mut q8_0 = |cols: u64, rows: u64| -> Vec<u8> {
            let mut data = Vec::new();
            for _ in 0..cols * rows / 32 {
                data.extend(half::f16::from_f32(0.02).to_le_bytes());
                data.extend((0..32).map(|_| (next() % 255) as u8 ^ 0x80));
            }
            data
        };
        let ones = |n: u64| -> Vec<u8> { (0..n).flat_map(|_| 1f32.to_le_bytes()).collect() };
        let embd = q8_0(d, VOCAB as u64);
        add("token_embd.weight".into(), 8, vec![d, VOCAB as u64], embd);
        add("output_norm.weight".into(), 0, vec![d], ones(d));
        for i in 0..n_layer {
            let mut m = |part: &str, cols: u64, rows: u64| {
                let data = q8_0(cols, rows);
                add(format!("blk.{i}.{part}.weight"), 8, vec![cols, rows], data);
            };
            m("attn_q", d, d);
            m("attn_k", d, d / 2);
            m("attn_v", d, d / 2);
            m("attn_output", d, d);
            m("ffn_gate", d, ff);
            m("ffn_up", d, ff);
            m("ffn_down", ff, d);
            add(format!("blk.{i}.attn_norm.weight"), 0, vec![d], ones(d));
            add(format!("blk.{i}.ffn_norm.weight"), 0, vec![d], ones(d));
        }
        let meta = |key: &str, value: MetaValue| MetadataEntry {
            key: key.into(),
            value,
        };
        let metadata: RVec<MetadataEntry> = vec![
            meta("general.architecture", MetaValue::Str(architecture.into())),
            meta("llama.block_count", MetaValue::Uint(n_layer)),
            meta("llama.embedding_length", MetaValue::Uint(d)),
            meta("llama.feed_forward_length", MetaValue::Uint(ff)),
            meta("llama.attention.head_count", MetaValue::Uint(2)),
            meta("llama.attention.head_count_kv", MetaValue::Uint(1)),
            meta("llama.rope.dimension_count", MetaValue::Uint(16)),
            meta("llama.rope.freq_base", MetaValue::Float(10_000.0)),
            meta(
                "llama.attention.layer_norm_rms_epsilon",
                MetaValue::Float(1e-5),
            ),
            meta("llama.context_length", MetaValue::Uint(context)),
        ]
        .into();
        let bytes: &'static [u8] = Vec::leak(bytes);
        Box::leak(Box::new(ModelView {
            bytes: RSlice::from_slice(bytes),
            metadata,
            tensors: tensors.into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::*;
    use crate::kv_cache::*;
    use crate::layers::*;
    use crate::load::*;
    use crate::matmul::{dequantize_q8_0_row, dot};
    use half::f16;

    #[test]
    fn config_comes_from_llama_metadata() {
        let cfg = LlamaConfig::from_view(tiny::view("llama", 700)).unwrap();
        assert_eq!((cfg.n_layer, cfg.n_embd, cfg.n_ff), (2, 32, 64));
        assert_eq!(
            (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.rope_dim),
            (2, 1, 16, 16)
        );
        assert_eq!((cfg.context_len, cfg.vocab_size), (700, tiny::VOCAB));
        assert!((cfg.rms_eps - 1e-5).abs() < 1e-12 && cfg.rope_base == 10_000.0);
    }

    #[test]
    fn other_architectures_are_refused_by_name() {
        let err = LlamaModel::from_gguf(tiny::view("gpt2", 64)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported architecture 'gpt2': this variant runs Llama-architecture GGUF only"
        );
    }

    #[test]
    fn chunked_and_token_by_token_forward_agree_bit_for_bit() {
        let mut model = LlamaModel::from_gguf(tiny::view("llama", 64)).unwrap();
        let tokens = [3u32, 1, 4, 1, 5, 9, 2, 6, 5, 3];
        let hidden = model.forward_hidden(&tokens, 0).unwrap();
        let chunked = model.logits(&hidden).unwrap().to_vec2::<f32>().unwrap();
        model.reset();
        for (i, &tok) in tokens.iter().enumerate() {
            let one = model.forward(&[tok], i).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(one, chunked[i], "position {i}");
        }
        assert_eq!(model.cache().len(), tokens.len());
        // rewinding to an earlier position recomputes the same logits
        let again = model
            .forward(&tokens[4..6], 4)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(again, chunked[5]);
    }

    #[test]
    fn bad_positions_and_tokens_are_errors() {
        let mut model = LlamaModel::from_gguf(tiny::view("llama", 8)).unwrap();
        assert!(matches!(
            model.forward(&[99], 0),
            Err(ModelError::TokenOutOfRange { token: 99, .. })
        ));
        assert!(matches!(model.forward(&[], 0), Err(ModelError::EmptyChunk)));
        assert!(matches!(
            model.forward(&[1], 3),
            Err(ModelError::PositionGap { pos: 3, cached: 0 })
        ));
        assert!(matches!(
            model.forward(&[1; 9], 0),
            Err(ModelError::ContextOverflow { end: 9, .. })
        ));
        assert!(model.forward(&[1; 8], 0).is_ok());
    }

    #[test]
    fn rope_tables_match_hand_computation() {
        let tables = RopeTables::new(4, 100.0, 3);
        // pair 0 turns by pos * 1, pair 1 by pos * 100^(-1/2) = pos / 10
        let (c, s) = tables.cos_sin(2, 0);
        assert!((c - 2f32.cos()).abs() < 1e-6 && (s - 2f32.sin()).abs() < 1e-6);
        let (c, s) = tables.cos_sin(2, 1);
        assert!((c - 0.2f32.cos()).abs() < 1e-6 && (s - 0.2f32.sin()).abs() < 1e-6);
        assert_eq!(tables.cos_sin(0, 1), (1.0, 0.0));
    }

    #[test]
    fn rope_rotates_interleaved_pairs_and_leaves_the_tail() {
        // head_dim 6, rope_dim 4: the last pair is not rotated
        let tables = RopeTables::new(4, 100.0, 4);
        let mut x = vec![1.0, 0.0, 0.0, 2.0, 5.0, 6.0];
        tables.rotate_head(&mut x, 1);
        let (c1, s1) = (1f32.cos(), 1f32.sin());
        let (c2, s2) = (0.1f32.cos(), 0.1f32.sin());
        let want = [c1, s1, -2.0 * s2, 2.0 * c2, 5.0, 6.0];
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{x:?} vs {want:?}");
        }
        // two tokens of two heads starting at position 2: token 1 rotates as position 3
        let mut y = vec![0.0; 24];
        y[12] = 1.0; // token 1, head 0, dim 0
        y[18 + 1] = 1.0; // token 1, head 1, dim 1
        tables.rotate(&mut y, 2, 6, 2);
        assert!((y[12] - 3f32.cos()).abs() < 1e-6 && (y[13] - 3f32.sin()).abs() < 1e-6);
        assert!((y[18] + 3f32.sin()).abs() < 1e-6 && (y[19] - 3f32.cos()).abs() < 1e-6);
        assert!(y[..12].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn rms_norm_scales_by_root_mean_square() {
        let x = [3.0, -4.0];
        let w = [1.0, 2.0];
        let mut out = [0.0; 2];
        rms_norm_row(&x, &w, 0.0, &mut out);
        // mean square = 12.5
        let r = 12.5f32.sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6);
        assert!((out[1] + 8.0 / r).abs() < 1e-6);
        rms_norm_row(&[0.0, 0.0], &w, 1e-5, &mut out);
        assert_eq!(out, [0.0, 0.0], "eps keeps a zero row finite");
    }

    #[test]
    fn causal_mask_sees_cache_and_own_position() {
        assert_eq!(causal_visible(0, 0), 1);
        assert_eq!(causal_visible(0, 3), 4);
        assert_eq!(causal_visible(10, 0), 11);
    }

    #[test]
    fn softmax_normalizes_and_survives_large_values() {
        let mut x = [0.0, 2f32.ln(), 1000.0, 1000.0];
        softmax_in_place(&mut x[..2]);
        assert!((x[0] - 1.0 / 3.0).abs() < 1e-6 && (x[1] - 2.0 / 3.0).abs() < 1e-6);
        softmax_in_place(&mut x[2..]);
        assert_eq!(&x[2..], &[0.5, 0.5]);
    }

    #[test]
    fn dot_matches_naive_sum() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!(
            (dot(&a, &b) - want).abs() < 1e-4,
            "{} vs {want}",
            dot(&a, &b)
        );
    }

    /// Two query heads sharing one KV head of width 2, capacity 4, three cached positions.
    /// Attention one token at a time ([`attend_token`], as decode computes it): the reference
    /// the tiled attention must match bit for bit.
    fn attention_one_by_one(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        shape: AttentionShape,
        start_pos: usize,
    ) -> Vec<f32> {
        let row = shape.n_head * shape.head_dim;
        let mut out = vec![0f32; q.len()];
        let mut scores = Vec::new();
        for (t, (q, out)) in q
            .chunks_exact(row)
            .zip(out.chunks_exact_mut(row))
            .enumerate()
        {
            let visible = causal_visible(start_pos, t);
            attend_token(q, keys, values, shape, visible, &mut scores, out);
        }
        out
    }

    #[test]
    fn tiled_attention_gives_the_one_by_one_bits() {
        let mut state = 7u64;
        let mut noise = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
                })
                .collect()
        };
        // SmolLM2's grouping (3 query heads per KV head, 64 wide), and a width with a tail.
        for (n_head, n_kv_head, hd) in [(9, 3, 64), (4, 2, 12)] {
            let capacity = 40;
            let shape = AttentionShape {
                n_head,
                n_kv_head,
                head_dim: hd,
                capacity,
            };
            let keys = noise(n_kv_head * capacity * hd);
            let values = noise(n_kv_head * capacity * hd);
            for (start_pos, tokens) in [(0, 1), (0, 9), (5, 4), (13, 7), (30, 10)] {
                let q = noise(tokens * n_head * hd);
                let want = attention_one_by_one(&q, &keys, &values, shape, start_pos);
                for threads in [1, 2, 3] {
                    let mut got = vec![f32::NAN; q.len()];
                    attention(&q, &keys, &values, shape, start_pos, threads, &mut got);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "heads {n_head}/{n_kv_head}x{hd}, {tokens} tokens at {start_pos}, \
                         {threads} threads"
                    );
                }
            }
        }
    }

    fn tiny_attention(q: &[f32], start_pos: usize, threads: usize) -> Vec<f32> {
        let shape = AttentionShape {
            n_head: 2,
            n_kv_head: 1,
            head_dim: 2,
            capacity: 4,
        };
        // keys: position 0 along x, 1 along y, 2 along -x; values: one-hot-ish markers
        let keys = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 9.0, 9.0];
        let values = [1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 7.0, 7.0];
        let mut out = vec![0.0; q.len()];
        attention(q, &keys, &values, shape, start_pos, threads, &mut out);
        out
    }

    #[test]
    fn attention_is_causal_and_groups_heads() {
        let s = std::f32::consts::SQRT_2; // scores are scaled by 1/sqrt(2)
                                          // one token at position 0: it sees only key 0, whatever the query
        let out = tiny_attention(&[3.0, -2.0, 0.0, 1.0], 0, 1);
        assert_eq!(out, [1.0, 0.0, 1.0, 0.0]);
        // one token at position 1, head 0 queries along x * sqrt(2) * ln 3: weights 3/4, 1/4
        let a = s * 3f32.ln();
        let out = tiny_attention(&[a, 0.0, 0.0, 0.0], 1, 1);
        assert!(
            (out[0] - 0.75).abs() < 1e-6 && (out[1] - 0.25).abs() < 1e-6,
            "{out:?}"
        );
        assert!(
            (out[2] - 0.5).abs() < 1e-6 && (out[3] - 0.5).abs() < 1e-6,
            "{out:?}"
        );
        // a chunk of two tokens at positions 1 and 2: the first must not see position 2
        let chunk = tiny_attention(&[a, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1, 1);
        assert_eq!(&chunk[..4], &out[..]);
        let third = 1.0 / 3.0;
        let want = [(1.0 + 5.0) * third, (1.0 + 5.0) * third];
        assert!((chunk[4] - want[0]).abs() < 1e-6 && (chunk[5] - want[1]).abs() < 1e-6);
        // the threaded path gives the same bits
        assert_eq!(
            tiny_attention(&[a, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1, 2),
            chunk
        );
    }

    #[test]
    fn q8_0_row_dequantizes_hand_made_blocks() {
        let mut row = Vec::new();
        for (scale, base) in [(0.5f32, 0i8), (-2.0, -16)] {
            row.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
            row.extend((0..32).map(|j| (base + j as i8) as u8));
        }
        let mut out = [0f32; 64];
        dequantize_q8_0_row(&row, &mut out);
        assert_eq!(out[0], 0.0);
        assert_eq!(out[31], 15.5);
        assert_eq!(out[32], 32.0); // -2 * -16
        assert_eq!(out[63], -30.0); // -2 * 15
    }

    #[test]
    fn kv_cache_grows_in_steps_and_keeps_contents() {
        let cfg = LlamaConfig {
            n_layer: 2,
            n_embd: 8,
            n_ff: 16,
            n_head: 2,
            n_kv_head: 2,
            head_dim: 4,
            rope_dim: 4,
            rope_base: 10_000.0,
            rms_eps: 1e-5,
            context_len: 2000,
            vocab_size: 10,
        };
        let mut cache = KvCache::new(&cfg);
        cache.reserve(2, 3);
        assert_eq!(cache.capacity(), KV_CACHE_STEP);
        // position 2 of block 1: kv head 0 = 1..4, kv head 1 = 5..8
        let k: Vec<f32> = (1..=8).map(|i| i as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        cache.store(1, 2, &k, &v);
        cache.len = 3;
        let at = |c: &KvCache, g: usize, p: usize| (g * c.capacity() + p) * 4;
        assert_eq!(&cache.k[1][at(&cache, 1, 2)..][..4], &[5.0, 6.0, 7.0, 8.0]);
        cache.reserve(2, KV_CACHE_STEP + 1);
        assert_eq!(cache.capacity(), 2 * KV_CACHE_STEP);
        assert_eq!(cache.len(), 3);
        assert_eq!(&cache.k[1][at(&cache, 1, 2)..][..4], &[5.0, 6.0, 7.0, 8.0]);
        assert_eq!(
            &cache.v[1][at(&cache, 0, 2)..][..4],
            &[-1.0, -2.0, -3.0, -4.0]
        );
        cache.reserve(2, 1999);
        assert_eq!(cache.capacity(), 2000, "capped at the context length");
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn aligned_bytes_copy_only_when_needed() {
        let words = [0x0807060504030201u64, 0x100f0e0d0c0b0a09];
        // SAFETY: reading the bytes of a live array.
        let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, 16) };
        let same = AlignedBytes::new(bytes);
        assert!(matches!(same, AlignedBytes::Borrowed(_)));
        assert_eq!(same.as_slice().as_ptr(), bytes.as_ptr());
        let odd = &bytes[1..10];
        let copy = AlignedBytes::new(odd);
        assert!(matches!(copy, AlignedBytes::Owned { .. }));
        assert_eq!(copy.as_slice(), odd);
        assert_eq!(copy.as_slice().as_ptr() as usize % 8, 0);
    }
}
