// Exact magnitude top-k over many tensors: masks, and compression with error feedback.
// C++ CPU backend; the definition is sparsefl/ops/reference/topk.py.
//
// Selection rule: keep the k elements of largest |x|; among equal |x| the lower flat index
// (position in the concatenation of the flattened tensors) wins.  NaN is refused.
//
// Radix select on the bits of |x| (AIR top-k style, adapted to a CPU):
//   key(x) = bits(float(x)) & 0x7fffffff  orders exactly like |x| for every non-NaN x
//   (±0 -> 0, subnormals, ±inf -> 0x7f800000), and NaN is any key above 0x7f800000.
//   pass 1  histogram of key >> 15 (65536 bins, one per thread, merged) -> the bucket b1
//           holding the k-th largest key, and how many keys lie above it
//   pass 2  histogram of key & 0x7fff over the keys in b1 -> the exact k-th key K,
//           c_gt = #{key > K}, n_eq = #{key == K}; need = k - c_gt of the n_eq ties are kept
//   pass 3  per fixed block: how many elements it keeps (key > K, plus its ties while the
//           running tie count stays below `need`), then an exclusive scan over blocks
//   pass 4  each block writes its mask bytes, or its (index, value) pairs at its offset, in
//           index order; with error feedback the sent entries of the residual are zeroed.
// With error feedback, pass 1 first folds the update into the residual (r <- r + x), so
// later passes read one array, and afterwards r = (x + r_old) - sent.
// Counts are integers and blocks are fixed, so results never depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dtype.h"
#include "topk_select.h"

#include <array>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace sparsefl {
namespace {

constexpr int64_t kBlock = 1 << 15;
constexpr uint32_t kNaNKey = 0x7f800000u;  // keys above this are NaN

inline uint32_t key_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b & 0x7fffffffu;
}

template <typename T>
inline float as_float(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

struct Part {  // one tensor, flattened
  void* data;
  at::ScalarType dtype;
  int64_t numel;
  int64_t offset;  // flat offset in the concatenation
};

struct Block {
  int32_t part;
  int64_t begin;
  int64_t len;
};

// Calls fn(key, flat_index_within_part) for every element of a block.
template <typename Fn>
void for_each_key(const Part& p, const Block& b, Fn&& fn) {
  dispatch_float_dtype(p.dtype, "sparsefl.topk", [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(p.data) + b.begin;
    for (int64_t i = 0; i < b.len; ++i) fn(key_of(static_cast<float>(x[i])), b.begin + i);
  });
}

struct Threshold {
  uint32_t key = 0;      // the k-th largest key
  int64_t need_eq = 0;   // how many elements equal to `key` are kept (lowest indices first)
  int64_t n_eq = 0;      // how many there are
  bool all = false;      // k == n: keep everything
  bool none = false;     // k == 0
};

// Histogram of the digit (key >> shift) & mask over one block, for keys whose bits above
// `prefix_shift` equal `prefix` (prefix_shift >= 32: no filter).  Returns the largest key
// seen (NaN check).  Written as plain loops over locals so the compiler keeps everything
// in registers (no aliasing between the counts and the parameters).
template <typename T>
uint32_t hist_block(const T* x, int64_t n, uint32_t* h, int shift, uint32_t mask,
                    uint32_t prefix, int prefix_shift) {
  uint32_t kmax = 0;
  if (prefix_shift >= 32) {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t k = key_of(static_cast<float>(x[i]));
      kmax = std::max(kmax, k);
      ++h[(k >> shift) & mask];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t k = key_of(static_cast<float>(x[i]));
      if ((k >> prefix_shift) == prefix) ++h[(k >> shift) & mask];
    }
  }
  return kmax;
}

std::vector<int64_t> histogram(const std::vector<Part>& parts, const std::vector<Block>& blocks,
                               int shift, int width, uint32_t prefix, int prefix_shift,
                               bool check_nan) {
  const size_t bins = size_t{1} << width;
  const uint32_t mask = static_cast<uint32_t>(bins - 1);
  std::vector<int64_t> total(bins, 0);
  std::mutex mu;
  uint32_t kmax = 0;
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> h(bins, 0);  // per thread (a thread's range is < 2^32 elements)
    uint32_t m = 0;
    for (int64_t bi = lo; bi < hi; ++bi) {
      const Block& b = blocks[bi];
      const Part& p = parts[b.part];
      dispatch_float_dtype(p.dtype, "sparsefl.topk", [&](auto tag) {
        using T = decltype(tag);
        m = std::max(m, hist_block(static_cast<const T*>(p.data) + b.begin, b.len, h.data(),
                                   shift, mask, prefix, prefix_shift));
      });
    }
    std::lock_guard<std::mutex> g(mu);
    kmax = std::max(kmax, m);
    for (size_t i = 0; i < bins; ++i) total[i] += h[i];
  });
  TORCH_CHECK_VALUE(!check_nan || kmax <= kNaNKey, "sparsefl.topk: input contains NaN; the "
                    "magnitude order of NaN is undefined (clean or mask the tensor first)");
  return total;
}

