//! The same Llama model in candle tensor operations, for any candle device: the GPU path.
//!
//! [`TensorLlama`] computes what [`LlamaModel`](crate::model::LlamaModel) computes (RMSNorm,
//! Q/K/V, interleaved RoPE, causal grouped-query attention over a KV cache, SwiGLU MLP, tied or
//! separate output layer), but as whole-tensor candle operations, so that it runs where candle
//! runs: CUDA (`--features cuda`), and the CPU, where the tests check it against the hand-written
//! model. The CPU default stays the hand-written model, which gives the same logits whatever the
//! chunking (to the rounding of its one-token kernel).
//!
//! Activations stay f32, as the quality gates require (see [`crate::matmul`]): on CUDA the
//! weights stay quantized in GPU memory and a single token multiplies them with candle's
//! dequantize-mul-mat-vec kernel on f32 inputs ([`use_f32_activation_kernels`]); a chunk of several
//! tokens dequantizes a matrix to f32 and multiplies on cuBLAS in f32. candle's default CUDA
//! kernels would first round the activations to 8 bits. On the CPU the weights are dequantized to
//! f32 at load. The token embedding is looked up on the host ([`EmbeddingTable`]) and the rows are
//! copied to the device; logits come back to the host for greedy choice and scoring.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use plugin_api::ModelView;

use crate::model::{
    causal_visible, check_chunk, load_vector, matrix_data, qtensor, EmbeddingTable, LlamaConfig,
    ModelError, RopeTables, Transformer, KV_CACHE_STEP,
};

/// Makes every quantized matmul on CUDA keep its activations in f32: one token goes through
/// the dequantize-mul-mat-vec kernel, several through a dequantized f32 matmul. Without it
/// candle quantizes the activations to 8 bits first (a process-wide candle switch; a worker
/// process loads one variant, so it is this engine's alone).
pub fn use_f32_activation_kernels() {
    #[cfg(feature = "cuda")]
    candle_core::quantized::cuda::set_force_dmmv(true);
}

/// One transformer block's weights, on the device.
struct TensorBlock {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

/// Keys and values per block as `(1, n_kv_head, capacity, head_dim)` device tensors, written in
/// place and grown in steps of [`KV_CACHE_STEP`] positions.
struct TensorKvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    capacity: usize,
    len: usize,
}

/// A Llama-architecture model as candle tensors on one device, with its KV cache.
pub struct TensorLlama {
    cfg: LlamaConfig,
    device: Device,
    embedding: EmbeddingTable,
    blocks: Vec<TensorBlock>,
    output_norm: Tensor,
    output: QMatMul,
    /// `(context, rope_dim / 2)` cos and sin tables, on the device.
    cos: Tensor,
    sin: Tensor,
    cache: TensorKvCache,
}

