"""Powerprop layers that compute on their support: set_compute(model, "dense"|"sparse"|"auto").

Under Powerprop with beta > 1 a zero weight gets exactly zero gradient, so during a round
the support S of omega cannot grow, and a layer only needs its |S| weights: the forward
pass and the input gradient read theta_S, and the weight gradient is needed on S only and
reads the layer input after activation pruning, kept compressed (sparsefl.ops.sparse_conv;
the arithmetic is in docs/architecture.md).

    choice = set_compute(model, "auto", sample=xb)    # once per round, after loading weights

- "dense": today's path (dense conv/linear on theta, activation pruning as configured).
- "sparse": every Powerprop layer computes on the support of omega taken now.  Call again
  whenever the weights change outside training (a new global model): each training forward
  checks that no weight outside the packed support is nonzero and raises otherwise.
- "auto": per layer, the faster of the two, measured once per (layer shape, input shape,
  density bucket) with a short calibration on random data of the real shapes and the
  layer's real support, and recorded for the machine (`auto_cache_path()`), so that every
  process — a resumed run, each Flower node — takes the same path.  `sample` (a batch of
  inputs) gives the input shapes; without it a layer calibrates at its first training
  forward.

Refused (ValueError), for "sparse": beta = 1 (a zero weight gets a gradient, the support
may grow) unless `fixed_support=True` says a mask keeps it fixed (FLASH), grouped or
dilated convolutions, padding given as a string or larger than kernel - 1.  "auto" keeps
such layers dense.  Returns {layer name: "sparse" | "dense" | "auto"} ("auto": not yet
calibrated).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsefl.machine import describe
from sparsefl.nn import batch_norm_act
from sparsefl.nn import recompute as saved
from sparsefl.nn.powerprop import (
    ACT_PRUNE_SECONDS,
    POWERPROP,
    PowerpropConv2d,
    _PowerpropMixin,
    act_cut,
    act_prune_seconds,
)
from sparsefl.ops import sparse_conv as sc
from sparsefl.ops.reference.topk import keep_count

MODES = ("dense", "sparse", "auto")

# (layer kind, weight shape, stride, padding, input shape, pruning, density bucket) -> choice
_AUTO_CACHE: dict[tuple, str] = {}
# The measurements behind each cached choice: key -> (dense seconds, sparse seconds).
AUTO_TIMINGS: dict[tuple, tuple[float, float]] = {}
SPARSE_MARGIN = 0.9  # auto picks sparse when it takes < 90% of the dense time
# recompute="auto" recomputes only when the largest recomputable output of a batch is at
# least this big: below it the memory saved is a few MiB (nothing a client runs out of)
# and the extra forward is pure cost (width-8 ResNet-18, batch 16: 400 KiB outputs, the
# recompute was 2.1 ms of a 14.9 ms step).  ResNet-18 at width 64, batch 64: 12.5 MiB.
RECOMPUTE_MIN_BYTES = 4 << 20


def _geometry(m: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, padding) of a Powerprop layer (Linear: 1x1)."""
    if isinstance(m, PowerpropConv2d):
        return tuple(m.kernel_size), tuple(m.stride), tuple(m.padding)  # type: ignore[return-value]
    return (1, 1), (1, 1), (0, 0)


def unsupported(m: nn.Module, fixed_support: bool = False) -> str | None:
    """Why the sparse path would be wrong for this layer, or None."""
    if m.weight.device.type != "cpu":
        return (f"its weight is on {m.weight.device.type}: the sparse kernels are C++ CPU "
                "kernels (there, the reference would be dense math labelled sparse); use "
                "compute 'dense' or 'auto' (dense there)")
    if m.beta == 1.0 and not fixed_support:
        return ("beta = 1: zero weights get gradients, so the support may grow during "
                "training (pass fixed_support=True if a mask keeps it fixed)")
    if isinstance(m, PowerpropConv2d):
        if m.groups != 1:
            return f"groups = {m.groups} (only 1 is supported)"
        if tuple(m.dilation) != (1, 1):
            return f"dilation = {tuple(m.dilation)} (only 1 is supported)"
        if isinstance(m.padding, str):
            return f"padding = {m.padding!r} (give numbers)"
        if any(p > k - 1 for p, k in zip(m.padding, m.kernel_size)):
            return f"padding {tuple(m.padding)} larger than kernel - 1"
    return None


