// The gather convolution: out[n][co][oh][ow] = bias[co] + sum_j val[j] * in[off[j] + pix].
//
// Every pass that produces an activation runs it: the forward (in = x in pixel tiles, the
// support by rows) and the input gradient (in = dy in pixel tiles, the support by columns,
// one pass per phase).  For each output channel and a run of R output pixels, the loop over
// the channel's nonzeros is one broadcast of theta and R fused multiply-adds from memory
// (16 images per vector), with the R accumulators in registers: no gather, no im2col.
#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

template <typename V, int R>
SFL_INLINE void conv_run(const float* tile, const int64_t* boff, const int64_t* off,
                         const float* val, int64_t j0, int64_t j1, float b, float* buf) {
  constexpr int NV = L / (sizeof(V) / sizeof(float));  // vectors per pixel
  constexpr int VL = L / NV;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vbroadcast<V>(b);
  for (int64_t j = j0; j < j1; ++j) {
    const float* p = tile + off[j];
    const V w = vbroadcast<V>(val[j]);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += w * vload<V>(p + boff[r] + v * VL);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(buf + r * L + v * VL, acc[r][v]);
}

// conv_run for a run whose pixels are SX pixels apart in the tile (boff[r] = r SX 16 past
// `base`; the caller checks): the R loads per weight are one address plus fixed
// displacements, where eight independent offsets ran out of registers and cost more
// address arithmetic than the FMAs they feed.
template <typename V, int R, int SX>
SFL_INLINE void conv_run_row(const float* base, const int64_t* off, const float* val,
                             int64_t j0, int64_t j1, float b, float* buf) {
  constexpr int NV = L / (sizeof(V) / sizeof(float));
  constexpr int VL = L / NV;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vbroadcast<V>(b);
  for (int64_t j = j0; j < j1; ++j) {
    const float* p = base + off[j];
    const V w = vbroadcast<V>(val[j]);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += w * vload<V>(p + r * SX * L + v * VL);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(buf + r * L + v * VL, acc[r][v]);
}

// A full run of R pixels: the fixed-displacement loop when the pixels are evenly spaced
// at column stride 1 or 2 (a run inside one row), the general one otherwise.
template <typename V, int R>
SFL_INLINE void conv_run_any(const float* tile, const int64_t* boff, int64_t sx,
                             const int64_t* off, const float* val, int64_t j0, int64_t j1,
                             float b, float* buf) {
  const int64_t span = boff[R - 1] - boff[0];
  if (span == (R - 1) * L) conv_run_row<V, R, 1>(tile + boff[0], off, val, j0, j1, b, buf);
  else if (span == 2 * (R - 1) * L && sx == 2)
    conv_run_row<V, R, 2>(tile + boff[0], off, val, j0, j1, b, buf);
  else conv_run<V, R>(tile, boff, off, val, j0, j1, b, buf);
}

// A run of n <= R pixels with n accumulators (n known at run time, one instantiation per
// length): a run shorter than R still keeps n independent FMA chains in flight.
template <typename V, int R>
SFL_INLINE void conv_run_n(int n, const float* tile, const int64_t* boff, int64_t sx,
                           const int64_t* off, const float* val, int64_t j0, int64_t j1,
                           float b, float* buf) {
  if constexpr (R > 1) {
    if (n < R) {
      conv_run_n<V, R - 1>(n, tile, boff, sx, off, val, j0, j1, b, buf);
      return;
    }
  }
  conv_run_any<V, R>(tile, boff, sx, off, val, j0, j1, b, buf);
}

// The first n (< 8) floats of v to p, in 4 + 2 + 1 pieces straight from the register.
SFL_INLINE void store_first(float* p, v8 v, int n) {
  typedef float v2 __attribute__((vector_size(8)));
  if (n & 4) {
    vstore(p, __builtin_shufflevector(v, v, 0, 1, 2, 3));
    v = __builtin_shufflevector(v, v, 4, 5, 6, 7, 4, 5, 6, 7);
    p += 4;
  }
  if (n & 2) {
    const v2 t = __builtin_shufflevector(v, v, 0, 1);
    std::memcpy(p, &t, sizeof(t));
    v = __builtin_shufflevector(v, v, 2, 3, 2, 3, 2, 3, 2, 3);
    p += 2;
  }
  if (n & 1) *p = v[0];
}

// buf[r][lane] (n pixels x 16 lanes) -> out[lane * img + opix[r]], lanes < `lanes`.
// contiguous: opix[r] = opix[0] + r (a run inside one row at unit output step); then, in
// float, 8 pixels x 8 lanes at a time are transposed in registers and stored as rows.
template <int R, typename T>
SFL_INLINE void write_pixels(const float* buf, int n, int64_t lanes, T* out, int64_t img,
                             const int64_t* opix, bool contiguous) {
  if constexpr (std::is_same_v<T, float> && R >= 8) {
    if (contiguous) {
      for (int64_t l0 = 0; l0 < lanes; l0 += 8) {
        v8 r[8];
        for (int i = 0; i < 8; ++i) r[i] = vload<v8>(buf + std::min(i, n - 1) * L + l0);
        transpose8(r);  // r[i] = lane l0 + i over the run's pixels
        const int64_t nl = std::min<int64_t>(8, lanes - l0);
        float* o = out + l0 * img + opix[0];
        if (n == 8)
          for (int64_t i = 0; i < nl; ++i) vstore(o + i * img, r[i]);
        else
          for (int64_t i = 0; i < nl; ++i) store_first(o + i * img, r[i], n);
      }
      return;
    }
  }
  for (int64_t i = 0; i < lanes; ++i)
    for (int r = 0; r < n; ++r) out[i * img + opix[r]] = static_cast<T>(buf[r * L + i]);
}

// Task t of a pass: (batch tile nt, a block of rows_per_task grid rows) = grid pixels
// [p0, p1), and the tile's image count.
struct TaskSpan {
  int64_t nt, p0, p1, lanes;
};
SFL_INLINE TaskSpan task_span(const ConvArgs& a, int64_t t) {
  const int64_t blocks = (a.GH + a.rows_per_task - 1) / a.rows_per_task;
  const int64_t nt = t / blocks, p0 = (t % blocks) * a.rows_per_task * a.GW;
  return {nt, p0, std::min(a.GH * a.GW, p0 + a.rows_per_task * a.GW), std::min(L, a.N - nt * L)};
}

// A task's runs: each grid row is cut into runs of R pixels and one shorter run for the
// rest (at R = 8: 28 -> 8, 8, 8, 4; 14 -> 8, 6).  A run stays inside one row, so its loads
// are one address plus fixed displacements and its output pixels are consecutive; the short
// run keeps one accumulator per pixel (one dependent FMA chain for the tail cost a fifth of
// the convolution of a 28-wide layer).
struct Run {
  int64_t q;  // first grid pixel, relative to the task's p0
  int n;      // pixels
};
template <int R>
SFL_INLINE void task_runs(int64_t GW, int64_t pixels, std::vector<Run>& runs) {
  runs.clear();
  for (int64_t row = 0; row < pixels; row += GW)
    for (int64_t q = 0; q < GW; q += R)
      runs.push_back({row + q, static_cast<int>(std::min<int64_t>(R, GW - q))});
}

template <typename V, int R, typename T>
SFL_INLINE void conv_tasks(const ConvArgs& a, int64_t lo, int64_t hi) {
  alignas(64) float buf[R * L];
  T* out = static_cast<T*>(a.out);
  const int64_t plane = a.OH * a.OW, img = a.Cout * plane;
  const bool contiguous = a.osx == 1;  // a run's output pixels are consecutive
  // The task's pixel offsets, worked out once for all output channels (a small layer has
  // many channels and few pixels: per channel this index arithmetic cost more than the FMAs).
  std::vector<int64_t> boffs, opixs;
  std::vector<Run> runs;
  for (int64_t t = lo; t < hi; ++t) {
    const auto [nt, p0, p1, lanes] = task_span(a, t);
    const float* tile = a.in + nt * a.in_tile;
    T* o = out + nt * L * img;
    boffs.resize(p1 - p0);
    opixs.resize(p1 - p0);
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t u = q / a.GW, v = q - u * a.GW;
      boffs[q - p0] = (a.iy0 + u * a.sy) * a.in_row + (a.ix0 + v * a.sx) * L;
      opixs[q - p0] = (a.oy0 + u * a.osy) * a.OW + a.ox0 + v * a.osx;
    }
    task_runs<R>(a.GW, p1 - p0, runs);
    for (const Run& run : runs) {
      const int64_t* boff = boffs.data() + run.q;
      for (int64_t co = 0; co < a.Cout; ++co) {
        const float b = a.bias ? a.bias[co] : 0.0f;
        conv_run_n<V, R>(run.n, tile, boff, a.sx, a.off, a.val, a.ptr[co], a.ptr[co + 1], b,
                         buf);
        write_pixels<R, T>(buf, run.n, lanes, o + co * plane, img, opixs.data() + run.q,
                           contiguous);
      }
    }
  }
}

// The input gradient of a column-stride-2 conv, both column phases of one row phase in one
// pass.  Written phase by phase, each pass would fill every other column of dx: 8 scalar
// stores per lane and pixel run, every cache line of dx written twice (half of a stride-2
// layer's backward).  Here grid pixel v of the even phase (e) and of the odd phase (o) are
// output columns 2v and 2v + 1: each run of 8 grid pixels of both phases is transposed in
// 8-column groups and stored as contiguous rows.  Needs a float output, grids 4k wide
// (a group of 4 grid pixels stays in one row) and OW = 2 GW; the caller checks.
template <typename V, int R>
SFL_INLINE void conv_tasks_pair(const ConvArgs& e, const ConvArgs& o, int64_t lo, int64_t hi) {
  static_assert(R == 8, "the paired write merges runs of 8");
  alignas(64) float be[R * L], bo[R * L];
  float* out = static_cast<float*>(e.out);
  const int64_t plane = e.OH * e.OW, img = e.Cout * plane;
  std::vector<int64_t> boe, boo, opix;  // per grid pixel; opix: output of its 4-group
  for (int64_t t = lo; t < hi; ++t) {
    const auto [nt, p0, p1, lanes] = task_span(e, t);
    const float* tile = e.in + nt * e.in_tile;
    float* ot = out + nt * L * img;
    boe.resize(p1 - p0);
    boo.resize(p1 - p0);
    opix.resize(p1 - p0);
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t u = q / e.GW, v = q - u * e.GW;
      const int64_t row = (e.iy0 + u * e.sy) * e.in_row;
      boe[q - p0] = row + (e.ix0 + v * e.sx) * L;
      boo[q - p0] = row + (o.ix0 + v * o.sx) * L;
      opix[q - p0] = (e.oy0 + u * e.osy) * e.OW + 2 * v;
    }
    for (int64_t co = 0; co < e.Cout; ++co) {
      float* oc = ot + co * plane;
      for (int64_t p = p0; p < p1; p += R) {
        const int n = static_cast<int>(std::min<int64_t>(R, p1 - p));  // 4 or 8
        const int64_t k = p - p0;
        conv_run_n<V, R>(n, tile, boe.data() + k, e.sx, e.off, e.val, e.ptr[co],
                         e.ptr[co + 1], 0.f, be);
        conv_run_n<V, R>(n, tile, boo.data() + k, o.sx, o.off, o.val, o.ptr[co],
                         o.ptr[co + 1], 0.f, bo);
        for (int g = 0; g < n; g += 4)
          for (int64_t l0 = 0; l0 < lanes; l0 += 8) {
            v8 r[8];
            for (int i = 0; i < 4; ++i) {
              r[2 * i] = vload<v8>(be + (g + i) * L + l0);
              r[2 * i + 1] = vload<v8>(bo + (g + i) * L + l0);
            }
            transpose8(r);  // r[i] = lane l0 + i over 8 consecutive output columns
            const int64_t nl = std::min<int64_t>(8, lanes - l0);
            for (int64_t i = 0; i < nl; ++i) vstore(oc + (l0 + i) * img + opix[k + g], r[i]);
          }
      }
    }
  }
}

