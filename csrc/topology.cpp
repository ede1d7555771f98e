// Topology Distillation kernels (FTD and HTD entity level) on the CPU, never forming N x N.
//
// Notation: t [N, dt], s [N, ds] row-major; A, B their row-normalised versions (a row of norm 0 maps to
// 0 and gets gradient 0); Z = [A | B], width D = dt + ds.
//
// ftd: L = ||A A^T - B B^T||_F^2 = sum_ij sgn_ij Q_ij^2 with Q = Z^T Z (D x D) and sgn = +1 on the
//   diagonal blocks (AA, BB), -1 on the off-diagonal blocks (AB, BA). Gradient: dL/dZ = 4 Z W with
//   W = sgn * Q, then per part dL/dx_a = inv_a (g_a - u_a <u_a, g_a>).
//   Memory plan: each thread accumulates a D x D (double) partial Gram over its contiguous row range, in
//   blocks of kRows rows normalised into a transposed [D][kRows] buffer (dots of contiguous vectors);
//   partials are reduced in thread order (deterministic for a thread count). The gradient pass reads W
//   (D x D, cache resident) and a block of rows, and writes the gradient rows. Extra memory O(T D^2).
//
// grouped (HTD entity level), rows visited in group-sorted order perm (offsets [G+1]):
//   L = sum_{a,b same group [, <A_a,A_b> > 0]} (<B_a,B_b> - <A_a,A_b>)^2 ; dL/dB_a = 4 sum_b m_ab diff_ab B_b
//   filter on: tiles of kTile a-rows x kTile b-rows inside one group; cosines recomputed from
//     normalised group-sorted copies An [N, dt], Bn [N, ds] (O(N D) extra); each work item (group,
//     a-tile) owns its loss slot and its gradient rows, so the result does not depend on scheduling.
//   filter off: per-group Gram rewrite (as ftd, per group), parallel over groups.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "bindings.h"
#include "buffers.h"
#include "dispatch.h"
#include "parallel.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr int kRows = 64;  // rows per Gram / gradient block
constexpr int kTile = 64;  // a-rows and b-rows per tile of the grouped kernel

template <typename T>
struct acc_of {
    using type = float;
};
template <>
struct acc_of<double> {
    using type = double;
};

// inv norm of a row (0 for a zero row), accumulated in Acc
template <typename T, typename Acc>
inline Acc inv_norm(const T* x, int64_t d) {
    Acc ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t k = 0; k < d; ++k) ss += Acc(x[k]) * Acc(x[k]);
    return ss > 0 ? Acc(1) / std::sqrt(ss) : Acc(0);
}

using kdfast::simd_dot;

// The scratch of gram_rows for rows of width D: z [kRows x D] and the block Gram qb [D x D], allocated
// once per thread before its loop (through RegionErrors::run), so that gram_rows never allocates. (Its
// call then needs no RegionErrors::run around it, which cost the Gram loop a third of its speed.)
template <typename Acc>
struct GramScratch {
    std::vector<Acc> z, qb;
    void resize(int64_t D) {
        z.resize(size_t(kRows) * D);
        qb.resize(size_t(D) * D);
    }
};

inline int64_t row_of(const int64_t* perm, int64_t i) { return perm ? perm[i] : i; }

