// The whole layer as one autograd op (torch.ops.sparsefl_C.sparse_layer).
//
// Forward = the planned forward (+ the pruned input kept for the weight gradient: the
// forward's own pixel tiles, copied pruned, when a quarter or more survives, else the
// activation pack); the backward node is C++ (the planned backward and the bias sum).  One
// dispatcher call per direction, no Python in the backward, and the index plans built once
// per support and input size (SparsePlan).
#include "layer.h"

#include <chrono>
#include <unordered_map>

namespace sparsefl {
namespace conv {

// Plans by integer handle.  The fused op takes the handle, not the object: a TorchScript
// object argument costs a C++ exception per call in torch's Python argument parsing (its
// __torch_function__ lookup), ~10 us, more than a small layer's arithmetic.  Weak
// references: the Python object owns the plan; a freed plan's handle is refused.
std::mutex g_plans_mu;
std::unordered_map<int64_t, c10::weak_intrusive_ptr<SparsePlan>> g_plans;
int64_t g_next_plan = 1;

void SparsePlan::release_resources() {
  std::lock_guard<std::mutex> lock(g_plans_mu);
  if (id != 0) g_plans.erase(id);
}

int64_t plan_handle(const c10::intrusive_ptr<SparsePlan>& self) {
  std::lock_guard<std::mutex> lock(g_plans_mu);
  if (self->id == 0) {
    self->id = g_next_plan++;
    g_plans.emplace(self->id, c10::weak_intrusive_ptr<SparsePlan>(self));
  }
  return self->id;
}

c10::intrusive_ptr<SparsePlan> plan_of(int64_t id) {
  std::lock_guard<std::mutex> lock(g_plans_mu);
  const auto it = g_plans.find(id);
  TORCH_CHECK_VALUE(it != g_plans.end(), "sparsefl.sparse_layer: no sparse plan with handle ",
                    id, " (freed, or not from SparsePlan.handle())");
  auto plan = it->second.lock();
  TORCH_CHECK_VALUE(plan.defined(), "sparsefl.sparse_layer: sparse plan ", id, " was freed");
  return plan;
}

std::atomic<int64_t> g_act_prune_ns{0};

// The forward of the fused op, shared by its autograd and plain (inference) kernels: checks
// that no nonzero weight lies outside the support (the weights were replaced since
// set_compute), then computes y on the support.
at::Tensor layer_forward(const LayerView& lv, const at::Tensor& omega, double beta,
                         const c10::optional<at::Tensor>& bias, SparsePlan& sp, Geom& g,
                         std::shared_ptr<const Plan>& P, const TileVisit* visit) {
  check_operands(lv.x4, "input", lv.w4, beta, kLayerOp);
  sp.check_weight(lv.w4, kLayerOp);
  g = make_geom(lv.x4.sizes(), lv.w4, sp.stride, sp.padding, kLayerOp);
  P = sp.get(g);
  const at::Tensor x = lv.x4.contiguous(), w = lv.w4.contiguous();
  int64_t escaped = 0;
  dispatch_float_dtype(w.scalar_type(), kLayerOp, [&](auto tag) {
    using T = decltype(tag);
    escaped = escapes_of(w.data_ptr<T>(), w.numel(), *P);
  });
  TORCH_CHECK(escaped == 0, "sparsefl: ", escaped, " nonzero weights of a sparse layer lie "
              "outside the support packed by set_compute(); the weights changed since (a new "
              "model was loaded?): call set_compute(model, ...) again");
  return forward_planned(x, w, beta, sp.rowptr.data_ptr<int64_t>(), *P,
                         float_bias(bias, g, kLayerOp), g, kLayerOp, visit);
}

// Activation pruning of the forward's input tiles into a copy (d from s: the convolution
// still reads the unpruned tiles): every entry with |x| below the threshold becomes 0
// (threshold key 0: nothing to prune, 1: the nonzeros); returns how many nonzeros stay.
// It runs between the relayout and the convolution, while the tiles are in cache: after
// the convolution (pruning in place) it cost 84 us a stage-1 call in a round against 35
// us hot.  The kept set is the pack's (|x| >= tau, or the nonzeros), so the weight
// gradient is the same sum whichever form keeps it.  NaN input is refused as the pack
// refuses it.
typedef int32_t iv16 __attribute__((vector_size(64)));
typedef int32_t iv8 __attribute__((vector_size(32)));
typedef int32_t iv4 __attribute__((vector_size(16)));
template <typename V> struct IntVec;  // the int32 vector of V's width
template <> struct IntVec<v16> { using type = iv16; };
template <> struct IntVec<v8> { using type = iv8; };
template <> struct IntVec<v4> { using type = iv4; };

template <typename V>
SFL_INLINE int64_t prune_run(const float* __restrict s, float* __restrict d, int64_t n,
                             int32_t tk, bool& nan) {
  // masks by sign shifts, not vector compares: GCC lowers a generic vector compare in this
  // always-inline body for the default target (per-lane scalar compares), arithmetic
  // stays vector.  Keys lie in [0, 2^31), so the differences below cannot overflow.
  constexpr int64_t W = sizeof(V) / sizeof(float);
  using I = typename IntVec<V>::type;
  const I absmask = I{} + 0x7fffffff, tv = I{} + tk, inf = I{} + 0x7f800000;
  I cnt{}, bad{};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    I bits;
    std::memcpy(&bits, s + i, sizeof bits);
    const I key = bits & absmask;
    const I keep = (tv - key - 1) >> 31;  // all ones where key >= tk
    const I out = bits & keep;
    std::memcpy(d + i, &out, sizeof out);
    cnt -= keep & ((I{} - key) >> 31);  // +1 per kept nonzero
    bad |= (inf - key) >> 31;           // NaN: key > 0x7f800000
  }
  int64_t c = 0;
  bool b = false;
  for (int64_t l = 0; l < W; ++l) c += cnt[l], b |= bad[l] != 0;
  for (; i < n; ++i) {  // the tail
    const uint32_t key = magnitude_key(s[i]);
    const bool keep = key >= static_cast<uint32_t>(tk);
    d[i] = keep ? s[i] : 0.0f;
    c += keep && key != 0;
    b |= key > 0x7f800000u;
  }
  nan = nan || b;
  return c;
}
SFL_AVX512 int64_t prune_run_avx512(const float* s, float* d, int64_t n, int32_t tk,
                                    bool& nan) {
  return prune_run<v16>(s, d, n, tk, nan);
}
SFL_AVX2 int64_t prune_run_avx2(const float* s, float* d, int64_t n, int32_t tk, bool& nan) {
  return prune_run<v8>(s, d, n, tk, nan);
}
int64_t prune_run_portable(const float* s, float* d, int64_t n, int32_t tk, bool& nan) {
  return prune_run<v4>(s, d, n, tk, nan);
}

int64_t prune_tiles(const at::Tensor& xt, at::Tensor& out, int64_t tau_key) {
  const float* src = xt.data_ptr<float>();
  float* d = out.data_ptr<float>();
  const int64_t n = xt.numel();
  const int32_t tk = static_cast<int32_t>(tau_key);  // <= 0x7f800000: a signed compare
  auto fn = isa() == Isa::kAvx512 ? &prune_run_avx512
          : isa() == Isa::kAvx2   ? &prune_run_avx2
                                  : &prune_run_portable;
  constexpr int64_t kBlock = 1 << 14;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> kept(blocks, 0);
  std::vector<char> nan(blocks, 0);
  at::parallel_for(0, blocks, grain(blocks, double(n)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      bool bad = false;
      kept[b] = fn(src + b * kBlock, d + b * kBlock, std::min(kBlock, n - b * kBlock), tk, bad);
      nan[b] = bad;
    }
  });
  TORCH_CHECK_VALUE(std::find(nan.begin(), nan.end(), 1) == nan.end(),
                    "sparsefl.sparse_act_pack: input contains NaN");
  int64_t total = 0;
  for (const int64_t c : kept) total += c;
  return total;
}

