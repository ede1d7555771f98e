// Teacher-ranking samplers (kdfast.sampling, backend "cpp"): one independent random stream per row, so
// the result depends on the seed only, never on the thread count.
//
// rank_discounted: K distinct positions of 0..n-1 per row with p(r) ~ exp(-(r+1)/T), drawn without
//   replacement by the exponential race: key_r = log(E_r) + (r+1)/T with E_r ~ Exp(1); the K smallest
//   keys are a successive-draw (Plackett-Luce) sample with weights exp(-(r+1)/T) (the same law as the
//   Gumbel-top-k of the torch backend). Kept in a max-heap of K; the later positions that enter it are
//   found by exact skips (below), not one draw each. Returned sorted ascending.
// uniform_excluding: `size` distinct ids per row, uniform over [0, n_ids) minus the row's excluded ids
//   (sorted keys row * n_ids + id). Rejection against the excluded and the already drawn ids; rows with
//   few available ids are completed exactly (the free ids, then a partial Fisher-Yates shuffle). Uniform
//   over the subsets of the available ids. Membership: a per-thread bitmap of n_ids bits while that is
//   small (n_ids <= kBitmapIds), else a binary search in the row's sorted excluded ids and a hash set of
//   the drawn ones, so that the memory does not grow with n_ids (2^40 ids need no 2^40-bit bitmap). Both
//   answer the same questions in the same order: the same sample for a seed either way.
//
// Errors (ValueError): a row's keys outside row * n_ids + [0, n_ids), a negative count, or fewer
// available ids than size; the error of the first such row is reported, whatever the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "buffers.h"
#include "parallel.h"

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
    if (n_rows < 0 || k < 1 || k > n)
        throw std::invalid_argument(
            "rank_discounted_sample: needs n_rows >= 0 and 1 <= k <= n, got n_rows = " + std::to_string(n_rows) +
            ", n = " + std::to_string(n) + ", k = " + std::to_string(k));
    if (!(temperature > 0))
        throw std::invalid_argument("rank_discounted_sample: temperature must be > 0, got " +
                                    std::to_string(temperature));
    py::gil_scoped_release release;
    std::vector<double> offset(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) offset[r] = static_cast<double>(r + 1) / temperature;
    const double log_one_minus_q = std::log(-std::expm1(-1.0 / temperature));
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(kdfast::team_size(n_threads))
    {
        std::vector<std::pair<double, int64_t>> heap;
        errors.run([&] { heap.resize(static_cast<size_t>(k)); });
#pragma omp for schedule(dynamic, 64)
        for (int64_t row = 0; row < n_rows; ++row) {
            if (errors.failed()) continue;
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
    errors.rethrow();
}

// The ids of one row that are excluded or already drawn, two ways with one interface (sample_row is
// compiled for each, so the draw loop tests no mode):
//   Bitmap     n_ids bits per thread (the row's ids are marked, and unmarked again at the end of the row),
//              while n_ids <= kBitmapIds;
//   SparseSet  a binary search in the row's excluded ids (sorted here if the caller's were not) and an
//              open-addressing hash set of the drawn ids: memory in the row's sizes, not in n_ids.
constexpr int64_t kBitmapIds = int64_t(1) << 27;  // 16 MiB of bitmap per thread at most

class Bitmap {
  public:
    void init(int64_t n_ids) { bits_.assign(static_cast<size_t>((n_ids + 63) / 64), 0); }

    // The row's excluded ids are keys[p] - base, p < n (each in [0, n_ids)).
    void begin_row(const int64_t* keys, int64_t n, int64_t base, int64_t /*size*/) {
        for (int64_t p = 0; p < n; ++p) mark(keys[p] - base);
    }
    bool test(int64_t i) const { return (bits_[i >> 6] >> (i & 63)) & 1; }
    void draw(int64_t i) { mark(i); }  // an id that test() did not find
    // The ids of [0, n_ids) that are not excluded, in increasing order (rows completed exactly).
    void free_ids(int64_t n_ids, std::vector<int64_t>& out) const {
        out.clear();
        for (int64_t i = 0; i < n_ids; ++i)
            if (!test(i)) out.push_back(i);
    }
    // Undoes the row: the arguments of begin_row, and the ids drawn[0..n_drawn) that draw() added.
    void end_row(const int64_t* keys, int64_t n, int64_t base, const int64_t* drawn, int64_t n_drawn) {
        for (int64_t j = 0; j < n_drawn; ++j) unmark(drawn[j]);
        for (int64_t p = 0; p < n; ++p) unmark(keys[p] - base);
    }

  private:
    void mark(int64_t i) { bits_[i >> 6] |= uint64_t(1) << (i & 63); }
    void unmark(int64_t i) { bits_[i >> 6] &= ~(uint64_t(1) << (i & 63)); }

    std::vector<uint64_t> bits_;
};

class SparseSet {
  public:
    void begin_row(const int64_t* keys, int64_t n, int64_t base, int64_t size) {
        excluded_.resize(static_cast<size_t>(n));
        for (int64_t p = 0; p < n; ++p) excluded_[p] = keys[p] - base;
        if (!std::is_sorted(excluded_.begin(), excluded_.end())) std::sort(excluded_.begin(), excluded_.end());
        int shift = 60;  // a table of 2^(64 - shift) >= 2 size slots, at least 16
        while (shift > 1 && (uint64_t(1) << (64 - shift)) < 2 * static_cast<uint64_t>(size)) --shift;
        shift_ = shift;
        drawn_.assign(size_t(1) << (64 - shift), -1);
    }
    bool test(int64_t i) const {
        if (std::binary_search(excluded_.begin(), excluded_.end(), i)) return true;
        for (size_t h = slot(i);; h = (h + 1) & (drawn_.size() - 1)) {
            if (drawn_[h] == i) return true;
            if (drawn_[h] < 0) return false;
        }
    }
    void draw(int64_t i) {
        size_t h = slot(i);
        while (drawn_[h] >= 0) h = (h + 1) & (drawn_.size() - 1);
        drawn_[h] = i;
    }
    void free_ids(int64_t n_ids, std::vector<int64_t>& out) const {
        out.clear();
        int64_t i = 0;
        for (const int64_t x : excluded_) {
            for (; i < x; ++i) out.push_back(i);
            if (i == x) ++i;  // (a repeated id is already behind i)
        }
        for (; i < n_ids; ++i) out.push_back(i);
    }
    void end_row(const int64_t*, int64_t, int64_t, const int64_t*, int64_t) {}

  private:
    size_t slot(int64_t i) const { return static_cast<size_t>((uint64_t(i) * 0x9E3779B97F4A7C15ULL) >> shift_); }

    int shift_ = 60;
    std::vector<int64_t> excluded_, drawn_;
};

// One row of uniform_excluding, whose excluded ids are keys[p] - base, p < n_ex (checked): `size` ids into o.
template <typename Set>
void sample_row(uint64_t seed, int64_t row, int64_t n_ids, int64_t size, const int64_t* keys, int64_t n_ex,
                int64_t base, int64_t avail, Set& taken, std::vector<int64_t>& free_ids, int64_t* o) {
    taken.begin_row(keys, n_ex, base, size);
    Rng rng(seed, static_cast<uint64_t>(row));
    int64_t n_drawn = 0;
    if (avail >= 2 * size) {  // rejection: each draw succeeds with probability >= 1/2
        for (int64_t j = 0; j < size;) {
            const int64_t i = static_cast<int64_t>(rng.below(static_cast<uint64_t>(n_ids)));
            if (taken.test(i)) continue;
            taken.draw(i);
            o[j++] = i;
        }
        n_drawn = size;
    } else {  // exact: the free ids, then the first `size` places of a Fisher-Yates shuffle
        taken.free_ids(n_ids, free_ids);
        for (int64_t j = 0; j < size; ++j) {
            const int64_t pick = j + static_cast<int64_t>(rng.below(static_cast<uint64_t>(avail - j)));
            std::swap(free_ids[j], free_ids[pick]);
            o[j] = free_ids[j];
        }
    }
    taken.end_row(keys, n_ex, base, o, n_drawn);
}

// Writes `size` ids per row into out [n_rows, size]; throws std::invalid_argument for the first row
// (smallest index) whose keys are not row * n_ids + id with id in [0, n_ids), whose count is negative, or
// whose available ids are fewer than size (the rows after it may be left unwritten).
void uniform_excluding(uint64_t seed, int64_t n_rows, int64_t n_ids, int64_t size, const int64_t* keys,
                       const int64_t* offsets, int64_t* out, int n_threads) {
    if (n_rows < 0 || n_ids < 0 || size < 0)
        throw std::invalid_argument("uniform_excluding_sample: n_rows, n_ids and size must be >= 0, got " +
                                    std::to_string(n_rows) + ", " + std::to_string(n_ids) + ", " +
                                    std::to_string(size));
    // rows above max_row have no valid key: row * n_ids would not fit in int64
    const int64_t max_row =
        n_ids == 0 ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::max() / n_ids;
    const bool dense = n_ids <= kBitmapIds;
    py::gil_scoped_release release;
    kdfast::RegionErrors errors;
#pragma omp parallel num_threads(kdfast::team_size(n_threads))
    {
        Bitmap bitmap;
        SparseSet sparse;
        std::vector<int64_t> free_ids;
        errors.run([&] {
            if (dense) bitmap.init(n_ids);
        });
#pragma omp for schedule(dynamic, 64)
        for (int64_t row = 0; row < n_rows; ++row) {
            if (errors.stops(row)) continue;
            errors.run(row, [&] {
                const int64_t lo = offsets[row], hi = offsets[row + 1];
                if (hi < lo)
                    throw std::invalid_argument("excluded_keys holds a negative count for row " + std::to_string(row) +
                                                " (counts as returned by exclusion_keys)");
                const int64_t avail = n_ids - (hi - lo);
                if (avail < size)
                    throw std::invalid_argument("size = " + std::to_string(size) + " is larger than the " +
                                                std::to_string(std::max<int64_t>(avail, 0)) + " available ids of row " +
                                                std::to_string(row) + " (" + std::to_string(n_ids) + " ids, " +
                                                std::to_string(hi - lo) + " excluded)");
                bool consistent = hi == lo || row <= max_row;
                const int64_t base = consistent && hi > lo ? row * n_ids : 0;
                for (int64_t p = lo; p < hi; ++p) consistent &= keys[p] >= base && keys[p] - base < n_ids;
                if (!consistent)
                    throw std::invalid_argument("excluded_keys holds keys outside row " + std::to_string(row) +
                                                " (keys must be row * n_ids + id, sorted, with per-row counts, "
                                                "as returned by exclusion_keys)");
                if (dense)
                    sample_row(seed, row, n_ids, size, keys + lo, hi - lo, base, avail, bitmap, free_ids,
                               out + row * size);
                else
                    sample_row(seed, row, n_ids, size, keys + lo, hi - lo, base, avail, sparse, free_ids,
                               out + row * size);
            });
        }
    }
    errors.rethrow();
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
            uniform_excluding(seed, n_rows, n_ids, size, as_ptr<const int64_t>(keys), as_ptr<const int64_t>(offsets),
                              as_ptr<int64_t>(out), n_threads);
        },
        "size distinct ids per row, uniform over the ids not in the row's sorted exclusion keys; raises "
        "ValueError for a row whose keys fall outside it or that has fewer than size available ids");
}
