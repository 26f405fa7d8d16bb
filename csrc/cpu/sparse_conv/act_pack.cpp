// Activation pruning for the weight gradient: the kept inputs of a layer (its k largest
// |x|, every |x| >= tau, or every nonzero) packed per (batch tile, input channel, phase) as
// (q, value), q their position in the dy grid (see sparse_conv.h).  The weight gradient
// then reads only kept inputs, and the dense input is never rebuilt.
#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

// Where a layer's weight gradient looks for its input (see the top of the file).
struct PackGeom {
  int64_t N, C, H, W, sh, sw, ph, pw, Wq, NT;
  int64_t groups() const { return NT * C * sh * sw; }
};

PackGeom pack_geom(at::IntArrayRef x_shape, at::IntArrayRef kernel, at::IntArrayRef stride,
                   at::IntArrayRef padding, const char* op) {
  TORCH_CHECK_VALUE(x_shape.size() == 4, op, ": input must be 4-D (N, C, H, W)");
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
                    ": kernel, stride and padding must have 2 entries");
  PackGeom p{};
  p.N = x_shape[0]; p.C = x_shape[1]; p.H = x_shape[2]; p.W = x_shape[3];
  p.sh = stride[0]; p.sw = stride[1]; p.ph = padding[0]; p.pw = padding[1];
  TORCH_CHECK_VALUE(kernel[0] >= 1 && kernel[1] >= 1 && p.sh >= 1 && p.sw >= 1, op,
                    ": kernel and stride must be >= 1");
  TORCH_CHECK_VALUE(p.ph >= 0 && p.pw >= 0 && p.ph < kernel[0] && p.pw < kernel[1], op,
                    ": padding must lie in [0, kernel - 1]");
  TORCH_CHECK_VALUE(p.C >= 1 && p.H >= 1 && p.W >= 1, op, ": empty channel or spatial dim");
  TORCH_CHECK_VALUE(p.sh * p.sw <= 64, op, ": stride too large (sh * sw must be <= 64)");
  p.Wq = (kernel[1] - 1) / p.sw + (p.W - 1 + p.pw) / p.sw + 1;
  const int64_t Hq = (kernel[0] - 1) / p.sh + (p.H - 1 + p.ph) / p.sh + 1;
  TORCH_CHECK_VALUE(Hq * p.Wq * L < (int64_t{1} << 31), op,
                    ": image too large for int32 positions");
  p.NT = (p.N + L - 1) / L;
  return p;
}

// What one thread packs: a contiguous range of planes [t0, t1), its groups' entries in
// group order, and the candidates (keys inside the threshold bracket) that the exact
// threshold may still drop.
struct PackChunk {
  int64_t t0 = 0, t1 = 0;
  std::vector<int32_t> q;
  std::vector<float> v;
  struct Cand {
    uint32_t key;
    int64_t pos;  // index into q / v
  };
  std::vector<Cand> cand;
  int64_t above = 0;
  uint32_t kmax = 0;
};

// One pass over the plane (tile nt, channel c): images outer, rows inner (each row read
// once, its phases split while it is in L1); every entry with key >= lo is appended,
// branch-free, to its phase's staging area in (lane, u, v) order, and the phases are then
// appended to the chunk in group order; keys in [lo, hi] are noted as candidates when
// `track`.  counts[g] receives each group's entry count.
// Appends, branch-free, the entries of row[iw0:W:sw] with key >= lo to qd/vd from n (their
// positions qv, qv + 16, ...); counts keys > hi and tracks the largest key.  Returns n.
template <typename T>
SFL_INLINE int64_t append_kept(const T* __restrict row, int64_t iw0, int64_t W, int64_t sw,
                               int32_t qv, int32_t* __restrict qd, float* __restrict vd,
                               int64_t n, uint32_t lo, uint32_t hi, int64_t& above,
                               uint32_t& mx) {
  int64_t ab = above;
  uint32_t m = mx;
  for (int64_t iw = iw0; iw < W; iw += sw, qv += L) {
    const float val = static_cast<float>(row[iw]);
    const uint32_t key = magnitude_key(val);
    qd[n] = qv;
    vd[n] = val;
    n += key >= lo;
    ab += key > hi;
    m = std::max(m, key);
  }
  above = ab;
  mx = m;
  return n;
}

