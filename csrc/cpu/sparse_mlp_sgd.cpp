// A client's whole local training of a sparse Powerprop MLP under plain SGD, in one call
// (torch.ops.sparsefl_C.sparse_mlp_sgd).  C++ CPU backend; the definition is
// sparsefl/ops/reference/sparse_mlp_sgd.py.
//
// Why: on a small MLP (the default job: 64-128-128-10 at batch 16) one training step is
// ~400K multiply-adds dense and ~40K on a 90% support, a few microseconds either way, while
// the framework's fixed cost of a step (dispatch, autograd nodes, the optimizer's Python
// loop) is ~150 us.  Sparse kernels alone cannot make such a step cheaper than the dense
// one; running every step of the round inside one call removes the fixed cost, so the
// arithmetic on the support is what is left.
//
// Per step, for a batch B of the client's data (the epochs' permutations come from the
// caller, drawn with the run's generator exactly as the Python loop draws them):
//   forward   h_0 = x[B];  y_l = theta_l,S . h_l + b_l;  h_{l+1} = relu(y_l)  (not after
//             the last layer); theta = omega|omega|^(beta-1) on the support S only
//   pruning   p_l = h_l with all but the top-k |h_l| over the whole (|B|, C_l) batch tensor
//             zeroed, k = keep_count(|B| * C_l, density_l), ties to the lower flat index
//             (sparsefl/ops/reference/topk.py); density >= 1: p_l = h_l
//   loss      mean cross-entropy; dy_L = (softmax(y_L) - onehot(target)) / |B|
//   backward  db_l = sum_B dy_l;  domega_j = <dy_l[row j], p_l[col j]> * beta|omega_j|^(beta-1)
//             for j in S (zero elsewhere: no weight leaves or joins S);
//             dy_{l-1} = (theta_l,S^T . dy_l) * [h_l > 0]
//   SGD       g = grad + wd * param; momentum: buf = g (first step), else m * buf + g; g = buf;
//             param -= lr * g (torch.optim.SGD, dampening 0, no Nesterov) on S and the biases
//             -- the off-support weights have grad 0 and value 0, so they stay 0.
//
// Layout: activations are kept feature-major in batch tiles of 16 samples, one 16-float
// vector per (tile, feature) ("pixel tiles" of sparse_conv/sparse_conv.h at 1x1): the forward is a
// broadcast-FMA per support entry, the weight gradient one vector dot per entry, the input
// gradient one vector FMA per entry (a scatter into an L1-resident tile).  The lanes past
// the batch in the last tile are kept at zero.  One thread: a step is too small to share.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "simd.h"
#include "topk_select.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sparsefl {
namespace {

constexpr int64_t kL = 16;  // samples per batch tile
constexpr const char* kOp = "sparsefl.sparse_mlp_sgd";

struct Layer {
  int64_t cin, cout, nnz;
  float* omega;                 // (cout, cin), updated in place
  float* bias;                  // (cout) or nullptr, updated in place
  const int64_t* rp;            // support rows: rp[cout + 1]
  const int32_t* col;           // support columns, ascending per row
  std::vector<int64_t> widx;    // flat weight index of each support entry
  std::vector<float> wv;        // omega on the support during the call (written back after)
  double density;               // activation pruning of this layer's input (>= 1: none)
  float beta;
  std::vector<float> theta, slope, grad, mom, bmom, gb;
  std::vector<float> in, kept;  // input tiles [T][cin][16] and its pruned copy
};

// The sum of a vector's lanes as a tree (a lane-by-lane loop is 16 dependent adds: the
// compiler may not reorder float sums).
SFL_INLINE float hsum(v16 v) {
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// theta and beta|omega|^(beta-1) of every support entry, from the support values wv (pow
// as square roots at beta 1.25 and 1.5, the exponents runs use; pow is exp(e log x),
// several times slower).  One loop per exponent, so that each vectorises.
SFL_INLINE void powerprop_support(Layer& l) {
  const float e = l.beta - 1.0f, beta = l.beta;
  const float* w = l.wv.data();
  float* th = l.theta.data();
  float* sl = l.slope.data();
  const int64_t n = l.nnz;
  if (e == 0.25f) {
    for (int64_t j = 0; j < n; ++j) {
      const float t = std::sqrt(std::sqrt(std::fabs(w[j])));
      th[j] = w[j] * t, sl[j] = beta * t;
    }
  } else if (e == 0.5f) {
    for (int64_t j = 0; j < n; ++j) {
      const float t = std::sqrt(std::fabs(w[j]));
      th[j] = w[j] * t, sl[j] = beta * t;
    }
  } else if (e == 0.0f) {
    for (int64_t j = 0; j < n; ++j) th[j] = w[j], sl[j] = beta;
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float a = std::fabs(w[j]);
      const float t = a == 0.0f ? 0.0f : std::pow(a, e);
      th[j] = w[j] * t, sl[j] = beta * t;
    }
  }
}

// The k-th largest of n keys (1 <= k <= n) by radix selection on 8-bit digits, in the
// caller's scratch (no allocation per step); topk_select.h's kth_largest, in place.
uint32_t kth_key(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& a,
                 std::vector<uint32_t>& b) {
  a.assign(keys, keys + n);
  b.resize(n);
  int64_t m = n;
  uint32_t prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t hist[256] = {0};
    for (int64_t i = 0; i < m; ++i) ++hist[(a[i] >> shift) & 0xff];
    int digit = 255;
    for (; digit > 0 && hist[digit] < k; --digit) k -= hist[digit];
    prefix |= static_cast<uint32_t>(digit) << shift;
    if (shift == 0) break;
    int64_t w = 0;  // the bucket's keys, branch-free
    for (int64_t i = 0; i < m; ++i) {
      b[w] = a[i];
      w += ((a[i] >> shift) & 0xff) == static_cast<uint32_t>(digit);
    }
    m = w;
    a.swap(b);
  }
  return prefix;
}

