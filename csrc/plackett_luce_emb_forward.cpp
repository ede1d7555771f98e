// Relaxed Plackett-Luce loss on the CPU, embedding form, forward (pl_emb_forward): the fused gather.
// s_bj = <q_b, E[idx_bj]> (idx -1 -> -inf) is gathered row by row into scratch (layout of the batch at
// "embedding form" in plackett_luce.h); the loss is then that of the score form (a score gathered from a
// non-finite embedding falls under its non-finite rule like any other), and, when gradients are
// wanted, the row's gradient at grad_output = 1 is taken at once: score gradients dr, du, dt and the
// query part gq_b = sum_j ds_bj E[idx_bj], while the row's item vectors are still in cache. The backward
// (plackett_luce_emb_backward.cpp) only scales and scatters them.
//
// Memory plan: one OpenMP thread per batch row at a time (dynamic schedule); scratch per thread: the row's
// K + L scores, 2 K values of the ranked-row math and 4 d partial sums. Every output row is written by
// one thread: deterministic. Ids are checked on the way (ValueError naming the argument); the error
// reported is that of the first bad batch row, whatever the thread count.
#include "bindings.h"
#include "plackett_luce.h"

namespace py = pybind11;
using kdfast::as_ptr;
using kdfast::mut_ptr;
using kdfast::opt_ptr;

