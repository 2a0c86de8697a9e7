// AVX-512 kernels of the convolution paths (api/conv.cpp): the gather + per-row quantization of
// int8 conv rows (quantize_rows' rounding: x * inv rounded in the current mode, clamped), the int8
// and fp32 depthwise convolutions (16 channels per zmm, up to 4 zmm per pass over the taps), and
// the per-sample range and quantization of the int8 depthwise path.
#include <immintrin.h>

#include <cstring>

#include "cpu/isa/avx512_vnni/avx512_inl.h"
#include "cpu/isa/avx512_vnni/kernels.h"

namespace fastinfer::cpu::avx512_vnni {
namespace {

// [lo, hi) of the taps t with 0 <= base + t * d < size.
inline void tap_range(int64_t base, int64_t d, int64_t taps, int64_t size, int64_t* lo, int64_t* hi) {
    int64_t a = 0, b = taps;
    while (a < b && base + a * d < 0) ++a;
    while (b > a && base + (b - 1) * d >= size) --b;
    *lo = a;
    *hi = b;
}

template <int NB, bool U8>
void dw_pixel(const DepthwiseArgs& a, int64_t img, int64_t oy, int64_t ox, int64_t m, int64_t c0) {
    const ConvGeom& g = a.g;
    __m512i acc[NB];
    _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_si512();
    const __mmask16 last = tail_mask(g.c - (c0 + (NB - 1) * 16));
    int64_t ky0, ky1, kx0, kx1;
    tap_range(oy * g.sh - g.ph, g.dh, g.kh, g.h, &ky0, &ky1);
    tap_range(ox * g.sw - g.pw, g.dw, g.kw, g.w, &kx0, &kx1);
    for (int64_t ky = ky0; ky < ky1; ++ky) {
        const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
        const uint8_t* xrow = a.xq + (img * g.h + iy) * g.w * g.c + c0;
        const int32_t* wrow = a.w32 + ky * g.kw * a.cp + c0;
        for (int64_t kx = kx0; kx < kx1; ++kx) {
            const uint8_t* xp = xrow + (ox * g.sw - g.pw + kx * g.dw) * g.c;
            const int32_t* wp = wrow + kx * a.cp;
            _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) {
                const __m128i b = j == NB - 1 ? _mm_maskz_loadu_epi8(last, xp + 16 * j)
                                              : _mm_loadu_si128(reinterpret_cast<const __m128i*>(xp + 16 * j));
                const __m512i v = U8 ? _mm512_cvtepu8_epi32(b) : _mm512_cvtepi8_epi32(b);
                acc[j] = _mm512_add_epi32(acc[j], _mm512_mullo_epi32(v, _mm512_load_si512(wp + 16 * j)));
            }
        }
    }
    _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) store_cols(acc[j], g.c, nullptr, a.ep, m, c0 + 16 * j);
}

