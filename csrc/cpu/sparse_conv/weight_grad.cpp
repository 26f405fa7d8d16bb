// Weight gradient on the support: dtheta[co,ci,kh,kw] = sum over the kept inputs of phase
// (kh%s, kw%s) of x * dyp[co][u + Ph - kh/s][v + Pw - kw/s][n], then domega = dtheta *
// beta|omega|^(beta-1) (zero off S).  Three forms of the same sum, by what is cheapest:
// gather-dots over the pack (few kept inputs), 16-lane FMAs over the forward's kept pixel
// tiles (a quarter or more kept), and dense rows for a one-pixel 1x1 layer (a Linear).
// Batch tiles are summed in order: each weight's sum has a fixed order.
#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

// Weight gradient, per batch tile (tiles in order, so each sum has a fixed order): a task
// is one output channel; its dyp plane (L2-sized) serves all its nonzeros, and the packed
// inputs of the tile (a few % of it) stay in L2 across channels.
struct WgradArgs {
  const float* dyp;        // dyp of one batch tile: [Co][Hq][Wq][16]
  const int64_t* xptr;     // this tile's groups: [C * sh * sw + 1] (a slice)
  const int32_t* xq;
  const float* xv;
  const int64_t* rowptr;   // [Co + 1]
  const int64_t* rgrp;     // group (ci, phase) of each row entry, relative to the tile
  const int64_t* roff;     // dyp offset of each row entry's tap
};

SFL_INLINE float gather_dot(const float* base, const int32_t* q, const float* v, int64_t n) {
  // Four independent partial sums keep the loads in flight.
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t e = 0;
  for (; e + 4 <= n; e += 4) {
    s0 += v[e] * base[q[e]];
    s1 += v[e + 1] * base[q[e + 1]];
    s2 += v[e + 2] * base[q[e + 2]];
    s3 += v[e + 3] * base[q[e + 3]];
  }
  for (; e < n; ++e) s0 += v[e] * base[q[e]];
  return (s0 + s1) + (s2 + s3);
}

// The same dot with hardware gathers: 16 (AVX-512) or 8 (AVX2) positions per instruction.
SFL_AVX512 float gather_dot_avx512(const float* base, const int32_t* q, const float* v,
                                   int64_t n) {
#if defined(SFL_X86)

  if (n < 16) return gather_dot(base, q, v, n);  // a few entries: scalar beats the set-up
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 32 <= n; e += 32) {
    const __m512i i0 = _mm512_loadu_si512(q + e), i1 = _mm512_loadu_si512(q + e + 16);
    a0 = _mm512_fmadd_ps(_mm512_i32gather_ps(i0, base, 4), _mm512_loadu_ps(v + e), a0);
    a1 = _mm512_fmadd_ps(_mm512_i32gather_ps(i1, base, 4), _mm512_loadu_ps(v + e + 16), a1);
  }
  for (; e < n; e += 16) {
    const __mmask16 m = n - e >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - e)) - 1);
    const __m512i i0 = _mm512_maskz_loadu_epi32(m, q + e);
    const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, base, 4);
    a0 = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m, v + e), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
  return gather_dot(base, q, v, n);
#endif
}

SFL_AVX2 float gather_dot_avx2(const float* base, const int32_t* q, const float* v, int64_t n) {
#if defined(SFL_X86)

  if (n < 16) return gather_dot(base, q, v, n);  // a few entries: scalar beats the set-up
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + e));
    const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + e + 8));
    a0 = _mm256_fmadd_ps(_mm256_i32gather_ps(base, i0, 4), _mm256_loadu_ps(v + e), a0);
    a1 = _mm256_fmadd_ps(_mm256_i32gather_ps(base, i1, 4), _mm256_loadu_ps(v + e + 8), a1);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(a0, a1));
  float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  for (; e < n; ++e) s += v[e] * base[q[e]];
  return s;
#else
  return gather_dot(base, q, v, n);
#endif
}

