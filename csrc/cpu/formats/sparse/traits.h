// A sparse format is a traits object (ggml's tensor_traits): everything the generic code of
// api/sparse_buffers.cpp and api/sparse.cpp needs from a format, so adding one touches its own
// files, its line in format_traits() (common.cpp) and, where it has SIMD kernels, the kernel table.
// The members in aggregate order: each format file spells its traits out in one initializer.
#pragma once

#include "cpu/dispatch/kernel_table.h"
#include "cpu/formats/sparse/header.h"

namespace fastinfer::cpu {

// Which driver of api/sparse.cpp runs a format's products.
enum class SparseRun { kCsrF32, kEllF32, kCsrI8, kPanels };

struct FormatTraits {
    SparseFormat fmt = SparseFormat::kCsrF32;
    bool int8 = false;            // int8 values (sparse_int8_matmul / _linear), else fp32 (sparse_linear_f32)
    bool reads_version1 = false;  // buffers of version 1 have this format's current layout
    SparseRun run = SparseRun::kCsrF32;
    // kPanels: the kernel table's slot for the format; a null slot runs panel() on the dense gemm.
    SparseGemmKernel* KernelTable::*kernel = nullptr;

    // Fills the format's header fields (idx_bytes, nnz, flags) for w [h->n, h->k] (row stride ldw;
    // the shared fields are set). Fails when w does not fit the format.
    Status (*plan)(const void* w, int64_t ldw, SparseHeader* h) = nullptr;
    // The section offsets, from off (the end of the header) on, and the total size.
    void (*layout)(const SparseHeader& h, int64_t off, SparseLayout* l) = nullptr;
    // The format's own header fields agree with the shared ones (O(1), before layout() is trusted).
    bool (*header_ok)(const SparseHeader& h) = nullptr;
    // Writes the sections of w into out (zeroed, header already written).
    void (*pack)(const void* w, int64_t ldw, const SparseHeader& h, const SparseLayout& l, uint8_t* out) = nullptr;
    // Points v at the sections; O(1) checks of the pointer sections' ends.
    Status (*view)(const uint8_t* buf, const SparseLayout& l, SparseView* v) = nullptr;
    // Everything the kernels trust beyond the header (pointers monotonic, indices in range, each
    // weight stored once, colsum equal to the stored values): O(stored bytes).
    Status (*validate)(const SparseView& v) = nullptr;
    // Dense [n, k] (contiguous) of a validated view. Null for the kPanels formats: unpacked through panel.
    void (*unpack)(const SparseView& v, void* w) = nullptr;
    // kPanels: the nonzeros of 16-channel block nb into its zeroed K4N16 panel (16 * kp bytes).
    void (*panel)(const SparseView& v, int64_t nb, int8_t* out) = nullptr;
    // Nonzero weights of a validated view, read from its stored values only: O(stored bytes), no
    // memory (validation guarantees every stored nonzero is one weight inside [n, k]).
    int64_t (*count_nonzero)(const SparseView& v) = nullptr;
};

// The traits of format code fmt (a header's format field), null when there is no such format.
const FormatTraits* format_traits(uint32_t fmt);

// Block nb of a kPanels format as its dense K4N16 panel (16 * kp bytes): the portable decompress
// of every kernel table (a PanelKernel) and of unpack.
void decompress_panel(const SparseView& v, int64_t nb, int8_t* out);

// One per format (its .cpp file); format_traits() lists them.
extern const FormatTraits kCsrF32Traits, kCsrI8Traits, kNm24Traits, kBlockTraits, kEllI8Traits, kEllF32Traits;

}  // namespace fastinfer::cpu
