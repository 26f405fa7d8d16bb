// Exact magnitude top-k, CUDA backend (definition: sparsefl/ops/reference/topk.py).
//
// Radix select on key = bits(|float(x)|) & 0x7fffffff, 8-bit digits from the top
// (8 + 8 + 8 + 7 bits), the whole selection on the device:
//   hist_kernel    per block: a shared-memory histogram of the current digit over the keys
//                  matching the prefix found so far, added to a global histogram with
//                  integer atomics (exact and order-free)
//   pick_kernel    one thread walks the 256 bins from the top: the bin holding the k-th
//                  key, how many keys lie above it; updates prefix and remaining k on device
//   count_kernel   per block: keys equal to the k-th key (the ties)
//   scan_kernel    one block: exclusive scan of the per-block tie counts (each thread a
//                  contiguous segment, the 256 segment sums scanned in shared memory)
//   mask_kernel    coalesced: round r of a block reads elements start + r*256 + tid; a
//                  warp ballot + popcount and the 8 warp counts give each tie its rank
//                  in index order (lower index wins)
// Compression compacts the mask with at::nonzero (sorted); the error-feedback residuals
// are updated from the flat buffer with device copies (no host sync per tensor).  NaN is
// refused with one host check (one flag per tensor, one read) before the selection.
// Not yet run on a GPU in this project: compile-checked by tests/test_cuda_compile.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

