#include "cpu/runtime/large_buffer.h"

#include <cstdlib>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace fastinfer::cpu {
namespace {
constexpr size_t kHuge = size_t(2) << 20;

#if defined(__linux__)
// Mappings of released buffers, kept for the next buffers: their pages are already faulted in, so
// the next call of the same layer shape neither faults nor has the kernel zero the pages again (what
// glibc's free list gives smaller tensors). A request takes the smallest kept mapping at least its
// size and at most twice it; a released mapping that does not fit evicts the oldest. At most
// kCacheSlots mappings, kCacheBytes in all: a CNN at batch 16 has a dozen output sizes of 8-80 MiB
// per forward (4 slots of exact sizes left 8% of a MobileNetV2 forward in the kernel's page zeroing).
constexpr int kCacheSlots = 16;
constexpr size_t kCacheBytes = size_t(384) << 20;
struct Cached {
    void* map = nullptr;
    size_t len = 0;
    uint8_t* data = nullptr;
    bool advised = false;
    uint64_t stamp = 0;  // when it was released (larger: later)
};
struct Cache {
    std::mutex mu;
    Cached slot[kCacheSlots];
    size_t bytes = 0;
    uint64_t clock = 0;
};
Cache& cache() {
    static Cache* c = [] {
        auto* p = new Cache();  // never destroyed: buffers may be released during interpreter teardown
        // A forked child may inherit the mutex locked by a thread that does not exist there.
        pthread_atfork(nullptr, nullptr, [] { new (&cache().mu) std::mutex(); });
        return p;
    }();
    return *c;
}
#endif
}  // namespace

LargeBuffer::LargeBuffer(size_t nbytes) : size_(nbytes) {
#if defined(__linux__)
    map_len_ = (nbytes + kHuge - 1) / kHuge * kHuge + kHuge;  // room to align the start to 2 MiB
    {
        Cache& c = cache();
        std::lock_guard<std::mutex> lk(c.mu);
        Cached* best = nullptr;
        for (Cached& e : c.slot)
            if (e.map && e.len >= map_len_ && e.len <= 2 * map_len_ && (!best || e.len < best->len)) best = &e;
        if (best) {
            map_ = best->map;
            map_len_ = best->len;
            data_ = best->data;
            advised_ = best->advised;
            c.bytes -= best->len;
            *best = Cached{};
            return;
        }
    }
    map_ = mmap(nullptr, map_len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map_ == MAP_FAILED) {
        map_ = nullptr;
        throw std::bad_alloc();
    }
    const uintptr_t base = reinterpret_cast<uintptr_t>(map_);
    data_ = reinterpret_cast<uint8_t*>((base + kHuge - 1) / kHuge * kHuge);
#if defined(MADV_HUGEPAGE)
    // Best effort: where THP is off ("never") this fails and the buffer uses 4 KiB pages.
    advised_ = madvise(data_, map_len_ - (reinterpret_cast<uintptr_t>(data_) - base), MADV_HUGEPAGE) == 0;
#endif
#else
    map_ = std::aligned_alloc(64, (nbytes + 63) / 64 * 64 + 64);
    if (!map_) throw std::bad_alloc();
    data_ = static_cast<uint8_t*>(map_);
#endif
}

LargeBuffer::~LargeBuffer() {
#if defined(__linux__)
    if (!map_) return;
    if (map_len_ <= kCacheBytes) {
        Cache& c = cache();
        std::lock_guard<std::mutex> lk(c.mu);
        for (;;) {  // evict the oldest until this one fits
            Cached* free_slot = nullptr;
            Cached* oldest = nullptr;
            for (Cached& e : c.slot) {
                if (!e.map) free_slot = free_slot ? free_slot : &e;
                else if (!oldest || e.stamp < oldest->stamp) oldest = &e;
            }
            if (free_slot && c.bytes + map_len_ <= kCacheBytes) {
                *free_slot = Cached{map_, map_len_, data_, advised_, ++c.clock};
                c.bytes += map_len_;
                return;
            }
            if (!oldest) break;
            munmap(oldest->map, oldest->len);
            c.bytes -= oldest->len;
            *oldest = Cached{};
        }
    }
    munmap(map_, map_len_);
#else
    std::free(map_);
#endif
}

}  // namespace fastinfer::cpu
