// The exact magnitude threshold of a top-k, for kernels that select while they pack.
// Implemented in topk.cpp (radix select); the rule is sparsefl/ops/reference/topk.py's:
// keep the k largest |x|, ties to the lower flat index.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace sparsefl {

struct MagnitudeCut {
  uint32_t key = 0;        // the k-th largest magnitude key
  int64_t tie_cutoff = 0;  // elements with key == `key` are kept iff flat index <= this
  bool all = false;        // k == n
  bool none = false;       // k == 0
};

inline uint32_t magnitude_key(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b & 0x7fffffffu;
}

// |x| >= tau as magnitude keys (the packs' and threshold_prune's rule): tau <= 0 keeps
// everything (key >= 0); otherwise the key of the smallest float >= tau, so the compare is
// exact for any real tau (in use tau is a value of x, exact in float).
inline int64_t tau_key_of(double tau, const char* op) {
  TORCH_CHECK_VALUE(!std::isnan(tau), op, ": tau is NaN");
  if (tau <= 0) return 0;
  float f = static_cast<float>(tau);
  if (static_cast<double>(f) < tau) f = std::nextafter(f, INFINITY);
  return magnitude_key(f);
}

inline bool kept(const MagnitudeCut& c, float v, int64_t flat) {
  if (c.all) return true;
  if (c.none) return false;
  const uint32_t k = magnitude_key(v);
  return k > c.key || (k == c.key && flat <= c.tie_cutoff);
}

// The k-th largest of n keys (1 <= k <= n), by radix selection on 8-bit digits from the
// top: one histogram pass over all keys, then passes over the shrinking bucket that holds
// the answer.  Linear in n whatever the ties: nth_element slowed down on the many equal
// keys of post-ReLU activations and integer-valued images.
inline uint32_t kth_largest(const uint32_t* keys, int64_t n, int64_t k) {
  std::vector<uint32_t> cur(keys, keys + n), next;
  uint32_t prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t hist[256] = {0};
    for (const uint32_t v : cur) ++hist[(v >> shift) & 0xff];
    int digit = 255;
    for (; digit > 0 && hist[digit] < k; --digit) k -= hist[digit];
    prefix |= static_cast<uint32_t>(digit) << shift;
    if (shift == 0) break;
    // the bucket's keys, branch-free (which keys fall in it is data: branches mispredict)
    next.resize(cur.size());
    size_t w = 0;
    for (const uint32_t v : cur) {
      next[w] = v;
      w += ((v >> shift) & 0xff) == static_cast<uint32_t>(digit);
    }
    next.resize(w);
    cur.swap(next);
  }
  return prefix;
}

// x: one contiguous CPU float tensor; 0 <= k <= numel.  NaN raises ValueError.
MagnitudeCut magnitude_cut(const at::Tensor& x, int64_t k);

// The k-th largest magnitude key of x (1 <= k <= numel) with how many keys lie above it
// and at it (kth_magnitude.cpp: a bracket, one pass, radix select among its candidates);
// hint: a bracket of keys [lo, hi] tried before the sampled one (it changes the time,
// never the answer).  NaN raises ValueError naming op.
std::tuple<uint32_t, int64_t, int64_t> kth_key_count(
    const at::Tensor& x, int64_t k, const char* op,
    std::optional<std::pair<int64_t, int64_t>> hint = std::nullopt);

}  // namespace sparsefl
