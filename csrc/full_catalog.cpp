// Full-catalog log-tail (kdfast::full_catalog_log_tail) and its backward on the CPU.
//
// Math: S_bj = clamp(<u_b, v_j>, -c, c); X_b = canonical CSR row b (sorted ids, no repeats) of excluded items.
//   forward:  lt_b = log sum_{j not in X_b} exp(S_bj)                          (-inf if nothing is left)
//   backward: G_bj = g_b exp(S_bj - lt_b) [j not in X_b] [-c <= <u_b, v_j> <= c]
//             grad_user = G @ V (parallel over user rows), grad_item = G^T @ U (parallel over item blocks)
// Memory plan: nothing of size B x I; each thread keeps one [kRows x kItems] score tile on its stack and
// the current item tile transposed ([D x kItems], allocated once per thread) so the score loops run along
// items (vectorisable).
// Rows walk their sorted exclusion list with a pointer as the item blocks advance (binary search where a
// walk starts mid-row). Every output element is summed by one thread in a fixed order (items, or rows, in
// increasing order): deterministic, the same bits for any thread count.
// The dot products and sums are accumulated in T (float for float32 inputs, double for float64).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "bindings.h"
#include "buffers.h"
#include "dispatch.h"
#include "parallel.h"

namespace {

constexpr int64_t kRows = 32;
constexpr int64_t kItems = 128;

// vt[k * kItems + j] = V[j0 + j][k]: the item tile transposed, so score loops run along j (vectorisable).
template <typename T>
inline void transpose_tile(const T* V, int64_t j0, int64_t nj, int64_t D, T* vt) {
    for (int64_t j = 0; j < nj; ++j)
        for (int64_t k = 0; k < D; ++k) vt[k * kItems + j] = V[(j0 + j) * D + k];
}

// tile[r][j] = <U[r0 + r], V[j0 + j]> for r < nr, j < nj (raw, unclamped).
template <typename T>
inline void score_tile(const T* U, int64_t r0, int64_t nr, const T* vt, int64_t nj, int64_t D, T (*tile)[kItems]) {
    for (int64_t r = 0; r < nr; ++r) {
        T* t = tile[r];
        std::fill(t, t + kItems, T(0));
        const T* u = U + (r0 + r) * D;
        for (int64_t k = 0; k < D; ++k) {
            const T uk = u[k];
            const T* v = vt + k * kItems;
            for (int64_t j = 0; j < nj; ++j) t[j] += uk * v[j];
        }
    }
}

// mark[r][j] = 1 for excluded items of row (r0 + r) inside [j0, j1); ptr[r] advances past them.
inline void mark_excluded(const int64_t* indices, const int64_t* end, int64_t* ptr, int64_t nr, int64_t j0, int64_t j1,
                          unsigned char (*mark)[kItems]) {
    for (int64_t r = 0; r < nr; ++r) {
        std::fill(mark[r], mark[r] + kItems, 0);
        int64_t p = ptr[r];
        while (p < end[r] && indices[p] < j1) {
            if (indices[p] >= j0) mark[r][indices[p] - j0] = 1;
            ++p;
        }
        ptr[r] = p;
    }
}

// Calls f(blk, vt) for every blk in [0, n_blocks) on n_threads threads (dynamic schedule), vt a per-thread
// item tile of D x kItems values (`what` names it in the error raised when it cannot be allocated).
template <typename T, typename F>
void for_blocks(const char* what, int64_t n_blocks, int64_t D, int n_threads, kdfast::RegionErrors& errors, F&& f) {
    const size_t n_vt = kdfast::scratch_count(what, sizeof(T), {D, kItems});
#pragma omp parallel num_threads(kdfast::team_size(n_threads))
    {
        std::vector<T> vt;
        errors.run([&] { vt.resize(n_vt); });
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
            if (errors.failed()) continue;
            f(blk, vt.data());
        }
    }
    errors.rethrow();
}

