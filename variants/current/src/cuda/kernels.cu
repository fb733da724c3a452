// The GPU forward pass of variants/current: every kernel one decode (or prefill) step runs.
// Compiled at load by NVRTC (src/cuda/mod.rs), so a build needs no CUDA toolkit.
//
// Activations are f32 and every sum accumulates in f32 (the RMSNorm's sum of squares in f64,
// as on the CPU), so the result differs from the CPU oracle only as reordered f32 sums do.
// The source is compiled with --fmad=false: every fused multiply-add below is an explicit
// fmaf, and nothing else is contracted behind our back.
//
// Weight matrices are (rows, cols), row-major, in one of three device formats (FMT_*), each a
// byte buffer `w` plus a scale buffer `s` (unused for f32), repacked at load from the GGUF's
// blocks of 32 weights so that quants are 16-byte aligned:
//   FMT_F32:  w = rows * cols floats.
//   FMT_Q4_1: w = 16 bytes of nibbles per block (byte j: weight j in its low nibble, weight
//             j + 16 in its high one); s = per block the f16 pair (d, m): weight = d * q + m.
//   FMT_Q8_0: w = 32 signed bytes per block; s = per block the f16 scale d: weight = d * q.
// Blocks run along a row: block b of row r is block r * (cols / 32) + b.

#define FMT_F32 0
#define FMT_Q4_1 1
#define FMT_Q8_0 2

// Token rows one warp of `matmul` carries at once (its accumulators stay in registers).
#define TOKEN_TILE 8
// Warps (one weight row each) per block of `matmul`.
#define ROW_WARPS 8

// attention_split: keys per shared-memory tile, head dimensions per lane (a head takes 1, 2 or
// 4 lanes), the most threads a block has, and the widest head it holds.
#define PK 16
#define PD 32
#define ATT_THREADS 128
#define ATT_HD_MAX 128

// The tiled matmul for chunks of tokens through an f32 matrix: a block computes TILE_ROWS
// weight rows for TILE_TOKENS tokens, stepping through the columns one 32-weight block at a
// time; each of its 256 threads holds a 4 x 4 tile of the result.
#define TILE_ROWS 64
#define TILE_TOKENS 64

// Minus infinity, spelled without math.h (NVRTC compiles without the host headers).
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Programmatic dependent launch (sm_90). In the decode step's graph, consecutive kernels are
// joined by programmatic edges (step_graph.rs), so a kernel's blocks may start while its
// predecessor is still running. So every kernel calls this before it reads or writes any
// memory another kernel uses: it waits until the predecessor has finished and its writes are
// visible, then lets this kernel's own successor be scheduled. Launched the plain way (a
// chunk), both instructions do nothing.
__device__ __forceinline__ void after_predecessor() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Asks for the 128-byte line at `p` in L2 (no value comes back; it may be dropped).
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The 32 weights of block `blk` (counted over the whole matrix), dequantized to f32.
template <int FMT>
__device__ __forceinline__ void load_block(const u8* w, const u8* s, long blk, float out[32]) {
    if (FMT == FMT_F32) {
        const float4* p = reinterpret_cast<const float4*>(w) + blk * 8;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float4 v = p[i];
            out[4 * i] = v.x;
            out[4 * i + 1] = v.y;
            out[4 * i + 2] = v.z;
            out[4 * i + 3] = v.w;
        }
    } else if (FMT == FMT_Q4_1) {
        const uint4 q = reinterpret_cast<const uint4*>(w)[blk];
        const u32 dm = reinterpret_cast<const u32*>(s)[blk];
        const float d = f16_to_f32((u16)(dm & 0xffff)), m = f16_to_f32((u16)(dm >> 16));
        const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
#pragma unroll
            for (int b = 0; b < 4; b++) {
                const u32 byte = (words[i] >> (8 * b)) & 0xff;
                out[4 * i + b] = fmaf(d, (float)(byte & 15), m);
                out[4 * i + b + 16] = fmaf(d, (float)(byte >> 4), m);
            }
        }
    } else {
        const uint4* p = reinterpret_cast<const uint4*>(w) + blk * 2;
        const float d = f16_to_f32(reinterpret_cast<const u16*>(s)[blk]);
        const uint4 lo = p[0], hi = p[1];
        const u32 words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int i = 0; i < 8; i++) {
#pragma unroll
            for (int b = 0; b < 4; b++) {
                const signed char q = (signed char)((words[i] >> (8 * b)) & 0xff);
                out[4 * i + b] = d * (float)q;
            }
        }
    }
}

// The dot product of 32 dequantized weights with 32 activations (16-byte aligned).
__device__ __forceinline__ float dot32(const float wv[32], const float* x, float acc) {
    const float4* p = reinterpret_cast<const float4*>(x);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const float4 v = p[i];
        acc = fmaf(wv[4 * i], v.x, acc);
        acc = fmaf(wv[4 * i + 1], v.y, acc);
        acc = fmaf(wv[4 * i + 2], v.z, acc);
        acc = fmaf(wv[4 * i + 3], v.w, acc);
    }
    return acc;
}

// y (t, rows) = x (t, cols) W^T, or y += that when `accumulate` (the residual add); with
// GATED, y = silu(x Wg^T) * (x Wu^T), the up matrix in w2/s2 read by the same warp, so the gate
// and up activations never reach memory. One warp per weight row, lanes striding over its
// blocks; a block of the grid covers ROW_WARPS rows and TOKEN_TILE tokens (blockIdx.y), so each
// weight block is read once per token tile.
template <int FMT, bool GATED>
__device__ void matmul_body(const u8* w, const u8* s, const u8* w2, const u8* s2, const float* x,
                            float* y, int rows, int cols, int t, int accumulate) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * ROW_WARPS + warp;
    const int tok0 = blockIdx.y * TOKEN_TILE;
    if (row >= rows) return;
    const int nb = cols / 32, nt = min(TOKEN_TILE, t - tok0);
    float acc[TOKEN_TILE], acc2[TOKEN_TILE];
#pragma unroll
    for (int k = 0; k < TOKEN_TILE; k++) acc[k] = acc2[k] = 0.0f;
    for (int b = lane; b < nb; b += 32) {
        float wv[32];
        load_block<FMT>(w, s, (long)row * nb + b, wv);
#pragma unroll
        for (int k = 0; k < TOKEN_TILE; k++)
            if (k < nt) acc[k] = dot32(wv, x + (long)(tok0 + k) * cols + b * 32, acc[k]);
        if (GATED) {
            load_block<FMT>(w2, s2, (long)row * nb + b, wv);
#pragma unroll
            for (int k = 0; k < TOKEN_TILE; k++)
                if (k < nt) acc2[k] = dot32(wv, x + (long)(tok0 + k) * cols + b * 32, acc2[k]);
        }
    }
#pragma unroll
    for (int k = 0; k < TOKEN_TILE; k++) {
        if (k < nt) {
            const float sum = warp_sum(acc[k]);
            const float up = GATED ? warp_sum(acc2[k]) : 0.0f;
            if (lane == 0) {
                float* out = y + (long)(tok0 + k) * rows + row;
                if (GATED) {
                    *out = sum / (1.0f + expf(-sum)) * up;
                } else {
                    *out = accumulate ? *out + sum : sum;
                }
            }
        }
    }
}

extern "C" __global__ void matmul_f32(const u8* w, const u8* s, const float* x, float* y,
                                      int rows, int cols, int t, int accumulate) {
    after_predecessor();
    matmul_body<FMT_F32, false>(w, s, w, s, x, y, rows, cols, t, accumulate);
}
extern "C" __global__ void matmul_q4_1(const u8* w, const u8* s, const float* x, float* y,
                                       int rows, int cols, int t, int accumulate) {
    after_predecessor();
    matmul_body<FMT_Q4_1, false>(w, s, w, s, x, y, rows, cols, t, accumulate);
}
extern "C" __global__ void matmul_q8_0(const u8* w, const u8* s, const float* x, float* y,
                                       int rows, int cols, int t, int accumulate) {
    after_predecessor();
    matmul_body<FMT_Q8_0, false>(w, s, w, s, x, y, rows, cols, t, accumulate);
}
extern "C" __global__ void swiglu_f32(const u8* wg, const u8* sg, const u8* wu, const u8* su,
                                      const float* x, float* y, int rows, int cols, int t) {
    after_predecessor();
    matmul_body<FMT_F32, true>(wg, sg, wu, su, x, y, rows, cols, t, 0);
}
extern "C" __global__ void swiglu_q4_1(const u8* wg, const u8* sg, const u8* wu, const u8* su,
                                       const float* x, float* y, int rows, int cols, int t) {
    after_predecessor();
    matmul_body<FMT_Q4_1, true>(wg, sg, wu, su, x, y, rows, cols, t, 0);
}
extern "C" __global__ void swiglu_q8_0(const u8* wg, const u8* sg, const u8* wu, const u8* su,
                                       const float* x, float* y, int rows, int cols, int t) {
    after_predecessor();
    matmul_body<FMT_Q8_0, true>(wg, sg, wu, su, x, y, rows, cols, t, 0);
}

// The one-token matvec of decode (t = 1), for the quantized formats. Here the weights are read
// once per token, so the kernel has to stream them at memory speed and spend few instructions
// on each: lanes of a warp take consecutive 4-byte (Q4_1) or 16-byte (Q8_0) pieces of a row,
// so both the weights and the activations a warp reads are contiguous, and a quant becomes an
// f32 by the exponent trick (below) instead of an integer conversion.

// Warps per block of the one-token kernels.
#define VEC_WARPS 4
// Rows each warp of the one-token Q8_0 kernel carries (one for Q4_1, two matrices when GATED).
#define Q8_ROWS 2
// Warps that share each row of the one-token Q4_1 kernels, each taking every Q4_SPLIT-th run
// of 32 pieces: one warp a row left the 1B's and 8B's long rows with too few warps resident to
// hide their loads (the 8B's down matvec: 0.65 waves, 46% occupancy, 31% of DRAM bandwidth).
// VEC_WARPS * (rows a warp) / Q4_SPLIT must stay even: a QKV block's rows are rotation pairs.
#define Q4_SPLIT 2
// Rows that a Q4_1 warp pair carries in the `_long` one-token kernels (four warps in the
// `_longest`), which the host picks for rows of 2,048 columns or more (the 1B's and 8B's, none
// of SmolLM2's): the activations a lane loads serve each row, so a weight byte costs half the
// L1 reads of x, and each warp has twice the loads in flight. On SmolLM2's short rows the same
// halved the blocks and was slower (G55).
#define Q4_ROWS_LONG 2
// Warps that share those rows in the `_longest` kernels, which the host picks for rows of 4,096
// columns or more (every 8B matrix, the 1B's down): four warps to two rows gave the 8B 3.9% less
// a step, and the 1B, whose rows of 2,048 columns then leave a lane two pieces, 12% more (G58).
#define Q4_SPLIT_LONGEST 4
// Blocks an SM that the `_longest` matvec and QKV kernels, and their SwiGLU, ask ptxas to fit
// (`__launch_bounds__`, which caps their registers: 48 and 56 a thread, no spills, where they
// took 55-56 and 69 unbounded, 9 and 7 blocks). At 8B ncu read their DRAM traffic at 25-40% of
// the peak, their occupancy capped by registers (56% in theory, 44.5% achieved) over 1.7-7.8
// waves of blocks (G71).
#define LONGEST_MIN_BLOCKS 10
#define LONGEST_SWIGLU_MIN_BLOCKS 9

// Nibble P/4 of `word` (bits P..P+3, P at most 12) as an exact float: OR-ed under the exponent
// of 2^(23 - P), the nibble lands in the mantissa's units, and subtracting 2^(23 - P) leaves it.
template <int P>
__device__ __forceinline__ float nibble(u32 word) {
    const u32 magic = (u32)(150 - P) << 23;
    return __int_as_float((word & (0xfu << P)) | magic) - (float)(1u << (23 - P));
}

// Signed byte K of `biased` (every byte of the quant word XOR 0x80, so q + 128) as an exact
// float, by the same trick: the byte becomes the mantissa's low bits under 2^23.
template <int K>
__device__ __forceinline__ float signed_byte(u32 biased) {
    return __int_as_float(__byte_perm(biased, 0x4b000000u, 0x7440 | K)) - 8388736.0f;
}

// sum over the 8 weights of Q4_1 quant word `word` of (d q + m) x, into `acc`. Word i of a
// block holds bytes 4i..4i+3: weights 4i..4i+3 in the low nibbles (activations xl) and
// 16 + 4i.. in the high ones (xh).
__device__ __forceinline__ float q4_1_word(u32 word, u32 dm, float4 xl, float4 xh, float acc) {
    const float d = f16_to_f32((u16)(dm & 0xffff)), m = f16_to_f32((u16)(dm >> 16));
    const u32 hi = word >> 16;
    acc = fmaf(fmaf(d, nibble<0>(word), m), xl.x, acc);
    acc = fmaf(fmaf(d, nibble<4>(word), m), xh.x, acc);
    acc = fmaf(fmaf(d, nibble<8>(word), m), xl.y, acc);
    acc = fmaf(fmaf(d, nibble<12>(word), m), xh.y, acc);
    acc = fmaf(fmaf(d, nibble<0>(hi), m), xl.z, acc);
    acc = fmaf(fmaf(d, nibble<4>(hi), m), xh.z, acc);
    acc = fmaf(fmaf(d, nibble<8>(hi), m), xl.w, acc);
    acc = fmaf(fmaf(d, nibble<12>(hi), m), xh.w, acc);
    return acc;
}

// d * (sum over the 16 weights of Q8_0 quants `q` of q x) + acc; x holds their activations.
__device__ __forceinline__ float q8_0_half(uint4 q, u16 dh, const float4* x, float acc) {
    const u32 words[4] = {q.x, q.y, q.z, q.w};
    float a = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const u32 b = words[k] ^ 0x80808080u;
        const float4 v = x[k];
        a = fmaf(signed_byte<0>(b), v.x, a);
        a = fmaf(signed_byte<1>(b), v.y, a);
        a = fmaf(signed_byte<2>(b), v.z, a);
        a = fmaf(signed_byte<3>(b), v.w, a);
    }
    return fmaf(f16_to_f32(dh), a, acc);
}

// What a lane of a one-token kernel reads at a time: Q is a piece of a row (Q4_1: a 4-byte
// quant word, an eighth of a block; Q8_0: 16 bytes, half a block), S its block's scale (Q4_1: the
// f16 pair (d, m); Q8_0: d), PER the pieces a block has.
template <int FMT>
struct Piece;
template <>
struct Piece<FMT_Q4_1> {
    typedef u32 Q;
    typedef u32 S;
    static constexpr int PER = 4;
};
template <>
struct Piece<FMT_Q8_0> {
    typedef uint4 Q;
    typedef u16 S;
    static constexpr int PER = 2;
};

