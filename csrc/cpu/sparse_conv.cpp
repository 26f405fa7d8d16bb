// Convolution / linear layers that compute on the support S of a Powerprop weight.
// C++ CPU backend; the definition is sparsefl/ops/reference/sparse_conv.py.
//
// A Powerprop layer stores omega and computes with theta = sign(omega)|omega|^beta.  Under
// beta > 1 a zero weight gets exactly zero gradient, so during a round the support S (the
// nonzeros of omega) is fixed and every pass only needs the |S| weights:
//
//   forward          y[n,co,oh,ow] = sum_{(ci,kh,kw) in S(co)} theta * x[n,ci,oh*s+kh-p,ow*s+kw-p]
//   input gradient   dx = the transposed convolution of dy with theta_S
//   weight gradient  domega = dtheta * beta|omega|^(beta-1) on S only (zero elsewhere), an SDDMM
//                    that reads the saved input in its pruned, compressed form
//
// Layout ("pixel tiles").  Activations are cut into batch tiles of L = 16 images; inside a
// tile a pixel (c, h, w) is one 16-float vector, the 16 images side by side:
//   [NT][C][H][W][16]     NT = ceil(N / 16), the lanes >= N of the last tile are zero.
// A nonzero weight (ci, kh, kw) then reads, for output pixel (oh, ow), the vector at a fixed
// offset from the pixel's base; a run of R output pixels of a row reads R vectors at the
// stride s*16.  The inner loop is one broadcast and R fused multiply-adds from memory per
// nonzero, with the R accumulators in registers, and needs no gather and no im2col.  This is
// SparseProp's idea (vectorise over the batch) with a batch tile, so that the rows a task
// reads stay in L2 and one layout serves every stride and image size.
//
// Gradients (polyphase).  dy goes into pixel tiles too, undilated, with Ph = (KH-1)/s rows
// (Pw columns) of zeros in front: dyp[co][Ph + oh][Pw + ow] = dy[co][oh][ow].  An input
// pixel (ih, iw) has phase (a, b) = ((ih+ph) % s, (iw+pw) % s) and grid position
// (u, v) = ((ih+ph) / s, (iw+pw) / s); exactly the taps with kh % s == a, kw % s == b reach
// it, each from dyp[co][u + Ph - kh/s][v + Pw - kw/s].  So
//   dx, per phase:  dx[ci][s*u + a - ph][s*v + b - pw] = sum_{taps of the phase} theta *
//                   dyp[co][u + Ph - kh/s][v + Pw - kw/s]: the same gather loop (stride 1
//                   over the dyp grid) with the column support split by phase;
//   dtheta[co,ci,kh,kw] = sum over the kept inputs of phase (kh%s, kw%s) of
//                   x * dyp[co][u + Ph - kh/s][v + Pw - kw/s][n]: the pruned input is stored
//                   per (tile, ci, phase) as (q = (u * Wq + v) * 16 + lane, value), so every
//                   weight of S is one gather-dot over the kept entries of its channel and
//                   phase: work proportional to |S| * density(x), and the dense input is
//                   never rebuilt.  With stride 1 there is one phase.
// Every output element is computed by one thread in a fixed order: results do not depend
// on the thread count.  Arithmetic is float32 whatever the storage dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "dtype.h"
#include "simd.h"
#include "topk_select.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <unordered_map>
#include <vector>

// GCC 12's own AVX-512 headers (gathers, reductions) trip this on their undefined vectors.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace sparsefl {
namespace {

constexpr int64_t L = 16;  // lanes of a pixel vector = images per batch tile

// In-register 8x8 transpose (rows r[0..7] -> columns), the unpack/shuffle/permute network.
SFL_INLINE void transpose8(v8* r) {
  v8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// ---------------------------------------------------------------------------------------
// Geometry and checks
// ---------------------------------------------------------------------------------------

struct Geom {
  int64_t N, C, H, W;   // input
  int64_t Co, KH, KW;   // weight
  int64_t sh, sw, ph, pw;
  int64_t OH, OW;       // output
  int64_t NT;           // batch tiles
  int64_t Hp() const { return H + 2 * ph; }
  int64_t Wp() const { return W + 2 * pw; }
  // dy in pixel tiles for the gradients: Ph leading zero rows, Hq rows in all
  int64_t Ph() const { return (KH - 1) / sh; }
  int64_t Pw() const { return (KW - 1) / sw; }
  int64_t Hq() const { return Ph() + (H - 1 + ph) / sh + 1; }
  int64_t Wq() const { return Pw() + (W - 1 + pw) / sw + 1; }
  int64_t K() const { return C * KH * KW; }  // weights per output channel
};

Geom make_geom(at::IntArrayRef x_shape, const at::Tensor& omega, at::IntArrayRef stride,
               at::IntArrayRef padding, const char* op) {
  TORCH_CHECK_VALUE(x_shape.size() == 4, op, ": input must be 4-D (N, C, H, W), got ",
                    x_shape.size(), " dims");
  TORCH_CHECK_VALUE(omega.dim() == 4, op, ": weight must be 4-D (Co, C, KH, KW), got ",
                    omega.dim(), " dims");
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2, op,
                    ": stride and padding must have 2 entries");
  Geom g{};
  g.N = x_shape[0]; g.C = x_shape[1]; g.H = x_shape[2]; g.W = x_shape[3];
  g.Co = omega.size(0); g.KH = omega.size(2); g.KW = omega.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  TORCH_CHECK_VALUE(omega.size(1) == g.C, op, ": weight has ", omega.size(1),
                    " input channels, input has ", g.C);
  TORCH_CHECK_VALUE(g.N >= 0 && g.C >= 1 && g.H >= 1 && g.W >= 1 && g.KH >= 1 && g.KW >= 1,
                    op, ": empty spatial or channel dimension");
  TORCH_CHECK_VALUE(g.sh >= 1 && g.sw >= 1, op, ": stride must be >= 1");
  TORCH_CHECK_VALUE(g.ph >= 0 && g.pw >= 0 && g.ph <= g.KH - 1 && g.pw <= g.KW - 1, op,
                    ": padding must lie in [0, kernel - 1], got (", g.ph, ", ", g.pw, ")");
  TORCH_CHECK_VALUE(g.H + 2 * g.ph >= g.KH && g.W + 2 * g.pw >= g.KW, op,
                    ": the kernel is larger than the padded input");
  g.OH = (g.H + 2 * g.ph - g.KH) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.KW) / g.sw + 1;
  g.NT = (g.N + L - 1) / L;
  // Offsets inside one batch tile are int64; the q of a kept input is int32.
  TORCH_CHECK_VALUE(g.Hq() * g.Wq() * L < (int64_t{1} << 31), op,
                    ": image too large for the packed activation positions");
  return g;
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " has dtype ", st, "; supported: float32, float16, bfloat16");
}

// A float tensor and the weight of the same dtype, and beta >= 1 (finite).
void check_operands(const at::Tensor& t, const char* name, const at::Tensor& omega, double beta,
                    const char* op) {
  check_float(t, op, name);
  check_float(omega, op, "weight");
  TORCH_CHECK_TYPE(t.scalar_type() == omega.scalar_type(), op, ": ", name, " is ",
                   t.scalar_type(), " but weight is ", omega.scalar_type());
  TORCH_CHECK_VALUE(beta >= 1.0 && std::isfinite(beta), op, ": beta must be >= 1");
}

void check_index(const at::Tensor& t, at::ScalarType st, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1, op, ": ", name,
                    " must be a 1-D CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == st, op, ": ", name, " must be ", st, ", got ",
                   t.scalar_type());
}

// rowptr [rows + 1] int64, ascending from 0 to nnz; entries int32 in [0, limit).
void check_csr(const at::Tensor& ptr, const at::Tensor& ent, int64_t rows, int64_t limit,
               const char* op, const char* what) {
  check_index(ptr, at::kLong, op, what);
  check_index(ent, at::kInt, op, what);
  TORCH_CHECK_VALUE(ptr.numel() == rows + 1, op, ": ", what, " pointer has ", ptr.numel(),
                    " entries, expected ", rows + 1);
  const int64_t* p = ptr.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(p[0] == 0 && p[rows] == ent.numel(), op, ": ", what,
                    " pointer must run from 0 to the entry count");
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(p[r] <= p[r + 1], op, ": ", what, " pointer is not ascending");
  const int32_t* e = ent.data_ptr<int32_t>();
  bool ok = true;
  for (int64_t j = 0; j < ent.numel(); ++j) ok &= (e[j] >= 0) & (e[j] < limit);
  TORCH_CHECK_VALUE(ok, op, ": ", what, " entries must lie in [0, ", limit, ")");
}

// |omega|^(beta - 1), the common exponents by square roots, as in sparsefl.nn.powerprop (pow
// is exp(e log x)).
SFL_INLINE float abs_pow(float a, float e) {
  if (e == 0.25f) return std::sqrt(std::sqrt(a));
  if (e == 0.5f) return std::sqrt(a);
  if (e == 0.0f) return 1.0f;
  if (e == 1.0f) return a;
  return std::pow(a, e);
}

// theta = omega |omega|^(beta - 1)
template <typename T>
SFL_INLINE float theta_of(T w_raw, float bm1) {
  const float w = static_cast<float>(w_raw);
  return w * abs_pow(std::fabs(w), bm1);
}

// dtheta / domega = beta |omega|^(beta - 1)
template <typename T>
SFL_INLINE float dtheta_domega(T w_raw, float beta, float bm1) {
  return abs_pow(std::fabs(static_cast<float>(w_raw)), bm1) * beta;
}

// Division by a runtime constant without a divide instruction (Lemire, Kaser, Kurz 2019:
// exact for every 32-bit numerator).  The per-nonzero index arithmetic uses it: a hardware
// divide costs 10-40 cycles, which on a 118K-nonzero layer is milliseconds per call.
struct FastDiv {
  uint64_t M = 0;
  uint32_t d = 1;
  explicit FastDiv(int64_t d_) : M(d_ == 1 ? 0 : UINT64_C(0xFFFFFFFFFFFFFFFF) / d_ + 1),
                                 d(static_cast<uint32_t>(d_)) {}
  SFL_INLINE int64_t div(int64_t a) const {
    if (d == 1) return a;
    return static_cast<int64_t>((static_cast<__uint128_t>(M) * static_cast<uint32_t>(a)) >> 64);
  }
  SFL_INLINE int64_t mod(int64_t a) const { return a - div(a) * d; }
};

// A weight's flat index inside its row, c = ci * KH * KW + kh * KW + kw, taken apart.
struct TapDiv {
  FastDiv kk, kw;
  TapDiv(int64_t KH, int64_t KW) : kk(KH * KW), kw(KW) {}
  SFL_INLINE void split(int64_t c, int64_t& ci, int64_t& kh, int64_t& kwo) const {
    ci = kk.div(c);
    const int64_t r = c - ci * kk.d;
    kh = kw.div(r);
    kwo = r - kh * kw.d;
  }
};

// theta = omega|omega|^(beta-1) of the weights w[idx[j]], into out (float32): a gather,
// then a branch-free loop the compiler vectorises.
template <typename T, typename I>
void thetas(const T* w, const I* idx, int64_t n, float beta, float* out, bool slope = false) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(w[idx[j]]);
  const float e = beta - 1.0f;
  if (slope) {  // beta|omega|^(beta-1) instead
    if (e == 0.25f) for (int64_t j = 0; j < n; ++j) out[j] = beta * std::sqrt(std::sqrt(std::fabs(out[j])));
    else if (e == 0.5f) for (int64_t j = 0; j < n; ++j) out[j] = beta * std::sqrt(std::fabs(out[j]));
    else if (e == 0.0f) for (int64_t j = 0; j < n; ++j) out[j] = beta;
    else for (int64_t j = 0; j < n; ++j) out[j] = dtheta_domega(out[j], beta, e);
    return;
  }
  if (e == 0.25f) for (int64_t j = 0; j < n; ++j) out[j] *= std::sqrt(std::sqrt(std::fabs(out[j])));
  else if (e == 0.5f) for (int64_t j = 0; j < n; ++j) out[j] *= std::sqrt(std::fabs(out[j]));
  else if (e != 0.0f) for (int64_t j = 0; j < n; ++j) out[j] = theta_of(out[j], e);
}

// ---------------------------------------------------------------------------------------
// Layout conversions: NCHW <-> pixel tiles
// ---------------------------------------------------------------------------------------

// dst[nt][c][oy + h*dy][ox + w*dx][lane] = src[nt*16 + lane][c][h][w]; the rest of dst
// (padding, dilation holes, lanes >= N) is zero.  dst has dims [NT][C][DH][DW][16].
// Full 8-image x 8-pixel blocks go through an in-register transpose; the rest is scalar.
template <typename T>
SFL_INLINE void to_tiles_plane(const T* src, int64_t N, int64_t C, int64_t H, int64_t W,
                               float* d, int64_t DW, int64_t oy, int64_t ox, int64_t dyl,
                               int64_t dxl, int64_t nt, int64_t c) {
  const int64_t lanes = std::min(L, N - nt * L);
  const int64_t CHW = C * H * W;
  for (int64_t l0 = 0; l0 < lanes; l0 += 8) {
    const int64_t nl = std::min<int64_t>(8, lanes - l0);
    const T* s0 = src + (nt * L + l0) * CHW + c * H * W;
    for (int64_t h = 0; h < H; ++h) {
      float* drow = d + ((oy + h * dyl) * DW + ox) * L + l0;
      const T* srow = s0 + h * W;
      int64_t w = 0;
      if constexpr (std::is_same_v<T, float>) {
        if (nl == 8)
          for (; w + 8 <= W; w += 8) {
            v8 r[8];
            for (int i = 0; i < 8; ++i) r[i] = vload<v8>(srow + i * CHW + w);
            transpose8(r);
            for (int j = 0; j < 8; ++j) vstore(drow + (w + j) * dxl * L, r[j]);
          }
      }
      for (; w < W; ++w)
        for (int64_t i = 0; i < nl; ++i)
          drow[w * dxl * L + i] = static_cast<float>(srow[i * CHW + w]);
    }
  }
}

template <typename T>
SFL_INLINE void to_tiles_range(const T* src, int64_t N, int64_t C, int64_t H, int64_t W,
                               float* dst, int64_t DH, int64_t DW, int64_t oy, int64_t ox,
                               int64_t dyl, int64_t dxl, int64_t lo, int64_t hi) {
  for (int64_t t = lo; t < hi; ++t) {
    float* d = dst + t * DH * DW * L;
    if (dyl == 1 && dxl == 1 && N - (t / C) * L >= L) {
      // a full tile, undilated: only the border is not overwritten
      std::memset(d, 0, sizeof(float) * oy * DW * L);
      std::memset(d + (oy + H) * DW * L, 0, sizeof(float) * (DH - oy - H) * DW * L);
      for (int64_t h = 0; h < H; ++h) {
        float* r = d + (oy + h) * DW * L;
        std::memset(r, 0, sizeof(float) * ox * L);
        std::memset(r + (ox + W) * L, 0, sizeof(float) * (DW - ox - W) * L);
      }
    } else {
      std::memset(d, 0, sizeof(float) * DH * DW * L);
    }
    to_tiles_plane(src, N, C, H, W, d, DW, oy, ox, dyl, dxl, t / C, t % C);
  }
}

// ---------------------------------------------------------------------------------------
// The gather convolution: out[n][co][oh][ow] = bias[co] + sum_j val[j] * in[off[j] + pix]
// ---------------------------------------------------------------------------------------
// A task is (batch tile, block of grid rows) and runs every output channel over it: the
// input rows the block reads (KH + (rows - 1) * stride rows of every input channel) stay in
// L2 while all output channels reuse them.  Inside, grid pixels are taken R at a time in
// row-major order (a run may span rows when the grid is narrow); boff[r] is pixel r's
// offset from the tile base.  Grid pixel (u, v) reads input pixel (iy0 + u*sy, ix0 + v*sx)
// (plus each tap's offset) and writes output pixel (oy0 + u*osy, ox0 + v*osx).

