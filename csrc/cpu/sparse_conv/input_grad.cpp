// Input gradient, polyphase: dx is the transposed convolution of dy with theta_S.  An input
// pixel (ih, iw) has phase (a, b) = ((ih+ph) % s, (iw+pw) % s); exactly the taps with
// kh % s == a, kw % s == b reach it, each from dyp[co][u + Ph - kh/s][v + Pw - kw/s].  So
// each phase is a stride-1 gather convolution of dyp with the column support of its taps
// (plan_columns sorts the columns by phase), writing every s-th pixel of dx; a phase
// without taps writes zeros.
#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

at::Tensor input_grad(const at::Tensor& dyp, const at::Tensor& dy, const at::Tensor& omega,
                      double beta, const Plan& P, const Geom& g, at::IntArrayRef x_shape,
                      const char* op) {
  const int64_t nnz = static_cast<int64_t>(P.widx.size());
  const int64_t Hq = g.Hq(), Wq = g.Wq();
  const float bf = static_cast<float>(beta);
  at::Tensor dx;
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
  return dx;
}

}  // namespace conv
}  // namespace sparsefl
