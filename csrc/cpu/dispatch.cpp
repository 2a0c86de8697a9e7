// Validation, scratch buffers, work split over the thread pool, and the per-call ISA ladder
// (avx512_vnni -> avx2 -> ref).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "cpu/runtime/cpu_features.h"
#include "cpu/engine.h"
#include "cpu/internal.h"
#include "cpu/runtime/threads.h"

namespace fastinfer::cpu {
namespace detail {

std::atomic<int> g_isa_cap{int(Isa::kAmx)};

// Largest K for which the int32 accumulator is exact for any int8 data (|sum| <= 2^17*127*128 < 2^31
// with weights in [-127, 127]); results are exact mod 2^32 beyond it, like a wrapping int32 matmul.
constexpr int64_t kMaxDim = int64_t(1) << 40;


Kernels kernels_for(Isa isa) {
    switch (isa) {
        case Isa::kAmx:
        case Isa::kAvx512Vnni: return {avx512_vnni::quantize_rows, avx512_vnni::gemm, true};
        case Isa::kAvx2: return {avx2::quantize_rows, avx2::gemm, false};
        default: return {ref::quantize_rows, ref::gemm, false};
    }
}

thread_local Scratch t_scratch;

Status check_dims(int64_t m, int64_t k, int64_t ld, const char* what) {
    if (m < 0 || k < 0) return Status::invalid(std::string(what) + ": negative size");
    if (m > kMaxDim || k > kMaxDim) return Status::invalid(std::string(what) + ": size too large");
    if (m > 0 && ld < k) return Status::invalid(std::string(what) + ": row stride smaller than K");
    return Status::ok();
}

// Row blocks of MR-multiples and groups of up to 4 channel blocks, spread over the pool.
// Small M: one task per channel group covers every row, so each weight byte is read once.
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

void run_gemm(const Kernels& kr, const Activations& a, const PackedW& w, const Epilogue& ep) {
    const int64_t nblocks = w.np / kNBlock;
    const WorkSplit s = work_split(a.m, nblocks);
    parallel_for(s.ngroups * s.nmchunks, [&](int64_t t) {
        const int64_t m0 = s.m0(t), nb0 = s.nb0(t);
        kr.gemm(a, w, ep, m0, std::min(a.m, m0 + s.mchunk), nb0, std::min(nblocks, nb0 + s.group));
    });
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

void quantize_activations(const Kernels& kr, const void* x, DType dt, int64_t m, int64_t k,
                          int64_t ldx, int8_t* q, int64_t kp, float* sa) {
    const int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
    parallel_for((m + rows - 1) / rows, [&](int64_t t) {
        kr.quantize_rows(x, dt, ldx, t * rows, std::min(m, (t + 1) * rows), k, q, kp, kp, sa, kr.shift_u8);
    });
}

// Checks shared by every GEMM entry: sizes, the packed weight's header, K and the output stride.
Status check_gemm(const char* name, int64_t m, int64_t k, int64_t ldx, const uint8_t* packed,
                  int64_t nbytes, int64_t ldo, PackedW* w) {
    Status st = check_dims(m, k, ldx, name);
    if (!st.is_ok()) return st;
    if (!(st = view_packed(packed, nbytes, w)).is_ok()) return st;
    if (w->k != k) return Status::invalid(std::string(name) + ": K of the input and the weight differ");
    if (m > 0 && ldo < w->n) return Status::invalid(std::string(name) + ": out row stride smaller than N");
    return Status::ok();
}

}  // namespace detail

using namespace detail;

Isa active_isa() {
    int cap = g_isa_cap.load(std::memory_order_relaxed);
    int det = int(detected_isa());
    return Isa(cap < det ? cap : det);
}

Status set_isa_cap(int isa) {
    if (isa < 0 || isa > int(detected_isa()))
        return Status::invalid("ISA not supported on this CPU");
    g_isa_cap.store(isa);
    return Status::ok();
}

Status pack_weight(const int8_t* w, int64_t n, int64_t k, int64_t ldw, uint8_t* out,
                   int64_t out_nbytes) {
    Status st = check_dims(n, k, ldw, "pack_weight");
    if (!st.is_ok()) return st;
    if (out_nbytes != packed_nbytes(n, k))
        return Status::invalid("pack_weight: output buffer has the wrong size");
    PackHeader h{};
    h.magic = kPackMagic;
    h.version = kPackVersion;
    h.layout = kLayoutK4N16;
    h.n = n;
    h.k = k;
    h.np = round_up(n, kNBlock);
    h.kp = round_up(k, kKAlign);
    std::memcpy(out, &h, sizeof(h));
    auto* colsum = reinterpret_cast<int32_t*>(out + sizeof(h));
    int8_t* data = reinterpret_cast<int8_t*>(out + sizeof(h) + 4 * h.np);
    std::memset(data, 0, size_t(h.np * h.kp));
    for (int64_t r = 0; r < h.np; ++r) {
        int32_t s = 0;
        if (r < n) {
            int8_t* blk = data + (r / kNBlock) * kNBlock * h.kp;
            const int64_t j = r % kNBlock;
            for (int64_t c = 0; c < k; ++c) {
                const int8_t v = w[r * ldw + c];
                blk[(c / 4) * 64 + j * 4 + (c % 4)] = v;
                s += v;
            }
        }
        colsum[r] = s;
    }
    return Status::ok();
}

Status view_packed(const uint8_t* buf, int64_t nbytes, PackedW* view) {
    if (nbytes < int64_t(sizeof(PackHeader))) return Status::invalid("packed weight: buffer too small");
    PackHeader h;
    std::memcpy(&h, buf, sizeof(h));
    if (h.magic != kPackMagic) return Status::invalid("packed weight: bad magic (not a fastinfer packed weight)");
    if (h.version != kPackVersion)
        return Status::invalid("packed weight: format version " + std::to_string(h.version) +
                               ", this build reads version " + std::to_string(kPackVersion));
    if (h.layout != kLayoutK4N16) return Status::invalid("packed weight: unknown layout");
    if (h.n < 0 || h.k < 0 || h.n > kMaxDim || h.k > kMaxDim || h.np != round_up(h.n, kNBlock) ||
        h.kp != round_up(h.k, kKAlign) || nbytes != packed_nbytes(h.n, h.k))
        return Status::invalid("packed weight: header and buffer size disagree");
    if (reinterpret_cast<uintptr_t>(buf) % 64 != 0)
        return Status::invalid("packed weight: buffer must be 64-byte aligned");
    view->n = h.n;
    view->k = h.k;
    view->np = h.np;
    view->kp = h.kp;
    view->colsum = reinterpret_cast<const int32_t*>(buf + sizeof(h));
    view->data = reinterpret_cast<const int8_t*>(buf + sizeof(h) + 4 * h.np);
    return Status::ok();
}

Status unpack_weight(const uint8_t* buf, int64_t nbytes, int8_t* w) {
    PackedW v;
    Status st = view_packed(buf, nbytes, &v);
    if (!st.is_ok()) return st;
    for (int64_t r = 0; r < v.n; ++r) {
        const int8_t* blk = v.data + (r / kNBlock) * kNBlock * v.kp;
        for (int64_t c = 0; c < v.k; ++c) w[r * v.k + c] = blk[(c / 4) * 64 + (r % kNBlock) * 4 + c % 4];
    }
    return Status::ok();
}

Status quantize_per_token(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, int8_t* q,
                          int64_t ldq, float* scale) {
    Status st = check_dims(m, k, ldx, "quantize_per_token");
    if (!st.is_ok()) return st;
    if (dt != DType::kF32 && dt != DType::kBF16)
        return Status::invalid("quantize_per_token: x must be float32 or bfloat16");
    if (m > 0 && ldq < k) return Status::invalid("quantize_per_token: q row stride smaller than K");
    const Kernels kr = kernels_for(active_isa());
    const int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
    parallel_for((m + rows - 1) / rows, [&](int64_t t) {
        kr.quantize_rows(x, dt, ldx, t * rows, std::min(m, (t + 1) * rows), k, q, ldq, k, scale, false);
    });
    return Status::ok();
}

Status int8_matmul(const int8_t* a, int64_t m, int64_t k, int64_t lda, const uint8_t* packed,
                   int64_t packed_nbytes_, int32_t* out, int64_t ldo) {
    PackedW w;
    Status st = check_gemm("int8_matmul", m, k, lda, packed, packed_nbytes_, ldo, &w);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const Kernels kr = kernels_for(active_isa());
    int8_t* q;
    float* sa;
    if (!(st = prepare_activations(m, w.kp, &q, &sa)).is_ok()) return st;
    copy_activations(a, m, k, lda, q, w.kp, kr.shift_u8);
    const Epilogue ep{DType::kI32, out, ldo, nullptr, nullptr, nullptr};
    run_gemm(kr, Activations{q, m, w.kp}, w, ep);
    return Status::ok();
}

Status int8_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx,
                   const uint8_t* packed, int64_t packed_nbytes_, const float* sw,
                   const float* bias, void* out, DType out_dt, int64_t ldo) {
    if (dt != DType::kF32 && dt != DType::kBF16)
        return Status::invalid("int8_linear: x must be float32 or bfloat16");
    if (out_dt != DType::kF32 && out_dt != DType::kBF16)
        return Status::invalid("int8_linear: out must be float32 or bfloat16");
    PackedW w;
    Status st = check_gemm("int8_linear", m, k, ldx, packed, packed_nbytes_, ldo, &w);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const Kernels kr = kernels_for(active_isa());
    int8_t* q;
    float* sa;
    if (!(st = prepare_activations(m, w.kp, &q, &sa)).is_ok()) return st;
    quantize_activations(kr, x, dt, m, k, ldx, q, w.kp, sa);
    const Epilogue ep{out_dt, out, ldo, sa, sw, bias};
    run_gemm(kr, Activations{q, m, w.kp}, w, ep);
    return Status::ok();
}

Status dot_peak(int64_t iters, int64_t* macs) {
    const Isa isa = active_isa();
    if (isa < Isa::kAvx2) return Status::invalid("dot_peak: needs avx2 or higher");
    const int nt = num_threads();
    std::atomic<int64_t> sink{0}, calls{0};  // the checksums keep the probe loops alive
    parallel_threads(nt, [&](int, int) {
        sink += isa >= Isa::kAvx512Vnni ? avx512_vnni::dot_peak(iters) : avx2::dot_peak(iters);
        calls += 1;
    });
    *macs = calls.load() * iters * (isa >= Isa::kAvx512Vnni ? 24 * 64 : 12 * 16);
    return Status::ok();
}

Status read_bandwidth(const uint8_t* buf, int64_t nbytes, int64_t repeats, int64_t* bytes) {
    if (!cpu_features().avx512f || !cpu_features().avx512bw)
        return Status::invalid("read_bandwidth: needs AVX-512");
    const int nt = num_threads();
    const int64_t share = nbytes / nt / 256 * 256;
    if (share <= 0 || reinterpret_cast<uintptr_t>(buf) % 64 != 0)
        return Status::invalid("read_bandwidth: buffer too small or not 64-byte aligned");
    std::atomic<int64_t> sink{0}, calls{0};  // the checksums keep the probe loops alive
    parallel_threads(nt, [&](int t, int) {
        for (int64_t r = 0; r < repeats; ++r) sink += avx512_vnni::read_sum(buf + t * share, share);
        calls += 1;
    });
    *bytes = share * calls.load() * repeats;
    return Status::ok();
}

}  // namespace fastinfer::cpu