class _Spec:
    """What a layer's sparse path needs on every call, worked out once in set_compute."""

    __slots__ = ("support", "kernel", "stride", "padding", "conv", "cin", "cout", "native",
                 "groups", "plan", "plan_id")

    def __init__(self, m: nn.Module, support: sc.Support, native: bool) -> None:
        self.support, self.native = support, native
        self.kernel, self.stride, self.padding = (list(v) for v in _geometry(m))
        self.conv = isinstance(m, PowerpropConv2d)
        self.cin = m.in_channels if self.conv else m.in_features
        self.cout = m.out_channels if self.conv else m.out_features
        self.groups = self.stride[0] * self.stride[1]  # phases per (tile, channel)
        # C++: the support checked once and its index plans kept (per input size)
        self.plan = (torch.classes.sparsefl_C.SparsePlan(
            support.rowptr, support.cols, support.cptr, support.cent,
            [self.cout, self.cin, *self.kernel], self.stride, self.padding)
            if native else None)
        self.plan_id = self.plan.handle() if native else 0  # what the fused op takes

    def __deepcopy__(self, memo: dict) -> _Spec:
        return self  # immutable: a copied layer shares its packed support


class _SparseLayer(torch.autograd.Function):
    """y = layer(x) on the support; backward gives dx and Powerprop's domega (0 off S).
    The native path is the same in C++ (torch.ops.sparsefl_C.sparse_layer); this one runs
    the ops of any backend (the reference on CUDA tensors)."""

    @staticmethod
    def forward(ctx, x: Tensor, omega: Tensor, bias: Tensor | None, m: nn.Module,
                prune: bool) -> Tensor:
        sp: _Spec = m._spec
        sup = sp.support
        x4 = x if sp.conv else x.reshape(-1, sp.cin, 1, 1)
        w4 = omega if sp.conv else omega.view(sp.cout, sp.cin, 1, 1)
        if sp.native:
            y = torch.ops.sparsefl_C.sparse_conv_forward(x4, w4, m.beta, sup.rowptr, sup.cols,
                                                         bias, sp.stride, sp.padding)
        else:
            y = sc.sparse_conv_forward(x4, w4, m.beta, sup, bias, sp.stride, sp.padding,
                                       backend="reference")
        ctx.m, ctx.x_shape, ctx.x4_shape = m, x.shape, list(x4.shape)
        ctx.has_bias = bias is not None
        if ctx.needs_input_grad[1]:
            t0 = time.perf_counter()
            k, tau = act_cut(m, x) if prune else (-1, None)
            pack = (torch.ops.sparsefl_C.sparse_act_pack(x4, k, sp.kernel, sp.stride, sp.padding,
                                                         tau)
                    if sp.native else
                    tuple(sc.sparse_act_pack(x4, k, sp.kernel, sp.stride, sp.padding, tau=tau,
                                             backend="reference")))
            ACT_PRUNE_SECONDS[0] += time.perf_counter() - t0
            ctx.save_for_backward(omega, *pack)
        else:
            ctx.save_for_backward(omega)
        return y if sp.conv else y.view(*x.shape[:-1], sp.cout)

    @staticmethod
    def backward(ctx, gy: Tensor):
        m = ctx.m
        sp: _Spec = m._spec
        sup = sp.support
        omega, *pack = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w4 = omega if sp.conv else omega.view(sp.cout, sp.cin, 1, 1)
        gy4 = gy.contiguous() if sp.conv else gy.reshape(-1, sp.cout, 1, 1)
        if not pack:  # no weight gradient: an empty pack of the right group count
            groups = -(-ctx.x4_shape[0] // sc.LANES) * ctx.x4_shape[1] * sp.groups
            pack = [torch.zeros(groups + 1, dtype=torch.int64),
                    torch.empty(0, dtype=torch.int32), torch.empty(0)]
        dx = dw = db = None
        if need_dx or need_dw:
            args = (gy4, *pack, w4, m.beta, sup.rowptr, sup.cols, sup.cptr, sup.cent,
                    ctx.x4_shape, sp.stride, sp.padding, need_dx, need_dw)
            if sp.native:
                dx, dw = torch.ops.sparsefl_C.sparse_conv_backward(*args)
            else:
                dx, dw = sc._ref.sparse_conv_backward(*args)
            if need_dx:
                dx = dx.view(ctx.x_shape)
            if need_dw:
                dw = dw.view(omega.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy4.sum((0, 2, 3))
        return dx, dw, db, None, None


def sparse_forward(m: nn.Module, x: Tensor) -> Tensor:
    """The sparse path of a Powerprop layer (called from its forward)."""
    if m.compute == "auto":
        _decide(m, tuple(x.shape))
        if m.compute == "dense":
            return m._dense_forward(x)
    sp: _Spec = m._spec
    prune = m._pruning()
    if sp.native:  # one C++ autograd op: forward (+ pack) now, a C++ backward node; it
        # checks the support itself (as _check_support)
        k, tau = act_cut(m, x, fused=True) if prune else (-1, None)
        train = torch.is_grad_enabled() and m.weight.requires_grad
        y = torch.ops.sparsefl_C.sparse_layer(x, m.weight, m.bias, m.beta, sp.plan_id, k,
                                              train, tau)
    else:
        _check_support(m)
        y = _SparseLayer.apply(x, m.weight, m.bias, m, prune)
    if m._recompute and y.requires_grad:
        saved.note_output(m, x, y, forward_only)
    return y


_PowerpropMixin._sparse_path = staticmethod(sparse_forward)  # the layers' compute != "dense"


_NO_BIAS = torch.empty(0)


def _chain_layers(model: nn.Module) -> tuple[tuple[nn.Module, ...], bool] | None:
    """The Powerprop Linear layers of a model that is exactly [Flatten], Linear, (ReLU,
    Linear)*, and whether it flattens: its forward can run as one sparse_chain op."""
    kids = list(model.children())
    flat = bool(kids) and isinstance(kids[0], nn.Flatten) and kids[0].start_dim == 1 and \
        kids[0].end_dim == -1
    kids = kids[1:] if flat else kids
    if not kids or len(kids) % 2 == 0:
        return None
    for i, k in enumerate(kids):
        if not isinstance(k, POWERPROP[0] if i % 2 == 0 else nn.ReLU):
            return None
    return tuple(kids[::2]), flat


def _watched(mods: tuple[nn.Module, ...]) -> bool:
    from torch.nn.modules import module as nnm

    return bool(nnm._global_forward_hooks or nnm._global_forward_pre_hooks or any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
        or m._backward_pre_hooks for m in mods))


def live_chain(model: nn.Module) -> tuple | None:
    """The chain set_compute found (layers, flattens, modules, op arguments, keep-count
    memo) while it still holds: every layer computes sparse on the weight it was built on
    and bias and no hook watches a module; None otherwise."""
    chain = model.__dict__.get("_sparse_chain")
    if chain is None:
        return None
    layers, _, mods, args, _ = chain
    for m, w, b in zip(layers, args[0], args[1]):
        if m.compute != "sparse" or m.weight is not w or \
                (_NO_BIAS if m.bias is None else m.bias) is not b:
            return None
    return None if _watched(mods) else chain


def chain_forward(model: nn.Module, x: Tensor) -> Tensor | None:
    """The model's whole forward as one C++ op (torch.ops.sparsefl_C.sparse_chain) when it
    is a chain of sparse Powerprop Linear layers and ReLUs (set_compute found it), every
    layer computes sparse in C++ and no hook watches a layer; None otherwise (the caller
    runs the modules one by one).  The same numbers as the layer-by-layer path."""
    chain = live_chain(model)
    if chain is None or x.dim() < 2:
        return None
    layers, flat, mods, args, ks_memo = chain
    if not flat and x.dim() != 2:
        return None
    n = x.shape[0]
    key = (n, layers[0].training, torch.is_grad_enabled(), *(m.act_density for m in layers))
    ks = ks_memo.get(key)
    if ks is None:  # activation pruning's keep counts for this batch size and mode
        ks = ks_memo[key] = [keep_count(n * m.in_features, m.act_density) if m._pruning()
                             else -1 for m in layers]
    return torch.ops.sparsefl_C.sparse_chain(x.reshape(n, -1), *args, ks, key[2])


def forward_only(m: nn.Module, x: Tensor) -> Tensor:
    """The sparse layer's output without autograd or activation pruning: what the
    training forward computed, bit for bit (recompute.py)."""
    sp: _Spec = m._spec
    with torch.no_grad():
        if sp.native:
            return torch.ops.sparsefl_C.sparse_layer(x, m.weight, m.bias, m.beta, sp.plan_id,
                                                     -1, False)
        return _SparseLayer.apply(x, m.weight, m.bias, m, False)


def _check_support(m: nn.Module) -> None:
    """Raise if a nonzero weight lies outside the packed support (the weights were changed
    since set_compute: a new model loaded).  One pass over the weight, skipped while the
    weight is unchanged since the last check (same version counter)."""
    w = m.weight
    stamp = (w._version, w.data_ptr())
    if m._checked == stamp:
        return
    escaped = _escapes_reference(w.detach(), m._spec.support)
    if escaped:
        raise RuntimeError(
            f"sparsefl: {escaped} nonzero weights of a {type(m).__name__} lie outside the "
            "support packed by set_compute(); the weights changed since (a new model was "
            "loaded?): call set_compute(model, ...) again")
    m._checked = stamp


def _escapes_reference(w: Tensor, sup: sc.Support) -> int:
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[sup.cent.long()] = True
    return int(((w.reshape(-1) != 0) & ~mask).sum())


def _density_bucket(d: float) -> int:
    """Quarter-octave buckets of the weight density (1, 0.84, 0.71, 0.59, 0.5, ...)."""
    return 0 if d <= 0 else round(-4 * math.log2(d))


def _key(m: nn.Module, x_shape: tuple[int, ...]) -> tuple:
    kernel, stride, padding = _geometry(m)
    density = m._spec.support.nnz / max(m.weight.numel(), 1)
    return (type(m).__name__, tuple(m.weight.shape), stride, padding, x_shape,
            m._pruning_configured(), _density_bucket(density), m.weight.dtype)


def _time_pass(m: nn.Module, x: Tensor, gy: Tensor, path) -> float:
    t0 = time.perf_counter()
    # a scalar loss: autograd.grad with grad_outputs imports sympy on first use (~0.4 s)
    torch.autograd.grad((path(x) * gy).sum(), [x, m.weight])
    return time.perf_counter() - t0


def _calibrate(m: nn.Module, x_shape: tuple[int, ...], reps: int = 5) -> tuple[float, float]:
    """Fastest seconds of forward + backward, (dense, sparse), on random inputs of this
    shape with the layer's own weights and support; nothing of the layer changes.  The
    minimum of interleaved runs is the least noisy estimate of what a path costs on a
    shared machine (noise only ever adds time)."""
    gen = torch.Generator().manual_seed(0)
    dev, dt = m.weight.device, m.weight.dtype
    x = torch.randn(x_shape, generator=gen).abs().to(dev, dt).requires_grad_(True)
    was_training, mode, act_before = m.training, m.compute, act_prune_seconds()
    tau = m.act_tau  # a first-batch threshold comes from the run's data, not from here
    m.train()
    m.compute = "sparse"  # inside the timed sparse path (dense path: m._dense_forward)
    try:
        with torch.enable_grad():
            y = m._dense_forward(x)
            gy = torch.randn(y.shape, generator=gen).to(dev, dt)
            dense = lambda t: m._dense_forward(t)  # noqa: E731
            sparse = lambda t: sparse_forward(m, t)  # noqa: E731
            _time_pass(m, x, gy, dense)
            _time_pass(m, x, gy, sparse)
            td, ts = [], []
            for _ in range(reps):  # interleaved: drift hits both alike
                td.append(_time_pass(m, x, gy, dense))
                ts.append(_time_pass(m, x, gy, sparse))
    finally:
        m.train(was_training)
        m.compute = mode
        m.act_tau = tau
        # calibration is not the run's activation pruning
        ACT_PRUNE_SECONDS[0] -= act_prune_seconds() - act_before
    return min(td), min(ts)


def auto_cache_path() -> Path | None:
    """Where "auto" keeps its decisions for this build of the kernels: $SPARSEFL_AUTO_CACHE,
    else ~/.cache/sparsefl/compute-auto-<build>.json (None: no extension, nothing to
    decide).  Each record is keyed by the layer case and `machine_id()` (which names the
    build too)."""
    env = os.environ.get("SPARSEFL_AUTO_CACHE")
    if env:
        return Path(env)
    build = _build_id()  # a rebuilt extension decides afresh
    if build == "none":
        return None
    return Path.home() / ".cache" / "sparsefl" / f"compute-auto-{build}.json"


@contextlib.contextmanager
def _locked_decisions():
    """The machine's decisions (a JSON dict), under an exclusive file lock, written back
    on exit; an in-memory dict when the file cannot be used (never fails a run)."""
    path = auto_cache_path()
    lock = None
    try:
        if path is None:
            raise OSError("no cache")
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): unlocked, still mostly consistent
            pass
        try:
            table = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            table = {}
        if not isinstance(table, dict):
            table = {}
    except OSError:
        path, table = None, {}
    before = dict(table)
    try:
        yield table
    finally:
        if path is not None and table != before:
            try:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(table, sort_keys=True))
                os.replace(tmp, path)
            except OSError:
                pass
        if lock is not None:
            lock.close()  # releases the lock


