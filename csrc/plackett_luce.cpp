// Relaxed Plackett-Luce loss (docs/METHODS.md section 5) on the CPU, and the gather/scatter kernels of its
// embedding form.
//
// Math, per row b (s = ranked scores in teacher order, u = unranked scores, t = log of a tail mass;
// -inf entries are padding and contribute nothing):
//   log D_k = logaddexp( revlogcumsumexp(s)_k , rest ),   rest = logsumexp(u, t)
//   loss    = sum_{k valid} (log D_k - s_k)
//   A_j     = log sum_{k<=j, k valid} 1/D_k     (a prefix log-sum-exp of -log D)
//   dL/ds_j = exp(s_j + A_j) - 1  (valid j),  dL/du_l = exp(u_l + A_K),  dL/dt = exp(t + A_K)
// Every exponent above is <= log K, so nothing overflows whatever the scale of the scores; the suffix
// and prefix sums are running (max, sum) pairs, so nothing underflows either (exact for |s| ~ 1e4).
//
// Memory plan: one OpenMP thread per row at a time. The forward reads s and u once and writes three
// numbers per row (loss, rest, A_K); the backward reads s, u and those two numbers once and writes the
// gradients. The only scratch is log D (K values) per thread. Rows are independent: deterministic.
//
// Embedding form (pl_emb_forward / pl_emb_backward): s_bj = <q_b, E[idx_bj]> (idx -1 -> -inf), gathered
// row by row into scratch; the forward also takes the row's gradient at grad_output = 1 (score gradients
// and grad_q_b = sum_j ds_bj E[idx_bj]), the backward scales them and adds grad_E_i += sum over the
// entries (b, j) holding i of g_b ds_bj q_b, every item row in (b, j) order whatever the thread count:
// deterministic, no atomics, no [B, M, d] buffer. Details at emb_forward and emb_backward below.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <omp.h>

#include "common.h"

// Lets GCC if-convert the float compares/selects of fast_exp and vectorize the loops over it (this
// file raises no floating-point exceptions on purpose; NaN and inf semantics are unchanged).
#pragma GCC optimize("no-trapping-math")
// The 32-byte vector types below only live inside always-inline helpers (no ABI crosses a call).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace py = pybind11;
using kdfast::as_ptr;

