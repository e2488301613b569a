/* The quantizers of native.c on a CUDA GPU: the same C source, one GPU thread per block of 32 or 256
 * values (per row for GPTQ's super-blocks). Compiled with -fmad=false and IEEE division and square root
 * (native.py's flags), every float32 operation rounds as on the CPU, so the bytes are the CPU's (and
 * llama.cpp's). */
#define QFN __host__ __device__ static inline
#include "native.c"

__global__ void row_sigma2_kernel(const float *x, int64_t rows, int64_t cols, float *sigma2) {
    int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (r < rows) sigma2[r] = row_sigma2(x + r * cols, cols);
}

__global__ void blocks_kernel(int type, const float *x, int64_t rows, int64_t cols, const float *imatrix,
                              const float *sigma2, uint8_t *out) {
    int size, block = block_size(type, &size);
    int64_t nb = cols / block;
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= rows * nb) return;
    int64_t r = t / nb, b = t % nb;
    quantize_block(type, x + r * cols + b * block, imatrix ? imatrix + b * block : NULL, sigma2 ? sigma2[r] : 0.f,
                   out + r * nb * size + b * size);
}

/* The thread copies its row's super-block into local memory once: the sweep updates it thousands of times,
 * and the threads' rows lie a row apart in global memory, so each such access there is a transaction of its
 * own, while local memory is interleaved across the threads (and cached). */
__global__ void gptq_kernel(int type, float *w, int64_t rows, int64_t ldw, const float *u, int64_t ldu,
                            const float *qw, uint8_t *out, int64_t ldo, float *scaled) {
    int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float x[QK_K], *row = w + r * ldw;
    for (int c = 0; c < QK_K; ++c) x[c] = row[c];
    Compensation gc = {x, u, ldu, scaled + r * QK_K};
    gptq_superblock(type, qw, out + r * ldo, &gc);
    for (int c = 0; c < QK_K; ++c) row[c] = x[c];
}

static const int THREADS = 64;  /* few per SM block: each thread keeps a super-block's state in local memory */

static unsigned grid(int64_t n) { return (unsigned)((n + THREADS - 1) / THREADS); }

/* Device pointers; sigma2: `rows` floats, filled here unless sigma2_given. Queued on `stream`; returns the
 * bytes per row, -1 for a type not handled, -2 when a launch failed. */
extern "C" int64_t qcv_quantize_rows_cuda(int type, const float *x, int64_t rows, int64_t cols, const float *imatrix,
                                          float *sigma2, int sigma2_given, uint8_t *out, void *stream) {
    int size, block = block_size(type, &size);
    if (!block) return -1;
    cudaStream_t s = (cudaStream_t)stream;
    if (!uses_sigma2(type, imatrix)) sigma2 = NULL;
    if (sigma2 && !sigma2_given) row_sigma2_kernel<<<grid(rows), THREADS, 0, s>>>(x, rows, cols, sigma2);
    int64_t total = rows * (cols / block);
    if (total > 0) blocks_kernel<<<grid(total), THREADS, 0, s>>>(type, x, rows, cols, imatrix, sigma2, out);
    return cudaGetLastError() == cudaSuccess ? (cols / block) * size : -2;
}

/* qcv_gptq_superblocks (native.c) with device pointers, queued on `stream`; -2 when the launch failed. */
extern "C" int64_t qcv_gptq_superblocks_cuda(int type, float *w, int64_t rows, int64_t ldw, const float *u,
                                             int64_t ldu, const float *qw, uint8_t *out, int64_t ldo, float *scaled,
                                             void *stream) {
    int size;
    if (block_size(type, &size) != QK_K) return -1;
    if (rows > 0)
        gptq_kernel<<<grid(rows), THREADS, 0, (cudaStream_t)stream>>>(type, w, rows, ldw, u, ldu, qw, out, ldo, scaled);
    return cudaGetLastError() == cudaSuccess ? size : -2;
}
