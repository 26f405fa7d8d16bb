// Training-mode BatchNorm fused with what follows it in a ResNet: an optional residual add
// and an optional ReLU,
//
//     y = act(BN(x) + r),   BN(x) = (x - mean_c) * invstd_c * w_c + b_c,
//
// forward and backward, one op each, and the two as one C++ autograd op,
// batch_norm_act_layer (what sparsefl/nn/batch_norm_act.py calls in training).
//
// Why: at the sizes FL clients train (ResNet-18, width 8-16, batch 16) eager torch pays
// ~0.4 ms for one BatchNorm forward of a 200K-entry tensor and ~1.1 ms for BN + ReLU
// forward and backward: ~40x one memory pass, 15-26% of a sparse step.  Here each channel
// is one task: its N x HW slice (50 KB at width 16) stays in cache across the passes.
//
// Forward, per channel c (cnt = N * H * W):
//   pass 1  mean = sum(x) / cnt
//   pass 2  var = sum((x - mean)^2) / cnt   (centred: no cancellation), invstd
//   pass 3  y = act(x * scale + shift + r),  scale = w * invstd, shift = b - mean * scale
//   running_mean/var (when given) move toward mean and the unbiased var, as torch's.
// Backward, with dz = dy where y > 0 (or NaN, as torch's threshold_backward), else 0:
//   pass 1  sum(dz), sum(dz * (x - mean))   ->  grad_bias, grad_weight = ... * invstd
//   pass 2  dx = (dz - sum(dz)/cnt - (x - mean) * invstd^2 * sum(dz (x - mean))/cnt)
//                * w * invstd;   grad_r = dz
// Sums run in vector lanes (spilled to double), one horizontal add per channel; one thread
// owns a channel, so results do not depend on the thread count.
// What the layer keeps for backward: x and, with a ReLU, its mask as bits (one bit per
// entry, 1/32 of y in fp32): y itself is then free as soon as the next layer has read it.
// In a ResNet block y is the block's output; a sparse conv after it keeps only its pruned
// input, so keeping y for a mask held a full activation per BatchNorm for nothing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "dtype.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace sparsefl {
namespace {

constexpr const char* kFwd = "sparsefl.batch_norm_act";
constexpr const char* kBwd = "sparsefl.batch_norm_act_backward";

// -- vector helpers: U is the ISA's vector (v16, v8, v4) or float for a row's tail --------

template <typename U>
constexpr bool kScalar = std::is_same_v<U, float>;

template <typename U, typename T>
SFL_INLINE U ld(const T* p) {
  if constexpr (kScalar<U>) {
    return static_cast<float>(*p);
  } else if constexpr (std::is_same_v<T, float>) {
    return vload<U>(p);
  } else {  // half / bfloat16: widen lane by lane
    U v;
    for (int k = 0; k < static_cast<int>(sizeof(U) / sizeof(float)); ++k)
      v[k] = static_cast<float>(p[k]);
    return v;
  }
}

template <typename U, typename T>
SFL_INLINE void st(T* p, U v) {
  if constexpr (kScalar<U>) {
    *p = static_cast<T>(v);
  } else if constexpr (std::is_same_v<T, float>) {
    vstore<U>(p, v);
  } else {
    for (int k = 0; k < static_cast<int>(sizeof(U) / sizeof(float)); ++k)
      p[k] = static_cast<T>(v[k]);
  }
}

// relu keeps NaN (as torch.relu); dz keeps the gradient unless y <= 0 (as threshold_backward)
template <typename U>
SFL_INLINE U relu_of(U v) {
  if constexpr (kScalar<U>) return v < 0.f ? 0.f : v;
  else return v < U{} ? U{} : v;
}
template <typename U>
SFL_INLINE U pass_where(U y, U g) {
  if constexpr (kScalar<U>) return y <= 0.f ? 0.f : g;
  else return y <= U{} ? U{} : g;
}

// The ReLU's mask as bits, !(y <= 0) (NaN passes, as threshold_backward).  Each (n, c)
// row starts a new 64-bit word, so a vector's W bits (W divides 64) never straddle two.
inline int64_t mask_words(int64_t hw) { return (hw + 63) / 64; }

template <typename U> struct LaneInts;
template <> struct LaneInts<v16> { typedef int32_t type __attribute__((vector_size(64))); };
template <> struct LaneInts<v8> { typedef int32_t type __attribute__((vector_size(32))); };
template <> struct LaneInts<v4> { typedef int32_t type __attribute__((vector_size(16))); };

// dz = g where the mask's bit is set (bit k of b for lane k).  Vector-extension code only:
// it runs inside the kernels' generic lambdas, which cannot call target-specific intrinsics
// (the compiler lowers it to a bit test and a masked move on AVX-512).
template <typename U>
SFL_INLINE U keep_bits(U g, uint64_t b) {
  if constexpr (kScalar<U>) {
    return (b & 1) ? g : 0.f;
  } else {
    constexpr int W = static_cast<int>(sizeof(U) / sizeof(float));
    using I = typename LaneInts<U>::type;
    I sel;
    for (int k = 0; k < W; ++k) sel[k] = int32_t{1} << k;
    const I on = ((I{} + static_cast<int32_t>(b & ((uint64_t{1} << W) - 1))) & sel) != I{};
    return (U)((I)g & on);
  }
}

// Sums over one channel, kept in vector lanes: one horizontal add per channel, not per row
// (at HW = 16 or 49 a per-row reduction cost more than the row).  Lanes spill into a
// double every kSpill vectors, so a large channel loses no more than a small one.
template <typename V>
struct Sum {
  static constexpr int64_t kSpill = 512;
  V v{};
  float tail = 0.f;
  double total = 0.0;
  int64_t n = 0;
  SFL_INLINE void add(V x) {
    v += x;
    if (++n == kSpill) spill();
  }
  SFL_INLINE void add(float x) { tail += x; }
  SFL_INLINE void spill() {
    float s = 0.f;
    for (int k = 0; k < static_cast<int>(sizeof(V) / sizeof(float)); ++k) s += v[k];
    total += s;
    v = V{};
    n = 0;
  }
  SFL_INLINE double value() {
    spill();
    return total + tail;
  }
};

struct Geometry {
  int64_t n, c, hw;
  int64_t at(int64_t ni, int64_t ci) const { return (ni * c + ci) * hw; }
  double count() const { return static_cast<double>(n) * static_cast<double>(hw); }
};

// step(U{}, p) for every entry p of channel c: full vectors, then each row's tail in float
template <typename V, typename Step>
SFL_INLINE void each(const Geometry& g, int64_t c, Step&& step) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  for (int64_t ni = 0; ni < g.n; ++ni) {
    const int64_t o = g.at(ni, c), e = o + g.hw;
    int64_t p = o;
    for (; p + W <= e; p += W) step(V{}, p);
    for (; p < e; ++p) step(0.f, p);
  }
}