namespace {

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

#define KDFAST_INLINE __attribute__((always_inline)) inline

// Every per-row routine below is an always-inline template; the row loops call them through
// functions compiled twice for float (x86-64-v3 = AVX2+FMA, and baseline x86-64), chosen at load time
// from the CPU's features, since the extension is built without -march flags. (Not "arch=haswell":
// that clone is picked only on Intel Haswell-family CPUs, never on AMD or later Intel cores.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define KDFAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KDFAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KDFAST_CLONES
#endif

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

// log( sum_l exp(u_l) + exp(t) ) over the non-padding entries; -inf when there are none.
template <typename T>
KDFAST_INLINE T log_rest(const T* u, int64_t L, const T* t) {
    T m = row_max(u, L);
    if (t != nullptr && *t > m) m = *t;
    if (m == neg_inf<T>()) return m;
    if (m == std::numeric_limits<T>::infinity()) return m;
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

typedef float v8f __attribute__((vector_size(32)));

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

// One row of the score form: forward writes loss, log(rest mass), A_K; backward the gradients times g.
template <typename T>
KDFAST_INLINE void fwd_row_t(const T* s, const T* u, const T* t, int64_t K, int64_t L, T* e, T* r, T* loss, T* rest,
                             T* inv) {
    *rest = log_rest(u, L, t);
    ranked_row(s, K, *rest, T(1), e, r, loss, inv, static_cast<T*>(nullptr));
}

template <typename T>
KDFAST_INLINE void bwd_row_t(T g, const T* s, const T* u, const T* t, T rest, T a_total, int64_t K, int64_t L, T* e,
                             T* r, T* gs, T* gu, T* gt) {
    T loss_unused, inv_unused;
    ranked_row(s, K, rest, g, e, r, &loss_unused, &inv_unused, gs);
    if (u != nullptr) scaled_exp(u, L, a_total, g, gu);
    if (t != nullptr) *gt = g * std::exp(*t + a_total);
}

KDFAST_CLONES void fwd_row(const float* s, const float* u, const float* t, int64_t K, int64_t L, float* e, float* r,
                           float* loss, float* rest, float* inv) {
    fwd_row_t(s, u, t, K, L, e, r, loss, rest, inv);
}
void fwd_row(const double* s, const double* u, const double* t, int64_t K, int64_t L, double* e, double* r,
             double* loss, double* rest, double* inv) {
    fwd_row_t(s, u, t, K, L, e, r, loss, rest, inv);
}
KDFAST_CLONES void bwd_row(float g, const float* s, const float* u, const float* t, float rest, float a_total,
                           int64_t K, int64_t L, float* e, float* r, float* gs, float* gu, float* gt) {
    bwd_row_t(g, s, u, t, rest, a_total, K, L, e, r, gs, gu, gt);
}
void bwd_row(double g, const double* s, const double* u, const double* t, double rest, double a_total, int64_t K,
             int64_t L, double* e, double* r, double* gs, double* gu, double* gt) {
    bwd_row_t(g, s, u, t, rest, a_total, K, L, e, r, gs, gu, gt);
}

template <typename T>
void forward(const T* s, const T* u, const T* t, int64_t B, int64_t K, int64_t L, T* loss, T* rest, T* inv,
             int n_threads) {
    py::gil_scoped_release release;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<T> e(static_cast<size_t>(std::max<int64_t>(K, 1))), r(e.size());
#pragma omp for schedule(dynamic, 64)
        for (int64_t b = 0; b < B; ++b)
            fwd_row(s + b * K, u == nullptr ? nullptr : u + b * L, t == nullptr ? nullptr : t + b, K,
                    u == nullptr ? 0 : L, e.data(), r.data(), loss + b, rest + b, inv + b);
    }
}

template <typename T>
void backward(const T* go, const T* s, const T* u, const T* t, const T* rest, const T* inv, int64_t B, int64_t K,
              int64_t L, T* gs, T* gu, T* gt, int n_threads) {
    py::gil_scoped_release release;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<T> e(static_cast<size_t>(std::max<int64_t>(K, 1))), r(e.size());
#pragma omp for schedule(dynamic, 64)
        for (int64_t b = 0; b < B; ++b)
            bwd_row(go[b], s + b * K, u == nullptr ? nullptr : u + b * L, t == nullptr ? nullptr : t + b, rest[b],
                    inv[b], K, L, e.data(), r.data(), gs + b * K, u == nullptr ? nullptr : gu + b * L,
                    t == nullptr ? nullptr : gt + b);
    }
}

// ------------------------------------------------------------------------------ embedding form
// Batch row b uses query row q_b = rows[b] (or b without rows) of query [n_rows, d], and the ids of
// that row of ranked_idx [n_rows, K] / unranked_idx [n_rows, L] (-1: padding), and log_tail[q_b].
// The forward gathers the scores of one row into scratch, evaluates the loss and, when gradients are
// wanted, the row's gradient at grad_output = 1 (the loss is linear in grad_output): the score
// gradients dr [B, K], du [B, L], dt [B] and the query part gq_b = sum_j ds_bj E[idx_bj] [B, d], taken
// while the row's item vectors are still in cache. The backward only scales and scatters them.

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

// Short float dot products (d ~ 10-128) are the inner loop of the gather: GCC's reduction of an
// `omp simd` loop goes through memory lane by lane, so the float gather (dots8 below) uses vector types
// (lowered to AVX in the x86-64-v3 clone, to SSE pairs otherwise) and a shuffle tree for the horizontal
// sums; double keeps kdfast::simd_dot.
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

template <typename T>
KDFAST_INLINE void axpy(T* y, T w, const T* x, int64_t d) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) y[c] += w * x[c];
}

// Scores of M ids into out; returns the position of the first id outside [-1, N), or -1.
template <typename T>
KDFAST_INLINE int64_t gather_dots(const T* qb, const T* e, const int64_t* idx, int64_t M, int64_t d, int64_t N,
                                  bool ahead, T* out) {
    for (int64_t j = 0; j < M; ++j) {
        if (ahead && j + kPrefetch < M) {
            int64_t ip = idx[j + kPrefetch];
            if (ip >= 0 && ip < N) prefetch_row(e, ip, d);
        }
        const int64_t i = idx[j];
        if (i == -1) {
            out[j] = neg_inf<T>();
        } else if (i < 0 || i >= N) {
            return j;
        } else {
            out[j] = kdfast::simd_dot(qb, e + i * d, d);
        }
    }
    return -1;
}

