"""The train phase of one round, a config against its plain-torch twin, interleaved per
client (issue #25 item 1, on a noisy VM): now `sparsefl bench round-cost --pairs`; this
script keeps the command the sixth session's table in docs/benchmarks.md was made with.

    python scripts/bench_train_pairs.py configs/fmnist-resnet/sparsyfed-95.toml \
        --set model.width=16 [--round 3] [--passes 2]

is `sparsefl bench round-cost CONFIG --set ... --pairs --warmup ROUND-1 --rounds PASSES`
(see sparsefl/bench/round_cost.py).
"""

from __future__ import annotations

import argparse

from sparsefl.bench import round_cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--round", type=int, default=3, help="the round whose clients are timed")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.round < 1 or a.passes < 1:
        raise SystemExit("--round and --passes must be >= 1")
    res = round_cost.run(a.config, [*a.sets, "run.eval_every=100000"], rounds=a.passes,
                         warmup=a.round - 1, threads=a.threads, pairs=True)
    print(round_cost.table(res))


if __name__ == "__main__":
    main()