// One plane (one channel of one batch tile): appends, branch-free, every entry with
// key >= lo to its phase's staging area (sq/sv + phase * stage, counts in cnt), images
// outer, rows, then columns of each phase.  A separate function with restrict pointers
// and local sums, so that the inner loop keeps everything in registers.
template <typename T>
__attribute__((noinline)) void scan_plane(const T* __restrict x, int64_t lanes, int64_t img,
                                          const PackGeom& p, int32_t* __restrict sq,
                                          float* __restrict sv, int64_t stage,
                                          int64_t* __restrict cnt, uint32_t lo, uint32_t hi,
                                          int64_t& above_out, uint32_t& max_out) {
  int64_t above = 0;
  uint32_t mx = 0;
  for (int64_t i = 0; i < lanes; ++i)
    for (int64_t ih = 0; ih < p.H; ++ih) {
      const int64_t a = (ih + p.ph) % p.sh, u = (ih + p.ph) / p.sh;
      const T* row = x + i * img + ih * p.W;
      for (int64_t b = 0; b < p.sw; ++b) {
        const int64_t f = a * p.sw + b;
        const int64_t iw0 = ((b - p.pw) % p.sw + p.sw) % p.sw;  // first iw of phase b
        const int32_t qv = static_cast<int32_t>((u * p.Wq + (iw0 + p.pw) / p.sw) * L + i);
        cnt[f] = append_kept(row, iw0, p.W, p.sw, qv, sq + f * stage, sv + f * stage, cnt[f],
                             lo, hi, above, mx);
      }
    }
  above_out += above;
  max_out = std::max(max_out, mx);
}

// A plane scanned as one run of H*W entries per image, each entry's grid position and
// phase from a table (FlatTable).  The per-row scans above paid their setup and a scalar
// tail per row: on the small images of a ResNet's late stages (4x4, 7x7, 14x14) most of a
// row is tail, for stride 2 all of it.  Within each phase the entries land in the per-row
// scans' order (images, rows, columns): a phase's entries are a subsequence of the run.
struct FlatTable {
  std::vector<int32_t> qoff;    // [H*W]: the entry's grid position (u * Wq + v) * L
  std::vector<uint8_t> phase;   // [H*W]: its phase a * sw + b
  std::vector<uint16_t> pmask;  // [ceil(H*W / 16)][phases]: the lanes of a 16-entry block
  int64_t phases = 1;           //   in each phase
};

// The flat scan covers strides up to 2 x 2 (more phases: the per-row scans).
bool flat_scan_applies(const PackGeom& p) { return p.sh <= 2 && p.sw <= 2; }

FlatTable flat_table(const PackGeom& p) {
  FlatTable t;
  const int64_t HW = p.H * p.W, blocks = (HW + 15) / 16;
  t.phases = p.sh * p.sw;
  t.qoff.resize(HW);
  t.phase.resize(HW);
  t.pmask.assign(blocks * t.phases, 0);
  for (int64_t ih = 0; ih < p.H; ++ih)
    for (int64_t iw = 0; iw < p.W; ++iw) {
      const int64_t j = ih * p.W + iw;
      const int64_t a = (ih + p.ph) % p.sh, u = (ih + p.ph) / p.sh;
      const int64_t b = (iw + p.pw) % p.sw, v = (iw + p.pw) / p.sw;
      t.qoff[j] = static_cast<int32_t>((u * p.Wq + v) * L);
      t.phase[j] = static_cast<uint8_t>(a * p.sw + b);
      t.pmask[(j / 16) * t.phases + a * p.sw + b] |= static_cast<uint16_t>(1u << (j % 16));
    }
  return t;
}