// acc[mi][r] += piece c of row r of matrix mi (in q, its scale in sc) times its activations in
// x: the activations loaded once for every row.
template <int FMT, int M, int R>
__device__ __forceinline__ void piece_dot(const typename Piece<FMT>::Q (&q)[M][R],
                                          const typename Piece<FMT>::S (&sc)[M][R],
                                          const float* x, int c, float (&acc)[M][R]) {
    if constexpr (FMT == FMT_Q4_1) {
        const float* xb = x + (c / 4) * 32 + 4 * (c % 4);
        const float4 xl = *reinterpret_cast<const float4*>(xb);
        const float4 xh = *reinterpret_cast<const float4*>(xb + 16);
#pragma unroll
        for (int mi = 0; mi < M; mi++)
#pragma unroll
            for (int r = 0; r < R; r++)
                acc[mi][r] = q4_1_word(q[mi][r], sc[mi][r], xl, xh, acc[mi][r]);
    } else {
        const float4* xb = reinterpret_cast<const float4*>(x + 16 * c);
#pragma unroll
        for (int mi = 0; mi < M; mi++)
#pragma unroll
            for (int r = 0; r < R; r++)
                acc[mi][r] = q8_0_half(q[mi][r], sc[mi][r], xb, acc[mi][r]);
    }
}

// Pieces of each row a lane loads before the wait (below): all of its share of a row of up to
// 32 * PRE pieces (SmolLM2's rows but its down matrix's), the first PRE of a longer one.
#define PRE_Q4_1 4
#define PRE_Q8_0 2
// The one-token kernels ask the rest of their rows into L2 before the wait only for rows of
// fewer columns than this: every SmolLM2 matrix (576 and 1,536), none of the 1B's or 8B's
// (2,048 and more). On G59's kernels, without any prefetch a step took 5.9% less at 8B and
// 1.8% less at 1B (a screen), and SmolLM2 decoded 1.1% slower (a comparison, G62).
#define PREFETCH_BELOW_COLS 2048

// Where the QKV matvec of a decode step puts its rows (matvec_body with ROPE), instead of
// leaving them for rope_kv: q rotated into y, k rotated into the key cache and v copied into the
// value cache, at position *pos_at, as rope_kv would (the same arithmetic, in the same order).
// Mirrored by `RopeArgs` in mod.rs.
struct Rope {
    const float* cos_t;
    const float* sin_t;
    float* k_cache;
    float* v_cache;
    const int* pos_at;
    int n_head, n_kv, hd, half;
};

// Where row `row` of a QKV product goes: the position, and the cosine and sine of its rotation
// (zero where it is not rotated). Nothing a decode step writes before its QKV matvec is read
// here (*pos_at moves at the end of a step), so a kernel reads it before it waits.
struct RopeAt {
    int pos;
    float cs, sn;
};
__device__ __forceinline__ RopeAt rope_at(const Rope& rp, int row) {
    RopeAt a;
    a.pos = *rp.pos_at;
    a.cs = a.sn = 0.0f;
    const int p = row % rp.hd / 2;
    if (p < rp.half && row / rp.hd < rp.n_head + rp.n_kv) {
        a.cs = rp.cos_t[(long)a.pos * rp.half + p];
        a.sn = rp.sin_t[(long)a.pos * rp.half + p];
    }
    return a;
}

// Stores row `row` of a QKV product, placed by `ra`: `vals` holds the block's rows, this one at
// `local`. Rows come in rotation pairs (2p, 2p + 1) within a head, and a block starts at an even
// row, so the partner of `local` is `local ^ 1`.
__device__ __forceinline__ void rope_store(const Rope& rp, const RopeAt& ra, float* q_out,
                                           int row, const float* vals, int local) {
    const int head = row / rp.hd, d = row % rp.hd, p = d / 2;
    const int pos = ra.pos;
    const long at = (long)pos * rp.n_kv * rp.hd;
    if (head >= rp.n_head + rp.n_kv) {
        rp.v_cache[at + (long)(head - rp.n_head - rp.n_kv) * rp.hd + d] = vals[local];
        return;
    }
    float v = vals[local];
    if (p < rp.half) {
        const float x0 = vals[local & ~1], x1 = vals[local | 1];
        v = d % 2 == 0 ? x0 * ra.cs - x1 * ra.sn : x0 * ra.sn + x1 * ra.cs;
    }
    if (head < rp.n_head) {
        q_out[row] = v;
    } else {
        rp.k_cache[at + (long)(head - rp.n_head) * rp.hd + d] = v;
    }
}

