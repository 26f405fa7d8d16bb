// Deterministic weighted sum of many clients' sparse updates, fused with the server step.
// C++ CPU backend; the definition is sparsefl/ops/reference/aggregate.py.
//
//   out[j] = base[j] + lr * sum_c w_c * v_c[j]      (base omitted: 0)
//   out[j] = out[j] + sum_c w_c * v_c[j]            (float64 out: accumulate mode)
//
// Tiled merge: the output is cut into tiles of kTile elements.  Each tile owns a float64
// accumulator that fits in L2; for every client in the fixed order 0..C-1 it walks that
// client's index range inside the tile (found by binary search, so tiles are independent
// and run in parallel), adds w_c * v, then writes base + lr * acc once, rounded once.
// Memory traffic is the payloads plus one pass over base/out, whatever C is; a scatter per
// client (index_add_) instead drags every touched cache line in and out C times.
// Every element sums its contributions in client order in float64, so the result is
// bitwise identical run to run and for any thread count.
// A client whose index tensor is empty and whose value tensor has numel entries is dense.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dtype.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <mutex>
#include <vector>

namespace sparsefl {
namespace {

constexpr int64_t kTile = 1 << 12;  // 32 KiB of doubles per tile: the accumulator stays in L1

struct Client {
  const void* idx;  // int64 or int32 (may be null when nnz == 0)
  bool idx64;
  bool dense;       // no index tensor: nnz == numel values in order
  const void* val;
  at::ScalarType vdtype;
  int64_t nnz;
  double w;
};

inline int64_t index_at(const Client& c, int64_t i) {
  return c.idx64 ? static_cast<const int64_t*>(c.idx)[i] : static_cast<const int32_t*>(c.idx)[i];
}

// Validation, written as branch-free loops that vectorise: ascending order of neighbours
// plus the first and last index in range imply every index is in range.
template <typename I>
bool indices_ok(const I* idx, int64_t n, int64_t numel) {
  if (n == 0) return true;
  int64_t unordered = 0;
  for (int64_t i = 1; i < n; ++i) unordered += idx[i] <= idx[i - 1];
  return unordered == 0 && idx[0] >= 0 && static_cast<int64_t>(idx[n - 1]) < numel;
}

template <typename T>
int64_t non_finite(const T* v, int64_t n) {
  int64_t bad = 0;
  if constexpr (std::is_same_v<T, float>) {
    const uint32_t* b = reinterpret_cast<const uint32_t*>(v);
    for (int64_t i = 0; i < n; ++i) bad += (b[i] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t* b = reinterpret_cast<const uint16_t*>(v);
    const uint16_t e = std::is_same_v<T, c10::Half> ? 0x7c00u : 0x7f80u;
    for (int64_t i = 0; i < n; ++i) bad += (b[i] & e) == e;
  }
  return bad;
}

// Validates one client's payload: sorted, in range, finite.  Throws ValueError.
void validate(const Client& c, int64_t numel, size_t which) {
  if (!c.dense) {
    const bool ok = c.idx64 ? indices_ok(static_cast<const int64_t*>(c.idx), c.nnz, numel)
                            : indices_ok(static_cast<const int32_t*>(c.idx), c.nnz, numel);
    TORCH_CHECK_VALUE(ok, "sparsefl.aggregate: payload ", which, " indices are not strictly "
                      "ascending in [0, ", numel, ")");
  }
  dispatch_float_dtype(c.vdtype, "sparsefl.aggregate", [&](auto tag) {
    using T = decltype(tag);
    TORCH_CHECK_VALUE(non_finite(static_cast<const T*>(c.val), c.nnz) == 0,
                      "sparsefl.aggregate: payload ", which, " has a value that is not finite");
  });
}

int64_t lower_bound(const Client& c, int64_t target) {
  int64_t lo = 0, hi = c.nnz;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (index_at(c, mid) < target) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Adds one client's entries that fall in [t0, tend), starting at index `i`; returns
// where the next tile starts for this client.  `prev` is the last index taken (order
// check: every index must exceed it, which also keeps j >= t0); `bad` records a violation.
template <typename I, typename T>
int64_t add_tile(double* acc, const I* idx, const T* val, int64_t i, int64_t nnz, int64_t t0,
                 int64_t tend, double w, int64_t& prev, bool& bad) {
  int64_t p = prev;
  bool b = false;
  for (; i < nnz; ++i) {
    const int64_t j = idx[i];
    if (j >= tend) break;
    b |= j <= p;
    p = j;
    acc[(j - t0) & (kTile - 1)] += w * static_cast<double>(val[i]);  // mask: never outside
  }
  prev = p;
  bad |= b;
  return i;
}

struct Range {  // one parallel chunk of tiles and where each client entered and left it
  int64_t lo, hi;
  std::vector<int64_t> first, end;
};

void sparse_aggregate_cpu(at::TensorList indices, at::TensorList values,
                          at::ArrayRef<double> weights, const at::Tensor& out,
                          const std::optional<at::Tensor>& base, double lr) {
  const size_t C = values.size();
  TORCH_CHECK_VALUE(indices.size() == C && weights.size() == C, "sparsefl.aggregate: ",
                    indices.size(), " index tensors, ", C, " value tensors and ",
                    weights.size(), " weights");
  // float64 out = accumulate mode: out += sum_c w_c v_c (a streaming server's running sum;
  // merging the clients in several calls then gives the bits of one call over all of them,
  // since each element's sum is the same float64 additions in the same client order).
  const bool accumulate = out.scalar_type() == at::kDouble;
  TORCH_CHECK_VALUE(out.device().is_cpu() && (out.scalar_type() == at::kFloat || accumulate) &&
                        out.is_contiguous() && out.dim() == 1,
                    "sparsefl.aggregate: out must be a contiguous 1-D float32 (or float64, to "
                    "accumulate) CPU tensor");
  TORCH_CHECK_VALUE(!accumulate || (!base.has_value() && lr == 1.0),
                    "sparsefl.aggregate: a float64 out accumulates; base and lr do not apply");
  const int64_t numel = out.numel();
  const float* basep = nullptr;
  if (base.has_value()) {
    const auto& b = *base;
    TORCH_CHECK_VALUE(b.device().is_cpu() && b.scalar_type() == at::kFloat &&
                          b.is_contiguous() && b.dim() == 1 && b.numel() == numel,
                      "sparsefl.aggregate: base must be a contiguous 1-D float32 CPU tensor "
                      "with ", numel, " elements");
    basep = b.data_ptr<float>();
  }
  TORCH_CHECK_VALUE(std::isfinite(lr), "sparsefl.aggregate: lr must be finite");
  std::vector<Client> clients(C);
  for (size_t c = 0; c < C; ++c) {
    const auto& iv = indices[c];
    const auto& vv = values[c];
    TORCH_CHECK_VALUE(std::isfinite(weights[c]), "sparsefl.aggregate: weight ", c,
                      " is not finite");
    TORCH_CHECK_VALUE(vv.device().is_cpu() && vv.dim() == 1 && vv.is_contiguous(),
                      "sparsefl.aggregate: values[", c, "] must be a contiguous 1-D CPU tensor");
    Client& cl = clients[c];
    cl.val = vv.data_ptr();
    cl.vdtype = vv.scalar_type();
    cl.nnz = vv.numel();
    cl.w = weights[c];
    if (iv.numel() == 0 && vv.numel() == numel && numel > 0) {
      cl.idx = nullptr;
      cl.idx64 = true;
      cl.dense = true;
      continue;
    }
    TORCH_CHECK_VALUE(iv.device().is_cpu() && iv.dim() == 1 && iv.is_contiguous() &&
                          (iv.scalar_type() == at::kLong || iv.scalar_type() == at::kInt),
                      "sparsefl.aggregate: indices[", c, "] must be a contiguous 1-D int64 or ",
                      "int32 CPU tensor");
    TORCH_CHECK_VALUE(iv.numel() == vv.numel(), "sparsefl.aggregate: payload ", c, " has ",
                      iv.numel(), " indices and ", vv.numel(), " values");
    cl.idx = iv.data_ptr();
    cl.idx64 = iv.scalar_type() == at::kLong;
    cl.dense = false;
  }
  // When out is base (an in-place server update) or an accumulator, validate everything
  // before writing, so a bad payload leaves the model (the running sum) untouched.
  // Otherwise validation rides along with the merge (one read of the payloads instead of
  // two) and out is undefined on error.
  const bool in_place = accumulate || (basep != nullptr && basep == out.data_ptr<float>());
  if (in_place) {
    at::parallel_for(0, static_cast<int64_t>(C), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) validate(clients[c], numel, c);
    });
  }

  const int64_t tiles = (numel + kTile - 1) / kTile;
  float* outp = accumulate ? nullptr : out.data_ptr<float>();
  double* accp = accumulate ? out.data_ptr<double>() : nullptr;
  std::vector<Range> ranges;
  std::mutex mu;
  bool bad_any = false;
  at::parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> acc(kTile);
    Range r{lo, hi, std::vector<int64_t>(C), std::vector<int64_t>(C)};
    std::vector<int64_t> prev(C, lo * kTile - 1);
    bool bad = false;
    for (size_t c = 0; c < C; ++c)  // where each client's indices enter tile `lo`
      r.first[c] = clients[c].dense ? 0 : lower_bound(clients[c], lo * kTile);
    std::vector<int64_t> cursor = r.first;
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t t0 = t * kTile;
      const int64_t len = std::min(kTile, numel - t0);
      if (accp) std::copy(accp + t0, accp + t0 + len, acc.begin());
      else std::fill(acc.begin(), acc.begin() + len, 0.0);
      for (size_t c = 0; c < C; ++c) {
        const Client& cl = clients[c];
        dispatch_float_dtype(cl.vdtype, "sparsefl.aggregate", [&](auto tag) {
          using T = decltype(tag);
          const T* v = static_cast<const T*>(cl.val);
          if (cl.dense) {  // a plain axpy on the tile
            for (int64_t j = 0; j < len; ++j) acc[j] += cl.w * static_cast<double>(v[t0 + j]);
            return;
          }
          cursor[c] = cl.idx64
              ? add_tile(acc.data(), static_cast<const int64_t*>(cl.idx), v, cursor[c], cl.nnz,
                         t0, t0 + len, cl.w, prev[c], bad)
              : add_tile(acc.data(), static_cast<const int32_t*>(cl.idx), v, cursor[c], cl.nnz,
                         t0, t0 + len, cl.w, prev[c], bad);
        });
      }
      bool finite = true;
      if (accp) {
        for (int64_t j = 0; j < len; ++j) {
          finite &= std::isfinite(acc[j]);
          accp[t0 + j] = acc[j];
        }
      }
      for (int64_t j = 0; outp && j < len; ++j) {
        const double b = basep ? static_cast<double>(basep[t0 + j]) : 0.0;
        const double x = b + lr * acc[j];
        finite &= std::isfinite(acc[j]);
        outp[t0 + j] = static_cast<float>(x);
      }
      bad |= !finite;
    }
    r.end = cursor;
    std::lock_guard<std::mutex> g(mu);
    bad_any |= bad;
    ranges.push_back(std::move(r));
  });
  // Every entry of every payload was taken exactly once iff the chunks chain up:
  // each starts where the previous one ended, the first at 0, the last at nnz.
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.lo < b.lo;
  });
  for (size_t c = 0; c < C && !bad_any; ++c) {
    if (clients[c].dense) continue;
    int64_t expect = 0;
    for (const auto& r : ranges) {
      bad_any |= r.first[c] != expect;
      expect = r.end[c];
    }
    bad_any |= expect != clients[c].nnz;
  }
  if (bad_any) {  // find the culprit for a precise message (this throws)
    for (size_t c = 0; c < C; ++c) validate(clients[c], numel, c);
    TORCH_CHECK_VALUE(false, "sparsefl.aggregate: the weighted sum is not finite (overflow)");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def("sparse_aggregate(Tensor[] indices, Tensor[] values, float[] weights, Tensor(a!) out, "
        "Tensor? base, float lr) -> ()");
}

TORCH_LIBRARY_IMPL(sparsefl_C, CPU, m) { m.impl("sparse_aggregate", &sparse_aggregate_cpu); }

}  // namespace sparsefl
