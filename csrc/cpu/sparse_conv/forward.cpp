// Forward: y = conv(x, theta_S) + bias.  x goes into pixel tiles once, theta_S is computed
// for the support's entries only, and the gather convolution runs over the row plan.
#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

at::Tensor forward_planned(const at::Tensor& x, const at::Tensor& omega, double beta,
                           const int64_t* rp, const Plan& P, const at::Tensor& b,
                           const Geom& g, const char* op, const TileVisit* visit) {
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
    const int64_t n = to_tiles<T>(x.data_ptr<T>(), g.N, g.C, g.H, g.W, xt.data_ptr<float>(),
                                  Hp, Wp, g.ph, g.pw, 1, 1, visit ? visit->tally_key : 0);
    if (visit != nullptr) visit->fn(xt, n);
    run_conv<T>(a);
  });
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

}  // namespace conv
}  // namespace sparsefl
