// Relaxed Plackett-Luce loss on the CPU, score form (pl_forward / pl_backward): the loss of score rows
// s [B, K], u [B, L] and t [B] given as tensors. The math is in plackett_luce.h.
//
// Memory plan: one OpenMP thread per row at a time. The forward reads s and u once and writes three
// numbers per row (loss, rest, A_K); the backward reads s, u and those two numbers once and writes the
// gradients. The only scratch is log D (K values, twice) per thread. Rows are independent: deterministic.
#include "plackett_luce.h"
#include "bindings.h"

namespace py = pybind11;
using kdfast::as_ptr;
using kdfast::opt_ptr;

namespace {

// One row of the score form: forward writes loss, log(rest mass), A_K; backward the gradients times g.
template <typename T>
KDFAST_INLINE void fwd_row_t(const T* s, const T* u, const T* t, int64_t K, int64_t L, T* e, T* r, T* loss, T* rest,
                             T* inv) {
    *rest = log_rest<false>(u, L, t);  // the NaN rule is applied by forward(), out of this hot path
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

// Calls row(b, e, r) for every row b on n_threads threads (dynamic schedule), e and r each a per-thread
// scratch of K values; `what` names that scratch in the error raised when it cannot be allocated.
template <typename T, typename F>
void for_each_row(const char* what, int64_t B, int64_t K, int n_threads, F&& row) {
    const size_t n_scratch = kdfast::scratch_count(what, sizeof(T), {std::max<int64_t>(K, 1)});
    py::gil_scoped_release release;
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(kdfast::team_size(n_threads))
    {
        std::vector<T> e, r;
        errors.run([&] {
            e.resize(n_scratch);
            r.resize(n_scratch);
        });
#pragma omp for schedule(dynamic, 64)
        for (int64_t b = 0; b < B; ++b) {
            if (errors.failed()) continue;
            row(b, e.data(), r.data());
        }
    }
    errors.rethrow();
}

template <typename T>
void forward(const T* s, const T* u, const T* t, int64_t B, int64_t K, int64_t L, T* loss, T* rest, T* inv,
             int n_threads) {
    for_each_row<T>("pl_forward: the per-thread scratch (K values)", B, K, n_threads, [=](int64_t b, T* e, T* r) {
        const T* ub = u == nullptr ? nullptr : u + b * L;
        const T* tb = t == nullptr ? nullptr : t + b;
        const int64_t Lb = u == nullptr ? 0 : L;
        fwd_row(s + b * K, ub, tb, K, Lb, e, r, loss + b, rest + b, inv + b);
        if (std::isinf(rest[b]) && has_nan(ub, Lb, tb)) {  // the NaN rule: the row again, with rest NaN
            rest[b] = std::numeric_limits<T>::quiet_NaN();
            ranked_row(s + b * K, K, rest[b], T(1), e, r, loss + b, inv + b, static_cast<T*>(nullptr));
        }
    });
}

template <typename T>
void backward(const T* go, const T* s, const T* u, const T* t, const T* rest, const T* inv, int64_t B, int64_t K,
              int64_t L, T* gs, T* gu, T* gt, int n_threads) {
    for_each_row<T>("pl_backward: the per-thread scratch (K values)", B, K, n_threads, [=](int64_t b, T* e, T* r) {
        bwd_row(go[b], s + b * K, u == nullptr ? nullptr : u + b * L, t == nullptr ? nullptr : t + b, rest[b], inv[b],
                K, L, e, r, gs + b * K, u == nullptr ? nullptr : gu + b * L, t == nullptr ? nullptr : gt + b);
    });
}

}  // namespace

void register_plackett_luce(py::module_& m) {
    m.def(
        "pl_forward",
        [](std::uintptr_t s, std::uintptr_t u, std::uintptr_t t, int64_t B, int64_t K, int64_t L, bool is_double,
           std::uintptr_t loss, std::uintptr_t rest, std::uintptr_t inv, int n_threads) {
            kdfast::by_dtype(is_double, [&](auto tag) {
                using T = typename decltype(tag)::type;
                forward<T>(as_ptr<const T>(s), opt_ptr<T>(u), opt_ptr<T>(t), B, K, L, as_ptr<T>(loss), as_ptr<T>(rest),
                           as_ptr<T>(inv), n_threads);
            });
        },
        "Plackett-Luce forward: per-row loss, log(rest mass) and log(sum_k 1/D_k); u, t may be 0 (absent)");
    m.def(
        "pl_backward",
        [](std::uintptr_t go, std::uintptr_t s, std::uintptr_t u, std::uintptr_t t, std::uintptr_t rest,
           std::uintptr_t inv, int64_t B, int64_t K, int64_t L, bool is_double, std::uintptr_t gs, std::uintptr_t gu,
           std::uintptr_t gt, int n_threads) {
            kdfast::by_dtype(is_double, [&](auto tag) {
                using T = typename decltype(tag)::type;
                backward<T>(as_ptr<const T>(go), as_ptr<const T>(s), opt_ptr<T>(u), opt_ptr<T>(t),
                            as_ptr<const T>(rest), as_ptr<const T>(inv), B, K, L, as_ptr<T>(gs), as_ptr<T>(gu),
                            as_ptr<T>(gt), n_threads);
            });
        },
        "Plackett-Luce backward: score gradients times the per-row grad_output");
}