// Sums of adjacent lane pairs of a and b, per 128-bit half: [a01 a23 b01 b23 | a45 a67 b45 b67].
KDFAST_INLINE v8f pair_sums(v8f a, v8f b) {
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

KDFAST_INLINE v8f hsum8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
    // two rounds of pair sums leave u0 = [a0 0-3, a1 0-3, a2 0-3, a3 0-3 | the same of lanes 4-7], u1
    // likewise for a4..a7; adding the halves gives the eight totals
    const v8f u0 = pair_sums(pair_sums(a0, a1), pair_sums(a2, a3));
    const v8f u1 = pair_sums(pair_sums(a4, a5), pair_sums(a6, a7));
    return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// The dot products of qb with the eight rows p[0..8): eight vector accumulators (the query chunk loaded
// once for all eight), then one shuffle tree turns them into the eight sums.
KDFAST_INLINE v8f dots8(const float* qb, const float* const* p, int64_t d) {
    v8f a[8];
    for (int k = 0; k < 8; ++k) a[k] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {
        const v8f x = load8(qb + c);
        for (int k = 0; k < 8; ++k) a[k] += x * load8(p[k] + c);
    }
    if (c + 4 <= d) {
        const v8f x = load4z(qb + c);
        for (int k = 0; k < 8; ++k) a[k] += x * load4z(p[k] + c);
        c += 4;
    }
    v8f sums = hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
    for (; c < d; ++c)
        for (int k = 0; k < 8; ++k) sums[k] += qb[c] * p[k][c];
    return sums;
}

// float: eight items at a time; the last M % 8 ids as one more group of eight, padded with row 0.
template <>
KDFAST_INLINE int64_t gather_dots<float>(const float* qb, const float* e, const int64_t* idx, int64_t M, int64_t d,
                                         int64_t N, bool ahead, float* out) {
    for (int64_t j = 0; j < M; ++j)
        if (idx[j] < -1 || idx[j] >= N) return j;
    const float ninf = neg_inf<float>();
    if (N == 0) {  // every id is padding
        for (int64_t j = 0; j < M; ++j) out[j] = ninf;
        return -1;
    }
    for (int64_t j = 0; j < M; j += 8) {
        if (ahead && j + 8 < M) prefetch_rows<3>(e, idx + j + 8, std::min<int64_t>(8, M - j - 8), d, 0, N);
        const int64_t r = std::min<int64_t>(8, M - j);
        const float* p[8];
        for (int k = 0; k < 8; ++k) p[k] = e + (k < r && idx[j + k] >= 0 ? idx[j + k] : 0) * d;
        const v8f sums = dots8(qb, p, d);
        for (int k = 0; k < r; ++k) out[j + k] = idx[j + k] < 0 ? ninf : sums[k];
    }
    return -1;
}

// gq += sum_j w_j E[idx_j]. Adding every vector into gq in turn makes each add wait for the previous
// one's store; four partial sums (entry j into sum j % 4, then ((s0 + s1) + (s2 + s3))) keep four
// independent chains in flight. Fixed order: deterministic. Scratch acc: 4 * d values.
template <typename T>
KDFAST_INLINE void gather_axpy(T* gq, const T* e, const int64_t* idx, const T* w, int64_t M, int64_t d, T* acc) {
    for (int64_t c = 0; c < 4 * d; ++c) acc[c] = 0;
    for (int64_t j = 0; j < M; ++j)
        if (idx[j] >= 0 && w[j] != T(0)) axpy(acc + (j & 3) * d, w[j], e + idx[j] * d, d);
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) gq[c] += (acc[c] + acc[d + c]) + (acc[2 * d + c] + acc[3 * d + c]);
}

