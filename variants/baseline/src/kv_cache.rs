//! The KV cache: preallocated per layer, grown in steps of [`KV_CACHE_STEP`] positions and
//! written in place ([`KvCache`]), and the check every chunk passes before it runs
//! ([`check_chunk`]).

use crate::load::LlamaConfig;
use crate::model::ModelError;

/// The KV cache grows in steps of this many positions (and never past the context length).
pub const KV_CACHE_STEP: usize = 512;

/// The key/value cache: per block, keys and values as `[kv_head][capacity][head_dim]` f32
/// buffers, written in place as positions are computed and grown in steps of
/// [`KV_CACHE_STEP`] positions.
#[derive(Debug)]
pub struct KvCache {
    /// Keys per layer, `[kv_head][capacity][head_dim]`.
    pub(crate) k: Vec<Vec<f32>>,
    /// Values per layer, laid out as the keys.
    pub(crate) v: Vec<Vec<f32>>,
    n_kv_head: usize,
    head_dim: usize,
    /// Positions allocated per KV head.
    pub(crate) capacity: usize,
    /// Positions filled.
    pub(crate) len: usize,
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

    /// Makes room for `n` positions in each of `n_layer` blocks, rounding the capacity up to a
    /// multiple of [`KV_CACHE_STEP`] (at most the context length); cached positions are kept.
    pub fn reserve(&mut self, n_layer: usize, n: usize) {
        if n <= self.capacity && self.k.len() == n_layer {
            return;
        }
        let capacity = n
            .div_ceil(KV_CACHE_STEP)
            .saturating_mul(KV_CACHE_STEP)
            .min(self.max_len)
            .max(n);
        let len = if self.k.len() == n_layer { self.len } else { 0 };
        let (hd, old_cap) = (self.head_dim, self.capacity);
        let grow = |old: Option<&Vec<f32>>| {
            let mut buf = vec![0f32; self.n_kv_head * capacity * hd];
            if let Some(old) = old {
                for g in 0..self.n_kv_head {
                    buf[g * capacity * hd..(g * capacity + len) * hd]
                        .copy_from_slice(&old[g * old_cap * hd..(g * old_cap + len) * hd]);
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
    /// into block `layer`. The caller has reserved room.
    pub(crate) fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (hd, cap) = (self.head_dim, self.capacity);
        let row = self.n_kv_head * hd;
        for (dst, src) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            for (t, token) in src.chunks_exact(row).enumerate() {
                for (g, head) in token.chunks_exact(hd).enumerate() {
                    let at = (g * cap + pos + t) * hd;
                    dst[at..at + hd].copy_from_slice(head);
                }
            }
        }
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
