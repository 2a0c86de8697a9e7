// glibc malloc settings for inference loops. By default glibc returns freed memory at the top of
// its heap to the OS once more than a (dynamic) trim threshold lies free there, and it moves that
// threshold with each large free. A model step that frees a few-MiB tensor at the top of the heap
// every call (a layer's output consumed by the next op) then re-faults the same pages on the next
// call: measured here, Int8Linear(384 -> 1536) at 512 rows followed by GELU took 761 page faults
// and 1281 us a step instead of 438 us (torch.ao dynamic int8: 1163 faults, 1803 us instead of 686).
#pragma once

#include <string>

namespace fastinfer::cpu {

// Sets glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD (fixed values also stop their dynamic
// adjustment). Returns "" on success, else why nothing was set (not glibc, or mallopt refused).
std::string tune_malloc(long trim_threshold, long mmap_threshold);

}  // namespace fastinfer::cpu
