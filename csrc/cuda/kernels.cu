// CUDA kernels of fastinfer (built for sm_80 and sm_90a SASS plus compute_80 PTX; no torch headers).
//
//  * quantize_rows_kernel: per-token int8 quantization, one block per row.
//  * gemv_i8_kernel: M <= 16, one warp per output channel streaming its int8 row with 16-byte loads
//    and __dp4a (the tensor-core tile would waste 15/16 of its rows at M = 1).
//  * gemm_i8_kernel: 128 x 128 x 64 CTA tiles, 8 warps of 64 x 32, mma.sync.m16n8k32.row.col.s32.s8.s8.s32,
//    3-stage cp.async pipeline into XOR-swizzled shared memory, ldmatrix.x4 for both operands.
// The fragment layouts these kernels assume are written out, and checked by emulation, in
// fastinfer/_cuda_layout.py (tests/test_cuda_layout.py runs in CI without a GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/engine_cuda.h"

namespace fastinfer::cuda {
namespace {

thread_local const char* t_last_error = "";

const char* check_launch() {
    const cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return nullptr;
    t_last_error = cudaGetErrorName(e);
    return cudaGetErrorString(e);
}

__device__ __forceinline__ float load_x(const void* x, int dtype, int64_t i) {
    if (dtype == kF32) return static_cast<const float*>(x)[i];
    if (dtype == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(x)[i]);
    return __half2float(static_cast<const __half*>(x)[i]);
}

// ------------------------------------------------------------------------------- quantization

constexpr int kQuantThreads = 256;

__global__ void quantize_rows_kernel(const void* __restrict__ x, int dtype, int64_t k, int64_t ldx,
                                     int8_t* __restrict__ q, int64_t kp, float* __restrict__ scale) {
    const int64_t row = blockIdx.x;
    __shared__ float s_max[kQuantThreads / 32];
    __shared__ int s_bad[kQuantThreads / 32];
    float amax = 0.f;
    int bad = 0;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
        const float v = fabsf(load_x(x, dtype, row * ldx + i));
        bad |= !(v <= 3.402823466e38f);  // Inf or NaN
        amax = fmaxf(amax, v);
    }
    for (int o = 16; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    }
    if ((threadIdx.x & 31) == 0) {
        s_max[threadIdx.x >> 5] = amax;
        s_bad[threadIdx.x >> 5] = bad;
    }
    __syncthreads();
    amax = 0.f;
    bad = 0;
    for (int w = 0; w < kQuantThreads / 32; ++w) {
        amax = fmaxf(amax, s_max[w]);
        bad |= s_bad[w];
    }
    const float inv = __fdiv_rn(127.f, amax);
    const bool zero_row = bad || amax == 0.f || !(inv < __int_as_float(0x7f800000));
    if (threadIdx.x == 0) scale[row] = bad ? __int_as_float(0x7fc00000) : (zero_row ? 0.f : __fdiv_rn(amax, 127.f));
    int8_t* qr = q + row * kp;
    for (int64_t i = threadIdx.x; i < kp; i += blockDim.x) {
        int v = 0;
        if (!zero_row && i < k) {
            v = __float2int_rn(__fmul_rn(load_x(x, dtype, row * ldx + i), inv));  // round half to even
            v = max(-127, min(127, v));
        }
        qr[i] = static_cast<int8_t>(v);
    }
}

// ---------------------------------------------------------------------------------- epilogue

__device__ __forceinline__ void store_out(void* out, int dtype, int64_t ldo, int64_t m, int64_t n, int32_t acc,
                                          const float* sa, const float* sw, const float* bias) {
    const int64_t i = m * ldo + n;
    if (dtype == kI32) {
        static_cast<int32_t*>(out)[i] = acc;
        return;
    }
    // The CPU engine's epilogue, operation for operation: fma(float(acc), sa * sw, bias).
    const float y = __fmaf_rn(static_cast<float>(acc), __fmul_rn(sa[m], sw[n]), bias ? bias[n] : 0.f);
    if (dtype == kF32)
        static_cast<float*>(out)[i] = y;
    else if (dtype == kBF16)
        static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(y);
    else
        static_cast<__half*>(out)[i] = __float2half_rn(y);
}

// ------------------------------------------------------------------------------ small M (dp4a)

constexpr int kGemvWarps = 8;
constexpr int kGemvMaxM = 16;

__global__ void gemv_i8_kernel(const int8_t* __restrict__ q, int m_rows, int64_t kp, const int8_t* __restrict__ w,
                               int64_t n, const float* sa, const float* sw, const float* bias, void* out,
                               int dtype, int64_t ldo) {
    const int lane = threadIdx.x & 31;
    const int64_t ch = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
    if (ch >= n) return;
    int32_t acc[kGemvMaxM];
#pragma unroll
    for (int r = 0; r < kGemvMaxM; ++r) acc[r] = 0;
    const int8_t* wr = w + ch * kp;
    for (int64_t k0 = int64_t(lane) * 16; k0 < kp; k0 += 32 * 16) {  // kp % 64 == 0: whole 16-byte chunks
        const int4 wv = *reinterpret_cast<const int4*>(wr + k0);
#pragma unroll
        for (int r = 0; r < kGemvMaxM; ++r) {
            if (r < m_rows) {
                const int4 av = *reinterpret_cast<const int4*>(q + r * kp + k0);
                int32_t s = acc[r];
                s = __dp4a(av.x, wv.x, s);
                s = __dp4a(av.y, wv.y, s);
                s = __dp4a(av.z, wv.z, s);
                s = __dp4a(av.w, wv.w, s);
                acc[r] = s;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < kGemvMaxM; ++r) {
        if (r < m_rows) {
            int32_t s = acc[r];
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == 0) store_out(out, dtype, ldo, r, ch, s, sa, sw, bias);
        }
    }
}

// ------------------------------------------------------------------------ tensor-core GEMM

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 256;
constexpr int WM = 64, WN = 32;  // warp tile; warps arranged 2 (m) x 4 (n)

// Shared tiles are rows of BK = 64 bytes (four 16-byte chunks). Chunk c of row r is stored at
// chunk c ^ ((r >> 1) & 3): the 8 rows an ldmatrix reads then hit 8 different 16-byte bank groups.
__device__ __forceinline__ int swz(int row, int chunk) { return row * BK + ((chunk ^ ((row >> 1) & 3)) << 4); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int n = valid ? 16 : 0;  // 0 source bytes: the 16 shared bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The STAGES-deep cp.async pipeline both tensor-core GEMMs run: tiles 0 .. STAGES-2 in flight
// before the loop; then per tile: wait for it, a barrier (every warp is also done with the tile
// before, whose buffer the next load reuses), start the load STAGES-1 ahead, compute on this one.
template <class Load, class Compute>
__device__ __forceinline__ void cp_async_pipeline(int ktiles, Load&& load_tile, Compute&& compute) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_tile(s, s);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
        __syncthreads();
        if (kt + STAGES - 1 < ktiles) load_tile((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        asm volatile("cp.async.commit_group;\n" ::);
        compute(kt % STAGES);
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
}

__global__ void __launch_bounds__(THREADS) gemm_i8_kernel(const int8_t* __restrict__ q, int64_t m, int64_t kp,
                                                           const int8_t* __restrict__ w, int64_t n,
                                                           const float* sa, const float* sw, const float* bias,
                                                           void* out, int dtype, int64_t ldo) {
    __shared__ __align__(128) int8_t sA[STAGES][BM * BK];
    __shared__ __align__(128) int8_t sB[STAGES][BN * BK];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;  // warp position in the 2 x 4 grid
    const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
    const int ktiles = int(kp / BK);

    auto load_tile = [&](int stage, int kt) {
        const int64_t k0 = int64_t(kt) * BK;
#pragma unroll
        for (int i = 0; i < (BM * BK / 16) / THREADS; ++i) {  // 2 chunks of A and 2 of B per thread
            const int c = tid + i * THREADS, row = c >> 2, chunk = c & 3;
            const bool va = m0 + row < m;
            cp_async16(&sA[stage][swz(row, chunk)], va ? q + (m0 + row) * kp + k0 + chunk * 16 : q, va);
            cp_async16(&sB[stage][swz(row, chunk)], w + (n0 + row) * kp + k0 + chunk * 16, true);  // np % 128 == 0
        }
    };

    int acc[WM / 16][WN / 8][4] = {};
    cp_async_pipeline(ktiles, load_tile, [&](int stage) {
        const int8_t* a_s = sA[stage];
        const int8_t* b_s = sB[stage];
#pragma unroll
        for (int ks = 0; ks < BK / 32; ++ks) {  // two k32 steps per tile
            unsigned af[WM / 16][4], bf[WN / 16][4];
#pragma unroll
            for (int i = 0; i < WM / 16; ++i) {
                // matrix j = lane / 8: rows +8 for j odd, bytes +16 for j >= 2 -> a0..a3
                const int j = lane >> 3;
                const int row = wm * WM + i * 16 + (lane & 7) + (j & 1) * 8;
                ldmatrix_x4(af[i], a_s + swz(row, ks * 2 + (j >> 1)));
            }
#pragma unroll
            for (int p = 0; p < WN / 16; ++p) {
                // matrix j: n rows +8 for j >= 2, bytes +16 for j odd -> b0, b1 of two n8 tiles
                const int j = lane >> 3;
                const int row = wn * WN + p * 16 + (lane & 7) + (j >> 1) * 8;
                ldmatrix_x4(bf[p], b_s + swz(row, ks * 2 + (j & 1)));
            }
#pragma unroll
            for (int i = 0; i < WM / 16; ++i)
#pragma unroll
                for (int jn = 0; jn < WN / 8; ++jn)
                    mma_s8(acc[i][jn], af[i], bf[jn >> 1][(jn & 1) * 2], bf[jn >> 1][(jn & 1) * 2 + 1]);
        }
    });

    // C fragment: c0, c1 at row g, cols 2t, 2t+1; c2, c3 at row g + 8.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < WM / 16; ++i)
#pragma unroll
        for (int jn = 0; jn < WN / 8; ++jn)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int64_t mm = m0 + wm * WM + i * 16 + g + (r >> 1) * 8;
                const int64_t nn = n0 + wn * WN + jn * 8 + t * 2 + (r & 1);
                if (mm < m && nn < n) store_out(out, dtype, ldo, mm, nn, acc[i][jn][r], sa, sw, bias);
            }
}


// ----------------------------------------------------------------- 2:4 sparse (mma.sp m16n8k64)
//
// The weight is mma's sparse A operand, so these kernels compute out^T = W x^T: weight rows are
// the mma's M, tokens its N. Weight layout "SP24" (engine_cuda.h; host reference and emulation in
// fastinfer/_cuda_layout.py): kept values [np][kp / 2] int8 (two per group of 4 inputs), then the
// metadata in fragment order [np / 16][kp / 64][32] uint32, the word lane w passes to the mma.

constexpr int SBM = 128, SBN = 128, SBK = 128;  // weight rows, tokens, logical K per stage
constexpr int kSpA = SBM * 64;                   // kept values: 128 rows of 64 bytes (128 logical K)
constexpr int kSpB = 2 * SBN * 64;               // x: two halves of 128 rows x 64 bytes
constexpr int kSpE = (SBM / 16) * 2 * 32 * 4;    // metadata: 8 m16 tiles x 2 k64 steps x 32 words
constexpr int kSpStage = kSpA + kSpB + kSpE;     // 26 KB
constexpr int kSpSmem = STAGES * kSpStage;       // 78 KB: dynamic shared memory

__device__ __forceinline__ void mma_sp_s8(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[4], unsigned e) {
#if (__CUDACC_VER_MAJOR__ > 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
#else
    asm volatile(
        "mma.sp.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
#endif
}

__global__ void __launch_bounds__(THREADS, 2) gemm_sp24_kernel(const int8_t* __restrict__ q, int64_t m, int64_t kp,
                                                             const int8_t* __restrict__ vals,
                                                             const uint32_t* __restrict__ meta, int64_t n,
                                                             const float* sa, const float* sw, const float* bias,
                                                             void* out, int dtype, int64_t ldo) {
    extern __shared__ __align__(128) int8_t sp_smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;  // 2 (weight rows, 64 each) x 4 (tokens, 32 each)
    const int64_t n0 = int64_t(blockIdx.x) * SBM, m0 = int64_t(blockIdx.y) * SBN;
    const int ktiles = int(kp / SBK);
    const int64_t steps = kp / 64, kvp = kp / 2;

    auto load_tile = [&](int stage, int kt) {
        int8_t* sA = sp_smem + stage * kSpStage;
        int8_t* sB = sA + kSpA;
        int8_t* sE = sB + kSpB;
#pragma unroll
        for (int i = 0; i < (SBM * 64 / 16) / THREADS; ++i) {  // 2 chunks of kept values per thread
            const int c = tid + i * THREADS, row = c >> 2, chunk = c & 3;
            cp_async16(sA + swz(row, chunk), vals + (n0 + row) * kvp + int64_t(kt) * 64 + chunk * 16, true);
        }
#pragma unroll
        for (int i = 0; i < (2 * SBN * 64 / 16) / THREADS; ++i) {  // 4 chunks of x per thread
            const int c = tid + i * THREADS, half = c >> 9, row = (c >> 2) & (SBN - 1), chunk = c & 3;
            const bool valid = m0 + row < m;
            cp_async16(sB + half * SBN * 64 + swz(row, chunk),
                       valid ? q + (m0 + row) * kp + int64_t(kt) * SBK + half * 64 + chunk * 16 : q, valid);
        }
        if (tid < kSpE / 16) {  // 8 tiles x 2 steps x 32 words, contiguous per tile
            const int tile = tid >> 4, chunk = tid & 15;
            cp_async16(sE + tid * 16, meta + ((n0 / 16 + tile) * steps + 2 * int64_t(kt)) * 32 + chunk * 4, true);
        }
    };

    int acc[SBM / 2 / 16][SBN / 4 / 8][4] = {};
    cp_async_pipeline(ktiles, load_tile, [&](int stage) {
        const int8_t* a_s = sp_smem + stage * kSpStage;
        const int8_t* b_s = a_s + kSpA;
        const uint32_t* e_s = reinterpret_cast<const uint32_t*>(b_s + kSpB);
#pragma unroll
        for (int s = 0; s < 2; ++s) {  // two k64 steps per stage
            unsigned af[4][4], bf[4][4], ef[4];
            const int j = lane >> 3;
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // the dense kernel's A addressing, over kept values
                const int row = wm * 64 + i * 16 + (lane & 7) + (j & 1) * 8;
                ldmatrix_x4(af[i], a_s + swz(row, s * 2 + (j >> 1)));
                ef[i] = e_s[((wm * 4 + i) * 2 + s) * 32 + lane];
            }
#pragma unroll
            for (int jn = 0; jn < 4; ++jn)  // one n8 token tile, its four 16-byte chunks = k 0..63
                ldmatrix_x4(bf[jn], b_s + s * SBN * 64 + swz(wn * 32 + jn * 8 + (lane & 7), j));
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int jn = 0; jn < 4; ++jn) mma_sp_s8(acc[i][jn], af[i], bf[jn], ef[i]);
        }
    });

    // C fragment: row (weight) g + 8 * (r >> 1), column (token) 2t + (r & 1)
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jn = 0; jn < 4; ++jn)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int64_t nn = n0 + wm * 64 + i * 16 + g + (r >> 1) * 8;
                const int64_t mm = m0 + wn * 32 + jn * 8 + t * 2 + (r & 1);
                if (mm < m && nn < n) store_out(out, dtype, ldo, mm, nn, acc[i][jn][r], sa, sw, bias);
            }
}

