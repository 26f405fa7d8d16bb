// Deterministic weighted sum of sparse client updates, CUDA backend.
// Same definition as csrc/cpu/aggregate.cpp and sparsefl/ops/reference/aggregate.py:
//
//   out[j] = base[j] + lr * sum_c w_c * v_c[j]     (float64 per element, client order)
//   out[j] += sum_c w_c * v_c[j]                   (out float64: accumulate mode)
//
// A client is flat (sorted indices), dense (numel values) or tiled (int32 offsets of its
// entries per 4096-element tile + int16 offsets inside the tile: sparsefl/ops/tiled.py).
// 1. check_kernel   one block per client: flat indices strictly ascending in [0, numel);
//                   tiled offsets rising from 0 to nnz and local indices strictly
//                   ascending inside their tile; values finite.  A violation sets the
//                   client's flag; the host reads the flags once (the only
//                   synchronisation) and raises before anything is written.
// 2. cursor_kernel  where each flat client's indices enter each tile (binary search), so
//                   tiles are independent; a tiled client carries these as its offsets.
//                   Clients run over grid.y with a stride: any number of clients.
// 3. tile_kernel    one block per tile of kTile elements with a float64 accumulator in
//                   shared memory (started from out in accumulate mode); clients are added
//                   one after another with a barrier in between, so every element sums in
//                   client order (no float atomics: bitwise reproducible), then
//                   base + lr * acc (or acc, accumulating) is written once.
// Not yet run on a GPU in this project: compile-checked by tests/test_cuda_compile.py;
// scripts/gpu-check.sh runs the GPU tests where a GPU exists.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace sparsefl {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTile = 4096;  // 32 KiB of doubles in shared memory

constexpr int32_t kFlat = 0, kDense = 1, kTiled = 2;
constexpr unsigned kMaxGridY = 65535;  // CUDA's limit on gridDim.y

struct Client {
  const void* idx;        // flat: int64 or int32; tiled: int16 local; unused when dense
  const int32_t* toff;    // tiled: the tile offsets [tiles + 1]
  const void* val;
  int64_t nnz;
  double w;
  int32_t idx64;
  int32_t vdtype;  // 0 float, 1 half, 2 bfloat16
  int32_t kind;    // kFlat, kDense, kTiled
};

// flat: the element index; tiled: the index inside its tile
__device__ __forceinline__ int64_t index_at(const Client& c, int64_t i) {
  if (c.kind == kTiled) return static_cast<int64_t>(static_cast<const int16_t*>(c.idx)[i]);
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

__global__ void check_kernel(const Client* clients, int64_t numel, int64_t tiles,
                             int32_t* bad) {
  const Client c = clients[blockIdx.x];
  int32_t b = 0;
  for (int64_t i = threadIdx.x; i < c.nnz; i += blockDim.x)
    if (!isfinite(value_at(c, i))) b = 1;
  if (c.kind == kFlat) {
    for (int64_t i = threadIdx.x; i < c.nnz; i += blockDim.x) {
      const int64_t j = index_at(c, i);
      if (j < 0 || j >= numel || (i > 0 && j <= index_at(c, i - 1))) b = 1;
    }
  } else if (c.kind == kTiled) {
    if (threadIdx.x == 0 && (c.toff[0] != 0 || c.toff[tiles] != c.nnz)) b = 1;
    for (int64_t t = threadIdx.x; t < tiles; t += blockDim.x) {
      const int64_t a = c.toff[t], e = c.toff[t + 1];
      const int64_t len = min(kTile, numel - t * kTile);
      if (a < 0 || e < a || e > c.nnz) {
        b = 1;
        continue;
      }
      for (int64_t i = a; i < e; ++i) {
        const int64_t j = index_at(c, i);
        if (j < 0 || j >= len || (i > a && j <= index_at(c, i - 1))) b = 1;
      }
    }
  }
  if (b) atomicOr(bad + blockIdx.x, 1);  // integer flag: order-free, exact
}

__global__ void cursor_kernel(const Client* clients, int64_t C, int64_t tiles,
                              int64_t* cursors) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t > tiles) return;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {  // any number of clients
    const Client cl = clients[c];
    if (cl.kind != kFlat) continue;
    int64_t lo = 0, hi = cl.nnz;
    const int64_t target = t * kTile;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (index_at(cl, mid) < target) lo = mid + 1;
      else hi = mid;
    }
    cursors[c * (tiles + 1) + t] = lo;
  }
}

