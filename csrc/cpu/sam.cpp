// Fused SAM / ASAM / two-direction perturbation and multi-tensor restore, C++ CPU backend.
//
// The algorithm (see sparsefl/ops/sam.py for the reference it must match):
//
//   T_i    = |w_i| + eta   for tensors flagged adaptive, 1 otherwise      (ASAM's operator)
//   n1     = sqrt(sum_i (T_i * g1_i)^2)          over ALL tensors together
//   n2     = sqrt(sum_i g2_i^2)                  (only with a second direction)
//   out_i  = w_i + (rho_i / (n1 + eps)) * T_i^2 * g1_i  -  (rho2 / (n2 + eps)) * g2_i
//   backup = w                                    (only when a backup list is given)
//
// Two passes over memory, the minimum for a global norm: pass 1 reads g1 (and w when
// adaptive, and g2); pass 2 reads w, g1 (g2) and writes out.  With a separate `out`
// buffer (the optimizer's shadow weights) that is 16 bytes per fp32 parameter and the
// restore is a pointer swap, bit-exact and free.
//
// Determinism: work is cut into fixed-size blocks that do not depend on the thread
// count.  Each block sums squares in 16 float64 lanes and stores one double per block;
// block partials are added in block order.  The same input gives the same bits for any
// number of threads and for the AVX2 and baseline clones alike (the lane layout is fixed
// in the source).
//
// A non-finite norm (NaN/Inf gradients, e.g. an overflowed AMP step) does not perturb:
// out = w exactly, and the non-finite norm is returned so the caller can see it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dtype.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace sparsefl {
namespace {

constexpr int64_t kBlock = 1 << 15;  // elements per parallel work item
constexpr int64_t kChunk = 1024;     // elements per staging chunk (fits L1)
constexpr int kLanes = 16;           // fixed accumulator layout -> ISA-independent bits

// ---- float inner loops: the only hot code; cloned for AVX2 with a portable fallback ----
// (function multiversioning is an x86 feature: elsewhere, e.g. aarch64, one portable build)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SFL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SFL_CLONES
#endif

SFL_CLONES
double sumsq_f32(const float* g, const float* w, int64_t n, bool adaptive, float eta) {
  // Squares and sums in float64 like the reference, so the norm differs from it only by
  // summation order (~1e-16 relative) and the float32 scale rho / (n + eps) comes out the
  // same: fused and eager SAM then produce bit-identical perturbed weights.
  double acc[kLanes] = {0};
  int64_t i = 0;
  if (adaptive) {
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const double v = static_cast<double>(std::fabs(w[i + l]) + eta) * g[i + l];
        acc[l] += v * v;
      }
    for (; i < n; ++i) {
      const double v = static_cast<double>(std::fabs(w[i]) + eta) * g[i];
      acc[i % kLanes] += v * v;
    }
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const double v = g[i + l];
        acc[l] += v * v;
      }
    for (; i < n; ++i) {
      const double v = g[i];
      acc[i % kLanes] += v * v;
    }
  }
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

