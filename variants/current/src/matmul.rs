//! Weight matrix times activations, in f32, one weight row at a time.
//!
//! [`Matrix`] keeps Q4_1 and Q8_0 weights as the host maps them (zero-copy); any other type is
//! dequantized to f32 once, at load. [`Matrix::forward`] computes `x · Wᵀ` for a chunk of token
//! rows: every output element is one weight row, dequantized to f32, dotted with one activation
//! row in a fixed order, by the fastest [`crate::kernels`] path this machine runs. Two
//! properties follow:
//! - the result does not depend on the chunk size or the thread count, except that the SIMD
//!   one-token kernels take each block's scale out of its sum, which rounds as a reordered sum
//!   does (about 1e-7 relative): a prompt run in one chunk gives what it gives token by token to
//!   that rounding (the oracle, variants/baseline, keeps the bit-for-bit version);
//! - activations stay f32 all the way (candle's and ggml's quantized matmuls round them to 8
//!   bits first). A rounding step is a cliff: with it, reordering a single f32 sum upstream flips
//!   some roundings and moves logits by hundredths of a nat, as much as f16 activations do.
//!   Without it, reordered f32 work moves a logit by about 1e-6 nats, and lossy arithmetic
//!   stands out.

use candle_core::{Device, Tensor};

pub use crate::kernels::{
    dequantize_q4_1_row, dequantize_q8_0_row, dot, BLOCK, Q4_1_BLOCK_BYTES, Q8_0_BLOCK_BYTES,
};
use crate::kernels::{matmul_rows, Format, Isa};

/// Weight rows computed per parallel task of a chunk of tokens (prefill): its dequantized rows
/// stay in the thread's cache while every token uses them.
const ROWS_PER_TASK: usize = 16;

/// Tasks per thread for one token (decode), which is a stream through the weights: one long
/// run of consecutive rows per thread, which the hardware prefetcher follows (on the 2-core VM,
/// `host bench` tg128 went from 67 t/s with 16-row tasks to 75 with 4 runs per thread and 104
/// with one).
const DECODE_TASKS_PER_THREAD: usize = 1;

/// Rows per task for `t` tokens of a matrix of `rows` rows on `threads` threads.
fn rows_per_task(rows: usize, t: usize, threads: usize) -> usize {
    if t > 1 {
        return ROWS_PER_TASK;
    }
    rows.div_ceil(threads * DECODE_TASKS_PER_THREAD)
        .next_multiple_of(ROWS_PER_TASK)
}

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

    /// The weights as stored (the GPU path uploads them).
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The kernel path and bytes of quantized weights (`None` for f32 weights).
    fn quantized(&self) -> Option<(Isa, Format, &'static [u8])> {
        match self.weights {
            Weights::Q4_1(data) => Some((Isa::best(), Format::Q4_1, data)),
            Weights::Q8_0(data) => Some((Isa::best(), Format::Q8_0, data)),
            Weights::F32(_) => None,
        }
    }

    /// Weight rows `first..first + out.len() / t` times the `t` token rows of `x`, written row
    /// by row (`out[r * t + tok]`).
    fn rows_into(&self, first: usize, x: &[f32], t: usize, out: &mut [f32]) {
        let n = out.len() / t;
        match (&self.weights, self.quantized()) {
            (_, Some((isa, format, data))) => {
                let bytes = format.row_bytes(self.cols);
                let w = &data[first * bytes..(first + n) * bytes];
                matmul_rows(isa, format, w, self.cols, x, out);
            }
            (Weights::F32(w), None) => {
                let w = &w[first * self.cols..(first + n) * self.cols];
                for (row, out) in w.chunks_exact(self.cols).zip(out.chunks_exact_mut(t)) {
                    for (o, x) in out.iter_mut().zip(x.chunks_exact(self.cols)) {
                        *o = dot(row, x);
                    }
                }
            }
            _ => unreachable!("quantized() is None only for f32 weights"),
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
        let mut out = vec![0f32; t * self.rows];
        matmul_many(&[self], &x, &mut [&mut out]);
        Tensor::from_vec(out, (t, self.rows), &Device::Cpu)
    }
}

