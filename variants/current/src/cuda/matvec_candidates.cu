// Candidate one-token Q4_1 matvecs for a microbenchmark (`bench_matvec_candidates` in
// tests.rs, `#[ignore]`d): never loaded by the model. Each computes y = x W^T for one token
// with W in kernels.cu's FMT_Q4_1 layout (16 bytes of nibbles per block, the f16 pair (d, m)
// per block in `s`), so the test can time it beside kernels.cu's `matvec_q4_1` on the same
// matrices and check it gives the same y up to the order of the sums.
//
// The question they answer: kernels.cu's kernel gives each lane 4 bytes of a row at a time
// and reads the H200's memory at 0.9-2.0 TB/s on the 8B shape's matrices. A 4-byte word of
// nibbles pairs with 8 activations (32 bytes), so a warp reads 8 bytes of x from L1 for every
// byte of weights, and spends four instructions a weight. The first candidates (mv16: a lane
// per 16-byte block) read x eight times over per lane and were slower everywhere (README, GPU
// session 7). The second (mvw) keep kernels.cu's word a lane and ask: does sharing each x load
// over R rows, splitting a row's words over KW warps (more warps for 4,096-row matrices), or
// the block's activation sum factored out (d Σ q x + m Σ x: three instructions a weight) move
// more?
//
// It is compiled after kernels.cu, in one source (`candidates_ptx` in tests.rs), so it uses
// kernels.cu's types and helpers (`f16_to_f32`, `warp_sum`, `nibble`, `q4_1_word`).

// Σ q x over the 8 weights of Q4_1 quant word `word` (as in q4_1_word, without d and m).
__device__ __forceinline__ float word_qx(u32 word, float4 xl, float4 xh) {
    const u32 hi = word >> 16;
    float a = nibble<0>(word) * xl.x;
    a = fmaf(nibble<4>(word), xh.x, a);
    a = fmaf(nibble<8>(word), xl.y, a);
    a = fmaf(nibble<12>(word), xh.y, a);
    a = fmaf(nibble<0>(hi), xl.z, a);
    a = fmaf(nibble<4>(hi), xh.z, a);
    a = fmaf(nibble<8>(hi), xl.w, a);
    return fmaf(nibble<12>(hi), xh.w, a);
}

// A block of four warps in 4 / KW groups; a group takes R rows, its KW warps split each row's
// words (warp k of the group, lane l: words l + 32 k, l + 32 (k + KW), ...), and each x load
// serves the R rows. FACTOR: d Σ q x + m Σ x per word (Σ x shared by the R rows); otherwise
// kernels.cu's q4_1_word. A group's warps add their sums in shared memory.
template <int R, int KW, bool FACTOR>
__device__ void mvw(const u8* w, const u8* s, const float* x, float* y, int rows, int cols) {
    __shared__ float part[4][R];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = warp / KW, wk = warp % KW;
    const int row0 = (blockIdx.x * (4 / KW) + group) * R;
    const int nb = cols / 32, pieces = nb * 4;
    const u32* w32 = reinterpret_cast<const u32*>(w);
    const u32* s32 = reinterpret_cast<const u32*>(s);
    long base[R];
#pragma unroll
    for (int r = 0; r < R; r++) base[r] = (long)min(row0 + r, rows - 1);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    for (int c = lane + 32 * wk; row0 < rows && c < pieces; c += 32 * KW) {
        u32 q[R], dm[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            q[r] = w32[base[r] * pieces + c];
            dm[r] = s32[base[r] * nb + c / 4];
        }
        const float* xb = x + (c / 4) * 32 + 4 * (c % 4);
        const float4 xl = *reinterpret_cast<const float4*>(xb);
        const float4 xh = *reinterpret_cast<const float4*>(xb + 16);
        if (FACTOR) {
            const float xs = ((xl.x + xl.y) + (xl.z + xl.w)) + ((xh.x + xh.y) + (xh.z + xh.w));
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float d = f16_to_f32((u16)(dm[r] & 0xffff));
                const float m = f16_to_f32((u16)(dm[r] >> 16));
                acc[r] = fmaf(d, word_qx(q[r], xl, xh), fmaf(m, xs, acc[r]));
            }
        } else {
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] = q4_1_word(q[r], dm[r], xl, xh, acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float sum = warp_sum(acc[r]);
        if (KW == 1) {
            if (lane == 0 && row0 + r < rows) y[row0 + r] = sum;
        } else if (lane == 0) {
            part[warp][r] = sum;
        }
    }
    if (KW == 1) return;
    __syncthreads();
    if (wk == 0 && lane < R && row0 + lane < rows) {
        float sum = 0.0f;
        for (int k = 0; k < KW; k++) sum += part[group * KW + k][lane];
        y[row0 + lane] = sum;
    }
}

