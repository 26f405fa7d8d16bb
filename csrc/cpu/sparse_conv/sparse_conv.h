// Convolution / linear layers that compute on the support S of a Powerprop weight.
// C++ CPU backend; the definition is sparsefl/ops/reference/sparse_conv.py.  What every file of
// csrc/cpu/sparse_conv/ shares: the layout, the geometry, the index plans, Powerprop's maps.
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
//
// The files, in the order a training step meets them:
//   geometry.cpp     shapes and argument checks (Geom), the parallel grain
//   plan.cpp         the support packed by rows and columns, and the per-pass index plans
//   tiles.cpp        NCHW -> pixel tiles (the layout above)
//   gather_conv.cpp  the gather convolution every pass runs (forward and input gradient)
//   forward.cpp      y = conv(x, theta_S) + bias
//   act_pack.cpp     activation pruning: the kept inputs packed for the weight gradient
//   input_grad.cpp   dx, phase by phase
//   weight_grad.cpp  domega on S: gather-dots over the pack, or FMAs over kept tiles
//   backward.cpp     both gradients from one relayout of dy; the public backward op
//   layer.cpp        the whole layer as one autograd op (SparsePlan, sparse_layer)
//   chain.cpp        an MLP's chain of sparse Linear layers as one op (sparse_chain)
//   register.cpp     the torch.library schemas and kernels
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../dtype.h"
#include "../simd.h"
#include "../topk_select.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <functional>
#include <vector>

// GCC 12's own AVX-512 headers (gathers, reductions) trip this on their undefined vectors.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace sparsefl {
namespace conv {

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
// Geometry and checks (geometry.cpp)
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
               at::IntArrayRef padding, const char* op);
void check_float(const at::Tensor& t, const char* op, const char* name);
// A float tensor and the weight of the same dtype, and beta >= 1 (finite).
void check_operands(const at::Tensor& t, const char* name, const at::Tensor& omega, double beta,
                    const char* op);
void check_index(const at::Tensor& t, at::ScalarType st, const char* op, const char* name);
// rowptr [rows + 1] int64, ascending from 0 to nnz; entries int32 in [0, limit).
void check_csr(const at::Tensor& ptr, const at::Tensor& ent, int64_t rows, int64_t limit,
               const char* op, const char* what);
// Grain for at::parallel_for over `tasks` of `work` element-operations in all: small jobs
// (a 16-image Linear layer) run on the calling thread, as a fork/join costs more.
int64_t grain(int64_t tasks, double work);

// ---------------------------------------------------------------------------------------
// Powerprop's maps and index arithmetic
// ---------------------------------------------------------------------------------------

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
// Index plans (plan.cpp)
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

// Row plans (forward: `off`; weight gradient: `roff`, `rgrp`) and column plans (input
// gradient: `pptr`, `poff`, `pidx`) of a support for one geometry.
void plan_rows(const Geom& g, const int64_t* rp, const int32_t* cp, Plan& P, bool fwd,
               bool wgrad);
void plan_columns(const Geom& g, const int64_t* cpp, const int32_t* ce, Plan& P);
// Every entry of column ci must be a weight of input channel ci.
void check_columns(const Geom& g, const int64_t* cpp, const int32_t* ce, const int64_t* rp,
                   const int32_t* cols, const char* op);
// Nonzero weights outside the support (float, Half, BFloat16).
template <typename T>
int64_t escapes_of(const T* w, int64_t numel, const Plan& P);

// ---------------------------------------------------------------------------------------
// Layout and the gather convolution (tiles.cpp, gather_conv.cpp)
// ---------------------------------------------------------------------------------------

// dst[nt][c][oy + h*dyl][ox + w*dxl][lane] = src[nt*16 + lane][c][h][w], the rest of dst
// zero; dst has dims [NT][C][DH][DW][16] (float, Half, BFloat16 sources).  tally_key >= 1
// (spatial inputs): returns how many entries have |x|'s magnitude key >= tally_key, counted
// on the way through (what a threshold keeps); else 0.
template <typename T>
int64_t to_tiles(const T* src, int64_t N, int64_t C, int64_t H, int64_t W, float* dst,
                 int64_t DH, int64_t DW, int64_t oy, int64_t ox, int64_t dyl, int64_t dxl,
                 int64_t tally_key = 0);

// One pass of the gather convolution (see gather_conv.cpp).
// ---------------------------------------------------------------------------------------
// A task is (batch tile, block of grid rows).  Each grid row is cut into runs of R pixels
// and one shorter run for the rest, and the task takes its runs one by one through every
// output channel: the KH input rows of (R - 1) * stride + KW pixels that a run reads stay
// in L1 (at 16 input channels) or L2 while all output channels reuse them.  boff[r] is
// pixel r's offset from the tile base.  Grid pixel (u, v) reads input pixel
// (iy0 + u*sy, ix0 + v*sx) (plus each tap's offset) and writes output pixel
// (oy0 + u*osy, ox0 + v*osx).

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