// One ISA-specific entry point per kernel and dtype: the template body is inlined into a
// function compiled for that ISA (simd.h).

template <typename T>
SFL_AVX512 void conv_tasks_avx512(const ConvArgs& a, int64_t lo, int64_t hi) {
  conv_tasks<v16, 8, T>(a, lo, hi);
}
template <typename T>
SFL_AVX2 void conv_tasks_avx2(const ConvArgs& a, int64_t lo, int64_t hi) {
  conv_tasks<v8, 4, T>(a, lo, hi);
}
template <typename T>
void conv_tasks_portable(const ConvArgs& a, int64_t lo, int64_t hi) {
  conv_tasks<v4, 2, T>(a, lo, hi);
}
SFL_AVX512 void conv_tasks_pair_avx512(const ConvArgs& e, const ConvArgs& o, int64_t lo,
                                       int64_t hi) {
  conv_tasks_pair<v16, 8>(e, o, lo, hi);
}


// The paired pass for column phases e (even output columns) and o (odd), if it applies:
// AVX-512 (runs of 8), float output, the same rows, grids 4k wide filling OW = 2 GW.
bool run_conv_pair(const ConvArgs& e, const ConvArgs& o, bool float_out) {
  if (isa() != Isa::kAvx512 || !float_out || e.GH != o.GH || e.GW != o.GW ||
      e.iy0 != o.iy0 || e.oy0 != o.oy0 || e.ox0 != 0 || o.ox0 != 1 || e.osx != 2 ||
      o.osx != 2 || e.osy != o.osy || e.GW % 4 != 0 || e.OW != 2 * e.GW ||
      e.rows_per_task != o.rows_per_task || e.bias || o.bias)
    return false;
  const int64_t tasks = e.NT * ((e.GH + e.rows_per_task - 1) / e.rows_per_task);
  const double work = double(e.NT) * e.GH * e.GW * L *
                      (e.ptr[e.Cout] - e.ptr[0] + o.ptr[o.Cout] - o.ptr[0] + 2 * e.Cout);
  at::parallel_for(0, tasks, grain(tasks, work), [&](int64_t lo, int64_t hi) {
    conv_tasks_pair_avx512(e, o, lo, hi);
  });
  return true;
}

template <typename T>
void run_conv(const ConvArgs& a) {
  auto fn = isa() == Isa::kAvx512 ? &conv_tasks_avx512<T>
          : isa() == Isa::kAvx2   ? &conv_tasks_avx2<T>
                                  : &conv_tasks_portable<T>;
  const int64_t tasks = a.NT * ((a.GH + a.rows_per_task - 1) / a.rows_per_task);
  const double work = double(a.NT) * a.GH * a.GW * L * (a.ptr[a.Cout] - a.ptr[0] + a.Cout);
  at::parallel_for(0, tasks, grain(tasks, work), [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
}

template void run_conv<float>(const ConvArgs&);
template void run_conv<c10::Half>(const ConvArgs&);
template void run_conv<c10::BFloat16>(const ConvArgs&);

}  // namespace conv
}  // namespace sparsefl