// One row; returns 0, or 1 / 2 with *bad set to the offending id when ranked / unranked holds an id
// outside [-1, N). Scratch: sc [K + L], e [K], r [K].
template <typename T>
KDFAST_INLINE int emb_row_t(const T* qb, const T* e, const int64_t* ri, const int64_t* ui, const T* tb, int64_t K,
                            int64_t L, int64_t d, int64_t N, T* sc, T* eb, T* rb, T* acc, T* loss, T* dr, T* du, T* dt,
                            T* gq, int64_t* bad) {
    T* s = sc;
    T* u = sc + K;
    const bool ahead = (K + L) * d * static_cast<int64_t>(sizeof(T)) > kNextRowBytes;
    int64_t j = gather_dots(qb, e, ri, K, d, N, ahead, s);
    if (j >= 0) {
        *bad = ri[j];
        return 1;
    }
    if (ui != nullptr && (j = gather_dots(qb, e, ui, L, d, N, ahead, u)) >= 0) {
        *bad = ui[j];
        return 2;
    }
    const T rest = log_rest(u, ui == nullptr ? 0 : L, tb);
    T inv;
    ranked_row(s, K, rest, T(1), eb, rb, loss, &inv, dr);
    if (dr == nullptr) return 0;
    for (int64_t c = 0; c < d; ++c) gq[c] = 0;
    gather_axpy(gq, e, ri, dr, K, d, acc);
    if (ui != nullptr) {
        scaled_exp(u, L, inv, T(1), du);
        gather_axpy(gq, e, ui, du, L, d, acc);
    }
    if (tb != nullptr) *dt = std::exp(*tb + inv);
    return 0;
}

KDFAST_CLONES int emb_row(const float* qb, const float* e, const int64_t* ri, const int64_t* ui, const float* tb,
                          int64_t K, int64_t L, int64_t d, int64_t N, float* sc, float* eb, float* rb, float* acc,
                          float* loss, float* dr, float* du, float* dt, float* gq, int64_t* bad) {
    return emb_row_t(qb, e, ri, ui, tb, K, L, d, N, sc, eb, rb, acc, loss, dr, du, dt, gq, bad);
}
int emb_row(const double* qb, const double* e, const int64_t* ri, const int64_t* ui, const double* tb, int64_t K,
            int64_t L, int64_t d, int64_t N, double* sc, double* eb, double* rb, double* acc, double* loss, double* dr,
            double* du, double* dt, double* gq, int64_t* bad) {
    return emb_row_t(qb, e, ri, ui, tb, K, L, d, N, sc, eb, rb, acc, loss, dr, du, dt, gq, bad);
}

// Returns (code, value): (0, 0) on success; (1 | 2, id) for an id of ranked_idx | unranked_idx outside
// [-1, N); (3, row) for a rows entry outside [0, n_rows). The first error found stops the work.
template <typename T>
std::pair<int, int64_t> emb_forward(const T* q, const T* e, const int64_t* rows, const int64_t* ri, const int64_t* ui,
                                    const T* t, int64_t B, int64_t K, int64_t L, int64_t d, int64_t N, int64_t n_rows,
                                    T* loss, T* dr, T* du, T* dt, T* gq, int n_threads) {
    py::gil_scoped_release release;
    int code = 0;
    int64_t value = 0;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<T> sc(static_cast<size_t>(K + L)), eb(static_cast<size_t>(std::max<int64_t>(K, 1))),
            rbuf(eb.size()), acc(static_cast<size_t>(4 * d));
#pragma omp for schedule(dynamic, 16)
        for (int64_t b = 0; b < B; ++b) {
            int seen;
#pragma omp atomic read
            seen = code;
            if (seen != 0) continue;
            const int64_t qr = rows == nullptr ? b : rows[b];
            int64_t bad = 0;
            int c = 0;
            if (qr < 0 || qr >= n_rows) {
                c = 3;
                bad = qr;
            } else {
                const int64_t qn = rows == nullptr ? b + 1 : (b + 1 < B ? rows[b + 1] : -1);
                if ((K + L) * d * static_cast<int64_t>(sizeof(T)) <= kNextRowBytes && b + 1 < B && qn >= 0 &&
                    qn < n_rows) {
                    // into L2, not L1: this row's vectors are still being used there
                    prefetch_rows<2>(e, ri + qn * K, K, d, 0, N);
                    if (ui != nullptr) prefetch_rows<2>(e, ui + qn * L, L, d, 0, N);
                }
                c = emb_row(
                    q + qr * d, e, ri + qr * K, ui == nullptr ? nullptr : ui + qr * L, t == nullptr ? nullptr : t + qr,
                    K, L, d, N, sc.data(), eb.data(), rbuf.data(), acc.data(), loss + b,
                    dr == nullptr ? nullptr : dr + b * K, (dr == nullptr || ui == nullptr) ? nullptr : du + b * L,
                    (dr == nullptr || t == nullptr) ? nullptr : dt + b, dr == nullptr ? nullptr : gq + b * d, &bad);
            }
            if (c != 0) {
#pragma omp critical(kdfast_pl_emb_error)
                if (code == 0) {
                    code = c;
                    value = bad;
                }
            }
        }
    }
    return {code, value};
}

