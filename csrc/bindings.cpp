// pybind11 shim: raw addresses and sizes in, Status -> Python exception out, GIL released around
// every kernel. No torch headers: fastinfer.ops hands us data_ptr() integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "cpu/runtime/cpu_features.h"
#include "cpu/dispatch/kernel_table.h"
#include "cpu/engine.h"
#include "cpu/runtime/large_buffer.h"
#include "cpu/runtime/malloc_tune.h"
#include "cpu/sparse.h"

namespace py = pybind11;
namespace fc = fastinfer::cpu;
using fastinfer::Status;

namespace {

void raise_if_error(const Status& st) {
    if (st.is_ok()) return;
    if (st.code == Status::kInvalidArgument) throw py::value_error(st.message);
    throw std::runtime_error(st.message);
}

template <class T>
T* ptr(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

fc::DType dtype(int d) {
    if (d < 0 || d > 3) throw py::value_error("unknown dtype code");
    return fc::DType(d);
}

// The int8 linear entry points, dense and sparse (one signature): pointers in, GIL released.
template <class Fn>
auto int8_linear_binding(Fn fn) {
    return [fn](uintptr_t x, int dt, int64_t m, int64_t k, int64_t ldx, uintptr_t w, int64_t nbytes, uintptr_t sw,
                uintptr_t bias, uintptr_t out, int out_dt, int64_t ldo, int act) {
        const fc::DType d = dtype(dt), od = dtype(out_dt);
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fn(ptr<const void>(x), d, m, k, ldx, ptr<const uint8_t>(w), nbytes, ptr<const float>(sw),
                    ptr<const float>(bias), ptr<void>(out), od, ldo, act);
        }
        raise_if_error(st);
    };
}

// The exact int8 matmul entry points, dense and sparse (one signature).
template <class Fn>
auto int8_matmul_binding(Fn fn) {
    return [fn](uintptr_t a, int64_t m, int64_t k, int64_t lda, uintptr_t w, int64_t nbytes, uintptr_t out,
                int64_t ldo) {
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fn(ptr<const int8_t>(a), m, k, lda, ptr<const uint8_t>(w), nbytes, ptr<int32_t>(out), ldo);
        }
        raise_if_error(st);
    };
}

