// Candidate one-token Q4_1 matvecs for a microbenchmark (`bench_matvec_candidates` in
// tests.rs, `#[ignore]`d): never loaded by the model. Each computes y = x W^T for one token
// with W in kernels.cu's FMT_Q4_1 layout (16 bytes of nibbles per block, the f16 pair (d, m)
// per block in `s`), so the test can time it beside kernels.cu's `matvec_q4_1` on the same
// matrices and check it gives the same y up to the order of the sums.
//
// The question they answer: kernels.cu's kernel gives each lane 4 bytes of a row at a time
// and reads the H200's memory at 1.3-2.0 TB/s on the 8B shape's matrices. Do 16-byte pieces
// (a lane per quant block), more loads in flight, two rows a warp, or the block's activation
// sum factored out (d Σ q x + m Σ x: three instructions a weight instead of four) move more?
//
// It is compiled after kernels.cu, in one source (`candidates_ptx` in tests.rs), so it uses
// kernels.cu's types and helpers (`f16_to_f32`, `warp_sum`, `nibble`).

// Σ q x over one block's 32 weights (`q` its 16 bytes, `x` its 32 activations), and Σ x into
// `xs`: byte j holds weight j in its low nibble and weight j + 16 in its high one.
__device__ __forceinline__ float block_qx(uint4 q, const float* x, float& xs) {
    const u32 words[4] = {q.x, q.y, q.z, q.w};
    float a = 0.0f, s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float4 xl = *reinterpret_cast<const float4*>(x + 4 * i);
        const float4 xh = *reinterpret_cast<const float4*>(x + 16 + 4 * i);
        const u32 w = words[i], hi = w >> 16;
        a = fmaf(nibble<0>(w), xl.x, a);
        a = fmaf(nibble<4>(w), xh.x, a);
        a = fmaf(nibble<8>(w), xl.y, a);
        a = fmaf(nibble<12>(w), xh.y, a);
        a = fmaf(nibble<0>(hi), xl.z, a);
        a = fmaf(nibble<4>(hi), xh.z, a);
        a = fmaf(nibble<8>(hi), xl.w, a);
        a = fmaf(nibble<12>(hi), xh.w, a);
        s += (xl.x + xl.y) + (xl.z + xl.w) + (xh.x + xh.y) + (xh.z + xh.w);
    }
    xs = s;
    return a;
}

// A lane per quant block: lane l takes blocks l, l + 32, ... of R rows a warp, U blocks of
// each row loaded before any is used. Per block, d Σ q x + m Σ x (Σ x shared by the R rows).
template <int U, int R>
__device__ void mv16(const u8* w, const u8* s, const float* x, float* y, int rows, int cols) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * (blockDim.x / 32) + warp) * R;
    if (row0 >= rows) return;
    const int nb = cols / 32;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    for (int b0 = lane; b0 < nb; b0 += 32 * U) {
        uint4 q[U][R];
        u32 dm[U][R];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int b = min(b0 + 32 * u, nb - 1);
                const long row = min(row0 + r, rows - 1);
                q[u][r] = reinterpret_cast<const uint4*>(w)[row * nb + b];
                dm[u][r] = reinterpret_cast<const u32*>(s)[row * nb + b];
            }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int b = b0 + 32 * u;
            if (b >= nb) break;
#pragma unroll
            for (int r = 0; r < R; r++) {
                float xs;
                const float qx = block_qx(q[u][r], x + 32 * b, xs);
                const float d = f16_to_f32((u16)(dm[u][r] & 0xffff));
                const float m = f16_to_f32((u16)(dm[u][r] >> 16));
                acc[r] = fmaf(d, qx, fmaf(m, xs, acc[r]));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float sum = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < rows) y[row0 + r] = sum;
    }
}

extern "C" __global__ void mv16_u1(const u8* w, const u8* s, const float* x, float* y, int rows,
                                   int cols) {
    mv16<1, 1>(w, s, x, y, rows, cols);
}
extern "C" __global__ void mv16_u2(const u8* w, const u8* s, const float* x, float* y, int rows,
                                   int cols) {
    mv16<2, 1>(w, s, x, y, rows, cols);
}
extern "C" __global__ void mv16_u4(const u8* w, const u8* s, const float* x, float* y, int rows,
                                   int cols) {
    mv16<4, 1>(w, s, x, y, rows, cols);
}
extern "C" __global__ void mv16_u2_r2(const u8* w, const u8* s, const float* x, float* y,
                                      int rows, int cols) {
    mv16<2, 2>(w, s, x, y, rows, cols);
}
