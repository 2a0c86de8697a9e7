// The LayerNorm entry point: argument checks and the split of the rows over threads; the table's
// kernel does the arithmetic (dispatch/kernel_table.h, LayerNormArgs).
#include <algorithm>
#include <cmath>

#include "cpu/api/internal.h"
#include "cpu/engine.h"
#include "cpu/runtime/threads.h"

namespace fastinfer::cpu {

using namespace detail;

Status layer_norm(const LayerNormArgs& a, int64_t m) {
    Status st = check_dims(m, a.h, a.ldx, "layer_norm");
    if (!st.is_ok()) return st;
    if (a.dt != DType::kF32 && a.dt != DType::kBF16) return Status::invalid("layer_norm: x must be float32 or bfloat16");
    if ((a.w || a.b) && a.wdt != DType::kF32 && a.wdt != DType::kBF16)
        return Status::invalid("layer_norm: weight and bias must be float32 or bfloat16");
    if (!std::isfinite(a.eps)) return Status::invalid("layer_norm: eps must be finite");
    if (m > 0 && a.ldo < a.h) return Status::invalid("layer_norm: out row stride smaller than the row");
    if (m == 0 || a.h == 0) return Status::ok();
    LayerNormArgs k = a;  // the kernels read fp32 weight and bias: bf16 ones widened once (exact)
    if (a.wdt == DType::kBF16 && (a.w || a.b)) {
        float* buf = reinterpret_cast<float*>(t_scratch.get(size_t(2 * a.h) * sizeof(float)));
        if (!buf) return Status::runtime("layer_norm: out of memory for the widened weight");
        for (int i = 0; i < 2; ++i) {
            const uint16_t* src = static_cast<const uint16_t*>(i == 0 ? a.w : a.b);
            if (!src) continue;
            for (int64_t c = 0; c < a.h; ++c) buf[i * a.h + c] = bf16_to_f32(src[c]);
            (i == 0 ? k.w : k.b) = buf + i * a.h;
        }
    }
    k.wdt = DType::kF32;
    const KernelTable& kt = active_kernels();
    const int64_t rows = std::max<int64_t>(1, 8192 / a.h);
    parallel_for((m + rows - 1) / rows, [&](int64_t t) { kt.layer_norm(k, t * rows, std::min(m, (t + 1) * rows)); });
    return Status::ok();
}

}  // namespace fastinfer::cpu
