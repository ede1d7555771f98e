// Relaxed Plackett-Luce loss on the CPU, embedding form, backward (pl_emb_backward): the deterministic
// scatter. The forward (plackett_luce_emb_forward.cpp) saved each batch row's gradient at grad_output = 1:
// score gradients dr [B, K], du [B, L], dt [B] and the query part gq [B, d]. Here they are scaled by
// grad_output g: grad_query[q_b] += g_b gq_b, grad_log_tail[q_b] += g_b dt_b, and
// grad_item[i] += sum over the entries (b, j) holding i of g_b ds_bj q_b, every item row in (b, j) order
// whatever the thread count: deterministic, no atomics, no [B, M, d] buffer. The thread split is at
// emb_backward below.
#include "bindings.h"
#include "plackett_luce.h"

namespace py = pybind11;
using kdfast::as_ptr;
using kdfast::mut_ptr;
using kdfast::opt_ptr;

namespace {

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
// An item table of N = 0 rows (every id is padding: the forward checked) gets no entries.
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
    if (N <= 0) return;  // no item rows: nothing to scatter (and no item range to split among threads)
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kdfast::team_size(n_threads), B / 64)));
    kdfast::RegionErrors errors;
    if (nt < 4) {
        // One to three threads: each reads every entry but adds only those of its own item range
        // [N t / nt, N (t + 1) / nt). Bucketing (below) writes and rereads every entry instead: on 2
        // threads that cost as much as the adds it split, while this way took an RRD batch's scatter
        // from 0.28 to 0.23 ms (d = 20, 2 cores). With more threads the repeated reads add up. The ranges
        // are shared out by the loop, so a team smaller than asked for still covers all of them.
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int t = 0; t < nt; ++t) {
            errors.run(t, [&] {
                scatter_direct(go, q, rows, ri, ui, dr, du, B, K, L, d, N, N * t / nt, N * (t + 1) / nt, grad_e);
            });
        }
        errors.rethrow();
        return;
    }
    // thread t owns the items i with (i * mul) >> 32 == t (contiguous ranges of about N / nt ids; a
    // multiply, not a 64-bit division per entry; N > 0 here)
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
            if (errors.failed()) continue;
            errors.run(src, [&] {
                const int64_t lo = B * src / nt, hi = B * (src + 1) / nt;
                std::vector<Entry<T>>* mine = bk + static_cast<size_t>(src) * nt;
                for (int dst = 0; dst < nt; ++dst)
                    mine[dst].reserve(static_cast<size_t>((hi - lo) * (K + L) / nt * 5 / 4 + 16));
                for_each_entry(go, rows, ri, ui, dr, du, K, L, lo, hi,
                               [&](int64_t i, int64_t qr, T w) { mine[owner(i)].push_back({i, qr, w}); });
            });
        }
        // (implicit barrier) destination dst takes column dst of the bucket matrix, in source order
#pragma omp for schedule(static)
        for (int dst = 0; dst < nt; ++dst) {
            if (errors.failed()) continue;
            errors.run(nt + dst, [&] {
                std::vector<const std::vector<Entry<T>>*> col(static_cast<size_t>(nt));
                for (int src = 0; src < nt; ++src) col[src] = bk + static_cast<size_t>(src) * nt + dst;
                scatter_buckets(col.data(), nt, q, d, grad_e);
            });
        }
    }
    size_t kept = 0;
    for (auto& v : buckets) kept += v.capacity() * sizeof(Entry<T>);
    if (kept > kKeepBytes) std::vector<std::vector<Entry<T>>>().swap(buckets);
    errors.rethrow();
}

}  // namespace

void register_plackett_luce_emb_backward(py::module_& m) {
    m.def(
        "pl_emb_backward",
        [](std::uintptr_t go, std::uintptr_t q, std::uintptr_t rows, std::uintptr_t ri, std::uintptr_t ui,
           std::uintptr_t dr, std::uintptr_t du, std::uintptr_t dt, std::uintptr_t gqb, int64_t B, int64_t K, int64_t L,
           int64_t d, int64_t N, bool is_double, std::uintptr_t grad_q, std::uintptr_t grad_e, std::uintptr_t grad_t,
           int n_threads) {
            kdfast::by_dtype(is_double, [&](auto tag) {
                using T = typename decltype(tag)::type;
                emb_backward<T>(as_ptr<const T>(go), as_ptr<const T>(q), opt_ptr<int64_t>(rows),
                                as_ptr<const int64_t>(ri), opt_ptr<int64_t>(ui), as_ptr<const T>(dr), opt_ptr<T>(du),
                                opt_ptr<T>(dt), as_ptr<const T>(gqb), B, K, L, d, N, as_ptr<T>(grad_q),
                                as_ptr<T>(grad_e), mut_ptr<T>(grad_t), n_threads);
            });
        },
        "scatters the saved row gradients times grad_output into grad_query, grad_item (deterministic, "
        "any thread count) and grad_log_tail (0 when absent)");
}
