// kCsrF32 / kCsrI8: unstructured, row-compressed. Sections: rowptr int64 [n+1], column indices
// (uint16 when K <= 65536, else int32) [nnz], values (fp32 or int8) [nnz].
#pragma once

#include "cpu/formats/sparse/header.h"

namespace fastinfer::cpu {
namespace {  // like common.h's helpers: ISA files include this header too

// Column of stored nonzero j.
inline int64_t csr_col(const SparseView& w, int64_t j) {
    return w.idx_bytes == 2 ? int64_t(static_cast<const uint16_t*>(w.idx)[j])
                            : int64_t(static_cast<const int32_t*>(w.idx)[j]);
}

}  // namespace
}  // namespace fastinfer::cpu
