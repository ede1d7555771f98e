// Full-catalog log-tail (kdfast::full_catalog_log_tail) and its backward on the CPU.
//
// Math: S_bj = clamp(<u_b, v_j>, -c, c); X_b = canonical CSR row b (sorted ids, no repeats) of excluded items.
//   forward:  lt_b = log sum_{j not in X_b} exp(S_bj)                          (-inf if nothing is left)
//   backward: G_bj = g_b exp(S_bj - lt_b) [j not in X_b] [-c <= <u_b, v_j> <= c]
//             grad_user = G @ V (parallel over user rows), grad_item = G^T @ U (parallel over item blocks)
// Memory plan: nothing of size B x I; the item table is transposed once per call into tiles of 128 items
// ([I / 128][D][128], the size of V) that every thread reads, and each thread keeps one [kRows x kItems]
// score tile on its stack, so that every inner loop runs along items, 128 at a time: the scores, the
// exponentials (a polynomial the compiler vectorises, in float), and both gradient products (G @ V as dot
// products along the tile, G^T @ U into a transposed [D x kItems] accumulator of the item block; on one
// thread, the accumulators of every item tile, see backward_fused).
// Rows walk their sorted exclusion list with a pointer as the item blocks advance (binary search where a
// walk starts mid-row). Every output element is summed by one thread in a fixed order (item tiles, or
// rows, in increasing order; a fixed vector split within a tile): deterministic, the same bits for any
// thread count. The float kernels are compiled twice (KDFAST_CLONES: x86-64-v3 and baseline).
// The dot products and sums are accumulated in T (float for float32 inputs, double for float64).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "bindings.h"
#include "buffers.h"
#include "dispatch.h"
#include "parallel.h"
#include "simd.h"

namespace {

constexpr int64_t kRows = 32;
constexpr int64_t kItems = 128;

// e^x of eight floats: Cephes' expf reduction and polynomial (within 1 ulp of std::exp on [-87, 88], checked
// against it), in GCC vector arithmetic (AVX in the x86-64-v3 clones, SSE pairs otherwise); 0 below -87
// (e^-87 < 2^-125: nothing beside a row's largest term, which is 1), NaN for NaN.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only inside always-inline helpers (simd.h)
typedef int32_t v8i __attribute__((vector_size(32)));

KDFAST_INLINE kdfast::v8f splat8(float x) {  // one broadcast
    const kdfast::v4f t = {x, 0, 0, 0};
    return __builtin_shufflevector(t, t, 0, 0, 0, 0, 0, 0, 0, 0);
}

KDFAST_INLINE kdfast::v8f exp8(kdfast::v8f x) {
    using kdfast::v8f;
    const v8f lo = splat8(-87.0f), hi = splat8(88.0f), zero = splat8(0.0f);
    v8f xc = x < lo ? lo : x;  // NaN compares false: stays NaN
    xc = xc > hi ? hi : xc;
    const v8f t = (xc == xc ? xc : zero) * splat8(1.44269504088896341f);
    const v8i n = __builtin_convertvector(t + (t >= zero ? splat8(0.5f) : splat8(-0.5f)), v8i);  // [-126, 127]
    const v8f fn = __builtin_convertvector(n, v8f);
    const v8f r = (xc - fn * splat8(0.693359375f)) + fn * splat8(2.12194440e-4f);  // x - n ln 2, in two parts
    v8f p = splat8(1.9875691500e-4f);
    p = p * r + splat8(1.3981999507e-3f);
    p = p * r + splat8(8.3334519073e-3f);
    p = p * r + splat8(4.1665795894e-2f);
    p = p * r + splat8(1.6666665459e-1f);
    p = p * r + splat8(5.0000001201e-1f);
    const v8f y = p * (r * r) + r + splat8(1.0f);
    const v8i bits = (n + 127) << 23;  // 2^n
    v8f scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return x < lo ? zero : y * scale;
}

KDFAST_INLINE void store8(float* p, kdfast::v8f v) { std::memcpy(p, &v, sizeof(v)); }

// Eight marks as a lane mask (-1 where the mark is 0: the item counts).
KDFAST_INLINE v8i counts8(const int32_t* mk) {
    v8i m;
    std::memcpy(&m, mk, sizeof(m));
    return m == 0;
}

template <typename T>
struct Problem {
    const T* U;  // [B, D] user rows
    const T* V;  // [I, D] item rows
    int64_t B, I, D;
    const int64_t* indptr;  // exclusions (CSR, sorted rows)
    const int64_t* indices;
    T clamp;
    const T* G;   // backward: upstream gradient [B]
    const T* LT;  // backward: the forward's log-tails [B]
    const T* VT;  // every item tile transposed once (transposed_tiles): tile t at VT + t * D * kItems