// The scalar flat scan.  One phase keeps its count in a register; several index theirs.
template <typename T, bool kMulti>
__attribute__((noinline)) void scan_flat(const T* __restrict x, int64_t lanes, int64_t img,
                                         int64_t HW, const FlatTable& ft,
                                         int32_t* __restrict sq, float* __restrict sv,
                                         int64_t stage, int64_t* __restrict cnt, uint32_t lo,
                                         uint32_t hi, int64_t& above_out, uint32_t& max_out) {
  const int32_t* __restrict qoff = ft.qoff.data();
  const uint8_t* __restrict ph = ft.phase.data();
  int64_t n = cnt[0], above = 0;
  uint32_t mx = 0;
  for (int64_t i = 0; i < lanes; ++i) {
    const T* row = x + i * img;
    const int32_t li = static_cast<int32_t>(i);
    for (int64_t j = 0; j < HW; ++j) {
      const float val = static_cast<float>(row[j]);
      const uint32_t key = magnitude_key(val);
      if constexpr (kMulti) {
        const int64_t f = ph[j], at = f * stage + cnt[f];
        sq[at] = qoff[j] + li;
        sv[at] = val;
        cnt[f] += key >= lo;
      } else {
        sq[n] = qoff[j] + li;
        sv[n] = val;
        n += key >= lo;
      }
      above += key > hi;
      mx = std::max(mx, key);
    }
  }
  if constexpr (!kMulti) cnt[0] = n;
  above_out += above;
  max_out = std::max(max_out, mx);
}