SFL_CLONES
void compute_f32(const float* w, const float* g1, const float* g2, float* out, float* backup,
                 int64_t n, bool adaptive, float eta, float s1, float s2) {
  // The expression order mirrors the reference: e = (T*T) * g * s, then w + e.
  if (adaptive) {
    for (int64_t i = 0; i < n; ++i) {
      const float wi = w[i];
      const float t = std::fabs(wi) + eta;
      float o = wi + (t * t) * g1[i] * s1;
      if (g2) o -= g2[i] * s2;
      if (backup) backup[i] = wi;
      out[i] = o;
    }
  } else if (g2) {
    for (int64_t i = 0; i < n; ++i) {
      const float wi = w[i];
      if (backup) backup[i] = wi;
      out[i] = (wi + g1[i] * s1) - g2[i] * s2;
    }
  } else if (backup) {
    for (int64_t i = 0; i < n; ++i) {
      const float wi = w[i];
      backup[i] = wi;
      out[i] = wi + g1[i] * s1;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = w[i] + g1[i] * s1;
  }
}

// Stores that bypass the cache.  The perturbed weights and the backup are not read again
// until the next forward pass, long after they have left the cache; a normal store
// would first read every destination line (read-for-ownership), 4 extra bytes/param.
inline void stream_copy(const float* src, float* dst, int64_t n) {
#if defined(__SSE2__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15u); ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::copy(src, src + n, dst);
#endif
}

// out (and backup) <- perturbed w, computed a chunk at a time into L1 and streamed out.
// In place (out == w) the lines are already owned, so plain stores are used.
void apply_f32(const float* w, const float* g1, const float* g2, float* out, float* backup,
               int64_t n, bool adaptive, float eta, float s1, float s2) {
  if (out == w) {
    compute_f32(w, g1, g2, out, backup, n, adaptive, eta, s1, s2);
    return;
  }
  alignas(64) float tmp[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    compute_f32(w + c, g1 + c, g2 ? g2 + c : nullptr, tmp, nullptr, m, adaptive, eta, s1, s2);
    stream_copy(tmp, out + c, m);
    if (backup) stream_copy(w + c, backup + c, m);
  }
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---- reduced-precision tensors go through small float staging buffers ----

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

struct TensorArgs {
  void* w;
  void* g1;
  void* g2;
  void* out;
  void* backup;
  at::ScalarType dtype;
  bool adaptive;
  double rho;  // double: rho / (n + eps) is rounded to float once, as in the reference
};

struct Block {
  int32_t tensor;
  int64_t begin;
  int64_t len;
};

template <typename T>
T* at_offset(void* p, int64_t off) {
  return p ? static_cast<T*>(p) + off : nullptr;
}

// Pass 1 for one block: returns (sum (T g1)^2, sum g2^2).
template <typename T>
std::pair<double, double> block_sumsq(const TensorArgs& a, const Block& b, float eta) {
  const T* w = at_offset<T>(a.w, b.begin);
  const T* g1 = at_offset<T>(a.g1, b.begin);
  const T* g2 = at_offset<T>(a.g2, b.begin);
  if constexpr (std::is_same_v<T, float>) {
    return {sumsq_f32(g1, w, b.len, a.adaptive, eta),
            g2 ? sumsq_f32(g2, g2, b.len, false, 0.f) : 0.0};
  } else {
    float fw[kChunk], fg[kChunk];
    double s1 = 0.0, s2 = 0.0;
    for (int64_t c = 0; c < b.len; c += kChunk) {
      const int64_t m = std::min(kChunk, b.len - c);
      to_float(g1 + c, fg, m);
      if (a.adaptive) to_float(w + c, fw, m);
      s1 += sumsq_f32(fg, fw, m, a.adaptive, eta);
      if (g2) {
        to_float(g2 + c, fg, m);
        s2 += sumsq_f32(fg, fg, m, false, 0.f);
      }
    }
    return {s1, s2};
  }
}

// Pass 2 for one block.
template <typename T>
void block_apply(const TensorArgs& a, const Block& b, float eta, float s1, float s2,
                 bool perturb) {
  const T* w = at_offset<T>(a.w, b.begin);
  const T* g1 = at_offset<T>(a.g1, b.begin);
  const T* g2 = at_offset<T>(a.g2, b.begin);
  T* out = at_offset<T>(a.out, b.begin);
  T* backup = at_offset<T>(a.backup, b.begin);
  if (!perturb) {  // non-finite norm: keep the weights exactly
    if (backup) std::copy(w, w + b.len, backup);
    if (out != w) std::copy(w, w + b.len, out);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    apply_f32(w, g1, g2, out, backup, b.len, a.adaptive, eta, s1, s2);
  } else {
    float fw[kChunk], fg1[kChunk], fg2[kChunk], fo[kChunk];
    for (int64_t c = 0; c < b.len; c += kChunk) {
      const int64_t m = std::min(kChunk, b.len - c);
      to_float(w + c, fw, m);
      to_float(g1 + c, fg1, m);
      if (g2) to_float(g2 + c, fg2, m);
      if (backup) std::copy(w + c, w + c + m, backup + c);
      compute_f32(fw, fg1, g2 ? fg2 : nullptr, fo, nullptr, m, a.adaptive, eta, s1, s2);
      from_float(fo, out + c, m);
    }
  }
}

void check_pair(const at::Tensor& ref, const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), "sparsefl: ", what, "[", i, "] must be a CPU tensor");
  TORCH_CHECK(t.sizes() == ref.sizes(), "sparsefl: ", what, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "sparsefl: ", what, "[", i, "] has dtype ",
              t.scalar_type(), " but params[", i, "] has dtype ", ref.scalar_type());
}

