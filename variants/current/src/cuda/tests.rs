//! The GPU path against the CPU model and the scalar reference. Every test needs a CUDA GPU, so
//! each is `#[ignore]`d: CI compiles them (`--features cuda`), the GPU machine runs them with
//! `cargo test --features cuda -- --ignored cuda` (or the prebuilt test binary, `--ignored`).

use super::*;
use crate::matmul::Matrix;
use crate::model::{self, tensor_to_vec, tiny, AttentionShape, LlamaModel, KV_CACHE_STEP};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use plugin_api::GgmlType;

/// The largest difference between two vectors, relative to the largest magnitude in `a`.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// A deterministic generator of pseudo-random bits.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// `rows * cols` random weights in `format`, as the GGUF stores them.
fn random_weights(format: Format, rows: usize, cols: usize, seed: u64) -> Weights {
    let mut next = rng(seed);
    let blocks = rows * cols / BLOCK;
    let mut unit = move || (next() % 2001) as f32 / 1000.0 - 1.0;
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    match format {
        Format::Q4_1 => Weights::Q4_1(Box::leak(
            (0..blocks)
                .flat_map(|_| {
                    let mut b = Vec::with_capacity(Q4_1_BLOCK_BYTES);
                    b.extend(f16(0.01 + unit().abs() * 0.05));
                    b.extend(f16(unit() * 0.3));
                    b.extend((0..16).map(|_| ((unit() + 1.0) * 127.0) as u8));
                    b
                })
                .collect::<Vec<u8>>()
                .into_boxed_slice(),
        )),
        Format::Q8_0 => Weights::Q8_0(Box::leak(
            (0..blocks)
                .flat_map(|_| {
                    let mut b = Vec::with_capacity(Q8_0_BLOCK_BYTES);
                    b.extend(f16(0.001 + unit().abs() * 0.01));
                    b.extend((0..32).map(|_| (unit() * 127.0) as i8 as u8));
                    b
                })
                .collect::<Vec<u8>>()
                .into_boxed_slice(),
        )),
        Format::F32 => Weights::F32((0..rows * cols).map(|_| unit()).collect()),
    }
}

/// A CUDA context's stream and the compiled kernels.
fn gpu() -> (Arc<CudaStream>, Kernels) {
    let ctx = CudaContext::new(0).expect("a CUDA device (these tests need a GPU)");
    unsafe { ctx.disable_event_tracking() };
    let kernels = Kernels::compile(&ctx, LongRows::ALL, true).expect("kernels.cu compiles");
    (ctx.default_stream(), kernels)
}

