//! The reference ("baseline") autoinfer variant: Llama-architecture GGUF inference on the CPU,
//! with candle tensors, f32 activations and the GGUF's quantized weights dequantized row by row.
//!
//! Principal types:
//! - [`Baseline`]: the [`plugin_api::Engine`] the host loads; it ties the model to the
//!   generation loop and is exported with [`plugin_api::export_variant!`].
//! - [`model::LlamaModel`]: the weights ([`matmul::Matrix`]es over the GGUF blocks), the RoPE
//!   tables and the in-place [`model::KvCache`]; `forward` runs a chunk of tokens.
//! - [`model::LlamaConfig`]: the hyperparameters, read from the `llama.*` metadata.
//! - [`matmul::Matrix`]: a weight matrix left in the host's mapping, and its f32 matmul.
//! - [`generate::generate`] and [`generate::score`]: chunked prefill then greedy decoding, and
//!   teacher-forced scoring.

pub mod generate;
pub mod matmul;
pub mod model;

use plugin_api::{Engine, HostLog, LoadOptions, ModelView, ScoredPosition, Sink};

use crate::model::LlamaModel;

/// The baseline engine: a [`LlamaModel`] plus the host's log.
pub struct Baseline {
    model: LlamaModel,
    log: HostLog,
}

impl Engine for Baseline {
    fn load(model: &'static ModelView, log: HostLog) -> Result<Self, String> {
        let model = LlamaModel::from_gguf(model).map_err(|e| e.to_string())?;
        let cfg = model.config();
        log.info(&format!(
            "baseline: llama model with {} blocks, width {}, {} heads ({} KV), vocabulary {}, \
             context {}",
            cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size, cfg.context_len
        ));
        Ok(Self { model, log })
    }

    /// Honours the `threads` option by sizing rayon's global pool, which the matmuls run on
    /// and whose size attention deals its queries to. A worker process loads one variant, so
    /// the pool is this engine's alone.
    fn load_with(
        model: &'static ModelView,
        log: HostLog,
        options: &LoadOptions,
    ) -> Result<Self, String> {
        if let Some(n) = options.threads()? {
            let built = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global();
            if built.is_err() && rayon::current_num_threads() != n {
                return Err(format!(
                    "cannot compute with {n} threads: rayon's pool already runs {}",
                    rayon::current_num_threads()
                ));
            }
            log.info(&format!("baseline: computing with {n} threads"));
        }
        Self::load(model, log)
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        sink: &mut Sink<'_>,
    ) -> Result<(), String> {
        let emitted = generate::generate(&mut self.model, prompt, max_new_tokens, |tokens| {
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

    fn score(&mut self, tokens: &[u32]) -> Result<Vec<ScoredPosition>, String> {
        generate::score(&mut self.model, tokens).map_err(|e| e.to_string())
    }
}

plugin_api::export_variant!(Baseline);
