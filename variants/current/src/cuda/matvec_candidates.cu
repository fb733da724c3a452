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

// Every candidate is a kernel of the bench's signature around a device function:
// CANDIDATE(name, function) defines `name`, calling `function` (a template instance, commas and
// all) with the kernel's arguments.
#define CANDIDATE(name, ...)                                                                     \
    extern "C" __global__ void name(const u8* w, const u8* s, const float* x, float* y,           \
                                    int rows, int cols) {                                        \
        __VA_ARGS__(w, s, x, y, rows, cols);                                                      \
    }

// a + Σ q x over the 8 weights of Q4_1 quant word `word` (as in q4_1_word, without d and m).
__device__ __forceinline__ float word_qx(u32 word, float4 xl, float4 xh, float a = 0.0f) {
    const u32 hi = word >> 16;
    a = fmaf(nibble<0>(word), xl.x, a);
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

// (R, KW, FACTOR): the bench's list in tests.rs names these, with 4 / KW * R rows a block of 128
// threads. (mvw_r2_f, mvw_r4_f and mvw_r2_k2_f were benched once and dropped: README, the
// seventh GPU session.)
CANDIDATE(mvw_r1_f, mvw<1, 1, true>)
CANDIDATE(mvw_r2, mvw<2, 1, false>)
CANDIDATE(mvw_r4_k4_f, mvw<4, 4, true>)

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

CANDIDATE(mvs_r1, mvs<1>)
CANDIDATE(mvs_r2, mvs<2>)
CANDIDATE(mvs_r4, mvs<4>)

// Fourth set (mvk): what the second and third sets point at. The activations are 8 times the
// weights' bytes (an f32 for each 4-bit quant), so a kernel whose loads of x serve one row reads
// 8 bytes from L1 for every byte of weights, near L1's 128 bytes a cycle at the weights' 13
// bytes a cycle an SM that 70% of the H200's bandwidth needs. Here each load of x serves the R
// rows of a block, and a block's KW = blockDim.x / 32 warps split the columns instead of
// taking rows, so a 4,096-row matrix still fills the card (1,024 blocks at R = 4): warp k,
// lane l takes quant blocks b = 32 k + l, + 32 KW, ... of every row of the block: 16 bytes of
// quants, the 4-byte (d, m), and the block's 32 activations straight from global memory (x is
// at most 56 KB and every block of an SM reads it, so it stays in L1). d Σ q x + m Σ x, the
// warps' sums added in shared memory in a fixed order. On the H200 (README, the thirteenth GPU
// session) it read no faster than mvs: 1.1-1.4 TB/s at the 4,096-row matrices, 2.3 at the
// output layer, so the traffic in x was not the limit.

// Quant block b's 32 activations (x4 indexes x as float4s) and their sum.
__device__ __forceinline__ float block_x(const float4* x4, int b, float4 (&xv)[8]) {
#pragma unroll
    for (int i = 0; i < 8; i++) xv[i] = x4[(long)b * 8 + i];
    float xs = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) xs += (xv[i].x + xv[i].y) + (xv[i].z + xv[i].w);
    return xs;
}

// acc + d Σ q x + m Σ x over a Q4_1 block: its quants q, its (d, m) pair dm, its activations xv
// and their sum xs (from block_x).
__device__ __forceinline__ float block_dot(uint4 q, u32 dm, const float4 (&xv)[8], float xs,
                                           float acc) {
    float a = word_qx(q.x, xv[0], xv[4], 0.0f);
    a = word_qx(q.y, xv[1], xv[5], a);
    a = word_qx(q.z, xv[2], xv[6], a);
    a = word_qx(q.w, xv[3], xv[7], a);
    const float d = f16_to_f32((u16)(dm & 0xffff));
    const float m = f16_to_f32((u16)(dm >> 16));
    return fmaf(d, a, fmaf(m, xs, acc));
}

