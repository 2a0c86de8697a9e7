// kNm24I8: 2:4 along K. Per 16-channel block and "step" of 8 inputs (two groups of 4), 80 bytes:
// 16 bytes of 2-bit positions, then 64 kept values, 4 per channel (slot 4j + 2g + i: channel j,
// group g, i-th kept input; its position within the group is bits 2*(slot%4) of byte slot/4). 40
// bytes per 64 weights. The VBMI kernel turns the positions into activation indices (vpermw,
// vpmultishiftqb, vpternlogd) and gathers the activations with vpermb, so each vpdpbusd covers 8
// inputs of 16 channels: half the multiplies of the dense kernel. Groups with fewer than 2 nonzeros
// keep explicit zeros; the two positions of a group always differ.
// Sections: colsum int32 [np], then np/16 blocks of kp/8 steps.
#pragma once

#include "cpu/formats/sparse/header.h"

namespace fastinfer::cpu {

constexpr int64_t kNm24StepK = 8;  // inputs per step
constexpr int kNm24Meta = 16;      // position bytes per step
constexpr int64_t kNm24Step = 80;  // bytes per step (positions + 64 values)

namespace {  // like common.h's helpers: ISA files include this header too
constexpr int64_t nm24_block_bytes(int64_t kp) { return kp / kNm24StepK * kNm24Step; }
}  // namespace

}  // namespace fastinfer::cpu