// As each, with the mask's bits for the entries from p on: step(u, p, bits)
template <typename V, typename Step>
SFL_INLINE void each_reading_bits(const Geometry& g, int64_t c, const uint64_t* bits,
                                  Step&& step) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  const int64_t wpr = mask_words(g.hw);
  for (int64_t ni = 0; ni < g.n; ++ni) {
    const int64_t o = g.at(ni, c);
    const uint64_t* row = bits + (ni * g.c + c) * wpr;
    int64_t i = 0;
    for (; i + W <= g.hw; i += W) step(V{}, o + i, row[i >> 6] >> (i & 63));
    for (; i < g.hw; ++i) step(0.f, o + i, row[i >> 6] >> (i & 63));
  }
}

// The bits of one channel's stored y (!(y <= 0)), row by row; the vector compare per ISA.
template <typename T>
SFL_INLINE void mask_rows_tail(const T* row, int64_t i, int64_t hw, uint64_t word,
                               uint64_t* out) {
  for (; i < hw; ++i) {
    word |= static_cast<uint64_t>(!(static_cast<float>(row[i]) <= 0.f)) << (i & 63);
    if (((i + 1) & 63) == 0) {
      out[i >> 6] = word;
      word = 0;
    }
  }
  if (hw & 63) out[hw >> 6] = word;
}

