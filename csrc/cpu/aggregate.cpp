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
//
// Two inner loops, same bits.  Portable: one loop per entry that stops at the tile's end,
// checks the order and masks the slot (so even a bad payload cannot write outside the
// tile).  AVX2 (x86-64 CPUs that have it; SPARSEFL_DISABLE_AVX2=1 turns it off): first scan
// the client's run with 8 (int32) or 4 (int64) indices per compare, which finds where it
// leaves the tile and checks the order; a run that passes is known to lie inside the tile,
// so the add loop needs no check and no mask, converts and scales 4 values per
// instruction and prefetches the client's next tile.  That halves the instructions per
// entry (perf: 21 -> 11) and the merge takes 30% less time (100 clients x 5% of 11.2M:
// 46 -> 33 ms); what is left is ~3.5 cycles per entry, in cache or not.
//
// Tiled payloads (sparse_aggregate_tiled; layout in sparsefl/ops/tiled.py) carry that
// search done: per tile, where the client's run starts and ends, and each entry as an int16
// offset into the tile.  The merge then reads 6 bytes per fp32 entry instead of 8 and
// checks the order 16 offsets per compare inside the add loop (a per-thread scratch of
// 2^16 doubles absorbs what a bad offset would write before its check fails).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dtype.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <mutex>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSEFL_AGG_AVX2 1
#include <immintrin.h>
#endif

