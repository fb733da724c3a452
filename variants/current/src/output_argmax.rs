//! Decode's greedy token without every logit computed exactly.
//!
//! The output layer (SmolLM2's tied Q8_0 embedding, 49,152 rows) is about a sixth of a
//! token's work at one thread, and decode needs only its argmax. [`OutputBound`] first runs
//! every row against the activations rounded to 16-bit integers
//! ([`kernels::approx_rows_q8_0`]: exact integer sums, about 11 vector operations a block-row
//! where the exact kernel takes 16), and bounds each row's distance from its exact value by the
//! largest block scale times the row's L1 norm, made at load ([`kernels::q8_0_row_l1`]). Only
//! the rows whose upper bound reaches the best lower bound can be the argmax; those alone are
//! computed exactly, by the full layer's kernel, and the first of the largest wins, as
//! [`crate::generate::argmax`] picks it over the whole row. So the token is the full layer's,
//! bit for bit: every other row's exact value lies strictly below the best row's.
//!
//! (Experiment 80 bounded 8-bit activations the same way: one large activation made the bound
//! cover most rows. 16-bit steps are 256 times finer.)

use crate::kernels::{self, Format, Isa};
use crate::matmul::{Matrix, Weights};

/// Candidates beyond this share of the rows (and beyond [`MIN_CANDIDATE_LIMIT`]) send the
/// token to the full layer: a bound that spares little is not worth its pass.
const MAX_CANDIDATE_SHARE: usize = 16;

/// Candidates always allowed, however few the rows.
const MIN_CANDIDATE_LIMIT: usize = 64;

/// A parallel task of the bound's pass is a whole number of this many rows (the kernel's
/// row groups).
const ROWS_PER_TASK: usize = 16;

/// An output layer's row norms, and the buffers of one token's bound pass.
#[derive(Debug)]
pub struct OutputBound {
    /// `Σ |w|` of each row, rounded up.
    l1: Vec<f32>,
    /// The token's activations as 16-bit integers, and each block's scale.
    xq: Vec<i16>,
    scales: Vec<f32>,
    /// Each row's approximate value.
    approx: Vec<f32>,
}

impl OutputBound {
    /// The bound for `output` whose full layer runs on `isa`, where it applies: Q8_0 weights
    /// on the AVX2 path, whose kernel computes the candidates (AVX-512 keeps the full layer).
    pub fn for_matrix(output: &Matrix, isa: Isa) -> Option<Self> {
        let Weights::Q8_0(data) = output.weights() else {
            return None;
        };
        if isa != Isa::Avx2 || !isa.supported() {
            return None;
        }
        let row_bytes = Format::Q8_0.row_bytes(output.cols());
        Some(Self {
            l1: data
                .chunks_exact(row_bytes)
                .map(kernels::q8_0_row_l1)
                .collect(),
            xq: Vec::new(),
            scales: Vec::new(),
            approx: Vec::new(),
        })
    }