struct Scratch {
  std::vector<uint32_t> keys, a, b;
};

// Activation pruning of l.in (its first nb samples) into l.kept; false if a NaN was seen.
// Keys are taken in tile order; the padding lanes (zeros) join them harmlessly: a zero
// kept or dropped leaves the same pruned input, and zeros never outrank a nonzero.  Only
// ties at a nonzero threshold need the flat (sample-major) order, and only when some but
// not all of the tied entries are kept.
SFL_INLINE bool prune_input(Layer& l, int64_t nb, int64_t T, Scratch& s) {
  const int64_t C = l.cin, n = T * C * kL, valid = nb * C;
  const float* in = l.in.data();
  s.keys.resize(n);
  uint32_t* keys = s.keys.data();
  uint32_t mx = 0;
  for (int64_t p = 0; p < n; ++p) {
    keys[p] = magnitude_key(in[p]);
    mx = std::max(mx, keys[p]);
  }
  if (mx > 0x7f800000u) return false;
  const int64_t k = l.density >= 1.0
      ? valid : valid - static_cast<int64_t>(std::nearbyint((1.0 - l.density) * valid));
  float* out = l.kept.data();
  if (k >= valid) {
    std::copy(in, in + n, out);
    return true;
  }
  if (k <= 0) {
    std::fill(out, out + n, 0.0f);
    return true;
  }
  const uint32_t ck = kth_key(keys, n, k, s.a, s.b);
  if (ck == 0) {  // every nonzero is kept
    std::copy(in, in + n, out);
    return true;
  }
  int64_t gt = 0, eq = 0;
  for (int64_t p = 0; p < n; ++p) gt += keys[p] > ck, eq += keys[p] == ck;
  const int64_t need = k - gt;  // 1 <= need <= eq
  if (need == eq) {
    for (int64_t p = 0; p < n; ++p) out[p] = keys[p] >= ck ? in[p] : 0.0f;
    return true;
  }
  for (int64_t p = 0; p < n; ++p) out[p] = keys[p] > ck ? in[p] : 0.0f;
  for (int64_t i = 0, left = need; i < nb && left > 0; ++i)  // ties: lowest flat index
    for (int64_t c = 0; c < C && left > 0; ++c) {
      const int64_t p = ((i / kL) * C + c) * kL + i % kL;
      if (keys[p] == ck) out[p] = in[p], --left;
    }
  return true;
}

