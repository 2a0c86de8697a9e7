#include "cpu/threadpool.h"

#include <pthread.h>
#include <unistd.h>

#include <chrono>
#include <new>

namespace fastinfer::cpu {
namespace {
inline void cpu_relax() { __builtin_ia32_pause(); }
// Workers spin this long for the next job before sleeping: short enough not to steal a core from
// torch's own threads between our calls, long enough to catch back-to-back layers.
constexpr auto kSpin = std::chrono::microseconds(50);
}  // namespace

ThreadPool& ThreadPool::instance() {
    static ThreadPool* pool = [] {
        auto* p = new ThreadPool();  // never destroyed: workers may outlive statics
        pthread_atfork(nullptr, nullptr, &ThreadPool::atfork_child);
        return p;
    }();
    return *pool;
}

void ThreadPool::atfork_child() { instance().reset_after_fork(); }

// A forked child (a DataLoader worker, multiprocessing with fork) has only the forking thread.
// The pool's workers are gone, and its mutexes and condition variable may be in any state they
// were in at the fork (glibc's condvar keeps waiter counts for threads that no longer exist, so a
// notify there can block for ever). Rebuild them in place; the old thread handles are leaked on
// purpose (joining or destroying them would wait for threads that do not exist).
void ThreadPool::reset_after_fork() {
    new (&workers_) std::vector<std::thread>();
    new (&mu_) std::mutex();
    new (&busy_) std::mutex();
    new (&cv_) std::condition_variable();
    stop_ = false;
    owner_pid_ = getpid();
}

ThreadPool::ThreadPool() = default;
ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::set_num_threads(int n) {
    if (n < 1) n = 1;
    std::lock_guard<std::mutex> busy(busy_);
    if (n == nthreads_.load() && int(workers_.size()) == n - 1) return;
    stop_workers();
    nthreads_.store(n);
}

void ThreadPool::start_workers(int n) {
    stop_ = false;
    owner_pid_ = getpid();
    // Workers start from the current generation: a job posted before a worker runs is not missed.
    const uint64_t g0 = generation_.load();
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, g0] { worker_loop(g0); });
}

void ThreadPool::stop_workers() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
        generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
}

void ThreadPool::drain() {
    for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < ntasks_;) thunk_(ctx_, t);
}

void ThreadPool::worker_loop(uint64_t seen) {
    for (;;) {
        auto t0 = std::chrono::steady_clock::now();
        uint64_t g;
        int spins = 0;
        while ((g = generation_.load(std::memory_order_acquire)) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && std::chrono::steady_clock::now() - t0 > kSpin) {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return generation_.load() != seen; });
            }
        }
        seen = g;
        {
            std::lock_guard<std::mutex> lk(mu_);
            if (stop_) return;
        }
        drain();
        done_.fetch_add(1, std::memory_order_acq_rel);
    }
}

void ThreadPool::run(int64_t ntasks, Thunk thunk, void* ctx) {
    if (ntasks <= 0) return;
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || nthreads_.load() == 1 || ntasks == 1) {
        for (int64_t t = 0; t < ntasks; ++t) thunk(ctx, t);
        return;
    }
    if (int(workers_.size()) != nthreads_.load() - 1) {
        stop_workers();
        start_workers(nthreads_.load());
    }
    {
        std::lock_guard<std::mutex> lk(mu_);
        thunk_ = thunk;
        ctx_ = ctx;
        ntasks_ = ntasks;
        next_.store(0);
        done_.store(0);
        generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    drain();
    const int nworkers = int(workers_.size());
    while (done_.load(std::memory_order_acquire) < nworkers) cpu_relax();
}

}  // namespace fastinfer::cpu
