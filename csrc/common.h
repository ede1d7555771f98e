// Shared helpers for kdfast's CPU kernels.
//
// Calling convention: Python passes every tensor as its data_ptr() (an integer) plus the sizes; the
// Python side (kdfast/ops/*.py) has already checked dtype, contiguity, device and shapes, so the
// kernels trust their arguments. Every kernel takes n_threads (torch.get_num_threads()) and releases
// the GIL while it runs. Offsets that can exceed 2^31 are int64_t.
#pragma once

#include <pybind11/pybind11.h>
#include <cstdint>

namespace kdfast {

template <typename T>
inline T* as_ptr(std::uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

// sum_k x_k y_k, vectorised by the compiler (a fixed order for a given build: deterministic).
template <typename T>
inline T simd_dot(const T* x, const T* y, int64_t d) {
    T r = 0;
#pragma omp simd reduction(+ : r)
    for (int64_t k = 0; k < d; ++k) r += x[k] * y[k];
    return r;
}

}  // namespace kdfast

// One registration function per op file; bindings.cpp calls them all.
void register_topk(pybind11::module_& m);
void register_plackett_luce(pybind11::module_& m);
void register_full_catalog(pybind11::module_& m);
void register_topology(pybind11::module_& m);
void register_sampling(pybind11::module_& m);
