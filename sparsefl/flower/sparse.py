"""Sparse updates for any Flower app: one client mod and one strategy wrapper.

    app = ClientApp(mods=[sparse_mod(density=0.05)])           # the client side
    strategy = SparseStrategy(FedAvg(...))                       # the server side

Uplink (`sparse_mod`, around the app's TRAIN handler).  The reply's arrays fall in two
kinds, by `dense_keys` or the default rule (`is_dense`):
  * dense: integer and bool arrays, BatchNorm statistics (running_mean / running_var /
    num_batches_tracked) and float arrays under `dense_below` elements.  They travel as
    the reply has them, in their own dtype, bit for bit.
  * sparse: the other float arrays.  Their update (reply minus received, float32; a
    float64 array's difference is taken in float64) is ranked in one global top-k at
    `density` with error feedback, and sent as one uint8 array of sparsefl.codec bytes
    (`PAYLOAD_KEY`).  Nothing is lost, only delayed: the unsent part of the update *and*
    the rounding of the sent values to `value_dtype` stay in the node's residual
    (`context.state`), so sent + residual == update + old residual in float32, bit for
    bit.  A value beyond the value dtype's range (> 65504 in fp16) switches that payload
    to float32 values: it is never sent as inf.
Other messages, and replies that are not one ArrayRecord with the received keys, shapes
and dtypes, pass untouched.

Server (`SparseStrategy(inner)`).  Every train reply is checked before the inner
strategy sees it: one ArrayRecord, one MetricRecord with a finite positive weight, arrays
or a payload that fit the model sent, finite values.  A reply that fails is dropped --
its reason logged and kept in `dropped[round]` -- and the round goes on with the rest;
no reply can raise out of `aggregate_train`.  The accepted replies reach the inner
strategy as ordinary dense replies: merged into one (mode "merge", for weighted-mean
strategies: sparse parts summed in a float64 `ops.SparseAccumulator`, dense parts
weighted exactly as Flower's FedAvg does), or rebuilt one per node (mode "per_client":
median, Krum, trimmed mean ...).  A sparse array is rebuilt as sent + update in
max(its dtype, float32), so a float64 array whose update is zero comes back bit-identical.

Downlink (`downlink=True`, the default).  The server keeps the model versions its nodes
hold.  A node whose last train reply said (through the mod) which version it holds gets
the change since that version: the 32-bit words that changed (float32 values; float64
and int64 arrays word by word) as their XOR with the old bits, deflated (exact: no
top-k, no rounding), and any other array that changed, whole; or the
full arrays when it holds none, holds one no longer kept, or the change would be larger.
The mod rebuilds the arrays before the app's handler sees them.  A node without the mod
never says what it holds, so it always gets the full arrays.  Bytes per round, both
ways: `uplink_bytes`, `downlink_bytes` (the arrays' serialized sizes, as Flower sends them).
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from sparsefl import codec, ops

log = logging.getLogger("sparsefl.flower")

PAYLOAD_KEY = "sparsefl-payload"  # the codec bytes of a sparse reply or downlink
STATE_KEY = "sparsefl-residual"  # the error-feedback residual in context.state
HELD_KEY = "sparsefl-held-model"  # the node's copy of the last model it received
HELD_INFO = "sparsefl-held-version"  # ConfigRecord {"version": str} beside it
DOWN_KEY = "sparsefl-downlink"  # ConfigRecord of a train message: {"version", "base"}
NODE_KEY = "sparsefl-node"  # ConfigRecord of a train reply: {"holds": version}
DTYPE_KEY = "sparsefl-dtypes"  # ConfigRecord of a train reply: {sparse array: its dtype}
FLOAT_DTYPES = ("float16", "float32", "float64")
MEAN_BASED = {"FedAvg", "FedAvgM", "FedOpt", "FedAdam", "FedYogi", "FedAdagrad"}
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
DENSE_BELOW = 256

DenseRule = Collection[str] | Callable[[str, np.ndarray], bool] | None


def is_dense(name: str, array: np.ndarray, dense_below: int = DENSE_BELOW) -> bool:
    """The default rule: which arrays of a reply travel dense (module docstring)."""
    return (not np.issubdtype(array.dtype, np.floating) or array.size < dense_below
            or name.rsplit(".", 1)[-1] in BN_STATS)


def _wide(dtype: np.dtype) -> np.dtype:
    """The dtype an update of a float array is added in: float32, or float64 for float64."""
    return np.result_type(dtype, np.float32)


def _update(new: np.ndarray, old: np.ndarray) -> torch.Tensor:
    w = np.result_type(_wide(old.dtype), new.dtype)
    d = new.astype(w, copy=False) - old.astype(w, copy=False)
    return torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32).reshape(-1))


def _add(old: np.ndarray, flat: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """old + a flat float update, in the wide dtype, in `dtype` (default old's) and
    old's shape."""
    w = np.result_type(_wide(old.dtype), dtype or old.dtype)
    out = old.astype(w, copy=True).reshape(-1)
    out += flat.astype(w, copy=False)
    return out.reshape(old.shape).astype(dtype or old.dtype, copy=False)


def _u8(data: bytes) -> Array:
    return Array(np.frombuffer(data, dtype=np.uint8).copy())


def _nbytes(rec: ArrayRecord) -> int:
    return sum(len(a.data) for a in rec.values())


# =================================================================== client mod =======
def sparse_mod(density: float = 0.05, value_dtype: torch.dtype = torch.float16,
               error_feedback: bool = True, dense_keys: DenseRule = None,
               dense_below: int = DENSE_BELOW):
    """A Flower client mod that sends the top-`density` of each update (module docstring).

    value_dtype: float32, float16 or bfloat16 for the sent values.  dense_keys: None for
    the default rule (`is_dense`), a collection of array names to send dense (integer
    arrays always are), or a function (name, array) -> bool.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"sparse_mod: density must be in (0, 1], got {density}")
    if value_dtype not in codec.VALUE_CODES:
        raise ValueError(f"sparse_mod: value_dtype must be one of {list(codec.VALUE_CODES)}, "
                         f"got {value_dtype}")
    if dense_keys is None:
        def dense(name: str, a: np.ndarray) -> bool:
            return is_dense(name, a, dense_below)
    elif callable(dense_keys):
        def dense(name: str, a: np.ndarray) -> bool:
            return (not np.issubdtype(a.dtype, np.floating)) or bool(dense_keys(name, a))
    else:
        names_dense = frozenset(dense_keys)

        def dense(name: str, a: np.ndarray) -> bool:
            return (not np.issubdtype(a.dtype, np.floating)) or name in names_dense

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        holds = _receive_downlink(msg, ctxt)
        if len(msg.content.array_records) != 1:
            return call_next(msg, ctxt)
        received = next(iter(msg.content.array_records.values()))
        names = list(received.keys())
        sent = received.to_numpy_ndarrays()
        out = call_next(msg, ctxt)
        if out.has_error():
            return out
        if holds is not None:
            out.content[NODE_KEY] = ConfigRecord({"holds": holds})
        if len(out.content.array_records) != 1:
            return out
        key, reply = next(iter(out.content.array_records.items()))
        if list(reply.keys()) != names:
            log.warning("sparse_mod: the reply's arrays are not the received ones; sent dense")
            return out
        new = reply.to_numpy_ndarrays()
        if any(a.shape != b.shape for a, b in zip(new, sent)):
            log.warning("sparse_mod: the reply's array shapes changed; sent dense")
            return out
        # a float array may come back in another float dtype (a float32 model loaded
        # FedAdam's float64 arrays): its update is taken in the wider one, and the
        # server rebuilds it in the reply's dtype (DTYPE_KEY), as the dense reply had it
        is_d = [dense(n, a) or b.dtype.kind != "f" for n, a, b in zip(names, sent, new)]
        sparse_names = [n for n, d in zip(names, is_d) if not d]
        if not sparse_names:
            return out
        ups = [_update(a, b) for a, b, d in zip(new, sent, is_d) if not d]
        payload = _compress(ups, sparse_names, ctxt if error_feedback else None, density,
                            value_dtype)
        arrays = {PAYLOAD_KEY: _u8(payload)}
        arrays.update({n: reply[n] for n, d in zip(names, is_d) if d})
        out.content[key] = ArrayRecord(arrays)
        changed = {n: str(a.dtype) for n, a, b, d in zip(names, new, sent, is_d)
                   if not d and a.dtype != b.dtype}
        if changed:
            out.content[DTYPE_KEY] = ConfigRecord(changed)
        return out

    return mod


def _compress(ups: list[torch.Tensor], names: list[str], ctxt: Context | None,
              density: float, value_dtype: torch.dtype) -> bytes:
    """The payload of the updates' global top-k, with the node's residual (ctxt given)
    updated in ctxt.state: the unsent part and the sent values' rounding.  (A module
    function: Ray pickles the mod's closure by value, and a closure naming both `torch`
    and `ops` makes cloudpickle try to pickle torch.ops.)"""
    numels = [u.numel() for u in ups]
    flat = torch.cat(ups)
    residual = _load_residual(ctxt, names, numels) if ctxt is not None else None
    idx, val = ops.topk_compress([flat], density,
                                 residual=None if residual is None else [residual])
    vdt = value_dtype
    cast = val.to(vdt)
    if vdt != torch.float32 and bool((torch.isinf(cast) & torch.isfinite(val)).any()):
        vdt, cast = torch.float32, val  # never send a finite value as inf
    if residual is not None:
        residual[idx] = val - cast.float()  # the cast's rounding stays owed
        ctxt.state[STATE_KEY] = ArrayRecord(
            {n: Array(r.numpy().copy()) for n, r in zip(names, residual.split(numels))})
    return codec.encode(codec.split_flat(idx, val, numels), vdt)


def _load_residual(ctxt: Context, names: list[str], numels: list[int]) -> torch.Tensor:
    """The node's flat residual from context.state; zeros if absent or for another model."""
    rec = ctxt.state.array_records.get(STATE_KEY)
    if rec is not None:
        if list(rec.keys()) == names and [int(np.prod(a.shape)) for a in rec.values()] == numels:
            return torch.cat([torch.from_numpy(np.ascontiguousarray(a, np.float32).reshape(-1))
                              for a in rec.to_numpy_ndarrays()])
        log.warning("sparse_mod: the stored residual belongs to another model; reset")
    return torch.zeros(sum(numels))