struct ConvArgs {
  const float* in;        // [NT][Cin][IH][IW][16]
  int64_t in_tile;        // floats per batch tile of `in`
  int64_t in_row;         // IW * 16
  int64_t iy0, ix0, sy, sx;
  const int64_t* ptr;     // [Cout + 1]
  const int64_t* off;     // [nnz] offset of each nonzero's tap inside a tile
  const float* val;       // [nnz]
  const float* bias;      // [Cout] or null
  int64_t Cout, N, NT;
  int64_t GH, GW;         // grid
  int64_t OH, OW;         // output plane (NCHW)
  int64_t oy0, ox0, osy, osx;
  int64_t rows_per_task;
  void* out;              // NCHW, dtype T
};

template <typename V, int R>
SFL_INLINE void conv_run(const float* tile, const int64_t* boff, const int64_t* off,
                         const float* val, int64_t j0, int64_t j1, float b, float* buf) {
  constexpr int NV = L / (sizeof(V) / sizeof(float));  // vectors per pixel
  constexpr int VL = L / NV;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vbroadcast<V>(b);
  for (int64_t j = j0; j < j1; ++j) {
    const float* p = tile + off[j];
    const V w = vbroadcast<V>(val[j]);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += w * vload<V>(p + boff[r] + v * VL);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(buf + r * L + v * VL, acc[r][v]);
}

// conv_run for a run whose pixels are SX pixels apart in the tile (boff[r] = r SX 16 past
// `base`; the caller checks): the R loads per weight are one address plus fixed
// displacements, where eight independent offsets ran out of registers and cost more
// address arithmetic than the FMAs they feed.
template <typename V, int R, int SX>
SFL_INLINE void conv_run_row(const float* base, const int64_t* off, const float* val,
                             int64_t j0, int64_t j1, float b, float* buf) {
  constexpr int NV = L / (sizeof(V) / sizeof(float));
  constexpr int VL = L / NV;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vbroadcast<V>(b);
  for (int64_t j = j0; j < j1; ++j) {
    const float* p = base + off[j];
    const V w = vbroadcast<V>(val[j]);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += w * vload<V>(p + r * SX * L + v * VL);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(buf + r * L + v * VL, acc[r][v]);
}

// A full run of R pixels: the fixed-displacement loop when the pixels are evenly spaced
// at column stride 1 or 2 (a run inside one row), the general one otherwise.
template <typename V, int R>
SFL_INLINE void conv_run_any(const float* tile, const int64_t* boff, int64_t sx,
                             const int64_t* off, const float* val, int64_t j0, int64_t j1,
                             float b, float* buf) {
  const int64_t span = boff[R - 1] - boff[0];
  if (span == (R - 1) * L) conv_run_row<V, R, 1>(tile + boff[0], off, val, j0, j1, b, buf);
  else if (span == 2 * (R - 1) * L && sx == 2)
    conv_run_row<V, R, 2>(tile + boff[0], off, val, j0, j1, b, buf);
  else conv_run<V, R>(tile, boff, off, val, j0, j1, b, buf);
}

template <typename V>
SFL_INLINE void conv_run_tail(const float* tile, const int64_t* boff, const int64_t* off,
                              const float* val, int64_t j0, int64_t j1, float b, float* buf,
                              int n) {
  constexpr int NV = L / (sizeof(V) / sizeof(float));
  constexpr int VL = L / NV;
  for (int r = 0; r < n; ++r) {
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = vbroadcast<V>(b);
    for (int64_t j = j0; j < j1; ++j) {
      const V w = vbroadcast<V>(val[j]);
      for (int v = 0; v < NV; ++v) acc[v] += w * vload<V>(tile + off[j] + boff[r] + v * VL);
    }
    for (int v = 0; v < NV; ++v) vstore(buf + r * L + v * VL, acc[v]);
  }
}

// buf[r][lane] (n pixels x 16 lanes) -> out[lane * img + opix[r]], lanes < `lanes`.
template <int R, typename T>
SFL_INLINE void write_pixels(const float* buf, int n, int64_t lanes, T* out, int64_t img,
                             const int64_t* opix, bool contiguous) {
  if constexpr (std::is_same_v<T, float> && R >= 8) {
    if (n == 8 && contiguous) {
      for (int64_t l0 = 0; l0 < lanes; l0 += 8) {
        v8 r[8];
        for (int i = 0; i < 8; ++i) r[i] = vload<v8>(buf + i * L + l0);
        transpose8(r);  // r[i] = lane l0 + i over the 8 pixels
        const int64_t nl = std::min<int64_t>(8, lanes - l0);
        for (int64_t i = 0; i < nl; ++i) vstore(out + (l0 + i) * img + opix[0], r[i]);
      }
      return;
    }
  }
  for (int64_t i = 0; i < lanes; ++i)
    for (int r = 0; r < n; ++r) out[i * img + opix[r]] = static_cast<T>(buf[r * L + i]);
}

// Task t of a pass: (batch tile nt, a block of rows_per_task grid rows) = grid pixels
// [p0, p1), and the tile's image count.
struct TaskSpan {
  int64_t nt, p0, p1, lanes;
};
SFL_INLINE TaskSpan task_span(const ConvArgs& a, int64_t t) {
  const int64_t blocks = (a.GH + a.rows_per_task - 1) / a.rows_per_task;
  const int64_t nt = t / blocks, p0 = (t % blocks) * a.rows_per_task * a.GW;
  return {nt, p0, std::min(a.GH * a.GW, p0 + a.rows_per_task * a.GW), std::min(L, a.N - nt * L)};
}

template <typename V, int R, typename T>
SFL_INLINE void conv_tasks(const ConvArgs& a, int64_t lo, int64_t hi) {
  alignas(64) float buf[R * L];
  T* out = static_cast<T*>(a.out);
  const int64_t plane = a.OH * a.OW, img = a.Cout * plane;
  // Runs of R grid pixels land on R consecutive output pixels when the grid is the whole
  // output plane at unit steps.
  const bool dense_out = a.osy == 1 && a.osx == 1 && a.GW == a.OW && a.ox0 == 0;
  // The task's pixel offsets, worked out once for all output channels (a small layer has
  // many channels and few pixels: per channel this index arithmetic cost more than the FMAs).
  std::vector<int64_t> boffs, opixs;
  for (int64_t t = lo; t < hi; ++t) {
    const auto [nt, p0, p1, lanes] = task_span(a, t);
    const float* tile = a.in + nt * a.in_tile;
    T* o = out + nt * L * img;
    boffs.resize(p1 - p0);
    opixs.resize(p1 - p0);
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t u = q / a.GW, v = q - u * a.GW;
      boffs[q - p0] = (a.iy0 + u * a.sy) * a.in_row + (a.ix0 + v * a.sx) * L;
      opixs[q - p0] = (a.oy0 + u * a.osy) * a.OW + a.ox0 + v * a.osx;
    }
    for (int64_t co = 0; co < a.Cout; ++co) {
      const int64_t j0 = a.ptr[co], j1 = a.ptr[co + 1];
      const float b = a.bias ? a.bias[co] : 0.0f;
      T* oc = o + co * plane;
      for (int64_t p = p0; p < p1; p += R) {
        const int n = static_cast<int>(std::min<int64_t>(R, p1 - p));
        const int64_t* boff = boffs.data() + (p - p0);
        const int64_t* opix = opixs.data() + (p - p0);
        if (n == R) conv_run_any<V, R>(tile, boff, a.sx, a.off, a.val, j0, j1, b, buf);
        else conv_run_tail<V>(tile, boff, a.off, a.val, j0, j1, b, buf, n);
        write_pixels<R, T>(buf, n, lanes, oc, img, opix, dense_out);
      }
    }
  }
}

// The input gradient of a column-stride-2 conv, both column phases of one row phase in one
// pass.  Written phase by phase, each pass would fill every other column of dx: 8 scalar
// stores per lane and pixel run, every cache line of dx written twice (half of a stride-2
// layer's backward).  Here grid pixel v of the even phase (e) and of the odd phase (o) are
// output columns 2v and 2v + 1: each run of 8 grid pixels of both phases is transposed in
// 8-column groups and stored as contiguous rows.  Needs a float output, grids 4k wide
// (a group of 4 grid pixels stays in one row) and OW = 2 GW; the caller checks.
template <typename V, int R>
SFL_INLINE void conv_tasks_pair(const ConvArgs& e, const ConvArgs& o, int64_t lo, int64_t hi) {
  static_assert(R == 8, "the paired write merges runs of 8");
  alignas(64) float be[R * L], bo[R * L];
  float* out = static_cast<float*>(e.out);
  const int64_t plane = e.OH * e.OW, img = e.Cout * plane;
  std::vector<int64_t> boe, boo, opix;  // per grid pixel; opix: output of its 4-group
  for (int64_t t = lo; t < hi; ++t) {
    const auto [nt, p0, p1, lanes] = task_span(e, t);
    const float* tile = e.in + nt * e.in_tile;
    float* ot = out + nt * L * img;
    boe.resize(p1 - p0);
    boo.resize(p1 - p0);
    opix.resize(p1 - p0);
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t u = q / e.GW, v = q - u * e.GW;
      const int64_t row = (e.iy0 + u * e.sy) * e.in_row;
      boe[q - p0] = row + (e.ix0 + v * e.sx) * L;
      boo[q - p0] = row + (o.ix0 + v * o.sx) * L;
      opix[q - p0] = (e.oy0 + u * e.osy) * e.OW + 2 * v;
    }
    for (int64_t co = 0; co < e.Cout; ++co) {
      float* oc = ot + co * plane;
      for (int64_t p = p0; p < p1; p += R) {
        const int n = static_cast<int>(std::min<int64_t>(R, p1 - p));  // 4 or 8
        const int64_t k = p - p0;
        if (n == R) {
          conv_run_any<V, R>(tile, boe.data() + k, e.sx, e.off, e.val, e.ptr[co], e.ptr[co + 1],
                             0.f, be);
          conv_run_any<V, R>(tile, boo.data() + k, o.sx, o.off, o.val, o.ptr[co], o.ptr[co + 1],
                             0.f, bo);
        } else {
          conv_run_tail<V>(tile, boe.data() + k, e.off, e.val, e.ptr[co], e.ptr[co + 1], 0.f,
                           be, n);
          conv_run_tail<V>(tile, boo.data() + k, o.off, o.val, o.ptr[co], o.ptr[co + 1], 0.f,
                           bo, n);
        }
        for (int g = 0; g < n; g += 4)
          for (int64_t l0 = 0; l0 < lanes; l0 += 8) {
            v8 r[8];
            for (int i = 0; i < 4; ++i) {
              r[2 * i] = vload<v8>(be + (g + i) * L + l0);
              r[2 * i + 1] = vload<v8>(bo + (g + i) * L + l0);
            }
            transpose8(r);  // r[i] = lane l0 + i over 8 consecutive output columns
            const int64_t nl = std::min<int64_t>(8, lanes - l0);
            for (int64_t i = 0; i < nl; ++i) vstore(oc + (l0 + i) * img + opix[k + g], r[i]);
          }
      }
    }
  }
}

// One ISA-specific entry point per kernel and dtype: the template body is inlined into a
// function compiled for that ISA (simd.h).

template <typename T>
SFL_AVX512 void conv_tasks_avx512(const ConvArgs& a, int64_t lo, int64_t hi) {
  conv_tasks<v16, 8, T>(a, lo, hi);
}
template <typename T>
SFL_AVX2 void conv_tasks_avx2(const ConvArgs& a, int64_t lo, int64_t hi) {
  conv_tasks<v8, 4, T>(a, lo, hi);
}
template <typename T>
void conv_tasks_portable(const ConvArgs& a, int64_t lo, int64_t hi) {
  conv_tasks<v4, 2, T>(a, lo, hi);
}
SFL_AVX512 void conv_tasks_pair_avx512(const ConvArgs& e, const ConvArgs& o, int64_t lo,
                                       int64_t hi) {
  conv_tasks_pair<v16, 8>(e, o, lo, hi);
}

template <typename T>
SFL_AVX512 void to_tiles_avx512(const T* src, int64_t N, int64_t C, int64_t H, int64_t W,
                                float* dst, int64_t DH, int64_t DW, int64_t oy, int64_t ox,
                                int64_t dyl, int64_t dxl, int64_t lo, int64_t hi) {
  to_tiles_range(src, N, C, H, W, dst, DH, DW, oy, ox, dyl, dxl, lo, hi);
}
template <typename T>
SFL_AVX2 void to_tiles_avx2(const T* src, int64_t N, int64_t C, int64_t H, int64_t W,
                            float* dst, int64_t DH, int64_t DW, int64_t oy, int64_t ox,
                            int64_t dyl, int64_t dxl, int64_t lo, int64_t hi) {
  to_tiles_range(src, N, C, H, W, dst, DH, DW, oy, ox, dyl, dxl, lo, hi);
}
template <typename T>
void to_tiles_portable(const T* src, int64_t N, int64_t C, int64_t H, int64_t W, float* dst,
                       int64_t DH, int64_t DW, int64_t oy, int64_t ox, int64_t dyl,
                       int64_t dxl, int64_t lo, int64_t hi) {
  to_tiles_range(src, N, C, H, W, dst, DH, DW, oy, ox, dyl, dxl, lo, hi);
}


// Grain for at::parallel_for over `tasks` of `work` element-operations in all: small jobs
// (a 16-image Linear layer) run on the calling thread, as a fork/join costs more.
int64_t grain(int64_t tasks, double work) {
  constexpr double kMinParallelWork = 1 << 16;
  return work < kMinParallelWork ? tasks + 1 : 1;
}

template <typename T>
void to_tiles(const T* src, int64_t N, int64_t C, int64_t H, int64_t W, float* dst, int64_t DH,
              int64_t DW, int64_t oy, int64_t ox, int64_t dyl, int64_t dxl) {
  const int64_t NT = (N + L - 1) / L;
  if (DH == 1 && DW == 1) {  // one pixel (a Linear layer): a plain transpose per batch tile
    std::memset(dst, 0, sizeof(float) * NT * C * L);
    for (int64_t n = 0; n < N; ++n) {
      float* d = dst + (n / L) * C * L + n % L;
      const T* s = src + n * C;
      for (int64_t c = 0; c < C; ++c) d[c * L] = static_cast<float>(s[c]);
    }
    return;
  }
  auto fn = isa() == Isa::kAvx512 ? &to_tiles_avx512<T>
          : isa() == Isa::kAvx2   ? &to_tiles_avx2<T>
                                  : &to_tiles_portable<T>;
  at::parallel_for(0, NT * C, grain(NT * C, double(NT * C) * DH * DW * L), [&](int64_t lo,
                                                                             int64_t hi) {
    fn(src, N, C, H, W, dst, DH, DW, oy, ox, dyl, dxl, lo, hi);
  });
}

// The paired pass for column phases e (even output columns) and o (odd), if it applies:
// AVX-512 (runs of 8), float output, the same rows, grids 4k wide filling OW = 2 GW.
bool run_conv_pair(const ConvArgs& e, const ConvArgs& o, bool float_out) {
  if (isa() != Isa::kAvx512 || !float_out || e.GH != o.GH || e.GW != o.GW ||
      e.iy0 != o.iy0 || e.oy0 != o.oy0 || e.ox0 != 0 || o.ox0 != 1 || e.osx != 2 ||
      o.osx != 2 || e.osy != o.osy || e.GW % 4 != 0 || e.OW != 2 * e.GW ||
      e.rows_per_task != o.rows_per_task || e.bias || o.bias)
    return false;
  const int64_t tasks = e.NT * ((e.GH + e.rows_per_task - 1) / e.rows_per_task);
  const double work = double(e.NT) * e.GH * e.GW * L *
                      (e.ptr[e.Cout] - e.ptr[0] + o.ptr[o.Cout] - o.ptr[0] + 2 * e.Cout);
  at::parallel_for(0, tasks, grain(tasks, work), [&](int64_t lo, int64_t hi) {
    conv_tasks_pair_avx512(e, o, lo, hi);
  });
  return true;
}

