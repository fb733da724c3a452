//! Weight matrix times activations, in f32, one weight row at a time.
//!
//! [`Matrix`] keeps Q4_1 and Q8_0 weights as the host maps them (zero-copy); any other type is
//! dequantized to f32 once, at load. [`Matrix::forward`] computes `x · Wᵀ` for a chunk of token
//! rows: every output element is one weight row dequantized to f32 and dotted with one
//! activation row by [`dot`], in a fixed order. Two properties follow, and the quality oracle
//! relies on both:
//! - the result does not depend on the chunk size or the thread count, so a prompt run in one
//!   chunk gives bit for bit what it gives token by token;
//! - activations stay f32 all the way (candle's and ggml's quantized matmuls round them to 8
//!   bits first). A rounding step is a cliff: with it, reordering a single f32 sum upstream flips
//!   some roundings and moves logits by hundredths of a nat, as much as f16 activations do.
//!   Without it, reordered f32 work moves a logit by about 1e-6 nats, and lossy arithmetic
//!   stands out.

use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

/// Weight rows computed per parallel task.
const ROWS_PER_TASK: usize = 16;

/// Bytes of one Q4_1 block (f16 scale, f16 minimum, 16 bytes of 4-bit values) and of one Q8_0
/// block (f16 scale, 32 signed bytes); both hold 32 weights.
pub const Q4_1_BLOCK_BYTES: usize = 20;
/// See [`Q4_1_BLOCK_BYTES`].
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Weights per Q4_1 or Q8_0 block.
pub const BLOCK: usize = 32;

/// How a matrix's weights are stored.
#[derive(Debug)]
pub enum Weights {
    /// ggml Q4_1 blocks: weight = d * q + m, q in 0..16.
    Q4_1(&'static [u8]),
    /// ggml Q8_0 blocks: weight = d * q, q in -128..128.
    Q8_0(&'static [u8]),
    /// Plain f32, row-major.
    F32(Vec<f32>),
}

/// A `(rows, cols)` weight matrix (GGUF dims `[cols, rows]`).
#[derive(Debug)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    weights: Weights,
}

/// Dot product with eight independent partial sums (vectorizable, and always in the same order).
///
/// This order is the contract the oracle's bits rest on: lane `i` sums `a[j] * b[j]` for
/// `j % 8 == i` front to back (a multiply, then an add: never fused), the lanes are combined as
/// [`combine`] does, and the products of a tail shorter than 8 are added last. [`Matrix::forward`]
/// computes many dot products at once, but each one in exactly this order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xs, ys) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = tail_sum(xs.remainder(), ys.remainder());
    for (x, y) in xs.zip(ys) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    combine(&acc, tail)
}

