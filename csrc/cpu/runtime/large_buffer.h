// Memory for large outputs (several MiB): an anonymous mapping aligned to 2 MiB and advised to
// use transparent huge pages. A fresh 32 MiB tensor from the default allocator is a new mmap
// every call (glibc maps anything >= 32 MiB), and first-touching it costs 8192 page faults: 8 ms
// here, as long as the GEMM that fills it. With 2 MiB pages it is 16 faults (~1-2 ms), and a
// released mapping is kept (up to 16 of them, 384 MiB, the oldest evicted first) for the next
// buffer of its size or up to half of it, whose pages are then already in place. The contents of a
// new buffer are unspecified (like torch.empty).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastinfer::cpu {

class LargeBuffer {
   public:
    explicit LargeBuffer(size_t nbytes);  // throws std::bad_alloc when the mapping fails
    ~LargeBuffer();
    LargeBuffer(const LargeBuffer&) = delete;
    LargeBuffer& operator=(const LargeBuffer&) = delete;

    uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    bool huge_pages_advised() const { return advised_; }

   private:
    void* map_ = nullptr;
    size_t map_len_ = 0;
    uint8_t* data_ = nullptr;
    size_t size_ = 0;
    bool advised_ = false;
};

}  // namespace fastinfer::cpu