template <float (*Dot)(const float*, const int32_t*, const float*, int64_t)>
SFL_INLINE void wgrad_rows(const WgradArgs& a, int64_t lo, int64_t hi, float* dth) {
  for (int64_t co = lo; co < hi; ++co)
    for (int64_t j = a.rowptr[co]; j < a.rowptr[co + 1]; ++j) {
      const int64_t e0 = a.xptr[a.rgrp[j]], e1 = a.xptr[a.rgrp[j] + 1];
      const float* base = a.dyp + a.roff[j];
      if (e1 - e0 < 16) {  // a few kept inputs (small layers): no call, no vector set-up
        float acc = 0.f;
        for (int64_t e = e0; e < e1; ++e) acc += a.xv[e] * base[a.xq[e]];
        dth[j] += acc;
      } else {
        dth[j] += Dot(base, a.xq + e0, a.xv + e0, e1 - e0);
      }
    }
}

SFL_INLINE float gather_dot_portable(const float* base, const int32_t* q, const float* v,
                                     int64_t n) {
  return gather_dot(base, q, v, n);
}

SFL_AVX512 void wgrad_avx512(const WgradArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_rows<gather_dot_avx512>(a, lo, hi, d);
}
SFL_AVX2 void wgrad_avx2(const WgradArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_rows<gather_dot_avx2>(a, lo, hi, d);
}
void wgrad_portable(const WgradArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_rows<gather_dot_portable>(a, lo, hi, d);
}

// Weight gradient from the pruned input kept dense, in the forward's own pixel tiles
// (xt: [C][Hp][Wp][16] per batch tile, the pruned entries zeroed): for a weight (co, ci, kh,
// kw) of S,
//   dtheta += sum over output pixels (oh, ow) of dyp[co][Ph+oh][Pw+ow] . xt[ci][oh*sh+kh][ow*sw+kw]
// as 16-lane FMAs: no gathers, work |S| * OH * OW per tile whatever the activation density.
// The gather-dots cost |S| * (kept inputs) but a gather of 16 is several times an FMA, so
// once a quarter of the input survives (the early, dense-ish layers of a SparsyFed ResNet,
// or no activation pruning at all) this is the cheaper form, and keeping xt costs no more
// memory than packing it (4 bytes per entry either way).  Each weight is summed by one
// thread in a fixed order.
struct WgradDenseArgs {
  const float* xt;      // one batch tile: [C][Hp][Wp][16]
  const float* dyp;     // one batch tile: [Co][Hq][Wq][16]
  const int64_t* rowptr;
  const int32_t* cols;  // ci * KH * KW + kh * KW + kw, per row entry
  int64_t Hp, Wp, Hq, Wq, Ph, Pw, OH, OW, sh, sw, KH, KW;
};

// J weights of one row at a time: each dy vector loaded serves J FMAs (1 + J loads per J
// FMAs instead of 2 per FMA, the bound of this loop), two pixels per step give 2J
// independent accumulator chains.  Each weight's sum runs in one fixed order.
template <typename V, int J>
SFL_INLINE void wgrad_dense_block(const WgradDenseArgs& a, const float* db,
                                  const float* const* xb, float* out) {
  constexpr int NV = static_cast<int>(L * sizeof(float) / sizeof(V));  // vectors per pixel
  constexpr int VL = L / NV;
  V acc[2][J][NV] = {};
  for (int64_t oh = 0; oh < a.OH; ++oh) {
    const float* dr = db + oh * a.Wq * L;
    const int64_t xrow = oh * a.sh * a.Wp * L;
    int64_t ow = 0;
    for (; ow + 2 <= a.OW; ow += 2)
      for (int u = 0; u < 2; ++u)
        for (int h = 0; h < NV; ++h) {
          const V d = vload<V>(dr + (ow + u) * L + h * VL);
          const int64_t xo = xrow + (ow + u) * a.sw * L + h * VL;
          for (int w = 0; w < J; ++w) acc[u][w][h] += d * vload<V>(xb[w] + xo);
        }
    for (; ow < a.OW; ++ow)
      for (int h = 0; h < NV; ++h) {
        const V d = vload<V>(dr + ow * L + h * VL);
        const int64_t xo = xrow + ow * a.sw * L + h * VL;
        for (int w = 0; w < J; ++w) acc[0][w][h] += d * vload<V>(xb[w] + xo);
      }
  }
  for (int w = 0; w < J; ++w) {
    V sum = acc[0][w][0] + acc[1][w][0];
    for (int h = 1; h < NV; ++h) sum += acc[0][w][h] + acc[1][w][h];
    alignas(64) float lanes[sizeof(V) / sizeof(float)];
    vstore(lanes, sum);
    float t = 0.f;
    for (size_t l = 0; l < sizeof(V) / sizeof(float); ++l) t += lanes[l];
    out[w] += t;
  }
}

