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
// Embedding form: pl_gather_scores computes s_bj = <q_b, E[idx_bj]> (idx -1 -> -inf);
// pl_gather_backward turns score gradients g_bj into grad_q_b += sum_j g_bj E[idx_bj] (per row) and
// grad_E_i += sum_{(b,j): idx_bj = i} g_bj q_b, the latter through a counting sort of the ids (a CSR
// item -> entries in (b, j) order), so every item row is summed by one thread in a fixed order:
// deterministic, no atomics, no [B, M, d] buffer.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

// Lets GCC if-convert the float compares/selects of fast_exp and vectorize the loops over it (this
// file raises no floating-point exceptions on purpose; NaN and inf semantics are unchanged).
#pragma GCC optimize("no-trapping-math")

namespace py = pybind11;
using kdfast::as_ptr;

namespace {

// exp(x) for float, branch-free so that loops over it vectorize (plain SSE2 is enough): Cody-Waite
// reduction and the Cephes degree-6 polynomial (about 2 ulp). x < -87 gives 0 (the exact value would be
// denormal), x > 88.72 gives inf, NaN gives NaN (it flows through the arithmetic).
__attribute__((always_inline)) inline float fast_exp(float x) {
    const float kLog2e = 1.44269504088896341f;
    const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
    const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
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
    int32_t bits = e << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    float res = p * scale * 2.0f;
    res = x < -87.0f ? 0.0f : res;
    return x > 88.72f ? std::numeric_limits<float>::infinity() : res;
}

inline double fast_exp(double x) { return std::exp(x); }

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

// log( sum_l exp(u_l) + exp(t) ) over the non-padding entries; -inf when there are none.
// The three loops over long rows, for float compiled twice (AVX2+FMA and baseline x86-64, chosen at
// load time by the CPU), since the extension is built without -march flags.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KDFAST_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define KDFAST_CLONES
#endif

KDFAST_CLONES float row_max(const float* x, int64_t n) {
    float m = neg_inf<float>();
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
}

KDFAST_CLONES float sum_exp(const float* x, int64_t n, float shift) {
    float z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t i = 0; i < n; ++i) z += fast_exp(x[i] - shift);
    return z;
}

KDFAST_CLONES void scaled_exp(const float* x, int64_t n, float shift, float g, float* out) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = g * fast_exp(x[i] + shift);
}

double row_max(const double* x, int64_t n) {
    double m = neg_inf<double>();
    for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
}

double sum_exp(const double* x, int64_t n, double shift) {
    double z = 0;
    for (int64_t i = 0; i < n; ++i) z += std::exp(x[i] - shift);
    return z;
}

void scaled_exp(const double* x, int64_t n, double shift, double g, double* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = g * std::exp(x[i] + shift);
}