// Walks the whole catalog for rows [r0, r0 + nr): f(j0, nj, tile, mark) per tile of kItems items from j0,
// tile[r][j] = <U[r0 + r], V[j0 + j]> (raw) and mark[r][j] = 1 for the items excluded from row r0 + r.
template <typename T, typename F>
KDFAST_INLINE void walk_catalog(const T* U, const T* V, int64_t r0, int64_t nr, int64_t I, int64_t D,
                                const int64_t* indptr, const int64_t* indices, T* vt, F&& f) {
    int64_t ptr[kRows], end[kRows];
    T tile[kRows][kItems];
    unsigned char mark[kRows][kItems];
    for (int64_t r = 0; r < nr; ++r) {
        ptr[r] = indptr[r0 + r];
        end[r] = indptr[r0 + r + 1];
    }
    for (int64_t j0 = 0; j0 < I; j0 += kItems) {
        const int64_t j1 = std::min(I, j0 + kItems), nj = j1 - j0;
        mark_excluded(indices, end, ptr, nr, j0, j1, mark);
        transpose_tile(V, j0, nj, D, vt);
        score_tile(U, r0, nr, vt, nj, D, tile);
        f(j0, nj, tile, mark);
    }
}

template <typename T>
void log_tail_impl(const T* U, const T* V, int64_t B, int64_t I, int64_t D, const int64_t* indptr,
                   const int64_t* indices, double clamp_d, T* out, int n_threads) {
    kdfast::RegionErrors errors;
    const char* what = "full_catalog_log_tail: the item tile (D x 128 values)";
    for_blocks<T>(what, (B + kRows - 1) / kRows, D, n_threads, errors, [&](int64_t blk, T* vt) {
        // the worker's own copies (no store through a T* can alias them): the hot loops keep them in registers
        const T clamp = static_cast<T>(clamp_d), ninf = -std::numeric_limits<T>::infinity();
        const int64_t r0 = blk * kRows, nr = std::min(kRows, B - r0);
        T m[kRows], s[kRows];
        for (int64_t r = 0; r < nr; ++r) {
            m[r] = ninf;
            s[r] = 0;
        }
        walk_catalog(U, V, r0, nr, I, D, indptr, indices, vt,
                     [&](int64_t, int64_t nj, T(*tile)[kItems], unsigned char (*mark)[kItems]) {
                         for (int64_t r = 0; r < nr; ++r) {
                             T tmax = ninf;
                             for (int64_t j = 0; j < nj; ++j) {
                                 T x = std::min(std::max(tile[r][j], -clamp), clamp);
                                 x = mark[r][j] ? ninf : x;
                                 tile[r][j] = x;
                                 tmax = std::max(tmax, x);
                             }
                             const T nm = std::max(m[r], tmax);
                             if (nm == ninf) continue;
                             T acc = 0;
                             for (int64_t j = 0; j < nj; ++j) acc += std::exp(tile[r][j] - nm);
                             s[r] = s[r] * std::exp(m[r] - nm) + acc;
                             m[r] = nm;
                         }
                     });
        for (int64_t r = 0; r < nr; ++r) out[r0 + r] = (m[r] == ninf) ? ninf : std::log(s[r]) + m[r];
    });
}

template <typename T>
inline T grad_entry(T raw, T clamp, T g, T lt) {
    if (!(raw >= -clamp && raw <= clamp)) return 0;
    return g * std::exp(std::min(std::max(raw, -clamp), clamp) - lt);
}

