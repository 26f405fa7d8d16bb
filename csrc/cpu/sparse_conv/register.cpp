// The sparse conv ops' schemas and kernels (torch.ops.sparsefl_C.*); what each computes is
// defined by its reference in sparsefl/ops/reference/sparse_conv.py.
#include <torch/library.h>

#include "layer.h"

namespace sparsefl {
namespace conv {

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


}  // namespace conv
}  // namespace sparsefl
