// The fused sparse layer (torch.ops.sparsefl_C.sparse_layer) and what the chain op shares
// with it: the packed support with its cached plans (SparsePlan), the 4-D view of a Linear
// layer, the checked forward, and the timed activation pack.
#pragma once

#include <torch/csrc/autograd/custom_function.h>
#include <torch/custom_class.h>

#include <mutex>
#include <utility>

#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

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
  // A per-batch activation cut selected inside the layer: the last batch's cut and the
  // margin around it for the next batch's bracket (layer.cpp next_bracket; < 0: none yet).
  std::atomic<float> cut_tau{-1.0f}, cut_margin{0.08f};

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
    check_columns(g, cptr.data_ptr<int64_t>(), cent.data_ptr<int32_t>(),
                  rowptr.data_ptr<int64_t>(), cols.data_ptr<int32_t>(), op);
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

// The plan's integer handle (what sparse_layer takes), and the plan of a handle.
int64_t plan_handle(const c10::intrusive_ptr<SparsePlan>& self);
c10::intrusive_ptr<SparsePlan> plan_of(int64_t id);

// Nanoseconds of activation pruning in the fused ops (read by act_prune_ns()).
extern std::atomic<int64_t> g_act_prune_ns;

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

// The forward of the fused op, shared by its autograd and plain (inference) kernels (and
// by the chain op): checks that no nonzero weight lies outside the support, then y.
at::Tensor layer_forward(const LayerView& lv, const at::Tensor& omega, double beta,
                         const c10::optional<at::Tensor>& bias, SparsePlan& sp, Geom& g,
                         std::shared_ptr<const Plan>& P, const TileVisit* visit = nullptr);
// The activation pack of x4 (4-D) with the plan's stride and padding, its time counted.
std::tuple<at::Tensor, at::Tensor, at::Tensor> timed_pack(const at::Tensor& x4, int64_t k,
                                                          at::IntArrayRef kernel,
                                                          const SparsePlan& plan,
                                                          c10::optional<double> tau = {});

// The ops' kernels (register.cpp).
at::Tensor sparse_layer_autograd(const at::Tensor& x, const at::Tensor& omega,
                                 const c10::optional<at::Tensor>& bias, double beta,
                                 int64_t plan, int64_t k, bool train,
                                 c10::optional<double> tau);
at::Tensor sparse_layer_cpu(const at::Tensor& x, const at::Tensor& omega,
                            const c10::optional<at::Tensor>& bias, double beta,
                            int64_t plan, int64_t k, bool train, c10::optional<double> tau);
at::Tensor sparse_chain_autograd(const at::Tensor& x, at::TensorList omegas,
                                 at::TensorList biases, at::ArrayRef<double> betas,
                                 at::IntArrayRef plans, at::IntArrayRef ks, bool train);
at::Tensor sparse_chain_cpu(const at::Tensor& x, at::TensorList omegas, at::TensorList biases,
                            at::ArrayRef<double> betas, at::IntArrayRef plans,
                            at::IntArrayRef ks, bool train);
int64_t act_prune_ns();

}  // namespace conv
}  // namespace sparsefl