template <typename T>
void run_conv(const ConvArgs& a) {
  auto fn = isa() == Isa::kAvx512 ? &conv_tasks_avx512<T>
          : isa() == Isa::kAvx2   ? &conv_tasks_avx2<T>
                                  : &conv_tasks_portable<T>;
  const int64_t tasks = a.NT * ((a.GH + a.rows_per_task - 1) / a.rows_per_task);
  const double work = double(a.NT) * a.GH * a.GW * L * (a.ptr[a.Cout] - a.ptr[0] + a.Cout);
  at::parallel_for(0, tasks, grain(tasks, work), [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
}

// ---------------------------------------------------------------------------------------
// Index plans
// ---------------------------------------------------------------------------------------
// The O(nnz) index arithmetic of every pass depends on the support and the geometry only,
// not on the weight values: the fused layer op (SparsePlan) builds it once per support and
// input size, i.e. once a round; the public ops build it on every call.  For a 16-image
// Linear layer this set-up cost more than the arithmetic.
struct Plan {
  std::vector<int64_t> widx;  // flat weight index (co * K + c) of each row entry
  std::vector<int64_t> off;   // forward: input-tile offset of each row entry's tap
  std::vector<int64_t> pptr;  // input gradient: [S][C + 1] pointers, entries phase-major
  std::vector<int64_t> poff;  //   dyp offset of each entry
  std::vector<int64_t> pidx;  //   its flat weight index
  std::vector<int64_t> roff;  // weight gradient: dyp offset of each row entry's tap
  std::vector<int64_t> rgrp;  //   its activation group (ci, phase) inside a batch tile
};

// The dyp offset of tap (kh, kw) of output channel co (see the top of the file).
struct TapOffset {
  FastDiv fsh, fsw;
  int64_t Hq, Wq, Ph, Pw;
  explicit TapOffset(const Geom& g)
      : fsh(g.sh), fsw(g.sw), Hq(g.Hq()), Wq(g.Wq()), Ph(g.Ph()), Pw(g.Pw()) {}
  SFL_INLINE int64_t operator()(int64_t co, int64_t kh, int64_t kw) const {
    return ((co * Hq + Ph - fsh.div(kh)) * Wq + Pw - fsw.div(kw)) * L;
  }
};

void plan_rows(const Geom& g, const int64_t* rp, const int32_t* cp, Plan& P, bool fwd,
               bool wgrad) {
  const int64_t nnz = rp[g.Co];
  const int64_t Hp = g.Hp(), Wp = g.Wp();
  const TapDiv taps(g.KH, g.KW);
  const TapOffset tap_off(g);
  P.widx.resize(nnz);
  if (fwd) P.off.resize(nnz);
  if (wgrad) P.roff.resize(nnz), P.rgrp.resize(nnz);
  for (int64_t co = 0; co < g.Co; ++co)
    for (int64_t j = rp[co]; j < rp[co + 1]; ++j) {
      int64_t ci, kh, kw;
      taps.split(cp[j], ci, kh, kw);
      P.widx[j] = co * g.K() + cp[j];
      if (fwd) P.off[j] = ((ci * Hp + kh) * Wp + kw) * L;
      if (wgrad) {
        P.roff[j] = tap_off(co, kh, kw);
        P.rgrp[j] = (ci * g.sh + tap_off.fsh.mod(kh)) * g.sw + tap_off.fsw.mod(kw);
      }
    }
}

// The column support (entries of input channel ci, as flat weight indices) split by phase:
// a stable counting sort (stride 1: one phase, the column support itself).
void plan_columns(const Geom& g, const int64_t* cpp, const int32_t* ce, Plan& P) {
  const int64_t nnz = cpp[g.C], S = g.sh * g.sw;
  const FastDiv fK(g.K());
  const TapDiv taps(g.KH, g.KW);
  const TapOffset tap_off(g);
  std::vector<int64_t> poff(nnz);
  std::vector<int32_t> phase_of(nnz);
  for (int64_t ci = 0; ci < g.C; ++ci)
    for (int64_t j = cpp[ci]; j < cpp[ci + 1]; ++j) {
      const int64_t co = fK.div(ce[j]);
      int64_t cc, kh, kw;
      taps.split(ce[j] - co * g.K(), cc, kh, kw);
      phase_of[j] = static_cast<int32_t>(tap_off.fsh.mod(kh) * g.sw + tap_off.fsw.mod(kw));
      poff[j] = tap_off(co, kh, kw);
    }
  if (S == 1) {
    P.pptr.assign(cpp, cpp + g.C + 1);
    P.poff.swap(poff);
    P.pidx.assign(ce, ce + nnz);
    return;
  }
  P.pptr.assign(S * (g.C + 1), 0);
  for (int64_t ci = 0; ci < g.C; ++ci)
    for (int64_t j = cpp[ci]; j < cpp[ci + 1]; ++j) ++P.pptr[phase_of[j] * (g.C + 1) + ci + 1];
  int64_t run = 0;
  for (int64_t f = 0; f < S; ++f) {
    int64_t* pp = P.pptr.data() + f * (g.C + 1);
    pp[0] = run;
    for (int64_t ci = 0; ci < g.C; ++ci) pp[ci + 1] += pp[ci];
    run = pp[g.C];
  }
  std::vector<int64_t> fill(S * g.C);
  for (int64_t f = 0; f < S; ++f)
    for (int64_t ci = 0; ci < g.C; ++ci) fill[f * g.C + ci] = P.pptr[f * (g.C + 1) + ci];
  P.poff.resize(nnz);
  P.pidx.resize(nnz);
  for (int64_t ci = 0; ci < g.C; ++ci)
    for (int64_t j = cpp[ci]; j < cpp[ci + 1]; ++j) {
      const int64_t slot = fill[phase_of[j] * g.C + ci]++;
      P.poff[slot] = poff[j];
      P.pidx[slot] = ce[j];
    }
}

// The support of omega in both groupings (the definition: pack_support in
// sparsefl/ops/reference/sparse_conv.py): rows = output channels, entries the nonzero
// columns c = ci * KH * KW + kh * KW + kw ascending; columns = input channels, entries the
// flat indices co * K + c in (co, c) order.  Once per layer and round.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_support_cpu(
    const at::Tensor& omega_in) {
  const char* op = "sparsefl.pack_support";
  check_float(omega_in, op, "weight");
  TORCH_CHECK_VALUE(omega_in.dim() == 2 || omega_in.dim() == 4, op,
                    ": weight must be 2-D or 4-D, got ", omega_in.dim(), "-D");
  const at::Tensor w = omega_in.contiguous();
  const int64_t co = w.size(0), C = w.size(1);
  const int64_t kk = w.dim() == 4 ? w.size(2) * w.size(3) : 1, K = C * kk;
  TORCH_CHECK_VALUE(co * K < (int64_t{1} << 31), op, ": weight has 2^31 or more entries");
  auto rowptr = at::empty({co + 1}, w.options().dtype(at::kLong));
  auto cptr = at::zeros({C + 1}, w.options().dtype(at::kLong));
  int64_t* rp = rowptr.data_ptr<int64_t>();
  int64_t* cp = cptr.data_ptr<int64_t>();
  std::vector<uint8_t> nz(co * K);
  dispatch_float_dtype(w.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* ws = w.data_ptr<T>();
    for (int64_t i = 0; i < co * K; ++i) nz[i] = static_cast<float>(ws[i]) != 0.0f;
  });
  rp[0] = 0;
  for (int64_t r = 0; r < co; ++r) {
    int64_t n = 0;
    for (int64_t c = 0; c < K; ++c) n += nz[r * K + c];
    rp[r + 1] = rp[r] + n;
  }
  const int64_t nnz = rp[co];
  for (int64_t r = 0; r < co; ++r)
    for (int64_t c = 0; c < K; ++c) cp[c / kk + 1] += nz[r * K + c];
  for (int64_t ci = 0; ci < C; ++ci) cp[ci + 1] += cp[ci];
  auto cols = at::empty({nnz}, w.options().dtype(at::kInt));
  auto cent = at::empty({nnz}, w.options().dtype(at::kInt));
  int32_t* cs = cols.data_ptr<int32_t>();
  int32_t* ce = cent.data_ptr<int32_t>();
  std::vector<int64_t> fill(cp, cp + C);
  int64_t j = 0;
  for (int64_t r = 0; r < co; ++r)
    for (int64_t c = 0; c < K; ++c)
      if (nz[r * K + c]) {
        cs[j++] = static_cast<int32_t>(c);
        ce[fill[c / kk]++] = static_cast<int32_t>(r * K + c);
      }
  return {rowptr, cols, cptr, cent};
}

// Every entry of column ci must be a weight of input channel ci.
void check_columns(const Geom& g, const int64_t* cpp, const int32_t* ce, const char* op) {
  const FastDiv fK(g.K());
  const TapDiv taps(g.KH, g.KW);
  bool ok = true;
  for (int64_t ci = 0; ci < g.C; ++ci)
    for (int64_t j = cpp[ci]; j < cpp[ci + 1]; ++j) ok &= taps.kk.div(fK.mod(ce[j])) == ci;
  TORCH_CHECK_VALUE(ok, op, ": support column entries do not match their input channel");
}

// Nonzero weights outside the support: all nonzeros minus those at the plan's entries.
// One read of the weight per forward (a ResNet-18 step: 45 MB, in parallel blocks).
template <typename T>
int64_t escapes_of(const T* w, int64_t numel, const Plan& P) {
  constexpr int64_t kBlock = 1 << 16;
  const int64_t nnz = static_cast<int64_t>(P.widx.size());
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, blocks, grain(blocks, double(numel)), [&](int64_t b0, int64_t b1) {
    int64_t nz = 0;
    for (int64_t i = b0 * kBlock, e = std::min(numel, b1 * kBlock); i < e; ++i)
      nz += static_cast<float>(w[i]) != 0.0f;
    total += nz;
  });
  int64_t in_s = 0;
  for (int64_t j = 0; j < nnz; ++j) in_s += static_cast<float>(w[P.widx[j]]) != 0.0f;
  return total.load() - in_s;
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

// y = conv(x, theta_S) + bias with the support's plan; b: float32 bias or undefined.
// tiles: when given, receives the input in pixel tiles ([NT][C][Hp][Wp][16], zero padding
// and zero lanes past N) that the convolution read.
at::Tensor forward_planned(const at::Tensor& x, const at::Tensor& omega, double beta,
                           const int64_t* rp, const Plan& P, const at::Tensor& b,
                           const Geom& g, const char* op, at::Tensor* tiles = nullptr) {
  auto y = at::empty({g.N, g.Co, g.OH, g.OW}, x.options());
  if (g.N == 0) return y;
  const int64_t nnz = static_cast<int64_t>(P.widx.size());
  const int64_t Hp = g.Hp(), Wp = g.Wp();
  std::vector<float> val(nnz);
  dispatch_float_dtype(omega.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    thetas(omega.data_ptr<T>(), P.widx.data(), nnz, static_cast<float>(beta), val.data());
  });
  auto xt = at::empty({g.NT * g.C * Hp * Wp * L}, x.options().dtype(at::kFloat));
  ConvArgs a{};
  a.in = xt.data_ptr<float>();
  a.in_tile = g.C * Hp * Wp * L;
  a.in_row = Wp * L;
  a.iy0 = 0; a.ix0 = 0; a.sy = g.sh; a.sx = g.sw;
  a.ptr = rp; a.off = P.off.data(); a.val = val.data();
  a.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  a.Cout = g.Co; a.N = g.N; a.NT = g.NT;
  a.GH = g.OH; a.GW = g.OW; a.OH = g.OH; a.OW = g.OW;
  a.oy0 = 0; a.ox0 = 0; a.osy = 1; a.osx = 1;
  a.rows_per_task = std::max<int64_t>(1, (8 + g.OW - 1) / g.OW);
  a.out = y.data_ptr();
  dispatch_float_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    to_tiles<T>(x.data_ptr<T>(), g.N, g.C, g.H, g.W, xt.data_ptr<float>(), Hp, Wp, g.ph, g.pw,
                1, 1);
    run_conv<T>(a);
  });
  if (tiles != nullptr) *tiles = xt;
  return y;
}

at::Tensor float_bias(const c10::optional<at::Tensor>& bias, const Geom& g, const char* op) {
  if (!(bias.has_value() && bias->defined())) return at::Tensor();
  check_float(*bias, op, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == g.Co, op, ": bias must have ", g.Co,
                    " entries");
  return bias->to(at::kFloat).contiguous();
}

at::Tensor sparse_conv_forward_cpu(const at::Tensor& x_in, const at::Tensor& omega_in,
                                   double beta, const at::Tensor& rowptr,
                                   const at::Tensor& cols, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "sparsefl.sparse_conv_forward";
  check_operands(x_in, "input", omega_in, beta, op);
  const Geom g = make_geom(x_in.sizes(), omega_in, stride, padding, op);
  check_csr(rowptr, cols, g.Co, g.K(), op, "support rows");
  const at::Tensor x = x_in.contiguous(), omega = omega_in.contiguous();
  const at::Tensor b = float_bias(bias, g, op);
  if (g.N == 0) return at::empty({g.N, g.Co, g.OH, g.OW}, x.options());
  Plan P;
  plan_rows(g, rowptr.data_ptr<int64_t>(), cols.data_ptr<int32_t>(), P, /*fwd=*/true,
            /*wgrad=*/false);
  return forward_planned(x, omega, beta, rowptr.data_ptr<int64_t>(), P, b, g, op);
}

// ---------------------------------------------------------------------------------------
// Activation packing: the kept inputs per (batch tile, input channel, phase), at their
// positions in the dyp grid
// ---------------------------------------------------------------------------------------

// Where a layer's weight gradient looks for its input (see the top of the file).
struct PackGeom {
  int64_t N, C, H, W, sh, sw, ph, pw, Wq, NT;
  int64_t groups() const { return NT * C * sh * sw; }
};

PackGeom pack_geom(at::IntArrayRef x_shape, at::IntArrayRef kernel, at::IntArrayRef stride,
                   at::IntArrayRef padding, const char* op) {
  TORCH_CHECK_VALUE(x_shape.size() == 4, op, ": input must be 4-D (N, C, H, W)");
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
                    ": kernel, stride and padding must have 2 entries");
  PackGeom p{};
  p.N = x_shape[0]; p.C = x_shape[1]; p.H = x_shape[2]; p.W = x_shape[3];
  p.sh = stride[0]; p.sw = stride[1]; p.ph = padding[0]; p.pw = padding[1];
  TORCH_CHECK_VALUE(kernel[0] >= 1 && kernel[1] >= 1 && p.sh >= 1 && p.sw >= 1, op,
                    ": kernel and stride must be >= 1");
  TORCH_CHECK_VALUE(p.ph >= 0 && p.pw >= 0 && p.ph < kernel[0] && p.pw < kernel[1], op,
                    ": padding must lie in [0, kernel - 1]");
  TORCH_CHECK_VALUE(p.C >= 1 && p.H >= 1 && p.W >= 1, op, ": empty channel or spatial dim");
  TORCH_CHECK_VALUE(p.sh * p.sw <= 64, op, ": stride too large (sh * sw must be <= 64)");
  p.Wq = (kernel[1] - 1) / p.sw + (p.W - 1 + p.pw) / p.sw + 1;
  const int64_t Hq = (kernel[0] - 1) / p.sh + (p.H - 1 + p.ph) / p.sh + 1;
  TORCH_CHECK_VALUE(Hq * p.Wq * L < (int64_t{1} << 31), op,
                    ": image too large for int32 positions");
  p.NT = (p.N + L - 1) / L;
  return p;
}

// What one thread packs: a contiguous range of planes [t0, t1), its groups' entries in
// group order, and the candidates (keys inside the threshold bracket) that the exact
// threshold may still drop.
struct PackChunk {
  int64_t t0 = 0, t1 = 0;
  std::vector<int32_t> q;
  std::vector<float> v;
  struct Cand {
    uint32_t key;
    int64_t pos;  // index into q / v
  };
  std::vector<Cand> cand;
  int64_t above = 0;
  uint32_t kmax = 0;
};

