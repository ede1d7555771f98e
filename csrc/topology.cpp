// Topology Distillation kernels (FTD and HTD entity level) on the CPU, never forming N x N.
//
// Notation: t [N, dt], s [N, ds] row-major; A, B their row-normalised versions (a row of norm 0 maps to
// 0 and gets gradient 0; the norm is scale-free: rows of norm 1e20 or 1e-25 in float32 keep their
// direction, see normalize_row); Z = [A | B], width D = dt + ds.
//
// ftd: L = ||A A^T - B B^T||_F^2 = sum_ij sgn_ij Q_ij^2 with Q = Z^T Z (D x D) and sgn = +1 on the
//   diagonal blocks (AA, BB), -1 on the off-diagonal blocks (AB, BA). Gradient: dL/dZ = 4 Z W with
//   W = sgn * Q, then per part dL/dx_a = inv_a (g_a - u_a <u_a, g_a>).
//   Memory plan: each thread accumulates a D x D (double) partial Gram over its contiguous row range, in
//   blocks of kRows rows normalised into z [kRows][D], whose Gram (upper triangle; float: register tiles of 4 x 16
//   summed over the block's rows in float) is added to the double partial; partials are reduced in thread order
//   (deterministic for a thread count). The gradient pass reads W (D x D, cache resident; float: the needed columns
//   in a padded copy, register tiles of 4 rows x 24 columns) and a block of rows, and writes the gradient rows.
//   Extra memory O(T D^2).
//
// grouped (HTD entity level), rows visited in group-sorted order perm (offsets [G+1]):
//   L = sum_{a,b same group [, <A_a,A_b> > 0]} (<B_a,B_b> - <A_a,A_b>)^2 ; dL/dB_a = 4 sum_b m_ab diff_ab B_b
//   filter on: tiles of kTile a-rows x kTile b-rows inside one group; cosines recomputed from
//     normalised group-sorted copies An [N, dt], Bn [N, ds] and transposed b-tiles (under 3 N D values
//     extra in all, whatever the number of groups: see grouped_tiled_impl); each work item (group,
//     a-tile) owns its loss slot and its gradient rows, so the result does not depend on scheduling.
//   filter off: per-group Gram rewrite (as ftd, per group), parallel over groups; extra memory per
//     thread: the group's D x D Gram (double), W and a block Gram (D x D each), kRows rows of scratch;
//     and one double per group.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "bindings.h"
#include "buffers.h"
#include "dispatch.h"
#include "parallel.h"
#include "simd.h"

// The vector helpers are always inlined: no vector crosses a call (GCC's ABI note does not apply).
#pragma GCC diagnostic ignored "-Wpsabi"

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

// Row normalisation, scale-free: z = x / ||x|| (in Acc) and the inverse norm 1 / ||x|| (which the
// gradient's projection scales by). Every ordinary row takes z = x * (1 / sqrt(sum x^2)). When that sum
// overflows, or is so small that squares below the smallest normal number could matter (rows of norm 1e20 or
// 1e-25 in float32), the row is divided by its largest magnitude m before squaring:
// z = (x / m) / sqrt(sum (x / m)^2), inverse norm 1 / (m sqrt(...)) (inf only for a row whose norm is
// below 1 / max, i.e. of subnormal entries; z stays exact). A row of norm 0 gets z = 0 and inverse norm 0; so
// does a row holding a NaN or an inf (z = x * 0 then keeps NaN where x is not finite).
template <typename T, typename Acc>
__attribute__((noinline, cold)) Acc normalize_scaled(const T* x, int64_t d, Acc plain_squares, Acc* z) {
    Acc m = 0;
    for (int64_t k = 0; k < d; ++k) m = std::max(m, std::fabs(Acc(x[k])));
    if (std::isnan(plain_squares) || !(m > 0 && m <= std::numeric_limits<Acc>::max())) {
        for (int64_t k = 0; k < d; ++k) z[k] = Acc(x[k]) * Acc(0);
        return 0;
    }
    Acc ss = 0;
    for (int64_t k = 0; k < d; ++k) {
        const Acc y = Acc(x[k]) / m;
        ss += y * y;
    }
    const Acc nrm = std::sqrt(ss);  // in [1, sqrt(d)]
    for (int64_t k = 0; k < d; ++k) z[k] = Acc(x[k]) / m / nrm;
    return Acc(1) / (m * nrm);
}

