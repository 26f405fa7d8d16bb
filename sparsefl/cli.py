"""Command line.

    sparsefl run [CONFIG.toml] [--set section.key=value ...] [--out DIR] [--resume RUN_DIR]
    sparsefl plot RUN_DIR
    sparsefl analyze RUN_DIR
    sparsefl info
    sparsefl bench sam|topk|aggregate|codec|round|scaling|sparse-train|all
    sparsefl bench round-cost CONFIG.toml [--set section.key=value ...] [--rounds N] [--pairs]
    sparsefl bench calibrate [CONFIG.toml] [--set ...] [--rounds N]   (re-time "auto")
"""

from __future__ import annotations

import argparse
import sys

import torch


def _info(_: argparse.Namespace) -> int:
    from sparsefl import __version__, _native
    from sparsefl.ops import _backend

    print(f"sparsefl {__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"  C++ CPU kernels : {'yes' if _native.has_cpu_kernels() else 'no'}"
          + (f" ({_native.LOAD_ERROR})" if _native.LOAD_ERROR else ""))
    print(f"  CUDA kernels    : {'yes' if _native.has_cuda_kernels() else 'no'}"
          f" (torch.cuda.is_available()={torch.cuda.is_available()})")
    why = _backend.triton_error(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"  Triton          : {'yes' if why is None else 'no (' + why + ')'}")
    print(f"  auto backend    : cpu -> {_backend.resolve('auto', [torch.empty(1)])}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sparsefl bench: --device cuda asked for, but torch sees no GPU", file=sys.stderr)
        return 2
    from sparsefl.bench import sam, sparse

    if args.what == "scaling":
        from sparsefl.bench import scaling

        print(scaling.main(args.out, quick=args.quick, threads=args.threads))
        return 0
    if args.what == "sparse-train":
        from sparsefl.bench import sparse_train

        print(sparse_train.run(rounds=args.rounds if args.rounds != 30 else 5, quick=args.quick,
                               out_dir=args.out))
        return 0
    if args.what == "calibrate":
        from sparsefl.bench import calibrate

        try:
            print(calibrate.main(args.config, args.set,
                                 args.rounds if args.rounds != 30 else 2, args.threads))
        except (ValueError, *fl_errors()) as e:
            print(f"sparsefl bench calibrate: {e}", file=sys.stderr)
            return 2
        return 0
    if args.what == "round-cost":
        from sparsefl.bench import round_cost

        try:
            print(round_cost.main(args.config, args.set, max(1, args.rounds if args.rounds != 30
                                                              else 3),
                                  args.warmup, args.threads, args.out, pairs=args.pairs))
        except (ValueError, *fl_errors()) as e:
            print(f"sparsefl bench round-cost: {e}", file=sys.stderr)
            return 2
        return 0
    if args.what == "round":
        from sparsefl.bench import round as round_bench

        print(round_bench.main(args.model, args.clients, args.per_client,
                               max(1, args.rounds if args.rounds != 30 else 2), args.threads,
                               args.out, device=args.device))
        return 0
    for what in (["sam", "topk", "aggregate", "codec"] if args.what == "all" else [args.what]):
        if what == "sam":
            print(sam.run(rounds=args.rounds, device=args.device, backend=args.backend))
        else:
            print(sparse.run(what, rounds=max(3, args.rounds // 3), device=args.device,
                             backend=args.backend))
        print()
    return 0


def fl_errors() -> tuple[type[BaseException], ...]:
    """The errors a bad config or missing data raise (a clear message, not a traceback)."""
    from sparsefl import fl
    from sparsefl.errors import UserError

    return (fl.ConfigError, UserError, FileNotFoundError)


def _run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from sparsefl import fl
    from sparsefl.errors import RoundError, UserError
    from sparsefl.fl import report

    try:
        if args.resume:
            if args.config or args.set:
                print("sparsefl run: --resume takes the run's own config.toml; drop CONFIG "
                      "and --set", file=sys.stderr)
                return 2
            run_dir = Path(args.resume)
            if not (run_dir / "config.toml").is_file():
                print(f"sparsefl run: {run_dir} has no config.toml to resume from",
                      file=sys.stderr)
                return 2
            cfg = fl.load(run_dir / "config.toml")
        else:
            cfg = fl.load(args.config, args.set)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path(args.out) if args.out else Path("runs") / (
                f"{cfg.run.name}-seed{cfg.run.seed}-{stamp}")
        history = fl.run(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet)
    except fl.ConfigError as e:
        print(f"sparsefl run: bad config: {e}", file=sys.stderr)
        return 2
    except (UserError, FileNotFoundError, FileExistsError) as e:
        print(f"sparsefl run: {e}", file=sys.stderr)
        return 2
    except RoundError as e:  # the run stopped (diverged): its checkpoints stay resumable
        print(f"sparsefl run: stopped: {e}", file=sys.stderr)
        return 3
    print(report.summary_table(history.final, cfg.run.name))
    (run_dir / "summary.json").write_text(__import__("json").dumps(history.final, indent=1))
    if not args.no_plot:
        paths = report.plot(run_dir)
        print(f"plots: {', '.join(str(p) for p in paths)}")
    print(f"run directory: {run_dir}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from sparsefl.fl import report

    try:
        paths = report.plot(args.run_dir)
    except FileNotFoundError as e:
        print(f"sparsefl plot: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import json

    from sparsefl.analysis.runs import analyze_run
    from sparsefl.errors import UserError

    try:
        out = analyze_run(args.run_dir, examples=args.examples, samples=args.samples)
    except (UserError, FileNotFoundError) as e:
        print(f"sparsefl analyze: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsefl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated simulation from a config file")
    run.add_argument("config", nargs="?", help="TOML config (default: SparsyFed 90%% on digits)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value (repeatable), e.g. --set client.lr=0.05")
    run.add_argument("--out", help="run directory (default runs/<name>-seed<seed>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--no-plot", action="store_true", help="do not write PNG plots")
    run.set_defaults(func=_run)
    plot = sub.add_parser("plot", help="write accuracy/sparsity/bytes PNGs of a run")
    plot.add_argument("run_dir")
    plot.set_defaults(func=_plot)
    analyze = sub.add_parser("analyze", help="Hessian top eigenvalue and trace of a run's "
                             "global (and SWA) model -> RUN_DIR/analysis.json")
    analyze.add_argument("run_dir")
    analyze.add_argument("--examples", type=int, default=1000,
                         help="training examples in the fixed subset (default 1000)")
    analyze.add_argument("--samples", type=int, default=20,
                         help="Hutchinson samples for the trace (default 20)")
    analyze.set_defaults(func=_analyze)
    sub.add_parser("info", help="which kernels and backends this install has").set_defaults(
        func=_info)
    bench = sub.add_parser("bench", help="run a kernel benchmark and print its table")
    bench.add_argument("what", choices=["sam", "topk", "aggregate", "codec", "round",
                                        "round-cost", "scaling", "sparse-train", "calibrate",
                                        "all"],
                       help="sam: SAM/ASAM perturb+restore; topk: global top-k mask; "
                            "aggregate: sparse aggregation; codec: payload sizes; round: one "
                            "SparsyFed+FedSAM round, engine vs eager, per phase; round-cost "
                            "CONFIG: rounds of a config vs the same with plain torch layers "
                            "(sparsity.method=none), per phase; sparse-train: "
                            "Powerprop layers and client steps, dense vs sparse vs auto; "
                            "calibrate [CONFIG]: drop this machine's recorded 'auto' "
                            "decisions and re-time the cases the config's first rounds meet")
    bench.add_argument("config", nargs="?",
                       help="round-cost, calibrate: the TOML config to measure")
    bench.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="round-cost, calibrate: override one config value (repeatable)")
    bench.add_argument("--warmup", type=int, default=1,
                       help="round-cost: untimed rounds first (default 1)")
    bench.add_argument("--pairs", action="store_true",
                       help="round-cost: interleave per client, not per round: --rounds "
                            "passes over the clients of the round after the warm-up, each "
                            "client trained for both configs back to back (steadier on a "
                            "shared machine)")
    bench.add_argument("--rounds", type=int, default=30,
                       help="timed rounds (default 30; round: 2, round-cost: 3, "
                            "calibrate: 2)")
    bench.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--backend", default=None,
                       choices=["auto", "cpp", "cuda", "triton", "reference"])
    bench.add_argument("--model", default="mlp", choices=["mlp", "lenet5", "resnet18"],
                       help="round: the model (default mlp)")
    bench.add_argument("--clients", type=int, default=10, help="round: clients (default 10)")
    bench.add_argument("--per-client", type=int, default=64,
                       help="round: training examples per client (default 64)")
    bench.add_argument("--out", help="round/round-cost/scaling: directory for the JSON, "
                       "markdown and PNG")
    bench.add_argument("--quick", action="store_true",
                       help="scaling: small sizes, a minute-scale smoke run")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