def _decide(m: nn.Module, x_shape: tuple[int, ...]) -> str:
    """Sparse or dense for this layer and input shape, measured once per machine: the
    first process to meet a (shape, density bucket) times both paths and records the
    choice; every later one, in any process, reads it.  The two paths agree to fp32
    rounding, not bit for bit, so per-process timing would let a resumed run or a Flower
    node take the other path near a tie and drift from an uninterrupted run."""
    m.compute = _recorded(_key(m, x_shape), lambda: _calibrate(m, x_shape))
    return m.compute


def machine_id() -> str:
    """What a recorded timing holds for: the CPU model, the ISA the kernels run, the
    kernels' build and the thread count (a decision taken at 2 threads on an AVX-512 EPYC
    says nothing about 16 threads or an AVX2 Xeon, nor about kernels rebuilt since: the
    build is in the default file's name too, but $SPARSEFL_AUTO_CACHE is one file for
    every build)."""
    d = describe()
    return f"{d['cpu']} | {d['isa']} | build {_build_id()} | {torch.get_num_threads()} threads"


@functools.cache
def _build_id() -> str:
    """The loaded extension's identity (size and mtime of sparsefl._C), "none" without."""
    from sparsefl import _native

    if _native.LOAD_ERROR is not None:
        return "none"
    import sparsefl._C as ext

    st = os.stat(ext.__file__)
    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _entry(key: tuple) -> str:
    return f"{key!r} @ {machine_id()}"


