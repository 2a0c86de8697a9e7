// The torch-free entry points of the CPU engine. Tensors arrive as raw pointers, sizes and row
// strides (elements; the innermost stride is 1). Every function validates what it can and returns
// a Status; none throws.
#pragma once

#include "cpu/common.h"
#include "cpu/formats/k4n16.h"    // pack_weight, view_packed, unpack_weight
#include "cpu/runtime/threads.h"  // num_threads, set_num_threads

namespace fastinfer::cpu {

// The ISA of the next call: the detected one, lowered by set_isa_cap. Each call runs wholly on the
// kernel table of the ISA active when it starts (dispatch/kernel_table.h).
Isa active_isa();
Status set_isa_cap(int isa);  // must be <= detected_isa()

// q int8 [m, k] (row stride ldq) and scale fp32 [m] from x fp32/bf16 [m, k] (row stride ldx):
// symmetric per row, scale = max|x|/127, q = round_half_even(x * (127/max|x|)) in [-127, 127].
// A row with NaN or Inf gets scale NaN and q = 0; a row of zeros gets scale 0 and q = 0.
Status quantize_per_token(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, int8_t* q,
                          int64_t ldq, float* scale);

// out int32 [m, n] (row stride ldo) = A int8 [m, k] (row stride lda) @ W^T, exact mod 2^32.
Status int8_matmul(const int8_t* a, int64_t m, int64_t k, int64_t lda, const uint8_t* packed,
                   int64_t packed_nbytes, int32_t* out, int64_t ldo);

// out [m, n] (dtype out_dt, row stride ldo) = act(dequant(quant(x) @ W^T) * sw + bias), activation
// quantization included (quantize_per_token), fp32 epilogue. bias may be null. act: a valid_act
// code (common.h), applied in fp32 before the cast. residual: null, or [m, n] of out_dt with row
// stride ldo, added in fp32 after the bias and before the activation:
// out = act(fma(acc, sa * sw, bias) + residual), rounded to out_dt once (a transformer block's
// dense -> add of its input in one pass).
Status int8_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx,
                   const uint8_t* packed, int64_t packed_nbytes, const float* sw,
                   const float* bias, void* out, DType out_dt, int64_t ldo, int act,
                   const void* residual = nullptr);

// Static int8 linear: as int8_linear, but every row quantized with the one calibrated scale
// s = *x_scale (q = clamp(round(x / s), -127, 127): one pass over x, values past the calibrated
// range saturate); a row holding NaN or Inf gives a NaN output row. s must be finite, > 0 and
// 1 / s finite (else an error). residual as int8_linear's.
Status static_int8_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, const uint8_t* packed,
                          int64_t packed_nbytes, const float* sw, const float* bias, void* out, DType out_dt,
                          int64_t ldo, int act, const float* x_scale, const void* residual = nullptr);

// Weight-only int8 (W8A32): out [m, n] = act(fma(x @ float(W)^T, sw, bias)) in fp32, x (fp32, or bf16
// widened exactly) never quantized; the sums run over k in order, one fma chain per output, so every
// ISA gives the same bits (KernelTable::wo_gemm). Arguments as int8_linear's.
Status weight_only_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, const uint8_t* packed,
                          int64_t packed_nbytes, const float* sw, const float* bias, void* out, DType out_dt,
                          int64_t ldo, int act);

// A 2-D convolution over NHWC data: input [n, h, w, c], output [n, oh, ow, cout]; padding ph/pw
// at the top/left (the bottom/right padding is whatever oh/ow imply: asymmetric "same" padding).
struct Conv2dShape {
    int64_t n, h, w, c, cout, kh, kw, sh, sw, ph, pw, dh, dw, groups, oh, ow;
};
// Whether int8_conv2d runs s on its depthwise kernel (weight: int8 [kh * kw][c]); otherwise the
// weight is one pack_weight buffer per group of W_g [cout/groups, kh * kw * c/groups], k ordered
// (ky, kx, channel), concatenated.
bool conv2d_is_depthwise(const Conv2dShape& s);
// out (out_dt, NHWC) = act(conv(x, W) * sa * sw + bias): x (fp32/bf16, NHWC, contiguous) quantized
// per im2col row (= output pixel; depthwise: per sample, uint8 max/255 when the whole input is >= 0),
// exact int32 sums, the fp32 epilogue of int8_linear. NaN/Inf in the values a row reads gives NaN
// outputs for it (depthwise: for the sample). bias may be null. residual (may be null; not on the
// depthwise path; out_dt kF32 or kBF16): out_dt NHWC [n, oh, ow, cout] added before the activation,
// out = act(conv(x, W) * sa * sw + bias + residual), in fp32 and rounded once.
Status int8_conv2d(const void* x, DType dt, const Conv2dShape& s, const uint8_t* weight, int64_t weight_nbytes,
                   const float* sw, const float* bias, void* out, DType out_dt, int act,
                   const void* residual = nullptr);

// out (out_dt, NHWC) = act(depthwise_conv(x, wf) + bias) in fp32: wf [kh * kw][round_up(c, 16)]
// (zero padded), fma over the taps in (ky, kx) order from 0, then + bias; bias may be null.
Status depthwise_conv2d_f32(const void* x, DType dt, const Conv2dShape& s, const float* wf, int64_t w_elems,
                            const float* bias, void* out, DType out_dt, int act);

// Scaled dot-product attention (AttentionArgs in dispatch/kernel_table.h): out = softmax(scale *
// q k^T + mask) v per head, fp32 arithmetic, the output in [batch][lq][heads][dv] layout.
constexpr int64_t kMaxHeadDim = 1 << 16;
Status attention(const AttentionArgs& a);

// LayerNorm of m rows (LayerNormArgs in dispatch/kernel_table.h: sizes, strides and pointers).
Status layer_norm(const LayerNormArgs& a, int64_t m);

// y[i] = act(y[i]) for n fp32 values, in place, with the epilogue's scalar code (outputs of a K = 0
// linear, where no GEMM runs). erf_f32: out[i] = the epilogue's erf(x[i]) (tests).
Status apply_activation(float* y, int64_t n, int act);
Status erf_f32_values(const float* x, float* out, int64_t n);

// Machine-limit probes for the benchmarks, run on every thread at once.
// dot_peak: register-only multiply-adds of the active ISA's int8 dot instruction; returns how many
// int8 multiply-adds were done (time it from Python). read_bandwidth: each thread streams its share
// of buf (nbytes, 64-byte aligned, a multiple of 256 * threads) `repeats` times; returns bytes read.
// It uses the machine's own (AVX-512) kernel whatever the ISA cap: it measures the machine.
Status dot_peak(int64_t iters_per_thread, int64_t* macs);
Status read_bandwidth(const uint8_t* buf, int64_t nbytes, int64_t repeats, int64_t* bytes);

}  // namespace fastinfer::cpu
