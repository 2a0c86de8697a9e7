#include "cpu/large_buffer.h"

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastinfer::cpu {
namespace {
constexpr size_t kHuge = size_t(2) << 20;
}

LargeBuffer::LargeBuffer(size_t nbytes) : size_(nbytes) {
#if defined(__linux__)
    map_len_ = (nbytes + kHuge - 1) / kHuge * kHuge + kHuge;  // room to align the start to 2 MiB
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
    if (map_) munmap(map_, map_len_);
#else
    std::free(map_);
#endif
}

}  // namespace fastinfer::cpu
