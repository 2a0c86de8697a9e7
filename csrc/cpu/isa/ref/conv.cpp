// Portable reference kernels of the convolution paths (api/conv.cpp): the gather + per-row
// quantization of int8 conv rows, the int8 and fp32 depthwise convolutions, and the per-sample
// range and quantization of the int8 depthwise path. The oracle of the SIMD kernels.
#include <cmath>
#include <cstring>

#include "cpu/isa/ref/kernels.h"

namespace fastinfer::cpu::ref {
namespace {

inline float load(const void* x, DType dt, int64_t i) {
    if (dt == DType::kF32) return static_cast<const float*>(x)[i];
    if (dt == DType::kU8) {  // float(q), NaN for kU8NaN: the depthwise weights carry kU8Scale
        const uint8_t q = static_cast<const uint8_t*>(x)[i];
        return q == kU8NaN ? NAN : float(q);
    }
    return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
}

// Offset of pixel (iy, ix) of image img, or -1 outside the image.
inline int64_t pixel(const ConvGeom& g, int64_t img, int64_t iy, int64_t ix) {
    if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return -1;
    return ((img * g.h + iy) * g.w + ix) * g.c;
}

}  // namespace

void gather_quantize(const ConvGeom& g, int64_t cg, int64_t group, int64_t m0, int64_t m1, uint8_t flip,
                     uint8_t* tile, int64_t kp, float* sa, uint8_t* u8) {
    const int64_t pix = g.oh * g.ow, k = g.kh * g.kw * cg;
    for (int64_t m = m0; m < m1; ++m) {
        const int64_t img = m / pix, oy = m % pix / g.ow, ox = m % g.ow;
        uint8_t* row = tile + (m - m0) * kp;
        if (g.dt == DType::kU8) {  // already quantized: the bytes as a u8 row of scale kU8Scale
            const uint8_t f = flip ^ 0x80;
            bool nan = false;
            std::memset(row, f, size_t(kp));
            for (int64_t ky = 0; ky < g.kh; ++ky)
                for (int64_t kx = 0; kx < g.kw; ++kx) {
                    const int64_t p = pixel(g, img, oy * g.sh - g.ph + ky * g.dh, ox * g.sw - g.pw + kx * g.dw);
                    if (p < 0) continue;
                    const uint8_t* src = static_cast<const uint8_t*>(g.x) + p + group * cg;
                    for (int64_t c = 0; c < cg; ++c) {
                        nan = nan || src[c] == kU8NaN;
                        row[(ky * g.kw + kx) * cg + c] = src[c] ^ f;
                    }
                }
            sa[m - m0] = nan ? NAN : kU8Scale;
            u8[m - m0] = !nan;
            if (nan) std::memset(row, flip, size_t(kp));
            continue;
        }
        float amax = 0.f;
        bool finite = true, nonneg = true;
        for (int64_t ky = 0; ky < g.kh; ++ky)
            for (int64_t kx = 0; kx < g.kw; ++kx) {
                const int64_t p = pixel(g, img, oy * g.sh - g.ph + ky * g.dh, ox * g.sw - g.pw + kx * g.dw);
                if (p < 0) continue;
                for (int64_t c = 0; c < cg; ++c) {
                    const float v = load(g.x, g.dt, p + group * cg + c);
                    if (!std::isfinite(v)) finite = false;
                    if (v < 0.f) nonneg = false;
                    amax = std::fmax(amax, std::fabs(v));
                }
            }
        const float qmax = nonneg ? 255.f : 127.f, qmin = nonneg ? 0.f : -127.f;
        const float inv = qmax / amax;
        u8[m - m0] = 0;
        if (!finite || amax == 0.f || !std::isfinite(inv)) {
            sa[m - m0] = finite ? 0.f : NAN;
            std::memset(row, flip, size_t(kp));
            continue;
        }
        sa[m - m0] = amax / qmax;
        u8[m - m0] = nonneg;
        const uint8_t f = nonneg ? uint8_t(flip ^ 0x80) : flip;  // u8: q - 128 = q ^ 0x80 as int8
        for (int64_t ky = 0; ky < g.kh; ++ky)
            for (int64_t kx = 0; kx < g.kw; ++kx) {
                const int64_t p = pixel(g, img, oy * g.sh - g.ph + ky * g.dh, ox * g.sw - g.pw + kx * g.dw);
                uint8_t* dst = row + (ky * g.kw + kx) * cg;
                if (p < 0) {
                    std::memset(dst, f, size_t(cg));
                    continue;
                }
                for (int64_t c = 0; c < cg; ++c) {
                    float r = std::nearbyint(load(g.x, g.dt, p + group * cg + c) * inv);
                    r = std::fmin(qmax, std::fmax(qmin, r));
                    dst[c] = uint8_t(int(r)) ^ f;
                }
            }
        std::memset(row + k, f, size_t(kp - k));
    }
}

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
    const ConvGeom& g = a.g;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t img = r / g.oh, oy = r % g.oh;
        for (int64_t ox = 0; ox < g.ow; ++ox) {
            const int64_t m = r * g.ow + ox;
            for (int64_t c = 0; c < g.c; ++c) {
                uint32_t acc = 0;  // wrapping, like the SIMD paths (int8 products of a few taps never wrap)
                for (int64_t ky = 0; ky < g.kh; ++ky)
                    for (int64_t kx = 0; kx < g.kw; ++kx) {
                        const int64_t p = pixel(g, img, oy * g.sh - g.ph + ky * g.dh, ox * g.sw - g.pw + kx * g.dw);
                        if (p < 0) continue;
                        const uint8_t b = a.xq[p + c];
                        const int32_t v = a.u8 ? int32_t(b) : int32_t(int8_t(b));
                        acc += uint32_t(v * a.w32[(ky * g.kw + kx) * a.cp + c]);
                    }
                store_one(int32_t(acc), a.ep, m, c);
            }
        }
    }
}

void depthwise_f32(const DepthwiseArgs& a, int64_t r0, int64_t r1) {
    const ConvGeom& g = a.g;
    const Epilogue& ep = a.ep;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t img = r / g.oh, oy = r % g.oh;
        for (int64_t ox = 0; ox < g.ow; ++ox) {
            const int64_t m = r * g.ow + ox;
            for (int64_t c = 0; c < g.c; ++c) {
                float acc = 0.f;
                for (int64_t ky = 0; ky < g.kh; ++ky)
                    for (int64_t kx = 0; kx < g.kw; ++kx) {
                        const int64_t p = pixel(g, img, oy * g.sh - g.ph + ky * g.dh, ox * g.sw - g.pw + kx * g.dw);
                        if (p < 0) continue;
                        acc = __builtin_fmaf(load(g.x, g.dt, p + c), a.wf[(ky * g.kw + kx) * a.cp + c], acc);
                    }
                store_value(act_f32(acc + (ep.bias ? ep.bias[c] : 0.f), ep.act), ep, m, c);
            }
        }
    }
}

}  // namespace fastinfer::cpu::ref
