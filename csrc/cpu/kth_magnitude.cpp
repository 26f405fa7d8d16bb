// The k-th largest |x| of one tensor, with how many entries lie above it and on it:
// SparsyFed's activation threshold (sparsefl/nn/powerprop.py act_cut), once per round
// ("first_batch") or on every batch ("per_batch").
//
// Why not the top-k kernels' radix select: a layer input of a 16-image batch holds 10^4-10^5
// entries, where three histogram passes (2^11 bins, zeroed, merged and scanned per call;
// the ~50% zeros of a post-ReLU input all hit one bin, a serial chain of increments) cost
// 0.3-0.6 ms.  Here, as in a sample sort:
//   0. with a caller's bracket (act_cut, and the fused layer's select_cut, pass the
//      previous batch's threshold -+ a margin they adapt: consecutive batches' cuts move
//      by 3-30%), steps 3-4 on it first,
//      and steps 1-2 only if it misses: in a training round the sample and its order
//      statistics were 40% of the call, the pass 32%;
//   1. sample up to 4,096 keys (up to 512 runs of 8 consecutive entries, one run at a
//      fixed pseudo-random offset in each 1/512 of x: a cache line per run, and no stride
//      that would land on the same pixel of every plane);
//   2. take the sample's order statistics a few standard deviations either side of rank
//      k * s / n as a bracket [lo, hi] (two radix selections on the sample);
//   3. one vector pass over x: count keys > hi and keys == 0, copy the keys inside
//      [max(lo, 1), hi] (zeros are counted, never copied: a post-ReLU input has ~half);
//   4. if the k-th largest falls in the bracket, radix-select it among the candidates
//      (a few percent of x); otherwise (the sample misled: rare) among all keys.
// Exact either way: the result never depends on the sample, only the time does.
//
// key(x) = bits(float(x)) & 0x7fffffff orders exactly like |x| (topk.cpp); NaN keys lie
// above 0x7f800000 and are refused.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dtype.h"
#include "simd.h"
#include "topk_select.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <tuple>
#include <vector>

namespace sparsefl {
namespace {

constexpr uint32_t kNaNKey = 0x7f800000u;

struct PassOut {
  int64_t gt = 0;     // keys > hi
  int64_t zeros = 0;  // keys == 0
  int64_t w = 0;      // candidates written
  uint32_t kmax = 0;  // NaN check
};

// Step 3 over keys[i0, n) one at a time, on raw float32 bits (the sign masked here): the
// portable path, and the vector paths' tails.  Candidates in [lo, hi] (lo >= 1) go to cand
// (room for every key), branch-free: which keys fall inside is data.
inline void pass_scalar(const uint32_t* bits, int64_t i0, int64_t n, uint32_t lo, uint32_t hi,
                        uint32_t* cand, PassOut& o) {
  for (int64_t i = i0; i < n; ++i) {
    const uint32_t k = bits[i] & 0x7fffffffu;
    o.kmax = std::max(o.kmax, k);
    o.gt += k > hi;
    o.zeros += k == 0;
    cand[o.w] = k;
    o.w += (k >= lo) & (k <= hi);
  }
}

#if defined(SFL_X86)
// 16 keys a step; keys are < 2^31, so the signed compares order them.
SFL_AVX512 void pass_avx512(const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi,
                            uint32_t* cand, PassOut& o) {
  const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(lo));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int32_t>(hi));
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i vnan = _mm512_set1_epi32(static_cast<int32_t>(kNaNKey));
  const __m512i one = _mm512_set1_epi32(1);
  __mmask16 nan = 0;  // (a compare, not _mm512_max_epi32: GCC 12's header warns on it)
  __m512i vgt = zero, vzeros = zero;  // per-lane counts: masked adds, no popcount chain
  int64_t i = 0, w = o.w;
  for (; i + 16 <= n; i += 16) {
    const __m512i k = _mm512_and_si512(_mm512_loadu_si512(keys + i), absmask);
    nan |= _mm512_cmpgt_epi32_mask(k, vnan);
    vgt = _mm512_mask_add_epi32(vgt, _mm512_cmpgt_epi32_mask(k, vhi), vgt, one);
    vzeros = _mm512_mask_add_epi32(vzeros, _mm512_cmpeq_epi32_mask(k, zero), vzeros, one);
    const __mmask16 in = _mm512_cmpge_epi32_mask(k, vlo) & _mm512_cmple_epi32_mask(k, vhi);
    // compress in a register and store all 16 (+16 slack), every step: a branch on "any
    // candidate here" mispredicts (a few percent of keys are candidates, so a quarter of
    // the steps have one), and a compress straight to memory is microcoded on Zen 4
    _mm512_storeu_si512(cand + w, _mm512_maskz_compress_epi32(in, k));
    w += __builtin_popcount(in);
  }
  if (nan) o.kmax = 0x7fffffffu;
  // a lane counts at most one key per step: below 2^31 for any part under 2^35 keys
  o.gt += _mm512_reduce_add_epi32(vgt);
  o.zeros += _mm512_reduce_add_epi32(vzeros);
  o.w = w;
  pass_scalar(keys, i, n, lo, hi, cand, o);  // the tail
}