// One pass over the plane (tile nt, channel c): images outer, rows inner (each row read
// once, its phases split while it is in L1); every entry with key >= lo is appended,
// branch-free, to its phase's staging area in (lane, u, v) order, and the phases are then
// appended to the chunk in group order; keys in [lo, hi] are noted as candidates when
// `track`.  counts[g] receives each group's entry count.
// Appends, branch-free, the entries of row[iw0:W:sw] with key >= lo to qd/vd from n (their
// positions qv, qv + 16, ...); counts keys > hi and tracks the largest key.  Returns n.
template <typename T>
SFL_INLINE int64_t append_kept(const T* __restrict row, int64_t iw0, int64_t W, int64_t sw,
                               int32_t qv, int32_t* __restrict qd, float* __restrict vd,
                               int64_t n, uint32_t lo, uint32_t hi, int64_t& above,
                               uint32_t& mx) {
  int64_t ab = above;
  uint32_t m = mx;
  for (int64_t iw = iw0; iw < W; iw += sw, qv += L) {
    const float val = static_cast<float>(row[iw]);
    const uint32_t key = magnitude_key(val);
    qd[n] = qv;
    vd[n] = val;
    n += key >= lo;
    ab += key > hi;
    m = std::max(m, key);
  }
  above = ab;
  mx = m;
  return n;
}

// One plane (one channel of one batch tile): appends, branch-free, every entry with
// key >= lo to its phase's staging area (sq/sv + phase * stage, counts in cnt), images
// outer, rows, then columns of each phase.  A separate function with restrict pointers
// and local sums, so that the inner loop keeps everything in registers.
template <typename T>
__attribute__((noinline)) void scan_plane(const T* __restrict x, int64_t lanes, int64_t img,
                                          const PackGeom& p, int32_t* __restrict sq,
                                          float* __restrict sv, int64_t stage,
                                          int64_t* __restrict cnt, uint32_t lo, uint32_t hi,
                                          int64_t& above_out, uint32_t& max_out) {
  int64_t above = 0;
  uint32_t mx = 0;
  for (int64_t i = 0; i < lanes; ++i)
    for (int64_t ih = 0; ih < p.H; ++ih) {
      const int64_t a = (ih + p.ph) % p.sh, u = (ih + p.ph) / p.sh;
      const T* row = x + i * img + ih * p.W;
      for (int64_t b = 0; b < p.sw; ++b) {
        const int64_t f = a * p.sw + b;
        const int64_t iw0 = ((b - p.pw) % p.sw + p.sw) % p.sw;  // first iw of phase b
        const int32_t qv = static_cast<int32_t>((u * p.Wq + (iw0 + p.pw) / p.sw) * L + i);
        cnt[f] = append_kept(row, iw0, p.W, p.sw, qv, sq + f * stage, sv + f * stage, cnt[f],
                             lo, hi, above, mx);
      }
    }
  above_out += above;
  max_out = std::max(max_out, mx);
}

// A plane scanned as one run of H*W entries per image, each entry's grid position and
// phase from a table (FlatTable).  The per-row scans above paid their setup and a scalar
// tail per row: on the small images of a ResNet's late stages (4x4, 7x7, 14x14) most of a
// row is tail, for stride 2 all of it.  Within each phase the entries land in the per-row
// scans' order (images, rows, columns): a phase's entries are a subsequence of the run.
struct FlatTable {
  std::vector<int32_t> qoff;    // [H*W]: the entry's grid position (u * Wq + v) * L
  std::vector<uint8_t> phase;   // [H*W]: its phase a * sw + b
  std::vector<uint16_t> pmask;  // [ceil(H*W / 16)][phases]: the lanes of a 16-entry block
  int64_t phases = 1;           //   in each phase
};

// The flat scan covers strides up to 2 x 2 (more phases: the per-row scans).
bool flat_scan_applies(const PackGeom& p) { return p.sh <= 2 && p.sw <= 2; }

FlatTable flat_table(const PackGeom& p) {
  FlatTable t;
  const int64_t HW = p.H * p.W, blocks = (HW + 15) / 16;
  t.phases = p.sh * p.sw;
  t.qoff.resize(HW);
  t.phase.resize(HW);
  t.pmask.assign(blocks * t.phases, 0);
  for (int64_t ih = 0; ih < p.H; ++ih)
    for (int64_t iw = 0; iw < p.W; ++iw) {
      const int64_t j = ih * p.W + iw;
      const int64_t a = (ih + p.ph) % p.sh, u = (ih + p.ph) / p.sh;
      const int64_t b = (iw + p.pw) % p.sw, v = (iw + p.pw) / p.sw;
      t.qoff[j] = static_cast<int32_t>((u * p.Wq + v) * L);
      t.phase[j] = static_cast<uint8_t>(a * p.sw + b);
      t.pmask[(j / 16) * t.phases + a * p.sw + b] |= static_cast<uint16_t>(1u << (j % 16));
    }
  return t;
}

// The scalar flat scan.  One phase keeps its count in a register; several index theirs.
template <typename T, bool kMulti>
__attribute__((noinline)) void scan_flat(const T* __restrict x, int64_t lanes, int64_t img,
                                         int64_t HW, const FlatTable& ft,
                                         int32_t* __restrict sq, float* __restrict sv,
                                         int64_t stage, int64_t* __restrict cnt, uint32_t lo,
                                         uint32_t hi, int64_t& above_out, uint32_t& max_out) {
  const int32_t* __restrict qoff = ft.qoff.data();
  const uint8_t* __restrict ph = ft.phase.data();
  int64_t n = cnt[0], above = 0;
  uint32_t mx = 0;
  for (int64_t i = 0; i < lanes; ++i) {
    const T* row = x + i * img;
    const int32_t li = static_cast<int32_t>(i);
    for (int64_t j = 0; j < HW; ++j) {
      const float val = static_cast<float>(row[j]);
      const uint32_t key = magnitude_key(val);
      if constexpr (kMulti) {
        const int64_t f = ph[j], at = f * stage + cnt[f];
        sq[at] = qoff[j] + li;
        sv[at] = val;
        cnt[f] += key >= lo;
      } else {
        sq[n] = qoff[j] + li;
        sv[n] = val;
        n += key >= lo;
      }
      above += key > hi;
      mx = std::max(mx, key);
    }
  }
  if constexpr (!kMulti) cnt[0] = n;
  above_out += above;
  max_out = std::max(max_out, mx);
}

// The same with AVX-512 compress, 16 entries a step: one compress per phase present.
SFL_AVX512 void scan_flat_avx512(const float* __restrict x, int64_t lanes, int64_t img,
                                 int64_t HW, const FlatTable& ft, int32_t* __restrict sq,
                                 float* __restrict sv, int64_t stage, int64_t* __restrict cnt,
                                 uint32_t lo, uint32_t hi, int64_t& above_out,
                                 uint32_t& max_out) {
#if defined(SFL_X86)
  const int32_t* __restrict qoff = ft.qoff.data();
  const uint16_t* __restrict pm = ft.pmask.data();
  const int64_t S = ft.phases;
  int64_t n[4] = {cnt[0], S > 1 ? cnt[1] : 0, S > 2 ? cnt[2] : 0, S > 3 ? cnt[3] : 0};
  int64_t above = 0;
  __m512i mxv = _mm512_setzero_si512();
  const __m512i lov = _mm512_set1_epi32(static_cast<int32_t>(lo));
  const __m512i hiv = _mm512_set1_epi32(static_cast<int32_t>(hi));
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t i = 0; i < lanes; ++i) {
    const float* row = x + i * img;
    const __m512i li = _mm512_set1_epi32(static_cast<int32_t>(i));
    for (int64_t j = 0; j < HW; j += 16) {
      // the last block of an image: only its first HW - j lanes are entries
      const __mmask16 in = HW - j >= 16 ? static_cast<__mmask16>(0xffff)
                                        : static_cast<__mmask16>((1u << (HW - j)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(in, row + j);
      const __m512i key = _mm512_and_si512(_mm512_castps_si512(v), absmask);
      const __mmask16 keep = _mm512_mask_cmpge_epu32_mask(in, key, lov);
      above += __builtin_popcount(_mm512_mask_cmpgt_epu32_mask(in, key, hiv));
      mxv = _mm512_max_epu32(mxv, key);
      const __m512i q = _mm512_add_epi32(_mm512_maskz_loadu_epi32(in, qoff + j), li);
      if (S == 1) {
        _mm512_storeu_ps(sv + n[0], _mm512_maskz_compress_ps(keep, v));
        _mm512_storeu_si512(sq + n[0], _mm512_maskz_compress_epi32(keep, q));
        n[0] += __builtin_popcount(keep);
        continue;
      }
      const uint16_t* bm = pm + (j / 16) * S;
      for (int64_t f = 0; f < S; ++f) {
        const __mmask16 kb = keep & bm[f];
        _mm512_storeu_ps(sv + f * stage + n[f], _mm512_maskz_compress_ps(kb, v));
        _mm512_storeu_si512(sq + f * stage + n[f], _mm512_maskz_compress_epi32(kb, q));
        n[f] += __builtin_popcount(kb);
      }
    }
  }
  for (int64_t f = 0; f < S; ++f) cnt[f] = n[f];
  above_out += above;
  alignas(64) uint32_t m16[16];
  _mm512_store_si512(m16, mxv);
  max_out = std::max(max_out, *std::max_element(m16, m16 + 16));
#else  // never selected off x86
  scan_flat<float, true>(x, lanes, img, HW, ft, sq, sv, stage, cnt, lo, hi, above_out,
                         max_out);
#endif
}

template <typename T>
void pack_plane(const T* x, const PackGeom& p, int64_t nt, int64_t c, uint32_t lo, uint32_t hi,
                bool track, PackChunk& out, int32_t* sq, float* sv, int64_t stage,
                int64_t* counts, const FlatTable* ft) {
  const int64_t lanes = std::min(L, p.N - nt * L), HW = p.H * p.W;
  const int64_t base = (nt * L * p.C + c) * HW, img = p.C * HW;
  const int64_t phases = p.sh * p.sw;
  const int64_t g0 = (nt * p.C + c) * phases;
  int64_t cnt[64];  // per phase (phases <= 64 is checked by the caller)
  for (int64_t f = 0; f < phases; ++f) cnt[f] = 0;
  bool done = false;
  if (ft != nullptr) {  // strides up to 2 x 2 (the caller's choice)
    if constexpr (std::is_same_v<T, float>) {
      if (isa() == Isa::kAvx512) {
        scan_flat_avx512(x + base, lanes, img, HW, *ft, sq, sv, stage, cnt, lo, hi, out.above,
                         out.kmax);
        done = true;
      }
    }
    if (!done)
      (phases == 1 ? scan_flat<T, false> : scan_flat<T, true>)(
          x + base, lanes, img, HW, *ft, sq, sv, stage, cnt, lo, hi, out.above, out.kmax);
    done = true;
  }
  if (!done)  // strides beyond 2: row by row
    scan_plane(x + base, lanes, img, p, sq, sv, stage, cnt, lo, hi, out.above, out.kmax);
  for (int64_t f = 0; f < phases; ++f) {
    const int64_t at = static_cast<int64_t>(out.q.size());
    const int32_t* qd = sq + f * stage;
    const float* vd = sv + f * stage;
    out.q.insert(out.q.end(), qd, qd + cnt[f]);
    out.v.insert(out.v.end(), vd, vd + cnt[f]);
    counts[g0 + f] = cnt[f];
    if (track) {  // the entries in the bracket, branch-free (a third of them, scattered)
      size_t nc = out.cand.size();
      out.cand.resize(nc + cnt[f]);
      for (int64_t t = 0; t < cnt[f]; ++t) {
        const uint32_t key = magnitude_key(vd[t]);
        out.cand[nc] = {key, at + t};
        nc += key <= hi;
      }
      out.cand.resize(nc);
    }
  }
}

// The NCHW index of the entry at `pos` of a chunk (ties at the threshold go to the lower).
// `starts`: every group's first position, G + 1 prefix sums of the counts; the group holding
// pos is found by bisection (a walk from the chunk's first group made ties at a cut
// quadratic: post-ReLU inputs cut at zero have ties in the tens of thousands).
int64_t entry_flat(const PackChunk& ch, int64_t pos, const PackGeom& p, const int64_t* starts) {
  const int64_t ga = ch.t0 * p.sh * p.sw, gb = ch.t1 * p.sh * p.sw;
  const int64_t at = starts[ga] + pos;
  const int64_t g = std::upper_bound(starts + ga, starts + gb + 1, at) - starts - 1;
  const int64_t b = g % p.sw, a = (g / p.sw) % p.sh, c = (g / (p.sw * p.sh)) % p.C;
  const int64_t nt = g / (p.sw * p.sh * p.C);
  const int64_t pix = ch.q[pos] / L, lane = ch.q[pos] % L;
  const int64_t ih = (pix / p.Wq) * p.sh + a - p.ph, iw = (pix % p.Wq) * p.sw + b - p.pw;
  return (((nt * L + lane) * p.C + c) * p.H + ih) * p.W + iw;
}

// k >= 0: exactly the entries torch.ops.sparsefl_C.topk_compress keeps (largest |x|, ties
// to the lower NCHW index); k == -1: every nonzero (no pruning; exact, zeros add nothing).
// Selection without a separate threshold pass: a sample of the keys brackets the k-th
// largest in [lo, hi]; one pass keeps every key >= lo and notes the keys in [lo, hi]; the
// exact k-th key and its tie cutoff come from those candidates, which are then filtered.
// If the bracket misses (rare), the radix select gives the threshold and the pass runs
// again with it: exact either way.

// One pixel per plane at stride 1 (a Linear layer; a conv at 1x1 spatial size): the q of a
// kept input is the pixel's base + its lane.
int64_t pixel_base(const PackGeom& pg) { return (pg.ph * pg.Wq + pg.pw) * L; }

// The one-pixel case (every input of a Linear layer): the general pack's machinery
// (bracket, chunks, candidates) costs more than the selection on a 16-image batch's 1-2K
// entries and buys nothing on large ones (one plane per channel, no parallel scan): keys
// once, the exact cut by radix selection, then a count pass and a fill pass straight into
// the outputs.  Same entries, order and tie rule as the general path.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_one_pixel(const at::Tensor& x, int64_t k,
                                                              const PackGeom& pg,
                                                              const char* op,
                                                              int64_t tau_key = -1) {
  const int64_t n = x.numel(), C = pg.C, G = pg.groups();
  std::vector<uint32_t> keys(n);
  std::vector<float> vals(n);
  dispatch_float_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = x.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) vals[i] = static_cast<float>(xs[i]);
  });
  uint32_t mx = 0;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, keys[i] = magnitude_key(vals[i]));
  TORCH_CHECK_VALUE(mx <= 0x7f800000u, op, ": input contains NaN");
  // keep(i) = key > ck, or key == ck and i <= tie
  uint32_t ck = 0;
  int64_t tie = -1;  // k == -1: the nonzeros
  if (tau_key >= 0) {  // a threshold: keep every key >= tau_key (ties all kept)
    if (tau_key == 0) {
      tie = INT64_MAX;
    } else {
      ck = static_cast<uint32_t>(tau_key - 1);
      tie = -1;
    }
  } else if (k == 0) {
    ck = 0xffffffffu;
  } else if (k == n) {
    tie = INT64_MAX;
  } else if (k > 0) {
    ck = kth_largest(keys.data(), n, k);
    int64_t gt = 0;
    for (const uint32_t kk : keys) gt += kk > ck;
    int64_t need_eq = k - gt;  // the ties kept: the lowest flat indices
    for (int64_t i = 0; i < n && need_eq > 0; ++i)
      if (keys[i] == ck && --need_eq == 0) tie = i;
  }
  // keep(i) as bytes, branch-free (the kept pattern is data: branches mispredict)
  std::vector<uint8_t> km(n);
  for (int64_t i = 0; i < n; ++i)
    km[i] = static_cast<uint8_t>((keys[i] > ck) | ((keys[i] == ck) & (i <= tie)));
  auto ptr = at::empty({G + 1}, x.options().dtype(at::kLong));
  int64_t* pp = ptr.data_ptr<int64_t>();
  std::fill(pp, pp + G + 1, 0);
  for (int64_t r = 0; r < pg.N; ++r) {  // image r: its row of C inputs, groups of its tile
    int64_t* row = pp + (r / L) * C + 1;
    const uint8_t* kr = km.data() + r * C;
    for (int64_t c = 0; c < C; ++c) row[c] += kr[c];
  }
  for (int64_t g = 0; g < G; ++g) pp[g + 1] += pp[g];
  const int64_t kept = pp[G];
  TORCH_CHECK(k < 0 || kept == k, op, ": internal error, kept ", kept, " of k = ", k);
  // the entries in group order, written unconditionally one slot ahead (+1 slack)
  std::vector<int32_t> qs(kept + 1);
  std::vector<float> vs(kept + 1);
  const int32_t base = static_cast<int32_t>(pixel_base(pg));
  int64_t w = 0;
  for (int64_t nt = 0; nt < pg.NT; ++nt) {
    const int64_t lanes = std::min(L, pg.N - nt * L);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t lane = 0; lane < lanes; ++lane) {
        const int64_t i = (nt * L + lane) * C + c;
        qs[w] = base + static_cast<int32_t>(lane);
        vs[w] = vals[i];
        w += km[i];
      }
  }
  auto q = at::empty({kept}, x.options().dtype(at::kInt));
  auto v = at::empty({kept}, x.options().dtype(at::kFloat));
  std::copy(qs.begin(), qs.begin() + kept, q.data_ptr<int32_t>());
  std::copy(vs.begin(), vs.begin() + kept, v.data_ptr<float>());
  return {ptr, q, v};
}

