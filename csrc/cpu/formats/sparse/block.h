// kBlockI8: tiles of 16 channels x 64 k (the VNNI kernel's panel granularity): per 16-channel block
// a range of its nonzero tiles (tileptr int64 [nb+1], tile k-index int32 [tiles]); tile data in
// K4N16 order, 1 KiB each. All-zero tiles are skipped.
// Sections: colsum int32 [np], tileptr, tilek, tiles.
#pragma once

#include "cpu/formats/sparse/header.h"

namespace fastinfer::cpu {

constexpr int64_t kTileK = 64;  // tiles of kNBlock channels x kTileK inputs

}  // namespace fastinfer::cpu