template <typename T, typename Acc>
KDFAST_INLINE Acc normalize_row(const T* x, int64_t d, Acc* z) {
    Acc ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t k = 0; k < d; ++k) ss += Acc(x[k]) * Acc(x[k]);
    // sums of d squares of at least this much lose nothing to subnormal squares (d < 2^23)
    const Acc lowest = std::numeric_limits<Acc>::min() * Acc(1 << 24);
    if (!(ss >= lowest && ss <= std::numeric_limits<Acc>::max())) return normalize_scaled(x, d, ss, z);
    const Acc inv = Acc(1) / std::sqrt(ss);
    for (int64_t k = 0; k < d; ++k) z[k] = Acc(x[k]) * inv;
    return inv;
}

using kdfast::simd_dot;

// The scratch of gram_rows for rows of width D: z [kRows x D] and the block Gram qb [D x D], allocated
// once per thread before its loop (through RegionErrors::run), so that gram_rows never allocates. (Its
// call then needs no RegionErrors::run around it, which cost the Gram loop a third of its speed.)
template <typename Acc>
struct GramScratch {
    std::vector<Acc> z, qb, zp;
    void resize(int64_t D) {
        z.assign(size_t(kRows) * padded(D), Acc(0));  // columns D.. stay zero
        qb.resize(size_t(padded(D)) * padded(D));
        zp.resize(std::is_same_v<Acc, float> ? size_t(kRows) * padded(D) : 0);
    }
    // the row stride of z: float rows padded to whole 16-float panels (gram_tiles_f32)
    static int64_t padded(int64_t D) { return std::is_same_v<Acc, float> ? (D + 15) / 16 * 16 : D; }
};

using kdfast::load8;
using kdfast::v8f;

// Q (upper triangle, D x D double) += Z^T Z over nb float rows z [nb][Dp] (columns D..Dp zero; Dp a
// multiple of 16), by register tiles of 4 Gram rows i x 16 columns j (8 vector accumulators) stored into
// the block Gram qb [Dp][Dp]: each element sums its nb products in row order, as the axpy loop of gram_rows
// does (a zero z_ri adds fma(0, z_rj, q) = q there, which that loop skips), then is added to Q.
KDFAST_INLINE void gram_tiles_f32(const float* z, int nb, int64_t D, int64_t Dp, float* zp, float* qb, double* Q) {
    constexpr int PW = 16;
    // z's columns in panels of PW, zp [Dp / PW][nb][PW]: a tile reads two panels of nb x PW floats
    for (int64_t p = 0; p < Dp / PW; ++p)
        for (int r = 0; r < nb; ++r)
            std::memcpy(zp + (p * nb + r) * PW, z + size_t(r) * Dp + p * PW, sizeof(float) * PW);
    for (int64_t i0 = 0; i0 < D; i0 += 4) {
        const float* pi = zp + (i0 / PW) * nb * PW + i0 % PW;
        for (int64_t j0 = i0 / PW * PW; j0 < D; j0 += PW) {
            const float* pj = zp + (j0 / PW) * nb * PW;
            v8f a[4][2] = {};
            for (int r = 0; r < nb; ++r) {
                const v8f x0 = load8(pj + r * PW), x1 = load8(pj + r * PW + 8);
                for (int ii = 0; ii < 4; ++ii) {
                    const float b = pi[r * PW + ii];
                    a[ii][0] += b * x0;
                    a[ii][1] += b * x1;
                }
            }
            for (int ii = 0; ii < 4; ++ii) std::memcpy(qb + (i0 + ii) * Dp + j0, a[ii], sizeof a[ii]);
        }
    }
    // flushed row by row (contiguous): Q's memory is walked once per block, not once per tile
    for (int64_t i = 0; i < D; ++i) {
        const float* qi = qb + i * Dp;
        double* Qi = Q + i * D;
        for (int64_t j = i; j < D; ++j) Qi[j] += double(qi[j]);
    }
}

inline int64_t row_of(const int64_t* perm, int64_t i) { return perm ? perm[i] : i; }