// The same with AVX-512 compress, 16 entries a step: one compress per phase present.
SFL_AVX512 void scan_flat_avx512(const float* __restrict x, int64_t lanes, int64_t img,
                                 int64_t HW, const FlatTable& ft, int32_t* __restrict sq,
                                 float* __restrict sv, int64_t stage, int64_t* __restrict cnt,
                                 uint32_t lo, uint32_t hi, int64_t& above_out,
                                 uint32_t& max_out) {
#if defined(SFL_X86)
  const int32_t* __restrict qoff = ft.qoff.data();
  const uint16_t* __restrict pm = ft.pmask.data();
  const int64_t S = ft.phases;
  int64_t n[4] = {cnt[0], S > 1 ? cnt[1] : 0, S > 2 ? cnt[2] : 0, S > 3 ? cnt[3] : 0};
  int64_t above = 0;
  __m512i mxv = _mm512_setzero_si512();
  const __m512i lov = _mm512_set1_epi32(static_cast<int32_t>(lo));
  const __m512i hiv = _mm512_set1_epi32(static_cast<int32_t>(hi));
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t i = 0; i < lanes; ++i) {
    const float* row = x + i * img;
    const __m512i li = _mm512_set1_epi32(static_cast<int32_t>(i));
    for (int64_t j = 0; j < HW; j += 16) {
      // the last block of an image: only its first HW - j lanes are entries
      const __mmask16 in = HW - j >= 16 ? static_cast<__mmask16>(0xffff)
                                        : static_cast<__mmask16>((1u << (HW - j)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(in, row + j);
      const __m512i key = _mm512_and_si512(_mm512_castps_si512(v), absmask);
      const __mmask16 keep = _mm512_mask_cmpge_epu32_mask(in, key, lov);
      above += __builtin_popcount(_mm512_mask_cmpgt_epu32_mask(in, key, hiv));
      mxv = _mm512_max_epu32(mxv, key);
      const __m512i q = _mm512_add_epi32(_mm512_maskz_loadu_epi32(in, qoff + j), li);
      if (S == 1) {
        _mm512_storeu_ps(sv + n[0], _mm512_maskz_compress_ps(keep, v));
        _mm512_storeu_si512(sq + n[0], _mm512_maskz_compress_epi32(keep, q));
        n[0] += __builtin_popcount(keep);
        continue;
      }
      const uint16_t* bm = pm + (j / 16) * S;
      for (int64_t f = 0; f < S; ++f) {
        const __mmask16 kb = keep & bm[f];
        _mm512_storeu_ps(sv + f * stage + n[f], _mm512_maskz_compress_ps(kb, v));
        _mm512_storeu_si512(sq + f * stage + n[f], _mm512_maskz_compress_epi32(kb, q));
        n[f] += __builtin_popcount(kb);
      }
    }
  }
  for (int64_t f = 0; f < S; ++f) cnt[f] = n[f];
  above_out += above;
  alignas(64) uint32_t m16[16];
  _mm512_store_si512(m16, mxv);
  max_out = std::max(max_out, *std::max_element(m16, m16 + 16));
#else  // never selected off x86
  scan_flat<float, true>(x, lanes, img, HW, ft, sq, sv, stage, cnt, lo, hi, above_out,
                         max_out);
#endif
}

template <typename T>
void pack_plane(const T* x, const PackGeom& p, int64_t nt, int64_t c, uint32_t lo, uint32_t hi,
                bool track, PackChunk& out, int32_t* sq, float* sv, int64_t stage,
                int64_t* counts, const FlatTable* ft) {
  const int64_t lanes = std::min(L, p.N - nt * L), HW = p.H * p.W;
  const int64_t base = (nt * L * p.C + c) * HW, img = p.C * HW;
  const int64_t phases = p.sh * p.sw;
  const int64_t g0 = (nt * p.C + c) * phases;
  int64_t cnt[64];  // per phase (phases <= 64 is checked by the caller)
  for (int64_t f = 0; f < phases; ++f) cnt[f] = 0;
  bool done = false;
  if (ft != nullptr) {  // strides up to 2 x 2 (the caller's choice)
    if constexpr (std::is_same_v<T, float>) {
      if (isa() == Isa::kAvx512) {
        scan_flat_avx512(x + base, lanes, img, HW, *ft, sq, sv, stage, cnt, lo, hi, out.above,
                         out.kmax);
        done = true;
      }
    }
    if (!done)
      (phases == 1 ? scan_flat<T, false> : scan_flat<T, true>)(
          x + base, lanes, img, HW, *ft, sq, sv, stage, cnt, lo, hi, out.above, out.kmax);
    done = true;
  }
  if (!done)  // strides beyond 2: row by row
    scan_plane(x + base, lanes, img, p, sq, sv, stage, cnt, lo, hi, out.above, out.kmax);
  for (int64_t f = 0; f < phases; ++f) {
    const int64_t at = static_cast<int64_t>(out.q.size());
    const int32_t* qd = sq + f * stage;
    const float* vd = sv + f * stage;
    out.q.insert(out.q.end(), qd, qd + cnt[f]);
    out.v.insert(out.v.end(), vd, vd + cnt[f]);
    counts[g0 + f] = cnt[f];
    if (track) {  // the entries in the bracket, branch-free (a third of them, scattered)
      size_t nc = out.cand.size();
      out.cand.resize(nc + cnt[f]);
      for (int64_t t = 0; t < cnt[f]; ++t) {
        const uint32_t key = magnitude_key(vd[t]);
        out.cand[nc] = {key, at + t};
        nc += key <= hi;
      }
      out.cand.resize(nc);
    }
  }
}

// The NCHW index of the entry at `pos` of a chunk (ties at the threshold go to the lower).
// `starts`: every group's first position, G + 1 prefix sums of the counts; the group holding
// pos is found by bisection (a walk from the chunk's first group made ties at a cut
// quadratic: post-ReLU inputs cut at zero have ties in the tens of thousands).
int64_t entry_flat(const PackChunk& ch, int64_t pos, const PackGeom& p, const int64_t* starts) {
  const int64_t ga = ch.t0 * p.sh * p.sw, gb = ch.t1 * p.sh * p.sw;
  const int64_t at = starts[ga] + pos;
  const int64_t g = std::upper_bound(starts + ga, starts + gb + 1, at) - starts - 1;
  const int64_t b = g % p.sw, a = (g / p.sw) % p.sh, c = (g / (p.sw * p.sh)) % p.C;
  const int64_t nt = g / (p.sw * p.sh * p.C);
  const int64_t pix = ch.q[pos] / L, lane = ch.q[pos] % L;
  const int64_t ih = (pix / p.Wq) * p.sh + a - p.ph, iw = (pix % p.Wq) * p.sw + b - p.pw;
  return (((nt * L + lane) * p.C + c) * p.H + ih) * p.W + iw;
}

// k >= 0: exactly the entries torch.ops.sparsefl_C.topk_compress keeps (largest |x|, ties
// to the lower NCHW index); k == -1: every nonzero (no pruning; exact, zeros add nothing).
// Selection without a separate threshold pass: a sample of the keys brackets the k-th
// largest in [lo, hi]; one pass keeps every key >= lo and notes the keys in [lo, hi]; the
// exact k-th key and its tie cutoff come from those candidates, which are then filtered.
// If the bracket misses (rare), the radix select gives the threshold and the pass runs
// again with it: exact either way.

// One pixel per plane at stride 1 (a Linear layer; a conv at 1x1 spatial size): the q of a
// kept input is the pixel's base + its lane.
int64_t pixel_base(const PackGeom& pg) { return (pg.ph * pg.Wq + pg.pw) * L; }

// The one-pixel case (every input of a Linear layer): the general pack's machinery
// (bracket, chunks, candidates) costs more than the selection on a 16-image batch's 1-2K
// entries and buys nothing on large ones (one plane per channel, no parallel scan): keys
// once, the exact cut by radix selection, then a count pass and a fill pass straight into
// the outputs.  Same entries, order and tie rule as the general path.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_one_pixel(const at::Tensor& x, int64_t k,
                                                              const PackGeom& pg,
                                                              const char* op,
                                                              int64_t tau_key = -1) {
  const int64_t n = x.numel(), C = pg.C, G = pg.groups();
  std::vector<uint32_t> keys(n);
  std::vector<float> vals(n);
  dispatch_float_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = x.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) vals[i] = static_cast<float>(xs[i]);
  });
  uint32_t mx = 0;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, keys[i] = magnitude_key(vals[i]));
  TORCH_CHECK_VALUE(mx <= 0x7f800000u, op, ": input contains NaN");
  // keep(i) = key > ck, or key == ck and i <= tie
  uint32_t ck = 0;
  int64_t tie = -1;  // k == -1: the nonzeros
  if (tau_key >= 0) {  // a threshold: keep every key >= tau_key (ties all kept)
    if (tau_key == 0) {
      tie = INT64_MAX;
    } else {
      ck = static_cast<uint32_t>(tau_key - 1);
      tie = -1;
    }
  } else if (k == 0) {
    ck = 0xffffffffu;
  } else if (k == n) {
    tie = INT64_MAX;
  } else if (k > 0) {
    ck = kth_largest(keys.data(), n, k);
    int64_t gt = 0;
    for (const uint32_t kk : keys) gt += kk > ck;
    int64_t need_eq = k - gt;  // the ties kept: the lowest flat indices
    for (int64_t i = 0; i < n && need_eq > 0; ++i)
      if (keys[i] == ck && --need_eq == 0) tie = i;
  }
  // keep(i) as bytes, branch-free (the kept pattern is data: branches mispredict)
  std::vector<uint8_t> km(n);
  for (int64_t i = 0; i < n; ++i)
    km[i] = static_cast<uint8_t>((keys[i] > ck) | ((keys[i] == ck) & (i <= tie)));
  auto ptr = at::empty({G + 1}, x.options().dtype(at::kLong));
  int64_t* pp = ptr.data_ptr<int64_t>();
  std::fill(pp, pp + G + 1, 0);
  for (int64_t r = 0; r < pg.N; ++r) {  // image r: its row of C inputs, groups of its tile
    int64_t* row = pp + (r / L) * C + 1;
    const uint8_t* kr = km.data() + r * C;
    for (int64_t c = 0; c < C; ++c) row[c] += kr[c];
  }
  for (int64_t g = 0; g < G; ++g) pp[g + 1] += pp[g];
  const int64_t kept = pp[G];
  TORCH_CHECK(k < 0 || kept == k, op, ": internal error, kept ", kept, " of k = ", k);
  // the entries in group order, written unconditionally one slot ahead (+1 slack)
  std::vector<int32_t> qs(kept + 1);
  std::vector<float> vs(kept + 1);
  const int32_t base = static_cast<int32_t>(pixel_base(pg));
  int64_t w = 0;
  for (int64_t nt = 0; nt < pg.NT; ++nt) {
    const int64_t lanes = std::min(L, pg.N - nt * L);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t lane = 0; lane < lanes; ++lane) {
        const int64_t i = (nt * L + lane) * C + c;
        qs[w] = base + static_cast<int32_t>(lane);
        vs[w] = vals[i];
        w += km[i];
      }
  }
  auto q = at::empty({kept}, x.options().dtype(at::kInt));
  auto v = at::empty({kept}, x.options().dtype(at::kFloat));
  std::copy(qs.begin(), qs.begin() + kept, q.data_ptr<int32_t>());
  std::copy(vs.begin(), vs.begin() + kept, v.data_ptr<float>());
  return {ptr, q, v};
}