// A per-batch top-k whose k-th magnitude tau is tied (select_cut, or a caller's (k, tau)):
// the tiles were pruned to |x| >= tau, which keeps `drop` tied entries too many; the
// top-k keeps the ties of lowest NCHW flat index (the packs' rule), so the last `drop`
// entries equal to tau in flat order go.  A scan from the end: the ties are mostly the
// repeated value of the images' background, so it stops early.  Returns how many it
// dropped (== drop unless tau was not the k-th largest magnitude).
int64_t drop_last_ties(at::Tensor& xt, const Geom& g, int64_t tau_key, int64_t drop) {
  float* d = xt.data_ptr<float>();
  const uint32_t tk = static_cast<uint32_t>(tau_key);
  const int64_t Hp = g.Hp(), Wp = g.Wp();
  int64_t dropped = 0;
  for (int64_t n = g.N - 1; n >= 0 && dropped < drop; --n)
    for (int64_t c = g.C - 1; c >= 0 && dropped < drop; --c) {
      float* plane = d + (((n / L) * g.C + c) * Hp * Wp) * L + n % L;
      for (int64_t h = g.H - 1; h >= 0 && dropped < drop; --h)
        for (int64_t w = g.W - 1; w >= 0 && dropped < drop; --w) {
          float& v = plane[((h + g.ph) * Wp + w + g.pw) * L];
          if (magnitude_key(v) == tk) v = 0.0f, ++dropped;
        }
    }
  return dropped;
}

