#include "cpu/runtime/malloc_tune.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace fastinfer::cpu {

std::string tune_malloc(long trim_threshold, long mmap_threshold) {
#if defined(__GLIBC__)
    if (trim_threshold < 0 || mmap_threshold < 0) return "negative threshold";
    if (mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) != 1) return "mallopt(M_TRIM_THRESHOLD) refused";
    if (mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) != 1) return "mallopt(M_MMAP_THRESHOLD) refused";
    return "";
#else
    (void)trim_threshold;
    (void)mmap_threshold;
    return "not glibc";
#endif
}

}  // namespace fastinfer::cpu
