"""Flower messages, nodes and a grid made in process, through Flower's public API only
(Message with explicit Metadata; TaskIdentity through its public setters), for the
sparse_mod / SparseStrategy tests that need no simulation."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

_IDS = ("run_id", "node_id", "task_id")


@pytest.fixture
def server_identity() -> Iterator[None]:
    """The identity a ServerApp process has (strategies build messages with it), set and
    restored through TaskIdentity's public setters, as Flower's own runtime sets it."""
    saved = {}
    for k in _IDS:
        try:
            saved[k] = getattr(TaskIdentity, k)
        except RuntimeError:
            saved[k] = None
        setattr(TaskIdentity, k, 1)
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, k, v)


def train_message(arrays: ArrayRecord, node: int = 1, rnd: int = 1) -> Message:
    """A train instruction as the SuperLink delivers it to a node."""
    md = Metadata(run_id=1, message_id=f"m-{rnd}-{node}", src_node_id=0, dst_node_id=node,
                  reply_to_message_id="", group_id=str(rnd), created_at=time.time(),
                  ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}),
                   metadata=md)


def reply(msg: Message, arrays: dict[str, np.ndarray] | ArrayRecord,
          weight: float | int | None = 10, **metrics: float) -> Message:
    """A node's train reply: arrays and one MetricRecord (with the weight unless None)."""
    rec = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(
        {k: Array(np.asarray(v)) for k, v in arrays.items()})
    m = MetricRecord(dict(metrics))
    if weight is not None:
        m["num-examples"] = weight
    return Message(RecordDict({"arrays": rec, "metrics": m}), reply_to=msg)


def node_context(node: int, state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": node},
                   state=state if state is not None else RecordDict(), run_config={})


def copy_state(state: RecordDict) -> RecordDict:
    """A node's state as a restarted node rebuilds it from saved bytes: every Array from
    its serialized .data (np.save, no pickle), every ConfigRecord re-made."""
    out = RecordDict()
    for k, rec in state.array_records.items():
        out[k] = ArrayRecord({n: Array(np.load(io.BytesIO(a.data), allow_pickle=False))
                              for n, a in rec.items()})
    for k, rec in state.config_records.items():
        out[k] = ConfigRecord(dict(rec))
    return out


class Grid:
    """What a strategy's configure_* asks of the grid: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


Handler = Callable[[Message, Context], Message]


def run_node(mod, msg: Message, ctxt: Context, handler: Handler) -> Message:
    """What a ClientApp does with a message: the mod around the handler; an exception
    becomes an error reply, as Flower's ClientApp makes it."""
    from flwr.app import Error

    try:
        return mod(msg, ctxt, handler)
    except Exception as e:  # noqa: BLE001 - as the ClientApp runtime does
        return Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
