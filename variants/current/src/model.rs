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
//! weight row by weight row, and attention works query by query over fixed blocks of keys
//! rather than as a blocked matmul), so a prompt run in one chunk gives the logits it gives
//! token by token, up to the rounding of the SIMD one-token kernels (see [`crate::matmul`]).
//! Activations are never rounded below f32 (see [`crate::matmul`] for why that matters to the
//! quality gates).

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Layout, Storage, Tensor};
use half::f16;
use plugin_api::{GgmlType, ModelView, TensorInfo};

use crate::generate::argmax;
use crate::kernels::{self, Isa, KEY_TILE};
use crate::matmul::{dequantize_q8_0_row, matmul_many, Matrix, Weights};
use crate::output_argmax::OutputBound;
use crate::pool::Pool;

/// The KV cache grows in steps of this many positions (and never past the context length).
pub const KV_CACHE_STEP: usize = 512;

/// The capacity a KV cache takes to hold `n` positions: `n` rounded up to a multiple of
/// [`KV_CACHE_STEP`], but not past `max_len` (the context length) unless `n` itself is, and
/// then up to whole tiles of [`KEY_BLOCK`] keys.
pub fn cache_capacity(n: usize, max_len: usize) -> usize {
    n.div_ceil(KV_CACHE_STEP)
        .saturating_mul(KV_CACHE_STEP)
        .min(max_len)
        .max(n)
        .next_multiple_of(KEY_BLOCK)
}

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
    /// The GPU path failed: the driver, the kernels' compilation, or a shape it cannot run.
    #[error("GPU: {0}")]
    Gpu(String),
}

/// Hyperparameters of a Llama-architecture model, read from the `llama.*` GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Number of transformer blocks (`llama.block_count`).
    pub n_layer: usize,
    /// Width of the residual stream (`llama.embedding_length`).
    pub n_embd: usize,
    /// Hidden width of the MLP (`llama.feed_forward_length`).
    pub n_ff: usize,
    /// Number of query heads (`llama.attention.head_count`).
    pub n_head: usize,
    /// Number of key/value heads (`llama.attention.head_count_kv`).
    pub n_kv_head: usize,
    /// Width of one head (`n_embd / n_head`).
    pub head_dim: usize,
    /// How many leading dimensions of each head RoPE rotates (`llama.rope.dimension_count`).
    pub rope_dim: usize,
    /// RoPE frequency base (`llama.rope.freq_base`).
    pub rope_base: f64,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_eps: f64,
    /// Maximum sequence length (`llama.context_length`).
    pub context_len: usize,
    /// Vocabulary size (rows of `token_embd.weight`).
    pub vocab_size: usize,
}

impl LlamaConfig {
    /// Reads and checks the hyperparameters; fails unless `general.architecture` is `llama`.
    pub fn from_view(view: &ModelView) -> Result<Self, ModelError> {
        let arch = view.meta_str("general.architecture").unwrap_or("(missing)");
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.to_string()));
        }
        let uint = |key: &str| -> Result<usize, ModelError> {
            view.meta_uint(key)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
        };
        let float = |key: &str| -> Result<f64, ModelError> {
            view.meta_float(key)
                .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
        };
        let n_layer = uint("llama.block_count")?;
        let n_embd = uint("llama.embedding_length")?;
        let n_ff = uint("llama.feed_forward_length")?;
        let n_head = uint("llama.attention.head_count")?;
        let n_kv_head = match view.meta("llama.attention.head_count_kv") {
            Some(_) => uint("llama.attention.head_count_kv")?,
            None => n_head,
        };
        let context_len = uint("llama.context_length")?;
        let rms_eps = float("llama.attention.layer_norm_rms_epsilon")?;
        let rope_base = match view.meta("llama.rope.freq_base") {
            Some(_) => float("llama.rope.freq_base")?,
            None => 10_000.0,
        };
        if n_layer == 0 || n_embd == 0 || n_ff == 0 || n_head == 0 || n_kv_head == 0 {
            return Err(ModelError::InvalidConfig(format!(
                "block_count {n_layer}, embedding_length {n_embd}, feed_forward_length {n_ff}, \
                 head_count {n_head} and head_count_kv {n_kv_head} must all be positive"
            )));
        }
        if !n_embd.is_multiple_of(n_head) {
            return Err(ModelError::InvalidConfig(format!(
                "embedding_length {n_embd} is not a multiple of head_count {n_head}"
            )));
        }
        if !n_head.is_multiple_of(n_kv_head) {
            return Err(ModelError::InvalidConfig(format!(
                "head_count {n_head} is not a multiple of head_count_kv {n_kv_head}"
            )));
        }
        let head_dim = n_embd / n_head;
        let rope_dim = match view.meta("llama.rope.dimension_count") {
            Some(_) => uint("llama.rope.dimension_count")?,
            None => head_dim,
        };
        if !rope_dim.is_multiple_of(2) || rope_dim > head_dim {
            return Err(ModelError::InvalidConfig(format!(
                "rope.dimension_count {rope_dim} must be even and at most the head width {head_dim}"
            )));
        }
        if context_len == 0
            || rms_eps.is_nan()
            || rms_eps <= 0.0
            || rope_base.is_nan()
            || rope_base <= 0.0
        {
            return Err(ModelError::InvalidConfig(format!(
                "context_length {context_len}, layer_norm_rms_epsilon {rms_eps} and \
                 rope.freq_base {rope_base} must be positive"
            )));
        }
        let embd = tensor_info(view, "token_embd.weight")?;
        let vocab_size = match embd.dims.as_slice() {
            [cols, rows] if *cols as usize == n_embd => *rows as usize,
            dims => {
                return Err(bad_tensor(
                    embd,
                    format!("dims {dims:?}, expected [{n_embd}, vocab]"),
                ))
            }
        };
        Ok(Self {
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_kv_head,
            head_dim,
            rope_dim,
            rope_base,
            rms_eps,
            context_len,
            vocab_size,
        })
    }
}

