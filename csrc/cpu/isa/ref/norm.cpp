// LayerNorm, the reference (kernel_table.h, LayerNormArgs): the oracle the SIMD kernels match bit for bit.
#include <cmath>

#include "cpu/isa/ref/kernels.h"

namespace fastinfer::cpu::ref {

namespace {
float load(const void* p, DType dt, int64_t i) {
    return dt == DType::kF32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}
}  // namespace

void layer_norm(const LayerNormArgs& a, int64_t m0, int64_t m1) {
    float part[64];
    for (int64_t m = m0; m < m1; ++m) {
        const int64_t row = m * a.ldx;
        for (float& p : part) p = 0.f;
        for (int64_t i = 0; i < a.h; ++i) part[i % 64] += load(a.x, a.dt, row + i);
        const float mean = layer_norm_sum(part) / float(a.h);
        for (float& p : part) p = 0.f;
        for (int64_t i = 0; i < a.h; ++i) {
            const float d = load(a.x, a.dt, row + i) - mean;
            part[i % 64] = std::fma(d, d, part[i % 64]);
        }
        const float rstd = 1.f / std::sqrt(layer_norm_sum(part) / float(a.h) + a.eps);
        for (int64_t i = 0; i < a.h; ++i) {
            float y = (load(a.x, a.dt, row + i) - mean) * rstd;
            if (a.w && a.b) y = std::fma(y, load(a.w, a.wdt, i), load(a.b, a.wdt, i));
            else if (a.w) y = y * load(a.w, a.wdt, i);
            else if (a.b) y = y + load(a.b, a.wdt, i);
            if (a.dt == DType::kF32) static_cast<float*>(a.out)[m * a.ldo + i] = y;
            else static_cast<uint16_t*>(a.out)[m * a.ldo + i] = f32_to_bf16(y);
        }
    }
}

}  // namespace fastinfer::cpu::ref
