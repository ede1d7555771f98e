// Top-k keys per query by dot-product score, with per-query exclusions, on the CPU.
//
// Math: for every query row r and key j not excluded for r, s_rj = <q_r, k_j>, accumulated in the
// input precision (float32, or float64 for float64 inputs) and then rounded to float32. Each score
// gets the int64 rank key
//     key(s, j) = ordered(s) * 2^32 + (2^32 - 1 - j),
// where ordered() maps float32 bits to an int32 that sorts like the float, after -0 -> +0 and a score
// that is not finite -> -inf (NaN, or +-inf: a float32 dot product that overflowed, whose sign depends on
// the summation order; the same encoding as encode_rank_keys in kdfast/_core/numerics.py). Keys are
// unique within a row, so the k largest keys define the output exactly: descending score, ties to the
// lower key index, a non-finite score reported as -inf. Slots beyond the number of non-excluded keys hold
// EMPTY = INT64_MIN, reported as index -1 and value -inf.
//
// Memory plan (no n_q x n_k score matrix ever exists):
//   * keys are packed once into panels of NR keys, transposed: packed[panel][d][NR] (n_k*d values,
//     zero-padded to a whole panel);
//   * each OpenMP thread takes blocks of QB queries (copied, zero-padded to a multiple of MR rows)
//     and walks the key panels in chunks of about 256 KB (stay in L2); for each group of MR query
//     rows and each panel, an MR x NR score micro-tile is computed in vector registers (d inner, FMA);
//   * every row keeps a running threshold (its current k-th best key and that key's float score):
//     the micro-tile is compared with the row thresholds in registers and, in the common case that
//     nothing beats them, dropped at once (a NaN or +inf score always passes that test; its rank key,
//     that of -inf, then loses to the row's threshold key). Scores that pass are rank-encoded and,
//     unless excluded, appended to the row's candidate buffer (2*min(k, n_k) keys); a full buffer is
//     cut back to its k best with nth_element, which raises the threshold. Keys reach a row in
//     increasing index order, so a score equal to the threshold's score always loses the tie:
//     "s <= threshold" is an exact reject test;
//   * exclusions are the row's sorted id list (canonical CSR), walked by a pointer that only moves
//     when a candidate passes the threshold;
//   * per thread: QB*d query values + QB*2*min(k, n_k) int64 candidates; output n_q*k values/indices.
// Summation order of each dot product is fixed (p = 0..d-1), so results do not depend on the number
// of threads or on the blocking; they may depend on the instruction set (FMA or not).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "buffers.h"
#include "dispatch.h"
#include "parallel.h"

namespace py = pybind11;