template <typename V>
SFL_INLINE void wgrad_dense_rows(const WgradDenseArgs& a, int64_t lo, int64_t hi,
                                 float* dth) {
  const int64_t KK = a.KH * a.KW, xplane = a.Hp * a.Wp * L, dplane = a.Hq * a.Wq * L;
  for (int64_t co = lo; co < hi; ++co) {
    const float* db = a.dyp + co * dplane + (a.Ph * a.Wq + a.Pw) * L;
    const float* xb[4];
    auto tap = [&](int64_t j) {  // weight j's first input vector
      const int64_t c = a.cols[j], ci = c / KK, kh = (c % KK) / a.KW, kw = c % a.KW;
      return a.xt + ci * xplane + (kh * a.Wp + kw) * L;
    };
    int64_t j = a.rowptr[co];
    const int64_t end = a.rowptr[co + 1];
    for (; j + 4 <= end; j += 4) {
      for (int w = 0; w < 4; ++w) xb[w] = tap(j + w);
      wgrad_dense_block<V, 4>(a, db, xb, dth + j);
    }
    for (; j < end; ++j) {
      xb[0] = tap(j);
      wgrad_dense_block<V, 1>(a, db, xb, dth + j);
    }
  }
}

SFL_AVX512 void wgrad_dense_avx512(const WgradDenseArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_dense_rows<v16>(a, lo, hi, d);
}
SFL_AVX2 void wgrad_dense_avx2(const WgradDenseArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_dense_rows<v8>(a, lo, hi, d);
}
void wgrad_dense_portable(const WgradDenseArgs& a, int64_t lo, int64_t hi, float* d) {
  wgrad_dense_rows<v4>(a, lo, hi, d);
}

// Weight gradient of a one-pixel 1x1 layer (a Linear layer) for one batch tile, dense then
// read on the support: rows[co][c] = sum over lanes of dyp[co][lane] * xt[c][lane], built
// as axpys over the input channels, lanes in order.  With a small batch each weight meets a
// few kept inputs, and one gather-dot per weight is all overhead; this is Co * 16 * C
// vectorised FMAs.  xt: the tile's pruned input, dense, [16][C] (lane-major).
template <typename Dummy = void>
SFL_INLINE void rows_dense(const float* __restrict dyp, const float* __restrict xt, int64_t Co,
                           int64_t C, int64_t lanes, float* __restrict rows) {
  for (int64_t co = 0; co < Co; ++co) {
    float* __restrict r = rows + co * C;
    for (int64_t c = 0; c < C; ++c) r[c] = 0.0f;
    for (int64_t l = 0; l < lanes; ++l) {
      const float a = dyp[co * L + l];
      const float* __restrict xr = xt + l * C;
      for (int64_t c = 0; c < C; ++c) r[c] += a * xr[c];
    }
  }
}
SFL_AVX512 void rows_dense_avx512(const float* dyp, const float* xt, int64_t Co, int64_t C,
                                  int64_t lanes, float* rows) {
  rows_dense(dyp, xt, Co, C, lanes, rows);
}
SFL_AVX2 void rows_dense_avx2(const float* dyp, const float* xt, int64_t Co, int64_t C,
                              int64_t lanes, float* rows) {
  rows_dense(dyp, xt, Co, C, lanes, rows);
}
void rows_dense_portable(const float* dyp, const float* xt, int64_t Co, int64_t C,
                         int64_t lanes, float* rows) {
  rows_dense(dyp, xt, Co, C, lanes, rows);
}