impl TensorLlama {
    /// Builds the model over the host's GGUF view and copies its weights to `device`.
    pub fn from_gguf(view: &'static ModelView, device: &Device) -> Result<Self, ModelError> {
        use_f32_activation_kernels();
        let cfg = LlamaConfig::from_view(view)?;
        let (d, ff) = (cfg.n_embd, cfg.n_ff);
        let (q_dim, kv_dim) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
        let vector = |name: &str| -> Result<Tensor, ModelError> {
            Ok(Tensor::from_vec(load_vector(view, name, d)?, d, device)?)
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let name = |part: &str| format!("blk.{i}.{part}.weight");
                let matrix = |part: &str, rows, cols| matmul(view, &name(part), rows, cols, device);
                Ok(TensorBlock {
                    attn_norm: vector(&name("attn_norm"))?,
                    wq: matrix("attn_q", q_dim, d)?,
                    wk: matrix("attn_k", kv_dim, d)?,
                    wv: matrix("attn_v", kv_dim, d)?,
                    wo: matrix("attn_output", d, q_dim)?,
                    ffn_norm: vector(&name("ffn_norm"))?,
                    w_gate: matrix("ffn_gate", ff, d)?,
                    w_up: matrix("ffn_up", ff, d)?,
                    w_down: matrix("ffn_down", d, ff)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let output_name = if view.tensor("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let rope = RopeTables::new(cfg.rope_dim, cfg.rope_base, cfg.context_len);
        let half = cfg.rope_dim / 2;
        let (cos, sin) = rope.tables();
        Ok(Self {
            embedding: EmbeddingTable::new(view, &cfg)?,
            output_norm: vector("output_norm.weight")?,
            output: matmul(view, output_name, cfg.vocab_size, d, device)?,
            cos: Tensor::from_slice(cos, (cfg.context_len, half), device)?,
            sin: Tensor::from_slice(sin, (cfg.context_len, half), device)?,
            cache: TensorKvCache {
                k: Vec::new(),
                v: Vec::new(),
                capacity: 0,
                len: 0,
            },
            blocks,
            device: device.clone(),
            cfg,
        })
    }

    /// Makes room for `n` positions, keeping what is cached.
    fn grow_cache(&mut self, n: usize) -> Result<(), ModelError> {
        let cache = &mut self.cache;
        if n <= cache.capacity && cache.k.len() == self.cfg.n_layer {
            return Ok(());
        }
        let capacity = n
            .div_ceil(KV_CACHE_STEP)
            .saturating_mul(KV_CACHE_STEP)
            .min(self.cfg.context_len)
            .max(n);
        let shape = (1, self.cfg.n_kv_head, capacity, self.cfg.head_dim);
        let keep = cache.len.min(cache.capacity);
        let grow = |old: Option<&Tensor>| -> Result<Tensor, ModelError> {
            let new = Tensor::zeros(shape, candle_core::DType::F32, &self.device)?;
            if let Some(old) = old.filter(|_| keep > 0) {
                new.slice_set(&old.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
            }
            Ok(new)
        };
        let n_layer = self.cfg.n_layer;
        let k = (0..n_layer)
            .map(|i| grow(cache.k.get(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let v = (0..n_layer)
            .map(|i| grow(cache.v.get(i)))
            .collect::<Result<Vec<_>, _>>()?;
        (cache.k, cache.v, cache.capacity) = (k, v, capacity);
        Ok(())
    }

    /// The attention half of block `i` for `x` `(t, n_embd)` at `pos`: the residual update.
    fn attention(&mut self, i: usize, x: &Tensor, pos: usize) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let block = &self.blocks[i];
        let (t, hd) = (x.dim(0)?, cfg.head_dim);
        let (n_head, n_kv) = (cfg.n_head, cfg.n_kv_head);
        let h = candle_nn::ops::rms_norm(x, &block.attn_norm, cfg.rms_eps as f32)?;
        // (t, heads * hd) -> (1, heads, t, hd)
        let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = self.rope(heads(block.wq.forward(&h)?, n_head)?, pos)?;
        let k = self.rope(heads(block.wk.forward(&h)?, n_kv)?, pos)?;
        let v = heads(block.wv.forward(&h)?, n_kv)?;
        let cache = &self.cache;
        cache.k[i].slice_set(&k, 2, pos)?;
        cache.v[i].slice_set(&v, 2, pos)?;
        let end = pos + t;
        let keys = cache.k[i].narrow(2, 0, end)?.contiguous()?;
        let values = cache.v[i].narrow(2, 0, end)?.contiguous()?;

        // Grouped queries: query head h reads KV head h / group, so the heads sharing a KV head
        // are consecutive and (1, n_head, t, hd) regroups as (1, n_kv, group * t, hd).
        let group = n_head / n_kv;
        let q = q.reshape((1, n_kv, group * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?;
        let scores = if t > 1 {
            let mask: Vec<f32> = (0..t)
                .flat_map(|row| {
                    let visible = causal_visible(pos, row);
                    (0..end).map(move |j| if j < visible { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, end), &self.device)?;
            scores
                .reshape((1, n_kv, group, t, end))?
                .broadcast_add(&mask)?
                .reshape((1, n_kv, group * t, end))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs
            .matmul(&values)?
            .reshape((1, n_head, t, hd))?
            .transpose(1, 2)?
            .reshape((t, n_head * hd))?;
        Ok(block.wo.forward(&y)?)
    }

    /// Interleaved RoPE on `(1, heads, t, head_dim)` at positions `pos..`; dimensions past
    /// `rope_dim` pass unrotated.
    fn rope(&self, x: Tensor, pos: usize) -> Result<Tensor, ModelError> {
        let t = x.dim(2)?;
        let (hd, rd) = (self.cfg.head_dim, self.cfg.rope_dim);
        let cos = self.cos.narrow(0, pos, t)?.contiguous()?;
        let sin = self.sin.narrow(0, pos, t)?.contiguous()?;
        if rd == hd {
            return Ok(candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?);
        }
        let rotated =
            candle_nn::rotary_emb::rope_i(&x.narrow(3, 0, rd)?.contiguous()?, &cos, &sin)?;
        Ok(Tensor::cat(&[&rotated, &x.narrow(3, rd, hd - rd)?], 3)?.contiguous()?)
    }
}

impl Transformer for TensorLlama {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn reset(&mut self) {
        self.cache.len = 0;
    }

    fn reserve(&mut self, n: usize) -> Result<(), ModelError> {
        self.grow_cache(n.min(self.cfg.context_len))
    }

    fn forward_hidden(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor, ModelError> {
        let end = check_chunk(&self.cfg, self.cache.len, tokens.len(), pos)?;
        self.cache.len = pos;
        self.grow_cache(end)?;
        let eps = self.cfg.rms_eps as f32;
        let mut x = self.embedding.lookup(tokens)?.to_device(&self.device)?;
        for i in 0..self.blocks.len() {
            let attn = self.attention(i, &x, pos)?;
            x = (x + attn)?;
            let block = &self.blocks[i];
            let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
            let gate = block.w_gate.forward(&h)?.silu()?;
            let mlp = block.w_down.forward(&(gate * block.w_up.forward(&h)?)?)?;
            x = (x + mlp)?;
        }
        self.cache.len = end;
        Ok(candle_nn::ops::rms_norm(&x, &self.output_norm, eps)?)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.output.forward(&hidden.contiguous()?)?)
    }
}

/// A matrix `(rows, cols)` (GGUF dims `[cols, rows]`) as a candle matmul on `device`: quantized
/// blocks stay quantized on CUDA, everything else (and everything on the CPU) becomes f32.
fn matmul(
    view: &'static ModelView,
    name: &str,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<QMatMul, ModelError> {
    let (dtype, data) = matrix_data(view, name, rows, cols)?;
    let quantized = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    if quantized && device.is_cuda() {
        let q = qtensor(dtype, data, rows, cols, device)?;
        return Ok(QMatMul::QTensor(Arc::new(q)));
    }
    let q = qtensor(dtype, data, rows, cols, &Device::Cpu)?;
    Ok(QMatMul::Tensor(
        q.dequantize(&Device::Cpu)?.to_device(device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{tensor_to_vec, tiny, LlamaModel};

    /// The largest absolute difference between two logit vectors.
    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn matches_the_hand_written_model_on_the_cpu() {
        let view = tiny::view("llama", 64);
        let mut hand = LlamaModel::from_gguf(view).unwrap();
        let mut tensor = TensorLlama::from_gguf(view, &Device::Cpu).unwrap();
        let prompt = [1u32, 5, 9, 2, 7, 3, 11];
        // A prefill chunk, then tokens one by one: both paths of attention (masked, single).
        let (mut a, mut b) = (Vec::new(), Vec::new());
        if std::env::var("PRE").is_ok() {
            tensor.reserve(1024).unwrap();
        }
        tensor_to_vec(
            &Transformer::forward(&mut hand, &prompt, 0).unwrap(),
            &mut a,
        )
        .unwrap();
        tensor_to_vec(&tensor.forward(&prompt, 0).unwrap(), &mut b).unwrap();
        assert!(
            max_diff(&a, &b) < 1e-4,
            "prefill differs by {}",
            max_diff(&a, &b)
        );
        for (k, token) in [4u32, 8, 15].into_iter().enumerate() {
            let pos = prompt.len() + k;
            tensor_to_vec(
                &Transformer::forward(&mut hand, &[token], pos).unwrap(),
                &mut a,
            )
            .unwrap();
            tensor_to_vec(&tensor.forward(&[token], pos).unwrap(), &mut b).unwrap();
            assert!(
                max_diff(&a, &b) < 1e-4,
                "decode {k} differs by {}",
                max_diff(&a, &b)
            );
        }
        // Rewinding reuses the cache from an earlier position, as scoring after generation does.
        tensor_to_vec(
            &Transformer::forward(&mut hand, &prompt[..3], 0).unwrap(),
            &mut a,
        )
        .unwrap();
        tensor_to_vec(&tensor.forward(&prompt[..3], 0).unwrap(), &mut b).unwrap();
        assert!(max_diff(&a, &b) < 1e-4);
    }

    #[test]
    fn scoring_and_generation_match_the_hand_written_model() {
        let view = tiny::view("llama", 64);
        let mut hand = LlamaModel::from_gguf(view).unwrap();
        let mut tensor = TensorLlama::from_gguf(view, &Device::Cpu).unwrap();
        let tokens = [1u32, 5, 9, 2, 7, 3, 11, 4];
        let a = crate::generate::score(&mut hand, &tokens).unwrap();
        let b = crate::generate::score(&mut tensor, &tokens).unwrap();
        assert_eq!(a.len(), tokens.len() - 1);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.argmax, y.argmax);
            assert!((x.logprob - y.logprob).abs() < 1e-4, "{x:?} {y:?}");
        }
        let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
        crate::generate::generate(&mut hand, &tokens[..3], 5, |t| {
            out_a.extend_from_slice(t);
            true
        })
        .unwrap();
        crate::generate::generate(&mut tensor, &tokens[..3], 5, |t| {
            out_b.extend_from_slice(t);
            true
        })
        .unwrap();
        assert_eq!(out_a.len(), 5);
        assert_eq!(out_a, out_b);
    }

    #[test]
    fn the_cache_grows_past_a_step_and_keeps_its_contents() {
        // The same computation with and without a reallocation of the cache on the way must
        // agree exactly: growing only copies. (Against the hand-written model, long sequences
        // of the tiny model's large random weights amplify f32 reordering past any useful
        // tolerance; the short-sequence test above covers the arithmetic.)
        let view = tiny::view("llama", 2 * KV_CACHE_STEP as u64);
        let mut grown = TensorLlama::from_gguf(view, &Device::Cpu).unwrap();
        let mut reserved = TensorLlama::from_gguf(view, &Device::Cpu).unwrap();
        reserved.reserve(2 * KV_CACHE_STEP).unwrap();
        let prompt: Vec<u32> = (0..KV_CACHE_STEP as u32 - 1)
            .map(|i| (i * 7 + 3) % 16)
            .collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        tensor_to_vec(&grown.forward(&prompt, 0).unwrap(), &mut a).unwrap();
        tensor_to_vec(&reserved.forward(&prompt, 0).unwrap(), &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(grown.cache.capacity, KV_CACHE_STEP);
        // Two more tokens cross the step: the cache is reallocated and copied.
        for (k, token) in [3u32, 12].into_iter().enumerate() {
            let pos = prompt.len() + k;
            tensor_to_vec(&grown.forward(&[token], pos).unwrap(), &mut a).unwrap();
            tensor_to_vec(&reserved.forward(&[token], pos).unwrap(), &mut b).unwrap();
            assert_eq!(a, b, "token {k}");
        }
        assert_eq!(grown.cache.capacity, 2 * KV_CACHE_STEP);
        assert_eq!(reserved.cache.capacity, 2 * KV_CACHE_STEP);
    }

    #[test]
    fn bad_positions_and_tokens_are_errors() {
        let mut tensor = TensorLlama::from_gguf(tiny::view("llama", 8), &Device::Cpu).unwrap();
        assert!(matches!(
            tensor.forward(&[], 0),
            Err(ModelError::EmptyChunk)
        ));
        assert!(matches!(
            tensor.forward(&[1], 3),
            Err(ModelError::PositionGap { .. })
        ));
        assert!(matches!(
            tensor.forward(&[1; 9], 0),
            Err(ModelError::ContextOverflow { .. })
        ));
        assert!(matches!(
            tensor.forward(&[99], 0),
            Err(ModelError::TokenOutOfRange { .. })
        ));
    }
}