template <typename T>
void mask_rows_portable(const Geometry& g, int64_t c, const T* y, uint64_t* bits) {
  const int64_t wpr = mask_words(g.hw);
  for (int64_t ni = 0; ni < g.n; ++ni)
    mask_rows_tail(y + g.at(ni, c), 0, g.hw, 0, bits + (ni * g.c + c) * wpr);
}

#if defined(SFL_X86)
template <typename T>
SFL_AVX512 void mask_rows_avx512(const Geometry& g, int64_t c, const T* y, uint64_t* bits) {
  if constexpr (!std::is_same_v<T, float>) {
    mask_rows_portable(g, c, y, bits);
  } else {
    const int64_t wpr = mask_words(g.hw);
    for (int64_t ni = 0; ni < g.n; ++ni) {
      const float* row = y + g.at(ni, c);
      uint64_t* out = bits + (ni * g.c + c) * wpr;
      uint64_t word = 0;
      int64_t i = 0;
      for (; i + 16 <= g.hw; i += 16) {
        const uint64_t m =
            _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), _mm512_setzero_ps(), _CMP_NLE_UQ);
        word |= m << (i & 63);
        if (((i + 16) & 63) == 0) {
          out[i >> 6] = word;
          word = 0;
        }
      }
      mask_rows_tail(row, i, g.hw, word, out);
    }
  }
}

template <typename T>
SFL_AVX2 void mask_rows_avx2(const Geometry& g, int64_t c, const T* y, uint64_t* bits) {
  if constexpr (!std::is_same_v<T, float>) {
    mask_rows_portable(g, c, y, bits);
  } else {
    const int64_t wpr = mask_words(g.hw);
    for (int64_t ni = 0; ni < g.n; ++ni) {
      const float* row = y + g.at(ni, c);
      uint64_t* out = bits + (ni * g.c + c) * wpr;
      uint64_t word = 0;
      int64_t i = 0;
      for (; i + 8 <= g.hw; i += 8) {
        const uint64_t m = static_cast<uint32_t>(_mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(row + i), _mm256_setzero_ps(), _CMP_NLE_UQ)));
        word |= m << (i & 63);
        if (((i + 8) & 63) == 0) {
          out[i >> 6] = word;
          word = 0;
        }
      }
      mask_rows_tail(row, i, g.hw, word, out);
    }
  }
}
#endif

// -- one channel, forward and backward (V: the ISA's vector) -------------------------------

struct FwdOut {
  float mean, var, invstd;  // invstd: the one the forward scaled by, saved for backward
};

template <typename V, typename T>
SFL_INLINE FwdOut channel_forward(const Geometry& g, int64_t c, const T* x, const T* r, T* y,
                                  float w, float b, double eps, bool relu) {
  Sum<V> s;
  each<V>(g, c, [&](auto u, int64_t p) { s.add(ld<decltype(u)>(x + p)); });
  const float mean = static_cast<float>(s.value() / g.count());
  Sum<V> q;
  each<V>(g, c, [&](auto u, int64_t p) {
    const auto d = ld<decltype(u)>(x + p) - mean;
    q.add(d * d);
  });
  const double var = q.value() / g.count();
  const float invstd = static_cast<float>(1.0 / std::sqrt(var + eps));
  const float scale = w * invstd, shift = b - mean * scale;
  // four loops, not one with branches inside: each vectorises
  if (r != nullptr && relu) {
    each<V>(g, c, [&](auto u, int64_t p) {
      using U = decltype(u);
      st<U>(y + p, relu_of<U>(ld<U>(x + p) * scale + shift + ld<U>(r + p)));
    });
  } else if (r != nullptr) {
    each<V>(g, c, [&](auto u, int64_t p) {
      using U = decltype(u);
      st<U>(y + p, ld<U>(x + p) * scale + shift + ld<U>(r + p));
    });
  } else if (relu) {
    each<V>(g, c, [&](auto u, int64_t p) {
      using U = decltype(u);
      st<U>(y + p, relu_of<U>(ld<U>(x + p) * scale + shift));
    });
  } else {
    each<V>(g, c, [&](auto u, int64_t p) {
      using U = decltype(u);
      st<U>(y + p, ld<U>(x + p) * scale + shift);
    });
  }
  return {mean, static_cast<float>(var), invstd};
}