// y = x W^T for one token (or y += that with `accumulate`; with GATED, y = silu(x Wg^T) *
// (x Wu^T), the up matrix in w2/s2). Q4_1: Q4K warps share Q4R rows (with GATED, the same rows
// of both matrices), lane l of warp p taking quant words 32 p + l, 32 (p + Q4K) + l, ... of
// each; their sums are added in warp order. Q8_0: a warp per Q8_ROWS rows, lane l taking
// 16-byte halves of blocks (half l, l + 32, ...) The loads of every row a warp carries are
// issued before any arithmetic, so they are in flight together.
//
// The RMSNorms of a decode step are fused into these kernels (null pointers: no fusion):
// - norm_in: x holds x ⊙ g (g the norm's weight) and *norm_in the sum of squares of x's
//   `cols` values, so each result is scaled by 1 / sqrt(*norm_in / cols + eps) at the end:
//   the normed product, its multiplications reassociated.
// - next_g: after the residual add, row r of the new x times next_g[r] (the next norm's
//   weight) goes to xg[r], and the squares of the new x are added into *norm_out (one f64
//   atomic add per block), for the next kernel's norm_in.
// With ROPE (the QKV matrix), the rows go where `rope` says (rope_store) instead of all to y.
//
// Before it waits for its predecessor (after_predecessor), a warp reads what no kernel since
// the one before its predecessor has written: the first PRE_* pieces of each of its rows and
// their scales (no kernel writes weights; the rest of the rows is asked into L2), its rope
// placement, and with `accumulate` the residual rows it adds to and the next norm's weights (a
// decode step never accumulates into its predecessor's output). That the one before the
// predecessor has finished is what PDL guarantees: the predecessor's blocks waited for it
// before letting this kernel start.
template <int FMT, bool GATED, bool ROPE = false, int Q4R = 1, int Q4K = Q4_SPLIT>
__device__ void matvec_body(const u8* w, const u8* s, const u8* w2, const u8* s2, const float* x,
                            float* y, int rows, int cols, int accumulate, const double* norm_in,
                            double eps, const float* next_g, float* xg, double* norm_out,
                            Rope rope = Rope{}) {
    constexpr int R = FMT == FMT_Q4_1 ? Q4R : Q8_ROWS;  // rows per matrix
    constexpr int M = GATED ? 2 : 1;                    // matrices
    constexpr int K = FMT == FMT_Q4_1 ? Q4K : 1;        // warps sharing R rows
    constexpr int GROUPS = VEC_WARPS / K;               // of K warps, each its own rows
    __shared__ double squares[VEC_WARPS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = warp / K, part = warp % K;
    const int row0 = (blockIdx.x * GROUPS + group) * R;
    // The lane's first piece, and the step to its next: runs of 32 pieces dealt to the K warps.
    const int first = lane + 32 * part, step = 32 * K;
    // A warp past the last row computes nothing but still takes part in the block's sum of
    // squares.
    const bool live = row0 < rows;
    const int nb = cols / 32;
    const int pieces = FMT == FMT_Q4_1 ? nb * 4 : nb * 2;  // per row
    const u8* ws[2] = {w, w2};
    const u8* ss[2] = {s, s2};
    typedef typename Piece<FMT>::Q Q;
    typedef typename Piece<FMT>::S S;
    constexpr int PRE = FMT == FMT_Q4_1 ? PRE_Q4_1 : PRE_Q8_0;
    // Piece c = first + step k of row r of matrix mi, and its scale, for k < PRE.
    Q qp[PRE][M][R];
    S sp[PRE][M][R];
#pragma unroll
    for (int k = 0; k < PRE; k++) {
        const int c = first + step * k;
#pragma unroll
        for (int mi = 0; mi < M; mi++)
#pragma unroll
            for (int r = 0; r < R; r++) {
                qp[k][mi][r] = Q{};
                sp[k][mi][r] = S{};
                if (live && c < pieces) {
                    const long row = min(row0 + r, rows - 1);
                    qp[k][mi][r] = reinterpret_cast<const Q*>(ws[mi])[row * pieces + c];
                    sp[k][mi][r] = reinterpret_cast<const S*>(ss[mi])[row * nb + c / Piece<FMT>::PER];
                }
            }
    }
    // The rest of this warp's rows and their scales asked into L2 before the wait, so their
    // fetch too overlaps the predecessor's tail: for rows under PREFETCH_BELOW_COLS only.
    if (live && cols < PREFETCH_BELOW_COLS) {
        const long row_bytes = FMT == FMT_Q4_1 ? (long)pieces * 4 : (long)pieces * 16;
        const long scale_bytes = FMT == FMT_Q4_1 ? (long)nb * 4 : (long)nb * 2;
        // What the loads above cover (of all K warps of the row): the first step * PRE pieces,
        // and their blocks' scales. The rest is dealt to the K warps' lanes a line each.
        const long pre_bytes = (long)step * PRE * sizeof(Q);
        const long pre_scale_bytes = (long)step * PRE / Piece<FMT>::PER * sizeof(S);
#pragma unroll
        for (int mi = 0; mi < M; mi++)
#pragma unroll
            for (int r = 0; r < R; r++) {
                const long row = min(row0 + r, rows - 1);
                for (long at = pre_bytes + 128 * first; at < row_bytes; at += 128 * step)
                    prefetch_l2(ws[mi] + row * row_bytes + at);
                for (long at = pre_scale_bytes + 128 * first; at < scale_bytes; at += 128 * step)
                    prefetch_l2(ss[mi] + row * scale_bytes + at);
            }
    }
    RopeAt placed[R];
    float resid[R], gain[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        resid[r] = gain[r] = 0.0f;
        if (lane == 0 && part == 0 && row0 + r < rows) {
            if (ROPE) placed[r] = rope_at(rope, row0 + r);
            if (!GATED && !ROPE && accumulate) resid[r] = y[row0 + r];
            if (!GATED && !ROPE && next_g) gain[r] = next_g[row0 + r];
        }
    }
    after_predecessor();
    const double sum_sq = norm_in ? *norm_in : 0.0;  // its load in flight with the weights'
    float acc[M][R];
#pragma unroll
    for (int mi = 0; mi < M; mi++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[mi][r] = 0.0f;
    // The pieces in hand first, then the rest of the row, in the same order (the same sums).
#pragma unroll
    for (int k = 0; k < PRE; k++) {
        const int c = first + step * k;
        if (live && c < pieces) piece_dot<FMT, M, R>(qp[k], sp[k], x, c, acc);
    }
    for (int c = first + step * PRE; live && c < pieces; c += step) {
        Q q[M][R];
        S sc[M][R];
#pragma unroll
        for (int mi = 0; mi < M; mi++)
#pragma unroll
            for (int r = 0; r < R; r++) {
                const long row = min(row0 + r, rows - 1);
                q[mi][r] = reinterpret_cast<const Q*>(ws[mi])[row * pieces + c];
                sc[mi][r] = reinterpret_cast<const S*>(ss[mi])[row * nb + c / Piece<FMT>::PER];
            }
        piece_dot<FMT, M, R>(q, sc, x, c, acc);
    }
    const float scale = norm_in ? (float)(1.0 / sqrt(sum_sq / (double)cols + eps)) : 1.0f;
    // Each row's sum over the lanes, then over its K warps in warp order (every lane holds it).
    float sums[M][R];
#pragma unroll
    for (int mi = 0; mi < M; mi++)
#pragma unroll
        for (int r = 0; r < R; r++) sums[mi][r] = warp_sum(acc[mi][r]);
    if constexpr (K > 1) {  // the same for every thread of the launch
        __shared__ float partial[VEC_WARPS][M][R];
        if (lane == 0)
#pragma unroll
            for (int mi = 0; mi < M; mi++)
#pragma unroll
                for (int r = 0; r < R; r++) partial[warp][mi][r] = sums[mi][r];
        __syncthreads();
#pragma unroll
        for (int mi = 0; mi < M; mi++)
#pragma unroll
            for (int r = 0; r < R; r++) {
                float total = partial[group * K][mi][r];
                for (int p = 1; p < K; p++) total += partial[group * K + p][mi][r];
                sums[mi][r] = total;
            }
    }
    const bool writer = lane == 0 && part == 0;
    if (ROPE) {  // the same for every thread of the launch
        __shared__ float vals[GROUPS * R];
#pragma unroll
        for (int r = 0; r < R; r++)
            if (writer) vals[group * R + r] = sums[0][r] * scale;
        __syncthreads();
        if (writer) {
#pragma unroll
            for (int r = 0; r < R; r++)
                if (row0 + r < rows) rope_store(rope, placed[r], y, row0 + r, vals, group * R + r);
        }
        return;
    }
    double sq = 0.0;
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float sum = sums[0][r] * scale;
        const float up = GATED ? sums[M - 1][r] * scale : 0.0f;
        if (writer && row0 + r < rows) {
            float* out = y + row0 + r;
            if (GATED) {
                *out = sum / (1.0f + expf(-sum)) * up;
            } else {
                const float v = accumulate ? resid[r] + sum : sum;
                *out = v;
                if (next_g) {
                    xg[row0 + r] = v * gain[r];
                    sq += (double)v * (double)v;
                }
            }
        }
    }
    if (next_g) {  // the same for every thread of the launch
        if (lane == 0) squares[warp] = sq;
        __syncthreads();
        if (threadIdx.x == 0) {
            double total = 0.0;
            for (int i = 0; i < VEC_WARPS; i++) total += squares[i];
            atomicAdd(norm_out, total);
        }
    }
}

// The one-token kernels take the matmul's arguments, then the fusion's (matvec_body).
extern "C" __global__ void matvec_q4_1(const u8* w, const u8* s, const float* x, float* y,
                                       int rows, int cols, int t, int accumulate,
                                       const double* norm_in, double eps, const float* next_g,
                                       float* xg, double* norm_out) {
    matvec_body<FMT_Q4_1, false>(w, s, w, s, x, y, rows, cols, accumulate, norm_in, eps, next_g,
                                 xg, norm_out);
}
extern "C" __global__ void matvec_q8_0(const u8* w, const u8* s, const float* x, float* y,
                                       int rows, int cols, int t, int accumulate,
                                       const double* norm_in, double eps, const float* next_g,
                                       float* xg, double* norm_out) {
    matvec_body<FMT_Q8_0, false>(w, s, w, s, x, y, rows, cols, accumulate, norm_in, eps, next_g,
                                 xg, norm_out);
}
// The QKV matvec of a decode step with RoPE and the cache write fused (matvec_body's ROPE): the
// rows are (n_head + 2 n_kv) heads of `rope.hd`, and x holds the attention norm's x ⊙ g.
extern "C" __global__ void qkv_vec_q4_1(const u8* w, const u8* s, const float* x, float* y,
                                        int rows, int cols, const double* norm_in, double eps,
                                        Rope rope) {
    matvec_body<FMT_Q4_1, false, true>(w, s, w, s, x, y, rows, cols, 0, norm_in, eps, nullptr,
                                       nullptr, nullptr, rope);
}
extern "C" __global__ void qkv_vec_q8_0(const u8* w, const u8* s, const float* x, float* y,
                                        int rows, int cols, const double* norm_in, double eps,
                                        Rope rope) {
    matvec_body<FMT_Q8_0, false, true>(w, s, w, s, x, y, rows, cols, 0, norm_in, eps, nullptr,
                                       nullptr, nullptr, rope);
}
extern "C" __global__ void swiglu_vec_q4_1(const u8* wg, const u8* sg, const u8* wu,
                                           const u8* su, const float* x, float* y, int rows,
                                           int cols, int t, const double* norm_in, double eps) {
    matvec_body<FMT_Q4_1, true>(wg, sg, wu, su, x, y, rows, cols, 0, norm_in, eps, nullptr,
                                nullptr, nullptr);
}
extern "C" __global__ void swiglu_vec_q8_0(const u8* wg, const u8* sg, const u8* wu,
                                           const u8* su, const float* x, float* y, int rows,
                                           int cols, int t, const double* norm_in, double eps) {
    matvec_body<FMT_Q8_0, true>(wg, sg, wu, su, x, y, rows, cols, 0, norm_in, eps, nullptr,
                                nullptr, nullptr);
}
// The Q4_1 one-token kernels for long rows, the same arguments as matvec_q4_1, qkv_vec_q4_1
// and swiglu_vec_q4_1: Q4_ROWS_LONG rows to Q4_SPLIT warps (`_long`) or to Q4_SPLIT_LONGEST
// (`_longest`). Each three are compiled only for a model that has such rows (LONG_ROWS,
// LONGEST_ROWS: `LongRows` in mod.rs), since NVRTC's memory at load grows with them.
#ifdef LONG_ROWS
extern "C" __global__ void matvec_q4_1_long(const u8* w, const u8* s, const float* x,
                                            float* y, int rows, int cols, int t, int accumulate,
                                            const double* norm_in, double eps,
                                            const float* next_g, float* xg, double* norm_out) {
    matvec_body<FMT_Q4_1, false, false, Q4_ROWS_LONG, Q4_SPLIT>(
        w, s, w, s, x, y, rows, cols, accumulate, norm_in, eps, next_g, xg, norm_out);
}
extern "C" __global__ void qkv_vec_q4_1_long(const u8* w, const u8* s, const float* x,
                                             float* y, int rows, int cols, const double* norm_in,
                                             double eps, Rope rope) {
    matvec_body<FMT_Q4_1, false, true, Q4_ROWS_LONG, Q4_SPLIT>(
        w, s, w, s, x, y, rows, cols, 0, norm_in, eps, nullptr, nullptr, nullptr, rope);
}
extern "C" __global__ void swiglu_vec_q4_1_long(const u8* wg, const u8* sg, const u8* wu,
                                                const u8* su, const float* x, float* y,
                                                int rows, int cols, int t,
                                                const double* norm_in, double eps) {
    matvec_body<FMT_Q4_1, true, false, Q4_ROWS_LONG, Q4_SPLIT>(
        wg, sg, wu, su, x, y, rows, cols, 0, norm_in, eps, nullptr, nullptr, nullptr);
}
#endif
#ifdef LONGEST_ROWS
extern "C" __global__ void __launch_bounds__(VEC_WARPS * 32, LONGEST_MIN_BLOCKS)
    matvec_q4_1_longest(const u8* w, const u8* s, const float* x, float* y, int rows, int cols,
                        int t, int accumulate, const double* norm_in, double eps,
                        const float* next_g, float* xg, double* norm_out) {
    matvec_body<FMT_Q4_1, false, false, Q4_ROWS_LONG, Q4_SPLIT_LONGEST>(
        w, s, w, s, x, y, rows, cols, accumulate, norm_in, eps, next_g, xg, norm_out);
}
extern "C" __global__ void __launch_bounds__(VEC_WARPS * 32, LONGEST_MIN_BLOCKS)
    qkv_vec_q4_1_longest(const u8* w, const u8* s, const float* x, float* y, int rows, int cols,
                         const double* norm_in, double eps, Rope rope) {
    matvec_body<FMT_Q4_1, false, true, Q4_ROWS_LONG, Q4_SPLIT_LONGEST>(
        w, s, w, s, x, y, rows, cols, 0, norm_in, eps, nullptr, nullptr, nullptr, rope);
}
extern "C" __global__ void __launch_bounds__(VEC_WARPS * 32, LONGEST_SWIGLU_MIN_BLOCKS)
    swiglu_vec_q4_1_longest(const u8* wg, const u8* sg, const u8* wu, const u8* su,
                            const float* x, float* y, int rows, int cols, int t,
                            const double* norm_in, double eps) {
    matvec_body<FMT_Q4_1, true, false, Q4_ROWS_LONG, Q4_SPLIT_LONGEST>(
        wg, sg, wu, su, x, y, rows, cols, 0, norm_in, eps, nullptr, nullptr, nullptr);
}
#endif

// Eight consecutive weights of an f32 matrix, elements 8 * part .. 8 * part + 7 of block `blk`.
__device__ __forceinline__ void load_eighth(const u8* w, long blk, int part, float out[8]) {
    const float4* p = reinterpret_cast<const float4*>(w) + blk * 8 + part * 2;
    const float4 a = p[0], b = p[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

// y (t, rows) = x (t, cols) W^T for a chunk of tokens through an f32 matrix (or += with
// `accumulate`; with GATED, y = silu(x Wg^T) * (x Wu^T), the second matrix in w2). Block (row
// tile, token tile): each column step stages TILE_ROWS x 32 weights and TILE_TOKENS x 32
// activations in shared memory, and thread (tr, tc) accumulates rows tr + 16 i and tokens
// tc + 16 j. (Quantized matrices take the tensor-core `mma_body` or `mma_pipe_body` below.)
template <bool GATED>
__device__ void tiled_body(const u8* w, const u8* w2, const float* x, float* y, int rows,
                           int cols, int t, int accumulate) {
    __shared__ float ws[32][TILE_ROWS + 1];
    __shared__ float ws2[GATED ? 32 : 1][TILE_ROWS + 1];
    __shared__ float xs[32][TILE_TOKENS + 1];
    const int tid = threadIdx.x, tr = tid % 16, tc = tid / 16;
    const int row0 = blockIdx.x * TILE_ROWS, tok0 = blockIdx.y * TILE_TOKENS;
    const int nb = cols / 32;
    // What this thread stages: row (or token) tid / 4, eighth tid % 4 of the 32 columns.
    const int lr = tid / 4, part = tid % 4;
    float acc[4][4], acc2[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = acc2[i][j] = 0.0f;
    for (int b = 0; b < nb; b++) {
        float v[8];
        const bool row_in = row0 + lr < rows;
        if (row_in) {
            load_eighth(w, (long)(row0 + lr) * nb + b, part, v);
        }
#pragma unroll
        for (int e = 0; e < 8; e++) ws[part * 8 + e][lr] = row_in ? v[e] : 0.0f;
        if (GATED) {
            if (row_in) load_eighth(w2, (long)(row0 + lr) * nb + b, part, v);
#pragma unroll
            for (int e = 0; e < 8; e++) ws2[part * 8 + e][lr] = row_in ? v[e] : 0.0f;
        }
        const bool tok_in = tok0 + lr < t;
        const float4* xp =
            reinterpret_cast<const float4*>(x + (long)(tok0 + lr) * cols + b * 32 + part * 8);
        const float4 x0 = tok_in ? xp[0] : make_float4(0.f, 0.f, 0.f, 0.f);
        const float4 x1 = tok_in ? xp[1] : make_float4(0.f, 0.f, 0.f, 0.f);
        xs[part * 8 + 0][lr] = x0.x; xs[part * 8 + 1][lr] = x0.y;
        xs[part * 8 + 2][lr] = x0.z; xs[part * 8 + 3][lr] = x0.w;
        xs[part * 8 + 4][lr] = x1.x; xs[part * 8 + 5][lr] = x1.y;
        xs[part * 8 + 6][lr] = x1.z; xs[part * 8 + 7][lr] = x1.w;
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < 32; k++) {
            float a[4], a2[4], bx[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                a[i] = ws[k][tr + 16 * i];
                if (GATED) a2[i] = ws2[k][tr + 16 * i];
            }
#pragma unroll
            for (int j = 0; j < 4; j++) bx[j] = xs[k][tc + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    acc[i][j] = fmaf(a[i], bx[j], acc[i][j]);
                    if (GATED) acc2[i][j] = fmaf(a2[i], bx[j], acc2[i][j]);
                }
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int tok = tok0 + tc + 16 * j;
        if (tok >= t) continue;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = row0 + tr + 16 * i;
            if (row >= rows) continue;
            float* out = y + (long)tok * rows + row;
            if (GATED) {
                const float gate = acc[i][j];
                *out = gate / (1.0f + expf(-gate)) * acc2[i][j];
            } else {
                *out = accumulate ? *out + acc[i][j] : acc[i][j];
            }
        }
    }
}

extern "C" __global__ void tiled_f32(const u8* w, const u8* s, const float* x, float* y,
                                     int rows, int cols, int t, int accumulate) {
    after_predecessor();
    tiled_body<false>(w, w, x, y, rows, cols, t, accumulate);
}
extern "C" __global__ void tiled_swiglu_f32(const u8* wg, const u8* sg, const u8* wu,
                                            const u8* su, const float* x, float* y, int rows,
                                            int cols, int t) {
    after_predecessor();
    tiled_body<true>(wg, wu, x, y, rows, cols, t, 0);
}

// The tensor-core matmul for chunks of tokens in a quantized format (Q4_1, Q8_0); f32 matrices
// keep `tiled_*`. Activations stay f32 without rounding: each is split into three bf16 parts
// whose sum is exactly the activation (x1 its top 8 significant bits, x2 the next 8, x3 the
// rest: truncation leaves at most 8 bits a part), and a quant q (Q4_1: 0..15, Q8_0: -128..127)
// is exact in bf16, so every product q * x_i is exact and the tensor cores add them in f32.
// The scales come after a 32-weight block's sums: y += d * sum(q x) (+ m * sum(x) for Q4_1),
// which is sum((d q + m) x) summed in another order.
//
// Two matmuls, by the model's width (`PIPELINE_FROM_EMBD` in mod.rs). Both take blocks of
// MMA_ROWS weight rows x MMA_TOKENS tokens, 8 warps; warp w computes rows 32 (w % 4) .. + 32 and
// tokens 32 (w / 4) .. + 32 as 2 x 4 tiles of mma.m16n8k16. The gated kernel's block is
// MMA_ROWS_GATED rows of both matrices, warp w rows 16 (w % 4) .. + 16 of each: the same 128
// staged rows and the same accumulators a thread. When the tiles would leave SMs idle (a short
// chunk: few token tiles), the host splits the columns over gridDim.z blocks, each adding its
// partial sums into y atomically: the same products, summed in another order. Each stages the
// 32 columns of a quant block in an order that is not the weights' own, quants and
// activations alike, so every product still pairs a weight with its activation; only the order
// the tensor cores add them in differs.
//
// `mma_body` (one pass; narrow models): each 32-column step stages the block's quants as bf16
// and its activations' three parts in shared memory; the next step's global loads are issued
// before this step's products, and the warps take their fragments with ldmatrix. Its staged
// order: within each group of four, columns 4a, 4a + 1, 4a + 2, 4a + 3 hold weights 4a, 4a + 2,
// 4a + 1, 4a + 3, so that two Q4_1 nibbles two bytes apart become a bf16 pair in one operation
// (mma_q4_1_pair).
//
// `mma_pipe_body` (pipelined; wide models, compiled under PIPELINED): `split_parts`, or the
// kernel that wrote the input (`rmsnorm_split`, `attention_combine_split`, the pipelined
// SwiGLU's epilogue), splits a chunk's activations once into three bf16 planes of (t, cols)
// and each 32-column block's sum (cols / 32, t), so that the matmul's blocks, many for one
// token tile, neither split nor sum them again. The matmul then streams raw quants, scales,
// parts and sums into shared memory with `cp.async`, MMA_STAGES_* steps of MMA_KB quant blocks
// in flight, one barrier a step; each warp turns its rows' quants into mma fragments in
// registers, and takes the parts' fragments with ldmatrix. Its staged order: two k16 tiles,
// tile h holding weights 16 h .. 16 h + 15, where columns 2 c, 2 c + 1, 2 c + 8, 2 c + 9 of a
// tile hold its weights 4 c, 4 c + 2, 4 c + 1, 4 c + 3 (`staged_position`). It lets lane (g, c)
// of a warp build all its A fragments of a row from one 4-byte word of the row's quants: Q4_1
// bytes 4 c .. 4 c + 3 hold weights 4 c .. 4 c + 3 in their low nibbles (tile 0) and 16 + 4 c
// .. in their high ones (tile 1), and two nibbles two bytes apart become a bf16 pair in one
// operation (mma_q4_1_pair).
#define MMA_ROWS 128
#define MMA_ROWS_GATED 64
#define MMA_TOKENS 64
#define MMA_THREADS 256
// bf16 elements a staged row of the one-pass matmul (`mma_body`) takes: 32, and 8 of padding
// so that the 8 rows an ldmatrix reads (80 bytes apart) fall in distinct banks.
#define MMA_STRIDE 40
// Quant blocks (32 columns each) a pipeline step stages, and the steps in flight: Q8_0's
// quants take twice the room, and three of its steps would leave one block an SM.
#define MMA_KB 2
#define MMA_STAGES_Q4_1 3
#define MMA_STAGES_Q8_0 2

// x with its low 16 bits cleared: its top 8 significant bits, exact in bf16.
__device__ __forceinline__ float bf16_top(float x) {
    return __uint_as_float(__float_as_uint(x) & 0xffff0000u);
}

// Two bf16 values (their f32 bit patterns' top halves) in one register, `lo` the lower k.
__device__ __forceinline__ u32 bf16_pair(float lo, float hi) {
    return (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xffff0000u);
}

// The nibbles in bits 0-3 and 16-19 of `w` as a bf16 pair, exactly: 0x4300 | q is the bf16
// 128 + q (seven mantissa bits hold q), and 128 + q - 128 = q is exact.
__device__ __forceinline__ u32 mma_q4_1_pair(u32 w) {
    const u32 biased = (w & 0x000f000fu) | 0x43004300u;
    u32 q;
    // 1.0 * biased - 128 in both halves (0x3f80 is bf16 1.0, 0xc300 is -128.0).
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(q) : "r"(biased), "r"(0x3f803f80u), "r"(0xc300c300u));
    return q;
}

// The shared-memory address of `p`, as ldmatrix takes it.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// 16 bytes from global to shared memory without passing through registers (sm_80 cp.async,
// in the group the next cp_async_commit closes); zeros instead where `in` is false (src is
// then not read, but must still be an address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool in) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(in ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Four 8 x 8 bf16 matrices from shared memory: lane l gives the address of row l % 8 of matrix
// l / 8, and receives in register j the pair at row l / 4, columns 2 (l % 4) .. + 1 of matrix j:
// exactly the mma fragments' layout.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a b for one m16n8k16 tile: a 16 x 16 bf16 (row-major fragments), b 16 x 8 bf16, c f32.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c = a b for one m16n8k16 tile (a fresh sum: c's old contents are not read).
__device__ __forceinline__ void mma_bf16_first(float (&c)[4], const u32 (&a)[4], u32 b0,
                                               u32 b1) {
    const float z = 0.0f;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%10,%10,%10};"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(z));
}

// 4 bytes from global to shared memory, as cp_async16 (zeros where `in` is false).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool in) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(in ? 4 : 0)
                 : "memory");
}