at::Tensor weight_grad(const at::Tensor& dyp, const at::Tensor& xptr, const at::Tensor& xq,
                       const at::Tensor& xv, const at::Tensor& omega, double beta,
                       const int64_t* rp, const Plan& P, const Geom& g, const char* op,
                       const float* xt_dense, const int32_t* cols) {
  const int64_t nnz = static_cast<int64_t>(P.widx.size());
  const int64_t S = g.sh * g.sw;
  const int64_t Hq = g.Hq(), Wq = g.Wq(), Ph = g.Ph(), Pw = g.Pw();
  const float bf = static_cast<float>(beta);
  at::Tensor dw;
  dw = at::zeros_like(omega);
  std::vector<float> dth(nnz, 0.0f);
  auto fn = isa() == Isa::kAvx512 ? &wgrad_avx512 : isa() == Isa::kAvx2 ? &wgrad_avx2
                                                                        : &wgrad_portable;
  // A one-pixel 1x1 layer where the gather-dots would be mostly overhead (a few kept
  // inputs per weight): the tile's dense rows, read on the support.
  const bool one_pixel = g.H == 1 && g.W == 1 && g.KH == 1 && g.KW == 1 && S == 1;
  const double kept_per_group = xt_dense ? 0.0 : xq.numel() / double(g.NT * g.C);
  const bool dense_rows = !xt_dense && one_pixel && double(g.Co) * L * ((g.C + 15) / 16) <
                                                        double(nnz) * (kept_per_group + 4.0);
  std::vector<float> rows, xt;
  if (dense_rows) rows.resize(g.Co * g.C), xt.resize(L * g.C);
  auto rows_fn = isa() == Isa::kAvx512 ? &rows_dense_avx512
               : isa() == Isa::kAvx2   ? &rows_dense_avx2
                                       : &rows_dense_portable;
  const int64_t qbase = (g.ph * Wq + g.pw) * L;  // the pixel's position (pixel_base)
  auto dense_fn = isa() == Isa::kAvx512 ? &wgrad_dense_avx512
                : isa() == Isa::kAvx2   ? &wgrad_dense_avx2
                                        : &wgrad_dense_portable;
  for (int64_t nt = 0; nt < g.NT; ++nt) {
    if (xt_dense != nullptr) {
      WgradDenseArgs a{};
      a.xt = xt_dense + nt * g.C * g.Hp() * g.Wp() * L;
      a.dyp = dyp.data_ptr<float>() + nt * g.Co * Hq * Wq * L;
      a.rowptr = rp; a.cols = cols;
      a.Hp = g.Hp(); a.Wp = g.Wp(); a.Hq = Hq; a.Wq = Wq; a.Ph = Ph; a.Pw = Pw;
      a.OH = g.OH; a.OW = g.OW; a.sh = g.sh; a.sw = g.sw; a.KH = g.KH; a.KW = g.KW;
      const double work = double(nnz) * g.OH * g.OW * L;
      at::parallel_for(0, g.Co, grain(g.Co, work), [&](int64_t lo, int64_t hi) {
        dense_fn(a, lo, hi, dth.data());
      });
      continue;
    }
    if (dense_rows) {
      std::fill(xt.begin(), xt.end(), 0.0f);
      const int64_t* xp = xptr.data_ptr<int64_t>() + nt * g.C;
      const int32_t* qq = xq.data_ptr<int32_t>();
      const float* vv = xv.data_ptr<float>();
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t e = xp[c]; e < xp[c + 1]; ++e) xt[(qq[e] - qbase) * g.C + c] = vv[e];
      rows_fn(dyp.data_ptr<float>() + nt * g.Co * L, xt.data(), g.Co, g.C,
              std::min(L, g.N - nt * L), rows.data());
      for (int64_t j = 0; j < nnz; ++j) dth[j] += rows[P.widx[j]];
      continue;
    }
    WgradArgs a{};
    a.dyp = dyp.data_ptr<float>() + nt * g.Co * Hq * Wq * L;
    a.xptr = xptr.data_ptr<int64_t>() + nt * g.C * S;
    a.xq = xq.data_ptr<int32_t>(); a.xv = xv.data_ptr<float>();
    a.rowptr = rp; a.rgrp = P.rgrp.data(); a.roff = P.roff.data();
    const double work = double(nnz) * (xq.numel() / double(g.NT * g.C * S) + 1);
    at::parallel_for(0, g.Co, grain(g.Co, work), [&](int64_t lo, int64_t hi) {
      fn(a, lo, hi, dth.data());
    });
  }
  std::vector<float> slope(nnz);
  dispatch_float_dtype(omega.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    thetas(omega.data_ptr<T>(), P.widx.data(), nnz, bf, slope.data(), /*slope=*/true);
    T* d = dw.data_ptr<T>();
    for (int64_t j = 0; j < nnz; ++j) d[P.widx[j]] = static_cast<T>(dth[j] * slope[j]);
  });
  return dw;
}

}  // namespace conv
}  // namespace sparsefl