struct BwdOut {
  double s_dz, s_dzx;
};

template <typename V, typename T>
SFL_INLINE BwdOut channel_backward(const Geometry& g, int64_t c, const T* gy, const T* y,
                                   const uint64_t* bits, const T* x, T* dx, T* dr, float w,
                                   float mean, float invstd, bool relu) {
  Sum<V> a, b;
  if (relu && bits != nullptr) {
    each_reading_bits<V>(g, c, bits, [&](auto u, int64_t p, uint64_t m) {
      using U = decltype(u);
      const U dz = keep_bits(ld<U>(gy + p), m);
      a.add(dz);
      b.add(dz * (ld<U>(x + p) - mean));
    });
  } else if (relu) {
    each<V>(g, c, [&](auto u, int64_t p) {
      using U = decltype(u);
      const U dz = pass_where<U>(ld<U>(y + p), ld<U>(gy + p));
      a.add(dz);
      b.add(dz * (ld<U>(x + p) - mean));
    });
  } else {
    each<V>(g, c, [&](auto u, int64_t p) {
      using U = decltype(u);
      const U dz = ld<U>(gy + p);
      a.add(dz);
      b.add(dz * (ld<U>(x + p) - mean));
    });
  }
  const double s_dz = a.value(), s_dzx = b.value();
  const float k1 = static_cast<float>(s_dz / g.count());
  const float k2 = static_cast<float>(s_dzx / g.count()) * invstd * invstd;
  const float wi = w * invstd;
  if (relu && bits != nullptr) {
    each_reading_bits<V>(g, c, bits, [&](auto u, int64_t p, uint64_t m) {
      using U = decltype(u);
      const U dz = keep_bits(ld<U>(gy + p), m);
      if (dr != nullptr) st<U>(dr + p, dz);
      st<U>(dx + p, (dz - k1 - (ld<U>(x + p) - mean) * k2) * wi);
    });
    return {s_dz, s_dzx};
  }
  each<V>(g, c, [&](auto u, int64_t p) {
    using U = decltype(u);
    const U gv = ld<U>(gy + p);
    const U dz = relu ? pass_where<U>(ld<U>(y + p), gv) : gv;
    if (dr != nullptr) st<U>(dr + p, dz);
    st<U>(dx + p, (dz - k1 - (ld<U>(x + p) - mean) * k2) * wi);
  });
  return {s_dz, s_dzx};
}

// -- the ISA copies ------------------------------------------------------------------------

#if defined(SFL_X86)
template <typename T>
SFL_AVX512 FwdOut forward_avx512(const Geometry& g, int64_t c, const T* x, const T* r, T* y,
                                 uint64_t* bits, float w, float b, double eps, bool relu) {
  const FwdOut o = channel_forward<v16>(g, c, x, r, y, w, b, eps, relu);
  if (bits != nullptr) mask_rows_avx512(g, c, y, bits);  // from y while it is in cache
  return o;
}
template <typename T>
SFL_AVX2 FwdOut forward_avx2(const Geometry& g, int64_t c, const T* x, const T* r, T* y,
                             uint64_t* bits, float w, float b, double eps, bool relu) {
  const FwdOut o = channel_forward<v8>(g, c, x, r, y, w, b, eps, relu);
  if (bits != nullptr) mask_rows_avx2(g, c, y, bits);
  return o;
}
template <typename T>
SFL_AVX512 BwdOut backward_avx512(const Geometry& g, int64_t c, const T* gy, const T* y,
                                  const uint64_t* bits, const T* x, T* dx, T* dr, float w,
                                  float mean, float invstd, bool relu) {
  return channel_backward<v16>(g, c, gy, y, bits, x, dx, dr, w, mean, invstd, relu);
}
template <typename T>
SFL_AVX2 BwdOut backward_avx2(const Geometry& g, int64_t c, const T* gy, const T* y,
                              const uint64_t* bits, const T* x, T* dx, T* dr, float w,
                              float mean, float invstd, bool relu) {
  return channel_backward<v8>(g, c, gy, y, bits, x, dx, dr, w, mean, invstd, relu);
}
#endif

