// Vector arithmetic shared by the kernels: simd_dot (any type, vectorised by the compiler), axpy, and
// the 8-float GCC vector type v8f with its load and horizontal-sum helpers (lowered to AVX in the
// x86-64-v3 clones of KDFAST_CLONES functions, to SSE pairs otherwise).
#pragma once

#include <cstdint>
#include <cstring>

#include "dispatch.h"

namespace kdfast {

// sum_k x_k y_k, vectorised by the compiler (a fixed order for a given build: deterministic).
template <typename T>
inline T simd_dot(const T* x, const T* y, int64_t d) {
    T r = 0;
#pragma omp simd reduction(+ : r)
    for (int64_t k = 0; k < d; ++k) r += x[k] * y[k];
    return r;
}

// y += w x over d values.
template <typename T>
KDFAST_INLINE void axpy(T* y, T w, const T* x, int64_t d) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) y[c] += w * x[c];
}

// The 32-byte vector types only live inside always-inline helpers: no ABI crosses a call, so GCC's note
// about the ABI of 32-byte arguments does not apply (GCC 12 prints it for hsum8 all the same: the pragma
// below silences the warnings, not that note).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

KDFAST_INLINE v8f load8(const float* p) {
    v8f v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

KDFAST_INLINE v8f load4z(const float* p) {  // four floats, upper lanes zero
    v4f v;
    std::memcpy(&v, p, sizeof(v));
    const v4f z = {0, 0, 0, 0};
    return __builtin_shufflevector(v, z, 0, 1, 2, 3, 4, 4, 4, 4);
}

// Sums of adjacent lane pairs of a and b, per 128-bit half: [a01 a23 b01 b23 | a45 a67 b45 b67].
KDFAST_INLINE v8f pair_sums(v8f a, v8f b) {
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// The eight lane totals [sum a0, ..., sum a7].
KDFAST_INLINE v8f hsum8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
    // two rounds of pair sums leave u0 = [a0 0-3, a1 0-3, a2 0-3, a3 0-3 | the same of lanes 4-7], u1
    // likewise for a4..a7; adding the halves gives the eight totals
    const v8f u0 = pair_sums(pair_sums(a0, a1), pair_sums(a2, a3));
    const v8f u1 = pair_sums(pair_sums(a4, a5), pair_sums(a6, a7));
    return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

#pragma GCC diagnostic pop

}  // namespace kdfast