// Walk bins from the top: the bin holding the `k`-th largest, and the count above it.
std::pair<uint32_t, int64_t> pick_bin(const std::vector<int64_t>& h, int64_t k) {
  int64_t above = 0;
  for (int64_t b = static_cast<int64_t>(h.size()) - 1; b >= 0; --b) {
    if (above + h[b] >= k) return {static_cast<uint32_t>(b), above};
    above += h[b];
  }
  TORCH_CHECK(false, "sparsefl.topk: internal error, k exceeds the element count");
}

// Radix select over the 31-bit magnitude keys.  Large inputs: two passes of 16 + 15 bits
// (few passes over memory).  Small inputs (activation pruning runs on every forward
// pass): three passes of 11 + 10 + 10 bits, since zeroing, merging and scanning 2^16
// bins per call costs more than reading a few thousand elements three times.
Threshold find_threshold(const std::vector<Part>& parts, const std::vector<Block>& blocks,
                         int64_t n, int64_t k) {
  Threshold t;
  const bool small = n < (int64_t{1} << 18);
  const std::vector<int> widths = small ? std::vector<int>{11, 10, 10} : std::vector<int>{16, 15};
  int shift = 31;
  uint32_t prefix = 0;
  int64_t need = k;
  std::vector<int64_t> h;
  uint32_t bin = 0;
  for (size_t pass = 0; pass < widths.size(); ++pass) {
    const int prefix_shift = shift;  // bits already fixed: key >> shift == prefix
    shift -= widths[pass];
    // Pass 1 also checks for NaN, even when k is 0 or n: bad input is refused consistently.
    h = histogram(parts, blocks, shift, widths[pass], prefix, pass == 0 ? 32 : prefix_shift,
                  /*check_nan=*/pass == 0);
    if (pass == 0) {
      if (k == 0) { t.none = true; return t; }
      if (k == n) { t.all = true; return t; }
    }
    int64_t above;
    std::tie(bin, above) = pick_bin(h, need);
    need -= above;
    prefix = (prefix << widths[pass]) | bin;
  }
  t.key = prefix;
  t.n_eq = h[bin];
  t.need_eq = need;
  return t;
}

struct Selection {
  std::vector<int64_t> kept_before;  // exclusive scan of kept counts per block
  std::vector<int64_t> eq_before;    // exclusive scan of tie counts per block
};

// Pass 3: per-block kept counts and their scan (ties resolved by block order).
Selection scan_blocks(const std::vector<Part>& parts, const std::vector<Block>& blocks,
                      const Threshold& t) {
  const int64_t nb = static_cast<int64_t>(blocks.size());
  std::vector<int64_t> gt(nb, 0), eq(nb, 0);
  if (!t.all && !t.none) {
    at::parallel_for(0, nb, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t bi = lo; bi < hi; ++bi) {
        const Block& b = blocks[bi];
        const Part& p = parts[b.part];
        const uint32_t key = t.key;
        int64_t g = 0, e = 0;
        dispatch_float_dtype(p.dtype, "sparsefl.topk", [&](auto tag) {
          using T = decltype(tag);
          const T* x = static_cast<const T*>(p.data) + b.begin;
          for (int64_t i = 0; i < b.len; ++i) {
            const uint32_t k = key_of(static_cast<float>(x[i]));
            g += k > key;
            e += k == key;
          }
        });
        gt[bi] = g;
        eq[bi] = e;
      }
    });
  }
  Selection s;
  s.kept_before.assign(nb + 1, 0);
  s.eq_before.assign(nb + 1, 0);
  for (int64_t bi = 0; bi < nb; ++bi) {
    const int64_t len = blocks[bi].len;
    int64_t kept;
    if (t.all) kept = len;
    else if (t.none) kept = 0;
    else {
      const int64_t ties_left = std::max<int64_t>(0, t.need_eq - s.eq_before[bi]);
      kept = gt[bi] + std::min(eq[bi], ties_left);
    }
    s.eq_before[bi + 1] = s.eq_before[bi] + eq[bi];
    s.kept_before[bi + 1] = s.kept_before[bi] + kept;
  }
  return s;
}