template <int R>
__device__ void mvk(const u8* w, const u8* s, const float* x, float* y, int rows, int cols) {
    __shared__ float part[32][R];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, kw = blockDim.x / 32;
    const int row0 = blockIdx.x * R;
    const int nb = cols / 32;
    const uint4* w16 = reinterpret_cast<const uint4*>(w);
    const u32* s32 = reinterpret_cast<const u32*>(s);
    const float4* x4 = reinterpret_cast<const float4*>(x);
    long base[R];
#pragma unroll
    for (int r = 0; r < R; r++) base[r] = (long)min(row0 + r, rows - 1) * nb;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    for (int b = warp * 32 + lane; b < nb; b += 32 * kw) {
        uint4 q[R];
        u32 dm[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            q[r] = w16[base[r] + b];
            dm[r] = s32[base[r] + b];
        }
        float4 xv[8];
        const float xs = block_x(x4, b, xv);
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = block_dot(q[r], dm[r], xv, xs, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float sum = warp_sum(acc[r]);
        if (lane == 0) part[warp][r] = sum;
    }
    __syncthreads();
    if (threadIdx.x < R && row0 + (int)threadIdx.x < rows) {
        float sum = 0.0f;
        for (int k = 0; k < kw; k++) sum += part[k][threadIdx.x];
        y[row0 + threadIdx.x] = sum;
    }
}

// The bench launches a block of R rows with as many warps as it names (see MATVEC_CANDIDATES
// in tests.rs).
CANDIDATE(mvk_r2, mvk<2>)
CANDIDATE(mvk_r4, mvk<4>)
CANDIDATE(mvk_r8, mvk<8>)

// Fifth set (mvp): mvk shared each x load over R rows and split columns over warps, and read
// no faster than mvs (README, the thirteenth GPU session), so L1's traffic in x is not what
// holds these kernels at 1-2.4 TB/s. What they share: a lane's weights arrive in its
// registers, so the bytes an SM has in flight are bounded by its registers and by the loads a
// lane issues before it needs their values. Here the weights go to shared memory by cp.async
// (no registers), STAGES chunks ahead: a block of 128 threads takes R = 8 rows, in chunks of
// CH = 32 quant blocks (1,024 columns: 4 KB of quants and 1 KB of (d, m) a chunk, the scales
// copied 4 bytes at a time since a row's start need not be 16-byte aligned there), and while
// it computes chunk c the copies of chunks c + 1 .. c + STAGES - 1 are in flight. Warp w
// computes rows 2w and 2w + 1, lane l quant block l of the chunk (its 32 activations from
// global memory, serving both rows). d Σ q x + m Σ x. On the H200 it was the slowest of all
// (0.7-1.0 TB/s at every 8B matrix, whatever STAGES): two barriers a chunk and a round trip
// through shared memory cost more than the copies in flight bought.
#define MVP_R 8
#define MVP_CH 32

__device__ __forceinline__ void mvp_copy16(void* dst, const void* src, bool in) {
    const unsigned to = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(to), "l"(src),
                 "r"(in ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void mvp_copy4(void* dst, const void* src, bool in) {
    const unsigned to = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(to), "l"(src),
                 "r"(in ? 4 : 0)
                 : "memory");
}

template <int STAGES>
__device__ void mvp(const u8* w, const u8* s, const float* x, float* y, int rows, int cols) {
    __shared__ __align__(16) uint4 qs[STAGES][MVP_R][MVP_CH];
    __shared__ __align__(16) u32 ds[STAGES][MVP_R][MVP_CH];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int row0 = blockIdx.x * MVP_R;
    const int nb = cols / 32, chunks = (nb + MVP_CH - 1) / MVP_CH;
    const uint4* w16 = reinterpret_cast<const uint4*>(w);
    const u32* s32 = reinterpret_cast<const u32*>(s);
    const float4* x4 = reinterpret_cast<const float4*>(x);
    // Chunk c into buffer c % STAGES: 256 copies of 16 quant bytes and 256 of one (d, m) pair
    // (two of each a thread); past the row's end, or past the last row, zeros.
    auto issue = [&](int c) {
        const int buf = c % STAGES, cb0 = c * MVP_CH;
#pragma unroll
        for (int i = tid; i < MVP_R * MVP_CH; i += 128) {
            const int r = i / MVP_CH, b = i % MVP_CH;
            const bool in = row0 + r < rows && cb0 + b < nb;
            mvp_copy16(&qs[buf][r][b], in ? w16 + (long)(row0 + r) * nb + cb0 + b : w16, in);
        }
#pragma unroll
        for (int i = tid; i < MVP_R * MVP_CH; i += 128) {
            const int r = i / MVP_CH, b = i % MVP_CH;
            const bool in = row0 + r < rows && cb0 + b < nb;
            mvp_copy4(&ds[buf][r][b], in ? s32 + (long)(row0 + r) * nb + cb0 + b : s32, in);
        }
    };
#pragma unroll
    for (int c = 0; c < STAGES - 1; c++) {
        if (c < chunks) issue(c);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    float acc[2] = {0.0f, 0.0f};
    for (int c = 0; c < chunks; c++) {
        if (c + STAGES - 1 < chunks) issue(c + STAGES - 1);
        asm volatile("cp.async.commit_group;" ::: "memory");
        asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1) : "memory");
        __syncthreads();  // chunk c, copied by every thread, is in shared memory
        const int buf = c % STAGES, b = c * MVP_CH + lane;
        if (b < nb) {
            float4 xv[8];
            const float xs = block_x(x4, b, xv);
#pragma unroll
            for (int k = 0; k < 2; k++) {
                const int r = 2 * warp + k;
                acc[k] = block_dot(qs[buf][r][lane], ds[buf][r][lane], xv, xs, acc[k]);
            }
        }
        __syncthreads();  // nobody reads buffer c % STAGES before chunk c + STAGES refills it
    }
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const float sum = warp_sum(acc[k]);
        if (lane == 0 && row0 + 2 * warp + k < rows) y[row0 + 2 * warp + k] = sum;
    }
}