// (n, h, w, c, cout, kh, kw, sh, sw, ph, pw, dh, dw, groups, oh, ow)
fc::Conv2dShape conv_shape(const std::vector<int64_t>& v) {
    if (v.size() != 16) throw py::value_error("conv shape: 16 sizes expected");
    return fc::Conv2dShape{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastinfer CPU kernels (torch-free; called through fastinfer.ops)";

    py::class_<fc::LargeBuffer>(m, "LargeBuffer", py::buffer_protocol(),
                                "Writable bytes on a 2 MiB aligned mapping advised for huge pages "
                                "(large outputs: far fewer first-touch page faults)")
        .def(py::init<size_t>(), py::arg("nbytes"))
        .def_property_readonly("nbytes", &fc::LargeBuffer::size)
        .def_property_readonly("huge_pages_advised", &fc::LargeBuffer::huge_pages_advised)
        .def_buffer([](fc::LargeBuffer& b) {
            return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                                   {py::ssize_t(b.size())}, {py::ssize_t(1)});
        });

    m.def("detected_isa", [] { return int(fc::detected_isa()); });
    m.def("active_isa", [] { return int(fc::active_isa()); });
    m.def("set_isa_cap", [](int isa) { raise_if_error(fc::set_isa_cap(isa)); });
    m.def("isa_name", [](int isa) { return std::string(fc::isa_name(fc::Isa(isa))); });
    m.def("num_threads", &fc::num_threads);
    m.def("set_num_threads", [](int n) {  // 0: follow omp_get_max_threads() (torch.set_num_threads)
        if (n < 0) throw py::value_error("num_threads must be >= 1, or 0 to follow torch");
        fc::set_num_threads(n);
    });
    m.def("tune_malloc", &fc::tune_malloc, py::arg("trim_threshold"), py::arg("mmap_threshold"));
    m.def("openmp_library", &fc::openmp_library);
    m.def("in_forked_child", &fc::in_forked_child);
    m.def("openmp_libraries_loaded", &fc::openmp_libraries_loaded);
    m.def("cpu_flags", [] {
        const auto& f = fc::cpu_features();
        py::dict d;
        d["avx2"] = f.avx2;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512dq"] = f.avx512dq;
        d["avx512_vnni"] = f.avx512vnni;
        d["avx512_vbmi"] = f.avx512vbmi;
        d["avx512_vbmi2"] = f.avx512vbmi2;
        d["avx512_bf16"] = f.avx512bf16;
        d["amx_tile"] = f.amx_tile;
        d["amx_int8"] = f.amx_int8;
        d["amx_os_enabled"] = f.amx_os;
        return d;
    });
    m.def("packed_nbytes", [](int64_t n, int64_t k) {
        int64_t nbytes = 0;
        if (n < 0 || k < 0) throw py::value_error("negative size");
        if (!fc::checked_packed_nbytes(n, k, &nbytes)) throw py::value_error("size too large");
        return nbytes;
    });

    m.def("pack_weight", [](uintptr_t w, int64_t n, int64_t k, int64_t ldw, uintptr_t out, int64_t nbytes) {
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::pack_weight(ptr<const int8_t>(w), n, k, ldw, ptr<uint8_t>(out), nbytes);
        }
        raise_if_error(st);
    });
    m.def("packed_shape", [](uintptr_t buf, int64_t nbytes) {
        fc::PackedW v;
        raise_if_error(fc::view_packed(ptr<const uint8_t>(buf), nbytes, &v));
        return py::make_tuple(v.n, v.k);
    });
    m.def("validate_packed", [](uintptr_t buf, int64_t nbytes) {
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::validate_packed(ptr<const uint8_t>(buf), nbytes);
        }
        raise_if_error(st);
    });
    m.def("unpack_weight", [](uintptr_t buf, int64_t nbytes, uintptr_t w) {
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::unpack_weight(ptr<const uint8_t>(buf), nbytes, ptr<int8_t>(w));
        }
        raise_if_error(st);
    });
    m.def("quantize_per_token", [](uintptr_t x, int dt, int64_t m, int64_t k, int64_t ldx, uintptr_t q,
                                   int64_t ldq, uintptr_t scale) {
        const fc::DType d = dtype(dt);
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::quantize_per_token(ptr<const void>(x), d, m, k, ldx, ptr<int8_t>(q), ldq,
                                        ptr<float>(scale));
        }
        raise_if_error(st);
    });
    m.def("int8_matmul", int8_matmul_binding(&fc::int8_matmul));
    m.def("dot_peak", [](int64_t iters) {
        int64_t macs = 0;
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::dot_peak(iters, &macs);
        }
        raise_if_error(st);
        return macs;
    });
    m.def("read_bandwidth", [](uintptr_t buf, int64_t nbytes, int64_t repeats) {
        int64_t bytes = 0;
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::read_bandwidth(ptr<const uint8_t>(buf), nbytes, repeats, &bytes);
        }
        raise_if_error(st);
        return bytes;
    });
    // the dense int8 linears take a residual (0: none) after int8_linear_binding's arguments
    m.def("int8_linear", [](uintptr_t x, int dt, int64_t m, int64_t k, int64_t ldx, uintptr_t w, int64_t nbytes,
                            uintptr_t sw, uintptr_t bias, uintptr_t out, int out_dt, int64_t ldo, int act,
                            uintptr_t residual) {
        const fc::DType d = dtype(dt), od = dtype(out_dt);
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::int8_linear(ptr<const void>(x), d, m, k, ldx, ptr<const uint8_t>(w), nbytes, ptr<const float>(sw),
                                 ptr<const float>(bias), ptr<void>(out), od, ldo, act, ptr<const void>(residual));
        }
        raise_if_error(st);
    });
    m.def("weight_only_linear", int8_linear_binding(&fc::weight_only_linear));
    m.def("static_int8_linear", [](uintptr_t x, int dt, int64_t m, int64_t k, int64_t ldx, uintptr_t w, int64_t nbytes,
                                   uintptr_t sw, uintptr_t bias, uintptr_t out, int out_dt, int64_t ldo, int act,
                                   uintptr_t x_scale, uintptr_t residual) {
        const fc::DType d = dtype(dt), od = dtype(out_dt);
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::static_int8_linear(ptr<const void>(x), d, m, k, ldx, ptr<const uint8_t>(w), nbytes,
                                        ptr<const float>(sw), ptr<const float>(bias), ptr<void>(out), od, ldo, act,
                                        ptr<const float>(x_scale), ptr<const void>(residual));
        }
        raise_if_error(st);
    });
    m.def("conv2d_is_depthwise", [](std::vector<int64_t> shape) { return fc::conv2d_is_depthwise(conv_shape(shape)); });
    m.def("int8_conv2d", [](uintptr_t x, int dt, std::vector<int64_t> shape, uintptr_t w, int64_t nbytes, uintptr_t sw,
                            uintptr_t bias, uintptr_t out, int out_dt, int act, uintptr_t residual) {
        const fc::DType d = dtype(dt), od = dtype(out_dt);
        const fc::Conv2dShape s = conv_shape(shape);
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::int8_conv2d(ptr<const void>(x), d, s, ptr<const uint8_t>(w), nbytes, ptr<const float>(sw),
                                 ptr<const float>(bias), ptr<void>(out), od, act, ptr<const void>(residual));
        }
        raise_if_error(st);
    });
    m.def("depthwise_conv2d_f32", [](uintptr_t x, int dt, std::vector<int64_t> shape, uintptr_t w, int64_t w_elems,
                                     uintptr_t bias, uintptr_t out, int out_dt, int act) {
        const fc::DType d = dtype(dt), od = dtype(out_dt);
        const fc::Conv2dShape s = conv_shape(shape);
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::depthwise_conv2d_f32(ptr<const void>(x), d, s, ptr<const float>(w), w_elems, ptr<const float>(bias),
                                          ptr<void>(out), od, act);
        }
        raise_if_error(st);
    });
    // sizes: batch, heads, kv_heads, lq, lk, d, dv; strides: q, k, v (batch, head, row) each, then the
    // mask's (batch, head, row) and out's (batch, row, head); all in elements.
    m.def("attention", [](uintptr_t q, uintptr_t k, uintptr_t v, int dt, std::vector<int64_t> sizes,
                          std::vector<int64_t> strides, uintptr_t mask, int mask_kind, float scale, bool causal,
                          uintptr_t out, bool bf16_math) {
        if (sizes.size() != 7 || strides.size() != 15) throw py::value_error("attention: 7 sizes and 15 strides expected");
        const int64_t* z = sizes.data();
        const int64_t* st = strides.data();
        const fc::AttentionArgs a{ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), dtype(dt),
                                  z[0], z[1], z[2], z[3], z[4], z[5], z[6],
                                  st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8],
                                  ptr<const void>(mask), mask_kind, st[9], st[10], st[11], scale, causal,
                                  ptr<void>(out), st[12], st[13], st[14], bf16_math};  // fmt: skip
        Status r;
        {
            py::gil_scoped_release nogil;
            r = fc::attention(a);
        }
        raise_if_error(r);
    });
    m.def("attention_kernel", [] { return std::string(fc::active_kernels().attention_name); },
          "the attention kernel of the active ISA: ref, avx512_vnni (fp32 FMA) or avx512_bf16 (bf16 inputs on vdpbf16ps)");
    // x, w, b, out: addresses; dt / wdt: dtype codes; m rows of h values (row strides ldx, ldo).
    m.def("layer_norm", [](uintptr_t x, int dt, int64_t m, int64_t h, int64_t ldx, uintptr_t w, uintptr_t b, int wdt,
                           float eps, uintptr_t out, int64_t ldo) {
        const fc::LayerNormArgs a{ptr<const void>(x), dtype(dt), h, ldx, ptr<const void>(w), ptr<const void>(b),
                                  dtype(wdt), eps, ptr<void>(out), ldo};
        Status r;
        {
            py::gil_scoped_release nogil;
            r = fc::layer_norm(a, m);
        }
        raise_if_error(r);
    });
    m.def("layer_norm_simd", [] { return fc::active_kernels().layer_norm_simd; },
          "whether the active ISA has its own LayerNorm kernel (else the scalar reference runs)");
    m.def("attention_simd", [] { return fc::active_kernels().attention_simd; },
          "whether the active ISA has its own attention kernel (else the scalar reference runs)");
    m.def("apply_activation", [](uintptr_t y, int64_t n, int act) {
        raise_if_error(fc::apply_activation(ptr<float>(y), n, act));
    });
    m.def("erf_f32", [](uintptr_t x, uintptr_t out, int64_t n) {
        raise_if_error(fc::erf_f32_values(ptr<const float>(x), ptr<float>(out), n));
    });

    // ---- sparse formats and kernels
    m.def("sparse_measure", [](int fmt, uintptr_t w, int64_t n, int64_t k, int64_t ldw) {
        int64_t nbytes = 0;
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::sparse_measure(fc::SparseFormat(fmt), ptr<const void>(w), n, k, ldw, &nbytes);
        }
        raise_if_error(st);
        return nbytes;
    });
    m.def("sparse_pack", [](int fmt, uintptr_t w, int64_t n, int64_t k, int64_t ldw, uintptr_t out, int64_t nbytes) {
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::sparse_pack(fc::SparseFormat(fmt), ptr<const void>(w), n, k, ldw, ptr<uint8_t>(out), nbytes);
        }
        raise_if_error(st);
    });
    m.def("sparse_validate", [](uintptr_t buf, int64_t nbytes) {
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::sparse_validate(ptr<const uint8_t>(buf), nbytes);
        }
        raise_if_error(st);
    });
    m.def("sparse_info", [](uintptr_t buf, int64_t nbytes) {
        fc::SparseView v;
        raise_if_error(fc::sparse_view(ptr<const uint8_t>(buf), nbytes, &v));
        return py::make_tuple(int(v.fmt), v.n, v.k, v.nnz);
    });
    m.def("sparse_count_nonzero", [](uintptr_t buf, int64_t nbytes) {
        Status st;
        int64_t count = 0;
        {
            py::gil_scoped_release nogil;
            st = fc::sparse_count_nonzero(ptr<const uint8_t>(buf), nbytes, &count);
        }
        raise_if_error(st);
        return count;
    });
    m.def("sparse_unpack", [](uintptr_t buf, int64_t nbytes, uintptr_t w) {
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::sparse_unpack(ptr<const uint8_t>(buf), nbytes, ptr<void>(w));
        }
        raise_if_error(st);
    });
    m.def("sparse_linear_f32", [](uintptr_t x, int64_t m, int64_t k, int64_t ldx, uintptr_t buf, int64_t nbytes,
                                  uintptr_t bias, uintptr_t out, int64_t ldo) {
        Status st;
        {
            py::gil_scoped_release nogil;
            st = fc::sparse_linear_f32(ptr<const float>(x), m, k, ldx, ptr<const uint8_t>(buf), nbytes,
                                       ptr<const float>(bias), ptr<float>(out), ldo);
        }
        raise_if_error(st);
    });
    m.def("sparse_int8_matmul", int8_matmul_binding(&fc::sparse_int8_matmul));
    m.def("sparse_int8_linear", int8_linear_binding(&fc::sparse_int8_linear));
    m.def("set_sparse_vbmi", &fc::set_sparse_vbmi);
    m.def("sparse_vbmi_active", &fc::sparse_vbmi_active);
}
