"""Sparse updates for any Flower app: one client mod and one strategy wrapper.

    app = ClientApp(mods=[sparse_mod(density=0.05)])           # the client side
    strategy = SparseStrategy(FedAvg(...))                       # the server side

Client (`sparse_mod`): around the app's TRAIN handler.  The reply's arrays minus the
received arrays is the update; its global top-k (all arrays ranked together) at
`density` is selected with error feedback -- the part not sent is kept in the node's
`context.state` and added to the next update, so nothing is lost, only delayed, and a
restarted client resumes with it -- and sent as one uint8 Array of sparsefl.codec bytes
(indices in the smallest of five encodings, values in `value_dtype`) instead of the dense
arrays.  Other messages, and replies that are not one ArrayRecord with the received
keys, pass untouched.

Server (`SparseStrategy(inner)`): remembers the arrays it sent each round; each sparse
reply is decoded and validated (a malformed, truncated or non-finite payload, or one
that does not match the model, is dropped with the reason logged and kept in
`dropped[round]`, never aggregated).  When the inner strategy aggregates by a weighted
mean (FedAvg, FedAvgM, FedProx, FedOpt/FedAdam/FedYogi/FedAdagrad) the updates stream
into one `ops.SparseAccumulator` (float64, weights = the inner's weight key) and the
inner strategy receives a single reply: the sent arrays plus the mean update, with the
metrics aggregated by the inner's own function; otherwise (median, Krum, trimmed mean
...) each reply is rebuilt dense and handed over as is.  Either way the inner strategy
sees standard arrays and works unchanged.  Downlink stays dense.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from sparsefl import codec, ops

log = logging.getLogger("sparsefl.flower")

PAYLOAD_KEY = "sparsefl-payload"  # the one array of a sparse reply
STATE_KEY = "sparsefl-residual"  # the error-feedback residual in context.state
MEAN_BASED = {"FedAvg", "FedAvgM", "FedOpt", "FedAdam", "FedYogi", "FedAdagrad"}


def _flat_float(arrays: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(-1))
            for a in arrays]


def sparse_mod(density: float = 0.05, value_dtype: torch.dtype = torch.float16,
               error_feedback: bool = True):
    """A Flower client mod that sends the top-`density` of each update (see the module
    docstring).  value_dtype: float32, float16 or bfloat16 for the sent values."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"sparse_mod: density must be in (0, 1], got {density}")
    if value_dtype not in codec.VALUE_CODES:
        raise ValueError(f"sparse_mod: value_dtype must be one of {list(codec.VALUE_CODES)}, "
                         f"got {value_dtype}")

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or \
                len(msg.content.array_records) != 1:
            return call_next(msg, ctxt)
        received = next(iter(msg.content.array_records.values()))
        names = list(received.keys())
        sent = received.to_numpy_ndarrays()
        out = call_next(msg, ctxt)
        if out.has_error() or len(out.content.array_records) != 1:
            return out
        key, reply = next(iter(out.content.array_records.items()))
        if list(reply.keys()) != names:
            log.warning("sparse_mod: the reply's arrays are not the received ones; sent dense")
            return out
        new = reply.to_numpy_ndarrays()
        if any(a.shape != b.shape for a, b in zip(new, sent)):
            log.warning("sparse_mod: the reply's array shapes changed; sent dense")
            return out
        deltas = [a - b for a, b in zip(_flat_float(new), _flat_float(sent))]
        residual = None
        if error_feedback:
            residual = _load_residual(ctxt, names, deltas)
        idx, val = ops.topk_compress(deltas, density, residual=residual)
        if residual is not None:
            ctxt.state[STATE_KEY] = ArrayRecord(
                {n: Array(r.numpy().copy()) for n, r in zip(names, residual)})
        chunks = codec.split_flat(idx, val, [d.numel() for d in deltas])
        payload = codec.encode(chunks, value_dtype)
        out.content.array_records[key] = ArrayRecord(
            {PAYLOAD_KEY: Array(np.frombuffer(payload, dtype=np.uint8).copy())})
        return out

    return mod


def _load_residual(ctxt: Context, names: list[str], deltas: list[torch.Tensor]
                   ) -> list[torch.Tensor]:
    """The node's residual from context.state; zeros if absent or for another model."""
    rec = ctxt.state.array_records.get(STATE_KEY) if hasattr(ctxt.state, "array_records") \
        else None
    if rec is not None and list(rec.keys()) == names:
        res = _flat_float(rec.to_numpy_ndarrays())
        if all(r.numel() == d.numel() for r, d in zip(res, deltas)):
            return [r.clone() for r in res]
        log.warning("sparse_mod: the stored residual belongs to another model; reset")
    return [torch.zeros_like(d) for d in deltas]


def _aggregating_class(strategy: Strategy) -> str:
    for cls in type(strategy).__mro__:
        if "aggregate_train" in cls.__dict__:
            return cls.__name__ if cls.__module__.startswith("flwr.") else ""
    return ""