/// The products of the last `len % 8` elements, summed front to back.
fn tail_sum(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The eight partial sums of [`dot`], combined pairwise, then the tail.
#[inline(always)]
fn combine(acc: &[f32; 8], tail: f32) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Weight rows and token rows of one register tile: `TILE_ROWS x TILE_TOKENS` dot products
/// advance together, so each weight vector loaded serves several tokens and each token vector
/// several rows.
pub(crate) const TILE_ROWS: usize = 2;
/// See [`TILE_ROWS`].
pub(crate) const TILE_TOKENS: usize = 4;

/// `out[r][t] = dot(w[r], x[t])` for a tile of up to `TILE_ROWS` weight rows and `TILE_TOKENS`
/// token rows (`cols` long each): the portable kernel, one [`dot`] at a time.
fn tile_generic(
    w: &[&[f32]],
    x: &[&[f32]],
    cols: usize,
    out: &mut [[f32; TILE_TOKENS]; TILE_ROWS],
) {
    for (r, w) in w.iter().enumerate() {
        for (t, x) in x.iter().enumerate() {
            out[r][t] = dot(&w[..cols], &x[..cols]);
        }
    }
}

/// [`tile_generic`] with AVX2: a full tile keeps its 2 x 4 dot products in eight 8-lane
/// registers, lane `i` of register `(r, t)` being [`dot`]'s `acc[i]` for that pair. Each step
/// multiplies, then adds (FMA is never used: it rounds once where `dot` rounds twice), so every
/// result has `dot`'s bits. A partial tile (the edges of a matrix) uses the portable kernel.
///
/// # Safety
/// The CPU must support AVX2 (checked by [`Kernel::detect`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(
    w: &[&[f32]],
    x: &[&[f32]],
    cols: usize,
    out: &mut [[f32; TILE_TOKENS]; TILE_ROWS],
) {
    use std::arch::x86_64::*;
    if w.len() != TILE_ROWS || x.len() != TILE_TOKENS {
        return tile_generic(w, x, cols, out);
    }
    // Every pointer below reads at most `whole <= cols` floats from a row this checks.
    assert!(w.iter().chain(x).all(|row| row.len() >= cols));
    let whole = cols / 8 * 8;
    let (w0, w1) = (w[0].as_ptr(), w[1].as_ptr());
    let (x0, x1, x2, x3) = (x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr());
    let mut acc = [_mm256_setzero_ps(); TILE_ROWS * TILE_TOKENS];
    let mut k = 0;
    while k < whole {
        // SAFETY: k + 8 <= whole <= cols <= every row's length (asserted above); loadu needs
        // no alignment.
        let (a, b) = unsafe { (_mm256_loadu_ps(w0.add(k)), _mm256_loadu_ps(w1.add(k))) };
        let xs = unsafe {
            [
                _mm256_loadu_ps(x0.add(k)),
                _mm256_loadu_ps(x1.add(k)),
                _mm256_loadu_ps(x2.add(k)),
                _mm256_loadu_ps(x3.add(k)),
            ]
        };
        for t in 0..TILE_TOKENS {
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(a, xs[t]));
            acc[TILE_TOKENS + t] = _mm256_add_ps(acc[TILE_TOKENS + t], _mm256_mul_ps(b, xs[t]));
        }
        k += 8;
    }
    let mut tails = [[0f32; TILE_TOKENS]; TILE_ROWS];
    for (r, tails) in tails.iter_mut().enumerate() {
        for (t, tail) in tails.iter_mut().enumerate() {
            *tail = tail_sum(&w[r][whole..cols], &x[t][whole..cols]);
        }
    }
    // SAFETY: the CPU has AVX2 (this function's contract).
    unsafe { combine_tile_avx2(&acc, &tails, out) };
}

/// [`combine`] for a whole tile of 8-lane accumulators (`acc[r * TILE_TOKENS + t]`), four dot
/// products at once and in its order: the halves' sum gives each product's (a0 + a4, a1 + a5,
/// a2 + a6, a3 + a7); two horizontal adds then give ((a0 + a4) + (a1 + a5)) + ((a2 + a6) +
/// (a3 + a7)); the tails are added last.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn combine_tile_avx2(
    acc: &[std::arch::x86_64::__m256; TILE_ROWS * TILE_TOKENS],
    tails: &[[f32; TILE_TOKENS]; TILE_ROWS],
    out: &mut [[f32; TILE_TOKENS]; TILE_ROWS],
) {
    use std::arch::x86_64::*;
    const _: () = assert!(TILE_TOKENS == 4, "one 4-lane vector per weight row");
    for r in 0..TILE_ROWS {
        // (No closures here: they would not inherit this function's AVX2.)
        let mut halves = [_mm_setzero_ps(); TILE_TOKENS];
        for (t, half) in halves.iter_mut().enumerate() {
            let a = acc[r * TILE_TOKENS + t];
            *half = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        }
        let sums = _mm_hadd_ps(
            _mm_hadd_ps(halves[0], halves[1]),
            _mm_hadd_ps(halves[2], halves[3]),
        );
        // SAFETY: `tails[r]` and `out[r]` hold 4 floats each; loadu/storeu need no alignment.
        unsafe {
            let tails = _mm_loadu_ps(tails[r].as_ptr());
            _mm_storeu_ps(out[r].as_mut_ptr(), _mm_add_ps(sums, tails));
        }
    }
}

