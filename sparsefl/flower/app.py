"""sparsefl rounds on Flower: the simulator's own round code with the clients on Flower nodes.

Server (a ServerApp with its own Grid loop): `engine.run(cfg, remote=...)` -- sampling,
payload checks, streaming sparse aggregation, server optimizer, SWA, FedBABU, metrics and
checkpoints are the in-process simulator's code; only "run these clients" goes over
Flower.  Client (a ClientApp): the train handler runs `Simulation.client_update`, the same
function the simulator calls, and replies with the codec's bytes.  Nothing is pickled:
payloads travel as uint8 Arrays (np.save bytes of the documented sparsefl codec layout).

Messages
  QUERY  server -> every node      reply ConfigRecord {"partition-id"}   (who holds which
                                                                         client's data)
  TRAIN  server -> node of client c: ArrayRecord {"global": uint8 codec bytes},
                                     ConfigRecord {"round", "lr", "client"}
         reply                       ArrayRecord {"payload": uint8 codec bytes},
                                     MetricRecord {"num-examples", "train-loss",
                                                   "activated", "deactivated"}
A node that errs, does not answer, or sends bytes that fail decoding is dropped from the
round with a logged reason (the simulator's fault handling), never aggregated.

Configuration: the run config keys `sparsefl-config` (a TOML path; empty: the default
run) and `sparsefl-set` ("key=value;key=value" overrides), or a Config passed to the
factories below.  Every node loads its own partition of the data from local files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
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
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from sparsefl.errors import ClientFault
from sparsefl.fl import config as flconfig
from sparsefl.fl import engine, wire

log = logging.getLogger("sparsefl.flower")

_SIMS: dict[str, engine.Simulation] = {}  # one client-side Simulation per config, per process


def config_from_run(run_config: dict[str, Any]) -> flconfig.Config:
    path = str(run_config.get("sparsefl-config", "") or "") or None
    sets = [s.strip() for s in str(run_config.get("sparsefl-set", "")).split(";") if s.strip()]
    return flconfig.load(path, sets)


def _check_supported(cfg: flconfig.Config) -> None:
    if cfg.decentralized.strategy != "none":
        raise ValueError("sparsefl.flower runs server-based rounds; decentralized.strategy "
                         "must be 'none'")
    if cfg.sparsity.method == "flash":
        raise ValueError("sparsity.method = 'flash' is not supported over Flower yet: its "
                         "fixed mask lives on the server and would have to travel down")


def _bytes(record: ArrayRecord, key: str) -> tuple[bytes, int]:
    """Payload bytes of a uint8 Array and the size Flower carried for it (np.save form)."""
    arr = record[key]
    if arr.dtype != "uint8" or len(arr.shape) != 1:
        raise ValueError(f"'{key}' must be a 1-D uint8 array, got {arr.dtype} {arr.shape}")
    return arr.numpy().tobytes(), len(arr.data)


def _u8(payload: bytes) -> Array:
    return Array(np.frombuffer(payload, dtype=np.uint8).copy())


# ------------------------------------------------------------------------ client -------
def client_app(cfg: flconfig.Config | None = None,
               tamper: Callable[[int, bytes], bytes] | None = None) -> ClientApp:
    """A ClientApp running sparsefl's client update; cfg None: read from the run config.

    tamper(client, payload) -> bytes, if given, alters what a node sends (fault tests)."""
    app = ClientApp()

    def simulation(context: Context) -> engine.Simulation:
        c = cfg if cfg is not None else config_from_run(dict(context.run_config))
        key = flconfig.dumps(c)
        if key not in _SIMS:
            _check_supported(c)
            if c.run.threads:
                torch.set_num_threads(c.run.threads)
            _SIMS[key] = engine.Simulation(c)
        return _SIMS[key]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config.get("partition-id", -1))
        return Message(RecordDict({"node": ConfigRecord({"partition-id": pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        sim = simulation(context)
        conf = msg.content["config"]
        cid, rnd, lr = int(conf["client"]), int(conf["round"]), float(conf["lr"])
        mine = int(context.node_config.get("partition-id", cid))
        if mine != cid:
            raise ValueError(f"asked to train client {cid} on the node of client {mine}")
        down, _ = _bytes(msg.content["arrays"], "global")
        received = wire.to_flat(sim.layout, wire.decode(sim.layout, down))
        down_ref = wire.supports(sim.layout, received)
        up = sim.client_update(cid, rnd, received, down_ref, lr)
        if up is None:  # no training data on this client
            payload, metrics = b"", {"num-examples": 0}
        else:
            payload = up.payload if tamper is None else tamper(cid, up.payload)
            metrics = {"num-examples": up.num_examples, "train-loss": up.train_loss,
                       "activated": up.activated, "deactivated": up.deactivated}
        return Message(RecordDict({"arrays": ArrayRecord({"payload": _u8(payload)}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# ------------------------------------------------------------------------ server -------
class FlowerClients:
    """The `remote` callable of engine.run: sends TRAIN messages, returns ClientUpdates.

    Also counts the bytes Flower carried for the models and updates (the np.save form of
    each uint8 Array), to compare with the codec's own accounting."""

    def __init__(self, grid: Grid, cfg: flconfig.Config, timeout: float | None = None) -> None:
        self.grid, self.cfg, self.timeout = grid, cfg, timeout
        self.node_of: dict[int, int] = {}
        self.carried_up = self.carried_down = 0

    def connect(self, wait_s: float = 120.0) -> None:
        """Wait for one node per client and learn which node holds which partition."""
        want, t0 = self.cfg.data.clients, time.monotonic()
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= want:
                break
            if time.monotonic() - t0 > wait_s:
                raise TimeoutError(f"{len(nodes)} Flower nodes connected after {wait_s:.0f} s; "
                                   f"the config has data.clients = {want}")
            time.sleep(1.0)
        msgs = [Message(RecordDict({"q": ConfigRecord({"want": "partition-id"})}),
                        dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            if reply.has_error():
                continue
            pid = int(reply.content["node"]["partition-id"])
            if 0 <= pid < want:
                self.node_of[pid] = reply.metadata.src_node_id
        missing = sorted(set(range(want)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"no Flower node holds partition(s) {missing}; start one "
                               "SuperNode per client with node-config partition-id=i")

    def __call__(self, cids: list[int], down: bytes, rnd: int, lr: float) -> dict[int, Any]:
        msgs = []
        for cid in cids:
            content = RecordDict({"arrays": ArrayRecord({"global": _u8(down)}),
                                  "config": ConfigRecord({"round": rnd, "lr": lr,
                                                          "client": cid})})
            msgs.append(Message(content, dst_node_id=self.node_of[cid],
                                message_type=MessageType.TRAIN))
            self.carried_down += len(content["arrays"]["global"].data)
        cid_of = {self.node_of[c]: c for c in cids}
        out: dict[int, Any] = {c: ClientFault("no reply from the node (timeout)") for c in cids}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            cid = cid_of.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            if reply.has_error():
                out[cid] = ClientFault(f"node error: {reply.error.reason}")
                continue
            try:
                payload, carried = _bytes(reply.content["arrays"], "payload")
                m = reply.content["metrics"]
                self.carried_up += carried
                n = int(m["num-examples"])
                out[cid] = None if n == 0 else engine.ClientUpdate(
                    cid, payload, n, float(m["train-loss"]), None, int(m["activated"]),
                    int(m["deactivated"]))
            except (KeyError, TypeError, ValueError) as e:  # malformed reply: drop the node
                out[cid] = ClientFault(f"malformed reply: {e!r}")
        return out


def server_app(cfg: flconfig.Config | None = None, run_dir: str | Path | None = None,
               results: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp running cfg's rounds with the clients on Flower nodes.

    cfg None: read from the run config (and `sparsefl-out` for the run directory).
    `results`, if given, receives the History and the bytes Flower carried."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        c = cfg if cfg is not None else config_from_run(dict(context.run_config))
        _check_supported(c)
        out = run_dir if run_dir is not None else (context.run_config.get("sparsefl-out")
                                                   or None)
        clients = FlowerClients(grid, c)
        clients.connect()
        history = engine.run(c, out, progress=False, remote=clients)
        up = sum(r["bytes_up"] for r in history.rounds)
        log.info("sparsefl on Flower: %d rounds, final %s; codec bytes up %d, carried %d",
                 len(history.rounds), history.final, up, clients.carried_up)
        if results is not None:
            results.update(history=history, carried_up=clients.carried_up,
                           carried_down=clients.carried_down)

    return app


# Module-level apps for `flwr run` (pyproject [tool.flwr.app.components]).
clientapp = client_app()
serverapp = server_app()
