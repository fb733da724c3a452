//! Quantized matmul kernels: Q4_1 and Q8_0 weight rows times f32 activations, with SIMD paths
//! chosen at run time ([`Isa`]) and the scalar reference beside them.
//!
//! [`matmul_rows`] computes a run of weight rows against a chunk of token rows. Every path keeps
//! the two properties [`crate::matmul`] promises:
//! - activations stay f32; weights are dequantized as the reference does
//!   ([`dequantize_q4_1_row`], [`dequantize_q8_0_row`]: `d * q + m`, `d * q`), except that the
//!   SIMD paths compute Q4_1's `d * q + m` in one fused multiply-add (one rounding, not two);
//! - a (row, token) result does not depend on the chunk size, up to a reordered sum's rounding:
//!   a chunk (prefill) dequantizes a few rows to a buffer once and reuses them for every token;
//!   one token (decode) takes each block's scale and minimum out of the block's sum (the SIMD
//!   paths; about 1e-7 relative), or on the scalar path dequantizes as a chunk does and gives
//!   its bits.
//!
//! Different paths sum in different orders, so their results differ in the last bits (the
//! tests bound that against the reference); one machine always takes the same path.

use half::f16;

/// Bytes of one Q4_1 block (f16 scale, f16 minimum, 16 bytes of 4-bit values) and of one Q8_0
/// block (f16 scale, 32 signed bytes); both hold 32 weights.
pub const Q4_1_BLOCK_BYTES: usize = 20;
/// See [`Q4_1_BLOCK_BYTES`].
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Weights per Q4_1 or Q8_0 block.
pub const BLOCK: usize = 32;

/// A quantized block format the kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// ggml Q4_1: weight = d * q + m, q in 0..16; low nibbles are weights 0..16.
    Q4_1,
    /// ggml Q8_0: weight = d * q, q in -128..128.
    Q8_0,
}

impl Format {
    /// Bytes per 32-weight block.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => Q4_1_BLOCK_BYTES,
            Format::Q8_0 => Q8_0_BLOCK_BYTES,
        }
    }

    /// Bytes of one row of `cols` weights.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / BLOCK * self.block_bytes()
    }

    /// The reference dequantization of one row.
    pub fn dequantize_row(self, row: &[u8], out: &mut [f32]) {
        match self {
            Format::Q4_1 => dequantize_q4_1_row(row, out),
            Format::Q8_0 => dequantize_q8_0_row(row, out),
        }
    }
}

/// An instruction set a kernel path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F with F16C: 16 lanes.
    Avx512,
    /// AVX2, FMA and F16C: 8 lanes.
    Avx2,
    /// Plain Rust, the reference.
    Scalar,
}

impl Isa {
    /// Whether this machine can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this machine can run, fastest first (the scalar one last).
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }

    /// The fastest path this machine runs, detected once.
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Isa::available()[0])
    }
}

/// Dot product with eight independent partial sums (vectorizable, and always in the same order).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xs, ys) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in xs.zip(ys) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Dequantizes one row of Q4_1 blocks into `out` (32 weights per 20-byte block).
pub fn dequantize_q4_1_row(row: &[u8], out: &mut [f32]) {
    for (block, out) in row
        .chunks_exact(Q4_1_BLOCK_BYTES)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
        let (lo, hi) = out.split_at_mut(BLOCK / 2);
        for ((&q, lo), hi) in block[4..].iter().zip(lo).zip(hi) {
            *lo = d * (q & 0x0F) as f32 + m;
            *hi = d * (q >> 4) as f32 + m;
        }
    }
}

/// Dequantizes one row of Q8_0 blocks into `out` (32 weights per 34-byte block).
pub fn dequantize_q8_0_row(row: &[u8], out: &mut [f32]) {
    for (block, out) in row
        .chunks_exact(Q8_0_BLOCK_BYTES)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        for (o, &q) in out.iter_mut().zip(&block[2..]) {
            *o = d * (q as i8) as f32;
        }
    }
}

/// Weight rows `w` (whole rows of `format`, `cols` weights each) times the token rows `x`
/// (`t` rows of `cols`), written row-major by weight row: `out[r * t + tok]`.
///
/// # Panics
/// When `cols` is not a whole number of blocks or the slices' lengths do not fit together
/// (the callers size them from the matrix's checked dims).
pub fn matmul_rows(isa: Isa, format: Format, w: &[u8], cols: usize, x: &[f32], out: &mut [f32]) {
    assert!(cols.is_multiple_of(BLOCK) && cols > 0, "cols {cols}");
    let row_bytes = format.row_bytes(cols);
    assert!(w.len().is_multiple_of(row_bytes), "partial weight row");
    assert!(x.len().is_multiple_of(cols), "partial token row");
    let (rows, t) = (w.len() / row_bytes, x.len() / cols);
    assert_eq!(out.len(), rows * t, "output size");
    if rows == 0 || t == 0 {
        return;
    }
    match isa {
        // SAFETY (both arms): the path's instruction set was checked by `supported`, and the
        // slices' sizes were checked above, which is all the SIMD code relies on.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() => unsafe { x86::matmul_avx512(format, w, cols, x, t, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => unsafe { x86::matmul_avx2(format, w, cols, x, t, out) },
        Isa::Scalar => matmul_scalar(format, w, cols, x, t, out),
        _ => panic!("the {isa:?} kernels cannot run on this machine"),
    }
}

/// The largest an activation's 16-bit integer gets in [`quantize_i16`].
pub const I16_MAX: f32 = 32767.0;

/// One token's activations as 16-bit integers, a block of [`BLOCK`] at a time: `xq[k]` is
/// `x[k] / s_b` rounded to the nearest integer, where `scales[b] = s_b` is the block's largest
/// magnitude over [`I16_MAX`], so that `|x[k] - s_b xq[k]| <= 0.51 s_b` (half a step, and the
/// f32 rounding of the division). Returns the largest `s_b`, or `None` when an activation is
/// not finite. This rounds the activations: only a bound is ever drawn from it
/// ([`approx_rows_q8_0`]), never a logit.
pub fn quantize_i16(x: &[f32], xq: &mut Vec<i16>, scales: &mut Vec<f32>) -> Option<f32> {
    assert!(x.len().is_multiple_of(BLOCK), "partial block");
    xq.clear();
    scales.clear();
    let mut top = 0f32;
    for block in x.chunks_exact(BLOCK) {
        if block.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (scale, inv) = if largest > 0.0 {
            (largest / I16_MAX, I16_MAX / largest)
        } else {
            (0.0, 0.0)
        };
        xq.extend(
            block
                .iter()
                .map(|v| (v * inv).round().clamp(-I16_MAX, I16_MAX) as i16),
        );
        scales.push(scale);
        top = top.max(scale);
    }
    Some(top)
}

/// `Σ_k |w_k|` of one Q8_0 row (each block's `|d| Σ |q|`, summed in f64), rounded up: with
/// [`quantize_i16`]'s largest scale `s`, `s` times it bounds how far [`approx_rows_q8_0`]'s
/// value for the row lies from the row's exact product ([`matmul_rows`]), with room for both
/// sides' f32 rounding (the quantization alone takes 0.51 of it).
pub fn q8_0_row_l1(row: &[u8]) -> f32 {
    let sum: f64 = row
        .chunks_exact(Q8_0_BLOCK_BYTES)
        .map(|b| {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f64().abs();
            d * b[2..].iter().map(|&q| (q as i8 as f64).abs()).sum::<f64>()
        })
        .sum();
    (sum * (1.0 + 1e-6)) as f32
}

/// Q8_0 rows `w` (whole rows of `cols`) times one token's 16-bit activations from
/// [`quantize_i16`]: `out[r] = Σ_b d_rb s_b Σ_k q_rbk xq_bk`, each block's sum exact in 32-bit
/// integers (at most 4 · 128 · 32767 < 2^24 a lane, so its conversion is exact too), scaled and
/// summed in f32. About 11 vector operations a block-row where the exact AVX2 kernel takes 16:
/// a bound's pass ahead of an argmax (`output_argmax`). `Isa::Scalar` is the reference.
///
/// # Panics
/// When the slices' sizes do not fit together, or `isa` cannot run here.
pub fn approx_rows_q8_0(
    isa: Isa,
    w: &[u8],
    cols: usize,
    xq: &[i16],
    scales: &[f32],
    out: &mut [f32],
) {
    let row_bytes = Format::Q8_0.row_bytes(cols);
    assert!(cols.is_multiple_of(BLOCK) && xq.len() == cols && scales.len() == cols / BLOCK);
    assert_eq!(w.len(), out.len() * row_bytes, "weight rows and outputs");
    match isa {
        // SAFETY: the path's instruction set was checked by `supported`, and the slices'
        // sizes were checked above, which is all the SIMD code relies on.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => unsafe {
            x86::approx_rows_q8_0_avx2(w, cols, xq, scales, out)
        },
        Isa::Scalar => {
            for (row, out) in w.chunks_exact(row_bytes).zip(out.iter_mut()) {
                *out = row
                    .chunks_exact(Q8_0_BLOCK_BYTES)
                    .zip(xq.chunks_exact(BLOCK).zip(scales))
                    .map(|(b, (xq, s))| {
                        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                        let sum: i32 = b[2..]
                            .iter()
                            .zip(xq)
                            .map(|(&q, &x)| q as i8 as i32 * x as i32)
                            .sum();
                        d * s * sum as f32
                    })
                    .sum();
            }
        }
        _ => panic!("approx_rows_q8_0 has no {isa:?} path"),
    }
}

/// Positions in one tile of keys: a tile is `[head_dim][KEY_TILE]`, the keys of
/// `KEY_TILE` consecutive positions side by side (see [`tile_scores`]).
pub const KEY_TILE: usize = 64;