def forget_decisions() -> int:
    """Drop this machine's recorded decisions (this CPU, ISA and thread count) from the
    cache file and the process, so the next use of each layer shape re-measures it.
    Returns how many records were dropped."""
    suffix = f" @ {machine_id()}"
    with _locked_decisions() as table:
        mine = [k for k in table if k.endswith(suffix)]
        for k in mine:
            del table[k]
    _AUTO_CACHE.clear()
    AUTO_TIMINGS.clear()
    return len(mine)


def _recorded(key: tuple, measure) -> str:
    """The machine's recorded choice for `key`, else measure() -> (dense s, sparse s) and
    record "sparse" only when clearly faster (near a tie the dense path is safer)."""
    key = (*key, ("threads", torch.get_num_threads()))  # in process: per thread count
    if key not in _AUTO_CACHE:
        with _locked_decisions() as table:
            name = _entry(key[:-1])
            if table.get(name) in ("sparse", "dense"):
                _AUTO_CACHE[key] = table[name]
            else:
                td, ts = AUTO_TIMINGS[key] = measure()
                _AUTO_CACHE[key] = table[name] = "sparse" if ts < SPARSE_MARGIN * td \
                    else "dense"
    return _AUTO_CACHE[key]


def _time_fused(layers: tuple[nn.Module, ...], n: int, batch: int, reps: int) -> float:
    """Fastest seconds per step of sparse_mlp_sgd on copies of the layers' weights."""
    from sparsefl.ops.sparse_mlp_sgd import sparse_mlp_sgd

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, layers[0].in_features, generator=gen)
    y = torch.randint(0, layers[-1].out_features, (n,), generator=gen)
    order = torch.arange(n)[None]
    best = math.inf
    for _ in range(reps + 1):  # the first run warms up
        ws = [m.weight.detach().clone() for m in layers]
        bs = [None if m.bias is None else m.bias.detach().clone() for m in layers]
        t0 = time.perf_counter()
        sparse_mlp_sgd(x, y, order, batch, ws, bs, [m.beta for m in layers],
                       [m._spec.support for m in layers],
                       [m.act_density if m._pruning_configured() else 1.0 for m in layers],
                       0.0)
        best = min(best, time.perf_counter() - t0)
    return best * batch / n