// Q (upper triangle, D x D double) += Z^T Z over the rows perm[r0..r1) (or r0..r1 when perm is null).
// Per block of kRows rows: normalised rows z [kRows][D], then rank-kRows update of an Acc block Gram by
// contiguous axpys (Q_i,j>=i += z_ri z_r,j>=i; vectorises without reductions), flushed into Q (double).
template <typename T>
void gram_rows(const T* t, const T* s, const int64_t* perm, int64_t r0, int64_t r1, int64_t dt, int64_t ds,
               GramScratch<typename acc_of<T>::type>& sc, double* Q) {
    using Acc = typename acc_of<T>::type;
    const int64_t D = dt + ds;
    Acc* const z = sc.z.data();
    Acc* const qb = sc.qb.data();
    for (int64_t b0 = r0; b0 < r1; b0 += kRows) {
        const int nb = int(std::min<int64_t>(kRows, r1 - b0));
        for (int r = 0; r < nb; ++r) {
            const int64_t row = row_of(perm, b0 + r);
            const T* tr = t + row * dt;
            const T* sr = s + row * ds;
            const Acc it = inv_norm<T, Acc>(tr, dt), is = inv_norm<T, Acc>(sr, ds);
            Acc* zr = &z[size_t(r) * D];
            for (int64_t c = 0; c < dt; ++c) zr[c] = Acc(tr[c]) * it;
            for (int64_t c = 0; c < ds; ++c) zr[dt + c] = Acc(sr[c]) * is;
        }
        for (int64_t i = 0; i < D; ++i) {
            Acc* qi = &qb[size_t(i) * D];
            std::fill(qi + i, qi + D, Acc(0));
            for (int r = 0; r < nb; ++r) {
                const Acc* zr = &z[size_t(r) * D];
                const Acc zi = zr[i];
                if (zi == Acc(0)) continue;
#pragma omp simd
                for (int64_t j = i; j < D; ++j) qi[j] += zi * zr[j];
            }
            double* Qi = Q + i * D;
            for (int64_t j = i; j < D; ++j) Qi[j] += double(qi[j]);
        }
    }
}

// Mirror the upper triangle; return sum sgn Q^2; write W = sgn * Q (as Acc) when W is non-null.
template <typename Acc>
double finish_gram(double* Q, int64_t dt, int64_t D, Acc* W) {
    double loss = 0;
    for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j < D; ++j) {
            if (j < i) Q[i * D + j] = Q[j * D + i];
            const double q = Q[i * D + j];
            const double sg = ((i < dt) == (j < dt)) ? 1.0 : -1.0;
            loss += sg * q * q;
            if (W) W[i * D + j] = Acc(sg * q);
        }
    return loss;
}

// Gradient rows for rows perm[r0..r1): dZ = scale * Z W restricted to columns [c0, D), projected
// through the normalisation of the teacher part (if c0 == 0) and the student part, written to gt/gs.
template <typename T>
void grad_rows(const T* t, const T* s, const int64_t* perm, int64_t r0, int64_t r1, int64_t dt, int64_t ds,
               const typename acc_of<T>::type* W, int64_t c0, typename acc_of<T>::type scale, T* gt, T* gs) {
    using Acc = typename acc_of<T>::type;
    const int64_t D = dt + ds, w = D - c0;
    std::vector<Acc> z(size_t(kRows) * D), acc(size_t(kRows) * w), inv(size_t(kRows) * 2);
    for (int64_t b0 = r0; b0 < r1; b0 += kRows) {
        const int nb = int(std::min<int64_t>(kRows, r1 - b0));
        for (int r = 0; r < nb; ++r) {
            const int64_t row = row_of(perm, b0 + r);
            const T* tr = t + row * dt;
            const T* sr = s + row * ds;
            Acc* zr = &z[size_t(r) * D];
            inv[2 * r] = inv_norm<T, Acc>(tr, dt);
            inv[2 * r + 1] = inv_norm<T, Acc>(sr, ds);
            for (int64_t c = 0; c < dt; ++c) zr[c] = Acc(tr[c]) * inv[2 * r];
            for (int64_t c = 0; c < ds; ++c) zr[dt + c] = Acc(sr[c]) * inv[2 * r + 1];
        }
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t i = 0; i < D; ++i) {
            const Acc* wi = W + i * D + c0;
            for (int r = 0; r < nb; ++r) {
                const Acc zi = z[size_t(r) * D + i];
                if (zi == Acc(0)) continue;
                Acc* ar = &acc[size_t(r) * w];
#pragma omp simd
                for (int64_t j = 0; j < w; ++j) ar[j] += zi * wi[j];
            }
        }
        for (int r = 0; r < nb; ++r) {
            const int64_t row = row_of(perm, b0 + r);
            const Acc* zr = &z[size_t(r) * D];
            Acc* ar = &acc[size_t(r) * w];
            if (c0 == 0 && gt) {
                const Acc pd = simd_dot(zr, ar, dt);
                for (int64_t c = 0; c < dt; ++c) gt[row * dt + c] = T(inv[2 * r] * scale * (ar[c] - zr[c] * pd));
            }
            if (gs) {
                const Acc* zs = zr + dt;
                const Acc* as = ar + (dt - c0);
                const Acc pd = simd_dot(zs, as, ds);
                for (int64_t c = 0; c < ds; ++c) gs[row * ds + c] = T(inv[2 * r + 1] * scale * (as[c] - zs[c] * pd));
            }
        }
    }
}

