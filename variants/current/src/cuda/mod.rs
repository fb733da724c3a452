//! The Llama model on an NVIDIA GPU, in hand-written CUDA kernels (`kernels.cu`, compiled at
//! load by NVRTC through cudarc, so building this needs no CUDA toolkit; running it needs the
//! driver and `libnvrtc`).
//!
//! [`CudaLlama`] computes what [`LlamaModel`](crate::model::LlamaModel) computes, with every
//! tensor on the device from load to logits: the weights are uploaded once (quantized blocks
//! stay quantized, repacked so their quants are 16-byte aligned; Q, K and V concatenated into
//! one matrix), the token embedding is looked up on the device, and the KV cache is written and
//! read in place. One forward pass is nine kernel launches per block ([`CudaLlama::block`]),
//! five for one token, whose RMSNorms are fused into the matvecs around them ([`Fusion`]) and
//! whose RoPE and cache write are the QKV matvec's epilogue ([`qkv_rope`]);
//! only the token id and position go up, and the logits come back (for a greedy decode step,
//! only their argmax). A one-token step is captured once as a CUDA graph and replayed
//! ([`CudaLlama::decode_graph`]): the kernels read the position from device memory, and
//! attention's grid (a cluster of blocks per KV head) walks the cache up to it, so the same
//! graph serves every position until a buffer is reallocated. Its argmax also feeds the next
//! step (the token and the position move on on the device), so [`Transformer::decode`] queues
//! each step before the host has read the last one's token. Activations stay f32 and sums
//! accumulate in f32, so the quality gates see reordered sums, not rounding.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DevicePtr, DeviceRepr, DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use plugin_api::ModelView;
use step_graph::StepGraph;

use crate::kernels::{BLOCK, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES};
use crate::matmul::Weights;
use crate::model::{
    cache_capacity, check_chunk, load_matrix, load_vector, LlamaConfig, ModelError, RopeTables,
    Transformer,
};

/// The kernels' source, compiled for the device's architecture at load.
const SOURCE: &str = include_str!("kernels.cu");

/// Token rows one `matmul`/`swiglu` block carries (`TOKEN_TILE` in kernels.cu).
const TOKEN_TILE: u32 = 8;
/// Weight rows per `matmul`/`swiglu` block, one warp each (`ROW_WARPS` in kernels.cu).
const ROW_WARPS: u32 = 8;
/// Chunks of more tokens than this go through the tiled matmul; fewer through the one-warp-per-
/// row kernel, which reads each weight once per [`TOKEN_TILE`] tokens straight from memory.
const TILED_ABOVE: usize = TOKEN_TILE as usize;
/// Weight rows and tokens of a tiled-matmul block (`TILE_ROWS`, `TILE_TOKENS` in kernels.cu).
const TILE_ROWS: u32 = 64;
const TILE_TOKENS: u32 = 64;
/// Weight rows and tokens of a tensor-core matmul block (`MMA_ROWS`, `MMA_TOKENS`), and its
/// threads (eight warps). The gated kernel's block takes `MMA_ROWS_GATED` rows of each matrix.
const MMA_ROWS: u32 = 128;
const MMA_ROWS_GATED: u32 = 64;
const MMA_TOKENS: u32 = 64;
const MMA_THREADS: u32 = 256;
/// Quant blocks a pipeline step of the tensor-core matmul stages, and the steps in flight per
/// format (`MMA_KB`, `MMA_STAGES_Q4_1`, `MMA_STAGES_Q8_0`): with [`mma_shared_bytes`], the
/// dynamic shared memory a block is launched with (the kernel traps on less).
const MMA_KB: u32 = 2;
const MMA_STAGES_Q4_1: u32 = 3;
const MMA_STAGES_Q8_0: u32 = 2;
/// The pipelined matmul's block with warpgroup MMAs (`MMA_PIPE_THREADS_WG`): four warpgroups,
/// one block an SM, half as many threads as rows it stages (256; the gated kernel 128 of each
/// matrix). Without them it is the one-pass block ([`MMA_THREADS`], [`MMA_ROWS`]).
const MMA_PIPE_THREADS_WG: u32 = 512;
/// Tokens and columns of a tile of split activations (`PARTS_TILE`): the warpgroup-MMA matmul
/// stages a tile of each plane a step, so [`Parts`] are sized in whole tiles.
const PARTS_TILE: usize = 64;
/// The narrowest model (`n_embd`) whose chunks take the pipelined matmuls (`mma_pipe_*`, their
/// inputs split by the kernels that write them, [`Parts`]); narrower ones keep the one-pass
/// `mma_*`. Measured on the H100, a prefill of 512 tokens: the pipeline took 6.4% off the
/// synthetic 1B's (2,048 wide) and 7.6% off the 8B's (4,096), and added 1.2% to SmolLM2's
/// (576) at 1,680 tokens and 4.5% at 88, where its blocks run a few steps each.
const PIPELINE_FROM_EMBD: usize = 2048;
/// Warps per block of the one-token kernels (`VEC_WARPS` in kernels.cu).
const VEC_WARPS: u32 = 4;
/// Rows per warp of the one-token Q8_0 kernel (`Q8_ROWS` in kernels.cu); Q4_1 takes one.
const Q8_ROWS: u32 = 2;
/// Warps that share a row of the one-token Q4_1 kernels (`Q4_SPLIT` in kernels.cu).
const Q4_SPLIT: u32 = 2;
/// Rows that the warps of a `_long` or `_longest` one-token Q4_1 kernel share
/// (`Q4_ROWS_LONG`).
const Q4_ROWS_LONG: u32 = 2;
/// The columns from which a Q4_1 matrix takes the `_long` one-token kernels: the 1B's and
/// 8B's rows (2,048 and more), not SmolLM2's (576 and 1,536), where two rows a warp pair was
/// slower (G55).
const LONG_ROW_COLS: usize = 2048;
/// Warps that share the two rows of the `_longest` kernels (`Q4_SPLIT_LONGEST`), and the
/// columns from which a Q4_1 matrix takes them: every 8B matrix, the 1B's down (G58: four
/// warps were 3.9% faster at 8B and 12% slower on the 1B's rows of 2,048 columns).
const Q4_SPLIT_LONGEST: u32 = 4;
const LONGEST_ROW_COLS: usize = 4096;
/// The most threads of an `attention_split` block (`ATT_THREADS` in kernels.cu), and the head
/// dimensions each lane holds (`PD`): a (query, head) takes [`att_lanes`] lanes.
const ATT_THREADS: u32 = 128;
const ATT_LANE_DIMS: usize = 32;
/// Threads per `attention_decode` block (`DEC_THREADS` in kernels.cu), the most query heads
/// per KV head it serves (`GROUP_MAX`; a model with more decodes through `attention_split`),
/// and its blocks per cluster, a cluster per KV head (`DEC_CLUSTER`).
const DECODE_THREADS: u32 = 128;
const DECODE_GROUP_MAX: usize = 8;
const DECODE_CLUSTER: u32 = 16;
/// Blocks per cluster of `attention_decode_short` (`DEC_CLUSTER_SHORT`), which decode steps
/// before position [`DECODE_LONG_FROM`] take: smaller clusters start sooner, larger ones spread
/// a long cache over more blocks (H200: 4% less a SmolLM2 step from position 32, 7% more from
/// position 1,680).
const DECODE_CLUSTER_SHORT: u32 = 8;
/// The first position whose decode step takes `attention_decode` (clusters of 16): where its
/// blocks take 64-key tiles (`DEC_CLUSTER * DK` in kernels.cu, which a test checks).
const DECODE_LONG_FROM: usize = 512;
/// The widest head `attention_split` holds (`ATT_HD_MAX` in kernels.cu).
const ATT_HD_MAX: usize = 128;
/// Keys per attention split: short for one token (when it goes through `attention_split`: a
/// group of query heads wider than `attention_decode` serves), so that a long cache is spread
/// over many blocks; longer for a chunk, whose queries already fill the GPU.
const SPLIT_DECODE: usize = 32;
const SPLIT_PREFILL: usize = 256;
/// The most prompt tokens a prefill pass takes ([`Transformer::prefill_chunk`]): 2,048, so that
/// the protocol's long prompt (about 1,680) is one pass; the scratch then holds 2,048 rows of
/// the widest activation (the 8B's FFN: 117 MB) and attention's split records.
const PREFILL_CHUNK_GPU: usize = 2048;
/// Threads of the one block of `argmax` (`ARGMAX_THREADS` in kernels.cu).
const ARGMAX_THREADS: u32 = 1024;
/// Threads of the element-wise kernels (embedding, RMSNorm, RoPE).
const ROW_THREADS: u32 = 256;

impl From<DriverError> for ModelError {
    fn from(e: DriverError) -> Self {
        ModelError::Gpu(format!("CUDA driver: {e}"))
    }
}

/// A weight matrix's format on the device (`FMT_*` in kernels.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    F32 = 0,
    Q4_1 = 1,
    Q8_0 = 2,
}

/// A `(rows, cols)` weight matrix in device memory: `quants` and `scales` as kernels.cu's
/// header describes them per format.
struct DeviceMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    quants: CudaSlice<u8>,
    scales: CudaSlice<u8>,
}

impl DeviceMatrix {
    /// Uploads the rows of `parts` (all with the same number of columns, a multiple of 32)
    /// stacked into one matrix: in their own format when they share Q4_1 or Q8_0, else as f32.
    /// `name` says which tensors they are, for errors.
    fn upload(
        stream: &Arc<CudaStream>,
        name: &str,
        parts: &[(&Weights, usize)],
    ) -> Result<Self, ModelError> {
        let rows: usize = parts.iter().map(|(_, rows)| rows).sum();
        let format = match parts
            .iter()
            .map(|(w, _)| kind(w))
            .collect::<Vec<_>>()
            .as_slice()
        {
            [first, rest @ ..] if rest.iter().all(|f| f == first) => *first,
            _ => Format::F32,
        };
        let (mut quants, mut scales) = (Vec::new(), Vec::new());
        let mut cols = None;
        for &(weights, n) in parts {
            match (format, weights) {
                (Format::Q4_1, Weights::Q4_1(data)) => {
                    for block in data.chunks_exact(Q4_1_BLOCK_BYTES) {
                        scales.extend_from_slice(&block[..4]);
                        quants.extend_from_slice(&block[4..]);
                    }
                }
                (Format::Q8_0, Weights::Q8_0(data)) => {
                    for block in data.chunks_exact(Q8_0_BLOCK_BYTES) {
                        scales.extend_from_slice(&block[..2]);
                        quants.extend_from_slice(&block[2..]);
                    }
                }
                _ => {
                    let floats = dequantized(weights);
                    quants.extend(floats.iter().flat_map(|v| v.to_le_bytes()));
                }
            }
            let c = weight_count(weights) / n;
            if *cols.get_or_insert(c) != c {
                return Err(ModelError::Gpu(format!(
                    "{name}: matrices stacked for the GPU have {c} and {} columns",
                    cols.unwrap_or(0)
                )));
            }
        }
        let cols = cols.unwrap_or(0);
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(ModelError::Gpu(format!(
                "{name}: the GPU kernels need rows of whole 32-weight blocks; these have {cols} \
                 weights"
            )));
        }
        // An empty scale buffer still needs a valid allocation to pass as a pointer, and the
        // tensor-core matmul reads Q8_0's 2-byte scales as the aligned 4-byte words holding
        // them, so the last one's word must be allocated too.
        scales.resize(scales.len().max(4).next_multiple_of(4), 0);
        Ok(Self {
            format,
            rows,
            cols,
            quants: stream.clone_htod(&quants)?,
            scales: stream.clone_htod(&scales)?,
        })
    }
}

/// The device format a host matrix keeps.
fn kind(weights: &Weights) -> Format {
    match weights {
        Weights::Q4_1(_) => Format::Q4_1,
        Weights::Q8_0(_) => Format::Q8_0,
        Weights::F32(_) => Format::F32,
    }
}