float key_float(int64_t key) {
  const uint32_t k32 = static_cast<uint32_t>(key);
  float v;
  std::memcpy(&v, &k32, sizeof v);
  return v;
}

// A per-batch cut selected by the layer: the k largest |x| of the input, found on its
// pixel tiles (their padding and empty lanes are zeros, which changes no k-th magnitude
// but zero and no count above it).  The bracket is the last batch's cut widened by a
// margin that follows how far the cut moves (consecutive batches: 3-8% in stages 2-3 of
// a ResNet-18, up to 30% in stage 1): max(0.9 x the last margin, twice the last move),
// within [2%, 100%] (the rule of sparsefl/nn/powerprop.py next_hint, which the Python
// paths keep per module).  The answer never depends on it.
struct Cut {
  int64_t key;       // keep keys >= key ...
  int64_t at_least;  // ... of which there are this many ...
  int64_t keep;      // ... less the last ties at key beyond this many
  int64_t pack_k;    // the same cut for the pack: k, or -1 with pack_tau (or the nonzeros)
  c10::optional<double> pack_tau;
};

Cut select_cut(const at::Tensor& xt, int64_t k, SparsePlan& plan) {
  const float last = plan.cut_tau.load(), r = plan.cut_margin.load();
  std::optional<std::pair<int64_t, int64_t>> bracket;
  if (last == 0.0f) bracket.emplace(1, 0);  // k reached every nonzero: count them first
  if (last > 0.0f)
    bracket.emplace(magnitude_key(last / (1.0f + r)), magnitude_key(last * (1.0f + r)));
  const auto [key, gt, eq] = kth_key_count(xt, k, kLayerOp, bracket);
  const float tau = key_float(key);
  float margin = 0.08f;
  if (last >= 0.0f) {
    const float move = last > 0.0f ? std::fabs(tau - last) / last : (tau == 0.0f ? 0.0f : 1.0f);
    margin = std::min(1.0f, std::max({0.02f, 0.9f * r, 2.0f * move}));
  }
  plan.cut_tau = tau;
  plan.cut_margin = margin;
  if (key == 0) return {1, gt, gt, -1, {}};        // k above the nonzeros: keep them all
  if (gt + eq == k) return {key, k, k, -1, tau};  // no tie split: a threshold
  return {key, gt + eq, k, k, {}};                // a split tie: drop the last ties
}