template <typename T>
double ftd_impl(const T* t, const T* s, int64_t n, int64_t dt, int64_t ds, T* gt, T* gs, int n_threads) {
    using Acc = typename acc_of<T>::type;
    const int64_t D = dt + ds;
    n_threads = int(std::max<int64_t>(1, std::min<int64_t>(n_threads, (n + kRows - 1) / kRows)));
    std::vector<double> part(kdfast::scratch_count("topology_ftd: the per-thread Gram matrices (D x D values)",
                                                   sizeof(double), {n_threads, D, D}),
                             0.0);
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(n_threads)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int tid = 0, nt = 1;
#endif
        const int64_t r0 = n * tid / nt, r1 = n * (tid + 1) / nt;
        GramScratch<Acc> sc;
        errors.run([&] { sc.resize(D); });
        if (!errors.failed()) gram_rows(t, s, nullptr, r0, r1, dt, ds, sc, &part[size_t(tid) * D * D]);
    }
    errors.rethrow();
    std::vector<double> Q(size_t(D) * D, 0.0);
    for (int k = 0; k < n_threads; ++k)
        for (size_t e = 0; e < Q.size(); ++e) Q[e] += part[size_t(k) * D * D + e];
    const bool grads = gt || gs;
    std::vector<Acc> W(grads ? size_t(D) * D : 0);
    const double loss = finish_gram<Acc>(Q.data(), dt, D, grads ? W.data() : nullptr);
    if (grads) {
        const int64_t c0 = gt ? 0 : dt;
#pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int64_t b = 0; b < (n + kRows - 1) / kRows; ++b) {
            if (errors.failed()) continue;
            errors.run(b, [&] {
                grad_rows(t, s, nullptr, b * kRows, std::min(n, (b + 1) * kRows), dt, ds, W.data(), c0, Acc(4), gt, gs);
            });
        }
        errors.rethrow();
    }
    return loss;
}

// Per-group Gram rewrite (no teacher-cosine filter); gradient to the student only.
template <typename T>
std::pair<double, int64_t> grouped_gram_impl(const T* t, const T* s, const int64_t* perm, const int64_t* off,
                                             int64_t n_groups, int64_t dt, int64_t ds, T* gs, int n_threads) {
    using Acc = typename acc_of<T>::type;
    const int64_t D = dt + ds;
    std::vector<double> gloss(n_groups, 0.0);
    const size_t n_q =
        kdfast::scratch_count("topology_grouped: the Gram matrix (D x D values)", sizeof(double), {D, D});
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(kdfast::team_size(n_threads))
    {
        std::vector<double> Q;
        std::vector<Acc> W;
        GramScratch<Acc> sc;
        errors.run([&] {
            Q.resize(n_q);
            W.resize(gs ? n_q : 0);
            sc.resize(D);
        });
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < n_groups; ++g) {
            if (off[g + 1] == off[g] || errors.failed()) continue;
            std::fill(Q.begin(), Q.end(), 0.0);
            gram_rows(t, s, perm, off[g], off[g + 1], dt, ds, sc, Q.data());
            gloss[g] = finish_gram<Acc>(Q.data(), dt, D, gs ? W.data() : nullptr);
            if (gs)
                errors.run(g, [&] {
                    grad_rows(t, s, perm, off[g], off[g + 1], dt, ds, W.data(), dt, Acc(4), (T*)nullptr, gs);
                });
        }
    }
    errors.rethrow();
    double loss = 0;
    int64_t count = 0;
    for (int64_t g = 0; g < n_groups; ++g) {
        loss += gloss[g];
        count += (off[g + 1] - off[g]) * (off[g + 1] - off[g]);
    }
    return {loss, count};
}