/// How many weights a host matrix holds.
fn weight_count(weights: &Weights) -> usize {
    match weights {
        Weights::Q4_1(data) => data.len() / Q4_1_BLOCK_BYTES * BLOCK,
        Weights::Q8_0(data) => data.len() / Q8_0_BLOCK_BYTES * BLOCK,
        Weights::F32(data) => data.len(),
    }
}

/// A host matrix's weights as f32, row-major.
fn dequantized(weights: &Weights) -> Vec<f32> {
    let mut out = vec![0f32; weight_count(weights)];
    match weights {
        Weights::Q4_1(data) => {
            for (block, dst) in data
                .chunks_exact(Q4_1_BLOCK_BYTES)
                .zip(out.chunks_exact_mut(BLOCK))
            {
                crate::matmul::dequantize_q4_1_row(block, dst);
            }
        }
        Weights::Q8_0(data) => {
            for (block, dst) in data
                .chunks_exact(Q8_0_BLOCK_BYTES)
                .zip(out.chunks_exact_mut(BLOCK))
            {
                crate::matmul::dequantize_q8_0_row(block, dst);
            }
        }
        Weights::F32(data) => out.copy_from_slice(data),
    }
    out
}

/// One transformer block's weights on the device.
struct DeviceBlock {
    attn_norm: CudaSlice<f32>,
    /// Q, K and V stacked: `(q_dim + 2 kv_dim, n_embd)`.
    qkv: DeviceMatrix,
    wo: DeviceMatrix,
    ffn_norm: CudaSlice<f32>,
    gate: DeviceMatrix,
    up: DeviceMatrix,
    down: DeviceMatrix,
}

/// The compiled kernels.
struct Kernels {
    /// `matmul_*` per [`Format`], indexed by its value.
    matmul: [CudaFunction; 3],
    /// `swiglu_*` per [`Format`].
    swiglu: [CudaFunction; 3],
    /// The same for chunks of tokens, per [`Format`]: `tiled_f32` and `tiled_swiglu_f32`
    /// for f32 matrices, the tensor-core `mma_*` and `mma_swiglu_*` for the quantized ones.
    tiled: [CudaFunction; 3],
    tiled_swiglu: [CudaFunction; 3],
    /// The pipelined tensor-core matmuls per quantized [`Format`], `mma_pipe_*` and
    /// `mma_pipe_swiglu_*`: the chunk kernels of a model at least [`PIPELINE_FROM_EMBD`] wide,
    /// which take their input split ahead ([`Parts`]). These and the three kernels that feed
    /// them (`rmsnorm_split`, `attention_combine_split`, `split_parts`) are compiled for such a
    /// model only.
    pipelined: [Option<CudaFunction>; 3],
    pipelined_swiglu: [Option<CudaFunction>; 3],
    /// `matvec_*` and `swiglu_vec_*` per [`Format`]: the one-token kernels of a decode step,
    /// for the quantized formats (f32 matrices take the warp kernel).
    matvec: [Option<CudaFunction>; 3],
    swiglu_vec: [Option<CudaFunction>; 3],
    /// `qkv_vec_*` per [`Format`]: the one-token QKV matvec with RoPE and the cache write.
    qkv_vec: [Option<CudaFunction>; 3],
    /// The Q4_1 one-token kernels for long rows ([`RowLength`]): `_long` and `_longest`, each
    /// compiled only when [`LongRows`] asks for it.
    long: Option<LongRowKernels>,
    longest: Option<LongRowKernels>,
    embed: CudaFunction,
    rmsnorm: CudaFunction,
    /// `rmsnorm` that also splits its output for a pipelined matmul ([`Parts`]).
    rmsnorm_split: Option<CudaFunction>,
    rope_kv: CudaFunction,
    attention_split: CudaFunction,
    attention_combine: CudaFunction,
    /// `attention_combine` that also splits its output for a pipelined matmul ([`Parts`]).
    attention_combine_split: Option<CudaFunction>,
    attention_decode: CudaFunction,
    attention_decode_short: CudaFunction,
    argmax: CudaFunction,
    /// Splits a chunk's activations into the pipelined matmul's operands ([`Parts`]).
    split_parts: Option<CudaFunction>,
    /// The device's multiprocessors: a tensor-core matmul whose tiles are fewer splits its
    /// columns ([`column_splits`]).
    sms: u32,
    /// Whether the pipelined matmuls were compiled as warpgroup MMAs ([`takes_wgmma`]), which
    /// sizes their blocks ([`PipeBlock`]).
    wgmma: bool,
    /// Keeps the module loaded while its functions are used.
    _module: Arc<CudaModule>,
}

impl Kernels {
    /// Compiles kernels.cu for `ctx`'s device with NVRTC, with the long-row kernels of
    /// `long_rows` only and the pipelined matmuls only when `pipelined`, and loads it.
    fn compile(
        ctx: &Arc<CudaContext>,
        long_rows: LongRows,
        pipelined: bool,
    ) -> Result<Self, ModelError> {
        let (major, minor) = ctx.compute_capability()?;
        let arch = arch_name(major, minor);
        let cubin = Self::cubin(arch, long_rows, pipelined)?;
        let module = ctx.load_module(Ptx::from_binary(cubin))?;
        let f = |name: &str| module.load_function(name);
        let long_row_kernels = |suffix: &str| -> Result<LongRowKernels, ModelError> {
            Ok(LongRowKernels {
                matvec: f(&format!("matvec_q4_1{suffix}"))?,
                swiglu_vec: f(&format!("swiglu_vec_q4_1{suffix}"))?,
                qkv_vec: f(&format!("qkv_vec_q4_1{suffix}"))?,
            })
        };
        // The pipelined matmuls take more shared memory than a launch may without asking.
        let mma = |name: &str, format: Format| -> Result<Option<CudaFunction>, ModelError> {
            if !pipelined {
                return Ok(None);
            }
            let function = f(name)?;
            function.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                mma_shared_bytes(format, PipeBlock::of(takes_wgmma(arch, pipelined))) as i32,
            )?;
            Ok(Some(function))
        };
        let feeding = |name: &str| pipelined.then(|| f(name)).transpose();
        Ok(Self {
            matmul: [f("matmul_f32")?, f("matmul_q4_1")?, f("matmul_q8_0")?],
            swiglu: [f("swiglu_f32")?, f("swiglu_q4_1")?, f("swiglu_q8_0")?],
            tiled: [f("tiled_f32")?, f("mma_q4_1")?, f("mma_q8_0")?],
            tiled_swiglu: [
                f("tiled_swiglu_f32")?,
                f("mma_swiglu_q4_1")?,
                f("mma_swiglu_q8_0")?,
            ],
            pipelined: [
                None,
                mma("mma_pipe_q4_1", Format::Q4_1)?,
                mma("mma_pipe_q8_0", Format::Q8_0)?,
            ],
            pipelined_swiglu: [
                None,
                mma("mma_pipe_swiglu_q4_1", Format::Q4_1)?,
                mma("mma_pipe_swiglu_q8_0", Format::Q8_0)?,
            ],
            matvec: [None, Some(f("matvec_q4_1")?), Some(f("matvec_q8_0")?)],
            swiglu_vec: [
                None,
                Some(f("swiglu_vec_q4_1")?),
                Some(f("swiglu_vec_q8_0")?),
            ],
            qkv_vec: [None, Some(f("qkv_vec_q4_1")?), Some(f("qkv_vec_q8_0")?)],
            long: long_rows
                .long
                .then(|| long_row_kernels("_long"))
                .transpose()?,
            longest: long_rows
                .longest
                .then(|| long_row_kernels("_longest"))
                .transpose()?,
            embed: f("embed")?,
            rmsnorm: f("rmsnorm")?,
            rmsnorm_split: feeding("rmsnorm_split")?,
            rope_kv: f("rope_kv")?,
            attention_split: f("attention_split")?,
            attention_combine: f("attention_combine")?,
            attention_combine_split: feeding("attention_combine_split")?,
            attention_decode: {
                // Its clusters of 16 blocks are above the portable size (8); the H100 and H200
                // run them once the function allows them.
                let decode = f("attention_decode")?;
                decode.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                    1,
                )?;
                decode
            },
            attention_decode_short: f("attention_decode_short")?,
            argmax: f("argmax")?,
            split_parts: feeding("split_parts")?,
            wgmma: takes_wgmma(arch, pipelined),
            sms: ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )? as u32,
            _module: module,
        })
    }

    /// kernels.cu compiled by NVRTC to the machine code of `arch` (`sm_90` on the H200; a
    /// pipelined model's `sm_90a` there, for the warpgroup MMAs): a cubin, which the driver loads as it is. PTX would be compiled a second time by the
    /// driver at load, which on the H200 took 42 MB more peak memory and 1.5-3 s when no cache
    /// is kept (`probe_load_memory_*` in tests.rs). Needs `libnvrtc`, not a GPU.
    fn cubin(
        arch: &'static str,
        long_rows: LongRows,
        pipelined: bool,
    ) -> Result<Vec<u8>, ModelError> {
        use cudarc::nvrtc::{result, sys};
        let fail =
            |what: String| ModelError::Gpu(format!("NVRTC cannot compile kernels.cu: {what}"));
        let src = std::ffi::CString::new(SOURCE).map_err(|e| fail(e.to_string()))?;
        let prog =
            result::create_program(&src, Some(c"kernels.cu")).map_err(|e| fail(e.to_string()))?;
        let wgmma = takes_wgmma(arch, pipelined);
        let mut options = vec![
            format!("--gpu-architecture={}", if wgmma { "sm_90a" } else { arch }),
            "--fmad=false".to_string(),
        ];
        options.extend(long_rows.defines().map(|d| format!("-D{d}")));
        if pipelined {
            options.push("-DPIPELINED".to_string());
        }
        if wgmma {
            options.push("-DWGMMA".to_string());
        }
        // SAFETY: `prog` is live until it is destroyed below, and the cubin's buffer has the
        // size NVRTC reports for it.
        let built = unsafe {
            match result::compile_program(prog, &options) {
                Ok(()) => {
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(prog, &mut size)
                        .result()
                        .and_then(|()| {
                            let mut cubin = vec![0u8; size];
                            sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                                .result()
                                .map(|()| cubin)
                        })
                        .map_err(|e| fail(e.to_string()))
                }
                Err(e) => {
                    let log = result::get_program_log(prog).unwrap_or_default();
                    let log: Vec<u8> = log
                        .iter()
                        .take_while(|&&c| c != 0)
                        .map(|&c| c as u8)
                        .collect();
                    Err(fail(format!("{e}\n{}", String::from_utf8_lossy(&log))))
                }
            }
        };
        // SAFETY: `prog` was created above and is not used after this.
        let destroyed = unsafe { result::destroy_program(prog) };
        // A compile error is the cause; the program's release failing after it is not.
        let cubin = built?;
        destroyed.map_err(|e| fail(e.to_string()))?;
        Ok(cubin)
    }

    /// The kernel and grid for `t` tokens through a `(rows, cols)` matrix in `format` (gate
    /// and up together when `gated`): the tiled kernel for a chunk of more than
    /// [`TILED_ABOVE`] tokens, the one-token kernel for a quantized decode step (its form for
    /// the matrix's [`RowLength`]), else the warp kernel. The flag says whether it is the
    /// one-token kernel, the one that takes a [`Fusion`].
    fn pick(
        &self,
        format: Format,
        (rows, cols): (usize, usize),
        t: usize,
        gated: bool,
    ) -> (&CudaFunction, LaunchConfig, bool) {
        let f = format as usize;
        if t > TILED_ABOVE {
            let table = if gated {
                &self.tiled_swiglu
            } else {
                &self.tiled
            };
            return (&table[f], tiled_config(rows, t, format, gated), false);
        }
        let vec = if gated {
            &self.swiglu_vec
        } else {
            &self.matvec
        };
        let length = self.row_length(format, cols);
        match (&vec[f], self.long_rows(length)) {
            (Some(_), Some(long)) if t == 1 => {
                let kernel = if gated {
                    &long.swiglu_vec
                } else {
                    &long.matvec
                };
                (kernel, vec_config(rows, format, length), true)
            }
            (Some(kernel), _) if t == 1 => (kernel, vec_config(rows, format, length), true),
            _ => {
                let table = if gated { &self.swiglu } else { &self.matmul };
                (&table[f], matmul_config(rows, t), false)
            }
        }
    }

    /// [`Kernels::pick`], or, given `parts`, the pipelined kernel where there is one (a chunk in
    /// a quantized format, on a model compiled with it) and its grid, which then takes its input
    /// split into `parts`: they come back only in that case.
    fn pick_split<'p>(
        &self,
        format: Format,
        (rows, cols): (usize, usize),
        t: usize,
        gated: bool,
        parts: Option<&'p mut Parts>,
    ) -> (&CudaFunction, LaunchConfig, bool, Option<&'p mut Parts>) {
        let table = if gated {
            &self.pipelined_swiglu
        } else {
            &self.pipelined
        };
        let pipelined = table[format as usize]
            .as_ref()
            .filter(|_| tensor_cores(format, t));
        match (pipelined, parts) {
            (Some(kernel), Some(parts)) => {
                let block = PipeBlock::of(self.wgmma);
                let row_tile = if gated { block.rows / 2 } else { block.rows };
                let config = LaunchConfig {
                    shared_mem_bytes: mma_shared_bytes(format, block),
                    ..tiles(rows, row_tile, t, MMA_TOKENS, block.threads)
                };
                (kernel, config, false, Some(parts))
            }
            _ => {
                let (kernel, config, one_token) = self.pick(format, (rows, cols), t, gated);
                (kernel, config, one_token, None)
            }
        }
    }
}

