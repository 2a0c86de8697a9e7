// Parallel loops on torch's own OpenMP team (DESIGN.md, "Threads"): the extension links
// libgomp.so.1 by soname and torch is imported first, so both share one runtime and one set of
// worker threads. A pool of our own fought torch's spinning workers for the cores (an Int8Linear
// right after a torch op ran 2.3-2.8x slower than alone).
#pragma once

#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (SSE: baseline x86-64)
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

namespace fastinfer::cpu {

// Threads of the next parallel loop: the count pinned by set_num_threads, else the calling
// thread's omp_get_max_threads() (what torch.set_num_threads sets).
int num_threads();
void set_num_threads(int n);  // n >= 1 pins the count; n == 0 follows omp_get_max_threads() again
// True in a process forked from the one that loaded us: there every loop runs on one thread.
bool in_forked_child();

// The shared object our OpenMP symbols resolve to (e.g. torch/lib/libgomp.so.1), and every OpenMP
// runtime mapped into the process (libgomp, libiomp5, libomp), separated by ':'.
std::string openmp_library();
std::string openmp_libraries_loaded();

// The caller's floating-point mode (MXCSR: flush-to-zero, denormals-are-zero, rounding), carried
// into every worker of a loop for as long as the loop runs and the worker's own mode put back after
// (the workers are torch's: its later parallel ops must not inherit ours). Without it a process
// that set torch.set_flush_denormal(True) got results that depended on the thread count: the
// caller flushed subnormals, the workers did not.
class FpMode {
   public:
#if defined(__x86_64__) || defined(__i386__)
    FpMode() : csr_(_mm_getcsr() & ~0x3Fu) {}  // without the sticky exception flags
    // In a worker: adopt the caller's mode until the scope ends.
    class Scope {
       public:
        explicit Scope(const FpMode& m) : saved_(_mm_getcsr()), changed_((saved_ & ~0x3Fu) != m.csr_) {
            if (changed_) _mm_setcsr(m.csr_);
        }
        ~Scope() {
            if (changed_) _mm_setcsr(saved_);
        }
        Scope(const Scope&) = delete;
        Scope& operator=(const Scope&) = delete;

       private:
        unsigned saved_;
        bool changed_;
    };

   private:
    unsigned csr_;
#else
    class Scope {
       public:
        explicit Scope(const FpMode&) {}
    };
#endif
};

// Runs fn(task) once for every task in [0, ntasks) on up to num_threads() threads, the caller
// included. Tasks are claimed in order from one counter, so which thread runs a task never
// changes what it computes. Inside another parallel region (or with one thread or one task) the
// loop runs on the calling thread. fn must not throw.
template <class F>
void parallel_for(int64_t ntasks, F&& fn) {
    if (ntasks <= 0) return;
    const int nt = int(std::min<int64_t>(num_threads(), ntasks));
    if (nt <= 1 || omp_in_parallel()) {
        for (int64_t t = 0; t < ntasks; ++t) fn(t);
        return;
    }
    std::atomic<int64_t> next{0};
    const FpMode mode;
#pragma omp parallel num_threads(nt)
    {
        const FpMode::Scope fp(mode);
        for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) fn(t);
    }
}

// Runs fn(thread, nthreads) on exactly nt threads at once, one call each (the machine-limit probes:
// every thread must be busy for the whole measurement). fn must not throw.
template <class F>
void parallel_threads(int nt, F&& fn) {
    if (nt <= 1 || omp_in_parallel()) {
        fn(0, 1);
        return;
    }
    const FpMode mode;
#pragma omp parallel num_threads(nt)
    {
        const FpMode::Scope fp(mode);
        fn(omp_get_thread_num(), omp_get_num_threads());
    }
}

}  // namespace fastinfer::cpu