def _time_dense_step(model: nn.Module, layers: tuple[nn.Module, ...],
                     shape: tuple[int, ...], reps: int) -> float:
    """Fastest seconds of one dense training step (forward, backward, SGD at lr 0) of the
    model, its layers on the dense path; nothing of the model changes."""
    from torch.nn import functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    y = torch.randint(0, layers[-1].out_features, (shape[0],), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    opt = torch.optim.SGD(params, lr=0.0)
    was_training, modes = model.training, [m.compute for m in layers]
    best = math.inf
    act_before = act_prune_seconds()
    try:
        model.train()
        for m in layers:
            m.__dict__["compute"] = "dense"
        with torch.enable_grad():
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was_training)
        for m, mode in zip(layers, modes):
            m.__dict__["compute"] = mode
        for p, g in zip(params, grads):
            p.grad = g
        ACT_PRUNE_SECONDS[0] -= act_prune_seconds() - act_before
    return best


def _decide_fused(model: nn.Module, layers: tuple[nn.Module, ...],
                  shape: tuple[int, ...]) -> str:
    """"sparse" (the chain trains fused) or "dense" (each layer decides) for an MLP chain,
    measured once per machine like _decide: a fused step against a dense step (forward,
    backward, SGD) at the sample's batch size."""
    batch = shape[0]
    key = ("fused", tuple((tuple(m.weight.shape), m._pruning_configured(),
                           _density_bucket(m._spec.support.nnz / max(m.weight.numel(), 1)))
                          for m in layers), shape)
    return _recorded(key, lambda: (_time_dense_step(model, layers, shape, reps=5),
                                   _time_fused(layers, 4 * batch, batch, reps=3)))