// fp32 depthwise over a strip of up to S output pixels (ox0 ..) of one row and NB blocks of 16
// channels: each tap's weights are loaded once for the strip (per pixel the kernel was load-bound:
// two loads per fma). Per output element the same fma order as ref: taps (ky, kx) in order, those
// outside the image skipped.
template <int S, int NB>
void dwf_strip(const DepthwiseArgs& a, int64_t img, int64_t oy, int64_t ox0, int64_t nx, int64_t c0) {
    const ConvGeom& g = a.g;
    const Epilogue& ep = a.ep;
    __m512 acc[S][NB];
    _Pragma("GCC unroll 8") for (int i = 0; i < S; ++i)
        _Pragma("GCC unroll 2") for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    __mmask16 mk[NB];
    _Pragma("GCC unroll 2") for (int j = 0; j < NB; ++j) mk[j] = tail_mask(g.c - (c0 + 16 * j));
    int64_t ky0, ky1;
    tap_range(oy * g.sh - g.ph, g.dh, g.kh, g.h, &ky0, &ky1);
    for (int64_t ky = ky0; ky < ky1; ++ky) {
        const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
        const int64_t xrow = (img * g.h + iy) * g.w * g.c + c0;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
            __m512 w[NB];
            _Pragma("GCC unroll 2") for (int j = 0; j < NB; ++j)
                w[j] = _mm512_loadu_ps(a.wf + (ky * g.kw + kx) * a.cp + c0 + 16 * j);
            const int64_t ix0 = ox0 * g.sw - g.pw + kx * g.dw;
            _Pragma("GCC unroll 8") for (int i = 0; i < S; ++i) {
                const int64_t ix = ix0 + i * g.sw;
                if (i >= nx || ix < 0 || ix >= g.w) continue;
                _Pragma("GCC unroll 2") for (int j = 0; j < NB; ++j)
                    acc[i][j] = _mm512_fmadd_ps(load_x16(g.x, g.dt, xrow + ix * g.c + 16 * j, mk[j]), w[j], acc[i][j]);
            }
        }
    }
    _Pragma("GCC unroll 2") for (int j = 0; j < NB; ++j) {
        const int64_t c = c0 + 16 * j;
        const __m512 b = ep.bias ? _mm512_maskz_loadu_ps(mk[j], ep.bias + c) : _mm512_setzero_ps();
        _Pragma("GCC unroll 8") for (int i = 0; i < S; ++i) {
            if (i >= nx) break;
            const int64_t m = (img * g.oh + oy) * g.ow + ox0 + i;
            store_x16(ep, m * ep.ldo + c, mk[j], act16(_mm512_add_ps(acc[i][j], b), ep.act), ep.stream);
        }
    }
}

