// Each query's rank of given key ids among its non-excluded keys, by dot-product score, on the CPU.
//
// Math: s_uj = <q_u, k_j> accumulated in the input precision (float32, or float64 for float64 inputs)
// and rounded to float32; a score that is not finite counts as -inf, -0 == +0. With the rank key of
// kdfast.topk_scores, key(s, j) = ordered(s) * 2^32 + (2^32 - 1 - j) (descending score, ties to the
// lower index), the rank of a given id i of row u is
//     rank(u, i) = #{ j not excluded for u : key(s_uj, j) > key(s_ui, i) }   (j = i never counts),
// and -1 for the padding id -1.
//
// Memory plan (no n_q x n_k score matrix):
//   * keys packed once into panels of NR keys, transposed ([panel][d][NR], zero-padded), as in topk.cpp;
//   * each OpenMP thread takes blocks of QB query rows. Per row it first scores its m given ids and its
//     excluded ids with the same micro-kernel code the scan uses (their key rows gathered into panels),
//     so every one of these scores is bitwise the score the scan produces for that key; the given ids
//     are sorted by rank key (T[0..mv) ascending, float scores Tf, ids Tid) and a histogram
//     hist[0..mv] is cleared;
//   * per row, a lookup table over B = min(64 mv + 64, max(4000, 2 mv), max(64, n_k / 4)) equal-width bins of the
//     score range [lowest finite given score, highest] (bin_of: a monotone function of the score, the
//     same float operations for one score and for a vector): a bin that holds no given score maps every
//     score in it to one count c = #{t : key_t < key(s, j)}; a bin that holds some is marked;
//   * the scan walks the key panels in chunks (<= 2048 keys, at most 256 KB of keys: L2); per group of MR
//     rows and panel an MR x NR score micro-tile is computed in vector registers (d inner, FMA) and
//     stored as float32 into a score buffer [MR][chunk]; then each row of the group reads its scores
//     (its table and histogram stay in L1) in 8-lane float vectors: all lanes below the lowest given
//     score -> nothing to do (c = 0 adds to no rank), all above the highest -> c = mv, else each lane's
//     c is its bin's count or, in a marked bin, found among the given keys of that bin by exact rank
//     key (this settles ties by index); hist[c] += 1 (two histograms by lane parity);
//   * excluded keys were counted like every key: their contribution hist[c] is taken back from their
//     own scores (canonical CSR rows: each id once);
//   * rank of sorted given key p = sum_{c > p} hist[c] (suffix sums), written back in the ids' order;
//   * with max_rank (ranks >= max_rank reported as max_rank, DCD's clamp): after every 512 keys the given keys
//     with at least max_rank + (the row's excluded count) keys above them are settled, and the keys below
//     the lowest unsettled given score are skipped from then on (they only count towards settled ones;
//     a row with none left is done, a group of MR such rows skips its matmul), so that a row whose given
//     keys rank low soon reads little more than its scores.
// Per thread: QB*d query values, MR*chunk float scores, per row (m ids, sorted keys and scores, 2(m+1)
// counts, B + 2 table entries). Cost per score: the matmul share plus, unless its 8-lane piece is
// skipped whole, one table look-up and one increment. Summation order of each dot product is fixed
// (p = 0..d-1): results do not depend on the number of threads or on the blocking; they may depend on
// the instruction set (FMA or not).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "buffers.h"
#include "dispatch.h"
#include "parallel.h"

namespace py = pybind11;

// The vector helpers below are always inlined: no vector crosses a call (GCC's ABI note does not apply).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

constexpr int64_t LOW = 0xFFFFFFFFLL;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float clean(float s) {
    if (!std::isfinite(s)) return NEG_INF;  // NaN, +-inf -> -inf
    return s == 0.0f ? 0.0f : s;            // -0 -> +0
}