namespace sparsefl {
namespace {

constexpr int64_t kTile = 1 << 12;  // 32 KiB of doubles per tile: the accumulator stays in L1
// the AVX2 tiled loop's accumulator (see add_tiled_avx2): every uint16 offset lands inside
constexpr int64_t kScratch = 1 << 16;

struct Client {
  const void* idx;  // int64 or int32 flat indices, or int16 tile-local ones (may be null)
  bool idx64;
  bool dense;       // no index tensor: nnz == numel values in order
  const int32_t* tp;  // tiled: tp[t]..tp[t+1] is tile t's run, idx[k] = j - t * kTile
  int vsz;            // bytes per value
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

// A tiled client's run of tile t, [tp[t], tp[t+1]), holds int16 offsets into the tile:
// strictly ascending in [0, len).  As int16 compares: first >= 0, ascending, last < len.
bool run16_ok(const int16_t* l, int64_t s, int64_t e, int64_t len) {
  if (s == e) return true;
  int64_t unordered = 0;
  for (int64_t k = s + 1; k < e; ++k) unordered += l[k] <= l[k - 1];
  return unordered == 0 && l[s] >= 0 && l[e - 1] < len;
}

// Validates one client's payload: sorted, in range, finite.  Throws ValueError.
void validate(const Client& c, int64_t numel, size_t which) {
  if (c.tp) {  // offsets were checked when the client was read; the runs are checked here
    const int64_t tiles = (numel + kTile - 1) / kTile;
    for (int64_t t = 0; t < tiles; ++t)
      TORCH_CHECK_VALUE(run16_ok(static_cast<const int16_t*>(c.idx), c.tp[t], c.tp[t + 1],
                                 std::min(kTile, numel - t * kTile)),
                        "sparsefl.aggregate: payload ", which, " local indices of tile ", t,
                        " are not strictly ascending in [0, tile length)");
  } else if (!c.dense) {
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

// The tiled counterpart: adds a run of tile-local indices l[s..e) (tile length len);
// `bad` unless they ascend strictly in [0, len).  The mask keeps even a bad run in the tile.
template <typename T>
void add_tiled(double* acc, const int16_t* l, const T* val, int64_t s, int64_t e, int64_t len,
               double w, bool& bad) {
  if (s == e) return;
  int32_t p = -1;
  bool b = false;
  for (int64_t k = s; k < e; ++k) {
    const int32_t j = l[k];
    b |= j <= p;
    p = j;
    acc[j & (kTile - 1)] += w * static_cast<double>(val[k]);
  }
  bad |= b || p >= len;
}

// out[j] = float(base[j] + lr * acc[j]) (base 0 when absent); false if some acc[j] is not
// finite.
bool finish_tile(const double* acc, const float* base, float* out, int64_t n, double lr) {
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) {
    const double b = base ? static_cast<double>(base[j]) : 0.0;
    finite &= std::isfinite(acc[j]);
    out[j] = static_cast<float>(b + lr * acc[j]);
  }
  return finite;
}

#ifdef SPARSEFL_AGG_AVX2
bool avx2_enabled() {
  static const bool cpu = __builtin_cpu_supports("avx2");
  const char* off = std::getenv("SPARSEFL_DISABLE_AVX2");  // read per call: tests flip it
  return cpu && !(off && *off && *off != '0');
}

// Where one client's run inside the tile ends: the first position k >= i with
// idx[k] >= tend (or nnz).  Sets `bad` unless idx[i..k) ascend strictly from `prev`.
template <typename I>
__attribute__((target("avx2"))) int64_t scan_run(const I* idx, int64_t i, int64_t nnz,
                                                  int64_t prev, int64_t tend, bool& bad) {
  if (i >= nnz || idx[i] >= tend) return i;
  bool b = static_cast<int64_t>(idx[i]) <= prev;
  int64_t k = i + 1;
  constexpr int64_t L = 32 / sizeof(I);
  // idx >= tend  <=>  idx > tend - 1; clamped so an int32 limit cannot wrap
  const int64_t last = std::min<int64_t>(tend - 1, std::numeric_limits<I>::max());
  const __m256i lim = sizeof(I) == 4 ? _mm256_set1_epi32(static_cast<int32_t>(last))
                                     : _mm256_set1_epi64x(last);
  __m256i unordered = _mm256_setzero_si256();
  for (; k + L <= nnz; k += L) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k));
    const __m256i pv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k - 1));
    __m256i ge, up;
    if constexpr (sizeof(I) == 4) {
      ge = _mm256_cmpgt_epi32(v, lim);
      up = _mm256_cmpgt_epi32(v, pv);
    } else {
      ge = _mm256_cmpgt_epi64(v, lim);
      up = _mm256_cmpgt_epi64(v, pv);
    }
    const __m256i down = _mm256_andnot_si256(up, _mm256_set1_epi32(-1));
    const unsigned gm = sizeof(I) == 4 ? _mm256_movemask_ps(_mm256_castsi256_ps(ge))
                                       : _mm256_movemask_pd(_mm256_castsi256_pd(ge));
    if (gm) {  // the run ends in this block: only the lanes before the end count
      const int end = __builtin_ctz(gm);
      const unsigned dm = sizeof(I) == 4 ? _mm256_movemask_ps(_mm256_castsi256_ps(down))
                                         : _mm256_movemask_pd(_mm256_castsi256_pd(down));
      b |= (dm & ((1u << end) - 1)) != 0;
      k += end;
      bad |= b || !_mm256_testz_si256(unordered, unordered);
      return k;
    }
    unordered = _mm256_or_si256(unordered, down);
  }
  for (; k < nnz; ++k) {
    const int64_t j = idx[k];
    if (j >= tend) break;
    b |= j <= static_cast<int64_t>(idx[k - 1]);
  }
  bad |= b || !_mm256_testz_si256(unordered, unordered);
  return k;
}

// a[idx[q]] += w * double(val[q]) for q < 16, converting and scaling 4 values per
// instruction (the same products as the scalar loop); idx must stay inside a.
template <typename I>
__attribute__((target("avx2"), always_inline)) inline void add16(double* a, const I* idx,
                                                                  const float* val,
                                                                  __m256d wv) {
  for (int q = 0; q < 16; q += 4) {
    const __m256d x = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(val + q)), wv);
    const __m128d lo = _mm256_castpd256_pd128(x), hi = _mm256_extractf128_pd(x, 1);
    a[idx[q]] += _mm_cvtsd_f64(lo);
    a[idx[q + 1]] += _mm_cvtsd_f64(_mm_unpackhi_pd(lo, lo));
    a[idx[q + 2]] += _mm_cvtsd_f64(hi);
    a[idx[q + 3]] += _mm_cvtsd_f64(_mm_unpackhi_pd(hi, hi));
  }
}