// One input vector of dwf_strip_rows: 16 channels at element off, fp32 / bf16 widened, kU8 as float(q)
// (the weights carry kU8Scale) with its bytes folded into seen by max, so a NaN byte (255) is found
// once per strip rather than tested per load. Masked: only the lanes in mk are read (others 0).
template <DType DT, bool Masked>
inline __m512 strip_load(const void* x, int64_t off, __mmask16 mk, __m128i& seen) {
    if constexpr (DT == DType::kF32) {
        const float* p = static_cast<const float*>(x) + off;
        return Masked ? _mm512_maskz_loadu_ps(mk, p) : _mm512_loadu_ps(p);
    } else if constexpr (DT == DType::kU8) {
        const uint8_t* p = static_cast<const uint8_t*>(x) + off;
        const __m128i b = Masked ? _mm_maskz_loadu_epi8(mk, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        seen = _mm_max_epu8(seen, b);
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
    } else {
        const uint16_t* p = static_cast<const uint16_t*>(x) + off;
        const __m256i h = Masked ? _mm256_maskz_loadu_epi16(mk, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
}

// The fp32 depthwise for kernel width KW and stride SW with no dilation across the row, one block of
// 16 channels c0 and a strip of up to S output pixels (ox0 ..) of one row: each tap row's T input
// columns are loaded and widened once and serve all KW taps of the row (dwf_strip widens every
// input KW times, which made it instruction-bound on bf16 and uint8 inputs). Columns outside the
// image load as 0 and are multiplied like the others: fma(0, w, acc) = acc for a finite w, since
// acc starts at +0 and cannot become -0 in round-to-nearest, so the sums are ref's, which skips
// those taps (the entry point refuses a weight that is not finite). Masked: the strip touches the
// image's left or right edge, or the channel block is partial; else plain loads.
template <int S, int KW, int SW, DType DT, bool Masked>
void dwf_strip_rows_as(const DepthwiseArgs& a, int64_t img, int64_t oy, int64_t ox0, int64_t nx, int64_t c0,
                       int64_t ky0, int64_t ky1, int64_t tlo, int64_t thi) {
    constexpr int T = (S - 1) * SW + KW;
    const ConvGeom& g = a.g;
    const Epilogue& ep = a.ep;
    const __mmask16 mk = tail_mask(g.c - c0);
    const int64_t ix0 = ox0 * SW - g.pw;  // input column of t = 0
    __m512 acc[S];
    _Pragma("GCC unroll 16") for (int i = 0; i < S; ++i) acc[i] = _mm512_setzero_ps();
    __m128i seen = _mm_setzero_si128();
    for (int64_t ky = ky0; ky < ky1; ++ky) {
        const int64_t row = ((img * g.h + oy * g.sh - g.ph + ky * g.dh) * g.w + ix0) * g.c + c0;  // element of t = 0
        __m512 x[T];
        _Pragma("GCC unroll 32") for (int t = 0; t < T; ++t)
            x[t] = strip_load<DT, Masked>(g.x, row + t * g.c, t >= tlo && t < thi ? mk : __mmask16(0), seen);
        const float* wr = a.wf + ky * KW * a.cp + c0;
        _Pragma("GCC unroll 8") for (int kx = 0; kx < KW; ++kx) {
            const __m512 w = _mm512_loadu_ps(wr + kx * a.cp);
            _Pragma("GCC unroll 16") for (int i = 0; i < S; ++i) acc[i] = _mm512_fmadd_ps(x[i * SW + kx], w, acc[i]);
        }
    }
    if constexpr (DT == DType::kU8) {
        if (_mm_cmpeq_epi8_mask(seen, _mm_set1_epi8(char(kU8NaN)))) {  // a NaN input: NaN where a pixel's window holds it
            __mmask16 nan[S] = {};
            for (int64_t ky = ky0; ky < ky1; ++ky) {
                const uint8_t* row = static_cast<const uint8_t*>(g.x) + ((img * g.h + oy * g.sh - g.ph + ky * g.dh) * g.w + ix0) * g.c + c0;
                _Pragma("GCC unroll 32") for (int t = 0; t < T; ++t) {
                    if (t < tlo || t >= thi) continue;
                    const __mmask16 bad = _mm_mask_cmpeq_epi8_mask(mk, _mm_maskz_loadu_epi8(mk, row + t * g.c), _mm_set1_epi8(char(kU8NaN)));
                    _Pragma("GCC unroll 16") for (int i = 0; i < S; ++i)
                        if (t >= i * SW && t < i * SW + KW) nan[i] |= bad;
                }
            }
            // unrolled, as every loop over acc: an indexed one keeps the accumulators in memory
            _Pragma("GCC unroll 16") for (int i = 0; i < S; ++i)
                acc[i] = _mm512_mask_mov_ps(acc[i], nan[i], _mm512_set1_ps(__builtin_nanf("")));
        }
    }
    const __m512 b = ep.bias ? _mm512_maskz_loadu_ps(mk, ep.bias + c0) : _mm512_setzero_ps();
    _Pragma("GCC unroll 16") for (int i = 0; i < S; ++i) {
        if (i >= nx) break;
        const int64_t m = (img * g.oh + oy) * g.ow + ox0 + i;
        store_x16(ep, m * ep.ldo + c0, mk, act16(_mm512_add_ps(acc[i], b), ep.act), ep.stream);
    }
}

template <int S, int KW, int SW, DType DT>
void dwf_strip_rows(const DepthwiseArgs& a, int64_t img, int64_t oy, int64_t ox0, int64_t nx, int64_t c0) {
    constexpr int64_t T = (S - 1) * SW + KW;
    const ConvGeom& g = a.g;
    const int64_t ix0 = ox0 * SW - g.pw;
    const int64_t tlo = std::max<int64_t>(0, -ix0), thi = std::min<int64_t>(T, g.w - ix0);  // columns in the image
    int64_t ky0, ky1;
    tap_range(oy * g.sh - g.ph, g.dh, g.kh, g.h, &ky0, &ky1);
    if (tlo == 0 && thi == T && g.c - c0 >= 16)
        dwf_strip_rows_as<S, KW, SW, DT, false>(a, img, oy, ox0, nx, c0, ky0, ky1, tlo, thi);
    else
        dwf_strip_rows_as<S, KW, SW, DT, true>(a, img, oy, ox0, nx, c0, ky0, ky1, tlo, thi);
}

using StripRows = void (*)(const DepthwiseArgs&, int64_t, int64_t, int64_t, int64_t, int64_t);

// dwf_strip_rows for the geometry (kernel width 3, 5 or 7, stride 1 or 2), or null.
template <int S, DType DT>
StripRows strip_rows_for(const ConvGeom& g) {
    switch (g.kw * 10 + g.sw) {
        case 31: return dwf_strip_rows<S, 3, 1, DT>;
        case 32: return dwf_strip_rows<S, 3, 2, DT>;
        case 51: return dwf_strip_rows<S, 5, 1, DT>;
        case 52: return dwf_strip_rows<S, 5, 2, DT>;
        case 71: return dwf_strip_rows<S, 7, 1, DT>;
        case 72: return dwf_strip_rows<S, 7, 2, DT>;
        default: return nullptr;
    }
}

// Every output pixel of rows [r0, r1), 64 channels at a time. The input streams from memory (the
// hardware prefetcher alone left the fp32 kernel at a third of torch's speed here): each pixel
// prefetches the input pixels that the pixel 4 columns on is the first to read: the bottom sh tap
// rows x the right sw columns (the rest was read by the row or the pixel before), from the int8
// copy (xq) or the float input.
template <class Pixel>
void dw_rows(const DepthwiseArgs& a, int64_t r0, int64_t r1, Pixel&& pixel) {
    const ConvGeom& g = a.g;
    const char* base = a.xq ? reinterpret_cast<const char*>(a.xq) : static_cast<const char*>(g.x);
    const size_t e = a.xq ? 1 : dtype_bytes(g.dt);
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t img = r / g.oh, oy = r % g.oh;
        const int64_t bottom = oy * g.sh - g.ph + (g.kh - 1) * g.dh;
        for (int64_t ox = 0; ox < g.ow; ++ox) {
            const int64_t right = (ox + 4) * g.sw - g.pw + (g.kw - 1) * g.dw;
            for (int64_t iy = bottom - g.sh + 1; iy <= bottom; ++iy)
                for (int64_t ix = right - g.sw + 1; ix <= right; ++ix) {
                    if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) continue;
                    const char* p = base + size_t(((img * g.h + iy) * g.w + ix) * g.c) * e;
                    for (size_t off = 0; off < size_t(g.c) * e; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
                }
            for (int64_t c0 = 0; c0 < g.c; c0 += 64)
                pixel(img, oy, ox, r * g.ow + ox, c0, (std::min<int64_t>(64, g.c - c0) + 15) / 16);
        }
    }
}

}  // namespace

namespace {

// The running range of the values of a row: max |x|, whether one is NaN/Inf, whether one is < 0
// (lanes outside mk load as 0 and count for nothing).
struct RowRange {
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0, neg = 0;
    void add(__m512 x, __mmask16 mk) {
        neg |= _mm512_mask_cmp_ps_mask(mk, x, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 v = _mm512_and_ps(x, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)));
        bad |= _mm512_cmp_ps_mask(v, _mm512_set1_ps(__builtin_inff()), _CMP_NLT_UQ);  // Inf or NaN
        vmax = _mm512_max_ps(vmax, v);
    }
};

// How an im2col row with range r is stored (gather_quantize's rule, kernel_table.h): writes its
// scale and u8 flag; ok is false for a NaN/Inf, zero or too small row (stored as zeros).
struct RowQuant {
    bool ok;
    uint8_t f;  // the stored zero of the row: flip, or flip ^ 0x80 for a uint8 row (q - 128)
    __m512 vinv;
    __m512i lo, hi;
    __m128i vflip;
    RowQuant(const RowRange& r, uint8_t flip, float* sa, uint8_t* u8) {
        const bool nonneg = r.neg == 0;
        const float amax = _mm512_reduce_max_ps(r.vmax);
        const float qmax = nonneg ? 255.f : 127.f;
        const float inv = qmax / amax;
        ok = !(r.bad || amax == 0.f || !(inv < __builtin_inff()));
        *sa = r.bad ? __builtin_nanf("") : ok ? amax / qmax : 0.f;
        *u8 = ok && nonneg;
        f = ok && nonneg ? uint8_t(flip ^ 0x80) : flip;
        vinv = _mm512_set1_ps(inv);
        lo = _mm512_set1_epi32(nonneg ? 0 : -127);
        hi = _mm512_set1_epi32(nonneg ? 255 : 127);
        vflip = _mm_set1_epi8(char(f));
    }
    // 16 values as their stored bytes
    __m128i bytes(__m512 x) const {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x, vinv));
        q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
        return _mm_xor_si128(_mm512_cvtepi32_epi8(q), vflip);
    }
};

