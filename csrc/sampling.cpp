// Teacher-ranking samplers (kdfast.sampling, backend "cpp"): one independent random stream per row, so
// the result depends on the seed only, never on the thread count.
//
// rank_discounted: K distinct positions of 0..n-1 per row with p(r) ~ exp(-(r+1)/T), drawn without
//   replacement by the exponential race: key_r = log(E_r) + (r+1)/T with E_r ~ Exp(1); the K smallest
//   keys are a successive-draw (Plackett-Luce) sample with weights exp(-(r+1)/T) (the same law as the
//   Gumbel-top-k of the torch backend). Kept in a max-heap of K; the later positions that enter it are
//   found by exact skips (below), not one draw each. Returned sorted ascending.
// uniform_excluding: `size` distinct ids per row, uniform over [0, n_ids) minus the row's excluded ids
//   (sorted keys row * n_ids + id). Rejection against a per-thread bitmap holding the excluded and the
//   already drawn ids; rows with few available ids are completed exactly (the free ids, then a partial
//   Fisher-Yates shuffle). Uniform over the subsets of the available ids.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bindings.h"
#include "buffers.h"

namespace py = pybind11;
using kdfast::as_ptr;

namespace {

// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit counter through a bijective mixer. Each row starts at
// the mixed (seed, row) pair, so rows are independent streams.
inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

struct Rng {
    uint64_t state;
    Rng(uint64_t seed, uint64_t row) : state(mix64(seed ^ mix64(row + 0x9E3779B97F4A7C15ULL))) {}
    uint64_t next() {
        state += 0x9E3779B97F4A7C15ULL;
        return mix64(state);
    }
    // uniform in (0, 1), 53 random bits
    double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }
    // log E with E ~ Exp(1)
    double log_exponential() { return std::log(-std::log(uniform())); }
    // uniform integer in [0, n), exact (Lemire's multiply-and-reject)
    uint64_t below(uint64_t n) {
        unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
        uint64_t low = static_cast<uint64_t>(m);
        if (low < n) {
            const uint64_t floor = (0 - n) % n;
            while (low < floor) {
                m = static_cast<unsigned __int128>(next()) * n;
                low = static_cast<uint64_t>(m);
            }
        }
        return static_cast<uint64_t>(m >> 64);
    }
};

void rank_discounted(uint64_t seed, int64_t n_rows, int64_t n, int64_t k, double temperature, int64_t* out,
                     int n_threads) {
    py::gil_scoped_release release;
    std::vector<double> offset(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) offset[r] = static_cast<double>(r + 1) / temperature;
    const double log_one_minus_q = std::log(-std::expm1(-1.0 / temperature));
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<std::pair<double, int64_t>> heap(static_cast<size_t>(k));
#pragma omp for schedule(dynamic, 64)
        for (int64_t row = 0; row < n_rows; ++row) {
            Rng rng(seed, static_cast<uint64_t>(row));
            for (int64_t r = 0; r < k; ++r) heap[r] = {rng.log_exponential() + offset[r], r};
            std::make_heap(heap.begin(), heap.end());  // max-heap by key: the worst kept position on top
            // Positions r >= k: position r displaces the worst kept one (key tau) iff E_r < c_r =
            // exp(tau - (r+1)/T). While tau is fixed, c_r = c_r0 q^(r - r0) with q = exp(-1/T), so the
            // first r that does is drawn at once (P(none of r0..r0+m) = exp(-c_r0 (1 - q^(m+1)) / (1 - q)))
            // and its E from Exp(1) truncated to [0, c_r): a few steps per row instead of n.
            for (int64_t r = k; r < n;) {
                const double tau = heap.front().first;
                const double log_c0 = tau - offset[r];
                const double log_x = rng.log_exponential() + log_one_minus_q - log_c0;
                if (log_x >= 0) break;  // no later position gets in
                const double steps = -temperature * std::log1p(-std::exp(log_x));
                if (!(steps < static_cast<double>(n - r))) break;
                r += static_cast<int64_t>(steps);  // the first m >= 0 with m + 1 > steps
                const double c = std::exp(tau - offset[r]);
                const double e = -std::log1p(rng.uniform() * std::expm1(-c));
                std::pop_heap(heap.begin(), heap.end());
                heap.back() = {std::log(e) + offset[r], r};
                std::push_heap(heap.begin(), heap.end());
                ++r;
            }
            int64_t* o = out + row * k;
            for (int64_t j = 0; j < k; ++j) o[j] = heap[j].second;
            std::sort(o, o + k);
        }
    }
}

