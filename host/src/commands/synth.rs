//! `host synth`: a GGUF with random weights in a chosen Llama shape.
//!
//! Speed at realistic sizes (where decode is bound by memory bandwidth) can be measured without
//! downloading weights: [`write_file`] streams a GGUF v3 file whose every matrix is random
//! Q4_1 or Q8_0, in one of the [`SHAPES`] of real Llama models (layers, width, heads, KV heads,
//! FFN, vocabulary). The file is marked with the metadata key [`SYNTHETIC_KEY`]
//! (`autoinfer.synthetic = true`, read back by [`crate::gguf::Model::is_synthetic`]), so runs on
//! it can say so: its text is noise by construction.
//!
//! The values come from ChaCha20 under a [`Key`]. By default the key is drawn from the kernel
//! when the file is written and never stored ([`Key::Secret`], marked [`SECRET_WEIGHTS_KEY`]):
//! then no variant can compute the weights instead of reading them (a variant sees the file, so
//! a seeded generator's state, SplitMix64's say, could be read back from its first values and
//! the whole matrix regenerated in registers faster than memory delivers it). Every block has
//! its own scale, and a Q4_1 block its own minimum drawn apart from it, and the norm weights
//! are random too, so no block's bytes can be skipped as "the same as the last" or computed
//! from the rest of the block (a minimum that followed from the scale, as `m = -7.5 d` did
//! while one factor made both, could be dropped at load with the output unchanged). Only such a file is gated like the real
//! model, against the oracle at its own shape, and so only on it can a comparison KEEP: what is
//! timed at 1B or 8B is then also what is checked. `--seed` gives a file that a seed repeats
//! (for benches), marked with the seed, which is measured for speed only.
//!
//! The tokenizer is copied from another GGUF (every `tokenizer.*` key; the default model
//! unless `--tokenizer-from` names one). When the shape's vocabulary is larger, the token list
//! is padded with unique user-defined tokens `<|synth_N|>` (and the per-token arrays
//! `tokenizer.ggml.token_type` and `tokenizer.ggml.scores` with matching entries), so prompts
//! tokenized by the source tokenizer stay valid ids, and both this host's tokenizer and
//! llama.cpp accept the file.
//!
//! Values: norm weights uniform on `[0.75, 1.25]`; a matrix with `cols` inputs has `a = sqrt(3
//! / cols)`, and a Q4_1 block values uniform on `[-a t, -a t + 2 a s]`, a Q8_0 block on
//! `[-a s, a s]`, with `s` and `t` the block's own factors, each uniform on `[0.75, 1.25]`
//! (standard deviation about `1 / sqrt(cols)`, so activations stay finite through every
//! layer); the token embedding has `a = 0.05`. Nothing but the header is
//! held in memory: tensor data is generated in chunks as it is written, to `<out>.partial`
//! first and renamed into place at the end, so a crash never leaves a half file under the real
//! name.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use plugin_api::{GgmlType, MetaValue, ModelView};

use crate::gguf::format::ALIGNMENT;
use crate::gguf::write::{aligned, header, TensorEntry};
use crate::gguf::{SECRET_WEIGHTS_KEY, SEED_KEY, SYNTHETIC_KEY};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Why a synthetic model could not be planned or written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// `--shape` names no shape of [`SHAPES`].
    #[error("unknown shape {name:?}; the known shapes are {known}")]
    UnknownShape { name: String, known: String },
    /// The shape's numbers do not make a Llama model this writer can quantize.
    #[error("shape {name}: {what}")]
    BadShape { name: String, what: String },
    /// The output exists and `--force` was not given.
    #[error("{} exists; pass --force to overwrite it", path.display())]
    Exists { path: PathBuf },
    /// The tokenizer source has no token list.
    #[error("the tokenizer source has no tokenizer.ggml.tokens string array")]
    NoTokenizer,
    /// The tokenizer source has more tokens than the shape's vocabulary.
    #[error("shape {shape} has a vocabulary of {vocab} tokens, fewer than the tokenizer source's {source_vocab}; take the tokenizer from a smaller model")]
    VocabTooSmall {
        shape: String,
        vocab: u64,
        source_vocab: u64,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The kernel gave no random bytes for a secret key.
    #[error("no secret key: the kernel's random source failed ({0}); pass --seed for a file measured for speed only")]
    NoRandomness(io::Error),
}

/// What a synthetic model's values are drawn from: the 256-bit key of a ChaCha20 stream.
#[derive(Clone, PartialEq, Eq)]
pub enum Key {
    /// Drawn from the kernel when the file is written, and never stored: the weights can only
    /// be read from the file. Runs on such a file are gated.
    Secret([u8; 32]),
    /// SHA-256 of a public seed: the same file every time, and a variant that knows the seed
    /// could regenerate it, so runs on it measure speed only.
    Seeded(u64),
}

impl Key {
    /// A fresh secret key from the kernel's random source (never a fallback: a key the clock
    /// gave could be guessed).
    pub fn secret() -> Result<Key, SynthError> {
        let mut key = [0u8; 32];
        crate::stats::rng::fill_from_kernel(&mut key).map_err(SynthError::NoRandomness)?;
        Ok(Key::Secret(key))
    }

    /// The ChaCha20 generator of the values.
    fn stream(&self) -> ChaCha20Rng {
        let seed = match self {
            Key::Secret(key) => *key,
            Key::Seeded(seed) => {
                use sha2::{Digest, Sha256};
                let mut h = Sha256::new();
                h.update(b"autoinfer synth seed ");
                h.update(seed.to_le_bytes());
                h.finalize().into()
            }
        };
        ChaCha20Rng::from_seed(seed)
    }
}

impl std::fmt::Debug for Key {
    /// Never prints a secret key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Secret(_) => write!(f, "Secret(..)"),
            Key::Seeded(seed) => write!(f, "Seeded({seed})"),
        }
    }
}

