//! Loading: the hyperparameters from the GGUF metadata ([`LlamaConfig`]), the token embedding
//! left in the host's mapping ([`EmbeddingTable`]), and every weight checked against its
//! expected shape and type: projections as [`Matrix`] (Q4_1 and Q8_0 stay mapped), vectors
//! dequantized to f32, and candle `QTensor`s for the CUDA path.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use plugin_api::{GgmlType, ModelView, TensorInfo};

use crate::matmul::{dequantize_q8_0_row, Matrix, Weights};
use crate::model::ModelError;

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

    /// The rows for `tokens`, as a `(tokens.len(), n_embd)` f32 tensor.
    pub fn lookup(&self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let mut out = vec![0f32; tokens.len() * self.n_embd];
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
        Ok(Tensor::from_vec(
            out,
            (tokens.len(), self.n_embd),
            &Device::Cpu,
        )?)
    }
}

pub(crate) fn tensor_info<'v>(
    view: &'v ModelView,
    name: &str,
) -> Result<&'v TensorInfo, ModelError> {
    view.tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
}

pub(crate) fn bad_tensor(info: &TensorInfo, problem: String) -> ModelError {
    ModelError::BadTensor {
        name: info.name.to_string(),
        problem,
    }
}

/// The candle type for a tensor's ggml type id.
pub(crate) fn ggml_dtype(info: &TensorInfo) -> Result<GgmlDType, ModelError> {
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
pub(crate) fn checked_data(
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
