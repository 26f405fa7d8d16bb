// Backward: dy goes into pixel tiles once (with Ph, Pw leading zeros, see sparse_conv.h)
// and both gradients read it; the public op checks everything and builds its plans per
// call, the fused layer op passes its own (layer.cpp).
#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

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

std::tuple<at::Tensor, at::Tensor> backward_planned(
    const at::Tensor& dy, const at::Tensor& xptr, const at::Tensor& xq, const at::Tensor& xv,
    const at::Tensor& omega, double beta, const int64_t* rp, const Plan& P, const Geom& g,
    at::IntArrayRef x_shape, bool need_dx, bool need_dw, const char* op,
    const float* xt_dense, const int32_t* cols) {
  at::Tensor dx, dw;
  if (g.N == 0 || (!need_dx && !need_dw)) {
    if (need_dx) dx = at::zeros(x_shape, dy.options());
    if (need_dw) dw = at::zeros_like(omega);
    return {dx, dw};
  }
  const int64_t Hq = g.Hq(), Wq = g.Wq(), Ph = g.Ph(), Pw = g.Pw();
  // dy in pixel tiles with Ph, Pw leading zeros (shared by both gradients).
  auto dyp = at::empty({g.NT * g.Co * Hq * Wq * L}, dy.options().dtype(at::kFloat));
  dispatch_float_dtype(dy.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    to_tiles<T>(dy.data_ptr<T>(), g.N, g.Co, g.OH, g.OW, dyp.data_ptr<float>(), Hq, Wq, Ph, Pw,
                1, 1);
  });
  if (need_dx) dx = input_grad(dyp, dy, omega, beta, P, g, x_shape, op);
  if (need_dw) dw = weight_grad(dyp, xptr, xq, xv, omega, beta, rp, P, g, op, xt_dense, cols);
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
  check_columns(g, cptr.data_ptr<int64_t>(), cent.data_ptr<int32_t>(),
                  rowptr.data_ptr<int64_t>(), cols.data_ptr<int32_t>(), op);
  if (need_dw) check_pack(g, xptr, xq, xv, /*deep=*/true, op);
  Plan P;
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  plan_rows(g, rp, cols.data_ptr<int32_t>(), P, /*fwd=*/false, /*wgrad=*/need_dw);
  if (need_dx) plan_columns(g, cptr.data_ptr<int64_t>(), cent.data_ptr<int32_t>(), P);
  return backward_planned(dy_in.contiguous(), xptr, xq, xv, omega_in.contiguous(), beta, rp, P,
                          g, x_shape, need_dx, need_dw, op);
}

}  // namespace conv
}  // namespace sparsefl