inline int64_t rank_key(float s, int64_t index) {  // s already clean
    int32_t b;
    std::memcpy(&b, &s, sizeof b);
    const int64_t ordered = b >= 0 ? b : (b ^ 0x7FFFFFFF);
    return ordered * (LOW + 1) + (LOW - index);
}

template <typename T>
struct Problem {
    const T* queries;  // [n_q, d]
    const T* keys;     // [n_k, d]
    const T* packed;   // [n_panels, d, NR]
    int64_t n_q, n_k, d, m;
    const int64_t* ids;  // [n_q, m], in [-1, n_k)
    const int64_t* excl_indptr;
    const int64_t* excl_indices;  // canonical rows
    int64_t* out;                 // [n_q, m]
    int64_t max_rank;             // ranks >= max_rank are reported as max_rank (-1: none)
    int64_t chunk_panels;
};

struct Row {
    std::vector<float> tf;      // sorted given scores (ascending rank key)
    std::vector<int64_t> tid;   // their ids
    std::vector<int64_t> tkey;  // their rank keys
    std::vector<int64_t> tpos;  // their column in ids
    std::vector<int64_t> hist;  // [mv + 1]
    std::vector<int32_t> tab;   // [B + 2]: per score bin, #given keys below it (negative: marked)
    float a = 0, inv_w = 1, bins = 1;
    float live = 0;  // keys scoring below this touch only given keys already known to rank >= max_rank
    int64_t mv = 0;
};

// The score bin of a clean score x: trunc(clamp((x - a) * inv_w, -1, bins)) + 1 in [0, bins + 1], a
// monotone (non-decreasing) function of x, computed by the same float operations for a single score
// and for a vector of them.
template <typename X>
__attribute__((always_inline)) inline X bin_of(X x, float a, float inv_w, float bins) {
    X g = (x - a) * inv_w;
    g = g < -1.0f ? X{} - 1.0f : g;
    g = g > bins ? X{} + bins : g;
    return g;
}

// The lookup table of a row's sorted given scores: a bin that holds no given score maps every score in
// it to the same count (bins are monotone in the score); a bin holding some is marked (exact search
// among them).
inline void build_table(Row& R, int64_t n_k) {
    const int64_t mv = R.mv;
    float a = 0.0f, top = 0.0f;
    bool any = false;
    for (int64_t t = 0; t < mv; ++t)
        if (R.tf[t] > NEG_INF) {
            if (!any) a = R.tf[t];
            any = true;
            top = R.tf[t];
        }
    // about 64 bins per given key, at most 4000 (the table stays in L1) and n_k / 4 (building it costs
    // less than the row's scan)
    const int64_t nbins =
        std::min<int64_t>({64 * mv + 64, std::max<int64_t>(4000, 2 * mv), std::max<int64_t>(64, n_k / 4)});
    const float bins = static_cast<float>(nbins);
    // bins of equal width over [a, top] (or, for one distinct score, about 2^-12 of its magnitude)
    const float span = std::max(top - a, std::max(std::fabs(a), std::fabs(top)) * 0x1p-12f);
    float inv_w = 1.0f;
    if (any && span > 0.0f && std::isfinite(span) && std::isfinite(bins / span) && bins / span > 0.0f)
        inv_w = bins / span;
    R.a = a;
    R.inv_w = inv_w;
    R.bins = bins;
    const int64_t nb = static_cast<int64_t>(bins) + 2;
    R.tab.assign(nb, 0);
    std::vector<int64_t> at(mv);
    for (int64_t t = 0; t < mv; ++t) {
        typedef float F1 __attribute__((vector_size(4)));
        const F1 g = bin_of(F1{} + R.tf[t], a, inv_w, bins);
        at[t] = static_cast<int64_t>(g[0]) + 1;
    }
    // tab[b] = p = #{t : at[t] < b}, or -(p + 1) where some at[t] == b (then the given keys of bin b
    // are t = p, p + 1, ...: a score there is placed among them by its exact rank key)
    int64_t t = 0;
    for (int64_t b = 0; b < nb; ++b) {
        while (t < mv && at[t] < b) ++t;
        R.tab[b] = (t < mv && at[t] == b) ? static_cast<int32_t>(-t - 1) : static_cast<int32_t>(t);
    }
}