// Is an element with this key kept, given how many ties came before it?
inline bool keep(const Threshold& t, uint32_t key, int64_t& ties_seen) {
  if (t.all) return true;
  if (t.none) return false;
  if (key > t.key) return true;
  if (key == t.key) return ties_seen++ < t.need_eq;
  return false;
}

struct Prepared {
  std::vector<Part> parts;
  std::vector<Block> blocks;
  int64_t n = 0;
};

Prepared prepare(at::TensorList xs) {
  Prepared p;
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto& x = xs[i];
    TORCH_CHECK_VALUE(x.device().is_cpu(), "sparsefl.topk: tensors[", i, "] must be on CPU");
    TORCH_CHECK_VALUE(x.is_contiguous(), "sparsefl.topk: tensors[", i, "] must be contiguous");
    const auto st = x.scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                     "sparsefl.topk: tensors[", i, "] has dtype ", st,
                     "; supported: float32, float16, bfloat16");
    p.parts.push_back({x.data_ptr(), st, x.numel(), p.n});
    for (int64_t s = 0; s < x.numel(); s += kBlock)
      p.blocks.push_back({static_cast<int32_t>(i), s, std::min(kBlock, x.numel() - s)});
    p.n += x.numel();
  }
  return p;
}

void check_k(int64_t k, int64_t n) {
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "sparsefl.topk: k = ", k, " is outside [0, ", n, "]");
}

// Pass 4 for masks.
std::vector<at::Tensor> topk_mask_cpu(at::TensorList xs, int64_t k) {
  auto prep = prepare(xs);
  check_k(k, prep.n);
  const Threshold t = find_threshold(prep.parts, prep.blocks, prep.n, k);
  const Selection s = scan_blocks(prep.parts, prep.blocks, t);
  std::vector<at::Tensor> masks;
  std::vector<bool*> mptr;
  for (const auto& x : xs) {
    masks.push_back(at::empty(x.sizes(), x.options().dtype(at::kBool)));
    mptr.push_back(masks.back().data_ptr<bool>());
  }
  at::parallel_for(0, static_cast<int64_t>(prep.blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bi = lo; bi < hi; ++bi) {
      const Block& b = prep.blocks[bi];
      int64_t ties = s.eq_before[bi];
      bool* m = mptr[b.part] + b.begin;
      const int64_t eq_here = s.eq_before[bi + 1] - s.eq_before[bi];
      if (t.all || t.none) {
        std::memset(m, t.all ? 1 : 0, b.len);
        continue;
      }
      // Ties of this block are all kept, or none: a branch-free compare does it.
      const bool all_ties = ties + eq_here <= t.need_eq;
      const bool no_ties = ties >= t.need_eq || eq_here == 0;
      if (all_ties || no_ties) {
        const uint32_t key = t.key;
        dispatch_float_dtype(prep.parts[b.part].dtype, "sparsefl.topk", [&](auto tag) {
          using T = decltype(tag);
          const T* x = static_cast<const T*>(prep.parts[b.part].data) + b.begin;
          if (all_ties)
            for (int64_t i = 0; i < b.len; ++i) m[i] = key_of(static_cast<float>(x[i])) >= key;
          else
            for (int64_t i = 0; i < b.len; ++i) m[i] = key_of(static_cast<float>(x[i])) > key;
        });
        continue;
      }
      for_each_key(prep.parts[b.part], b, [&](uint32_t key, int64_t i) {
        m[i - b.begin] = keep(t, key, ties);
      });
    }
  });
  return masks;
}

