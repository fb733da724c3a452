//! The working autoinfer variant: Llama-architecture GGUF inference on the CPU, with f32
//! activations and SIMD kernels over the GGUF's quantized weights; with the `cuda` cargo
//! feature, the same model on an NVIDIA GPU in hand-written CUDA kernels.
//!
//! Principal types:
//! - [`Baseline`]: the [`plugin_api::Engine`] the host loads; it picks the model for the asked
//!   device, ties it to the generation loop and is exported with [`plugin_api::export_variant!`].
//! - [`model::Transformer`]: what generation needs of a model, whichever device it runs on.
//! - [`model::LlamaModel`]: the CPU model: the weights ([`matmul::Matrix`]es over the GGUF
//!   blocks), the RoPE tables and the in-place [`model::KvCache`]; `forward` runs a chunk of
//!   tokens. It is also the quality oracle.
//! - `cuda::CudaLlama` (with the `cuda` feature): the same model on an NVIDIA GPU, every tensor
//!   on the device, in the kernels of `src/cuda/kernels.cu` (compiled at load by NVRTC).
//! - [`model::LlamaConfig`]: the hyperparameters, read from the `llama.*` metadata.
//! - [`matmul::Matrix`]: a weight matrix left in the host's mapping, and its f32 matmul.
//! - [`pool::Pool`]: the persistent threads every parallel step runs on.
//! - [`output_argmax::OutputBound`]: decode's greedy token from a bound pass over the output
//!   layer, with only the rows that can win computed exactly.
//! - [`kernels`]: the Q4_1/Q8_0 row kernels and attention's (scores from tiles of keys, the
//!   softmax's `exp`, the weighted sum of values), for AVX-512, AVX2 and a scalar reference,
//!   picked at run time by [`kernels::Isa::best`].
//! - [`heap::CacheLineAlloc`]: the global allocator, which puts buffers on cache lines.
//! - [`generate::generate`] and [`generate::score`]: chunked prefill then greedy decoding, and
//!   teacher-forced scoring.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod generate;
pub mod heap;
pub mod kernels;
pub mod matmul;
pub mod model;
pub mod output_argmax;
pub mod pool;

use plugin_api::{Device, Engine, HostLog, LoadOptions, ModelView, ScoredPosition, Sink};

use crate::model::{LlamaModel, Transformer};

/// Every buffer of the variant starts on a cache line ([`heap`]).
#[global_allocator]
static ALLOC: heap::CacheLineAlloc = heap::CacheLineAlloc;

/// The baseline engine: the model for the asked device plus the host's log.
pub struct Baseline {
    model: Box<dyn Transformer>,
    log: HostLog,
}

impl Engine for Baseline {
    /// Honours the `threads` option by sizing the [`pool`], which the CPU matmuls run on and
    /// whose size attention deals its queries to (a worker process loads one variant, so the
    /// pool is this engine's alone), and the `device` option by choosing the model:
    /// the hand-written [`LlamaModel`] on the CPU, `cuda::CudaLlama` on CUDA.
    fn load(
        model: &'static ModelView,
        log: HostLog,
        options: &LoadOptions,
    ) -> Result<Self, String> {
        if let Some(n) = options.threads()? {
            if !pool::init(n) {
                return Err(format!(
                    "cannot compute with {n} threads: the pool already runs {}",
                    pool::global().threads()
                ));
            }
            log.info(&format!("baseline: computing with {n} threads"));
        }
        let device = options.device()?;
        let model: Box<dyn Transformer> = match device {
            Device::Cpu => Box::new(LlamaModel::from_gguf(model).map_err(|e| e.to_string())?),
            Device::Cuda(ordinal) => cuda_model(model, ordinal)?,
            Device::Metal(_) => {
                return Err(format!(
                    "variant {} cannot run on {device}: it has no Metal support (its cargo \
                     features are `cuda` only)",
                    env!("CARGO_PKG_NAME")
                ))
            }
        };
        let cfg = model.config();
        log.info(&format!(
            "baseline: llama model on {device} with {} blocks, width {}, {} heads ({} KV), \
             vocabulary {}, context {}",
            cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size, cfg.context_len
        ));
        Ok(Self { model, log })
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        sink: &mut Sink<'_>,
    ) -> Result<(), String> {
        let emitted = generate::generate(self.model.as_mut(), prompt, max_new_tokens, |tokens| {
            sink.emit(tokens)
        })
        .map_err(|e| e.to_string())?;
        if emitted < max_new_tokens {
            self.log.log(
                plugin_api::LogLevel::Debug,
                &format!("baseline: host stopped generation after {emitted} tokens"),
            );
        }
        Ok(())
    }

    /// Scores every position and returns those from `from` on.
    fn score(&mut self, tokens: &[u32], from: usize) -> Result<Vec<ScoredPosition>, String> {
        let mut scores = generate::score(self.model.as_mut(), tokens).map_err(|e| e.to_string())?;
        Ok(scores.split_off(from.min(scores.len())))
    }
}

/// The model on CUDA device `ordinal`.
#[cfg(feature = "cuda")]
fn cuda_model(view: &'static ModelView, ordinal: usize) -> Result<Box<dyn Transformer>, String> {
    let model = cuda::CudaLlama::from_gguf(view, ordinal).map_err(|e| e.to_string())?;
    Ok(Box::new(model))
}

/// Without the `cuda` feature there is no CUDA model: say how to get one.
#[cfg(not(feature = "cuda"))]
fn cuda_model(_: &'static ModelView, ordinal: usize) -> Result<Box<dyn Transformer>, String> {
    Err(format!(
        "this build of variant {} cannot run on cuda:{ordinal}: it was built without \
         CUDA support. Rebuild it with the `cuda` cargo feature (`cargo build --release \
         --features cuda`; no CUDA toolkit is needed to build it)",
        env!("CARGO_PKG_NAME")
    ))
}

plugin_api::export_variant!(Baseline);
