//! The per-token layers around attention: RMSNorm ([`rms_norm_row`], and as a candle op),
//! interleaved RoPE ([`RopeTables`]), and reading an f32 tensor back ([`tensor_to_vec`]).

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Storage, Tensor};

use crate::model::ModelError;

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

/// RMSNorm over the last dimension, as a candle op.
pub(crate) struct RmsNorm<'a> {
    /// The per-channel gains.
    pub(crate) weight: &'a [f32],
    /// Added to the mean square before the root.
    pub(crate) eps: f64,
}

impl CustomOp1 for RmsNorm<'_> {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage.as_slice::<f32>()?, layout, "rms-norm")?;
        let d = self.weight.len();
        if layout.dims().last() != Some(&d) {
            candle_core::bail!("rms-norm: input {:?} does not end in {d}", layout.dims())
        }
        let mut out = vec![0f32; x.len()];
        for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            rms_norm_row(row, self.weight, self.eps, dst);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
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
