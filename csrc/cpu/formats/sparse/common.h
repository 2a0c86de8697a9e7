// Helpers shared by the format files (baseline code only: the ISA kernels never include this).
#pragma once

#include <vector>

#include "cpu/formats/sparse/header.h"

namespace fastinfer::cpu::sparse_detail {

constexpr int64_t a64(int64_t x) { return round_up(x, 64); }

template <class T>
bool nonzero(const T* w, int64_t ldw, int64_t r, int64_t c) {
    return w[r * ldw + c] != T(0);  // -0.0 == 0: a negative zero is not stored
}

// colsum[r] = sum of int8 row r of w (mod 2^32, like the kernels' int32 accumulation); 0 for r >= n.
void fill_colsum(const int8_t* w, int64_t n, int64_t k, int64_t ldw, int64_t np, int32_t* colsum);

// A stored fp32 weight must be finite: sparse_pack refuses NaN and Inf, so a buffer holding one
// was not written by it (and the kernels' sums would depend on the order of their adds).
inline bool finite_f32(float v) { return v - v == 0.f; }

// Pointers [0, count] of a pointer section never decrease (checked before anything walks them).
Status check_monotonic(const int64_t* ptr, int64_t count, const char* what);

// Every stored nonzero of a row (or channel, or block) must come at a larger column than the one
// before it, in storage order (what sparse_pack writes): otherwise the kernels would add two values
// for one weight where unpack keeps one.
class ColumnOrder {
   public:
    explicit ColumnOrder(int64_t rows) : last_(size_t(rows), -1) {}
    bool next(int64_t r, int64_t col) {
        if (col <= last_[size_t(r)]) return false;
        last_[size_t(r)] = col;
        return true;
    }

   private:
    std::vector<int64_t> last_;
};

// The column sums recomputed from the stored values (mod 2^32) against the stored ones: every ISA
// path (the VNNI kernels subtract 128 * colsum) and unpack then agree.
Status check_colsum(const SparseView& v, const std::vector<uint32_t>& colsum);

}  // namespace fastinfer::cpu::sparse_detail