// Native op behind sparsefl::sam_perturb, sam_perturb_ and two_dir_perturb.
// `out` may be the very tensors of `w` (in-place); `g2` and `backup` may be empty lists.
at::Tensor perturb_cpu(at::TensorList w, at::TensorList g1, at::TensorList g2, at::TensorList out,
                       at::TensorList backup, at::ArrayRef<double> rho, double rho2,
                       const c10::List<bool>& adaptive, double eta, double eps) {
  const size_t n = w.size();
  TORCH_CHECK(g1.size() == n && out.size() == n, "sparsefl: params, grads and out must have ",
              "the same length, got ", n, ", ", g1.size(), ", ", out.size());
  TORCH_CHECK(g2.empty() || g2.size() == n, "sparsefl: second gradient list has length ",
              g2.size(), ", expected ", n);
  TORCH_CHECK(backup.empty() || backup.size() == n, "sparsefl: backup list has length ",
              backup.size(), ", expected ", n);
  TORCH_CHECK(rho.size() == n && adaptive.size() == n,
              "sparsefl: rho and adaptive need one entry per tensor");
  TORCH_CHECK(eps > 0.0, "sparsefl: eps must be > 0, got ", eps);

  // Contiguous views of the inputs; outputs that are not contiguous are written to a
  // temporary and copied back at the end.
  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
  std::vector<TensorArgs> args(n);
  std::vector<Block> blocks;
  auto contig_in = [&](const at::Tensor& t) {
    if (t.is_contiguous()) return t.data_ptr();
    keep.push_back(t.contiguous());
    return keep.back().data_ptr();
  };
  auto contig_out = [&](const at::Tensor& t) {
    if (t.is_contiguous()) return t.data_ptr();
    copy_back.emplace_back(t, at::empty_like(t, at::MemoryFormat::Contiguous));
    return copy_back.back().second.data_ptr();
  };
  for (size_t i = 0; i < n; ++i) {
    const auto& wi = w[i];
    TORCH_CHECK(wi.device().is_cpu(), "sparsefl: params[", i, "] must be a CPU tensor");
    const auto st = wi.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "sparsefl: params[",
                i, "] has dtype ", st, "; supported: float32, float16, bfloat16");
    check_pair(wi, g1[i], "grads", i);
    check_pair(wi, out[i], "out", i);
    if (!g2.empty()) check_pair(wi, g2[i], "grads2", i);
    if (!backup.empty()) check_pair(wi, backup[i], "backup", i);
    TensorArgs& a = args[i];
    a.dtype = wi.scalar_type();
    a.adaptive = adaptive[i];
    a.rho = rho[i];
    const bool in_place = out[i].is_same(wi) && wi.is_contiguous();
    a.w = in_place ? wi.data_ptr() : contig_in(wi);
    a.g1 = contig_in(g1[i]);
    a.g2 = g2.empty() ? nullptr : contig_in(g2[i]);
    a.out = in_place ? wi.data_ptr() : contig_out(out[i]);
    a.backup = backup.empty() ? nullptr : contig_out(backup[i]);
    for (int64_t s = 0; s < wi.numel(); s += kBlock)
      blocks.push_back({static_cast<int32_t>(i), s, std::min(kBlock, wi.numel() - s)});
  }
  const int64_t nb = static_cast<int64_t>(blocks.size());
  const float feta = static_cast<float>(eta);

  // Pass 1: block partials, then a fixed-order sum.
  std::vector<double> p1(nb, 0.0), p2(nb, 0.0);
  at::parallel_for(0, nb, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const TensorArgs& a = args[blocks[b].tensor];
      dispatch_float_dtype(a.dtype, "sparsefl", [&](auto tag) {
        auto r = block_sumsq<decltype(tag)>(a, blocks[b], feta);
        p1[b] = r.first;
        p2[b] = r.second;
      });
    }
  });
  double ss1 = 0.0, ss2 = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    ss1 += p1[b];
    ss2 += p2[b];
  }
  const double n1 = std::sqrt(ss1), n2 = std::sqrt(ss2);
  const bool perturb = std::isfinite(n1) && std::isfinite(n2);
  const float s2 = g2.empty() ? 0.f : static_cast<float>(rho2 / (n2 + eps));

  // Pass 2 walks each thread's blocks backwards: the blocks it read last in pass 1 are
  // still in the last-level cache, so up to an L3's worth of w and g is not re-read from
  // memory (same partition in both passes: at::parallel_for splits the range statically).
  at::parallel_for(0, nb, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = hi - 1; b >= lo; --b) {
      const TensorArgs& a = args[blocks[b].tensor];
      const float s1 = static_cast<float>(a.rho / (n1 + eps));
      dispatch_float_dtype(a.dtype, "sparsefl", [&](auto tag) {
        block_apply<decltype(tag)>(a, blocks[b], feta, s1, s2, perturb);
      });
    }
  });
  for (auto& [dst, tmp] : copy_back) dst.copy_(tmp);

  auto norms = at::empty({2}, at::kFloat);
  norms.data_ptr<float>()[0] = static_cast<float>(n1);
  norms.data_ptr<float>()[1] = static_cast<float>(n2);
  return norms;
}

