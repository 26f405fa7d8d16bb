// The exact magnitude threshold of a top-k, for kernels that select while they pack.
// Implemented in topk.cpp (radix select); the rule is sparsefl/ops/reference/topk.py's:
// keep the k largest |x|, ties to the lower flat index.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

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

inline bool kept(const MagnitudeCut& c, float v, int64_t flat) {
  if (c.all) return true;
  if (c.none) return false;
  const uint32_t k = magnitude_key(v);
  return k > c.key || (k == c.key && flat <= c.tie_cutoff);
}

// x: one contiguous CPU float tensor; 0 <= k <= numel.  NaN raises ValueError.
MagnitudeCut magnitude_cut(const at::Tensor& x, int64_t k);

}  // namespace sparsefl
