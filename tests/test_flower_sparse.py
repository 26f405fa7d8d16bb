"""sparse_mod + SparseStrategy on a Flower app that is not sparsefl's engine: a small model
with train/evaluate handlers and FedAvg, written the way Flower's PyTorch quickstart is,
on the digits data (3 nodes, 5 rounds, Flower's simulation)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed (pip install 'sparsefl[flower]')")

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg, Strategy  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from sparsefl import codec  # noqa: E402
from sparsefl import data as fldata  # noqa: E402
from sparsefl.flower import SparseStrategy, sparse_mod  # noqa: E402
from sparsefl.flower.sparse import PAYLOAD_KEY, STATE_KEY  # noqa: E402

NODES, ROUNDS = 3, 5


# ----------------------------------------------------------- the user's app ---------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def load_data(partition_id: int, num_partitions: int):
    ds = fldata.load("digits")
    idx = torch.arange(len(ds.train_y))[partition_id::num_partitions]
    return ds.train_x[idx], ds.train_y[idx]


def central_evaluate(arrays: ArrayRecord) -> float:
    ds = fldata.load("digits")
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        return float((model(ds.test_x).argmax(1) == ds.test_y).float().mean())


def client_app(mods=()) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        x, y = load_data(pid, int(context.node_config["num-partitions"]))
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        rnd = int(msg.content["config"]["server-round"])
        gen = torch.Generator().manual_seed(1000 * rnd + pid)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        total = 0.0
        for _ in range(2):
            for b in torch.randperm(len(y), generator=gen).split(32):
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"train_loss": total,
                                                       "num-examples": len(y)})})
        return Message(content=content, reply_to=msg)

    return app


class Counting(Strategy):
    """Counts the bytes of every train reply's arrays as they arrive from the nodes."""

    def __init__(self, inner: Strategy) -> None:
        self.inner, self.up, self.errors, self.replies = inner, 0, {}, {}
        self.sampled: dict[int, set[int]] = {}

    def configure_train(self, r, arrays, config, grid):
        msgs = list(self.inner.configure_train(r, arrays, config, grid))
        self.sampled[r] = {m.metadata.dst_node_id for m in msgs}
        return msgs

    def aggregate_train(self, r, replies):
        replies = list(replies)
        self.errors[r] = sum(m.has_error() for m in replies)
        self.replies[r] = len(replies)
        for m in replies:
            if not m.has_error():
                self.up += sum(len(a.data) for rec in m.content.array_records.values()
                               for a in rec.values())
        return self.inner.aggregate_train(r, replies)

    def configure_evaluate(self, r, arrays, config, grid):
        return []

    def aggregate_evaluate(self, r, replies):
        return None

    def summary(self) -> None:
        pass


def simulate(mods=(), sparse: bool = False) -> dict:
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
        wrapped = SparseStrategy(inner) if sparse else inner
        counting = Counting(wrapped)
        result = counting.start(grid, ArrayRecord(Net().state_dict()), num_rounds=ROUNDS)
        out.update(acc=central_evaluate(result.arrays), up=counting.up, strategy=wrapped,
                   arrays=result.arrays, errors=counting.errors, replies=counting.replies,
                   sampled=counting.sampled)

    run_simulation(server_app=server, client_app=client_app(mods), num_supernodes=NODES,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2}})
    return out


@pytest.fixture(scope="module")
def dense_and_sparse():
    return simulate(), simulate([sparse_mod(density=0.05)], sparse=True)


def test_sparse_updates_cost_a_fifteenth_and_keep_the_accuracy(dense_and_sparse):
    dense, sparse = dense_and_sparse
    print(f"uplink bytes: dense {dense['up']}, sparse {sparse['up']} "
          f"({dense['up'] / sparse['up']:.1f}x less); accuracy: dense {dense['acc']:.4f}, "
          f"sparse {sparse['acc']:.4f}")
    assert sparse["up"] * 15 <= dense["up"], (sparse["up"], dense["up"])
    assert abs(sparse["acc"] - dense["acc"]) <= 0.03, (sparse["acc"], dense["acc"])
    assert dense["acc"] > 0.8  # the app learns at all
    assert not sparse["strategy"].dropped