def _input_shapes(model: nn.Module, sample: Tensor) -> dict[nn.Module, tuple[int, ...]]:
    """Each Powerprop layer's input shape for a batch shaped like `sample` (one dense eval
    forward, remembered per model and sample shape: the engine asks once per client)."""
    cached = getattr(model, "_sparsefl_shapes", None)
    layers = [mod for mod in model.modules() if isinstance(mod, POWERPROP)]
    if (cached is not None and cached[0] == tuple(sample.shape)
            and len(cached[1]) == len(layers) and all(mod in cached[1] for mod in layers)):
        return cached[1]
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(mod: nn.Module, args: tuple) -> None:
        shapes.setdefault(mod, tuple(args[0].shape))

    hooks = [mod.register_forward_pre_hook(record)
             for mod in model.modules() if isinstance(mod, POWERPROP)]
    was_training = model.training
    modes = [mod.compute for mod in layers]
    try:
        for mod in layers:
            mod.compute = "dense"
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for h in hooks:
            h.remove()
        for mod, mode in zip(layers, modes):
            mod.compute = mode
        model.train(was_training)
    model._sparsefl_shapes = (tuple(sample.shape), shapes)
    return shapes


def set_compute(model: nn.Module, mode: str, *, sample: Tensor | None = None,
                fixed_support: bool = False, strict: bool = True,
                backend: str | None = None, recompute: bool | str = "auto",
                fused: bool = False) -> dict[str, str]:
    """Switch every Powerprop layer of `model` to dense or sparse compute (see the module
    docstring); returns each layer's choice.  strict=False: in "sparse" mode, layers that
    cannot compute sparse stay dense instead of raising (the engine's FLASH round 1).
    recompute: a BatchNorm after a sparse layer keeps a reference to the layer's input
    instead of its output, recomputed in backward (sparsefl/nn/recompute.py: less memory
    for one more sparse forward); "auto" (default) only where it saves memory worth the
    time: with a sample, when the largest recomputable output of such a batch is at least
    RECOMPUTE_MIN_BYTES (without a sample, as True).  fused: the model will train with
    sparsefl.nn.fused_sgd where it can; then "auto" decides for an MLP chain as a whole,
    timing a fused step against a dense one, instead of layer by layer."""
    if mode not in MODES:
        raise ValueError(f"set_compute: mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(recompute, bool) or recompute == "auto"):
        raise ValueError(f"set_compute: recompute must be True, False or 'auto', got "
                         f"{recompute!r}")
    from sparsefl.ops import _backend

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, POWERPROP)]
    if mode == "sparse" and strict:
        for n, m in layers:
            why = unsupported(m, fixed_support)
            if why is not None:
                raise ValueError(f"set_compute: layer {n or type(m).__name__} cannot compute "
                                 f"sparse: {why}")
    choice: dict[str, str] = {}
    saved.uninstall(model)
    for _, m in layers:
        d = m.__dict__  # plain attributes: nn.Module.__setattr__ costs us per call, per client
        d["_recompute"] = False
        if mode == "dense" or unsupported(m, fixed_support) is not None:
            d["compute"], d["_spec"] = "dense", None
        else:
            # the C++ kernels, or the reference (plain torch, any device) when another
            # backend is asked for: sparse compute has no Triton or CUDA face by design
            native = _backend.requested(backend) in ("auto", "cpp") and _backend.resolve(
                backend, [m.weight], native_op="sparse_conv_forward", triton=False) == "cpp"
            d["_spec"] = _Spec(m, sc.pack_support(m.weight, backend), native)
            d["_checked"] = None
            d["compute"] = mode
    if mode == "auto" and sample is not None:
        chain = _chain_layers(model) if fused else None
        if chain and all(m.compute == "auto" and m._spec.native for m in chain[0]) and \
                _decide_fused(model, chain[0], tuple(sample.shape)) == "sparse":
            for m in chain[0]:  # else each layer decides for itself below
                m.__dict__["compute"] = "sparse"
        for m, shape in _input_shapes(model, sample).items():
            if m.compute == "auto":
                _decide(m, shape)
    for n, m in layers:
        choice[n] = m.compute
    model.__dict__.pop("_sparse_chain", None)
    chain = _chain_layers(model) if mode != "dense" else None
    if chain and all(m.compute != "dense" and m._spec.native for m in chain[0]):
        ls = chain[0]  # what every call passes, fixed until the next set_compute
        args = ([m.weight for m in ls], [_NO_BIAS if m.bias is None else m.bias for m in ls],
                [m.beta for m in ls], [m._spec.plan_id for m in ls])
        model.__dict__["_sparse_chain"] = (*chain, (model, *model.children()), args, {})
    if recompute and mode != "dense":
        chosen = _recompute_layers(model, [m for _, m in layers if m.compute != "dense"],
                                   sample, min_bytes=RECOMPUTE_MIN_BYTES
                                   if recompute == "auto" else 0)
        for m in chosen:
            m._recompute = True
        if chosen:
            saved.install(model)
    # BatchNorm (+ add) + ReLU as one native op: sparse compute only (a dense model stays
    # plain torch); with recompute its saved tensors are recipes too (recompute.py)
    batch_norm_act.enable(model, mode != "dense")
    return choice