/// Precomputed cos/sin tables for interleaved ("traditional") RoPE: the pairs
/// `(x[2i], x[2i + 1])` of a head, for `i < rope_dim / 2`, rotate by `pos * base^(-2i / rope_dim)`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    half: usize,
    max_pos: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTables {
    /// Tables for positions `0..max_pos` over the first `rope_dim` (even) dimensions of a head.
    pub fn new(rope_dim: usize, base: f64, max_pos: usize) -> Self {
        let half = rope_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for pos in 0..max_pos {
            for i in 0..half {
                let freq = base.powf(-((2 * i) as f64) / rope_dim as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            half,
            max_pos,
            cos,
            sin,
        }
    }

    /// The cos and sin tables, `[pos][pair]` for the `max_pos` positions.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Number of positions the tables cover.
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// `(cos, sin)` of the angle for pair `i` at `pos`.
    pub fn cos_sin(&self, pos: usize, i: usize) -> (f32, f32) {
        let at = pos * self.half + i;
        (self.cos[at], self.sin[at])
    }

    /// Rotates one head (`head.len() >= rope_dim`) in place as at position `pos`.
    pub fn rotate_head(&self, head: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
        for ((pair, &c), &s) in head[..2 * self.half].chunks_exact_mut(2).zip(cos).zip(sin) {
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * c - x1 * s;
            pair[1] = x0 * s + x1 * c;
        }
    }

    /// Rotates `x`, laid out `[token][head][head_dim]`, whose first token sits at `start_pos`.
    pub fn rotate(&self, x: &mut [f32], n_heads: usize, head_dim: usize, start_pos: usize) {
        for (t, token) in x.chunks_exact_mut(n_heads * head_dim).enumerate() {
            for head in token.chunks_exact_mut(head_dim) {
                self.rotate_head(head, start_pos + t);
            }
        }
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * weight`, for one row.
pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let sum_sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let scale = (1.0 / (sum_sq / x.len() as f64 + eps).sqrt()) as f32;
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// How many keys query `t` of a chunk starting at `start_pos` may attend to (causal mask):
/// every cached position up to and including its own, `start_pos + t + 1`.
pub fn causal_visible(start_pos: usize, t: usize) -> usize {
    start_pos + t + 1
}

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads; query head `h` reads KV head `h / (n_head / n_kv_head)`.
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Positions per KV head in the key/value buffers (a multiple of [`KEY_BLOCK`]).
    pub capacity: usize,
}

/// Keys per block of [`attention`]: a block's keys and values (16 KiB each at a head width of
/// 64) stay in the L1 cache while every query head of its group reads them. Keys are stored
/// in tiles of this many positions, transposed ([`key_offset`]).
pub const KEY_BLOCK: usize = KEY_TILE;

/// Where element `d` of key `p` (KV head `g`'s position `i` is `p = g * capacity + i`) lies in
/// a key buffer: tiles `[head_dim][KEY_BLOCK]` take the place of their positions' rows, so a
/// block's scores are whole vectors of keys ([`kernels::tile_scores`]), no sum across lanes.
pub fn key_offset(p: usize, d: usize, head_dim: usize) -> usize {
    (p - p % KEY_BLOCK) * head_dim + d * KEY_BLOCK + p % KEY_BLOCK
}

/// Key rows `[kv_head][capacity][head_dim]` in the tiled layout of [`key_offset`] (tests).
#[cfg(test)]
pub fn key_tiles(rows: &[f32], head_dim: usize) -> Vec<f32> {
    let mut tiles = vec![0f32; rows.len()];
    for (p, key) in rows.chunks_exact(head_dim).enumerate() {
        for (d, &k) in key.iter().enumerate() {
            tiles[key_offset(p, d, head_dim)] = k;
        }
    }
    tiles
}

/// Causal grouped-query attention for a chunk of `q.len() / (n_head * head_dim)` queries whose
/// first token sits at `start_pos`.
///
/// `q` and `out` are `[token][head][head_dim]`; `values` are `[kv_head][capacity][head_dim]`,
/// `keys` the same in tiles of [`KEY_BLOCK`] positions ([`key_offset`]), and both must already
/// hold positions `..start_pos + tokens`. Query `t` attends to positions
/// `..causal_visible(start_pos, t)` with scores scaled by `1 / sqrt(head_dim)`.
///
/// The keys are cut into blocks of [`KEY_BLOCK`] positions, counted from position 0. For each
/// block, the query heads that share a KV head (a group) take their turn on it while it is in
/// cache: scores, their maximum `m`, `e = exp(score - m)`, `l = Σ e` and `o = Σ e · value` in
/// key order (`Cache::block_partial`, the scores from the key tiles, `exp` by
/// [`kernels::exp_shifted`]); then each head's blocks are merged in block order
/// (`merge_blocks`). One token (decode) cuts each KV head's blocks into runs of consecutive
/// blocks, about two runs a thread, spreads the runs over `pool`'s threads and merges on the
/// caller; a chunk (prefill) gives each (token, KV head) to one thread. Either way every
/// query's arithmetic is the same, in the same order, so the result does not depend on how a
/// sequence is cut into chunks, nor on the number of threads.
pub fn attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: AttentionShape,
    start_pos: usize,
    pool: &Pool,
    out: &mut [f32],
) {
    let AttentionShape {
        n_head,
        n_kv_head,
        head_dim: hd,
        capacity,
    } = shape;
    assert!(capacity.is_multiple_of(KEY_BLOCK), "capacity {capacity}");
    let group = n_head / n_kv_head;
    let row = n_head * hd;
    let part = group * (hd + 2);
    let cache = Cache {
        keys,
        values,
        hd,
        capacity,
        scale: 1.0 / (hd as f32).sqrt(),
        isa: Isa::best(),
    };
    if q.len() == row {
        // One token: each KV head's blocks are cut into runs, about two runs a thread, and
        // every run is a task, so a long cache keeps every thread busy on consecutive blocks;
        // the caller merges the blocks of each head. A head's partials are padded to whole
        // runs (`slots` blocks), the padding unused.
        let visible = causal_visible(start_pos, 0);
        let blocks = visible.div_ceil(KEY_BLOCK);
        let runs = (2 * pool.threads()).div_ceil(n_kv_head).clamp(1, blocks);
        let run = blocks.div_ceil(runs);
        let slots = runs * run;
        let mut partials = PARTIALS.take();
        partials.resize(n_kv_head * slots * part, 0.0);
        pool.for_chunks(&mut partials, run * part, |start, run| {
            let (kv, first_block) = (start / part / slots, start / part % slots);
            let q = &q[kv * group * hd..(kv + 1) * group * hd];
            for (block, slot) in (first_block..blocks).zip(run.chunks_exact_mut(part)) {
                let first = block * KEY_BLOCK;
                cache.block_partial(q, kv, first, KEY_BLOCK.min(visible - first), slot);
            }
        });
        for (h, out) in out.chunks_exact_mut(hd).enumerate() {
            let (kv, i) = (h / group, h % group);
            let head = |b: usize| {
                let slot = (kv * slots + b) * part + i * (hd + 2);
                &partials[slot..slot + hd + 2]
            };
            merge_blocks((0..blocks).map(head), out);
        }
        PARTIALS.set(partials);
        return;
    }
    pool.for_chunks(out, group * hd, |start, out| {
        let (t, kv) = (start / row, start % row / (group * hd));
        let visible = causal_visible(start_pos, t);
        let blocks = visible.div_ceil(KEY_BLOCK);
        let q = &q[start..start + group * hd];
        let mut partials = PARTIALS.take();
        partials.resize(blocks * part, 0.0);
        for (block, slot) in partials.chunks_exact_mut(part).enumerate() {
            let first = block * KEY_BLOCK;
            cache.block_partial(q, kv, first, KEY_BLOCK.min(visible - first), slot);
        }
        for (i, out) in out.chunks_exact_mut(hd).enumerate() {
            let head = |b: usize| {
                let slot = b * part + i * (hd + 2);
                &partials[slot..slot + hd + 2]
            };
            merge_blocks((0..blocks).map(head), out);
        }
        PARTIALS.set(partials);
    });
}

/// The key/value cache of one layer as [`attention`] reads it.
struct Cache<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    hd: usize,
    capacity: usize,
    scale: f32,
    isa: Isa,
}

impl Cache<'_> {
    /// The group of query heads `q` (`group * hd` floats) against the `n` keys of KV head `kv`
    /// from position `first`: for each head, `[o (hd floats), m, l]` into `slot`, where `m` is
    /// the largest scaled score, `l = Σ exp(score - m)` and `o` those weights times the values,
    /// summed in key order. The group's scores and sums each take one pass over the block's
    /// keys and values ([`kernels::tile_scores_group`], [`kernels::weighted_sum_group`]). A run of consecutive blocks is one stream through memory, which
    /// the hardware prefetcher follows.
    fn block_partial(&self, q: &[f32], kv: usize, first: usize, n: usize, slot: &mut [f32]) {
        let hd = self.hd;
        let base = (kv * self.capacity + first) * hd;
        let (tile, values) = (
            &self.keys[base..base + KEY_BLOCK * hd],
            &self.values[base..base + n * hd],
        );
        SCORES.with_borrow_mut(|scores| {
            scores.resize(q.len() / hd * KEY_BLOCK, 0.0);
            kernels::tile_scores_group(self.isa, q, tile, self.scale, scores);
            for (scores, slot) in scores
                .chunks_exact_mut(KEY_BLOCK)
                .zip(slot.chunks_exact_mut(hd + 2))
            {
                let scores = &mut scores[..n];
                let m = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                kernels::exp_shifted(self.isa, scores, m);
                let l: f32 = scores.iter().sum();
                slot[hd..].copy_from_slice(&[m, l]);
            }
            kernels::weighted_sum_group(self.isa, scores, KEY_BLOCK, values, hd, slot, hd + 2);
        });
    }
}

/// One head's attention output from its blocks' `[o, m, l]` (`Cache::block_partial`), in
/// block order: `Σ_b exp(m_b - M) o_b / Σ_b exp(m_b - M) l_b`, `M` the largest `m_b`.
fn merge_blocks<'a>(blocks: impl Iterator<Item = &'a [f32]> + Clone, out: &mut [f32]) {
    let hd = out.len();
    let top = blocks
        .clone()
        .fold(f32::NEG_INFINITY, |top, b| top.max(b[hd]));
    out.fill(0.0);
    let mut sum = 0f32;
    for b in blocks {
        let w = (b[hd] - top).exp();
        sum += w * b[hd + 1];
        for (o, &v) in out.iter_mut().zip(&b[..hd]) {
            *o += w * v;
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

thread_local! {
    /// One query's attention scores for a block, reused across calls on this thread.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Blocks' partial results of [`attention`], reused across calls on this thread.
    static PARTIALS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The token embedding, left in the host's mapping; rows are dequantized on demand.
#[derive(Debug)]
pub struct EmbeddingTable {
    dtype: GgmlDType,
    data: &'static [u8],
    row_bytes: usize,
    n_embd: usize,
    vocab: usize,
}

impl EmbeddingTable {
    /// The table over `token_embd.weight` (`[n_embd, vocab]` in GGUF order).
    pub fn new(view: &'static ModelView, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        let info = tensor_info(view, "token_embd.weight")?;
        let dtype = ggml_dtype(info)?;
        if !cfg.n_embd.is_multiple_of(dtype.block_size()) {
            return Err(bad_tensor(
                info,
                format!("rows of {} are not whole {dtype:?} blocks", cfg.n_embd),
            ));
        }
        let row_bytes = cfg.n_embd / dtype.block_size() * dtype.type_size();
        let data = checked_data(view, info, row_bytes * cfg.vocab_size)?;
        Ok(Self {
            dtype,
            data,
            row_bytes,
            n_embd: cfg.n_embd,
            vocab: cfg.vocab_size,
        })
    }

    /// The rows for `tokens` into `out` (`tokens.len() * n_embd` floats, row by row).
    pub fn lookup_into(&self, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        out.resize(tokens.len() * self.n_embd, 0.0);
        for (&tok, dst) in tokens.iter().zip(out.chunks_exact_mut(self.n_embd)) {
            let id = tok as usize;
            if id >= self.vocab {
                return Err(ModelError::TokenOutOfRange {
                    token: tok,
                    vocab: self.vocab,
                });
            }
            let row = &self.data[id * self.row_bytes..(id + 1) * self.row_bytes];
            match self.dtype {
                GgmlDType::Q8_0 => dequantize_q8_0_row(row, dst),
                GgmlDType::F32 => {
                    for (o, b) in dst.iter_mut().zip(row.chunks_exact(4)) {
                        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
                GgmlDType::F16 => {
                    for (o, b) in dst.iter_mut().zip(row.chunks_exact(2)) {
                        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
                dtype => {
                    // Any other block type: let candle dequantize this one row.
                    let v = qtensor(dtype, row, 1, self.n_embd, &Device::Cpu)?
                        .dequantize(&Device::Cpu)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    dst.copy_from_slice(&v);
                }
            }
        }
        Ok(())
    }
}

/// The key/value cache: per block, keys and values as `[kv_head][capacity][head_dim]` f32
/// buffers, written in place as positions are computed and grown in steps of
/// [`KV_CACHE_STEP`] positions.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    n_kv_head: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    max_len: usize,
}

impl KvCache {
    /// An empty cache (no storage yet) for `cfg`.
    pub fn new(cfg: &LlamaConfig) -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            capacity: 0,
            len: 0,
            max_len: cfg.context_len,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of positions the storage holds before it must grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every cached position (the storage is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Makes room for `n` positions in each of `n_layer` blocks, rounding the capacity up as
    /// [`cache_capacity`] does; cached positions are kept.
    pub fn reserve(&mut self, n_layer: usize, n: usize) {
        if n <= self.capacity && self.k.len() == n_layer {
            return;
        }
        let capacity = cache_capacity(n, self.max_len);
        let len = if self.k.len() == n_layer { self.len } else { 0 };
        let (hd, old_cap) = (self.head_dim, self.capacity);
        // Whole key tiles move (a tile is in the same place in either layout).
        let kept = len.next_multiple_of(KEY_BLOCK).min(old_cap);
        let grow = |old: Option<&Vec<f32>>| {
            let mut buf = vec![0f32; self.n_kv_head * capacity * hd];
            if let Some(old) = old {
                for g in 0..self.n_kv_head {
                    buf[g * capacity * hd..(g * capacity + kept) * hd]
                        .copy_from_slice(&old[g * old_cap * hd..(g * old_cap + kept) * hd]);
                }
            }
            buf
        };
        let keep = len > 0;
        self.k = (0..n_layer)
            .map(|i| grow(self.k.get(i).filter(|_| keep)))
            .collect();
        self.v = (0..n_layer)
            .map(|i| grow(self.v.get(i).filter(|_| keep)))
            .collect();
        self.capacity = capacity;
        self.len = len;
    }

    /// Writes the keys and values (`[token][kv_head][head_dim]`) of a chunk starting at `pos`
    /// into block `layer`, the keys into their tiles ([`key_offset`]). The caller has reserved
    /// room.
    fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (hd, cap) = (self.head_dim, self.capacity);
        let row = self.n_kv_head * hd;
        for (t, (keys, values)) in k.chunks_exact(row).zip(v.chunks_exact(row)).enumerate() {
            let p = pos + t;
            for (g, (key, value)) in keys
                .chunks_exact(hd)
                .zip(values.chunks_exact(hd))
                .enumerate()
            {
                let at = (g * cap + p) * hd;
                self.v[layer][at..at + hd].copy_from_slice(value);
                for (d, &k) in key.iter().enumerate() {
                    self.k[layer][key_offset(g * cap + p, d, hd)] = k;
                }
            }
        }
    }
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
    /// The output layer's bound for greedy tokens, where it applies.
    output_bound: Option<OutputBound>,
    rope: RopeTables,
    cache: KvCache,
    scratch: Scratch,
}

/// The activations of one forward pass, kept from one decode step to the next so that a step
/// allocates nothing (a chunk of several tokens gives them back when it is done, so that a
/// long prompt's buffers do not outlive its prefill). Each is resized to the chunk, and every
/// element is written before it is read.
#[derive(Debug, Default)]
struct Scratch {
    /// The residual stream, `(t, n_embd)`.
    x: Vec<f32>,
    /// A normed copy of `x`, the input of the next projections; then attention's output, and
    /// the down projection's.
    h: Vec<f32>,
    /// The queries; then the output projection's result.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
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
        let output = load_matrix(view, output_name, cfg.vocab_size, d)?;
        Ok(Self {
            embedding: EmbeddingTable::new(view, &cfg)?,
            output_norm: load_vector(view, "output_norm.weight", d)?,
            output_bound: OutputBound::for_matrix(&output, Isa::best()),
            output,
            rope: RopeTables::new(cfg.rope_dim, cfg.rope_base, cfg.context_len),
            cache: KvCache::new(&cfg),
            scratch: Scratch::default(),
            blocks,
            cfg,
        })
    }

    /// The KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }
}

/// Checks a chunk of `t` tokens at `pos` against a cache holding `cached` positions and the
/// context length; returns the position after the chunk.
pub fn check_chunk(
    cfg: &LlamaConfig,
    cached: usize,
    t: usize,
    pos: usize,
) -> Result<usize, ModelError> {
    if t == 0 {
        return Err(ModelError::EmptyChunk);
    }
    if pos > cached {
        return Err(ModelError::PositionGap { pos, cached });
    }
    let end = pos + t;
    if end > cfg.context_len {
        return Err(ModelError::ContextOverflow {
            start: pos,
            end,
            context: cfg.context_len,
        });
    }
    Ok(end)
}

/// What generation and scoring need of a model, whichever way it computes: the hand-written
/// CPU [`LlamaModel`] or the GPU's `cuda::CudaLlama`.
pub trait Transformer: Send {
    /// The hyperparameters.
    fn config(&self) -> &LlamaConfig;

    /// Forgets the cached sequence; the next forward pass must start at position 0.
    fn reset(&mut self);

    /// Preallocates the KV cache for a sequence of `n` positions (it grows anyway if needed).
    fn reserve(&mut self, n: usize) -> Result<(), ModelError>;

    /// The most prompt tokens [`crate::generate::generate`] runs in one forward pass:
    /// [`crate::generate::PREFILL_CHUNK`], whose activations fit a CPU core's L2. A model with
    /// room for more (the GPU's) takes a longer prompt in fewer, fuller passes.
    fn prefill_chunk(&self) -> usize {
        crate::generate::PREFILL_CHUNK
    }

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

    /// Runs `tokens` (at positions `pos..`) and returns the greedy choice after the last one:
    /// the argmax of [`Transformer::forward`]'s logits ([`argmax`]'s ties and NaNs). `scratch`
    /// is room for the logits that an implementation may reuse from call to call.
    fn forward_greedy(
        &mut self,
        tokens: &[u32],
        pos: usize,
        scratch: &mut Vec<f32>,
    ) -> Result<u32, ModelError> {
        tensor_to_vec(&self.forward(tokens, pos)?, scratch)?;
        Ok(argmax(scratch))
    }

    /// Greedy-decodes up to `n` tokens after `token` (which goes in at position `pos`), each
    /// chosen token the next one's input, passing each to `emit` as soon as it is chosen; stops
    /// early when `emit` returns `false`. Returns how many were emitted. The same tokens as
    /// [`Transformer::forward_greedy`] one at a time, which is what this default does; an
    /// implementation may start the next step before `emit` has seen the last one.
    fn decode(
        &mut self,
        mut token: u32,
        mut pos: usize,
        n: usize,
        emit: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize, ModelError> {
        let mut scratch = Vec::new();
        for emitted in 0..n {
            token = self.forward_greedy(&[token], pos, &mut scratch)?;
            pos += 1;
            if !emit(token) {
                return Ok(emitted + 1);
            }
        }
        Ok(n)
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
        self.hidden_rows(tokens, pos)?;
        let h = Tensor::from_slice(
            &self.scratch.h,
            (tokens.len(), self.cfg.n_embd),
            &Device::Cpu,
        );
        self.release_chunk_buffers(tokens.len());
        Ok(h?)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.output.forward(hidden)?)
    }

    /// [`Transformer::forward`]'s logits computed straight into `scratch` from the last hidden
    /// row (the same matmul, so the same bits), with no tensor between.
    fn forward_greedy(
        &mut self,
        tokens: &[u32],
        pos: usize,
        scratch: &mut Vec<f32>,
    ) -> Result<u32, ModelError> {
        self.hidden_rows(tokens, pos)?;
        let d = self.cfg.n_embd;
        let last = &self.scratch.h[(tokens.len() - 1) * d..tokens.len() * d];
        if let Some(token) = self
            .output_bound
            .as_mut()
            .and_then(|bound| bound.argmax(&self.output, last))
        {
            self.release_chunk_buffers(tokens.len());
            return Ok(token);
        }
        scratch.resize(self.output.rows(), 0.0);
        matmul_many(&[&self.output], last, &mut [scratch.as_mut_slice()]);
        self.release_chunk_buffers(tokens.len());
        Ok(argmax(scratch))
    }
}

impl LlamaModel {
    /// [`Transformer::forward_hidden`] into the scratch buffers: the final-normed rows of
    /// `tokens` are left in `self.scratch.h`.
    fn hidden_rows(&mut self, tokens: &[u32], pos: usize) -> Result<(), ModelError> {
        let end = check_chunk(&self.cfg, self.cache.len(), tokens.len(), pos)?;
        self.cache.len = pos;
        self.cache.reserve(self.cfg.n_layer, end);
        let s = &mut self.scratch;
        self.embedding.lookup_into(tokens, &mut s.x)?;
        for (i, block) in self.blocks.iter().enumerate() {
            attention_block(&self.cfg, &self.rope, &mut self.cache, block, i, pos, s);
            mlp_block(block, self.cfg.rms_eps, s);
        }
        self.cache.len = end;
        rms_norm_rows(&s.x, &self.output_norm, self.cfg.rms_eps, &mut s.h);
        Ok(())
    }

    /// Gives the scratch buffers back after a chunk of several tokens (see [`Scratch`]).
    fn release_chunk_buffers(&mut self, tokens: usize) {
        if tokens > 1 {
            self.scratch = Scratch::default();
        }
    }
}

/// The attention half of block `i` for the chunk in `s.x` `(t, n_embd)` at `pos`: norm,
/// Q/K/V, RoPE, cache update, attention and output projection, added to `s.x`.
fn attention_block(
    cfg: &LlamaConfig,
    rope: &RopeTables,
    cache: &mut KvCache,
    block: &Block,
    i: usize,
    pos: usize,
    s: &mut Scratch,
) {
    let hd = cfg.head_dim;
    let t = s.x.len() / cfg.n_embd;
    rms_norm_rows(&s.x, &block.attn_norm, cfg.rms_eps, &mut s.h);
    let (q_dim, kv_dim) = (cfg.n_head * hd, cfg.n_kv_head * hd);
    s.q.resize(t * q_dim, 0.0);
    s.k.resize(t * kv_dim, 0.0);
    s.v.resize(t * kv_dim, 0.0);
    matmul_many(
        &[&block.wq, &block.wk, &block.wv],
        &s.h,
        &mut [&mut s.q, &mut s.k, &mut s.v],
    );
    rope.rotate(&mut s.q, cfg.n_head, hd, pos);
    rope.rotate(&mut s.k, cfg.n_kv_head, hd, pos);
    cache.store(i, pos, &s.k, &s.v);
    let y = &mut s.h;
    y.resize(t * q_dim, 0.0);
    let shape = AttentionShape {
        n_head: cfg.n_head,
        n_kv_head: cfg.n_kv_head,
        head_dim: hd,
        capacity: cache.capacity,
    };
    attention(
        &s.q,
        &cache.k[i],
        &cache.v[i],
        shape,
        pos,
        crate::pool::global(),
        y,
    );
    s.q.resize(t * cfg.n_embd, 0.0);
    matmul_many(&[&block.wo], &s.h, &mut [&mut s.q]);
    add_into(&mut s.x, &s.q);
}

/// The MLP half of a block for the chunk in `s.x`: norm, then the SwiGLU, `silu(h · gateᵀ) *
/// (h · upᵀ)` with `silu(g) = g / (1 + exp(-g))` (gate and up one parallel step; the `exp` in
/// vector lanes, [`kernels::exp_shifted`]), then the down projection, added to `s.x`.
fn mlp_block(block: &Block, eps: f64, s: &mut Scratch) {
    let t = s.x.len() / block.w_down.rows();
    let ff = block.w_gate.rows();
    rms_norm_rows(&s.x, &block.ffn_norm, eps, &mut s.h);
    s.gate.resize(t * ff, 0.0);
    s.up.resize(t * ff, 0.0);
    matmul_many(
        &[&block.w_gate, &block.w_up],
        &s.h,
        &mut [&mut s.gate, &mut s.up],
    );
    // silu(g) = g / (1 + e^-g), or g e^g / (1 + e^g) below 0: one `e = e^-|g|` serves both
    // and never overflows, so it can take the vector exp (`h` is free until the down
    // projection).
    let e = &mut s.h;
    e.clear();
    e.extend(s.gate.iter().map(|g| -g.abs()));
    kernels::exp_shifted(Isa::best(), e, 0.0);
    for ((g, u), e) in s.gate.iter_mut().zip(&s.up).zip(e.iter()) {
        let silu = if *g >= 0.0 {
            *g / (1.0 + e)
        } else {
            *g * e / (1.0 + e)
        };
        *g = silu * u;
    }
    s.h.resize(s.x.len(), 0.0);
    matmul_many(&[&block.w_down], &s.gate, &mut [&mut s.h]);
    add_into(&mut s.x, &s.h);
}

/// `x += update`, element by element (the residual connection).
fn add_into(x: &mut [f32], update: &[f32]) {
    for (x, u) in x.iter_mut().zip(update) {
        *x += u;
    }
}

/// RMSNorm of each row of `x` (rows of `weight.len()`) into `out`, resized to fit.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f64, out: &mut Vec<f32>) {
    let d = weight.len();
    out.resize(x.len(), 0.0);
    for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        rms_norm_row(row, weight, eps, dst);
    }
}

fn contiguous_f32<'a>(x: &'a [f32], layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&x[start..end]),
        None => candle_core::bail!("{op}: input is not contiguous"),
    }
}