// The column split of a tensor-core matmul block: when the host launches gridDim.z > 1 (never
// for a gated kernel, whose SwiGLU needs whole sums), block z takes quant blocks begin .. end
// of the `nb` and adds its partial sums into y atomically (y zeroed first unless accumulating).
struct MmaSplit {
    int splits, begin, end;
};
__device__ __forceinline__ MmaSplit mma_split(int nb) {
    const int splits = gridDim.z;
    return {splits, (int)((long)blockIdx.z * nb / splits), (int)((long)(blockIdx.z + 1) * nb / splits)};
}

// The global data of one 32-column step a thread stages: 16 quants of one row of one matrix
// (Q4_1: all 16 bytes of the block, of which it takes one nibble each; Q8_0: half the block's
// bytes) with the row's scales, and 8 activations of one token.
struct MmaLoads {
    uint4 q;
    u32 s;
    float4 x0, x1;
};

template <int FMT>
__device__ __forceinline__ void mma_fetch(MmaLoads& l, const u8* w, const u8* s, const float* x,
                                          int b, int nb, int row, bool row_in, int half, int tok,
                                          bool tok_in, int cols, int qtr) {
    const long blk = (long)row * nb + b;
    if (!row_in) {
        l.q = make_uint4(0u, 0u, 0u, 0u);
        l.s = 0u;
    } else if (FMT == FMT_Q4_1) {
        l.q = reinterpret_cast<const uint4*>(w)[blk];
        l.s = reinterpret_cast<const u32*>(s)[blk];
    } else {
        l.q = reinterpret_cast<const uint4*>(w)[blk * 2 + half];
        l.s = reinterpret_cast<const u16*>(s)[blk];
    }
    if (tok_in) {
        const float4* xp =
            reinterpret_cast<const float4*>(x + (long)tok * cols + b * 32 + qtr * 8);
        l.x0 = xp[0];
        l.x1 = xp[1];
    } else {
        l.x0 = l.x1 = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// Zeros a tensor-core matmul's accumulators (NM matrices, IT 16-row tiles, J 8-token tiles).
template <int NM, int IT, int J>
__device__ __forceinline__ void mma_zero(float (&acc)[NM][IT][J][4]) {
#pragma unroll
    for (int m = 0; m < NM; m++)
#pragma unroll
        for (int i = 0; i < IT; i++)
#pragma unroll
            for (int j = 0; j < J; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[m][i][j][e] = 0.0f;
}

// Stores warp (warp_row, warp_tok)'s results of a tensor-core matmul block at (row0, tok0):
// GATED, the SwiGLU of the gate's and up's sums; else the sums, added atomically under a column
// split (splits > 1), or added to y when accumulating. Element e of tile (i, j) is row
// warp_row + row_tile i + g (+ 8 for e >= 2), token warp_tok + 8 j + 2 tig + e % 2.
template <bool GATED, int NM, int IT, int J>
__device__ __forceinline__ void mma_store(const float (&acc)[NM][IT][J][4], float* y, int rows,
                                          int t, int row0, int tok0, int warp_row, int row_tile,
                                          int warp_tok, int g, int tig, int splits,
                                          int accumulate) {
#pragma unroll
    for (int i = 0; i < IT; i++)
#pragma unroll
        for (int j = 0; j < J; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int row = row0 + warp_row + row_tile * i + g + (e >= 2 ? 8 : 0);
                const int tok = tok0 + warp_tok + 8 * j + 2 * tig + e % 2;
                if (row >= rows || tok >= t) continue;
                float* out = y + (long)tok * rows + row;
                if (GATED) {
                    const float gate = acc[0][i][j][e];
                    *out = gate / (1.0f + expf(-gate)) * acc[NM - 1][i][j][e];
                } else if (splits > 1) {
                    atomicAdd(out, acc[0][i][j][e]);
                } else {
                    *out = accumulate ? *out + acc[0][i][j][e] : acc[0][i][j][e];
                }
            }
}

template <int FMT, bool GATED>
__device__ void mma_body(const u8* w, const u8* s, const u8* w2, const u8* s2, const float* x,
                         float* y, int rows, int cols, int t, int accumulate) {
    // Matrices, 16-row tiles a warp, and rows a block.
    constexpr int NM = GATED ? 2 : 1, IT = GATED ? 1 : 2, BR = GATED ? MMA_ROWS_GATED : MMA_ROWS;
    __shared__ __align__(16) u16 wsh[NM][BR][MMA_STRIDE];
    __shared__ __align__(16) u16 xsh[3][MMA_TOKENS][MMA_STRIDE];
    __shared__ __align__(8) float2 dmsh[NM][BR];  // a row's (d, m) this step
    __shared__ __align__(8) float xsum[MMA_TOKENS];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tig = lane % 4;
    const int wm = warp % 4, wn = warp / 4;
    const int row0 = blockIdx.x * BR, tok0 = blockIdx.y * MMA_TOKENS;
    const int nb = cols / 32;
    const MmaSplit split = mma_split(nb);
    const int splits = split.splits, b_begin = split.begin, b_end = split.end;
    // What this thread stages: quants 16 half .. 16 half + 15 of row lr of matrix ms, and
    // activations 8 qtr .. 8 qtr + 7 of token lt.
    const int ms = (tid / 2) / BR, lr = (tid / 2) % BR, half = tid % 2, lt = tid / 4, qtr = tid % 4;
    const bool row_in = row0 + lr < rows, tok_in = tok0 + lt < t;
    const u8* const wms = ms == 0 ? w : w2;
    const u8* const sms = ms == 0 ? s : s2;
    // The shared-memory rows this lane points ldmatrix at: for A (16 rows x 16 columns),
    // row l % 8 + 8 ((l / 8) % 2) at column 8 (l / 16); for B (two 8-token tiles x 16
    // columns), token l % 8 + 8 (l / 16) at column 8 ((l / 8) % 2).
    const int a_row = 16 * IT * wm + lane % 8 + 8 * ((lane / 8) % 2), a_col = 8 * (lane / 16);
    const int b_tok = 32 * wn + lane % 8 + 8 * (lane / 16), b_col = 8 * ((lane / 8) % 2);
    float acc[NM][IT][4][4], part[NM][IT][4][4];
    mma_zero(acc);
    MmaLoads next;
    mma_fetch<FMT>(next, wms, sms, x, b_begin, nb, row0 + lr, row_in, half, tok0 + lt, tok_in,
                   cols, qtr);
    for (int b = b_begin; b < b_end; b++) {
        const MmaLoads cur = next;
        // Stage the quants as bf16 pairs in the staged column order, and the scales.
        {
            const u32 words[4] = {cur.q.x, cur.q.y, cur.q.z, cur.q.w};
            u32 pairs[8];
#pragma unroll
            for (int c = 0; c < 4; c++) {
                if (FMT == FMT_Q4_1) {
                    // Bytes 4c .. 4c + 3, nibble `half`: weights 16 half + 4c + (0, 2) and
                    // (1, 3).
                    const u32 word = words[c] >> (4 * half);
                    pairs[2 * c] = mma_q4_1_pair(word);
                    pairs[2 * c + 1] = mma_q4_1_pair(word >> 8);
                } else {
                    const u32 word = words[c];
                    pairs[2 * c] = bf16_pair((float)(signed char)(word & 0xff),
                                             (float)(signed char)((word >> 16) & 0xff));
                    pairs[2 * c + 1] = bf16_pair((float)(signed char)((word >> 8) & 0xff),
                                                 (float)(signed char)(word >> 24));
                }
            }
            uint4* dst = reinterpret_cast<uint4*>(&wsh[ms][lr][16 * half]);
            dst[0] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
            dst[1] = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
            if (half == 0) {
                if (FMT == FMT_Q4_1) {
                    dmsh[ms][lr] = make_float2(f16_to_f32((u16)(cur.s & 0xffff)),
                                               f16_to_f32((u16)(cur.s >> 16)));
                } else {
                    dmsh[ms][lr] = make_float2(f16_to_f32((u16)cur.s), 0.0f);
                }
            }
        }
        // Stage the activations' three parts in the same column order, and their sum over
        // the block (for Q4_1's m).
        {
            const float v[8] = {cur.x0.x, cur.x0.z, cur.x0.y, cur.x0.w,
                                cur.x1.x, cur.x1.z, cur.x1.y, cur.x1.w};
            float p1[8], p2[8], p3[8];
            float sum = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                p1[e] = bf16_top(v[e]);
                const float r = v[e] - p1[e];
                p2[e] = bf16_top(r);
                p3[e] = r - p2[e];
            }
            if (FMT == FMT_Q4_1) {
                // The block's sum, for the m term.
                sum = ((cur.x0.x + cur.x0.y) + (cur.x0.z + cur.x0.w)) +
                      ((cur.x1.x + cur.x1.y) + (cur.x1.z + cur.x1.w));
            }
            uint4* const dst = reinterpret_cast<uint4*>(&xsh[0][lt][8 * qtr]);
            dst[0] = make_uint4(bf16_pair(p1[0], p1[1]), bf16_pair(p1[2], p1[3]),
                                bf16_pair(p1[4], p1[5]), bf16_pair(p1[6], p1[7]));
            dst[MMA_TOKENS * MMA_STRIDE / 8] =
                make_uint4(bf16_pair(p2[0], p2[1]), bf16_pair(p2[2], p2[3]),
                           bf16_pair(p2[4], p2[5]), bf16_pair(p2[6], p2[7]));
            dst[MMA_TOKENS * MMA_STRIDE / 4] =
                make_uint4(bf16_pair(p3[0], p3[1]), bf16_pair(p3[2], p3[3]),
                           bf16_pair(p3[4], p3[5]), bf16_pair(p3[6], p3[7]));
            if (FMT == FMT_Q4_1) {
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                if (qtr == 0) xsum[lt] = sum;
            }
        }
        __syncthreads();
        if (b + 1 < b_end) {
            mma_fetch<FMT>(next, wms, sms, x, b + 1, nb, row0 + lr, row_in, half, tok0 + lt,
                           tok_in, cols, qtr);
        }
#pragma unroll
        for (int k0 = 0; k0 < 32; k0 += 16) {
            u32 a[NM][IT][4];
#pragma unroll
            for (int m = 0; m < NM; m++)
#pragma unroll
                for (int i = 0; i < IT; i++)
                    ldmatrix_x4(a[m][i], smem_addr(&wsh[m][a_row + 16 * i][k0 + a_col]));
            // The smallest part first, so that it is not lost below the larger ones' sum.
#pragma unroll
            for (int p = 2; p >= 0; p--)
#pragma unroll
                for (int jj = 0; jj < 4; jj += 2) {
                    // bf[0], bf[1]: tile jj's two halves of k; bf[2], bf[3]: tile jj + 1's.
                    u32 bf[4];
                    ldmatrix_x4(bf, smem_addr(&xsh[p][b_tok + 8 * jj][k0 + b_col]));
#pragma unroll
                    for (int h = 0; h < 2; h++)
#pragma unroll
                        for (int m = 0; m < NM; m++)
#pragma unroll
                            for (int i = 0; i < IT; i++) {
                                if (k0 == 0 && p == 2) {
                                    mma_bf16_first(part[m][i][jj + h], a[m][i], bf[2 * h],
                                                   bf[2 * h + 1]);
                                } else {
                                    mma_bf16(part[m][i][jj + h], a[m][i], bf[2 * h],
                                             bf[2 * h + 1]);
                                }
                            }
                }
        }
        // Scale the block's sums into the result: element e of tile (i, j) is row
        // 16 IT wm + 16 i + g (+ 8 for e >= 2), token 32 wn + 8 j + 2 tig + e % 2.
        float2 xs[4];
#pragma unroll
        for (int j = 0; j < 4; j++)
            xs[j] = *reinterpret_cast<const float2*>(&xsum[32 * wn + 8 * j + 2 * tig]);
#pragma unroll
        for (int m = 0; m < NM; m++)
#pragma unroll
            for (int i = 0; i < IT; i++)
#pragma unroll
                for (int hr = 0; hr < 2; hr++) {
                    const float2 dm = dmsh[m][16 * IT * wm + 16 * i + g + 8 * hr];
#pragma unroll
                    for (int j = 0; j < 4; j++)
#pragma unroll
                        for (int ec = 0; ec < 2; ec++) {
                            const int e = 2 * hr + ec;
                            float v = fmaf(dm.x, part[m][i][j][e], acc[m][i][j][e]);
                            if (FMT == FMT_Q4_1) v = fmaf(dm.y, ec ? xs[j].y : xs[j].x, v);
                            acc[m][i][j][e] = v;
                        }
                }
        __syncthreads();
    }
    mma_store<GATED>(acc, y, rows, t, row0, tok0, 16 * IT * wm, 16, 32 * wn, g, tig, splits,
                     accumulate);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS) mma_q4_1(const u8* w, const u8* s,
                                                           const float* x, float* y, int rows,
                                                           int cols, int t, int accumulate) {
    after_predecessor();
    mma_body<FMT_Q4_1, false>(w, s, w, s, x, y, rows, cols, t, accumulate);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS) mma_q8_0(const u8* w, const u8* s,
                                                           const float* x, float* y, int rows,
                                                           int cols, int t, int accumulate) {
    after_predecessor();
    mma_body<FMT_Q8_0, false>(w, s, w, s, x, y, rows, cols, t, accumulate);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
    mma_swiglu_q4_1(const u8* wg, const u8* sg, const u8* wu, const u8* su, const float* x,
                    float* y, int rows, int cols, int t) {
    after_predecessor();
    mma_body<FMT_Q4_1, true>(wg, sg, wu, su, x, y, rows, cols, t, 0);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
    mma_swiglu_q8_0(const u8* wg, const u8* sg, const u8* wu, const u8* su, const float* x,
                    float* y, int rows, int cols, int t) {
    after_predecessor();
    mma_body<FMT_Q8_0, true>(wg, sg, wu, su, x, y, rows, cols, t, 0);
}

// Where weight w (0..31) of a 32-weight block is staged (see the comment above MMA_ROWS):
// tile w / 16, column 2 c + lo + 8 hi of it for w % 16 = 4 c + 2 lo + hi.
__device__ __forceinline__ int staged_position(int w) {
    const int h = w >> 4, c = (w >> 2) & 3, lo = (w >> 1) & 1, hi = w & 1;
    return 16 * h + 8 * hi + 2 * c + lo;
}

// Where the parts of activation (tok, col) of a (t, cols) input lie in each plane, and a
// plane's length. The mma.sync matmul reads them as rows of tokens: token tok's columns at
// tok * cols, each 32-column block in the staged order. With warpgroup MMAs (WGMMA) every
// tile of 64 tokens by 64 columns (MMA_TOKENS by a pipeline step) is one contiguous run of
// 8 KB in the order the tensor cores read it from shared memory (the core matrices of
// `mma_pipe_body`), so that one bulk copy stages a step's plane; the tiles run along a
// token tile's columns, then the token tiles, the plane padded to whole tiles.
#ifdef WGMMA
#define PARTS_TILE 64
__device__ __forceinline__ long parts_plane(int t, int cols) {
    return (long)((t + PARTS_TILE - 1) / PARTS_TILE) * ((cols + PARTS_TILE - 1) / PARTS_TILE) *
           (PARTS_TILE * PARTS_TILE);
}
__device__ __forceinline__ long parts_at(int tok, int col, int cols) {
    const int tiles = (cols + PARTS_TILE - 1) / PARTS_TILE, tl = tok % PARTS_TILE;
    const int c = (col & 32) + staged_position(col & 31);  // staged, within the tile
    return ((long)(tok / PARTS_TILE) * tiles + col / PARTS_TILE) * (PARTS_TILE * PARTS_TILE) +
           64 * (8 * (tl / 8) + c / 8) + 8 * (tl % 8) + c % 8;
}
#else
__device__ __forceinline__ long parts_plane(int t, int cols) { return (long)t * cols; }
__device__ __forceinline__ long parts_at(int tok, int col, int cols) {
    return (long)tok * cols + (col & ~31) + staged_position(col & 31);
}
#endif

// x (t, cols) f32 into the matmul's operands: planes p = 0, 1, 2 of `parts` (each
// parts_plane(t, cols) bf16, laid out as parts_at says) the three parts of each activation, and
// sums[b * t + token] the sum of block b's 32 activations (Q4_1's m term). One warp a block of
// one token.
// Writes activation v of column `col` of token `tok` (of t, `cols` wide) into `parts`, the three
// bf16 planes split_parts describes: its three parts, at the column's staged position.
__device__ __forceinline__ void write_parts(u16* parts, float v, int tok, int col, int t,
                                            int cols) {
    const float p1 = bf16_top(v), r = v - p1, p2 = bf16_top(r), p3 = r - p2;
    const long at = parts_at(tok, col, cols), plane = parts_plane(t, cols);
    parts[at] = (u16)(__float_as_uint(p1) >> 16);
    parts[plane + at] = (u16)(__float_as_uint(p2) >> 16);
    parts[2 * plane + at] = (u16)(__float_as_uint(p3) >> 16);
}

// write_parts for the 32 lanes of a warp holding the 32 activations of one column block, lane
// l column 32 b + l, and the block's sum into sums[b * t + tok]. Every lane must call it.
__device__ __forceinline__ void write_parts_block(u16* parts, float* sums, float v, int tok,
                                                  int col, int t, int cols) {
    write_parts(parts, v, tok, col, t, cols);
    const float sum = warp_sum(v);
    if (threadIdx.x % 32 == 0) sums[(long)(col / 32) * t + tok] = sum;
}

// The pipelined matmul and the kernels that feed it are compiled only for a model wide enough
// to take them (PIPELINED: `PIPELINE_FROM_EMBD` in mod.rs), since NVRTC's memory at load grows
// with them.
#ifdef PIPELINED
// The pipelined matmul's block: MMA_THREADS, as the one-pass matmul's, or with warpgroup MMAs
// four warpgroups (MMA_PIPE_THREADS_WG), one block an SM, which stage the quants of twice the
// rows (MMA_PIPE_ROWS, one row's scales a thread pair) for the same parts: the parts are most
// of what a block reads from L2 a step, and then serve 256 rows instead of 128.
#define MMA_PIPE_THREADS_WG 512
#ifdef WGMMA
#define MMA_PIPE_THREADS MMA_PIPE_THREADS_WG
#define MMA_PIPE_MIN_BLOCKS 1
#else
#define MMA_PIPE_THREADS MMA_THREADS
#define MMA_PIPE_MIN_BLOCKS 2
#endif
#define MMA_PIPE_ROWS (MMA_PIPE_THREADS / 2)
extern "C" __global__ void split_parts(const float* x, u16* parts, float* sums, int t, int cols) {
    after_predecessor();
    const int nb = cols / 32, lane = threadIdx.x % 32;
    const long item = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (item >= (long)t * nb) return;
    const int tok = (int)(item / nb), col = (int)(item % nb) * 32 + lane;
    write_parts_block(parts, sums, x[(long)tok * cols + col], tok, col, t, cols);
}

// The shared memory of one pipeline step of the matmul in format FMT, in bytes, region by
// region (each a multiple of 16): the parts, 3 x MMA_TOKENS tokens of MMA_KB * 32 bf16 (and
// 16 bytes of padding, so that the 8 tokens an ldmatrix reads fall in distinct banks); the
// quants of 128 staged rows (padded likewise for the fragment loads); their scales (Q8_0: the
// aligned 4-byte word that holds the 2-byte scale); the blocks' activation sums.
template <int FMT>
struct MmaStage {
    static constexpr int QB = FMT == FMT_Q4_1 ? 16 : 32;  // a 32-weight block's quant bytes
    static constexpr int X_ROW = MMA_KB * 64 + 16;
    static constexpr int Q_ROW = MMA_KB * QB + 16;
    static constexpr int X = 3 * MMA_TOKENS * X_ROW;
    static constexpr int Q = MMA_PIPE_ROWS * Q_ROW;
    static constexpr int S = MMA_PIPE_ROWS * MMA_KB * 4;
    static constexpr int XS = MMA_KB * MMA_TOKENS * 4;
    static constexpr int BYTES = X + Q + S + XS;
    static constexpr int STAGES = FMT == FMT_Q4_1 ? MMA_STAGES_Q4_1 : MMA_STAGES_Q8_0;
};

// Q8_0 quants `lo_byte` and `hi_byte` of `word` as a bf16 pair (exact: at most 8 bits each).
__device__ __forceinline__ u32 s8_pair(u32 word, int lo_byte, int hi_byte) {
    return bf16_pair((float)(signed char)(word >> (8 * lo_byte)),
                     (float)(signed char)(word >> (8 * hi_byte)));
}

// On sm_90a (the H100 and H200, `-D WGMMA` from mod.rs) the pipeline's products run as
// warpgroup MMAs: each warpgroup of four warps multiplies 64 rows by the block's 64 tokens with
// `wgmma.mma_async` (A, the quants, from registers as for mma.sync; B, the parts, read by the
// tensor cores from shared memory through a descriptor), where mma.sync took 16 x 8 tiles a
// warp. Warpgroup wn takes staged rows 64 wn .. + 64: rows 64 wn .. of the matrix, or, gated,
// the gate's (wn 0) or the up's (wn 1) 64 rows, whose sums meet in shared memory at the end. Its B layout is K-major without swizzle: 8 x 8 "core matrices" of 128 contiguous
// bytes (8 tokens of 8 columns), 8 of them along a stage's 64 columns (128 bytes apart: the
// descriptor's leading offset), then the next 8 tokens (1,024 bytes: its stride offset).
#ifdef WGMMA
#define MMA_WG 1
// The descriptor of a K-major, unswizzled B operand at shared address `addr` (16-byte aligned).
__device__ __forceinline__ unsigned long long wgmma_desc(u32 addr) {
    return (unsigned long long)((addr & 0x3ffffu) >> 4) | (unsigned long long)(128 >> 4) << 16 |
           (unsigned long long)(1024 >> 4) << 32;
}
// Orders this thread's earlier register accesses before the warpgroup MMAs after it.
__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
// Closes the warpgroup MMAs issued so far into a group, and waits for every group to end.
__device__ __forceinline__ void wgmma_commit_and_wait() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
// Pins the accumulators of a tile in program order: the compiler sees an asm that may
// change them, so it moves no read of them above this point (after the wait: the sums are
// final) and no write below it (before the MMAs).
template <int J>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[J][4]) {
#pragma unroll
    for (int j = 0; j < J; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[j][e])::"memory");
}
// d (+)= a b for the warpgroup's 64 x 64 tile, K 16: a this warp's 16 rows as mma.sync's A
// fragments, b the descriptor's 64 tokens; d[j][e] as mma.sync's C of the 8-token tile j
// (rows g, g + 8 for e >= 2). `accumulate` 0 writes a fresh sum.
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[8][4], const u32 (&a)[4],
                                                unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, "
        "%8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, "
        "%24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate)
        : "memory");
}
// The mbarrier at shared address `bar`: set up for `count` arrivals; this thread's arrival
// with `bytes` more to come by bulk copies (complete_tx); a wait for phase `parity` to end.
__device__ __forceinline__ void mbarrier_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbarrier_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done)
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
}
// `bytes` (a multiple of 16) from global `src` to shared address `dst` by the copy engine,
// counted on mbarrier `bar`.
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
        : "memory");
}
#else
#define MMA_WG 0
#endif