// n bytes of a kU8 input (already quantized) to dst as stored u8 bytes (q ^ vx, vx = flip ^ 0x80
// repeated); the NaN byte anywhere sets nan.
inline void copy_u8(const uint8_t* src, int64_t n, uint8_t* dst, __m512i vx, bool* nan) {
    __mmask64 bad = 0;
    for (int64_t c = 0; c < n; c += 64) {
        const __mmask64 mk = n - c >= 64 ? ~__mmask64(0) : (__mmask64(1) << (n - c)) - 1;
        const __m512i b = _mm512_maskz_loadu_epi8(mk, src + c);
        bad |= _mm512_mask_cmpeq_epi8_mask(mk, b, _mm512_set1_epi8(char(kU8NaN)));
        _mm512_mask_storeu_epi8(dst + c, mk, _mm512_xor_si512(b, vx));
    }
    *nan = *nan || bad != 0;
}

// A row of a kU8 input (gather_quantize's rule): u8 with scale kU8Scale, or the NaN row.
inline void finish_u8_row(bool nan, uint8_t flip, uint8_t* row, int64_t kp, float* sa, uint8_t* u8) {
    *sa = nan ? __builtin_nanf("") : kU8Scale;
    *u8 = !nan;
    if (nan) std::memset(row, flip, size_t(kp));
}

