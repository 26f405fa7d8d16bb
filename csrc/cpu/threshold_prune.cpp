// x with every |x| < tau set to zero, and how many entries were kept: the pruned input a
// dense-path Powerprop conv saves for its weight gradient under a threshold
// (sparsefl/nn/powerprop.py _save_pruned).  In torch it was abs, compare, count_nonzero and
// masked_fill: four passes, count_nonzero alone ~350 us on a 200K-entry stage-1 input;
// here one pass.  The rule is the packs' (act_pack.cpp): keep iff key(x) >= key(tau), so
// NaN (keys above inf's) is kept and shows in the gradient, as it did in torch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dtype.h"
#include "simd.h"
#include "topk_select.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace sparsefl {
namespace {

// One run of float32 bits: branch-free, so the compiler vectorises it for the target ISA.
template <int kTag>  // the tag only makes one copy per ISA
SFL_INLINE int64_t prune_run(const uint32_t* x, uint32_t* out, int64_t n, uint32_t tk) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = (x[i] & 0x7fffffffu) >= tk;
    out[i] = keep ? x[i] : 0u;
    kept += keep;
  }
  return kept;
}

#if defined(SFL_X86)
SFL_AVX512 int64_t prune_avx512(const uint32_t* x, uint32_t* o, int64_t n, uint32_t tk) {
  return prune_run<0>(x, o, n, tk);
}
SFL_AVX2 int64_t prune_avx2(const uint32_t* x, uint32_t* o, int64_t n, uint32_t tk) {
  return prune_run<1>(x, o, n, tk);
}
#endif
int64_t prune_portable(const uint32_t* x, uint32_t* o, int64_t n, uint32_t tk) {
  return prune_run<2>(x, o, n, tk);
}

int64_t prune_any(const uint32_t* x, uint32_t* o, int64_t n, uint32_t tk) {
#if defined(SFL_X86)
  if (isa() == Isa::kAvx512) return prune_avx512(x, o, n, tk);
  if (isa() == Isa::kAvx2) return prune_avx2(x, o, n, tk);
#endif
  return prune_portable(x, o, n, tk);
}

std::tuple<at::Tensor, int64_t> threshold_prune_cpu(const at::Tensor& x_in, double tau) {
  const char* op = "sparsefl.threshold_prune";
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), op, ": the tensor must be on CPU");
  const auto st = x_in.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": dtype ", st, " is not supported (float32, float16, bfloat16)");
  const auto tk = static_cast<uint32_t>(tau_key_of(tau, op));
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  constexpr int64_t kGrain = 1 << 16;
  const int64_t parts = std::max<int64_t>(1, (n + kGrain - 1) / kGrain);
  std::vector<int64_t> kept(parts, 0);
  if (st == at::kFloat) {
    const auto* xs = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
    auto* os = reinterpret_cast<uint32_t*>(out.data_ptr<float>());
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p * kGrain, e = std::min(n, b + kGrain);
        kept[p] = prune_any(xs + b, os + b, e - b, tk);
      }
    });
  } else {
    dispatch_float_dtype(st, op, [&](auto tag) {
      using T = decltype(tag);
      const T* xs = x.data_ptr<T>();
      T* os = out.data_ptr<T>();
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          int64_t c = 0;
          for (int64_t i = p * kGrain, e = std::min(n, i + kGrain); i < e; ++i) {
            float v = static_cast<float>(xs[i]);
            uint32_t b;
            std::memcpy(&b, &v, sizeof b);
            const bool keep = (b & 0x7fffffffu) >= tk;
            os[i] = keep ? xs[i] : T(0);
            c += keep;
          }
          kept[p] = c;
        }
      });
    });
  }
  int64_t total = 0;
  for (const int64_t c : kept) total += c;
  return {out, total};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def("threshold_prune(Tensor x, float tau) -> (Tensor, int)", &threshold_prune_cpu);
}

}  // namespace sparsefl