struct Scratch {
    std::vector<char> qbuf;  // QB x d values of T
    std::vector<Row> rows;
    std::vector<char> gather;  // one gathered panel [d][NR] of T
    std::vector<float> sbuf;   // MR x chunk scores
    std::vector<float> scores;
    std::vector<std::pair<int64_t, int64_t>> order;
};

// The same accumulation step for the scan and for gathered keys: acc += k * b, lane by lane.
template <typename V, typename T>
__attribute__((always_inline)) inline void step(V& acc, const V& k, T b) {
    acc += k * b;
}

// Scores (clean float32) of row q against the listed key ids, by the scan's micro-kernel arithmetic.
template <typename T, int W>
__attribute__((always_inline)) inline void gathered_scores(const Problem<T>& P, const T* q, const int64_t* list,
                                                           int64_t n, Scratch& sc) {
    typedef T V __attribute__((vector_size(W * sizeof(T))));
    constexpr int NR = 2 * W;
    const int64_t d = P.d;
    sc.scores.resize(static_cast<size_t>(n));
    T* g = reinterpret_cast<T*>(sc.gather.data());
    for (int64_t b0 = 0; b0 < n; b0 += NR) {
        const int lanes = static_cast<int>(std::min<int64_t>(NR, n - b0));
        std::memset(static_cast<void*>(g), 0, sizeof(T) * d * NR);
        for (int l = 0; l < lanes; ++l) {
            const T* src = P.keys + list[b0 + l] * d;
            for (int64_t p = 0; p < d; ++p) g[p * NR + l] = src[p];
        }
        V acc[2] = {};
        for (int64_t p = 0; p < d; ++p) {
            V k0, k1;
            std::memcpy(&k0, g + p * NR, sizeof(V));
            std::memcpy(&k1, g + p * NR + W, sizeof(V));
            const T b = q[p];
            step(acc[0], k0, b);
            step(acc[1], k1, b);
        }
        T tile[NR];
        std::memcpy(tile, acc, sizeof tile);
        for (int l = 0; l < lanes; ++l) sc.scores[b0 + l] = clean(static_cast<float>(tile[l]));
    }
}

// c = #{t : key_t < key(x, j)} for the row's sorted given keys, x clean.
inline int64_t count_below(const Row& R, float x, int64_t j) {
    const int64_t key = rank_key(x, j);
    return std::lower_bound(R.tkey.begin(), R.tkey.begin() + R.mv, key) - R.tkey.begin();
}

// Whether every lane of a vector comparison is true.
template <typename M>
__attribute__((always_inline)) inline bool all_true(M m) {
    uint64_t u[sizeof(M) / 8];
    std::memcpy(u, &m, sizeof u);
    uint64_t all = ~uint64_t(0);
    for (unsigned l = 0; l < sizeof(M) / 8; ++l) all &= u[l];
    return all == ~uint64_t(0);
}