// out32 (float32 result) or out64 (float64 running sum, accumulate mode): one is null.
__global__ void tile_kernel(const Client* clients, int64_t C, const int64_t* cursors,
                            int64_t tiles, int64_t numel, const float* base, float* out32,
                            double* out64, double lr) {
  __shared__ double acc[kTile];
  const int64_t t = blockIdx.x;
  const int64_t t0 = t * kTile;
  const int64_t len = min(kTile, numel - t0);
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) acc[j] = out64 ? out64[t0 + j] : 0.0;
  __syncthreads();
  for (int64_t c = 0; c < C; ++c) {
    const Client cl = clients[c];
    if (cl.kind == kDense) {
      for (int64_t j = threadIdx.x; j < len; j += blockDim.x)
        acc[j] = __dadd_rn(acc[j], __dmul_rn(cl.w, value_at(cl, t0 + j)));
    } else {
      const bool tiled = cl.kind == kTiled;
      const int64_t a = tiled ? cl.toff[t] : cursors[c * (tiles + 1) + t];
      const int64_t b = tiled ? cl.toff[t + 1] : cursors[c * (tiles + 1) + t + 1];
      const int64_t shift = tiled ? 0 : t0;
      for (int64_t i = a + threadIdx.x; i < b; i += blockDim.x) {  // distinct j per client
        const int64_t j = index_at(cl, i) - shift;
        acc[j] = __dadd_rn(acc[j], __dmul_rn(cl.w, value_at(cl, i)));  // no FMA: exact
      }
    }
    __syncthreads();  // the next client adds after this one: fixed order per element
  }
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    if (out64) {
      out64[t0 + j] = acc[j];
    } else {
      const double b = base ? static_cast<double>(base[t0 + j]) : 0.0;
      out32[t0 + j] = static_cast<float>(__dadd_rn(b, __dmul_rn(lr, acc[j])));
    }
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