// |x| >= tau as magnitude keys: tau <= 0 keeps everything (key >= 0); otherwise the key of
// the float nearest above tau (tau comes from a float tensor: exact in float in practice).
int64_t tau_key_of(double tau, const char* op) {
  TORCH_CHECK_VALUE(!std::isnan(tau), op, ": tau is NaN");
  if (tau <= 0) return 0;
  float f = static_cast<float>(tau);
  if (static_cast<double>(f) < tau) f = std::nextafter(f, INFINITY);
  return magnitude_key(f);
}

// tau (SparsyFed's first-batch threshold): keep every entry with |x| >= tau instead of
// the k largest (k must then be -1).  No selection at all: the threshold is known, so it
// is the one pass that k == -1 makes, with tau's key as its lower bound.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_act_pack_cpu(
    const at::Tensor& x_in, int64_t k, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding, c10::optional<double> tau) {
  const char* op = "sparsefl.sparse_act_pack";
  check_float(x_in, op, "input");
  const PackGeom pg = pack_geom(x_in.sizes(), kernel, stride, padding, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t G = pg.groups(), n = x.numel(), planes = pg.NT * pg.C;
  TORCH_CHECK_VALUE(k >= -1 && k <= n, op, ": k = ", k, " is outside [-1, ", n, "]");
  int64_t tau_key = -1;  // -1: no threshold
  if (tau.has_value()) {
    TORCH_CHECK_VALUE(k == -1, op, ": give k = -1 with a threshold tau (got k = ", k, ")");
    tau_key = tau_key_of(*tau, op);
  }
  if (pg.H == 1 && pg.W == 1 && pg.sh == 1 && pg.sw == 1)
    return pack_one_pixel(x, k, pg, op, tau_key);
  std::vector<int64_t> counts(G, 0);
  std::vector<PackChunk> chunks;
  std::mutex mu;
  const FlatTable ft = flat_scan_applies(pg) ? flat_table(pg) : FlatTable();

  // One pass over all planes with bracket [lo, hi]; returns the count of keys above hi.
  auto pass = [&](uint32_t lo, uint32_t hi, bool track) {
    chunks.clear();
    dispatch_float_dtype(x.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      const T* xs = x.data_ptr<T>();
      at::parallel_for(0, planes, grain(planes, double(n)), [&](int64_t t0, int64_t t1) {
        PackChunk ch;
        ch.t0 = t0;
        ch.t1 = t1;
        // staging per phase: a plane's entries of one phase, at most this many
        // (+16: the AVX-512 scan stores 16 entries past the count)
        const int64_t stage =
            L * ((pg.H + pg.sh - 1) / pg.sh) * ((pg.W + pg.sw - 1) / pg.sw) + 16;
        std::unique_ptr<int32_t[]> sq(new int32_t[stage * pg.sh * pg.sw]);
        std::unique_ptr<float[]> sv(new float[stage * pg.sh * pg.sw]);
        ch.q.reserve(static_cast<size_t>((t1 - t0) * stage * pg.sh * pg.sw / 16));
        ch.v.reserve(ch.q.capacity());
        for (int64_t t = t0; t < t1; ++t)
          pack_plane(xs, pg, t / pg.C, t % pg.C, lo, hi, track, ch, sq.get(), sv.get(), stage,
                     counts.data(), ft.qoff.empty() ? nullptr : &ft);
        std::lock_guard<std::mutex> g(mu);
        chunks.push_back(std::move(ch));
      });
    });
    std::sort(chunks.begin(), chunks.end(),
              [](const PackChunk& a, const PackChunk& b) { return a.t0 < b.t0; });
    int64_t above = 0;
    uint32_t kmax = 0;
    for (const auto& ch : chunks) {
      above += ch.above;
      kmax = std::max(kmax, ch.kmax);
    }
    TORCH_CHECK_VALUE(kmax <= 0x7f800000u, op, ": input contains NaN");
    return above;
  };

  // Exact threshold by selection on all keys: small inputs (no sample, no fork).
  auto small_cut = [&]() {
    std::vector<uint32_t> keys(n);
    dispatch_float_dtype(x.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      const T* xs = x.data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) keys[i] = magnitude_key(static_cast<float>(xs[i]));
    });
    TORCH_CHECK_VALUE(*std::max_element(keys.begin(), keys.end()) <= 0x7f800000u, op,
                      ": input contains NaN");
    MagnitudeCut c;
    c.key = kth_largest(keys.data(), n, k);
    int64_t gt = 0, eq = 0;
    for (uint32_t kk : keys) gt += kk > c.key, eq += kk == c.key;
    const int64_t need_eq = k - gt;
    c.tie_cutoff = INT64_MAX;
    if (need_eq < eq)
      for (int64_t i = 0, seen = 0; i < n; ++i)
        if (keys[i] == c.key && ++seen == need_eq) {
          c.tie_cutoff = i;
          break;
        }
    return c;
  };

  if (tau_key >= 0) {
    pass(static_cast<uint32_t>(tau_key), 0xffffffffu, false);
  } else if (k == -1 || k == n || k == 0 || n == 0) {
    // nonzeros (key >= 1), everything (key >= 0) or nothing
    pass(k == -1 ? 1u : k == 0 ? 0xffffffffu : 0u, 0xffffffffu, false);
    if (k == 0)
      for (auto& ch : chunks) ch.q.clear(), ch.v.clear();
    if (k == 0) std::fill(counts.begin(), counts.end(), 0);
  } else {
    const bool small = n <= 65536;
    // Bracket from a sample of 16K keys taken as 2048 runs of 8 (within a cache line: few
    // misses), one run at a pseudo-random offset inside each 1/2048 of x (even spacing
    // would hit the same pixel of every plane); the margin allows for neighbours being alike.
    uint32_t lo = 1u, hi = 0u;  // small: no bracket (lo > hi), the exact cut below
    if (!small) {
      constexpr int64_t kRun = 8;
      const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(2048, n / kRun));
      const int64_t gap = n / runs;
      std::vector<uint32_t> sample;
      sample.reserve(runs * kRun);
      dispatch_float_dtype(x.scalar_type(), op, [&](auto tag) {
        using T = decltype(tag);
        const T* xs = x.data_ptr<T>();
        uint64_t h = 0x9e3779b97f4a7c15ull;  // fixed seed: the same sample every call
        for (int64_t r0 = 0; r0 < runs; ++r0) {
          h = h * 6364136223846793005ull + 1442695040888963407ull;
          const int64_t start =
              r0 * gap + static_cast<int64_t>((h >> 33) % std::max<int64_t>(1, gap - kRun + 1));
          for (int64_t i = start, e = std::min(n, start + kRun); i < e; ++i)
            sample.push_back(magnitude_key(static_cast<float>(xs[i])));
        }
      });
      const int64_t m = static_cast<int64_t>(sample.size());
      const double r = static_cast<double>(k) * m / n;
      const double margin = 6.0 * std::sqrt(r + 1.0) + 16.0;
      const int64_t r_hi = static_cast<int64_t>(std::floor(r - margin));
      const int64_t r_lo = static_cast<int64_t>(std::ceil(r + margin));
      auto rank = [&](int64_t i) {  // the i-th largest sample key (0-based)
        return kth_largest(sample.data(), m, i + 1);
      };
      hi = r_hi < 0 ? 0xffffffffu : rank(r_hi);
      lo = r_lo >= m ? 0u : rank(r_lo);
    }
    const int64_t c_gt = small ? 0 : pass(lo, hi, true);
    int64_t nc = 0;
    for (const auto& ch : chunks) nc += static_cast<int64_t>(ch.cand.size());
    MagnitudeCut cut;
    std::vector<int64_t> starts(G + 1, 0);  // the groups' first positions (entry_flat)
    auto count_starts = [&]() {
      for (int64_t g = 0; g < G; ++g) starts[g + 1] = starts[g] + counts[g];
    };
    count_starts();
    if (!small && c_gt < k && k <= c_gt + nc) {
      const int64_t want = k - c_gt;  // the want-th largest candidate is the k-th key
      std::vector<uint32_t> keys;
      keys.reserve(nc);
      for (const auto& ch : chunks)
        for (const auto& c : ch.cand) keys.push_back(c.key);
      // radix selection: serial here (the other threads wait), and nth_element's
      // partitioning mispredicts on these keys
      cut.key = kth_largest(keys.data(), nc, want);
      int64_t gt = 0;
      std::vector<int64_t> ties;
      for (const auto& ch : chunks)
        for (const auto& c : ch.cand) {
          gt += c.key > cut.key;
          if (c.key == cut.key) ties.push_back(entry_flat(ch, c.pos, pg, starts.data()));
        }
      const int64_t need_eq = want - gt;
      if (need_eq >= static_cast<int64_t>(ties.size())) {
        cut.tie_cutoff = INT64_MAX;
      } else {
        std::nth_element(ties.begin(), ties.begin() + (need_eq - 1), ties.end());
        cut.tie_cutoff = ties[need_eq - 1];
      }
    } else {  // small input, or the bracket missed: the exact threshold, then the pass
      cut = small ? small_cut() : magnitude_cut(x, k);
      pass(cut.key, cut.key, true);
      count_starts();
    }
    // Drop the candidates below the cut, in place, fixing the group counts.
    const int64_t nch = static_cast<int64_t>(chunks.size());
    at::parallel_for(0, nch, grain(nch, double(k)), [&](int64_t c0, int64_t c1) {
      for (int64_t ci = c0; ci < c1; ++ci) {
        PackChunk& ch = chunks[ci];
        bool any = false;
        for (const auto& c : ch.cand) {  // branch-free where the outcome is data
          bool keep = c.key > cut.key;
          if (c.key == cut.key)  // rare: ties at the cut
            keep = cut.tie_cutoff == INT64_MAX ||
                   entry_flat(ch, c.pos, pg, starts.data()) <= cut.tie_cutoff;
          ch.q[c.pos] = keep ? ch.q[c.pos] : -1;
          any |= !keep;
        }
        if (!any) continue;
        // walk the chunk's groups in order to recount them (compaction without branches)
        const int64_t ga = ch.t0 * pg.sh * pg.sw, gb = ch.t1 * pg.sh * pg.sw;
        size_t rd = 0, wr = 0;
        for (int64_t g = ga; g < gb; ++g) {
          const size_t w0 = wr;
          for (int64_t e = 0; e < counts[g]; ++e, ++rd) {
            ch.q[wr] = ch.q[rd];
            ch.v[wr] = ch.v[rd];
            wr += ch.q[rd] >= 0;
          }
          counts[g] = static_cast<int64_t>(wr - w0);
        }
        ch.q.resize(wr);
        ch.v.resize(wr);
      }
    });
  }

  auto ptr = at::empty({G + 1}, x.options().dtype(at::kLong));
  int64_t* pp = ptr.data_ptr<int64_t>();
  pp[0] = 0;
  for (int64_t g = 0; g < G; ++g) pp[g + 1] = pp[g] + counts[g];
  TORCH_CHECK(k < 0 || pp[G] == k, op, ": internal error, kept ", pp[G], " of k = ", k);
  auto q = at::empty({pp[G]}, x.options().dtype(at::kInt));
  auto v = at::empty({pp[G]}, x.options().dtype(at::kFloat));
  int32_t* qp = q.data_ptr<int32_t>();
  float* vp = v.data_ptr<float>();
  const int64_t nch = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, nch, grain(nch, double(pp[G])), [&](int64_t c0, int64_t c1) {
    for (int64_t ci = c0; ci < c1; ++ci) {
      const PackChunk& ch = chunks[ci];
      const int64_t at = pp[ch.t0 * pg.sh * pg.sw];
      std::copy(ch.q.begin(), ch.q.end(), qp + at);
      std::copy(ch.v.begin(), ch.v.end(), vp + at);
    }
  });
  return {ptr, q, v};
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

// Weight gradient, per batch tile (tiles in order, so each sum has a fixed order): a task
// is one output channel; its dyp plane (L2-sized) serves all its nonzeros, and the packed
// inputs of the tile (a few % of it) stay in L2 across channels.
struct WgradArgs {
  const float* dyp;        // dyp of one batch tile: [Co][Hq][Wq][16]
  const int64_t* xptr;     // this tile's groups: [C * sh * sw + 1] (a slice)
  const int32_t* xq;
  const float* xv;
  const int64_t* rowptr;   // [Co + 1]
  const int64_t* rgrp;     // group (ci, phase) of each row entry, relative to the tile
  const int64_t* roff;     // dyp offset of each row entry's tap
};

SFL_INLINE float gather_dot(const float* base, const int32_t* q, const float* v, int64_t n) {
  // Four independent partial sums keep the loads in flight.
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t e = 0;
  for (; e + 4 <= n; e += 4) {
    s0 += v[e] * base[q[e]];
    s1 += v[e + 1] * base[q[e + 1]];
    s2 += v[e + 2] * base[q[e + 2]];
    s3 += v[e + 3] * base[q[e + 3]];
  }
  for (; e < n; ++e) s0 += v[e] * base[q[e]];
  return (s0 + s1) + (s2 + s3);
}

// The same dot with hardware gathers: 16 (AVX-512) or 8 (AVX2) positions per instruction.
SFL_AVX512 float gather_dot_avx512(const float* base, const int32_t* q, const float* v,
                                   int64_t n) {
#if defined(SFL_X86)

  if (n < 16) return gather_dot(base, q, v, n);  // a few entries: scalar beats the set-up
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 32 <= n; e += 32) {
    const __m512i i0 = _mm512_loadu_si512(q + e), i1 = _mm512_loadu_si512(q + e + 16);
    a0 = _mm512_fmadd_ps(_mm512_i32gather_ps(i0, base, 4), _mm512_loadu_ps(v + e), a0);
    a1 = _mm512_fmadd_ps(_mm512_i32gather_ps(i1, base, 4), _mm512_loadu_ps(v + e + 16), a1);
  }
  for (; e < n; e += 16) {
    const __mmask16 m = n - e >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - e)) - 1);
    const __m512i i0 = _mm512_maskz_loadu_epi32(m, q + e);
    const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, base, 4);
    a0 = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m, v + e), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
  return gather_dot(base, q, v, n);
#endif
}

SFL_AVX2 float gather_dot_avx2(const float* base, const int32_t* q, const float* v, int64_t n) {
#if defined(SFL_X86)

  if (n < 16) return gather_dot(base, q, v, n);  // a few entries: scalar beats the set-up
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + e));
    const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + e + 8));
    a0 = _mm256_fmadd_ps(_mm256_i32gather_ps(base, i0, 4), _mm256_loadu_ps(v + e), a0);
    a1 = _mm256_fmadd_ps(_mm256_i32gather_ps(base, i1, 4), _mm256_loadu_ps(v + e + 8), a1);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(a0, a1));
  float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  for (; e < n; ++e) s += v[e] * base[q[e]];
  return s;
#else
  return gather_dot(base, q, v, n);
#endif
}

