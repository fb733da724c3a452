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
        // Computed weight row by weight row (each row dequantized once for all t tokens), then
        // transposed to token-major.
        let mut by_row = vec![0f32; self.rows * t];
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
        // Token by token gives the same bits.
        for tok in 0..3 {
            let one = xt.narrow(0, tok, 1).unwrap();
            let row = m.forward(&one).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(row[0], all[tok]);
        }
    }
}