CANDIDATE(mvp_s2, mvp<2>)
CANDIDATE(mvp_s4, mvp<4>)
CANDIDATE(mvp_s6, mvp<6>)

// Sixth set (mvt): the one-token matvec on the tensor cores. The SASS of kernels.cu's
// matvec_q4_1 spends 61 instructions on each 4-byte word of quants (with its share of the
// scales, 5 bytes): 12 a byte, so at the H200's 132 SMs x 4 schedulers the issue rate alone
// caps it near 2.7 TB/s; every design above is an f32 multiply-add and a conversion a weight.
// Here a warp's m16n8k16 product takes 16 rows x 16 weights, with the activations as B: column
// n of B is part n of x (n < 3: the three bf16 parts whose sum is exactly x, as in the prefill
// kernels; the other five columns zero), so one product gives Σ q x for each part, each
// product exact, summed in f32. A quant becomes bf16 by mma_q4_1_pair (two instructions a
// pair: mvt_pair), and the scales come after each 32-weight block: y += d Σ q x + m Σ x, the parts'
// sums added at the end.
//
// Lane (g, t) of a warp (g = lane / 4, t = lane % 4) loads quant word t of its tile's rows g and
// g + 8 in each block: bytes 4t .. 4t + 3, weights 4t .. 4t + 3 in their low nibbles and
// 16 + 4t .. in their high ones. The product's k order is a fixed permutation of the block's
// (A and B use the same): the low nibbles' step pairs k = 2t, 2t + 1 with weights 4t, 4t + 2
// and k = 2t + 8, 2t + 9 with 4t + 1, 4t + 3; the high nibbles' step the same, 16 on. A thread
// block takes RT tiles of 16 rows, and its four warps split their quant blocks (warp w: blocks
// w, w + 4, ...), so that a matrix of 4,096 rows still has 256 / RT blocks of four warps; the
// warps' sums are added in shared memory in a fixed order. Each lane adds its 8 activations'
// share of the minimum's term (m times their sum) to its own sums, so the loop has no shuffle;
// a row's four lanes are added at the end. A tile past the last row computes the last row again
// and stores nothing.