/// `sm_<major><minor>` as NVRTC wants it, `'static`: each name is leaked once per process and
/// reused by every later load on a device of that generation.
fn arch_name(major: i32, minor: i32) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let name = format!("sm_{major}{minor}");
    let mut names = NAMES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(known) = names.iter().find(|n| **n == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.push(leaked);
    leaked
}

/// Device buffers for the activations of a chunk of up to `tokens` tokens.
struct Scratch {
    tokens: usize,
    ids: CudaSlice<u32>,
    /// The residual stream, `(t, n_embd)`.
    x: CudaSlice<f32>,
    /// A normed copy of it.
    xn: CudaSlice<f32>,
    /// `(t, q_dim + 2 kv_dim)`.
    qkv: CudaSlice<f32>,
    /// Attention output, `(t, q_dim)`.
    att: CudaSlice<f32>,
    /// SwiGLU output, `(t, n_ff)`.
    ff: CudaSlice<f32>,
    /// One row of logits, `(vocab,)`.
    logits: CudaSlice<f32>,
    /// Attention's per-split records ([`attention`]), grown to the longest sequence seen.
    partial: CudaSlice<f32>,
    /// The pipelined matmuls' split activations (a model of [`PIPELINE_FROM_EMBD`] and wider
    /// only): of the norms' and attention's outputs (the inputs of qkv, gate/up and wo) ...
    parts: Option<Parts>,
    /// ... and of the SwiGLU's (down's input), apart, as the SwiGLU reads `parts` while it
    /// writes these.
    ff_parts: Option<Parts>,
}

/// The captured one-token step and the buffer generation it was captured against.
struct DecodeGraph {
    graph: StepGraph,
    generation: u64,
}

// SAFETY: a CUDA graph must not be used by two threads at once. The model owns it and touches it
// only through `&mut self`, so one thread at a time; the worker may move the model between
// threads, which the driver allows.
unsafe impl Send for DecodeGraph {}

/// A Llama-architecture model on one CUDA device, with its KV cache.
pub struct CudaLlama {
    cfg: LlamaConfig,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    /// The token embedding, when it is not the output matrix (tied models share one copy).
    embedding: Option<DeviceMatrix>,
    blocks: Vec<DeviceBlock>,
    output_norm: CudaSlice<f32>,
    output: DeviceMatrix,
    /// `(context, rope_dim / 2)` tables, the CPU model's values.
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    /// Per block, `[position][kv head][head_dim]` for `capacity` positions.
    keys: Vec<CudaSlice<f32>>,
    values: Vec<CudaSlice<f32>>,
    capacity: usize,
    len: usize,
    scratch: Option<Scratch>,
    /// The first position of the chunk being run, on the device (the kernels read it there).
    pos_at: CudaSlice<i32>,
    /// The greedy choice of the last decode step, on the device.
    best: CudaSlice<u32>,
    /// Two page-locked slots the choices of consecutive steps of [`Transformer::decode`] come
    /// back in, step i's while step i + 1 runs, and the events recorded after each copy (the
    /// slots' own events are never recorded: event tracking is off).
    back: [PinnedHostSlice<u32>; 2],
    back_copied: [CudaEvent; 2],
    /// Whether decode steps fuse their RMSNorms into the one-token matvecs ([`Fusion`]): only
    /// when every matrix has a one-token kernel (none was stacked as f32).
    fuse_norms: bool,
    /// Whether chunks take the pipelined matmuls: a model of [`PIPELINE_FROM_EMBD`] and wider
    /// (tests load narrow ones so too: [`CudaLlama::load`]).
    pipelined: bool,
    /// For the fused norms of a decode step: the sums of squares, per block its attention and
    /// FFN norm and then the output norm (`2 n_layer + 1`), and the pending norm's `x ⊙ g`.
    norm_sums: CudaSlice<f64>,
    xg: CudaSlice<f32>,
    /// Counts reallocations of the cache and scratch buffers: a graph captured under an older
    /// generation points at freed memory and is captured again.
    generation: u64,
    /// The decode step's graphs: before [`DECODE_LONG_FROM`] and from it (their attention
    /// kernels differ), each captured when first needed.
    graphs: [Option<DecodeGraph>; 2],
    /// Test-only: the kernels a probe leaves out of the decode step (`Step` names), to time
    /// what each costs there (the results are then wrong).
    #[cfg(test)]
    omit: Vec<Step>,
}

/// The kinds of kernel a forward pass launches, by role (for [`CudaLlama::launches`], which
/// every launch site of these consults, prefill's too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    Embed,
    Qkv,
    Attention,
    Wo,
    Swiglu,
    Down,
    Output,
    Argmax,
}

/// Makes the C library serve every allocation of 128 KiB or more with a mapping of its own,
/// returned to the system when freed. By default glibc raises that threshold (up to 32 MiB)
/// each time it frees a larger mapped block, after which big buffers come from the heap and
/// may stay resident when freed: the load (NVRTC's compile, the weights' upload) then peaks
/// higher in some processes than in others.
fn fixed_mmap_threshold() {
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    /// glibc's `M_MMAP_THRESHOLD`.
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only sets an allocator parameter; a C library without it is not glibc,
    // which this variant links against (a failure returns 0 and changes nothing).
    unsafe { mallopt(M_MMAP_THRESHOLD, 128 * 1024) };
}

impl CudaLlama {
    /// Opens CUDA device `ordinal`, compiles the kernels and uploads the model's weights.
    pub fn from_gguf(view: &'static ModelView, ordinal: usize) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_view(view)?;
        Self::load(view, ordinal, cfg.n_embd >= PIPELINE_FROM_EMBD)
    }

    /// [`CudaLlama::from_gguf`], its chunks through the pipelined matmuls when `pipelined`
    /// (tests take them at any width).
    fn load(view: &'static ModelView, ordinal: usize, pipelined: bool) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_view(view)?;
        if cfg.head_dim > ATT_HD_MAX || !cfg.head_dim.is_multiple_of(8) {
            return Err(ModelError::Gpu(format!(
                "the attention kernel needs a head width that is a multiple of 8 and at most \
                 {ATT_HD_MAX}; this model's is {}",
                cfg.head_dim
            )));
        }
        let group = cfg.n_head / cfg.n_kv_head;
        if group as u32 * att_lanes(cfg.head_dim) > ATT_THREADS {
            return Err(ModelError::Gpu(format!(
                "the attention kernel serves at most {ATT_THREADS} lanes per KV head; this \
                 model's {group} query heads per KV head of width {} need {}",
                cfg.head_dim,
                group as u32 * att_lanes(cfg.head_dim)
            )));
        }
        fixed_mmap_threshold();
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| ModelError::Gpu(format!("cannot open CUDA device {ordinal}: {e}")))?;
        // One stream, in order: cudarc's per-buffer events would only add work to each launch.
        // SAFETY: every buffer of this model is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream()?;
        let long_rows = LongRows::of_tensors(view.tensors.iter());
        let kernels = Kernels::compile(&ctx, long_rows, pipelined)?;