// Adds the n scores x[0..n) of keys k0, k0 + 1, ... to the row's histogram: hist[c] += 1 with
// c = #{t : key_t < key(clean(x), j)}, in 8-lane float vectors: a piece entirely below the lowest given
// score changes no rank (c = 0 for all), one entirely above the highest gives c = mv for all, otherwise
// each lane's count comes from its bin in the row's table (and, in a bin holding given scores, from
// their exact rank keys). Two histograms, by lane parity, so that consecutive increments do not wait
// on each other.
__attribute__((always_inline)) inline void count_row(Row& R, const float* x, int64_t n, int64_t k0) {
    typedef float F __attribute__((vector_size(32)));
    typedef decltype(F{} < F{}) M;
    constexpr int FL = 8;
    const int64_t mv = R.mv;
    const float lo = R.live, hi = R.tf[mv - 1];
    const int32_t* tab = R.tab.data();
    const int64_t* tkey = R.tkey.data();
    int64_t* h0 = R.hist.data();
    int64_t* h1 = h0 + (mv + 1);
    const F ninf = F{} + NEG_INF, flo = F{} + lo, fhi = F{} + hi;
    for (int64_t b = 0; b < n; b += FL) {
        const int lanes = static_cast<int>(std::min<int64_t>(FL, n - b));
        F v;
        if (lanes == FL) {
            std::memcpy(&v, x + b, sizeof v);
        } else {
            v = ninf;
            for (int l = 0; l < lanes; ++l) v[l] = x[b + l];
        }
        v = (v - v == F{}) ? v : ninf;    // not finite -> -inf (v - v is 0 only for finite v)
        if (all_true(v < flo)) continue;  // every count is 0: no rank changes
        if (lanes == FL && all_true(v > fhi)) {
            h0[mv] += FL;
            continue;
        }
        const M bi = __builtin_convertvector(bin_of(v, R.a, R.inv_w, R.bins), M) + 1;
        for (int l = 0; l < lanes; ++l) {
            if (v[l] < lo) continue;  // c = 0, or a key that counts only towards settled given keys
            int64_t c = tab[bi[l]];
            if (c < 0) {  // given scores in this bin: place the key among them by its exact rank key
                c = -c - 1;
                const int64_t key = rank_key(v[l] == 0.0f ? 0.0f : v[l], k0 + b + l);
                while (c < mv && tkey[c] < key) ++c;
            }
            ++((l & 1) ? h1 : h0)[c];
        }
    }
}

// The given keys (sorted positions p < p0) with at least `limit` counted keys above them are settled:
// R.live rises to the lowest unsettled given score (+inf when none is left).
inline void settle(Row& R, int64_t limit) {
    int64_t above = 0, p0 = 0;
    for (int64_t p = R.mv - 1; p >= 0; --p) {
        above += R.hist[p + 1] + R.hist[R.mv + 1 + p + 1];
        if (above >= limit) {
            p0 = p + 1;
            break;
        }
    }
    R.live = p0 < R.mv ? R.tf[p0] : std::numeric_limits<float>::infinity();
}

