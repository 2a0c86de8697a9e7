// Shared by the entry points of csrc/cpu/api/ (baseline flags): per-thread scratch, the work split
// over threads, and the activation buffers every int8 GEMM reads.
#pragma once

#include <cstdlib>
#include <memory>

#include "cpu/common.h"
#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::detail {

// 64-byte aligned scratch, grown on demand and reused across calls.
struct Scratch {
    struct Free {
        void operator()(void* p) const { std::free(p); }
    };
    std::unique_ptr<uint8_t, Free> buf;
    size_t size = 0;
    uint8_t* get(size_t n) {  // never null for n == 0 unless out of memory
        if (n > size || !buf) {
            size_t cap = size_t(round_up(int64_t(n > 0 ? n : 1), 4096));
            buf.reset(static_cast<uint8_t*>(std::aligned_alloc(64, cap)));
            size = buf ? cap : 0;
        }
        return buf.get();
    }
};
extern thread_local Scratch t_scratch;  // the calling thread's activation buffer

// Outputs at least this large are written with non-temporal stores (Epilogue::stream): more than
// half the L3 of the machines here, so their reader finds them in DRAM either way.
constexpr size_t kStreamBytes = size_t(16) << 20;
// How a GEMM over m rows and nblocks 16-channel blocks is cut into parallel_for tasks: task t covers row
// chunk t % nmchunks and blocks [g * group, (g + 1) * group) for g = t / nmchunks.
struct WorkSplit {
    int64_t group, ngroups, mchunk, nmchunks;
    int64_t m0(int64_t t) const { return t % nmchunks * mchunk; }
    int64_t nb0(int64_t t) const { return t / nmchunks * group; }
};
// The dtypes and activation code of a float-in, float-out linear entry (int8_linear,
// weight_only_linear, sparse_int8_linear): fp32/bf16 in and out, a valid_act code.
Status check_linear_io(const char* name, DType dt, DType out_dt, int act);
// many_rows: the row chunk when m > 24 (the int8 kernels 96; fp32 ell 48, its rows are 4x wider).
WorkSplit work_split(int64_t m, int64_t nblocks, int64_t many_rows = 96);
// m rows of kp bytes (64-byte aligned) and m floats, from t_scratch.
Status prepare_activations(int64_t m, int64_t kp, int8_t** q, float** sa);
// Copies int8 a [m, k] (row stride lda) into q (rows of kp bytes, zero padded), XOR 0x80 when shift.
void copy_activations(const int8_t* a, int64_t m, int64_t k, int64_t lda, int8_t* q, int64_t kp, bool shift);
// Quantizes x [m, k] into q (rows of kp bytes, zero padded; shifted to u8 when shift) with kt's kernel.
void quantize_activations(const KernelTable& kt, const void* x, DType dt, int64_t m, int64_t k, int64_t ldx,
                          int8_t* q, int64_t kp, float* sa, bool shift);

}  // namespace fastinfer::cpu::detail