def _receive_downlink(msg: Message, ctxt: Context) -> str | None:
    """Rebuild a downlink delta into the model arrays, in place in `msg`; keep the model
    in context.state.  Returns the version the node now holds (None: no downlink tag)."""
    tag = msg.content.config_records.get(DOWN_KEY)
    if tag is None:
        return None
    del msg.content[DOWN_KEY]
    version, base = str(tag["version"]), str(tag["base"])
    if len(msg.content.array_records) != 1:
        raise ValueError("sparsefl downlink: a train message without one ArrayRecord")
    key, rec = next(iter(msg.content.array_records.items()))
    if base:
        info = ctxt.state.config_records.get(HELD_INFO)
        held = ctxt.state.array_records.get(HELD_KEY)
        if info is None or held is None or str(info["version"]) != base:
            have = "nothing" if info is None else f"version {info['version']}"
            raise RuntimeError(f"sparsefl downlink: the server sent a change since version "
                               f"{base}, this node holds {have}; it gets the full model "
                               "next round")
        rec = _apply_delta(held, rec)
        msg.content[key] = rec
    ctxt.state[HELD_KEY] = ArrayRecord({n: Array(a.numpy().copy()) for n, a in rec.items()})
    ctxt.state[HELD_INFO] = ConfigRecord({"version": version})
    return version


