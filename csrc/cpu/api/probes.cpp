// Machine-limit probes for the benchmarks, run on every thread at once (engine.h).
#include <atomic>

#include "cpu/dispatch/kernel_table.h"
#include "cpu/engine.h"
#include "cpu/runtime/threads.h"

namespace fastinfer::cpu {

Status dot_peak(int64_t iters, int64_t* macs) {
    const KernelTable& kt = active_kernels();  // the active ISA's dot instruction
    if (!kt.dot_peak) return Status::invalid("dot_peak: needs avx2 or higher");
    const int nt = num_threads();
    std::atomic<int64_t> sink{0}, calls{0};  // the checksums keep the probe loops alive
    parallel_threads(nt, [&](int, int) {
        sink += kt.dot_peak(iters);
        calls += 1;
    });
    *macs = calls.load() * iters * kt.dot_peak_macs;
    return Status::ok();
}

Status read_bandwidth(const uint8_t* buf, int64_t nbytes, int64_t repeats, int64_t* bytes) {
    const KernelTable& kt = machine_kernels();  // a property of the machine, whatever the ISA cap
    if (!kt.read_sum) return Status::invalid("read_bandwidth: needs AVX-512");
    const int nt = num_threads();
    const int64_t share = nbytes / nt / 256 * 256;
    if (share <= 0 || reinterpret_cast<uintptr_t>(buf) % 64 != 0)
        return Status::invalid("read_bandwidth: buffer too small or not 64-byte aligned");
    std::atomic<int64_t> sink{0}, calls{0};  // the checksums keep the probe loops alive
    parallel_threads(nt, [&](int t, int) {
        for (int64_t r = 0; r < repeats; ++r) sink += kt.read_sum(buf + t * share, share);
        calls += 1;
    });
    *bytes = share * calls.load() * repeats;
    return Status::ok();
}

}  // namespace fastinfer::cpu
