// The support of a layer, packed once per round, and the index plans built from it.
//
// pack_support: rows = output channels (the forward's and the weight gradient's grouping),
// columns = input channels (the input gradient's).  A plan turns each support entry into
// the offsets a pass reads (a tap's offset inside an input tile, or inside the dy tiles),
// once per support and input size: the O(nnz) index arithmetic never runs per step.
#include <algorithm>
#include "sparse_conv.h"

namespace sparsefl {
namespace conv {

// The dyp offset of tap (kh, kw) of output channel co (see the top of the file).
struct TapOffset {
  FastDiv fsh, fsw;
  int64_t Hq, Wq, Ph, Pw;
  explicit TapOffset(const Geom& g)
      : fsh(g.sh), fsw(g.sw), Hq(g.Hq()), Wq(g.Wq()), Ph(g.Ph()), Pw(g.Pw()) {}
  SFL_INLINE int64_t operator()(int64_t co, int64_t kh, int64_t kw) const {
    return ((co * Hq + Ph - fsh.div(kh)) * Wq + Pw - fsw.div(kw)) * L;
  }
};

void plan_rows(const Geom& g, const int64_t* rp, const int32_t* cp, Plan& P, bool fwd,
               bool wgrad) {
  const int64_t nnz = rp[g.Co];
  const int64_t Hp = g.Hp(), Wp = g.Wp();
  const TapDiv taps(g.KH, g.KW);
  const TapOffset tap_off(g);
  P.widx.resize(nnz);
  if (fwd) P.off.resize(nnz);
  if (wgrad) P.roff.resize(nnz), P.rgrp.resize(nnz);
  for (int64_t co = 0; co < g.Co; ++co)
    for (int64_t j = rp[co]; j < rp[co + 1]; ++j) {
      int64_t ci, kh, kw;
      taps.split(cp[j], ci, kh, kw);
      P.widx[j] = co * g.K() + cp[j];
      if (fwd) P.off[j] = ((ci * Hp + kh) * Wp + kw) * L;
      if (wgrad) {
        P.roff[j] = tap_off(co, kh, kw);
        P.rgrp[j] = (ci * g.sh + tap_off.fsh.mod(kh)) * g.sw + tap_off.fsw.mod(kw);
      }
    }
}

// The column support (entries of input channel ci, as flat weight indices) split by phase:
// a stable counting sort (stride 1: one phase, the column support itself).
void plan_columns(const Geom& g, const int64_t* cpp, const int32_t* ce, Plan& P) {
  const int64_t nnz = cpp[g.C], S = g.sh * g.sw;
  const FastDiv fK(g.K());
  const TapDiv taps(g.KH, g.KW);
  const TapOffset tap_off(g);
  std::vector<int64_t> poff(nnz);
  std::vector<int32_t> phase_of(nnz);
  for (int64_t ci = 0; ci < g.C; ++ci)
    for (int64_t j = cpp[ci]; j < cpp[ci + 1]; ++j) {
      const int64_t co = fK.div(ce[j]);
      int64_t cc, kh, kw;
      taps.split(ce[j] - co * g.K(), cc, kh, kw);
      phase_of[j] = static_cast<int32_t>(tap_off.fsh.mod(kh) * g.sw + tap_off.fsw.mod(kw));
      poff[j] = tap_off(co, kh, kw);
    }
  if (S == 1) {
    P.pptr.assign(cpp, cpp + g.C + 1);
    P.poff.swap(poff);
    P.pidx.assign(ce, ce + nnz);
    return;
  }
  P.pptr.assign(S * (g.C + 1), 0);
  for (int64_t ci = 0; ci < g.C; ++ci)
    for (int64_t j = cpp[ci]; j < cpp[ci + 1]; ++j) ++P.pptr[phase_of[j] * (g.C + 1) + ci + 1];
  int64_t run = 0;
  for (int64_t f = 0; f < S; ++f) {
    int64_t* pp = P.pptr.data() + f * (g.C + 1);
    pp[0] = run;
    for (int64_t ci = 0; ci < g.C; ++ci) pp[ci + 1] += pp[ci];
    run = pp[g.C];
  }
  std::vector<int64_t> fill(S * g.C);
  for (int64_t f = 0; f < S; ++f)
    for (int64_t ci = 0; ci < g.C; ++ci) fill[f * g.C + ci] = P.pptr[f * (g.C + 1) + ci];
  P.poff.resize(nnz);
  P.pidx.resize(nnz);
  for (int64_t ci = 0; ci < g.C; ++ci)
    for (int64_t j = cpp[ci]; j < cpp[ci + 1]; ++j) {
      const int64_t slot = fill[phase_of[j] * g.C + ci]++;
      P.poff[slot] = poff[j];
      P.pidx[slot] = ce[j];
    }
}

// The support of omega in both groupings (the definition: pack_support in
// sparsefl/ops/reference/sparse_conv.py): rows = output channels, entries the nonzero
// columns c = ci * KH * KW + kh * KW + kw ascending; columns = input channels, entries the
// flat indices co * K + c in (co, c) order.  Once per layer and round.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_support_cpu(
    const at::Tensor& omega_in) {
  const char* op = "sparsefl.pack_support";
  check_float(omega_in, op, "weight");
  TORCH_CHECK_VALUE(omega_in.dim() == 2 || omega_in.dim() == 4, op,
                    ": weight must be 2-D or 4-D, got ", omega_in.dim(), "-D");
  const at::Tensor w = omega_in.contiguous();
  const int64_t co = w.size(0), C = w.size(1);
  const int64_t kk = w.dim() == 4 ? w.size(2) * w.size(3) : 1, K = C * kk;
  TORCH_CHECK_VALUE(co * K < (int64_t{1} << 31), op, ": weight has 2^31 or more entries");
  auto rowptr = at::empty({co + 1}, w.options().dtype(at::kLong));
  auto cptr = at::zeros({C + 1}, w.options().dtype(at::kLong));
  int64_t* rp = rowptr.data_ptr<int64_t>();
  int64_t* cp = cptr.data_ptr<int64_t>();
  std::vector<uint8_t> nz(co * K);
  dispatch_float_dtype(w.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* ws = w.data_ptr<T>();
    for (int64_t i = 0; i < co * K; ++i) nz[i] = static_cast<float>(ws[i]) != 0.0f;
  });
  rp[0] = 0;
  for (int64_t r = 0; r < co; ++r) {
    int64_t n = 0;
    for (int64_t c = 0; c < K; ++c) n += nz[r * K + c];
    rp[r + 1] = rp[r] + n;
  }
  const int64_t nnz = rp[co];
  for (int64_t r = 0; r < co; ++r)
    for (int64_t c = 0; c < K; ++c) cp[c / kk + 1] += nz[r * K + c];
  for (int64_t ci = 0; ci < C; ++ci) cp[ci + 1] += cp[ci];
  auto cols = at::empty({nnz}, w.options().dtype(at::kInt));
  auto cent = at::empty({nnz}, w.options().dtype(at::kInt));
  int32_t* cs = cols.data_ptr<int32_t>();
  int32_t* ce = cent.data_ptr<int32_t>();
  std::vector<int64_t> fill(cp, cp + C);
  int64_t j = 0;
  for (int64_t r = 0; r < co; ++r)
    for (int64_t c = 0; c < K; ++c)
      if (nz[r * K + c]) {
        cs[j++] = static_cast<int32_t>(c);
        ce[fill[c / kk]++] = static_cast<int32_t>(r * K + c);
      }
  return {rowptr, cols, cptr, cent};
}