template <typename T>
FwdOut forward_any(const Geometry& g, int64_t c, const T* x, const T* r, T* y, uint64_t* bits,
                   float w, float b, double eps, bool relu) {
#if defined(SFL_X86)
  if (isa() == Isa::kAvx512) return forward_avx512(g, c, x, r, y, bits, w, b, eps, relu);
  if (isa() == Isa::kAvx2) return forward_avx2(g, c, x, r, y, bits, w, b, eps, relu);
#endif
  const FwdOut o = channel_forward<v4>(g, c, x, r, y, w, b, eps, relu);
  if (bits != nullptr) mask_rows_portable(g, c, y, bits);
  return o;
}

template <typename T>
BwdOut backward_any(const Geometry& g, int64_t c, const T* gy, const T* y, const uint64_t* bits,
                    const T* x, T* dx, T* dr, float w, float mean, float invstd, bool relu) {
#if defined(SFL_X86)
  if (isa() == Isa::kAvx512) return backward_avx512(g, c, gy, y, bits, x, dx, dr, w, mean,
                                                    invstd, relu);
  if (isa() == Isa::kAvx2) return backward_avx2(g, c, gy, y, bits, x, dx, dr, w, mean, invstd,
                                                relu);
#endif
  return channel_backward<v4>(g, c, gy, y, bits, x, dx, dr, w, mean, invstd, relu);
}

// -- checks and the two ops ----------------------------------------------------------------

Geometry geometry_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": the tensor must be on CPU");
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be (N, C, ...), got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": dtype ", st, " is not supported (float32, float16, bfloat16)");
  Geometry g{x.size(0), x.size(1), 1};
  for (int64_t d = 2; d < x.dim(); ++d) g.hw *= x.size(d);
  return g;
}

// a per-channel parameter as C floats (absent: `fill`)
std::vector<float> per_channel(const std::optional<at::Tensor>& t, int64_t c, float fill,
                               const char* name, const char* op) {
  std::vector<float> out(c, fill);
  if (!t.has_value() || !t->defined()) return out;
  TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be on CPU");
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == c, op, ": ", name, " must have shape (",
                    c, "), got ", t->sizes());
  const at::Tensor f = t->to(at::kFloat).contiguous();
  std::copy(f.data_ptr<float>(), f.data_ptr<float>() + c, out.begin());
  return out;
}

void check_same(const at::Tensor& a, const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK_VALUE(a.device().is_cpu(), op, ": ", name, " must be on CPU");
  TORCH_CHECK_VALUE(a.sizes() == x.sizes(), op, ": ", name, " must have x's shape ",
                    x.sizes(), ", got ", a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                   x.scalar_type(), ", got ", a.scalar_type());
}

int64_t grain_of(const Geometry& g) {  // channels per task: ~32K entries each
  const int64_t per = std::max<int64_t>(1, g.n * g.hw);
  return std::max<int64_t>(1, (int64_t{1} << 15) / per);
}