// One item-gradient entry, as the multi-threaded scatter buckets them (see emb_backward).
template <typename T>
struct Entry {
    int64_t item;
    int64_t qrow;  // query row whose vector is added
    T w;           // grad_output[b] * ds_bj
};

// Visits the item-gradient entries of batch rows [lo, hi) in (b, j) order: f(item, query row, weight).
template <typename T, typename F>
KDFAST_INLINE void for_each_entry(const T* go, const int64_t* rows, const int64_t* ri, const int64_t* ui, const T* dr,
                                  const T* du, int64_t K, int64_t L, int64_t lo, int64_t hi, F&& f) {
    for (int64_t b = lo; b < hi; ++b) {
        const T g = go[b];
        if (g == T(0)) continue;
        const int64_t qr = rows == nullptr ? b : rows[b];
        for (int64_t j = 0; j < K; ++j) {
            const int64_t i = ri[qr * K + j];
            const T w = dr[b * K + j];
            if (i >= 0 && w != T(0)) f(i, qr, g * w);
        }
        if (ui != nullptr)
            for (int64_t l = 0; l < L; ++l) {
                const int64_t i = ui[qr * L + l];
                const T w = du[b * L + l];
                if (i >= 0 && w != T(0)) f(i, qr, g * w);
            }
    }
}

// The entries of batch row b whose item lies in [lo, hi) (lo >= 0) and whose weight is not zero, as
// (item, go_b * ds_bj) in j order; returns their count. Branch-free appends: with several threads the
// ownership test is a coin flip that a branch would mispredict half the time. Scratch: K + L each.
template <typename T>
KDFAST_INLINE int64_t own_entries(const T* go, const int64_t* ri, const int64_t* ui, const T* dr, const T* du,
                                  int64_t b, int64_t qr, int64_t K, int64_t L, int64_t lo, int64_t hi, int64_t* ids,
                                  T* ws) {
    const T g = go[b];
    if (g == T(0)) return 0;
    // the count goes in and out by value: a captured reference could alias ids[], and would be
    // reloaded and stored on every entry
    const auto append = [&](const int64_t* idx, const T* w, int64_t M, int64_t n) {
        for (int64_t j = 0; j < M; ++j) {
            ids[n] = idx[j];
            ws[n] = g * w[j];
            n += (idx[j] >= lo) & (idx[j] < hi) & (w[j] != T(0));
        }
        return n;
    };
    const int64_t n = append(ri + qr * K, dr + b * K, K, 0);
    return ui == nullptr ? n : append(ui + qr * L, du + b * L, L, n);
}

// The entries whose item lies in [lo, hi), added in (b, j) order; the next row's gradient rows are
// fetched while this row's are added.
template <typename T>
KDFAST_INLINE void scatter_direct_t(const T* go, const T* q, const int64_t* rows, const int64_t* ri, const int64_t* ui,
                                    const T* dr, const T* du, int64_t B, int64_t K, int64_t L, int64_t d, int64_t N,
                                    int64_t lo, int64_t hi, T* ge) {
    if (lo == 0 && hi == N) {  // every entry: the tests in for_each_entry predict well, no compaction
        for (int64_t b = 0; b < B; ++b) {
            if (b + 1 < B) {
                const int64_t qn = rows == nullptr ? b + 1 : rows[b + 1];
                prefetch_rows<3>(ge, ri + qn * K, K, d, 0, N);
                if (ui != nullptr) prefetch_rows<3>(ge, ui + qn * L, L, d, 0, N);
            }
            for_each_entry(go, rows, ri, ui, dr, du, K, L, b, b + 1,
                           [&](int64_t i, int64_t qr, T w) { axpy(ge + i * d, w, q + qr * d, d); });
        }
        return;
    }
    // a slice of the items: each row's own entries are first collected (branch-free), one row ahead
    const size_t m = static_cast<size_t>(K + (ui == nullptr ? 0 : L));
    std::vector<int64_t> ids(2 * m);
    std::vector<T> ws(2 * m);
    int64_t n =
        B > 0 ? own_entries(go, ri, ui, dr, du, 0, rows == nullptr ? 0 : rows[0], K, L, lo, hi, ids.data(), ws.data())
              : 0;
    for (int64_t b = 0; b < B; ++b) {
        const int64_t* cur_i = ids.data() + (b & 1) * m;
        const T* cur_w = ws.data() + (b & 1) * m;
        int64_t n_next = 0;
        if (b + 1 < B) {
            int64_t* nxt_i = ids.data() + ((b + 1) & 1) * m;
            n_next = own_entries(go, ri, ui, dr, du, b + 1, rows == nullptr ? b + 1 : rows[b + 1], K, L, lo, hi, nxt_i,
                                 ws.data() + ((b + 1) & 1) * m);
            for (int64_t k = 0; k < n_next; ++k) prefetch_row<3>(ge, nxt_i[k], d);
        }
        const T* qb = q + (rows == nullptr ? b : rows[b]) * d;
        for (int64_t k = 0; k < n; ++k) axpy(ge + cur_i[k] * d, cur_w[k], qb, d);
        n = n_next;
    }
}