template <float (*Dot)(const float*, const int32_t*, const float*, int64_t)>
SFL_INLINE void wgrad_rows(const WgradArgs& a, int64_t lo, int64_t hi, float* dth) {
  for (int64_t co = lo; co < hi; ++co)
    for (int64_t j = a.rowptr[co]; j < a.rowptr[co + 1]; ++j) {
      const int64_t e0 = a.xptr[a.rgrp[j]], e1 = a.xptr[a.rgrp[j] + 1];
      const float* base = a.dyp + a.roff[j];
      if (e1 - e0 < 16) {  // a few kept inputs (small layers): no call, no vector set-up
        float acc = 0.f;
        for (int64_t e = e0; e < e1; ++e) acc += a.xv[e] * base[a.xq[e]];
        dth[j] += acc;
      } else {
        dth[j] += Dot(base, a.xq + e0, a.xv + e0, e1 - e0);
      }
    }
}

SFL_INLINE float gather_dot_portable(const float* base, const int32_t* q, const float* v,
                                     int64_t n) {
  return gather_dot(base, q, v, n);
}

SFL_AVX512 void wgrad_avx512(const WgradArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_rows<gather_dot_avx512>(a, lo, hi, d);
}
SFL_AVX2 void wgrad_avx2(const WgradArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_rows<gather_dot_avx2>(a, lo, hi, d);
}
void wgrad_portable(const WgradArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_rows<gather_dot_portable>(a, lo, hi, d);
}

// Weight gradient from the pruned input kept dense, in the forward's own pixel tiles
// (xt: [C][Hp][Wp][16] per batch tile, the pruned entries zeroed): for a weight (co, ci, kh,
// kw) of S,
//   dtheta += sum over output pixels (oh, ow) of dyp[co][Ph+oh][Pw+ow] . xt[ci][oh*sh+kh][ow*sw+kw]
// as 16-lane FMAs: no gathers, work |S| * OH * OW per tile whatever the activation density.
// The gather-dots cost |S| * (kept inputs) but a gather of 16 is several times an FMA, so
// once a quarter of the input survives (the early, dense-ish layers of a SparsyFed ResNet,
// or no activation pruning at all) this is the cheaper form, and keeping xt costs no more
// memory than packing it (4 bytes per entry either way).  Four accumulators over the
// columns hide the FMA latency; each weight is summed by one thread in a fixed order.
struct WgradDenseArgs {
  const float* xt;      // one batch tile: [C][Hp][Wp][16]
  const float* dyp;     // one batch tile: [Co][Hq][Wq][16]
  const int64_t* rowptr;
  const int32_t* cols;  // ci * KH * KW + kh * KW + kw, per row entry
  int64_t Hp, Wp, Hq, Wq, Ph, Pw, OH, OW, sh, sw, KH, KW;
};

template <typename V>
SFL_INLINE void wgrad_dense_rows(const WgradDenseArgs& a, int64_t lo, int64_t hi,
                                 float* dth) {
  constexpr int NV = static_cast<int>(L * sizeof(float) / sizeof(V));  // vectors per pixel
  const int64_t KK = a.KH * a.KW, xplane = a.Hp * a.Wp * L, dplane = a.Hq * a.Wq * L;
  for (int64_t co = lo; co < hi; ++co) {
    const float* db = a.dyp + co * dplane + (a.Ph * a.Wq + a.Pw) * L;
    for (int64_t j = a.rowptr[co]; j < a.rowptr[co + 1]; ++j) {
      const int64_t c = a.cols[j], ci = c / KK, kh = (c % KK) / a.KW, kw = c % a.KW;
      const float* xb = a.xt + ci * xplane + (kh * a.Wp + kw) * L;
      V acc[4][NV] = {};
      for (int64_t oh = 0; oh < a.OH; ++oh) {
        const float* dr = db + oh * a.Wq * L;
        const float* xr = xb + oh * a.sh * a.Wp * L;
        int64_t ow = 0;
        for (; ow + 4 <= a.OW; ow += 4)
          for (int u = 0; u < 4; ++u)
            for (int h = 0; h < NV; ++h) {
              const int64_t o = ow + u;
              acc[u][h] += vload<V>(dr + o * L + h * (L / NV)) *
                           vload<V>(xr + o * a.sw * L + h * (L / NV));
            }
        for (; ow < a.OW; ++ow)
          for (int h = 0; h < NV; ++h)
            acc[0][h] += vload<V>(dr + ow * L + h * (L / NV)) *
                         vload<V>(xr + ow * a.sw * L + h * (L / NV));
      }
      V sum = (acc[0][0] + acc[1][0]) + (acc[2][0] + acc[3][0]);
      for (int h = 1; h < NV; ++h) sum += (acc[0][h] + acc[1][h]) + (acc[2][h] + acc[3][h]);
      alignas(64) float lanes[sizeof(V) / sizeof(float)];
      vstore(lanes, sum);
      float t = 0.f;
      for (size_t l = 0; l < sizeof(V) / sizeof(float); ++l) t += lanes[l];
      dth[j] += t;
    }
  }
}

SFL_AVX512 void wgrad_dense_avx512(const WgradDenseArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_dense_rows<v16>(a, lo, hi, d);
}
SFL_AVX2 void wgrad_dense_avx2(const WgradDenseArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_dense_rows<v8>(a, lo, hi, d);
}
void wgrad_dense_portable(const WgradDenseArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_dense_rows<v4>(a, lo, hi, d);
}

// Weight gradient of a one-pixel 1x1 layer (a Linear layer) for one batch tile, dense then
// read on the support: rows[co][c] = sum over lanes of dyp[co][lane] * xt[c][lane], built
// as axpys over the input channels, lanes in order.  With a small batch each weight meets a
// few kept inputs, and one gather-dot per weight is all overhead; this is Co * 16 * C
// vectorised FMAs.  xt: the tile's pruned input, dense, [16][C] (lane-major).
template <typename Dummy = void>
SFL_INLINE void rows_dense(const float* __restrict dyp, const float* __restrict xt, int64_t Co,
                           int64_t C, int64_t lanes, float* __restrict rows) {
  for (int64_t co = 0; co < Co; ++co) {
    float* __restrict r = rows + co * C;
    for (int64_t c = 0; c < C; ++c) r[c] = 0.0f;
    for (int64_t l = 0; l < lanes; ++l) {
      const float a = dyp[co * L + l];
      const float* __restrict xr = xt + l * C;
      for (int64_t c = 0; c < C; ++c) r[c] += a * xr[c];
    }
  }
}
SFL_AVX512 void rows_dense_avx512(const float* dyp, const float* xt, int64_t Co, int64_t C,
                                  int64_t lanes, float* rows) {
  rows_dense(dyp, xt, Co, C, lanes, rows);
}
SFL_AVX2 void rows_dense_avx2(const float* dyp, const float* xt, int64_t Co, int64_t C,
                              int64_t lanes, float* rows) {
  rows_dense(dyp, xt, Co, C, lanes, rows);
}
void rows_dense_portable(const float* dyp, const float* xt, int64_t Co, int64_t C,
                         int64_t lanes, float* rows) {
  rows_dense(dyp, xt, Co, C, lanes, rows);
}

// The packed activation matches the geometry; `deep`: every position is checked too (the
// public op; the fused layer op made the pack itself).
void check_pack(const Geom& g, const at::Tensor& xptr, const at::Tensor& xq,
                const at::Tensor& xv, bool deep, const char* op) {
  const int64_t S = g.sh * g.sw;
  check_index(xptr, at::kLong, op, "activation pointer");
  check_index(xq, at::kInt, op, "activation positions");
  TORCH_CHECK_TYPE(xv.scalar_type() == at::kFloat && xv.dim() == 1 && xv.device().is_cpu(),
                   op, ": activation values must be a 1-D float32 CPU tensor");
  const int64_t G = g.NT * g.C * S;
  TORCH_CHECK_VALUE(xptr.numel() == G + 1 && xq.numel() == xv.numel(), op,
                    ": packed activation does not match the input shape");
  const int64_t* xp = xptr.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(xp[0] == 0 && xp[G] == xq.numel(), op,
                    ": activation pointer must run from 0 to the entry count");
  if (!deep) return;
  for (int64_t i = 0; i < G; ++i)
    TORCH_CHECK_VALUE(xp[i] <= xp[i + 1], op, ": activation pointer is not ascending");
  const int32_t* qq = xq.data_ptr<int32_t>();
  const int64_t Wq = g.Wq();
  const FastDiv fWq(Wq);
  bool ok = true;
  for (int64_t gi = 0; gi < G; ++gi) {  // (u, v) must be a pixel of the group's phase
    const int64_t b = gi % g.sw, a = (gi / g.sw) % g.sh;
    for (int64_t e = xp[gi]; e < xp[gi + 1]; ++e) {
      const int64_t pix = static_cast<uint32_t>(qq[e]) / L, u = fWq.div(pix), v = pix - u * Wq;
      const int64_t ih = u * g.sh + a - g.ph, iw = v * g.sw + b - g.pw;
      ok &= (qq[e] >= 0) & (ih >= 0) & (ih < g.H) & (iw >= 0) & (iw < g.W);
    }
  }
  TORCH_CHECK_VALUE(ok, op, ": activation positions out of range");
}

// dx and domega with the support's plan (checks done by the caller).
// xt_dense (the fused layer only): the pruned input kept as the forward's pixel tiles
// instead of a pack (xptr/xq/xv are not read then); cols: the support rows' column indices.
std::tuple<at::Tensor, at::Tensor> backward_planned(
    const at::Tensor& dy, const at::Tensor& xptr, const at::Tensor& xq, const at::Tensor& xv,
    const at::Tensor& omega, double beta, const int64_t* rp, const Plan& P, const Geom& g,
    at::IntArrayRef x_shape, bool need_dx, bool need_dw, const char* op,
    const float* xt_dense = nullptr, const int32_t* cols = nullptr) {
  at::Tensor dx, dw;
  if (g.N == 0 || (!need_dx && !need_dw)) {
    if (need_dx) dx = at::zeros(x_shape, dy.options());
    if (need_dw) dw = at::zeros_like(omega);
    return {dx, dw};
  }
  const int64_t nnz = static_cast<int64_t>(P.widx.size());
  const int64_t S = g.sh * g.sw;
  const int64_t Hq = g.Hq(), Wq = g.Wq(), Ph = g.Ph(), Pw = g.Pw();
  // dy in pixel tiles with Ph, Pw leading zeros (shared by both gradients).
  auto dyp = at::empty({g.NT * g.Co * Hq * Wq * L}, dy.options().dtype(at::kFloat));
  dispatch_float_dtype(dy.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    to_tiles<T>(dy.data_ptr<T>(), g.N, g.Co, g.OH, g.OW, dyp.data_ptr<float>(), Hq, Wq, Ph, Pw,
                1, 1);
  });
  const float bf = static_cast<float>(beta);
  if (need_dx) {
    std::vector<float> pval(nnz);
    dispatch_float_dtype(omega.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      thetas(omega.data_ptr<T>(), P.pidx.data(), nnz, bf, pval.data());
    });
    // Every dx pixel belongs to exactly one phase; a phase without taps writes zeros.
    dx = at::empty(x_shape, dy.options());
    // phase (a_, b_) as a convolution of dyp; false if it has no dx pixel
    auto phase = [&](int64_t a_, int64_t b_, ConvArgs& a) {
      const int64_t u0 = a_ >= g.ph ? 0 : (g.ph - a_ + g.sh - 1) / g.sh;
      const int64_t v0 = b_ >= g.pw ? 0 : (g.pw - b_ + g.sw - 1) / g.sw;
      const int64_t ih0 = u0 * g.sh + a_ - g.ph, iw0 = v0 * g.sw + b_ - g.pw;
      if (ih0 >= g.H || iw0 >= g.W) return false;
      a = ConvArgs{};
      a.in = dyp.data_ptr<float>();
      a.in_tile = g.Co * Hq * Wq * L;
      a.in_row = Wq * L;
      a.iy0 = u0; a.ix0 = v0; a.sy = 1; a.sx = 1;
      a.ptr = P.pptr.data() + (a_ * g.sw + b_) * (g.C + 1);
      a.off = P.poff.data(); a.val = pval.data(); a.bias = nullptr;
      a.Cout = g.C; a.N = g.N; a.NT = g.NT;
      a.GH = (g.H - 1 - ih0) / g.sh + 1; a.GW = (g.W - 1 - iw0) / g.sw + 1;
      a.OH = g.H; a.OW = g.W;
      a.oy0 = ih0; a.ox0 = iw0; a.osy = g.sh; a.osx = g.sw;
      a.rows_per_task = std::max<int64_t>(1, (8 + a.GW - 1) / a.GW);
      a.out = dx.data_ptr();
      return true;
    };
    const bool float_out = dy.scalar_type() == at::kFloat;
    for (int64_t a_ = 0; a_ < g.sh; ++a_) {
      if (g.sw == 2) {  // both column phases in one pass when they tile the rows
        ConvArgs p0{}, p1{};
        if (phase(a_, 0, p0) && phase(a_, 1, p1) &&
            (p0.ox0 == 0 ? run_conv_pair(p0, p1, float_out) : run_conv_pair(p1, p0, float_out)))
          continue;
      }
      for (int64_t b_ = 0; b_ < g.sw; ++b_) {
        ConvArgs a{};
        if (!phase(a_, b_, a)) continue;
        dispatch_float_dtype(dy.scalar_type(), op, [&](auto tag) { run_conv<decltype(tag)>(a); });
      }
    }
  }
  if (need_dw) {
    dw = at::zeros_like(omega);
    std::vector<float> dth(nnz, 0.0f);
    auto fn = isa() == Isa::kAvx512 ? &wgrad_avx512 : isa() == Isa::kAvx2 ? &wgrad_avx2
                                                                          : &wgrad_portable;
    // A one-pixel 1x1 layer where the gather-dots would be mostly overhead (a few kept
    // inputs per weight): the tile's dense rows, read on the support.
    const bool one_pixel = g.H == 1 && g.W == 1 && g.KH == 1 && g.KW == 1 && S == 1;
    const double kept_per_group = xt_dense ? 0.0 : xq.numel() / double(g.NT * g.C);
    const bool dense_rows = !xt_dense && one_pixel && double(g.Co) * L * ((g.C + 15) / 16) <
                                                          double(nnz) * (kept_per_group + 4.0);
    std::vector<float> rows, xt;
    if (dense_rows) rows.resize(g.Co * g.C), xt.resize(L * g.C);
    auto rows_fn = isa() == Isa::kAvx512 ? &rows_dense_avx512
                 : isa() == Isa::kAvx2   ? &rows_dense_avx2
                                         : &rows_dense_portable;
    const int64_t qbase = (g.ph * Wq + g.pw) * L;  // the pixel's position (pixel_base)
    auto dense_fn = isa() == Isa::kAvx512 ? &wgrad_dense_avx512
                  : isa() == Isa::kAvx2   ? &wgrad_dense_avx2
                                          : &wgrad_dense_portable;
    for (int64_t nt = 0; nt < g.NT; ++nt) {
      if (xt_dense != nullptr) {
        WgradDenseArgs a{};
        a.xt = xt_dense + nt * g.C * g.Hp() * g.Wp() * L;
        a.dyp = dyp.data_ptr<float>() + nt * g.Co * Hq * Wq * L;
        a.rowptr = rp; a.cols = cols;
        a.Hp = g.Hp(); a.Wp = g.Wp(); a.Hq = Hq; a.Wq = Wq; a.Ph = Ph; a.Pw = Pw;
        a.OH = g.OH; a.OW = g.OW; a.sh = g.sh; a.sw = g.sw; a.KH = g.KH; a.KW = g.KW;
        const double work = double(nnz) * g.OH * g.OW * L;
        at::parallel_for(0, g.Co, grain(g.Co, work), [&](int64_t lo, int64_t hi) {
          dense_fn(a, lo, hi, dth.data());
        });
        continue;
      }
      if (dense_rows) {
        std::fill(xt.begin(), xt.end(), 0.0f);
        const int64_t* xp = xptr.data_ptr<int64_t>() + nt * g.C;
        const int32_t* qq = xq.data_ptr<int32_t>();
        const float* vv = xv.data_ptr<float>();
        for (int64_t c = 0; c < g.C; ++c)
          for (int64_t e = xp[c]; e < xp[c + 1]; ++e) xt[(qq[e] - qbase) * g.C + c] = vv[e];
        rows_fn(dyp.data_ptr<float>() + nt * g.Co * L, xt.data(), g.Co, g.C,
                std::min(L, g.N - nt * L), rows.data());
        for (int64_t j = 0; j < nnz; ++j) dth[j] += rows[P.widx[j]];
        continue;
      }
      WgradArgs a{};
      a.dyp = dyp.data_ptr<float>() + nt * g.Co * Hq * Wq * L;
      a.xptr = xptr.data_ptr<int64_t>() + nt * g.C * S;
      a.xq = xq.data_ptr<int32_t>(); a.xv = xv.data_ptr<float>();
      a.rowptr = rp; a.rgrp = P.rgrp.data(); a.roff = P.roff.data();
      const double work = double(nnz) * (xq.numel() / double(g.NT * g.C * S) + 1);
      at::parallel_for(0, g.Co, grain(g.Co, work), [&](int64_t lo, int64_t hi) {
        fn(a, lo, hi, dth.data());
      });
    }
    std::vector<float> slope(nnz);
    dispatch_float_dtype(omega.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      thetas(omega.data_ptr<T>(), P.widx.data(), nnz, bf, slope.data(), /*slope=*/true);
      T* d = dw.data_ptr<T>();
      for (int64_t j = 0; j < nnz; ++j) d[P.widx[j]] = static_cast<T>(dth[j] * slope[j]);
    });
  }
  return {dx, dw};
}