template <int FMT, bool GATED>
__device__ void mma_pipe_body(const u8* w, const u8* s, const u8* w2, const u8* s2,
                              const u16* xp, const float* xsum, float* y, int rows, int cols,
                              int t, int accumulate, u16* y_parts, float* y_sums) {
    using L = MmaStage<FMT>;
    // Matrices, 16-row tiles a warp, and rows a block.
    constexpr int NM = GATED ? 2 : 1, IT = GATED ? 1 : 2;
    constexpr int BR = GATED ? MMA_PIPE_ROWS / 2 : MMA_PIPE_ROWS;
    // A thread's accumulator tiles: mma.sync gives warp (wm, wn) IT adjacent 16-row tiles of
    // each matrix by four 8-token tiles (tokens 32 wn ..); a warpgroup MMA gives it one tile
    // of 16 rows by all eight (below, `matrix` and `row_in` say which).
    constexpr bool WG = MMA_WG;
    constexpr int AM = WG ? 1 : NM, AI = WG ? 1 : IT, J = WG ? 8 : 4;
    // A stage's parts: mma.sync's padded token rows, or the warpgroup MMA's core matrices
    // (plane p at 8,192 p; token tok's 16 bytes of columns 8 c .. at 128 (8 (tok / 8) + c) +
    // 16 (tok % 8)).
    constexpr int X_PLANE = WG ? 8192 : MMA_TOKENS * L::X_ROW;
    static_assert(3 * X_PLANE <= L::X, "the parts fit their region");
    extern __shared__ __align__(16) u8 smem[];
    {
        // The host sizes the dynamic shared memory from its own copy of these constants; a
        // launch with less would write past it.
        u32 have;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
        if (have < (u32)(L::STAGES * L::BYTES)) __trap();
    }
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tig = lane % 4;
    // Warp wm of warpgroup wn (mma.sync: of token half wn; warpgroup MMAs: 0 .. 3).
    const int wm = warp % 4, wn = warp / 4;
    const int row0 = blockIdx.x * BR, tok0 = blockIdx.y * MMA_TOKENS;
    // The matrix of accumulator m, row g + 8 hr of its tile i (within the block's rows of that
    // matrix), and the first token of this warp's tiles (within the block's).
    auto matrix = [&](int m) { return WG ? (GATED ? wn / 2 : 0) : m; };
    auto row_in = [&](int i, int hr) {
        return (WG ? 64 * (GATED ? wn % 2 : wn) + 16 * wm : 16 * IT * wm + 16 * i) + g + 8 * hr;
    };
    const int warp_tok = WG ? 0 : 32 * wn;
    const int nb = cols / 32;
#if MMA_WG
    // A step's parts are one tile of them (parts_at), so each split is whole steps: the
    // blocks' MMA_KB-block units dealt out as mma_split deals blocks.
    static_assert(PARTS_TILE == MMA_TOKENS && PARTS_TILE == 32 * MMA_KB, "a step is a tile");
    const int splits = gridDim.z, units = (nb + MMA_KB - 1) / MMA_KB;
    const int b_begin = MMA_KB * (int)((long)blockIdx.z * units / splits);
    const int b_end = min(nb, MMA_KB * (int)((long)(blockIdx.z + 1) * units / splits));
#else
    const MmaSplit split = mma_split(nb);
    const int splits = split.splits, b_begin = split.begin, b_end = split.end;
#endif
    const int steps = (b_end - b_begin + MMA_KB - 1) / MMA_KB;
    const long plane = parts_plane(t, cols);
#if MMA_WG
    // Per stage, the mbarrier its parts' bulk copies count on: phase k of stage s ends when
    // step s + STAGES k has landed. Set up before the first copy.
    __shared__ __align__(8) unsigned long long full[L::STAGES];
    if (tid == 0) {
#pragma unroll
        for (int st = 0; st < L::STAGES; st++) mbarrier_init(smem_addr(&full[st]), 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
#endif

    // Issues the copies of step `st` (quant blocks b_begin + MMA_KB st ..) into stage `stage`;
    // what lies past the rows, the tokens or the split arrives as zeros. Thread tid copies:
    // 16-byte piece tid % QP of staged rows tid / QP + (256 / QP) n, n < QP / 2 (QP the pieces
    // a row: 128 rows of QP pieces are QP / 2 copies a thread);
    // the scales of row tid / 2, block tid % 2; piece tid % 8 of tokens tid / 8 and + 32 in each
    // part; and (Q4_1) the sum of block tid / 64 of token tid % 64.
    static_assert(MMA_KB == 2 && MMA_TOKENS == 64 &&
                      (MMA_PIPE_THREADS == 256 || (MMA_PIPE_THREADS == 512 && WG)),
                  "the copies' shape");
    // Tokens a thread copies of each part: x_tok and (256 threads) x_tok + 32.
    constexpr int X_TOKS = MMA_PIPE_THREADS == 512 ? 1 : 2;
    constexpr int QP = MMA_KB * L::QB / 16;
    const int q_piece = tid % QP, q_kb = q_piece * 16 / L::QB;
    // Each thread copies piece x_piece (8 columns) of tokens x_tok and x_tok + 32 of each part;
    // for the core matrices, 8 neighbouring threads fill one (128 contiguous bytes).
    const int x_piece = WG ? (tid / 8) % 8 : tid % 8, x_tok = WG ? 8 * (tid / 64) + tid % 8 : tid / 8;
    const int x_at = WG ? 128 * (8 * (x_tok / 8) + x_piece) + 16 * (x_tok % 8)
                        : x_tok * L::X_ROW + x_piece * 16;
    constexpr int X_PLUS32 = WG ? 4096 : 32 * L::X_ROW;  // token x_tok + 32
    auto load = [&](int st, int stage) {
        u8* const xs = smem + stage * L::BYTES;
        u8* const qs = xs + L::X;
        u8* const ss = qs + L::Q;
        u8* const sm = ss + L::S;
        const int b0 = b_begin + MMA_KB * st;
#pragma unroll
        for (int n = 0; n < QP / 2; n++) {
            const int r = tid / QP + (MMA_PIPE_THREADS / QP) * n, lr = r % BR, row = row0 + lr;
            const int b = b0 + q_kb;
            const bool in = row < rows && b < b_end;
            const u8* src = r < BR ? w : w2;
            if (in) src += ((long)row * nb + b) * L::QB + (q_piece * 16) % L::QB;
            cp_async16(qs + r * L::Q_ROW + q_piece * 16, src, in);
        }
        {
            const int r = tid / 2, lr = r % BR, row = row0 + lr, b = b0 + tid % 2;
            const bool in = row < rows && b < b_end;
            const u8* src = r < BR ? s : s2;
            if (in) {
                const long blk = (long)row * nb + b;
                src += FMT == FMT_Q4_1 ? blk * 4 : (blk / 2) * 4;
            }
            cp_async4(ss + tid * 4, src, in);
        }
#if MMA_WG
        if (tid == 0) {
            // The step's tile of each plane, 8 KB each, on the stage's mbarrier.
            const u32 bar = smem_addr(&full[stage]);
            mbarrier_expect(bar, 3 * X_PLANE);
            const int tiles = (cols + PARTS_TILE - 1) / PARTS_TILE;
            const u16* const src =
                xp + ((long)(tok0 / PARTS_TILE) * tiles + b0 / MMA_KB) * (PARTS_TILE * PARTS_TILE);
#pragma unroll
            for (int p = 0; p < 3; p++)
                bulk_copy(smem_addr(xs + p * X_PLANE), src + p * plane, X_PLANE, bar);
        }
#else
        {
            const bool b_in = b0 + x_piece / 4 < b_end;
            const bool x_in0 = tok0 + x_tok < t, x_in1 = tok0 + x_tok + 32 < t;
            const u16* const src = xp + (long)(tok0 + x_tok) * cols + b0 * 32 + x_piece * 8;
            u8* const dst = xs + x_at;
#pragma unroll
            for (int p = 0; p < 3; p++) {
                const bool in0 = x_in0 && b_in, in1 = x_in1 && b_in;
                cp_async16(dst + p * X_PLANE, in0 ? src + p * plane : xp, in0);
                if (X_TOKS == 2)
                    cp_async16(dst + p * X_PLANE + X_PLUS32,
                               in1 ? src + p * plane + 32L * cols : xp, in1);
            }
        }
#endif
        if (FMT == FMT_Q4_1 && tid < MMA_KB * MMA_TOKENS) {
            const int kb = tid / MMA_TOKENS, tok = tok0 + tid % MMA_TOKENS, b = b0 + kb;
            const bool in = tok < t && b < b_end;
            cp_async4(sm + tid * 4, in ? xsum + (long)b * t + tok : xsum, in);
        }
    };

    float acc[AM][AI][J][4], part[AM][AI][J][4];
    mma_zero(acc);
    mma_zero(part);  // a warpgroup MMA names its accumulators as operands

#pragma unroll
    for (int st = 0; st < L::STAGES - 1; st++) {
        if (st < steps) load(st, st);
        cp_async_commit();
    }
    for (int st = 0; st < steps; st++) {
        cp_async_wait<L::STAGES - 2>();
#if MMA_WG
        // Step st's parts have landed (the copy engine's writes, visible once the mbarrier's
        // phase ends); then every warp is done with the stage the next copies reuse.
        mbarrier_wait(smem_addr(&full[st % L::STAGES]), (st / L::STAGES) & 1);
        __syncthreads();
#else
        __syncthreads();  // step st has landed, and every warp is done with the stage it reuses
#endif
        {
            const int ahead = st + L::STAGES - 1;
            if (ahead < steps) load(ahead, ahead % L::STAGES);
            cp_async_commit();
        }
        const u8* const xs = smem + (st % L::STAGES) * L::BYTES;
        const u8* const qs = xs + L::X;
        const u8* const ss = qs + L::Q;
        const u8* const sm = ss + L::S;
#pragma unroll 1
        for (int kb = 0; kb < MMA_KB; kb++) {
            // This lane's quant words of the block: row g + 8 hr of tile i of matrix m, bytes
            // 4 tig .. + 3 (Q8_0: of each 16-byte half, one a k16 tile).
            constexpr int HALVES = FMT == FMT_Q4_1 ? 1 : 2;
            u32 words[AM][AI][2][HALVES];
#pragma unroll
            for (int m = 0; m < AM; m++)
#pragma unroll
                for (int i = 0; i < AI; i++)
#pragma unroll
                    for (int hr = 0; hr < 2; hr++) {
                        const int r = matrix(m) * BR + row_in(i, hr);
                        const u8* q = qs + r * L::Q_ROW + kb * L::QB + 4 * tig;
#pragma unroll
                        for (int half = 0; half < HALVES; half++)
                            words[m][i][hr][half] = *reinterpret_cast<const u32*>(q + 16 * half);
                    }
            // A fragments of k16 tile h: register hr + 2 k8 of a[m][i] holds row g + 8 hr,
            // columns 2 tig + 8 k8 .. + 1.
            auto fragments = [&](int h, u32 (&a)[AM][AI][4]) {
#pragma unroll
                for (int m = 0; m < AM; m++)
#pragma unroll
                    for (int i = 0; i < AI; i++)
#pragma unroll
                        for (int hr = 0; hr < 2; hr++) {
                            if (FMT == FMT_Q4_1) {
                                const u32 word = words[m][i][hr][0] >> (4 * h);
                                a[m][i][hr] = mma_q4_1_pair(word);
                                a[m][i][2 + hr] = mma_q4_1_pair(word >> 8);
                            } else {
                                const u32 word = words[m][i][hr][h % HALVES];
                                a[m][i][hr] = s8_pair(word, 0, 2);
                                a[m][i][2 + hr] = s8_pair(word, 1, 3);
                            }
                        }
            };
#if MMA_WG
            {
                // Both k16 tiles' fragments first: a warpgroup MMA reads its registers until
                // the wait, so none may be rewritten while the block's products run.
                u32 a[2][AM][AI][4];
                fragments(0, a[0]);
                fragments(1, a[1]);
                wgmma_fence_operands(part[0][0]);
                wgmma_fence();
                // The block's 64 tokens of columns 32 kb .. (core matrices 4 kb ..).
                const u32 b0 = smem_addr(xs + 512 * kb);
#pragma unroll
                for (int h = 0; h < 2; h++)
                    // The smallest part first, so that it is not lost below the larger ones' sum.
#pragma unroll
                    for (int p = 2; p >= 0; p--)
                        wgmma_m64n64k16(part[0][0], a[h][0][0],
                                        wgmma_desc(b0 + p * X_PLANE + 256 * h), p != 2 || h != 0);
                wgmma_commit_and_wait();
                wgmma_fence_operands(part[0][0]);
            }
#else
            // The ldmatrix rows of this lane for the parts (two 8-token tiles x 16 columns):
            // token l % 8 + 8 (l / 16) at column 8 ((l / 8) % 2).
            const int b_tok = 32 * wn + lane % 8 + 8 * (lane / 16), b_col = 8 * ((lane / 8) % 2);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                u32 a[NM][IT][4];
                fragments(h, a);
                // The smallest part first, so that it is not lost below the larger ones' sum.
#pragma unroll
                for (int p = 2; p >= 0; p--)
#pragma unroll
                    for (int jj = 0; jj < 4; jj += 2) {
                        // bf[0], bf[1]: tile jj's two halves of k; bf[2], bf[3]: tile jj + 1's.
                        u32 bf[4];
                        ldmatrix_x4(bf, smem_addr(xs + (p * MMA_TOKENS + b_tok + 8 * jj) * L::X_ROW +
                                                  (kb * 32 + 16 * h + b_col) * 2));
#pragma unroll
                        for (int hj = 0; hj < 2; hj++)
#pragma unroll
                            for (int m = 0; m < NM; m++)
#pragma unroll
                                for (int i = 0; i < IT; i++) {
                                    if (p == 2 && h == 0) {
                                        mma_bf16_first(part[m][i][jj + hj], a[m][i],
                                                       bf[2 * hj], bf[2 * hj + 1]);
                                    } else {
                                        mma_bf16(part[m][i][jj + hj], a[m][i], bf[2 * hj],
                                                 bf[2 * hj + 1]);
                                    }
                                }
                    }
            }
#endif
            // Scale the block's sums into the result: element e of tile (i, j) is row
            // row_in(i, e / 2) of its matrix, token warp_tok + 8 j + 2 tig + e % 2.
            float2 xsj[J];
            if (FMT == FMT_Q4_1) {
#pragma unroll
                for (int j = 0; j < J; j++)
                    xsj[j] = *reinterpret_cast<const float2*>(
                        sm + (kb * MMA_TOKENS + warp_tok + 8 * j + 2 * tig) * 4);
            }
#pragma unroll
            for (int m = 0; m < AM; m++)
#pragma unroll
                for (int i = 0; i < AI; i++)
#pragma unroll
                    for (int hr = 0; hr < 2; hr++) {
                        const int lr = row_in(i, hr);
                        const u32 word = *reinterpret_cast<const u32*>(
                            ss + ((matrix(m) * BR + lr) * MMA_KB + kb) * 4);
                        float d, mm = 0.0f;
                        if (FMT == FMT_Q4_1) {
                            d = f16_to_f32((u16)(word & 0xffff));
                            mm = f16_to_f32((u16)(word >> 16));
                        } else {
                            // The scale's half of its aligned word (zeros past the rows): the
                            // parity of the block's index row * nb + b.
                            const int odd = ((row0 + lr) * (nb & 1) + b_begin + MMA_KB * st + kb) & 1;
                            d = f16_to_f32((u16)(odd ? word >> 16 : word & 0xffff));
                        }
#pragma unroll
                        for (int j = 0; j < J; j++)
#pragma unroll
                            for (int ec = 0; ec < 2; ec++) {
                                const int e = 2 * hr + ec;
                                float v = fmaf(d, part[m][i][j][e], acc[m][i][j][e]);
                                if (FMT == FMT_Q4_1) v = fmaf(mm, ec ? xsj[j].y : xsj[j].x, v);
                                acc[m][i][j][e] = v;
                            }
                    }
        }
    }
    cp_async_wait<0>();
#if MMA_WG
    if (GATED) {
        // The gate's sums (warpgroups 0 and 1) and the up's (2, 3) meet in shared memory,
        // red[m][token][row] (rows padded by 4, so that a warp's stores of a tile fall in
        // distinct banks), once every warp is done with the last step's stage. Then warp w
        // takes items w, w + 16, ..: 32 rows of one token, y and (y_parts not null) y split for
        // the down projection with the 32 rows' sum, as split_parts would leave it.
        // (The gated block's rows a matrix: BR, which this branch alone sees.)
        constexpr int GR = MMA_PIPE_ROWS / 2, RED_ROW = GR + 4, ROW_BLOCKS = GR / 32;
        static_assert(2 * MMA_TOKENS * RED_ROW * 4 <= L::STAGES * L::BYTES, "the sums fit");
        float* const red = reinterpret_cast<float*>(smem);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < J; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                red[(matrix(0) * MMA_TOKENS + 8 * j + 2 * tig + e % 2) * RED_ROW +
                    row_in(0, e / 2)] = acc[0][0][j][e];
        __syncthreads();
        for (int item = warp; item < ROW_BLOCKS * MMA_TOKENS; item += MMA_PIPE_THREADS / 32) {
            const int tl = item / ROW_BLOCKS, blk = item % ROW_BLOCKS, tok = tok0 + tl;
            const int rl = 32 * blk + lane;
            // Whole warps leave: y_parts' rows are whole 32-row blocks.
            if (tok >= t || row0 + 32 * blk >= rows) continue;
            const float gate = red[tl * RED_ROW + rl], up = red[(MMA_TOKENS + tl) * RED_ROW + rl];
            const float v = gate / (1.0f + expf(-gate)) * up;
            if (row0 + rl < rows) y[(long)tok * rows + row0 + rl] = v;
            if (y_parts != nullptr) write_parts_block(y_parts, y_sums, v, tok, row0 + rl, t, rows);
        }
        return;
    }
#else
    if (GATED) {
        // y, and (y_parts not null) y split for the down projection, as split_parts would
        // leave it: rows are y's columns, warp w's 16 rows half of column block w / 2. A
        // block's sum over its 32 rows: each warp sums its 16 over g, then two warps' sums
        // meet in shared memory, free once every warp is done with the last step.
        float* const red = reinterpret_cast<float*>(smem);  // [4 warps' rows][MMA_TOKENS]
        if (y_parts != nullptr) __syncthreads();
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int ec = 0; ec < 2; ec++) {
                const int tl = 32 * wn + 8 * j + 2 * tig + ec, tok = tok0 + tl;
                float v[2];
#pragma unroll
                for (int hr = 0; hr < 2; hr++) {
                    const int e = 2 * hr + ec, row = row0 + 16 * wm + g + 8 * hr;
                    const float gate = acc[0][0][j][e];
                    v[hr] = gate / (1.0f + expf(-gate)) * acc[NM - 1][0][j][e];
                    if (row >= rows || tok >= t) continue;
                    y[(long)tok * rows + row] = v[hr];
                    if (y_parts != nullptr) write_parts(y_parts, v[hr], tok, row, t, rows);
                }
                if (y_parts != nullptr) {
                    float sum = v[0] + v[1];
                    sum += __shfl_xor_sync(0xffffffffu, sum, 4);
                    sum += __shfl_xor_sync(0xffffffffu, sum, 8);
                    sum += __shfl_xor_sync(0xffffffffu, sum, 16);
                    if (g == 0) red[wm * MMA_TOKENS + tl] = sum;
                }
            }
        if (y_parts != nullptr) {
            __syncthreads();
            if (tid < 2 * MMA_TOKENS) {
                const int blk = tid / MMA_TOKENS, tl = tid % MMA_TOKENS;
                const int row = row0 + 32 * blk, tok = tok0 + tl;
                if (row < rows && tok < t)
                    y_sums[(long)(row / 32) * t + tok] =
                        red[2 * blk * MMA_TOKENS + tl] + red[(2 * blk + 1) * MMA_TOKENS + tl];
            }
        }
        return;
    }
#endif
    mma_store<false>(acc, y, rows, t, row0, tok0, row_in(0, 0) - g, 16, warp_tok, g, tig, splits,
                     accumulate);
}