template <typename T>
KDFAST_INLINE void scatter_buckets_t(const std::vector<Entry<T>>* const* col, int n_src, const T* q, int64_t d, T* ge) {
    for (int src = 0; src < n_src; ++src)
        for (const Entry<T>& en : *col[src]) axpy(ge + en.item * d, en.w, q + en.qrow * d, d);
}

KDFAST_CLONES void scatter_direct(const float* go, const float* q, const int64_t* rows, const int64_t* ri,
                                  const int64_t* ui, const float* dr, const float* du, int64_t B, int64_t K, int64_t L,
                                  int64_t d, int64_t N, int64_t lo, int64_t hi, float* ge) {
    scatter_direct_t(go, q, rows, ri, ui, dr, du, B, K, L, d, N, lo, hi, ge);
}
void scatter_direct(const double* go, const double* q, const int64_t* rows, const int64_t* ri, const int64_t* ui,
                    const double* dr, const double* du, int64_t B, int64_t K, int64_t L, int64_t d, int64_t N,
                    int64_t lo, int64_t hi, double* ge) {
    scatter_direct_t(go, q, rows, ri, ui, dr, du, B, K, L, d, N, lo, hi, ge);
}
KDFAST_CLONES void scatter_buckets(const std::vector<Entry<float>>* const* col, int n_src, const float* q, int64_t d,
                                   float* ge) {
    scatter_buckets_t(col, n_src, q, d, ge);
}
void scatter_buckets(const std::vector<Entry<double>>* const* col, int n_src, const double* q, int64_t d, double* ge) {
    scatter_buckets_t(col, n_src, q, d, ge);
}