    const T* tile_of(int64_t j0) const { return VT + (j0 / kItems) * D * kItems; }
};

// vt[k * kItems + j] = V[j0 + j][k]: the item tile transposed, so score loops run along j (vectorisable).
template <typename T>
KDFAST_INLINE void transpose_tile(const T* V, int64_t j0, int64_t nj, int64_t D, T* vt) {
    for (int64_t j = 0; j < nj; ++j)
        for (int64_t k = 0; k < D; ++k) vt[k * kItems + j] = V[(j0 + j) * D + k];
    for (int64_t k = 0; k < D; ++k) std::fill(vt + k * kItems + nj, vt + (k + 1) * kItems, T(0));  // past the end
}

// tile[r][j] = <U[r0 + r], V[j0 + j]> for r < nr, j < nj (raw, unclamped).
template <typename T>
KDFAST_INLINE void score_tile(const T* U, int64_t r0, int64_t nr, const T* vt, int64_t nj, int64_t D,
                              T (*tile)[kItems]) {
    for (int64_t r = 0; r < nr; ++r) {
        T* t = tile[r];
        std::fill(t, t + kItems, T(0));
        const T* u = U + (r0 + r) * D;
        for (int64_t k = 0; k < D; ++k) {
            const T uk = u[k];
            const T* v = vt + k * kItems;
#pragma omp simd
            for (int64_t j = 0; j < nj; ++j) t[j] += uk * v[j];
        }
    }
}

// mark[r][j] = 1 for excluded items of row (r0 + r) inside [j0, j1); ptr[r] advances past them.
KDFAST_INLINE void mark_excluded(const int64_t* indices, const int64_t* end, int64_t* ptr, int64_t nr, int64_t j0,
                                 int64_t j1, int32_t (*mark)[kItems]) {
    for (int64_t r = 0; r < nr; ++r) {
        std::fill(mark[r], mark[r] + (j1 - j0), 0);
        std::fill(mark[r] + (j1 - j0), mark[r] + kItems, 1);  // past the catalog's end: excluded
        int64_t p = ptr[r];
        while (p < end[r] && indices[p] < j1) {
            if (indices[p] >= j0) mark[r][indices[p] - j0] = 1;
            ++p;
        }
        ptr[r] = p;
    }
}

// t[j] <- g e^(clamp(t[j]) - lt) where item j counts (not excluded, raw score inside [-c, c]), else 0, for
// every j of the tile (items past the catalog's end are marked excluded).
KDFAST_INLINE void grad_row(double* t, const int32_t* mk, double clamp, double g, double lt) {
    for (int64_t j = 0; j < kItems; ++j) {
        const double raw = t[j], x = std::min(std::max(raw, -clamp), clamp);
        t[j] = (mk[j] || !(x == raw)) ? 0.0 : g * std::exp(x - lt);
    }
}
KDFAST_INLINE void grad_row(float* t, const int32_t* mk, float clamp, float g, float lt) {
    using kdfast::v8f;
    const v8f c = splat8(clamp), nc = splat8(-clamp), gv = splat8(g), ltv = splat8(lt), zero = splat8(0.0f);
    for (int64_t j = 0; j < kItems; j += 8) {
        const v8f raw = kdfast::load8(t + j);
        v8f x = raw < nc ? nc : raw;
        x = x > c ? c : x;
        const v8f p = gv * exp8(x - ltv);
        store8(t + j, (counts8(mk + j) & (x == raw)) ? p : zero);  // NaN: x == raw is false
    }
}

// The float score tile, register-blocked: 4 rows x 16 items (8 vector accumulators) per pass over k, all
// kItems columns (those past the catalog's end are marked excluded; the stale values there are never
// used); rows beyond a multiple of 4 take the generic loop.
KDFAST_INLINE void score_tile(const float* U, int64_t r0, int64_t nr, const float* vt, int64_t nj, int64_t D,
                              float (*tile)[kItems]) {
    using kdfast::v8f;
    const int64_t n4 = nr - nr % 4;
    for (int64_t r = 0; r < n4; r += 4) {
        const float* u0 = U + (r0 + r) * D;
        const float *u1 = u0 + D, *u2 = u1 + D, *u3 = u2 + D;
        for (int64_t j = 0; j < kItems; j += 16) {
            v8f a00 = splat8(0.0f), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
            const float* v = vt + j;
            for (int64_t k = 0; k < D; ++k, v += kItems) {
                const v8f v0 = kdfast::load8(v), v1 = kdfast::load8(v + 8);
                const v8f b0 = splat8(u0[k]), b1 = splat8(u1[k]), b2 = splat8(u2[k]), b3 = splat8(u3[k]);
                a00 += b0 * v0;
                a01 += b0 * v1;
                a10 += b1 * v0;
                a11 += b1 * v1;
                a20 += b2 * v0;
                a21 += b2 * v1;
                a30 += b3 * v0;
                a31 += b3 * v1;
            }
            store8(tile[r] + j, a00);
            store8(tile[r] + j + 8, a01);
            store8(tile[r + 1] + j, a10);
            store8(tile[r + 1] + j + 8, a11);
            store8(tile[r + 2] + j, a20);
            store8(tile[r + 2] + j + 8, a21);
            store8(tile[r + 3] + j, a30);
            store8(tile[r + 3] + j + 8, a31);
        }
    }
    if (n4 < nr) score_tile<float>(U, r0 + n4, nr - n4, vt, nj, D, tile + n4);
}

// t[j] <- clamp(t[j]) where item j counts, -inf where it is excluded, for the whole tile; returns the max
// (a NaN score is left out of the max, as std::max(max, NaN) leaves it; it reaches the sum).
template <typename T>
KDFAST_INLINE T clamp_mask_max(T* t, const int32_t* mk, T clamp) {
    const T ninf = -std::numeric_limits<T>::infinity();
    T tmax = ninf;
    for (int64_t j = 0; j < kItems; ++j) {
        T x = std::min(std::max(t[j], -clamp), clamp);
        x = mk[j] ? ninf : x;
        t[j] = x;
        tmax = std::max(tmax, x);
    }
    return tmax;
}
KDFAST_INLINE float clamp_mask_max(float* t, const int32_t* mk, float clamp) {
    using kdfast::v8f;
    const v8f c = splat8(clamp), nc = splat8(-clamp), ninf = splat8(-std::numeric_limits<float>::infinity());
    v8f mx = ninf;
    for (int64_t j = 0; j < kItems; j += 8) {
        const v8f raw = kdfast::load8(t + j);
        v8f x = raw < nc ? nc : raw;  // NaN stays NaN
        x = x > c ? c : x;
        x = counts8(mk + j) ? x : ninf;
        store8(t + j, x);
        mx = mx < x ? x : mx;
    }
    float m = mx[0];
    for (int l = 1; l < 8; ++l) m = m < mx[l] ? mx[l] : m;
    return m;
}

// sum_j e^(t[j] - nm) over the tile (excluded items hold -inf).
KDFAST_INLINE double exp_sum(const double* t, double nm) {
    double acc = 0;
    for (int64_t j = 0; j < kItems; ++j) acc += std::exp(t[j] - nm);
    return acc;
}
KDFAST_INLINE float exp_sum(const float* t, float nm) {
    using kdfast::v8f;
    const v8f m = splat8(nm);
    v8f a0 = splat8(0.0f), a1 = a0;
    for (int64_t j = 0; j < kItems; j += 16) {
        a0 += exp8(kdfast::load8(t + j) - m);
        a1 += exp8(kdfast::load8(t + j + 8) - m);
    }
    const v8f a = a0 + a1;
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

#pragma GCC diagnostic pop

// Forward of rows [r0, r0 + kRows): out[b] = log-tail of row b.
template <typename T>
KDFAST_INLINE void forward_block(const Problem<T>& P, int64_t blk, T* out) {
    const T clamp = P.clamp, ninf = -std::numeric_limits<T>::infinity();
    const int64_t r0 = blk * kRows, nr = std::min(kRows, P.B - r0);
    int64_t ptr[kRows], end[kRows];
    T tile[kRows][kItems];
    int32_t mark[kRows][kItems];
    T m[kRows], s[kRows];
    for (int64_t r = 0; r < nr; ++r) {
        ptr[r] = P.indptr[r0 + r];
        end[r] = P.indptr[r0 + r + 1];
        m[r] = ninf;
        s[r] = 0;
    }
    for (int64_t j0 = 0; j0 < P.I; j0 += kItems) {
        const int64_t j1 = std::min(P.I, j0 + kItems), nj = j1 - j0;
        mark_excluded(P.indices, end, ptr, nr, j0, j1, mark);
        score_tile(P.U, r0, nr, P.tile_of(j0), nj, P.D, tile);
        for (int64_t r = 0; r < nr; ++r) {
            T* t = tile[r];
            const T nm = std::max(m[r], clamp_mask_max(t, mark[r], clamp));
            if (nm == ninf) continue;
            s[r] = s[r] * std::exp(m[r] - nm) + exp_sum(t, nm);
            m[r] = nm;
        }
    }
    for (int64_t r = 0; r < nr; ++r) out[r0 + r] = (m[r] == ninf) ? ninf : std::log(s[r]) + m[r];
}

// tile rows <- G_bj (grad_row) for rows b = r0 + r with a gradient, 0 for the others.
template <typename T>
KDFAST_INLINE void grad_tile(const Problem<T>& P, int64_t r0, int64_t nr, T (*tile)[kItems], int32_t (*mark)[kItems]) {
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t r = 0; r < nr; ++r) {
        const int64_t b = r0 + r;
        if (P.LT[b] == ninf || P.G[b] == 0)
            std::fill(tile[r], tile[r] + kItems, T(0));
        else
            grad_row(tile[r], mark[r], P.clamp, P.G[b], P.LT[b]);
    }
}

// GU[r][k] += sum_j tile[r][j] vt[k][j] for r < nr (GU: the block's first row), every column of the tile.
template <typename T>
KDFAST_INLINE void add_user_grads(const T (*tile)[kItems], int64_t nr, const T* vt, int64_t D, T* GU) {
    for (int64_t r = 0; r < nr; ++r)
        for (int64_t k = 0; k < D; ++k) {
            const T *t = tile[r], *v = vt + k * kItems;
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < kItems; ++j) acc += t[j] * v[j];
            GU[r * D + k] += acc;
        }
}

