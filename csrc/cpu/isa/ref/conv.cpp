// Portable reference kernels for int8_conv2d: the per-sample range and quantization of an input,
// and the depthwise convolution (the oracle of the SIMD ones).
#include <cmath>
#include <cstring>

#include "cpu/isa/ref/kernels.h"

namespace fastinfer::cpu::ref {
namespace {

inline float load(const void* x, DType dt, int64_t i) {
    if (dt == DType::kF32) return static_cast<const float*>(x)[i];
    return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
}

}  // namespace

ValueRange range(const void* x, DType dt, int64_t n) {
    ValueRange r;
    for (int64_t i = 0; i < n; ++i) {
        const float v = load(x, dt, i);
        if (!std::isfinite(v)) r.finite = false;
        if (v < 0.f) r.nonneg = false;
        r.amax = std::fmax(r.amax, std::fabs(v));
    }
    return r;
}

void quantize_scaled(const void* x, DType dt, int64_t rows, int64_t k, int64_t ldx, float inv, int lo, int hi,
                     uint8_t flip, uint8_t* q, int64_t ldq, int64_t kp) {
    const float flo = float(lo), fhi = float(hi);
    for (int64_t r = 0; r < rows; ++r) {
        uint8_t* qr = q + r * ldq;
        for (int64_t i = 0; i < k; ++i) {
            float v = std::nearbyint(load(x, dt, r * ldx + i) * inv);
            v = std::fmin(fhi, std::fmax(flo, v));
            qr[i] = uint8_t(int(v)) ^ flip;
        }
        if (kp > k) std::memset(qr + k, flip, size_t(kp - k));
    }
}

void depthwise(const DepthwiseArgs& a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t img = r / a.oh, oy = r % a.oh;
        for (int64_t ox = 0; ox < a.ow; ++ox) {
            const int64_t m = r * a.ow + ox;
            for (int64_t c = 0; c < a.c; ++c) {
                uint32_t acc = 0;  // wrapping, like the SIMD paths (9 taps of int8 products never wrap)
                for (int64_t ky = 0; ky < a.kh; ++ky) {
                    const int64_t iy = oy * a.sh - a.ph + ky * a.dh;
                    if (iy < 0 || iy >= a.h) continue;
                    for (int64_t kx = 0; kx < a.kw; ++kx) {
                        const int64_t ix = ox * a.sw - a.pw + kx * a.dw;
                        if (ix < 0 || ix >= a.w) continue;
                        const uint8_t b = a.x[((img * a.h + iy) * a.w + ix) * a.c + c];
                        const int32_t v = a.u8 ? int32_t(b) : int32_t(int8_t(b));
                        acc += uint32_t(v * a.w32[(ky * a.kw + kx) * a.cp + c]);
                    }
                }
                store_one(int32_t(acc), a.ep, m, c);
            }
        }
    }
}

}  // namespace fastinfer::cpu::ref
