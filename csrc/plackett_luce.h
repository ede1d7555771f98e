// Relaxed Plackett-Luce loss (docs/METHODS.md section 5): the per-row math that the CPU kernels share
// (private to plackett_luce.cpp, plackett_luce_emb_forward.cpp and plackett_luce_emb_backward.cpp).
//
// Math, per row b (s = ranked scores in teacher order, u = unranked scores, t = log of a tail mass;
// -inf entries are padding and contribute nothing; a NaN among s, u or t makes the row's loss NaN, else a
// +inf among u or t makes it +inf (a +inf among s: NaN, as inf - inf); a row without a valid ranked score
// has loss 0):
//   log D_k = logaddexp( revlogcumsumexp(s)_k , rest ),   rest = logsumexp(u, t)
//   loss    = sum_{k valid} (log D_k - s_k)
//   A_j     = log sum_{k<=j, k valid} 1/D_k     (a prefix log-sum-exp of -log D)
//   dL/ds_j = exp(s_j + A_j) - 1  (valid j),  dL/du_l = exp(u_l + A_K),  dL/dt = exp(t + A_K)
// Every exponent above is <= log K, so nothing overflows whatever the scale of the scores; the suffix
// and prefix sums are running (max, sum) pairs, so nothing underflows either (exact for |s| ~ 1e4).
//
// The kernels (memory plans at each of them):
//   plackett_luce.cpp              pl_forward / pl_backward: the score form, one thread per row
//   plackett_luce_emb_forward.cpp  pl_emb_forward: gathers s_bj = <q_b, E[idx_bj]> row by row and takes
//                                  the row's gradient at grad_output = 1
//   plackett_luce_emb_backward.cpp pl_emb_backward: scales those and scatters the item gradient,
//                                  deterministically for any thread count
//
// Everything here has internal linkage (an anonymous namespace): each kernel file compiles its own copy,
// under the options below, as when the three were one file.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <omp.h>

#include "bindings.h"
#include "buffers.h"
#include "dispatch.h"
#include "parallel.h"
#include "simd.h"

// Lets GCC if-convert the float compares/selects of fast_exp and vectorize the loops over it (these
// kernels raise no floating-point exceptions on purpose; NaN and inf semantics are unchanged). It holds
// for the rest of every file that includes this header (the shared headers above are not affected).
#pragma GCC optimize("no-trapping-math")
// The 32-byte vector types only live inside always-inline helpers (no ABI crosses a call).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

using kdfast::axpy;
using kdfast::hsum8;
using kdfast::load4z;
using kdfast::load8;
using kdfast::v8f;

// exp(x) for float, branch-free so that loops over it vectorize (plain SSE2 is enough): Cody-Waite
// reduction and the Cephes degree-6 polynomial (about 2 ulp). x < -87 gives 0 (the exact value would be
// denormal), x > 88.72 gives inf, NaN gives NaN (it flows through the arithmetic).
__attribute__((always_inline)) inline float fast_exp(float x) {
    const float kLog2e = 1.44269504088896341f;
    const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
    const float kRound = 12582912.0f;    // 1.5 * 2^23: adding and subtracting rounds to an integer
    float xc = x < -87.0f ? -87.0f : x;  // a NaN x stays NaN: both compares are false
    xc = xc > 88.5f ? 88.5f : xc;
    float n = (xc * kLog2e + kRound) - kRound;
    float r = xc - n * kLn2Hi;
    r = r - n * kLn2Lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = static_cast<int32_t>(n) + 126;  // 2^(n-1), then * 2: n = 128 stays representable
    float scale = __builtin_bit_cast(float, e << 23);
    float res = p * scale * 2.0f;
    res = x < -87.0f ? 0.0f : res;
    return x > 88.72f ? std::numeric_limits<float>::infinity() : res;
}

inline double fast_exp(double x) { return std::exp(x); }

