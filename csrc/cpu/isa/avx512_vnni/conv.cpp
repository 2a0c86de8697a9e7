// AVX-512 kernels for int8_conv2d: the per-sample range and quantization of an input (the same
// rounding as ref: x * inv rounded in the current mode, clamped), and the depthwise convolution
// (16 channels per zmm, up to 4 zmm per pass over the taps; exact int32 sums).
#include <immintrin.h>

#include <cstring>

#include "cpu/isa/avx512_vnni/avx512_inl.h"
#include "cpu/isa/avx512_vnni/kernels.h"

namespace fastinfer::cpu::avx512_vnni {
namespace {

// [lo, hi) of the taps k with 0 <= base + k * d < size.
inline void tap_range(int64_t base, int64_t d, int64_t taps, int64_t size, int64_t* lo, int64_t* hi) {
    int64_t a = 0, b = taps;
    while (a < b && base + a * d < 0) ++a;
    while (b > a && base + (b - 1) * d >= size) --b;
    *lo = a;
    *hi = b;
}

template <int NB, bool U8>
void dw_pixel(const DepthwiseArgs& a, int64_t img, int64_t oy, int64_t ox, int64_t m, int64_t c0) {
    __m512i acc[NB];
    _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_si512();
    const __mmask16 last = tail_mask(a.c - (c0 + (NB - 1) * 16));
    int64_t ky0, ky1, kx0, kx1;
    tap_range(oy * a.sh - a.ph, a.dh, a.kh, a.h, &ky0, &ky1);
    tap_range(ox * a.sw - a.pw, a.dw, a.kw, a.w, &kx0, &kx1);
    for (int64_t ky = ky0; ky < ky1; ++ky) {
        const int64_t iy = oy * a.sh - a.ph + ky * a.dh;
        const uint8_t* xrow = a.x + (img * a.h + iy) * a.w * a.c + c0;
        const int32_t* wrow = a.w32 + ky * a.kw * a.cp + c0;
        for (int64_t kx = kx0; kx < kx1; ++kx) {
            const int64_t ix = ox * a.sw - a.pw + kx * a.dw;
            const uint8_t* xp = xrow + ix * a.c;
            const int32_t* wp = wrow + kx * a.cp;
            _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) {
                const __m128i b = j == NB - 1 ? _mm_maskz_loadu_epi8(last, xp + 16 * j)
                                              : _mm_loadu_si128(reinterpret_cast<const __m128i*>(xp + 16 * j));
                const __m512i v = U8 ? _mm512_cvtepu8_epi32(b) : _mm512_cvtepi8_epi32(b);
                acc[j] = _mm512_add_epi32(acc[j], _mm512_mullo_epi32(v, _mm512_load_si512(wp + 16 * j)));
            }
        }
    }
    _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) store_cols(acc[j], a.c, nullptr, a.ep, m, c0 + 16 * j);
}

template <bool U8>
void dw_rows(const DepthwiseArgs& a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t img = r / a.oh, oy = r % a.oh;
        for (int64_t ox = 0; ox < a.ow; ++ox) {
            const int64_t m = r * a.ow + ox;
            for (int64_t c0 = 0; c0 < a.c; c0 += 64) {
                switch ((std::min<int64_t>(64, a.c - c0) + 15) / 16) {
                    case 4: dw_pixel<4, U8>(a, img, oy, ox, m, c0); break;
                    case 3: dw_pixel<3, U8>(a, img, oy, ox, m, c0); break;
                    case 2: dw_pixel<2, U8>(a, img, oy, ox, m, c0); break;
                    default: dw_pixel<1, U8>(a, img, oy, ox, m, c0); break;
                }
            }
        }
    }
}

}  // namespace

ValueRange range(const void* x, DType dt, int64_t n) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 inf = _mm512_set1_ps(__builtin_inff());
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0, neg = 0;
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = tail_mask(n - i);
        const __m512 v = load_x16(x, dt, i, mk);
        neg |= _mm512_mask_cmp_ps_mask(mk, v, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 av = _mm512_and_ps(v, abs_mask);
        bad |= _mm512_cmp_ps_mask(av, inf, _CMP_NLT_UQ);  // Inf or NaN
        vmax = _mm512_max_ps(vmax, av);
    }
    ValueRange r;
    r.amax = _mm512_reduce_max_ps(vmax);
    r.finite = bad == 0;
    r.nonneg = neg == 0;
    return r;
}

void quantize_scaled(const void* x, DType dt, int64_t rows, int64_t k, int64_t ldx, float inv, int lo, int hi,
                     uint8_t flip, uint8_t* q, int64_t ldq, int64_t kp) {
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i vlo = _mm512_set1_epi32(lo), vhi = _mm512_set1_epi32(hi);
    const __m128i vflip = _mm_set1_epi8(char(flip));
    for (int64_t r = 0; r < rows; ++r) {
        uint8_t* qr = q + r * ldq;
        const int64_t row = r * ldx;
        for (int64_t i = 0; i < k; i += 16) {
            const __mmask16 mk = tail_mask(k - i);
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load_x16(x, dt, row + i, mk), vinv));
            v = _mm512_min_epi32(_mm512_max_epi32(v, vlo), vhi);
            _mm_mask_storeu_epi8(qr + i, mk, _mm_xor_si128(_mm512_cvtepi32_epi8(v), vflip));
        }
        if (kp > k) std::memset(qr + k, flip, size_t(kp - k));
    }
}

void depthwise(const DepthwiseArgs& a, int64_t r0, int64_t r1) {
    if (a.u8)
        dw_rows<true>(a, r0, r1);
    else
        dw_rows<false>(a, r0, r1);
}

}  // namespace fastinfer::cpu::avx512_vnni
