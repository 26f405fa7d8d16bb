"""The in-process simulator: one federated round after another.

A round t (1-based):
  1. sample K clients (seeded by (seed, t));
  2. downlink: the global model is encoded once (prunable tensors as their non-zeros)
     and decoded into the worker model; bytes_down = K * len(payload);
  3. each client: load, `sparsifier.begin_client`, local training, `sparsifier.select`
     (global top-k through sparsefl.ops), encode (uplink bytes counted as sent);
  4. server: decode each payload as it arrives (validated) and stream it into an
     `ops.SparseAccumulator` (weight n_k; float64 running sum, at most `group` payloads
     held, so server memory does not grow with the number of clients); the mean is the
     sum / sum(n); then the server optimizer, the sparsifier's server hook (FLASH's mask),
     SWA collection at cycle ends;
  5. metrics, then a checkpoint of everything a resume needs.

Nothing random is drawn from global RNG state: model init, partition, client sampling
and every client's batch order derive from the run seed, so a resumed run replays the
remaining rounds bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sparsefl import codec, models, ops
from sparsefl import data as fldata
from sparsefl.errors import ClientFault, NonFiniteModel, RoundError
from sparsefl.fl import checkpoint, sparsifiers, wire
from sparsefl.fl import config as flconfig
from sparsefl.fl.client import local_train
from sparsefl.fl.evaluate import evaluate, has_batchnorm, recompute_bn, regrowth
from sparsefl.fl.layout import Layout
from sparsefl.fl.personalize import personalized
from sparsefl.fl.server import ServerOptimizer
from sparsefl.fl.swa import SWA, client_lr, cycle_end
from sparsefl.fl.timers import Timers
from sparsefl.models.init import apply_init
from sparsefl.nn import layer_sparsity, set_compute
from sparsefl.nn.powerprop import POWERPROP
from sparsefl.nn.sparse_compute import compute_summary, dense_reasons
from sparsefl.ops.tiled import untile

log = logging.getLogger("sparsefl")
FAULTS = ("raised", "timeout", "undecodable", "nonfinite", "norm")
# Payloads merged per tiled-aggregation call: larger groups amortise the pass over the
# running sum, smaller ones hold fewer payloads (server memory: 8 B/param + group payloads).
AGGREGATE_GROUP = 16
RemoteClients = Callable[[list[int], bytes, int, float], dict[int, Any]]


def resolve_device(name: str) -> torch.device:
    """run.device -> the device the run's model, data and flat vectors live on."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "torch sees no CUDA device")
        raise flconfig.ConfigError(f"run.device: cuda asked for, but {why} (torch "
                                   f"{torch.__version__}); use run.device = cpu or auto")
    return torch.device("cuda", torch.cuda.current_device())


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass
class ClientUpdate:
    client: int
    payload: bytes  # what travels up: sparsefl.codec bytes
    num_examples: int
    train_loss: float
    selection: dict[str, Tensor] | None
    activated: int
    deactivated: int


@dataclass
class History:
    config: flconfig.Config
    rounds: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    final: dict[str, Any] = field(default_factory=dict)
    global_flat: Tensor | None = None  # the final global (decentralized: average) model
    simulation: Any = None  # the Simulation / DecentralizedSimulation that ran