constexpr int64_t kAhead = 256;  // prefetch distance in entries: about one tile's run at 5%

// acc_t0[j] += w * val[k] for k in [i, stop): every j is known to lie in the tile.
template <typename I, typename T>
__attribute__((target("avx2"))) void add_run(double* acc_t0, const I* idx, const T* val,
                                             int64_t i, int64_t stop, double w) {
  int64_t k = i;
  if constexpr (std::is_same_v<T, float>) {
    const __m256d wv = _mm256_set1_pd(w);
    for (; k + 16 <= stop; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(idx + k + kAhead), _MM_HINT_T0);
      if constexpr (sizeof(I) == 8)
        _mm_prefetch(reinterpret_cast<const char*>(idx + k + kAhead + 8), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kAhead), _MM_HINT_T0);
      add16(acc_t0, idx + k, val + k, wv);
    }
  }
  for (; k < stop; ++k) acc_t0[idx[k]] += w * static_cast<double>(val[k]);
}

// The AVX2 counterpart of add_tile (same arguments, same result).
template <typename I, typename T>
__attribute__((target("avx2"))) int64_t add_tile_avx2(double* acc, const I* idx, const T* val,
                                                      int64_t i, int64_t nnz, int64_t t0,
                                                      int64_t tend, double w, int64_t& prev,
                                                      bool& bad) {
  bool b = false;
  const int64_t stop = scan_run(idx, i, nnz, prev, tend, b);
  if (stop == i) return i;
  // ascending from idx[i] >= t0 (where the last scan stopped) to idx[stop-1] < tend; the
  // two end checks keep even a logic slip from writing outside the tile
  if (b || idx[i] < t0 || idx[stop - 1] >= tend) {
    bad = true;
    return stop;
  }
  // acc shifted by t0 (integer arithmetic: the shifted pointer itself points nowhere)
  double* acc_t0 = reinterpret_cast<double*>(reinterpret_cast<uintptr_t>(acc) -
                                             static_cast<uintptr_t>(t0) * sizeof(double));
  add_run(acc_t0, idx, val, i, stop, w);
  prev = idx[stop - 1];
  return stop;
}

// The AVX2 counterpart of add_tiled: the order check rides inside the add loop (16 int16
// compares per instruction), so each run is read once.  An entry is added before its
// check, so `acc` must hold kScratch doubles: any int16 read as uint16 lands inside it,
// and a run that fails the check is refused (`bad`) -- out is then undefined, as for
// every bad payload outside the validate-first (in-place) mode.

template <typename T>
__attribute__((target("avx2"))) void add_tiled_avx2(double* acc, const int16_t* l,
                                                    const T* val, int64_t s, int64_t e,
                                                    int64_t len, double w, bool& bad) {
  if (s == e) return;
  const uint16_t* u = reinterpret_cast<const uint16_t*>(l);
  bool b = l[s] < 0 || l[e - 1] >= len;
  acc[u[s]] += w * static_cast<double>(val[s]);
  int64_t k = s + 1;
  __m256i down = _mm256_setzero_si256();
  if constexpr (std::is_same_v<T, float>) {
    const __m256d wv = _mm256_set1_pd(w);
    for (; k + 16 <= e; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(u + k + kAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(val + k + kAhead), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l + k));
      const __m256i pv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l + k - 1));
      down = _mm256_or_si256(down, _mm256_andnot_si256(_mm256_cmpgt_epi16(v, pv),
                                                       _mm256_set1_epi32(-1)));
      add16(acc, u + k, val + k, wv);
    }
  }
  for (; k < e; ++k) {
    b |= l[k] <= l[k - 1];
    acc[u[k]] += w * static_cast<double>(val[k]);
  }
  bad |= b || !_mm256_testz_si256(down, down);
}