// gather_quantize for a 1x1 conv without padding (MobileNet's and ResNet's pointwise layers): each
// row is one input pixel's channels of the group, no taps to clip.
void pointwise_rows(const ConvGeom& g, int64_t cg, int64_t group, int64_t m0, int64_t m1, uint8_t flip,
                    uint8_t* tile, int64_t kp, float* sa, uint8_t* u8) {
    const int64_t pix = g.oh * g.ow;
    const uint8_t* x = static_cast<const uint8_t*>(g.x);
    const size_t e = dtype_bytes(g.dt);
    const bool direct = g.sh == 1 && g.sw == 1 && g.oh == g.h && g.ow == g.w;
    for (int64_t m = m0; m < m1; ++m) {
        const int64_t p = direct ? m : (m / pix * g.h + m % pix / g.ow * g.sh) * g.w + m % g.ow * g.sw;
        const void* src = x + size_t(p * g.c + group * cg) * e;
        uint8_t* row = tile + (m - m0) * kp;
        if (direct) {  // the rows stream from memory: ask for the one kAhead rows on now
            constexpr int64_t kAhead = 6;
            const char* next = static_cast<const char*>(src) + size_t(kAhead * g.c) * e;
            for (size_t off = 0; off < size_t(cg) * e; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
        }
        if (g.dt == DType::kU8) {
            const uint8_t f = flip ^ 0x80;
            bool nan = false;
            copy_u8(static_cast<const uint8_t*>(src), cg, row, _mm512_set1_epi8(char(f)), &nan);
            std::memset(row + cg, f, size_t(kp - cg));
            finish_u8_row(nan, flip, row, kp, sa + (m - m0), u8 + (m - m0));
            continue;
        }
        RowRange range;
        for (int64_t c = 0; c < cg; c += 16) {
            const __mmask16 mk = tail_mask(cg - c);
            range.add(load_x16(src, g.dt, c, mk), mk);
        }
        const RowQuant rq(range, flip, sa + (m - m0), u8 + (m - m0));
        if (!rq.ok) {
            std::memset(row, flip, size_t(kp));
            continue;
        }
        int64_t c = 0;
        for (; c < cg; c += 16) {  // lanes past cg get the stored zero: the row's padding up to the next 16
            const __mmask16 mk = tail_mask(cg - c);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(row + c),
                             _mm_mask_mov_epi8(rq.vflip, mk, rq.bytes(load_x16(src, g.dt, c, mk))));
        }
        for (; c < kp; c += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(row + c), rq.vflip);
    }
}

}  // namespace