class SparseStrategy(Strategy):
    """Wraps any Flower strategy so that it takes `sparse_mod` replies (module docstring).

    mode: "auto" (merge when the inner strategy aggregates by a weighted mean, else
    per client), "merge" or "per_client".  `dropped[round]` lists (node id, reason) of
    the replies refused in that round; `uplink_bytes[round]` the payload bytes received.
    """

    def __init__(self, strategy: Strategy, *, mode: str = "auto",
                 weighted_by_key: str | None = None) -> None:
        if mode not in ("auto", "merge", "per_client"):
            raise ValueError(f"SparseStrategy: mode must be auto, merge or per_client, got "
                             f"{mode!r}")
        self.strategy = strategy
        self.weight_key = weighted_by_key or getattr(strategy, "weighted_by_key",
                                                     "num-examples")
        self.merge = mode == "merge" or (mode == "auto"
                                         and _aggregating_class(strategy) in MEAN_BASED)
        self._sent: dict[int, ArrayRecord] = {}
        self.dropped: dict[int, list[tuple[int, str]]] = {}
        self.uplink_bytes: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"SparseStrategy({self.strategy!r}, merge={self.merge})"

    def summary(self) -> None:
        log.info("SparseStrategy: sparse replies decoded and %s, then handed to:",
                 "merged (SparseAccumulator)" if self.merge else "rebuilt per client")
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent[server_round] = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ uplink ---------
    def _decode(self, msg: Message, names: list[str], numels: list[int]
                ) -> tuple[str, torch.Tensor, torch.Tensor] | str | None:
        """(record key, flat indices, values) of a sparse reply; None for a reply this
        wrapper does not touch (an error, or dense arrays); a string: why it is refused."""
        if msg.has_error() or len(msg.content.array_records) != 1:
            return None
        key, rec = next(iter(msg.content.array_records.items()))
        if list(rec.keys()) != [PAYLOAD_KEY]:
            return None
        arr = rec[PAYLOAD_KEY]
        if arr.dtype != "uint8" or len(arr.shape) != 1:
            return f"'{PAYLOAD_KEY}' is {arr.dtype} {arr.shape}, not 1-D uint8"
        data = arr.numpy().tobytes()
        try:
            chunks = codec.decode(data, nonfinite="raise")
            if [c.numel for c in chunks] != numels:
                raise codec.PayloadError(f"payload holds {len(chunks)} tensors of sizes "
                                         f"that do not match the model's {len(names)} arrays")
        except codec.PayloadError as e:
            return str(e)
        self.uplink_bytes[self._round] = self.uplink_bytes.get(self._round, 0) + len(data)
        offsets = np.cumsum([0, *numels[:-1]]).tolist()
        idx = torch.cat([c.indices + o for c, o in zip(chunks, offsets)]) if chunks else \
            torch.empty(0, dtype=torch.int64)
        val = torch.cat([c.values.float() for c in chunks]) if chunks else torch.empty(0)
        return key, idx, val

    def _arrays(self, sent: list[np.ndarray], names: list[str], flat: torch.Tensor
                ) -> ArrayRecord:
        """The sent arrays plus a flat float32 update, in their own dtypes and shapes."""
        out, pos = {}, 0
        for name, a in zip(names, sent):
            d = flat[pos:pos + a.size].numpy().reshape(a.shape)
            pos += a.size
            out[name] = Array(np.asarray(a.astype(np.float32) + d).astype(a.dtype))
        return ArrayRecord(out)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._round = server_round
        sent_rec = self._sent.pop(server_round)
        names = list(sent_rec.keys())
        sent = sent_rec.to_numpy_ndarrays()
        numels = [a.size for a in sent]
        total = sum(numels)
        passed: list[Message] = []
        sparse: list[tuple[Message, str, torch.Tensor, torch.Tensor]] = []
        for msg in replies:
            got = self._decode(msg, names, numels)
            if isinstance(got, str):
                node = msg.metadata.src_node_id
                log.warning("round %d: node %d sent an unusable sparse update (%s); dropped",
                            server_round, node, got)
                self.dropped.setdefault(server_round, []).append((node, got))
            elif got is None:
                passed.append(msg)
            else:
                sparse.append((msg, *got))
        if not self.merge:
            for msg, key, idx, val in sparse:
                delta = torch.zeros(total).index_copy_(0, idx, val)
                msg.content.array_records[key] = self._arrays(sent, names, delta)
                passed.append(msg)
            return self.strategy.aggregate_train(server_round, passed)
        if not sparse:
            return self.strategy.aggregate_train(server_round, passed)
        # merge: dense replies (nodes without the mod) join as dense updates
        updates = list(sparse)
        for msg in [m for m in passed if not m.has_error()]:
            key, rec = next(iter(msg.content.array_records.items()))
            if list(rec.keys()) != names:
                continue  # the inner strategy will judge it
            flat = torch.cat([a - b for a, b in zip(_flat_float(rec.to_numpy_ndarrays()),
                                                      _flat_float(sent))])
            updates.append((msg, key, torch.empty(0, dtype=torch.int64), flat))
            passed.remove(msg)
        acc = ops.SparseAccumulator(total)
        weights = []
        for msg, _, idx, val in updates:
            w = float(next(iter(msg.content.metric_records.values()))[self.weight_key])
            weights.append(w)
            acc.add((idx, val), w)
        mean = acc.result(divisor=sum(weights))
        first, key = updates[0][0], updates[0][1]
        metrics_fn = getattr(self.strategy, "train_metrics_aggr_fn", None)
        metrics = (metrics_fn([m.content for m, *_ in updates], self.weight_key)
                   if metrics_fn else MetricRecord())
        metrics[self.weight_key] = sum(weights)
        first.content = _content(key, self._arrays(sent, names, mean), metrics)
        return self.strategy.aggregate_train(server_round, [first, *passed])


def _content(key: str, arrays: ArrayRecord, metrics: MetricRecord) -> Any:
    from flwr.app import RecordDict

    return RecordDict({key: arrays, "metrics": metrics})