void check_grad_output(const at::Tensor& dy, const Geom& g, const char* op) {
  TORCH_CHECK_VALUE(dy.dim() == 4 && dy.size(0) == g.N && dy.size(1) == g.Co &&
                        dy.size(2) == g.OH && dy.size(3) == g.OW,
                    op, ": grad_output has shape ", dy.sizes(), ", expected [", g.N, ", ",
                    g.Co, ", ", g.OH, ", ", g.OW, "]");
}

std::tuple<at::Tensor, at::Tensor> sparse_conv_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& xptr, const at::Tensor& xq, const at::Tensor& xv,
    const at::Tensor& omega_in, double beta, const at::Tensor& rowptr, const at::Tensor& cols,
    const at::Tensor& cptr, const at::Tensor& cent, at::IntArrayRef x_shape,
    at::IntArrayRef stride, at::IntArrayRef padding, bool need_dx, bool need_dw) {
  const char* op = "sparsefl.sparse_conv_backward";
  check_operands(dy_in, "grad_output", omega_in, beta, op);
  const Geom g = make_geom(x_shape, omega_in, stride, padding, op);
  check_grad_output(dy_in, g, op);
  check_csr(rowptr, cols, g.Co, g.K(), op, "support rows");
  check_csr(cptr, cent, g.C, g.Co * g.K(), op, "support columns");
  TORCH_CHECK_VALUE(cols.numel() == cent.numel(), op,
                    ": support rows and columns hold different entry counts");
  check_columns(g, cptr.data_ptr<int64_t>(), cent.data_ptr<int32_t>(), op);
  if (need_dw) check_pack(g, xptr, xq, xv, /*deep=*/true, op);
  Plan P;
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  plan_rows(g, rp, cols.data_ptr<int32_t>(), P, /*fwd=*/false, /*wgrad=*/need_dw);
  if (need_dx) plan_columns(g, cptr.data_ptr<int64_t>(), cent.data_ptr<int32_t>(), P);
  return backward_planned(dy_in.contiguous(), xptr, xq, xv, omega_in.contiguous(), beta, rp, P,
                          g, x_shape, need_dx, need_dw, op);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The whole layer as one autograd op (torch.ops.sparsefl_C.sparse_layer)
// ---------------------------------------------------------------------------------------
// Forward = the planned forward (+ the activation pack when the weight needs a gradient);
// the backward node is C++ (the planned backward and the bias sum).  One dispatcher call per
// direction, no Python in the backward, and the index plans built once per support
// (SparsePlan): for a small layer (a 16-image Linear) framework overhead and set-up cost
// more than the arithmetic.  Linear layers pass a 2-D weight; x is then (..., C).

// A packed support and the layer geometry, checked once; its index plans are built on first
// use per input size and kept (sparsefl.nn.set_compute makes one per layer and round).
struct SparsePlan : torch::CustomClassHolder {
  at::Tensor rowptr, cols, cptr, cent;
  std::vector<int64_t> wshape, stride, padding;  // weight as (Co, C, KH, KW)
  std::mutex mu;
  std::vector<std::pair<std::pair<int64_t, int64_t>, std::shared_ptr<const Plan>>> plans;

  SparsePlan(at::Tensor rowptr_, at::Tensor cols_, at::Tensor cptr_, at::Tensor cent_,
             std::vector<int64_t> wshape_, std::vector<int64_t> stride_,
             std::vector<int64_t> padding_)
      : rowptr(rowptr_.contiguous()), cols(cols_.contiguous()), cptr(cptr_.contiguous()),
        cent(cent_.contiguous()), wshape(std::move(wshape_)), stride(std::move(stride_)),
        padding(std::move(padding_)) {
    const char* op = "sparsefl.SparsePlan";
    TORCH_CHECK_VALUE(wshape.size() == 4 && stride.size() == 2 && padding.size() == 2, op,
                      ": weight shape needs 4 entries, stride and padding 2");
    for (const int64_t v : wshape) TORCH_CHECK_VALUE(v >= 1, op, ": empty weight dimension");
    const int64_t Co = wshape[0], C = wshape[1], K = C * wshape[2] * wshape[3];
    check_csr(rowptr, cols, Co, K, op, "support rows");
    check_csr(cptr, cent, C, Co * K, op, "support columns");
    TORCH_CHECK_VALUE(cols.numel() == cent.numel(), op,
                      ": support rows and columns hold different entry counts");
    Geom g{};
    g.C = C; g.Co = Co; g.KH = wshape[2]; g.KW = wshape[3];
    check_columns(g, cptr.data_ptr<int64_t>(), cent.data_ptr<int32_t>(), op);
  }

  void check_weight(const at::Tensor& w4, const char* op) const {
    TORCH_CHECK_VALUE(w4.sizes() == at::IntArrayRef(wshape), op, ": the weight has shape ",
                      w4.sizes(), " but the support was packed for ", at::IntArrayRef(wshape),
                      ": call set_compute(model, ...) again");
  }

  // Called when the last strong reference goes: the registry forgets the plan.
  void release_resources() override;

  std::shared_ptr<const Plan> get(const Geom& g) {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& [hw, plan] : plans)
      if (hw.first == g.H && hw.second == g.W) return plan;
    auto plan = std::make_shared<Plan>();
    plan_rows(g, rowptr.data_ptr<int64_t>(), cols.data_ptr<int32_t>(), *plan, true, true);
    plan_columns(g, cptr.data_ptr<int64_t>(), cent.data_ptr<int32_t>(), *plan);
    plans.emplace_back(std::make_pair(g.H, g.W), plan);
    return plan;
  }
  int64_t id = 0;  // its handle in the registry, once handed out
};

// Plans by integer handle.  The fused op takes the handle, not the object: a TorchScript
// object argument costs a C++ exception per call in torch's Python argument parsing (its
// __torch_function__ lookup), ~10 us, more than a small layer's arithmetic.  Weak
// references: the Python object owns the plan; a freed plan's handle is refused.
std::mutex g_plans_mu;
std::unordered_map<int64_t, c10::weak_intrusive_ptr<SparsePlan>> g_plans;
int64_t g_next_plan = 1;

void SparsePlan::release_resources() {
  std::lock_guard<std::mutex> lock(g_plans_mu);
  if (id != 0) g_plans.erase(id);
}

int64_t plan_handle(const c10::intrusive_ptr<SparsePlan>& self) {
  std::lock_guard<std::mutex> lock(g_plans_mu);
  if (self->id == 0) {
    self->id = g_next_plan++;
    g_plans.emplace(self->id, c10::weak_intrusive_ptr<SparsePlan>(self));
  }
  return self->id;
}

c10::intrusive_ptr<SparsePlan> plan_of(int64_t id) {
  std::lock_guard<std::mutex> lock(g_plans_mu);
  const auto it = g_plans.find(id);
  TORCH_CHECK_VALUE(it != g_plans.end(), "sparsefl.sparse_layer: no sparse plan with handle ",
                    id, " (freed, or not from SparsePlan.handle())");
  auto plan = it->second.lock();
  TORCH_CHECK_VALUE(plan.defined(), "sparsefl.sparse_layer: sparse plan ", id, " was freed");
  return plan;
}

namespace {

std::atomic<int64_t> g_act_prune_ns{0};

// A layer's input and weight as the 4-D convolution the kernels compute: a Linear layer
// (2-D weight, input (..., C)) is the 1x1 case.
struct LayerView {
  bool linear;
  int64_t cout, cin;
  at::Tensor x4, w4;
  LayerView(const at::Tensor& x, const at::Tensor& omega) {
    linear = omega.dim() == 2;
    TORCH_CHECK_VALUE(linear || omega.dim() == 4, "sparsefl.sparse_layer: weight must be 2-D "
                      "(Linear) or 4-D (Conv2d)");
    cout = omega.size(0);
    cin = omega.size(1);
    TORCH_CHECK_VALUE(!linear || (x.dim() >= 1 && x.size(-1) == cin), "sparsefl.sparse_layer: "
                      "input's last dimension must be ", cin);
    x4 = linear ? x.reshape({-1, cin, 1, 1}) : x;
    w4 = linear ? omega.view({cout, cin, 1, 1}) : omega;
  }
  // y (N', Co, 1, 1) back to (..., Co) for a Linear layer
  at::Tensor output(const at::Tensor& y, const at::Tensor& x) const {
    if (!linear) return y;
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = cout;
    return y.view(shape);
  }
};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
constexpr const char* kLayerOp = "sparsefl.sparse_layer";

// The forward of the fused op, shared by its autograd and plain (inference) kernels: checks
// that no nonzero weight lies outside the support (the weights were replaced since
// set_compute), then computes y on the support.
at::Tensor layer_forward(const LayerView& lv, const at::Tensor& omega, double beta,
                         const c10::optional<at::Tensor>& bias, SparsePlan& sp, Geom& g,
                         std::shared_ptr<const Plan>& P, at::Tensor* tiles = nullptr) {
  check_operands(lv.x4, "input", lv.w4, beta, kLayerOp);
  sp.check_weight(lv.w4, kLayerOp);
  g = make_geom(lv.x4.sizes(), lv.w4, sp.stride, sp.padding, kLayerOp);
  P = sp.get(g);
  const at::Tensor x = lv.x4.contiguous(), w = lv.w4.contiguous();
  int64_t escaped = 0;
  dispatch_float_dtype(w.scalar_type(), kLayerOp, [&](auto tag) {
    using T = decltype(tag);
    escaped = escapes_of(w.data_ptr<T>(), w.numel(), *P);
  });
  TORCH_CHECK(escaped == 0, "sparsefl: ", escaped, " nonzero weights of a sparse layer lie "
              "outside the support packed by set_compute(); the weights changed since (a new "
              "model was loaded?): call set_compute(model, ...) again");
  return forward_planned(x, w, beta, sp.rowptr.data_ptr<int64_t>(), *P,
                         float_bias(bias, g, kLayerOp), g, kLayerOp, tiles);
}

// Activation pruning on the forward's input tiles, in place: every entry with |x| below
// the threshold becomes 0 (threshold key 0: nothing to prune, 1: the nonzeros); returns
// how many nonzeros stay.  The kept set is the pack's (|x| >= tau, or the nonzeros), so
// the weight gradient is the same sum whichever form keeps it.  NaN input is refused as
// the pack refuses it.
typedef int32_t iv16 __attribute__((vector_size(64)));
typedef int32_t iv8 __attribute__((vector_size(32)));
typedef int32_t iv4 __attribute__((vector_size(16)));
template <typename V> struct IntVec;  // the int32 vector of V's width
template <> struct IntVec<v16> { using type = iv16; };
template <> struct IntVec<v8> { using type = iv8; };
template <> struct IntVec<v4> { using type = iv4; };

template <typename V>
SFL_INLINE int64_t prune_run(float* __restrict d, int64_t n, int32_t tk, bool& nan) {
  // masks by sign shifts, not vector compares: GCC lowers a generic vector compare in this
  // always-inline body for the default target (per-lane scalar compares), arithmetic
  // stays vector.  Keys lie in [0, 2^31), so the differences below cannot overflow.
  constexpr int64_t W = sizeof(V) / sizeof(float);
  using I = typename IntVec<V>::type;
  const I absmask = I{} + 0x7fffffff, tv = I{} + tk, inf = I{} + 0x7f800000;
  I cnt{}, bad{};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    I bits;
    std::memcpy(&bits, d + i, sizeof bits);
    const I key = bits & absmask;
    const I keep = (tv - key - 1) >> 31;  // all ones where key >= tk
    const I out = bits & keep;
    std::memcpy(d + i, &out, sizeof out);
    cnt -= keep & ((I{} - key) >> 31);  // +1 per kept nonzero
    bad |= (inf - key) >> 31;           // NaN: key > 0x7f800000
  }
  int64_t c = 0;
  bool b = false;
  for (int64_t l = 0; l < W; ++l) c += cnt[l], b |= bad[l] != 0;
  for (; i < n; ++i) {  // the tail
    const uint32_t key = magnitude_key(d[i]);
    const bool keep = key >= static_cast<uint32_t>(tk);
    d[i] = keep ? d[i] : 0.0f;
    c += keep && key != 0;
    b |= key > 0x7f800000u;
  }
  nan = nan || b;
  return c;
}
SFL_AVX512 int64_t prune_run_avx512(float* d, int64_t n, int32_t tk, bool& nan) {
  return prune_run<v16>(d, n, tk, nan);
}
SFL_AVX2 int64_t prune_run_avx2(float* d, int64_t n, int32_t tk, bool& nan) {
  return prune_run<v8>(d, n, tk, nan);
}
int64_t prune_run_portable(float* d, int64_t n, int32_t tk, bool& nan) {
  return prune_run<v4>(d, n, tk, nan);
}

int64_t prune_tiles(at::Tensor& xt, int64_t tau_key) {
  float* d = xt.data_ptr<float>();
  const int64_t n = xt.numel();
  const int32_t tk = static_cast<int32_t>(tau_key);  // <= 0x7f800000: a signed compare
  auto fn = isa() == Isa::kAvx512 ? &prune_run_avx512
          : isa() == Isa::kAvx2   ? &prune_run_avx2
                                  : &prune_run_portable;
  constexpr int64_t kBlock = 1 << 14;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> kept(blocks, 0);
  std::vector<char> nan(blocks, 0);
  at::parallel_for(0, blocks, grain(blocks, double(n)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      bool bad = false;
      kept[b] = fn(d + b * kBlock, std::min(kBlock, n - b * kBlock), tk, bad);
      nan[b] = bad;
    }
  });
  TORCH_CHECK_VALUE(std::find(nan.begin(), nan.end(), 1) == nan.end(),
                    "sparsefl.sparse_act_pack: input contains NaN");
  int64_t total = 0;
  for (const int64_t c : kept) total += c;
  return total;
}

// The activation pack, its time added to act_prune_ns (the engine's act_prune phase).
std::tuple<at::Tensor, at::Tensor, at::Tensor> timed_pack(const at::Tensor& x4, int64_t k,
                                                          at::IntArrayRef kernel,
                                                          const SparsePlan& plan,
                                                          c10::optional<double> tau = {}) {
  const auto t0 = std::chrono::steady_clock::now();
  auto pack = sparse_act_pack_cpu(x4, k, kernel, plan.stride, plan.padding, tau);
  g_act_prune_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - t0).count();
  return pack;
}