/// Attention scores of one tile of keys (`tile[d * KEY_TILE + j]` is key `j`'s element `d`):
/// `out[j] = (Σ_d q[d] · tile[d * KEY_TILE + j]) · scale` for the tile's `KEY_TILE` keys, each
/// sum a chain of fused multiply-adds in order of `d`. Every path computes the same bits:
/// a vector lane is one key, so no sum crosses lanes.
pub fn tile_scores(isa: Isa, q: &[f32], tile: &[f32], scale: f32, out: &mut [f32]) {
    assert_eq!(
        tile.len(),
        q.len() * KEY_TILE,
        "tile_scores: the tile does not match the query"
    );
    assert_eq!(
        out.len(),
        KEY_TILE,
        "tile_scores: one score per key of the tile"
    );
    match isa {
        // SAFETY (both arms): the instruction set was checked by `supported`; the lengths
        // were checked above, and a tile's row is a whole number of vectors.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() => unsafe { x86::tile_scores_avx512(q, tile, scale, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => unsafe { x86::tile_scores_avx2(q, tile, scale, out) },
        _ => {
            out.fill(0.0);
            for (&qd, row) in q.iter().zip(tile.chunks_exact(KEY_TILE)) {
                for (o, &k) in out.iter_mut().zip(row) {
                    *o = qd.mul_add(k, *o);
                }
            }
            for o in out.iter_mut() {
                *o *= scale;
            }
        }
    }
}