// y tiles = theta_S . in tiles + bias, ReLU unless last; lanes >= nb stay 0.
SFL_INLINE void forward_layer(const Layer& l, float* y, int64_t T, int64_t nb, bool relu) {
  for (int64_t t = 0; t < T; ++t) {
    const float* h = l.in.data() + t * l.cin * kL;
    float* yt = y + t * l.cout * kL;
    v16 live;
    for (int64_t i = 0; i < kL; ++i) live[i] = t * kL + i < nb ? 1.0f : 0.0f;
    for (int64_t o = 0; o < l.cout; ++o) {
      v16 a0 = vbroadcast<v16>(l.bias ? l.bias[o] : 0.0f), a1{}, a2{}, a3{};
      int64_t j = l.rp[o];
      const int64_t e = l.rp[o + 1];
      for (; j + 4 <= e; j += 4) {
        a0 += l.theta[j] * vload<v16>(h + l.col[j] * kL);
        a1 += l.theta[j + 1] * vload<v16>(h + l.col[j + 1] * kL);
        a2 += l.theta[j + 2] * vload<v16>(h + l.col[j + 2] * kL);
        a3 += l.theta[j + 3] * vload<v16>(h + l.col[j + 3] * kL);
      }
      for (; j < e; ++j) a0 += l.theta[j] * vload<v16>(h + l.col[j] * kL);
      v16 a = (a0 + a1) + (a2 + a3);
      if (relu) a = a < 0.0f ? v16{} : a;  // NaN stays NaN
      a = live > 0.0f ? a : v16{};
      vstore(yt + o * kL, a);
    }
  }
}

// Mean cross-entropy of the logit tiles z (C classes) against target; dz into z.
float cross_entropy(float* z, int64_t C, int64_t nb, const int64_t* target,
                    std::vector<float>& row) {
  double total = 0.0;
  row.resize(C);
  for (int64_t n = 0; n < nb; ++n) {
    float* base = z + (n / kL) * C * kL + n % kL;
    float m = -INFINITY;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, row[c] = base[c * kL]);
    float s = 0.0f;
    for (int64_t c = 0; c < C; ++c) s += std::exp(row[c] - m);
    const float lse = m + std::log(s);
    total += lse - row[target[n]];
    for (int64_t c = 0; c < C; ++c)
      base[c * kL] = (std::exp(row[c] - lse) - (c == target[n] ? 1.0f : 0.0f)) /
                     static_cast<float>(nb);
  }
  return static_cast<float>(total / static_cast<double>(nb));
}

// Gradients of layer l from dy tiles: l.grad (per support entry, times the slope), l.gb,
// and when dx != nullptr the input gradient through the ReLU before l.
SFL_INLINE void backward_layer(Layer& l, const float* dy, float* dx, int64_t T) {
  std::fill(l.grad.begin(), l.grad.end(), 0.0f);
  std::fill(l.gb.begin(), l.gb.end(), 0.0f);
  if (dx) std::fill(dx, dx + T * l.cin * kL, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float* p = l.kept.data() + t * l.cin * kL;
    const float* dyt = dy + t * l.cout * kL;
    float* dxt = dx ? dx + t * l.cin * kL : nullptr;
    for (int64_t o = 0; o < l.cout; ++o) {
      const v16 d = vload<v16>(dyt + o * kL);
      l.gb[o] += hsum(d);
      const int64_t e = l.rp[o + 1];
      for (int64_t j = l.rp[o]; j < e; ++j) {
        const int64_t c = l.col[j];
        l.grad[j] += hsum(d * vload<v16>(p + c * kL));
        if (dxt) vstore(dxt + c * kL, vload<v16>(dxt + c * kL) + l.theta[j] * d);
      }
    }
    if (dxt) {  // through the ReLU that made this layer's input
      const float* h = l.in.data() + t * l.cin * kL;
      for (int64_t c = 0; c < l.cin; ++c) {
        const v16 g = vload<v16>(dxt + c * kL);
        vstore(dxt + c * kL, vload<v16>(h + c * kL) > 0.0f ? g : v16{});
      }
    }
  }
}