/// Copies the contents of an f32 tensor into `out` (cleared first); a tensor on another device
/// is copied to the host first.
pub fn tensor_to_vec(t: &Tensor, out: &mut Vec<f32>) -> Result<(), ModelError> {
    let t = if t.device().is_cpu() {
        t.contiguous()?
    } else {
        t.to_device(&Device::Cpu)?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Candle(candle_core::Error::Msg(
            "expected a CPU tensor".into(),
        )));
    };
    let x = contiguous_f32(cpu.as_slice::<f32>()?, layout, "read")?;
    out.clear();
    out.extend_from_slice(x);
    Ok(())
}

fn tensor_info<'v>(view: &'v ModelView, name: &str) -> Result<&'v TensorInfo, ModelError> {
    view.tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
}

fn bad_tensor(info: &TensorInfo, problem: String) -> ModelError {
    ModelError::BadTensor {
        name: info.name.to_string(),
        problem,
    }
}

/// The candle type for a tensor's ggml type id.
fn ggml_dtype(info: &TensorInfo) -> Result<GgmlDType, ModelError> {
    let unsupported = || bad_tensor(info, format!("unsupported ggml type id {}", info.ggml_type));
    Ok(
        match GgmlType::from_id(info.ggml_type).ok_or_else(unsupported)? {
            GgmlType::F32 => GgmlDType::F32,
            GgmlType::F16 => GgmlDType::F16,
            GgmlType::BF16 => GgmlDType::BF16,
            GgmlType::Q4_0 => GgmlDType::Q4_0,
            GgmlType::Q4_1 => GgmlDType::Q4_1,
            GgmlType::Q5_0 => GgmlDType::Q5_0,
            GgmlType::Q5_1 => GgmlDType::Q5_1,
            GgmlType::Q8_0 => GgmlDType::Q8_0,
            GgmlType::Q2K => GgmlDType::Q2K,
            GgmlType::Q3K => GgmlDType::Q3K,
            GgmlType::Q4K => GgmlDType::Q4K,
            GgmlType::Q5K => GgmlDType::Q5K,
            GgmlType::Q6K => GgmlDType::Q6K,
            _ => return Err(unsupported()),
        },
    )
}

