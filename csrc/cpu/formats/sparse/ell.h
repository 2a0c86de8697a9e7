// kEllI8: unstructured int8 at any M. Per 16-channel block a sequence of "steps" of 128 bytes, 64
// index bytes then 64 values, 4 per channel (channel j owns bytes 4j..4j+3; a channel with nothing
// left in the step pads with value 0). The low 7 bits of index byte b give the input base +
// (idx & 127); bit 7 of byte b is bit b of base / 64, the step's window start (vpermi2b ignores bit
// 7, and one vpmovb2m reads the base back). The window is min(128, kp) inputs, so one vpermi2b
// gathers the 64 activation bytes of a step from two registers and one vpdpbusd multiplies them.
// The window slides with the block's least advanced channel (steps are planned greedily: each
// channel takes its next <= 4 nonzeros inside the window), which pads far less than fixed segments
// (10% density: 1.24 stored slots per nonzero instead of 1.93 for fixed 64-input segments).
// Sections: colsum int32 [np], stepptr int64 [np/16 + 1] (each block's steps), steps.
//
// kEllF32: unstructured fp32, the ell idea for 16 fp32 lanes. Per 16-channel block, steps of 80
// bytes, 16 fp32 values (lane j = channel j, one nonzero each) then 16 index bytes: bits 0-5 the
// input within a 64-input window (base + idx), bit 6 set when the lane holds a value (padding lanes
// are skipped by a masked FMA, so a zero weight never meets an Inf activation), bit 7 of byte b =
// bit b of base / 16. Two vpermi2ps and a blend gather the 16 activations from four registers: no
// memory gathers. K <= 2^20. Sections: stepptr int64 [np/16 + 1], steps.
//
// Both: steps may come in pairs sharing a window (header flag kSparseEllPaired).
#pragma once

#include "cpu/formats/sparse/header.h"

namespace fastinfer::cpu {

constexpr int64_t kEllWin = 128;   // inputs per window (two zmm of activations; min(128, kp))
constexpr int64_t kEllStep = 128;  // bytes per step: 64 indices + 64 values
constexpr int64_t kEllF32Win = 64;                 // fp32 ell: inputs per window (four zmm of activations)
constexpr int64_t kEllF32Align = 16;               // fp32 ell: window starts are multiples of 16 inputs
constexpr int64_t kEllF32Step = 80;                // fp32 ell: 16 values + 16 index bytes
constexpr int64_t kEllF32MaxK = int64_t(1) << 20;  // the window start (in units of 16) fits 16 bits
static_assert((kEllF32MaxK - kEllF32Win) / kEllF32Align <= 65535, "fp32 ell base fits 16 bits");

// In an unnamed namespace, like the helpers of common.h: ISA files include this header too, and the
// linker must never hand baseline code a copy compiled with their flags.
namespace {

constexpr int64_t ell_window(int64_t kp) { return kp < kEllWin ? kp : kEllWin; }

// Window start of an fp32 ell step in units of 16 inputs, from bit 7 of its 16 index bytes.
inline uint32_t ell_f32_base16(const uint8_t* step) {
    uint32_t b16 = 0;
    for (int b = 0; b < 16; ++b) b16 |= uint32_t(step[64 + b] >> 7) << b;
    return b16;
}
// Window start of an ell step in units of 64 inputs, from bit 7 of its 64 index bytes.
inline uint64_t ell_base64(const uint8_t* step) {
    uint64_t b64 = 0;
    for (int b = 0; b < 64; ++b) b64 |= uint64_t(step[b] >> 7) << b;
    return b64;
}

// Every stored value of fp32 ell block nb, in step order: f(channel in block, column, value).
template <class F>
void for_each_ell_f32(const SparseView& v, int64_t nb, F&& f) {
    for (int64_t t = v.stepptr[nb]; t < v.stepptr[nb + 1]; ++t) {
        const uint8_t* st = v.steps + t * kEllF32Step;
        const int64_t base = int64_t(ell_f32_base16(st)) * kEllF32Align;
        for (int j = 0; j < 16; ++j)
            if (st[64 + j] & 0x40) {
                float val;
                __builtin_memcpy(&val, st + 4 * j, 4);
                f(j, base + (st[64 + j] & 63), val);
            }
    }
}

}  // namespace
}  // namespace fastinfer::cpu
