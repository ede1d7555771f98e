// OpenMP helpers: the team size a kernel asks for, scratch sizes checked before a region, and
// RegionErrors, which keeps exceptions from escaping a parallel region.
//
// Every kernel takes n_threads (torch.get_num_threads()) and releases the GIL while it runs
// (py::gil_scoped_release in the kernel's scope). Errors are thrown C++ exceptions, which pybind11 turns
// into Python ones: std::invalid_argument and std::length_error -> ValueError, std::out_of_range ->
// IndexError, std::bad_alloc -> MemoryError. A kernel throws only after its parallel regions have ended,
// while the release guard is still alive; unwinding runs the guard's destructor, which takes the GIL back
// before pybind11 translates the exception. An exception leaving an OpenMP region would instead call
// std::terminate and kill the Python process: whatever can throw inside a region (a std::vector
// allocation included) runs through RegionErrors::run.
#pragma once

#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace kdfast {

// n_threads as an OpenMP team size: at least 1 (num_threads(0) is not allowed).
inline int team_size(int n_threads) { return n_threads < 1 ? 1 : n_threads; }

// The element count prod(factors) of a scratch buffer of elem_bytes-sized elements whose size derives from
// the caller's arguments; std::length_error naming `what` when a factor is negative or the buffer could
// never be allocated (over PTRDIFF_MAX bytes). Called before a region, so that the error is a clear one.
inline std::size_t scratch_count(const char* what, std::size_t elem_bytes, std::initializer_list<int64_t> factors) {
    const uint64_t max_count = static_cast<uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()) / elem_bytes;
    uint64_t n = 1;
    bool ok = true;
    for (const int64_t f : factors) ok = ok && f >= 0 && !__builtin_mul_overflow(n, static_cast<uint64_t>(f), &n);
    if (!ok || n > max_count)
        throw std::length_error(std::string(what) + " does not fit in memory (its size comes from the arguments)");
    return static_cast<std::size_t>(n);
}

// Collects the exceptions thrown inside an OpenMP parallel region; rethrow() raises one after the region.
//
//     kdfast::RegionErrors errors;
//     #pragma omp parallel num_threads(kdfast::team_size(n_threads))
//     {
//         std::vector<T> scratch;
//         errors.run([&] { scratch.resize(n); });       // set-up: a failure stops every item
//     #pragma omp for schedule(dynamic, 16)
//         for (int64_t b = 0; b < B; ++b) {
//             if (errors.stops(b)) continue;             // an earlier item has failed
//             errors.run(b, [&] { row(b, scratch); });
//         }
//     }
//     errors.rethrow();
//
// run(key, f) calls f and keeps what it throws. Keys are item indices: of several exceptions the one with
// the smallest key is rethrown, and stops(key) skips only the items after a failed one, so the error
// reported is that of the first bad item whatever the schedule and the thread count. Every thread must
// still reach each worksharing construct of the region (omp for, barrier), which is why a failure skips
// the remaining bodies instead of leaving the region.
class RegionErrors {
  public:
    // Runs f() and keeps the exception it throws, if any; never throws.
    template <typename F>
    void run(int64_t key, F&& f) noexcept {
        try {
            std::forward<F>(f)();
        } catch (...) {
            keep(key, std::current_exception());
        }
    }

    // A thread's set-up (scratch allocations): its failure comes before every item's.
    template <typename F>
    void run(F&& f) noexcept {
        run(kSetup, std::forward<F>(f));
    }

    // True when an item with a smaller key (or a set-up) has failed: the work for `key` is not needed.
    bool stops(int64_t key) const noexcept { return first_.load(std::memory_order_relaxed) < key; }

    bool failed() const noexcept { return first_.load(std::memory_order_relaxed) != kNone; }

    // Throws the kept exception, if any. Call after the region, outside of it.
    void rethrow() const {
        if (error_) std::rethrow_exception(error_);
    }

  private:
    static constexpr int64_t kSetup = std::numeric_limits<int64_t>::min();
    static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

    void keep(int64_t key, std::exception_ptr e) noexcept {
#pragma omp critical(kdfast_region_errors)
        if (key < first_.load(std::memory_order_relaxed)) {
            error_ = std::move(e);
            first_.store(key, std::memory_order_relaxed);
        }
    }

    std::atomic<int64_t> first_{kNone};
    std::exception_ptr error_;
};

}  // namespace kdfast