// log(x) for a positive normal float, branch-free (vectorizes): frexp-style split x = m 2^k with m in
// [sqrt(1/2), sqrt(2)), then the Cephes degree-9 polynomial for log(m) (about 1 ulp). Only called on
// values known to be in [1e-25, 1e25] (the fast path below).
__attribute__((always_inline)) inline float fast_log(float x) {
    int32_t bits = __builtin_bit_cast(int32_t, x);
    int32_t k = ((bits >> 23) & 0xff) - 126;
    float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
    const bool small = m < 0.70710678118654752f;
    k = small ? k - 1 : k;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const float fk = static_cast<float>(k);
    y += -2.12194440e-4f * fk;
    y += -0.5f * z;
    return m + y + 0.693359375f * fk;
}

inline double fast_log(double x) { return std::log(x); }

template <typename T>
inline T neg_inf() {
    return -std::numeric_limits<T>::infinity();
}

template <typename T>
inline T logaddexp(T a, T b) {
    T mx = a > b ? a : b;
    if (mx == neg_inf<T>()) return mx;
    T mn = a > b ? b : a;
    return mx + std::log1p(std::exp(mn - mx));
}

template <typename T>
KDFAST_INLINE T row_max(const T* x, int64_t n) {
    T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
}

template <typename T>
KDFAST_INLINE T sum_exp(const T* x, int64_t n, T shift) {
    T z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t i = 0; i < n; ++i) z += fast_exp(x[i] - shift);
    return z;
}

template <typename T>
KDFAST_INLINE void scaled_exp(const T* x, int64_t n, T shift, T g, T* out) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = g * fast_exp(x[i] + shift);
}

// Whether u[0..L) or *t (when t != nullptr) holds a NaN (out of line: asked only of rows whose rest is inf).
template <typename T>
__attribute__((noinline, cold)) bool has_nan(const T* u, int64_t L, const T* t) {
    bool nan = t != nullptr && std::isnan(*t);
    for (int64_t l = 0; l < L && !nan; ++l) nan = std::isnan(u[l]);
    return nan;
}

// log( sum_l exp(u_l) + exp(t) ) over the non-padding entries: -inf when there are none, else +inf when one
// of them is +inf; with kNanRule, NaN when u or t holds a NaN (the non-finite rule). row_max skips NaN: with
// a finite maximum a NaN flows through the sum of exps, and only a row whose maximum is -inf or +inf
// (nothing valid, or a +inf) is scanned for one. Without kNanRule such a row's NaN is skipped: the caller
// applies the rule (the score form does, after its row, where the check costs its hot loop nothing).
template <bool kNanRule, typename T>
KDFAST_INLINE T log_rest(const T* u, int64_t L, const T* t) {
    T m = row_max(u, L);
    if (t != nullptr && *t > m) m = *t;
    if constexpr (kNanRule) {
        if (m == neg_inf<T>() || m == std::numeric_limits<T>::infinity())
            return has_nan(u, L, t) ? std::numeric_limits<T>::quiet_NaN() : m;
    } else {
        if (m == neg_inf<T>()) return m;
        if (m == std::numeric_limits<T>::infinity()) return m;
    }
    T z = sum_exp(u, L, m);
    if (t != nullptr) z += std::exp(*t - m);
    return m + std::log(z);
}

// log D_k for every k (garbage at padding positions), from a running (max, sum) suffix scan.
template <typename T>
KDFAST_INLINE void suffix_log_d(const T* s, int64_t K, T rest, T* log_d) {
    T mx = neg_inf<T>(), z = 0;
    for (int64_t k = K - 1; k >= 0; --k) {
        T sk = s[k];
        if (sk == neg_inf<T>()) {
            log_d[k] = 0;
            continue;
        }
        if (sk > mx) {
            z = z * std::exp(mx - sk) + T(1);
            mx = sk;
        } else {
            z += std::exp(sk - mx);
        }
        log_d[k] = logaddexp(mx + std::log(z), rest);
    }
}