// Ranks of queries [q0, q0 + rows). T: input type; W: vector width in T; MR: query rows per micro-tile.
template <typename T, int W, int MR>
__attribute__((always_inline)) inline void block_impl(const Problem<T>& P, int64_t q0, int64_t rows, Scratch& sc) {
    typedef T V __attribute__((vector_size(W * sizeof(T))));
    constexpr int NR = 2 * W;
    const int64_t d = P.d, m = P.m;
    const int64_t rows_pad = (rows + MR - 1) / MR * MR;
    T* qb = reinterpret_cast<T*>(sc.qbuf.data());
    std::memcpy(qb, P.queries + q0 * d, sizeof(T) * rows * d);
    std::memset(static_cast<void*>(qb + rows * d), 0, sizeof(T) * (rows_pad - rows) * d);
    // per row: the given ids' scores and sorted keys
    for (int64_t r = 0; r < rows_pad; ++r) {
        Row& R = sc.rows[r];
        R.mv = 0;
        if (r >= rows) continue;
        const int64_t* idr = P.ids + (q0 + r) * m;
        sc.order.clear();
        std::vector<int64_t> list;
        for (int64_t t = 0; t < m; ++t)
            if (idr[t] >= 0) list.push_back(t);
        std::vector<int64_t> kid(list.size());
        for (size_t t = 0; t < list.size(); ++t) kid[t] = idr[list[t]];
        gathered_scores<T, W>(P, qb + r * d, kid.data(), static_cast<int64_t>(kid.size()), sc);
        for (size_t t = 0; t < list.size(); ++t)
            sc.order.emplace_back(rank_key(sc.scores[t], kid[t]), static_cast<int64_t>(t));
        std::sort(sc.order.begin(), sc.order.end());
        R.mv = static_cast<int64_t>(sc.order.size());
        R.tf.resize(R.mv);
        R.tid.resize(R.mv);
        R.tkey.resize(R.mv);
        R.tpos.resize(R.mv);
        R.hist.assign(2 * (R.mv + 1), 0);
        for (int64_t t = 0; t < R.mv; ++t) {
            const int64_t at = sc.order[t].second;
            R.tkey[t] = sc.order[t].first;
            R.tpos[t] = list[at];
            R.tid[t] = kid[at];
            R.tf[t] = sc.scores[at];
        }
        if (R.mv > 0) build_table(R, P.n_k);
        if (R.mv > 0) R.live = R.tf[0];
    }
    const int64_t n_panels = (P.n_k + NR - 1) / NR;
    const int64_t chunk_keys = P.chunk_panels * NR;
    float* sbuf = sc.sbuf.data();  // [MR][chunk_keys] float32 scores of one chunk
    for (int64_t c0 = 0; c0 < n_panels; c0 += P.chunk_panels) {
        const int64_t c1 = std::min(n_panels, c0 + P.chunk_panels);
        const int64_t k0 = c0 * NR, nk = std::min(P.n_k, c1 * NR) - k0;
        for (int64_t g = 0; g < rows_pad; g += MR) {
            const T* qg = qb + g * d;
            bool open = false;  // some row of the group still counts
            for (int i = 0; i < MR && g + i < rows; ++i)
                open = open || (sc.rows[g + i].mv > 0 && sc.rows[g + i].live < std::numeric_limits<float>::infinity());
            if (!open) continue;
            for (int64_t pn = c0; pn < c1; ++pn) {
                const T* kp = P.packed + pn * d * NR;
                V acc[MR][2] = {};
                for (int64_t p = 0; p < d; ++p) {
                    V k0v, k1v;
                    std::memcpy(&k0v, kp + p * NR, sizeof(V));
                    std::memcpy(&k1v, kp + p * NR + W, sizeof(V));
                    for (int i = 0; i < MR; ++i) {
                        const T b = qg[i * d + p];
                        step(acc[i][0], k0v, b);
                        step(acc[i][1], k1v, b);
                    }
                }
                const int64_t off = (pn - c0) * NR;
                for (int i = 0; i < MR; ++i) {
                    T tile[NR];
                    std::memcpy(tile, acc[i], sizeof tile);
                    float* dst = sbuf + i * chunk_keys + off;
                    for (int l = 0; l < NR; ++l) dst[l] = static_cast<float>(tile[l]);
                }
            }
            // count, one row at a time (its table and histogram stay in L1)
            for (int i = 0; i < MR; ++i) {
                const int64_t r = g + i;
                if (r >= rows) break;
                Row& R = sc.rows[r];
                if (R.mv == 0) continue;
                // with max_rank, given keys with max_rank + (excluded keys of the row) keys above them
                // already rank >= max_rank whatever the exclusions take back: after every 512 keys,
                // keys below all of them (below the lowest given key not yet there) are skipped
                const int64_t limit =
                    P.max_rank < 0 ? -1 : P.max_rank + (P.excl_indptr[q0 + r + 1] - P.excl_indptr[q0 + r]);
                const int64_t step_keys = limit < 0 ? nk : 512;
                for (int64_t s0 = 0; s0 < nk && R.live < std::numeric_limits<float>::infinity(); s0 += step_keys) {
                    count_row(R, sbuf + i * chunk_keys + s0, std::min(step_keys, nk - s0), k0 + s0);
                    if (limit >= 0) settle(R, limit);
                }
            }
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        Row& R = sc.rows[r];
        const int64_t* idr = P.ids + (q0 + r) * m;
        int64_t* out = P.out + (q0 + r) * m;
        for (int64_t t = 0; t < m; ++t)
            if (idr[t] < 0) out[t] = -1;
        if (R.mv == 0) continue;
        // excluded keys were counted by the scan: take them back
        const int64_t e0 = P.excl_indptr[q0 + r], e1 = P.excl_indptr[q0 + r + 1];
        if (e1 > e0) {
            gathered_scores<T, W>(P, qb + r * d, P.excl_indices + e0, e1 - e0, sc);
            for (int64_t e = e0; e < e1; ++e) --R.hist[count_below(R, sc.scores[e - e0], P.excl_indices[e])];
        }
        int64_t above = 0;
        for (int64_t p = R.mv - 1; p >= 0; --p) {
            above += R.hist[p + 1] + R.hist[R.mv + 1 + p + 1];
            out[R.tpos[p]] = P.max_rank >= 0 ? std::min(above, P.max_rank) : above;
        }
    }
}

using kdfast::Isa;
#if KDFAST_X86
__attribute__((target(KDFAST_ISA_AVX512))) void block_avx512(const Problem<float>& P, int64_t q0, int64_t n,
                                                             Scratch& sc) {
    block_impl<float, 16, 8>(P, q0, n, sc);
}
__attribute__((target(KDFAST_ISA_AVX512))) void block_avx512(const Problem<double>& P, int64_t q0, int64_t n,
                                                             Scratch& sc) {
    block_impl<double, 8, 8>(P, q0, n, sc);
}
__attribute__((target(KDFAST_ISA_AVX2))) void block_avx2(const Problem<float>& P, int64_t q0, int64_t n, Scratch& sc) {
    block_impl<float, 8, 6>(P, q0, n, sc);
}
__attribute__((target(KDFAST_ISA_AVX2))) void block_avx2(const Problem<double>& P, int64_t q0, int64_t n, Scratch& sc) {
    block_impl<double, 4, 6>(P, q0, n, sc);
}
#else
template <typename T>
void block_avx512(const Problem<T>&, int64_t, int64_t, Scratch&) {}  // never selected
template <typename T>
void block_avx2(const Problem<T>&, int64_t, int64_t, Scratch&) {}
#endif
void block_generic(const Problem<float>& P, int64_t q0, int64_t n, Scratch& sc) {
    block_impl<float, 4, 6>(P, q0, n, sc);
}
void block_generic(const Problem<double>& P, int64_t q0, int64_t n, Scratch& sc) {
    block_impl<double, 2, 6>(P, q0, n, sc);
}

template <typename T>
void isa_shape(Isa isa, int& W, int& MR) {
    const int bytes = isa == Isa::avx512 ? 64 : isa == Isa::avx2 ? 32 : 16;
    W = bytes / static_cast<int>(sizeof(T));
    MR = isa == Isa::avx512 ? 8 : 6;
}

template <typename T>
void run(const T* queries, const T* keys, int64_t n_q, int64_t n_k, int64_t d, int64_t m, const int64_t* ids,
         const int64_t* excl_indptr, const int64_t* excl_indices, int64_t* out, int64_t max_rank, int n_threads,
         Isa isa) {
    int W, MR;
    isa_shape<T>(isa, W, MR);
    const int NR = 2 * W;
    const int64_t n_panels = (n_k + NR - 1) / NR;
    std::vector<T> packed(static_cast<size_t>(std::max<int64_t>(n_panels, 1)) * d * NR, T(0));
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t pn = 0; pn < n_panels; ++pn) {
        T* dst = packed.data() + pn * d * NR;
        for (int l = 0; l < NR; ++l) {
            const int64_t j = pn * NR + l;
            if (j >= n_k) break;
            const T* src = keys + j * d;
            for (int64_t p = 0; p < d; ++p) dst[p * NR + l] = src[p];
        }
    }
    Problem<T> P;
    P.queries = queries;
    P.keys = keys;
    P.packed = packed.data();
    P.n_q = n_q;
    P.n_k = n_k;
    P.d = d;
    P.m = m;
    P.ids = ids;
    P.excl_indptr = excl_indptr;
    P.excl_indices = excl_indices;
    P.out = out;
    P.max_rank = max_rank;
    // key panels per chunk: about 256 KB of keys (L2), and at most 2048 keys (the MR x chunk score
    // buffer: 64 KB; with max_rank, settled given keys are found after every chunk)
    P.chunk_panels = std::max<int64_t>(1, std::min<int64_t>(2048 / NR, (256 * 1024) / (static_cast<int64_t>(sizeof(T)) *
                                                                                       std::max<int64_t>(d, 1) * NR)));
    const int64_t per_thread = (n_q + n_threads - 1) / n_threads;
    const int64_t qb = std::max<int64_t>(MR, std::min<int64_t>(16 * MR, (per_thread + MR - 1) / MR * MR));
    const int64_t n_blocks = (n_q + qb - 1) / qb;
    kdfast::scratch_count("rank_of_ids: the per-row given ids", sizeof(int64_t), {qb, m, 6});
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(n_threads)
    {
        Scratch sc;
        errors.run([&] {
            sc.qbuf.resize(sizeof(T) * qb * d);
            sc.rows.resize(qb);
            sc.gather.resize(sizeof(T) * std::max<int64_t>(d, 1) * NR);
            sc.sbuf.resize(static_cast<size_t>(MR) * P.chunk_panels * NR);
        });
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n_blocks; ++b) {
            if (errors.stops(b)) continue;
            errors.run(b, [&] {
                const int64_t q0 = b * qb, rows = std::min(qb, n_q - q0);
                switch (isa) {
                    case Isa::avx512: block_avx512(P, q0, rows, sc); break;
                    case Isa::avx2: block_avx2(P, q0, rows, sc); break;
                    default: block_generic(P, q0, rows, sc); break;
                }
            });
        }
    }
    errors.rethrow();
}