class Simulation:
    def __init__(self, cfg: flconfig.Config, dataset: fldata.Dataset | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.run.device)
        data = fldata.subset(dataset or fldata.load(cfg.data.name, cfg.data.dir or None),
                             cfg.data.fraction, cfg.data.label_noise,
                             seed=derive_seed(cfg.run.seed, 10))
        self.clients = fldata.partition(
            data.train_y, cfg.data.clients, cfg.data.partition, alpha=cfg.data.alpha,
            shards_per_client=cfg.data.shards_per_client,
            test_fraction=cfg.data.test_fraction, seed=derive_seed(cfg.run.seed, 1))
        # the whole data set on the run's device: batches are then index gathers there
        self.data = dataclasses.replace(
            data, train_x=data.train_x.to(self.device), train_y=data.train_y.to(self.device),
            test_x=data.test_x.to(self.device), test_y=data.test_y.to(self.device))
        self.sparsifier = sparsifiers.build(cfg.sparsity)
        torch.manual_seed(derive_seed(cfg.run.seed, 2))
        kwargs: dict[str, Any] = {}
        if cfg.model.name == "mlp":
            kwargs["hidden"] = cfg.model.hidden
        elif cfg.model.name == "resnet18":
            kwargs["width"] = cfg.model.width
        model = models.build(cfg.model.name, self.data.input_shape, self.data.num_classes,
                             **kwargs)
        apply_init(model, cfg.model.init)  # theta's init; Powerprop maps it to omega
        self.model = self.sparsifier.setup_model(model).to(self.device)
        self.has_powerprop = any(isinstance(m, POWERPROP) for m in self.model.modules())
        self.compute_choice: dict[str, str] = {}
        # client.compute = "sparse" honoured or said: the layers that run dense, and why
        self.dense_layers: dict[str, str] = {}
        if cfg.client.compute == "sparse" and not self.has_powerprop:
            self._note_dense({"all layers": f"sparsity.method = {cfg.sparsity.method!r} "
                              "trains plain torch layers: there is no fixed support to "
                              "compute on (docs/architecture.md, sparse compute)"})
        frozen: set[str] = set()
        if cfg.personalization.method == "fedbabu":  # the head stays at its random init
            head_name, head = models.head(self.model)
            for pname, p in head.named_parameters():
                p.requires_grad_(False)
                frozen.add(f"{head_name}.{pname}")
        self.layout = Layout(self.model, frozen, self.device)
        self.global_flat = self.layout.flatten(self.model)
        self.server = ServerOptimizer(cfg.server, self.layout.numel, self.device)
        self.swa = SWA(self.layout.numel, self.device) if cfg.swa.enabled else None
        self.buffer_mask = self.layout.mask(buffer=True)
        self.prunable_mask = self.layout.mask(prunable=True)
        self.round = 0
        # plain SGD: an MLP may train fused (fused_sgd) when its method needs no per-step
        # hook for the client (Sparsifier.step_hook)
        self._fused = cfg.client.fused and cfg.client.optimizer == "sgd"

    # ------------------------------------------------------------------ state ----------
    def state(self) -> dict[str, Tensor]:
        out = {"global": self.global_flat}
        out.update(self.server.state())
        out.update(self.sparsifier.state())
        if self.swa is not None:
            out.update(self.swa.state())
        return out

    def load_state(self, rnd: int, tensors: dict[str, Tensor]) -> None:
        if tensors["global"].numel() != self.layout.numel:
            raise ValueError("checkpoint does not match this config's model")
        self.global_flat = tensors["global"].to(self.device, copy=True)
        self.server.load_state(tensors)
        self.sparsifier.load_state(tensors)
        if self.swa is not None:
            self.swa.load_state(tensors)
        self.round = rnd

    def timers(self) -> Timers:
        """Phase timers that wait for the device at each phase boundary."""
        return Timers(torch.cuda.synchronize if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ a round --------
    def sample(self, rnd: int, attempt: int = 0) -> list[int]:
        parts = (self.cfg.run.seed, 3, rnd) + ((attempt,) if attempt else ())
        rng = np.random.default_rng(derive_seed(*parts))
        k = self.cfg.server.clients_per_round
        return sorted(rng.choice(self.cfg.data.clients, size=k, replace=False).tolist())

    def _client_xy(self, cid: int) -> tuple[Tensor, Tensor]:
        idx = torch.from_numpy(self.clients[cid].train)
        return self.data.train_x[idx], self.data.train_y[idx]

    def client_update(self, cid: int, rnd: int, received: Tensor,
                      down_ref: list[Tensor | None], lr: float,
                      timers: Timers | None = None) -> ClientUpdate | None:
        """One client's round: load the received model, train, select, encode."""
        cfg, layout, timers = self.cfg, self.layout, timers or self.timers()
        x, y = self._client_xy(cid)
        if len(y) == 0:
            return None
        layout.load(self.model, received)
        self.sparsifier.begin_client(self.model, rnd)
        if self.has_powerprop:  # pack the received support (and calibrate "auto" once)
            with timers("compute"):
                self.compute_choice = set_compute(
                    self.model, cfg.client.compute, sample=x[:cfg.client.batch_size],
                    recompute=cfg.client.recompute,
                    fixed_support=self.sparsifier.fixed_support(), strict=False,
                    fused=self._fused)
                if cfg.client.compute == "sparse":
                    self._note_dense(dense_reasons(self.model, self.compute_choice,
                                                   self.sparsifier.fixed_support()), rnd)
        gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 4, rnd, cid))
        try:
            hook = self.sparsifier.step_hook(self.model)
            loss = local_train(self.model, x, y, cfg.client, lr, gen, timers, hook)
        except ValueError as e:  # a kernel refusing NaN input: diverged, or a bug?
            if "NaN" in str(e) and not all(bool(torch.isfinite(p).all())
                                           for p in self.model.parameters()):
                raise NonFiniteModel(f"client {cid} diverged in round {rnd} (its weights "
                                     f"went non-finite: {e})") from e
            raise  # finite weights: the NaN came from elsewhere (the data, a bug)
        finally:
            if self.has_powerprop:  # evaluation and the server see a dense model again
                set_compute(self.model, "dense")
        with timers("prune"):
            flat = layout.flatten(self.model)
            if not bool(torch.isfinite(flat).all()):  # diverged: nothing to select or send
                raise NonFiniteModel(f"client {cid}'s model is non-finite after local "
                                     f"training in round {rnd}")
            sel = self.sparsifier.select(layout, flat, rnd)
            chunks = wire.chunks_from_flat(layout, flat, sel)
        with timers("encode"):
            payload = wire.encode(chunks, reference=down_ref)
        activated = deactivated = 0
        for e, c in zip(layout.entries, chunks):
            if e.prunable:
                a, d = regrowth(received[e.offset:e.offset + e.numel], c.indices)
                activated, deactivated = activated + a, deactivated + d
        return ClientUpdate(cid, payload, len(y), loss, sel, activated, deactivated)

    def _note_dense(self, reasons: dict[str, str], rnd: int | None = None) -> None:
        """Log, once per run and layer, a layer that runs dense under compute = sparse
        (from which round, when it is a round's state that keeps it dense)."""
        for name, why in reasons.items():
            if name not in self.dense_layers:
                self.dense_layers[name] = why if rnd is None else f"from round {rnd}: {why}"
                log.warning("client.compute = 'sparse': %s runs dense %s", name,
                            self.dense_layers[name])

    def _receive(self, cid: int, rnd: int, received: Tensor, down_ref: list[Tensor | None],
                 lr: float, timers: Timers) -> tuple[ClientUpdate | None, Any, str | None]:
        """Run one client in process and check what the server gets."""
        t0 = time.perf_counter()
        try:
            up = self.client_update(cid, rnd, received, down_ref, lr, timers)
        except ClientFault as e:  # a client failing as clients do: dropped from the round
            return self._accept(cid, rnd, e, received, down_ref, timers)
        except Exception as e:  # anything else is a bug: never mistaken for a divergence
            e.add_note(f"sparsefl: raised while client {cid} trained in round {rnd}; a bug "
                       "ends the run (only sparsefl.errors.ClientFault drops a client)")
            raise
        return self._accept(cid, rnd, up, received, down_ref, timers,
                            time.perf_counter() - t0)

    def _accept(self, cid: int, rnd: int, up: ClientUpdate | BaseException | None,
                received: Tensor, down_ref: list[Tensor | None], timers: Timers,
                elapsed: float = 0.0) -> tuple[ClientUpdate | None, Any, str | None]:
        """Server-side checks of one client's reply: (update, tiled payload, fault)."""
        cfg, layout = self.cfg.server, self.layout
        if isinstance(up, NonFiniteModel):
            log.warning("round %d: %s; dropped", rnd, up)
            return None, None, "nonfinite"
        if isinstance(up, BaseException):
            log.warning("round %d: client %d raised %r; dropped", rnd, cid, up)
            return None, None, "raised"
        if up is None:
            return None, None, None
        if cfg.client_timeout and elapsed > cfg.client_timeout:
            log.warning("round %d: client %d took longer than server.client_timeout; dropped",
                        rnd, cid)
            return up, None, "timeout"
        with timers("decode"):
            try:
                payload = wire.decode_tiled(layout, up.payload, reference=down_ref,
                                            nonfinite="allow")
            except codec.PayloadError as e:
                log.warning("round %d: client %d sent an undecodable payload (%s); dropped",
                            rnd, cid, e)
                return up, None, "undecodable"
        if not bool(torch.isfinite(payload.values).all()):
            log.warning("round %d: client %d sent non-finite values; dropped", rnd, cid)
            return up, None, "nonfinite"
        if cfg.max_update_norm:
            idx, val = untile(payload)
            val = val.float()
            delta = layout.zeros().index_copy_(0, idx.to(received.device),
                                               val.to(received.device)) - received
            norm = float(delta.norm())
            if norm > cfg.max_update_norm:
                log.warning("round %d: client %d update norm %.4g exceeds "
                            "server.max_update_norm; dropped", rnd, cid, norm)
                return up, None, "norm"
        return up, payload, None

    def step(self, remote: RemoteClients | None = None) -> dict[str, Any]:
        """One round.  `remote(cids, down_payload, rnd, lr)`, when given, runs the chosen
        clients elsewhere (e.g. on Flower nodes) and returns {cid: ClientUpdate, an
        exception, or None}; everything else -- sampling, checks, aggregation, server
        step -- is this same code, so a remote round equals an in-process one."""
        cfg, layout, timers = self.cfg, self.layout, self.timers()
        rnd = self.round + 1
        t_round = time.perf_counter()
        lr = client_lr(cfg, rnd)

        with timers("encode"):
            down_ref = wire.supports(layout, self.global_flat)
            down = wire.encode(wire.chunks_from_flat(layout, self.global_flat))
        with timers("decode"):
            received = wire.to_flat(layout, wire.decode(layout, down))

        faults = dict.fromkeys(FAULTS, 0)
        sent_up = sent_down = contacted = 0
        for attempt in range(cfg.server.max_retries + 1):
            chosen = self.sample(rnd, attempt)
            # Payloads are merged as they arrive and dropped: only what the round's
            # bookkeeping needs is kept per client (ClientUpdate minus payload and selection).
            acc = ops.SparseAccumulator(layout.numel, group=AGGREGATE_GROUP)
            good: list[dict[str, Any]] = []
            replies = remote(chosen, down, rnd, lr) if remote is not None else None
            for cid in chosen:
                contacted += 1
                sent_down += len(down)
                if replies is None:
                    up, pair, why = self._receive(cid, rnd, received, down_ref, lr, timers)
                else:
                    up, pair, why = self._accept(cid, rnd, replies.get(cid), received,
                                                 down_ref, timers)
                if up is not None:
                    sent_up += len(up.payload)
                if why is not None:
                    faults[why] += 1
                elif up is not None:
                    with timers("aggregate"):
                        acc.add(pair, up.num_examples)
                    good.append({"client": up.client, "n": up.num_examples,
                                 "loss": up.train_loss, "activated": up.activated,
                                 "deactivated": up.deactivated,
                                 "kept": None if up.selection is None else
                                 {k: len(v) for k, v in up.selection.items()}})
                del up, pair
            if len(good) >= cfg.server.min_clients:
                break
            log.warning("round %d: only %d of %d updates usable (server.min_clients = %d); "
                        "sampling again", rnd, len(good), len(chosen), cfg.server.min_clients)
        else:
            raise RoundError(f"round {rnd}: fewer than server.min_clients = "
                               f"{cfg.server.min_clients} usable updates after "
                               f"{cfg.server.max_retries} retries; the last checkpoint holds "
                               "the model of the previous round")

        kept = [g["kept"] for g in good if g["kept"] is not None]
        activated = sum(g["activated"] for g in good)
        deactivated = sum(g["deactivated"] for g in good)
        with timers("aggregate"):
            # payloads are decoded and merged on the host (the C++ tiled merge); the mean
            # travels to the run's device once
            mean = acc.result(divisor=float(sum(g["n"] for g in good))).to(self.device)
            new = self.server.step(self.global_flat, mean, self.buffer_mask)
            new = self.sparsifier.after_aggregate(layout, new, kept, rnd)
        prunable = self.prunable_mask
        old_nz, new_nz = self.global_flat[prunable] != 0, new[prunable] != 0
        self.global_flat = new
        self.round = rnd
        if self.swa is not None and cycle_end(cfg, rnd):
            self.swa.collect(new)

        rec: dict[str, Any] = {
            "round": rnd, "lr": lr, "clients": [g["client"] for g in good],
            "train_loss": float(np.mean([g["loss"] for g in good])),
            "bytes_up": sent_up, "bytes_down": sent_down,
            "dense_bytes": 4 * layout.numel * contacted,
            "activated": activated / max(len(good), 1),
            "deactivated": deactivated / max(len(good), 1),
            "dropped": faults, "retries": attempt,
            "mask_growth": int((new_nz & ~old_nz).sum()),
        }
        if self.compute_choice:  # the last client's per-layer compute path
            rec["compute"] = compute_summary(self.compute_choice)
            rec["compute_layers"] = dict(self.compute_choice)
        if self.dense_layers:
            rec["dense_layers"] = dict(self.dense_layers)
        last = rnd == cfg.run.rounds
        if rnd % cfg.run.eval_every == 0 or last:
            with timers("eval"):
                rec.update(self.evaluate())
        p_every = cfg.personalization.every
        if cfg.personalization.method != "none" and (last or (p_every and rnd % p_every == 0)):
            with timers("personalize"):
                layout.load(self.model, self.global_flat)
                rec["personalized"] = personalized(
                    self.model, self.data.train_x, self.data.train_y, self.clients,
                    cfg.personalization, derive_seed(cfg.run.seed, 5, rnd))
        rec["time"] = timers.as_dict()
        rec["wall"] = time.perf_counter() - t_round
        return rec

    def evaluate(self) -> dict[str, Any]:
        self.layout.load(self.model, self.global_flat)
        acc, loss = evaluate(self.model, self.data.test_x, self.data.test_y)
        sp = layer_sparsity(self.model)
        n = self.layout.prunable_numel
        zeros = sum(s * e.numel for e, s in zip(self.layout.prunable_entries(), sp.values()))
        rec: dict[str, Any] = {"acc": acc, "loss": loss, "sparsity": zeros / n if n else 0.0,
                               "layer_sparsity": sp}
        avg = self.swa.average() if self.swa is not None else None
        if avg is not None:
            self.layout.load(self.model, avg)
            if has_batchnorm(self.model):
                recompute_bn(self.model, self.data.train_x[:4096])
            rec["swa_acc"], rec["swa_loss"] = evaluate(self.model, self.data.test_x,
                                                       self.data.test_y)
            self.layout.load(self.model, self.global_flat)
        return rec


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["round"] <= upto]