// finish_tile, 4 elements at a time with the same double operations (the tail is finish_tile).
__attribute__((target("avx2"))) bool finish_tile_avx2(const double* acc, const float* base,
                                                 float* out, int64_t n, double lr) {
  const __m256d lrv = _mm256_set1_pd(lr), sign = _mm256_set1_pd(-0.0),
                big = _mm256_set1_pd(DBL_MAX);
  __m256d ok = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m256d a = _mm256_loadu_pd(acc + j);
    ok = _mm256_and_pd(ok, _mm256_cmp_pd(_mm256_andnot_pd(sign, a), big, _CMP_LE_OQ));
    const __m256d b = base ? _mm256_cvtps_pd(_mm_loadu_ps(base + j)) : _mm256_setzero_pd();
    _mm_storeu_ps(out + j, _mm256_cvtpd_ps(_mm256_add_pd(b, _mm256_mul_pd(lrv, a))));
  }
  const bool finite = _mm256_movemask_pd(ok) == 0xF;
  return finish_tile(acc + j, base ? base + j : nullptr, out + j, n - j, lr) && finite;
}
#else
bool avx2_enabled() { return false; }
#endif

struct Range {  // one parallel chunk of tiles and where each client entered and left it
  int64_t lo, hi;
  std::vector<int64_t> first, end;
};

// Reads and checks what every client has (weight, values); the caller adds its indices.
Client read_values(const at::Tensor& vv, double w, size_t c) {
  TORCH_CHECK_VALUE(std::isfinite(w), "sparsefl.aggregate: weight ", c, " is not finite");
  TORCH_CHECK_VALUE(vv.device().is_cpu() && vv.dim() == 1 && vv.is_contiguous(),
                    "sparsefl.aggregate: values[", c, "] must be a contiguous 1-D CPU tensor");
  Client cl{};
  cl.val = vv.data_ptr();
  cl.vdtype = vv.scalar_type();
  cl.vsz = static_cast<int>(vv.element_size());
  cl.nnz = vv.numel();
  cl.w = w;
  return cl;
}