void rank_of_ids(std::uintptr_t queries, std::uintptr_t keys, int64_t n_q, int64_t n_k, int64_t d, int64_t m,
                 std::uintptr_t ids, std::uintptr_t excl_indptr, std::uintptr_t excl_indices, std::uintptr_t out,
                 int64_t max_rank, bool is_double, int n_threads, const std::string& isa_req) {
    if (n_q < 0 || n_k < 1 || d < 0 || m < 0) throw std::invalid_argument("rank_of_ids: bad sizes");
    if (n_k > LOW) throw std::invalid_argument("rank_of_ids: n_k must be below 2^32");
    const Isa isa = kdfast::pick_isa(isa_req);
    n_threads = kdfast::team_size(n_threads);
    py::gil_scoped_release release;
    if (n_q == 0 || m == 0) return;
    using kdfast::as_ptr;
    kdfast::by_dtype(is_double, [&](auto tag) {
        using T = typename decltype(tag)::type;
        run<T>(as_ptr<const T>(queries), as_ptr<const T>(keys), n_q, n_k, d, m, as_ptr<const int64_t>(ids),
               as_ptr<const int64_t>(excl_indptr), as_ptr<const int64_t>(excl_indices), as_ptr<int64_t>(out), max_rank,
               n_threads, isa);
    });
}

}  // namespace

void register_rank_of_ids(pybind11::module_& m) {
    m.def("rank_of_ids", &rank_of_ids,
          "Ranks of given key ids per query by dot product (raw buffers; see kdfast/ops/rank_of_ids/cpu.py).",
          py::arg("queries"), py::arg("keys"), py::arg("n_q"), py::arg("n_k"), py::arg("d"), py::arg("m"),
          py::arg("ids"), py::arg("excl_indptr"), py::arg("excl_indices"), py::arg("out"), py::arg("max_rank"),
          py::arg("is_double"), py::arg("n_threads"), py::arg("isa") = "auto");
}
