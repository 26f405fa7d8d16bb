// Fused SAM / ASAM / two-direction perturbation, CUDA backend (multi-tensor).
//
// Same definition as csrc/cpu/sam.cpp and sparsefl/ops/reference/sam.py.
// All tensors are cut into fixed chunks of kChunk elements; a table of (tensor, begin, len)
// travels to the device once per call, so three launches cover any number of tensors:
//
//   1. sumsq_kernel   one CUDA block per chunk: double per-thread sums of squares (as the
//                     reference), a fixed-shape tree reduction, one double partial per
//                     chunk (no atomics).
//   2. finish_kernel  one block adds the partials in a fixed order -> norms[2] (double),
//                     left on the device: no host synchronisation anywhere.
//   3. apply_kernel   one block per chunk reads norms and writes out (+ backup).
//
// Deterministic bit-for-bit for a given input and GPU, and CUDA-graph capturable.  rho
// stays double until the scale float(rho / (n + eps)) is formed, and the per-element
// arithmetic uses round-to-nearest intrinsics (__fmul_rn, __fadd_rn), which nvcc never
// contracts into FMAs: the perturbed weights are the reference's float32 expression,
// evaluated in its order, bit for bit (the norm differs from the reference's only by the
// order of a float64 sum).  Every tensor argument is checked (dtype, shape, device,
// length) before anything is written: a mismatch is a TypeError/ValueError, never a
// write past a buffer.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

