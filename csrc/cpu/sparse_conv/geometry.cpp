// Shapes and argument checks of the sparse conv ops, and the parallel grain.
#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

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

// rowptr [rows + 1] int64, ascending from 0 to nnz; entries int32 in [0, limit), strictly
// ascending within each row (a support is a set: no repeats, one order).
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
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = p[r] + 1; j < p[r + 1]; ++j) ok &= e[j - 1] < e[j];
  TORCH_CHECK_VALUE(ok, op, ": ", what, " entries must be strictly ascending within each "
                    "group (no repeats)");
}

int64_t grain(int64_t tasks, double work) {
  constexpr double kMinParallelWork = 1 << 16;
  return work < kMinParallelWork ? tasks + 1 : 1;
}

}  // namespace conv
}  // namespace sparsefl
