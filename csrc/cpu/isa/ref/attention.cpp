// Reference attention (baseline flags): one query row at a time, straight from the strided inputs,
// fp32 throughout. The oracle of the SIMD kernel (equal within fp32 rounding: the sums run in
// another order) and the fallback of every table without one.
#include <algorithm>
#include <cmath>

#include "cpu/isa/ref/kernels.h"

namespace fastinfer::cpu::ref {

namespace {

inline float load(const void* p, DType dt, int64_t i) {
    return dt == DType::kF32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// The additive mask value of position (i, j) for the mask row starting at element row.
inline float mask_value(const AttentionArgs& a, int64_t row, int64_t j) {
    switch (a.mask_kind) {
        case kMaskBool: return static_cast<const uint8_t*>(a.mask)[row + j] ? 0.f : -__builtin_inff();
        case kMaskF32: return static_cast<const float*>(a.mask)[row + j];
        case kMaskBF16: return bf16_to_f32(static_cast<const uint16_t*>(a.mask)[row + j]);
        default: return 0.f;
    }
}

}  // namespace

void attention(const AttentionArgs& a, int64_t bh, int64_t q0, int64_t q1, float* scratch) {
    const int64_t b = bh / a.heads, h = bh % a.heads, hk = h / (a.heads / a.kv_heads);
    const int64_t kb = b * a.k_sb + hk * a.k_sh, vb = b * a.v_sb + hk * a.v_sh;
    float* s = scratch;  // the scores of one row [lk]
    for (int64_t i = q0; i < q1; ++i) {
        const int64_t qb = b * a.q_sb + h * a.q_sh + i * a.q_sl;
        const int64_t mrow = b * a.m_sb + h * a.m_sh + i * a.m_sl;
        const int64_t jn = a.causal ? std::min(a.lk, i + 1) : a.lk;
        float mx = -__builtin_inff();
        bool nan = false;
        for (int64_t j = 0; j < jn; ++j) {
            float acc = 0.f;
            for (int64_t c = 0; c < a.d; ++c) acc += load(a.q, a.dt, qb + c) * load(a.k, a.dt, kb + j * a.k_sl + c);
            s[j] = acc * a.scale + mask_value(a, mrow, j);
            nan = nan || std::isnan(s[j]);
            mx = simd_max(mx, s[j]);
        }
        float* o = scratch + a.lk;  // [dv]
        if (mx == __builtin_inff()) nan = true;  // inf - inf: torch's softmax gives NaN too
        for (int64_t c = 0; c < a.dv; ++c) o[c] = nan ? __builtin_nanf("") : 0.f;
        if (!nan && mx != -__builtin_inff()) {  // else every key masked (or none): zeros, as torch's SDPA
            float sum = 0.f;
            for (int64_t j = 0; j < jn; ++j) {
                s[j] = s[j] == -__builtin_inff() ? 0.f : exp_f32(s[j] - mx);
                sum += s[j];
            }
            for (int64_t j = 0; j < jn; ++j)
                for (int64_t c = 0; c < a.dv; ++c) o[c] += s[j] * load(a.v, a.dt, vb + j * a.v_sl + c);
            const float inv = 1.f / sum;
            for (int64_t c = 0; c < a.dv; ++c) o[c] *= inv;
        }
        const int64_t ob = b * a.o_sb + i * a.o_sl + h * a.o_sh;
        for (int64_t c = 0; c < a.dv; ++c) {
            if (a.dt == DType::kF32)
                static_cast<float*>(a.out)[ob + c] = o[c];
            else
                static_cast<uint16_t*>(a.out)[ob + c] = f32_to_bf16(o[c]);
        }
    }
}

}  // namespace fastinfer::cpu::ref