// Left-packing permutations for AVX2 (which has no compress): for each 8-bit lane mask,
// the indices of its set lanes first.
struct PackTable {
  alignas(32) uint32_t idx[256][8];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      int w = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) idx[m][w++] = static_cast<uint32_t>(l);
      for (; w < 8; ++w) idx[m][w] = 0;
    }
  }
};
const PackTable kPackTable;

// 8 keys a step, counts as per-lane vector sums; candidates left-packed by a permutation
// from the table and stored every step (8 slack): no branch on whether a step has any.
SFL_AVX2 void pass_avx2(const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi,
                        uint32_t* cand, PassOut& o) {
  const __m256i vlo1 = _mm256_set1_epi32(static_cast<int32_t>(lo) - 1);
  const __m256i vhi = _mm256_set1_epi32(static_cast<int32_t>(hi));
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  const __m256i zero = _mm256_setzero_si256();
  __m256i vmax = zero, vgt = zero, vzeros = zero;
  int64_t i = 0, w = o.w;
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_and_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i)), absmask);
    vmax = _mm256_max_epi32(vmax, k);
    const __m256i above = _mm256_cmpgt_epi32(k, vhi);
    vgt = _mm256_sub_epi32(vgt, above);  // compares give -1 where true
    vzeros = _mm256_sub_epi32(vzeros, _mm256_cmpeq_epi32(k, zero));
    // lo <= k <= hi  <=>  k > lo - 1 and not k > hi
    const __m256i in = _mm256_andnot_si256(above, _mm256_cmpgt_epi32(k, vlo1));
    const unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(in)));
    const __m256i perm =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kPackTable.idx[m]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cand + w),
                        _mm256_permutevar8x32_epi32(k, perm));
    w += __builtin_popcount(m);
  }
  alignas(32) uint32_t mx[8], cg[8], cz[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(mx), vmax);
  _mm256_store_si256(reinterpret_cast<__m256i*>(cg), vgt);
  _mm256_store_si256(reinterpret_cast<__m256i*>(cz), vzeros);
  for (int j = 0; j < 8; ++j) {
    o.kmax = std::max(o.kmax, mx[j]);
    o.gt += cg[j];  // a lane counts at most one key per step: below 2^32 for parts < 2^35
    o.zeros += cz[j];
  }
  o.w = w;
  pass_scalar(keys, i, n, lo, hi, cand, o);  // the tail
}
#endif

// Step 3 over raw float32 bits (the sign is masked inside).
void pass_any(const uint32_t* bits, int64_t n, uint32_t lo, uint32_t hi, uint32_t* cand,
              PassOut& o) {
#if defined(SFL_X86)
  if (isa() == Isa::kAvx512) return pass_avx512(bits, n, lo, hi, cand, o);
  if (isa() == Isa::kAvx2) return pass_avx2(bits, n, lo, hi, cand, o);
#endif
  pass_scalar(bits, 0, n, lo, hi, cand, o);
}

struct KthCount {
  uint32_t key;
  int64_t gt;  // keys > key
  int64_t eq;  // keys == key
};

// The k-th largest of n keys that all lie in [lo, hi], by radix selection on 11-bit digits
// below the bits lo and hi share (a bracket's candidates share most of their high bits:
// a digit there would sort them all into one bucket and copy them again for nothing).
uint32_t kth_largest_in(const uint32_t* keys, int64_t n, int64_t k, uint32_t lo, uint32_t hi) {
  if (lo == hi) return lo;
  int shift = 32 - __builtin_clz(lo ^ hi);  // bits [shift, 32) are common
  uint32_t prefix = shift == 32 ? 0u : (lo >> shift) << shift;
  std::vector<uint32_t> cur(keys, keys + n), next;
  std::vector<int64_t> hist;
  while (shift > 0) {
    const int width = std::min(shift, 11);
    shift -= width;
    const uint32_t mask = (1u << width) - 1;
    hist.assign(size_t{1} << width, 0);
    for (const uint32_t v : cur) ++hist[(v >> shift) & mask];
    uint32_t digit = mask;
    for (; digit > 0 && hist[digit] < k; --digit) k -= hist[digit];
    prefix |= digit << shift;
    if (shift == 0) break;
    next.resize(cur.size());
    size_t w = 0;
    for (const uint32_t v : cur) {  // the bucket's keys, branch-free
      next[w] = v;
      w += ((v >> shift) & mask) == digit;
    }
    next.resize(w);
    cur.swap(next);
  }
  return prefix;
}