def _worded(a: np.ndarray) -> bool:
    """Whether the downlink sends an array's changes as 32-bit words (float32, float64,
    int32, int64 ...: any itemsize a multiple of 4); others travel whole when changed."""
    return a.dtype.itemsize % 4 == 0 and a.size > 0


def _inflate(data: bytes, held: ArrayRecord) -> bytes:
    """A downlink payload inflated, refusing more than a model's worth of codec bytes (an
    exact change is at most every word: 4 bytes of value and 8 of index per word)."""
    limit = 16 * sum(len(a.data) for a in held.values()) + (1 << 20)
    d = zlib.decompressobj()
    out = d.decompress(data, limit)
    if d.unconsumed_tail or not d.eof:
        raise ValueError("sparsefl downlink: the change does not inflate to a payload")
    return out


def _apply_delta(held: ArrayRecord, rec: ArrayRecord) -> ArrayRecord:
    """The held arrays with a downlink's changes: whole arrays by name, and the payload's
    chunks over the 32-bit words of the other worded arrays, in order (the values are
    each changed word's XOR with the held one, carried as float32 bits: exact)."""
    names = list(held.keys())
    extra = set(rec.keys()) - {PAYLOAD_KEY} - set(names)
    if extra:
        raise ValueError(f"sparsefl downlink: unknown arrays {sorted(extra)}")
    targets = [n for n in names if n not in rec and _worded(held[n].numpy())]
    chunks = codec.decode(_inflate(rec[PAYLOAD_KEY].numpy().tobytes(), held),
                          nonfinite="allow") if PAYLOAD_KEY in rec else []
    if len(chunks) != len(targets):
        raise ValueError(f"sparsefl downlink: {len(chunks)} changes for {len(targets)} arrays")
    out, it = {}, iter(chunks)
    for n in names:
        if n in rec:
            out[n] = rec[n]
        elif n in targets:
            c = next(it)
            a = np.array(held[n].numpy(), order="C")  # a copy; 0-d stays 0-d
            words = a.reshape(-1).view(np.float32)
            if c.numel != words.size:
                raise ValueError(f"sparsefl downlink: '{n}' has {words.size} words, the "
                                 f"change {c.numel}")
            i = c.indices.numpy()
            xor = np.ascontiguousarray(c.values.numpy()).view(np.uint32)
            words.view(np.uint32)[i] ^= xor  # the new bits: old ^ (old ^ new)
            out[n] = Array(a)
        else:
            out[n] = held[n]
    return ArrayRecord(out)


