// Raw buffers from Python: every tensor arrives as its data_ptr() (an integer) plus its sizes, and these
// turn the integers back into typed pointers. 0 stands for an absent optional tensor.
//
// Calling convention: the Python side (kdfast/ops) has already checked dtype, contiguity, device and
// shapes, so the kernels trust their buffers; what a kernel cannot check cheaply (ids inside the buffers,
// sizes that would not fit in memory) it reports by throwing (see parallel.h). Offsets that can exceed
// 2^31 are int64_t.
#pragma once

#include <cstdint>

namespace kdfast {

// The buffer at address p (never 0).
template <typename T>
inline T* as_ptr(std::uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

// An optional input: nullptr when p is 0.
template <typename T>
inline const T* opt_ptr(std::uintptr_t p) {
    return p == 0 ? nullptr : as_ptr<const T>(p);
}

// An optional output: nullptr when p is 0.
template <typename T>
inline T* mut_ptr(std::uintptr_t p) {
    return p == 0 ? nullptr : as_ptr<T>(p);
}

}  // namespace kdfast