// tau (SparsyFed's first-batch threshold): keep every entry with |x| >= tau instead of
// the k largest (k must then be -1).  No selection at all: the threshold is known, so it
// is the one pass that k == -1 makes, with tau's key as its lower bound.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_act_pack_cpu(
    const at::Tensor& x_in, int64_t k, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding, c10::optional<double> tau) {
  const char* op = "sparsefl.sparse_act_pack";
  check_float(x_in, op, "input");
  const PackGeom pg = pack_geom(x_in.sizes(), kernel, stride, padding, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t G = pg.groups(), n = x.numel(), planes = pg.NT * pg.C;
  TORCH_CHECK_VALUE(k >= -1 && k <= n, op, ": k = ", k, " is outside [-1, ", n, "]");
  int64_t tau_key = -1;  // -1: no threshold
  if (tau.has_value()) {
    TORCH_CHECK_VALUE(k == -1, op, ": give k = -1 with a threshold tau (got k = ", k, ")");
    tau_key = tau_key_of(*tau, op);
  }
  if (pg.H == 1 && pg.W == 1 && pg.sh == 1 && pg.sw == 1)
    return pack_one_pixel(x, k, pg, op, tau_key);
  std::vector<int64_t> counts(G, 0);
  std::vector<PackChunk> chunks;
  std::mutex mu;
  const FlatTable ft = flat_scan_applies(pg) ? flat_table(pg) : FlatTable();

  // One pass over all planes with bracket [lo, hi]; returns the count of keys above hi.
  auto pass = [&](uint32_t lo, uint32_t hi, bool track) {
    chunks.clear();
    dispatch_float_dtype(x.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      const T* xs = x.data_ptr<T>();
      at::parallel_for(0, planes, grain(planes, double(n)), [&](int64_t t0, int64_t t1) {
        PackChunk ch;
        ch.t0 = t0;
        ch.t1 = t1;
        // staging per phase: a plane's entries of one phase, at most this many
        // (+16: the AVX-512 scan stores 16 entries past the count)
        const int64_t stage =
            L * ((pg.H + pg.sh - 1) / pg.sh) * ((pg.W + pg.sw - 1) / pg.sw) + 16;
        std::unique_ptr<int32_t[]> sq(new int32_t[stage * pg.sh * pg.sw]);
        std::unique_ptr<float[]> sv(new float[stage * pg.sh * pg.sw]);
        ch.q.reserve(static_cast<size_t>((t1 - t0) * stage * pg.sh * pg.sw / 16));
        ch.v.reserve(ch.q.capacity());
        for (int64_t t = t0; t < t1; ++t)
          pack_plane(xs, pg, t / pg.C, t % pg.C, lo, hi, track, ch, sq.get(), sv.get(), stage,
                     counts.data(), ft.qoff.empty() ? nullptr : &ft);
        std::lock_guard<std::mutex> g(mu);
        chunks.push_back(std::move(ch));
      });
    });
    std::sort(chunks.begin(), chunks.end(),
              [](const PackChunk& a, const PackChunk& b) { return a.t0 < b.t0; });
    int64_t above = 0;
    uint32_t kmax = 0;
    for (const auto& ch : chunks) {
      above += ch.above;
      kmax = std::max(kmax, ch.kmax);
    }
    TORCH_CHECK_VALUE(kmax <= 0x7f800000u, op, ": input contains NaN");
    return above;
  };

  // Exact threshold by selection on all keys: small inputs (no sample, no fork).
  auto small_cut = [&]() {
    std::vector<uint32_t> keys(n);
    dispatch_float_dtype(x.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      const T* xs = x.data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) keys[i] = magnitude_key(static_cast<float>(xs[i]));
    });
    TORCH_CHECK_VALUE(*std::max_element(keys.begin(), keys.end()) <= 0x7f800000u, op,
                      ": input contains NaN");
    MagnitudeCut c;
    c.key = kth_largest(keys.data(), n, k);
    int64_t gt = 0, eq = 0;
    for (uint32_t kk : keys) gt += kk > c.key, eq += kk == c.key;
    const int64_t need_eq = k - gt;
    c.tie_cutoff = INT64_MAX;
    if (need_eq < eq)
      for (int64_t i = 0, seen = 0; i < n; ++i)
        if (keys[i] == c.key && ++seen == need_eq) {
          c.tie_cutoff = i;
          break;
        }
    return c;
  };

  if (tau_key >= 0) {
    pass(static_cast<uint32_t>(tau_key), 0xffffffffu, false);
  } else if (k == -1 || k == n || k == 0 || n == 0) {
    // nonzeros (key >= 1), everything (key >= 0) or nothing
    pass(k == -1 ? 1u : k == 0 ? 0xffffffffu : 0u, 0xffffffffu, false);
    if (k == 0)
      for (auto& ch : chunks) ch.q.clear(), ch.v.clear();
    if (k == 0) std::fill(counts.begin(), counts.end(), 0);
  } else {
    const bool small = n <= 65536;
    // Bracket from a sample of 16K keys taken as 2048 runs of 8 (within a cache line: few
    // misses), one run at a pseudo-random offset inside each 1/2048 of x (even spacing
    // would hit the same pixel of every plane); the margin allows for neighbours being alike.
    uint32_t lo = 1u, hi = 0u;  // small: no bracket (lo > hi), the exact cut below
    if (!small) {
      constexpr int64_t kRun = 8;
      const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(2048, n / kRun));
      const int64_t gap = n / runs;
      std::vector<uint32_t> sample;
      sample.reserve(runs * kRun);
      dispatch_float_dtype(x.scalar_type(), op, [&](auto tag) {
        using T = decltype(tag);
        const T* xs = x.data_ptr<T>();
        uint64_t h = 0x9e3779b97f4a7c15ull;  // fixed seed: the same sample every call
        for (int64_t r0 = 0; r0 < runs; ++r0) {
          h = h * 6364136223846793005ull + 1442695040888963407ull;
          const int64_t start =
              r0 * gap + static_cast<int64_t>((h >> 33) % std::max<int64_t>(1, gap - kRun + 1));
          for (int64_t i = start, e = std::min(n, start + kRun); i < e; ++i)
            sample.push_back(magnitude_key(static_cast<float>(xs[i])));
        }
      });
      const int64_t m = static_cast<int64_t>(sample.size());
      const double r = static_cast<double>(k) * m / n;
      const double margin = 6.0 * std::sqrt(r + 1.0) + 16.0;
      const int64_t r_hi = static_cast<int64_t>(std::floor(r - margin));
      const int64_t r_lo = static_cast<int64_t>(std::ceil(r + margin));
      auto rank = [&](int64_t i) {  // the i-th largest sample key (0-based)
        return kth_largest(sample.data(), m, i + 1);
      };
      hi = r_hi < 0 ? 0xffffffffu : rank(r_hi);
      lo = r_lo >= m ? 0u : rank(r_lo);
    }
    const int64_t c_gt = small ? 0 : pass(lo, hi, true);
    int64_t nc = 0;
    for (const auto& ch : chunks) nc += static_cast<int64_t>(ch.cand.size());
    MagnitudeCut cut;
    std::vector<int64_t> starts(G + 1, 0);  // the groups' first positions (entry_flat)
    auto count_starts = [&]() {
      for (int64_t g = 0; g < G; ++g) starts[g + 1] = starts[g] + counts[g];
    };
    count_starts();
    if (!small && c_gt < k && k <= c_gt + nc) {
      const int64_t want = k - c_gt;  // the want-th largest candidate is the k-th key
      std::vector<uint32_t> keys;
      keys.reserve(nc);
      for (const auto& ch : chunks)
        for (const auto& c : ch.cand) keys.push_back(c.key);
      // radix selection: serial here (the other threads wait), and nth_element's
      // partitioning mispredicts on these keys
      cut.key = kth_largest(keys.data(), nc, want);
      int64_t gt = 0;
      std::vector<int64_t> ties;
      for (const auto& ch : chunks)
        for (const auto& c : ch.cand) {
          gt += c.key > cut.key;
          if (c.key == cut.key) ties.push_back(entry_flat(ch, c.pos, pg, starts.data()));
        }
      const int64_t need_eq = want - gt;
      if (need_eq >= static_cast<int64_t>(ties.size())) {
        cut.tie_cutoff = INT64_MAX;
      } else {
        std::nth_element(ties.begin(), ties.begin() + (need_eq - 1), ties.end());
        cut.tie_cutoff = ties[need_eq - 1];
      }
    } else {  // small input, or the bracket missed: the exact threshold, then the pass
      cut = small ? small_cut() : magnitude_cut(x, k);
      pass(cut.key, cut.key, true);
      count_starts();
    }
    // Drop the candidates below the cut, in place, fixing the group counts.
    const int64_t nch = static_cast<int64_t>(chunks.size());
    at::parallel_for(0, nch, grain(nch, double(k)), [&](int64_t c0, int64_t c1) {
      for (int64_t ci = c0; ci < c1; ++ci) {
        PackChunk& ch = chunks[ci];
        bool any = false;
        for (const auto& c : ch.cand) {  // branch-free where the outcome is data
          bool keep = c.key > cut.key;
          if (c.key == cut.key)  // rare: ties at the cut
            keep = cut.tie_cutoff == INT64_MAX ||
                   entry_flat(ch, c.pos, pg, starts.data()) <= cut.tie_cutoff;
          ch.q[c.pos] = keep ? ch.q[c.pos] : -1;
          any |= !keep;
        }
        if (!any) continue;
        // walk the chunk's groups in order to recount them (compaction without branches)
        const int64_t ga = ch.t0 * pg.sh * pg.sw, gb = ch.t1 * pg.sh * pg.sw;
        size_t rd = 0, wr = 0;
        for (int64_t g = ga; g < gb; ++g) {
          const size_t w0 = wr;
          for (int64_t e = 0; e < counts[g]; ++e, ++rd) {
            ch.q[wr] = ch.q[rd];
            ch.v[wr] = ch.v[rd];
            wr += ch.q[rd] >= 0;
          }
          counts[g] = static_cast<int64_t>(wr - w0);
        }
        ch.q.resize(wr);
        ch.v.resize(wr);
      }
    });
  }

  auto ptr = at::empty({G + 1}, x.options().dtype(at::kLong));
  int64_t* pp = ptr.data_ptr<int64_t>();
  pp[0] = 0;
  for (int64_t g = 0; g < G; ++g) pp[g + 1] = pp[g] + counts[g];
  TORCH_CHECK(k < 0 || pp[G] == k, op, ": internal error, kept ", pp[G], " of k = ", k);
  auto q = at::empty({pp[G]}, x.options().dtype(at::kInt));
  auto v = at::empty({pp[G]}, x.options().dtype(at::kFloat));
  int32_t* qp = q.data_ptr<int32_t>();
  float* vp = v.data_ptr<float>();
  const int64_t nch = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, nch, grain(nch, double(pp[G])), [&](int64_t c0, int64_t c1) {
    for (int64_t ci = c0; ci < c1; ++ci) {
      const PackChunk& ch = chunks[ci];
      const int64_t at = pp[ch.t0 * pg.sh * pg.sw];
      std::copy(ch.q.begin(), ch.q.end(), qp + at);
      std::copy(ch.v.begin(), ch.v.end(), vp + at);
    }
  });
  return {ptr, q, v};
}

}  // namespace conv
}  // namespace sparsefl
