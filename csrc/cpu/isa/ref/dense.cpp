// Portable reference kernels, dense int8: per-token quantization and the K4N16 GEMM.
#include <cmath>
#include <cstring>

#include "cpu/isa/ref/kernels.h"

namespace fastinfer::cpu::ref {
namespace {

// Element i of an fp32 or bf16 array, as fp32 (bf16 widened exactly).
float load_one(const void* x, DType dt, int64_t i) {
    if (dt == DType::kF32) return static_cast<const float*>(x)[i];
    return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
}

}  // namespace

void quantize_rows(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                   int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8) {
    const uint8_t bias = shift_u8 ? 0x80 : 0;
    for (int64_t m = m0; m < m1; ++m) {
        auto load = [&](int64_t i) { return load_one(x, dt, m * ldx + i); };
        float amax = 0.f;
        bool finite = true;
        for (int64_t i = 0; i < k; ++i) {
            float v = load(i);
            if (!std::isfinite(v)) finite = false;
            amax = std::fmax(amax, std::fabs(v));
        }
        int8_t* qr = q + m * ldq;
        float inv = 127.f / amax;
        // NaN/Inf rows propagate NaN through the scale; rows too small for 127/amax (or zero) are zero.
        if (!finite || amax == 0.f || !std::isfinite(inv)) {
            scale[m] = finite ? 0.f : NAN;
            std::memset(qr, int(bias), size_t(kp));
            continue;
        }
        scale[m] = amax / 127.f;
        for (int64_t i = 0; i < k; ++i) {
            float r = std::nearbyint(load(i) * inv);
            r = std::fmin(127.f, std::fmax(-127.f, r));
            qr[i] = int8_t(uint8_t(int(r)) ^ bias);
        }
        std::memset(qr + k, int(bias), size_t(kp - k));
    }
}

void quantize_static(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k, float inv, float s,
                     int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8) {
    const uint8_t bias = shift_u8 ? 0x80 : 0;
    for (int64_t m = m0; m < m1; ++m) {
        auto load = [&](int64_t i) { return load_one(x, dt, m * ldx + i); };
        int8_t* qr = q + m * ldq;
        bool finite = true;
        for (int64_t i = 0; i < k; ++i) {
            const float v = load(i);
            if (!std::isfinite(v)) finite = false;
            // clamped before rounding (the same for integer bounds); NaN gives -127 here, zeroed below
            const float r = std::nearbyint(std::fmin(127.f, std::fmax(-127.f, v * inv)));
            qr[i] = int8_t(uint8_t(int(r)) ^ bias);
        }
        std::memset(qr + k, int(bias), size_t(kp - k));
        scale[m] = finite ? s : NAN;
        if (!finite) std::memset(qr, int(bias), size_t(kp));
    }
}

void gemm(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
          int64_t nb0, int64_t nb1) {
    for (int64_t m = m0; m < m1; ++m) {
        const int8_t* ar = a.q + m * a.ldq;
        for (int64_t nb = nb0; nb < nb1; ++nb) {
            const int8_t* blk = w.data + nb * kNBlock * w.kp;
            for (int64_t j = 0; j < kNBlock; ++j) {
                int64_t n = nb * kNBlock + j;
                if (n >= w.n) break;
                uint32_t acc = 0;  // wrapping arithmetic: exact mod 2^32, like the SIMD paths
                for (int64_t g = 0; g < w.kp / 4; ++g)
                    for (int64_t t = 0; t < 4; ++t)
                        acc += uint32_t(int32_t(ar[4 * g + t]) * int32_t(blk[g * 64 + j * 4 + t]));
                store_one(int32_t(acc), ep, m, n);
            }
        }
    }
}

}  // namespace fastinfer::cpu::ref

namespace fastinfer::cpu::ref {

void wo_gemm(const float* x, int64_t ldx, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
             int64_t nb0, int64_t nb1) {
    for (int64_t m = m0; m < m1; ++m) {
        const float* xr = x + m * ldx;
        for (int64_t nb = nb0; nb < nb1; ++nb) {
            const int8_t* blk = w.data + nb * kNBlock * w.kp;
            for (int64_t j = 0; j < kNBlock; ++j) {
                const int64_t n = nb * kNBlock + j;
                if (n >= w.n) break;
                float acc = 0.f;
                for (int64_t i = 0; i < w.k; ++i)
                    acc = __builtin_fmaf(xr[i], float(blk[i / 4 * 64 + j * 4 + i % 4]), acc);
                store_one_f32(acc, ep, m, n);
            }
        }
    }
}

}  // namespace fastinfer::cpu::ref