// Multi-tensor copy dst[i] <- src[i] (the exact restore used with a backup list).
void copy_cpu(at::TensorList dst, at::TensorList src) {
  TORCH_CHECK(dst.size() == src.size(), "sparsefl: restore got ", dst.size(), " params and ",
              src.size(), " backups");
  std::vector<std::pair<size_t, Block>> blocks;
  for (size_t i = 0; i < dst.size(); ++i) {
    check_pair(dst[i], src[i], "backup", i);
    TORCH_CHECK(dst[i].device().is_cpu(), "sparsefl: params[", i, "] must be a CPU tensor");
    if (!dst[i].is_contiguous() || !src[i].is_contiguous()) {
      dst[i].copy_(src[i]);  // rare: let ATen handle strides
      continue;
    }
    for (int64_t s = 0; s < dst[i].numel(); s += kBlock)
      blocks.push_back({i, {0, s, std::min(kBlock, dst[i].numel() - s)}});
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const auto& [i, blk] = blocks[b];
      const int64_t bytes = blk.len * dst[i].element_size();
      const int64_t off = blk.begin * dst[i].element_size();
      std::memcpy(static_cast<char*>(dst[i].data_ptr()) + off,
                  static_cast<const char*>(src[i].data_ptr()) + off, bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def(
      "perturb(Tensor[] w, Tensor[] g1, Tensor[] g2, Tensor(a!)[] out, Tensor(b!)[] backup, "
      "float[] rho, float rho2, bool[] adaptive, float eta, float eps) -> Tensor");
  m.def("copy_(Tensor(a!)[] dst, Tensor[] src) -> ()");
}

TORCH_LIBRARY_IMPL(sparsefl_C, CPU, m) {
  m.impl("perturb", &perturb_cpu);
  m.impl("copy_", &copy_cpu);
}

}  // namespace sparsefl