namespace sparsefl {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;
constexpr int64_t kBlockElems = kThreads * kPerThread;

__device__ __forceinline__ uint32_t key_at(const float* x, int64_t i) {
  return __float_as_uint(x[i]) & 0x7fffffffu;
}

__global__ void hist_kernel(const float* x, int64_t n, const uint32_t* prefix, int shift,
                            int width, unsigned long long* hist) {
  __shared__ unsigned int h[256];
  for (int b = threadIdx.x; b < 256; b += blockDim.x) h[b] = 0;
  __syncthreads();
  const uint32_t p = *prefix;
  const uint32_t mask = (1u << width) - 1u;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kBlockElems;
  for (int64_t i = start + threadIdx.x; i < min(n, start + kBlockElems); i += blockDim.x) {
    const uint32_t k = key_at(x, i);
    if ((k >> (shift + width)) == p) atomicAdd(&h[(k >> shift) & mask], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b <= static_cast<int>(mask); b += blockDim.x)
    if (h[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(h[b]));
}

// Picks the bin of the remaining-th largest key, extends the prefix with it, and leaves
// in *remaining how many keys of that bin are still to be taken.
__global__ void pick_kernel(unsigned long long* hist, int width, uint32_t* prefix,
                            long long* remaining) {
  long long above = 0;
  const long long k = *remaining;
  int bin = 0;
  for (int b = (1 << width) - 1; b >= 0; --b) {
    const long long c = static_cast<long long>(hist[b]);
    if (above + c >= k) { bin = b; break; }
    above += c;
  }
  *remaining = k - above;
  *prefix = (*prefix << width) | static_cast<uint32_t>(bin);
  for (int b = 0; b < (1 << width); ++b) hist[b] = 0;  // ready for the next pass
}

__global__ void count_kernel(const float* x, int64_t n, const uint32_t* kth, long long* counts) {
  __shared__ unsigned int c;
  if (threadIdx.x == 0) c = 0;
  __syncthreads();
  const uint32_t key = *kth;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kBlockElems;
  unsigned int mine = 0;
  for (int64_t i = start + threadIdx.x; i < min(n, start + kBlockElems); i += blockDim.x)
    mine += key_at(x, i) == key;
  atomicAdd(&c, mine);
  __syncthreads();
  if (threadIdx.x == 0) counts[blockIdx.x] = c;
}

// In place, one block of kThreads: counts[b] <- ties in blocks before b.
__global__ void scan_kernel(long long* counts, int64_t blocks) {
  __shared__ long long sums[kThreads];
  const int64_t per = (blocks + kThreads - 1) / kThreads;
  const int64_t lo = min(blocks, threadIdx.x * per), hi = min(blocks, lo + per);
  long long s = 0;
  for (int64_t b = lo; b < hi; ++b) s += counts[b];
  sums[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {  // 256 segment sums: exclusive scan, integers (exact)
    long long run = 0;
    for (int t = 0; t < kThreads; ++t) {
      const long long c = sums[t];
      sums[t] = run;
      run += c;
    }
  }
  __syncthreads();
  long long run = sums[threadIdx.x];
  for (int64_t b = lo; b < hi; ++b) {
    const long long c = counts[b];
    counts[b] = run;
    run += c;
  }
}

__global__ void mask_kernel(const float* x, int64_t n, const uint32_t* kth,
                            const long long* need_ptr, const long long* eq_before,
                            bool* out) {
  constexpr int kWarps = kThreads / 32;
  __shared__ int warp_ties[kWarps];
  const uint32_t key = *kth;
  const long long need = *need_ptr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kBlockElems;
  long long base = eq_before[blockIdx.x];  // ties before this round, in index order
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t i = start + static_cast<int64_t>(r) * kThreads + threadIdx.x;
    const bool valid = i < n;
    const uint32_t k = valid ? key_at(x, i) : 0u;
    const bool eq = valid && k == key;
    const unsigned ballot = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    long long before = base + __popc(ballot & ((1u << lane) - 1u));
    long long total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += warp_ties[w];
      total += warp_ties[w];
    }
    if (valid) out[i] = k > key || (eq && before < need);
    __syncthreads();  // warp_ties is rewritten by the next round
    base += total;
  }
}

// Boolean mask (flat) of the k largest |x| of a flat float32 tensor.
at::Tensor flat_mask(const at::Tensor& flat, int64_t k) {
  const int64_t n = flat.numel();
  auto opts = flat.options();
  if (k == 0) return at::zeros({n}, opts.dtype(at::kBool));
  if (k == n) return at::ones({n}, opts.dtype(at::kBool));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  auto hist = at::zeros({256}, opts.dtype(at::kLong));
  auto prefix = at::zeros({1}, opts.dtype(at::kInt));
  auto remaining = at::full({1}, k, opts.dtype(at::kLong));
  auto* hp = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  auto* pp = reinterpret_cast<uint32_t*>(prefix.data_ptr<int32_t>());
  auto* rp = reinterpret_cast<long long*>(remaining.data_ptr<int64_t>());
  const float* xp = flat.data_ptr<float>();
  const int passes[4][2] = {{23, 8}, {15, 8}, {7, 8}, {0, 7}};
  for (const auto& pw : passes) {
    hist_kernel<<<blocks, kThreads, 0, stream>>>(xp, n, pp, pw[0], pw[1], hp);
    pick_kernel<<<1, 1, 0, stream>>>(hp, pw[1], pp, rp);
  }
  auto counts = at::empty({blocks}, opts.dtype(at::kLong));
  auto* cp = reinterpret_cast<long long*>(counts.data_ptr<int64_t>());
  count_kernel<<<blocks, kThreads, 0, stream>>>(xp, n, pp, cp);
  scan_kernel<<<1, kThreads, 0, stream>>>(cp, blocks);
  auto out = at::empty({n}, opts.dtype(at::kBool));
  mask_kernel<<<blocks, kThreads, 0, stream>>>(xp, n, pp, rp, cp, out.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// dtypes and devices, then NaN: one flag per tensor on the device, one read (no copy).
void check_inputs(at::TensorList xs) {
  TORCH_CHECK_VALUE(!xs.empty(), "sparsefl.topk: no tensors");
  std::vector<at::Tensor> nan;
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto st = xs[i].scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                     "sparsefl.topk: tensors[", i, "] has dtype ", st);
    TORCH_CHECK_VALUE(xs[i].device() == xs[0].device(), "sparsefl.topk: mixed devices");
    nan.push_back(at::isnan(xs[i]).any().reshape({1}));
  }
  TORCH_CHECK_VALUE(!at::cat(nan).any().item<bool>(), "sparsefl.topk: input contains NaN; "
                    "the magnitude order of NaN is undefined (clean or mask the tensor first)");
}

// The tensors as one flat float32 buffer (the selection reads float keys).
at::Tensor flat_float(at::TensorList xs) {
  std::vector<at::Tensor> flat;
  for (const auto& x : xs) flat.push_back(x.reshape({-1}).to(at::kFloat));
  return flat.size() == 1 ? flat[0].contiguous() : at::cat(flat);
}

std::vector<at::Tensor> topk_mask_cuda(at::TensorList xs, int64_t k) {
  if (xs.empty()) return {};
  c10::cuda::CUDAGuard guard(xs[0].device());
  check_inputs(xs);
  auto all = flat_float(xs);
  TORCH_CHECK_VALUE(k >= 0 && k <= all.numel(), "sparsefl.topk: k out of range");
  auto mask = flat_mask(all, k);
  std::vector<at::Tensor> out;
  int64_t off = 0;
  for (const auto& x : xs) {
    out.push_back(mask.narrow(0, off, x.numel()).view(x.sizes()).clone());
    off += x.numel();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_compress_cuda(at::TensorList xs, at::TensorList residual,
                                                      int64_t k) {
  TORCH_CHECK_VALUE(!xs.empty(), "sparsefl.topk: topk_compress needs at least one tensor");
  c10::cuda::CUDAGuard guard(xs[0].device());
  check_inputs(xs);  // refuses NaN before the residual is touched
  TORCH_CHECK_VALUE(residual.empty() || residual.size() == xs.size(),
                    "sparsefl.topk: one residual per tensor");
  int64_t total = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    total += xs[i].numel();
    if (!residual.empty()) {
      TORCH_CHECK_VALUE(residual[i].sizes() == xs[i].sizes() &&
                            residual[i].scalar_type() == xs[i].scalar_type() &&
                            residual[i].device() == xs[i].device(),
                        "sparsefl.topk: residual[", i, "] must match tensors[", i, "]");
    }
  }
  TORCH_CHECK_VALUE(k >= 0 && k <= total, "sparsefl.topk: k out of range");
  std::vector<at::Tensor> src;
  for (size_t i = 0; i < xs.size(); ++i) {
    if (residual.empty()) {
      src.push_back(xs[i].reshape({-1}));
    } else {
      residual[i].add_(xs[i]);
      src.push_back(residual[i].reshape({-1}));
    }
  }
  auto flat = src.size() == 1 ? src[0].contiguous() : at::cat(src);
  auto idx = at::nonzero(flat_mask(flat.to(at::kFloat), k)).view({-1});
  auto values = flat.index_select(0, idx);
  if (!residual.empty()) {  // what was sent is no longer owed: zero it, copy back
    flat.index_fill_(0, idx, 0);  // values were gathered above
    int64_t off = 0;
    for (const auto& r : residual) {  // (a no-op when flat is the one residual's storage)
      r.copy_(flat.narrow(0, off, r.numel()).view(r.sizes()));
      off += r.numel();
    }
  }
  return {idx, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsefl_C, CUDA, m) {
  m.impl("topk_mask", &topk_mask_cuda);
  m.impl("topk_compress", &topk_compress_cuda);
}

}  // namespace sparsefl