// out = base + lr * sum (float32 out) or out += sum (float64 out) over the clients.
void merge(const std::vector<Client>& clients, const at::Tensor& out,
           const std::optional<at::Tensor>& base, double lr) {
  const size_t C = clients.size();
  const bool accumulate = out.scalar_type() == at::kDouble;
  const int64_t numel = out.numel();
  const float* basep = base.has_value() ? base->data_ptr<float>() : nullptr;
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
  const bool simd = avx2_enabled();
  bool tiled_any = false;
  for (const Client& cl : clients) tiled_any |= cl.tp != nullptr;
  const bool scratch = simd && tiled_any;
  at::parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> acc_buf(scratch ? kScratch : kTile);  // the AVX2 tiled loop: kScratch
    double* acc = acc_buf.data();
    Range r{lo, hi, std::vector<int64_t>(C), std::vector<int64_t>(C)};
    std::vector<int64_t> prev(C, lo * kTile - 1);
    bool bad = false;
    for (size_t c = 0; c < C; ++c)  // where each flat client's indices enter tile `lo`
      r.first[c] = clients[c].dense || clients[c].tp ? 0 : lower_bound(clients[c], lo * kTile);
    std::vector<int64_t> cursor = r.first;
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t t0 = t * kTile;
      const int64_t len = std::min(kTile, numel - t0);
      if (accp) std::copy(accp + t0, accp + t0 + len, acc);
      else std::fill(acc, acc + len, 0.0);
      for (size_t c = 0; c < C; ++c) {
        const Client& cl = clients[c];
        dispatch_float_dtype(cl.vdtype, "sparsefl.aggregate", [&](auto tag) {
          using T = decltype(tag);
          const T* v = static_cast<const T*>(cl.val);
          if (cl.dense) {  // a plain axpy on the tile
            for (int64_t j = 0; j < len; ++j) acc[j] += cl.w * static_cast<double>(v[t0 + j]);
            return;
          }
          if (cl.tp) {  // tiled: the run's bounds are given, its indices are tile offsets
            const int16_t* l = static_cast<const int16_t*>(cl.idx);
#ifdef SPARSEFL_AGG_AVX2
            if (simd) {
              // Prefetch the head of the next client's run (64 entries: 2 lines of offsets,
              // 4 of fp32 values) while this run is added, ~600 cycles ahead at 5%: late
              // enough not to be evicted from L1 first, early enough to hide the trip to
              // L2 that each run's first lines cost (kAhead brought them that far).
              // In-process A/B, 100 clients x 5%: 5-6% less time (as a called helper
              // instead of inline code it measured nothing).
              if (c + 1 < C && clients[c + 1].tp) {
                const Client& nx = clients[c + 1];
                const char* nl = reinterpret_cast<const char*>(
                    static_cast<const int16_t*>(nx.idx) + nx.tp[t]);
                const char* nv = static_cast<const char*>(nx.val) + nx.tp[t] * nx.vsz;
                _mm_prefetch(nl, _MM_HINT_T0);
                _mm_prefetch(nl + 64, _MM_HINT_T0);
                _mm_prefetch(nv, _MM_HINT_T0);
                _mm_prefetch(nv + 64, _MM_HINT_T0);
                _mm_prefetch(nv + 128, _MM_HINT_T0);
                _mm_prefetch(nv + 192, _MM_HINT_T0);
              }
              add_tiled_avx2(acc, l, v, cl.tp[t], cl.tp[t + 1], len, cl.w, bad);
              return;
            }
#endif
            add_tiled(acc, l, v, cl.tp[t], cl.tp[t + 1], len, cl.w, bad);
            return;
          }
          const auto add = [&](const auto* idx) {
#ifdef SPARSEFL_AGG_AVX2
            if (simd)
              return add_tile_avx2(acc, idx, v, cursor[c], cl.nnz, t0, t0 + len, cl.w,
                                   prev[c], bad);
#endif
            return add_tile(acc, idx, v, cursor[c], cl.nnz, t0, t0 + len, cl.w, prev[c],
                            bad);
          };
          cursor[c] = cl.idx64 ? add(static_cast<const int64_t*>(cl.idx))
                               : add(static_cast<const int32_t*>(cl.idx));
        });
      }
      bool finite = true;
      if (accp) {
        for (int64_t j = 0; j < len; ++j) finite &= std::fabs(acc[j]) <= DBL_MAX;  // no NaN/inf
        std::copy(acc, acc + len, accp + t0);
      }
      if (outp) {
        const float* b = basep ? basep + t0 : nullptr;
#ifdef SPARSEFL_AGG_AVX2
        if (simd) finite &= finish_tile_avx2(acc, b, outp + t0, len, lr);
        else
#endif
          finite &= finish_tile(acc, b, outp + t0, len, lr);
      }
      bad |= !finite;
    }
    r.end = cursor;
    std::lock_guard<std::mutex> g(mu);
    bad_any |= bad;
    ranges.push_back(std::move(r));
  });
  // Every entry of every flat payload was taken exactly once iff the chunks chain up:
  // each starts where the previous one ended, the first at 0, the last at nnz.  (A tiled
  // payload's offsets say where its runs are; they were checked on the way in.)
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.lo < b.lo;
  });
  for (size_t c = 0; c < C && !bad_any; ++c) {
    if (clients[c].dense || clients[c].tp) continue;
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

void check_out(const at::Tensor& out, const std::optional<at::Tensor>& base, double lr) {
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
  if (base.has_value()) {
    const auto& b = *base;
    TORCH_CHECK_VALUE(b.device().is_cpu() && b.scalar_type() == at::kFloat &&
                          b.is_contiguous() && b.dim() == 1 && b.numel() == out.numel(),
                      "sparsefl.aggregate: base must be a contiguous 1-D float32 CPU tensor "
                      "with ", out.numel(), " elements");
  }
  TORCH_CHECK_VALUE(std::isfinite(lr), "sparsefl.aggregate: lr must be finite");
}

bool is_dense(const at::Tensor& iv, const at::Tensor& vv, int64_t numel) {
  return iv.numel() == 0 && vv.numel() == numel && numel > 0;
}

void sparse_aggregate_cpu(at::TensorList indices, at::TensorList values,
                          at::ArrayRef<double> weights, const at::Tensor& out,
                          const std::optional<at::Tensor>& base, double lr) {
  const size_t C = values.size();
  TORCH_CHECK_VALUE(indices.size() == C && weights.size() == C, "sparsefl.aggregate: ",
                    indices.size(), " index tensors, ", C, " value tensors and ",
                    weights.size(), " weights");
  check_out(out, base, lr);
  const int64_t numel = out.numel();
  std::vector<Client> clients(C);
  for (size_t c = 0; c < C; ++c) {
    const auto& iv = indices[c];
    const auto& vv = values[c];
    Client& cl = clients[c] = read_values(vv, weights[c], c);
    if (is_dense(iv, vv, numel)) {
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
  }
  merge(clients, out, base, lr);
}

// Tiled payloads (sparsefl/ops/tiled.py): offsets[c] (int32, tiles + 1) bounds each tile's
// run in local[c] (int16 offsets into the tile), so the merge reads 2 bytes per index and
// needs no search for run ends.  The offsets are checked here (tiles + 1 reads per client);
// the runs are checked as they are merged.
void sparse_aggregate_tiled_cpu(at::TensorList offsets, at::TensorList local,
                                at::TensorList values, at::ArrayRef<double> weights,
                                const at::Tensor& out, const std::optional<at::Tensor>& base,
                                double lr) {
  const size_t C = values.size();
  TORCH_CHECK_VALUE(offsets.size() == C && local.size() == C && weights.size() == C,
                    "sparsefl.aggregate: ", offsets.size(), " offset tensors, ", local.size(),
                    " local index tensors, ", C, " value tensors and ", weights.size(),
                    " weights");
  check_out(out, base, lr);
  const int64_t numel = out.numel();
  const int64_t tiles = (numel + kTile - 1) / kTile;
  std::vector<Client> clients(C);
  for (size_t c = 0; c < C; ++c) {
    const auto& ov = offsets[c];
    const auto& lv = local[c];
    const auto& vv = values[c];
    Client& cl = clients[c] = read_values(vv, weights[c], c);
    if (ov.numel() == 0 && is_dense(lv, vv, numel)) {
      cl.dense = true;
      continue;
    }
    TORCH_CHECK_VALUE(ov.device().is_cpu() && ov.dim() == 1 && ov.is_contiguous() &&
                          ov.scalar_type() == at::kInt && ov.numel() == tiles + 1,
                      "sparsefl.aggregate: offsets[", c, "] must be a contiguous 1-D int32 CPU ",
                      "tensor with ", tiles + 1, " entries (tiles of ", kTile, ")");
    TORCH_CHECK_VALUE(lv.device().is_cpu() && lv.dim() == 1 && lv.is_contiguous() &&
                          lv.scalar_type() == at::kShort,
                      "sparsefl.aggregate: local[", c, "] must be a contiguous 1-D int16 CPU "
                      "tensor");
    TORCH_CHECK_VALUE(lv.numel() == vv.numel(), "sparsefl.aggregate: payload ", c, " has ",
                      lv.numel(), " indices and ", vv.numel(), " values");
    const int32_t* tp = ov.data_ptr<int32_t>();
    int64_t down = 0;
    for (int64_t t = 0; t < tiles; ++t) down += tp[t + 1] < tp[t];
    TORCH_CHECK_VALUE(tp[0] == 0 && tp[tiles] == vv.numel() && down == 0,
                      "sparsefl.aggregate: offsets[", c, "] must rise from 0 to ", vv.numel(),
                      " without falling");
    cl.idx = lv.data_ptr();
    cl.tp = tp;
  }
  merge(clients, out, base, lr);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefl_C, m) {
  m.def("sparse_aggregate(Tensor[] indices, Tensor[] values, float[] weights, Tensor(a!) out, "
        "Tensor? base, float lr) -> ()");
  m.def("sparse_aggregate_tiled(Tensor[] offsets, Tensor[] local, Tensor[] values, "
        "float[] weights, Tensor(a!) out, Tensor? base, float lr) -> ()");
}

TORCH_LIBRARY_IMPL(sparsefl_C, CPU, m) {
  m.impl("sparse_aggregate", &sparse_aggregate_cpu);
  m.impl("sparse_aggregate_tiled", &sparse_aggregate_tiled_cpu);
}

}  // namespace sparsefl
