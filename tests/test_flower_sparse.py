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
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg, Strategy  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from sparsefl import data as fldata  # noqa: E402
from sparsefl.flower import SparseStrategy, sparse_mod  # noqa: E402
from sparsefl.flower.sparse import PAYLOAD_KEY  # noqa: E402

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
        self.down: dict[int, int] = {}
        self.sampled: dict[int, set[int]] = {}

    def configure_train(self, r, arrays, config, grid):
        msgs = list(self.inner.configure_train(r, arrays, config, grid))
        self.sampled[r] = {m.metadata.dst_node_id for m in msgs}
        self.down[r] = sum(len(a.data) for m in msgs for rec in m.content.array_records.values()
                           for a in rec.values())
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
                   sampled=counting.sampled, down=counting.down)

    run_simulation(server_app=server, client_app=client_app(mods), num_supernodes=NODES,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2}})
    return out


@pytest.fixture(scope="module")
def dense_and_sparse():
    return simulate(), simulate([sparse_mod(density=0.05)], sparse=True)


def test_sparse_updates_cost_a_twelfth_and_keep_the_accuracy(dense_and_sparse):
    dense, sparse = dense_and_sparse
    print(f"uplink bytes: dense {dense['up']}, sparse {sparse['up']} "
          f"({dense['up'] / sparse['up']:.1f}x less); accuracy: dense {dense['acc']:.4f}, "
          f"sparse {sparse['acc']:.4f}")
    # 12x, not 20x (1/density): the two biases travel dense and exact (sparse_mod's
    # default rule), each with its 128-byte np.save header, as the payload has one
    assert sparse["up"] * 12 <= dense["up"], (sparse["up"], dense["up"])
    for r in range(1, ROUNDS + 1):
        print(f"round {r}: downlink {sparse['down'][r]} vs dense {dense['down'][r]} "
              f"({dense['down'][r] / sparse['down'][r]:.1f}x less)")
    assert all(sparse["down"][r] < dense["down"][r] for r in range(3, ROUNDS + 1))
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
