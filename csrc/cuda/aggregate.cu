// Deterministic weighted sum of sparse client updates, CUDA backend.
// Same definition as csrc/cpu/aggregate.cpp and sparsefl/ops/reference/aggregate.py:
//
//   out[j] = base[j] + lr * sum_c w_c * v_c[j]     (float64 per element, client order)
//
// 1. check_kernel   one block per client: indices strictly ascending in [0, numel), values
//                   finite; a violation sets the client's flag.  The host reads the flags
//                   once (the only synchronisation) and raises before anything is written.
// 2. cursor_kernel  where each client's indices enter each tile (binary search), so tiles
//                   are independent.
// 3. tile_kernel    one block per tile of kTile elements with a float64 accumulator in
//                   shared memory; clients are added one after another with a barrier in
//                   between, so every element sums in client order (no float atomics:
//                   bitwise reproducible), then base + lr * acc is written once.
// Not yet run on a GPU in this project: compile-checked by tests/test_cuda_compile.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace sparsefl {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTile = 4096;  // 32 KiB of doubles in shared memory

struct Client {
  const void* idx;  // int64 or int32; unused when dense
  const void* val;
  int64_t nnz;
  double w;
  int32_t idx64;
  int32_t vdtype;  // 0 float, 1 half, 2 bfloat16
  int32_t dense;
};

__device__ __forceinline__ int64_t index_at(const Client& c, int64_t i) {
  return c.idx64 ? static_cast<const int64_t*>(c.idx)[i]
                 : static_cast<int64_t>(static_cast<const int32_t*>(c.idx)[i]);
}

__device__ __forceinline__ double value_at(const Client& c, int64_t i) {
  switch (c.vdtype) {
    case 1: return static_cast<float>(static_cast<const c10::Half*>(c.val)[i]);
    case 2: return static_cast<float>(static_cast<const c10::BFloat16*>(c.val)[i]);
    default: return static_cast<const float*>(c.val)[i];
  }
}

__global__ void check_kernel(const Client* clients, int64_t numel, int32_t* bad) {
  const Client c = clients[blockIdx.x];
  int32_t b = 0;
  for (int64_t i = threadIdx.x; i < c.nnz; i += blockDim.x) {
    if (!isfinite(value_at(c, i))) b = 1;
    if (!c.dense) {
      const int64_t j = index_at(c, i);
      if (j < 0 || j >= numel || (i > 0 && j <= index_at(c, i - 1))) b = 1;
    }
  }
  if (b) atomicOr(bad + blockIdx.x, 1);  // integer flag: order-free, exact
}

__global__ void cursor_kernel(const Client* clients, int64_t tiles, int64_t* cursors) {
  const int64_t c = blockIdx.y;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t > tiles) return;
  const Client cl = clients[c];
  int64_t lo = 0, hi = cl.dense ? 0 : cl.nnz;
  const int64_t target = t * kTile;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (index_at(cl, mid) < target) lo = mid + 1;
    else hi = mid;
  }
  cursors[c * (tiles + 1) + t] = lo;
}

__global__ void tile_kernel(const Client* clients, int64_t C, const int64_t* cursors,
                            int64_t tiles, int64_t numel, const float* base, float* out,
                            double lr) {
  __shared__ double acc[kTile];
  const int64_t t = blockIdx.x;
  const int64_t t0 = t * kTile;
  const int64_t len = min(kTile, numel - t0);
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) acc[j] = 0.0;
  __syncthreads();
  for (int64_t c = 0; c < C; ++c) {
    const Client cl = clients[c];
    if (cl.dense) {
      for (int64_t j = threadIdx.x; j < len; j += blockDim.x)
        acc[j] += cl.w * value_at(cl, t0 + j);
    } else {
      const int64_t a = cursors[c * (tiles + 1) + t];
      const int64_t b = cursors[c * (tiles + 1) + t + 1];
      for (int64_t i = a + threadIdx.x; i < b; i += blockDim.x)  // distinct j within a client
        acc[index_at(cl, i) - t0] += cl.w * value_at(cl, i);
    }
    __syncthreads();  // the next client adds after this one: fixed order per element
  }
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    const double b = base ? static_cast<double>(base[t0 + j]) : 0.0;
    out[t0 + j] = static_cast<float>(b + lr * acc[j]);
  }
}

int32_t vdtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK_TYPE(false, "sparsefl.aggregate: unsupported value dtype ", t);
  }
}

