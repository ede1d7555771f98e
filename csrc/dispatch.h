// Choosing the compiled variant of a kernel:
//  * by_dtype: the float / double instantiation from a binding's is_double flag, written once;
//  * KDFAST_INLINE, KDFAST_CLONES: force-inlined per-row helpers, and row loops compiled twice
//    (x86-64-v3 and baseline) with the variant picked at load time;
//  * Isa, isa_supported, pick_isa, isa_name: explicit instruction-set variants picked at run time by name
//    ("auto" = the widest the CPU supports), for kernels that hand-tune each variant (topk).
#pragma once

#include <stdexcept>
#include <string>

namespace kdfast {

// A type as a value, for generic lambdas: using T = typename decltype(tag)::type.
template <typename T>
struct Type {
    using type = T;
};

// f(Type<double>{}) when is_double, else f(Type<float>{}); both must return the same type.
template <typename F>
inline decltype(auto) by_dtype(bool is_double, F&& f) {
    if (is_double) return f(Type<double>{});
    return f(Type<float>{});
}

}  // namespace kdfast

#define KDFAST_INLINE __attribute__((always_inline)) inline

// Functions marked KDFAST_CLONES (the row loops; every per-row routine they call is KDFAST_INLINE) are
// compiled twice for x86-64 (x86-64-v3 = AVX2+FMA, and baseline x86-64), chosen at load time from the
// CPU's features, since the extension is built without -march flags. (Not "arch=haswell": that clone is
// picked only on Intel Haswell-family CPUs, never on AMD or later Intel cores.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define KDFAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KDFAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KDFAST_CLONES
#endif

// Instruction sets of the explicit variants: functions compiled with __attribute__((target(...))) of
// these strings (x86 only; elsewhere only Isa::generic exists).
#if defined(__x86_64__) || defined(__i386__)
#define KDFAST_X86 1
#define KDFAST_ISA_AVX512 "avx512f,avx512dq,avx512vl,avx2,fma"
#define KDFAST_ISA_AVX2 "avx2,fma"
#else
#define KDFAST_X86 0
#endif

namespace kdfast {

enum class Isa { generic, avx2, avx512 };

inline bool isa_supported(Isa isa) {
#if KDFAST_X86
    __builtin_cpu_init();
    switch (isa) {
        case Isa::avx512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
                   __builtin_cpu_supports("fma");
        case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        default: return true;
    }
#else
    return isa == Isa::generic;
#endif
}

// "auto" (the widest supported), "avx512", "avx2" or "generic"; std::invalid_argument for another name
// or one this CPU does not support.
inline Isa pick_isa(const std::string& name) {
    if (name == "auto") {
        if (isa_supported(Isa::avx512)) return Isa::avx512;
        if (isa_supported(Isa::avx2)) return Isa::avx2;
        return Isa::generic;
    }
    Isa isa;
    if (name == "avx512")
        isa = Isa::avx512;
    else if (name == "avx2")
        isa = Isa::avx2;
    else if (name == "generic")
        isa = Isa::generic;
    else
        throw std::invalid_argument("isa must be 'auto', 'avx512', 'avx2' or 'generic', got '" + name + "'");
    if (!isa_supported(isa)) throw std::invalid_argument("this CPU does not support isa '" + name + "'");
    return isa;
}

inline const char* isa_name(Isa isa) { return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "generic"; }

}  // namespace kdfast