def test_a_node_sending_garbage_is_dropped_not_aggregated():
    def garbage(msg: Message, ctxt: Context, call_next) -> Message:
        out = call_next(msg, ctxt)
        if int(ctxt.node_config["partition-id"]) == 1 and not out.has_error():
            key = next(iter(out.content.array_records))
            raw = out.content.array_records[key][PAYLOAD_KEY].numpy().tobytes()
            bad = raw[:-7] + b"garbage"
            out.content.array_records[key] = ArrayRecord(
                {PAYLOAD_KEY: Array(np.frombuffer(bad, dtype=np.uint8).copy())})
        return out

    res = simulate([garbage, sparse_mod(density=0.05)], sparse=True)
    dropped = res["strategy"].dropped
    bad = {node for v in dropped.values() for node, _ in v}
    assert len(bad) == 1  # one node's payloads are refused, always the same node
    # Every round the garbage node is sampled, its payload is refused by the decoder; under
    # load a node can also fail outright or its reply miss the round, and Flower then hands
    # over an error reply or none, which is not aggregated either.  On a busy machine round
    # 1 may start before every node connected and sample only some (seen in CI: 2 of 3).
    for r in range(1, ROUNDS + 1):
        missing = len(res["sampled"][r]) - res["replies"][r]
        refused = len(dropped.get(r, [])) + res["errors"][r] + missing
        assert refused == (1 if bad <= res["sampled"][r] else 0), (
            r, dropped, res["errors"], res["replies"], res["sampled"])
    assert len(dropped) >= ROUNDS - 1
    assert all("checksum" in v[0][1] for v in dropped.values())
    assert all(np.isfinite(a).all() for a in res["arrays"].to_numpy_ndarrays())
    assert res["acc"] > 0.5


# ----------------------------------------------------------- the mod, in process ----
@pytest.fixture
def task_identity():
    """Messages made outside a running Flower process need an identity to carry."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _train_message(arrays: ArrayRecord) -> Message:
    return Message(content=RecordDict({"arrays": arrays,
                                       "config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=1, message_type=MessageType.TRAIN)


def _reply_with(new: dict[str, torch.Tensor]):
    def handler(msg: Message, ctxt: Context) -> Message:
        return Message(content=RecordDict({"arrays": ArrayRecord(new),
                                           "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)
    return handler


def test_the_residual_lives_in_context_state_and_survives_a_restart(task_identity):
    base = {"w": torch.zeros(100), "b": torch.zeros(10)}
    new = {"w": torch.arange(100, dtype=torch.float32), "b": torch.full((10,), 0.5)}
    ctxt = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    out = sparse_mod(density=0.1, value_dtype=torch.float32)(
        _train_message(ArrayRecord(base)), ctxt, _reply_with(new))
    chunks = codec.decode(out.content["arrays"][PAYLOAD_KEY].numpy().tobytes())
    sent = torch.cat([c.to_dense() for c in chunks])
    assert int((sent != 0).sum()) == 11  # top 10% of 110
    res = torch.cat([torch.from_numpy(a.reshape(-1))
                     for a in ctxt.state[STATE_KEY].to_numpy_ndarrays()])
    full = torch.cat([new["w"], new["b"]])
    torch.testing.assert_close(sent + res, full)  # nothing lost: sent + kept = update
    # a restarted client (a new mod, the node's stored state) sends what was owed next
    out2 = sparse_mod(density=0.1, value_dtype=torch.float32)(
        _train_message(ArrayRecord(base)), ctxt, _reply_with(base))  # a zero update
    sent2 = torch.cat([c.to_dense() for c in
                       codec.decode(out2.content["arrays"][PAYLOAD_KEY].numpy().tobytes())])
    assert int((sent2 != 0).sum()) == 11
    assert torch.equal(sent2[sent2 != 0], res[sent2 != 0])
    assert float(sent2.abs().min()) == 0.0 and float(sent2[sent2 != 0].abs().min()) >= \
        float(res[res != 0].abs().sort().values[-11])


def test_other_messages_and_unknown_replies_pass_untouched(task_identity):
    ctxt = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    base = {"w": torch.zeros(4)}
    other = {"v": torch.ones(4)}  # the reply's arrays are not the received ones
    out = sparse_mod()(_train_message(ArrayRecord(base)), ctxt, _reply_with(other))
    assert list(out.content["arrays"].keys()) == ["v"]
    with pytest.raises(ValueError, match="density"):
        sparse_mod(density=0.0)
    with pytest.raises(ValueError, match="value_dtype"):
        sparse_mod(value_dtype=torch.int8)