// (name, R, KW, FACTOR): the bench's list in tests.rs names these, with 4 / KW * R rows a
// block of 128 threads. (mvw_r2_f, mvw_r4_f and mvw_r2_k2_f were benched once and dropped:
// README, the seventh GPU session.)
#define MVW(name, R, KW, F)                                                                      \
    extern "C" __global__ void name(const u8* w, const u8* s, const float* x, float* y,           \
                                    int rows, int cols) {                                        \
        mvw<R, KW, F>(w, s, x, y, rows, cols);                                                    \
    }
MVW(mvw_r1_f, 1, 1, true)
MVW(mvw_r2, 2, 1, false)
MVW(mvw_r4_k4_f, 4, 4, true)

// Third set (mvs): a lane per quant block, as mv16, so each weight load is 16 bytes, but the
// activations come from shared memory: the block stages x once, MVS_CHUNK columns at a time,
// each quant block's 32 values padded to 36 floats, so the 8 lanes of a quarter-warp reading
// their blocks' float4s land in different banks. Each read of x serves the warp's R rows.
#define MVS_CHUNK 4096
template <int R>
__device__ void mvs(const u8* w, const u8* s, const float* x, float* y, int rows, int cols) {
    __shared__ __align__(16) float xs[MVS_CHUNK / 32 * 36];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * (blockDim.x / 32) + warp) * R;
    const int nb = cols / 32;
    const uint4* w16 = reinterpret_cast<const uint4*>(w);
    const u32* s32 = reinterpret_cast<const u32*>(s);
    float4* xs4 = reinterpret_cast<float4*>(xs);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    for (int cb0 = 0; cb0 < nb; cb0 += MVS_CHUNK / 32) {
        const int cbn = min(MVS_CHUNK / 32, nb - cb0);
        __syncthreads();  // the last chunk's readers are done
        for (int i = threadIdx.x; i < cbn * 8; i += blockDim.x)
            xs4[(i / 8) * 9 + i % 8] = reinterpret_cast<const float4*>(x)[cb0 * 8 + i];
        __syncthreads();
        for (int b = lane; row0 < rows && b < cbn; b += 32) {
            uint4 q[R];
            u32 dm[R];
#pragma unroll
            for (int r = 0; r < R; r++) {
                const long at = (long)min(row0 + r, rows - 1) * nb + cb0 + b;
                q[r] = w16[at];
                dm[r] = s32[at];
            }
            const float4* xv = xs4 + b * 9;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float4 xl = xv[i], xh = xv[4 + i];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const u32 word = i == 0 ? q[r].x : i == 1 ? q[r].y : i == 2 ? q[r].z : q[r].w;
                    acc[r] = q4_1_word(word, dm[r], xl, xh, acc[r]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float sum = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < rows) y[row0 + r] = sum;
    }
}

extern "C" __global__ void mvs_r1(const u8* w, const u8* s, const float* x, float* y, int rows,
                                  int cols) {
    mvs<1>(w, s, x, y, rows, cols);
}
extern "C" __global__ void mvs_r2(const u8* w, const u8* s, const float* x, float* y, int rows,
                                  int cols) {
    mvs<2>(w, s, x, y, rows, cols);
}
extern "C" __global__ void mvs_r4(const u8* w, const u8* s, const float* x, float* y, int rows,
                                  int cols) {
    mvs<4>(w, s, x, y, rows, cols);
}
