"""Bytes both ways and accuracy of sparse_mod + SparseStrategy on a quickstart-style app.

A Flower app written the way Flower's PyTorch quickstart is (its CNN, adapted to 1x28x28
Fashion-MNIST, or the same CNN with BatchNorm; one local epoch of SGD per round), with
4 nodes, run in process through Flower's message API (the strategy's own
configure_train / aggregate_train, the mod around the train handler; no Ray), once with
plain arrays and once with the mod and the wrapper (sparse uplink and downlink), same
seeds.  Bytes are the serialized Arrays of every train message and reply, as Flower
sends them.  Prints a markdown table per round.

    .venv/bin/python scripts/flower_bytes.py [--bn] [--fedadam] [--rounds 6] [--density 0.05]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.nn import functional as F

from sparsefl import data as fldata
from sparsefl.flower import SparseStrategy, sparse_mod

NODES = [1, 2, 3, 4]


class Net(nn.Module):
    """Flower's quickstart-pytorch CNN for 1x28x28 inputs (optionally with BatchNorm)."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.bn1 = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(16) if bn else nn.Identity()
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def nbytes(rec: ArrayRecord) -> int:
    return sum(len(a.data) for a in rec.values())


def run(sparse: bool, args, ds) -> dict:
    torch.manual_seed(0)
    per = args.per_node
    parts = {n: torch.arange((n - 1) * per, n * per) for n in NODES}
    inner = (FedAdam(eta=1e-2, fraction_evaluate=0.0, min_available_nodes=4)
             if args.fedadam else FedAvg(fraction_evaluate=0.0, min_available_nodes=4))
    strategy = SparseStrategy(inner) if sparse else inner
    mod = sparse_mod(density=args.density)
    ctx = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
           for n in NODES}

    def train(msg: Message, context: Context) -> Message:
        node = msg.metadata.dst_node_id
        model = Net(args.bn)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = ds.train_x[parts[node]], ds.train_y[parts[node]]
        gen = torch.Generator().manual_seed(1000 * int(msg.content["config"]["server-round"])
                                            + node)
        model.train()
        for b in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(y)})}),
                       reply_to=msg)

    def node(msg: Message) -> Message:
        c = ctx[msg.metadata.dst_node_id]
        try:
            return mod(msg, c, train) if sparse else train(msg, c)
        except Exception as e:  # noqa: BLE001 - as Flower's ClientApp makes an error reply
            return Message(Error(code=0, reason=str(e)), reply_to=msg)

    class Grid:
        def get_node_ids(self):
            return list(NODES)

    arrays = ArrayRecord(Net(args.bn).state_dict())
    rows = []
    for rnd in range(1, args.rounds + 1):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), Grid()))
        msgs.sort(key=lambda m: m.metadata.dst_node_id)
        down = sum(nbytes(r) for m in msgs for r in m.content.array_records.values())
        replies = [node(m) for m in msgs]
        up = sum(nbytes(r) for m in replies if not m.has_error()
                 for r in m.content.array_records.values())
        arrays, _ = strategy.aggregate_train(rnd, replies)
        model = Net(args.bn)
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            acc = float((model(ds.test_x).argmax(1) == ds.test_y).float().mean())
        rows.append({"round": rnd, "down": down, "up": up, "acc": acc,
                     "errors": sum(m.has_error() for m in replies)})
    return {"rows": rows, "params": sum(a.numpy().size for a in arrays.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bn", action="store_true", help="the CNN with BatchNorm")
    p.add_argument("--fedadam", action="store_true", help="FedAdam instead of FedAvg")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--per-node", type=int, default=2000)
    args = p.parse_args()
    for k in ("run_id", "node_id", "task_id"):  # the identity a ServerApp process has
        setattr(TaskIdentity, k, 1)
    torch.set_num_threads(2)
    ds = fldata.load("fashion-mnist")
    t0 = time.perf_counter()
    dense, sparse = run(False, args, ds), run(True, args, ds)
    print(f"Net{' + BatchNorm' if args.bn else ''} ({dense['params']:,} values), "
          f"{'FedAdam' if args.fedadam else 'FedAvg'}, 4 nodes x {args.per_node} Fashion-MNIST "
          f"images, density {args.density}, fp16 values ({time.perf_counter() - t0:.0f} s)\n")
    print("| round | downlink dense B | sparse B | less | uplink dense B | sparse B | less "
          "| acc dense | acc sparse |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d, s in zip(dense["rows"], sparse["rows"]):
        print(f"| {d['round']} | {d['down']:,} | {s['down']:,} | {d['down'] / s['down']:.1f}x "
              f"| {d['up']:,} | {s['up']:,} | {d['up'] / max(s['up'], 1):.1f}x "
              f"| {d['acc']:.3f} | {s['acc']:.3f} |"
              + (f" ({s['errors']} node errors)" if s["errors"] else ""))
    assert np.isfinite([r["acc"] for r in sparse["rows"]]).all()


if __name__ == "__main__":
    main()
