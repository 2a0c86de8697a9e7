// pybind11 shim of the CUDA engine (fastinfer._C_cuda): device pointers and the stream arrive as
// integers from fastinfer/_cuda_ops.py; an error message from the engine becomes a RuntimeError
// (sizes are validated in Python first, so what arrives here is a CUDA failure or a bug).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda/engine_cuda.h"

namespace py = pybind11;
namespace fc = fastinfer::cuda;

namespace {
void raise_if(const char* err, const char* what) {
    if (err) throw std::runtime_error(std::string("fastinfer CUDA ") + what + ": " + err);
}
template <class T>
T* ptr(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "fastinfer CUDA kernels (torch-free; called through fastinfer.ops)";
    m.attr("TILE_N") = fc::kTileN;
    m.attr("TILE_K") = fc::kTileK;
    m.attr("SP24_TILE_N") = fc::kSp24TileN;
    m.attr("SP24_TILE_K") = fc::kSp24TileK;
    m.def("device_count", &fc::device_count);
    m.def("quantize_rows", [](uintptr_t x, int dt, int64_t rows, int64_t k, int64_t ldx, uintptr_t q, int64_t kp,
                              uintptr_t scale, uintptr_t stream) {
        const char* err;
        {
            py::gil_scoped_release nogil;
            err = fc::quantize_rows(ptr<const void>(x), dt, rows, k, ldx, ptr<int8_t>(q), kp, ptr<float>(scale),
                                    ptr<void>(stream));
        }
        raise_if(err, "quantize_rows");
    });
    m.def("gemm_i8", [](uintptr_t q, int64_t rows, int64_t kp, uintptr_t w, int64_t n, int64_t np, uintptr_t sa,
                        uintptr_t sw, uintptr_t bias, uintptr_t out, int out_dt, int64_t ldo, uintptr_t stream) {
        const char* err;
        {
            py::gil_scoped_release nogil;
            err = fc::gemm_i8(ptr<const int8_t>(q), rows, kp, ptr<const int8_t>(w), n, np, ptr<const float>(sa),
                              ptr<const float>(sw), ptr<const float>(bias), ptr<void>(out), out_dt, ldo,
                              ptr<void>(stream));
        }
        raise_if(err, "gemm_i8");
    });
    m.def("gemm_sp24", [](uintptr_t q, int64_t rows, int64_t kp, uintptr_t vals, uintptr_t meta, int64_t n,
                          int64_t np, uintptr_t sa, uintptr_t sw, uintptr_t bias, uintptr_t out, int out_dt,
                          int64_t ldo, uintptr_t stream) {
        const char* err;
        {
            py::gil_scoped_release nogil;
            err = fc::gemm_sp24(ptr<const int8_t>(q), rows, kp, ptr<const int8_t>(vals), ptr<const uint32_t>(meta), n,
                                np, ptr<const float>(sa), ptr<const float>(sw), ptr<const float>(bias),
                                ptr<void>(out), out_dt, ldo, ptr<void>(stream));
        }
        raise_if(err, "gemm_sp24");
    });
}
