// Flat sorted indices -> the tiled layout the aggregation merge reads (sparsefl/ops/tiled.py).
// C++ CPU backend; the definition is sparsefl/ops/tiled.py (tile_payload, plain torch).
//
//   pieces[i][k] + starts[i]  (i = 0, 1, ..., one strictly ascending flat sequence j)
//   offsets[t] = number of j < t * kTile     (int32, tiles + 1 entries)
//   local[k]   = j - (j / kTile) * kTile     (int16)
//
// Per piece: a vectorised check (strict ascent, range), a vectorised pass writing each
// entry's offset in its tile, and a gallop to each tile start (a few probes per 4096
// elements).  Taking the model's per-layer index tensors with their layer offsets, it
// replaces the concatenation (and narrowing) that flat payloads need with a pass that
// writes 2 bytes per entry instead of 4 or 8.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace sparsefl {
namespace {

constexpr int64_t kTile = 1 << 12;  // = kTile in aggregate.cpp

// First position in [from, n) whose index is >= target (idx ascending): gallops from
// `from`, since a tile's run is short and starts where the last one ended.
template <typename I>
int64_t gallop(const I* idx, int64_t from, int64_t n, int64_t target) {
  int64_t lo = from, hi = from, step = 1;
  while (hi < n && static_cast<int64_t>(idx[hi]) < target) {
    lo = hi + 1;
    hi += step;
    step <<= 1;
  }
  hi = std::min(hi, n);
  return std::lower_bound(idx + lo, idx + hi, target,
                          [](I x, int64_t t) { return static_cast<int64_t>(x) < t; }) - idx;
}

// One piece: check (strict ascent from the previous piece's last flat index `prev`, below
// numel), write the tile offsets of its entries, record where tiles start.  The check and
// the narrowing are plain loops the compiler vectorises; tile starts are found by galloping.
template <typename I>
bool cut(const I* idx, int64_t n, int64_t start, int64_t numel, int64_t& prev, int64_t& k,
         int64_t& tile, int32_t* offsets, int16_t* local) {
  if (n == 0) return true;
  int64_t unordered = 0;
  for (int64_t q = 1; q < n; ++q) unordered += idx[q] <= idx[q - 1];
  // raw bounds (numel - start, prev - start) so that no input overflows
  if (unordered || static_cast<int64_t>(idx[0]) <= prev - start ||
      static_cast<int64_t>(idx[n - 1]) >= numel - start)
    return false;
  int16_t* out = local + k;
  for (int64_t q = 0; q < n; ++q)
    out[q] = static_cast<int16_t>((static_cast<int64_t>(idx[q]) + start) & (kTile - 1));
  const int64_t last = static_cast<int64_t>(idx[n - 1]) + start;
  int64_t pos = 0;
  for (; (tile + 1) * kTile <= last; ++tile) {  // every tile that starts by this piece's end
    pos = gallop(idx, pos, n, (tile + 1) * kTile - start);
    offsets[tile + 1] = static_cast<int32_t>(k + pos);
  }
  prev = last;
  k += n;
  return true;
}

std::tuple<at::Tensor, at::Tensor> tile_indices_cpu(at::TensorList pieces,
                                                    at::IntArrayRef starts, int64_t numel) {
  TORCH_CHECK_VALUE(pieces.size() == starts.size(), "sparsefl.tile_indices: ", pieces.size(),
                    " index tensors and ", starts.size(), " starts");
  TORCH_CHECK_VALUE(numel >= 0, "sparsefl.tile_indices: numel must be >= 0, got ", numel);
  int64_t total = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const auto& p = pieces[i];
    TORCH_CHECK_VALUE(p.device().is_cpu() && p.dim() == 1 &&
                          (p.scalar_type() == at::kLong || p.scalar_type() == at::kInt),
                      "sparsefl.tile_indices: indices[", i, "] must be a 1-D int64 or int32 "
                      "CPU tensor");
    TORCH_CHECK_VALUE(starts[i] >= 0 && starts[i] <= numel, "sparsefl.tile_indices: start ",
                      i, " (", starts[i], ") is outside [0, ", numel, "]");
    total += p.numel();
  }
  TORCH_CHECK_VALUE(total < std::numeric_limits<int32_t>::max(),
                    "sparsefl.tile_indices: ", total, " entries; a tiled payload holds fewer "
                    "than 2^31");
  const int64_t tiles = (numel + kTile - 1) / kTile;
  at::Tensor offsets = at::empty({tiles + 1}, at::kInt);
  at::Tensor local = at::empty({total}, at::kShort);
  int32_t* op = offsets.data_ptr<int32_t>();
  int16_t* lp = local.data_ptr<int16_t>();
  op[0] = 0;
  int64_t prev = -1, k = 0, tile = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const at::Tensor p = pieces[i].contiguous();
    const bool ok =
        p.scalar_type() == at::kLong
            ? cut(p.data_ptr<int64_t>(), p.numel(), starts[i], numel, prev, k, tile, op, lp)
            : cut(p.data_ptr<int32_t>(), p.numel(), starts[i], numel, prev, k, tile, op, lp);
    TORCH_CHECK_VALUE(ok, "sparsefl.tile_indices: piece ", i, " makes the flat indices not "
                      "strictly ascending in [0, ", numel, ")");
  }
  while (tile < tiles) op[++tile] = static_cast<int32_t>(k);
  return {offsets, local};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def("tile_indices(Tensor[] pieces, int[] starts, int numel) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsefl_C, CPU, m) { m.impl("tile_indices", &tile_indices_cpu); }

}  // namespace sparsefl