void sparse_aggregate_cuda(at::TensorList indices, at::TensorList values,
                           at::ArrayRef<double> weights, const at::Tensor& out,
                           const std::optional<at::Tensor>& base, double lr) {
  const size_t C = values.size();
  TORCH_CHECK_VALUE(indices.size() == C && weights.size() == C,
                    "sparsefl.aggregate: list lengths differ");
  TORCH_CHECK_VALUE(out.is_cuda() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                        out.dim() == 1,
                    "sparsefl.aggregate: out must be a contiguous 1-D float32 CUDA tensor");
  TORCH_CHECK_VALUE(std::isfinite(lr), "sparsefl.aggregate: lr must be finite");
  const int64_t numel = out.numel();
  const at::Device device = out.device();
  c10::cuda::CUDAGuard guard(device);
  const float* basep = nullptr;
  if (base.has_value()) {
    TORCH_CHECK_VALUE(base->device() == device && base->scalar_type() == at::kFloat &&
                          base->is_contiguous() && base->numel() == numel,
                      "sparsefl.aggregate: base must match out");
    basep = base->data_ptr<float>();
  }
  std::vector<Client> host(C);
  for (size_t c = 0; c < C; ++c) {
    TORCH_CHECK_VALUE(std::isfinite(weights[c]), "sparsefl.aggregate: weight ", c,
                      " is not finite");
    const auto& iv = indices[c];
    const auto& vv = values[c];
    TORCH_CHECK_VALUE(vv.device() == device && vv.dim() == 1 && vv.is_contiguous(),
                      "sparsefl.aggregate: values[", c, "] must be contiguous 1-D on ", device);
    Client& cl = host[c];
    cl.val = vv.data_ptr();
    cl.nnz = vv.numel();
    cl.w = weights[c];
    cl.vdtype = vdtype_code(vv.scalar_type());
    cl.dense = iv.numel() == 0 && vv.numel() == numel && numel > 0;
    cl.idx = nullptr;
    cl.idx64 = 1;
    if (!cl.dense) {
      TORCH_CHECK_VALUE(iv.device() == device && iv.dim() == 1 && iv.is_contiguous() &&
                            (iv.scalar_type() == at::kLong || iv.scalar_type() == at::kInt) &&
                            iv.numel() == vv.numel(),
                        "sparsefl.aggregate: indices[", c, "] must be contiguous 1-D int64 or ",
                        "int32 on ", device, " with one index per value");
      cl.idx = iv.data_ptr();
      cl.idx64 = iv.scalar_type() == at::kLong;
    }
  }
  if (C == 0 || numel == 0) {
    out.copy_(basep ? *base : at::zeros_like(out));
    return;
  }
  auto bytes = at::empty({static_cast<int64_t>(C * sizeof(Client))},
                         at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(bytes.data_ptr(), host.data(), C * sizeof(Client));
  auto dev_bytes = bytes.to(device, /*non_blocking=*/true);
  const auto* clients = reinterpret_cast<const Client*>(dev_bytes.data_ptr());
  auto stream = c10::cuda::getCurrentCUDAStream();

  auto flags = at::zeros({static_cast<int64_t>(C)}, out.options().dtype(at::kInt));
  check_kernel<<<C, kThreads, 0, stream>>>(clients, numel, flags.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto flags_host = flags.cpu();  // the one synchronisation: raise before writing
  for (size_t c = 0; c < C; ++c)
    TORCH_CHECK_VALUE(flags_host.data_ptr<int32_t>()[c] == 0, "sparsefl.aggregate: payload ", c,
                      " has indices not strictly ascending in [0, ", numel,
                      ") or a value that is not finite");

  const int64_t tiles = (numel + kTile - 1) / kTile;
  auto cursors =
      at::empty({static_cast<int64_t>(C) * (tiles + 1)}, out.options().dtype(at::kLong));
  const dim3 cgrid(static_cast<unsigned>((tiles + 1 + kThreads - 1) / kThreads),
                   static_cast<unsigned>(C));
  cursor_kernel<<<cgrid, kThreads, 0, stream>>>(clients, tiles, cursors.data_ptr<int64_t>());
  tile_kernel<<<tiles, kThreads, 0, stream>>>(clients, static_cast<int64_t>(C),
                                              cursors.data_ptr<int64_t>(), tiles, numel, basep,
                                              out.data_ptr<float>(), lr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsefl_C, CUDA, m) { m.impl("sparse_aggregate", &sparse_aggregate_cuda); }

}  // namespace sparsefl