// grad_query[q_b] += go_b gq_b (in b order) and grad_item[i] += go_b ds_bj query[q_b] over the entries
// (b, j) holding i, in (b, j) order (ranked before unranked in a row), whatever the thread count. Every
// thread owns a contiguous item-id range. Up to three threads each walk all entries and add their own;
// from four on, the threads first bucket the entries of their block of rows by destination thread, then
// each adds its own items' entries, taking the buckets in row-block order. Bitwise the same for any
// thread count, no atomics, no pass over the catalog. grad_query, grad_item and grad_t arrive zeroed.
template <typename T>
void emb_backward(const T* go, const T* q, const int64_t* rows, const int64_t* ri, const int64_t* ui, const T* dr,
                  const T* du, const T* dt, const T* gqb, int64_t B, int64_t K, int64_t L, int64_t d, int64_t N,
                  T* grad_q, T* grad_e, T* grad_t, int n_threads) {
    py::gil_scoped_release release;
    for (int64_t b = 0; b < B; ++b) {  // B x d work: sequential keeps repeated rows in b order
        const int64_t qr = rows == nullptr ? b : rows[b];
        axpy(grad_q + qr * d, go[b], gqb + b * d, d);
        if (grad_t != nullptr) grad_t[qr] += go[b] * dt[b];
    }
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, B / 64)));
    if (nt < 4) {
        // One to three threads: each reads every entry but adds only those of its own item range
        // [N t / nt, N (t + 1) / nt). Bucketing (below) writes and rereads every entry instead: on 2
        // threads that cost as much as the adds it split, while this way took an RRD batch's scatter
        // from 0.28 to 0.23 ms (d = 20, 2 cores). With more threads the repeated reads add up.
#pragma omp parallel num_threads(nt)
        {
            const int t = omp_get_thread_num();
            scatter_direct(go, q, rows, ri, ui, dr, du, B, K, L, d, N, N * t / nt, N * (t + 1) / nt, grad_e);
        }
        return;
    }
    // thread t owns the items i with (i * mul) >> 32 == t (contiguous ranges of about N / nt ids; a
    // multiply, not a 64-bit division per entry)
    const uint64_t mul = ((uint64_t(nt) << 32) + uint64_t(N) - 1) / uint64_t(N);
    const auto owner = [&](int64_t i) { return std::min<int64_t>(int64_t((uint64_t(i) * mul) >> 32), nt - 1); };
    // buckets[src * nt + dst]: the entries of row block src whose item belongs to thread dst. Kept per
    // calling thread across calls (fresh pages would cost more than the adds), up to kKeepBytes.
    static thread_local std::vector<std::vector<Entry<T>>> buckets;
    constexpr size_t kKeepBytes = size_t(64) << 20;
    if (buckets.size() < static_cast<size_t>(nt) * nt) buckets.resize(static_cast<size_t>(nt) * nt);
    for (auto& v : buckets) v.clear();
    std::vector<Entry<T>>* const bk = buckets.data();  // the workers see the caller's buckets through this
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int src = 0; src < nt; ++src) {
            const int64_t lo = B * src / nt, hi = B * (src + 1) / nt;
            std::vector<Entry<T>>* mine = bk + static_cast<size_t>(src) * nt;
            for (int dst = 0; dst < nt; ++dst)
                mine[dst].reserve(static_cast<size_t>((hi - lo) * (K + L) / nt * 5 / 4 + 16));
            for_each_entry(go, rows, ri, ui, dr, du, K, L, lo, hi,
                           [&](int64_t i, int64_t qr, T w) { mine[owner(i)].push_back({i, qr, w}); });
        }
        // (implicit barrier) destination dst takes column dst of the bucket matrix, in source order
#pragma omp for schedule(static)
        for (int dst = 0; dst < nt; ++dst) {
            std::vector<const std::vector<Entry<T>>*> col(static_cast<size_t>(nt));
            for (int src = 0; src < nt; ++src) col[src] = bk + static_cast<size_t>(src) * nt + dst;
            scatter_buckets(col.data(), nt, q, d, grad_e);
        }
    }
    size_t kept = 0;
    for (auto& v : buckets) kept += v.capacity() * sizeof(Entry<T>);
    if (kept > kKeepBytes) std::vector<std::vector<Entry<T>>>().swap(buckets);
}

template <typename T>
const T* opt_ptr(std::uintptr_t p) {
    return p == 0 ? nullptr : as_ptr<const T>(p);
}

template <typename T>
T* mut_ptr(std::uintptr_t p) {
    return p == 0 ? nullptr : as_ptr<T>(p);
}

}  // namespace

