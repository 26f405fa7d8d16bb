// NCHW -> pixel tiles: [NT][C][DH][DW][16], the 16 images of a batch tile side by side
// per pixel, with zero padding (and, for dy, zero leading rows/columns) around the image.
// Full 8-image x 8-pixel blocks go through an in-register transpose (transpose8).
#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

// dst[nt][c][oy + h*dy][ox + w*dx][lane] = src[nt*16 + lane][c][h][w]; the rest of dst
// (padding, dilation holes, lanes >= N) is zero.  dst has dims [NT][C][DH][DW][16].
// Full 8-image x 8-pixel blocks go through an in-register transpose; the rest is scalar.
// tk >= 1: also returns how many entries have magnitude key >= tk (the kept nonzeros of
// a threshold, counted while the values pass through registers); tk <= 0: returns 0.
template <typename T>
SFL_INLINE int64_t to_tiles_plane(const T* src, int64_t N, int64_t C, int64_t H, int64_t W,
                                  float* d, int64_t DW, int64_t oy, int64_t ox, int64_t dyl,
                                  int64_t dxl, int64_t nt, int64_t c, int32_t tk) {
  const int64_t lanes = std::min(L, N - nt * L);
  const int64_t CHW = C * H * W;
  typedef int32_t iv8 __attribute__((vector_size(32)));
  const iv8 absmask = iv8{} + 0x7fffffff, tv = iv8{} + tk;
  iv8 vcnt{};
  int64_t cnt = 0;
  for (int64_t l0 = 0; l0 < lanes; l0 += 8) {
    const int64_t nl = std::min<int64_t>(8, lanes - l0);
    const T* s0 = src + (nt * L + l0) * CHW + c * H * W;
    for (int64_t h = 0; h < H; ++h) {
      float* drow = d + ((oy + h * dyl) * DW + ox) * L + l0;
      const T* srow = s0 + h * W;
      int64_t w = 0;
      if constexpr (std::is_same_v<T, float>) {
        if (nl == 8)
          for (; w + 8 <= W; w += 8) {
            v8 r[8];
            for (int i = 0; i < 8; ++i) r[i] = vload<v8>(srow + i * CHW + w);
            if (tk > 0)  // sign-shift masks: GCC lowers generic vector compares here to scalar
              for (int i = 0; i < 8; ++i) {
                iv8 bits;
                std::memcpy(&bits, &r[i], sizeof bits);
                vcnt -= (tv - (bits & absmask) - 1) >> 31;  // +1 where key >= tk
              }
            transpose8(r);
            for (int j = 0; j < 8; ++j) vstore(drow + (w + j) * dxl * L, r[j]);
          }
      }
      for (; w < W; ++w)
        for (int64_t i = 0; i < nl; ++i) {
          const float v = static_cast<float>(srow[i * CHW + w]);
          drow[w * dxl * L + i] = v;
          cnt += tk > 0 && magnitude_key(v) >= static_cast<uint32_t>(tk);
        }
    }
  }
  for (int l = 0; l < 8; ++l) cnt += vcnt[l];
  return cnt;
}

template <typename T>
SFL_INLINE int64_t to_tiles_range(const T* src, int64_t N, int64_t C, int64_t H, int64_t W,
                                  float* dst, int64_t DH, int64_t DW, int64_t oy, int64_t ox,
                                  int64_t dyl, int64_t dxl, int64_t lo, int64_t hi,
                                  int32_t tk) {
  int64_t cnt = 0;
  for (int64_t t = lo; t < hi; ++t) {
    float* d = dst + t * DH * DW * L;
    if (dyl == 1 && dxl == 1 && N - (t / C) * L >= L) {
      // a full tile, undilated: only the border is not overwritten
      std::memset(d, 0, sizeof(float) * oy * DW * L);
      std::memset(d + (oy + H) * DW * L, 0, sizeof(float) * (DH - oy - H) * DW * L);
      for (int64_t h = 0; h < H; ++h) {
        float* r = d + (oy + h) * DW * L;
        std::memset(r, 0, sizeof(float) * ox * L);
        std::memset(r + (ox + W) * L, 0, sizeof(float) * (DW - ox - W) * L);
      }
    } else {
      std::memset(d, 0, sizeof(float) * DH * DW * L);
    }
    cnt += to_tiles_plane(src, N, C, H, W, d, DW, oy, ox, dyl, dxl, t / C, t % C, tk);
  }
  return cnt;
}

template <typename T>
SFL_AVX512 int64_t to_tiles_avx512(const T* src, int64_t N, int64_t C, int64_t H, int64_t W,
                                   float* dst, int64_t DH, int64_t DW, int64_t oy, int64_t ox,
                                   int64_t dyl, int64_t dxl, int64_t lo, int64_t hi,
                                   int32_t tk) {
  return to_tiles_range(src, N, C, H, W, dst, DH, DW, oy, ox, dyl, dxl, lo, hi, tk);
}
template <typename T>
SFL_AVX2 int64_t to_tiles_avx2(const T* src, int64_t N, int64_t C, int64_t H, int64_t W,
                               float* dst, int64_t DH, int64_t DW, int64_t oy, int64_t ox,
                               int64_t dyl, int64_t dxl, int64_t lo, int64_t hi, int32_t tk) {
  return to_tiles_range(src, N, C, H, W, dst, DH, DW, oy, ox, dyl, dxl, lo, hi, tk);
}
template <typename T>
int64_t to_tiles_portable(const T* src, int64_t N, int64_t C, int64_t H, int64_t W,
                          float* dst, int64_t DH, int64_t DW, int64_t oy, int64_t ox,
                          int64_t dyl, int64_t dxl, int64_t lo, int64_t hi, int32_t tk) {
  return to_tiles_range(src, N, C, H, W, dst, DH, DW, oy, ox, dyl, dxl, lo, hi, tk);
}

template <typename T>
int64_t to_tiles(const T* src, int64_t N, int64_t C, int64_t H, int64_t W, float* dst,
                 int64_t DH, int64_t DW, int64_t oy, int64_t ox, int64_t dyl, int64_t dxl,
                 int64_t tally_key) {
  const int32_t tk = static_cast<int32_t>(tally_key);
  const int64_t NT = (N + L - 1) / L;
  if (DH == 1 && DW == 1) {  // one pixel (a Linear layer): a plain transpose per batch tile
    std::memset(dst, 0, sizeof(float) * NT * C * L);
    for (int64_t n = 0; n < N; ++n) {
      float* d = dst + (n / L) * C * L + n % L;
      const T* s = src + n * C;
      for (int64_t c = 0; c < C; ++c) d[c * L] = static_cast<float>(s[c]);
    }
    return 0;  // no tally here: one-pixel layers never keep tiles
  }
  auto fn = isa() == Isa::kAvx512 ? &to_tiles_avx512<T>
          : isa() == Isa::kAvx2   ? &to_tiles_avx2<T>
                                  : &to_tiles_portable<T>;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, NT * C, grain(NT * C, double(NT * C) * DH * DW * L), [&](int64_t lo,
                                                                             int64_t hi) {
    total += fn(src, N, C, H, W, dst, DH, DW, oy, ox, dyl, dxl, lo, hi, tk);
  });
  return total.load();
}

#define SFL_TO_TILES(T)                                                                 \
  template int64_t to_tiles<T>(const T*, int64_t, int64_t, int64_t, int64_t, float*,  \
                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
SFL_TO_TILES(float)
SFL_TO_TILES(c10::Half)
SFL_TO_TILES(c10::BFloat16)
#undef SFL_TO_TILES

}  // namespace conv
}  // namespace sparsefl
