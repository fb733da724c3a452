//! Causal grouped-query attention on the CPU: [`attention`] for a chunk of queries in tiles
//! of `TILE_TOKENS`, [`attend_token`] for one (decode, and the tiles' bit-for-bit reference).

use crate::matmul::{dot, Kernel, TILE_ROWS, TILE_TOKENS};

/// How many keys query `t` of a chunk starting at `start_pos` may attend to (causal mask):
/// every cached position up to and including its own, `start_pos + t + 1`.
pub fn causal_visible(start_pos: usize, t: usize) -> usize {
    start_pos + t + 1
}

/// Softmax of `x` in place.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads; query head `h` reads KV head `h / (n_head / n_kv_head)`.
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Positions per KV head in the key/value buffers.
    pub capacity: usize,
}

/// Causal grouped-query attention for a chunk of `q.len() / (n_head * head_dim)` queries whose
/// first token sits at `start_pos`.
///
/// `q` and `out` are `[token][head][head_dim]`; `keys` and `values` are
/// `[kv_head][capacity][head_dim]` and must already hold positions `..start_pos + tokens`. Query
/// `t` attends to positions `..causal_visible(start_pos, t)` with scores scaled by
/// `1 / sqrt(head_dim)`. Each (token, head) is computed independently, in a fixed order, so the
/// result does not depend on how a sequence is cut into chunks, nor on `threads`, the number of
/// threads the queries are dealt out to.
pub fn attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: AttentionShape,
    start_pos: usize,
    threads: usize,
    out: &mut [f32],
) {
    let AttentionShape {
        n_head,
        n_kv_head,
        head_dim: hd,
        capacity,
    } = shape;
    let group = n_head / n_kv_head;
    let row = n_head * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let kernel = Kernel::detect();
    // Up to TILE_TOKENS consecutive queries of one head at a time: each key and value row
    // loaded once serves all of them. Every query's scores, softmax and weighted sum are
    // computed exactly as one query alone would compute them (the kernels keep `dot`'s order
    // and the sums' order), so the tile changes no bit.
    let tokens = q.len() / row;
    if tokens == 1 {
        // Decode: one query, one head at a time, nothing allocated but the scores.
        let mut scores = Vec::with_capacity(causal_visible(start_pos, 0));
        attend_token(
            q,
            keys,
            values,
            shape,
            causal_visible(start_pos, 0),
            &mut scores,
            out,
        );
        return;
    }
    let tile = |t0: usize, q: &[f32], out: &mut [f32], scores: &mut Vec<f32>| {
        let n = out.len() / row;
        let visible: Vec<usize> = (0..n).map(|i| causal_visible(start_pos, t0 + i)).collect();
        let longest = visible[n - 1];
        let mut dots = [[0f32; TILE_TOKENS]; TILE_ROWS];
        for h in 0..n_head {
            let base = (h / group) * capacity * hd;
            let keys = &keys[base..base + longest * hd];
            let values = &values[base..base + longest * hd];
            let queries: Vec<&[f32]> = (0..n).map(|i| &q[i * row + h * hd..][..hd]).collect();
            // scores[i * longest + j]: query i against key j (keys past a query's own
            // position are computed with the tile and never read).
            scores.clear();
            scores.resize(n * longest, 0.0);
            for j0 in (0..longest).step_by(TILE_ROWS) {
                let m = TILE_ROWS.min(longest - j0);
                let ks: [&[f32]; TILE_ROWS] =
                    std::array::from_fn(|r| &keys[(j0 + r.min(m - 1)) * hd..][..hd]);
                kernel.tile(&ks[..m], &queries, hd, &mut dots);
                for (r, dots) in dots.iter().enumerate().take(m) {
                    for (i, &d) in dots.iter().enumerate().take(n) {
                        scores[i * longest + j0 + r] = d * scale;
                    }
                }
            }
            let mut probs: Vec<&[f32]> = Vec::with_capacity(n);
            for (i, row_scores) in scores.chunks_exact_mut(longest).enumerate() {
                softmax_in_place(&mut row_scores[..visible[i]]);
            }
            for (i, row_scores) in scores.chunks_exact(longest).enumerate() {
                probs.push(&row_scores[..visible[i]]);
            }
            let mut outs: Vec<&mut [f32]> = out
                .chunks_exact_mut(row)
                .map(|o| &mut o[h * hd..(h + 1) * hd])
                .collect();
            kernel.weighted_sums(&probs, values, &mut outs);
        }
    };
    let threads = threads.clamp(1, tokens.div_ceil(TILE_TOKENS).max(1));
    // Deal tiles round-robin, so the long (late) queries are shared out evenly.
    let mut shares: Vec<Vec<(usize, &mut [f32])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, out) in out.chunks_mut(row * TILE_TOKENS).enumerate() {
        shares[i % threads].push((i * TILE_TOKENS, out));
    }
    let run = |share: Vec<(usize, &mut [f32])>| {
        let mut scores = Vec::new();
        for (t0, out) in share {
            let n = out.len() / row;
            tile(t0, &q[t0 * row..(t0 + n) * row], out, &mut scores);
        }
    };
    if threads == 1 {
        shares.into_iter().for_each(run);
        return;
    }
    std::thread::scope(|scope| {
        for share in shares {
            scope.spawn(|| run(share));
        }
    });
}

/// One token's query (`[head][head_dim]`) against the first `visible` cached positions, one
/// head at a time: scores `dot(q, k) / sqrt(head_dim)`, softmax, then the values summed in
/// order into `out`. This order is what the tiled path of [`attention`] reproduces bit for bit.
pub fn attend_token(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: AttentionShape,
    visible: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.n_head / shape.n_kv_head;
    let scale = 1.0 / (hd as f32).sqrt();
    for (h, (q, out)) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).enumerate() {
        let base = (h / group) * shape.capacity * hd;
        let keys = &keys[base..base + visible * hd];
        let values = &values[base..base + visible * hd];
        scores.clear();
        scores.extend(keys.chunks_exact(hd).map(|k| dot(q, k) * scale));
        softmax_in_place(scores);
        out.fill(0.0);
        for (&p, v) in scores.iter().zip(values.chunks_exact(hd)) {
            for (o, &v) in out.iter_mut().zip(v) {
                *o += p * v;
            }
        }
    }
}