/// Which compilation of the tile kernel this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The fastest kernel the CPU supports.
    pub(crate) fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Kernel::Avx2;
        }
        Kernel::Generic
    }

    /// `out[r][t] = dot(w[r], x[t])` for up to `TILE_ROWS` rows and `TILE_TOKENS` tokens.
    pub(crate) fn tile(
        self,
        w: &[&[f32]],
        x: &[&[f32]],
        cols: usize,
        out: &mut [[f32; TILE_TOKENS]; TILE_ROWS],
    ) {
        match self {
            Kernel::Generic => tile_generic(w, x, cols, out),
            // SAFETY: `Avx2` is only chosen by `detect` on a CPU that has AVX2.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { tile_avx2(w, x, cols, out) },
        }
    }

    /// `outs[t] = sum over j of probs[t][j] * values[j]` for up to `TILE_TOKENS` rows of
    /// probabilities (`values` holds rows of `outs[t].len()` floats, at least as many as the
    /// longest `probs[t]`), each element summed over `j` front to back from 0.0, a multiply
    /// then an add: the attention's weighted sum of values, for several queries at once.
    pub(crate) fn weighted_sums(self, probs: &[&[f32]], values: &[f32], outs: &mut [&mut [f32]]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` is only chosen by `detect` on a CPU that has AVX2.
            Kernel::Avx2 => unsafe { weighted_sums_avx2(probs, values, outs) },
            _ => weighted_sums_generic(probs, values, outs),
        }
    }
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

/// The portable [`Kernel::weighted_sums`]: one query at a time.
fn weighted_sums_generic(probs: &[&[f32]], values: &[f32], outs: &mut [&mut [f32]]) {
    for (probs, out) in probs.iter().zip(outs.iter_mut()) {
        let width = out.len();
        out.fill(0.0);
        for (&p, v) in probs.iter().zip(values.chunks_exact(width)) {
            for (o, &v) in out.iter_mut().zip(v) {
                *o += p * v;
            }
        }
    }
}

/// [`Kernel::weighted_sums`] with AVX2: sixteen output elements of every query in registers at
/// a time (two 8-lane vectors each), each pair of value vectors loaded once for all of them.
/// Each lane sums its own element over `j` in order from 0.0, multiply then add, so the bits are
/// those of the portable code.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weighted_sums_avx2(probs: &[&[f32]], values: &[f32], outs: &mut [&mut [f32]]) {
    let n = probs.len();
    let width = outs.first().map_or(0, |o| o.len());
    if n == 0
        || n > TILE_TOKENS
        || !width.is_multiple_of(16)
        || outs.len() != n
        || outs.iter().any(|o| o.len() != width)
    {
        return weighted_sums_generic(probs, values, outs);
    }
    let longest = probs.iter().map(|p| p.len()).max().unwrap_or(0);
    // Every load below reads row j < longest of `values`, elements `lane..lane + 16 <= width`.
    assert!(values.len() >= longest * width);
    // SAFETY (all four): the CPU has AVX2 (this function's contract); n is the const N.
    unsafe {
        match n {
            1 => weighted_sums_avx2_n::<1>(probs, values, outs, width, longest),
            2 => weighted_sums_avx2_n::<2>(probs, values, outs, width, longest),
            3 => weighted_sums_avx2_n::<3>(probs, values, outs, width, longest),
            _ => weighted_sums_avx2_n::<4>(probs, values, outs, width, longest),
        }
    }
}

/// [`weighted_sums_avx2`] for exactly `N` queries, so that the `2 N` accumulators live in
/// registers. Keys every query sees are summed without a per-query test; the few that only the
/// later queries of a causal tile see follow, query by query, still in order of `j`.
///
/// # Safety
/// The CPU must support AVX2; `probs` and `outs` hold `N` entries, every out is `width` long
/// (a multiple of 16), and `values` holds at least `longest` rows of `width`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weighted_sums_avx2_n<const N: usize>(
    probs: &[&[f32]],
    values: &[f32],
    outs: &mut [&mut [f32]],
    width: usize,
    longest: usize,
) {
    use std::arch::x86_64::*;
    let probs = &probs[..N];
    let common = probs.iter().map(|p| p.len()).min().unwrap_or(0);
    for lane in (0..width).step_by(16) {
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for j in 0..common {
            // SAFETY: j < longest and lane + 16 <= width (the caller's contract).
            let v = unsafe {
                let row = values.as_ptr().add(j * width + lane);
                [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))]
            };
            for t in 0..N {
                // SAFETY: j < common <= probs[t].len().
                let p = _mm256_set1_ps(unsafe { *probs[t].get_unchecked(j) });
                acc[t][0] = _mm256_add_ps(acc[t][0], _mm256_mul_ps(p, v[0]));
                acc[t][1] = _mm256_add_ps(acc[t][1], _mm256_mul_ps(p, v[1]));
            }
        }
        for j in common..longest {
            // SAFETY: as above.
            let v = unsafe {
                let row = values.as_ptr().add(j * width + lane);
                [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))]
            };
            for t in 0..N {
                if let Some(&p) = probs[t].get(j) {
                    let p = _mm256_set1_ps(p);
                    acc[t][0] = _mm256_add_ps(acc[t][0], _mm256_mul_ps(p, v[0]));
                    acc[t][1] = _mm256_add_ps(acc[t][1], _mm256_mul_ps(p, v[1]));
                }
            }
        }
        for (t, out) in outs.iter_mut().enumerate().take(N) {
            // SAFETY: lane + 16 <= width = out.len(); storeu needs no alignment.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr().add(lane), acc[t][0]);
                _mm256_storeu_ps(out.as_mut_ptr().add(lane + 8), acc[t][1]);
            }
        }
    }
}

impl Matrix {
    /// A matrix over `weights`, which must hold exactly `rows * cols` weights (the caller
    /// checks sizes against the tensor's dims; `cols` is a whole number of blocks).
    pub fn new(weights: Weights, rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            weights,
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Writes weight row `r`, dequantized, into `out` (`cols` long).
    fn row_into(&self, r: usize, out: &mut [f32]) {
        match &self.weights {
            Weights::Q4_1(data) => {
                let bytes = self.cols / BLOCK * Q4_1_BLOCK_BYTES;
                dequantize_q4_1_row(&data[r * bytes..(r + 1) * bytes], out);
            }
            Weights::Q8_0(data) => {
                let bytes = self.cols / BLOCK * Q8_0_BLOCK_BYTES;
                dequantize_q8_0_row(&data[r * bytes..(r + 1) * bytes], out);
            }
            Weights::F32(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
        }
    }

    /// `x · Wᵀ`: `x` is `(t, cols)` f32, the result `(t, rows)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (t, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!(
                "matmul: input rows of {cols}, the weights expect {}",
                self.cols
            );
        }
        let x: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let kernel = Kernel::detect();
        let mut by_row = vec![0f32; self.rows * t];
        if t < TILE_TOKENS {
            // Decode: too few tokens to fill a tile. One weight row at a time, one buffer per
            // task, nothing else allocated.
            by_row
                .par_chunks_mut(ROWS_PER_TASK * t)
                .enumerate()
                .for_each(|(task, out)| {
                    let mut w = vec![0f32; self.cols];
                    for (i, out) in out.chunks_exact_mut(t).enumerate() {
                        self.row_into(task * ROWS_PER_TASK + i, &mut w);
                        for (o, x) in out.iter_mut().zip(x.chunks_exact(self.cols)) {
                            *o = dot(&w, x);
                        }
                    }
                });
            return self.token_major(&by_row, t);
        }
        // Computed ROWS_PER_TASK weight rows at a time (each dequantized once for all t tokens),
        // in register tiles of rows x tokens, then transposed to token-major.
        let x: Vec<&[f32]> = x.chunks_exact(self.cols).collect();
        by_row
            .par_chunks_mut(ROWS_PER_TASK * t)
            .enumerate()
            .for_each(|(task, out)| {
                let rows = out.len() / t;
                let mut w = vec![0f32; rows * self.cols];
                for (i, w) in w.chunks_exact_mut(self.cols).enumerate() {
                    self.row_into(task * ROWS_PER_TASK + i, w);
                }
                let w: Vec<&[f32]> = w.chunks_exact(self.cols).collect();
                let mut tile = [[0f32; TILE_TOKENS]; TILE_ROWS];
                for t0 in (0..t).step_by(TILE_TOKENS) {
                    let xs = &x[t0..(t0 + TILE_TOKENS).min(t)];
                    for r0 in (0..rows).step_by(TILE_ROWS) {
                        let ws = &w[r0..(r0 + TILE_ROWS).min(rows)];
                        kernel.tile(ws, xs, self.cols, &mut tile);
                        for (r, values) in tile.iter().enumerate().take(ws.len()) {
                            let row = &mut out[(r0 + r) * t..(r0 + r + 1) * t];
                            row[t0..t0 + xs.len()].copy_from_slice(&values[..xs.len()]);
                        }
                    }
                }
            });
        self.token_major(&by_row, t)
    }

    /// `by_row` (`rows x t`, one weight row's outputs for every token together) as the
    /// `(t, rows)` tensor the model expects.
    fn token_major(&self, by_row: &[f32], t: usize) -> candle_core::Result<Tensor> {
        let mut out = vec![0f32; t * self.rows];
        for (r, values) in by_row.chunks_exact(t).enumerate() {
            for (tok, &v) in values.iter().enumerate() {
                out[tok * self.rows + r] = v;
            }
        }
        Tensor::from_vec(out, (t, self.rows), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
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
    fn matmul_matches_plain_arithmetic_and_ignores_chunking() {
        // A 20 x 64 Q8_0 matrix (2 blocks per row) times 3 token rows.
        let (rows, cols) = (20, 64);
        let mut data = Vec::new();
        for r in 0..rows {
            for b in 0..2 {
                data.extend(f16_bytes(0.25 * (b + 1) as f32));
                data.extend((0..32).map(|j| ((r * 7 + j * 3 + b) % 17) as u8 ^ 0x80));
            }
        }
        let data: &'static [u8] = Vec::leak(data);
        let m = Matrix::new(Weights::Q8_0(data), rows, cols);
        let x: Vec<f32> = (0..3 * cols).map(|i| (i % 11) as f32 * 0.1 - 0.5).collect();
        let xt = Tensor::from_vec(x.clone(), (3, cols), &Device::Cpu).unwrap();
        let all = m.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
        let mut w = vec![0f32; cols];
        for r in 0..rows {
            dequantize_q8_0_row(&data[r * 68..(r + 1) * 68], &mut w);
            for tok in 0..3 {
                let expect: f64 = w
                    .iter()
                    .zip(&x[tok * cols..])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!((all[tok][r] as f64 - expect).abs() < 1e-3, "row {r}");
            }
        }
        // Every output is dot()'s bits exactly, whichever kernel ran.
        for r in 0..rows {
            dequantize_q8_0_row(&data[r * 68..(r + 1) * 68], &mut w);
            for tok in 0..3 {
                assert_eq!(
                    all[tok][r].to_bits(),
                    dot(&w, &x[tok * cols..(tok + 1) * cols]).to_bits()
                );
            }
        }
        // Token by token gives the same bits.
        for tok in 0..3 {
            let one = xt.narrow(0, tok, 1).unwrap();
            let row = m.forward(&one).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(row[0], all[tok]);
        }
    }

    /// Pseudo-random f32s of mixed signs and magnitudes (so that the order of a sum matters).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                unit * (1 << ((state >> 20) % 12)) as f32
            })
            .collect()
    }

    #[test]
    fn every_kernel_gives_the_portable_weighted_sums_bits() {
        let kernels = [Kernel::Generic, Kernel::detect()];
        // Widths with 16-wide steps and without; queries seeing the same keys and a causal
        // tile's (one more key each), and keys that only some queries see.
        for width in [16, 64, 24] {
            for (first, extra) in [(1, 1), (7, 1), (40, 1), (5, 0), (3, 9)] {
                for n in 1..=TILE_TOKENS {
                    let lens: Vec<usize> = (0..n).map(|t| first + t * extra).collect();
                    let longest = lens.iter().copied().max().unwrap_or(0);
                    let values = noise(longest * width, (width * 31 + first) as u64);
                    let probs: Vec<Vec<f32>> = lens
                        .iter()
                        .enumerate()
                        .map(|(t, &len)| noise(len, (97 + t * 13 + first) as u64))
                        .collect();
                    let probs: Vec<&[f32]> = probs.iter().map(|p| p.as_slice()).collect();
                    let mut want = vec![vec![0f32; width]; n];
                    let mut want_refs: Vec<&mut [f32]> =
                        want.iter_mut().map(|o| o.as_mut_slice()).collect();
                    weighted_sums_generic(&probs, &values, &mut want_refs);
                    for kernel in kernels {
                        let mut got = vec![vec![f32::NAN; width]; n];
                        let mut got_refs: Vec<&mut [f32]> =
                            got.iter_mut().map(|o| o.as_mut_slice()).collect();
                        kernel.weighted_sums(&probs, &values, &mut got_refs);
                        for (t, (got, want)) in got.iter().zip(&want).enumerate() {
                            let same = got
                                .iter()
                                .zip(want)
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{kernel:?} width {width} lens {lens:?} query {t}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_gives_dots_bits_on_every_tile_shape() {
        let kernels = [Kernel::Generic, Kernel::detect()];
        // Lengths with and without a tail; tiles full and partial.
        for cols in [8, 64, 576, 1536, 13, 37] {
            let w = noise(TILE_ROWS * cols, cols as u64);
            let x = noise(TILE_TOKENS * cols, 1000 + cols as u64);
            let ws: Vec<&[f32]> = w.chunks_exact(cols).collect();
            let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
            for kernel in kernels {
                for rows in 1..=TILE_ROWS {
                    for tokens in 1..=TILE_TOKENS {
                        let mut out = [[f32::NAN; TILE_TOKENS]; TILE_ROWS];
                        kernel.tile(&ws[..rows], &xs[..tokens], cols, &mut out);
                        for r in 0..rows {
                            for t in 0..tokens {
                                assert_eq!(
                                    out[r][t].to_bits(),
                                    dot(ws[r], xs[t]).to_bits(),
                                    "{kernel:?} cols {cols} tile {rows}x{tokens} at ({r}, {t})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