// Q (upper triangle, D x D double) += Z^T Z over the rows perm[r0..r1) (or r0..r1 when perm is null).
// Per block of kRows rows: normalised rows z [kRows][D], then (float) gram_tiles_f32, or (double) a
// rank-kRows update of a block Gram by contiguous axpys (Q_i,j>=i += z_ri z_r,j>=i; vectorises without
// reductions), flushed into Q.
template <typename T>
KDFAST_INLINE void gram_rows(const T* t, const T* s, const int64_t* perm, int64_t r0, int64_t r1, int64_t dt,
                             int64_t ds, GramScratch<typename acc_of<T>::type>& sc, double* Q) {
    using Acc = typename acc_of<T>::type;
    const int64_t D = dt + ds, Dp = GramScratch<Acc>::padded(D);
    Acc* const z = sc.z.data();
    Acc* const qb = sc.qb.data();
    for (int64_t b0 = r0; b0 < r1; b0 += kRows) {
        const int nb = int(std::min<int64_t>(kRows, r1 - b0));
        for (int r = 0; r < nb; ++r) {
            const int64_t row = row_of(perm, b0 + r);
            Acc* zr = &z[size_t(r) * Dp];
            normalize_row(t + row * dt, dt, zr);
            normalize_row(s + row * ds, ds, zr + dt);
        }
        if constexpr (std::is_same_v<Acc, float>) {
            gram_tiles_f32(z, nb, D, Dp, sc.zp.data(), qb, Q);
            continue;
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

// acc [r][j0 .. j0 + 8 NV) = sum_i z_ri Wp_i,j for the 4 rows r0.. (float), i in order 0..D-1 (as the
// axpy loop of grad_rows, whose skip of a zero z_ri changes no sum: fma(0, w, a) = a).
template <int NV>
KDFAST_INLINE void grad_tile_f32(const float* z, int64_t D, int r0, const float* Wp, int64_t wp, int64_t j0,
                                 float* acc) {
    v8f a[4][NV] = {};
    for (int64_t i = 0; i < D; ++i) {
        v8f x[NV];
        for (int v = 0; v < NV; ++v) x[v] = load8(Wp + i * wp + j0 + 8 * v);
        for (int rr = 0; rr < 4; ++rr) {
            const float b = z[size_t(r0 + rr) * D + i];
            for (int v = 0; v < NV; ++v) a[rr][v] += b * x[v];
        }
    }
    for (int rr = 0; rr < 4; ++rr) std::memcpy(acc + size_t(r0 + rr) * wp + j0, a[rr], sizeof(v8f) * NV);
}

// acc [nb][wp] = z [nb][D] Wp [D][wp] in register tiles of 4 rows x up to 24 columns (rows past nb, up
// to kRows, are computed from z's spare rows and never read).
KDFAST_INLINE void grad_tiles_f32(const float* z, int nb, int64_t D, const float* Wp, int64_t wp, float* acc) {
    for (int r0 = 0; r0 < nb; r0 += 4) {
        int64_t j0 = 0;
        for (; j0 + 24 <= wp; j0 += 24) grad_tile_f32<3>(z, D, r0, Wp, wp, j0, acc);
        if (wp - j0 == 16) grad_tile_f32<2>(z, D, r0, Wp, wp, j0, acc);
        if (wp - j0 == 8) grad_tile_f32<1>(z, D, r0, Wp, wp, j0, acc);
    }
}

// Gradient rows for rows perm[r0..r1): dZ = scale * Z W restricted to columns [c0, D), projected
// through the normalisation of the teacher part (if c0 == 0) and the student part, written to gt/gs.
template <typename T>
KDFAST_INLINE void grad_rows(const T* t, const T* s, const int64_t* perm, int64_t r0, int64_t r1, int64_t dt,
                             int64_t ds, const typename acc_of<T>::type* W, int64_t c0, typename acc_of<T>::type scale,
                             T* gt, T* gs) {
    using Acc = typename acc_of<T>::type;
    const int64_t D = dt + ds, w = D - c0;
    // float: W's columns [c0, D) copied with rows padded to whole 8-float vectors (grad_tiles_f32)
    const int64_t wp = std::is_same_v<Acc, float> ? (w + 7) / 8 * 8 : w;
    std::vector<Acc> z(size_t(kRows) * D), acc(size_t(kRows) * wp), inv(size_t(kRows) * 2), wpad;
    if constexpr (std::is_same_v<Acc, float>) {
        wpad.assign(size_t(D) * wp, Acc(0));
        for (int64_t i = 0; i < D; ++i) std::memcpy(&wpad[size_t(i) * wp], W + i * D + c0, sizeof(Acc) * w);
    }
    for (int64_t b0 = r0; b0 < r1; b0 += kRows) {
        const int nb = int(std::min<int64_t>(kRows, r1 - b0));
        for (int r = 0; r < nb; ++r) {
            const int64_t row = row_of(perm, b0 + r);
            Acc* zr = &z[size_t(r) * D];
            inv[2 * r] = normalize_row(t + row * dt, dt, zr);
            inv[2 * r + 1] = normalize_row(s + row * ds, ds, zr + dt);
        }
        if constexpr (std::is_same_v<Acc, float>) {
            grad_tiles_f32(z.data(), nb, D, wpad.data(), wp, acc.data());
        } else {
            std::fill(acc.begin(), acc.end(), Acc(0));
            for (int64_t i = 0; i < D; ++i) {
                const Acc* wi = W + i * D + c0;
                for (int r = 0; r < nb; ++r) {
                    const Acc zi = z[size_t(r) * D + i];
                    if (zi == Acc(0)) continue;
                    Acc* ar = &acc[size_t(r) * wp];
#pragma omp simd
                    for (int64_t j = 0; j < w; ++j) ar[j] += zi * wi[j];
                }
            }
        }
        for (int r = 0; r < nb; ++r) {
            const int64_t row = row_of(perm, b0 + r);
            const Acc* zr = &z[size_t(r) * D];
            Acc* ar = &acc[size_t(r) * wp];
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

// The float row loops compiled per instruction set (KDFAST_CLONES: x86-64-v3 and baseline); double runs
// the generic ones. gram_rows_any / grad_rows_any choose.
KDFAST_CLONES void gram_rows_f32(const float* t, const float* s, const int64_t* perm, int64_t r0, int64_t r1,
                                 int64_t dt, int64_t ds, GramScratch<acc_of<float>::type>& sc, double* Q) {
    gram_rows(t, s, perm, r0, r1, dt, ds, sc, Q);
}

KDFAST_CLONES void grad_rows_f32(const float* t, const float* s, const int64_t* perm, int64_t r0, int64_t r1,
                                 int64_t dt, int64_t ds, const acc_of<float>::type* W, int64_t c0,
                                 acc_of<float>::type scale, float* gt, float* gs) {
    grad_rows(t, s, perm, r0, r1, dt, ds, W, c0, scale, gt, gs);
}
template <typename T, typename... A>
inline void gram_rows_any(const T* t, A&&... a) {
    if constexpr (std::is_same_v<T, float>)
        gram_rows_f32(t, std::forward<A>(a)...);
    else
        gram_rows(t, std::forward<A>(a)...);
}
template <typename T, typename... A>
inline void grad_rows_any(const T* t, A&&... a) {
    if constexpr (std::is_same_v<T, float>)
        grad_rows_f32(t, std::forward<A>(a)...);
    else
        grad_rows(t, std::forward<A>(a)...);
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
        if (!errors.failed()) gram_rows_any(t, s, nullptr, r0, r1, dt, ds, sc, &part[size_t(tid) * D * D]);
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
                grad_rows_any(t, s, nullptr, b * kRows, std::min(n, (b + 1) * kRows), dt, ds, W.data(), c0, Acc(4), gt,
                              gs);
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
            gram_rows_any(t, s, perm, off[g], off[g + 1], dt, ds, sc, Q.data());
            gloss[g] = finish_gram<Acc>(Q.data(), dt, D, gs ? W.data() : nullptr);
            if (gs)
                errors.run(g, [&] {
                    grad_rows_any(t, s, perm, off[g], off[g + 1], dt, ds, W.data(), dt, Acc(4), (T*)nullptr, gs);
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

// The tile of rows [a0, a1) of an [N, dt] and bn [N, ds], transposed into at [dt][kTile] and bt [ds][kTile]
// (columns a1 - a0 on are left as they are), so that a row's cosines with the tile are contiguous axpys.
template <typename Acc>
inline void transpose_tile(const Acc* an, const Acc* bn, int64_t a0, int64_t a1, int64_t dt, int64_t ds, Acc* at,
                           Acc* bt) {
    for (int64_t a = a0; a < a1; ++a) {
        for (int64_t k = 0; k < dt; ++k) at[k * kTile + (a - a0)] = an[size_t(a) * dt + k];
        for (int64_t k = 0; k < ds; ++k) bt[k * kTile + (a - a0)] = bn[size_t(a) * ds + k];
    }
}

// Tiled masked kernel (teacher-cosine filter on); gradient to the student only.
// Work items are the a-tiles (kTile rows) of each group, in group order; item (g, a-tile) walks the
// b-tiles of group g. A b-tile is read transposed and zero padded ([dt][kTile], [ds][kTile]). The tiles
// of groups of more than kTile rows are transposed once, into shared arrays (fewer than 2 n_g (dt + ds)
// values for a group of n_g rows: its last tile is the only partial one); a group of at most kTile rows
// has one work item, whose thread transposes the group into its own scratch. Extra memory: an, bn and
// those tiles, under 3 N (dt + ds) values, plus kTile (dt + 2 ds) per thread and O(N) indices.
template <typename T>
std::pair<double, int64_t> grouped_tiled_impl(const T* t, const T* s, const int64_t* perm, const int64_t* off,
                                              int64_t n, int64_t n_groups, int64_t dt, int64_t ds, bool filter, T* gs,
                                              int n_threads) {
    using Acc = typename acc_of<T>::type;
    std::vector<Acc> an(size_t(n) * dt), bn(size_t(n) * ds), invs(n);
#pragma omp parallel for schedule(static) num_threads(kdfast::team_size(n_threads))
    for (int64_t i = 0; i < n; ++i) {
        normalize_row(t + perm[i] * dt, dt, &an[size_t(i) * dt]);
        invs[i] = normalize_row(s + perm[i] * ds, ds, &bn[size_t(i) * ds]);
    }
    std::vector<std::pair<int64_t, int64_t>> items;  // (tile start, group)
    std::vector<int64_t> first_item(n_groups + 1);
    std::vector<int64_t> slot;  // item -> its tile in at / bt (shared), or -1 (the group's only tile)
    int64_t n_shared = 0;
    for (int64_t g = 0; g < n_groups; ++g) {
        first_item[g] = int64_t(items.size());
        const bool shared = off[g + 1] - off[g] > kTile;
        for (int64_t a = off[g]; a < off[g + 1]; a += kTile) {
            items.emplace_back(a, g);
            slot.push_back(shared ? n_shared++ : -1);
        }
    }
    first_item[n_groups] = int64_t(items.size());
    const int64_t n_items = int64_t(items.size());
    std::vector<Acc> at(size_t(n_shared) * dt * kTile, Acc(0)), bt(size_t(n_shared) * ds * kTile, Acc(0));
#pragma omp parallel for schedule(static) num_threads(kdfast::team_size(n_threads))
    for (int64_t w = 0; w < n_items; ++w) {
        if (slot[w] < 0) continue;
        const int64_t a0 = items[w].first, a1 = std::min(a0 + kTile, off[items[w].second + 1]);
        transpose_tile(an.data(), bn.data(), a0, a1, dt, ds, &at[size_t(slot[w]) * dt * kTile],
                       &bt[size_t(slot[w]) * ds * kTile]);
    }
    std::vector<double> iloss(items.size(), 0.0);
    std::vector<int64_t> icount(items.size(), 0);
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(kdfast::team_size(n_threads))
    {
        std::vector<Acc> gb, own_at, own_bt;  // own_at, own_bt: zero beyond column `dirty`
        int64_t dirty = 0;
        errors.run([&] {
            gb.resize(size_t(kTile) * ds);
            own_at.resize(size_t(dt) * kTile);
            own_bt.resize(size_t(ds) * kTile);
        });
        alignas(64) Acc c[kTile], gm[kTile];
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < n_items; ++w) {
            if (errors.failed()) continue;
            const int64_t a0 = items[w].first, g = items[w].second;
            const int64_t a1 = std::min(a0 + kTile, off[g + 1]);
            if (slot[w] < 0) {  // the group is this one tile: transpose it here, zero what the last one left
                const int64_t nw = a1 - a0;
                transpose_tile(an.data(), bn.data(), a0, a1, dt, ds, own_at.data(), own_bt.data());
                for (int64_t k = 0; k < dt && nw < dirty; ++k)
                    std::fill(own_at.data() + k * kTile + nw, own_at.data() + k * kTile + dirty, Acc(0));
                for (int64_t k = 0; k < ds && nw < dirty; ++k)
                    std::fill(own_bt.data() + k * kTile + nw, own_bt.data() + k * kTile + dirty, Acc(0));
                dirty = nw;
            }
            std::fill(gb.begin(), gb.end(), Acc(0));
            double lsum = 0;
            int64_t cnt = 0;
            for (int64_t wb = first_item[g]; wb < first_item[g + 1]; ++wb) {
                const int64_t b0 = items[wb].first;
                const int nbb = int(std::min<int64_t>(kTile, off[g + 1] - b0));
                const Acc* atile = slot[wb] < 0 ? own_at.data() : &at[size_t(slot[wb]) * dt * kTile];
                const Acc* btile = slot[wb] < 0 ? own_bt.data() : &bt[size_t(slot[wb]) * ds * kTile];
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