// `xp` and `xsum`: the chunk's activations as split_parts leaves them.
extern "C" __global__ void __launch_bounds__(MMA_PIPE_THREADS, MMA_PIPE_MIN_BLOCKS)
    mma_pipe_q4_1(const u8* w, const u8* s, const u16* xp, const float* xsum, float* y, int rows,
             int cols, int t, int accumulate) {
    after_predecessor();
    mma_pipe_body<FMT_Q4_1, false>(w, s, w, s, xp, xsum, y, rows, cols, t, accumulate, nullptr,
                              nullptr);
}
extern "C" __global__ void __launch_bounds__(MMA_PIPE_THREADS, MMA_PIPE_MIN_BLOCKS)
    mma_pipe_q8_0(const u8* w, const u8* s, const u16* xp, const float* xsum, float* y, int rows,
             int cols, int t, int accumulate) {
    after_predecessor();
    mma_pipe_body<FMT_Q8_0, false>(w, s, w, s, xp, xsum, y, rows, cols, t, accumulate, nullptr,
                              nullptr);
}
extern "C" __global__ void __launch_bounds__(MMA_PIPE_THREADS, MMA_PIPE_MIN_BLOCKS)
    mma_pipe_swiglu_q4_1(const u8* wg, const u8* sg, const u8* wu, const u8* su, const u16* xp,
                    const float* xsum, float* y, int rows, int cols, int t, u16* y_parts,
                    float* y_sums) {
    after_predecessor();
    mma_pipe_body<FMT_Q4_1, true>(wg, sg, wu, su, xp, xsum, y, rows, cols, t, 0, y_parts, y_sums);
}
extern "C" __global__ void __launch_bounds__(MMA_PIPE_THREADS, MMA_PIPE_MIN_BLOCKS)
    mma_pipe_swiglu_q8_0(const u8* wg, const u8* sg, const u8* wu, const u8* su, const u16* xp,
                    const float* xsum, float* y, int rows, int cols, int t, u16* y_parts,
                    float* y_sums) {
    after_predecessor();
    mma_pipe_body<FMT_Q8_0, true>(wg, sg, wu, su, xp, xsum, y, rows, cols, t, 0, y_parts, y_sums);
}
#endif  // PIPELINED