fn random_activations(n: usize, seed: u64) -> Vec<f32> {
    let mut next = rng(seed);
    (0..n)
        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matmul_of_each_format_matches_the_cpu_for_any_token_count() {
    let (stream, k) = gpu();
    // Rows that fill no whole block of the grid; rows shorter than a warp's lanes and rows
    // that take the lanes several rounds (the one-token kernel's loop); chunks whose few tiles
    // split the columns (`column_splits`), into splits of equal and of unequal lengths; rows
    // of each one-token Q4_1 kernel's length (`RowLength`: 2,080 columns `_long`, 4,160
    // `_longest`).
    for (rows, cols, t_max) in [
        (130, 96, 200),
        (131, 1088, 20),
        (300, 1600, 70),
        (67, 2080, 3),
        (67, 4160, 3),
    ] {
        for (n, format) in [Format::Q4_1, Format::Q8_0, Format::F32]
            .into_iter()
            .enumerate()
        {
            let weights = random_weights(format, rows, cols, 7 + n as u64);
            let device = DeviceMatrix::upload(&stream, "test", &[(&weights, rows)]).unwrap();
            assert_eq!(device.format, format);
            let cpu = Matrix::new(weights, rows, cols);
            // One token the one-token kernel, up to 8 the one-warp-per-row kernel, above it
            // the tiled one.
            for t in [1, 3, 8, 9, 20, 64, 70, 200]
                .into_iter()
                .filter(|&t| t <= t_max)
            {
                check_matmul(&stream, &k, &device, &cpu, t);
            }
        }
    }
}

/// The GPU's `x · Wᵀ` (and `y += x · Wᵀ`) for `t` random token rows against the CPU's, through
/// the one-pass kernels and through the pipelined ones (given [`Parts`]).
fn check_matmul(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    device: &DeviceMatrix,
    cpu: &Matrix,
    t: usize,
) {
    let (rows, cols, format) = (device.rows, device.cols, device.format);
    let x = random_activations(t * cols, t as u64);
    let want = cpu_product(cpu, &x, t, cols);
    let xd = stream.clone_htod(&x).unwrap();
    for pipelined in [false, true] {
        // Not zeros: a product that does not accumulate must not read what y held.
        let mut y = stream.clone_htod(&vec![f32::NAN; t * rows]).unwrap();
        let mut parts = pipelined.then(|| Parts::new(stream, t, cols).unwrap());
        let mut product = |y: &mut CudaSlice<f32>, accumulate: bool| {
            let x = xd.as_view();
            let none = &Fusion::NONE;
            matmul(
                stream,
                k,
                device,
                &x,
                y,
                parts.as_mut(),
                t,
                accumulate,
                none,
            )
            .unwrap();
        };
        let what = format!("{format:?} {rows}x{cols} t={t} pipelined {pipelined}");
        product(&mut y, false);
        let got = stream.clone_dtoh(&y).unwrap();
        let diff = rel_diff(&want, &got);
        assert!(diff < 1e-5, "{what}: relative difference {diff}");
        // Accumulating adds the same product again.
        product(&mut y, true);
        let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
        let diff = rel_diff(&twice, &stream.clone_dtoh(&y).unwrap());
        assert!(diff < 1e-5, "{what} accumulated: {diff}");
    }
}

/// That `parts`, as a producer kernel left them beside its output `x` (`t` rows of `cols`),
/// are what split_parts makes of x: the planes bit for bit, the block sums exactly when the
/// producer summed in split_parts' order (`exact_sums`), else to f32 rounding; and that the
/// matmul's `prepare` takes them. A producer that was not to split (`expected` false: no
/// tensor-core consumer, or no whole column blocks) must leave nothing marked ready, so that
/// the matmul splits.
#[allow(clippy::too_many_arguments)]
fn check_producer_split(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    parts: &mut Parts,
    x: &CudaSlice<f32>,
    (t, cols): (usize, usize),
    expected: bool,
    exact_sums: bool,
    what: &str,
) {
    assert_eq!(
        parts.ready.is_some(),
        expected,
        "{what}: marked ready {:?}",
        parts.ready
    );
    if !expected {
        return;
    }
    assert_holds_split(stream, k, parts, x, (t, cols), exact_sums, what);
    // The matmul takes the split as it is, and only once.
    parts.prepare(stream, k, &x.as_view(), t, cols).unwrap();
    assert_eq!(parts.ready, None, "{what}: not taken");
}

/// That `parts` hold what split_parts makes of `x` (`t` rows of `cols`): the planes bit for
/// bit, the block sums exactly (`exact_sums`) or to f32 rounding.
fn assert_holds_split(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    parts: &Parts,
    x: &CudaSlice<f32>,
    (t, cols): (usize, usize),
    exact_sums: bool,
    what: &str,
) {
    let mut fresh = Parts::new(stream, t, cols).unwrap();
    // Nothing is ready in fresh buffers, so prepare splits x itself.
    fresh.prepare(stream, k, &x.as_view(), t, cols).unwrap();
    let (n_planes, n_sums) = (3 * parts_plane(t, cols), t * cols / 32);
    let planes = |p: &Parts| stream.clone_dtoh(&p.planes.slice(..n_planes)).unwrap();
    let sums = |p: &Parts| stream.clone_dtoh(&p.sums.slice(..n_sums)).unwrap();
    let (got, want) = (planes(parts), planes(&fresh));
    // Only the activations' places: the padding of a tile holds whatever was there.
    let mut wrong = 0;
    for p in 0..3 {
        for tok in 0..t {
            for col in 0..cols {
                let at = part_index(k.wgmma, (t, cols), p, tok, col);
                wrong += usize::from(got[at] != want[at]);
            }
        }
    }
    assert_eq!(wrong, 0, "{what}: {wrong} of {} parts differ", 3 * t * cols);
    let (got, want) = (sums(parts), sums(&fresh));
    if exact_sums {
        assert_eq!(got, want, "{what}: block sums");
    } else {
        let diff = rel_diff(&want, &got);
        assert!(diff < 1e-6, "{what}: block sums differ by {diff}");
    }
}

/// Where kernels.cu's `write_parts` puts plane `p`'s part of activation (`tok`, `col`) of a
/// `(t, cols)` input, in the layout of kernels compiled with warpgroup MMAs (`wgmma`) or
/// without (`parts_at`, `parts_plane`, `staged_position` there).
fn part_index(wgmma: bool, (t, cols): (usize, usize), p: usize, tok: usize, col: usize) -> usize {
    let staged = |w: usize| 16 * (w >> 4) + 8 * (w & 1) + 2 * ((w >> 2) & 3) + ((w >> 1) & 1);
    if wgmma {
        let (tiles, tl) = (cols.div_ceil(PARTS_TILE), tok % PARTS_TILE);
        let c = (col & 32) + staged(col & 31);
        p * parts_plane(t, cols)
            + (tok / PARTS_TILE * tiles + col / PARTS_TILE) * PARTS_TILE * PARTS_TILE
            + 64 * (8 * (tl / 8) + c / 8)
            + 8 * (tl % 8)
            + c % 8
    } else {
        p * t * cols + tok * cols + (col & !31) + staged(col & 31)
    }
}

/// The CPU's `x · Wᵀ` for `t` token rows of `cols`, flattened.
fn cpu_product(cpu: &Matrix, x: &[f32], t: usize, cols: usize) -> Vec<f32> {
    cpu.forward(&Tensor::from_vec(x.to_vec(), (t, cols), &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_swiglu_of_each_format_matches_the_cpu_for_any_token_count() {
    let (stream, k) = gpu();
    // The second and third shapes' Q4_1 rows take the `_long` and `_longest` one-token
    // kernels (`RowLength`).
    for (n, (format, (rows, cols))) in [Format::Q4_1, Format::Q8_0, Format::F32]
        .into_iter()
        .flat_map(|format| {
            [
                (format, (67, 1088)),
                (format, (96, 1088)),
                (format, (35, 2080)),
                (format, (35, 4160)),
            ]
        })
        .enumerate()
    {
        let gate = random_weights(format, rows, cols, 30 + n as u64);
        let up = random_weights(format, rows, cols, 40 + n as u64);
        let gate_d = DeviceMatrix::upload(&stream, "gate", &[(&gate, rows)]).unwrap();
        let up_d = DeviceMatrix::upload(&stream, "up", &[(&up, rows)]).unwrap();
        let (gate, up) = (Matrix::new(gate, rows, cols), Matrix::new(up, rows, cols));
        for t in [1, 3, 9, 70].into_iter().filter(|&t| cols < 4000 || t < 9) {
            let x = random_activations(t * cols, 50 + t as u64);
            let (g, u) = (
                cpu_product(&gate, &x, t, cols),
                cpu_product(&up, &x, t, cols),
            );
            let want: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let xd = stream.clone_htod(&x).unwrap();
            // The one-pass kernels, and the pipelined ones (given parts).
            for pipelined in [false, true] {
                let mut y = stream.alloc_zeros::<f32>(t * rows).unwrap();
                let mut parts = pipelined.then(|| Parts::new(&stream, t, cols).unwrap());
                // Rows in whole column blocks can be split for a down projection on the way,
                // by the pipelined kernel only.
                let mut y_parts = Parts::new(&stream, t, rows).unwrap();
                let split_y = rows % 32 == 0;
                let none = &Fusion::NONE;
                let (parts, y_out) = (parts.as_mut(), split_y.then_some(&mut y_parts));
                swiglu(
                    &stream, &k, &gate_d, &up_d, &xd, &mut y, parts, y_out, t, none,
                )
                .unwrap();
                let what = format!("swiglu {format:?} {rows}x{cols} t={t} pipelined {pipelined}");
                let diff = rel_diff(&want, &stream.clone_dtoh(&y).unwrap());
                assert!(diff < 1e-5, "{what}: relative difference {diff}");
                let expected = pipelined && split_y && tensor_cores(format, t);
                let shape = (t, rows);
                check_producer_split(&stream, &k, &mut y_parts, &y, shape, expected, false, &what);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matrices_of_mixed_formats_are_stacked_as_f32() {
    let (stream, _) = gpu();
    let a = random_weights(Format::Q4_1, 8, 64, 1);
    let b = random_weights(Format::Q8_0, 4, 64, 2);
    let m = DeviceMatrix::upload(&stream, "test", &[(&a, 8), (&b, 4)]).unwrap();
    assert_eq!((m.format, m.rows, m.cols), (Format::F32, 12, 64));
    let mut want = dequantized(&a);
    want.extend(dequantized(&b));
    let got: Vec<f32> = stream
        .clone_dtoh(&m.quants)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(want, got);
    let odd = Weights::F32(vec![0.5; 3 * 20]);
    let err = DeviceMatrix::upload(&stream, "odd.weight", &[(&odd, 3)])
        .err()
        .unwrap();
    let err = err.to_string();
    assert!(
        err.contains("odd.weight") && err.contains("whole 32-weight blocks"),
        "{err}"
    );
}

/// The largest relative difference between the GPU's attention of `t` random queries at
/// `pos0..` and the CPU's, over a cache of `spare` random positions more than the queries reach,
/// with `heads` = (query heads, KV heads, head width).
fn attention_difference(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    pos0: usize,
    t: usize,
    spare: usize,
    heads: (usize, usize, usize),
) -> f32 {
    let (n_head, n_kv, hd) = heads;
    let cfg = LlamaConfig {
        n_layer: 1,
        n_embd: n_head * hd,
        n_ff: 32,
        n_head,
        n_kv_head: n_kv,
        head_dim: hd,
        rope_dim: hd,
        rope_base: 10_000.0,
        rms_eps: 1e-5,
        context_len: pos0 + t + spare,
        vocab_size: 16,
    };
    let end = pos0 + t + spare;
    let qkv_row = (n_head + 2 * n_kv) * hd;
    let qkv = random_activations(t * qkv_row, 3 + t as u64);
    // Keys and values as the GPU lays them out, [position][kv head][hd] ...
    let keys = random_activations(end * n_kv * hd, 4);
    let values = random_activations(end * n_kv * hd, 5);
    // ... and as the CPU does, [kv head][position][hd], in whole tiles of positions (the keys
    // then transposed in each tile by `key_tiles`).
    let capacity = end.next_multiple_of(model::KEY_BLOCK);
    let per_head = |buf: &[f32]| -> Vec<f32> {
        (0..n_kv)
            .flat_map(|h| (0..capacity).flat_map(move |p| (0..hd).map(move |e| (h, p, e))))
            .map(|(h, p, e)| {
                if p < end {
                    buf[(p * n_kv + h) * hd + e]
                } else {
                    0.0
                }
            })
            .collect()
    };
    // Positions past the queries' hold values no query may see.
    let q: Vec<f32> = (0..t)
        .flat_map(|tok| qkv[tok * qkv_row..tok * qkv_row + n_head * hd].to_vec())
        .collect();
    let mut want = vec![0f32; t * n_head * hd];
    let shape = AttentionShape {
        n_head,
        n_kv_head: n_kv,
        head_dim: hd,
        capacity,
    };
    model::attention(
        &q,
        &model::key_tiles(&per_head(&keys), hd),
        &per_head(&values),
        shape,
        pos0,
        crate::pool::global(),
        &mut want,
    );
    let (qkv_d, keys_d, values_d) = (
        stream.clone_htod(&qkv).unwrap(),
        stream.clone_htod(&keys).unwrap(),
        stream.clone_htod(&values).unwrap(),
    );
    let mut partial = stream
        .alloc_zeros::<f32>(partial_len(&cfg, t, pos0, end).max(1))
        .unwrap();
    let mut out = stream.alloc_zeros::<f32>(t * n_head * hd).unwrap();
    let pos_at = stream.clone_htod(&[pos0 as i32]).unwrap();
    // Twice, the output cleared between: a launch must leave nothing behind that the next
    // one depends on. One token goes through both decode kernels (clusters of 8 and of 16), each
    // correct at any position; a chunk through attention_combine, then (given parts, as a model
    // of pipelined matmuls gives them) attention_combine_split.
    let mut worst = 0f32;
    let mut parts = Parts::new(stream, t, n_head * hd).unwrap();
    for long in [false, true] {
        let split = long && t > TILED_ABOVE;
        stream.memset_zeros(&mut out).unwrap();
        attention(
            stream,
            k,
            &cfg,
            &qkv_d,
            &keys_d,
            &values_d,
            &mut partial,
            &mut out,
            split.then_some(&mut parts),
            &pos_at,
            pos0,
            t,
            end,
            long,
        )
        .unwrap();
        worst = worst.max(rel_diff(&want, &stream.clone_dtoh(&out).unwrap()));
        let what = format!("attention {heads:?} of {t} at {pos0}, split {split}");
        let expected = split && hd % 32 == 0;
        let shape = (t, n_head * hd);
        check_producer_split(stream, k, &mut parts, &out, shape, expected, true, &what);
    }
    worst
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_attention_matches_the_cpu_in_every_split_and_tile_shape() {
    let (stream, k) = gpu();
    // SmolLM2's group of three heads of 64 (tiles of 64 keys past 512 positions), the 1B's and
    // 8B's four of 128 (tiles of 32), the widest group `attention_decode` serves (8) with
    // either tile, narrow heads, and a group past the widest, which decodes through
    // `attention_split`.
    let shapes = [
        (6, 2, 64),
        (8, 2, 128),
        (16, 2, 128),
        (16, 2, 64),
        (8, 4, 32),
        (18, 2, 64),
    ];
    // One token in the first tile, in the first pass of a cluster (512 or 1,024 keys), at and
    // across its edges, and over several passes; chunks over one and several prefill splits, with
    // query tiles cut short and queries whose keys end inside a split.
    for (pos0, t) in [
        (0, 1),
        (1500, 1),
        (63, 1),
        (64, 1),
        (0, 37),
        (0, 300),
        (700, 45),
        (31, 1),
        (32, 1),
        (511, 1),
        (512, 1),
        (1023, 1),
        (1024, 1),
        (2100, 1),
    ] {
        for heads in shapes {
            let diff = attention_difference(&stream, &k, pos0, t, 0, heads);
            assert!(
                diff < 1e-5,
                "pos0 {pos0}, {t} tokens, heads {heads:?}: relative difference {diff}"
            );
        }
    }
    // One token early in a long cache: positions past it must stay out of the result.
    for (pos0, spare) in [(40, 500), (0, 100), (1100, 37)] {
        for heads in shapes {
            let diff = attention_difference(&stream, &k, pos0, 1, spare, heads);
            assert!(
                diff < 1e-5,
                "pos0 {pos0} in a cache of {}, heads {heads:?}: relative difference {diff}",
                pos0 + 1 + spare
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_model_matches_the_cpu_model_in_prefill_decode_and_rewind() {
    let view = tiny::view("llama", 64);
    // Chunks through the one-pass matmuls (the tiny model is narrower than
    // PIPELINE_FROM_EMBD), then through the pipelined ones.
    for pipelined in [false, true] {
        let mut gpu = CudaLlama::load(view, 0, pipelined).unwrap();
        model_matches_the_cpu_model(view, &mut gpu);
    }
}

/// Prefill, decode, a rewind, hidden states and logits of `gpu` against the CPU model of `view`.
fn model_matches_the_cpu_model(view: &'static ModelView, gpu: &mut CudaLlama) {
    let what = format!("pipelined {}", gpu.pipelined);
    let mut cpu = LlamaModel::from_gguf(view).unwrap();
    let prompt = [1u32, 5, 9, 2, 7, 3, 11, 4, 8, 13];
    let (mut a, mut b) = (Vec::new(), Vec::new());
    tensor_to_vec(&Transformer::forward(&mut cpu, &prompt, 0).unwrap(), &mut a).unwrap();
    tensor_to_vec(&gpu.forward(&prompt, 0).unwrap(), &mut b).unwrap();
    assert!(
        rel_diff(&a, &b) < 1e-4,
        "{what} prefill: {}",
        rel_diff(&a, &b)
    );
    for (k, token) in [4u32, 8, 15].into_iter().enumerate() {
        let pos = prompt.len() + k;
        tensor_to_vec(
            &Transformer::forward(&mut cpu, &[token], pos).unwrap(),
            &mut a,
        )
        .unwrap();
        tensor_to_vec(&gpu.forward(&[token], pos).unwrap(), &mut b).unwrap();
        assert!(
            rel_diff(&a, &b) < 1e-4,
            "{what} decode {k}: {}",
            rel_diff(&a, &b)
        );
    }
    // Rewinding reuses the cache from an earlier position, as scoring after generation does.
    tensor_to_vec(
        &Transformer::forward(&mut cpu, &prompt[..3], 0).unwrap(),
        &mut a,
    )
    .unwrap();
    tensor_to_vec(&gpu.forward(&prompt[..3], 0).unwrap(), &mut b).unwrap();
    assert!(
        rel_diff(&a, &b) < 1e-4,
        "{what} rewind: {}",
        rel_diff(&a, &b)
    );
    // Hidden states and the logits of several rows, as scoring takes them.
    let ha = cpu.forward_hidden(&prompt, 0).unwrap();
    let hb = gpu.forward_hidden(&prompt, 0).unwrap();
    tensor_to_vec(&ha, &mut a).unwrap();
    tensor_to_vec(&hb, &mut b).unwrap();
    assert!(
        rel_diff(&a, &b) < 1e-4,
        "{what} hidden: {}",
        rel_diff(&a, &b)
    );
    tensor_to_vec(&cpu.logits(&ha).unwrap(), &mut a).unwrap();
    tensor_to_vec(&gpu.logits(&hb).unwrap(), &mut b).unwrap();
    assert_eq!(a.len(), prompt.len() * tiny::VOCAB);
    assert!(
        rel_diff(&a, &b) < 1e-4,
        "{what} logits: {}",
        rel_diff(&a, &b)
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_scoring_and_generation_match_the_cpu_model() {
    let view = tiny::view("llama", 64);
    let mut cpu = LlamaModel::from_gguf(view).unwrap();
    let mut gpu = CudaLlama::from_gguf(view, 0).unwrap();
    let tokens = [1u32, 5, 9, 2, 7, 3, 11, 4];
    let a = crate::generate::score(&mut cpu, &tokens).unwrap();
    let b = crate::generate::score(&mut gpu, &tokens).unwrap();
    assert_eq!(a.len(), tokens.len() - 1);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.argmax, y.argmax);
        assert!((x.logprob - y.logprob).abs() < 1e-4, "{x:?} {y:?}");
    }
    // Greedy decoding: the GPU takes its argmax on the device, the CPU from its logits.
    let generated = |model: &mut dyn Transformer| {
        let mut out = Vec::new();
        crate::generate::generate(model, &tokens[..3], 6, |t| {
            out.extend_from_slice(t);
            true
        })
        .unwrap();
        out
    };
    let on_cpu = generated(&mut cpu);
    assert_eq!(on_cpu.len(), 6);
    assert_eq!(on_cpu, generated(&mut gpu));
    // A prompt longer than the CPU's chunk: the GPU prefills it in one pass, the CPU in two.
    let view = tiny::view("llama", 2 * crate::generate::PREFILL_CHUNK as u64);
    let (mut cpu, mut gpu) = (
        LlamaModel::from_gguf(view).unwrap(),
        CudaLlama::from_gguf(view, 0).unwrap(),
    );
    assert!(gpu.prefill_chunk() > crate::generate::PREFILL_CHUNK + 40);
    let prompt: Vec<u32> = (0..crate::generate::PREFILL_CHUNK as u32 + 40)
        .map(|i| (i * 7 + 3) % 16)
        .collect();
    let generated = |model: &mut dyn Transformer| {
        let mut out = Vec::new();
        crate::generate::generate(model, &prompt, 6, |t| {
            out.extend_from_slice(t);
            true
        })
        .unwrap();
        out
    };
    assert_eq!(generated(&mut cpu), generated(&mut gpu));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_cache_grows_past_a_step_and_keeps_its_contents() {
    let view = tiny::view("llama", 2 * KV_CACHE_STEP as u64);
    let mut grown = CudaLlama::from_gguf(view, 0).unwrap();
    let mut reserved = CudaLlama::from_gguf(view, 0).unwrap();
    reserved.reserve(2 * KV_CACHE_STEP).unwrap();
    let prompt: Vec<u32> = (0..KV_CACHE_STEP as u32 - 1)
        .map(|i| (i * 7 + 3) % 16)
        .collect();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    tensor_to_vec(&grown.forward(&prompt, 0).unwrap(), &mut a).unwrap();
    tensor_to_vec(&reserved.forward(&prompt, 0).unwrap(), &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(grown.capacity, KV_CACHE_STEP);
    for (k, token) in [3u32, 12].into_iter().enumerate() {
        let pos = prompt.len() + k;
        tensor_to_vec(&grown.forward(&[token], pos).unwrap(), &mut a).unwrap();
        tensor_to_vec(&reserved.forward(&[token], pos).unwrap(), &mut b).unwrap();
        assert_eq!(a, b, "token {k}");
    }
    assert_eq!(grown.capacity, 2 * KV_CACHE_STEP);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_bad_positions_and_tokens_are_errors() {
    let mut gpu = CudaLlama::from_gguf(tiny::view("llama", 8), 0).unwrap();
    assert!(matches!(gpu.forward(&[], 0), Err(ModelError::EmptyChunk)));
    assert!(matches!(
        gpu.forward(&[1], 3),
        Err(ModelError::PositionGap { .. })
    ));
    assert!(matches!(
        gpu.forward(&[1; 9], 0),
        Err(ModelError::ContextOverflow { .. })
    ));
    assert!(matches!(
        gpu.forward(&[99], 0),
        Err(ModelError::TokenOutOfRange { .. })
    ));
    // A bad request leaves the model usable.
    assert!(gpu.forward(&[1, 2], 0).is_ok());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_argmax_takes_the_first_maximum_and_never_a_nan() {
    let (stream, k) = gpu();
    let run = |v: &[f32]| -> u32 {
        let d = stream.clone_htod(v).unwrap();
        let mut best = stream.alloc_zeros::<u32>(1).unwrap();
        let n = v.len() as i32;
        let none = 0u64;
        let mut launch = stream.launch_builder(&k.argmax);
        launch.arg(&d).arg(&n).arg(&mut best).arg(&none).arg(&none);
        unsafe { launch.launch(argmax_config()) }.unwrap();
        stream.clone_dtoh(&best).unwrap()[0]
    };
    let mut v = random_activations(50_000, 9);
    let want = crate::generate::argmax(&v);
    assert_eq!(run(&v), want);
    // Ties go to the first; NaNs are skipped wherever they are.
    v[40_000] = 5.0;
    v[1_234] = 5.0;
    v[0] = f32::NAN;
    v[49_999] = f32::NAN;
    assert_eq!(run(&v), 1_234);
    assert_eq!(crate::generate::argmax(&v), 1_234);
    // Ties inside one float4, and inside the last n % 4 values (read one by one).
    v[1_235] = 6.0;
    v[1_234] = 6.0;
    assert_eq!(run(&v), 1_234);
    let mut tail = random_activations(50_003, 10);
    tail[50_001] = 8.0;
    tail[50_002] = 8.0;
    assert_eq!(run(&tail), 50_001);
    // Not 16-byte aligned (a view from the second value): every value is read one by one.
    let d = stream.clone_htod(&tail).unwrap();
    let view = d.slice(1..);
    let mut best = stream.alloc_zeros::<u32>(1).unwrap();
    let (n, none) = (tail.len() as i32 - 1, 0u64);
    let mut launch = stream.launch_builder(&k.argmax);
    launch
        .arg(&view)
        .arg(&n)
        .arg(&mut best)
        .arg(&none)
        .arg(&none);
    unsafe { launch.launch(argmax_config()) }.unwrap();
    assert_eq!(stream.clone_dtoh(&best).unwrap(), [50_000]);
    // Nothing above minus infinity: 0, as on the CPU.
    assert_eq!(run(&[f32::NAN, f32::NEG_INFINITY, f32::NAN]), 0);
    assert_eq!(run(&[-1.0]), 0);
    // Chained (a decode step's end): the choice is also the next input, the position moves on.
    let d = stream.clone_htod(&v).unwrap();
    let mut best = stream.alloc_zeros::<u32>(1).unwrap();
    let ids = stream.clone_htod(&[7u32, 9]).unwrap();
    let pos_at = stream.clone_htod(&[41i32]).unwrap();
    let n = v.len() as i32;
    let (next_id, at) = (address(&stream, &ids, 0), address(&stream, &pos_at, 0));
    let mut launch = stream.launch_builder(&k.argmax);
    launch.arg(&d).arg(&n).arg(&mut best).arg(&next_id).arg(&at);
    unsafe { launch.launch(argmax_config()) }.unwrap();
    assert_eq!(stream.clone_dtoh(&best).unwrap(), [1_234]);
    assert_eq!(stream.clone_dtoh(&ids).unwrap(), [1_234, 9]);
    assert_eq!(stream.clone_dtoh(&pos_at).unwrap(), [42]);
}

fn argmax_config() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (ARGMAX_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `decode` queues each step before the host has read the last one's token, yet chooses what
/// `forward_greedy` chooses step by step (and the CPU model); stopped early, it says how many it
/// emitted and leaves a cache the next request can rewind.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_decode_runs_ahead_yet_chooses_as_step_by_step_greedy() {
    let view = tiny::view("llama", 64);
    let mut cpu = LlamaModel::from_gguf(view).unwrap();
    let mut gpu = CudaLlama::from_gguf(view, 0).unwrap();
    let prompt = [1u32, 5, 9, 2, 7];
    let n = 40;
    let mut scratch = Vec::new();
    let first = gpu.forward_greedy(&prompt, 0, &mut scratch).unwrap();
    let mut stepwise = Vec::new();
    let (mut token, mut pos) = (first, prompt.len());
    for _ in 0..n {
        token = gpu.forward_greedy(&[token], pos, &mut scratch).unwrap();
        stepwise.push(token);
        pos += 1;
    }
    let mut ahead = Vec::new();
    assert_eq!(gpu.forward_greedy(&prompt, 0, &mut scratch).unwrap(), first);
    let emitted = gpu
        .decode(first, prompt.len(), n, &mut |t| {
            ahead.push(t);
            true
        })
        .unwrap();
    assert_eq!(emitted, n);
    assert_eq!(ahead, stepwise);
    let mut on_cpu = Vec::new();
    assert_eq!(cpu.forward_greedy(&prompt, 0, &mut scratch).unwrap(), first);
    cpu.decode(first, prompt.len(), n, &mut |t| {
        on_cpu.push(t);
        true
    })
    .unwrap();
    assert_eq!(on_cpu, stepwise);
    // Stopped after three tokens: three emitted, and the model serves the next request.
    let mut seen = Vec::new();
    assert_eq!(gpu.forward_greedy(&prompt, 0, &mut scratch).unwrap(), first);
    let emitted = gpu
        .decode(first, prompt.len(), n, &mut |t| {
            seen.push(t);
            seen.len() < 3
        })
        .unwrap();
    assert_eq!(emitted, 3);
    assert_eq!(seen, stepwise[..3]);
    let again = gpu.forward_greedy(&prompt[..2], 0, &mut scratch).unwrap();
    assert_eq!(
        again,
        cpu.forward_greedy(&prompt[..2], 0, &mut scratch).unwrap()
    );
    // Past the context (64): an error before anything runs, and the model still serves.
    let long: Vec<u32> = (0..60).map(|i| (i * 5 + 1) % tiny::VOCAB as u32).collect();
    let next = gpu.forward_greedy(&long, 0, &mut scratch).unwrap();
    let mut none = Vec::new();
    assert!(matches!(
        gpu.decode(next, 60, 5, &mut |t| {
            none.push(t);
            true
        }),
        Err(ModelError::ContextOverflow { end: 65, .. })
    ));
    assert!(none.is_empty());
    assert_eq!(gpu.forward_greedy(&prompt, 0, &mut scratch).unwrap(), first);
}

/// A request whose steps cross `DECODE_LONG_FROM` switches graphs (attention in clusters of 8,
/// then of 16) between two queued steps, and chooses what the CPU model chooses throughout.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_decode_across_the_long_context_switch_matches_the_cpu() {
    let view = tiny::view("llama", DECODE_LONG_FROM as u64 + 64);
    let mut cpu = LlamaModel::from_gguf(view).unwrap();
    let mut gpu = CudaLlama::from_gguf(view, 0).unwrap();
    let start = DECODE_LONG_FROM - 20;
    let prompt: Vec<u32> = (0..start as u32)
        .map(|i| (i * 31 + 3) % tiny::VOCAB as u32)
        .collect();
    let mut scratch = Vec::new();
    let first = gpu.forward_greedy(&prompt, 0, &mut scratch).unwrap();
    assert_eq!(cpu.forward_greedy(&prompt, 0, &mut scratch).unwrap(), first);
    let (mut on_gpu, mut on_cpu) = (Vec::new(), Vec::new());
    let n = 40;
    gpu.decode(first, start, n, &mut |t| {
        on_gpu.push(t);
        true
    })
    .unwrap();
    cpu.decode(first, start, n, &mut |t| {
        on_cpu.push(t);
        true
    })
    .unwrap();
    assert_eq!(on_gpu.len(), n);
    assert_eq!(on_gpu, on_cpu);
    assert!(gpu.graphs.iter().all(Option::is_some), "both graphs taken");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_rmsnorm_of_a_chunk_matches_the_cpu_and_splits_it_for_the_tensor_cores() {
    let (stream, k) = gpu();
    let d = 576;
    let cfg = LlamaConfig {
        n_layer: 1,
        n_embd: d,
        n_ff: 32,
        n_head: 9,
        n_kv_head: 3,
        head_dim: 64,
        rope_dim: 64,
        rope_base: 10_000.0,
        rms_eps: 1e-5,
        context_len: 256,
        vocab_size: 16,
    };
    let g: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 / 6.0).collect();
    let g_d = stream.clone_htod(&g).unwrap();
    // `rmsnorm`, and for a chunk also `rmsnorm_split` (given parts).
    for (t, split) in [(3, false), (70, false), (70, true)] {
        let x = random_activations(t * d, 80 + t as u64);
        let mut want = vec![0f32; t * d];
        for (row, out) in x.chunks_exact(d).zip(want.chunks_exact_mut(d)) {
            model::rms_norm_row(row, &g, cfg.rms_eps, out);
        }
        let x_d = stream.clone_htod(&x).unwrap();
        let mut out = stream.alloc_zeros::<f32>(t * d).unwrap();
        let mut parts = Parts::new(&stream, t, d).unwrap();
        let given = split.then_some(&mut parts);
        let (x_v, mut out_v) = (x_d.as_view(), out.as_view_mut());
        rmsnorm(&stream, &k, &x_v, &g_d, &mut out_v, given, t, &cfg).unwrap();
        let what = format!("rmsnorm of {t} rows, split {split}");
        let diff = rel_diff(&want, &stream.clone_dtoh(&out).unwrap());
        assert!(diff < 1e-6, "{what}: relative difference {diff}");
        check_producer_split(&stream, &k, &mut parts, &out, (t, d), split, true, &what);
        if split {
            // A split marked ready for `out` is not taken for another input of its shape.
            let split = Some(&mut parts);
            let (x_v, mut out_v) = (x_d.as_view(), out.as_view_mut());
            rmsnorm(&stream, &k, &x_v, &g_d, &mut out_v, split, t, &cfg).unwrap();
            parts.prepare(&stream, &k, &x_d.as_view(), t, d).unwrap();
            let what = format!("rmsnorm of {t} rows, then a matmul of its input");
            assert_holds_split(&stream, &k, &parts, &x_d, (t, d), true, &what);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_fused_rmsnorm_matches_a_norm_then_a_matmul() {
    let (stream, k) = gpu();
    let (d, inner, rows, eps) = (160, 96, 131, 1e-5);
    for (n, format) in [Format::Q4_1, Format::Q8_0].into_iter().enumerate() {
        let seed = 60 + 10 * n as u64;
        // The writer: x += W1 a (a residual add), leaving x ⊙ g and the sum of squares of x.
        let w1 = random_weights(format, d, inner, seed);
        let w1_d = DeviceMatrix::upload(&stream, "w1", &[(&w1, d)]).unwrap();
        let w1 = Matrix::new(w1, d, inner);
        let a = random_activations(inner, seed + 1);
        let x0 = random_activations(d, seed + 2);
        let g: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 / 6.0).collect();
        let mut x_new = cpu_product(&w1, &a, 1, inner);
        x_new.iter_mut().zip(&x0).for_each(|(v, x)| *v += x);
        let mut normed = vec![0f32; d];
        model::rms_norm_row(&x_new, &g, eps, &mut normed);

        let (a_d, g_d) = (
            stream.clone_htod(&a).unwrap(),
            stream.clone_htod(&g).unwrap(),
        );
        let mut x_d = stream.clone_htod(&x0).unwrap();
        let xg = stream.alloc_zeros::<f32>(d).unwrap();
        let sums = stream.alloc_zeros::<f64>(1).unwrap();
        let writing = Fusion {
            next_g: address(&stream, &g_d, 0),
            xg: address(&stream, &xg, 0),
            norm_out: address(&stream, &sums, 0),
            ..Fusion::NONE
        };
        matmul(
            &stream,
            &k,
            &w1_d,
            &a_d.as_view(),
            &mut x_d,
            None,
            1,
            true,
            &writing,
        )
        .unwrap();
        let x_gpu = stream.clone_dtoh(&x_d).unwrap();
        let diff = rel_diff(&x_new, &x_gpu);
        assert!(diff < 1e-5, "{format:?} residual add: {diff}");
        // The sum of the squares of the x it wrote (f64 sums of f32 squares: exact but for order).
        let squares: f64 = x_gpu.iter().map(|&v| v as f64 * v as f64).sum();
        let got = stream.clone_dtoh(&sums).unwrap()[0];
        assert!(
            (got - squares).abs() <= 1e-9 * squares,
            "{format:?}: {got} vs {squares}"
        );

        // The readers: W2 (x / rms(x) ⊙ g) and the SwiGLU of it, from x ⊙ g and the sum.
        let reading = Fusion {
            norm_in: address(&stream, &sums, 0),
            eps,
            ..Fusion::NONE
        };
        let w2 = random_weights(format, rows, d, seed + 3);
        let w2_d = DeviceMatrix::upload(&stream, "w2", &[(&w2, rows)]).unwrap();
        let want = cpu_product(&Matrix::new(w2, rows, d), &normed, 1, d);
        let mut y = stream.alloc_zeros::<f32>(rows).unwrap();
        let (st, x) = (&stream, xg.as_view());
        matmul(st, &k, &w2_d, &x, &mut y, None, 1, false, &reading).unwrap();
        let diff = rel_diff(&want, &stream.clone_dtoh(&y).unwrap());
        assert!(diff < 1e-5, "{format:?} normed matmul: {diff}");

        let (gate, up) = (
            random_weights(format, rows, d, seed + 4),
            random_weights(format, rows, d, seed + 5),
        );
        let gate_d = DeviceMatrix::upload(&stream, "gate", &[(&gate, rows)]).unwrap();
        let up_d = DeviceMatrix::upload(&stream, "up", &[(&up, rows)]).unwrap();
        let gv = cpu_product(&Matrix::new(gate, rows, d), &normed, 1, d);
        let uv = cpu_product(&Matrix::new(up, rows, d), &normed, 1, d);
        let want: Vec<f32> = gv
            .iter()
            .zip(&uv)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        swiglu(
            &stream, &k, &gate_d, &up_d, &xg, &mut y, None, None, 1, &reading,
        )
        .unwrap();
        let diff = rel_diff(&want, &stream.clone_dtoh(&y).unwrap());
        assert!(diff < 1e-5, "{format:?} normed SwiGLU: {diff}");

        // A kernel without a one-token form refuses a fusion instead of ignoring it.
        let err = matmul(st, &k, &w2_d, &x, &mut y, None, 2, false, &reading).unwrap_err();
        assert!(
            err.to_string().contains(&format!("{format:?} matrix")),
            "{err}"
        );
    }
}

/// The warpgroup-MMA matmuls (one block an SM) split their columns so that the grid's last
/// wave is nearly full, with the fewest splits that do so. Needs neither a GPU nor libnvrtc.
#[test]
fn kernels_cu_wgmma_matmul_splits_its_columns_to_fill_its_last_wave() {
    // The 8B at 512 tokens (256-row tiles, 8 token tiles) on 132 SMs: QKV's 24 row tiles
    // (192, 1.45 waves) in two splits (384 blocks, 97% full); wo and down (128 tiles, one
    // wave 97% full) in one.
    assert_eq!(wave_splits(192, 128, 132), 2);
    assert_eq!(wave_splits(128, 128, 132), 1);
    assert_eq!(wave_splits(128, 448, 132), 1);
    // The 1B: QKV's 12 row tiles (96) in four (384), wo's and down's 8 (64) in two (128).
    assert_eq!(wave_splits(96, 64, 132), 4);
    assert_eq!(wave_splits(64, 64, 132), 2);
    assert_eq!(wave_splits(64, 256, 132), 2);
    // Too few columns for two splits of SPLIT_MIN_BLOCKS; no tiles; no SMs known.
    assert_eq!(wave_splits(1, 3, 132), 1);
    assert_eq!(wave_splits(0, 64, 132), 1);
    assert_eq!(wave_splits(64, 64, 0), 1);
    for tiles in 1..600u32 {
        for col_blocks in 1..300usize {
            let splits = wave_splits(tiles, col_blocks, 132);
            assert!((1..=WAVE_SPLITS_MAX).contains(&splits));
            assert!(splits == 1 || splits as usize * SPLIT_MIN_BLOCKS <= col_blocks);
            // No other allowed split count fills the last wave by more than a point.
            let fill = |s: u32| {
                let blocks = tiles * s;
                blocks as f64 / (blocks.div_ceil(132) * 132) as f64
            };
            let most = ((col_blocks / SPLIT_MIN_BLOCKS).max(1) as u32).min(WAVE_SPLITS_MAX);
            for other in 1..=most {
                assert!(
                    fill(other) <= fill(splits) + 0.011,
                    "{tiles} tiles, {col_blocks}"
                );
            }
        }
    }
}

/// The launch sites size grids and blocks with constants that kernels.cu `#define`s again for
/// its kernels: each pair must agree, or a kernel indexes past what its launch covers (a
/// cluster size that differs, say, makes `attention_decode` take KV heads that do not exist).
/// Needs neither a GPU nor libnvrtc; CI runs it with the NVRTC tests.
#[test]
fn kernels_cu_matmul_splits_its_columns_only_where_tiles_leave_sms_idle() {
    // SmolLM2 (576 wide, FFN 1,536) on 132 SMs: 88 tokens are 2 token tiles, so wo has 10
    // tiles of 18 column blocks, down 10 of 48, QKV 16 of 18.
    assert_eq!(column_splits(10, 18, 132), 9);
    assert_eq!(column_splits(10, 48, 132), 14);
    assert_eq!(column_splits(16, 18, 132), 9);
    // The 1B's wo at 512 tokens: 128 tiles, two splits; SmolLM2's long prompt fills the SMs.
    assert_eq!(column_splits(128, 64, 132), 2);
    assert_eq!(column_splits(135, 18, 132), 1);
    // Too few columns for two splits of SPLIT_MIN_BLOCKS.
    assert_eq!(column_splits(1, 3, 132), 1);
    for tiles in 0..300u32 {
        for col_blocks in 1..100usize {
            let splits = column_splits(tiles, col_blocks, 132);
            assert!(splits >= 1);
            if splits > 1 {
                assert!(splits as usize * SPLIT_MIN_BLOCKS <= col_blocks);
                // Covers the SMs at most once over: no split that would only queue.
                assert!(tiles * (splits - 1) < 132, "{tiles} tiles, {splits} splits");
            }
        }
    }
}

/// Split activations in the warpgroup-MMA layout (tiles of 64 tokens by 64 columns, each a
/// contiguous run a bulk copy stages) give every activation of a chunk its own place in its
/// plane, within the buffers [`Parts`] allocates, and each tile's 4,096 places to the
/// activations of that tile: a ragged chunk (tokens or columns not whole tiles) included.
#[test]
fn kernels_cu_parts_tiles_hold_every_activation_once() {
    for (t, cols) in [(1, 32), (64, 64), (65, 96), (512, 2048), (130, 4096 + 32)] {
        let plane = parts_plane(t, cols);
        assert!(plane >= t * cols && plane.is_multiple_of(PARTS_TILE * PARTS_TILE));
        let mut seen = vec![false; 3 * plane];
        for p in 0..3 {
            for tok in 0..t {
                for col in 0..cols {
                    let at = part_index(true, (t, cols), p, tok, col);
                    assert!(at < 3 * plane, "{t}x{cols}: ({p}, {tok}, {col}) at {at}");
                    assert!(!seen[at], "{t}x{cols}: ({p}, {tok}, {col}) shares {at}");
                    seen[at] = true;
                    let tile = (tok / PARTS_TILE) * cols.div_ceil(PARTS_TILE) + col / PARTS_TILE;
                    assert_eq!((at - p * plane) / (PARTS_TILE * PARTS_TILE), tile);
                }
            }
        }
    }
}

/// The tensor-core matmul's pipeline is sized so that its blocks fit an SM as their
/// `__launch_bounds__` say (`MMA_PIPE_MIN_BLOCKS`: two of the mma.sync block, one of the
/// warpgroup-MMA block): on sm_90 an SM has 228 KB of shared memory and a block takes 1 KB
/// more than it asks for. More stages or wider steps than fit would cut the resident warps
/// without any error.
#[test]
fn kernels_cu_matmul_pipeline_leaves_room_for_two_blocks_an_sm() {
    // The mma.sync block, two an SM; the warpgroup-MMA block (512 threads) is one an SM.
    for (wgmma, blocks) in [(false, 2), (true, 1)] {
        let block = PipeBlock::of(wgmma);
        assert_eq!(block.rows, block.threads / 2);
        for format in [Format::Q4_1, Format::Q8_0] {
            let bytes = mma_shared_bytes(format, block);
            assert!(
                blocks * (bytes + 1024) <= 228 * 1024,
                "{format:?}, wgmma {wgmma}: {bytes} bytes a block"
            );
            // Each stage's regions are whole 16-byte copies (kernels.cu's `MmaStage`).
            assert_eq!(bytes % 16, 0, "{format:?}");
        }
    }
    assert!(takes_wgmma("sm_90", true));
    assert!(!takes_wgmma("sm_90", false) && !takes_wgmma("sm_100", true));
}

#[test]
fn kernels_cu_defines_match_the_launch_constants() {
    let define = |name: &str| -> usize {
        let line = SOURCE
            .lines()
            .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
            .unwrap_or_else(|| panic!("kernels.cu has no #define {name}"));
        let value = line.split_whitespace().nth(2).unwrap_or_default();
        value
            .parse()
            .unwrap_or_else(|_| panic!("kernels.cu: #define {name} is not a number: {line}"))
    };
    for (name, value) in [
        ("TOKEN_TILE", TOKEN_TILE as usize),
        ("ROW_WARPS", ROW_WARPS as usize),
        ("TILE_ROWS", TILE_ROWS as usize),
        ("TILE_TOKENS", TILE_TOKENS as usize),
        ("MMA_ROWS", MMA_ROWS as usize),
        ("MMA_ROWS_GATED", MMA_ROWS_GATED as usize),
        ("MMA_TOKENS", MMA_TOKENS as usize),
        ("MMA_THREADS", MMA_THREADS as usize),
        ("MMA_PIPE_THREADS_WG", MMA_PIPE_THREADS_WG as usize),
        ("PARTS_TILE", PARTS_TILE),
        ("MMA_KB", MMA_KB as usize),
        ("MMA_STAGES_Q4_1", MMA_STAGES_Q4_1 as usize),
        ("MMA_STAGES_Q8_0", MMA_STAGES_Q8_0 as usize),
        ("VEC_WARPS", VEC_WARPS as usize),
        ("Q4_SPLIT", Q4_SPLIT as usize),
        ("Q4_ROWS_LONG", Q4_ROWS_LONG as usize),
        ("Q4_SPLIT_LONGEST", Q4_SPLIT_LONGEST as usize),
        ("Q8_ROWS", Q8_ROWS as usize),
        ("ATT_THREADS", ATT_THREADS as usize),
        ("PD", ATT_LANE_DIMS),
        ("ATT_HD_MAX", ATT_HD_MAX),
        ("DEC_THREADS", DECODE_THREADS as usize),
        ("GROUP_MAX", DECODE_GROUP_MAX),
        ("DEC_CLUSTER", DECODE_CLUSTER as usize),
        ("DEC_CLUSTER_SHORT", DECODE_CLUSTER_SHORT as usize),
        ("ARGMAX_THREADS", ARGMAX_THREADS as usize),
    ] {
        assert_eq!(
            define(name),
            value,
            "kernels.cu's {name} against the launch side's"
        );
    }
    // attention_split's lanes a (query, head): what the launch side computes is the D the
    // kernel picks by the head width (hd <= PD: 1, <= 2 PD: 2, else 4).
    for (hd, lanes) in [(8, 1), (32, 1), (40, 2), (64, 2), (72, 4), (128, 4)] {
        assert_eq!(att_lanes(hd), lanes, "head width {hd}");
    }
    // attention_decode takes 64-key tiles from DEC_CLUSTER * DK on, where decode switches to it.
    assert_eq!(define("DEC_CLUSTER") * define("DK"), DECODE_LONG_FROM);
}

/// What CI can check without a GPU: kernels.cu compiles with NVRTC for the H200's architecture,
/// and every kernel it declares is in the PTX. `.ci/run` fetches libnvrtc from PyPI for this.
#[test]
#[ignore = "needs libnvrtc (CI fetches it from PyPI; a GPU machine has it)"]
fn nvrtc_compiles_every_kernel_of_kernels_cu() {
    let arch = arch_name(9, 0);
    assert_eq!(arch, "sm_90");
    // A second load on the same generation reuses the name instead of leaking another.
    assert!(std::ptr::eq(arch, arch_name(9, 0)));
    let cubin = Kernels::cubin(arch, LongRows::ALL, true).unwrap();
    assert_eq!(
        cubin.get(..4),
        Some(&b"\x7fELF"[..]),
        "a cubin is an ELF file"
    );
    let declared: Vec<&str> = SOURCE
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|mut rest| {
            // Attributes such as `__cluster_dims__(16, 1, 1)` come before the name.
            while rest.starts_with("__") {
                rest = rest[rest.find(')')? + 1..].trim_start();
            }
            rest.split('(').next()
        })
        .collect();
    assert!(declared.len() >= 20, "kernels found: {declared:?}");
    // The kernel's symbol, its name between two NULs in the string table.
    let has = |cubin: &[u8], name: &str| {
        let symbol = format!("\0{name}\0");
        cubin.windows(symbol.len()).any(|w| w == symbol.as_bytes())
    };
    for name in &declared {
        assert!(has(&cubin, name), "{name} is missing from the cubin");
    }
    // A model's own set: the long-row kernels only of the classes asked for, the pipelined
    // matmul and its feeders only for a pipelined model (each compile below is without them),
    // the rest always.
    let pipelined = [
        "split_parts",
        "mma_pipe_q4_1",
        "mma_pipe_q8_0",
        "mma_pipe_swiglu_q4_1",
        "mma_pipe_swiglu_q8_0",
        "rmsnorm_split",
        "attention_combine_split",
    ];
    // On sm_90 the pipelined matmuls are warpgroup MMAs (compiled for sm_90a); any other
    // architecture takes their mma.sync form, which no lent GPU runs: it must still compile
    // (here for sm_100).
    let mma_sync = Kernels::cubin("sm_100", LongRows::ALL, true).unwrap();
    for name in pipelined {
        assert!(
            has(&mma_sync, name),
            "{name} is missing from sm_100's cubin"
        );
    }
    let long = [
        "matvec_q4_1_long",
        "qkv_vec_q4_1_long",
        "swiglu_vec_q4_1_long",
    ];
    let longest = long.map(|name| format!("{name}est"));
    for (long_rows, want_long, want_longest) in [
        (LongRows::default(), false, false),
        (
            LongRows {
                long: true,
                longest: false,
            },
            true,
            false,
        ),
        (
            LongRows {
                long: false,
                longest: true,
            },
            false,
            true,
        ),
    ] {
        let cubin = Kernels::cubin(arch, long_rows, false).unwrap();
        for name in &declared {
            let want = if pipelined.contains(name) {
                false
            } else if long.contains(name) {
                want_long
            } else if longest.iter().any(|l| l == name) {
                want_longest
            } else {
                true
            };
            assert_eq!(has(&cubin, name), want, "{name} with {long_rows:?}");
        }
    }
}

/// The long-row classes kernels.cu is compiled with are those of the model's Q4_1 matrices
/// (GGUF dims: a row's length first), and a class not compiled falls back to the short
/// kernels, which take rows of any length.
#[test]
fn a_model_compiles_the_long_row_kernels_of_its_own_matrices() {
    let tensor = |ggml_type: GgmlType, dims: &[u64]| plugin_api::TensorInfo {
        name: "t".into(),
        ggml_type: ggml_type.id(),
        dims: dims.to_vec().into(),
        offset: 0,
        size: 0,
    };
    let of = |tensors: &[plugin_api::TensorInfo]| LongRows::of_tensors(tensors.iter());
    // SmolLM2: rows of 576 and 1,536; the Q8_0 embedding, the norms and a tensor that is not
    // a matrix (one dimension, however long) do not count.
    let smollm2 = [
        tensor(GgmlType::Q4_1, &[576, 1536]),
        tensor(GgmlType::Q4_1, &[1536, 576]),
        tensor(GgmlType::Q8_0, &[576, 49152]),
        tensor(GgmlType::F32, &[4096]),
        tensor(GgmlType::Q4_1, &[4096]),
        tensor(GgmlType::Q8_0, &[8192, 64]),
    ];
    assert_eq!(of(&smollm2), LongRows::default());
    // The 1B: rows of 2,048 and its down's 8,192.
    let one_b = [
        tensor(GgmlType::Q4_1, &[2048, 8192]),
        tensor(GgmlType::Q4_1, &[8192, 2048]),
    ];
    assert_eq!(of(&one_b), LongRows::ALL);
    // The 8B: every row 4,096 or more.
    let eight_b = [
        tensor(GgmlType::Q4_1, &[4096, 14336]),
        tensor(GgmlType::Q4_1, &[14336, 4096]),
    ];
    let longest_only = LongRows {
        long: false,
        longest: true,
    };
    assert_eq!(of(&eight_b), longest_only);
    assert_eq!(of(&one_b[..1]).defines().collect::<Vec<_>>(), ["LONG_ROWS"]);
    assert_eq!(
        LongRows::ALL.defines().collect::<Vec<_>>(),
        ["LONG_ROWS", "LONGEST_ROWS"]
    );
    // Without its kernels a class takes the short ones.
    assert_eq!(RowLength::Long.within(longest_only), RowLength::Short);
    assert_eq!(RowLength::Longest.within(longest_only), RowLength::Longest);
    assert_eq!(
        RowLength::Longest.within(LongRows::default()),
        RowLength::Short
    );
    assert_eq!(RowLength::Long.within(LongRows::ALL), RowLength::Long);
    assert_eq!(RowLength::Short.within(LongRows::ALL), RowLength::Short);
}

/// The one-token kernels by row length: SmolLM2's Q4_1 rows (576 and 1,536 columns) keep the
/// short kernels, the 1B's rows of 2,048 take the `_long` ones, and rows of 4,096 or more (every
/// 8B matrix, the 1B's down) the `_longest`; Q8_0 has only the short ones.
#[test]
fn the_one_token_kernels_follow_the_row_length() {
    for (cols, want) in [
        (576, RowLength::Short),
        (1536, RowLength::Short),
        (2048, RowLength::Long),
        (4095, RowLength::Long),
        (4096, RowLength::Longest),
        (8192, RowLength::Longest),
        (14336, RowLength::Longest),
    ] {
        assert_eq!(RowLength::of(Format::Q4_1, cols), want, "Q4_1 {cols}");
        assert_eq!(
            RowLength::of(Format::Q8_0, cols),
            RowLength::Short,
            "Q8_0 {cols}"
        );
    }
    let blocks = |length| vec_config(9, Format::Q4_1, length).grid_dim.0;
    assert_eq!(blocks(RowLength::Short), 5, "2 rows a block");
    assert_eq!(blocks(RowLength::Long), 3, "4 rows a block");
    assert_eq!(blocks(RowLength::Longest), 5, "2 rows a block");
}

/// The decode step's QKV matvec with RoPE and the cache write in its epilogue stores exactly
/// what the matvec followed by `rope_kv` stores: the rotated q, and k and v in the caches at the
/// token's position, for a full and a partial rotation, and for rows long enough for the
/// `_long` Q4_1 kernel.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_qkv_rope_epilogue_matches_the_matvec_then_rope_kv() {
    let (stream, k) = gpu();
    let (n_head, n_kv, hd, positions, pos) = (4usize, 2usize, 16usize, 8usize, 5usize);
    let rows = (n_head + 2 * n_kv) * hd;
    for (n, (format, rope_half, d)) in [
        (Format::Q4_1, hd / 2, 96),
        (Format::Q8_0, hd / 2 - 2, 96),
        (Format::Q4_1, hd / 2 - 2, LONG_ROW_COLS),
        (Format::Q4_1, hd / 2, LONGEST_ROW_COLS),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 90 + 10 * n as u64;
        let w = random_weights(format, rows, d, seed);
        let w_d = DeviceMatrix::upload(&stream, "qkv", &[(&w, rows)]).unwrap();
        let xg = stream.clone_htod(&random_activations(d, seed + 1)).unwrap();
        let sums = stream.clone_htod(&[37.5f64]).unwrap();
        let cos = stream
            .clone_htod(&random_activations(positions * rope_half, seed + 2))
            .unwrap();
        let sin = stream
            .clone_htod(&random_activations(positions * rope_half, seed + 3))
            .unwrap();
        let pos_at = stream.clone_htod(&[pos as i32]).unwrap();
        let reading = Fusion {
            norm_in: address(&stream, &sums, 0),
            eps: 1e-5,
            ..Fusion::NONE
        };
        let cache = || stream.alloc_zeros::<f32>(positions * n_kv * hd).unwrap();
        let run = |fused: bool| {
            let (keys, values) = (cache(), cache());
            let mut qkv = stream.alloc_zeros::<f32>(rows).unwrap();
            let rope = RopeArgs {
                cos: address(&stream, &cos, 0),
                sin: address(&stream, &sin, 0),
                keys: address(&stream, &keys, 0),
                values: address(&stream, &values, 0),
                pos_at: address(&stream, &pos_at, 0),
                n_head: n_head as i32,
                n_kv: n_kv as i32,
                head_dim: hd as i32,
                rope_half: rope_half as i32,
            };
            if fused {
                qkv_rope(&stream, &k, &w_d, &xg, &mut qkv, &reading, &rope).unwrap();
            } else {
                let x = xg.as_view();
                matmul(&stream, &k, &w_d, &x, &mut qkv, None, 1, false, &reading).unwrap();
                rope_kv(&stream, &k, &mut qkv, &rope, 1).unwrap();
            }
            let mut q = stream.clone_dtoh(&qkv).unwrap();
            q.truncate(n_head * hd);
            (
                q,
                stream.clone_dtoh(&keys).unwrap(),
                stream.clone_dtoh(&values).unwrap(),
            )
        };
        let (want, got) = (run(false), run(true));
        assert!(
            want.1.iter().any(|&v| v != 0.0),
            "{format:?} d={d}: no key written"
        );
        assert!(
            want.2.iter().any(|&v| v != 0.0),
            "{format:?} d={d}: no value written"
        );
        assert_eq!(want.0, got.0, "{format:?} d={d}: rotated q");
        assert_eq!(want.1, got.1, "{format:?} d={d}: key cache");
        assert_eq!(want.2, got.2, "{format:?} d={d}: value cache");
    }
}

/// A microbenchmark, not a check of the model: the one-token Q4_1 matvec of kernels.cu beside
/// the candidates of `matvec_candidates.cu`, on SmolLM2's and the 8B shape's matrices, each
/// read from memory (copies in turn, more than the L2 cache holds). Prints microseconds and
/// GB/s a matrix; asserts only that every candidate computes what kernels.cu does (a wrong one
/// is marked WRONG in its line and fails the test after the whole table). Run it on
/// the GPU machine with `--ignored bench_matvec --nocapture`.
#[test]
#[ignore = "needs a CUDA GPU; a microbenchmark (--nocapture shows its table)"]
fn bench_matvec_candidates() {
    let (stream, k) = gpu();
    let ctx = stream.context();
    let (major, minor) = ctx.compute_capability().unwrap();
    let module = ctx
        .load_module(candidates_ptx(arch_name(major, minor)))
        .unwrap();
    let candidates: Vec<(&str, CudaFunction, u32, u32)> = MATVEC_CANDIDATES
        .into_iter()
        .map(|(name, rows, per_lane)| (name, module.load_function(name).unwrap(), rows, per_lane))
        .collect();
    let shapes = [
        ("SmolLM2 QKV", 960, 576),
        ("SmolLM2 wo", 576, 576),
        ("SmolLM2 gate+up", 3072, 576),
        ("SmolLM2 down", 576, 1536),
        ("SmolLM2 output", 49_152, 576),
        ("8B wo", 4096, 4096),
        ("8B QKV", 6144, 4096),
        ("8B gate+up", 28_672, 4096),
        ("8B down", 4096, 14_336),
        ("8B output", 128_256, 4096),
    ];
    let reps = 40;
    let mut wrong = Vec::new();
    eprintln!("matrix (rows x cols): kernels.cu, then each candidate: us a matvec (GB/s)");
    for (name, rows, cols) in shapes {
        let w = random_weights(Format::Q4_1, rows, cols, 7);
        let bytes = rows * cols / BLOCK * Q4_1_BLOCK_BYTES;
        let copies = (256 << 20) / bytes + 1;
        let mats: Vec<DeviceMatrix> = (0..copies)
            .map(|_| DeviceMatrix::upload(&stream, name, &[(&w, rows)]).unwrap())
            .collect();
        let x = stream.clone_htod(&random_activations(cols, 3)).unwrap();
        let mut y = stream.alloc_zeros::<f32>(rows).unwrap();
        let mut time = |run: &mut dyn FnMut(&DeviceMatrix, &mut CudaSlice<f32>)| {
            run(&mats[0], &mut y);
            stream.synchronize().unwrap();
            let start = std::time::Instant::now();
            for i in 0..reps {
                run(&mats[i % copies], &mut y);
            }
            stream.synchronize().unwrap();
            let us = start.elapsed().as_secs_f64() * 1e6 / reps as f64;
            (us, stream.clone_dtoh(&y).unwrap())
        };
        let (base_us, want) = time(&mut |m, y| {
            let none = &Fusion::NONE;
            matmul(&stream, &k, m, &x.slice(..), y, None, 1, false, none).unwrap()
        });
        let gbs = |us: f64| bytes as f64 / us / 1e3;
        let mut line = format!(
            "{name} ({rows} x {cols}): {base_us:.1} ({:.0})",
            gbs(base_us)
        );
        for (cand, f, per_block, per_lane) in &candidates {
            // mvk: a warp for every 32 * per_lane quant blocks of a row (at most 32 warps).
            let threads = match per_lane {
                0 => 128,
                k => 32 * ((cols / BLOCK) as u32).div_ceil(32 * k).clamp(1, 32),
            };
            let (us, got) = time(&mut |m, y| {
                let (r, c) = (rows as i32, cols as i32);
                let mut launch = stream.launch_builder(f);
                launch
                    .arg(&m.quants)
                    .arg(&m.scales)
                    .arg(&x)
                    .arg(y)
                    .arg(&r)
                    .arg(&c);
                let config = LaunchConfig {
                    grid_dim: ((rows as u32).div_ceil(*per_block), 1, 1),
                    block_dim: (threads, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the matrix holds rows x cols Q4_1 weights, x cols floats, y rows.
                unsafe { launch.launch(config) }.unwrap();
            });
            let label = match per_lane {
                0 => cand.to_string(),
                k => format!("{cand}/{k}"),
            };
            line += &format!(", {label} {us:.1} ({:.0})", gbs(us));
            // A wrong candidate is marked and failed at the end, so the table still prints. A
            // bound (`bound_*`) reads the matrix without computing the product: not checked.
            let diff = rel_diff(&want, &got);
            if diff >= 1e-4 && !cand.starts_with("bound_") {
                line += &format!(" WRONG (relative difference {diff:e})");
                wrong.push(format!("{label} on {name}: {diff:e}"));
            }
        }
        eprintln!("{line}");
    }
    assert!(
        wrong.is_empty(),
        "candidates that differ from kernels.cu: {wrong:?}"
    );
}

/// The kernels of `matvec_candidates.cu` the bench times (the second set's best three, and the
/// third to sixth sets), the rows a block of each covers (mvs: four warps of R rows; mvw: 4 / KW
/// groups of R rows; mvk: R; mvp: 8; mvt, mvts: RT tiles of 16; bound_r4, a read of the matrix as
/// mvs_r4's and no product: 16) and, for mvk, the quant blocks of a row a lane takes (the block has
/// a warp for each 32 of them; 0: a block of four warps).
const MATVEC_CANDIDATES: [(&str, u32, u32); 20] = [
    ("mvw_r1_f", 4, 0),
    ("mvw_r2", 8, 0),
    ("mvw_r4_k4_f", 4, 0),
    ("mvs_r1", 4, 0),
    ("mvs_r2", 8, 0),
    ("mvs_r4", 16, 0),
    ("mvk_r2", 2, 1),
    ("mvk_r4", 4, 1),
    ("mvk_r4", 4, 2),
    ("mvk_r8", 8, 1),
    ("mvk_r8", 8, 2),
    ("mvp_s2", 8, 0),
    ("mvp_s4", 8, 0),
    ("mvp_s6", 8, 0),
    ("mvt_r1", 16, 0),
    ("mvt_r2", 32, 0),
    ("mvt_r4", 64, 0),
    ("mvts_r1", 16, 0),
    ("mvts_r2", 32, 0),
    ("bound_r4", 16, 0),
];

/// `matvec_candidates.cu` compiled by NVRTC as kernels.cu is, after kernels.cu (whose helpers
/// it uses).
fn candidates_ptx(arch: &'static str) -> Ptx {
    let options = CompileOptions {
        arch: Some(arch),
        fmad: Some(false),
        name: Some("matvec_candidates.cu".into()),
        ..Default::default()
    };
    let source = format!("{SOURCE}\n{}", include_str!("matvec_candidates.cu"));
    compile_ptx_with_opts(source, options).unwrap()
}

/// The microbenchmark's candidates compile (CI runs this with libnvrtc from PyPI), so a GPU
/// call is never spent on a typo.
#[test]
#[ignore = "needs libnvrtc (CI fetches it from PyPI; a GPU machine has it)"]
fn nvrtc_compiles_the_matvec_candidates() {
    let ptx = candidates_ptx(arch_name(9, 0)).to_src();
    for (name, ..) in MATVEC_CANDIDATES {
        assert!(
            ptx.contains(&format!(".entry {name}(")),
            "{name} is missing"
        );
    }
}

/// `boundary_probe.cu` compiled by NVRTC, as kernels.cu is.
fn probe_ptx(arch: &'static str) -> Ptx {
    let options = CompileOptions {
        arch: Some(arch),
        name: Some("boundary_probe.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(include_str!("boundary_probe.cu"), options).unwrap()
}

/// The probe's kernels compile (CI runs this with libnvrtc from PyPI).
#[test]
#[ignore = "needs libnvrtc (CI fetches it from PyPI; a GPU machine has it)"]
fn nvrtc_compiles_the_boundary_probe() {
    let ptx = probe_ptx(arch_name(9, 0)).to_src();
    for name in ["probe_phase", "probe_persistent"] {
        assert!(
            ptx.contains(&format!(".entry {name}(")),
            "{name} is missing"
        );
    }
}

/// What a boundary between two dependent phases costs on this GPU, in microseconds: a kernel
/// boundary in a replayed CUDA graph (kernels of one block, and of a block an SM), the same
/// kernels launched one by one, and a grid-wide barrier inside one persistent kernel of a
/// block an SM. Checks every phase ran (each value counts them) and prints the costs.
#[test]
#[ignore = "needs a CUDA GPU; a microbenchmark, run by hand with --nocapture"]
fn bench_phase_boundaries() {
    let ctx = CudaContext::new(0).unwrap();
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let (major, minor) = ctx.compute_capability().unwrap();
    let module = ctx.load_module(probe_ptx(arch_name(major, minor))).unwrap();
    let phase = module.load_function("probe_phase").unwrap();
    let persistent = module.load_function("probe_persistent").unwrap();
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as u32;
    let (phases, reps, threads) = (150usize, 20usize, 128u32);
    let mut buf = stream.alloc_zeros::<f32>((sms * threads) as usize).unwrap();
    let config = |blocks: u32| LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // Microseconds a phase over `reps` runs of `run` (one run first, untimed).
    let time = |run: &mut dyn FnMut()| {
        run();
        stream.synchronize().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..reps {
            run();
        }
        stream.synchronize().unwrap();
        start.elapsed().as_secs_f64() * 1e6 / (reps * phases) as f64
    };
    let mut line = format!("{sms} SMs, {phases} phases: us a phase boundary:");
    for blocks in [1, sms] {
        let launch_all = |buf: &mut CudaSlice<f32>| {
            for _ in 0..phases {
                let mut launch = stream.launch_builder(&phase);
                launch.arg(&mut *buf);
                // SAFETY: buf holds a value for every thread of the launch.
                unsafe { launch.launch(config(blocks)) }.unwrap();
            }
        };
        let eager = time(&mut || launch_all(&mut buf));
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        launch_all(&mut buf);
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .unwrap();
        let graphed = time(&mut || graph.launch().unwrap());
        line +=
            &format!(" {blocks} block(s) a kernel: {eager:.2} launched, {graphed:.2} in a graph;");
    }
    let mut bar = stream.alloc_zeros::<u32>(1).unwrap();
    let n = phases as i32;
    let barrier = time(&mut || {
        stream.memset_zeros(&mut bar).unwrap();
        let mut launch = stream.launch_builder(&persistent);
        launch.arg(&mut buf).arg(&mut bar).arg(&n);
        // SAFETY: buf holds a value for every thread; one 128-thread block an SM, so every
        // block is resident and the barrier cannot deadlock; bar was just zeroed.
        unsafe { launch.launch(config(sms)) }.unwrap();
    });
    line += &format!(" a grid barrier in one kernel: {barrier:.2}");
    eprintln!("{line}");
    // Every value saw every phase: 2 x (1 + reps) graph or eager runs of each kernel kind,
    // (1 + reps) persistent runs; block 0's values also ran in the one-block kernels.
    let runs = (1 + reps) * phases;
    let got = stream.clone_dtoh(&buf).unwrap();
    assert_eq!(got[0] as usize, 2 * 2 * runs + runs, "block 0");
    assert_eq!(
        got[got.len() - 1] as usize,
        2 * runs + runs,
        "the last block"
    );
}

/// This process's resident high-water mark (VmHWM) and resident size (VmRSS), in kB.
fn memory_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// How far the high-water mark rose above the resident size while `step` ran, in MB (the mark
/// is reset to the resident size first, as `clear_refs` does).
fn peak_rise_mb<T>(step: impl FnOnce() -> T) -> (T, f64) {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let (_, before) = memory_kb();
    let out = step();
    let (peak, _) = memory_kb();
    (out, (peak.saturating_sub(before)) as f64 / 1e3)
}

/// Where a worker's peak memory at load came from before the model loaded a cubin (NVRTC to
/// PTX, then the driver compiles the PTX): each step's rise of the high-water mark.
/// Run alone (`--exact`), so that nothing else in the process moves the mark.
#[test]
#[ignore = "needs a CUDA GPU; a probe, run by hand with --exact --nocapture"]
fn probe_load_memory_ptx() {
    let ctx = CudaContext::new(0).unwrap();
    let (major, minor) = ctx.compute_capability().unwrap();
    let arch = arch_name(major, minor);
    let options = CompileOptions {
        arch: Some(arch),
        fmad: Some(false),
        name: Some("kernels.cu".into()),
        ..Default::default()
    };
    let (ptx, nvrtc) = peak_rise_mb(|| compile_ptx_with_opts(SOURCE, options).unwrap());
    let (module, jit) = peak_rise_mb(|| ctx.load_module(ptx).unwrap());
    assert!(module.load_function("argmax").is_ok());
    let (_, rss) = memory_kb();
    eprintln!(
        "PTX path: NVRTC to PTX raised the peak {nvrtc:.1} MB, the driver's PTX compile {jit:.1} \
         MB; resident after: {:.1} MB",
        rss as f64 / 1e3
    );
}

/// The same the way the model loads kernels.cu (`Kernels::cubin`): NVRTC compiles to a cubin,
/// which the driver loads as it is.
#[test]
#[ignore = "needs a CUDA GPU; a probe, run by hand with --exact --nocapture"]
fn probe_load_memory_cubin() {
    let ctx = CudaContext::new(0).unwrap();
    let (major, minor) = ctx.compute_capability().unwrap();
    let arch = arch_name(major, minor);
    let (cubin, nvrtc) = peak_rise_mb(|| Kernels::cubin(arch, LongRows::ALL, true).unwrap());
    let bytes = cubin.len();
    let (module, load) = peak_rise_mb(|| ctx.load_module(Ptx::from_binary(cubin)).unwrap());
    assert!(module.load_function("argmax").is_ok());
    let (_, rss) = memory_kb();
    eprintln!(
        "cubin path: NVRTC to a cubin ({bytes} bytes) raised the peak {nvrtc:.1} MB, loading it \
         {load:.1} MB; resident after: {:.1} MB",
        rss as f64 / 1e3
    );
}

/// The decode step's kind of graph (`StepGraph`) joins consecutive kernels by programmatic
/// edges, and kernels that each read and rewrite what the last one wrote still run in order:
/// 64 chained argmax launches, replayed twice, move the position on 128 times.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_step_graph_is_programmatic_and_keeps_kernels_in_order() {
    let (default, k) = gpu();
    // The legacy default stream cannot be captured.
    let stream = default.context().new_stream().unwrap();
    let v = random_activations(50_000, 11);
    let want = crate::generate::argmax(&v);
    let d = stream.clone_htod(&v).unwrap();
    let mut best = stream.alloc_zeros::<u32>(1).unwrap();
    let ids = stream.clone_htod(&[7u32, 9]).unwrap();
    let pos_at = stream.clone_htod(&[0i32]).unwrap();
    let (next_id, at) = (address(&stream, &ids, 0), address(&stream, &pos_at, 0));
    let n = v.len() as i32;
    let graph = StepGraph::capture(&stream, || {
        for _ in 0..64 {
            let mut launch = stream.launch_builder(&k.argmax);
            launch.arg(&d).arg(&n).arg(&mut best).arg(&next_id).arg(&at);
            // SAFETY: d holds n floats, best one u32; next_id and at address live buffers.
            unsafe { launch.launch(argmax_config()) }?;
        }
        Ok::<(), DriverError>(())
    })
    .unwrap()
    .expect("a graph");
    assert_eq!(graph.programmatic_edges().unwrap(), 63);
    graph.launch().unwrap();
    graph.launch().unwrap();
    stream.synchronize().unwrap();
    assert_eq!(stream.clone_dtoh(&pos_at).unwrap(), [128]);
    assert_eq!(stream.clone_dtoh(&ids).unwrap(), [want, 9]);
    assert_eq!(stream.clone_dtoh(&best).unwrap(), [want]);
}

/// The shapes the probes build: SmolLM2-135M's, Llama-3.2-1B's and Llama-3.1-8B's, as `host
/// synth` has them (layers, width, heads, KV heads, FFN, vocabulary; the variant cannot read
/// the host's table). The projections are Q4_1 as there, but the embedding is Q8_0 and serves
/// as the output layer, as in SmolLM2's real file; `host synth` writes it Q4_1 (and the 8B's
/// output untied), so at 1B and 8B the probes' output layer reads 1.7 times the bytes `host
/// bench`'s does.
fn probe_shape(name: &str) -> tiny::Shape {
    let (d, ff, n_layer, n_head, n_kv, vocab) = match name {
        "smollm2" => (576, 1536, 30, 9, 3, 49_152),
        "1b" => (2048, 8192, 16, 32, 8, 128_256),
        "8b" => (4096, 14_336, 32, 32, 8, 128_256),
        other => panic!("AUTOINFER_PROBE_SHAPES: unknown shape '{other}' (smollm2, 1b, 8b)"),
    };
    tiny::Shape {
        d,
        ff,
        n_layer,
        n_head,
        n_kv,
        vocab,
        context: 8192,
        q4_1: true,
    }
}

/// Microseconds a decode step of `gpu` takes from `first` at `pos`: 64 steps to warm up
/// (and capture), then `n` timed on the wall clock.
fn step_us(gpu: &mut CudaLlama, first: u32, pos: usize, n: usize) -> f64 {
    let warm = gpu.decode(first, pos, 64, &mut |_| true).unwrap();
    assert_eq!(warm, 64);
    let started = std::time::Instant::now();
    let emitted = gpu.decode(first, pos, n, &mut |_| true).unwrap();
    assert_eq!(emitted, n);
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// The probes' models: for each shape named in `AUTOINFER_PROBE_SHAPES` (default
/// `smollm2,1b`), its name, its shape, a random model of it on the GPU that has run a prompt of
/// [`probe_prompt`] tokens, and the greedy token after the prompt (at that position).
fn probe_models() -> impl Iterator<Item = (String, tiny::Shape, CudaLlama, u32)> {
    let shapes = std::env::var("AUTOINFER_PROBE_SHAPES").unwrap_or("smollm2,1b".into());
    let names: Vec<String> = shapes.split(',').map(str::to_string).collect();
    names.into_iter().map(|name| {
        let shape = probe_shape(&name);
        let mut gpu = CudaLlama::from_gguf(tiny::shaped("llama", shape), 0).unwrap();
        let first = gpu
            .forward_greedy(&probe_tokens(&shape), 0, &mut Vec::new())
            .unwrap();
        (name, shape, gpu, first)
    })
}

/// The probes' prompt: [`probe_prompt`] token ids spread over `shape`'s vocabulary.
fn probe_tokens(shape: &tiny::Shape) -> Vec<u32> {
    (0..probe_prompt() as u32)
        .map(|i| (i * 7919 + 1) % shape.vocab as u32)
        .collect()
}

/// The probes' prompt length, the position their decode starts from: 32, or
/// `AUTOINFER_PROBE_PROMPT` (1680 is the real protocol's long prompt).
fn probe_prompt() -> usize {
    match std::env::var("AUTOINFER_PROBE_PROMPT") {
        Err(_) => 32,
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("AUTOINFER_PROBE_PROMPT: '{v}' is not a number of tokens")),
    }
}

/// What each kernel of the decode step costs inside the step's graph: the step timed whole,
/// then with each kind of kernel left out (its results then wrong, but the rest of the chain
/// the same), for each shape in `AUTOINFER_PROBE_SHAPES` (default `smollm2,1b`). A kernel's
/// cost is what the step loses without it; the sum of those against the whole step says how
/// much of it is the chain's own overhead.
#[test]
#[ignore = "needs a CUDA GPU; a probe, run by hand with --exact --nocapture"]
fn probe_decode_ablation() {
    for (name, shape, mut gpu, first) in probe_models() {
        let whole = step_us(&mut gpu, first, probe_prompt(), 256);
        println!("{name}: whole step {whole:.1} us");
        let mut saved = 0.0;
        for step in [
            Step::Embed,
            Step::Qkv,
            Step::Attention,
            Step::Wo,
            Step::Swiglu,
            Step::Down,
            Step::Output,
            Step::Argmax,
        ] {
            gpu.omit = vec![step];
            gpu.graphs = [None, None];
            let without = step_us(&mut gpu, first, probe_prompt(), 256);
            let per = match step {
                Step::Embed | Step::Output | Step::Argmax => 1.0,
                _ => shape.n_layer as f64,
            };
            println!(
                "{name}: without {step:?}: {without:.1} us, so {:.1} us a step, {:.2} us a launch",
                whole - without,
                (whole - without) / per
            );
            saved += whole - without;
        }
        gpu.omit.clear();
        gpu.graphs = [None, None];
        println!(
            "{name}: the kernels' costs add up to {saved:.1} us of {whole:.1}; {:.1} us is the chain's",
            whole - saved
        );
    }
}

/// How long a decode step takes at real shapes (random weights): for each shape in
/// `AUTOINFER_PROBE_SHAPES` (default `smollm2,1b`), a [`probe_prompt`]-token prompt, 64 steps
/// to warm up, then 256 steps of `decode` timed on the wall clock (`tools/gpu-probe.sh` runs
/// it). Under
/// Nsight Compute (`ncu --graph-profiling node --metrics gpu__time_duration.sum --launch-skip
/// N --launch-count M`) it also gives each kernel's own time, with N past the warm-up's start.
#[test]
#[ignore = "needs a CUDA GPU; a probe, run by hand with --exact --nocapture"]
fn probe_decode_steps() {
    for (name, _, mut gpu, first) in probe_models() {
        let n = 256;
        let us = step_us(&mut gpu, first, probe_prompt(), n);
        println!(
            "{name}: {us:.1} us a step, {:.1} tok/s over {n} steps from position {}",
            1e6 / us,
            probe_prompt()
        );
    }
}

/// How long a prefill takes at real shapes (random weights): for each shape in
/// `AUTOINFER_PROBE_SHAPES` (default `smollm2,1b`), the [`probe_prompt`]-token prompt from
/// position 0, once to warm up (in [`probe_models`]), then 8 times timed on the wall clock, each
/// to its greedy token (`tools/gpu-probe.sh` runs it with `PROBE=prefill`). Through
/// `generate`, in its chunks, as a request's prefill runs: until G50 this probe timed one pass
/// where requests took 256-token chunks, so its 1,680-token figure was not what the long
/// prompt's requests did (15.7 ms against their 29.6 to 41.5).
#[test]
#[ignore = "needs a CUDA GPU; a probe, run by hand with --exact --nocapture"]
fn probe_prefill() {
    for (name, shape, mut gpu, first) in probe_models() {
        let (prompt, n) = (probe_tokens(&shape), 8);
        let started = std::time::Instant::now();
        for _ in 0..n {
            let mut got = Vec::new();
            crate::generate::generate(&mut gpu, &prompt, 1, |t| {
                got.extend_from_slice(t);
                true
            })
            .unwrap();
            assert_eq!(got, [first]);
        }
        let us = started.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!(
            "{name}: {us:.1} us a prefill of {} tokens, {:.0} tok/s",
            prompt.len(),
            prompt.len() as f64 * 1e6 / us
        );
    }
}
