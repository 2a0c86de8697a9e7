// A small persistent thread pool (no OpenMP runtime of our own beside torch's).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace fastinfer::cpu {

class ThreadPool {
   public:
    static ThreadPool& instance();
    ~ThreadPool();

    void set_num_threads(int n);  // n >= 1; threads are (re)started lazily
    int num_threads() const { return nthreads_.load(); }

    // Runs fn(task) for every task in [0, ntasks) on up to num_threads() threads, the caller
    // included; returns when all are done. A call made while another is running (a second
    // Python thread) runs on the calling thread alone, so results never depend on concurrency.
    template <class F>
    void parallel_for(int64_t ntasks, F&& fn) {
        auto thunk = [](void* ctx, int64_t t) { (*static_cast<F*>(ctx))(t); };
        run(ntasks, thunk, &fn);
    }

   private:
    using Thunk = void (*)(void*, int64_t);
    ThreadPool();
    void run(int64_t ntasks, Thunk thunk, void* ctx);
    void start_workers(int n);
    void stop_workers();
    void worker_loop(uint64_t seen);
    void drain();
    void reset_after_fork();
    static void atfork_child();

    std::atomic<int> nthreads_{1};
    std::mutex busy_;  // held by the one caller using the workers
    std::mutex mu_;
    std::condition_variable cv_;
    std::vector<std::thread> workers_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> done_{0};
    std::atomic<int64_t> next_{0};
    bool stop_ = false;
    int64_t ntasks_ = 0;
    Thunk thunk_ = nullptr;
    void* ctx_ = nullptr;
    int owner_pid_ = 0;
};

}  // namespace fastinfer::cpu