void gather_quantize(const ConvGeom& g, int64_t cg, int64_t group, int64_t m0, int64_t m1, uint8_t flip,
                     uint8_t* tile, int64_t kp, float* sa, uint8_t* u8) {
    if (g.kh == 1 && g.kw == 1 && g.ph == 0 && g.pw == 0 && (g.oh - 1) * g.sh < g.h && (g.ow - 1) * g.sw < g.w) {
        pointwise_rows(g, cg, group, m0, m1, flip, tile, kp, sa, u8);
        return;
    }
    const int64_t pix = g.oh * g.ow, k = g.kh * g.kw * cg;
    const uint8_t* x = static_cast<const uint8_t*>(g.x);
    const size_t e = dtype_bytes(g.dt);
    // One group and no dilation across the row: the taps kx0..kx1 of one ky are one contiguous span
    // of (kx1 - kx0) * c values in NHWC memory, gathered as one run (a 7x7 stem conv of 3 channels:
    // 7 runs of 21 values instead of 49 of 3).
    const bool spans = cg == g.c && g.dw == 1;
    for (int64_t m = m0; m < m1; ++m) {
        const int64_t img = m / pix, oy = m % pix / g.ow, ox = m % g.ow;
        uint8_t* row = tile + (m - m0) * kp;
        int64_t ky0, ky1, kx0, kx1;
        tap_range(oy * g.sh - g.ph, g.dh, g.kh, g.h, &ky0, &ky1);
        tap_range(ox * g.sw - g.pw, g.dw, g.kw, g.w, &kx0, &kx1);
        const int64_t runs = spans ? 1 : kx1 - kx0, run = spans ? (kx1 - kx0) * cg : cg;
        // run r of row ky: its source and its offset in the row
        auto src = [&](int64_t ky, int64_t r) {
            const int64_t iy = oy * g.sh - g.ph + ky * g.dh, ix = ox * g.sw - g.pw + (kx0 + r) * g.dw;
            return x + size_t(((img * g.h + iy) * g.w + ix) * g.c + group * cg) * e;
        };
        auto dst_off = [&](int64_t ky, int64_t r) { return (ky * g.kw + kx0 + r) * cg; };
        // the input streams from memory: the bottom tap row of the pixel kAhead columns on
        if (ky1 > ky0 && ox + 4 < g.ow) {
            const int64_t iy = oy * g.sh - g.ph + (ky1 - 1) * g.dh, ix = (ox + 4) * g.sw - g.pw + (g.kw - 1) * g.dw;
            if (ix < g.w) {
                const char* p = reinterpret_cast<const char*>(x + size_t(((img * g.h + iy) * g.w + ix) * g.c + group * cg) * e);
                for (size_t off = 0; off < size_t(cg) * e; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
            }
        }
        if (g.dt == DType::kU8) {
            const uint8_t f = flip ^ 0x80;
            bool nan = false;
            std::memset(row, f, size_t(kp));
            for (int64_t ky = ky0; ky < ky1; ++ky)
                for (int64_t r = 0; r < runs; ++r)
                    copy_u8(static_cast<const uint8_t*>(src(ky, r)), run, row + dst_off(ky, r), _mm512_set1_epi8(char(f)), &nan);
            finish_u8_row(nan, flip, row, kp, sa + (m - m0), u8 + (m - m0));
            continue;
        }
        RowRange range;
        for (int64_t ky = ky0; ky < ky1; ++ky)
            for (int64_t r = 0; r < runs; ++r) {
                const void* p = src(ky, r);
                for (int64_t c = 0; c < run; c += 16) {
                    const __mmask16 mk = tail_mask(run - c);
                    range.add(load_x16(p, g.dt, c, mk), mk);
                }
            }
        const RowQuant rq(range, flip, sa + (m - m0), u8 + (m - m0));
        if (!rq.ok) {
            std::memset(row, flip, size_t(kp));
            continue;
        }
        // the stored zero everywhere first where taps fall outside the image, then the runs
        if (ky1 - ky0 < g.kh || kx1 - kx0 < g.kw) std::memset(row, rq.f, size_t(k));
        for (int64_t ky = ky0; ky < ky1; ++ky)
            for (int64_t r = 0; r < runs; ++r) {
                const void* p = src(ky, r);
                uint8_t* dst = row + dst_off(ky, r);
                for (int64_t c = 0; c < run; c += 16) {
                    const __mmask16 mk = tail_mask(run - c);
                    _mm_mask_storeu_epi8(dst + c, mk, rq.bytes(load_x16(p, g.dt, c, mk)));
                }
            }
        std::memset(row + k, rq.f, size_t(kp - k));
    }
}

ValueRange range(const void* x, DType dt, int64_t n) {
    RowRange acc;
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = tail_mask(n - i);
        acc.add(load_x16(x, dt, i, mk), mk);
    }
    ValueRange r;
    r.amax = _mm512_reduce_max_ps(acc.vmax);
    r.finite = acc.bad == 0;
    r.nonneg = acc.neg == 0;
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
    auto pixel = [&](int64_t img, int64_t oy, int64_t ox, int64_t m, int64_t c0, int64_t nb) {
        if (a.u8) {
            switch (nb) {
                case 4: dw_pixel<4, true>(a, img, oy, ox, m, c0); break;
                case 3: dw_pixel<3, true>(a, img, oy, ox, m, c0); break;
                case 2: dw_pixel<2, true>(a, img, oy, ox, m, c0); break;
                default: dw_pixel<1, true>(a, img, oy, ox, m, c0); break;
            }
        } else {
            switch (nb) {
                case 4: dw_pixel<4, false>(a, img, oy, ox, m, c0); break;
                case 3: dw_pixel<3, false>(a, img, oy, ox, m, c0); break;
                case 2: dw_pixel<2, false>(a, img, oy, ox, m, c0); break;
                default: dw_pixel<1, false>(a, img, oy, ox, m, c0); break;
            }
        }
    };
    dw_rows(a, r0, r1, pixel);
}