        let (d, ff) = (cfg.n_embd, cfg.n_ff);
        let (q_dim, kv_dim) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
        let vector = |name: &str| -> Result<CudaSlice<f32>, ModelError> {
            Ok(stream.clone_htod(&load_vector(view, name, d)?)?)
        };
        let matrix = |name: &str, rows, cols| -> Result<DeviceMatrix, ModelError> {
            let m = load_matrix(view, name, rows, cols)?;
            DeviceMatrix::upload(&stream, name, &[(m.weights(), rows)])
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let name = |part: &str| format!("blk.{i}.{part}.weight");
                let wq = load_matrix(view, &name("attn_q"), q_dim, d)?;
                let wk = load_matrix(view, &name("attn_k"), kv_dim, d)?;
                let wv = load_matrix(view, &name("attn_v"), kv_dim, d)?;
                let qkv = DeviceMatrix::upload(
                    &stream,
                    &format!("blk.{i}.attn_q/k/v.weight"),
                    &[
                        (wq.weights(), q_dim),
                        (wk.weights(), kv_dim),
                        (wv.weights(), kv_dim),
                    ],
                )?;
                Ok(DeviceBlock {
                    attn_norm: vector(&name("attn_norm"))?,
                    qkv,
                    wo: matrix(&name("attn_output"), d, q_dim)?,
                    ffn_norm: vector(&name("ffn_norm"))?,
                    gate: matrix(&name("ffn_gate"), ff, d)?,
                    up: matrix(&name("ffn_up"), ff, d)?,
                    down: matrix(&name("ffn_down"), d, ff)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        for (i, b) in blocks.iter().enumerate() {
            if b.gate.format != b.up.format {
                return Err(ModelError::Gpu(format!(
                    "blk.{i}.ffn_gate.weight and blk.{i}.ffn_up.weight differ in type; the fused \
                     SwiGLU kernel needs one"
                )));
            }
        }
        let tied = view.tensor("output.weight").is_none();
        let output = matrix(
            if tied {
                "token_embd.weight"
            } else {
                "output.weight"
            },
            cfg.vocab_size,
            d,
        )?;
        let embedding = if tied {
            None
        } else {
            Some(matrix("token_embd.weight", cfg.vocab_size, d)?)
        };
        let fuse_norms = std::iter::once(&output)
            .chain(
                blocks
                    .iter()
                    .flat_map(|b| [&b.qkv, &b.wo, &b.gate, &b.down]),
            )
            .all(|m| m.format != Format::F32);
        let rope = RopeTables::new(cfg.rope_dim, cfg.rope_base, cfg.context_len);
        let (cos, sin) = rope.tables();
        Ok(Self {
            pipelined,
            cos: stream.clone_htod(cos)?,
            sin: stream.clone_htod(sin)?,
            output_norm: vector("output_norm.weight")?,
            output,
            embedding,
            blocks,
            keys: Vec::new(),
            values: Vec::new(),
            capacity: 0,
            len: 0,
            scratch: None,
            pos_at: stream.alloc_zeros(1)?,
            best: stream.alloc_zeros(1)?,
            back: [pinned_slot(&ctx)?, pinned_slot(&ctx)?],
            back_copied: [ctx.new_event(None)?, ctx.new_event(None)?],
            fuse_norms,
            norm_sums: stream.alloc_zeros(2 * cfg.n_layer + 1)?,
            xg: stream.alloc_zeros(d)?,
            generation: 0,
            graphs: [None, None],
            #[cfg(test)]
            omit: Vec::new(),
            kernels,
            stream,
            cfg,
        })
    }

    /// Makes room in the KV cache for `n` positions, keeping the cached ones.
    fn grow_cache(&mut self, n: usize) -> Result<(), ModelError> {
        if n <= self.capacity && !self.keys.is_empty() {
            return Ok(());
        }
        let capacity = cache_capacity(n, self.cfg.context_len);
        let row = self.cfg.n_kv_head * self.cfg.head_dim;
        let keep = self.len.min(self.capacity) * row;
        let stream = &self.stream;
        let grow = |old: Option<&CudaSlice<f32>>| -> Result<CudaSlice<f32>, ModelError> {
            let mut new = stream.alloc_zeros::<f32>(capacity * row)?;
            if let Some(old) = old.filter(|_| keep > 0) {
                stream.memcpy_dtod(&old.slice(..keep), &mut new.slice_mut(..keep))?;
            }
            Ok(new)
        };
        let n_layer = self.cfg.n_layer;
        let keys = (0..n_layer)
            .map(|i| grow(self.keys.get(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let values = (0..n_layer)
            .map(|i| grow(self.values.get(i)))
            .collect::<Result<Vec<_>, _>>()?;
        (self.keys, self.values, self.capacity) = (keys, values, capacity);
        self.generation += 1;
        Ok(())
    }

    /// Activation buffers for `t` tokens and one row of logits (only a chunk's last token, or a
    /// decode step's, goes through the output layer here), grown when needed.
    fn scratch(&mut self, t: usize) -> Result<(), ModelError> {
        if self.scratch.as_ref().is_some_and(|s| s.tokens >= t) {
            return Ok(());
        }
        let cfg = &self.cfg;
        let qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim;
        let s = &self.stream;
        self.scratch = Some(Scratch {
            tokens: t,
            ids: s.alloc_zeros(t)?,
            x: s.alloc_zeros(t * cfg.n_embd)?,
            xn: s.alloc_zeros(t * cfg.n_embd)?,
            qkv: s.alloc_zeros(t * qkv)?,
            att: s.alloc_zeros(t * cfg.n_head * cfg.head_dim)?,
            ff: s.alloc_zeros(t * cfg.n_ff)?,
            logits: s.alloc_zeros(cfg.vocab_size)?,
            partial: s.alloc_zeros(1)?,
            parts: (self.pipelined)
                .then(|| Parts::new(s, t, cfg.n_embd.max(cfg.n_head * cfg.head_dim)))
                .transpose()?,
            ff_parts: (self.pipelined)
                .then(|| Parts::new(s, t, cfg.n_ff))
                .transpose()?,
        });
        self.generation += 1;
        Ok(())
    }

    /// Checks a chunk of `tokens` at positions `pos..`, rewinds the cache to `pos`, makes room
    /// for it in every buffer and uploads the token ids and the position. Returns the chunk's
    /// length and its end position.
    fn prepare(&mut self, tokens: &[u32], pos: usize) -> Result<(usize, usize), ModelError> {
        let end = check_chunk(&self.cfg, self.len, tokens.len(), pos)?;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                token,
                vocab: self.cfg.vocab_size,
            });
        }
        self.len = pos;
        self.grow_cache(end)?;
        let t = tokens.len();
        self.scratch(t)?;
        let need = partial_len(&self.cfg, t, pos, self.capacity);
        let Some(s) = self.scratch.as_mut() else {
            unreachable!("scratch() leaves buffers")
        };
        if s.partial.len() < need {
            s.partial = self.stream.alloc_zeros(need)?;
            self.generation += 1;
        }
        self.stream.memcpy_htod(tokens, &mut s.ids.slice_mut(..t))?;
        let start = [i32::try_from(pos).map_err(|_| {
            ModelError::Gpu(format!(
                "position {pos} does not fit the kernels' 32-bit positions"
            ))
        })?];
        self.stream.memcpy_htod(&start, &mut self.pos_at)?;
        Ok((t, end))
    }

    /// Launches the embedding lookup and every block for the `t` prepared tokens at `pos..`,
    /// leaving the residual stream in the scratch `x`; decode attention in clusters of 16 when
    /// `long` (from [`DECODE_LONG_FROM`]: a captured step reads its position on the device).
    fn launch_blocks(&mut self, t: usize, pos: usize, long: bool) -> Result<(), ModelError> {
        let fused = self.fused(t);
        let embed = self.launches(Step::Embed);
        let Some(s) = self.scratch.as_mut() else {
            unreachable!("prepare() allocates scratch")
        };
        let table = self.embedding.as_ref().unwrap_or(&self.output);
        let (fmt, cols) = (table.format as i32, table.cols as i32);
        // Fused (one token), the first block's attention norm is half done here (Fusion) and
        // the step's sums zeroed; otherwise the norm's pointers are null.
        let st = &self.stream;
        let (g, xg, sums, n_norms) = if fused {
            (
                address(st, &self.blocks[0].attn_norm, 0),
                address(st, &self.xg, 0),
                address(st, &self.norm_sums, 0),
                self.norm_sums.len() as i32,
            )
        } else {
            (0, 0, 0, 0)
        };
        let mut launch = st.launch_builder(&self.kernels.embed);
        launch
            .arg(&fmt)
            .arg(&table.quants)
            .arg(&table.scales)
            .arg(&s.ids)
            .arg(&mut s.x)
            .arg(&cols)
            .arg(&g)
            .arg(&xg)
            .arg(&sums)
            .arg(&n_norms);
        if embed {
            // SAFETY: `ids` holds t in-vocabulary ids (checked by prepare), `x` has room for t
            // rows of `cols`, and the table holds vocab rows in `fmt`; fused (t = 1), the norm
            // weight and `xg` hold n_embd floats and `norm_sums` n_norms doubles, all buffers
            // of the model.
            unsafe { launch.launch(rows_config(t as u32)) }?;
        }
        for i in 0..self.blocks.len() {
            self.block(i, t, pos, long)?;
        }
        Ok(())
    }

    /// The graph of one decode step (embedding, every block, final norm, output layer into the
    /// scratch logits, their argmax into `best`) for positions from [`DECODE_LONG_FROM`] when
    /// `long`, before it otherwise; captured now if the buffers changed since its capture.
    fn decode_graph(&mut self, long: bool) -> Result<&StepGraph, ModelError> {
        let slot = usize::from(long);
        if self.graphs[slot]
            .as_ref()
            .is_none_or(|g| g.generation != self.generation)
        {
            self.graphs[slot] = None;
            // The position of a captured step is read from `pos_at`; the host-side `pos` only
            // shapes prefill, which is never captured.
            let stream = self.stream.clone();
            let graph = StepGraph::capture(&stream, || {
                self.launch_blocks(1, 0, long)
                    .and_then(|()| self.decode_output())
                    .and_then(|()| self.greedy(true))
            })?
            .ok_or_else(|| ModelError::Gpu("capturing the decode step produced no graph".into()))?;
            self.graphs[slot] = Some(DecodeGraph {
                graph,
                generation: self.generation,
            });
        }
        match &self.graphs[slot] {
            Some(g) => Ok(&g.graph),
            None => unreachable!("captured above"),
        }
    }

    /// Block `i` for the `t` tokens in the scratch `x` at positions `pos..`: nine launches, or
    /// five for a fused decode step.
    fn block(&mut self, i: usize, t: usize, pos: usize, long: bool) -> Result<(), ModelError> {
        let cfg = &self.cfg;
        let k = &self.kernels;
        let b = &self.blocks[i];
        let st = &self.stream;
        let fused = self.fused(t);
        let [qkv, att, wo, ffn, down] = [
            Step::Qkv,
            Step::Attention,
            Step::Wo,
            Step::Swiglu,
            Step::Down,
        ]
        .map(|step| self.launches(step));
        let Some(s) = self.scratch.as_mut() else {
            unreachable!("prepare() allocates scratch")
        };
        // With fused norms, the sums of squares of this block's attention and FFN norms and of
        // the next norm (the next block's, or the output's) are entries 2i, 2i + 1 and 2i + 2.
        let sum = |j: usize| address(st, &self.norm_sums, j);
        let eps = cfg.rms_eps;
        let reading = |j: usize| Fusion {
            norm_in: sum(j),
            eps,
            ..Fusion::NONE
        };
        let writing = |j: usize, g: &CudaSlice<f32>| Fusion {
            next_g: address(st, g, 0),
            xg: address(st, &self.xg, 0),
            norm_out: sum(j),
            ..Fusion::NONE
        };
        let none = &Fusion::NONE;
        let rope = RopeArgs {
            cos: address(st, &self.cos, 0),
            sin: address(st, &self.sin, 0),
            keys: address(st, &self.keys[i], 0),
            values: address(st, &self.values[i], 0),
            pos_at: address(st, &self.pos_at, 0),
            n_head: cfg.n_head as i32,
            n_kv: cfg.n_kv_head as i32,
            head_dim: cfg.head_dim as i32,
            rope_half: (cfg.rope_dim / 2) as i32,
        };
        if fused {
            if qkv {
                qkv_rope(st, k, &b.qkv, &self.xg, &mut s.qkv, &reading(2 * i), &rope)?;
            }
        } else {
            let parts = Parts::for_input(&mut s.parts, &b.qkv, t);
            let (x, mut xn) = (s.x.as_view(), s.xn.as_view_mut());
            rmsnorm(st, k, &x, &b.attn_norm, &mut xn, parts, t, cfg)?;
            let xn = s.xn.as_view();
            let parts = s.parts.as_mut();
            matmul(st, k, &b.qkv, &xn, &mut s.qkv, parts, t, false, none)?;
            rope_kv(st, k, &mut s.qkv, &rope, t)?;
        }

        if att {
            attention(
                st,
                k,
                cfg,
                &s.qkv,
                &self.keys[i],
                &self.values[i],
                &mut s.partial,
                &mut s.att,
                Parts::for_input(&mut s.parts, &b.wo, t),
                &self.pos_at,
                pos,
                t,
                self.capacity,
                long,
            )?;
        }
        if fused {
            let after = writing(2 * i + 1, &b.ffn_norm);
            if wo {
                matmul(
                    st,
                    k,
                    &b.wo,
                    &s.att.as_view(),
                    &mut s.x,
                    None,
                    t,
                    true,
                    &after,
                )?;
            }
            if ffn {
                swiglu(
                    st,
                    k,
                    &b.gate,
                    &b.up,
                    &self.xg,
                    &mut s.ff,
                    None,
                    None,
                    t,
                    &reading(2 * i + 1),
                )?;
            }
            let next_norm = match self.blocks.get(i + 1) {
                Some(next) => &next.attn_norm,
                None => &self.output_norm,
            };
            let after = writing(2 * i + 2, next_norm);
            if !down {
                return Ok(());
            }
            matmul(
                st,
                k,
                &b.down,
                &s.ff.as_view(),
                &mut s.x,
                None,
                t,
                true,
                &after,
            )
        } else {
            let att = s.att.as_view();
            matmul(
                st,
                k,
                &b.wo,
                &att,
                &mut s.x,
                s.parts.as_mut(),
                t,
                true,
                none,
            )?;
            let parts = Parts::for_input(&mut s.parts, &b.gate, t);
            let (x, mut xn) = (s.x.as_view(), s.xn.as_view_mut());
            rmsnorm(st, k, &x, &b.ffn_norm, &mut xn, parts, t, cfg)?;
            let ff_parts = Parts::for_input(&mut s.ff_parts, &b.down, t);
            let (xn, ff) = (&s.xn, &mut s.ff);
            swiglu(
                st,
                k,
                &b.gate,
                &b.up,
                xn,
                ff,
                s.parts.as_mut(),
                ff_parts,
                t,
                none,
            )?;
            let ff = s.ff.as_view();
            matmul(
                st,
                k,
                &b.down,
                &ff,
                &mut s.x,
                s.ff_parts.as_mut(),
                t,
                true,
                none,
            )
        }
    }

    /// Whether the decode step launches `step`: always, but a probe may leave kernels out.
    fn launches(&self, step: Step) -> bool {
        #[cfg(test)]
        return !self.omit.contains(&step);
        #[cfg(not(test))]
        {
            let _ = step;
            true
        }
    }

    /// Whether a step of `t` tokens fuses its RMSNorms ([`Fusion`]): one token of a model whose
    /// matrices all have one-token kernels.
    fn fused(&self, t: usize) -> bool {
        t == 1 && self.fuse_norms
    }

    /// The logits of a decode step (the one token in the scratch `x`) into the scratch logits:
    /// the output layer reading the last block's half-done norm when norms are fused, else the
    /// final norm and then the output layer.
    fn decode_output(&mut self) -> Result<(), ModelError> {
        if !self.launches(Step::Output) {
            return Ok(());
        }
        if !self.fused(1) {
            self.final_norm(0, 1)?;
            return self.output_row(0);
        }
        let Some(s) = self.scratch.as_mut() else {
            unreachable!("callers allocate scratch")
        };
        let fusion = Fusion {
            norm_in: address(&self.stream, &self.norm_sums, 2 * self.blocks.len()),
            eps: self.cfg.rms_eps,
            ..Fusion::NONE
        };
        let xg = self.xg.as_view();
        let (st, k) = (&self.stream, &self.kernels);
        matmul(
            st,
            k,
            &self.output,
            &xg,
            &mut s.logits,
            None,
            1,
            false,
            &fusion,
        )
    }

    /// Launches the output layer over the final-normed row `xn[row]`, into the scratch logits
    /// (one row).
    fn output_row(&mut self, row: usize) -> Result<(), ModelError> {
        let Some(s) = self.scratch.as_mut() else {
            unreachable!("callers allocate scratch")
        };
        let d = self.cfg.n_embd;
        let xn = s.xn.slice(row * d..(row + 1) * d);
        matmul(
            &self.stream,
            &self.kernels,
            &self.output,
            &xn,
            &mut s.logits,
            None,
            1,
            false,
            &Fusion::NONE,
        )
    }

    /// The argmax of the first row of the scratch logits into `best`; with `chain` (the end
    /// of the decode graph) also into the scratch ids as the next step's token, and `pos_at`
    /// moved on by one.
    fn greedy(&mut self, chain: bool) -> Result<(), ModelError> {
        if !self.launches(Step::Argmax) {
            return Ok(());
        }
        let Some(s) = self.scratch.as_ref() else {
            unreachable!("callers allocate scratch")
        };
        let n = self.cfg.vocab_size as i32;
        let st = &self.stream;
        let (next_id, pos_at) = if chain {
            (address(st, &s.ids, 0), address(st, &self.pos_at, 0))
        } else {
            (0, 0)
        };
        let mut launch = self.stream.launch_builder(&self.kernels.argmax);
        launch
            .arg(&s.logits)
            .arg(&n)
            .arg(&mut self.best)
            .arg(&next_id)
            .arg(&pos_at);
        // SAFETY: the scratch logits hold at least one row of vocab_size floats; chained, the
        // ids hold at least one token and `pos_at` one position, both buffers of the model.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (ARGMAX_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// Final RMSNorm of rows `first..first + rows` of the scratch `x` into `xn`.
    fn final_norm(&mut self, first: usize, rows: usize) -> Result<(), ModelError> {
        let d = self.cfg.n_embd;
        let Some(s) = self.scratch.as_mut() else {
            unreachable!("callers allocate scratch")
        };
        let x = s.x.slice(first * d..(first + rows) * d);
        let mut xn = s.xn.slice_mut(first * d..(first + rows) * d);
        // No split: the output layer reads these rows one token at a time.
        let (st, k, cfg) = (&self.stream, &self.kernels, &self.cfg);
        rmsnorm(st, k, &x, &self.output_norm, &mut xn, None, rows, cfg)
    }
}

/// One block of [`ROW_THREADS`] per row.
fn rows_config(rows: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The grid of `matmul`/`swiglu` for `rows` weight rows and `t` tokens.
fn matmul_config(rows: usize, t: usize) -> LaunchConfig {
    tiles(rows, ROW_WARPS, t, TOKEN_TILE, ROW_WARPS * 32)
}

/// Which one-token kernels a quantized matrix takes, by its format and row length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowLength {
    /// Q8_0, or Q4_1 rows under [`LONG_ROW_COLS`]: `matvec_*`, `swiglu_vec_*`, `qkv_vec_*`.
    Short,
    /// Q4_1 rows of [`LONG_ROW_COLS`] up to [`LONGEST_ROW_COLS`]: the `_long` kernels.
    Long,
    /// Q4_1 rows of [`LONGEST_ROW_COLS`] or more: the `_longest` kernels.
    Longest,
}

impl RowLength {
    /// The class of a matrix in `format` with rows of `cols`.
    fn of(format: Format, cols: usize) -> RowLength {
        match cols {
            _ if format != Format::Q4_1 => RowLength::Short,
            c if c >= LONGEST_ROW_COLS => RowLength::Longest,
            c if c >= LONG_ROW_COLS => RowLength::Long,
            _ => RowLength::Short,
        }
    }

    /// This class if `compiled` has its kernels, else [`RowLength::Short`], whose kernels
    /// take rows of any length.
    fn within(self, compiled: LongRows) -> RowLength {
        match self {
            RowLength::Long if !compiled.long => RowLength::Short,
            RowLength::Longest if !compiled.longest => RowLength::Short,
            length => length,
        }
    }
}

/// Which long-row classes of one-token kernels kernels.cu is compiled with: those of the
/// model's matrices. NVRTC's memory at load is most of a worker's peak past the weights, and
/// each class's three kernels add about 7 MB to it (`tools/kernel-registers.py` under
/// `/usr/bin/time`), which a model without such rows (SmolLM2's) should not pay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct LongRows {
    /// `_long`: some Q4_1 matrix has rows of [`RowLength::Long`].
    long: bool,
    /// `_longest`: some has rows of [`RowLength::Longest`].
    longest: bool,
}

impl LongRows {
    /// Every class, for the kernel tests.
    #[cfg(test)]
    const ALL: LongRows = LongRows {
        long: true,
        longest: true,
    };

    /// The classes of the two-dimensional tensors among `tensors` (GGUF's `dims[0]` is a row's
    /// length): every matrix a step can multiply by, and perhaps more, never fewer.
    fn of_tensors<'a>(tensors: impl IntoIterator<Item = &'a plugin_api::TensorInfo>) -> Self {
        let mut rows = LongRows::default();
        for t in tensors {
            let format = match plugin_api::GgmlType::from_id(t.ggml_type) {
                Some(plugin_api::GgmlType::Q4_1) => Format::Q4_1,
                _ => continue,
            };
            if t.dims.len() != 2 {
                continue;
            }
            match RowLength::of(format, t.dims[0] as usize) {
                RowLength::Short => {}
                RowLength::Long => rows.long = true,
                RowLength::Longest => rows.longest = true,
            }
        }
        rows
    }

    /// The macros kernels.cu is compiled with (`#ifdef LONG_ROWS`, `LONGEST_ROWS`).
    fn defines(self) -> impl Iterator<Item = &'static str> {
        [(self.long, "LONG_ROWS"), (self.longest, "LONGEST_ROWS")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
    }
}

/// The three one-token Q4_1 kernels of one [`RowLength`] past `Short`.
struct LongRowKernels {
    matvec: CudaFunction,
    swiglu_vec: CudaFunction,
    qkv_vec: CudaFunction,
}

impl Kernels {
    /// The class whose kernels a matrix in `format` with rows of `cols` takes: its own if
    /// compiled ([`RowLength::within`]).
    fn row_length(&self, format: Format, cols: usize) -> RowLength {
        let compiled = LongRows {
            long: self.long.is_some(),
            longest: self.longest.is_some(),
        };
        RowLength::of(format, cols).within(compiled)
    }

