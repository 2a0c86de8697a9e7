// Size checks, scratch, the work split and the activation buffers shared by the entry points.
#include <algorithm>
#include <cstring>
#include <string>

#include "cpu/api/internal.h"
#include "cpu/engine.h"
#include "cpu/runtime/threads.h"

namespace fastinfer::cpu {

Status check_dims(int64_t m, int64_t k, int64_t ld, const char* what) {
    if (m < 0 || k < 0) return Status::invalid(std::string(what) + ": negative size");
    if (m > kMaxDim || k > kMaxDim) return Status::invalid(std::string(what) + ": size too large");
    if (m > 0 && ld < k) return Status::invalid(std::string(what) + ": row stride smaller than K");
    int64_t span;  // elements from the first to the last one read: must be addressable
    if (m > 0 && (__builtin_mul_overflow(m - 1, ld, &span) || span > kMaxDim * 256))
        return Status::invalid(std::string(what) + ": rows times row stride too large");
    return Status::ok();
}

Status apply_activation(float* y, int64_t n, int act) {
    if (n < 0) return Status::invalid("apply_activation: negative size");
    if (!valid_act(act)) return Status::invalid("apply_activation: unknown activation code " + std::to_string(act));
    for (int64_t i = 0; act != kActNone && i < n; ++i) y[i] = act_f32(y[i], act);
    return Status::ok();
}

Status erf_f32_values(const float* x, float* out, int64_t n) {
    if (n < 0) return Status::invalid("erf_f32: negative size");
    for (int64_t i = 0; i < n; ++i) out[i] = erf_f32(x[i]);
    return Status::ok();
}

namespace detail {

thread_local Scratch t_scratch;

// Row blocks of MR-multiples and groups of up to 4 channel blocks, spread over the threads.
// Small M: one task per channel group covers every row, so each weight byte is read once.
Status check_linear_io(const char* name, DType dt, DType out_dt, int act) {
    if (dt != DType::kF32 && dt != DType::kBF16) return Status::invalid(std::string(name) + ": x must be float32 or bfloat16");
    if (out_dt != DType::kF32 && out_dt != DType::kBF16)
        return Status::invalid(std::string(name) + ": out must be float32 or bfloat16");
    if (!valid_act(act)) return Status::invalid(std::string(name) + ": unknown activation code " + std::to_string(act));
    return Status::ok();
}

WorkSplit work_split(int64_t m, int64_t nblocks, int64_t many_rows) {
    WorkSplit s;
    // Few rows: about 4 tasks per thread (each task's claim and loop setup costs ~1 us: 10% of a
    // 90%-sparse 4096 x 4096 layer at M = 1 with 4-block tasks); more rows: 4 blocks per task.
    s.group = m <= 24 ? std::max<int64_t>(4, nblocks / (4 * int64_t(num_threads()))) : 4;
    s.ngroups = (nblocks + s.group - 1) / s.group;
    s.mchunk = m <= 24 ? std::max<int64_t>(m, 1) : many_rows;
    s.nmchunks = (m + s.mchunk - 1) / s.mchunk;
    return s;
}

// Scratch for activations (m rows of kp bytes) and their scales, from this thread's buffer.
Status prepare_activations(int64_t m, int64_t kp, int8_t** q, float** sa) {
    const size_t qbytes = size_t(round_up(m * kp, 64));
    uint8_t* base = t_scratch.get(qbytes + size_t(m) * sizeof(float) + 64);
    if (!base) return Status::runtime("out of memory for activation scratch");
    *q = reinterpret_cast<int8_t*>(base);
    *sa = reinterpret_cast<float*>(base + qbytes);
    return Status::ok();
}

void copy_activations(const int8_t* a, int64_t m, int64_t k, int64_t lda, int8_t* q, int64_t kp, bool shift) {
    const uint8_t flip = shift ? 0x80 : 0;
    for (int64_t r = 0; r < m; ++r) {
        uint8_t* dst = reinterpret_cast<uint8_t*>(q + r * kp);
        const uint8_t* src = reinterpret_cast<const uint8_t*>(a + r * lda);
        for (int64_t c = 0; c < k; ++c) dst[c] = src[c] ^ flip;
        std::memset(dst + k, flip, size_t(kp - k));
    }
}

void quantize_activations(const KernelTable& kt, const void* x, DType dt, int64_t m, int64_t k, int64_t ldx,
                          int8_t* q, int64_t kp, float* sa, bool shift) {
    const int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
    parallel_for((m + rows - 1) / rows, [&](int64_t t) {
        kt.quantize_rows(x, dt, ldx, t * rows, std::min(m, (t + 1) * rows), k, q, kp, kp, sa, shift);
    });
}

}  // namespace detail
}  // namespace fastinfer::cpu
