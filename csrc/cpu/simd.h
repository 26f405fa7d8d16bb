// Portable SIMD for the sparse kernels: GCC vector extensions, one source compiled per ISA.
// A kernel body is a template over the vector type (v16 = AVX-512, v8 = AVX2, v4 = SSE);
// an entry point per ISA (SFL_AVX512 / SFL_AVX2 / plain) inlines it, and isa() picks one
// at run time (the build never uses -march=native).  SPARSEFL_DISABLE_AVX512=1 or
// SPARSEFL_DISABLE_AVX2=1 force the narrower paths (tests run every one).
#pragma once

#if defined(__x86_64__)
#define SFL_X86 1
#include <immintrin.h>
#endif

#include <cstdlib>
#include <cstring>

// Vector-extension values only pass between always-inline helpers: no ABI crosses a call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sparsefl {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

#define SFL_INLINE __attribute__((always_inline)) inline

template <typename V>
SFL_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
SFL_INLINE void vstore(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
template <typename V>
SFL_INLINE V vbroadcast(float s) { return V{} + s; }

#if defined(SFL_X86)
#define SFL_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#define SFL_AVX2 __attribute__((target("avx2,fma")))
#else
#define SFL_AVX512
#define SFL_AVX2
#endif

enum class Isa { kAvx512, kAvx2, kPortable };

// The widest ISA this CPU runs (and the environment allows), decided once per process.
inline Isa isa() {
  static const Isa v = [] {
    const char* off = std::getenv("SPARSEFL_DISABLE_AVX512");
    const char* off2 = std::getenv("SPARSEFL_DISABLE_AVX2");
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!(off2 && *off2 == '1')) {
      if (!(off && *off == '1') && __builtin_cpu_supports("avx512f") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return Isa::kAvx512;
      if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    }
#endif
    (void)off; (void)off2;
    return Isa::kPortable;
  }();
  return v;
}

}  // namespace sparsefl