// out (dtype T) = the gather convolution of a; T = float, Half or BFloat16.
template <typename T>
void run_conv(const ConvArgs& a);
// Both column phases of a stride-2 input gradient in one pass, when it applies (AVX-512,
// float output, grids 4k wide filling OW = 2 GW); false: run each with run_conv.
bool run_conv_pair(const ConvArgs& e, const ConvArgs& o, bool float_out);

// ---------------------------------------------------------------------------------------
// The passes (forward.cpp, act_pack.cpp, input_grad.cpp, weight_grad.cpp, backward.cpp)
// ---------------------------------------------------------------------------------------

// y = conv(x, theta_S) + bias with the support's plan; b: float32 bias or undefined.
// visit: when given, called with the input in pixel tiles ([NT][C][Hp][Wp][16], zero
// padding and zero lanes past N) and the count of its entries with magnitude key >=
// visit->tally_key, after the relayout and before the convolution reads the tiles (they
// are still in cache: the fused layer copies its pruned input out of them there).
struct TileVisit {
  int64_t tally_key;
  std::function<void(const at::Tensor& xt, int64_t tally)> fn;
};
at::Tensor forward_planned(const at::Tensor& x, const at::Tensor& omega, double beta,
                           const int64_t* rp, const Plan& P, const at::Tensor& b,
                           const Geom& g, const char* op, const TileVisit* visit = nullptr);
// The bias as float32 (undefined when absent), checked against the geometry.
at::Tensor float_bias(const c10::optional<at::Tensor>& bias, const Geom& g, const char* op);


// dx from dy in pixel tiles (dyp), phase by phase; dy: its dtype and options.
at::Tensor input_grad(const at::Tensor& dyp, const at::Tensor& dy, const at::Tensor& omega,
                      double beta, const Plan& P, const Geom& g, at::IntArrayRef x_shape,
                      const char* op);
// domega on S from dyp and the pruned input: a pack (xptr, xq, xv), or (xt_dense) the
// forward's pixel tiles, pruned (a copy), with the support rows' column indices `cols`.
at::Tensor weight_grad(const at::Tensor& dyp, const at::Tensor& xptr, const at::Tensor& xq,
                       const at::Tensor& xv, const at::Tensor& omega, double beta,
                       const int64_t* rp, const Plan& P, const Geom& g, const char* op,
                       const float* xt_dense, const int32_t* cols);
// dx and domega with the support's plan (checks done by the caller).
// xt_dense (the fused layer only): the pruned input kept as the forward's pixel tiles
// instead of a pack (xptr/xq/xv are not read then); cols: the support rows' column indices.
std::tuple<at::Tensor, at::Tensor> backward_planned(
    const at::Tensor& dy, const at::Tensor& xptr, const at::Tensor& xq, const at::Tensor& xv,
    const at::Tensor& omega, double beta, const int64_t* rp, const Plan& P, const Geom& g,
    at::IntArrayRef x_shape, bool need_dx, bool need_dw, const char* op,
    const float* xt_dense = nullptr, const int32_t* cols = nullptr);
// The packed activation matches the geometry; `deep`: every position is checked too (the
// public op; the fused layer op made the pack itself).
void check_pack(const Geom& g, const at::Tensor& xptr, const at::Tensor& xq,
                const at::Tensor& xv, bool deep, const char* op);
void check_grad_output(const at::Tensor& dy, const Geom& g, const char* op);

// The public ops (torch.ops.sparsefl_C.*; schemas in register.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_support_cpu(
    const at::Tensor& omega_in);
at::Tensor sparse_conv_forward_cpu(const at::Tensor& x_in, const at::Tensor& omega_in,
                                   double beta, const at::Tensor& rowptr,
                                   const at::Tensor& cols, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_act_pack_cpu(
    const at::Tensor& x_in, int64_t k, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding, c10::optional<double> tau);
std::tuple<at::Tensor, at::Tensor> sparse_conv_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& xptr, const at::Tensor& xq, const at::Tensor& xv,
    const at::Tensor& omega_in, double beta, const at::Tensor& rowptr, const at::Tensor& cols,
    const at::Tensor& cptr, const at::Tensor& cent, at::IntArrayRef x_shape,
    at::IntArrayRef stride, at::IntArrayRef padding, bool need_dx, bool need_dw);

}  // namespace conv
}  // namespace sparsefl