def _recompute_layers(model: nn.Module, layers: list[nn.Module],
                      sample: Tensor | None, min_bytes: int = 0) -> list[nn.Module]:
    """The sparse layers whose outputs a BatchNorm after them recomputes (recompute.py).
    None without a BatchNorm in the model.  With a sample batch, only the layers whose
    output per sample is at least half the largest: backward's memory peaks while the
    early, large activations are still saved, so recomputing the small late outputs
    would cost as much arithmetic (a ResNet's stages have equal FLOPs) and lower memory
    only where it is not at its peak; none when the largest output of the batch is under
    min_bytes.  Without a sample, all."""
    if not layers or not any(isinstance(mod, nn.modules.batchnorm._BatchNorm)
                             for mod in model.modules()):
        return []
    if sample is None:
        return layers
    shapes = _input_shapes(model, sample)
    size = {}
    for m in layers:
        shape = shapes.get(m)
        if shape is None:  # not reached by the sample's forward
            continue
        if isinstance(m, PowerpropConv2d):
            kernel, stride, padding = _geometry(m)
            hw = [(shape[2 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1
                  for i in range(2)]
            size[m] = m.out_channels * hw[0] * hw[1]
        else:
            size[m] = m.out_features
    if not size:
        return []
    largest = max(size.values())
    if largest * sample.shape[0] * sample.element_size() < min_bytes:
        return []
    return [m for m, n in size.items() if 2 * n >= largest]


def dense_reasons(model: nn.Module, choice: dict[str, str],
                  fixed_support: bool = False) -> dict[str, str]:
    """Why each layer that set_compute(..., strict=False) left dense is dense."""
    mods = dict(model.named_modules())
    return {n: unsupported(mods[n], fixed_support) or "left dense by set_compute"
            for n, c in choice.items() if c == "dense"}


def compute_summary(choice: dict[str, str]) -> dict[str, Any]:
    """Counts per choice, for a run's metrics."""
    out: dict[str, Any] = {"sparse": 0, "dense": 0, "auto": 0}
    for c in choice.values():
        out[c] += 1
    return out