// Tiled masked kernel (teacher-cosine filter on); gradient to the student only.
template <typename T>
std::pair<double, int64_t> grouped_tiled_impl(const T* t, const T* s, const int64_t* perm, const int64_t* off,
                                              int64_t n, int64_t n_groups, int64_t dt, int64_t ds, bool filter, T* gs,
                                              int n_threads) {
    using Acc = typename acc_of<T>::type;
    std::vector<Acc> an(size_t(n) * dt), bn(size_t(n) * ds), invs(n);
#pragma omp parallel for schedule(static) num_threads(kdfast::team_size(n_threads))
    for (int64_t i = 0; i < n; ++i) {
        const T* tr = t + perm[i] * dt;
        const T* sr = s + perm[i] * ds;
        const Acc it = inv_norm<T, Acc>(tr, dt), is = inv_norm<T, Acc>(sr, ds);
        invs[i] = is;
        for (int64_t c = 0; c < dt; ++c) an[size_t(i) * dt + c] = Acc(tr[c]) * it;
        for (int64_t c = 0; c < ds; ++c) bn[size_t(i) * ds + c] = Acc(sr[c]) * is;
    }
    // work items = tiles of one group, in group order; each tile also kept transposed and zero padded
    // ([dt][kTile] and [ds][kTile]) so that a row's cosines with a b-tile are contiguous axpys.
    std::vector<std::pair<int64_t, int64_t>> items;  // (tile start, group)
    std::vector<int64_t> first_item(n_groups + 1);
    for (int64_t g = 0; g < n_groups; ++g) {
        first_item[g] = int64_t(items.size());
        for (int64_t a = off[g]; a < off[g + 1]; a += kTile) items.emplace_back(a, g);
    }
    first_item[n_groups] = int64_t(items.size());
    const int64_t n_items = int64_t(items.size());
    std::vector<Acc> at(size_t(n_items) * dt * kTile, Acc(0)), bt(size_t(n_items) * ds * kTile, Acc(0));
#pragma omp parallel for schedule(static) num_threads(kdfast::team_size(n_threads))
    for (int64_t w = 0; w < n_items; ++w) {
        const int64_t a0 = items[w].first, a1 = std::min(a0 + kTile, off[items[w].second + 1]);
        for (int64_t a = a0; a < a1; ++a) {
            for (int64_t k = 0; k < dt; ++k) at[(size_t(w) * dt + k) * kTile + (a - a0)] = an[size_t(a) * dt + k];
            for (int64_t k = 0; k < ds; ++k) bt[(size_t(w) * ds + k) * kTile + (a - a0)] = bn[size_t(a) * ds + k];
        }
    }
    std::vector<double> iloss(items.size(), 0.0);
    std::vector<int64_t> icount(items.size(), 0);
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(kdfast::team_size(n_threads))
    {
        std::vector<Acc> gb;
        errors.run([&] { gb.resize(size_t(kTile) * ds); });
        alignas(64) Acc c[kTile], gm[kTile];
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < n_items; ++w) {
            if (errors.failed()) continue;
            const int64_t a0 = items[w].first, g = items[w].second;
            const int64_t a1 = std::min(a0 + kTile, off[g + 1]);
            std::fill(gb.begin(), gb.end(), Acc(0));
            double lsum = 0;
            int64_t cnt = 0;
            for (int64_t wb = first_item[g]; wb < first_item[g + 1]; ++wb) {
                const int64_t b0 = items[wb].first;
                const int nbb = int(std::min<int64_t>(kTile, off[g + 1] - b0));
                const Acc* atile = &at[size_t(wb) * dt * kTile];
                const Acc* btile = &bt[size_t(wb) * ds * kTile];
                for (int64_t a = a0; a < a1; ++a) {
                    const Acc* aa = &an[size_t(a) * dt];
                    const Acc* ba = &bn[size_t(a) * ds];
                    std::fill(c, c + kTile, Acc(0));
                    std::fill(gm, gm + kTile, Acc(0));
                    for (int64_t k = 0; k < dt; ++k) {
                        const Acc x = aa[k];
                        const Acc* col = atile + k * kTile;
#pragma omp simd
                        for (int j = 0; j < kTile; ++j) c[j] += x * col[j];
                    }
                    for (int64_t k = 0; k < ds; ++k) {
                        const Acc x = ba[k];
                        const Acc* col = btile + k * kTile;
#pragma omp simd
                        for (int j = 0; j < kTile; ++j) gm[j] += x * col[j];
                    }
                    Acc rl = 0;
                    int64_t rc = 0;
                    for (int j = 0; j < nbb; ++j) {
                        const bool keep = !filter || c[j] > Acc(0);
                        const Acc diff = keep ? gm[j] - c[j] : Acc(0);
                        gm[j] = diff;
                        rl += diff * diff;
                        rc += keep;
                    }
                    lsum += double(rl);
                    cnt += rc;
                    if (gs) {
                        Acc* ga = &gb[size_t(a - a0) * ds];
                        for (int64_t k = 0; k < ds; ++k) {
                            const Acc* col = btile + k * kTile;
                            Acc acc = 0;
#pragma omp simd reduction(+ : acc)
                            for (int j = 0; j < kTile; ++j) acc += gm[j] * col[j];
                            ga[k] += acc;
                        }
                    }
                }
            }
            iloss[w] = lsum;
            icount[w] = cnt;
            if (gs) {
                for (int64_t a = a0; a < a1; ++a) {
                    const Acc* ba = &bn[size_t(a) * ds];
                    const Acc* ga = &gb[size_t(a - a0) * ds];
                    const Acc pd = simd_dot(ba, ga, ds);
                    T* out = gs + perm[a] * ds;
                    for (int64_t k = 0; k < ds; ++k) out[k] = T(invs[a] * Acc(4) * (ga[k] - ba[k] * pd));
                }
            }
        }
    }
    errors.rethrow();
    double loss = 0;
    int64_t count = 0;
    for (size_t w = 0; w < items.size(); ++w) {
        loss += iloss[w];
        count += icount[w];
    }
    return {loss, count};
}