// the forward; with `want_bits` and a ReLU also the mask's bits (mask_words per row)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu, bool want_bits) {
  const Geometry g = geometry_of(x_in, kFwd);
  TORCH_CHECK_VALUE(g.n * g.hw > 1 || g.c == 0, kFwd,
                    ": expected more than 1 value per channel when training, got input of "
                    "shape ", x_in.sizes());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, kFwd, ": eps must be finite and >= 0, "
                    "got ", eps);
  const bool has_r = residual.has_value() && residual->defined();
  if (has_r) check_same(*residual, x_in, "residual", kFwd);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor r = has_r ? residual->contiguous() : at::Tensor();
  const auto w = per_channel(weight, g.c, 1.f, "weight", kFwd);
  const auto b = per_channel(bias, g.c, 0.f, "bias", kFwd);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(has_rm == has_rv, kFwd, ": running_mean and running_var come together");
  if (has_rm) {
    for (const at::Tensor* t : {&*running_mean, &*running_var}) {
      TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 1 && t->size(0) == g.c, kFwd,
                        ": running stats must be CPU tensors of shape (", g.c, "), got ",
                        t->sizes());
    }
  }

  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({g.c}, x.options().dtype(at::kFloat));
  at::Tensor invstd = at::empty({g.c}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({g.c}, x.options().dtype(at::kFloat));
  float* mp = mean.data_ptr<float>();
  float* ip = invstd.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  at::Tensor bits;
  if (relu && want_bits)
    bits = at::empty({g.n * g.c * mask_words(g.hw)}, x.options().dtype(at::kLong));
  uint64_t* bp = bits.defined() ? reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>())
                                : nullptr;
  dispatch_float_dtype(x.scalar_type(), kFwd, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* rp = has_r ? r.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, g.c, grain_of(g), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const FwdOut o = forward_any(g, c, xp, rp, yp, bp, w[c], b[c], eps, relu);
        mp[c] = o.mean;
        vp[c] = o.var;
        ip[c] = o.invstd;
      }
    });
  });
  if (has_rm && g.c > 0) {
    // as torch: running = (1 - m) * running + m * batch, with the unbiased variance
    const double cnt = g.count(), unbias = cnt / std::max(cnt - 1.0, 1.0);
    at::Tensor& rm = const_cast<at::Tensor&>(*running_mean);
    at::Tensor& rv = const_cast<at::Tensor&>(*running_var);
    if (rm.scalar_type() == at::kFloat && rv.scalar_type() == at::kFloat &&
        rm.is_contiguous() && rv.is_contiguous()) {
      float* rmp = rm.data_ptr<float>();
      float* rvp = rv.data_ptr<float>();
      for (int64_t c = 0; c < g.c; ++c) {  // C entries: no ATen call per statistic
        rmp[c] = static_cast<float>((1.0 - momentum) * rmp[c] + momentum * mp[c]);
        rvp[c] = static_cast<float>((1.0 - momentum) * rvp[c] + momentum * unbias * vp[c]);
      }
    } else {
      rm.mul_(1.0 - momentum).add_(mean.to(rm.scalar_type()), momentum);
      rv.mul_(1.0 - momentum).add_((var * unbias).to(rv.scalar_type()), momentum);
    }
  }
  return {y, mean, invstd, bits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu) {
  auto [y, mean, invstd, bits] = forward_impl(x, residual, weight, bias, running_mean,
                                              running_var, momentum, eps, relu, false);
  return {y, mean, invstd};
}