// Part `part` (0, 1, 2: x's top 8 significant bits, the next 8, the rest; 3 and on: zero) of a
// and of b as a bf16 pair (a low).
__device__ __forceinline__ u32 x_part_pair(float a, float b, int part) {
    const float a1 = bf16_top(a), ar = a - a1, a2 = bf16_top(ar), a3 = ar - a2;
    const float b1 = bf16_top(b), br = b - b1, b2 = bf16_top(br), b3 = br - b2;
    const float pa = part == 0 ? a1 : part == 1 ? a2 : part == 2 ? a3 : 0.0f;
    const float pb = part == 0 ? b1 : part == 1 ? b2 : part == 2 ? b3 : 0.0f;
    return bf16_pair(pa, pb);
}

// mma_q4_1_pair with its and and its or in one instruction: NVRTC emits two when both constants
// are immediates (an operation takes one), so here they come in registers.
__device__ __forceinline__ u32 mvt_pair(u32 w, u32 mask, u32 magic) {
    u32 biased, q;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(biased) : "r"(w), "r"(mask), "r"(magic));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(q) : "r"(biased), "r"(0x3f803f80u), "r"(0xc300c300u));
    return q;
}

#define MVT_WARPS 4

// A warp's RT tiles of 16 rows in mvt and mvts: the quant blocks' index of rows g and g + 8 of
// each (block 0; a tile past the last row reads the last row again), and per tile the d-scaled
// sums of B's columns 2t and 2t + 1 for rows g (0, 1) and g + 8 (2, 3).
template <int RT>
struct MvtTiles {
    long rg[RT], rh[RT];
    float acc[RT][4];
    u32 mask, magic;  // in registers, for mvt_pair (NVRTC would fold them back into immediates)

    __device__ __forceinline__ MvtTiles(int row0, int g, int rows, int nb) {
#pragma unroll
        for (int i = 0; i < RT; i++) {
            rg[i] = (long)min(row0 + 16 * i + g, rows - 1) * nb;
            rh[i] = (long)min(row0 + 16 * i + g + 8, rows - 1) * nb;
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][e] = 0.0f;
        }
        mask = 0x000f000fu;
        magic = 0x43004300u;
        asm volatile("" : "+r"(mask), "+r"(magic));
    }

    // Quant block b of every tile times B (bf.x, bf.y: the low nibbles' step; bf.z, bf.w: the
    // high ones'), scaled by the rows' d, with m times xs (this lane's share of the block's
    // Σ x) added to columns 2t of both rows.
    __device__ __forceinline__ void add(const u32* w32, const u32* s32, long b, int t, uint4 bf,
                                        float xs) {
#pragma unroll
        for (int i = 0; i < RT; i++) {
            const u32 qg = w32[(rg[i] + b) * 4 + t], qh = w32[(rh[i] + b) * 4 + t];
            const u32 sg = s32[rg[i] + b], sh = s32[rh[i] + b];
            float c[4];
            const u32 lo[4] = {mvt_pair(qg, mask, magic), mvt_pair(qh, mask, magic),
                               mvt_pair(qg >> 8, mask, magic), mvt_pair(qh >> 8, mask, magic)};
            mma_bf16_first(c, lo, bf.x, bf.y);
            const u32 hi[4] = {mvt_pair(qg >> 4, mask, magic), mvt_pair(qh >> 4, mask, magic),
                               mvt_pair(qg >> 12, mask, magic), mvt_pair(qh >> 12, mask, magic)};
            mma_bf16(c, hi, bf.z, bf.w);
            const float dg = f16_to_f32((u16)(sg & 0xffff)), dh = f16_to_f32((u16)(sh & 0xffff));
            acc[i][0] = fmaf(dg, c[0], fmaf(f16_to_f32((u16)(sg >> 16)), xs, acc[i][0]));
            acc[i][1] = fmaf(dg, c[1], acc[i][1]);
            acc[i][2] = fmaf(dh, c[2], fmaf(f16_to_f32((u16)(sh >> 16)), xs, acc[i][2]));
            acc[i][3] = fmaf(dh, c[3], acc[i][3]);
        }
    }

    // y for the block's rows: a row's sum is spread over its four lanes (columns 0 and 1, the
    // top and middle parts, in lane t = 0, column 2, the rest, in t = 1, and every lane's share
    // of the minimum's term), then over the block's warps, added warp by warp. Every thread
    // of the block calls it (a barrier).
    __device__ __forceinline__ void store(float (&part)[MVT_WARPS][RT * 16], int row0, int rows,
                                          float* y) {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
        for (int i = 0; i < RT; i++) {
            float sg = acc[i][0] + acc[i][1], sh = acc[i][2] + acc[i][3];
            sg += __shfl_xor_sync(0xffffffffu, sg, 1);
            sh += __shfl_xor_sync(0xffffffffu, sh, 1);
            sg += __shfl_xor_sync(0xffffffffu, sg, 2);
            sh += __shfl_xor_sync(0xffffffffu, sh, 2);
            if (t == 0) {
                part[warp][16 * i + g] = sg;
                part[warp][16 * i + g + 8] = sh;
            }
        }
        __syncthreads();
        const int r = threadIdx.x;
        if (r < 16 * RT && row0 + r < rows) {
            float sum = 0.0f;
#pragma unroll
            for (int k = 0; k < MVT_WARPS; k++) sum += part[k][r];
            y[row0 + r] = sum;
        }
    }
};