namespace {

constexpr int64_t EMPTY = std::numeric_limits<int64_t>::min();
constexpr int64_t LOW = 0xFFFFFFFFLL;

inline int64_t rank_key(float s, int64_t index) {
    if (!std::isfinite(s)) s = -std::numeric_limits<float>::infinity();  // NaN, +-inf -> -inf
    if (s == 0.0f) s = 0.0f;                                             // -0 -> +0
    int32_t b;
    std::memcpy(&b, &s, sizeof b);
    const int64_t ordered = b >= 0 ? b : (b ^ 0x7FFFFFFF);
    return ordered * (LOW + 1) + (LOW - index);
}

inline float key_value(int64_t key) {
    const int64_t low = key & LOW;
    const int64_t ordered = (key - low) / (LOW + 1);
    const int32_t b = static_cast<int32_t>(ordered >= 0 ? ordered : (ordered ^ 0x7FFFFFFF));
    float s;
    std::memcpy(&s, &b, sizeof s);
    return s;
}

inline int64_t key_index(int64_t key) { return LOW - (key & LOW); }

template <typename T>
struct Problem {
    const T* queries;  // [n_q, d]
    const T* packed;   // [n_panels, d, NR]
    int64_t n_q, n_k, d, k;
    const int64_t* excl_indptr;  // [n_q + 1], rows sorted
    const int64_t* excl_indices;
    float* out_values;     // [n_q, k]
    int64_t* out_indices;  // [n_q, k]
    int64_t keep;          // min(k, n_k)
    int64_t cap;           // candidate buffer per row
    int64_t chunk_panels;  // key panels per L2 chunk
};

struct Scratch {
    std::vector<char> qbuf;     // QB x d values of T
    std::vector<int64_t> cand;  // QB x cap
    std::vector<int64_t> count, thr_key;
    std::vector<float> thr_f;  // fast reject threshold per row (NaN: accept all; +inf: padding row)
    std::vector<const int64_t*> ex, ex_end;
};

// One row's candidate gets its rank key; it enters the buffer unless it is below the row's
// threshold key or excluded.
inline void offer(Scratch& sc, int64_t r, float s, int64_t j, int64_t cap, int64_t keep) {
    const int64_t key = rank_key(s, j);
    if (key <= sc.thr_key[r]) return;
    const int64_t*& ex = sc.ex[r];
    while (ex < sc.ex_end[r] && *ex < j) ++ex;
    if (ex < sc.ex_end[r] && *ex == j) return;
    int64_t* buf = sc.cand.data() + r * cap;
    buf[sc.count[r]++] = key;
    if (sc.count[r] == cap) {
        std::nth_element(buf, buf + keep - 1, buf + cap, std::greater<int64_t>());
        sc.count[r] = keep;
        sc.thr_key[r] = buf[keep - 1];
        sc.thr_f[r] = key_value(buf[keep - 1]);
    }
}

// Top-k of queries [q0, q0 + rows) against every key. T: input type; W: vector width in T; MR:
// query rows per micro-tile. NR = 2 * W keys per panel.
template <typename T, int W, int MR>
__attribute__((always_inline)) inline void block_impl(const Problem<T>& P, int64_t q0, int64_t rows, Scratch& sc) {
    typedef T V __attribute__((vector_size(W * sizeof(T))));
    constexpr int NR = 2 * W;
    const int64_t d = P.d, cap = P.cap, keep = P.keep;
    const int64_t rows_pad = (rows + MR - 1) / MR * MR;
    T* qb = reinterpret_cast<T*>(sc.qbuf.data());
    std::memcpy(qb, P.queries + q0 * d, sizeof(T) * rows * d);
    std::memset(static_cast<void*>(qb + rows * d), 0, sizeof(T) * (rows_pad - rows) * d);
    for (int64_t r = 0; r < rows_pad; ++r) {
        sc.count[r] = 0;
        sc.thr_key[r] = EMPTY;
        sc.thr_f[r] = r < rows ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
        if (r < rows) {
            sc.ex[r] = P.excl_indices + P.excl_indptr[q0 + r];
            sc.ex_end[r] = P.excl_indices + P.excl_indptr[q0 + r + 1];
        }
    }
    const int64_t n_panels = (P.n_k + NR - 1) / NR;
    T tile[MR][NR];
    for (int64_t c0 = 0; c0 < n_panels; c0 += P.chunk_panels) {
        const int64_t c1 = std::min(n_panels, c0 + P.chunk_panels);
        for (int64_t g = 0; g < rows_pad; g += MR) {
            const T* qg = qb + g * d;
            T thr[MR];
            for (int i = 0; i < MR; ++i) thr[i] = static_cast<T>(sc.thr_f[g + i]);
            for (int64_t pn = c0; pn < c1; ++pn) {
                const T* kp = P.packed + pn * d * NR;
                V acc[MR][2] = {};
                for (int64_t p = 0; p < d; ++p) {
                    V k0, k1;
                    std::memcpy(&k0, kp + p * NR, sizeof(V));
                    std::memcpy(&k1, kp + p * NR + W, sizeof(V));
                    for (int i = 0; i < MR; ++i) {
                        const T b = qg[i * d + p];
                        acc[i][0] += k0 * b;
                        acc[i][1] += k1 * b;
                    }
                }
                // Fast reject: the micro-tile is dropped when every lane has s <= thr (a NaN or +inf
                // score, or a NaN threshold, fails the test: offer() then ranks the score as -inf).
                // Compared in 32-byte pieces, which GCC vectorises for every variant (it scalarises
                // 64-byte vector compares).
                {
                    typedef T H __attribute__((vector_size(32)));
                    typedef decltype(H{} <= H{}) M;
                    constexpr int NH = static_cast<int>(2 * sizeof(V) / sizeof(H));
                    M rej = ~M{};
                    for (int i = 0; i < MR; ++i) {
                        H h[NH];
                        std::memcpy(h, acc[i], sizeof h);
                        const H t = H{} + thr[i];
                        for (int c = 0; c < NH; ++c) rej &= h[c] <= t;
                    }
                    uint64_t u[sizeof(M) / 8];
                    std::memcpy(u, &rej, sizeof u);
                    uint64_t all = ~uint64_t(0);
                    for (unsigned l = 0; l < sizeof(M) / 8; ++l) all &= u[l];
                    if (all == ~uint64_t(0)) continue;
                }
                std::memcpy(tile, acc, sizeof tile);
                const int64_t jbase = pn * NR;
                const int lanes = static_cast<int>(std::min<int64_t>(NR, P.n_k - jbase));
                for (int i = 0; i < MR; ++i) {
                    const int64_t r = g + i;
                    if (r >= rows) break;
                    for (int l = 0; l < lanes; ++l) {
                        const float s = static_cast<float>(tile[i][l]);
                        if (!(s <= sc.thr_f[r])) offer(sc, r, s, jbase + l, cap, keep);
                    }
                    thr[i] = static_cast<T>(sc.thr_f[r]);
                }
            }
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        int64_t* buf = sc.cand.data() + r * cap;
        const int64_t n = std::min(sc.count[r], P.k);
        if (sc.count[r] > n) std::nth_element(buf, buf + n - 1, buf + sc.count[r], std::greater<int64_t>());
        std::sort(buf, buf + n, std::greater<int64_t>());
        float* vals = P.out_values + (q0 + r) * P.k;
        int64_t* idx = P.out_indices + (q0 + r) * P.k;
        for (int64_t t = 0; t < n; ++t) {
            vals[t] = key_value(buf[t]);
            idx[t] = key_index(buf[t]);
        }
        for (int64_t t = n; t < P.k; ++t) {
            vals[t] = -std::numeric_limits<float>::infinity();
            idx[t] = -1;
        }
    }
}

// Instruction-set variants (kdfast::Isa, dispatch.h): the same body compiled for AVX-512, AVX2+FMA
// (x86-64 only) and the baseline ISA of the build.
using kdfast::Isa;
#if KDFAST_X86
__attribute__((target(KDFAST_ISA_AVX512))) void block_avx512(const Problem<float>& P, int64_t q0, int64_t n,
                                                             Scratch& sc) {
    block_impl<float, 16, 12>(P, q0, n, sc);
}
__attribute__((target(KDFAST_ISA_AVX512))) void block_avx512(const Problem<double>& P, int64_t q0, int64_t n,
                                                             Scratch& sc) {
    block_impl<double, 8, 12>(P, q0, n, sc);
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

// (vector width W in elements of T, MR) of each variant; NR = 2 * W.
template <typename T>
void isa_shape(Isa isa, int& W, int& MR) {
    const int bytes = isa == Isa::avx512 ? 64 : isa == Isa::avx2 ? 32 : 16;
    W = bytes / static_cast<int>(sizeof(T));
    MR = isa == Isa::avx512 ? 12 : 6;
}

template <typename T>
void run(const T* queries, const T* keys, int64_t n_q, int64_t n_k, int64_t d, int64_t k, const int64_t* excl_indptr,
         const int64_t* excl_indices, float* out_values, int64_t* out_indices, int n_threads, Isa isa) {
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
    P.packed = packed.data();
    P.n_q = n_q;
    P.n_k = n_k;
    P.d = d;
    P.k = k;
    P.excl_indptr = excl_indptr;
    P.excl_indices = excl_indices;
    P.out_values = out_values;
    P.out_indices = out_indices;
    P.keep = std::max<int64_t>(1, std::min(k, n_k));
    P.cap = 2 * P.keep;
    P.chunk_panels =
        std::max<int64_t>(1, (256 * 1024) / (static_cast<int64_t>(sizeof(T)) * std::max<int64_t>(d, 1) * NR));
    // Query rows per block: up to 16 micro-tiles, fewer so that every thread gets work and the
    // candidate buffers stay under 64 MB per thread.
    const int64_t per_thread = (n_q + n_threads - 1) / n_threads;
    int64_t qb = std::min<int64_t>(16 * MR, (per_thread + MR - 1) / MR * MR);
    const int64_t by_mem = (int64_t(64) << 20) / (P.cap * 8) / MR * MR;
    qb = std::max<int64_t>(MR, std::min(qb, by_mem));
    const int64_t n_blocks = (n_q + qb - 1) / qb;
    const size_t n_cand = kdfast::scratch_count("topk_scores: the candidate buffers (k keys per query row)",
                                                sizeof(int64_t), {qb, P.cap});
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(n_threads)
    {
        Scratch sc;
        errors.run([&] {
            sc.qbuf.resize(sizeof(T) * qb * d);
            sc.cand.resize(n_cand);
            sc.count.resize(qb);
            sc.thr_key.resize(qb);
            sc.thr_f.resize(qb);
            sc.ex.resize(qb);
            sc.ex_end.resize(qb);
        });
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n_blocks; ++b) {
            if (errors.failed()) continue;
            const int64_t q0 = b * qb, rows = std::min(qb, n_q - q0);
            switch (isa) {
                case Isa::avx512: block_avx512(P, q0, rows, sc); break;
                case Isa::avx2: block_avx2(P, q0, rows, sc); break;
                default: block_generic(P, q0, rows, sc); break;
            }
        }
    }
    errors.rethrow();
}

void topk_scores(std::uintptr_t queries, std::uintptr_t keys, int64_t n_q, int64_t n_k, int64_t d, int64_t k,
                 std::uintptr_t excl_indptr, std::uintptr_t excl_indices, std::uintptr_t out_values,
                 std::uintptr_t out_indices, bool is_double, int n_threads, const std::string& isa_req) {
    if (n_q < 0 || n_k < 0 || d < 0 || k < 1) throw std::invalid_argument("topk_scores: bad sizes");
    if (n_k > LOW) throw std::invalid_argument("topk_scores: n_k must be below 2^32");
    const Isa isa = kdfast::pick_isa(isa_req);
    n_threads = kdfast::team_size(n_threads);
    py::gil_scoped_release release;
    if (n_q == 0) return;
    using kdfast::as_ptr;
    kdfast::by_dtype(is_double, [&](auto tag) {
        using T = typename decltype(tag)::type;
        run<T>(as_ptr<const T>(queries), as_ptr<const T>(keys), n_q, n_k, d, k, as_ptr<const int64_t>(excl_indptr),
               as_ptr<const int64_t>(excl_indices), as_ptr<float>(out_values), as_ptr<int64_t>(out_indices), n_threads,
               isa);
    });
}

}  // namespace

void register_topk(pybind11::module_& m) {
    m.def("topk_scores", &topk_scores, "Top-k keys per query by dot product (raw buffers; see kdfast/ops/topk/cpu.py).",
          py::arg("queries"), py::arg("keys"), py::arg("n_q"), py::arg("n_k"), py::arg("d"), py::arg("k"),
          py::arg("excl_indptr"), py::arg("excl_indices"), py::arg("out_values"), py::arg("out_indices"),
          py::arg("is_double"), py::arg("n_threads"), py::arg("isa") = "auto");
    m.def(
        "topk_isa", [](const std::string& name) { return std::string(kdfast::isa_name(kdfast::pick_isa(name))); },
        "The instruction-set variant topk_scores uses for isa=name ('auto' picks the widest supported).",
        py::arg("name") = "auto");
}
