// Shared declarations of the torch-free CPU engine: status codes, ISA names, the packed-weight
// layout and the per-ISA kernel entry points. Nothing here includes an ISA intrinsic header.
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

// Packed int8 weights ("K4N16"): W[N,K] stored as blocks of 16 output channels; inside a block,
// for each group of 4 consecutive k, the 4 bytes of channel 0, then channel 1, ... (64 bytes a group).
// This is the operand order of vpdpbusd (one zmm = 16 channels x 4 k) and of an AMX B tile.
// N is padded to a multiple of 16, K to a multiple of 64, padding is zero.
// Buffer: [header 64 B][colsum int32 x Np][blocks int8 x Np*Kp].
constexpr uint32_t kPackMagic = 0x57384946u;  // "FI8W"
constexpr uint32_t kPackVersion = 1;
constexpr uint32_t kLayoutK4N16 = 1;
constexpr int64_t kNBlock = 16;
constexpr int64_t kKAlign = 64;

struct PackHeader {
    uint32_t magic;
    uint32_t version;
    uint32_t layout;
    uint32_t reserved;
    int64_t n, k, np, kp;
    uint8_t pad[64 - 48];
};
static_assert(sizeof(PackHeader) == 64, "header is 64 bytes");

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
constexpr int64_t packed_nbytes(int64_t n, int64_t k) {
    return int64_t(sizeof(PackHeader)) + 4 * round_up(n, kNBlock) + round_up(n, kNBlock) * round_up(k, kKAlign);
}

// A read-only view of a packed buffer after its header was checked.
struct PackedW {
    int64_t n, k, np, kp;
    const int32_t* colsum;  // [np]: sum over k of W[n, k] (zero for padding channels)
    const int8_t* data;     // [np/16][kp/4][16][4]
};

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

// Per-ISA kernels. Each computes rows [m0, m1) and 16-channel blocks [nb0, nb1).
namespace ref {
void quantize_rows(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                   int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8);
void gemm(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
          int64_t nb0, int64_t nb1);
}  // namespace ref
namespace avx2 {
void quantize_rows(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                   int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8);
void gemm(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
          int64_t nb0, int64_t nb1);
int64_t dot_peak(int64_t iters);  // iters * 12 * 16 multiply-adds, registers only
}  // namespace avx2
namespace avx512_vnni {
void quantize_rows(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                   int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8);
void gemm(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
          int64_t nb0, int64_t nb1);
int64_t dot_peak(int64_t iters);                     // iters * 24 * 64 multiply-adds, registers only
int64_t read_sum(const uint8_t* p, int64_t nbytes);  // nbytes % 256 == 0, p 64-byte aligned
}  // namespace avx512_vnni

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