// Every entry of column ci must be a weight of input channel ci, and the columns must
// hold the rows' entries.  Both groupings are strictly ascending per group (check_csr)
// and hold as many entries, so every column entry found in its row (binary search over
// the row's ascending columns) makes the two sets equal.
void check_columns(const Geom& g, const int64_t* cpp, const int32_t* ce, const int64_t* rp,
                   const int32_t* cols, const char* op) {
  const FastDiv fK(g.K());
  const TapDiv taps(g.KH, g.KW);
  bool ok = true;
  for (int64_t ci = 0; ci < g.C; ++ci)
    for (int64_t j = cpp[ci]; j < cpp[ci + 1]; ++j) ok &= taps.kk.div(fK.mod(ce[j])) == ci;
  TORCH_CHECK_VALUE(ok, op, ": support column entries do not match their input channel");
  const int64_t K = g.K();
  for (int64_t j = 0; j < cpp[g.C]; ++j) {
    const int64_t r = ce[j] / K;
    const int32_t c = static_cast<int32_t>(ce[j] - r * K);
    ok &= std::binary_search(cols + rp[r], cols + rp[r + 1], c);
  }
  TORCH_CHECK_VALUE(ok, op, ": support rows and columns hold different entries (one "
                    "support must be the same set in both groupings)");
}

// Nonzero weights outside the support: all nonzeros minus those at the plan's entries.
// One read of the weight per forward (a ResNet-18 step: 45 MB, in parallel blocks).
template <typename T>
int64_t escapes_of(const T* w, int64_t numel, const Plan& P) {
  constexpr int64_t kBlock = 1 << 16;
  const int64_t nnz = static_cast<int64_t>(P.widx.size());
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, blocks, grain(blocks, double(numel)), [&](int64_t b0, int64_t b1) {
    int64_t nz = 0;
    for (int64_t i = b0 * kBlock, e = std::min(numel, b1 * kBlock); i < e; ++i)
      nz += static_cast<float>(w[i]) != 0.0f;
    total += nz;
  });
  int64_t in_s = 0;
  for (int64_t j = 0; j < nnz; ++j) in_s += static_cast<float>(w[P.widx[j]]) != 0.0f;
  return total.load() - in_s;
}

template int64_t escapes_of<float>(const float*, int64_t, const Plan&);
template int64_t escapes_of<c10::Half>(const c10::Half*, int64_t, const Plan&);
template int64_t escapes_of<c10::BFloat16>(const c10::BFloat16*, int64_t, const Plan&);

}  // namespace conv
}  // namespace sparsefl