# ============================================================== server wrapper =========
class _Refused(Exception):
    """A reply that cannot be aggregated; the message is the reason."""


# What reading a malformed reply raises (an Array's bytes that np.load cannot read, a
# payload the codec refuses, a record of the wrong type): such a reply is dropped.  Any
# other exception is a bug of this module and propagates.
BAD_DATA = (codec.PayloadError, ValueError, TypeError, KeyError, IndexError, EOFError)


@dataclass
class _Update:
    msg: Message
    weight: float
    metrics: MetricRecord
    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    is_sparse: bool = False  # sent through sparse_mod (a payload), not plain arrays
    dtypes: dict[str, np.dtype] = field(default_factory=dict)  # sparse, not the sent dtype

    def dtype(self, n: str, sent: np.ndarray) -> np.dtype:
        return self.dtypes.get(n, sent.dtype)


def _aggregating_class(strategy: Strategy) -> str:
    for cls in type(strategy).__mro__:
        if "aggregate_train" in cls.__dict__:
            return cls.__name__ if cls.__module__.startswith("flwr.") else ""
    return ""


def _weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Refused(f"weight is {type(value).__name__}, not a number")
    w = float(value)
    if not math.isfinite(w) or w <= 0:
        raise _Refused(f"weight {value!r} is not finite and positive")
    return w