/// Several matrices over the same input in one parallel step: `outs[i] = x · mats[i]ᵀ`, with
/// `x` `t` token rows of the matrices' common `cols` and `outs[i]` `t` rows of `mats[i].rows`,
/// token-major. Their rows are dealt out to the pool as one list of tasks, so the threads meet
/// once for all of them (Q, K and V; the MLP's gate and up) instead of once per matrix.
///
/// # Panics
/// When the matrices' `cols` differ or a slice's length does not fit (callers size them).
pub fn matmul_many(mats: &[&Matrix], x: &[f32], outs: &mut [&mut [f32]]) {
    let Some(m0) = mats.first() else { return };
    let cols = m0.cols;
    let t = x.len() / cols;
    assert!(
        x.len() == t * cols && t > 0,
        "matmul: input is not whole rows of {cols}"
    );
    assert_eq!(mats.len(), outs.len(), "matmul_many: one output per matrix");
    for (m, out) in mats.iter().zip(outs.iter()) {
        assert_eq!(m.cols, cols, "matmul_many: matrices of different widths");
        assert_eq!(out.len(), t * m.rows, "matmul: output size");
    }
    let targets: Vec<Columns> = outs
        .iter_mut()
        .map(|o| Columns(o.as_mut_ptr(), o.len()))
        .collect();
    let pool = crate::pool::global();
    // Rows per task from all the rows together, so that one token's tasks stay one long
    // run per thread (split where one matrix ends and the next begins).
    let total: usize = mats.iter().map(|m| m.rows).sum();
    let per_task = rows_per_task(total, t, pool.threads());
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    let (mut i, mut first) = (0, 0);
    let mut left = total;
    while left > 0 {
        let mut want = per_task.min(left);
        left -= want;
        while want > 0 {
            let n = want.min(mats[i].rows - first);
            tasks.push((i, first, n));
            (want, first) = (want - n, first + n);
            if first == mats[i].rows {
                (i, first) = (i + 1, 0);
            }
        }
    }
    // Each task computes its rows for every token into a buffer of its thread, weight row by
    // weight row (each row read once for all t tokens), then writes them to their columns of
    // the token-major result. For one token those columns are the rows themselves, one run
    // of the result, so the task computes straight into it.
    pool.for_chunks(&mut tasks, 1, |_, task| {
        for &mut (i, first, n) in task {
            let m = mats[i];
            if t == 1 {
                // SAFETY: rows `first..first + n` of matrix `i` belong to this task alone, so
                // no other thread touches these elements while the slice lives.
                let out = unsafe { targets[i].run_mut(first, n) };
                m.rows_into(first, x, 1, out);
                continue;
            }
            BY_ROW.with_borrow_mut(|by_row| {
                by_row.resize(n * t, 0.0);
                m.rows_into(first, x, t, by_row);
                // Token by token, so that each write is one run of `n` neighbours (the task's
                // few rows are read at a stride, and stay in L1 from one token to the next).
                for tok in 0..t {
                    // SAFETY: rows `first..first + n` of matrix `i` belong to this task alone,
                    // so no other thread touches these elements while the slice lives.
                    let dst = unsafe { targets[i].run_mut(tok * m.rows + first, n) };
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = by_row[r * t + tok];
                    }
                }
            });
        }
    });
}

thread_local! {
    /// One task's results, row by row, reused across calls on this thread.
    static BY_ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A result the tasks of one matmul share, each writing only its own rows' columns.
struct Columns(*mut f32, usize);

// SAFETY: threads write disjoint elements (see `Matrix::forward`), and f32 is Send.
unsafe impl Sync for Columns {}

impl Columns {
    /// Elements `at..at + n` as a slice.
    ///
    /// # Safety
    /// No other thread may access those elements while the slice lives.
    #[allow(clippy::mut_from_ref)] // the tasks share `Columns` and own disjoint runs of it
    unsafe fn run_mut(&self, at: usize, n: usize) -> &mut [f32] {
        assert!(at + n <= self.1, "matmul: rows past the output");
        // SAFETY: in bounds (checked); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
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
        // Token by token gives the same values, up to the rounding of a reordered sum (the
        // one-token kernel may take each block's scale out of its sum).
        for (tok, chunk_row) in all.iter().enumerate() {
            let one = xt.narrow(0, tok, 1).unwrap();
            let row = m.forward(&one).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in row[0].iter().zip(chunk_row) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} against {b}");
            }
        }
    }

    #[test]
    fn several_matrices_in_one_step_give_what_each_gives_alone() {
        // Q8_0 matrices of 37, 5 and 64 rows over 64 columns, for 1 and for 3 tokens: the
        // tasks split where one matrix ends and the next begins.
        let matrix = |rows: usize, seed: usize| {
            let mut data = Vec::new();
            for r in 0..rows {
                for b in 0..2 {
                    data.extend(f16_bytes(0.125 * (b + 1 + seed) as f32));
                    data.extend((0..32).map(|j| ((r * 5 + j * seed + b) % 23) as u8 ^ 0x80));
                }
            }
            Matrix::new(Weights::Q8_0(Vec::leak(data)), rows, 64)
        };
        let mats = [matrix(37, 1), matrix(5, 2), matrix(64, 3)];
        for t in [1, 3] {
            let x: Vec<f32> = (0..t * 64).map(|i| (i % 13) as f32 * 0.07 - 0.4).collect();
            let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; t * m.rows()]).collect();
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            matmul_many(&[&mats[0], &mats[1], &mats[2]], &x, &mut views);
            let xt = Tensor::from_vec(x.clone(), (t, 64), &Device::Cpu).unwrap();
            for (m, out) in mats.iter().zip(&outs) {
                let alone = m.forward(&xt).unwrap().flatten_all().unwrap();
                assert_eq!(out, &alone.to_vec1::<f32>().unwrap(), "t={t}");
                assert!(out.iter().any(|v| *v != 0.0));
            }
        }
    }
}