namespace sparsefl {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per CUDA block

struct Seg {
  const void* w;
  const void* g1;
  const void* g2;
  void* out;
  void* backup;
  int32_t dtype;  // 0 float, 1 half, 2 bfloat16
  int32_t adaptive;
  double rho;
};

struct Chunk {
  int32_t seg;
  int64_t begin;
  int64_t len;
};

template <typename T>
__device__ __forceinline__ float ld(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

__device__ __forceinline__ float load(const void* p, int32_t dtype, int64_t i) {
  switch (dtype) {
    case 1: return ld<c10::Half>(p, i);
    case 2: return ld<c10::BFloat16>(p, i);
    default: return ld<float>(p, i);
  }
}

__device__ __forceinline__ void store(void* p, int32_t dtype, int64_t i, float v) {
  switch (dtype) {
    case 1: static_cast<c10::Half*>(p)[i] = static_cast<c10::Half>(v); break;
    case 2: static_cast<c10::BFloat16*>(p)[i] = static_cast<c10::BFloat16>(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ void copy_elem(const void* src, void* dst, int32_t dtype, int64_t i) {
  if (dtype == 0) static_cast<float*>(dst)[i] = static_cast<const float*>(src)[i];
  else static_cast<uint16_t*>(dst)[i] = static_cast<const uint16_t*>(src)[i];
}

// Fixed-shape block reduction of one double per thread.
__device__ double block_sum(double v, double* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  return smem[0];
}

__global__ void sumsq_kernel(const Seg* segs, const Chunk* chunks, float eta, double* partials) {
  __shared__ double smem[kThreads];
  const Chunk c = chunks[blockIdx.x];
  const Seg s = segs[c.seg];
  double a1 = 0.0, a2 = 0.0;
  for (int64_t k = threadIdx.x; k < c.len; k += blockDim.x) {
    const int64_t i = c.begin + k;
    double g = load(s.g1, s.dtype, i);
    if (s.adaptive) g *= static_cast<double>(__fadd_rn(fabsf(load(s.w, s.dtype, i)), eta));
    a1 += g * g;
    if (s.g2) {
      const double h = load(s.g2, s.dtype, i);
      a2 += h * h;
    }
  }
  const double t1 = block_sum(a1, smem);
  __syncthreads();
  const double t2 = block_sum(a2, smem);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = t1;
    partials[2 * blockIdx.x + 1] = t2;
  }
}

__global__ void finish_kernel(const double* partials, int64_t nchunks, double* norms) {
  __shared__ double smem[kThreads];
  double a1 = 0.0, a2 = 0.0;
  for (int64_t b = threadIdx.x; b < nchunks; b += blockDim.x) {
    a1 += partials[2 * b];
    a2 += partials[2 * b + 1];
  }
  const double t1 = block_sum(a1, smem);
  __syncthreads();
  const double t2 = block_sum(a2, smem);
  if (threadIdx.x == 0) {
    norms[0] = sqrt(t1);
    norms[1] = sqrt(t2);
  }
}

__global__ void apply_kernel(const Seg* segs, const Chunk* chunks, const double* norms,
                             double rho2, float eta, double eps) {
  const Chunk c = chunks[blockIdx.x];
  const Seg s = segs[c.seg];
  const double n1 = norms[0], n2 = norms[1];
  const bool perturb = isfinite(n1) && isfinite(n2);
  const float s1 = static_cast<float>(s.rho / (n1 + eps));
  const float s2 = static_cast<float>(rho2 / (n2 + eps));
  for (int64_t k = threadIdx.x; k < c.len; k += blockDim.x) {
    const int64_t i = c.begin + k;
    if (s.backup) copy_elem(s.w, s.backup, s.dtype, i);
    const float w = load(s.w, s.dtype, i);
    float o = w;
    if (perturb) {
      const float g = load(s.g1, s.dtype, i);
      // the reference's order, e = (T*T) * g * s, then w + e; _rn: no FMA contraction
      if (s.adaptive) {
        const float t = __fadd_rn(fabsf(w), eta);
        o = __fadd_rn(w, __fmul_rn(__fmul_rn(__fmul_rn(t, t), g), s1));
      } else {
        o = __fadd_rn(w, __fmul_rn(g, s1));
      }
      if (s.g2) o = __fsub_rn(o, __fmul_rn(load(s.g2, s.dtype, i), s2));
    }
    store(s.out, s.dtype, i, o);
  }
}

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default:
      TORCH_CHECK_TYPE(false, "sparsefl: unsupported dtype ", t, " (float32, float16, bfloat16)");
  }
}

// Copies a host vector of POD structs to the device, as bytes, on the current stream.
template <typename T>
at::Tensor to_device(const std::vector<T>& v, const at::Device& device) {
  auto host = at::empty({static_cast<int64_t>(v.size() * sizeof(T))},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(T));
  return host.to(device, /*non_blocking=*/true);
}

at::Tensor perturb_cuda(at::TensorList w, at::TensorList g1, at::TensorList g2,
                        at::TensorList out, at::TensorList backup, at::ArrayRef<double> rho,
                        double rho2, const c10::List<bool>& adaptive, double eta, double eps) {
  const size_t n = w.size();
  TORCH_CHECK_VALUE(n > 0, "sparsefl: the CUDA backend needs at least one tensor");
  TORCH_CHECK_VALUE(g1.size() == n && out.size() == n, "sparsefl: list lengths differ");
  TORCH_CHECK_VALUE(g2.empty() || g2.size() == n,
                    "sparsefl: second gradient list length differs");
  TORCH_CHECK_VALUE(backup.empty() || backup.size() == n,
                    "sparsefl: backup list length differs");
  TORCH_CHECK_VALUE(rho.size() == n && adaptive.size() == n,
                    "sparsefl: rho/adaptive per tensor");
  TORCH_CHECK_VALUE(eps > 0.0, "sparsefl: eps must be > 0");
  const at::Device device = w[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "sparsefl: the CUDA backend got tensors on ", device);
  // Every argument against w[i] before any pointer is taken: one dtype per tensor (it
  // decides the element width the kernels read and write), same shape, same device.
  auto check = [&](const at::Tensor& t, const at::Tensor& ref, const char* what, size_t i) {
    TORCH_CHECK_VALUE(t.device() == device, "sparsefl: ", what, "[", i, "] is on ",
                      t.device(), ", params[0] on ", device);
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "sparsefl: ", what, "[", i,
                     "] has dtype ", t.scalar_type(), ", params[", i, "] ", ref.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "sparsefl: ", what, "[", i, "] has shape ",
                      t.sizes(), ", params[", i, "] ", ref.sizes());
  };
  for (size_t i = 0; i < n; ++i) {
    check(w[i], w[i], "params", i);
    check(g1[i], w[i], "grads", i);
    check(out[i], w[i], "out", i);
    if (!g2.empty()) check(g2[i], w[i], "grads2", i);
    if (!backup.empty()) check(backup[i], w[i], "backup", i);
  }
  c10::cuda::CUDAGuard guard(device);

  std::vector<at::Tensor> keep;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
  auto in = [&](const at::Tensor& t) -> const void* {
    TORCH_CHECK(t.device() == device, "sparsefl: all tensors must be on ", device);
    keep.push_back(t.contiguous());
    return keep.back().data_ptr();
  };
  auto outp = [&](const at::Tensor& t) -> void* {
    TORCH_CHECK(t.device() == device, "sparsefl: all tensors must be on ", device);
    if (t.is_contiguous()) return t.data_ptr();
    copy_back.emplace_back(t, at::empty_like(t, at::MemoryFormat::Contiguous));
    return copy_back.back().second.data_ptr();
  };
  std::vector<Seg> segs(n);
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    Seg& s = segs[i];
    s.dtype = dtype_code(w[i].scalar_type());
    s.adaptive = adaptive[i];
    s.rho = rho[i];
    const bool in_place = out[i].is_same(w[i]) && w[i].is_contiguous();
    s.w = in_place ? w[i].data_ptr() : in(w[i]);
    s.g1 = in(g1[i]);
    s.g2 = g2.empty() ? nullptr : in(g2[i]);
    s.out = in_place ? w[i].data_ptr() : outp(out[i]);
    s.backup = backup.empty() ? nullptr : outp(backup[i]);
    for (int64_t b = 0; b < w[i].numel(); b += kChunk)
      chunks.push_back({static_cast<int32_t>(i), b, std::min(kChunk, w[i].numel() - b)});
  }
  auto norms = at::zeros({2}, at::TensorOptions().dtype(at::kDouble).device(device));
  const int64_t nc = static_cast<int64_t>(chunks.size());
  if (nc > 0) {
    auto segs_d = to_device(segs, device);
    auto chunks_d = to_device(chunks, device);
    auto partials = at::empty({2 * nc}, norms.options());
    auto stream = c10::cuda::getCurrentCUDAStream();
    const auto* sp = reinterpret_cast<const Seg*>(segs_d.data_ptr());
    const auto* cp = reinterpret_cast<const Chunk*>(chunks_d.data_ptr());
    sumsq_kernel<<<nc, kThreads, 0, stream>>>(sp, cp, static_cast<float>(eta),
                                              partials.data_ptr<double>());
    finish_kernel<<<1, kThreads, 0, stream>>>(partials.data_ptr<double>(), nc,
                                              norms.data_ptr<double>());
    apply_kernel<<<nc, kThreads, 0, stream>>>(sp, cp, norms.data_ptr<double>(), rho2,
                                              static_cast<float>(eta), eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (auto& [dst, tmp] : copy_back) dst.copy_(tmp);
  return norms.to(at::kFloat);
}

// The exact restore: same dtype, shape and device, or an error (no conversion, no
// broadcast: a restore that changed the weights would be silent corruption).
void copy_cuda(at::TensorList dst, at::TensorList src) {
  TORCH_CHECK_VALUE(dst.size() == src.size(), "sparsefl: restore list lengths differ");
  for (size_t i = 0; i < dst.size(); ++i) {
    TORCH_CHECK_VALUE(dst[i].device() == src[i].device() && dst[i].is_cuda(),
                      "sparsefl: restore[", i, "]: ", src[i].device(), " -> ",
                      dst[i].device());
    TORCH_CHECK_TYPE(dst[i].scalar_type() == src[i].scalar_type(), "sparsefl: restore[", i,
                     "]: dtype ", src[i].scalar_type(), " -> ", dst[i].scalar_type());
    TORCH_CHECK_VALUE(dst[i].sizes() == src[i].sizes(), "sparsefl: restore[", i,
                      "]: shape ", src[i].sizes(), " -> ", dst[i].sizes());
    dst[i].copy_(src[i], /*non_blocking=*/true);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsefl_C, CUDA, m) {
  m.impl("perturb", &perturb_cuda);
  m.impl("copy_", &copy_cuda);
}

}  // namespace sparsefl