namespace {

// The errors of the id checks (out of line: they are thrown at most once per call).
[[noreturn]] __attribute__((noinline, cold)) void throw_bad_item(const char* name, int64_t N, int64_t id) {
    throw std::invalid_argument(std::string(name) + " holds ids outside [0, " + std::to_string(N) +
                                ") or -1 (padding): found " + std::to_string(id));
}

[[noreturn]] __attribute__((noinline, cold)) void throw_bad_row(int64_t n_rows, int64_t row) {
    throw std::invalid_argument("rows holds ids outside [0, " + std::to_string(n_rows) + "): found " +
                                std::to_string(row));
}

// Short float dot products (d ~ 10-128) are the inner loop of the gather: GCC's reduction of an
// `omp simd` loop goes through memory lane by lane, so the float gather (dots8 below) uses vector types
// (v8f of simd.h: lowered to AVX in the x86-64-v3 clone, to SSE pairs otherwise) and a shuffle tree for
// the horizontal sums; double keeps kdfast::simd_dot.

// Scores of M ids into out; throws (naming the argument `name`) at the first id outside [-1, N).
template <typename T>
KDFAST_INLINE void gather_dots(const T* qb, const T* e, const int64_t* idx, int64_t M, int64_t d, int64_t N, bool ahead,
                               const char* name, T* out) {
    for (int64_t j = 0; j < M; ++j) {
        if (ahead && j + kPrefetch < M) {
            int64_t ip = idx[j + kPrefetch];
            if (ip >= 0 && ip < N) prefetch_row(e, ip, d);
        }
        const int64_t i = idx[j];
        if (i == -1) {
            out[j] = neg_inf<T>();
        } else if (i < 0 || i >= N) {
            throw_bad_item(name, N, i);
        } else {
            out[j] = kdfast::simd_dot(qb, e + i * d, d);
        }
    }
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
KDFAST_INLINE void gather_dots<float>(const float* qb, const float* e, const int64_t* idx, int64_t M, int64_t d,
                                      int64_t N, bool ahead, const char* name, float* out) {
    for (int64_t j = 0; j < M; ++j)
        if (idx[j] < -1 || idx[j] >= N) throw_bad_item(name, N, idx[j]);
    const float ninf = neg_inf<float>();
    if (N == 0) {  // every id is padding
        for (int64_t j = 0; j < M; ++j) out[j] = ninf;
        return;
    }
    for (int64_t j = 0; j < M; j += 8) {
        if (ahead && j + 8 < M) prefetch_rows<3>(e, idx + j + 8, std::min<int64_t>(8, M - j - 8), d, 0, N);
        const int64_t r = std::min<int64_t>(8, M - j);
        const float* p[8];
        for (int k = 0; k < 8; ++k) p[k] = e + (k < r && idx[j + k] >= 0 ? idx[j + k] : 0) * d;
        const v8f sums = dots8(qb, p, d);
        for (int k = 0; k < r; ++k) out[j + k] = idx[j + k] < 0 ? ninf : sums[k];
    }
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

// One row; throws std::invalid_argument when ranked / unranked holds an id outside [-1, N).
// Scratch: sc [K + L], e [K], r [K], acc [4 d].
template <typename T>
KDFAST_INLINE void emb_row_t(const T* qb, const T* e, const int64_t* ri, const int64_t* ui, const T* tb, int64_t K,
                             int64_t L, int64_t d, int64_t N, T* sc, T* eb, T* rb, T* acc, T* loss, T* dr, T* du, T* dt,
                             T* gq) {
    T* s = sc;
    T* u = sc + K;
    const bool ahead = (K + L) * d * static_cast<int64_t>(sizeof(T)) > kNextRowBytes;
    gather_dots(qb, e, ri, K, d, N, ahead, "ranked_idx", s);
    if (ui != nullptr) gather_dots(qb, e, ui, L, d, N, ahead, "unranked_idx", u);
    const T rest = log_rest<true>(u, ui == nullptr ? 0 : L, tb);
    T inv;
    ranked_row(s, K, rest, T(1), eb, rb, loss, &inv, dr);
    if (dr == nullptr) return;
    for (int64_t c = 0; c < d; ++c) gq[c] = 0;
    gather_axpy(gq, e, ri, dr, K, d, acc);
    if (ui != nullptr) {
        scaled_exp(u, L, inv, T(1), du);
        gather_axpy(gq, e, ui, du, L, d, acc);
    }
    if (tb != nullptr) *dt = std::exp(*tb + inv);
}

KDFAST_CLONES void emb_row(const float* qb, const float* e, const int64_t* ri, const int64_t* ui, const float* tb,
                           int64_t K, int64_t L, int64_t d, int64_t N, float* sc, float* eb, float* rb, float* acc,
                           float* loss, float* dr, float* du, float* dt, float* gq) {
    emb_row_t(qb, e, ri, ui, tb, K, L, d, N, sc, eb, rb, acc, loss, dr, du, dt, gq);
}
void emb_row(const double* qb, const double* e, const int64_t* ri, const int64_t* ui, const double* tb, int64_t K,
             int64_t L, int64_t d, int64_t N, double* sc, double* eb, double* rb, double* acc, double* loss, double* dr,
             double* du, double* dt, double* gq) {
    emb_row_t(qb, e, ri, ui, tb, K, L, d, N, sc, eb, rb, acc, loss, dr, du, dt, gq);
}

// Throws std::invalid_argument for an id of ranked_idx / unranked_idx outside [-1, N) or a rows entry
// outside [0, n_rows): the error of the first batch row that holds one (rows after a failed one are
// skipped, rows before it still run), whatever the thread count.
template <typename T>
void emb_forward(const T* q, const T* e, const int64_t* rows, const int64_t* ri, const int64_t* ui, const T* t,
                 int64_t B, int64_t K, int64_t L, int64_t d, int64_t N, int64_t n_rows, T* loss, T* dr, T* du, T* dt,
                 T* gq, int n_threads) {
    const size_t n_sc =
        kdfast::scratch_count("pl_emb_forward: the per-thread scratch (K + L scores)", sizeof(T), {K + L});
    const size_t n_k = kdfast::scratch_count("pl_emb_forward: the per-thread scratch (K values)", sizeof(T),
                                             {std::max<int64_t>(K, 1)});
    const size_t n_acc =
        kdfast::scratch_count("pl_emb_forward: the per-thread scratch (4 d values)", sizeof(T), {4, d});
    py::gil_scoped_release release;
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(kdfast::team_size(n_threads))
    {
        std::vector<T> sc, eb, rbuf, acc;
        errors.run([&] {
            sc.resize(n_sc);
            eb.resize(n_k);
            rbuf.resize(n_k);
            acc.resize(n_acc);
        });
#pragma omp for schedule(dynamic, 16)
        for (int64_t b = 0; b < B; ++b) {
            if (errors.stops(b)) continue;
            errors.run(b, [&] {
                const int64_t qr = rows == nullptr ? b : rows[b];
                if (qr < 0 || qr >= n_rows) throw_bad_row(n_rows, qr);
                const int64_t qn = rows == nullptr ? b + 1 : (b + 1 < B ? rows[b + 1] : -1);
                if ((K + L) * d * static_cast<int64_t>(sizeof(T)) <= kNextRowBytes && b + 1 < B && qn >= 0 &&
                    qn < n_rows) {
                    // into L2, not L1: this row's vectors are still being used there
                    prefetch_rows<2>(e, ri + qn * K, K, d, 0, N);
                    if (ui != nullptr) prefetch_rows<2>(e, ui + qn * L, L, d, 0, N);
                }
                emb_row(q + qr * d, e, ri + qr * K, ui == nullptr ? nullptr : ui + qr * L,
                        t == nullptr ? nullptr : t + qr, K, L, d, N, sc.data(), eb.data(), rbuf.data(), acc.data(),
                        loss + b, dr == nullptr ? nullptr : dr + b * K,
                        (dr == nullptr || ui == nullptr) ? nullptr : du + b * L,
                        (dr == nullptr || t == nullptr) ? nullptr : dt + b, dr == nullptr ? nullptr : gq + b * d);
            });
        }
    }
    errors.rethrow();
}

}  // namespace

void register_plackett_luce_emb_forward(py::module_& m) {
    m.def(
        "pl_emb_forward",
        [](std::uintptr_t q, std::uintptr_t e, std::uintptr_t rows, std::uintptr_t ri, std::uintptr_t ui,
           std::uintptr_t t, int64_t B, int64_t K, int64_t L, int64_t d, int64_t N, int64_t n_rows, bool is_double,
           std::uintptr_t loss, std::uintptr_t dr, std::uintptr_t du, std::uintptr_t dt, std::uintptr_t gq,
           int n_threads) {
            kdfast::by_dtype(is_double, [&](auto tag) {
                using T = typename decltype(tag)::type;
                emb_forward<T>(as_ptr<const T>(q), as_ptr<const T>(e), opt_ptr<int64_t>(rows),
                               as_ptr<const int64_t>(ri), opt_ptr<int64_t>(ui), opt_ptr<T>(t), B, K, L, d, N, n_rows,
                               as_ptr<T>(loss), mut_ptr<T>(dr), mut_ptr<T>(du), mut_ptr<T>(dt), mut_ptr<T>(gq),
                               n_threads);
            });
        },
        "fused gather + Plackett-Luce forward (and the row gradients at grad 1 when dr != 0); raises ValueError "
        "for an id of ranked_idx / unranked_idx outside [-1, N) or a rows entry outside [0, n_rows)");
}