// Pass 4 for compression: sorted flat indices (int64) and the kept values.  `residual`
// (same shapes, may be empty) turns on error feedback: r <- r + x before selecting on r,
// then r[sent] <- 0.
std::tuple<at::Tensor, at::Tensor> topk_compress_cpu(at::TensorList xs, at::TensorList residual,
                                                     int64_t k) {
  TORCH_CHECK_VALUE(residual.empty() || residual.size() == xs.size(),
                    "sparsefl.topk: residual has ", residual.size(), " tensors, expected ",
                    xs.size());
  TORCH_CHECK_VALUE(!xs.empty(), "sparsefl.topk: topk_compress needs at least one tensor");
  const auto dtype = xs[0].scalar_type();
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK_TYPE(xs[i].scalar_type() == dtype, "sparsefl.topk: compress needs one dtype, ",
                     "tensors[", i, "] is ", xs[i].scalar_type(), " but tensors[0] is ", dtype);
    if (!residual.empty()) {
      TORCH_CHECK_VALUE(residual[i].sizes() == xs[i].sizes() &&
                            residual[i].scalar_type() == dtype && residual[i].is_contiguous() &&
                            residual[i].device().is_cpu(),
                        "sparsefl.topk: residual[", i, "] must be a contiguous CPU tensor of ",
                        "the same shape and dtype as tensors[", i, "]");
    }
  }
  prepare(xs);  // validates device, layout and dtype of the update before anything is written
  std::vector<at::Tensor> src;
  if (residual.empty()) {
    src.assign(xs.begin(), xs.end());
  } else {
    // Refuse NaN before the residual is touched, so a bad update loses no feedback state.
    for (size_t i = 0; i < xs.size(); ++i)
      TORCH_CHECK_VALUE(!at::isnan(xs[i]).any().item<bool>(), "sparsefl.topk: tensors[", i,
                        "] contains NaN; the residual was left unchanged");
    for (size_t i = 0; i < xs.size(); ++i) {
      residual[i].add_(xs[i]);
      src.push_back(residual[i]);
    }
  }
  auto prep = prepare(src);
  check_k(k, prep.n);
  const Threshold t = find_threshold(prep.parts, prep.blocks, prep.n, k);
  const Selection s = scan_blocks(prep.parts, prep.blocks, t);
  auto idx = at::empty({k}, xs[0].options().dtype(at::kLong));
  auto val = at::empty({k}, xs[0].options());
  int64_t* ip = idx.data_ptr<int64_t>();
  void* vp = val.data_ptr();
  const bool feedback = !residual.empty();
  at::parallel_for(0, static_cast<int64_t>(prep.blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bi = lo; bi < hi; ++bi) {
      const Block& b = prep.blocks[bi];
      const Part& p = prep.parts[b.part];
      int64_t ties = s.eq_before[bi];
      int64_t out = s.kept_before[bi];
      dispatch_float_dtype(p.dtype, "sparsefl.topk", [&](auto tag) {
        using T = decltype(tag);
        T* x = static_cast<T*>(p.data);
        T* v = static_cast<T*>(vp);
        for (int64_t i = b.begin; i < b.begin + b.len; ++i) {
          if (keep(t, key_of(static_cast<float>(x[i])), ties)) {
            ip[out] = p.offset + i;
            v[out] = x[i];
            ++out;
            if (feedback) x[i] = T(0);
          }
        }
      });
    }
  });
  return {idx, val};
}

}  // namespace

namespace {

// The threshold from the radix select (two histogram passes), with the tie cutoff.
MagnitudeCut cut_by_radix(const Prepared& prep, int64_t k) {
  const Threshold t = find_threshold(prep.parts, prep.blocks, prep.n, k);
  MagnitudeCut c;
  c.key = t.key;
  c.all = t.all;
  c.none = t.none;
  if (t.all || t.none || t.need_eq == t.n_eq) {
    c.tie_cutoff = INT64_MAX;  // every tie kept (or the rule is all/none)
  } else if (t.need_eq == 0) {
    c.tie_cutoff = -1;
  } else {  // some ties kept: the flat index of the last one, found in flat order
    int64_t seen = 0;
    c.tie_cutoff = -1;
    for (const Block& b : prep.blocks) {
      for_each_key(prep.parts[b.part], b, [&](uint32_t key, int64_t i) {
        if (key == t.key && seen < t.need_eq && ++seen == t.need_eq) c.tie_cutoff = i;
      });
      if (seen == t.need_eq) break;
    }
  }
  return c;
}

}  // namespace

MagnitudeCut magnitude_cut(const at::Tensor& x, int64_t k) {
  auto prep = prepare({x});
  check_k(k, prep.n);
  return cut_by_radix(prep, k);
}

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def("topk_mask(Tensor[] xs, int k) -> Tensor[]");
  m.def("topk_compress(Tensor[] xs, Tensor(a!)[] residual, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsefl_C, CPU, m) {
  m.impl("topk_mask", &topk_mask_cpu);
  m.impl("topk_compress", &topk_compress_cpu);
}

}  // namespace sparsefl