// In-place running sums: suffix (x_k <- base + sum_{j>=k} x_j) and prefix (x_k <- sum_{j<=k} x_j). The
// float versions add within 8-lane blocks by shifted copies (log-step) and carry between blocks, so a
// row of K costs ~K/8 dependent steps instead of K; the summation order is fixed (deterministic).
template <typename T>
KDFAST_INLINE void suffix_sums(T* x, int64_t n, T base) {
    T acc = base;
    for (int64_t k = n - 1; k >= 0; --k) x[k] = acc += x[k];
}

template <typename T>
KDFAST_INLINE void prefix_sums(T* x, int64_t n) {
    T acc = 0;
    for (int64_t k = 0; k < n; ++k) x[k] = acc += x[k];
}

template <>
KDFAST_INLINE void suffix_sums<float>(float* x, int64_t n, float base) {
    const v8f zero = {0, 0, 0, 0, 0, 0, 0, 0};
    float acc = base;
    int64_t k = n;
    for (; k >= 8; k -= 8) {
        v8f v;
        std::memcpy(&v, x + k - 8, sizeof(v));
        v += __builtin_shufflevector(v, zero, 1, 2, 3, 4, 5, 6, 7, 8);
        v += __builtin_shufflevector(v, zero, 2, 3, 4, 5, 6, 7, 8, 8);
        v += __builtin_shufflevector(v, zero, 4, 5, 6, 7, 8, 8, 8, 8);
        v += acc;
        std::memcpy(x + k - 8, &v, sizeof(v));
        acc = v[0];
    }
    for (--k; k >= 0; --k) x[k] = acc += x[k];
}

template <>
KDFAST_INLINE void prefix_sums<float>(float* x, int64_t n) {
    const v8f zero = {0, 0, 0, 0, 0, 0, 0, 0};
    float acc = 0;
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        v8f v;
        std::memcpy(&v, x + k, sizeof(v));
        v += __builtin_shufflevector(zero, v, 0, 8, 9, 10, 11, 12, 13, 14);
        v += __builtin_shufflevector(zero, v, 0, 0, 8, 9, 10, 11, 12, 13);
        v += __builtin_shufflevector(zero, v, 0, 0, 0, 0, 8, 9, 10, 11);
        v += acc;
        std::memcpy(x + k, &v, sizeof(v));
        acc = v[7];
    }
    for (; k < n; ++k) x[k] = acc += x[k];
}

// Smallest shifted suffix sum the fast path accepts: terms flushed to 0 by exp (< ~1e-38 in float,
// ~1e-308 in double; at most K of them) then change the sums by a relative 1e-12 or less.
template <typename T>
inline T fast_path_floor() {
    return sizeof(T) == 4 ? T(1e-25) : T(1e-290);
}