template <typename T>
T log_rest(const T* u, int64_t L, const T* t) {
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
void suffix_log_d(const T* s, int64_t K, T rest, T* log_d) {
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
void ranked_row(const T* s, int64_t K, T rest, T g, T* e, T* r, T* loss, T* inv, T* gs) {
    const T ninf = neg_inf<T>();
    T c = rest;
    bool any = false;
    for (int64_t k = 0; k < K; ++k) {
        if (s[k] == ninf) continue;
        any = true;
        c = s[k] > c ? s[k] : c;
    }
    if (!any) {
        *loss = 0;
        *inv = ninf;
        if (gs != nullptr)
            for (int64_t k = 0; k < K; ++k) gs[k] = 0;
        return;
    }
    bool fast = std::isfinite(c);
    if (fast) {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) e[k] = fast_exp(s[k] - c);
        T acc = std::exp(rest - c);
        for (int64_t k = K - 1; k >= 0; --k) {
            acc += e[k];
            r[k] = acc;
        }
        for (int64_t k = 0; k < K; ++k)
            if (s[k] != ninf && !(r[k] >= fast_path_floor<T>())) fast = false;
    }
    if (fast) {
        T total = 0, p = 0;
        for (int64_t k = 0; k < K; ++k) {
            if (s[k] == ninf) {
                if (gs != nullptr) gs[k] = 0;
                continue;
            }
            total += c + std::log(r[k]) - s[k];
            p += T(1) / r[k];
            if (gs != nullptr) gs[k] = g * (e[k] * p - T(1));
        }
        *loss = total;
        *inv = std::log(p) - c;
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

template <typename T>
void forward(const T* s, const T* u, const T* t, int64_t B, int64_t K, int64_t L, T* loss, T* rest,
             T* inv, int n_threads) {
    py::gil_scoped_release release;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<T> e(static_cast<size_t>(std::max<int64_t>(K, 1))), r(e.size());
#pragma omp for schedule(dynamic, 64)
        for (int64_t b = 0; b < B; ++b) {
            rest[b] = log_rest(u == nullptr ? nullptr : u + b * L, u == nullptr ? 0 : L,
                               t == nullptr ? nullptr : t + b);
            ranked_row(s + b * K, K, rest[b], T(1), e.data(), r.data(), loss + b, inv + b,
                       static_cast<T*>(nullptr));
        }
    }
}

template <typename T>
void backward(const T* go, const T* s, const T* u, const T* t, const T* rest, const T* inv, int64_t B,
              int64_t K, int64_t L, T* gs, T* gu, T* gt, int n_threads) {
    py::gil_scoped_release release;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<T> e(static_cast<size_t>(std::max<int64_t>(K, 1))), r(e.size());
#pragma omp for schedule(dynamic, 64)
        for (int64_t b = 0; b < B; ++b) {
            const T g = go[b];
            const T a_total = inv[b];
            T loss_unused, inv_unused;
            ranked_row(s + b * K, K, rest[b], g, e.data(), r.data(), &loss_unused, &inv_unused, gs + b * K);
            if (u != nullptr) scaled_exp(u + b * L, L, a_total, g, gu + b * L);
            if (t != nullptr) gt[b] = g * std::exp(t[b] + a_total);
        }
    }
}

// Random item rows are latency-bound: ask for the row kPrefetch entries ahead (every 64-byte line).
constexpr int64_t kPrefetch = 8;

template <typename T>
inline void prefetch_row(const T* e, const int64_t* idx, int64_t j, int64_t M, int64_t d) {
    if (j + kPrefetch >= M) return;
    int64_t i = idx[j + kPrefetch];
    if (i < 0) return;
    const char* row = reinterpret_cast<const char*>(e + i * d);
    for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(row + off);
}

template <typename T>
void gather_scores(const T* q, const T* e, const int64_t* idx, int64_t B, int64_t M, int64_t d, T* out,
                   int n_threads) {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(dynamic, 64) num_threads(n_threads)
    for (int64_t b = 0; b < B; ++b) {
        const T* qb = q + b * d;
        for (int64_t j = 0; j < M; ++j) {
            prefetch_row(e, idx + b * M, j, M, d);
            int64_t i = idx[b * M + j];
            if (i < 0) {
                out[b * M + j] = neg_inf<T>();
                continue;
            }
            const T* ei = e + i * d;
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < d; ++c) acc += qb[c] * ei[c];
            out[b * M + j] = acc;
        }
    }
}

template <typename T>
void gather_backward(const T* g, const T* q, const T* e, const int64_t* idx, int64_t B, int64_t M,
                     int64_t N, int64_t d, T* gq, T* ge, int n_threads) {
    py::gil_scoped_release release;
    // grad_q_b += sum_j g_bj E[idx_bj]
#pragma omp parallel for schedule(dynamic, 64) num_threads(n_threads)
    for (int64_t b = 0; b < B; ++b) {
        T* gqb = gq + b * d;
        for (int64_t j = 0; j < M; ++j) {
            prefetch_row(e, idx + b * M, j, M, d);
            int64_t i = idx[b * M + j];
            T w = g[b * M + j];
            if (i < 0 || w == T(0)) continue;
            const T* ei = e + i * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) gqb[c] += w * ei[c];
        }
    }
    // grad_E_i += sum over the entries holding i, in (b, j) order: counting sort into a CSR.
    std::vector<int64_t> ptr(static_cast<size_t>(N) + 1, 0);
    const int64_t n_entries = B * M;
    for (int64_t p = 0; p < n_entries; ++p)
        if (idx[p] >= 0) ++ptr[idx[p] + 1];
    for (int64_t i = 0; i < N; ++i) ptr[i + 1] += ptr[i];
    std::vector<int64_t> entries(static_cast<size_t>(ptr[N]));
    {
        std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
        for (int64_t p = 0; p < n_entries; ++p)
            if (idx[p] >= 0) entries[fill[idx[p]]++] = p;
    }