// One weight of row `row`, column `col`, of a matrix in format `fmt`.
__device__ __forceinline__ float weight_at(int fmt, const u8* w, const u8* s, long row, int col,
                                           int cols) {
    const long blk = row * (cols / 32) + col / 32;
    const int j = col % 32;
    if (fmt == FMT_F32) return reinterpret_cast<const float*>(w)[row * cols + col];
    if (fmt == FMT_Q4_1) {
        const u32 dm = reinterpret_cast<const u32*>(s)[blk];
        const u8 byte = w[blk * 16 + (j % 16)];
        const float q = (float)(j < 16 ? (byte & 15) : (byte >> 4));
        return fmaf(f16_to_f32((u16)(dm & 0xffff)), q, f16_to_f32((u16)(dm >> 16)));
    }
    const float d = f16_to_f32(reinterpret_cast<const u16*>(s)[blk]);
    return d * (float)(signed char)w[blk * 32 + j];
}

// x (t, cols) = the embedding rows of `tokens` (checked against the vocabulary by the host),
// one block per token. With `g` (a decode step: one token, one block), also the first
// RMSNorm's half (matvec_body's fusion): xg = x ⊙ g and norms[0] = the sum of squares of x,
// and norms[1..n_norms] zeroed for the step's later norms to add into.
extern "C" __global__ void embed(int fmt, const u8* w, const u8* s, const u32* tokens, float* x,
                                 int cols, const float* g, float* xg, double* norms,
                                 int n_norms) {
    after_predecessor();
    __shared__ double partial[32];
    const int tok = blockIdx.x;
    const long row = tokens[tok];
    double sq = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = weight_at(fmt, w, s, row, c, cols);
        x[(long)tok * cols + c] = v;
        if (g) {
            xg[c] = v * g[c];
            sq += (double)v * (double)v;
        }
    }
    if (!g) return;  // the same for every thread of the launch
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sq;
    for (int i = threadIdx.x + 1; i < n_norms; i += blockDim.x) norms[i] = 0.0;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int i = 0; i < (int)(blockDim.x / 32); i++) total += partial[i];
        norms[0] = total;
    }
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for rows r of width n; one block per row.
// The sum of squares is taken in f64 and the scale rounded once, as the CPU model does. With
// SPLIT, out's t rows also go into `parts` and `sums` for the pipelined matmul, as split_parts
// would leave them (n a multiple of 32, the block's threads too, so a warp holds whole column
// blocks).
template <bool SPLIT>
__device__ __forceinline__ void rmsnorm_rows(const float* x, const float* weight, float* out,
                                             int n, double eps, u16* parts, float* sums,
                                             int t) {
    __shared__ double partial[32];
    const float* xr = x + (long)blockIdx.x * n;
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += (double)xr[i] * (double)xr[i];
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < (int)(blockDim.x / 32); i++) total += partial[i];
    const float scale = (float)(1.0 / sqrt(total / (double)n + eps));
    float* o = out + (long)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i] * scale * weight[i];
        o[i] = v;
        if (SPLIT) write_parts_block(parts, sums, v, blockIdx.x, i, t, n);
    }
}

extern "C" __global__ void rmsnorm(const float* x, const float* weight, float* out, int n,
                                   double eps) {
    after_predecessor();
    rmsnorm_rows<false>(x, weight, out, n, eps, nullptr, nullptr, 0);
}

#ifdef PIPELINED
extern "C" __global__ void rmsnorm_split(const float* x, const float* weight, float* out, int n,
                                         double eps, u16* parts, float* sums, int t) {
    after_predecessor();
    rmsnorm_rows<true>(x, weight, out, n, eps, parts, sums, t);
}
#endif

// Interleaved RoPE and the cache write, for token blockIdx.x of a chunk starting at position
// *pos_at (read from device memory, so a captured decode step serves every position).
// `qkv` rows are [q: n_head heads | k: n_kv | v: n_kv] of width hd; q is rotated in place, k
// rotated into the key cache and v copied into the value cache, both laid out
// [position][kv head][hd]. Pairs (2i, 2i + 1) with i < rope_half rotate by the table's angle.
extern "C" __global__ void rope_kv(float* qkv, const float* cos_t, const float* sin_t,
                                   float* k_cache, float* v_cache, const int* pos_at,
                                   int n_head, int n_kv, int hd, int rope_half) {
    after_predecessor();
    const int tok = blockIdx.x, pos = *pos_at + tok, half_hd = hd / 2;
    float* q = qkv + (long)tok * (n_head + 2 * n_kv) * hd;
    const float* k = q + n_head * hd;
    const float* v = k + n_kv * hd;
    const float* c = cos_t + (long)pos * rope_half;
    const float* sn = sin_t + (long)pos * rope_half;
    float* kc = k_cache + (long)pos * n_kv * hd;
    float* vc = v_cache + (long)pos * n_kv * hd;
    for (int i = threadIdx.x; i < (n_head + n_kv) * half_hd; i += blockDim.x) {
        const int head = i / half_hd, p = i % half_hd;
        const bool is_q = head < n_head;
        const float* src = is_q ? q + head * hd : k + (head - n_head) * hd;
        float* dst = is_q ? q + head * hd : kc + (head - n_head) * hd;
        const float x0 = src[2 * p], x1 = src[2 * p + 1];
        if (p < rope_half) {
            const float cs = c[p], sv = sn[p];
            dst[2 * p] = x0 * cs - x1 * sv;
            dst[2 * p + 1] = x0 * sv + x1 * cs;
        } else {
            dst[2 * p] = x0;
            dst[2 * p + 1] = x1;
        }
    }
    for (int i = threadIdx.x; i < n_kv * hd; i += blockDim.x) vc[i] = v[i];
}

// Causal grouped-query attention, flash-decoding style, in two kernels.
//
// attention_split: block (KV head, query tile, split) takes the tile's queries (tokens of a
// chunk starting at position pos0 = *pos_at, read from device memory) for every query head the
// KV head serves, against the keys of one split, `split_len` keys from split * split_len, and
// writes per query and head the split's running max m, sum l and unnormalised output acc[hd] to
// `partial` ([token][head][split] records of hd + 2 floats). Keys and values come from the
// cache in place, PK at a time through shared memory, where every query and head of the block
// reads them. D lanes serve one (query, head), lane s owning the dimensions s * PD .. s * PD +
// PD of the head (D = 1, 2 or 4: head widths up to 32, 64, 128), so a score takes a
// shuffle-sum over D lanes, and a lane holds its query's part and its output's in registers.
// The softmax is online, per key tile. Query `tok` sees positions 0..=pos0 + tok. The block has
// blockDim.x / (group * D) queries (the host picks it); hd is a multiple of 8 and at most
// ATT_HD_MAX (checked at load).
//
// attention_combine: block (head, token) merges its splits into out (t, n_head * hd).
template <int D>
__device__ __forceinline__ void attention_split_body(const float* qkv, const float* k_cache,
                                                     const float* v_cache, float* partial,
                                                     int pos0, int t, int n_head, int n_kv,
                                                     int hd, int split_len, int n_split,
                                                     float scale, float* ks, float* vs) {
    // A key's row in shared memory: D slices of PD dimensions, each padded by 4 floats so that
    // the D lanes of a (query, head), which read the same key at once, hit different banks.
    constexpr int SLICE = PD + 4, ROW = D * SLICE, ROW4 = D * PD / 4;
    const int group = n_head / n_kv, kvh = blockIdx.x, split = blockIdx.z;
    const int per_block = blockDim.x / (group * D);
    const int tid = threadIdx.x, s = tid % D, pair = tid / D;
    const int h = kvh * group + pair % group;
    const int tok = blockIdx.y * per_block + pair / group;
    const bool active = tok < t;
    const int last_tok = min(t, (int)(blockIdx.y + 1) * per_block) - 1;
    const long stride = (long)n_kv * hd;
    const int k_begin = split * split_len;
    // Splits past the keys a query sees write empty records (m = -inf), so one grid, sized for
    // the whole cache, serves every position of a captured step.
    // Keys this tile of queries can see at all: up to the last query's own position.
    const int k_end = min(k_begin + split_len, pos0 + last_tok + 1);
    const int my_last = pos0 + tok;  // the last key this thread's query sees
    const int d0 = s * PD;           // this lane's first dimension

    float q[PD], acc[PD];
    const float* qrow = qkv + (long)min(tok, t - 1) * (n_head + 2 * n_kv) * hd + h * hd;
#pragma unroll
    for (int i = 0; i < PD; i++) {
        q[i] = (d0 + i < hd) ? qrow[d0 + i] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    // Key tiles go through two buffers: tile k0 + PK is copied in (cp.async) while tile k0 is
    // computed, so a block does not stall on global memory at every tile.
    // Dimensions past hd (and keys past the split) are zeros: never garbage times zero.
    auto stage = [&](int k0, int buf) {
        const int n = min(PK, k_end - k0);
        float* const kd = ks + buf * PK * ROW;
        float* const vd = vs + buf * PK * ROW;
        for (int i = tid; i < PK * ROW4; i += blockDim.x) {
            const int j = i / ROW4, c = (i % ROW4) * 4;
            const bool in = j < n && c < hd;
            const long at = in ? (long)(k0 + j) * stride + kvh * hd + c : 0;
            const int to = j * ROW + (c / PD) * SLICE + c % PD;
            cp_async16(kd + to, k_cache + at, in);
            cp_async16(vd + to, v_cache + at, in);
        }
        cp_async_commit();
    };
    if (k_begin < k_end) stage(k_begin, 0);
    int buf = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += PK, buf ^= 1) {
        const int n = min(PK, k_end - k0);
        // The other buffer was last read before the previous tile's closing barrier.
        if (k0 + PK < k_end) {
            stage(k0 + PK, buf ^ 1);
            cp_async_wait<1>();  // every copy but the newest group has landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this tile's copies, by every thread, are in shared memory
        const float* const kt = ks + buf * PK * ROW;
        const float* const vt = vs + buf * PK * ROW;
        float sc[PK];
        float tile_max = NEG_INF;
#pragma unroll
        for (int j = 0; j < PK; j++) {
            const float* kr = kt + j * ROW + s * SLICE;
            float part = 0.0f;
#pragma unroll
            for (int i = 0; i < PD; i += 4) {
                const float4 k4 = *reinterpret_cast<const float4*>(kr + i);
                part = fmaf(q[i], k4.x, part);
                part = fmaf(q[i + 1], k4.y, part);
                part = fmaf(q[i + 2], k4.z, part);
                part = fmaf(q[i + 3], k4.w, part);
            }
#pragma unroll
            for (int o = 1; o < D; o <<= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
            const bool visible = j < n && k0 + j <= my_last;
            sc[j] = visible ? part * scale : NEG_INF;
            tile_max = fmaxf(tile_max, sc[j]);
        }
        const float m_new = fmaxf(m, tile_max);
        if (m_new != NEG_INF) {  // else nothing is visible yet to this query
            const float correction = expf(m - m_new);
            l *= correction;
#pragma unroll
            for (int i = 0; i < PD; i++) acc[i] *= correction;
#pragma unroll
            for (int j = 0; j < PK; j++) {
                const float p = (sc[j] == NEG_INF) ? 0.0f : expf(sc[j] - m_new);
                l += p;
                const float* vr = vt + j * ROW + s * SLICE;
#pragma unroll
                for (int i = 0; i < PD; i += 4) {
                    const float4 v4 = *reinterpret_cast<const float4*>(vr + i);
                    acc[i] = fmaf(p, v4.x, acc[i]);
                    acc[i + 1] = fmaf(p, v4.y, acc[i + 1]);
                    acc[i + 2] = fmaf(p, v4.z, acc[i + 2]);
                    acc[i + 3] = fmaf(p, v4.w, acc[i + 3]);
                }
            }
            m = m_new;
        }
        __syncthreads();  // this buffer is read by no one before the next tile refills it
    }
    if (!active) return;
    float* rec = partial + (((long)tok * n_head + h) * n_split + split) * (hd + 2);
    if (s == 0) {
        rec[0] = m;
        rec[1] = l;
    }
#pragma unroll
    for (int i = 0; i < PD; i++)
        if (d0 + i < hd) rec[2 + d0 + i] = acc[i];
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_split(const float* qkv, const float* k_cache, const float* v_cache,
                    float* partial, const int* pos_at, int t, int n_head, int n_kv, int hd,
                    int split_len, int n_split, float scale) {
    after_predecessor();
    const int pos0 = *pos_at;
    __shared__ __align__(16) float ks[2 * PK * 4 * (PD + 4)];  // two buffers
    __shared__ __align__(16) float vs[2 * PK * 4 * (PD + 4)];
    if (hd <= PD)
        attention_split_body<1>(qkv, k_cache, v_cache, partial, pos0, t, n_head, n_kv, hd,
                                split_len, n_split, scale, ks, vs);
    else if (hd <= 2 * PD)
        attention_split_body<2>(qkv, k_cache, v_cache, partial, pos0, t, n_head, n_kv, hd,
                                split_len, n_split, scale, ks, vs);
    else
        attention_split_body<4>(qkv, k_cache, v_cache, partial, pos0, t, n_head, n_kv, hd,
                                split_len, n_split, scale, ks, vs);
}

// Merges the splits' records into each query's attention output; with SPLIT, out's t rows also
// go into `parts` and `sums` for the pipelined matmul, as split_parts would leave them (hd a
// multiple of 32, the block's threads too).
template <bool SPLIT>
__device__ __forceinline__ void combine_splits(const float* partial, float* out,
                                               const int* pos_at, int n_head, int hd,
                                               int split_len, int n_split, u16* parts,
                                               float* sums, int t) {
    const int pos0 = *pos_at;
    const int h = blockIdx.x, tok = blockIdx.y;
    // Splits past this query's position were never filled for it.
    const int used = min(n_split, (pos0 + tok) / split_len + 1);
    const float* recs = partial + ((long)tok * n_head + h) * n_split * (hd + 2);
    float m = NEG_INF;
    for (int s = 0; s < used; s++) m = fmaxf(m, recs[s * (hd + 2)]);
    float l = 0.0f;
    for (int s = 0; s < used; s++) {
        const float ms = recs[s * (hd + 2)];
        if (ms != NEG_INF) l += expf(ms - m) * recs[s * (hd + 2) + 1];
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float sum = 0.0f;
        for (int s = 0; s < used; s++) {
            const float ms = recs[s * (hd + 2)];
            if (ms != NEG_INF) sum += expf(ms - m) * recs[s * (hd + 2) + 2 + d];
        }
        out[(long)tok * n_head * hd + h * hd + d] = sum / l;
        if (SPLIT) write_parts_block(parts, sums, sum / l, tok, h * hd + d, t, n_head * hd);
    }
}

extern "C" __global__ void attention_combine(const float* partial, float* out,
                                             const int* pos_at, int n_head, int hd,
                                             int split_len, int n_split) {
    after_predecessor();
    combine_splits<false>(partial, out, pos_at, n_head, hd, split_len, n_split, nullptr, nullptr,
                          0);
}

#ifdef PIPELINED
extern "C" __global__ void attention_combine_split(const float* partial, float* out,
                                                   const int* pos_at, int n_head, int hd,
                                                   int split_len, int n_split, u16* parts,
                                                   float* sums, int t) {
    after_predecessor();
    combine_splits<true>(partial, out, pos_at, n_head, hd, split_len, n_split, parts, sums, t);
}
#endif

// Keys per tile of attention_decode, its threads per block, the most query heads one KV head
// may serve there, and the blocks of a cluster (one cluster per KV head; 16 is above the
// portable 8, so the host allows it on the function before the first launch), and of
// attention_decode_short's, which the host launches for positions before DEC_LONG_FROM.
#define DK 32
#define DEC_THREADS 128
#define GROUP_MAX 8
#define DEC_CLUSTER 16
#define DEC_CLUSTER_SHORT 8

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Thread-block clusters (sm_90): this block's rank in its cluster and the cluster's index.
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ u32 cluster_index() {
    u32 r;
    asm("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
}
// Every thread of the cluster arrives, and waits for all: shared-memory writes before it are
// visible to every block of the cluster after it.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\t"
                 "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The float at `p` (in this block's shared memory) as block `rank` of the cluster holds it.
__device__ __forceinline__ float peer_load(const float* p, u32 rank) {
    unsigned long long generic = reinterpret_cast<unsigned long long>(p), local;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(local) : "l"(generic));
    u32 remote;
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"((u32)local), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

// The keys and values of positions k0.. (those of the n the token sees; zeros past them) of
// KV head `kvh`, a thread's share of a tile of T keys: float4 i = tid + DEC_THREADS u is column
// i % row4 of key i / row4. With `skip`, position `skip` is left out (the QKV matvec writes it).
template <int T, int U>
__device__ __forceinline__ void attention_tile(float4 (&kr)[U], float4 (&vr)[U],
                                               const float* k_cache, const float* v_cache,
                                               int k0, int n, int row4, long stride, long head,
                                               int skip) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int i = threadIdx.x + DEC_THREADS * u, j = i / row4, c = i % row4;
        kr[u] = vr[u] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < T * row4 && j < n && k0 + j != skip) {
            const long at = (long)(k0 + j) * stride + head;
            kr[u] = reinterpret_cast<const float4*>(k_cache + at)[c];
            vr[u] = reinterpret_cast<const float4*>(v_cache + at)[c];
        }
    }
}

// Shared memory of attention_decode, laid out for either tile (32 keys of up to ATT_HD_MAX, or
// 64 of up to ATT_HD_MAX / 2): keys row-major in rows of hd + 4 floats (lane j reads row j a
// float4 at a time, and a quarter-warp's eight rows fall in different banks), values in rows
// of hd, the group's queries, each head's weights of the tile, and each head's running max,
// sum, rescaling factor and unnormalised output.
#define ATT_KS (2 * DK * (ATT_HD_MAX / 2 + 4))
struct DecodeShared {
    float* ks;
    float* vs;
    float* qs;
    float* ps;
    float* run_m;
    float* run_l;
    float* corr;
    float* run_o;
};

// attention_decode's work with KL keys a lane, in a cluster of C blocks: tiles of T = 32 KL
// keys, heads up to ATT_HD_MAX / KL wide (the same registers and shared memory either way).
template <int KL, int C>
__device__ __forceinline__ void attention_decode_body(const float* qkv, const float* k_cache,
                                                      const float* v_cache, float* out,
                                                      int pos, int rank, int kvh, int n_kv,
                                                      int group, int hd, float scale,
                                                      DecodeShared sh) {
    constexpr int T = DK * KL;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int row4 = hd / 4, ks_row = hd + 4;
    const long stride = (long)n_kv * hd, head = (long)kvh * hd;
    const int last = pos / T;  // the last tile the token sees
    constexpr int U = T * (ATT_HD_MAX / KL) / 4 / DEC_THREADS;  // float4s per thread, at most
    float4 kr[U], vr[U];
    int tile = rank;
    attention_tile<T>(kr, vr, k_cache, v_cache, tile * T, min(T, pos + 1 - tile * T), row4,
                      stride, head, pos);
    after_predecessor();
    if (tile <= last) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = tid + DEC_THREADS * u, j = i / row4, c = i % row4;
            if (i < T * row4 && tile * T + j == pos) {
                const long at = (long)pos * stride + head;
                kr[u] = reinterpret_cast<const float4*>(k_cache + at)[c];
                vr[u] = reinterpret_cast<const float4*>(v_cache + at)[c];
            }
        }
    }
    const float* q = qkv + (long)kvh * group * hd;  // heads kvh * group .. of this KV head
    for (int i = tid; i < group * hd; i += DEC_THREADS) {
        sh.qs[i] = q[i];
        sh.run_o[i] = 0.0f;
    }
    if (tid < group) {
        sh.run_m[tid] = NEG_INF;
        sh.run_l[tid] = 0.0f;
    }
    for (; tile <= last; tile += C) {
        const int k0 = tile * T, n = min(T, pos + 1 - k0);
        __syncthreads();  // the last tile's readers are done with ks, vs and ps
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = tid + DEC_THREADS * u, j = i / row4, c = i % row4;
            if (i < T * row4) {
                reinterpret_cast<float4*>(sh.ks + j * ks_row)[c] = kr[u];
                reinterpret_cast<float4*>(sh.vs + j * hd)[c] = vr[u];
            }
        }
        const int next = tile + C;
        if (next <= last)
            attention_tile<T>(kr, vr, k_cache, v_cache, next * T, min(T, pos + 1 - next * T),
                              row4, stride, head, -1);
        __syncthreads();
        for (int g = warp; g < group; g += DEC_THREADS / 32) {
            // Lane l scores keys l, l + 32, ..., their dot products side by side.
            float a[KL];
#pragma unroll
            for (int k = 0; k < KL; k++) a[k] = 0.0f;
            const float4* qg = reinterpret_cast<const float4*>(sh.qs + g * hd);
            for (int c = 0; c < row4; c++) {
                const float4 qv = qg[c];
#pragma unroll
                for (int k = 0; k < KL; k++) {
                    const float4 kv = reinterpret_cast<const float4*>(
                        sh.ks + (lane + 32 * k) * ks_row)[c];
                    a[k] = fmaf(qv.x, kv.x, a[k]);
                    a[k] = fmaf(qv.y, kv.y, a[k]);
                    a[k] = fmaf(qv.z, kv.z, a[k]);
                    a[k] = fmaf(qv.w, kv.w, a[k]);
                }
            }
            float sc[KL], top = NEG_INF;
#pragma unroll
            for (int k = 0; k < KL; k++) {
                sc[k] = lane + 32 * k < n ? a[k] * scale : NEG_INF;
                top = fmaxf(top, sc[k]);
            }
            const float old = sh.run_m[g];
            const float m = fmaxf(old, warp_max(top));
            float p_sum = 0.0f;
#pragma unroll
            for (int k = 0; k < KL; k++) {
                const float p = lane + 32 * k < n ? expf(sc[k] - m) : 0.0f;
                sh.ps[g * T + lane + 32 * k] = p;
                p_sum += p;
            }
            const float l = warp_sum(p_sum);  // every lane has read run_m[g] by now
            if (lane == 0) {
                const float c = old == NEG_INF ? 0.0f : expf(old - m);
                sh.corr[g] = c;
                sh.run_l[g] = fmaf(sh.run_l[g], c, l);
                sh.run_m[g] = m;
            }
        }
        __syncthreads();
        for (int i = tid; i < group * hd; i += DEC_THREADS) {
            const int g = i / hd, d = i % hd;
            const float* pg = sh.ps + g * T;
            // Two sums (even and odd keys) in flight, added at the end.
            float a0 = 0.0f, a1 = 0.0f;
#pragma unroll 8
            for (int j = 0; j < T; j += 2) {
                a0 = fmaf(pg[j], sh.vs[j * hd + d], a0);
                a1 = fmaf(pg[j + 1], sh.vs[(j + 1) * hd + d], a1);
            }
            sh.run_o[i] = fmaf(sh.run_o[i], sh.corr[g], a0 + a1);
        }
    }
    cluster_sync();  // every block's (m, l, o) final, and visible to the cluster
    for (int i = rank * DEC_THREADS + tid; i < group * hd; i += C * DEC_THREADS) {
        const int g = i / hd;
        // Every block's (m, l, o) asked for before any is used: one trip across the cluster,
        // not one a block (a load's result used at once holds back the next load).
        float ms[C], ls[C], os[C];
#pragma unroll
        for (int b = 0; b < C; b++) {
            ms[b] = peer_load(&sh.run_m[g], b);
            ls[b] = peer_load(&sh.run_l[g], b);
            os[b] = peer_load(&sh.run_o[i], b);
        }
        float mx = NEG_INF;
#pragma unroll
        for (int b = 0; b < C; b++) mx = fmaxf(mx, ms[b]);
        float l = 0.0f, o = 0.0f;
#pragma unroll
        for (int b = 0; b < C; b++) {
            if (ms[b] == NEG_INF) continue;  // a block past the position: no keys
            const float w = expf(ms[b] - mx);
            l = fmaf(w, ls[b], l);
            o = fmaf(w, os[b], o);
        }
        out[(long)kvh * group * hd + i] = o / l;
    }
    cluster_sync();  // no block leaves while another may still read its shared memory
}