    /// The kernels for `length`, none for [`RowLength::Short`] or a class not compiled.
    fn long_rows(&self, length: RowLength) -> Option<&LongRowKernels> {
        match length {
            RowLength::Short => None,
            RowLength::Long => self.long.as_ref(),
            RowLength::Longest => self.longest.as_ref(),
        }
    }
}

/// The grid of the one-token `matvec`/`swiglu_vec` for `rows` weight rows in `format`, of
/// row length `length`.
fn vec_config(rows: usize, format: Format, length: RowLength) -> LaunchConfig {
    let rows_per_block = match (format, length) {
        (Format::Q8_0, _) => VEC_WARPS * Q8_ROWS,
        (_, RowLength::Long) => VEC_WARPS * Q4_ROWS_LONG / Q4_SPLIT,
        (_, RowLength::Longest) => VEC_WARPS * Q4_ROWS_LONG / Q4_SPLIT_LONGEST,
        _ => VEC_WARPS / Q4_SPLIT,
    };
    tiles(rows, rows_per_block, 1, 1, VEC_WARPS * 32)
}

/// The grid of the chunk kernel for `rows` weight rows in `format` and `t` tokens (of both
/// matrices when `gated`): the f32 tiled matmul, or the tensor-core one for a quantized format.
fn tiled_config(rows: usize, t: usize, format: Format, gated: bool) -> LaunchConfig {
    if format == Format::F32 {
        tiles(rows, TILE_ROWS, t, TILE_TOKENS, 256)
    } else {
        let row_tile = if gated { MMA_ROWS_GATED } else { MMA_ROWS };
        tiles(rows, row_tile, t, MMA_TOKENS, MMA_THREADS)
    }
}

/// `kernel`, one of those kernels.cu compiles only for a pipelined model (`name`), or an
/// error saying it was not compiled: a split asked of a model loaded without the pipeline.
fn compiled<'a>(
    kernel: &'a Option<CudaFunction>,
    name: &str,
) -> Result<&'a CudaFunction, ModelError> {
    kernel.as_ref().ok_or_else(|| {
        ModelError::Gpu(format!(
            "{name} is compiled only for a model whose chunks take the pipelined matmuls"
        ))
    })
}

/// Whether a matmul of `t` tokens in `format` runs on the tensor cores (`mma_*`, or for a
/// model of [`PIPELINE_FROM_EMBD`] and wider, `mma_pipe_*`, which takes its input as
/// [`Parts`]).
fn tensor_cores(format: Format, t: usize) -> bool {
    t > TILED_ABOVE && format != Format::F32
}

/// Whether kernels.cu compiled for `arch` takes warpgroup MMAs in its pipelined matmuls
/// (`-D WGMMA`): on sm_90 only, whose sm_90a machine code has them (a cubin for sm_90a loads
/// on the H100 and H200 alike).
fn takes_wgmma(arch: &str, pipelined: bool) -> bool {
    pipelined && arch == "sm_90"
}

/// The threads of a pipelined matmul block and the weight rows it stages (the gated kernel
/// half of them of each matrix): `MMA_PIPE_THREADS` and `MMA_PIPE_ROWS` in kernels.cu.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PipeBlock {
    threads: u32,
    rows: u32,
}