// The activation pack, its time added to act_prune_ns (the engine's act_prune phase).
std::tuple<at::Tensor, at::Tensor, at::Tensor> timed_pack(const at::Tensor& x4, int64_t k,
                                                          at::IntArrayRef kernel,
                                                          const SparsePlan& plan,
                                                          c10::optional<double> tau) {
  const auto t0 = std::chrono::steady_clock::now();
  auto pack = sparse_act_pack_cpu(x4, k, kernel, plan.stride, plan.padding, tau);
  g_act_prune_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - t0).count();
  return pack;
}

struct SparseLayerFn : public torch::autograd::Function<SparseLayerFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& omega,
                            const c10::optional<at::Tensor>& bias, double beta,
                            const c10::intrusive_ptr<SparsePlan>& plan, int64_t k, bool train,
                            c10::optional<double> tau) {
    const LayerView lv(x, omega);
    Geom g{};
    std::shared_ptr<const Plan> P;
    const bool grad_w = train && omega.requires_grad();
    // A threshold (or no pruning) on a spatial input: the kept input may stay in the
    // forward's tiles (see wgrad_dense_rows) when a quarter or more of it survives.  So
    // may a per-batch top-k: given with its k-th magnitude tau (k >= 1 and tau: a tie at
    // the cut), or selected here (k >= 1 alone: act_cut leaves a conv layer's per-batch
    // cut to the fused layer), on the tiles while they are in cache (select_cut).
    const bool spatial = lv.x4.size(2) * lv.x4.size(3) > 1;
    const bool ties = k >= 1 && tau.has_value();
    TORCH_CHECK_VALUE(!tau.has_value() || k == -1 || ties, kLayerOp, ": give k = -1 with a "
                      "threshold tau, or k >= 1 with the k-th largest magnitude (got k = ", k,
                      ")");
    const bool select = grad_w && spatial && k >= 1 && !tau.has_value() && k < lv.x4.numel();
    const bool may_keep_tiles = grad_w && spatial && (k == -1 || ties || select);
    int64_t tk = tau.has_value() ? tau_key_of(*tau, "sparsefl.sparse_layer") : 1;
    int64_t pack_k = k;  // what a pack keeps, when the kept tiles are not chosen
    c10::optional<double> pack_tau = ties ? c10::optional<double>() : tau;
    at::Tensor kept_tiles;
    TileVisit visit{std::max<int64_t>(tk, 1), [&](const at::Tensor& xt, int64_t tally) {
      const auto t0 = std::chrono::steady_clock::now();
      // at_least: entries with key >= tk; keep: how many the cut keeps (drop the rest of
      // the ties at tk, last in flat order)
      int64_t at_least = tally, keep = ties ? k : tally;
      if (select) {
        const Cut c = select_cut(xt, k, *plan);
        tk = c.key, at_least = c.at_least, keep = c.keep;
        pack_k = c.pack_k, pack_tau = c.pack_tau;
      }
      if (4 * keep >= lv.x4.numel()) {
        at::Tensor out = at::empty_like(xt);
        const int64_t pruned = prune_tiles(xt, out, tk);
        TORCH_CHECK(pruned == at_least, "sparsefl.sparse_layer: internal error, ",
                    at_least, " inputs counted >= the cut and the pruning pass kept ", pruned);
        if (keep < pruned) {
          TORCH_CHECK_VALUE(tk >= 1 && drop_last_ties(out, g, tk, pruned - keep) ==
                            pruned - keep, kLayerOp, ": tau = ", key_float(tk), " is not "
                            "the ", k, "-th largest |x| of the input (", pruned,
                            " nonzero entries are >= tau)");
        }
        TORCH_CHECK_VALUE(keep <= pruned, kLayerOp, ": tau = ", key_float(tk), " is not the ",
                          k, "-th largest |x| of the input (", pruned,
                          " nonzero entries are >= tau)");
        kept_tiles = out;
      }
      g_act_prune_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::steady_clock::now() - t0).count();
    }};
    at::Tensor y = layer_forward(lv, omega, beta, bias, *plan, g, P,
                                 may_keep_tiles ? &visit : nullptr);
    std::vector<at::Tensor> saved{omega};
    const bool dense_x = kept_tiles.defined();
    if (dense_x) saved.push_back(kept_tiles);
    if (grad_w && !dense_x) {
      auto [p, q, v] = timed_pack(lv.x4, pack_k, {g.KH, g.KW}, *plan, pack_tau);
      saved.push_back(p);
      saved.push_back(q);
      saved.push_back(v);
    }
    ctx->saved_data["dense_x"] = dense_x;
    ctx->save_for_backward(saved);
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["plan"] = plan;
    ctx->saved_data["x_shape"] = c10::IValue(x.sizes().vec());
    ctx->saved_data["x4_shape"] = c10::IValue(lv.x4.sizes().vec());
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return lv.output(y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& omega = saved[0];
    const bool linear = omega.dim() == 2;
    const int64_t cout = omega.size(0), cin = omega.size(1);
    const auto x_shape = ctx->saved_data["x_shape"].toIntVector();
    const auto x4_shape = ctx->saved_data["x4_shape"].toIntVector();
    const auto plan = ctx->saved_data["plan"].toCustomClass<SparsePlan>();
    const double beta = ctx->saved_data["beta"].toDouble();
    const at::Tensor w4 = (linear ? omega.view({cout, cin, 1, 1}) : omega).contiguous();
    const at::Tensor dy = grads[0];
    const at::Tensor dy4 = (linear ? dy.reshape({-1, cout, 1, 1}) : dy).contiguous();
    const bool need_dx = ctx->needs_input_grad(0);
    const bool dense_x = ctx->saved_data["dense_x"].toBool();
    const bool need_dw = ctx->needs_input_grad(1) && saved.size() == (dense_x ? 2 : 4);
    const char* op = "sparsefl.sparse_layer (backward)";
    check_operands(dy4, "grad_output", w4, beta, op);
    const Geom g = make_geom(x4_shape, w4, plan->stride, plan->padding, op);
    check_grad_output(dy4, g, op);
    at::Tensor ptr, q, v;
    const float* xt = nullptr;
    if (dense_x && saved.size() == 2) {
      TORCH_CHECK(saved[1].numel() == g.NT * g.C * g.Hp() * g.Wp() * L, op,
                  ": internal error, kept input tiles of the wrong size");
      xt = saved[1].data_ptr<float>();  // no pack: ptr, q, v stay undefined
    } else if (saved.size() == 4) {
      ptr = saved[1], q = saved[2], v = saved[3];
      check_pack(g, ptr, q, v, /*deep=*/false, op);
    }
    at::Tensor dx, dw, db;
    if (need_dx || need_dw) {
      std::tie(dx, dw) = backward_planned(dy4, ptr, q, v, w4, beta,
                                          plan->rowptr.data_ptr<int64_t>(), *plan->get(g), g,
                                          x4_shape, need_dx, need_dw, op, xt,
                                          plan->cols.data_ptr<int32_t>());
      if (need_dx) dx = dx.view(x_shape);
      if (need_dw) dw = dw.view(omega.sizes());
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2))
      db = dy4.sum({0, 2, 3});
    return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor sparse_layer_autograd(const at::Tensor& x, const at::Tensor& omega,
                                 const c10::optional<at::Tensor>& bias, double beta,
                                 int64_t plan, int64_t k, bool train,
                                 c10::optional<double> tau) {
  return SparseLayerFn::apply(x, omega, bias, beta, plan_of(plan), k, train, tau);
}

// Without autograd (inference mode): the forward alone.
at::Tensor sparse_layer_cpu(const at::Tensor& x, const at::Tensor& omega,
                            const c10::optional<at::Tensor>& bias, double beta,
                            int64_t plan, int64_t k, bool train, c10::optional<double> tau) {
  (void)k, (void)train, (void)tau;
  const LayerView lv(x, omega);
  Geom g{};
  std::shared_ptr<const Plan> P;
  return lv.output(layer_forward(lv, omega, beta, bias, *plan_of(plan), g, P), x);
}

int64_t act_prune_ns() { return g_act_prune_ns.load(); }

}  // namespace conv
}  // namespace sparsefl