// One loop per momentum setting, so that each vectorises (support values are contiguous).
SFL_INLINE void sgd_update(Layer& l, float lr, float momentum, float wd, bool first) {
  float* w = l.wv.data();
  const float* g = l.grad.data();
  const float* sl = l.slope.data();
  const int64_t n = l.nnz;
  if (momentum == 0.0f) {
    for (int64_t j = 0; j < n; ++j) w[j] -= lr * (g[j] * sl[j] + wd * w[j]);
  } else {
    float* m = l.mom.data();
    for (int64_t j = 0; j < n; ++j) {
      const float d = g[j] * sl[j] + wd * w[j];
      m[j] = first ? d : momentum * m[j] + d;
      w[j] -= lr * m[j];
    }
  }
  if (!l.bias) return;
  for (int64_t o = 0; o < l.cout; ++o) {
    float d = l.gb[o] + wd * l.bias[o];
    if (momentum != 0.0f) d = l.bmom[o] = first ? d : momentum * l.bmom[o] + d;
    l.bias[o] -= lr * d;
  }
}

struct Run {
  std::vector<Layer>& layers;
  const float* x;
  const int64_t* y;
  const int64_t* order;  // [epochs][n]
  int64_t n, epochs, batch;
  float lr, momentum, wd;
  float* losses;
  int64_t act_ns = 0;
};

// The steps, one ISA's build of them (simd.h).  Returns false on a NaN input or activation.
SFL_INLINE bool run_steps(Run& r) {
  auto& Ls = r.layers;
  const int64_t nl = static_cast<int64_t>(Ls.size());
  const int64_t Tmax = (r.batch + kL - 1) / kL;
  int64_t cmax = 0;
  for (auto& l : Ls) cmax = std::max({cmax, l.cin, l.cout});
  std::vector<float> logits(Tmax * Ls.back().cout * kL), ga(Tmax * cmax * kL),
      gb(Tmax * cmax * kL);
  std::vector<int64_t> target(r.batch);
  Scratch scratch;
  std::vector<float> row;
  int64_t step = 0;
  for (int64_t ep = 0; ep < r.epochs; ++ep) {
    const int64_t* perm = r.order + ep * r.n;
    for (int64_t b0 = 0; b0 < r.n; b0 += r.batch, ++step) {
      const int64_t nb = std::min(r.batch, r.n - b0), T = (nb + kL - 1) / kL;
      // gather the batch into tiles
      Layer& l0 = Ls[0];
      std::fill(l0.in.begin(), l0.in.begin() + T * l0.cin * kL, 0.0f);
      for (int64_t i = 0; i < nb; ++i) {
        const float* src = r.x + perm[b0 + i] * l0.cin;
        float* dst = l0.in.data() + (i / kL) * l0.cin * kL + i % kL;
        for (int64_t c = 0; c < l0.cin; ++c) dst[c * kL] = src[c];
        target[i] = r.y[perm[b0 + i]];
      }
      for (int64_t li = 0; li < nl; ++li) {
        Layer& l = Ls[li];
        powerprop_support(l);
        const auto t0 = std::chrono::steady_clock::now();
        const bool ok = prune_input(l, nb, T, scratch);
        r.act_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - t0).count();
        if (!ok) return false;
        float* out = li + 1 < nl ? Ls[li + 1].in.data() : logits.data();
        forward_layer(l, out, T, nb, li + 1 < nl);
      }
      r.losses[step] = cross_entropy(logits.data(), Ls.back().cout, nb, target.data(), row);
      float* dy = logits.data();
      for (int64_t li = nl - 1; li >= 0; --li) {
        Layer& l = Ls[li];
        float* dx = li > 0 ? (dy == ga.data() ? gb.data() : ga.data()) : nullptr;
        backward_layer(l, dy, dx, T);
        sgd_update(l, r.lr, r.momentum, r.wd, step == 0);
        dy = dx;
      }
    }
  }
  return true;
}