// The exact answer among keys in [lo, hi] (all of x: [0, 0x7fffffff]; or a bracket's
// candidates), with the counts above and at it.
KthCount among(const uint32_t* keys, int64_t n, int64_t k, uint32_t lo, uint32_t hi) {
  KthCount r;
  r.key = kth_largest_in(keys, n, k, lo, hi);
  r.gt = 0;
  r.eq = 0;
  for (int64_t i = 0; i < n; ++i) r.gt += keys[i] > r.key, r.eq += keys[i] == r.key;
  return r;
}

KthCount kth_count(const at::Tensor& x_in, int64_t k, const char* op,
                   std::optional<std::pair<int64_t, int64_t>> hint = std::nullopt) {
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), op, ": the tensor must be on CPU");
  const auto st = x_in.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": dtype ", st, " is not supported (float32, float16, bfloat16)");
  const int64_t n = x_in.numel();
  TORCH_CHECK_VALUE(k >= 1 && k <= n, op, ": k = ", k, " is outside [1, ", n, "]");
  const at::Tensor x = x_in.contiguous();
  // Keys: float32 bits are read in place (the pass masks the sign); other dtypes once.
  std::vector<uint32_t> own;
  const uint32_t* bits;
  if (st == at::kFloat) {
    bits = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  } else {
    own.resize(n);
    dispatch_float_dtype(st, op, [&](auto tag) {
      using T = decltype(tag);
      const T* xs = x.data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) own[i] = magnitude_key(static_cast<float>(xs[i]));
    });
    bits = own.data();
  }
  auto all_keys = [&]() {
    std::vector<uint32_t> keys(n);
    uint32_t mx = 0;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, keys[i] = bits[i] & 0x7fffffffu);
    TORCH_CHECK_VALUE(mx <= kNaNKey, op, ": the tensor contains NaN");
    return keys;
  };
  if (n < 4096) {  // small: selection over every key beats a sample
    auto keys = all_keys();
    return among(keys.data(), n, k, 0u, 0x7fffffffu);
  }
  // 3. + 4. for one bracket [lo, hi] (lo >= 1): the pass, a part per thread, then the
  // answer if the bracket holds it (or every nonzero is kept); nothing on a miss.
  auto try_bracket = [&](uint32_t lo, uint32_t hi) -> std::optional<KthCount> {
    const int nt =
        std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(n / 65536)));
    std::vector<PassOut> outs(nt);
    // candidate buffers with room for a whole part, left uninitialised: only the few
    // candidates are written, so only their pages are touched
    std::vector<std::unique_ptr<uint32_t[]>> cands(nt);
    const int64_t part = (n + nt - 1) / nt;
    for (int t = 0; t < nt; ++t) cands[t].reset(new uint32_t[part + 16]);
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t * part, e = std::min(n, b + part);
        if (b < e) pass_any(bits + b, e - b, lo, hi, cands[t].get(), outs[t]);
      }
    });
    PassOut tot;
    std::vector<uint32_t> cand;
    for (int t = 0; t < nt; ++t) {
      tot.gt += outs[t].gt;
      tot.zeros += outs[t].zeros;
      tot.kmax = std::max(tot.kmax, outs[t].kmax);
      cand.insert(cand.end(), cands[t].get(), cands[t].get() + outs[t].w);
    }
    TORCH_CHECK_VALUE(tot.kmax <= kNaNKey, op, ": the tensor contains NaN");
    const int64_t nc = static_cast<int64_t>(cand.size());
    // where the k-th largest lies: above the bracket (miss), in it, among the keys in
    // [1, lo) (miss), or at zero (lo == 1: everything nonzero lies at or above the bracket)
    if (tot.gt < k && k <= tot.gt + nc) {
      KthCount r = among(cand.data(), nc, k - tot.gt, lo, std::max(lo, hi));
      r.gt += tot.gt;
      return r;
    }
    const int64_t nonzero = n - tot.zeros;
    if (lo == 1 && tot.gt + nc == nonzero && k > nonzero) return KthCount{0u, nonzero, tot.zeros};
    return std::nullopt;
  };
  // 0. a caller's bracket (the previous batch's cut, act_cut): no sample when it holds
  if (hint.has_value()) {
    const uint32_t lo = std::max<uint32_t>(1u, static_cast<uint32_t>(hint->first));
    if (auto r = try_bracket(lo, static_cast<uint32_t>(hint->second))) return *r;
  }
  // 1. the sample
  constexpr int64_t kRun = 8;
  const int64_t runs = std::min<int64_t>(512, n / 64);  // a run per 64 entries or more
  std::vector<uint32_t> s;
  s.reserve(kRun * runs);
  const int64_t gap = n / runs;
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  for (int64_t r = 0; r < runs; ++r) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    const int64_t at = r * gap + static_cast<int64_t>((rng >> 33) % (gap - kRun + 1));
    for (int64_t j = 0; j < kRun; ++j) s.push_back(bits[at + j] & 0x7fffffffu);
  }
  // 2. the bracket: ranks (descending) p -+ margin; the margin is 4 binomial standard
  // deviations, doubled since neighbours in a run are alike (fewer independent draws).
  // Radix selection on the sample: nth_element's compares mispredict (a quarter of the
  // call's time in a training round).
  const int64_t S = static_cast<int64_t>(s.size());
  const double q = static_cast<double>(k) / static_cast<double>(n);
  const double p = q * S;
  const int64_t margin = static_cast<int64_t>(8.0 * std::sqrt(S * q * (1 - q))) + 16;
  const int64_t rhi = static_cast<int64_t>(p) - margin;  // rank of hi (0 = the largest)
  const int64_t rlo = static_cast<int64_t>(p) + margin;  // rank of lo
  const uint32_t hi = rhi <= 0 ? 0x7fffffffu : kth_largest(s.data(), S, rhi + 1);
  const uint32_t lo = std::max<uint32_t>(1u, rlo >= S ? 0u : kth_largest(s.data(), S, rlo + 1));
  if (auto r = try_bracket(lo, hi)) return *r;
  auto keys = all_keys();  // the sample misled: select among every key
  return among(keys.data(), n, k, 0u, 0x7fffffffu);
}

