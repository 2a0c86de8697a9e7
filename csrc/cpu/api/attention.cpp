// The attention entry point: argument checks, the work split (heads x query chunks) and per-thread
// scratch; the table's kernel does the arithmetic (dispatch/kernel_table.h, AttentionArgs).
#include <algorithm>
#include <atomic>
#include <string>

#include "cpu/api/internal.h"
#include "cpu/engine.h"
#include "cpu/runtime/threads.h"

namespace fastinfer::cpu {

using namespace detail;

namespace {

thread_local Scratch t_attention;  // a worker's K^T, V, query rows and scores

Status check(const AttentionArgs& a) {
    auto invalid = [](const std::string& m) { return Status::invalid("attention: " + m); };
    if (a.dt != DType::kF32 && a.dt != DType::kBF16) return invalid("q, k, v must be float32 or bfloat16");
    for (int64_t n : {a.batch, a.heads, a.kv_heads, a.lq, a.lk, a.d, a.dv})
        if (n < 0 || n > kMaxDim) return invalid("a size is negative or too large");
    // head sizes bound the scratch (K^T and V of one head): lk * (d + dv) floats must be addressable
    if (a.d > kMaxHeadDim || a.dv > kMaxHeadDim)
        return invalid("head size above " + std::to_string(kMaxHeadDim));
    if (a.lk > (int64_t(1) << 32)) return invalid("more than 2^32 keys");
    if (a.heads > 0 && (a.kv_heads < 1 || a.heads % a.kv_heads != 0))
        return invalid("heads must be a multiple of kv_heads");
    if (a.mask_kind < kMaskNone || a.mask_kind > kMaskBF16) return invalid("unknown mask kind");
    if ((a.mask_kind == kMaskNone) != (a.mask == nullptr)) return invalid("mask and mask kind disagree");
    return Status::ok();
}

}  // namespace

Status attention(const AttentionArgs& a) {
    Status st = check(a);
    if (!st.is_ok() || a.batch == 0 || a.heads == 0 || a.lq == 0 || a.dv == 0) return st;
    const KernelTable& kt = active_kernels();
    const AttentionLayout l = attention_layout(a);
    // Tasks: one head each, its query rows cut into chunks only when there are too few heads to keep
    // every thread busy (each chunk packs the head's K and V again).
    const int64_t heads = a.batch * a.heads, nt = num_threads();
    int64_t chunks = 1;
    if (heads < 4 * nt) chunks = std::min((4 * nt + heads - 1) / heads, (a.lq + 31) / 32);
    const int64_t rows = round_up((a.lq + chunks - 1) / chunks, 4);
    chunks = (a.lq + rows - 1) / rows;
    std::atomic<bool> oom{false};
    parallel_for(heads * chunks, [&](int64_t t) {
        float* scratch = reinterpret_cast<float*>(t_attention.get(size_t(l.total) * sizeof(float)));
        if (!scratch) {
            oom.store(true, std::memory_order_relaxed);
            return;
        }
        const int64_t q0 = t % chunks * rows;
        kt.attention(a, t / chunks, q0, std::min(a.lq, q0 + rows), scratch);
    });
    if (oom.load()) return Status::runtime("attention: out of memory for the per-thread scratch");
    return Status::ok();
}

}  // namespace fastinfer::cpu