template <int RT>
__device__ void mvt(const u8* w, const u8* s, const float* x, float* y, int rows, int cols) {
    __shared__ float part[MVT_WARPS][RT * 16];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row0 = blockIdx.x * 16 * RT, nb = cols / 32;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    MvtTiles<RT> tiles(row0, g, rows, nb);
    for (int b = warp; b < nb; b += MVT_WARPS) {
        const float4 xl = x4[(long)b * 8 + t], xh = x4[(long)b * 8 + 4 + t];
        // This lane's 8 activations' sum, its share of the block's Σ x.
        const float xs = ((xl.x + xl.y) + (xl.z + xl.w)) + ((xh.x + xh.y) + (xh.z + xh.w));
        // B, column g: for the low nibbles' step, then the high ones'.
        const uint4 bf = make_uint4(x_part_pair(xl.x, xl.z, g), x_part_pair(xl.y, xl.w, g),
                                    x_part_pair(xh.x, xh.z, g), x_part_pair(xh.y, xh.w, g));
        tiles.add(reinterpret_cast<const u32*>(w), reinterpret_cast<const u32*>(s), b, t, bf, xs);
    }
    tiles.store(part, row0, rows, y);
}

// The bench launches a block of MVT_WARPS warps for 16 RT rows.
CANDIDATE(mvt_r1, mvt<1>)
CANDIDATE(mvt_r2, mvt<2>)
CANDIDATE(mvt_r4, mvt<4>)

// mvt with the activations' parts split once a thread block rather than once a warp and block
// (mvts, "staged"): each chunk of MVTS_CHUNK quant blocks, the block's 128 threads split the
// chunk's activations into their three bf16 parts in B's fragment order in shared memory (one
// (block, t) pair a thread: 16 words for lanes (g < 3, t), and t's share of the block's Σ x),
// then every warp takes its B with one 16-byte load a block. In the SASS the split is about 2.7
// instructions a byte at RT = 1, against about 7 for mvt_r1's, so one tile a warp (and a
// 4,096-row matrix's 1,024 warps) can pay for it.
#define MVTS_CHUNK 32

// x_part_pair for parts 0, 1 and 2 at once.
__device__ __forceinline__ void x_parts3(float a, float b, u32 (&p)[3]) {
    const float a1 = bf16_top(a), ar = a - a1, a2 = bf16_top(ar), a3 = ar - a2;
    const float b1 = bf16_top(b), br = b - b1, b2 = bf16_top(br), b3 = br - b2;
    p[0] = bf16_pair(a1, b1);
    p[1] = bf16_pair(a2, b2);
    p[2] = bf16_pair(a3, b3);
}