/// Arguments at or below this give `e^LOWEST_EXP_ARG`, about 1.2e-38 (the smallest normal
/// f32): weights that small are lost in any sum with the largest weight, `e^0`.
const LOWEST_EXP_ARG: f32 = -87.336_54;
/// ln 2 in two parts, the first exact in few bits, for the argument's reduction.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// The polynomial for `e^r - 1 - r` over `r²`, `|r| <= ln 2 / 2` (Cephes' `expf`).
const EXP_POLY: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `e^x` as every path of [`exp_shifted`] computes it: `x = n ln 2 + r`, then `e^r` by a
/// degree-7 polynomial and `2^n` exactly; within about 2 ulp of the true value (the unit test
/// measures it against f64).
pub fn exp_reference(x: f32) -> f32 {
    let x = x.max(LOWEST_EXP_ARG);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let y = EXP_POLY[1..]
        .iter()
        .fold(EXP_POLY[0], |y, &p| y.mul_add(r, p));
    let y = y.mul_add(r * r, r) + 1.0;
    // For `x <= 0`, what every caller passes, `n` is an integer in -126..=0, so `2^n` is a
    // normal f32. Above about 88.7 it would not be, and the bits would not be e^x.
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x[j] = e^(x[j] - shift)` for every `j` ([`exp_reference`], in vector lanes where the
/// machine has them: the same operations, so the same bits on every path). Every `x[j] - shift`
/// must be at most 0 (arguments past about 88.7 give wrong bits); attention's softmax calls it
/// with `shift` the largest `x[j]`.
pub fn exp_shifted(isa: Isa, x: &mut [f32], shift: f32) {
    let done = match isa {
        // SAFETY (both arms): the instruction set was checked by `supported`; the kernels
        // touch only whole vectors inside `x` and return how many floats they did.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() => unsafe { x86::exp_shifted_avx512(x, shift) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => unsafe { x86::exp_shifted_avx2(x, shift) },
        _ => 0,
    };
    for v in &mut x[done..] {
        *v = exp_reference(*v - shift);
    }
}

/// Attention output: `out = Σ_j p[j] * values[j * hd..(j + 1) * hd]` (`hd = out.len()`), summed
/// in order of `j`.
pub fn weighted_sum(isa: Isa, p: &[f32], values: &[f32], out: &mut [f32]) {
    let hd = out.len();
    assert_eq!(
        values.len(),
        p.len() * hd,
        "weighted_sum: values do not match the weights"
    );
    match isa {
        // SAFETY (both arms): the instruction set was checked by `supported`; the lengths were
        // checked above and the width is a whole number of vectors.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() && hd.is_multiple_of(16) => unsafe {
            x86::weighted_sum_avx512(p, values, out)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() && hd.is_multiple_of(8) => unsafe {
            x86::weighted_sum_avx2(p, values, out)
        },
        _ => {
            out.fill(0.0);
            for (&p, v) in p.iter().zip(values.chunks_exact(hd)) {
                for (o, &v) in out.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
        }
    }
}

/// [`tile_scores`] for a group of query heads that share the tile's keys: `qs` holds
/// `out.len() / KEY_TILE` queries of `tile.len() / KEY_TILE` floats, and head `h`'s scores go
/// to `out[h * KEY_TILE..]`. The same bits as one [`tile_scores`] a head; the AVX-512 path
/// loads each row of keys once for the whole group (up to 4 heads) instead of once a head.
pub fn tile_scores_group(isa: Isa, qs: &[f32], tile: &[f32], scale: f32, out: &mut [f32]) {
    let hd = tile.len() / KEY_TILE;
    let heads = out.len() / KEY_TILE;
    assert!(
        hd > 0 && tile.len() == hd * KEY_TILE && out.len() == heads * KEY_TILE,
        "tile_scores_group: the tile or the output is not whole tiles"
    );
    assert_eq!(
        qs.len(),
        heads * hd,
        "tile_scores_group: the queries do not match"
    );
    // SAFETY (every arm): AVX-512F was checked by `supported`; the lengths were checked above.
    #[cfg(target_arch = "x86_64")]
    match (isa, heads) {
        (Isa::Avx512, 2) if isa.supported() => {
            return unsafe { x86::tile_scores_group_avx512::<2>(qs, tile, scale, out) }
        }
        (Isa::Avx512, 3) if isa.supported() => {
            return unsafe { x86::tile_scores_group_avx512::<3>(qs, tile, scale, out) }
        }
        (Isa::Avx512, 4) if isa.supported() => {
            return unsafe { x86::tile_scores_group_avx512::<4>(qs, tile, scale, out) }
        }
        _ => {}
    }
    for (q, out) in qs.chunks_exact(hd).zip(out.chunks_exact_mut(KEY_TILE)) {
        tile_scores(isa, q, tile, scale, out);
    }
}

/// [`weighted_sum`] for a group of heads over the same `values` (`n = values.len() / hd`
/// rows): head `h`'s weights are `p[h * p_stride..][..n]` and its output
/// `out[h * out_stride..][..hd]`, for `p.len() / p_stride` heads. The same bits as one
/// [`weighted_sum`] a head; the AVX-512 path loads each value row once for the whole group.
pub fn weighted_sum_group(
    isa: Isa,
    p: &[f32],
    p_stride: usize,
    values: &[f32],
    hd: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(
        hd > 0 && p_stride > 0 && out_stride >= hd,
        "weighted_sum_group: strides"
    );
    let (n, heads) = (values.len() / hd, p.len() / p_stride);
    assert!(
        values.len() == n * hd && n <= p_stride && p.len() == heads * p_stride,
        "weighted_sum_group: values or weights not whole rows"
    );
    assert!(
        heads == 0 || out.len() >= (heads - 1) * out_stride + hd,
        "weighted_sum_group: the output is too short"
    );
    // The AVX-512 kernel for each (heads, head width) it is compiled for, the width in vectors.
    // SAFETY (every arm): AVX-512F was checked by `supported`; the lengths were checked above,
    // and the head width is the arm's whole number of vectors.
    #[cfg(target_arch = "x86_64")]
    macro_rules! group_kernels {
        ($(($heads:literal, $hd:literal, $vectors:literal)),*) => {
            match (isa, heads, hd) {
                $((Isa::Avx512, $heads, $hd) if isa.supported() => {
                    return unsafe {
                        x86::weighted_sum_group_avx512::<$heads, $vectors>(
                            p, p_stride, values, out, out_stride,
                        )
                    };
                })*
                _ => {}
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    group_kernels!((2, 64, 4), (3, 64, 4), (4, 64, 4), (2, 128, 8));
    for h in 0..heads {
        let out = &mut out[h * out_stride..h * out_stride + hd];
        weighted_sum(isa, &p[h * p_stride..h * p_stride + n], values, out);
    }
}

/// The reference: each row dequantized once, then dotted with every token by [`dot`].
fn matmul_scalar(format: Format, w: &[u8], cols: usize, x: &[f32], t: usize, out: &mut [f32]) {
    let mut row = vec![0f32; cols];
    for (bytes, out) in w
        .chunks_exact(format.row_bytes(cols))
        .zip(out.chunks_exact_mut(t))
    {
        format.dequantize_row(bytes, &mut row);
        for (o, x) in out.iter_mut().zip(x.chunks_exact(cols)) {
            *o = dot(&row, x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD paths. Each keeps one accumulator vector per (row, token), adds the products
    //! of a row's weights `k..k + lanes` in order of `k`, and reduces the lanes at the end, the
    //! same way for one token and for a chunk; except that the one-token kernels
    //! ([`decode_avx512`], [`decode_rows8`]) take each block's scale and minimum out of the
    //! block's sum.

    use super::{Format, BLOCK, EXP_POLY, KEY_TILE, LN2_HI, LN2_LO, LOWEST_EXP_ARG};
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// How far ahead of the rows being read the AVX2 decode kernel asks for weights.
    const PREFETCH_AHEAD: usize = 2048;
    /// The same for the AVX-512 one.
    const PREFETCH_AHEAD_512: usize = 4096;
    /// How far ahead the AVX2 Q4_1 row-pair kernel ([`decode_pairs_q4_1`]) asks for its rows:
    /// it reads them faster than the other one-token kernels (about 2.0 ns a block-row at one
    /// thread), and 2 KiB ahead left it waiting on memory (2.07-2.11 ns; 3-5 KiB read alike).
    const PAIR_PREFETCH_AHEAD: usize = 4096;

    /// Asks for the cache line holding `w[at]` (nothing past the end of `w`).
    #[target_feature(enable = "sse")]
    fn prefetch(w: &[u8], at: usize) {
        if let Some(p) = w.get(at) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const u8 as *const i8);
        }
    }

    /// Asks for the cache line holding byte `at` of `w`, which may lie past its end: a prefetch
    /// is a hint that never faults, so no bounds check is spent on it in a kernel's loop.
    #[target_feature(enable = "sse")]
    fn prefetch_unchecked(w: &[u8], at: usize) {
        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(at) as *const i8);
    }

    /// Asks for every cache line of `w[at..at + len]` (nothing past the end of `w`): the one-token
    /// kernels' span of a block for their group of rows, some distance ahead.
    #[target_feature(enable = "sse")]
    fn prefetch_lines(w: &[u8], at: usize, len: usize) {
        let mut line = 0;
        while line < len {
            prefetch(w, at + line);
            line += 64;
        }
    }

    /// Rows computed together for one token (independent accumulators hide FMA latency).
    const DECODE_ROWS: usize = 4;
    /// Rows of one register tile in a chunk (both paths).
    const TILE_ROWS: usize = 4;
    /// Tokens of a tile with 16 vector registers (AVX2): 4 x 3 accumulators and the 3 tokens'
    /// vectors fill 15 (a 4 x 4 tile spilled its accumulators to memory and ran at a third of
    /// the speed).
    const TILE_TOKENS: usize = 3;
    /// Tokens of a tile with 32 vector registers (AVX-512): 4 x 4 accumulators, whose 16 sums
    /// [`reduce16`] reduces together (4 x 6, each reduced on its own, spent a fifth as many
    /// operations on the reductions as on the products at 576 columns).
    const TILE_TOKENS_512: usize = 4;

    thread_local! {
        /// Dequantized rows of a chunk's matmul, reused across calls on this thread.
        static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        /// The block sums of one token's activations (decode, AVX-512), each in lane 1 of an
        /// otherwise zero vector (where a Q4_1 header holds the minimum), reused across calls.
        static XSUMS4: RefCell<Vec<[f32; 4]>> = const { RefCell::new(Vec::new()) };
        /// The same sums for [`decode_rows8`], each in lane 1 of an otherwise zero vector
        /// (where a widened Q4_1 header holds the minimum), reused across calls.
        static XSUMS8: RefCell<Vec<[f32; 8]>> = const { RefCell::new(Vec::new()) };
        /// One token's activations as [`decode_pairs_q4_1`] reads them: per block, for each
        /// nibble position of a quant word, the weights' activations in word order (twice),
        /// scaled by the position's power of two; then the block sums as in `XSUMS8`, in
        /// lanes 1 and 5.
        static XNIBBLES: RefCell<Vec<[f32; 8]>> = const { RefCell::new(Vec::new()) };
    }

    /// The f16 scale (and for Q4_1 the minimum) of the block at `p`, as f32: `[d, m, _, _]`.
    ///
    /// # Safety
    /// `p` points at a whole block of the format (at least its 4 header bytes).
    #[target_feature(enable = "avx,f16c")]
    unsafe fn block_header(p: *const u8) -> __m128 {
        // SAFETY: the caller's block holds these 4 bytes; an unaligned read is allowed.
        let bits = unsafe { std::ptr::read_unaligned(p as *const u32) };
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
    }

    /// The 32 weights of block `b` as two 16-lane vectors (weights 0..16, 16..32).
    #[target_feature(enable = "avx512f,f16c")]
    fn block16(format: Format, b: &[u8]) -> [__m512; 2] {
        assert!(b.len() >= format.block_bytes(), "a whole block");
        // SAFETY: `b` holds a whole block, checked above.
        let (h, [q0, q1]) = unsafe { (block_header(b.as_ptr()), quants16_at(format, b.as_ptr())) };
        let d = _mm512_broadcastss_ps(h);
        match format {
            Format::Q4_1 => {
                let m = _mm512_broadcastss_ps(_mm_movehdup_ps(h));
                [_mm512_fmadd_ps(d, q0, m), _mm512_fmadd_ps(d, q1, m)]
            }
            Format::Q8_0 => [_mm512_mul_ps(d, q0), _mm512_mul_ps(d, q1)],
        }
    }

    /// 16 floats from `s[at..]`.
    #[target_feature(enable = "avx512f")]
    fn load16(s: &[f32], at: usize) -> __m512 {
        let s = &s[at..at + 16];
        // SAFETY: `s` holds the 16 floats read.
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    }

    /// See [`super::matmul_rows`]; the caller checked the sizes and AVX-512F with F16C.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) fn matmul_avx512(
        format: Format,
        w: &[u8],
        cols: usize,
        x: &[f32],
        t: usize,
        out: &mut [f32],
    ) {
        let row_bytes = format.row_bytes(cols);
        let bb = format.block_bytes();
        let rows = out.len() / t;
        if t == 1 {
            decode_avx512(format, w, cols, x, out);
            return;
        }
        ROWS.with_borrow_mut(|buf| {
            buf.resize(rows * cols, 0.0);
            for (bytes, dst) in w.chunks_exact(row_bytes).zip(buf.chunks_exact_mut(cols)) {
                for (b, dst) in bytes.chunks_exact(bb).zip(dst.chunks_exact_mut(BLOCK)) {
                    let [w0, w1] = block16(format, b);
                    // SAFETY: `dst` holds the block's 32 floats.
                    unsafe {
                        _mm512_storeu_ps(dst.as_mut_ptr(), w0);
                        _mm512_storeu_ps(dst.as_mut_ptr().add(16), w1);
                    }
                }
            }
            let mut tok = 0;
            while tok < t {
                let nt = (t - tok).min(TILE_TOKENS_512);
                let mut r = 0;
                while r < rows {
                    let nr = if rows - r >= TILE_ROWS { TILE_ROWS } else { 1 };
                    match (nr, nt) {
                        (TILE_ROWS, 4) => tile16_4x4(buf, x, cols, r, tok, t, out),
                        (TILE_ROWS, 3) => tile16::<TILE_ROWS, 3>(buf, x, cols, r, tok, t, out),
                        (TILE_ROWS, 2) => tile16::<TILE_ROWS, 2>(buf, x, cols, r, tok, t, out),
                        (TILE_ROWS, _) => tile16::<TILE_ROWS, 1>(buf, x, cols, r, tok, t, out),
                        (_, 4) => tile16::<1, 4>(buf, x, cols, r, tok, t, out),
                        (_, 3) => tile16::<1, 3>(buf, x, cols, r, tok, t, out),
                        (_, 2) => tile16::<1, 2>(buf, x, cols, r, tok, t, out),
                        _ => tile16::<1, 1>(buf, x, cols, r, tok, t, out),
                    }
                    r += nr;
                }
                tok += nt;
            }
        });
    }

    /// One token: `out[r] = Σ_k w[r][k] x[k]`, with each block's scale and minimum taken out of
    /// its sum: `Σ_k (d q_k + m) x_k = d Σ_k q_k x_k + m Σ_k x_k`. That saves two of the six
    /// vector floating-point operations per block and row (one thread is bound by them, not
    /// by memory). The `m` term is one multiply-add of the header `[d, m, 0, ..]` by the
    /// block's entry of `XSUMS4` (`[0, Σ x, 0, ..]`, the block sums of `x` computed once) into
    /// the row's accumulator, where it adds `m Σ x` to lane 1. The rounding differs from
    /// dequantize-then-dot as a reordered sum does. Rows go in groups of [`DECODE_ROWS`]
    /// (independent accumulators hide the FMA latency) through [`decode_rows16`], the last
    /// few one at a time.
    #[target_feature(enable = "avx512f,f16c,fma")]
    fn decode_avx512(format: Format, w: &[u8], cols: usize, x: &[f32], out: &mut [f32]) {
        let rows = out.len();
        XSUMS4.with_borrow_mut(|sums| {
            sums.clear();
            sums.extend(x.chunks_exact(BLOCK).map(|b| {
                let sum = _mm512_reduce_add_ps(_mm512_add_ps(load16(b, 0), load16(b, 16)));
                [0.0, sum, 0.0, 0.0]
            }));
            let mut r = 0;
            while r < rows {
                let n = if rows - r >= DECODE_ROWS {
                    DECODE_ROWS
                } else {
                    1
                };
                match (format, n) {
                    (Format::Q4_1, DECODE_ROWS) => {
                        decode_rows16::<DECODE_ROWS, true>(w, cols, r, x, sums, out)
                    }
                    (Format::Q4_1, _) => decode_rows16::<1, true>(w, cols, r, x, sums, out),
                    (Format::Q8_0, DECODE_ROWS) => {
                        decode_rows16::<DECODE_ROWS, false>(w, cols, r, x, sums, out)
                    }
                    (Format::Q8_0, _) => decode_rows16::<1, false>(w, cols, r, x, sums, out),
                }
                r += n;
            }
        });
    }

    /// Rows `r..r + N` of one token's matmul (see [`decode_avx512`]), the row count and the
    /// format fixed at compile time so that the accumulators stay in registers and the loop
    /// holds no branch on either; every line of the group's span is prefetched
    /// [`PREFETCH_AHEAD_512`] bytes ahead.
    #[target_feature(enable = "avx512f,f16c,fma")]
    fn decode_rows16<const N: usize, const Q4_1: bool>(
        w: &[u8],
        cols: usize,
        r: usize,
        x: &[f32],
        xsums: &[[f32; 4]],
        out: &mut [f32],
    ) {
        let format = if Q4_1 { Format::Q4_1 } else { Format::Q8_0 };
        let row_bytes = format.row_bytes(cols);
        let bb = format.block_bytes();
        let group = r * row_bytes;
        assert!((r + N) * row_bytes <= w.len() && cols <= x.len() && xsums.len() == cols / BLOCK);
        let mut acc = [_mm512_setzero_ps(); N];
        for (blk, xsum) in xsums.iter().enumerate() {
            let k = blk * BLOCK;
            let (x0, x1) = (load16(x, k), load16(x, k + 16));
            prefetch_lines(w, group + PREFETCH_AHEAD_512 + blk * N * bb, N * bb);
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r + i < r + N and blk < cols / BLOCK, so the block lies inside
                // `w` (asserted above).
                let p = unsafe { w.as_ptr().add((r + i) * row_bytes + blk * bb) };
                // SAFETY: `p` is a whole block of `format`.
                let (h, [q0, q1]) = unsafe { (block_header(p), quants16_at(format, p)) };
                let part = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
                *acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(h), part, *acc);
                if Q4_1 {
                    // SAFETY: `xsum` holds the 4 floats read.
                    let xsum = unsafe { _mm_loadu_ps(xsum.as_ptr()) };
                    *acc = _mm512_fmadd_ps(
                        _mm512_zextps128_ps512(h),
                        _mm512_zextps128_ps512(xsum),
                        *acc,
                    );
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            out[r + i] = _mm512_reduce_add_ps(*acc);
        }
    }

    /// The 32 quants of the block at `p` as f32 (Q4_1: 0..16, Q8_0: -128..128), in two 16-lane
    /// vectors, without the block's scale or minimum.
    ///
    /// # Safety
    /// `p` points at a whole block of `format`.
    #[target_feature(enable = "avx512f")]
    unsafe fn quants16_at(format: Format, p: *const u8) -> [__m512; 2] {
        match format {
            Format::Q4_1 => {
                // SAFETY: the block holds 16 bytes of nibbles after its 4-byte header.
                let q = unsafe { _mm_loadu_si128(p.add(4) as *const __m128i) };
                let bytes = _mm512_cvtepu8_epi32(q);
                let lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
                [
                    _mm512_cvtepi32_ps(lo),
                    _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(bytes)),
                ]
            }
            Format::Q8_0 => {
                // SAFETY: the block holds 32 signed bytes after its 2-byte scale.
                let (q0, q1) = unsafe {
                    (
                        _mm_loadu_si128(p.add(2) as *const __m128i),
                        _mm_loadu_si128(p.add(18) as *const __m128i),
                    )
                };
                let f = |q| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                [f(q0), f(q1)]
            }
        }
    }

    /// One register tile of a chunk: rows `r..r + NR` of the dequantized `buf` times tokens
    /// `tok..tok + NT` of `x`, into `out[row * t + token]`. Each (row, token) has its own
    /// accumulator, summed over `k` in order and reduced as the one-token kernel does.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn tile16<const NR: usize, const NT: usize>(
        buf: &[f32],
        x: &[f32],
        cols: usize,
        r: usize,
        tok: usize,
        t: usize,
        out: &mut [f32],
    ) {
        assert!((r + NR) * cols <= buf.len() && (tok + NT) * cols <= x.len());
        let (w, x) = (buf[r * cols..].as_ptr(), x[tok * cols..].as_ptr());
        let mut acc = [[_mm512_setzero_ps(); NT]; NR];
        for k in (0..cols).step_by(16) {
            // SAFETY: rows `r..r + NR` of `buf` and tokens `tok..tok + NT` of `x` are in
            // bounds (asserted above), and `k + 16 <= cols`.
            let xs: [__m512; NT] =
                std::array::from_fn(|j| unsafe { _mm512_loadu_ps(x.add(j * cols + k)) });
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let wv = unsafe { _mm512_loadu_ps(w.add(i * cols + k)) };
                for (acc, xv) in acc.iter_mut().zip(&xs) {
                    *acc = _mm512_fmadd_ps(wv, *xv, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate() {
                out[(r + i) * t + tok + j] = _mm512_reduce_add_ps(*acc);
            }
        }
    }

    /// [`tile16`] for 4 rows and 4 tokens, the 16 accumulators reduced together by
    /// [`reduce16`] and each row's 4 sums stored at once.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn tile16_4x4(
        buf: &[f32],
        x: &[f32],
        cols: usize,
        r: usize,
        tok: usize,
        t: usize,
        out: &mut [f32],
    ) {
        assert!((r + 4) * cols <= buf.len() && (tok + 4) * cols <= x.len());
        assert!((r + 3) * t + tok + 4 <= out.len());
        let (w, x) = (buf[r * cols..].as_ptr(), x[tok * cols..].as_ptr());
        let mut acc = [_mm512_setzero_ps(); 16];
        for k in (0..cols).step_by(16) {
            // SAFETY: rows `r..r + 4` of `buf` and tokens `tok..tok + 4` of `x` are in
            // bounds (asserted above), and `k + 16 <= cols`.
            let xs: [__m512; 4] =
                std::array::from_fn(|j| unsafe { _mm512_loadu_ps(x.add(j * cols + k)) });
            for i in 0..4 {
                // SAFETY: as above.
                let wv = unsafe { _mm512_loadu_ps(w.add(i * cols + k)) };
                for (j, xv) in xs.iter().enumerate() {
                    acc[i * 4 + j] = _mm512_fmadd_ps(wv, *xv, acc[i * 4 + j]);
                }
            }
        }
        let sums = reduce16(acc);
        for i in 0..4 {
            let row = &mut out[(r + i) * t + tok..][..4];
            let four = match i {
                0 => _mm512_extractf32x4_ps::<0>(sums),
                1 => _mm512_extractf32x4_ps::<1>(sums),
                2 => _mm512_extractf32x4_ps::<2>(sums),
                _ => _mm512_extractf32x4_ps::<3>(sums),
            };
            // SAFETY: `row` holds the 4 floats written.
            unsafe { _mm_storeu_ps(row.as_mut_ptr(), four) };
        }
    }

    /// The lane sums of 16 vectors as one vector (lane `n` is the sum of `v[n]`'s lanes), by a
    /// tree of shuffles and adds: 45 operations where 16 separate reductions take 128.
    #[target_feature(enable = "avx512f")]
    pub(super) fn reduce16(v: [__m512; 16]) -> __m512 {
        // Pairs: within each 128-bit lane, [a0+a2, b0+b2, a1+a3, b1+b3].
        let l1: [__m512; 8] = std::array::from_fn(|m| {
            let (a, b) = (v[2 * m], v[2 * m + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Pairs of pairs: within each 128-bit lane, one partial sum of each of 4 vectors.
        let l2: [__m512; 4] = std::array::from_fn(|m| {
            let (c, d) = (_mm512_castps_pd(l1[2 * m]), _mm512_castps_pd(l1[2 * m + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)),
            )
        });
        // Across 128-bit lanes: [e0+e1, e2+e3, f0+f1, f2+f3] in 128-bit chunks.
        let l3: [__m512; 2] = std::array::from_fn(|m| {
            let (e, f) = (l2[2 * m], l2[2 * m + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(e, f),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(e, f),
            )
        });
        // The same once more: 128-bit chunk c holds the sums of v[4c..4c + 4], in order.
        let (g, h) = (l3[0], l3[1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(g, h),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(g, h),
        )
    }

    /// [`tile16`] with 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn tile8<const NR: usize, const NT: usize>(
        buf: &[f32],
        x: &[f32],
        cols: usize,
        r: usize,
        tok: usize,
        t: usize,
        out: &mut [f32],
    ) {
        assert!((r + NR) * cols <= buf.len() && (tok + NT) * cols <= x.len());
        let (w, x) = (buf[r * cols..].as_ptr(), x[tok * cols..].as_ptr());
        let mut acc = [[_mm256_setzero_ps(); NT]; NR];
        for k in (0..cols).step_by(8) {
            // SAFETY: rows `r..r + NR` of `buf` and tokens `tok..tok + NT` of `x` are in
            // bounds (asserted above), and `k + 8 <= cols`.
            let xs: [__m256; NT] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_ps(x.add(j * cols + k)) });
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let wv = unsafe { _mm256_loadu_ps(w.add(i * cols + k)) };
                for (acc, xv) in acc.iter_mut().zip(&xs) {
                    *acc = _mm256_fmadd_ps(wv, *xv, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate() {
                out[(r + i) * t + tok + j] = sum8(*acc);
            }
        }
    }

    /// The 32 weights of block `b` as four 8-lane vectors (weights 0..8, .., 24..32).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block8(format: Format, b: &[u8]) -> [__m256; 4] {
        assert!(b.len() >= format.block_bytes(), "a whole block");
        // SAFETY: `b` holds a whole block, checked above.
        unsafe { block8_at(format, b.as_ptr()) }
    }

    /// [`block8`] of the block at `b`.
    ///
    /// # Safety
    /// `b` points at a whole block of `format`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block8_at(format: Format, b: *const u8) -> [__m256; 4] {
        // SAFETY: the caller's `b` is a whole block.
        let (dm, q) = unsafe { (header8_at(b), quants8_at(format, b)) };
        let d = _mm256_moveldup_ps(dm);
        match format {
            Format::Q4_1 => {
                let m = _mm256_movehdup_ps(dm);
                q.map(|q| _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), m))
            }
            Format::Q8_0 => q.map(|q| _mm256_mul_ps(d, _mm256_cvtepi32_ps(q))),
        }
    }

    /// The header of the block at `b` in every pair of lanes, widened to `[d, m, d, m, ..]`
    /// (for Q8_0 the odd lanes are its first two quants read as f16, and are not used).
    ///
    /// # Safety
    /// `b` points at a whole block (at least 4 bytes).
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn header8_at(b: *const u8) -> __m256 {
        // SAFETY: the block's first 4 bytes can be read, unaligned.
        let bits = unsafe { std::ptr::read_unaligned(b as *const u32) };
        _mm256_cvtph_ps(_mm_set1_epi32(bits as i32))
    }

    /// The 32 quants of the block at `b` as 32-bit integers (Q4_1: 0..16, Q8_0: -128..128),
    /// weights 0..8, .., 24..32, without the block's scale or minimum.
    ///
    /// # Safety
    /// `b` points at a whole block of `format`.
    #[target_feature(enable = "avx2")]
    unsafe fn quants8_at(format: Format, b: *const u8) -> [__m256i; 4] {
        match format {
            Format::Q4_1 => {
                // Bytes 0..8 and 8..16 widened to eight 32-bit lanes each: their low nibbles
                // are weights 0..8 and 8..16, their high nibbles weights 16..24 and 24..32.
                // SAFETY: the block holds 16 bytes of nibbles after its 4-byte header.
                let (q0, q1) = unsafe {
                    (
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.add(4) as *const __m128i)),
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.add(12) as *const __m128i)),
                    )
                };
                let nib = _mm256_set1_epi32(0x0F);
                [
                    _mm256_and_si256(q0, nib),
                    _mm256_and_si256(q1, nib),
                    _mm256_srli_epi32::<4>(q0),
                    _mm256_srli_epi32::<4>(q1),
                ]
            }
            Format::Q8_0 => {
                // SAFETY: the block holds 32 signed bytes after its 2-byte scale, 8 read at
                // a time.
                let q = |at: usize| unsafe {
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2 + at) as *const __m128i))
                };
                [q(0), q(8), q(16), q(24)]
            }
        }
    }

    /// 8 floats from `s[at..]`.
    #[target_feature(enable = "avx")]
    fn load8(s: &[f32], at: usize) -> __m256 {
        let s = &s[at..at + 8];
        // SAFETY: `s` holds the 8 floats read.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    /// The sum of the 8 lanes, in a fixed order.
    #[target_feature(enable = "avx")]
    fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// See [`super::matmul_rows`]; the caller checked the sizes and AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn matmul_avx2(
        format: Format,
        w: &[u8],
        cols: usize,
        x: &[f32],
        t: usize,
        out: &mut [f32],
    ) {
        let row_bytes = format.row_bytes(cols);
        let bb = format.block_bytes();
        let rows = out.len() / t;
        if t == 1 {
            XSUMS8.with_borrow_mut(|sums| {
                sums.clear();
                sums.extend(x.chunks_exact(BLOCK).map(|b| {
                    let s = _mm256_add_ps(
                        _mm256_add_ps(load8(b, 0), load8(b, 8)),
                        _mm256_add_ps(load8(b, 16), load8(b, 24)),
                    );
                    [0.0, sum8(s), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
                }));
                let mut r = 0;
                if format == Format::Q4_1 {
                    XNIBBLES.with_borrow_mut(|xn| {
                        nibble_activations(x, sums, xn);
                        while rows - r >= 2 {
                            decode_pairs_q4_1(w, cols, r, xn, out);
                            r += 2;
                        }
                    });
                }
                while r < rows {
                    let n = if rows - r >= DECODE_ROWS {
                        DECODE_ROWS
                    } else {
                        1
                    };
                    match (format, n) {
                        // The pairs above leave at most one Q4_1 row.
                        (Format::Q4_1, _) => decode_rows8::<1, true>(w, cols, r, x, sums, out),
                        (Format::Q8_0, DECODE_ROWS) => {
                            decode_rows8::<DECODE_ROWS, false>(w, cols, r, x, sums, out)
                        }
                        (Format::Q8_0, _) => decode_rows8::<1, false>(w, cols, r, x, sums, out),
                    }
                    r += n;
                }
            });
            return;
        }
        ROWS.with_borrow_mut(|buf| {
            buf.resize(rows * cols, 0.0);
            for (bytes, dst) in w.chunks_exact(row_bytes).zip(buf.chunks_exact_mut(cols)) {
                for (b, dst) in bytes.chunks_exact(bb).zip(dst.chunks_exact_mut(BLOCK)) {
                    for (i, wv) in block8(format, b).iter().enumerate() {
                        // SAFETY: `dst` holds the block's 32 floats.
                        unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(8 * i), *wv) };
                    }
                }
            }
            let mut tok = 0;
            while tok < t {
                let nt = (t - tok).min(TILE_TOKENS);
                let mut r = 0;
                while r < rows {
                    let nr = if rows - r >= TILE_ROWS { TILE_ROWS } else { 1 };
                    match (nr, nt) {
                        (TILE_ROWS, 3) => tile8::<TILE_ROWS, 3>(buf, x, cols, r, tok, t, out),
                        (TILE_ROWS, 2) => tile8::<TILE_ROWS, 2>(buf, x, cols, r, tok, t, out),
                        (TILE_ROWS, _) => tile8::<TILE_ROWS, 1>(buf, x, cols, r, tok, t, out),
                        (_, 3) => tile8::<1, 3>(buf, x, cols, r, tok, t, out),
                        (_, 2) => tile8::<1, 2>(buf, x, cols, r, tok, t, out),
                        _ => tile8::<1, 1>(buf, x, cols, r, tok, t, out),
                    }
                    r += nr;
                }
                tok += nt;
            }
        });
    }
    /// The power of two that nibble position `s` of a quant word is scaled by as it lies in the
    /// word (bits `4s..4s + 4`); the top one is shifted down to bits 0..4 first, so that no
    /// value reaches the sign bit.
    const fn nibble_scale(s: usize) -> f32 {
        if s == 7 {
            1.0
        } else {
            (1u32 << (4 * s)) as f32
        }
    }

    /// Arranges one token's activations for [`decode_pairs_q4_1`] into `xn`, a step of two
    /// blocks at a time (the last block alone when their number is odd): for each block of the
    /// step, 8 vectors (nibble position `s` of quant words 0..4: the weight `4w + s / 2`, or
    /// with 16 added for odd `s`, whose activation is divided by [`nibble_scale`]`(s)`, in
    /// lanes `w` and `4 + w`), then one vector of the step's block sums (from `sums`,
    /// `XSUMS8`'s lane 1) where the kernel's converted headers hold the minima: the first
    /// block's in lanes 1 and 5, the second's in lanes 3 and 7. Dividing by a power of two is
    /// exact (the activations are far from f32's smallest).
    #[target_feature(enable = "avx2")]
    fn nibble_activations(x: &[f32], sums: &[[f32; 8]], xn: &mut Vec<[f32; 8]>) {
        xn.clear();
        for (step, step_sums) in x.chunks(2 * BLOCK).zip(sums.chunks(2)) {
            let mut total = [0f32; 8];
            for (i, (block, sum)) in step.chunks_exact(BLOCK).zip(step_sums).enumerate() {
                for s in 0..8 {
                    let scale = nibble_scale(s);
                    xn.push(std::array::from_fn(|lane| {
                        block[4 * (lane % 4) + s / 2 + 16 * (s % 2)] / scale
                    }));
                }
                (total[1 + 2 * i], total[5 + 2 * i]) = (sum[1], sum[1]);
            }
            xn.push(total);
        }
    }

    /// Vectors of [`nibble_activations`] a step of two blocks: 8 a block, then the sums.
    const PAIR_STEP_VECTORS: usize = 2 * 8 + 1;

    /// `Σ q x` of one block for two rows, a register's halves (see [`decode_pairs_q4_1`]), as
    /// two partial sums: the even nibble positions' and the odd ones'.
    #[target_feature(enable = "avx2,fma")]
    fn pair_block_sums(q: __m256i, masks: &[__m256i; 7], xv: &[[f32; 8]]) -> (__m256, __m256) {
        let x = |s: usize| {
            // SAFETY: `xv` holds the block's 8 vectors of 8 floats (indexing checks it).
            unsafe { _mm256_loadu_ps(xv[s].as_ptr()) }
        };
        let nibble = |s: usize| {
            _mm256_cvtepi32_ps(if s == 7 {
                _mm256_srli_epi32::<28>(q)
            } else {
                _mm256_and_si256(q, masks[s])
            })
        };
        let mut even = _mm256_mul_ps(nibble(0), x(0));
        let mut odd = _mm256_mul_ps(nibble(1), x(1));
        for s in (2..8).step_by(2) {
            even = _mm256_fmadd_ps(nibble(s), x(s), even);
            odd = _mm256_fmadd_ps(nibble(s + 1), x(s + 1), odd);
        }
        (even, odd)
    }

    /// One step of [`decode_pairs_q4_1`]: the blocks at byte `a` of a row and of the next
    /// row (`row_bytes` on), and when `TWO` the block after each, accumulated into
    /// `acc` (the even positions' sums, the odd ones', the minima). `xv` is the step's part
    /// of [`nibble_activations`].
    ///
    /// # Safety
    /// The blocks read (both rows' block at `a`, and the next when `TWO`) lie inside `w`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pair_step<const TWO: bool>(
        w: &[u8],
        a: usize,
        row_bytes: usize,
        masks: &[__m256i; 7],
        xv: &[[f32; 8]],
        acc: &mut [__m256; 3],
    ) {
        // SAFETY: the caller's blocks hold these 4 header bytes; read unaligned.
        let header =
            |at: usize| unsafe { std::ptr::read_unaligned(w.as_ptr().add(at) as *const i32) };
        let bb = Format::Q4_1.block_bytes();
        let second = |at: usize| if TWO { header(at + bb) } else { 0 };
        // [d, m] of row r's first and second block, then row r + 1's (zero for no second).
        let heads = _mm256_cvtph_ps(_mm_setr_epi32(
            header(a),
            second(a),
            header(a + row_bytes),
            second(a + row_bytes),
        ));
        let scales = [
            _mm256_permute_ps::<0x00>(heads),
            _mm256_permute_ps::<0xAA>(heads),
        ];
        for (i, scale) in scales.into_iter().enumerate().take(if TWO { 2 } else { 1 }) {
            // SAFETY: block i of both rows lies inside `w` (the caller's promise).
            let q = unsafe {
                let pa = w.as_ptr().add(a + i * bb + 4);
                _mm256_loadu2_m128i(pa.add(row_bytes) as *const __m128i, pa as *const __m128i)
            };
            let (even, odd) = pair_block_sums(q, masks, &xv[8 * i..8 * i + 8]);
            acc[0] = _mm256_fmadd_ps(scale, even, acc[0]);
            acc[1] = _mm256_fmadd_ps(scale, odd, acc[1]);
        }
        let sums = &xv[if TWO { 16 } else { 8 }];
        // SAFETY: `sums` holds the 8 floats read.
        acc[2] = _mm256_fmadd_ps(heads, unsafe { _mm256_loadu_ps(sums.as_ptr()) }, acc[2]);
    }

    /// One token, Q4_1 rows `r` and `r + 1` of `w` together, a block's 16 quant bytes of each
    /// in one register's halves: nibble position `s` of every quant word is masked where it
    /// lies (`q 2^4s`, exact as an integer and as a float) and converted, and multiplied by the
    /// activations arranged for it ([`nibble_activations`], divided by `2^4s`), so no quant is
    /// widened or shifted (the top position once); the product is `q x`, rounded as ever.
    /// Two blocks make a step: the four headers (two rows, two blocks) are converted in one
    /// instruction, `[d, m]` of the first block then the second, row `r`'s in the low half;
    /// each block's scale is spread over its row's half by an in-lane shuffle, and one
    /// multiply-add against the step's block sums adds all four minima. The even and odd
    /// nibble positions' sums go to two accumulators (no add between them on the way). Same
    /// sums as a reordered sum of the reference; the activations and masks are read where
    /// used, so that the 16 registers hold a step's work without spilling. Each row's line
    /// [`PAIR_PREFETCH_AHEAD`] bytes ahead is asked for once a step (two blocks are 40 bytes,
    /// under a line, so every line is asked for).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn decode_pairs_q4_1(w: &[u8], cols: usize, r: usize, xn: &[[f32; 8]], out: &mut [f32]) {
        let row_bytes = Format::Q4_1.row_bytes(cols);
        let bb = Format::Q4_1.block_bytes();
        let blocks = cols / BLOCK;
        assert!(
            (r + 2) * row_bytes <= w.len()
                && xn.len() == blocks * 8 + blocks.div_ceil(2)
                && r + 2 <= out.len()
        );
        let masks: [__m256i; 7] = std::array::from_fn(|s| _mm256_set1_epi32(0xF << (4 * s)));
        let mut acc = [_mm256_setzero_ps(); 3];
        let (pairs, tail) = xn.split_at(blocks / 2 * PAIR_STEP_VECTORS);
        for (p, xv) in pairs.chunks_exact(PAIR_STEP_VECTORS).enumerate() {
            let a = r * row_bytes + 2 * p * bb;
            prefetch_unchecked(w, a + PAIR_PREFETCH_AHEAD);
            prefetch_unchecked(w, a + row_bytes + PAIR_PREFETCH_AHEAD);
            // SAFETY: 2p + 1 < blocks, so both rows' blocks 2p and 2p + 1 lie inside `w`.
            unsafe { pair_step::<true>(w, a, row_bytes, &masks, xv, &mut acc) };
        }
        if blocks % 2 == 1 {
            let a = r * row_bytes + (blocks - 1) * bb;
            // SAFETY: both rows' last block lies inside `w`.
            unsafe { pair_step::<false>(w, a, row_bytes, &masks, tail, &mut acc) };
        }
        let [even, odd, minima] = acc;
        let acc = _mm256_add_ps(_mm256_add_ps(even, odd), minima);
        let lo = _mm256_castps256_ps128(acc);
        let hi = _mm256_extractf128_ps::<1>(acc);
        out[r] = sum4(lo);
        out[r + 1] = sum4(hi);
    }

    /// The sum of 4 lanes, in a fixed order.
    #[target_feature(enable = "sse3")]
    fn sum4(v: __m128) -> f32 {
        let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// One token, rows `r..r + N` of `w`: `out[r + i] = Σ_k w[r + i][k] x[k]`, with each
    /// block's scale and minimum taken out of its sum, `Σ_k (d q_k + m) x_k = d Σ_k q_k x_k +
    /// m Σ_k x_k`: the block's quants times `x` in a fresh vector, then one multiply-add by
    /// `d` into the row's accumulator, and for Q4_1 one by the widened header `[d, m, ..]`
    /// against the block's entry of `xsums` (`[0, Σ x, 0, ..]`), which adds `m Σ x` to lane 1.
    /// That is two vector operations a block fewer than dequantizing first, and one thread is
    /// bound by those operations, not by memory. The rounding differs from a chunk's as a
    /// reordered sum does. `N` is a compile-time count, so the accumulators stay in registers;
    /// every line of the group's span is prefetched [`PREFETCH_AHEAD`] bytes ahead.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn decode_rows8<const N: usize, const Q4_1: bool>(
        w: &[u8],
        cols: usize,
        r: usize,
        x: &[f32],
        xsums: &[[f32; 8]],
        out: &mut [f32],
    ) {
        let format = if Q4_1 { Format::Q4_1 } else { Format::Q8_0 };
        let row_bytes = format.row_bytes(cols);
        let bb = format.block_bytes();
        let group = r * row_bytes;
        assert!((r + N) * row_bytes <= w.len() && cols <= x.len() && xsums.len() == cols / BLOCK);
        let mut acc = [_mm256_setzero_ps(); N];
        for (blk, xsum) in xsums.iter().enumerate() {
            let k = blk * BLOCK;
            let xs = [
                load8(x, k),
                load8(x, k + 8),
                load8(x, k + 16),
                load8(x, k + 24),
            ];
            prefetch_lines(w, group + PREFETCH_AHEAD + blk * N * bb, N * bb);
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r + i < r + N and blk < cols / BLOCK, so the block lies inside
                // `w` (asserted above).
                let b = unsafe { w.as_ptr().add((r + i) * row_bytes + blk * bb) };
                // SAFETY: `b` is a whole block of `format`.
                let (dm, q) = unsafe { (header8_at(b), quants8_at(format, b)) };
                let q = q.map(|q| _mm256_cvtepi32_ps(q));
                let part = _mm256_mul_ps(q[0], xs[0]);
                let part = _mm256_fmadd_ps(q[1], xs[1], part);
                let part = _mm256_fmadd_ps(q[2], xs[2], part);
                let part = _mm256_fmadd_ps(q[3], xs[3], part);
                *acc = _mm256_fmadd_ps(_mm256_moveldup_ps(dm), part, *acc);
                if Q4_1 {
                    // SAFETY: `xsum` holds the 8 floats read.
                    let xsum = unsafe { _mm256_loadu_ps(xsum.as_ptr()) };
                    *acc = _mm256_fmadd_ps(dm, xsum, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            out[r + i] = sum8(*acc);
        }
    }

    /// See [`super::approx_rows_q8_0`]: groups of [`DECODE_ROWS`] rows share each block's
    /// activation loads; the rest one at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn approx_rows_q8_0_avx2(
        w: &[u8],
        cols: usize,
        xq: &[i16],
        scales: &[f32],
        out: &mut [f32],
    ) {
        let mut r = 0;
        while r < out.len() {
            if out.len() - r >= DECODE_ROWS {
                approx_group::<DECODE_ROWS>(w, cols, r, xq, scales, out);
                r += DECODE_ROWS;
            } else {
                approx_group::<1>(w, cols, r, xq, scales, out);
                r += 1;
            }
        }
    }

    /// Rows `r..r + N` of [`approx_rows_q8_0_avx2`]: per block, a row's 32 quants widened to
    /// 16 bits (two loads), multiplied and pair-summed against the activations (`vpmaddwd`),
    /// the two halves added, converted, and scaled by `d s` into the row's accumulator.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn approx_group<const N: usize>(
        w: &[u8],
        cols: usize,
        r: usize,
        xq: &[i16],
        scales: &[f32],
        out: &mut [f32],
    ) {
        let row_bytes = Format::Q8_0.row_bytes(cols);
        let bb = Format::Q8_0.block_bytes();
        let group = r * row_bytes;
        assert!((r + N) * row_bytes <= w.len() && r + N <= out.len());
        assert!(xq.len() == cols && scales.len() == cols / BLOCK);
        let mut acc = [_mm256_setzero_ps(); N];
        for (blk, (xb, s)) in xq.chunks_exact(BLOCK).zip(scales).enumerate() {
            // SAFETY: `xb` holds the block's 32 16-bit activations, read as two vectors.
            let (x0, x1) = unsafe {
                (
                    _mm256_loadu_si256(xb.as_ptr() as *const __m256i),
                    _mm256_loadu_si256(xb.as_ptr().add(16) as *const __m256i),
                )
            };
            let s = _mm256_set1_ps(*s);
            prefetch_lines(w, group + PREFETCH_AHEAD + blk * N * bb, N * bb);
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r + i < r + N and blk < cols / BLOCK, so the block (2 scale
                // bytes, 32 quant bytes) lies inside `w` (asserted above); read unaligned.
                let (d, q0, q1) = unsafe {
                    let b = w.as_ptr().add((r + i) * row_bytes + blk * bb);
                    (
                        _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(b as *const i16))),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(2) as *const __m128i)),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(18) as *const __m128i)),
                    )
                };
                let sum = _mm256_add_epi32(_mm256_madd_epi16(q0, x0), _mm256_madd_epi16(q1, x1));
                *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, s), _mm256_cvtepi32_ps(sum), *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            out[r + i] = sum8(*acc);
        }
    }

    /// Widest head these kernels keep in registers (16 vectors of 16 or 8 lanes).
    const MAX_VECTORS: usize = 16;

    /// See [`super::exp_shifted`]: whole vectors of 16 from the start of `x`; returns how
    /// many floats it did. The same operations as [`super::exp_reference`], lane by lane.
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_shifted_avx512(x: &mut [f32], shift: f32) -> usize {
        let (shift, lowest) = (_mm512_set1_ps(shift), _mm512_set1_ps(LOWEST_EXP_ARG));
        let (log2e, hi, lo) = (
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(LN2_HI),
            _mm512_set1_ps(LN2_LO),
        );
        let whole = x.len() / 16 * 16;
        for v in x[..whole].chunks_exact_mut(16) {
            // SAFETY: `v` holds 16 floats.
            let a = unsafe { _mm512_loadu_ps(v.as_ptr()) };
            let a = _mm512_max_ps(_mm512_sub_ps(a, shift), lowest);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(a, log2e),
            );
            let r = _mm512_fnmadd_ps(n, lo, _mm512_fnmadd_ps(n, hi, a));
            let mut y = _mm512_set1_ps(EXP_POLY[0]);
            for &p in &EXP_POLY[1..] {
                y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(p));
            }
            let y = _mm512_add_ps(
                _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r),
                _mm512_set1_ps(1.0),
            );
            let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            ));
            let e = _mm512_mul_ps(y, _mm512_castsi512_ps(two_n));
            // SAFETY: as the load.
            unsafe { _mm512_storeu_ps(v.as_mut_ptr(), e) };
        }
        whole
    }

    /// See [`super::tile_scores`]; the caller checked the sizes and AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) fn tile_scores_avx512(q: &[f32], tile: &[f32], scale: f32, out: &mut [f32]) {
        const LANES: usize = 16;
        let mut acc = [_mm512_setzero_ps(); KEY_TILE / LANES];
        for (&qd, row) in q.iter().zip(tile.chunks_exact(KEY_TILE)) {
            let qd = _mm512_set1_ps(qd);
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(qd, load16(row, LANES * i), *acc);
            }
        }
        let scale = _mm512_set1_ps(scale);
        for (acc, out) in acc.iter().zip(out.chunks_exact_mut(LANES)) {
            // SAFETY: `out` holds KEY_TILE floats, in chunks of LANES.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(*acc, scale)) };
        }
    }

    /// See [`super::weighted_sum`]; `out.len()` is a multiple of 16 and AVX-512F is there.
    #[target_feature(enable = "avx512f")]
    pub(super) fn weighted_sum_avx512(p: &[f32], values: &[f32], out: &mut [f32]) {
        let hd = out.len();
        if hd / 16 > MAX_VECTORS {
            return weighted_sum_wide(p, values, out);
        }
        let mut acc = [_mm512_setzero_ps(); MAX_VECTORS];
        for (&p, v) in p.iter().zip(values.chunks_exact(hd)) {
            let p = _mm512_set1_ps(p);
            for (i, acc) in acc.iter_mut().enumerate().take(hd / 16) {
                *acc = _mm512_fmadd_ps(p, load16(v, 16 * i), *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate().take(hd / 16) {
            // SAFETY: `out` holds `hd` floats, a multiple of 16.
            unsafe { _mm512_storeu_ps(out[16 * i..16 * i + 16].as_mut_ptr(), *acc) };
        }
    }

    /// See [`super::exp_shifted`]: whole vectors of 8 from the start of `x`; returns how many
    /// floats it did. The same operations as [`super::exp_reference`], lane by lane.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted_avx2(x: &mut [f32], shift: f32) -> usize {
        let (shift, lowest) = (_mm256_set1_ps(shift), _mm256_set1_ps(LOWEST_EXP_ARG));
        let (log2e, hi, lo) = (
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(LN2_HI),
            _mm256_set1_ps(LN2_LO),
        );
        let whole = x.len() / 8 * 8;
        for v in x[..whole].chunks_exact_mut(8) {
            let a = load8(v, 0);
            let a = _mm256_max_ps(_mm256_sub_ps(a, shift), lowest);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(a, log2e),
            );
            let r = _mm256_fnmadd_ps(n, lo, _mm256_fnmadd_ps(n, hi, a));
            let mut y = _mm256_set1_ps(EXP_POLY[0]);
            for &p in &EXP_POLY[1..] {
                y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(p));
            }
            let y = _mm256_add_ps(
                _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r),
                _mm256_set1_ps(1.0),
            );
            let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            let e = _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
            // SAFETY: `v` holds 8 floats.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), e) };
        }
        whole
    }

    /// See [`super::tile_scores`]; the caller checked the sizes and AVX2 with FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn tile_scores_avx2(q: &[f32], tile: &[f32], scale: f32, out: &mut [f32]) {
        const LANES: usize = 8;
        let mut acc = [_mm256_setzero_ps(); KEY_TILE / LANES];
        for (&qd, row) in q.iter().zip(tile.chunks_exact(KEY_TILE)) {
            let qd = _mm256_set1_ps(qd);
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(qd, load8(row, LANES * i), *acc);
            }
        }
        let scale = _mm256_set1_ps(scale);
        for (acc, out) in acc.iter().zip(out.chunks_exact_mut(LANES)) {
            // SAFETY: `out` holds KEY_TILE floats, in chunks of LANES.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(*acc, scale)) };
        }
    }

    /// See [`super::weighted_sum`]; `out.len()` is a multiple of 8 and AVX2 with FMA is there.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weighted_sum_avx2(p: &[f32], values: &[f32], out: &mut [f32]) {
        let hd = out.len();
        if hd / 8 > MAX_VECTORS {
            return weighted_sum_wide(p, values, out);
        }
        let mut acc = [_mm256_setzero_ps(); MAX_VECTORS];
        for (&p, v) in p.iter().zip(values.chunks_exact(hd)) {
            let p = _mm256_set1_ps(p);
            for (i, acc) in acc.iter_mut().enumerate().take(hd / 8) {
                *acc = _mm256_fmadd_ps(p, load8(v, 8 * i), *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate().take(hd / 8) {
            // SAFETY: `out` holds `hd` floats, a multiple of 8.
            unsafe { _mm256_storeu_ps(out[8 * i..8 * i + 8].as_mut_ptr(), *acc) };
        }
    }

    /// See [`super::tile_scores_group`]: `G` heads, each key row loaded once for all of them;
    /// each head's sums are the chains [`tile_scores_avx512`] computes.
    #[target_feature(enable = "avx512f")]
    pub(super) fn tile_scores_group_avx512<const G: usize>(
        qs: &[f32],
        tile: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        const LANES: usize = 16;
        let hd = tile.len() / KEY_TILE;
        assert!(qs.len() == G * hd && out.len() == G * KEY_TILE);
        let mut acc = [[_mm512_setzero_ps(); KEY_TILE / LANES]; G];
        for (d, row) in tile.chunks_exact(KEY_TILE).enumerate() {
            let keys: [__m512; KEY_TILE / LANES] = std::array::from_fn(|i| load16(row, LANES * i));
            for (h, acc) in acc.iter_mut().enumerate() {
                let qd = _mm512_set1_ps(qs[h * hd + d]);
                for (acc, k) in acc.iter_mut().zip(&keys) {
                    *acc = _mm512_fmadd_ps(qd, *k, *acc);
                }
            }
        }
        let scale = _mm512_set1_ps(scale);
        for (acc, out) in acc.iter().zip(out.chunks_exact_mut(KEY_TILE)) {
            for (acc, out) in acc.iter().zip(out.chunks_exact_mut(LANES)) {
                // SAFETY: `out` holds LANES floats.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(*acc, scale)) };
            }
        }
    }

    /// See [`super::weighted_sum_group`]: `G` heads of `V` vectors each, each value row loaded
    /// once for all of them; each head's sums are the chains [`weighted_sum_avx512`] computes.
    #[target_feature(enable = "avx512f")]
    pub(super) fn weighted_sum_group_avx512<const G: usize, const V: usize>(
        p: &[f32],
        p_stride: usize,
        values: &[f32],
        out: &mut [f32],
        out_stride: usize,
    ) {
        let hd = 16 * V;
        let n = values.len() / hd;
        assert!(n <= p_stride && p.len() >= (G - 1) * p_stride + n);
        assert!(out.len() >= (G - 1) * out_stride + hd);
        let mut acc = [[_mm512_setzero_ps(); V]; G];
        for (j, v) in values.chunks_exact(hd).enumerate() {
            let v: [__m512; V] = std::array::from_fn(|i| load16(v, 16 * i));
            for (h, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(p[h * p_stride + j]);
                for (acc, v) in acc.iter_mut().zip(&v) {
                    *acc = _mm512_fmadd_ps(w, *v, *acc);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let out = &mut out[h * out_stride..h * out_stride + hd];
            for (acc, out) in acc.iter().zip(out.chunks_exact_mut(16)) {
                // SAFETY: `out` holds 16 floats.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *acc) };
            }
        }
    }

    /// Heads wider than the registers hold: accumulate in `out` itself (same order of `j`).
    fn weighted_sum_wide(p: &[f32], values: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        for (&p, v) in p.iter().zip(values.chunks_exact(out.len())) {
            for (o, &v) in out.iter_mut().zip(v) {
                *o = p.mul_add(v, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    /// `rows` rows of `cols` weights in `format`, with varied scales and values.
    fn matrix(format: Format, rows: usize, cols: usize) -> Vec<u8> {
        let mut data = Vec::new();
        for r in 0..rows {
            for b in 0..cols / BLOCK {
                let d = 0.01 + 0.003 * ((r * 5 + b * 3) % 11) as f32;
                data.extend(f16_bytes(d));
                match format {
                    Format::Q4_1 => {
                        data.extend(f16_bytes(-8.0 * d + 0.001 * b as f32));
                        data.extend((0..16).map(|j| ((r * 7 + j * 13 + b) % 256) as u8));
                    }
                    Format::Q8_0 => {
                        data.extend((0..32).map(|j| ((r * 29 + j * 11 + b * 3) % 256) as u8));
                    }
                }
            }
        }
        data
    }

    fn activations(t: usize, cols: usize) -> Vec<f32> {
        (0..t * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    /// Each row times each token in f64, from the reference dequantization.
    fn exact(format: Format, w: &[u8], cols: usize, x: &[f32]) -> Vec<f64> {
        let mut row = vec![0f32; cols];
        let mut out = Vec::new();
        for bytes in w.chunks_exact(format.row_bytes(cols)) {
            format.dequantize_row(bytes, &mut row);
            for x in x.chunks_exact(cols) {
                out.push(row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum());
            }
        }
        out
    }

    #[test]
    fn q4_1_blocks_dequantize_as_ggml_defines_them() {
        // d = 0.5, m = -1: low nibbles are weights 0..16, high nibbles weights 16..32.
        let mut block = Vec::new();
        block.extend(f16_bytes(0.5));
        block.extend(f16_bytes(-1.0));
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        dequantize_q4_1_row(&block, &mut out);
        assert_eq!(out[0], -1.0);
        assert_eq!(out[3], 0.5);
        assert_eq!(out[16], 6.5, "high nibble of byte 0 is 15");
        assert_eq!(out[31], -1.0);
    }

    #[test]
    fn every_path_this_machine_runs_matches_the_reference() {
        let available = Isa::available();
        assert_eq!(available.last(), Some(&Isa::Scalar));
        for isa in available {
            for format in [Format::Q4_1, Format::Q8_0] {
                // 11 rows (tiles of 4 plus a remainder), 3 blocks, 1 to 6 tokens.
                let (rows, cols) = (11, 96);
                let w = matrix(format, rows, cols);
                for t in [1, 2, 5, 6] {
                    let x = activations(t, cols);
                    let mut out = vec![0f32; rows * t];
                    matmul_rows(isa, format, &w, cols, &x, &mut out);
                    for (i, (got, want)) in out.iter().zip(exact(format, &w, cols, &x)).enumerate()
                    {
                        let err = (*got as f64 - want).abs();
                        assert!(
                            err <= 1e-5 * want.abs().max(1.0),
                            "{isa:?} {format:?} t={t} entry {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_sums_reduced_together_land_in_order() {
        if !Isa::Avx512.supported() {
            return;
        }
        use std::arch::x86_64::*;
        // Whole numbers, so any order of the additions gives the same bits.
        let rows: Vec<[f32; 16]> = (0..16)
            .map(|n| std::array::from_fn(|l| (n * 100 + l * l) as f32))
            .collect();
        // SAFETY: AVX-512F was checked above; each row holds the 16 floats loaded.
        let sums: [f32; 16] = unsafe {
            let v = std::array::from_fn(|n| _mm512_loadu_ps(rows[n].as_ptr()));
            std::mem::transmute(x86::reduce16(v))
        };
        for (n, row) in rows.iter().enumerate() {
            assert_eq!(sums[n], row.iter().sum::<f32>(), "vector {n}");
        }
    }

    #[test]
    fn one_token_and_a_chunk_agree_on_every_path() {
        // The SIMD one-token kernels take each block's scale and minimum out of its sum, so
        // they round as a reordered sum would; the scalar path gives the chunk's bits.
        for isa in Isa::available() {
            for format in [Format::Q4_1, Format::Q8_0] {
                let (rows, cols, t) = (9, 128, 7);
                let w = matrix(format, rows, cols);
                let x = activations(t, cols);
                let mut chunk = vec![0f32; rows * t];
                matmul_rows(isa, format, &w, cols, &x, &mut chunk);
                for tok in 0..t {
                    let mut one = vec![0f32; rows];
                    matmul_rows(isa, format, &w, cols, &x[tok * cols..][..cols], &mut one);
                    let exact = exact(format, &w, cols, &x[tok * cols..][..cols]);
                    for r in 0..rows {
                        let (a, b) = (one[r], chunk[r * t + tok]);
                        if isa != Isa::Scalar {
                            assert!(
                                (a - b).abs() as f64 <= 1e-5 * (1.0 + exact[r].abs()),
                                "{isa:?} {format:?} row {r} token {tok}: {a} against {b}"
                            );
                        } else {
                            assert_eq!(a.to_bits(), b.to_bits(), "{isa:?} {format:?} row {r}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_scalar_path_is_dequantize_then_dot() {
        let (rows, cols) = (3, 64);
        let w = matrix(Format::Q8_0, rows, cols);
        let x = activations(2, cols);
        let mut out = vec![0f32; rows * 2];
        matmul_rows(Isa::Scalar, Format::Q8_0, &w, cols, &x, &mut out);
        let mut row = vec![0f32; cols];
        dequantize_q8_0_row(&w[68..136], &mut row);
        assert_eq!(out[3], dot(&row, &x[cols..]));
    }

    #[test]
    #[should_panic(expected = "partial weight row")]
    fn a_partial_row_is_refused() {
        let w = matrix(Format::Q4_1, 2, 64);
        let mut out = vec![0f32; 2];
        matmul_rows(
            Isa::Scalar,
            Format::Q4_1,
            &w[..50],
            64,
            &[0.0; 64],
            &mut out,
        );
    }

    #[test]
    fn attention_kernels_match_the_reference_on_every_path() {
        for hd in [2, 8, 64] {
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.37).sin()).collect();
            let tile = activations(hd, KEY_TILE);
            let mut scalar = vec![0f32; KEY_TILE];
            tile_scores(Isa::Scalar, &q, &tile, 0.125, &mut scalar);
            for isa in Isa::available() {
                let mut got = vec![0f32; KEY_TILE];
                tile_scores(isa, &q, &tile, 0.125, &mut got);
                assert_eq!(got, scalar, "{isa:?} hd={hd}: every path the same bits");
                for (j, g) in got.iter().enumerate() {
                    let want: f64 = (0..hd)
                        .map(|d| q[d] as f64 * tile[d * KEY_TILE + j] as f64)
                        .sum::<f64>()
                        * 0.125;
                    assert!((*g as f64 - want).abs() < 1e-5, "{isa:?} hd={hd} key {j}");
                }
                let n = 37;
                let values = activations(n, hd);
                let p: Vec<f32> = (0..n).map(|j| 1.0 / (j + 1) as f32).collect();
                let mut out = vec![0f32; hd];
                weighted_sum(isa, &p, &values, &mut out);
                for (i, o) in out.iter().enumerate() {
                    let want: f64 = (0..n)
                        .map(|j| p[j] as f64 * values[j * hd + i] as f64)
                        .sum();
                    assert!((*o as f64 - want).abs() < 1e-5, "{isa:?} hd={hd} dim {i}");
                }
            }
        }
    }

    #[test]
    fn a_group_of_heads_gets_the_bits_of_one_call_a_head() {
        for (heads, hd) in [
            (1, 64),
            (2, 64),
            (3, 64),
            (4, 64),
            (2, 128),
            (3, 8),
            (5, 64),
        ] {
            let qs: Vec<f32> = (0..heads * hd).map(|i| (i as f32 * 0.37).sin()).collect();
            let tile = activations(hd, KEY_TILE);
            let n = 45;
            let values = activations(n, hd);
            let p: Vec<f32> = (0..heads * KEY_TILE)
                .map(|j| 1.0 / (j + 1) as f32)
                .collect();
            for isa in Isa::available() {
                let mut group = vec![0f32; heads * KEY_TILE];
                tile_scores_group(isa, &qs, &tile, 0.125, &mut group);
                let stride = hd + 2;
                let mut sums = vec![-1f32; heads * stride];
                weighted_sum_group(isa, &p, KEY_TILE, &values, hd, &mut sums, stride);
                for h in 0..heads {
                    let mut one = vec![0f32; KEY_TILE];
                    tile_scores(isa, &qs[h * hd..][..hd], &tile, 0.125, &mut one);
                    assert_eq!(
                        group[h * KEY_TILE..][..KEY_TILE],
                        one,
                        "{isa:?} {heads}x{hd}"
                    );
                    let mut o = vec![0f32; hd];
                    weighted_sum(isa, &p[h * KEY_TILE..][..n], &values, &mut o);
                    assert_eq!(sums[h * stride..][..hd], o, "{isa:?} {heads}x{hd} head {h}");
                    assert_eq!(sums[h * stride + hd..][..2], [-1.0, -1.0], "stride kept");
                }
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_and_the_same_bits_on_every_path() {
        // Every argument a softmax can give, 0 down past the clamp, on a fine grid.
        let xs: Vec<f32> = (0..=100_000).map(|i| -(i as f32) * 0.001).collect();
        let mut worst = 0f64;
        for &x in &xs {
            let (got, want) = (exp_reference(x) as f64, (x as f64).exp());
            if want > f32::MIN_POSITIVE as f64 * 4.0 {
                let ulp = (want as f32).next_up() as f64 - want as f32 as f64;
                worst = worst.max((got - want).abs() / ulp);
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_reference(0.0), 1.0);
        assert!(exp_reference(-1000.0) > 0.0 && exp_reference(-1000.0) < 1.2e-38);
        for isa in Isa::available() {
            // An odd length: whole vectors, then the scalar tail.
            let input: Vec<f32> = xs[..1003].iter().map(|x| x + 0.5).collect();
            let want: Vec<f32> = input.iter().map(|&v| exp_reference(v - 0.5)).collect();
            let mut got = input.clone();
            exp_shifted(isa, &mut got, 0.5);
            assert_eq!(got, want, "{isa:?}");
        }
    }

    #[test]
    #[should_panic(expected = "the tile does not match the query")]
    fn a_tile_of_the_wrong_size_is_refused() {
        tile_scores(
            Isa::Scalar,
            &[0.0; 8],
            &[0.0; 8 * KEY_TILE - 1],
            1.0,
            &mut [0.0; KEY_TILE],
        );
    }
}