// the backward, the ReLU's mask from y (the public op) or from the forward's bits (the layer)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const at::Tensor& bits, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& invstd, bool relu, bool residual_grad) {
  const Geometry g = geometry_of(x_in, kBwd);
  check_same(grad_y_in, x_in, "grad_y", kBwd);
  if (bits.defined()) {
    TORCH_CHECK_VALUE(bits.scalar_type() == at::kLong && bits.is_contiguous() &&
                          bits.numel() == g.n * g.c * mask_words(g.hw), kBwd,
                      ": the ReLU mask's bits do not match x");
  } else {
    check_same(y_in, x_in, "y", kBwd);
  }
  for (const at::Tensor* t : {&mean, &invstd}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 1 && t->size(0) == g.c &&
                          t->scalar_type() == at::kFloat, kBwd,
                      ": mean and invstd must be float32 CPU tensors of shape (", g.c, ")");
  }
  const at::Tensor gy = grad_y_in.contiguous(), x = x_in.contiguous();
  const at::Tensor y = bits.defined() ? at::Tensor() : y_in.contiguous();
  const uint64_t* bp = bits.defined()
                           ? reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>())
                           : nullptr;
  const at::Tensor mc = mean.contiguous(), ic = invstd.contiguous();
  const auto w = per_channel(weight, g.c, 1.f, "weight", kBwd);
  at::Tensor dx = at::empty_like(x);
  // no residual: an empty tensor (an op may not return an undefined one)
  at::Tensor dr = residual_grad ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor s_dz = at::empty({g.c}, x.options().dtype(at::kDouble));
  at::Tensor s_dzx = at::empty({g.c}, x.options().dtype(at::kDouble));
  double* sp = s_dz.data_ptr<double>();
  double* sxp = s_dzx.data_ptr<double>();
  const float* mp = mc.data_ptr<float>();
  const float* ip = ic.data_ptr<float>();
  dispatch_float_dtype(x.scalar_type(), kBwd, [&](auto tag) {
    using T = decltype(tag);
    const T* gp = gy.data_ptr<T>();
    const T* yp = y.defined() ? y.data_ptr<T>() : nullptr;
    const T* xp = x.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    T* drp = residual_grad ? dr.data_ptr<T>() : nullptr;
    at::parallel_for(0, g.c, grain_of(g), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const BwdOut o = backward_any(g, c, gp, yp, bp, xp, dxp, drp, w[c], mp[c], ip[c],
                                      relu);
        sp[c] = o.s_dz;
        sxp[c] = o.s_dzx * static_cast<double>(ip[c]);
      }
    });
  });
  // grad_weight and grad_bias in the weight's dtype (float32 without a weight)
  const auto pdt = (weight.has_value() && weight->defined()) ? weight->scalar_type()
                                                              : at::kFloat;
  return {dx, dr, s_dzx.to(pdt), s_dz.to(pdt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd,
    bool relu, bool residual_grad) {
  return backward_impl(grad_y, x, y, at::Tensor(), weight, mean, invstd, relu, residual_grad);
}

// The layer: y with autograd in C++ (a Python autograd.Function cost ~40 us a call, two
// calls per BatchNorm per step).  Saves x and, with a ReLU, the mask's bits (eager BN +
// ReLU keep y, 32x the bytes); saved-tensor hooks apply (sparsefl/nn/recompute.py swaps x
// for its recipe).
struct BatchNormActFn : public torch::autograd::Function<BatchNormActFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, double momentum,
                            double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd, bits] = forward_impl(x, residual, weight, bias, running_mean,
                                                running_var, momentum, eps, relu, true);
    const bool has_w = weight.has_value() && weight->defined();
    // bits only with a ReLU: without one backward reads no mask
    ctx->save_for_backward({x, bits, has_w ? *weight : at::Tensor(), mean, invstd});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["residual"] = residual.has_value() && residual->defined();
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &bits = saved[1], &w = saved[2];
    const bool has_r = ctx->saved_data["residual"].toBool();
    const bool has_b = ctx->saved_data["bias"].toBool();
    at::Tensor none;
    if (!grads[0].defined()) return {none, none, none, none, none, none, none, none, none};
    // needs_input_grad counts the tensors passed (x, residual, weight, bias when given);
    // the gradients returned are one per argument
    const size_t at_r = 1, at_w = 1 + has_r, at_b = at_w + w.defined();
    auto [dx, dr, dw, db] = backward_impl(
        grads[0], x, x, bits, w.defined() ? std::optional<at::Tensor>(w) : std::nullopt,
        saved[3], saved[4], ctx->saved_data["relu"].toBool(),
        has_r && ctx->needs_input_grad(at_r));
    return {ctx->needs_input_grad(0) ? dx : none,
            has_r && ctx->needs_input_grad(at_r) ? dr : none,
            w.defined() && ctx->needs_input_grad(at_w) ? dw : none,
            has_b && ctx->needs_input_grad(at_b) ? db : none,
            none, none, none, none, none};
  }
};

at::Tensor batch_norm_act_layer_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu) {
  return BatchNormActFn::apply(x, residual, weight, bias, running_mean, running_var,
                               momentum, eps, relu);
}

// Without autograd (no_grad, inference mode): the forward alone.
at::Tensor batch_norm_act_layer_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps, bool relu) {
  return std::get<0>(forward_impl(x, residual, weight, bias, running_mean, running_var,
                                  momentum, eps, relu, false));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def("batch_norm_act(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, "
        "bool relu) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_act_backward(Tensor grad_y, Tensor x, Tensor y, Tensor? weight, "
        "Tensor mean, Tensor invstd, bool relu, bool residual_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // the two above as one differentiable layer: y = act(BN(x) + residual)
  m.def("batch_norm_act_layer(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, "
        "bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsefl_C, Autograd, m) {
  m.impl("batch_norm_act_layer", &batch_norm_act_layer_autograd);
}

TORCH_LIBRARY_IMPL(sparsefl_C, CPU, m) {
  m.impl("batch_norm_act", &batch_norm_act_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
  m.impl("batch_norm_act_layer", &batch_norm_act_layer_cpu);
}

}  // namespace sparsefl