// M <= 16: one block per 16 weight rows, its 8 warps splitting the k64 steps. Each lane reads the
// metadata word it would pass to the mma (rows g + 8 (t & 1), 32 columns (t >> 1)), widens its 16
// kept values to 32 dense bytes with byte_perm and runs dp4a against x; partial sums meet in
// shared memory.
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_sp24_kernel(const int8_t* __restrict__ q, int m_rows,
                                                                   int64_t kp, const int8_t* __restrict__ vals,
                                                                   const uint32_t* __restrict__ meta, int64_t n,
                                                                   const float* sa, const float* sw,
                                                                   const float* bias, void* out, int dtype,
                                                                   int64_t ldo) {
    __shared__ int red[kGemvWarps][16][kGemvMaxM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int64_t tile = blockIdx.x, steps = kp / 64, kvp = kp / 2;
    const int row = g + 8 * (t & 1), quarter = t >> 1;
    const int8_t* vrow = vals + (tile * 16 + row) * kvp + quarter * 16;
    int32_t acc[kGemvMaxM];
#pragma unroll
    for (int r = 0; r < kGemvMaxM; ++r) acc[r] = 0;
    for (int64_t s = warp; s < steps; s += kGemvWarps) {
        const uint32_t e = meta[(tile * steps + s) * 32 + lane];
        const int4 kv = *reinterpret_cast<const int4*>(vrow + s * 32);
        const unsigned kept[4] = {unsigned(kv.x), unsigned(kv.y), unsigned(kv.z), unsigned(kv.w)};
        unsigned wd[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // group j: kept bytes 2j, 2j + 1 go to positions i0 < i1
            const unsigned code = (e >> (4 * j)) & 0xFu, i0 = code & 3u, i1 = code >> 2;
            const unsigned lo = (2 * j) & 3;  // the pair's first byte in its kept word
            const unsigned sel = 0x4444u ^ ((4u ^ lo) << (4 * i0)) ^ ((4u ^ (lo + 1)) << (4 * i1));
            wd[j] = __byte_perm(kept[j >> 1], 0u, sel);  // selector 4 picks a zero byte
        }
        const int64_t col = s * 64 + quarter * 32;
#pragma unroll
        for (int r = 0; r < kGemvMaxM; ++r) {
            if (r < m_rows) {
                const int4 x0 = *reinterpret_cast<const int4*>(q + r * kp + col);
                const int4 x1 = *reinterpret_cast<const int4*>(q + r * kp + col + 16);
                int32_t sum = acc[r];
                sum = __dp4a(x0.x, int(wd[0]), sum);
                sum = __dp4a(x0.y, int(wd[1]), sum);
                sum = __dp4a(x0.z, int(wd[2]), sum);
                sum = __dp4a(x0.w, int(wd[3]), sum);
                sum = __dp4a(x1.x, int(wd[4]), sum);
                sum = __dp4a(x1.y, int(wd[5]), sum);
                sum = __dp4a(x1.z, int(wd[6]), sum);
                sum = __dp4a(x1.w, int(wd[7]), sum);
                acc[r] = sum;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < kGemvMaxM; ++r) {
        const int32_t other = __shfl_xor_sync(0xffffffffu, acc[r], 2);  // the row's other 32 columns
        if (quarter == 0) red[warp][row][r] = acc[r] + other;
    }
    __syncthreads();
    const int orow = threadIdx.x >> 4, tok = threadIdx.x & 15;  // 256 threads = 16 rows x 16 tokens
    const int64_t nn = tile * 16 + orow;
    if (tok < m_rows && nn < n) {
        int32_t sum = 0;
#pragma unroll
        for (int w = 0; w < kGemvWarps; ++w) sum += red[w][orow][tok];
        store_out(out, dtype, ldo, tok, nn, sum, sa, sw, bias);
    }
}

}  // namespace

const char* quantize_rows(const void* x, int dtype, int64_t m, int64_t k, int64_t ldx, int8_t* q, int64_t kp,
                          float* scale, void* stream) {
    if (dtype != kF32 && dtype != kBF16 && dtype != kF16) return "quantize_rows: x must be fp32, bf16 or fp16";
    if (m < 0 || k < 0 || kp < k || kp % kTileK || (m > 0 && ldx < k)) return "quantize_rows: bad sizes";
    if (m == 0) return nullptr;
    if (m > 0x7fffffff) return "quantize_rows: too many rows";
    quantize_rows_kernel<<<unsigned(m), kQuantThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, dtype, k, ldx, q,
                                                                                             kp, scale);
    return check_launch();
}

const char* gemm_i8(const int8_t* q, int64_t m, int64_t kp, const int8_t* w, int64_t n, int64_t np,
                    const float* sa, const float* sw, const float* bias, void* out, int out_dtype, int64_t ldo,
                    void* stream) {
    if (out_dtype < kF32 || out_dtype > kI32) return "gemm_i8: unknown output dtype";
    if (m < 0 || n < 0 || kp < 0 || kp % kTileK || np % kTileN || np < n || (m > 0 && ldo < n))
        return "gemm_i8: bad sizes";
    if (out_dtype != kI32 && (!sa || !sw)) return "gemm_i8: scales missing";
    if (m == 0 || n == 0) return nullptr;
    auto s = static_cast<cudaStream_t>(stream);
    if (m <= kGemvMaxM) {
        const int64_t blocks = (n + kGemvWarps - 1) / kGemvWarps;
        if (blocks > 0x7fffffff) return "gemm_i8: N too large";
        gemv_i8_kernel<<<unsigned(blocks), kGemvWarps * 32, 0, s>>>(q, int(m), kp, w, n, sa, sw, bias, out,
                                                                    out_dtype, ldo);
    } else {
        const int64_t gx = np / BN, gy = (m + BM - 1) / BM;
        if (gy > 65535 || gx > 0x7fffffff) return "gemm_i8: M or N too large for one launch";
        gemm_i8_kernel<<<dim3(unsigned(gx), unsigned(gy)), THREADS, 0, s>>>(q, m, kp, w, n, sa, sw, bias, out,
                                                                           out_dtype, ldo);
    }
    return check_launch();
}

const char* gemm_sp24(const int8_t* q, int64_t m, int64_t kp, const int8_t* vals, const uint32_t* meta, int64_t n,
                      int64_t np, const float* sa, const float* sw, const float* bias, void* out, int out_dtype,
                      int64_t ldo, void* stream) {
    if (out_dtype < kF32 || out_dtype > kI32) return "gemm_sp24: unknown output dtype";
    if (m < 0 || n < 0 || kp < 0 || kp % kSp24TileK || np % kSp24TileN || np < n || (m > 0 && ldo < n))
        return "gemm_sp24: bad sizes";
    if (out_dtype != kI32 && (!sa || !sw)) return "gemm_sp24: scales missing";
    if (m == 0 || n == 0) return nullptr;
    auto s = static_cast<cudaStream_t>(stream);
    if (kp == 0) return "gemm_sp24: K must be at least 1";
    if (m <= kGemvMaxM) {
        if (np / 16 > 0x7fffffff) return "gemm_sp24: N too large";
        gemv_sp24_kernel<<<unsigned(np / 16), kGemvWarps * 32, 0, s>>>(q, int(m), kp, vals, meta, n, sa, sw, bias,
                                                                      out, out_dtype, ldo);
    } else {
        const int64_t gx = np / SBM, gy = (m + SBN - 1) / SBN;
        if (gy > 65535 || gx > 0x7fffffff) return "gemm_sp24: M or N too large for one launch";
        const cudaError_t e =
            cudaFuncSetAttribute(gemm_sp24_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSpSmem);
        if (e != cudaSuccess) {
            t_last_error = cudaGetErrorName(e);
            return cudaGetErrorString(e);
        }
        gemm_sp24_kernel<<<dim3(unsigned(gx), unsigned(gy)), THREADS, kSpSmem, s>>>(q, m, kp, vals, meta, n, sa, sw,
                                                                                   bias, out, out_dtype, ldo);
    }
    return check_launch();
}

int device_count() {
    int c = 0;
    if (cudaGetDeviceCount(&c) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver" error
        return 0;
    }
    return c;
}

const char* last_error_name() { return t_last_error; }

}  // namespace fastinfer::cuda
