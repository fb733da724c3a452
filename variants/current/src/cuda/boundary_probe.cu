// Kernels for a microbenchmark (`bench_phase_boundaries` in tests.rs, `#[ignore]`d): never
// loaded by the model. A SmolLM2 decode step is about 150 dependent kernels of a few
// microseconds each in one CUDA graph, so what a boundary between two of them costs bounds
// what fusing them can save. These measure it two ways, with phases that do almost nothing:
// a graph of one-phase kernels (a kernel boundary each), and one persistent kernel whose
// blocks, one an SM, wait for each other at a grid-wide barrier between phases (the
// "megakernel" way). Compiled on its own: it needs nothing from kernels.cu.

// One phase: every thread adds 1 to its value (there is a value a thread).
extern "C" __global__ void probe_phase(float* buf) {
    buf[blockIdx.x * blockDim.x + threadIdx.x] += 1.0f;
}

// `phases` phases in one launch, a grid-wide barrier after each: thread 0 of every block
// makes the block's writes visible, counts the block into *bar, and waits until every block
// of the grid has counted itself into this phase. Needs every block resident at once (at most
// one block an SM, nothing else running) and *bar zero at the launch.
extern "C" __global__ void probe_persistent(float* buf, unsigned* bar, int phases) {
    for (int p = 0; p < phases; p++) {
        buf[blockIdx.x * blockDim.x + threadIdx.x] += 1.0f;
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(bar, 1u);
            const unsigned target = (unsigned)(p + 1) * gridDim.x;
            unsigned seen;
            do {
                asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(bar));
            } while (seen < target);
        }
        __syncthreads();
    }
}