struct SparseLayerFn : public torch::autograd::Function<SparseLayerFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& omega,
                            const c10::optional<at::Tensor>& bias, double beta,
                            const c10::intrusive_ptr<SparsePlan>& plan, int64_t k, bool train,
                            c10::optional<double> tau) {
    const LayerView lv(x, omega);
    Geom g{};
    std::shared_ptr<const Plan> P;
    const bool grad_w = train && omega.requires_grad();
    // A threshold (or no pruning) on a spatial input: the kept input may stay in the
    // forward's tiles (see wgrad_dense_rows) when a quarter or more of it survives.
    const bool may_keep_tiles = grad_w && k == -1 && lv.x4.size(2) * lv.x4.size(3) > 1;
    at::Tensor xt;
    at::Tensor y = layer_forward(lv, omega, beta, bias, *plan, g, P,
                                 may_keep_tiles ? &xt : nullptr);
    std::vector<at::Tensor> saved{omega};
    bool dense_x = false;
    if (may_keep_tiles && xt.defined()) {
      const auto t0 = std::chrono::steady_clock::now();
      const int64_t tk = tau.has_value() ? tau_key_of(*tau, "sparsefl.sparse_layer") : 1;
      const int64_t kept = prune_tiles(xt, tk);
      dense_x = 4 * kept >= lv.x4.numel();
      if (dense_x) saved.push_back(xt);
      g_act_prune_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::steady_clock::now() - t0).count();
    }
    if (grad_w && !dense_x) {
      auto [p, q, v] = timed_pack(lv.x4, k, {g.KH, g.KW}, *plan, tau);
      saved.push_back(p);
      saved.push_back(q);
      saved.push_back(v);
    }
    ctx->saved_data["dense_x"] = dense_x;
    ctx->save_for_backward(saved);
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["plan"] = plan;
    ctx->saved_data["x_shape"] = c10::IValue(x.sizes().vec());
    ctx->saved_data["x4_shape"] = c10::IValue(lv.x4.sizes().vec());
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return lv.output(y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& omega = saved[0];
    const bool linear = omega.dim() == 2;
    const int64_t cout = omega.size(0), cin = omega.size(1);
    const auto x_shape = ctx->saved_data["x_shape"].toIntVector();
    const auto x4_shape = ctx->saved_data["x4_shape"].toIntVector();
    const auto plan = ctx->saved_data["plan"].toCustomClass<SparsePlan>();
    const double beta = ctx->saved_data["beta"].toDouble();
    const at::Tensor w4 = (linear ? omega.view({cout, cin, 1, 1}) : omega).contiguous();
    const at::Tensor dy = grads[0];
    const at::Tensor dy4 = (linear ? dy.reshape({-1, cout, 1, 1}) : dy).contiguous();
    const bool need_dx = ctx->needs_input_grad(0);
    const bool dense_x = ctx->saved_data["dense_x"].toBool();
    const bool need_dw = ctx->needs_input_grad(1) && saved.size() == (dense_x ? 2 : 4);
    const char* op = "sparsefl.sparse_layer (backward)";
    check_operands(dy4, "grad_output", w4, beta, op);
    const Geom g = make_geom(x4_shape, w4, plan->stride, plan->padding, op);
    check_grad_output(dy4, g, op);
    at::Tensor ptr, q, v;
    const float* xt = nullptr;
    if (dense_x && saved.size() == 2) {
      TORCH_CHECK(saved[1].numel() == g.NT * g.C * g.Hp() * g.Wp() * L, op,
                  ": internal error, kept input tiles of the wrong size");
      xt = saved[1].data_ptr<float>();  // no pack: ptr, q, v stay undefined
    } else if (saved.size() == 4) {
      ptr = saved[1], q = saved[2], v = saved[3];
      check_pack(g, ptr, q, v, /*deep=*/false, op);
    }
    at::Tensor dx, dw, db;
    if (need_dx || need_dw) {
      std::tie(dx, dw) = backward_planned(dy4, ptr, q, v, w4, beta,
                                          plan->rowptr.data_ptr<int64_t>(), *plan->get(g), g,
                                          x4_shape, need_dx, need_dw, op, xt,
                                          plan->cols.data_ptr<int32_t>());
      if (need_dx) dx = dx.view(x_shape);
      if (need_dw) dw = dw.view(omega.sizes());
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2))
      db = dy4.sum({0, 2, 3});
    return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor sparse_layer_autograd(const at::Tensor& x, const at::Tensor& omega,
                                 const c10::optional<at::Tensor>& bias, double beta,
                                 int64_t plan, int64_t k, bool train,
                                 c10::optional<double> tau) {
  return SparseLayerFn::apply(x, omega, bias, beta, plan_of(plan), k, train, tau);
}

// Without autograd (inference mode): the forward alone.
at::Tensor sparse_layer_cpu(const at::Tensor& x, const at::Tensor& omega,
                            const c10::optional<at::Tensor>& bias, double beta,
                            int64_t plan, int64_t k, bool train, c10::optional<double> tau) {
  (void)k, (void)train, (void)tau;
  const LayerView lv(x, omega);
  Geom g{};
  std::shared_ptr<const Plan> P;
  return lv.output(layer_forward(lv, omega, beta, bias, *plan_of(plan), g, P), x);
}

// ---------------------------------------------------------------------------------------
// A chain of sparse Linear layers with ReLU between them as one op
// (torch.ops.sparsefl_C.sparse_chain: an MLP's whole forward, one C++ backward node)
// ---------------------------------------------------------------------------------------
// For a 16-image MLP the arithmetic of a layer is a few microseconds and the framework's
// fixed cost per call (dispatch, an autograd node, the Python module) is as large: one op
// for the chain pays it once instead of once per layer and per ReLU.  Layer l computes
// y_l = layer(h_l) as sparse_layer does (activation pack of h_l when training); h_{l+1} =
// relu(y_l).  Saved per layer: omega, its pack; per ReLU: its output (the mask).
constexpr const char* kChainOp = "sparsefl.sparse_chain";

struct ChainArgs {
  std::vector<double> betas;
  std::vector<int64_t> plans, ks;
};

void check_chain(const at::Tensor& x, at::TensorList omegas, at::TensorList biases,
                 const ChainArgs& c) {
  const size_t n = omegas.size();
  TORCH_CHECK_VALUE(n >= 1 && biases.size() == n && c.betas.size() == n &&
                        c.plans.size() == n && c.ks.size() == n,
                    kChainOp, ": omegas, biases, betas, plans and ks need one entry per "
                    "layer (", n, " omegas, ", biases.size(), " biases, ", c.betas.size(),
                    " betas, ", c.plans.size(), " plans, ", c.ks.size(), " ks)");
  TORCH_CHECK_VALUE(x.dim() == 2, kChainOp, ": input must be 2-D (batch, features), got ",
                    x.sizes());
  for (size_t l = 0; l < n; ++l) {
    TORCH_CHECK_VALUE(omegas[l].dim() == 2, kChainOp, ": layer ", l, "'s weight must be 2-D");
    const int64_t cin = l == 0 ? x.size(1) : omegas[l - 1].size(0);
    TORCH_CHECK_VALUE(omegas[l].size(1) == cin, kChainOp, ": layer ", l, " takes ",
                      omegas[l].size(1), " features but gets ", cin);
  }
}

// The ReLU and its gradient as plain loops (through the dispatcher each costs more than a
// small layer's arithmetic); y, dx: fresh contiguous outputs of this op.
void chain_relu_(at::Tensor& y) {
  dispatch_float_dtype(y.scalar_type(), kChainOp, [&](auto tag) {
    using T = decltype(tag);
    T* p = y.data_ptr<T>();
    for (int64_t i = 0, n = y.numel(); i < n; ++i)  // branch-free; NaN stays NaN
      p[i] = static_cast<float>(p[i]) < 0.0f ? T(0.0f) : p[i];
  });
}

// dx where the ReLU's output h was > 0, else 0 (threshold_backward), in place.
void chain_relu_backward_(at::Tensor& dx, const at::Tensor& h) {
  dispatch_float_dtype(dx.scalar_type(), kChainOp, [&](auto tag) {
    using T = decltype(tag);
    T* d = dx.data_ptr<T>();
    const T* hp = h.data_ptr<T>();
    for (int64_t i = 0, n = dx.numel(); i < n; ++i)
      d[i] = static_cast<float>(hp[i]) > 0.0f ? d[i] : T(0.0f);
  });
}

c10::optional<at::Tensor> chain_bias(const at::Tensor& b) {
  return b.defined() && b.numel() > 0 ? c10::optional<at::Tensor>(b) : c10::nullopt;
}

// Layer l of a chain on its input h (N, C): y = layer(h), then the ReLU in place unless last.
at::Tensor chain_layer(const at::Tensor& h, const at::Tensor& omega, const at::Tensor& bias,
                       double beta, SparsePlan& plan, bool relu) {
  const LayerView lv(h, omega);
  Geom g{};
  std::shared_ptr<const Plan> P;
  at::Tensor y = lv.output(layer_forward(lv, omega, beta, chain_bias(bias), plan, g, P), h);
  if (relu) chain_relu_(y);
  return y;
}

struct SparseChainFn : public torch::autograd::Function<SparseChainFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList omegas,
                            at::TensorList biases, std::vector<double> betas,
                            std::vector<int64_t> plans, std::vector<int64_t> ks, bool train) {
    const ChainArgs c{std::move(betas), std::move(plans), std::move(ks)};
    check_chain(x, omegas, biases, c);
    const size_t n = omegas.size();
    std::vector<at::Tensor> saved;  // per layer: omega, pack (3) or 3 empties; then ReLUs
    std::vector<at::Tensor> relus;
    at::Tensor h = x;
    for (size_t l = 0; l < n; ++l) {
      auto plan = plan_of(c.plans[l]);
      const at::Tensor y = chain_layer(h, omegas[l], biases[l], c.betas[l], *plan, l + 1 < n);
      saved.push_back(omegas[l]);
      if (train && omegas[l].requires_grad()) {
        auto [p, q, v] = timed_pack(h.reshape({-1, h.size(1), 1, 1}), c.ks[l], {1, 1}, *plan);
        saved.push_back(p), saved.push_back(q), saved.push_back(v);
      } else {
        saved.push_back(at::Tensor()), saved.push_back(at::Tensor()),
            saved.push_back(at::Tensor());
      }
      ctx->saved_data["plan" + std::to_string(l)] = plan;  // alive as long as the node
      h = y;
      if (l + 1 < n) relus.push_back(h);
    }
    for (auto& r : relus) saved.push_back(r);
    ctx->save_for_backward(saved);
    ctx->saved_data["betas"] = c10::IValue(c.betas);
    ctx->saved_data["n"] = static_cast<int64_t>(n);
    std::vector<int64_t> has_bias;
    for (const auto& b : biases) has_bias.push_back(b.defined() && b.numel() > 0);
    ctx->saved_data["has_bias"] = c10::IValue(has_bias);
    ctx->saved_data["x_shape"] = c10::IValue(x.sizes().vec());
    return h;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t n = ctx->saved_data["n"].toInt();
    const auto betas = ctx->saved_data["betas"].toDoubleVector();
    const auto has_bias = ctx->saved_data["has_bias"].toIntVector();
    const auto x_shape = ctx->saved_data["x_shape"].toIntVector();
    const char* op = "sparsefl.sparse_chain (backward)";
    // gradient slots: x, omegas (n), biases (n), betas, plans, ks, train
    variable_list out(1 + 2 * n + 4);
    at::Tensor dy = grads[0];
    for (int64_t l = n - 1; l >= 0; --l) {
      const at::Tensor& omega = saved[4 * l];
      const int64_t cout = omega.size(0), cin = omega.size(1);
      const int64_t N = l == 0 ? x_shape[0] : saved[4 * n + l - 1].size(0);
      const auto plan = ctx->saved_data["plan" + std::to_string(l)].toCustomClass<SparsePlan>();
      const at::Tensor w4 = omega.view({cout, cin, 1, 1}).contiguous();
      const at::Tensor dy4 = dy.reshape({-1, cout, 1, 1}).contiguous();
      const bool need_dx = l > 0 || ctx->needs_input_grad(0);
      const bool need_dw = ctx->needs_input_grad(1 + l) && saved[4 * l + 1].defined();
      const std::vector<int64_t> x4_shape{N, cin, 1, 1};
      check_operands(dy4, "grad_output", w4, betas[l], op);
      const Geom g = make_geom(x4_shape, w4, plan->stride, plan->padding, op);
      check_grad_output(dy4, g, op);
      at::Tensor ptr, q, v;
      if (saved[4 * l + 1].defined()) {
        ptr = saved[4 * l + 1], q = saved[4 * l + 2], v = saved[4 * l + 3];
        check_pack(g, ptr, q, v, /*deep=*/false, op);
      }
      at::Tensor dx, dw;
      if (need_dx || need_dw)
        std::tie(dx, dw) = backward_planned(dy4, ptr, q, v, w4, betas[l],
                                            plan->rowptr.data_ptr<int64_t>(), *plan->get(g), g,
                                            x4_shape, need_dx, need_dw, op);
      if (need_dw) out[1 + l] = dw.view(omega.sizes());
      if (has_bias[l] && ctx->needs_input_grad(1 + n + l)) out[1 + n + l] = dy4.sum({0, 2, 3});
      if (l == 0) {
        if (need_dx) out[0] = dx.view(x_shape);
      } else {  // through the ReLU before this layer: zero where its output was zero
        chain_relu_backward_(dx, saved[4 * n + l - 1]);
        dy = dx.view({N, cin});
      }
    }
    return out;
  }
};

at::Tensor sparse_chain_autograd(const at::Tensor& x, at::TensorList omegas,
                                 at::TensorList biases, at::ArrayRef<double> betas,
                                 at::IntArrayRef plans, at::IntArrayRef ks, bool train) {
  return SparseChainFn::apply(x, omegas, biases, betas.vec(), plans.vec(), ks.vec(), train);
}

// Without autograd: the forward alone.
at::Tensor sparse_chain_cpu(const at::Tensor& x, at::TensorList omegas, at::TensorList biases,
                            at::ArrayRef<double> betas, at::IntArrayRef plans,
                            at::IntArrayRef ks, bool train) {
  (void)train;
  const ChainArgs c{betas.vec(), plans.vec(), ks.vec()};
  check_chain(x, omegas, biases, c);
  at::Tensor h = x;
  for (size_t l = 0; l < omegas.size(); ++l)
    h = chain_layer(h, omegas[l], biases[l], c.betas[l], *plan_of(c.plans[l]),
                    l + 1 < omegas.size());
  return h;
}

int64_t act_prune_ns() { return g_act_prune_ns.load(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.class_<SparsePlan>("SparsePlan")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<int64_t>,
                       std::vector<int64_t>, std::vector<int64_t>>())
      .def("handle", &plan_handle);
  m.def("sparse_layer(Tensor x, Tensor omega, Tensor? bias, float beta, int plan, int k, "
        "bool train, float? tau=None) -> Tensor");
  m.def("sparse_chain(Tensor x, Tensor[] omegas, Tensor[] biases, float[] betas, int[] plans, "
        "int[] ks, bool train) -> Tensor");
  m.def("act_prune_ns() -> int", &act_prune_ns);
  m.def("pack_support(Tensor omega) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sparse_conv_forward(Tensor x, Tensor omega, float beta, Tensor rowptr, Tensor cols, "
        "Tensor? bias, int[] stride, int[] padding) -> Tensor");
  m.def("sparse_act_pack(Tensor x, int k, int[] kernel, int[] stride, int[] padding, "
        "float? tau=None) -> (Tensor, Tensor, Tensor)");
  m.def("sparse_conv_backward(Tensor grad_output, Tensor xptr, Tensor xq, Tensor xv, "
        "Tensor omega, float beta, Tensor rowptr, Tensor cols, Tensor cptr, Tensor cent, "
        "int[] x_shape, int[] stride, "
        "int[] padding, bool need_dx, bool need_dw) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsefl_C, Autograd, m) {
  m.impl("sparse_layer", &sparse_layer_autograd);
  m.impl("sparse_chain", &sparse_chain_autograd);
}

TORCH_LIBRARY_IMPL(sparsefl_C, CPU, m) {
  m.impl("sparse_layer", &sparse_layer_cpu);
  m.impl("sparse_chain", &sparse_chain_cpu);
  m.impl("pack_support", &pack_support_cpu);
  m.impl("sparse_conv_forward", &sparse_conv_forward_cpu);
  m.impl("sparse_act_pack", &sparse_act_pack_cpu);
  m.impl("sparse_conv_backward", &sparse_conv_backward_cpu);
}

}  // namespace sparsefl