double key_value(uint32_t key) {
  float v;
  std::memcpy(&v, &key, sizeof v);
  return v;
}

// The k-th largest |x| (1 <= k < numel) as a float.
double kth_magnitude_cpu(const at::Tensor& x, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1 && k < x.numel(), "sparsefl.kth_magnitude: k = ", k,
                    " is outside [1, ", x.numel(), ")");
  return key_value(kth_count(x, k, "sparsefl.kth_magnitude").key);
}

// (tau, above, at): the k-th largest |x| (1 <= k <= numel), how many |x| > tau and how many
// |x| == tau.  above + at == k means the k largest are exactly {|x| >= tau}: a per-batch
// top-k is then the threshold pack, with no tie to split.  [lo, hi]: where the caller
// expects tau (the previous batch's, act_cut); tried before the sample, it changes the
// time, never the answer.
std::tuple<double, int64_t, int64_t> kth_magnitude_count_cpu(const at::Tensor& x, int64_t k,
                                                             c10::optional<double> lo,
                                                             c10::optional<double> hi) {
  const char* op = "sparsefl.kth_magnitude_count";
  std::optional<std::pair<int64_t, int64_t>> hint;
  TORCH_CHECK_VALUE(lo.has_value() == hi.has_value(), op, ": give both lo and hi, or neither");
  if (lo.has_value()) {
    TORCH_CHECK_VALUE(!std::isnan(*lo) && !std::isnan(*hi) && *lo >= 0 && *lo <= *hi, op,
                      ": the bracket needs 0 <= lo <= hi (got lo = ", *lo, ", hi = ", *hi,
                      ")");
    hint.emplace(magnitude_key(static_cast<float>(*lo)),
                 magnitude_key(static_cast<float>(*hi)));
  }
  const KthCount r = kth_count(x, k, op, hint);
  return {key_value(r.key), r.gt, r.eq};
}

}  // namespace

std::tuple<uint32_t, int64_t, int64_t> kth_key_count(
    const at::Tensor& x, int64_t k, const char* op,
    std::optional<std::pair<int64_t, int64_t>> hint) {
  const KthCount r = kth_count(x, k, op, hint);
  return {r.key, r.gt, r.eq};
}

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def("kth_magnitude(Tensor x, int k) -> float", &kth_magnitude_cpu);
  m.def("kth_magnitude_count(Tensor x, int k, float? lo=None, float? hi=None) -> "
        "(float, int, int)",
        &kth_magnitude_count_cpu);
}

}  // namespace sparsefl