impl PipeBlock {
    /// The block of the warpgroup-MMA kernels (`wgmma`) or of the mma.sync ones.
    fn of(wgmma: bool) -> Self {
        let threads = if wgmma {
            MMA_PIPE_THREADS_WG
        } else {
            MMA_THREADS
        };
        Self {
            threads,
            rows: threads / 2,
        }
    }
}

/// The dynamic shared memory of a pipelined matmul block in `format`: its pipeline steps in
/// flight, each the parts of `MMA_TOKENS` tokens, the quants and scales of the block's rows
/// and the blocks' activation sums, as `MmaStage` in kernels.cu lays them out.
fn mma_shared_bytes(format: Format, block: PipeBlock) -> u32 {
    let (quant_bytes, stages) = match format {
        Format::Q8_0 => (32, MMA_STAGES_Q8_0),
        _ => (16, MMA_STAGES_Q4_1),
    };
    let parts = 3 * MMA_TOKENS * (MMA_KB * 64 + 16);
    let quants = block.rows * (MMA_KB * quant_bytes + 16);
    let scales = block.rows * MMA_KB * 4;
    let sums = MMA_KB * MMA_TOKENS * 4;
    stages * (parts + quants + scales + sums)
}

/// A chunk's activations as the tensor-core matmul takes them (`split_parts` in kernels.cu):
/// three bf16 planes of `(t, cols)` whose sum is each activation exactly, laid out as
/// kernels.cu's `parts_at` says (every 32-column block in the matmul's staged order; with
/// warpgroup MMAs, in tiles of [`PARTS_TILE`] tokens and columns), and each block's sum,
/// `(cols / 32, t)`. Sized for the widest input of a model's matrices.
///
/// The kernel that writes a matmul's input can split it on the way ([`Parts::fill_from`]:
/// rmsnorm, attention_combine, the tensor-core SwiGLU), saving split_parts' launch and its read
/// of the input; the matmul then takes that split if it is of its input ([`Parts::prepare`]).
struct Parts {
    planes: CudaSlice<u16>,
    sums: CudaSlice<f32>,
    /// What the buffers hold, written by a producer and not yet taken: the device address of
    /// the f32 input the producer wrote beside them, its rows and its columns.
    ready: Option<(u64, usize, usize)>,
}

impl Parts {
    /// Room for `tokens` rows of up to `cols` activations.
    fn new(stream: &Arc<CudaStream>, tokens: usize, cols: usize) -> Result<Self, ModelError> {
        Ok(Self {
            planes: stream.alloc_zeros(3 * parts_plane(tokens, cols))?,
            sums: stream.alloc_zeros((tokens * cols / BLOCK).max(1))?,
            ready: None,
        })
    }