template <int RT>
__device__ void mvts(const u8* w, const u8* s, const float* x, float* y, int rows, int cols) {
    __shared__ __align__(16) u32 bs[MVTS_CHUNK][12][4];  // B of lane (g, t), g < 3, at g * 4 + t
    __shared__ float xsp[MVTS_CHUNK][4];                  // t's share of the block's Σ x
    __shared__ float part[MVT_WARPS][RT * 16];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int row0 = blockIdx.x * 16 * RT, nb = cols / 32;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    MvtTiles<RT> tiles(row0, g, rows, nb);
    for (int c0 = 0; c0 < nb; c0 += MVTS_CHUNK) {
        __syncthreads();  // the last chunk's B is read by no one
        {
            const int b = tid / 4, st = tid % 4;  // MVTS_CHUNK * 4 = 128 = blockDim.x
            float4 xl = make_float4(0.f, 0.f, 0.f, 0.f), xh = xl;
            if (c0 + b < nb) {
                xl = x4[(long)(c0 + b) * 8 + st];
                xh = x4[(long)(c0 + b) * 8 + 4 + st];
            }
            u32 p0[3], p1[3], p2[3], p3[3];
            x_parts3(xl.x, xl.z, p0);
            x_parts3(xl.y, xl.w, p1);
            x_parts3(xh.x, xh.z, p2);
            x_parts3(xh.y, xh.w, p3);
#pragma unroll
            for (int pg = 0; pg < 3; pg++)
                *reinterpret_cast<uint4*>(bs[b][pg * 4 + st]) =
                    make_uint4(p0[pg], p1[pg], p2[pg], p3[pg]);
            xsp[b][st] = ((xl.x + xl.y) + (xl.z + xl.w)) + ((xh.x + xh.y) + (xh.z + xh.w));
        }
        __syncthreads();
        const int n = min(MVTS_CHUNK, nb - c0);
        for (int b = warp; b < n; b += MVT_WARPS) {
            const uint4 bf = g < 3 ? *reinterpret_cast<const uint4*>(bs[b][g * 4 + t])
                                   : make_uint4(0u, 0u, 0u, 0u);
            tiles.add(reinterpret_cast<const u32*>(w), reinterpret_cast<const u32*>(s), c0 + b, t,
                      bf, xsp[b][t]);
        }
    }
    tiles.store(part, row0, rows, y);
}

// A block of MVT_WARPS warps (128 threads: mvts stages with exactly that many) for 16 RT rows.
CANDIDATE(mvts_r1, mvts<1>)
CANDIDATE(mvts_r2, mvts<2>)

// Not a matvec: the bound the bench's loop allows (bound_r4). It reads every quant and scale
// as mvs_r4 does (a lane per quant block, 16-byte loads, four rows a warp, four warps a block,
// the same grid) and does nothing with them but fold them into one word a row, so its time is
// what reading each matrix costs in this loop, launches included. Its y is not the product;
// the bench does not check it.
__device__ void bound_read(const u8* w, const u8* s, const float* x, float* y, int rows,
                           int cols) {
    constexpr int R = 4;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * (blockDim.x / 32) + warp) * R, nb = cols / 32;
    const uint4* w16 = reinterpret_cast<const uint4*>(w);
    const u32* s32 = reinterpret_cast<const u32*>(s);
    u32 fold[R] = {};
    for (int b = lane; row0 < rows && b < nb; b += 32) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const long at = (long)min(row0 + r, rows - 1) * nb + b;
            const uint4 q = w16[at];
            fold[r] ^= q.x ^ q.y ^ q.z ^ q.w ^ s32[at];
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        u32 v = fold[r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v ^= __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0 && row0 + r < rows) y[row0 + r] = (float)(v & 1u) + x[0] * 0.0f;
    }
}
CANDIDATE(bound_r4, bound_read)