// acc[k][j] += sum_r tile[r][j] U[r][k] over r < nr in order (U: the block's first row).
template <typename T>
KDFAST_INLINE void add_item_grads(const T (*tile)[kItems], int64_t nr, const T* U, int64_t D, int64_t k0, T* acc) {
    for (int64_t k = k0; k < D; ++k) {
        T* a = acc + k * kItems;
        for (int64_t r = 0; r < nr; ++r) {
            const T urk = U[r * D + k];
            const T* t = tile[r];
#pragma omp simd
            for (int64_t j = 0; j < kItems; ++j) a[j] += t[j] * urk;
        }
    }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// The float products, register-blocked. User side: 2 rows x 4 columns k (8 vector accumulators along the
// tile, then their lane totals); item side: 4 columns k x 16 items held in registers across the rows.
KDFAST_INLINE void add_user_grads(const float (*tile)[kItems], int64_t nr, const float* vt, int64_t D, float* GU) {
    using kdfast::load8;
    using kdfast::v8f;
    const int64_t n2 = nr - nr % 2, d4 = D - D % 4;
    for (int64_t r = 0; r < n2; r += 2)
        for (int64_t k = 0; k < d4; k += 4) {
            v8f a0 = splat8(0.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            const float *v = vt + k * kItems, *t0 = tile[r], *t1 = tile[r + 1];
            for (int64_t j = 0; j < kItems; j += 8) {
                const v8f x0 = load8(t0 + j), x1 = load8(t1 + j);
                const v8f v0 = load8(v + j), v1 = load8(v + kItems + j), v2 = load8(v + 2 * kItems + j),
                          v3 = load8(v + 3 * kItems + j);
                a0 += x0 * v0;
                a1 += x0 * v1;
                a2 += x0 * v2;
                a3 += x0 * v3;
                a4 += x1 * v0;
                a5 += x1 * v1;
                a6 += x1 * v2;
                a7 += x1 * v3;
            }
            const v8f tot = kdfast::hsum8(a0, a1, a2, a3, a4, a5, a6, a7);
            for (int c = 0; c < 4; ++c) {
                GU[r * D + k + c] += tot[c];
                GU[(r + 1) * D + k + c] += tot[4 + c];
            }
        }
    for (int64_t r = 0; r < nr; ++r) {  // the rows and columns the blocks left
        const int64_t k0 = r < n2 ? d4 : 0;
        for (int64_t k = k0; k < D; ++k) {
            const float *t = tile[r], *v = vt + k * kItems;
            v8f a = splat8(0.0f);
            for (int64_t j = 0; j < kItems; j += 8) a += load8(t + j) * load8(v + j);
            GU[r * D + k] += ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        }
    }
}

KDFAST_INLINE void add_item_grads(const float (*tile)[kItems], int64_t nr, const float* U, int64_t D, int64_t,
                                  float* acc) {
    using kdfast::load8;
    using kdfast::v8f;
    const int64_t d4 = D - D % 4;
    for (int64_t k = 0; k < d4; k += 4) {
        float *c0 = acc + k * kItems, *c1 = c0 + kItems, *c2 = c1 + kItems, *c3 = c2 + kItems;
        for (int64_t j = 0; j < kItems; j += 16) {
            v8f a00 = load8(c0 + j), a01 = load8(c0 + j + 8), a10 = load8(c1 + j), a11 = load8(c1 + j + 8),
                a20 = load8(c2 + j), a21 = load8(c2 + j + 8), a30 = load8(c3 + j), a31 = load8(c3 + j + 8);
            for (int64_t r = 0; r < nr; ++r) {
                const v8f x0 = load8(tile[r] + j), x1 = load8(tile[r] + j + 8);
                const float* u = U + r * D + k;
                const v8f b0 = splat8(u[0]), b1 = splat8(u[1]), b2 = splat8(u[2]), b3 = splat8(u[3]);
                a00 += x0 * b0;
                a01 += x1 * b0;
                a10 += x0 * b1;
                a11 += x1 * b1;
                a20 += x0 * b2;
                a21 += x1 * b2;
                a30 += x0 * b3;
                a31 += x1 * b3;
            }
            store8(c0 + j, a00);
            store8(c0 + j + 8, a01);
            store8(c1 + j, a10);
            store8(c1 + j + 8, a11);
            store8(c2 + j, a20);
            store8(c2 + j + 8, a21);
            store8(c3 + j, a30);
            store8(c3 + j + 8, a31);
        }
    }
    add_item_grads<float>(tile, nr, U, D, d4, acc);  // the columns the blocks left
}
#pragma GCC diagnostic pop

// grad_user of rows [r0, r0 + kRows): walks every item tile; GU[b][k] += sum_j G_bj V[j][k] along the tile.
// With acc_all (the one-thread pass, backward_fused), the same G_bj also go to grad_item's accumulator of
// each item tile, acc_all + t * D * kItems, as backward_item_block adds them.
template <typename T>
KDFAST_INLINE void backward_user_block(const Problem<T>& P, int64_t blk, T* GU, T* acc_all = nullptr) {
    const int64_t r0 = blk * kRows, nr = std::min(kRows, P.B - r0), D = P.D;
    int64_t ptr[kRows], end[kRows];
    T tile[kRows][kItems];
    int32_t mark[kRows][kItems];
    for (int64_t r = 0; r < nr; ++r) {
        ptr[r] = P.indptr[r0 + r];
        end[r] = P.indptr[r0 + r + 1];
    }
    std::fill(GU + r0 * D, GU + (r0 + nr) * D, T(0));
    for (int64_t j0 = 0; j0 < P.I; j0 += kItems) {
        const int64_t j1 = std::min(P.I, j0 + kItems), nj = j1 - j0;
        mark_excluded(P.indices, end, ptr, nr, j0, j1, mark);
        const T* vt = P.tile_of(j0);
        score_tile(P.U, r0, nr, vt, nj, D, tile);
        grad_tile(P, r0, nr, tile, mark);
        add_user_grads(tile, nr, vt, D, GU + r0 * D);
        if (acc_all) add_item_grads(tile, nr, P.U + r0 * D, D, 0, acc_all + (j0 / kItems) * D * kItems);
    }
}

// GI[j0 + j][k] = acc[k][j] for the nj items of one tile's accumulator.
template <typename T>
KDFAST_INLINE void store_item_grads(const T* acc, int64_t j0, int64_t nj, int64_t D, T* GI) {
    for (int64_t j = 0; j < nj; ++j)
        for (int64_t k = 0; k < D; ++k) GI[(j0 + j) * D + k] = acc[k * kItems + j];
}

// grad_item of items [j0, j0 + kItems): walks every row block; acc[k][j] += G_bj U[b][k] over rows b in
// order (acc: a [D x kItems] per-thread buffer), then GI[j0 + j][k] = acc[k][j].
template <typename T>
KDFAST_INLINE void backward_item_block(const Problem<T>& P, int64_t blk, T* acc, T* GI) {
    const int64_t j0 = blk * kItems, j1 = std::min(P.I, j0 + kItems), nj = j1 - j0, D = P.D;
    int32_t mark[kRows][kItems];
    int64_t ptr[kRows], end[kRows];
    T tile[kRows][kItems];
    std::fill(acc, acc + D * kItems, T(0));
    const T* vt = P.tile_of(j0);
    for (int64_t r0 = 0; r0 < P.B; r0 += kRows) {
        const int64_t nr = std::min(kRows, P.B - r0);
        for (int64_t r = 0; r < nr; ++r) {
            end[r] = P.indptr[r0 + r + 1];
            ptr[r] = std::lower_bound(P.indices + P.indptr[r0 + r], P.indices + end[r], j0) - P.indices;
        }
        mark_excluded(P.indices, end, ptr, nr, j0, j1, mark);
        score_tile(P.U, r0, nr, vt, nj, D, tile);
        grad_tile(P, r0, nr, tile, mark);
        add_item_grads(tile, nr, P.U + r0 * D, D, 0, acc);
    }
    store_item_grads(acc, j0, nj, D, GI);
}

// Both gradients in one pass (one thread): per row block, every item tile's scores and G_bj are computed
// once and feed grad_user and grad_item (backward_user_block with acc_all), whose accumulators of all item
// tiles are kept (acc_all [n_tiles][D][kItems]); tile t's accumulator takes the row blocks in order, as
// backward_item_block's does, so every output element is summed in the same order: the two-pass bits,
// with half the scores and exponentials.
template <typename T>
KDFAST_INLINE void backward_fused(const Problem<T>& P, T* acc_all, T* GU, T* GI) {
    const int64_t D = P.D, n_tiles = (P.I + kItems - 1) / kItems;
    std::fill(acc_all, acc_all + n_tiles * D * kItems, T(0));
    for (int64_t blk = 0; blk < (P.B + kRows - 1) / kRows; ++blk) backward_user_block(P, blk, GU, acc_all);
    for (int64_t t = 0; t < n_tiles; ++t)
        store_item_grads(acc_all + t * D * kItems, t * kItems, std::min(kItems, P.I - t * kItems), D, GI);
}

// The float blocks compiled per instruction set (each calls only always-inline code); double runs the
// generic blocks (the callers choose with if constexpr).
KDFAST_CLONES void forward_block_f32(const Problem<float>& P, int64_t blk, float* out) { forward_block(P, blk, out); }
KDFAST_CLONES void backward_user_block_f32(const Problem<float>& P, int64_t blk, float* GU) {
    backward_user_block(P, blk, GU);
}
KDFAST_CLONES void backward_item_block_f32(const Problem<float>& P, int64_t blk, float* acc, float* GI) {
    backward_item_block(P, blk, acc, GI);
}
KDFAST_CLONES void backward_fused_f32(const Problem<float>& P, float* acc_all, float* GU, float* GI) {
    backward_fused(P, acc_all, GU, GI);
}

// Every item tile transposed (transpose_tile), [n_tiles][D][kItems], once per call: the row blocks then
// read their tiles instead of transposing each again.
template <typename T>
std::vector<T> transposed_tiles(const T* V, int64_t I, int64_t D, int n_threads) {
    const int64_t n_tiles = (I + kItems - 1) / kItems;
    std::vector<T> vt(kdfast::scratch_count("full_catalog: the transposed item table (D x I values)", sizeof(T),
                                            {n_tiles, D, kItems}));
#pragma omp parallel for schedule(static) num_threads(kdfast::team_size(n_threads))
    for (int64_t t = 0; t < n_tiles; ++t)
        transpose_tile(V, t * kItems, std::min(kItems, I - t * kItems), D, vt.data() + t * D * kItems);
    return vt;
}

// Calls f(blk, buf) for every blk in [0, n_blocks) on n_threads threads (dynamic schedule), buf a per-thread
// buffer of `tiles` x D x kItems values (`what` names it in the error raised when it cannot be allocated).
template <typename T, typename F>
void for_blocks(const char* what, int64_t n_blocks, int64_t D, int64_t tiles, int n_threads,
                kdfast::RegionErrors& errors, F&& f) {
    const size_t n_buf = kdfast::scratch_count(what, sizeof(T), {tiles, D, kItems});
#pragma omp parallel num_threads(kdfast::team_size(n_threads))
    {
        std::vector<T> buf;
        errors.run([&] { buf.resize(n_buf); });
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
            if (errors.failed()) continue;
            f(blk, buf.data());
        }
    }
    errors.rethrow();
}

template <typename T>
void log_tail_impl(const T* U, const T* V, int64_t B, int64_t I, int64_t D, const int64_t* indptr,
                   const int64_t* indices, double clamp, T* out, int n_threads) {
    const std::vector<T> vt = transposed_tiles(V, I, D, n_threads);
    const Problem<T> P{U, V, B, I, D, indptr, indices, static_cast<T>(clamp), nullptr, nullptr, vt.data()};
    kdfast::RegionErrors errors;
    const char* what = "full_catalog_log_tail: the per-thread buffer";
    for_blocks<T>(what, (B + kRows - 1) / kRows, D, 0, n_threads, errors, [&](int64_t blk, T*) {
        if constexpr (std::is_same_v<T, float>)
            forward_block_f32(P, blk, out);
        else
            forward_block(P, blk, out);
    });
}

// grad_user: one thread per block of kRows rows, walking all items; grad_item: one thread per block of
// kItems items, walking all rows (binary search into each row's ids). On one thread, both in one pass.
template <typename T>
void backward_impl(const T* G, const T* LT, const T* U, const T* V, int64_t B, int64_t I, int64_t D,
                   const int64_t* indptr, const int64_t* indices, double clamp, T* GU, T* GI, int n_threads) {
    const std::vector<T> vt = transposed_tiles(V, I, D, n_threads);
    const Problem<T> P{U, V, B, I, D, indptr, indices, static_cast<T>(clamp), G, LT, vt.data()};
    const char* what = "full_catalog_log_tail_backward: the item gradient accumulator (D x 128 values)";
    kdfast::RegionErrors errors;              // (empty again after each region: for_blocks rethrows)
    if (kdfast::team_size(n_threads) == 1) {  // one pass (backward_fused): the same bits, half the work
        const int64_t n_tiles = (I + kItems - 1) / kItems;
        const char* what1 = "full_catalog_log_tail_backward: the item gradient accumulators (D x I values)";
        std::vector<T> acc_all(kdfast::scratch_count(what1, sizeof(T), {n_tiles, D, kItems}));
        if constexpr (std::is_same_v<T, float>)
            backward_fused_f32(P, acc_all.data(), GU, GI);
        else
            backward_fused(P, acc_all.data(), GU, GI);
        return;
    }
    for_blocks<T>(what, (B + kRows - 1) / kRows, D, 0, n_threads, errors, [&](int64_t blk, T*) {
        if constexpr (std::is_same_v<T, float>)
            backward_user_block_f32(P, blk, GU);
        else
            backward_user_block(P, blk, GU);
    });
    for_blocks<T>(what, (I + kItems - 1) / kItems, D, 1, n_threads, errors, [&](int64_t blk, T* acc) {
        if constexpr (std::is_same_v<T, float>)
            backward_item_block_f32(P, blk, acc, GI);
        else
            backward_item_block(P, blk, acc, GI);
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
