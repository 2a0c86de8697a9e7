// The format registry and the helpers every format file shares.
#include "cpu/formats/sparse/common.h"

#include <cstring>
#include <string>

#include "cpu/formats/sparse/traits.h"

namespace fastinfer::cpu {

const FormatTraits* format_traits(uint32_t fmt) {
    static const FormatTraits* const all[] = {&kCsrF32Traits, &kCsrI8Traits, &kNm24Traits,
                                              &kBlockTraits,  &kEllI8Traits, &kEllF32Traits};
    for (const FormatTraits* f : all)
        if (uint32_t(f->fmt) == fmt) return f;
    return nullptr;
}

void decompress_panel(const SparseView& v, int64_t nb, int8_t* out) {
    std::memset(out, 0, size_t(kNBlock * v.kp));
    format_traits(uint32_t(v.fmt))->panel(v, nb, out);
}

namespace sparse_detail {

void fill_colsum(const int8_t* w, int64_t n, int64_t k, int64_t ldw, int64_t np, int32_t* colsum) {
    for (int64_t r = 0; r < np; ++r) {
        uint32_t s = 0;
        if (r < n)
            for (int64_t c = 0; c < k; ++c) s += uint32_t(int32_t(w[r * ldw + c]));
        colsum[r] = int32_t(s);
    }
}

Status check_monotonic(const int64_t* ptr, int64_t count, const char* what) {
    for (int64_t i = 0; i < count; ++i)
        if (ptr[i + 1] < ptr[i]) return Status::invalid(std::string("sparse weight: corrupt ") + what);
    return Status::ok();
}

Status check_colsum(const SparseView& v, const std::vector<uint32_t>& colsum) {
    for (int64_t r = 0; r < v.np; ++r)
        if (uint32_t(v.colsum[r]) != colsum[size_t(r)])
            return Status::invalid("sparse weight: stored column sums do not match the stored values");
    return Status::ok();
}

}  // namespace sparse_detail
}  // namespace fastinfer::cpu