double ftd(std::uintptr_t t, std::uintptr_t s, int64_t n, int64_t dt, int64_t ds, bool is_double, std::uintptr_t gt,
           std::uintptr_t gs, int n_threads) {
    py::gil_scoped_release release;
    return kdfast::by_dtype(is_double, [&](auto tag) {
        using T = typename decltype(tag)::type;
        return ftd_impl(kdfast::as_ptr<const T>(t), kdfast::as_ptr<const T>(s), n, dt, ds, kdfast::mut_ptr<T>(gt),
                        kdfast::mut_ptr<T>(gs), n_threads);
    });
}

std::pair<double, int64_t> grouped(std::uintptr_t t, std::uintptr_t s, std::uintptr_t perm, std::uintptr_t off,
                                   int64_t n, int64_t n_groups, int64_t dt, int64_t ds, bool filter, bool is_double,
                                   std::uintptr_t gs, int n_threads) {
    py::gil_scoped_release release;
    const int64_t* p = kdfast::as_ptr<const int64_t>(perm);
    const int64_t* o = kdfast::as_ptr<const int64_t>(off);
    return kdfast::by_dtype(is_double, [&](auto tag) {
        using T = typename decltype(tag)::type;
        const T* tt = kdfast::as_ptr<const T>(t);
        const T* ss = kdfast::as_ptr<const T>(s);
        return filter ? grouped_tiled_impl(tt, ss, p, o, n, n_groups, dt, ds, true, kdfast::mut_ptr<T>(gs), n_threads)
                      : grouped_gram_impl(tt, ss, p, o, n_groups, dt, ds, kdfast::mut_ptr<T>(gs), n_threads);
    });
}

}  // namespace

void register_topology(pybind11::module_& m) {
    m.def("topology_ftd", &ftd, "FTD loss via the Gram rewrite; gradients written when gt/gs are non-zero",
          py::arg("t"), py::arg("s"), py::arg("n"), py::arg("dt"), py::arg("ds"), py::arg("is_double"), py::arg("gt"),
          py::arg("gs"), py::arg("n_threads"));
    m.def("topology_grouped", &grouped, "HTD entity-level loss over group-sorted rows -> (loss, count)", py::arg("t"),
          py::arg("s"), py::arg("perm"), py::arg("offsets"), py::arg("n"), py::arg("n_groups"), py::arg("dt"),
          py::arg("ds"), py::arg("teacher_cos_filter"), py::arg("is_double"), py::arg("gs"), py::arg("n_threads"));
}