    /// The index of the largest of `output`'s rows times `x` (one token, `output.cols()`
    /// floats), the first if several are equal: the (AVX2) full layer's argmax. `None` when the
    /// bound spares too little (or an activation is not finite): then compute the full layer.
    pub fn argmax(&mut self, output: &Matrix, x: &[f32]) -> Option<u32> {
        let Weights::Q8_0(data) = output.weights() else {
            return None;
        };
        let cols = output.cols();
        let row_bytes = Format::Q8_0.row_bytes(cols);
        let top_scale = kernels::quantize_i16(x, &mut self.xq, &mut self.scales)?;
        self.approx.resize(output.rows(), 0.0);
        let (xq, scales) = (&self.xq, &self.scales);
        let pool = crate::pool::global();
        // One long run of rows a thread: a stream the prefetcher follows (as decode's matmuls).
        let per_task = output
            .rows()
            .div_ceil(pool.threads())
            .next_multiple_of(ROWS_PER_TASK);
        pool.for_chunks(&mut self.approx, per_task, |first, out| {
            let w = &data[first * row_bytes..(first + out.len()) * row_bytes];
            kernels::approx_rows_q8_0(Isa::Avx2, w, cols, xq, scales, out);
        });
        let best_low = self
            .approx
            .iter()
            .zip(&self.l1)
            .map(|(a, l1)| a - top_scale * l1)
            .fold(f32::NEG_INFINITY, f32::max);
        let candidates = self
            .approx
            .iter()
            .zip(&self.l1)
            .enumerate()
            .filter(|(_, (a, l1))| *a + top_scale * *l1 >= best_low)
            .map(|(r, _)| r);
        let limit = (output.rows() / MAX_CANDIDATE_SHARE).max(MIN_CANDIDATE_LIMIT);
        let (mut best, mut best_value, mut seen) = (0, f32::NEG_INFINITY, 0);
        for r in candidates {
            seen += 1;
            if seen > limit {
                return None;
            }
            let mut exact = [0f32];
            let row = &data[r * row_bytes..(r + 1) * row_bytes];
            kernels::matmul_rows(Isa::Avx2, Format::Q8_0, row, cols, x, &mut exact);
            if exact[0] > best_value {
                (best, best_value) = (r, exact[0]);
            }
        }
        (seen > 0).then_some(best as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::BLOCK;
    use half::f16;

    /// `rows` Q8_0 rows of `cols` with varied scales and quants; rows 3 and 7 are the same, so
    /// their products tie exactly, and four times the others' scale.
    fn output(rows: usize, cols: usize) -> Matrix {
        let mut data = Vec::new();
        for r in 0..rows {
            let r = if r == 7 { 3 } else { r };
            for b in 0..cols / BLOCK {
                let d =
                    (0.004 + 0.001 * ((r * 5 + b * 3) % 7) as f32) * if r == 3 { 4.0 } else { 1.0 };
                data.extend(f16::from_f32(d).to_le_bytes());
                data.extend((0..32).map(|j| ((r * 29 + j * 11 + b * 7) % 255) as u8));
            }
        }
        Matrix::new(Weights::Q8_0(Vec::leak(data)), rows, cols)
    }

    /// The full layer's products, as decode computes them on the AVX2 path.
    fn full(output: &Matrix, x: &[f32]) -> Vec<f32> {
        let Weights::Q8_0(data) = output.weights() else {
            unreachable!()
        };
        let mut out = vec![0f32; output.rows()];
        kernels::matmul_rows(Isa::Avx2, Format::Q8_0, data, output.cols(), x, &mut out);
        out
    }

    /// The AVX2 bound for `m`, checked to exist exactly where AVX2 runs (never for Scalar).
    fn avx2_bound(m: &Matrix) -> Option<OutputBound> {
        let bound = OutputBound::for_matrix(m, Isa::Avx2);
        assert!(OutputBound::for_matrix(m, Isa::Scalar).is_none());
        assert_eq!(bound.is_some(), Isa::Avx2.supported(), "a Q8_0 layer");
        bound
    }

    #[test]
    fn the_token_is_the_full_layers_argmax() {
        let (rows, cols) = (96, 128);
        let m = output(rows, cols);
        if let Some(mut bound) = avx2_bound(&m) {
            for seed in 0..80 {
                // One large activation in a varying place, as the real model's final norm has.
                let x: Vec<f32> = (0..cols)
                    .map(|k| ((k * 37 + seed * 13) % 101) as f32 * 0.02 - 1.0)
                    .enumerate()
                    .map(|(k, v)| if k == (seed * 7) % cols { v * 40.0 } else { v })
                    .collect();
                let logits = full(&m, &x);
                assert_eq!(
                    bound.argmax(&m, &x),
                    Some(crate::generate::argmax(&logits)),
                    "seed {seed}"
                );
            }
        }
    }

    #[test]
    fn a_row_the_rounding_puts_second_still_wins() {
        // Two blocks; x's one large activation (50) makes block 0's step 50 / 32767, so 0.0007
        // rounds to 0 steps and 0.0008 to 1. Rows 2 and 5 share 100 x 50 and differ there:
        // row 5 has quant 2 at the 0.0007 (exactly 0.0014 d more, 0 after rounding), row 2
        // quant 1 at the 0.0008 (0.0008 d more, one step after rounding). Exactly, row 5
        // leads; rounded, row 2 does.
        let (rows, cols) = (8, 64);
        let mut data = Vec::new();
        for r in 0..rows {
            for b in 0..2 {
                let big = r == 2 || r == 5;
                data.extend(f16::from_f32(if big { 0.05 } else { 0.01 }).to_le_bytes());
                let mut q = [((r * 7 + b) % 5) as i8; 32];
                if b == 0 && big {
                    q = [0; 32];
                    q[0] = 100;
                    q[if r == 5 { 10 } else { 11 }] = if r == 5 { 2 } else { 1 };
                }
                data.extend(q.map(|q| q as u8));
            }
        }
        let data: &'static [u8] = Vec::leak(data);
        let m = Matrix::new(Weights::Q8_0(data), rows, cols);
        if let Some(mut bound) = avx2_bound(&m) {
            let mut x = vec![0f32; cols];
            (x[0], x[10], x[11]) = (50.0, 0.0007, 0.0008);
            let exact = full(&m, &x);
            let (mut xq, mut scales) = (Vec::new(), Vec::new());
            kernels::quantize_i16(&x, &mut xq, &mut scales).unwrap();
            let mut approx = vec![0f32; rows];
            kernels::approx_rows_q8_0(Isa::Avx2, data, cols, &xq, &scales, &mut approx);
            assert!(
                exact[5] > exact[2] && approx[2] > approx[5],
                "{exact:?} {approx:?}"
            );
            assert_eq!(crate::generate::argmax(&exact), 5);
            assert_eq!(bound.argmax(&m, &x), Some(5));
        }
    }

    #[test]
    fn an_exact_tie_goes_to_the_first_row() {
        let (rows, cols) = (96, 128);
        let m = output(rows, cols);
        if let Some(mut bound) = avx2_bound(&m) {
            // Rows 3 and 7 are equal; row 3's own weights as the activations make them lead.
            let Weights::Q8_0(data) = m.weights() else {
                unreachable!()
            };
            let row_bytes = Format::Q8_0.row_bytes(cols);
            let mut x = vec![0f32; cols];
            kernels::dequantize_q8_0_row(&data[3 * row_bytes..4 * row_bytes], &mut x);
            let logits = full(&m, &x);
            assert_eq!(logits[3], logits[7]);
            assert_eq!(crate::generate::argmax(&logits), 3, "the tie leads");
            assert_eq!(bound.argmax(&m, &x), Some(crate::generate::argmax(&logits)));
        }
    }

    #[test]
    fn every_row_lies_within_its_bound() {
        let (rows, cols) = (40, 256);
        let m = output(rows, cols);
        if avx2_bound(&m).is_some() {
            let Weights::Q8_0(data) = m.weights() else {
                unreachable!()
            };
            let row_bytes = Format::Q8_0.row_bytes(cols);
            let x: Vec<f32> = (0..cols)
                .map(|k| ((k * 53) % 97) as f32 * 0.03 - 1.4 + if k == 17 { 50.0 } else { 0.0 })
                .collect();
            let (mut xq, mut scales) = (Vec::new(), Vec::new());
            let top = kernels::quantize_i16(&x, &mut xq, &mut scales).unwrap();
            let mut simd = vec![0f32; rows];
            let mut scalar = vec![0f32; rows];
            kernels::approx_rows_q8_0(Isa::Avx2, data, cols, &xq, &scales, &mut simd);
            kernels::approx_rows_q8_0(Isa::Scalar, data, cols, &xq, &scales, &mut scalar);
            let exact = full(&m, &x);
            let xmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for r in 0..rows {
                let l1 = kernels::q8_0_row_l1(&data[r * row_bytes..(r + 1) * row_bytes]);
                let err = (exact[r] - simd[r]).abs();
                // Within the quantization's 0.51 share of the bound: the rest is the f32 room.
                assert!(err <= 0.51 * top * l1, "row {r}: {err} vs {}", top * l1);
                // The same sums as the reference, to f32 rounding of terms up to max|x| l1.
                assert!((simd[r] - scalar[r]).abs() <= 1e-6 * xmax * l1, "row {r}");
            }
        }
    }

    #[test]
    fn activations_that_are_not_finite_take_the_full_layer() {
        let m = output(8, 64);
        if let Some(mut bound) = avx2_bound(&m) {
            let mut x = vec![0.5f32; 64];
            x[9] = f32::NAN;
            assert_eq!(bound.argmax(&m, &x), None);
            x[9] = f32::INFINITY;
            assert_eq!(bound.argmax(&m, &x), None);
        }
    }
}