void depthwise_f32(const DepthwiseArgs& a, int64_t r0, int64_t r1) {
    constexpr int64_t kS = 8;
    const ConvGeom& g = a.g;
    StripRows rows_kernel = nullptr;  // the common geometries: each input widened once per tap row
    if (g.dw == 1) {
        rows_kernel = g.dt == DType::kF32 ? strip_rows_for<kS, DType::kF32>(g)
                    : g.dt == DType::kU8  ? strip_rows_for<kS, DType::kU8>(g)
                                          : strip_rows_for<kS, DType::kBF16>(g);
    }
    const char* base = static_cast<const char*>(g.x);
    const size_t e = dtype_bytes(g.dt);
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t img = r / g.oh, oy = r % g.oh;
        const int64_t bottom = oy * g.sh - g.ph + (g.kh - 1) * g.dh;
        for (int64_t ox0 = 0; ox0 < g.ow; ox0 += kS) {
            // prefetch what the next strip is the first to read: its bottom sh rows, its columns
            const int64_t hi = std::min(g.w - 1, (ox0 + 2 * kS - 1) * g.sw - g.pw + (g.kw - 1) * g.dw);
            const int64_t lo = std::max<int64_t>(0, (ox0 + kS) * g.sw - g.pw + (g.kw - 1) * g.dw - kS * g.sw + 1);
            for (int64_t iy = std::max<int64_t>(0, bottom - g.sh + 1); iy <= std::min(g.h - 1, bottom); ++iy)
                for (int64_t ix = lo; ix <= hi; ++ix) {
                    const char* p = base + size_t(((img * g.h + iy) * g.w + ix) * g.c) * e;
                    for (size_t off = 0; off < size_t(g.c) * e; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
                }
            const int64_t nx = std::min(kS, g.ow - ox0);
            if (rows_kernel) {
                for (int64_t c0 = 0; c0 < g.c; c0 += 16) rows_kernel(a, img, oy, ox0, nx, c0);
                continue;
            }
            for (int64_t c0 = 0; c0 < g.c; c0 += 32) {
                if (g.c - c0 > 16)
                    dwf_strip<kS, 2>(a, img, oy, ox0, nx, c0);
                else
                    dwf_strip<kS, 1>(a, img, oy, ox0, nx, c0);
            }
        }
    }
    if (a.ep.stream) _mm_sfence();  // the non-temporal stores visible before the task ends
}

}  // namespace fastinfer::cpu::avx512_vnni