SFL_AVX512 bool run_avx512(Run& r) { return run_steps(r); }
SFL_AVX2 bool run_avx2(Run& r) { return run_steps(r); }
bool run_portable(Run& r) { return run_steps(r); }

std::tuple<at::Tensor, int64_t> sparse_mlp_sgd_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& order, int64_t batch,
    at::TensorList omegas, at::TensorList biases, at::ArrayRef<double> betas,
    at::TensorList rowptrs, at::TensorList cols, at::ArrayRef<double> densities, double lr,
    double momentum, double weight_decay) {
  const size_t nl = omegas.size();
  TORCH_CHECK_VALUE(nl >= 1 && biases.size() == nl && betas.size() == nl &&
                        rowptrs.size() == nl && cols.size() == nl && densities.size() == nl,
                    kOp, ": omegas, biases, betas, rowptrs, cols and densities need one entry "
                    "per layer");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, kOp, ": x must be float32, got ",
                   x.scalar_type(), " (other dtypes train through the layers' own path)");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), kOp,
                    ": x must be a contiguous (samples, features) CPU tensor");
  const int64_t n = x.size(0);
  TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == n && y.scalar_type() == at::kLong &&
                        y.is_contiguous(), kOp, ": y must be int64 with one label per sample");
  TORCH_CHECK_VALUE(order.dim() == 2 && order.size(1) == n &&
                        order.scalar_type() == at::kLong && order.is_contiguous(), kOp,
                    ": order must be int64 (epochs, samples)");
  TORCH_CHECK_VALUE(batch >= 1, kOp, ": batch size must be >= 1");
  TORCH_CHECK_VALUE(lr >= 0 && momentum >= 0 && weight_decay >= 0, kOp,
                    ": lr, momentum and weight decay must be >= 0");
  const int64_t epochs = order.size(0);
  const int64_t* po = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < order.numel(); ++i)
    TORCH_CHECK_VALUE(po[i] >= 0 && po[i] < n, kOp, ": order holds ", po[i],
                      ", outside [0, ", n, ")");
  std::vector<Layer> Ls(nl);
  const int64_t T = (std::min(batch, std::max<int64_t>(n, 1)) + kL - 1) / kL;
  for (size_t i = 0; i < nl; ++i) {
    const at::Tensor& w = omegas[i];
    Layer& l = Ls[i];
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, kOp, ": layer ", i,
                     "'s weight must be float32, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), kOp,
                      ": layer ", i, "'s weight must be a contiguous CPU matrix");
    l.cout = w.size(0), l.cin = w.size(1);
    TORCH_CHECK_VALUE(l.cin == (i == 0 ? x.size(1) : Ls[i - 1].cout), kOp, ": layer ", i,
                      " takes ", l.cin, " features but gets ",
                      i == 0 ? x.size(1) : Ls[i - 1].cout);
    const at::Tensor& b = biases[i];
    const bool has_bias = b.defined() && b.numel() > 0;
    TORCH_CHECK_TYPE(!has_bias || b.scalar_type() == at::kFloat, kOp, ": layer ", i,
                     "'s bias must be float32, got ", b.scalar_type());
    TORCH_CHECK_VALUE(!has_bias || (b.dim() == 1 && b.size(0) == l.cout && b.is_contiguous()),
                      kOp, ": layer ", i, "'s bias must hold ", l.cout, " entries");
    TORCH_CHECK_VALUE(betas[i] >= 1.0 && std::isfinite(betas[i]), kOp, ": beta must be >= 1");
    const at::Tensor& rp = rowptrs[i];
    const at::Tensor& cc = cols[i];
    TORCH_CHECK_VALUE(rp.dim() == 1 && rp.size(0) == l.cout + 1 &&
                          rp.scalar_type() == at::kLong && rp.is_contiguous() &&
                          cc.dim() == 1 && cc.scalar_type() == at::kInt && cc.is_contiguous(),
                      kOp, ": layer ", i, "'s support must be rowptr int64 [", l.cout + 1,
                      "] and cols int32");
    l.rp = rp.data_ptr<int64_t>();
    l.col = cc.data_ptr<int32_t>();
    l.nnz = cc.size(0);
    TORCH_CHECK_VALUE(l.rp[0] == 0 && l.rp[l.cout] == l.nnz, kOp, ": layer ", i,
                      "'s rowptr does not span its cols");
    l.omega = w.data_ptr<float>();
    l.bias = has_bias ? b.data_ptr<float>() : nullptr;
    l.beta = static_cast<float>(betas[i]);
    l.density = densities[i];
    l.widx.resize(l.nnz);
    std::vector<uint8_t> in_s(l.cout * l.cin, 0);
    for (int64_t o = 0; o < l.cout; ++o) {
      TORCH_CHECK_VALUE(l.rp[o + 1] >= l.rp[o], kOp, ": layer ", i, "'s rowptr decreases");
      for (int64_t j = l.rp[o]; j < l.rp[o + 1]; ++j) {
        TORCH_CHECK_VALUE(l.col[j] >= 0 && l.col[j] < l.cin &&
                              (j == l.rp[o] || l.col[j] > l.col[j - 1]), kOp, ": layer ", i,
                          "'s support columns must be ascending in [0, ", l.cin, ")");
        l.widx[j] = o * l.cin + l.col[j];
        in_s[l.widx[j]] = 1;
      }
    }
    // the support must hold every nonzero (else training here would differ from autograd,
    // where a weight outside it would be used): the weights changed since it was packed
    int64_t escaped = 0;
    for (int64_t f = 0; f < l.cout * l.cin; ++f) escaped += l.omega[f] != 0.0f && !in_s[f];
    TORCH_CHECK_VALUE(escaped == 0, "sparsefl: ", escaped, " nonzero weights of layer ", i,
                      " lie outside the support packed by set_compute(); the weights changed "
                      "since (a new model was loaded?): call set_compute(model, ...) again");
    l.wv.resize(l.nnz);
    for (int64_t j = 0; j < l.nnz; ++j) l.wv[j] = l.omega[l.widx[j]];
    l.theta.resize(l.nnz), l.slope.resize(l.nnz), l.grad.resize(l.nnz), l.gb.resize(l.cout);
    if (momentum != 0.0) l.mom.resize(l.nnz), l.bmom.resize(l.cout);
    l.in.assign(T * l.cin * kL, 0.0f), l.kept.assign(T * l.cin * kL, 0.0f);
  }
  const int64_t classes = Ls.back().cout;
  const int64_t* py = y.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(py[i] >= 0 && py[i] < classes, kOp, ": label ", py[i],
                      " outside [0, ", classes, ")");
  const int64_t steps = epochs * ((n + batch - 1) / batch);
  auto losses = at::empty({steps}, x.options());
  Run r{Ls, x.data_ptr<float>(), py, po, n, epochs, batch, static_cast<float>(lr),
        static_cast<float>(momentum), static_cast<float>(weight_decay),
        losses.data_ptr<float>()};
  const bool ok = isa() == Isa::kAvx512 ? run_avx512(r)
                  : isa() == Isa::kAvx2 ? run_avx2(r)
                                        : run_portable(r);
  for (auto& l : Ls)  // the trained support values back into omega (also after a NaN)
    for (int64_t j = 0; j < l.nnz; ++j) l.omega[l.widx[j]] = l.wv[j];
  TORCH_CHECK_VALUE(ok, kOp, ": input contains NaN (a layer's input went non-finite: the "
                    "training diverged or the data holds NaN)");
  return {losses, r.act_ns};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def("sparse_mlp_sgd(Tensor x, Tensor y, Tensor order, int batch_size, Tensor(a!)[] omegas, "
        "Tensor(b!)[] biases, float[] betas, Tensor[] rowptrs, Tensor[] cols, "
        "float[] act_densities, float lr, float momentum, float weight_decay) -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(sparsefl_C, CPU, m) { m.impl("sparse_mlp_sgd", &sparse_mlp_sgd_cpu); }

}  // namespace sparsefl