// The ranked part of one row. Writes the loss and A_K = log sum_k 1/D_k; with gs != nullptr also the
// ranked gradient times g. Two ways, the same math:
//  fast: one shift c = max(valid s, rest) for the whole row: e_j = exp(s_j - c), r_k = exp(rest - c) +
//        sum_{j>=k} e_j (= D_k e^-c), P_j = sum_{k<=j} 1/r_k, loss = sum (c + log r_k - s_k),
//        A_K = log P_K - c, ds_j = e_j P_j - 1: one exp per entry, no overflow (r <= K + 1). Taken
//        when every valid r_k >= fast_path_floor (suffix mass within ~57 nats of the row maximum).
//  exact: running (max, sum) suffix and prefix scans in log space, exact at any scale (|s| ~ 1e4).
// Scratch e, r: K values each.
template <typename T>
KDFAST_INLINE void ranked_row(const T* s, int64_t K, T rest, T g, T* e, T* r, T* loss, T* inv, T* gs) {
    const T ninf = neg_inf<T>();
    // c = max(valid s, rest) (NaN ignored here, it flows through the sums); n_valid: non-padding entries
    T c = rest;
    int64_t n_valid = 0;
#pragma omp simd reduction(max : c) reduction(+ : n_valid)
    for (int64_t k = 0; k < K; ++k) {
        c = s[k] > c ? s[k] : c;
        n_valid += s[k] != ninf;
    }
    if (n_valid == 0) {
        *loss = 0;
        *inv = ninf;
        if (gs != nullptr)
            for (int64_t k = 0; k < K; ++k) gs[k] = 0;
        return;
    }
    bool fast = std::isfinite(c);
    if (fast) {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) r[k] = e[k] = fast_exp(s[k] - c);
        suffix_sums(r, K, std::exp(rest - c));
        int64_t n_low = 0;
#pragma omp simd reduction(+ : n_low)
        for (int64_t k = 0; k < K; ++k) n_low += (s[k] != ninf) & !(r[k] >= fast_path_floor<T>());
        fast = n_low == 0;
    }
    if (fast) {
        // sum of (c + log r_k - s_k) over the valid entries, then r_k <- 1 / r_k (both vectorize)
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t k = 0; k < K; ++k) {
            T term = c + fast_log(r[k]) - s[k];
            total += s[k] == ninf ? T(0) : term;
        }
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) r[k] = s[k] == ninf ? T(0) : T(1) / r[k];
        prefix_sums(r, K);  // r_k <- P_k = sum_{j<=k} 1 / r_j
        if (gs != nullptr) {
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) gs[k] = s[k] == ninf ? T(0) : g * (e[k] * r[k] - T(1));
        }
        *loss = total;
        *inv = std::log(r[K - 1]) - c;
        return;
    }
    suffix_log_d(s, K, rest, r);
    T total = 0, am = ninf, az = 0;
    for (int64_t k = 0; k < K; ++k) {
        if (s[k] == ninf) {
            if (gs != nullptr) gs[k] = 0;
            continue;
        }
        total += r[k] - s[k];
        T a = -r[k];
        if (a > am) {
            az = az * std::exp(am - a) + T(1);
            am = a;
        } else {
            az += std::exp(a - am);
        }
        if (gs != nullptr) gs[k] = g * (std::exp(s[k] + am + std::log(az)) - T(1));
    }
    *loss = total;
    *inv = am + std::log(az);
}

// ------------------------------------------------------------------------------ embedding form
// Batch row b uses query row q_b = rows[b] (or b without rows) of query [n_rows, d], and the ids of
// that row of ranked_idx [n_rows, K] / unranked_idx [n_rows, L] (-1: padding), and log_tail[q_b].
// The forward gathers the scores of one row into scratch, evaluates the loss and, when gradients are
// wanted, the row's gradient at grad_output = 1 (the loss is linear in grad_output): the score
// gradients dr [B, K], du [B, L], dt [B] and the query part gq_b = sum_j ds_bj E[idx_bj] [B, d], taken
// while the row's item vectors are still in cache (plackett_luce_emb_forward.cpp). The backward only
// scales and scatters them (plackett_luce_emb_backward.cpp).

// Random item rows are latency-bound. When a batch row's item vectors fit in a quarter of L1 (K + L
// short, d small: the RRD case), all of the next batch row's vectors are requested while this row is
// computed; otherwise each vector is requested kPrefetch entries ahead within the row.
constexpr int64_t kPrefetch = 8;
constexpr int64_t kNextRowBytes = 8 << 10;

// Locality 3 (the default) fetches into L1; 2 into L2.
template <int Locality = 3, typename T>
KDFAST_INLINE void prefetch_row(const T* e, int64_t i, int64_t d) {
    const char* row = reinterpret_cast<const char*>(e + i * d);
    const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, Locality);
    __builtin_prefetch(row + bytes - 1, 0, Locality);  // the last line, when the row straddles one more
}

// The rows of the ids among idx[0..M) that lie in [lo, hi) (lo >= 0: padding ids are skipped).
template <int Locality, typename T>
KDFAST_INLINE void prefetch_rows(const T* e, const int64_t* idx, int64_t M, int64_t d, int64_t lo, int64_t hi) {
    for (int64_t j = 0; j < M; ++j)
        if (idx[j] >= lo && idx[j] < hi) prefetch_row<Locality>(e, idx[j], d);
}

}  // namespace