/// A uniform draw on `[0.75, 1.25]`: a block's scale factor, or a norm weight.
fn factor(rng: &mut ChaCha20Rng) -> f32 {
    0.75 + 0.5 * (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

/// The quantization of a synthetic model's matrices (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quant {
    /// 32 weights in 20 bytes: f16 scale `d`, f16 minimum `m`, 4-bit `q`; weight = d*q + m.
    #[value(name = "q4_1")]
    Q4_1,
    /// 32 weights in 34 bytes: f16 scale `d`, 8-bit signed `q`; weight = d*q.
    #[value(name = "q8_0")]
    Q8_0,
}

impl Quant {
    /// The name as `--type` and file names spell it.
    pub fn name(self) -> &'static str {
        match self {
            Quant::Q4_1 => "q4_1",
            Quant::Q8_0 => "q8_0",
        }
    }

    /// The ggml type of its tensors.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            Quant::Q4_1 => GgmlType::Q4_1,
            Quant::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` for a file mostly of this type.
    pub fn file_type(self) -> u32 {
        match self {
            Quant::Q4_1 => 3,
            Quant::Q8_0 => 7,
        }
    }

    /// Bytes of one block of [`BLOCK`] weights.
    pub fn block_bytes(self) -> u64 {
        match self {
            Quant::Q4_1 => 20,
            Quant::Q8_0 => 34,
        }
    }
}

/// Weights per quantization block (both types).
const BLOCK: u64 = 32;

/// The hyperparameters of a Llama model: what `--shape` picks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// The name `--shape` takes.
    pub name: &'static str,
    /// The model whose shape this is.
    pub source: &'static str,
    /// Transformer blocks (`llama.block_count`).
    pub layers: u64,
    /// Hidden width (`llama.embedding_length`).
    pub width: u64,
    /// Query heads (`llama.attention.head_count`).
    pub heads: u64,
    /// Key/value heads (`llama.attention.head_count_kv`).
    pub kv_heads: u64,
    /// Width of the MLP (`llama.feed_forward_length`).
    pub ffn: u64,
    /// Vocabulary size; `None` takes the tokenizer source's.
    pub vocab: Option<u64>,
    /// Whether the output layer is the token embedding (no `output.weight`).
    pub tied: bool,
    /// RoPE frequency base (`llama.rope.freq_base`).
    pub rope_base: f32,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// The context length written (`llama.context_length`).
    pub context: u64,
}

/// Llama 3.2 1B (meta-llama/Llama-3.2-1B): tied embeddings. The real model's context is 131072;
/// the file says 8192, so variants that size their KV cache by it stay modest.
pub const LLAMA_3_2_1B: Shape = Shape {
    name: "llama-3.2-1b",
    source: "meta-llama/Llama-3.2-1B",
    layers: 16,
    width: 2048,
    heads: 32,
    kv_heads: 8,
    ffn: 8192,
    vocab: Some(128_256),
    tied: true,
    rope_base: 500_000.0,
    rms_eps: 1e-5,
    context: 8192,
};

/// Llama 3.1 8B (meta-llama/Llama-3.1-8B): an untied `output.weight`. The real model's context
/// is 131072; the file says 8192, to keep KV caches modest.
pub const LLAMA_3_1_8B: Shape = Shape {
    name: "llama-3.1-8b",
    source: "meta-llama/Llama-3.1-8B",
    layers: 32,
    width: 4096,
    heads: 32,
    kv_heads: 8,
    ffn: 14_336,
    vocab: Some(128_256),
    tied: false,
    rope_base: 500_000.0,
    rms_eps: 1e-5,
    context: 8192,
};

/// SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct), the shape of the default model: handy
/// for tests and for checking a synthetic file against the real one.
pub const SMOLLM2_135M: Shape = Shape {
    name: "smollm2-135m",
    source: "HuggingFaceTB/SmolLM2-135M-Instruct",
    layers: 30,
    width: 576,
    heads: 9,
    kv_heads: 3,
    ffn: 1536,
    vocab: Some(49_152),
    tied: true,
    rope_base: 100_000.0,
    rms_eps: 1e-5,
    context: 8192,
};

/// A tiny model for tests (no real source): 2 layers of width 64, the tokenizer source's
/// vocabulary.
pub const TINY: Shape = Shape {
    name: "tiny",
    source: "none (a test shape)",
    layers: 2,
    width: 64,
    heads: 4,
    kv_heads: 2,
    ffn: 128,
    vocab: None,
    tied: true,
    rope_base: 10_000.0,
    rms_eps: 1e-5,
    context: 8192,
};

/// Every shape `--shape` knows.
pub const SHAPES: &[Shape] = &[LLAMA_3_2_1B, LLAMA_3_1_8B, SMOLLM2_135M, TINY];

impl Shape {
    /// The shape called `name`, or an error listing the known ones.
    pub fn find(name: &str) -> Result<Shape, SynthError> {
        SHAPES
            .iter()
            .find(|s| s.name == name)
            .copied()
            .ok_or_else(|| SynthError::UnknownShape {
                name: name.to_string(),
                known: SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
            })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> u64 {
        self.width / self.heads
    }

    /// Width of the keys (and of the values): head width times KV heads.
    pub fn kv_dim(&self) -> u64 {
        self.head_dim() * self.kv_heads
    }

    /// Checks that the numbers make a Llama model whose matrices are whole quantization blocks.
    pub fn check(&self) -> Result<(), SynthError> {
        let bad = |what: String| {
            Err(SynthError::BadShape {
                name: self.name.to_string(),
                what,
            })
        };
        if [self.layers, self.width, self.heads, self.kv_heads, self.ffn].contains(&0) {
            return bad("layers, width, heads, KV heads and FFN must all be positive".into());
        }
        if !self.width.is_multiple_of(self.heads) || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "width {} must be a multiple of heads {}, and heads of KV heads {}",
                self.width, self.heads, self.kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("the head width {} must be even", self.head_dim()));
        }
        if !self.width.is_multiple_of(BLOCK) || !self.ffn.is_multiple_of(BLOCK) {
            return bad(format!(
                "width {} and FFN {} must be multiples of {BLOCK} (whole quantization blocks)",
                self.width, self.ffn
            ));
        }
        Ok(())
    }

    /// The tensors of the model, in file order, with `vocab` tokens and matrices of `quant`.
    pub fn tensors(&self, vocab: u64, quant: Quant) -> Vec<TensorSpec> {
        let (w, kv, ff) = (self.width, self.kv_dim(), self.ffn);
        let matrix = |name: String, cols: u64, rows: u64| TensorSpec {
            name,
            dims: vec![cols, rows],
            fill: Fill::Random {
                quant,
                a: (3.0 / cols as f64).sqrt() as f32,
            },
        };
        let norm = |name: String| TensorSpec {
            name,
            dims: vec![w],
            fill: Fill::Norm,
        };
        let mut out = vec![TensorSpec {
            name: "token_embd.weight".into(),
            dims: vec![w, vocab],
            fill: Fill::Random { quant, a: 0.05 },
        }];
        for i in 0..self.layers {
            let name = |part: &str| format!("blk.{i}.{part}.weight");
            out.push(norm(name("attn_norm")));
            out.push(matrix(name("attn_q"), w, w));
            out.push(matrix(name("attn_k"), w, kv));
            out.push(matrix(name("attn_v"), w, kv));
            out.push(matrix(name("attn_output"), w, w));
            out.push(norm(name("ffn_norm")));
            out.push(matrix(name("ffn_gate"), w, ff));
            out.push(matrix(name("ffn_up"), w, ff));
            out.push(matrix(name("ffn_down"), ff, w));
        }
        out.push(norm("output_norm.weight".into()));
        if !self.tied {
            out.push(matrix("output.weight".into(), w, vocab));
        }
        out
    }

    /// Number of weights with `vocab` tokens.
    pub fn params(&self, vocab: u64) -> u64 {
        self.tensors(vocab, Quant::Q8_0)
            .iter()
            .map(TensorSpec::elements)
            .sum()
    }
}

/// How a tensor's values are made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// F32, values uniform on `[0.75, 1.25]` (the norm weights).
    Norm,
    /// Quantized, values uniform on `[-a, a]`.
    Random {
        /// The block type.
        quant: Quant,
        /// The largest magnitude.
        a: f32,
    },
}

/// One tensor of the file: its GGML name, dimensions (`ne0`, the input width, first) and values.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// The name llama.cpp gives it (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
    /// Its type and values.
    pub fill: Fill,
}

impl TensorSpec {
    /// Number of values.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The ggml type.
    pub fn ggml_type(&self) -> GgmlType {
        match self.fill {
            Fill::Norm => GgmlType::F32,
            Fill::Random { quant, .. } => quant.ggml_type(),
        }
    }

    /// Bytes of data.
    pub fn bytes(&self) -> u64 {
        match self.fill {
            Fill::Norm => 4 * self.elements(),
            Fill::Random { quant, .. } => self.elements() / BLOCK * quant.block_bytes(),
        }
    }
}

/// `tokenizer.ggml.token_type` of a padding token: user-defined.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Everything a synthetic file holds but its tensor data: what [`write_file`] writes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The shape.
    pub shape: Shape,
    /// The matrices' type.
    pub quant: Quant,
    /// What the random values are drawn from.
    pub key: Key,
    /// The vocabulary size written (the shape's, or the tokenizer source's).
    pub vocab: u64,
    /// Tokens added to the source's to reach `vocab`.
    pub padding_tokens: u64,
    /// Metadata, in file order (but for the key's mark, which [`Plan::header`] adds after
    /// [`SYNTHETIC_KEY`], so that it always says what `key` is).
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensors, in file order.
    pub tensors: Vec<TensorSpec>,
}

impl Plan {
    /// Plans a file of `shape` in `quant`, its tokenizer copied from `tokenizer` (a parsed GGUF).
    pub fn new(
        shape: Shape,
        quant: Quant,
        key: Key,
        tokenizer: &ModelView,
    ) -> Result<Plan, SynthError> {
        shape.check()?;
        let source_vocab = match tokenizer.meta("tokenizer.ggml.tokens") {
            Some(MetaValue::StrArray(t)) if !t.is_empty() => t.len() as u64,
            _ => return Err(SynthError::NoTokenizer),
        };
        let vocab = shape.vocab.unwrap_or(source_vocab);
        if vocab < source_vocab {
            return Err(SynthError::VocabTooSmall {
                shape: shape.name.to_string(),
                vocab,
                source_vocab,
            });
        }
        let padding = vocab - source_vocab;
        // (The writer puts integers as u32, as llama.cpp does, and floats as f32.)
        let uint = MetaValue::Uint;
        let text = |s: &str| MetaValue::Str(s.into());
        let float = |x: f32| MetaValue::Float(x as f64);
        let mut metadata: Vec<(String, MetaValue)> = vec![
            ("general.architecture".into(), text("llama")),
            (
                "general.name".into(),
                text(&format!("synthetic {} (random weights)", shape.name)),
            ),
            (SYNTHETIC_KEY.into(), MetaValue::Bool(true)),
            ("general.file_type".into(), uint(quant.file_type().into())),
            ("general.quantization_version".into(), uint(2)),
            ("general.alignment".into(), uint(ALIGNMENT)),
            ("llama.vocab_size".into(), uint(vocab)),
            ("llama.context_length".into(), uint(shape.context)),
            ("llama.embedding_length".into(), uint(shape.width)),
            ("llama.block_count".into(), uint(shape.layers)),
            ("llama.feed_forward_length".into(), uint(shape.ffn)),
            ("llama.attention.head_count".into(), uint(shape.heads)),
            ("llama.attention.head_count_kv".into(), uint(shape.kv_heads)),
            ("llama.rope.freq_base".into(), float(shape.rope_base)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                float(shape.rms_eps),
            ),
            ("llama.rope.dimension_count".into(), uint(shape.head_dim())),
        ];
        for entry in tokenizer.metadata.iter() {
            let key = entry.key.as_str();
            if !key.starts_with("tokenizer.") {
                continue;
            }
            let mut value = entry.value.clone();
            if padding > 0 {
                pad_per_token(key, &mut value, source_vocab, vocab);
            }
            metadata.push((key.to_string(), value));
        }
        Ok(Plan {
            shape,
            quant,
            key,
            vocab,
            padding_tokens: padding,
            metadata,
            tensors: shape.tensors(vocab, quant),
        })
    }

    /// Number of weights.
    pub fn params(&self) -> u64 {
        self.shape.params(self.vocab)
    }

    /// Each tensor's offset from the start of the data section (aligned), and the section's
    /// length.
    fn offsets(&self) -> (Vec<u64>, u64) {
        let mut at = 0u64;
        let offsets = self
            .tensors
            .iter()
            .map(|t| {
                let offset = at;
                at = aligned(at + t.bytes());
                offset
            })
            .collect();
        (offsets, at)
    }

    /// Header, metadata and tensor index, without the padding that follows.
    pub fn header(&self) -> Vec<u8> {
        let mark = match &self.key {
            Key::Secret(_) => (SECRET_WEIGHTS_KEY.to_string(), MetaValue::Bool(true)),
            Key::Seeded(seed) => (
                SEED_KEY.to_string(),
                MetaValue::Str(seed.to_string().into()),
            ),
        };
        let mut metadata = self.metadata.clone();
        let at = metadata
            .iter()
            .position(|(k, _)| k == SYNTHETIC_KEY)
            .map_or(metadata.len(), |i| i + 1);
        metadata.insert(at, mark);
        let (offsets, _) = self.offsets();
        let index: Vec<TensorEntry> = self
            .tensors
            .iter()
            .zip(offsets)
            .map(|(t, offset)| TensorEntry {
                name: &t.name,
                dims: &t.dims,
                ggml_type: t.ggml_type(),
                offset,
            })
            .collect();
        header(&metadata, &index)
    }

    /// The whole file's size in bytes.
    pub fn file_size(&self) -> u64 {
        let header = aligned(self.header().len() as u64);
        header + self.offsets().1
    }

    /// Streams the file into `out`, calling `progress` with the bytes written so far after each
    /// chunk; returns the bytes written.
    pub fn write_to(&self, out: &mut impl Write, progress: &mut dyn FnMut(u64)) -> io::Result<u64> {
        let mut header = self.header();
        header.resize(header.len().next_multiple_of(ALIGNMENT as usize), 0);
        out.write_all(&header)?;
        let mut written = header.len() as u64;
        progress(written);
        let mut rng = self.key.stream();
        let mut chunk = Vec::with_capacity(CHUNK_BLOCKS as usize * 34);
        for t in &self.tensors {
            let start = written;
            match t.fill {
                Fill::Norm => {
                    chunk.clear();
                    for _ in 0..t.elements() {
                        chunk.extend(factor(&mut rng).to_le_bytes());
                    }
                    out.write_all(&chunk)?;
                    written += chunk.len() as u64;
                }
                Fill::Random { quant, a } => {
                    let mut left = t.elements() / BLOCK;
                    while left > 0 {
                        let n = left.min(CHUNK_BLOCKS);
                        chunk.clear();
                        random_blocks(quant, a, n, &mut rng, &mut chunk);
                        out.write_all(&chunk)?;
                        written += chunk.len() as u64;
                        left -= n;
                        progress(written);
                    }
                }
            }
            let pad = (written - start).next_multiple_of(ALIGNMENT) - (written - start);
            out.write_all(&[0u8; ALIGNMENT as usize][..pad as usize])?;
            written += pad;
            progress(written);
        }
        Ok(written)
    }
}

/// Blocks generated (and written) at a time: about 1 MB.
const CHUNK_BLOCKS: u64 = 1 << 15;

/// Pads the per-token arrays of the tokenizer (`tokens`, `token_type`, `scores`) from
/// `source_vocab` to `vocab` entries.
fn pad_per_token(key: &str, value: &mut MetaValue, source_vocab: u64, vocab: u64) {
    let n = vocab as usize;
    let is_per_token = |len: usize| len as u64 == source_vocab;
    match (key, value) {
        ("tokenizer.ggml.tokens", MetaValue::StrArray(tokens)) => {
            let taken: HashSet<String> = tokens.iter().map(|t| t.to_string()).collect();
            for id in source_vocab..vocab {
                let mut token = format!("<|synth_{id}|>");
                while taken.contains(&token) {
                    token.push('_');
                }
                tokens.push(token.into());
            }
        }
        ("tokenizer.ggml.token_type", MetaValue::IntArray(types)) if is_per_token(types.len()) => {
            types.resize(n, TOKEN_TYPE_USER_DEFINED)
        }
        ("tokenizer.ggml.token_type", MetaValue::UintArray(types)) if is_per_token(types.len()) => {
            types.resize(n, TOKEN_TYPE_USER_DEFINED as u64)
        }
        ("tokenizer.ggml.scores", MetaValue::FloatArray(scores)) if is_per_token(scores.len()) => {
            scores.resize(n, 0.0)
        }
        _ => {}
    }
}

/// Appends `n` random blocks of `quant`: Q4_1 with values on `[-a t, -a t + 2 a s]`, Q8_0 on
/// `[-a s, a s]`, for the block's own factors `s` and `t` ([`factor`], drawn apart, so that
/// neither of a Q4_1 block's scale and minimum follows from the other).
fn random_blocks(quant: Quant, a: f32, n: u64, rng: &mut ChaCha20Rng, out: &mut Vec<u8>) {
    match quant {
        Quant::Q4_1 => {
            let mut q = [0u8; 16];
            for _ in 0..n {
                let (s, t) = (factor(rng), factor(rng));
                out.extend(f32_to_f16(2.0 * a * s / 15.0).to_le_bytes());
                out.extend(f32_to_f16(-a * t).to_le_bytes());
                rng.fill_bytes(&mut q);
                out.extend(q);
            }
        }
        Quant::Q8_0 => {
            let mut q = [0u8; 32];
            for _ in 0..n {
                let s = factor(rng);
                out.extend(f32_to_f16(a * s / 127.0).to_le_bytes());
                rng.fill_bytes(&mut q);
                // A byte 0..=255 onto -127..=127 (one value twice as likely: harmless).
                out.extend(q.map(|b| (((b as i32 * 255) >> 8) - 127) as i8 as u8));
            }
        }
    }
}

/// The IEEE half-precision bits nearest `x` (ties to even; too large becomes infinity).
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    let round = |kept: u32, rest: u32, half: u32| -> u16 {
        let up = rest > half || (rest == half && kept & 1 == 1);
        (kept + u32::from(up)) as u16
    };
    if e <= 0 {
        // A subnormal half (or zero): the 24-bit significand shifted into 2^-24 units.
        if e < -10 {
            return sign;
        }
        let man = man | 0x80_0000;
        let shift = (14 - e) as u32;
        return sign | round(man >> shift, man & ((1 << shift) - 1), 1 << (shift - 1));
    }
    // A carry out of the significand correctly bumps the exponent (to infinity at the top).
    sign | round(((e as u32) << 10) | (man >> 13), man & 0x1fff, 0x1000)
}

/// Arguments of `host synth` (its command-line flags).
#[derive(Debug, Clone, clap::Args)]
pub struct SynthArgs {
    /// The shape: llama-3.2-1b, llama-3.1-8b, smollm2-135m or tiny (for tests).
    #[arg(long)]
    pub shape: String,
    /// The matrices' quantization.
    #[arg(long = "type", value_name = "TYPE", value_enum, default_value = "q4_1")]
    pub quant: Quant,
    /// Where to write [default: <cache>/synth/<shape>-<type>.gguf].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the random weights, for a file that can be written again the same (for
    /// benches). Such a file is measured for speed only: a variant that knows the seed could
    /// regenerate the weights instead of reading them. [default: a secret key drawn now and
    /// never stored; runs on that file are gated against the oracle, and comparisons on it
    /// may KEEP]
    #[arg(long)]
    pub seed: Option<u64>,
    /// The GGUF whose tokenizer to copy [default: the default model].
    #[arg(long, value_name = "GGUF")]
    pub tokenizer_from: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Where `host synth` writes by default: `<cache>/synth/<shape>-<type>.gguf`.
pub fn default_path(shape: &Shape, quant: Quant) -> PathBuf {
    crate::harness::fetch::cache_dir()
        .join("synth")
        .join(format!("{}-{}.gguf", shape.name, quant.name()))
}

/// `<path>.partial`: where the file is written before it is renamed into place.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes `plan` to `path` (through `<path>.partial`, renamed at the end), refusing to replace
/// an existing file unless `force`; returns the bytes written.
pub fn write_file(
    plan: &Plan,
    path: &Path,
    force: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, SynthError> {
    if !force && path.exists() {
        return Err(SynthError::Exists { path: path.into() });
    }
    let io_at = |p: &Path| {
        let path = p.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
    }
    let partial = partial_path(path);
    let written = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&partial)?);
        let n = plan.write_to(&mut w, progress)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(n)
    })();
    match written {
        Ok(n) => {
            fs::rename(&partial, path).map_err(io_at(path))?;
            Ok(n)
        }
        Err(e) => {
            let _ = fs::remove_file(&partial);
            Err(io_at(&partial)(e))
        }
    }
}

/// A progress bar over bytes on stderr (hidden when stderr is not a terminal).
fn byte_bar(total: u64) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} writing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} (eta {eta})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

/// `host synth`: writes the file, checks it opens as a synthetic model, prints its path on
/// stdout and a summary on stderr; returns the path.
pub fn run(args: &SynthArgs) -> anyhow::Result<PathBuf> {
    let shape = Shape::find(&args.shape)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_path(&shape, args.quant));
    if !args.force && out.exists() {
        return Err(SynthError::Exists { path: out }.into());
    }
    let source = crate::commands::setup::open_model(args.tokenizer_from.as_deref())
        .context("opening the tokenizer source")?;
    let key = match args.seed {
        Some(seed) => Key::Seeded(seed),
        None => Key::secret()?,
    };
    let plan = Plan::new(shape, args.quant, key, source.view)
        .with_context(|| format!("taking the tokenizer from {}", source.path.display()))?;
    let bar = byte_bar(plan.file_size());
    let start = Instant::now();
    let bytes = write_file(&plan, &out, args.force, &mut |n| bar.set_position(n))
        .with_context(|| format!("writing the synthetic model {}", out.display()))?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let model = crate::gguf::Model::open(&out)
        .with_context(|| format!("reading back the synthetic model {}", out.display()))?;
    if !model.is_synthetic() {
        bail!(
            "{} was written but does not read back as synthetic",
            out.display()
        );
    }
    let padding = match plan.padding_tokens {
        0 => String::new(),
        n => format!(" ({n} padding tokens)"),
    };
    eprintln!(
        "synthetic {} ({}), {}: {} layers, width {}, {} heads ({} KV), FFN {}, vocabulary {}{padding}, {} output; \
         {} parameters, {:.1} MB, written in {seconds:.2} s ({:.0} MB/s); tokenizer from {}",
        shape.name,
        shape.source,
        plan.quant.name(),
        shape.layers,
        shape.width,
        shape.heads,
        shape.kv_heads,
        shape.ffn,
        plan.vocab,
        if shape.tied { "tied" } else { "untied" },
        match plan.params() {
            p if p >= 1_000_000_000 => format!("{:.2} B", p as f64 / 1e9),
            p => format!("{:.1} M", p as f64 / 1e6),
        },
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / seconds.max(1e-9),
        source.path.display(),
    );
    println!("{}", out.display());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::{RSlice, RString, RVec};
    use plugin_api::MetadataEntry;

    /// The float of half-precision bits.
    fn f16_to_f32(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exp = i32::from((h >> 10) & 0x1f);
        let man = f32::from(h & 0x3ff);
        sign * match exp {
            0 => man * 2f32.powi(-24),
            0x1f if man == 0.0 => f32::INFINITY,
            0x1f => f32::NAN,
            e => (1.0 + man / 1024.0) * 2f32.powi(e - 15),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("autoinfer-synth-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A tokenizer source: a parsed-GGUF view with a byte-level BPE of `n` tokens.
    fn tokenizer_view(n: usize) -> ModelView {
        let mut tokens: Vec<String> = vec![
            "<|endoftext|>".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        ];
        tokens.extend((0..n - 3).map(|i| {
            ((b'a' + (i % 26) as u8) as char)
                .to_string()
                .repeat(1 + i / 26)
        }));
        let mut types = vec![3i64; 3];
        types.resize(n, 1);
        let entry = |key: &str, value: MetaValue| MetadataEntry {
            key: key.into(),
            value,
        };
        let strs = |v: Vec<String>| MetaValue::StrArray(v.into_iter().map(RString::from).collect());
        ModelView {
            bytes: RSlice::from_slice(&[]),
            metadata: RVec::from(vec![
                entry("general.architecture", MetaValue::Str("llama".into())),
                entry("general.name", MetaValue::Str("source".into())),
                entry("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
                entry("tokenizer.ggml.pre", MetaValue::Str("smollm".into())),
                entry("tokenizer.ggml.tokens", strs(tokens)),
                entry("tokenizer.ggml.token_type", MetaValue::IntArray(types.into())),
                entry("tokenizer.ggml.merges", strs(vec!["a a".into()])),
                entry("tokenizer.ggml.bos_token_id", MetaValue::Uint(1)),
                entry("tokenizer.ggml.eos_token_id", MetaValue::Uint(2)),
                entry("tokenizer.ggml.add_bos_token", MetaValue::Bool(false)),
                entry(
                    "tokenizer.chat_template",
                    MetaValue::Str("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}".into()),
                ),
            ]),
            tensors: RVec::new(),
        }
    }

    #[test]
    fn the_shapes_have_their_models_sizes() {
        assert_eq!(LLAMA_3_2_1B.params(128_256), 1_235_814_400);
        assert_eq!(LLAMA_3_1_8B.params(128_256), 8_030_261_248);
        assert_eq!(SMOLLM2_135M.params(49_152), 134_515_008);
        assert_eq!((LLAMA_3_2_1B.head_dim(), LLAMA_3_2_1B.kv_dim()), (64, 512));
        assert_eq!(
            (LLAMA_3_1_8B.head_dim(), LLAMA_3_1_8B.kv_dim()),
            (128, 1024)
        );
        assert_eq!((SMOLLM2_135M.head_dim(), SMOLLM2_135M.kv_dim()), (64, 192));
        for shape in SHAPES {
            shape.check().unwrap();
        }
        // Tied shapes have no output.weight; the untied one has it, [width, vocab].
        assert!(!LLAMA_3_2_1B
            .tensors(10, Quant::Q4_1)
            .iter()
            .any(|t| t.name == "output.weight"));
        let out = LLAMA_3_1_8B.tensors(128_256, Quant::Q4_1).pop().unwrap();
        assert_eq!(
            (out.name.as_str(), out.dims),
            ("output.weight", vec![4096, 128_256])
        );
        // About 5 GB for the 8B in Q4_1.
        let plan_bytes: u64 = LLAMA_3_1_8B
            .tensors(128_256, Quant::Q4_1)
            .iter()
            .map(TensorSpec::bytes)
            .sum();
        assert!(
            (5.0e9..5.1e9).contains(&(plan_bytes as f64)),
            "{plan_bytes}"
        );
    }

    #[test]
    fn unknown_shapes_are_refused_with_the_known_ones() {
        assert_eq!(Shape::find("tiny").unwrap(), TINY);
        let err = Shape::find("llama-9000").unwrap_err().to_string();
        assert!(err.contains("\"llama-9000\""), "{err}");
        for shape in SHAPES {
            assert!(err.contains(shape.name), "{err}");
        }
        let bad = Shape { width: 48, ..TINY };
        assert!(matches!(bad.check(), Err(SynthError::BadShape { .. })));
        let bad = Shape {
            kv_heads: 3,
            ..TINY
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn f16_conversion_rounds_to_nearest_even() {
        for (x, h) in [
            (0.0f32, 0x0000u16),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (0.1, 0x2e66),
            (65504.0, 0x7bff),
            (65519.0, 0x7bff),
            (65520.0, 0x7c00),
            (1e6, 0x7c00),
            (f32::NEG_INFINITY, 0xfc00),
            (2f32.powi(-14), 0x0400),
            (2f32.powi(-24), 0x0001),
            (2f32.powi(-25), 0x0000),             // a tie, to even
            (1.5 * 2f32.powi(-24), 0x0002),       // a tie, to even
            (1.0 + 2f32.powi(-11), 0x3c00),       // a tie, to even
            (1.0 + 3.0 * 2f32.powi(-11), 0x3c02), // a tie, to even
        ] {
            assert_eq!(f32_to_f16(x), h, "{x:e}");
        }
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        // Every finite half survives the round trip.
        for h in 0..=u16::MAX {
            if (h >> 10) & 0x1f != 0x1f {
                assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#06x}");
            }
        }
    }

    #[test]
    fn a_seed_repeats_its_stream_and_a_secret_key_is_new_each_time() {
        let draw = |key: &Key| {
            let mut r = key.stream();
            (0..100).map(|_| r.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(&Key::Seeded(7)), draw(&Key::Seeded(7)));
        assert_ne!(draw(&Key::Seeded(7)), draw(&Key::Seeded(8)));
        let (a, b) = (Key::secret().unwrap(), Key::secret().unwrap());
        assert_ne!(a, b);
        assert_ne!(draw(&a), draw(&b));
        // A secret key is never printed, alone or in a plan.
        let Key::Secret(bytes) = &a else {
            panic!("a secret key")
        };
        let plan = Plan::new(TINY, Quant::Q4_1, a.clone(), &tokenizer_view(300)).unwrap();
        assert_eq!(format!("{a:?}"), "Secret(..)");
        let shown = format!("{plan:?}");
        assert!(shown.contains("key: Secret(..)"), "{shown}");
        assert!(!shown.contains(&format!("{bytes:?}")), "{shown}");
        // Factors stay on [0.75, 1.25] and spread over it.
        let mut r = Key::Seeded(1).stream();
        let f: Vec<f32> = (0..10_000).map(|_| factor(&mut r)).collect();
        assert!(f.iter().all(|x| (0.75..=1.25).contains(x)));
        let (lo, hi) = f
            .iter()
            .fold((2f32, 0f32), |(l, h), &x| (l.min(x), h.max(x)));
        assert!(lo < 0.76 && hi > 1.24, "{lo} {hi}");
    }

    #[test]
    fn blocks_decode_within_their_range_each_with_its_own_scale() {
        let a = (3.0f32 / 2048.0).sqrt();
        let mut rng = Key::Seeded(1).stream();
        let mut q4 = Vec::new();
        random_blocks(Quant::Q4_1, a, 64, &mut rng, &mut q4);
        assert_eq!(q4.len(), 64 * 20);
        let mut values = Vec::new();
        let mut scales = HashSet::new();
        // The minimum over the scale, to three digits: one value (-7.5) when one factor made
        // both, so that a variant could compute the minimum instead of reading it.
        let mut ratios = HashSet::new();
        for b in q4.chunks_exact(20) {
            scales.insert([b[0], b[1]]);
            let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            let m = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
            ratios.insert((m / d * 1000.0).round() as i64);
            for &byte in &b[4..] {
                values.push(d * f32::from(byte & 0xf) + m);
                values.push(d * f32::from(byte >> 4) + m);
            }
        }
        let mut q8 = Vec::new();
        random_blocks(Quant::Q8_0, a, 64, &mut rng, &mut q8);
        assert_eq!(q8.len(), 64 * 34);
        let mut values8 = Vec::new();
        // No block's scale may be assumed from another's (a variant could skip reading them),
        // nor its minimum from its scale.
        assert!(
            scales.len() > 48,
            "{} distinct Q4_1 scales in 64 blocks",
            scales.len()
        );
        assert!(
            ratios.len() > 48,
            "{} distinct minimum/scale ratios in 64 blocks",
            ratios.len()
        );
        scales.clear();
        for b in q8.chunks_exact(34) {
            scales.insert([b[0], b[1]]);
            let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            for &q in &b[2..] {
                assert_ne!(q as i8, -128);
                values8.push(d * f32::from(q as i8));
            }
        }
        assert!(
            scales.len() > 48,
            "{} distinct Q8_0 scales in 64 blocks",
            scales.len()
        );
        // Q4_1 on [-a t, -a t + 2 a s] (at most 1.75 a), Q8_0 on [-a s, a s]; the standard
        // deviation over a / sqrt(3) (= 1 / sqrt(cols)) is expected at 1.13 for Q4_1 (its 16
        // levels, E[s^2] = 1 + 1/48, and the blocks' means a (s - t)) and 1.01 for Q8_0.
        for (v, top, sd_ratio) in [(values, 1.75 * a, 1.13), (values8, 1.25 * a, 1.01)] {
            let tol = a * 1e-3;
            assert!(
                v.iter().all(|x| x.abs() <= top + tol),
                "a value outside [-{top}, {top}]"
            );
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
            assert!(mean.abs() < 0.1 * a, "mean {mean}");
            assert!(
                (sd / (a / 3f32.sqrt()) / sd_ratio - 1.0).abs() < 0.1,
                "sd {sd}"
            );
        }
    }

    /// Writes `plan` into a scratch file and opens it.
    fn write_and_open(plan: &Plan, name: &str) -> (PathBuf, crate::gguf::Model) {
        let path = scratch(name).join("m.gguf");
        let mut last = 0;
        let n = write_file(plan, &path, false, &mut |n| last = n).unwrap();
        assert_eq!((n, last), (plan.file_size(), plan.file_size()));
        assert_eq!(fs::metadata(&path).unwrap().len(), n);
        assert!(!partial_path(&path).exists());
        let model = crate::gguf::Model::open(&path).unwrap();
        (path, model)
    }

    /// Files of one shape from two keys share their shape's hash, not their file's; another
    /// format of the same shape is another shape (`host keep` tells draws apart by it).
    #[test]
    fn a_shape_hash_is_the_same_for_every_key_of_one_shape() {
        let source = tokenizer_view(300);
        let open = |quant, key, name| {
            let plan = Plan::new(TINY, quant, key, &source).unwrap();
            let (path, model) = write_and_open(&plan, name);
            let hashes = (model.shape_sha256(), model.sha256().to_string());
            let _ = fs::remove_dir_all(path.parent().unwrap());
            hashes
        };
        let one = open(Quant::Q4_1, Key::Seeded(1), "shape-one");
        let two = open(Quant::Q4_1, Key::Seeded(2), "shape-two");
        let q8 = open(Quant::Q8_0, Key::Seeded(1), "shape-q8");
        assert_eq!(one.0, two.0);
        assert_ne!(one.1, two.1);
        assert_ne!(one.0, q8.0);
    }

    #[test]
    fn a_tiny_file_reads_back_as_a_synthetic_llama() {
        let source = tokenizer_view(300);
        let plan = Plan::new(TINY, Quant::Q4_1, Key::Seeded(1), &source).unwrap();
        assert_eq!((plan.vocab, plan.padding_tokens), (300, 0));
        let (path, model) = write_and_open(&plan, "tiny");
        // A seeded file says its seed and is not gated.
        assert!(model.is_synthetic() && !model.is_gated());
        let view = model.view;
        assert_eq!(view.meta_str(SEED_KEY), Some("1"));
        assert!(view.meta(SECRET_WEIGHTS_KEY).is_none());
        assert_eq!(
            view.meta_str("general.name"),
            Some("synthetic tiny (random weights)")
        );
        for (key, want) in [
            ("general.file_type", 3),
            ("general.alignment", 32),
            ("llama.block_count", 2),
            ("llama.embedding_length", 64),
            ("llama.feed_forward_length", 128),
            ("llama.attention.head_count", 4),
            ("llama.attention.head_count_kv", 2),
            ("llama.rope.dimension_count", 16),
            ("llama.context_length", 8192),
            ("llama.vocab_size", 300),
            ("tokenizer.ggml.eos_token_id", 2),
        ] {
            assert_eq!(view.meta_uint(key), Some(want), "{key}");
        }
        assert_eq!(view.meta_float("llama.rope.freq_base"), Some(10_000.0));
        assert!(
            (view
                .meta_float("llama.attention.layer_norm_rms_epsilon")
                .unwrap()
                - 1e-5)
                .abs()
                < 1e-10
        );
        let (q4, f32_) = (GgmlType::Q4_1, GgmlType::F32);
        let mut want = vec![("token_embd.weight".to_string(), q4, vec![64, 300])];
        for i in 0..2 {
            for (part, ty, dims) in [
                ("attn_norm", f32_, vec![64]),
                ("attn_q", q4, vec![64, 64]),
                ("attn_k", q4, vec![64, 32]),
                ("attn_v", q4, vec![64, 32]),
                ("attn_output", q4, vec![64, 64]),
                ("ffn_norm", f32_, vec![64]),
                ("ffn_gate", q4, vec![64, 128]),
                ("ffn_up", q4, vec![64, 128]),
                ("ffn_down", q4, vec![128, 64]),
            ] {
                want.push((format!("blk.{i}.{part}.weight"), ty, dims));
            }
        }
        want.push(("output_norm.weight".into(), f32_, vec![64]));
        let got: Vec<_> = view
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.to_string(),
                    GgmlType::from_id(t.ggml_type),
                    t.dims.to_vec(),
                )
            })
            .collect();
        let want: Vec<_> = want
            .into_iter()
            .map(|(name, ty, dims)| (name, Some(ty), dims))
            .collect();
        assert_eq!(got, want);
        for t in view.tensors.iter() {
            assert_eq!(t.offset % 32, 0, "{}", t.name);
        }
        // Norms are random on [0.75, 1.25]; the last tensor ends the file.
        let norm = view.tensor("output_norm.weight").unwrap();
        let bytes =
            &view.bytes.as_slice()[norm.offset as usize..(norm.offset + norm.size) as usize];
        let norms: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert!(norms.iter().all(|x| (0.75..=1.25).contains(x)), "{norms:?}");
        assert!(norms.iter().any(|&x| x != norms[0]), "{norms:?}");
        assert_eq!(norm.offset + norm.size, view.bytes.len() as u64);
        // The same seed writes the same bytes; another seed other ones.
        let again = scratch("tiny-again").join("m.gguf");
        write_file(&plan, &again, false, &mut |_| {}).unwrap();
        assert_eq!(fs::read(&path).unwrap(), fs::read(&again).unwrap());
        let other = Plan {
            key: Key::Seeded(2),
            ..plan.clone()
        };
        let other_path = scratch("tiny-other").join("m.gguf");
        write_file(&other, &other_path, false, &mut |_| {}).unwrap();
        assert_ne!(fs::read(&path).unwrap(), fs::read(&other_path).unwrap());
        // No overwriting without force.
        let err = write_file(&plan, &path, false, &mut |_| {}).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        write_file(&plan, &path, true, &mut |_| {}).unwrap();
        // Without a seed: a secret key, marked so (and gated), the seed nowhere; two such
        // files differ.
        let secret = Plan {
            key: Key::secret().unwrap(),
            ..plan.clone()
        };
        let (secret_path, secret_model) = write_and_open(&secret, "tiny-secret");
        assert!(secret_model.is_synthetic() && secret_model.is_gated());
        let secret_view = &secret_model.view;
        assert!(matches!(
            secret_view.meta(SECRET_WEIGHTS_KEY),
            Some(MetaValue::Bool(true))
        ));
        assert!(secret_view.meta(SEED_KEY).is_none());
        let again = Plan {
            key: Key::secret().unwrap(),
            ..plan.clone()
        };
        let again_path = scratch("tiny-secret-again").join("m.gguf");
        write_file(&again, &again_path, false, &mut |_| {}).unwrap();
        assert_ne!(
            fs::read(&secret_path).unwrap(),
            fs::read(&again_path).unwrap()
        );
        // The host's tokenizer loads it.
        let codec = crate::harness::tokenize::TextCodec::from_model(view).unwrap();
        assert_eq!((codec.vocab_size, codec.eos_id), (300, 2));
    }

    #[test]
    fn a_larger_vocabulary_is_padded_with_user_defined_tokens() {
        let source = tokenizer_view(300);
        let shape = Shape {
            name: "padded",
            vocab: Some(1000),
            tied: false,
            ..TINY
        };
        let plan = Plan::new(shape, Quant::Q8_0, Key::Seeded(3), &source).unwrap();
        assert_eq!((plan.vocab, plan.padding_tokens), (1000, 700));
        let (_, model) = write_and_open(&plan, "padded");
        let view = model.view;
        assert_eq!(view.meta_uint("general.file_type"), Some(7));
        let Some(MetaValue::StrArray(tokens)) = view.meta("tokenizer.ggml.tokens") else {
            panic!("no tokens");
        };
        assert_eq!(tokens.len(), 1000);
        assert_eq!(tokens[299].as_str(), "kkkkkkkkkkkk");
        assert_eq!(tokens[300].as_str(), "<|synth_300|>");
        assert_eq!(tokens[999].as_str(), "<|synth_999|>");
        let unique: HashSet<&str> = tokens.iter().map(|t| t.as_str()).collect();
        assert_eq!(unique.len(), 1000);
        let Some(MetaValue::IntArray(types)) = view.meta("tokenizer.ggml.token_type") else {
            panic!("no token types");
        };
        assert_eq!(types.len(), 1000);
        assert_eq!((types[0], types[299], types[300], types[999]), (3, 1, 4, 4));
        for name in ["token_embd.weight", "output.weight"] {
            let t = view.tensor(name).unwrap();
            assert_eq!(
                (GgmlType::from_id(t.ggml_type), t.dims.as_slice()),
                (Some(GgmlType::Q8_0), &[64u64, 1000][..])
            );
        }
        let codec = crate::harness::tokenize::TextCodec::from_model(view).unwrap();
        assert_eq!(codec.vocab_size, 1000);
        assert_eq!(codec.encode("<|synth_500|>").unwrap(), vec![500]);
    }

    #[test]
    fn a_smaller_vocabulary_or_no_tokenizer_is_refused() {
        let source = tokenizer_view(300);
        let small = Shape {
            vocab: Some(100),
            ..TINY
        };
        let err = Plan::new(small, Quant::Q4_1, Key::Seeded(1), &source).unwrap_err();
        assert!(
            matches!(
                err,
                SynthError::VocabTooSmall {
                    vocab: 100,
                    source_vocab: 300,
                    ..
                }
            ),
            "{err}"
        );
        let mut bare = tokenizer_view(10);
        bare.metadata
            .retain(|e| !e.key.as_str().starts_with("tokenizer."));
        assert!(matches!(
            Plan::new(TINY, Quant::Q4_1, Key::Seeded(1), &bare),
            Err(SynthError::NoTokenizer)
        ));
    }

    /// The smollm2-135m shape against the real default model, when the cache has it.
    #[test]
    fn the_smollm2_shape_matches_the_default_model() {
        let path =
            crate::harness::fetch::cache_dir().join(crate::harness::fetch::DEFAULT_MODEL_FILE);
        if !path.is_file() {
            eprintln!("skipped: {} is not cached", path.display());
            return;
        }
        let real = crate::gguf::Model::open(&path).unwrap();
        assert!(!real.is_synthetic());
        let plan = Plan::new(SMOLLM2_135M, Quant::Q4_1, Key::Seeded(1), real.view).unwrap();
        assert_eq!(plan.padding_tokens, 0);
        let mut want: Vec<(String, Vec<u64>)> = real
            .view
            .tensors
            .iter()
            .map(|t| (t.name.to_string(), t.dims.to_vec()))
            .collect();
        let mut got: Vec<(String, Vec<u64>)> = plan
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone()))
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        for (key, value) in &plan.metadata {
            if key.starts_with("llama.") {
                let real_value = real.view.meta(key).unwrap();
                match (value, real_value) {
                    (MetaValue::Float(a), MetaValue::Float(b)) => {
                        assert!((a - b).abs() <= 1e-6 * b.abs(), "{key}")
                    }
                    (a, b) => assert_eq!(a, b, "{key}"),
                }
            }
            if key.starts_with("tokenizer.") {
                assert_eq!(Some(value), real.view.meta(key), "{key}");
            }
        }
    }
}