// Checks out/base and launches the three kernels over host-described clients.
void launch(std::vector<Client>& host, const at::Tensor& out,
            const std::optional<at::Tensor>& base, double lr) {
  const size_t C = host.size();
  const int64_t numel = out.numel();
  const at::Device device = out.device();
  const bool accumulate = out.scalar_type() == at::kDouble;
  const float* basep = nullptr;
  if (base.has_value()) {
    TORCH_CHECK_VALUE(!accumulate, "sparsefl.aggregate: a float64 out accumulates; base and "
                      "lr do not apply");
    TORCH_CHECK_VALUE(base->device() == device && base->scalar_type() == at::kFloat &&
                          base->is_contiguous() && base->numel() == numel,
                      "sparsefl.aggregate: base must be a contiguous float32 tensor like out");
    basep = base->data_ptr<float>();
  }
  TORCH_CHECK_VALUE(!accumulate || lr == 1.0, "sparsefl.aggregate: a float64 out "
                    "accumulates; base and lr do not apply");
  if (C == 0 || numel == 0) {
    if (!accumulate) out.copy_(basep ? *base : at::zeros_like(out));
    return;
  }
  auto bytes = at::empty({static_cast<int64_t>(C * sizeof(Client))},
                         at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(bytes.data_ptr(), host.data(), C * sizeof(Client));
  auto dev_bytes = bytes.to(device, /*non_blocking=*/true);
  const auto* clients = reinterpret_cast<const Client*>(dev_bytes.data_ptr());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles = (numel + kTile - 1) / kTile;

  auto flags = at::zeros({static_cast<int64_t>(C)}, out.options().dtype(at::kInt));
  check_kernel<<<static_cast<unsigned>(C), kThreads, 0, stream>>>(clients, numel, tiles,
                                                                   flags.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto flags_host = flags.cpu();  // the one synchronisation: raise before writing
  for (size_t c = 0; c < C; ++c)
    TORCH_CHECK_VALUE(flags_host.data_ptr<int32_t>()[c] == 0, "sparsefl.aggregate: payload ", c,
                      " has indices not strictly ascending in [0, ", numel,
                      ") (or a malformed tile structure) or a value that is not finite");

  bool any_flat = false;
  for (const Client& c : host) any_flat |= c.kind == kFlat;
  at::Tensor cursors;
  const int64_t* cursorp = nullptr;
  if (any_flat) {
    cursors = at::empty({static_cast<int64_t>(C) * (tiles + 1)}, out.options().dtype(at::kLong));
    const dim3 cgrid(static_cast<unsigned>((tiles + 1 + kThreads - 1) / kThreads),
                     static_cast<unsigned>(std::min<size_t>(C, kMaxGridY)));
    cursor_kernel<<<cgrid, kThreads, 0, stream>>>(clients, static_cast<int64_t>(C), tiles,
                                                  cursors.data_ptr<int64_t>());
    cursorp = cursors.data_ptr<int64_t>();
  }
  tile_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
      clients, static_cast<int64_t>(C), cursorp, tiles, numel, basep,
      accumulate ? nullptr : out.data_ptr<float>(),
      accumulate ? out.data_ptr<double>() : nullptr, lr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_common(size_t C, size_t n_idx, at::ArrayRef<double> weights, const at::Tensor& out,
                  double lr) {
  TORCH_CHECK_VALUE(n_idx == C && weights.size() == C,
                    "sparsefl.aggregate: list lengths differ");
  TORCH_CHECK_VALUE(out.is_cuda() && (out.scalar_type() == at::kFloat ||
                                      out.scalar_type() == at::kDouble) &&
                        out.is_contiguous() && out.dim() == 1,
                    "sparsefl.aggregate: out must be a contiguous 1-D float32 (or float64, "
                    "to accumulate) CUDA tensor");
  TORCH_CHECK_VALUE(std::isfinite(lr), "sparsefl.aggregate: lr must be finite");
  for (size_t c = 0; c < C; ++c)
    TORCH_CHECK_VALUE(std::isfinite(weights[c]), "sparsefl.aggregate: weight ", c,
                      " is not finite");
}

Client values_of(const at::Tensor& vv, double w, size_t c, const at::Device& device) {
  TORCH_CHECK_VALUE(vv.device() == device && vv.dim() == 1 && vv.is_contiguous(),
                    "sparsefl.aggregate: values[", c, "] must be contiguous 1-D on ", device);
  Client cl{};
  cl.val = vv.data_ptr();
  cl.nnz = vv.numel();
  cl.w = w;
  cl.vdtype = vdtype_code(vv.scalar_type());
  cl.idx64 = 1;
  return cl;
}

void sparse_aggregate_cuda(at::TensorList indices, at::TensorList values,
                           at::ArrayRef<double> weights, const at::Tensor& out,
                           const std::optional<at::Tensor>& base, double lr) {
  const size_t C = values.size();
  check_common(C, indices.size(), weights, out, lr);
  const int64_t numel = out.numel();
  const at::Device device = out.device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<Client> host(C);
  for (size_t c = 0; c < C; ++c) {
    const auto& iv = indices[c];
    const auto& vv = values[c];
    Client& cl = host[c] = values_of(vv, weights[c], c, device);
    const bool dense = iv.numel() == 0 && vv.numel() == numel && numel > 0;
    cl.kind = dense ? kDense : kFlat;
    if (!dense) {
      TORCH_CHECK_VALUE(iv.device() == device && iv.dim() == 1 && iv.is_contiguous() &&
                            (iv.scalar_type() == at::kLong || iv.scalar_type() == at::kInt) &&
                            iv.numel() == vv.numel(),
                        "sparsefl.aggregate: indices[", c, "] must be contiguous 1-D int64 or ",
                        "int32 on ", device, " with one index per value");
      cl.idx = iv.data_ptr();
      cl.idx64 = iv.scalar_type() == at::kLong;
    }
  }
  launch(host, out, base, lr);
}

// The tiled payloads of sparsefl/ops/tiled.py: their tile offsets are the cursors.
void sparse_aggregate_tiled_cuda(at::TensorList offsets, at::TensorList local,
                                 at::TensorList values, at::ArrayRef<double> weights,
                                 const at::Tensor& out, const std::optional<at::Tensor>& base,
                                 double lr) {
  const size_t C = values.size();
  check_common(C, local.size(), weights, out, lr);
  TORCH_CHECK_VALUE(offsets.size() == C, "sparsefl.aggregate: list lengths differ");
  const int64_t numel = out.numel();
  const int64_t tiles = (numel + kTile - 1) / kTile;
  const at::Device device = out.device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<Client> host(C);
  for (size_t c = 0; c < C; ++c) {
    const auto& ov = offsets[c];
    const auto& lv = local[c];
    const auto& vv = values[c];
    Client& cl = host[c] = values_of(vv, weights[c], c, device);
    if (ov.numel() == 0 && lv.numel() == 0 && vv.numel() == numel && numel > 0) {
      cl.kind = kDense;
      continue;
    }
    TORCH_CHECK_VALUE(ov.device() == device && ov.scalar_type() == at::kInt && ov.dim() == 1 &&
                          ov.is_contiguous() && ov.numel() == tiles + 1,
                      "sparsefl.aggregate: offsets[", c, "] must be a contiguous 1-D int32 ",
                      "tensor with ", tiles + 1, " entries (tiles of ", kTile, ") on ", device);
    TORCH_CHECK_VALUE(lv.device() == device && lv.scalar_type() == at::kShort &&
                          lv.dim() == 1 && lv.is_contiguous() && lv.numel() == vv.numel(),
                      "sparsefl.aggregate: local[", c, "] must be a contiguous 1-D int16 ",
                      "tensor with one index per value on ", device);
    cl.kind = kTiled;
    cl.idx = lv.data_ptr();
    cl.toff = ov.data_ptr<int32_t>();
  }
  launch(host, out, base, lr);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsefl_C, CUDA, m) {
  m.impl("sparse_aggregate", &sparse_aggregate_cuda);
  m.impl("sparse_aggregate_tiled", &sparse_aggregate_tiled_cuda);
}

}  // namespace sparsefl