// Returns -1; or a row whose available ids are fewer than size; or -2 - row for a row whose keys are
// not row * n_ids + id with id in [0, n_ids) (nothing is written for those rows).
int64_t uniform_excluding(uint64_t seed, int64_t n_rows, int64_t n_ids, int64_t size, const int64_t* keys,
                          const int64_t* offsets, int64_t* out, int n_threads) {
    py::gil_scoped_release release;
    int64_t short_row = -1, bad_row = -1;
#pragma omp parallel num_threads(n_threads)
    {
        std::vector<uint64_t> taken(static_cast<size_t>((n_ids + 63) / 64), 0);
        std::vector<int64_t> free_ids;
        auto test = [&](int64_t i) { return (taken[i >> 6] >> (i & 63)) & 1; };
        auto mark = [&](int64_t i) { taken[i >> 6] |= uint64_t(1) << (i & 63); };
        auto unmark = [&](int64_t i) { taken[i >> 6] &= ~(uint64_t(1) << (i & 63)); };
#pragma omp for schedule(dynamic, 64)
        for (int64_t row = 0; row < n_rows; ++row) {
            const int64_t lo = offsets[row], hi = offsets[row + 1];
            const int64_t base = row * n_ids;
            const int64_t avail = n_ids - (hi - lo);
            if (avail < size) {
#pragma omp critical(kdfast_sampling_short)
                short_row = short_row < 0 ? row : std::min(short_row, row);
                continue;
            }
            bool consistent = true;
            for (int64_t p = lo; p < hi; ++p) consistent &= keys[p] >= base && keys[p] - base < n_ids;
            if (!consistent) {
#pragma omp critical(kdfast_sampling_short)
                bad_row = bad_row < 0 ? row : std::min(bad_row, row);
                continue;
            }
            for (int64_t p = lo; p < hi; ++p) mark(keys[p] - base);
            int64_t* o = out + row * size;
            Rng rng(seed, static_cast<uint64_t>(row));
            if (avail >= 2 * size) {  // rejection: each draw succeeds with probability >= 1/2
                for (int64_t j = 0; j < size;) {
                    const int64_t i = static_cast<int64_t>(rng.below(static_cast<uint64_t>(n_ids)));
                    if (test(i)) continue;
                    mark(i);
                    o[j++] = i;
                }
                for (int64_t j = 0; j < size; ++j) unmark(o[j]);
            } else {  // exact: the free ids, then the first `size` places of a Fisher-Yates shuffle
                free_ids.clear();
                for (int64_t i = 0; i < n_ids; ++i)
                    if (!test(i)) free_ids.push_back(i);
                for (int64_t j = 0; j < size; ++j) {
                    const int64_t pick = j + static_cast<int64_t>(rng.below(static_cast<uint64_t>(avail - j)));
                    std::swap(free_ids[j], free_ids[pick]);
                    o[j] = free_ids[j];
                }
            }
            for (int64_t p = lo; p < hi; ++p) unmark(keys[p] - base);
        }
    }
    return bad_row >= 0 ? -2 - bad_row : short_row;
}

}  // namespace

void register_sampling(py::module_& m) {
    m.def(
        "rank_discounted_sample",
        [](uint64_t seed, int64_t n_rows, int64_t n, int64_t k, double temperature, std::uintptr_t out, int n_threads) {
            rank_discounted(seed, n_rows, n, k, temperature, as_ptr<int64_t>(out), n_threads);
        },
        "k distinct sorted positions of 0..n-1 per row, p(r) ~ exp(-(r+1)/T), without replacement");
    m.def(
        "uniform_excluding_sample",
        [](uint64_t seed, int64_t n_rows, int64_t n_ids, int64_t size, std::uintptr_t keys, std::uintptr_t offsets,
           std::uintptr_t out, int n_threads) {
            return uniform_excluding(seed, n_rows, n_ids, size, as_ptr<const int64_t>(keys),
                                     as_ptr<const int64_t>(offsets), as_ptr<int64_t>(out), n_threads);
        },
        "size distinct ids per row, uniform over the ids not in the row's sorted exclusion keys; returns -1, "
        "a row with too few available ids, or -2 - row for a row whose keys fall outside it");
}
