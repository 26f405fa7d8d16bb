"""`sparsefl bench calibrate CONFIG`: re-measure what client.compute = "auto" decides.

"auto" times each sparse layer case (shape, input, density bucket) once per machine --
CPU model, kernel ISA, thread count -- and records the choice, so every later process
(a resumed run, a Flower node) takes the same path.  After a CPU or a kernel change, or
to see the timings behind the choices, this drops this machine's records and runs the
config's first rounds (round 1 trains the dense initial model; round 2 meets the sparse
supports a run meets), so every case the run meets is timed again and recorded; then it
prints each case with its dense and sparse times.  Evaluation is off; nothing is saved
but the decisions.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsefl import data as fldata
from sparsefl import fl, machine
from sparsefl.fl.engine import Simulation


def run(config: str | None, overrides: list[str] | None = None, rounds: int = 2,
        threads: int = 2) -> dict[str, Any]:
    if rounds < 1:
        raise ValueError(f"calibrate: need rounds >= 1, got {rounds}")
    if threads:
        torch.set_num_threads(threads)
    from sparsefl.nn import sparse_compute as spc

    cfg = fl.load(config, [*(overrides or []), f"run.rounds={rounds}",
                           "run.eval_every=1000000"])
    if cfg.client.compute != "auto":
        raise ValueError(f"calibrate: the config's client.compute is "
                         f"{cfg.client.compute!r}; only 'auto' records decisions")
    dropped = spc.forget_decisions()
    sim = Simulation(cfg, fldata.load(cfg.data.name, cfg.data.dir or None))
    for r in range(rounds):
        sim.step()
        print(f"  round {r + 1}/{rounds}: {len(spc.AUTO_TIMINGS)} cases timed", flush=True)
    cases = [{"case": repr(k[:-1]), "dense_ms": 1e3 * td, "sparse_ms": 1e3 * ts,
              "choice": spc._AUTO_CACHE.get(k, "?")}
             for k, (td, ts) in spc.AUTO_TIMINGS.items()]
    return {"config": str(config) if config else "(default)", "dropped": dropped,
            "machine": spc.machine_id(), "cache": str(spc.auto_cache_path()),
            "cases": cases}


def table(res: dict[str, Any]) -> str:
    lines = [f"auto decisions re-measured for {res['machine']} "
             f"({machine.line()}); {res['dropped']} old record(s) dropped; "
             f"cache: {res['cache']}", "",
             "| layer case | dense ms | sparse ms | choice |", "|---|---:|---:|---|"]
    for c in res["cases"]:
        lines.append(f"| `{c['case']}` | {c['dense_ms']:.3f} | {c['sparse_ms']:.3f} | "
                     f"{c['choice']} |")
    if not res["cases"]:
        lines.append("| (no sparse layer met: the config trains no Powerprop model) | | | |")
    return "\n".join(lines)


def main(config: str | None, overrides: list[str], rounds: int, threads: int) -> str:
    return table(run(config, overrides, rounds, threads))