// grad_user: one thread per block of kRows rows, walking all items; grad_item: one thread per block of
// kItems items, walking all rows (binary search into each row's ids).
template <typename T>
void backward_impl(const T* G, const T* LT, const T* U, const T* V, int64_t B, int64_t I, int64_t D,
                   const int64_t* indptr, const int64_t* indices, double clamp_d, T* GU, T* GI, int n_threads) {
    const char* what = "full_catalog_log_tail_backward: the item tile (D x 128 values)";
    kdfast::RegionErrors errors;  // (empty again after each region: for_blocks rethrows)
    for_blocks<T>(what, (B + kRows - 1) / kRows, D, n_threads, errors, [&](int64_t blk, T* vt) {
        const T clamp = static_cast<T>(clamp_d), ninf = -std::numeric_limits<T>::infinity();  // (as above)
        const int64_t r0 = blk * kRows, nr = std::min(kRows, B - r0);
        for (int64_t r = 0; r < nr; ++r) std::fill(GU + (r0 + r) * D, GU + (r0 + r + 1) * D, T(0));
        walk_catalog(U, V, r0, nr, I, D, indptr, indices, vt,
                     [&](int64_t j0, int64_t nj, T(*tile)[kItems], unsigned char (*mark)[kItems]) {
                         for (int64_t r = 0; r < nr; ++r) {
                             const int64_t b = r0 + r;
                             if (LT[b] == ninf || G[b] == 0) continue;
                             T* gu = GU + b * D;
                             for (int64_t j = 0; j < nj; ++j) {
                                 if (mark[r][j]) continue;
                                 const T* v = V + (j0 + j) * D;
                                 const T p = grad_entry(tile[r][j], clamp, G[b], LT[b]);
                                 if (p == 0) continue;
                                 for (int64_t k = 0; k < D; ++k) gu[k] += p * v[k];
                             }
                         }
                     });
    });
    for_blocks<T>(what, (I + kItems - 1) / kItems, D, n_threads, errors, [&](int64_t blk, T* vt) {
        const T clamp = static_cast<T>(clamp_d), ninf = -std::numeric_limits<T>::infinity();
        const int64_t j0 = blk * kItems, j1 = std::min(I, j0 + kItems), nj = j1 - j0;
        std::fill(GI + j0 * D, GI + j1 * D, T(0));
        unsigned char mark[kRows][kItems];
        int64_t ptr[kRows], end[kRows];
        T tile[kRows][kItems];
        transpose_tile(V, j0, nj, D, vt);
        for (int64_t r0 = 0; r0 < B; r0 += kRows) {
            const int64_t nr = std::min(kRows, B - r0);
            for (int64_t r = 0; r < nr; ++r) {
                end[r] = indptr[r0 + r + 1];
                ptr[r] = std::lower_bound(indices + indptr[r0 + r], indices + end[r], j0) - indices;
            }
            mark_excluded(indices, end, ptr, nr, j0, j1, mark);
            score_tile(U, r0, nr, vt, nj, D, tile);
            for (int64_t r = 0; r < nr; ++r) {
                const int64_t b = r0 + r;
                if (LT[b] == ninf || G[b] == 0) continue;
                const T* u = U + b * D;
                for (int64_t j = 0; j < nj; ++j) {
                    if (mark[r][j]) continue;
                    const T p = grad_entry(tile[r][j], clamp, G[b], LT[b]);
                    if (p == 0) continue;
                    T* gi = GI + (j0 + j) * D;
                    for (int64_t k = 0; k < D; ++k) gi[k] += p * u[k];
                }
            }
        }
    });
}

}  // namespace

void register_full_catalog(pybind11::module_& m) {
    using kdfast::as_ptr;
    m.def(
        "full_catalog_log_tail",
        [](std::uintptr_t u, std::uintptr_t v, int64_t B, int64_t I, int64_t D, std::uintptr_t indptr,
           std::uintptr_t indices, double clamp, std::uintptr_t out, bool f64, int n_threads) {
            pybind11::gil_scoped_release release;
            kdfast::by_dtype(f64, [&](auto tag) {
                using T = typename decltype(tag)::type;
                log_tail_impl(as_ptr<const T>(u), as_ptr<const T>(v), B, I, D, as_ptr<const int64_t>(indptr),
                              as_ptr<const int64_t>(indices), clamp, as_ptr<T>(out), n_threads);
            });
        },
        "Per-row log sum exp of clamped scores over non-excluded items (see csrc/full_catalog.cpp).");
    m.def(
        "full_catalog_log_tail_backward",
        [](std::uintptr_t g, std::uintptr_t lt, std::uintptr_t u, std::uintptr_t v, int64_t B, int64_t I, int64_t D,
           std::uintptr_t indptr, std::uintptr_t indices, double clamp, std::uintptr_t gu, std::uintptr_t gi, bool f64,
           int n_threads) {
            pybind11::gil_scoped_release release;
            kdfast::by_dtype(f64, [&](auto tag) {
                using T = typename decltype(tag)::type;
                backward_impl(as_ptr<const T>(g), as_ptr<const T>(lt), as_ptr<const T>(u), as_ptr<const T>(v), B, I, D,
                              as_ptr<const int64_t>(indptr), as_ptr<const int64_t>(indices), clamp, as_ptr<T>(gu),
                              as_ptr<T>(gi), n_threads);
            });
        },
        "Gradients (user, item) of the full-catalog log-tail (see csrc/full_catalog.cpp).");
}