// Attention of one token (a decode step, at position *pos_at) over the cache, flash-decoding
// style, merged in a thread-block cluster. The cluster of KV head h (C blocks) serves the
// `group` query heads that share it: block r takes the tiles r, r + C, ... up to the position
// (64 keys a tile for heads of up to 64 once the position is past C tiles of 32, else 32),
// each tile staged in shared memory (the next one's loads in flight while this one is
// computed), scored on a warp per head, a lane per key (two keys a lane in a 64-key tile), and
// folded into the block's running softmax per head (max m, sum l, unnormalised output o). Then
// every block's (m, l, o) is read by the cluster in distributed shared memory: block r merges
// elements r * DEC_THREADS + tid, ... of the group's heads into out (n_head * hd). No global
// records, fence or counter. Needs hd a multiple of 4 of at most ATT_HD_MAX and n_head / n_kv
// at most GROUP_MAX (the host checks); the grid is n_kv clusters of C blocks.
template <int C>
__device__ __forceinline__ void attention_decode_in(const float* qkv, const float* k_cache,
                                                    const float* v_cache, float* out,
                                                    const int* pos_at, int n_head, int n_kv,
                                                    int hd, float scale) {
    __shared__ __align__(16) float ks[ATT_KS];
    __shared__ __align__(16) float vs[DK * ATT_HD_MAX];
    __shared__ __align__(16) float qs[GROUP_MAX * ATT_HD_MAX];
    __shared__ float ps[GROUP_MAX * 2 * DK];
    __shared__ float run_m[GROUP_MAX], run_l[GROUP_MAX], corr[GROUP_MAX];
    __shared__ float run_o[GROUP_MAX * ATT_HD_MAX];
    const DecodeShared sh{ks, vs, qs, ps, run_m, run_l, corr, run_o};
    // Read before the wait (in the body): the position (moved at the end of the last step) and
    // the keys and values of the positions before it (written by earlier steps); only the QKV
    // matvec just before this kernel writes the current position's, loaded after the wait.
    const int pos = *pos_at;
    const int rank = (int)cluster_rank(), kvh = (int)cluster_index(), group = n_head / n_kv;
    // Tiles of 64 keys only past a cluster's pass of 32-key tiles: before it, a block has one
    // tile at most either way, and the 64-key tile's two keys a lane only cost.
    if (hd <= ATT_HD_MAX / 2 && pos >= C * DK)
        attention_decode_body<2, C>(qkv, k_cache, v_cache, out, pos, rank, kvh, n_kv, group,
                                    hd, scale, sh);
    else
        attention_decode_body<1, C>(qkv, k_cache, v_cache, out, pos, rank, kvh, n_kv, group,
                                    hd, scale, sh);
}

// The long-context kernel: clusters of DEC_CLUSTER (16) blocks, each block fewer tiles in turn.
extern "C" __global__ void __cluster_dims__(DEC_CLUSTER, 1, 1) __launch_bounds__(DEC_THREADS)
    attention_decode(const float* qkv, const float* k_cache, const float* v_cache, float* out,
                     const int* pos_at, int n_head, int n_kv, int hd, float scale) {
    attention_decode_in<DEC_CLUSTER>(qkv, k_cache, v_cache, out, pos_at, n_head, n_kv, hd,
                                     scale);
}

// The short-context kernel: clusters of DEC_CLUSTER_SHORT (8) blocks, which start sooner
// (measured on the H200: 4% less a SmolLM2 step from position 32, 7% more from 1,680).
extern "C" __global__ void __cluster_dims__(DEC_CLUSTER_SHORT, 1, 1)
    __launch_bounds__(DEC_THREADS) attention_decode_short(const float* qkv, const float* k_cache,
                                                          const float* v_cache, float* out,
                                                          const int* pos_at, int n_head,
                                                          int n_kv, int hd, float scale) {
    attention_decode_in<DEC_CLUSTER_SHORT>(qkv, k_cache, v_cache, out, pos_at, n_head, n_kv, hd,
                                           scale);
}

// *best = the index of the largest of the n values (the first of equal ones; NaNs never win,
// and with nothing above minus infinity it is 0), as the CPU's greedy choice. One block: each
// thread keeps its best (value, index), and the block reduces them. With `next_id` (the end of
// a decode step), the choice is also the next step's input and *pos_at moves on by one, so
// steps follow each other with nothing from the host.
//
// A thread reads float4s t, t + blockDim, ..., ARGMAX_UNROLL of them loaded before any is
// compared, so that many loads are in flight at once rather than one (a vocabulary of 49,152
// is 12 float4s a thread). Its indices still come in increasing order, so `>` keeps the first
// of equal values; the last n % 4 values (or all, were v not 16-byte aligned) go one by one.
#define ARGMAX_THREADS 1024
#define ARGMAX_UNROLL 8
extern "C" __global__ void argmax(const float* v, int n, u32* best, u32* next_id, int* pos_at) {
    after_predecessor();
    __shared__ float values[ARGMAX_THREADS / 32];
    __shared__ int indices[ARGMAX_THREADS / 32];
    float bv = NEG_INF;
    int bi = n;  // none yet
    const int n4 = (reinterpret_cast<size_t>(v) & 15) == 0 ? n / 4 : 0;
    const float4* v4 = reinterpret_cast<const float4*>(v);
    for (int base = threadIdx.x; base < n4; base += ARGMAX_UNROLL * blockDim.x) {
        float4 c[ARGMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; u++) {
            const int i = base + u * blockDim.x;
            c[u] = i < n4 ? v4[i] : make_float4(NEG_INF, NEG_INF, NEG_INF, NEG_INF);
        }
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; u++) {
            const int i = 4 * (base + u * blockDim.x);
            const float e[4] = {c[u].x, c[u].y, c[u].z, c[u].w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                if (e[k] > bv) {
                    bv = e[k];
                    bi = i + k;
                }
            }
        }
    }
    for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) {
        if (v[i] > bv) {
            bv = v[i];
            bi = i;
        }
    }
    // (value, index) pairs: the larger value wins, then the smaller index.
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        values[warp] = bv;
        indices[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / 32); w++) {
            if (values[w] > bv || (values[w] == bv && indices[w] < bi)) {
                bv = values[w];
                bi = indices[w];
            }
        }
        const u32 choice = bi < n ? (u32)bi : 0u;
        *best = choice;
        if (next_id) {
            *next_id = choice;
            *pos_at += 1;
        }
    }
}