class SparseStrategy(Strategy):
    """Wraps any Flower strategy so that it takes `sparse_mod` replies (module docstring).

    mode: "auto" (merge when the inner strategy aggregates by a weighted mean, else
    per client), "merge" or "per_client".  downlink: send each node the change since the
    model it holds (needs `sparse_mod` on the nodes; others get full arrays).
    keep_versions: how many past models the downlink keeps to diff against.
    `dropped[round]` lists (node id, reason) of the replies refused in that round;
    `merged[round]` counts the sparse and dense replies aggregated; `uplink_bytes[round]`
    and `downlink_bytes[round]` the bytes of the train replies and train messages.
    """

    def __init__(self, strategy: Strategy, *, mode: str = "auto",
                 weighted_by_key: str | None = None, downlink: bool = True,
                 keep_versions: int = 8) -> None:
        if mode not in ("auto", "merge", "per_client"):
            raise ValueError(f"SparseStrategy: mode must be auto, merge or per_client, got "
                             f"{mode!r}")
        if keep_versions < 1:
            raise ValueError(f"SparseStrategy: keep_versions must be >= 1, got {keep_versions}")
        self.strategy = strategy
        self.weight_key = weighted_by_key or getattr(strategy, "weighted_by_key",
                                                     "num-examples")
        self.array_key = getattr(strategy, "arrayrecord_key", "arrays")
        self.merge = mode == "merge" or (mode == "auto"
                                         and _aggregating_class(strategy) in MEAN_BASED)
        self.downlink, self.keep_versions = downlink, keep_versions
        self._sent: dict[int, ArrayRecord] = {}
        self._token = secrets.token_hex(6)  # versions of another server run never match
        self._versions: dict[str, ArrayRecord] = {}
        self._holds: dict[int, str] = {}  # node -> the version its last reply said it holds
        self.dropped: dict[int, list[tuple[int, str]]] = {}
        self.merged: dict[int, dict[str, int]] = {}
        self.uplink_bytes: dict[int, int] = {}
        self.downlink_bytes: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"SparseStrategy({self.strategy!r}, merge={self.merge}, downlink={self.downlink})"

    def summary(self) -> None:
        log.info("SparseStrategy: sparse replies checked and %s, downlink %s, then handed to:",
                 "merged (SparseAccumulator)" if self.merge else "rebuilt per client",
                 "sparse (changes since each node's model)" if self.downlink else "dense")
        self.strategy.summary()

    # ---------------------------------------------------------------- downlink ---------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = {server_round: arrays}  # a round never aggregated leaves nothing behind
        msgs = list(self.strategy.configure_train(server_round, arrays, config, grid))
        total = 0
        if self.downlink:
            version = f"{self._token}:{server_round}"
            self._versions[version] = arrays
            for m in msgs:
                self._send(m, version)
            self._prune(version)
        for m in msgs:
            total += sum(_nbytes(r) for r in m.content.array_records.values())
        self.downlink_bytes[server_round] = total
        return msgs

    def _send(self, msg: Message, version: str) -> None:
        """Give `msg` its own content: the change since the node's model, or the full
        arrays, and the version tag the mod keeps."""
        content = msg.content
        if len(content.array_records) != 1:
            return
        key, full = next(iter(content.array_records.items()))
        base = self._holds.get(msg.metadata.dst_node_id, "")
        rec, sent_base = full, ""
        if base and base != version and base in self._versions:
            delta = _delta_record(self._versions[base], full)
            if delta is not None:
                rec, sent_base = delta, base
        out = RecordDict()
        for k, v in content.items():
            out[k] = rec if k == key else v
        out[DOWN_KEY] = ConfigRecord({"version": version, "base": sent_base})
        msg.content = out

    def _prune(self, current: str) -> None:
        live = set(self._holds.values()) | {current}
        for v in [v for v in self._versions if v not in live]:
            del self._versions[v]
        while len(self._versions) > self.keep_versions:
            del self._versions[next(v for v in self._versions if v != current)]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ uplink ---------
    def _parse(self, msg: Message, names: list[str], sent: dict[str, np.ndarray]) -> _Update:
        """A reply as an update, or _Refused with the reason.  Every failure of an
        untrusted reply's parsing is a refusal (never an exception out of the server)."""
        content = msg.content
        if len(content.array_records) != 1:
            raise _Refused(f"{len(content.array_records)} ArrayRecords, expected 1")
        if len(content.metric_records) != 1:
            raise _Refused(f"{len(content.metric_records)} MetricRecords, expected 1")
        metrics = next(iter(content.metric_records.values()))
        if self.weight_key not in metrics:
            raise _Refused(f"no '{self.weight_key}' in its MetricRecord")
        upd = _Update(msg, _weight(metrics[self.weight_key]), metrics)
        rec = next(iter(content.array_records.values()))
        keys = list(rec.keys())
        upd.is_sparse = PAYLOAD_KEY in keys
        if upd.is_sparse:
            dense_names = [k for k in keys if k != PAYLOAD_KEY]
            unknown = set(dense_names) - set(names)
            if unknown:
                raise _Refused(f"arrays {sorted(unknown)[:3]} are not the model's")
            sparse_names = [n for n in names if n not in dense_names]
            arr = rec[PAYLOAD_KEY]
            if arr.dtype != "uint8" or len(arr.shape) != 1:
                raise _Refused(f"'{PAYLOAD_KEY}' is {arr.dtype} {arr.shape}, not 1-D uint8")
            try:
                chunks = codec.decode(arr.numpy().tobytes(), nonfinite="raise")
            except codec.PayloadError as e:
                raise _Refused(str(e)) from None
            if [c.numel for c in chunks] != [sent[n].size for n in sparse_names]:
                raise _Refused(f"payload holds {len(chunks)} tensors that do not match the "
                               f"model's {len(sparse_names)} sparse arrays")
            for n, c in zip(sparse_names, chunks):
                upd.sparse[n] = (c.indices, c.values.float())
            tag = content.config_records.get(DTYPE_KEY)
            for n, dt in (tag or {}).items():
                if n not in upd.sparse or dt not in FLOAT_DTYPES:
                    raise _Refused(f"dtype tag {n!r}: {dt!r} names no sparse float array")
                upd.dtypes[n] = np.dtype(dt)
        elif set(keys) != set(names) or len(keys) != len(names):
            raise _Refused("its arrays are not the model's")
        for n in keys:
            if n == PAYLOAD_KEY:
                continue
            a = rec[n].numpy()
            if a.shape != sent[n].shape:
                raise _Refused(f"'{n}' has shape {a.shape}, the model {sent[n].shape}")
            if a.dtype.kind not in "fiub":
                raise _Refused(f"'{n}' has dtype {a.dtype}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise _Refused(f"'{n}' holds non-finite values")
            upd.dense[n] = a
        return upd

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent_rec = self._sent.pop(server_round, None)
        dropped = self.dropped.setdefault(server_round, [])
        usable: list[_Update] = []
        failed: list[Message] = []
        received = 0
        names = list(sent_rec.keys()) if sent_rec is not None else []
        sent = {n: a.numpy() for n, a in sent_rec.items()} if sent_rec is not None else {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed.append(msg)
                self._holds.pop(node, None)  # it may hold anything now: send it all
                continue
            self._note_holds(node, msg)
            received += sum(_nbytes(r) for r in msg.content.array_records.values())
            try:
                if sent_rec is None:
                    raise _Refused(f"round {server_round} was not configured by this "
                                   "strategy (configure_train)")
                usable.append(self._parse(msg, names, sent))
            except _Refused as e:
                dropped.append((node, str(e)))
            except BAD_DATA as e:  # malformed data; anything else is a bug and propagates
                dropped.append((node, f"{type(e).__name__}: {e}"))
        usable = self._consistent(usable, dropped)
        for node, reason in dropped:
            log.warning("round %d: node %d's reply dropped: %s", server_round, node, reason)
        if not dropped:
            del self.dropped[server_round]
        n_sparse = sum(u.is_sparse for u in usable)
        self.merged[server_round] = {"sparse": n_sparse, "dense": len(usable) - n_sparse,
                                     "dropped": len(dropped), "failed": len(failed)}
        self.uplink_bytes[server_round] = received
        log.info("round %d: %d sparse and %d dense replies %s, %d dropped, %d failed",
                 server_round, n_sparse, len(usable) - n_sparse,
                 "merged" if self.merge else "rebuilt", len(dropped), len(failed))
        if not usable:
            arrays, metrics = self.strategy.aggregate_train(server_round, failed)
        else:
            if self.merge:
                merged = self._merge(usable, names, sent)
                arrays, metrics = self.strategy.aggregate_train(server_round,
                                                                [merged, *failed])
            else:
                rebuilt = [_with_content(u.msg, self._content(self._rebuild(u, names, sent),
                                                              u.metrics)) for u in usable]
                arrays, metrics = self.strategy.aggregate_train(server_round,
                                                                rebuilt + failed)
        if metrics is not None:
            for k, v in self.merged[server_round].items():
                metrics[f"sparsefl-{k}"] = v
        return arrays, metrics

    def _note_holds(self, node: int, msg: Message) -> None:
        tag = msg.content.config_records.get(NODE_KEY)
        holds = tag.get("holds") if tag is not None else None
        if isinstance(holds, str) and holds:
            self._holds[node] = holds
        else:
            self._holds.pop(node, None)

    def _consistent(self, usable: list[_Update], dropped: list[tuple[int, str]]
                    ) -> list[_Update]:
        """Replies whose metric keys differ from the most common set are dropped (the
        inner strategy's metric aggregation needs one set)."""
        if not usable:
            return usable
        common = Counter(frozenset(u.metrics.keys()) for u in usable).most_common(1)[0][0]
        keep = []
        for u in usable:
            if frozenset(u.metrics.keys()) == common:
                keep.append(u)
            else:
                dropped.append((u.msg.metadata.src_node_id,
                                "its metric keys differ from the other replies'"))
        return keep

    def _content(self, arrays: ArrayRecord, metrics: MetricRecord) -> RecordDict:
        return RecordDict({self.array_key: arrays, "metrics": metrics})

    def _rebuild(self, u: _Update, names: list[str], sent: dict[str, np.ndarray]
                 ) -> ArrayRecord:
        """One reply's arrays, dense: sent + update for its sparse arrays."""
        return ArrayRecord({n: Array(np.asarray(self._rebuild_one(u, n, sent)))
                            for n in names})

    def _merge(self, usable: list[_Update], names: list[str], sent: dict[str, np.ndarray]
               ) -> Message:
        """The replies as one: arrays sparse in every reply through one SparseAccumulator,
        the rest weighted as Flower's FedAvg does (value * w / W, in reply order)."""
        weights = [u.weight for u in usable]
        total_w = sum(weights)
        acc_names = [n for n in names if all(n in u.sparse for u in usable)
                     and len({u.dtype(n, sent[n]) for u in usable}) == 1]
        offsets = dict(zip(acc_names, np.cumsum([0] + [sent[n].size for n in acc_names])
                           .tolist()))
        out: dict[str, Array] = {}
        if acc_names:
            acc = ops.SparseAccumulator(sum(sent[n].size for n in acc_names))
            for u, w in zip(usable, weights):
                idx = torch.cat([u.sparse[n][0] + offsets[n] for n in acc_names])
                val = torch.cat([u.sparse[n][1] for n in acc_names])
                acc.add((idx, val), w)
            mean = acc.result(divisor=total_w).numpy()
        factors = [w / total_w for w in weights]
        for n in names:
            if n in offsets:
                o = offsets[n]
                out[n] = Array(_add(sent[n], mean[o:o + sent[n].size],
                                    usable[0].dtype(n, sent[n])))
                continue
            s = None
            for u, f in zip(usable, factors):  # as flwr's aggregate_arrayrecords, in place
                if s is None:
                    s = self._rebuild_one(u, n, sent) * f
                else:
                    s += self._rebuild_one(u, n, sent) * f
            out[n] = Array(np.asarray(s))
        metrics_fn = getattr(self.strategy, "train_metrics_aggr_fn", None)
        metrics = (metrics_fn([self._content(ArrayRecord(), u.metrics) for u in usable],
                              self.weight_key) if metrics_fn else MetricRecord())
        metrics[self.weight_key] = total_w
        return _with_content(usable[0].msg, self._content(ArrayRecord(out), metrics))

    @staticmethod
    def _rebuild_one(u: _Update, n: str, sent: dict[str, np.ndarray]) -> np.ndarray:
        if n in u.dense:
            return u.dense[n]
        idx, val = u.sparse[n]
        d = np.zeros(sent[n].size, np.float32)
        d[idx.numpy()] = val.numpy()
        return _add(sent[n], d, u.dtype(n, sent[n]))


def _with_content(msg: Message, content: RecordDict) -> Message:
    """A copy of a message (same metadata) with other content: the caller's replies are
    left as they came."""
    out = copy.copy(msg)
    out.content = content
    return out


def _delta_record(base: ArrayRecord, cur: ArrayRecord) -> ArrayRecord | None:
    """The downlink change from `base` to `cur` (module docstring), or None when the
    models differ in their arrays or the change is not smaller than the full arrays.
    An array whose itemsize is a multiple of 4 is compared as 32-bit words (a float64
    or int64 entry that changed costs its changed words); others are sent whole.  A
    changed word travels as its XOR with the old one -- a small change of a float leaves
    its sign, exponent and top mantissa bits alone, so the XOR's high bytes are zero --
    and the payload is deflated (zlib): about a third fewer bytes than the new values."""
    if list(base.keys()) != list(cur.keys()):
        return None
    chunks, whole = [], {}
    for n, c in cur.items():
        b = base[n]
        if b.dtype != c.dtype or list(b.shape) != list(c.shape):
            return None
        ca = np.ascontiguousarray(c.numpy())
        if _worded(ca):
            cw = ca.reshape(-1).view(np.uint32)
            bw = np.ascontiguousarray(b.numpy()).reshape(-1).view(np.uint32)
            idx = np.flatnonzero(cw != bw)
            xor = (cw[idx] ^ bw[idx]).view(np.float32)  # new = old ^ xor, bit for bit
            chunks.append(codec.SparseChunk(cw.size, torch.from_numpy(idx),
                                            torch.from_numpy(xor)))
        elif c.data != b.data:
            whole[n] = c
    rec = {PAYLOAD_KEY: _u8(zlib.compress(codec.encode(chunks, torch.float32), 6))} \
        if chunks else {}
    rec.update(whole)
    out = ArrayRecord(rec)
    return out if _nbytes(out) < _nbytes(cur) else None