def run(cfg: flconfig.Config, run_dir: str | Path | None = None, *, resume: bool = False,
        progress: bool = True, dataset: fldata.Dataset | None = None,
        stop_after: int | None = None, remote: RemoteClients | None = None) -> History:
    """Run (or resume) a simulation; with run_dir, writes config.toml, metrics.jsonl and
    a checkpoint per round.  `stop_after` ends early after that round (tests, crashes);
    `remote` runs the clients elsewhere (see Simulation.step; sparsefl.flower uses it)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.decentralized.strategy != "none":
        from sparsefl.fl.decentralized import DecentralizedSimulation

        if remote is not None:
            raise ValueError("remote clients are for server-based runs, not decentralized ones")
        sim: Any = DecentralizedSimulation(cfg, dataset)
    else:
        sim = Simulation(cfg, dataset)
    history = History(cfg)
    out = Path(run_dir) if run_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        history.run_dir = out
        metrics_path = out / "metrics.jsonl"
        if resume:
            skipped: list[str] = []
            found = checkpoint.latest(out, skipped)
            for line in skipped:
                log.warning("sparsefl: skipped checkpoint %s", line)
            if found is not None and skipped:
                log.warning("sparsefl: resuming from round %d, the newest checkpoint that "
                            "verifies", found[0])
            if found is not None:
                rnd, tensors, _ = found
                sim.load_state(rnd, tensors)
            history.rounds = _read_metrics(metrics_path, sim.round)
        elif (out / "metrics.jsonl").exists():
            raise FileExistsError(f"{out} already holds a run; use --resume or a new directory")
        checkpoint.atomic_write(out / "config.toml", flconfig.dumps(cfg).encode())
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history.rounds))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.rounds, initial=sim.round, desc=cfg.run.name, unit="round",
                   dynamic_ncols=True)
    try:
        while sim.round < cfg.run.rounds:
            rec = sim.step(remote) if remote is not None else sim.step()
            history.rounds.append(rec)
            if out is not None:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                checkpoint.save(out, sim.round, sim.state(), {"config": flconfig.to_dict(cfg)},
                                keep=cfg.run.keep_checkpoints)
            if bar is not None:
                bar.update(1)
                if "acc" in rec:
                    bar.set_postfix(acc=f"{rec['acc']:.3f}", sparsity=f"{rec['sparsity']:.3f}",
                                    up_MB=f"{rec['bytes_up'] / 1e6:.2f}")
            if stop_after is not None and sim.round >= stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
    history.final = summarize(history.rounds)
    history.global_flat = sim.global_flat
    history.simulation = sim
    return history


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    if not rounds:
        return {}
    evals = [r for r in rounds if "acc" in r]
    last = evals[-1] if evals else {}
    tail = evals[-max(1, math.ceil(len(evals) / 10)):]  # mean over the last 10% of evals
    times: dict[str, float] = {}
    for r in rounds:
        for k, v in r["time"].items():
            times[k] = times.get(k, 0.0) + v
    out = {
        "rounds": rounds[-1]["round"],
        "acc": last.get("acc"), "acc_tail_mean": float(np.mean([r["acc"] for r in tail]))
        if tail else None,
        "best_acc": max((r["acc"] for r in evals), default=None),
        "sparsity": last.get("sparsity"),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "dense_bytes": sum(r["dense_bytes"] for r in rounds),
        "wall": sum(r["wall"] for r in rounds), "time": times,
    }
    if "swa_acc" in last:
        out["swa_acc"] = last["swa_acc"]
    dense = [r["dense_layers"] for r in rounds if "dense_layers" in r]
    if dense:  # client.compute = "sparse" asked, these ran dense (and why)
        out["dense_layers"] = dense[-1]
    pers = [r["personalized"] for r in rounds if "personalized" in r]
    if pers:
        out["personalized"] = pers[-1]
    return out