    /// `slot`'s parts for the kernel that writes the input of `w` for `t` tokens to split on
    /// the way: only where that matmul will take them (a chunk on the tensor cores), so that
    /// no split is left waiting for a matmul that never reads it.
    fn for_input<'a>(
        slot: &'a mut Option<Parts>,
        w: &DeviceMatrix,
        t: usize,
    ) -> Option<&'a mut Parts> {
        slot.as_mut().filter(|_| tensor_cores(w.format, t))
    }

    /// Fails unless the buffers hold `t` rows of `cols` (a multiple of 32) split.
    fn check(&self, t: usize, cols: usize) -> Result<(), ModelError> {
        let (planes, sums) = (3 * parts_plane(t, cols), t * cols / BLOCK);
        if !cols.is_multiple_of(BLOCK) || self.planes.len() < planes || self.sums.len() < sums {
            return Err(ModelError::Gpu(format!(
                "split parts: a chunk of {t} x {cols} activations needs {planes} parts and {sums} \
                 block sums (and columns a multiple of {BLOCK}); the buffers hold {} and {}",
                self.planes.len(),
                self.sums.len()
            )));
        }
        Ok(())
    }

    /// The device addresses (planes, sums) for a kernel that writes the `t` rows of `cols` at
    /// device address `x` and splits them on the way; the next [`Parts::prepare`] of that input
    /// takes them instead of splitting again.
    fn fill_from(
        &mut self,
        stream: &CudaStream,
        x: u64,
        t: usize,
        cols: usize,
    ) -> Result<(u64, u64), ModelError> {
        self.check(t, cols)?;
        self.ready = Some((x, t, cols));
        Ok((
            address(stream, &self.planes, 0),
            address(stream, &self.sums, 0),
        ))
    }

    /// Makes the buffers hold the `t` rows of `x`, `cols` each, split: a producer's split of
    /// exactly this input is taken as it is (once), anything else is split here.
    fn prepare(
        &mut self,
        stream: &CudaStream,
        k: &Kernels,
        x: &CudaView<'_, f32>,
        t: usize,
        cols: usize,
    ) -> Result<(), ModelError> {
        // Event tracking is off (one stream), so the guard that comes with the pointer does
        // nothing.
        let at = x.device_ptr(stream).0;
        if self.ready.take() == Some((at, t, cols)) {
            return Ok(());
        }
        self.check(t, cols)?;
        let (tt, cc) = (t as i32, cols as i32);
        // One warp a 32-column block of one token, eight a block.
        let items = (t * cols / BLOCK) as u32;
        let config = LaunchConfig {
            grid_dim: (items.div_ceil(8), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = compiled(&k.split_parts, "split_parts")?;
        let mut launch = stream.launch_builder(kernel);
        launch
            .arg(x)
            .arg(&mut self.planes)
            .arg(&mut self.sums)
            .arg(&tt)
            .arg(&cc);
        // SAFETY: `x` holds t rows of cols floats (cols a multiple of 32, checked at upload for
        // every matrix), and the planes and sums were checked above to hold what it writes.
        unsafe { launch.launch(config) }?;
        Ok(())
    }
}

/// The length of one plane of split activations for `t` rows of `cols`, in whole tiles of
/// [`PARTS_TILE`] (kernels.cu's `parts_plane` with warpgroup MMAs; the mma.sync layout needs
/// only `t * cols` of it).
fn parts_plane(t: usize, cols: usize) -> usize {
    t.div_ceil(PARTS_TILE) * cols.div_ceil(PARTS_TILE) * PARTS_TILE * PARTS_TILE
}

/// Quant blocks (32 columns) each split of a tensor-core matmul takes at least: a split's
/// fixed cost (its first load, its atomic adds) is worth paying for a few steps, not one.
const SPLIT_MIN_BLOCKS: usize = 2;

/// How many splits of its `col_blocks` 32-column blocks a tensor-core matmul of `tiles` row and
/// token tiles takes on a device of `sms` multiprocessors: enough that the grid covers every SM
/// once, each split at least [`SPLIT_MIN_BLOCKS`] long; 1 when the tiles alone fill the device
/// (a long chunk), so only a short chunk's matmuls sum in another order. A block's time is a
/// chain of 32-column steps, each waiting on a global load, so a short chunk's few blocks took
/// as long as a long chunk's many (a wo of 88 tokens on SmolLM2: 10 blocks of 18 steps, 29 us).
fn column_splits(tiles: u32, col_blocks: usize, sms: u32) -> u32 {
    if tiles == 0 || tiles >= sms {
        return 1;
    }
    let most = (col_blocks / SPLIT_MIN_BLOCKS).max(1) as u32;
    sms.div_ceil(tiles).min(most)
}

/// The most splits [`wave_splits`] gives a matmul: each adds its sums into y by atomic adds.
const WAVE_SPLITS_MAX: u32 = 4;

/// How many splits of its `col_blocks` 32-column blocks a warpgroup-MMA matmul of `tiles` row
/// and token tiles takes on a device of `sms` multiprocessors, each of which holds one of its
/// blocks (512 threads and 127 KB of shared memory): the fewest whose grid fills its last wave
/// within a point of the best fill of up to [`WAVE_SPLITS_MAX`], each split at least
/// [`SPLIT_MIN_BLOCKS`] long. Every block of such a grid is the same length, so a grid of 1.45
/// waves (the 8B's QKV at 512 tokens: 192 blocks on 132 SMs) leaves 27% of the SMs' time idle
/// in its second wave; [`column_splits`], which splits only grids under one wave, gave it one
/// split, and the 1B's wo and down (64 tiles) three, 1.45 waves again.
fn wave_splits(tiles: u32, col_blocks: usize, sms: u32) -> u32 {
    if tiles == 0 || sms == 0 {
        return 1;
    }
    let most = ((col_blocks / SPLIT_MIN_BLOCKS).max(1) as u32).min(WAVE_SPLITS_MAX);
    // The share of the waves' SM time the grid of `splits` splits fills, in thousandths.
    let fill = |splits: u32| {
        let blocks = u64::from(tiles * splits);
        blocks * 1000 / (blocks.div_ceil(u64::from(sms)) * u64::from(sms))
    };
    let best = (1..=most).map(fill).max().unwrap_or(0);
    (1..=most).find(|&s| fill(s) + 10 >= best).unwrap_or(1)
}

/// A grid of blocks of `threads` covering `rows` weight rows `row_tile` at a time and `t`
/// tokens `token_tile` at a time.
fn tiles(rows: usize, row_tile: u32, t: usize, token_tile: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (rows as u32).div_ceil(row_tile),
            (t as u32).div_ceil(token_tile),
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Keys per split and splits of attention for `t` queries at `pos..` over a cache of
/// `capacity` positions. One token (decode) gets short splits over the whole cache, so its grid
/// does not depend on the position (a captured step serves them all) and a long cache is
/// spread over many blocks; a chunk gets longer splits up to its own end, its queries already
/// filling the GPU.
fn split_shape(t: usize, pos: usize, capacity: usize) -> (usize, usize) {
    if t == 1 {
        (SPLIT_DECODE, capacity.max(pos + 1).div_ceil(SPLIT_DECODE))
    } else {
        (SPLIT_PREFILL, (pos + t).div_ceil(SPLIT_PREFILL))
    }
}

/// Floats of attention's split records for `t` queries at `pos..` over a cache of `capacity`
/// positions: per query, head and split, the running max, the sum and `head_dim` outputs
/// (none where `attention_decode` serves the token: its cluster merges in shared memory).
fn partial_len(cfg: &LlamaConfig, t: usize, pos: usize, capacity: usize) -> usize {
    if decodes_in_cluster(cfg, t) {
        return 0;
    }
    let (_, n_split) = split_shape(t, pos, capacity);
    t * cfg.n_head * n_split * (cfg.head_dim + 2)
}

/// Whether `t` queries go through `attention_decode`: one token, whose group of query heads a
/// KV head serves is at most [`DECODE_GROUP_MAX`].
fn decodes_in_cluster(cfg: &LlamaConfig, t: usize) -> bool {
    t == 1 && cfg.n_head / cfg.n_kv_head <= DECODE_GROUP_MAX
}

/// Causal attention of the `t` queries in `qkv` (a chunk at positions `pos..`, which `pos_at`
/// holds on the device) over the cache of one block (`capacity` positions), into `out`
/// (t, n_head * head_dim): `attention_split` over splits of the keys, then
/// `attention_combine`; one token goes through `attention_decode` instead, a cluster of blocks
/// per KV head, all their threads busy, merged in the cluster's shared memory (clusters of 16
/// blocks when `long`, for positions from [`DECODE_LONG_FROM`], else of 8). `partial` must
/// hold [`partial_len`] floats (`prepare` grows it: a captured step cannot allocate). A chunk's
/// `out` is also split into `parts` when given and the head width allows (a multiple of 32,
/// so that no column block spans two heads).
#[allow(clippy::too_many_arguments)]
fn attention(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    cfg: &LlamaConfig,
    qkv: &CudaSlice<f32>,
    keys: &CudaSlice<f32>,
    values: &CudaSlice<f32>,
    partial: &mut CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    parts: Option<&mut Parts>,
    pos_at: &CudaSlice<i32>,
    pos: usize,
    t: usize,
    capacity: usize,
    long: bool,
) -> Result<(), ModelError> {
    let (split_len, n_split) = split_shape(t, pos, capacity);
    let need = partial_len(cfg, t, pos, capacity);
    if partial.len() < need {
        return Err(ModelError::Gpu(format!(
            "attention of {t} queries at position {pos} needs {need} floats of split records; \
             the buffer holds {}",
            partial.len()
        )));
    }
    let (tt, n_head, n_kv) = (t as i32, cfg.n_head as i32, cfg.n_kv_head as i32);
    let (hd, split, splits) = (cfg.head_dim as i32, split_len as i32, n_split as i32);
    let scale = 1.0f32 / (cfg.head_dim as f32).sqrt();
    if decodes_in_cluster(cfg, t) {
        let (kernel, cluster) = match long {
            true => (&k.attention_decode, DECODE_CLUSTER),
            false => (&k.attention_decode_short, DECODE_CLUSTER_SHORT),
        };
        let mut launch = stream.launch_builder(kernel);
        launch
            .arg(qkv)
            .arg(keys)
            .arg(values)
            .arg(&mut *out)
            .arg(pos_at)
            .arg(&n_head)
            .arg(&n_kv)
            .arg(&hd)
            .arg(&scale);
        let config = LaunchConfig {
            grid_dim: (cfg.n_kv_head as u32 * cluster, 1, 1),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as below for one query: the caches hold positions ..=pos, `qkv` one row,
        // `out` one row of n_head heads; the grid is whole clusters, one a KV head (the
        // kernel's cluster size is compiled in); the group of query heads per KV head is at
        // most DECODE_GROUP_MAX (checked above) and the head width a multiple of 8 of at most
        // ATT_HD_MAX (checked at load).
        unsafe { launch.launch(config) }?;
        return Ok(());
    }
    let mut launch = stream.launch_builder(&k.attention_split);
    launch
        .arg(qkv)
        .arg(keys)
        .arg(values)
        .arg(&mut *partial)
        .arg(pos_at)
        .arg(&tt)
        .arg(&n_head)
        .arg(&n_kv)
        .arg(&hd)
        .arg(&split)
        .arg(&splits)
        .arg(&scale);
    // A block: every query head of one KV head, for as many queries as ATT_THREADS allows.
    let lanes = (cfg.n_head / cfg.n_kv_head) as u32 * att_lanes(cfg.head_dim);
    let queries = (ATT_THREADS / lanes).max(1);
    let config = LaunchConfig {
        grid_dim: (
            cfg.n_kv_head as u32,
            (t as u32).div_ceil(queries),
            n_split as u32,
        ),
        block_dim: (queries * lanes, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the caches hold positions ..pos + t (rope_kv wrote them before, in stream
    // order), `qkv` holds t rows of (n_head + 2 n_kv) heads, `partial` the records of t
    // queries x n_head x n_split (grown above), the head width is a multiple of 8 of at most
    // ATT_HD_MAX and a KV head's lanes at most ATT_THREADS (both checked at load), so the
    // block has whole (query, head) lane groups and at most ATT_THREADS threads.
    unsafe { launch.launch(config) }?;
    let out_split = match parts {
        Some(parts) if cfg.head_dim.is_multiple_of(BLOCK) => {
            let at = address(stream, out, 0);
            Some(parts.fill_from(stream, at, t, cfg.n_head * cfg.head_dim)?)
        }
        _ => None,
    };
    let kernel = match out_split {
        Some(_) => compiled(&k.attention_combine_split, "attention_combine_split")?,
        None => &k.attention_combine,
    };
    let mut launch = stream.launch_builder(kernel);
    launch
        .arg(&*partial)
        .arg(out)
        .arg(pos_at)
        .arg(&n_head)
        .arg(&hd)
        .arg(&split)
        .arg(&splits);
    if let Some((planes, sums)) = &out_split {
        launch.arg(planes).arg(sums).arg(&tt);
    }
    let config = LaunchConfig {
        grid_dim: (cfg.n_head as u32, t as u32, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `partial` holds the records just written, `out` room for t rows of n_head heads;
    // the parts (attention_combine_split's) were checked to hold t rows of n_head heads split,
    // and are given only for a head width that is a multiple of 32, so that the block's 64
    // threads' warps hold whole column blocks.
    unsafe { launch.launch(config) }?;
    Ok(())
}

/// Lanes of `attention_split` per (query, head): 1, 2 or 4, for heads up to 32, 64 or 128 wide
/// (`D` in kernels.cu, which picks the same by the head width).
fn att_lanes(head_dim: usize) -> u32 {
    head_dim.div_ceil(ATT_LANE_DIMS).next_power_of_two() as u32
}

/// `out = rmsnorm(x) * weight` for `t` rows of n_embd, also split into `parts` when given (for
/// a tensor-core matmul that reads `out` next). The one launch of the `rmsnorm` kernel: the
/// layers' norms and the final one all come here.
#[allow(clippy::too_many_arguments)] // the launch's own arguments, named
fn rmsnorm(
    stream: &CudaStream,
    k: &Kernels,
    x: &CudaView<'_, f32>,
    weight: &CudaSlice<f32>,
    out: &mut CudaViewMut<'_, f32>,
    parts: Option<&mut Parts>,
    t: usize,
    cfg: &LlamaConfig,
) -> Result<(), ModelError> {
    let (n, eps, tt) = (cfg.n_embd as i32, cfg.rms_eps, t as i32);
    let split = match parts {
        Some(parts) => {
            // Event tracking is off (one stream), so the pointer's guard does nothing.
            let at = out.device_ptr(stream).0;
            Some(parts.fill_from(stream, at, t, cfg.n_embd)?)
        }
        None => None,
    };
    let kernel = match split {
        Some(_) => compiled(&k.rmsnorm_split, "rmsnorm_split")?,
        None => &k.rmsnorm,
    };
    let mut launch = stream.launch_builder(kernel);
    launch.arg(x).arg(weight).arg(out).arg(&n).arg(&eps);
    if let Some((planes, sums)) = &split {
        launch.arg(planes).arg(sums).arg(&tt);
    }
    // SAFETY: `x` and `out` hold at least t rows of n_embd (views of the scratch), `weight`
    // n_embd floats;
    // the parts (for rmsnorm_split) were checked to hold t rows of n_embd split, n_embd a
    // multiple of 32 as the blocks' ROW_THREADS are, so every warp holds whole column blocks.
    unsafe { launch.launch(rows_config(t as u32)) }?;
    Ok(())
}

/// What a one-token matvec fuses of a decode step's RMSNorms (`matvec_body` in kernels.cu):
/// device addresses, 0 for none. The norm `x / rms(x) ⊙ g` is split in two halves: the kernel
/// that writes x (the residual add, or the embedding) also writes `x ⊙ g` and adds the squares
/// of x into a sum; the kernel that reads the normed x takes `x ⊙ g` and scales its products by
/// `1 / rms` at the end. Two launches and a round trip of x per norm are saved.
#[derive(Clone, Copy)]
struct Fusion {
    /// The input holds `x ⊙ g`; here is the sum of squares of x.
    norm_in: u64,
    /// The RMSNorm's epsilon, with `norm_in`.
    eps: f64,
    /// The next norm's weight `g`: after the residual add, `x ⊙ g` goes to `xg` and the squares
    /// of x are added into `norm_out`.
    next_g: u64,
    xg: u64,
    norm_out: u64,
}

impl Fusion {
    /// No fusion: the kernel reads its input as it is and writes only its output.
    const NONE: Fusion = Fusion {
        norm_in: 0,
        eps: 0.0,
        next_g: 0,
        xg: 0,
        norm_out: 0,
    };

    fn is_none(&self) -> bool {
        self.norm_in == 0 && self.next_g == 0
    }

    /// The error for a fusion asked of a kernel that has none (`t` tokens through a matrix in
    /// `format`): a check of the model at load failed.
    fn unsupported(format: Format, t: usize) -> ModelError {
        ModelError::Gpu(format!(
            "a fused RMSNorm needs the one-token kernel of a quantized matrix; {t} token(s) \
             through a {format:?} matrix have none"
        ))
    }
}

/// Where the QKV matvec of a decode step puts its rows ([`qkv_rope`]): `struct Rope` in
/// kernels.cu, field for field (device addresses, then the shapes).
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeArgs {
    /// The `(context, rope_half)` cos and sin tables.
    cos: u64,
    sin: u64,
    /// This block's key and value caches, `[position][kv head][head_dim]`.
    keys: u64,
    values: u64,
    /// The position of the token, on the device.
    pos_at: u64,
    n_head: i32,
    n_kv: i32,
    head_dim: i32,
    /// Rotated pairs per head.
    rope_half: i32,
}

// SAFETY: a `repr(C)` struct of integers, laid out as kernels.cu's `struct Rope` (five 8-byte
// addresses, then four 4-byte ints: no padding on either side).
unsafe impl DeviceRepr for RopeArgs {}

/// RoPE and the cache write for the `t` token rows of `qkv` (at the position `rope.pos_at`
/// holds and after): q rotated in place, k rotated into the key cache, v copied into the value
/// cache.
fn rope_kv(
    stream: &CudaStream,
    k: &Kernels,
    qkv: &mut CudaSlice<f32>,
    rope: &RopeArgs,
    t: usize,
) -> Result<(), ModelError> {
    let mut launch = stream.launch_builder(&k.rope_kv);
    launch
        .arg(qkv)
        .arg(&rope.cos)
        .arg(&rope.sin)
        .arg(&rope.keys)
        .arg(&rope.values)
        .arg(&rope.pos_at)
        .arg(&rope.n_head)
        .arg(&rope.n_kv)
        .arg(&rope.head_dim)
        .arg(&rope.rope_half);
    // SAFETY: `qkv` holds t rows of (n_head + 2 n_kv) heads, the tables cover pos + t <= context
    // positions, and the caches hold capacity >= pos + t positions (grow_cache).
    unsafe { launch.launch(rows_config(t as u32)) }?;
    Ok(())
}

/// The QKV matvec of a fused decode step (one token, `x` holding the attention norm's `x ⊙ g`)
/// with RoPE and the cache write in its epilogue: q rotated into `qkv`, k rotated and v copied
/// into the caches at the token's position. One launch instead of the matvec and `rope_kv`.
fn qkv_rope(
    stream: &CudaStream,
    k: &Kernels,
    w: &DeviceMatrix,
    x: &CudaSlice<f32>,
    qkv: &mut CudaSlice<f32>,
    fusion: &Fusion,
    rope: &RopeArgs,
) -> Result<(), ModelError> {
    let length = k.row_length(w.format, w.cols);
    let kernel = match (&k.qkv_vec[w.format as usize], k.long_rows(length)) {
        (Some(_), Some(long)) => &long.qkv_vec,
        (Some(kernel), None) => kernel,
        (None, _) => return Err(Fusion::unsupported(w.format, 1)),
    };
    let (rows, cols) = (w.rows as i32, w.cols as i32);
    let mut launch = stream.launch_builder(kernel);
    launch
        .arg(&w.quants)
        .arg(&w.scales)
        .arg(x)
        .arg(qkv)
        .arg(&rows)
        .arg(&cols)
        .arg(&fusion.norm_in)
        .arg(&fusion.eps)
        .arg(rope);
    // SAFETY: `x` holds w.cols floats, `qkv` w.rows = (n_head + 2 n_kv) head_dim, the norm sum
    // is a live f64 of the model, and `rope` addresses the model's tables (covering the
    // position) and this block's caches (holding capacity > the position, grow_cache).
    unsafe { launch.launch(vec_config(w.rows, w.format, length)) }?;
    Ok(())
}

/// One page-locked `u32` for a decode step's choice to come back in (ordinary cached memory:
/// the host reads it).
fn pinned_slot(ctx: &Arc<CudaContext>) -> Result<PinnedHostSlice<u32>, ModelError> {
    // SAFETY: any bit pattern is a u32, and the slot is read only after a copy into it.
    Ok(unsafe { ctx.alloc_pinned_with_flags::<u32>(1, 0) }?)
}

/// The device address of `slice`'s element `i` (for the fused norms' optional pointers).
fn address<T>(stream: &CudaStream, slice: &CudaSlice<T>, i: usize) -> u64 {
    // Event tracking is off (one stream), so the guard that comes with the pointer does nothing.
    slice.device_ptr(stream).0 + (i * std::mem::size_of::<T>()) as u64
}

/// `y = silu(x · gateᵀ) * (x · upᵀ)` for the `t` token rows of `x`, gate and up in one kernel.
/// With `parts`, a chunk in a quantized format goes through the pipelined kernel, x split into
/// `parts` first, which also splits y into `y_parts` when given, for the down projection.
#[allow(clippy::too_many_arguments)] // the launch's own arguments, named
fn swiglu(
    stream: &CudaStream,
    k: &Kernels,
    gate: &DeviceMatrix,
    up: &DeviceMatrix,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    parts: Option<&mut Parts>,
    y_parts: Option<&mut Parts>,
    t: usize,
    fusion: &Fusion,
) -> Result<(), ModelError> {
    let (rows, cols, tt) = (gate.rows as i32, gate.cols as i32, t as i32);
    let shape = (gate.rows, gate.cols);
    let (kernel, config, one_token, mut pipelined) =
        k.pick_split(gate.format, shape, t, true, parts);
    let mut y_split = (0u64, 0u64);
    if let Some(parts) = &mut pipelined {
        parts.prepare(stream, k, &x.as_view(), t, gate.cols)?;
        if let Some(y_parts) = y_parts {
            y_split = y_parts.fill_from(stream, address(stream, y, 0), t, gate.rows)?;
        }
    }
    let mut launch = stream.launch_builder(kernel);
    launch
        .arg(&gate.quants)
        .arg(&gate.scales)
        .arg(&up.quants)
        .arg(&up.scales);
    match &pipelined {
        Some(parts) => launch.arg(&parts.planes).arg(&parts.sums),
        None => launch.arg(x),
    };
    launch.arg(y).arg(&rows).arg(&cols).arg(&tt);
    if pipelined.is_some() {
        launch.arg(&y_split.0).arg(&y_split.1);
    }
    if one_token {
        launch.arg(&fusion.norm_in).arg(&fusion.eps);
    } else if !fusion.is_none() {
        return Err(Fusion::unsupported(gate.format, t));
    }
    // SAFETY: gate and up are (rows, cols) in one format (checked at load), `x` (or the parts
    // split from it) holds t rows of cols and `y` room for t rows of `rows`; y's parts (0 for
    // none) were checked to hold t rows of `rows` split; a fusion's addresses are live buffers
    // of the model (one f64 sum, or n_embd floats).
    unsafe { launch.launch(config) }?;
    Ok(())
}

/// `y = x · Wᵀ` (or `y += x · Wᵀ` when `accumulate`) for the `t` token rows `x` views. With
/// `parts`, a chunk in a quantized format goes through the pipelined kernel, x split into
/// `parts` first.
#[allow(clippy::too_many_arguments)] // the launch's own arguments, named
fn matmul(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    w: &DeviceMatrix,
    x: &CudaView<'_, f32>,
    y: &mut CudaSlice<f32>,
    parts: Option<&mut Parts>,
    t: usize,
    accumulate: bool,
    fusion: &Fusion,
) -> Result<(), ModelError> {
    let (rows, cols, tt, acc) = (w.rows as i32, w.cols as i32, t as i32, accumulate as i32);
    let shape = (w.rows, w.cols);
    let (kernel, mut config, one_token, mut pipelined) =
        k.pick_split(w.format, shape, t, false, parts);
    if tensor_cores(w.format, t) {
        let (gx, gy, _) = config.grid_dim;
        config.grid_dim.2 = if k.wgmma && pipelined.is_some() {
            wave_splits(gx * gy, w.cols / 32, k.sms)
        } else {
            column_splits(gx * gy, w.cols / 32, k.sms)
        };
        if config.grid_dim.2 > 1 && !accumulate {
            // The splits add into y, so it starts from zero.
            stream.memset_zeros(&mut y.slice_mut(..t * w.rows))?;
        }
    }
    if let Some(parts) = &mut pipelined {
        parts.prepare(stream, k, x, t, w.cols)?;
    }
    let mut launch = stream.launch_builder(kernel);
    launch.arg(&w.quants).arg(&w.scales);
    match &pipelined {
        Some(parts) => launch.arg(&parts.planes).arg(&parts.sums),
        None => launch.arg(x),
    };
    launch.arg(y).arg(&rows).arg(&cols).arg(&tt).arg(&acc);
    if one_token {
        launch
            .arg(&fusion.norm_in)
            .arg(&fusion.eps)
            .arg(&fusion.next_g)
            .arg(&fusion.xg)
            .arg(&fusion.norm_out);
    } else if !fusion.is_none() {
        return Err(Fusion::unsupported(w.format, t));
    }
    // SAFETY: `x` (or the parts split from it) holds t rows of w.cols and `y` t rows of w.rows
    // (the scratch is sized for every matrix of the model), and w's buffers hold rows x cols
    // weights in its format; a grid split over the columns (z > 1, tensor-core kernels only)
    // adds into y, zeroed above unless accumulating; a fusion's addresses are live buffers of
    // the model (one f64 sum, or w.rows floats).
    unsafe { launch.launch(config) }?;
    Ok(())
}

impl CudaLlama {
    /// Runs `tokens` at `pos..` through to the logits of the last one (the scratch logits'
    /// first row); one token replays the captured decode step, which also leaves its argmax in
    /// `best`. Returns the number of tokens.
    fn step(&mut self, tokens: &[u32], pos: usize) -> Result<usize, ModelError> {
        let (t, end) = self.prepare(tokens, pos)?;
        if t == 1 {
            self.decode_graph(pos >= DECODE_LONG_FROM)?.launch()?;
        } else {
            self.launch_blocks(t, pos, pos >= DECODE_LONG_FROM)?;
            self.final_norm(t - 1, 1)?;
            self.output_row(t - 1)?;
        }
        self.len = end;
        Ok(t)
    }
}

impl Transformer for CudaLlama {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn reset(&mut self) {
        self.len = 0;
    }

    /// [`PREFILL_CHUNK_GPU`] tokens: a prompt of the protocol's longest in one pass, whose
    /// tiles fill the SMs, where 256-token chunks each left most of them idle.
    fn prefill_chunk(&self) -> usize {
        PREFILL_CHUNK_GPU
    }

    fn reserve(&mut self, n: usize) -> Result<(), ModelError> {
        self.grow_cache(n.min(self.cfg.context_len))
    }

    fn forward_hidden(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor, ModelError> {
        let (t, end) = self.prepare(tokens, pos)?;
        self.launch_blocks(t, pos, pos >= DECODE_LONG_FROM)?;
        self.final_norm(0, t)?;
        self.len = end;
        let Some(s) = self.scratch.as_ref() else {
            unreachable!("prepare() allocates scratch")
        };
        let d = self.cfg.n_embd;
        let hidden = self.stream.clone_dtoh(&s.xn.slice(..t * d))?;
        Ok(Tensor::from_vec(hidden, (t, d), &Device::Cpu)?)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        let (rows, d) = hidden.dims2()?;
        let rows_in: Vec<f32> = hidden.flatten_all()?.to_vec1()?;
        if d != self.cfg.n_embd {
            return Err(ModelError::Gpu(format!(
                "logits of rows of {d} values; the model's width is {}",
                self.cfg.n_embd
            )));
        }
        // Its own buffers: `logits` takes `&self`, and scoring asks for a few rows at a time.
        let x = self.stream.clone_htod(&rows_in)?;
        let mut y = self.stream.alloc_zeros::<f32>(rows * self.cfg.vocab_size)?;
        let mut parts = (self.pipelined)
            .then(|| Parts::new(&self.stream, rows, d))
            .transpose()?;
        matmul(
            &self.stream,
            &self.kernels,
            &self.output,
            &x.as_view(),
            &mut y,
            parts.as_mut(),
            rows,
            false,
            &Fusion::NONE,
        )?;
        let out = self.stream.clone_dtoh(&y)?;
        Ok(Tensor::from_vec(
            out,
            (rows, self.cfg.vocab_size),
            &Device::Cpu,
        )?)
    }

    /// Only the last token is normed and multiplied by the output layer; its logits are the
    /// one copy back to the host. One token replays the captured decode step.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor, ModelError> {
        self.step(tokens, pos)?;
        let Some(s) = self.scratch.as_ref() else {
            unreachable!("prepare() allocates scratch")
        };
        let logits = self
            .stream
            .clone_dtoh(&s.logits.slice(..self.cfg.vocab_size))?;
        Ok(Tensor::from_vec(logits, self.cfg.vocab_size, &Device::Cpu)?)
    }

    /// The argmax is taken on the device (in the decode graph), so four bytes come back
    /// instead of the logits.
    fn forward_greedy(
        &mut self,
        tokens: &[u32],
        pos: usize,
        _scratch: &mut Vec<f32>,
    ) -> Result<u32, ModelError> {
        if self.step(tokens, pos)? > 1 {
            self.greedy(false)?;
        }
        let mut best = [0u32];
        self.stream.memcpy_dtoh(&self.best, &mut best)?;
        Ok(best[0])
    }

    /// Runs one step ahead of `emit`: the decode graph leaves its choice in the ids and moves
    /// `pos_at` on (`greedy`'s chain), so step i + 1 is queued behind step i before the host has
    /// seen step i's token, and the GPU never waits for the host between steps. Step i's
    /// choice comes back through page-locked slot i % 2, copied in stream order right after
    /// its step; the slot is read (its event waited on) before step i + 2 is queued. At most
    /// one step past the last emitted token runs; the cache keeps it.
    fn decode(
        &mut self,
        token: u32,
        pos: usize,
        n: usize,
        emit: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize, ModelError> {
        if n == 0 {
            return Ok(0);
        }
        // Checks the first step, uploads its token and position, and makes room for all n.
        self.prepare(&[token], pos)?;
        check_chunk(&self.cfg, pos, n, pos)?;
        self.grow_cache(pos + n)?;
        // Step i runs at position pos + i: the graphs of the positions before DECODE_LONG_FROM
        // and from it, as the steps need them.
        if pos < DECODE_LONG_FROM {
            self.decode_graph(false)?;
        }
        if pos + n > DECODE_LONG_FROM {
            self.decode_graph(true)?;
        }
        let graphs = &self.graphs;
        // Queues step `i`: its graph, then its choice's copy into slot i % 2 and that slot's
        // event.
        let queue = |i: usize, back: &mut PinnedHostSlice<u32>| -> Result<(), ModelError> {
            let Some(graph) = &graphs[usize::from(pos + i >= DECODE_LONG_FROM)] else {
                unreachable!("captured above for every step's position")
            };
            graph.graph.launch()?;
            self.stream.memcpy_dtoh(&self.best, back)?;
            self.back_copied[i % 2].record(&self.stream)?;
            Ok(())
        };
        queue(0, &mut self.back[0])?;
        let mut launched = 1;
        let mut emitted = 0;
        while emitted < n {
            if launched < n {
                queue(launched, &mut self.back[launched % 2])?;
                launched += 1;
            }
            self.back_copied[emitted % 2].synchronize()?;
            let choice = self.back[emitted % 2].as_slice()?[0];
            emitted += 1;
            if !emit(choice) {
                break;
            }
        }
        self.stream.synchronize()?;
        self.len = pos + launched;
        Ok(emitted)
    }
}

mod step_graph;
#[cfg(test)]
mod tests;
