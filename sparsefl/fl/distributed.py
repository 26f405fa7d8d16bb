"""Decentralized training with one process per agent (torch.distributed, gloo on CPU).

Every rank builds the same DecentralizedSimulation (same data, partition and initial
model, all derived from the seed) and then computes only its own agent's iterate.  Per
iteration each rank encodes what it shares (diffusion: psi_k; consensus: w_k) with
sparsefl.codec; the byte strings are exchanged with two all_gathers (lengths, then the
bytes padded to the longest) — no pickle, no object collectives — and each rank decodes
its neighbours' payloads and combines them with the same `ops.sparse_aggregate` call as
the in-process mode, so both modes give the same iterates (tested).

    run_distributed(cfg, out_dir)        # spawns cfg.data.clients processes
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from sparsefl.fl import config as flconfig
from sparsefl.fl import wire


def _all_gather_bytes(payload: bytes, world: int) -> list[bytes]:
    n = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(bufs, buf)
    return [bytes(b[:int(s.item())].numpy()) for b, s in zip(bufs, sizes)]


def _agent(rank: int, world: int, cfg_text: str, init_file: str, out_dir: str) -> None:
    import tomllib

    from sparsefl.fl.decentralized import DecentralizedSimulation

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = flconfig.from_dict(tomllib.loads(cfg_text))
        sim = DecentralizedSimulation(cfg)
        mu, layout = cfg.client.lr, sim.layout
        sent = 0
        for rnd in range(1, cfg.run.rounds + 1):
            after, g, _ = sim._grad(sim.w[rank], rank, rnd)
            share = after - mu * g if sim.strategy == "diffusion" else after
            payload = wire.encode(wire.chunks_from_flat(layout, share))
            sent += len(payload) * int(sim.adj[rank].sum())
            payloads = _all_gather_bytes(payload, world)
            pairs = [wire.to_flat_pair(layout, wire.decode(layout, p))
                     if (j == rank or sim.adj[j, rank]) else None
                     for j, p in enumerate(payloads)]
            base = None if sim.strategy == "diffusion" else -mu * g
            sim.w[rank] = sim._combine(pairs, rank, base)
        save_file({"w": sim.w[rank].contiguous(), "bytes_sent": torch.tensor(sent)},
                  str(Path(out_dir) / f"agent-{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def run_distributed(cfg: flconfig.Config, out_dir: str | Path) -> torch.Tensor:
    """Run cfg (diffusion or consensus) with one process per agent; returns the agents'
    final iterates stacked (K, n), also saved as out_dir/agent-<k>.safetensors."""
    if cfg.decentralized.strategy not in ("diffusion", "consensus"):
        raise flconfig.ConfigError("decentralized.strategy: the multi-process mode runs "
                                   "diffusion or consensus")
    if cfg.decentralized.density < 1.0:
        raise flconfig.ConfigError("decentralized.density: the multi-process mode exchanges "
                                   "dense vectors; compressed exchange runs in-process")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = cfg.data.clients
    fd, init_file = tempfile.mkstemp(prefix="sparsefl-gloo-")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    try:
        mp.start_processes(_agent, args=(world, flconfig.dumps(cfg), init_file, str(out)),
                           nprocs=world, join=True, start_method="spawn")
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)
    from safetensors.torch import load_file

    return torch.stack([load_file(str(out / f"agent-{k}.safetensors"))["w"]
                        for k in range(world)])