#pragma omp parallel for schedule(dynamic, 256) num_threads(n_threads)
    for (int64_t i = 0; i < N; ++i) {
        T* gei = ge + i * d;
        for (int64_t p = ptr[i]; p < ptr[i + 1]; ++p) {
            int64_t entry = entries[p];
            T w = g[entry];
            const T* qb = q + (entry / M) * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) gei[c] += w * qb[c];
        }
    }
}

template <typename T>
const T* opt_ptr(std::uintptr_t p) {
    return p == 0 ? nullptr : as_ptr<const T>(p);
}

}  // namespace

void register_plackett_luce(py::module_& m) {
    m.def(
        "pl_forward",
        [](std::uintptr_t s, std::uintptr_t u, std::uintptr_t t, int64_t B, int64_t K, int64_t L,
           bool is_double, std::uintptr_t loss, std::uintptr_t rest, std::uintptr_t inv, int n_threads) {
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
           std::uintptr_t inv, int64_t B, int64_t K, int64_t L, bool is_double, std::uintptr_t gs,
           std::uintptr_t gu, std::uintptr_t gt, int n_threads) {
            if (is_double)
                backward<double>(as_ptr<const double>(go), as_ptr<const double>(s), opt_ptr<double>(u),
                                 opt_ptr<double>(t), as_ptr<const double>(rest), as_ptr<const double>(inv), B,
                                 K, L, as_ptr<double>(gs), as_ptr<double>(gu), as_ptr<double>(gt), n_threads);
            else
                backward<float>(as_ptr<const float>(go), as_ptr<const float>(s), opt_ptr<float>(u),
                                opt_ptr<float>(t), as_ptr<const float>(rest), as_ptr<const float>(inv), B, K,
                                L, as_ptr<float>(gs), as_ptr<float>(gu), as_ptr<float>(gt), n_threads);
        },
        "Plackett-Luce backward: score gradients times the per-row grad_output");
    m.def(
        "pl_gather_scores",
        [](std::uintptr_t q, std::uintptr_t e, std::uintptr_t idx, int64_t B, int64_t M, int64_t d,
           bool is_double, std::uintptr_t out, int n_threads) {
            if (is_double)
                gather_scores<double>(as_ptr<const double>(q), as_ptr<const double>(e), as_ptr<const int64_t>(idx),
                                      B, M, d, as_ptr<double>(out), n_threads);
            else
                gather_scores<float>(as_ptr<const float>(q), as_ptr<const float>(e), as_ptr<const int64_t>(idx),
                                     B, M, d, as_ptr<float>(out), n_threads);
        },
        "scores[b, j] = <q_b, E[idx[b, j]]>, -inf where idx is -1");
    m.def(
        "pl_gather_backward",
        [](std::uintptr_t g, std::uintptr_t q, std::uintptr_t e, std::uintptr_t idx, int64_t B, int64_t M,
           int64_t N, int64_t d, bool is_double, std::uintptr_t gq, std::uintptr_t ge, int n_threads) {
            if (is_double)
                gather_backward<double>(as_ptr<const double>(g), as_ptr<const double>(q), as_ptr<const double>(e),
                                        as_ptr<const int64_t>(idx), B, M, N, d, as_ptr<double>(gq),
                                        as_ptr<double>(ge), n_threads);
            else
                gather_backward<float>(as_ptr<const float>(g), as_ptr<const float>(q), as_ptr<const float>(e),
                                       as_ptr<const int64_t>(idx), B, M, N, d, as_ptr<float>(gq),
                                       as_ptr<float>(ge), n_threads);
        },
        "accumulates grad_q += g E[idx] per row and grad_E[i] += sum g q_b (deterministic, counting sort)");
}
