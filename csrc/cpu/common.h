// Shared declarations of the torch-free CPU engine: status codes, ISA names, the blocking, and what
// every GEMM kernel reads and writes (activations, epilogue). Nothing here includes an ISA
// intrinsic header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fastinfer {

// Error channel of every entry point: no C++ exception ever crosses into Python.
struct Status {
    enum Code { kOk = 0, kInvalidArgument = 1, kRuntime = 2 };
    Code code = kOk;
    std::string message;
    static Status ok() { return {}; }
    static Status invalid(std::string msg) { return {kInvalidArgument, std::move(msg)}; }
    static Status runtime(std::string msg) { return {kRuntime, std::move(msg)}; }
    bool is_ok() const { return code == kOk; }
};

namespace cpu {

// Ordered: a larger value is a superset of the smaller ones on every CPU we dispatch to.
enum class Isa : int { kRef = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };
const char* isa_name(Isa isa);

enum class DType : int { kF32 = 0, kBF16 = 1, kI32 = 2 };

// Weights are processed in blocks of kNBlock output channels (one zmm of int32 sums); K is padded
// to a multiple of kKAlign (one zmm of int8 activations).
constexpr int64_t kNBlock = 16;
constexpr int64_t kKAlign = 64;
// Largest M, N or K an entry point accepts: every size product stays far from int64 overflow. (The
// int32 sums are exact for K up to 2^17; beyond, exact mod 2^32 like a wrapping int32 matmul.)
constexpr int64_t kMaxDim = int64_t(1) << 40;

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Sizes of a [m, k] operand with row stride ld: not negative, at most kMaxDim, ld >= k (m > 0).
// what names the entry point in the message.
Status check_dims(int64_t m, int64_t k, int64_t ld, const char* what);

// Where the GEMM result goes. kind kI32: out[m,n] = acc (exact, wrapping mod 2^32).
// kind kF32/kBF16: out[m,n] = acc * sa[m] * sw[n] + bias[n] (bias may be null), computed in fp32.
struct Epilogue {
    DType kind;
    void* out;
    int64_t ldo;  // row stride of out, in elements
    const float* sa;
    const float* sw;
    const float* bias;
};

// Quantized activations handed to a GEMM kernel: int8 rows of kp bytes (zero padded past k).
// For avx512_vnni the bytes are stored shifted (q + 128 as uint8); the kernel subtracts 128*colsum.
struct Activations {
    const int8_t* q;
    int64_t m;
    int64_t ldq;
};

// Scalar helpers shared by every path (exactly the same float operations as the SIMD code).
// In an unnamed namespace: each file gets its own copy compiled with its own flags, so the linker
// can never hand baseline code an AVX-512 copy of a helper.
namespace {

inline float bf16_to_f32(uint16_t v) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

// The epilogue for one output element: every path computes fma(float(acc), sa*sw, bias) in fp32.
inline void store_one(int32_t acc, const Epilogue& ep, int64_t m, int64_t n) {
    if (ep.kind == DType::kI32) {
        static_cast<int32_t*>(ep.out)[m * ep.ldo + n] = acc;
        return;
    }
    const float y = __builtin_fmaf(float(acc), ep.sa[m] * ep.sw[n], ep.bias ? ep.bias[n] : 0.f);
    if (ep.kind == DType::kF32)
        static_cast<float*>(ep.out)[m * ep.ldo + n] = y;
    else
        static_cast<uint16_t*>(ep.out)[m * ep.ldo + n] = f32_to_bf16(y);
}

}  // namespace

}  // namespace cpu
}  // namespace fastinfer