/// The tensor's bytes, checked to hold at least `expected` of them.
fn checked_data(
    view: &'static ModelView,
    info: &TensorInfo,
    expected: usize,
) -> Result<&'static [u8], ModelError> {
    let data = view.tensor_data(info);
    if data.len() < expected {
        return Err(bad_tensor(
            info,
            format!("holds {} bytes, its dims need {expected}", data.len()),
        ));
    }
    Ok(&data[..expected])
}

/// Bytes aligned for any ggml block type: borrowed when they already are, else copied.
pub(crate) enum AlignedBytes<'a> {
    Borrowed(&'a [u8]),
    Owned { words: Vec<u64>, len: usize },
}

impl<'a> AlignedBytes<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<u64>()) {
            return Self::Borrowed(bytes);
        }
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut b = [0u8; 8];
                b[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(b)
            })
            .collect();
        Self::Owned {
            words,
            len: bytes.len(),
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Self::Borrowed(bytes) => bytes,
            // SAFETY: `words` holds at least `len` initialized bytes, in memory order.
            Self::Owned { words, len } => unsafe {
                std::slice::from_raw_parts(words.as_ptr() as *const u8, *len)
            },
        }
    }
}

/// A quantized (or float) matrix `(rows, cols)` (GGUF dims `[cols, rows]`) as a [`Matrix`]:
/// Q4_1 and Q8_0 borrowed from the mapping, F32 read, anything else dequantized by candle.
pub(crate) fn load_matrix(
    view: &'static ModelView,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Matrix, ModelError> {
    let (dtype, data) = matrix_data(view, name, rows, cols)?;
    let weights = match dtype {
        GgmlDType::Q4_1 => Weights::Q4_1(data),
        GgmlDType::Q8_0 => Weights::Q8_0(data),
        GgmlDType::F32 => Weights::F32(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        dtype => Weights::F32(
            qtensor(dtype, data, rows, cols, &Device::Cpu)?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        ),
    };
    Ok(Matrix::new(weights, rows, cols))
}

/// The type and bytes of the matrix `name`, `(rows, cols)` (GGUF dims `[cols, rows]`), after
/// checking its dims, that its rows are whole blocks, and that the file holds its bytes.
pub(crate) fn matrix_data(
    view: &'static ModelView,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<(GgmlDType, &'static [u8]), ModelError> {
    let info = tensor_info(view, name)?;
    if info.dims.as_slice() != [cols as u64, rows as u64] {
        return Err(bad_tensor(
            info,
            format!("dims {:?}, expected [{cols}, {rows}]", info.dims.as_slice()),
        ));
    }
    let dtype = ggml_dtype(info)?;
    if !cols.is_multiple_of(dtype.block_size()) {
        return Err(bad_tensor(
            info,
            format!("rows of {cols} are not whole {dtype:?} blocks"),
        ));
    }
    let bytes = rows * cols / dtype.block_size() * dtype.type_size();
    Ok((dtype, checked_data(view, info, bytes)?))
}

/// `(rows, cols)` ggml blocks of `dtype` as a candle tensor on `device` (the bytes are copied
/// to aligned memory first when the mapping leaves them unaligned).
pub(crate) fn qtensor(
    dtype: GgmlDType,
    data: &[u8],
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<QTensor, ModelError> {
    Ok(qtensor_from_ggml(
        dtype,
        AlignedBytes::new(data).as_slice(),
        vec![rows, cols],
        device,
    )?)
}

/// An F32 vector of length `n` (the norm weights).
pub(crate) fn load_vector(
    view: &'static ModelView,
    name: &str,
    n: usize,
) -> Result<Vec<f32>, ModelError> {
    let info = tensor_info(view, name)?;
    if info.dims.as_slice() != [n as u64]
        || GgmlType::from_id(info.ggml_type) != Some(GgmlType::F32)
    {
        return Err(bad_tensor(
            info,
            format!(
                "type id {} dims {:?}, expected F32 [{n}]",
                info.ggml_type,
                info.dims.as_slice()
            ),
        ));
    }
    let data = checked_data(view, info, 4 * n)?;
    Ok(data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// A tiny random Llama model in GGUF form (Q8_0 projections and embedding, F32 norms), for
/// tests that need a whole model without the real file.
#[cfg(test)]
pub(crate) mod tiny {
    use abi_stable::std_types::{RSlice, RVec};
    use plugin_api::{MetaValue, MetadataEntry, ModelView, TensorInfo};

    /// Vocabulary size of the tiny model.
    pub const VOCAB: usize = 16;

    /// The shape of a random test model: width, FFN width, blocks, query and KV heads,
    /// vocabulary, context, and whether the projections are Q4_1 (else Q8_0, as the embedding).
    #[derive(Clone, Copy, Debug)]
    pub struct Shape {
        pub d: u64,
        pub ff: u64,
        pub n_layer: u64,
        pub n_head: u64,
        pub n_kv: u64,
        pub vocab: u64,
        pub context: u64,
        pub q4_1: bool,
    }

    /// A leaked view of a 2-block model: width 32, 2 query heads sharing 1 KV head, FFN 64.
    pub fn view(architecture: &str, context: u64) -> &'static ModelView {
        let shape = Shape {
            d: 32,
            ff: 64,
            n_layer: 2,
            n_head: 2,
            n_kv: 1,
            vocab: VOCAB as u64,
            context,
            q4_1: false,
        };
        shaped(architecture, shape)
    }

    /// A leaked view of a random model of `shape` (RoPE over the whole head), so that a GPU
    /// probe can time a real model's shapes without the file.
    pub fn shaped(architecture: &str, shape: Shape) -> &'static ModelView {
        let Shape {
            d,
            ff,
            n_layer,
            n_head,
            n_kv,
            vocab,
            context,
            q4_1,
        } = shape;
        let head_dim = d / n_head;
        let seed = std::cell::Cell::new(0x2545_f491_4f6c_dd1du64);
        let next = || {
            let mut s = seed.get();
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            seed.set(s);
            s
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
        let q8_0 = |cols: u64, rows: u64| -> Vec<u8> {
            let mut data = Vec::new();
            for _ in 0..cols * rows / 32 {
                data.extend(half::f16::from_f32(0.02).to_le_bytes());
                data.extend((0..32).map(|_| (next() % 255) as u8 ^ 0x80));
            }
            data
        };
        // Q4_1 blocks: the f16 pair (d, m), then 16 bytes of nibbles, 8 random bytes at a time.
        let q4_1_blocks = |cols: u64, rows: u64| -> Vec<u8> {
            let mut data = Vec::with_capacity((cols * rows / 32 * 20) as usize);
            for _ in 0..cols * rows / 32 {
                data.extend(half::f16::from_f32(0.01).to_le_bytes());
                data.extend(half::f16::from_f32(-0.075).to_le_bytes());
                data.extend(next().to_le_bytes());
                data.extend(next().to_le_bytes());
            }
            data
        };
        // Norm weights around 1 but not all 1, so that a kernel which skips them shows.
        let norm = |n: u64| -> Vec<u8> {
            (0..n)
                .flat_map(|i| (0.75 + (i % 5) as f32 / 8.0).to_le_bytes())
                .collect()
        };
        let embd = q8_0(d, vocab);
        add("token_embd.weight".into(), 8, vec![d, vocab], embd);
        add("output_norm.weight".into(), 0, vec![d], norm(d));
        for i in 0..n_layer {
            let mut m = |part: &str, cols: u64, rows: u64| {
                if q4_1 {
                    let data = q4_1_blocks(cols, rows);
                    add(format!("blk.{i}.{part}.weight"), 3, vec![cols, rows], data);
                } else {
                    let data = q8_0(cols, rows);
                    add(format!("blk.{i}.{part}.weight"), 8, vec![cols, rows], data);
                }
            };
            m("attn_q", d, d);
            m("attn_k", d, n_kv * head_dim);
            m("attn_v", d, n_kv * head_dim);
            m("attn_output", d, d);
            m("ffn_gate", d, ff);
            m("ffn_up", d, ff);
            m("ffn_down", ff, d);
            add(format!("blk.{i}.attn_norm.weight"), 0, vec![d], norm(d));
            add(format!("blk.{i}.ffn_norm.weight"), 0, vec![d], norm(d));
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
            meta("llama.attention.head_count", MetaValue::Uint(n_head)),
            meta("llama.attention.head_count_kv", MetaValue::Uint(n_kv)),
            meta("llama.rope.dimension_count", MetaValue::Uint(head_dim)),
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
    use crate::matmul::dot;

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
    fn chunked_and_token_by_token_forward_agree() {
        let mut model = LlamaModel::from_gguf(tiny::view("llama", 64)).unwrap();
        let tokens = [3u32, 1, 4, 1, 5, 9, 2, 6, 5, 3];
        let hidden = model.forward_hidden(&tokens, 0).unwrap();
        let chunked = model.logits(&hidden).unwrap().to_vec2::<f32>().unwrap();
        model.reset();
        // One token at a time may round as a reordered sum does (the SIMD one-token kernels
        // take each block's scale out of its sum): the same logits to about 1e-5.
        let close = |one: &[f32], chunk: &[f32], i: usize| {
            let scale = chunk.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (a, b) in one.iter().zip(chunk) {
                assert!(
                    (a - b).abs() <= 1e-4 * scale,
                    "position {i}: {a} against {b}"
                );
            }
        };
        for (i, &tok) in tokens.iter().enumerate() {
            let one = model.forward(&[tok], i).unwrap().to_vec1::<f32>().unwrap();
            close(&one, &chunked[i], i);
        }
        assert_eq!(model.cache().len(), tokens.len());
        // rewinding to an earlier position recomputes the same logits
        let again = model
            .forward(&tokens[4..6], 4)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&again, &chunked[5], 5);
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
    fn merged_blocks_normalize_and_survive_large_scores() {
        // Two blocks of one-wide values: scores {0, ln 2} and {1000, 1000}.
        let hd = 1;
        let pool = Pool::new(1);
        let (keys, values) = padded(&[0.0, 2f32.ln()], &[1.0, 4.0], hd);
        let shape = AttentionShape {
            n_head: 1,
            n_kv_head: 1,
            head_dim: hd,
            capacity: KEY_BLOCK,
        };
        let mut out = [0f32];
        // Query 1 at position 1 sees {0, ln 2}: weights 1/3 and 2/3.
        attention(
            &[1.0],
            &key_tiles(&keys, hd),
            &values,
            shape,
            1,
            &pool,
            &mut out,
        );
        assert!((out[0] - 3.0).abs() < 1e-6, "{out:?}");
        // Across blocks (KEY_BLOCK keys apart), scores of 1000 neither overflow nor swamp.
        let n = KEY_BLOCK + 2;
        let (mut keys, mut values) = padded(&vec![0f32; n], &vec![0f32; n], hd);
        (keys[0], keys[n - 1], values[0], values[n - 1]) = (1000.0, 1000.0, 2.0, 6.0);
        let shape = AttentionShape {
            capacity: keys.len(),
            ..shape
        };
        let keys = key_tiles(&keys, hd);
        attention(&[1.0], &keys, &values, shape, n - 1, &pool, &mut out);
        assert!((out[0] - 4.0).abs() < 1e-6, "{out:?}");
    }

    /// Random queries, keys and values: `heads` query heads over `kv` KV heads of width `hd`.
    fn random_attention(heads: usize, kv: usize, hd: usize, len: usize) -> [Vec<f32>; 3] {
        let mut seed = 0x2545_f491_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32) * 4.0 - 2.0
        };
        [
            (0..len * heads * hd).map(|_| next()).collect(),
            (0..kv * len * hd).map(|_| next()).collect(),
            (0..kv * len * hd).map(|_| next()).collect(),
        ]
    }

    #[test]
    fn blocked_attention_matches_a_plain_softmax_and_any_cut_or_thread_count() {
        // Three heads a KV head, over 150 positions: three blocks, the last partial.
        let (heads, kv, hd, len) = (6, 2, 16, 2 * KEY_BLOCK + 22);
        let capacity = 3 * KEY_BLOCK;
        let [q, keys, values] = random_attention(heads, kv, hd, capacity);
        let shape = AttentionShape {
            n_head: heads,
            n_kv_head: kv,
            head_dim: hd,
            capacity,
        };
        let tiles = key_tiles(&keys, hd);
        let row = heads * hd;
        // All positions as one chunk, on two threads.
        let mut whole = vec![0f32; len * row];
        let q = &q[..len * row];
        attention(q, &tiles, &values, shape, 0, &Pool::new(2), &mut whole);
        // The reference: softmax in f64, query by query.
        for t in 0..len {
            for h in 0..heads {
                let qh = &q[t * row + h * hd..][..hd];
                let cache = (h / (heads / kv)) * capacity * hd;
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        let k = &keys[cache + j * hd..][..hd];
                        qh.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let top = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(j, e)| e / sum * values[cache + j * hd + d] as f64)
                        .sum();
                    let got = whole[t * row + h * hd + d] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "t {t} h {h} d {d}: {got} vs {want}"
                    );
                }
            }
        }
        // Token by token (the decode path) and in uneven chunks, on one and two threads: the
        // same bits.
        for threads in [1, 2] {
            let pool = Pool::new(threads);
            let mut cut = vec![0f32; len * row];
            let mut t = 0;
            for n in [1, 1, 63, 1, 2, 64, 1].iter().cycle() {
                let n = (*n).min(len - t);
                let (q, out) = (&q[t * row..(t + n) * row], &mut cut[t * row..(t + n) * row]);
                attention(q, &tiles, &values, shape, t, &pool, out);
                t += n;
                if t == len {
                    break;
                }
            }
            assert_eq!(cut, whole, "{threads} threads");
        }
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

    /// One KV head's key and value rows, padded with zeros to a whole tile of positions.
    fn padded(keys: &[f32], values: &[f32], hd: usize) -> (Vec<f32>, Vec<f32>) {
        let pad = |rows: &[f32]| {
            let mut rows = rows.to_vec();
            rows.resize(rows.len().next_multiple_of(KEY_BLOCK * hd), 0.0);
            rows
        };
        (pad(keys), pad(values))
    }

    /// Two query heads sharing one KV head of width 2, three cached positions.
    fn tiny_attention(q: &[f32], start_pos: usize, threads: usize) -> Vec<f32> {
        let shape = AttentionShape {
            n_head: 2,
            n_kv_head: 1,
            head_dim: 2,
            capacity: KEY_BLOCK,
        };
        // keys: position 0 along x, 1 along y, 2 along -x; values: one-hot-ish markers
        let (keys, values) = padded(
            &[1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 9.0, 9.0],
            &[1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 7.0, 7.0],
            2,
        );
        let keys = key_tiles(&keys, 2);
        let mut out = vec![0.0; q.len()];
        attention(
            q,
            &keys,
            &values,
            shape,
            start_pos,
            &Pool::new(threads),
            &mut out,
        );
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
        // A key's element d sits KEY_BLOCK floats after its element d - 1 (a tile).
        let key = |c: &KvCache, g: usize, p: usize| -> Vec<f32> {
            let p = g * c.capacity() + p;
            (0..4).map(|d| c.k[1][key_offset(p, d, 4)]).collect()
        };
        assert_eq!(key(&cache, 1, 2), [5.0, 6.0, 7.0, 8.0]);
        assert_eq!(key(&cache, 0, 2), [1.0, 2.0, 3.0, 4.0]);
        cache.reserve(2, KV_CACHE_STEP + 1);
        assert_eq!(cache.capacity(), 2 * KV_CACHE_STEP);
        assert_eq!(cache.len(), 3);
        assert_eq!(key(&cache, 1, 2), [5.0, 6.0, 7.0, 8.0]);
        assert_eq!(
            &cache.v[1][at(&cache, 0, 2)..][..4],
            &[-1.0, -2.0, -3.0, -4.0]
        );
        cache.reserve(2, 1999);
        assert_eq!(
            cache.capacity(),
            2000_usize.next_multiple_of(KEY_BLOCK),
            "capped at the context length, in whole tiles"
        );
        assert_eq!(key(&cache, 1, 2), [5.0, 6.0, 7.0, 8.0]);
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