void register_plackett_luce(py::module_& m) {
    m.def(
        "pl_forward",
        [](std::uintptr_t s, std::uintptr_t u, std::uintptr_t t, int64_t B, int64_t K, int64_t L, bool is_double,
           std::uintptr_t loss, std::uintptr_t rest, std::uintptr_t inv, int n_threads) {
            if (is_double)
                forward<double>(as_ptr<const double>(s), opt_ptr<double>(u), opt_ptr<double>(t), B, K, L,
                                as_ptr<double>(loss), as_ptr<double>(rest), as_ptr<double>(inv), n_threads);
            else
                forward<float>(as_ptr<const float>(s), opt_ptr<float>(u), opt_ptr<float>(t), B, K, L,
                               as_ptr<float>(loss), as_ptr<float>(rest), as_ptr<float>(inv), n_threads);
        },
        "Plackett-Luce forward: per-row loss, log(rest mass) and log(sum_k 1/D_k); u, t may be 0 (absent)");
    m.def(
        "pl_backward",
        [](std::uintptr_t go, std::uintptr_t s, std::uintptr_t u, std::uintptr_t t, std::uintptr_t rest,
           std::uintptr_t inv, int64_t B, int64_t K, int64_t L, bool is_double, std::uintptr_t gs, std::uintptr_t gu,
           std::uintptr_t gt, int n_threads) {
            if (is_double)
                backward<double>(as_ptr<const double>(go), as_ptr<const double>(s), opt_ptr<double>(u),
                                 opt_ptr<double>(t), as_ptr<const double>(rest), as_ptr<const double>(inv), B, K, L,
                                 as_ptr<double>(gs), as_ptr<double>(gu), as_ptr<double>(gt), n_threads);
            else
                backward<float>(as_ptr<const float>(go), as_ptr<const float>(s), opt_ptr<float>(u), opt_ptr<float>(t),
                                as_ptr<const float>(rest), as_ptr<const float>(inv), B, K, L, as_ptr<float>(gs),
                                as_ptr<float>(gu), as_ptr<float>(gt), n_threads);
        },
        "Plackett-Luce backward: score gradients times the per-row grad_output");
    m.def(
        "pl_emb_forward",
        [](std::uintptr_t q, std::uintptr_t e, std::uintptr_t rows, std::uintptr_t ri, std::uintptr_t ui,
           std::uintptr_t t, int64_t B, int64_t K, int64_t L, int64_t d, int64_t N, int64_t n_rows, bool is_double,
           std::uintptr_t loss, std::uintptr_t dr, std::uintptr_t du, std::uintptr_t dt, std::uintptr_t gq,
           int n_threads) {
            const auto* rp = opt_ptr<int64_t>(rows);
            const auto* up = opt_ptr<int64_t>(ui);
            if (is_double)
                return emb_forward<double>(as_ptr<const double>(q), as_ptr<const double>(e), rp,
                                           as_ptr<const int64_t>(ri), up, opt_ptr<double>(t), B, K, L, d, N, n_rows,
                                           as_ptr<double>(loss), mut_ptr<double>(dr), mut_ptr<double>(du),
                                           mut_ptr<double>(dt), mut_ptr<double>(gq), n_threads);
            return emb_forward<float>(as_ptr<const float>(q), as_ptr<const float>(e), rp, as_ptr<const int64_t>(ri), up,
                                      opt_ptr<float>(t), B, K, L, d, N, n_rows, as_ptr<float>(loss), mut_ptr<float>(dr),
                                      mut_ptr<float>(du), mut_ptr<float>(dt), mut_ptr<float>(gq), n_threads);
        },
        "fused gather + Plackett-Luce forward (and the row gradients at grad 1 when dr != 0); returns "
        "(code, value): 0 ok, 1/2 a ranked/unranked id outside [-1, N), 3 a rows entry outside [0, n_rows)");
    m.def(
        "pl_emb_backward",
        [](std::uintptr_t go, std::uintptr_t q, std::uintptr_t rows, std::uintptr_t ri, std::uintptr_t ui,
           std::uintptr_t dr, std::uintptr_t du, std::uintptr_t dt, std::uintptr_t gqb, int64_t B, int64_t K, int64_t L,
           int64_t d, int64_t N, bool is_double, std::uintptr_t grad_q, std::uintptr_t grad_e, std::uintptr_t grad_t,
           int n_threads) {
            const auto* rp = opt_ptr<int64_t>(rows);
            const auto* up = opt_ptr<int64_t>(ui);
            if (is_double)
                emb_backward<double>(as_ptr<const double>(go), as_ptr<const double>(q), rp, as_ptr<const int64_t>(ri),
                                     up, as_ptr<const double>(dr), opt_ptr<double>(du), opt_ptr<double>(dt),
                                     as_ptr<const double>(gqb), B, K, L, d, N, as_ptr<double>(grad_q),
                                     as_ptr<double>(grad_e), mut_ptr<double>(grad_t), n_threads);
            else
                emb_backward<float>(as_ptr<const float>(go), as_ptr<const float>(q), rp, as_ptr<const int64_t>(ri), up,
                                    as_ptr<const float>(dr), opt_ptr<float>(du), opt_ptr<float>(dt),
                                    as_ptr<const float>(gqb), B, K, L, d, N, as_ptr<float>(grad_q),
                                    as_ptr<float>(grad_e), mut_ptr<float>(grad_t), n_threads);
        },
        "scatters the saved row gradients times grad_output into grad_query, grad_item (deterministic, "
        "any thread count) and grad_log_tail (0 when absent)");
}
