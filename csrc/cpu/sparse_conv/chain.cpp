// A chain of sparse Linear layers with ReLU between them as one op
// (torch.ops.sparsefl_C.sparse_chain: an MLP's whole forward, one C++ backward node).
#include "layer.h"

namespace sparsefl {
namespace conv {

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

}  // namespace conv
}  // namespace sparsefl
