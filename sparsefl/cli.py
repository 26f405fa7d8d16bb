"""Command line: `sparsefl info`, `sparsefl bench sam|topk|aggregate|codec|all`."""

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

    for what in (["sam", "topk", "aggregate", "codec"] if args.what == "all" else [args.what]):
        if what == "sam":
            print(sam.run(rounds=args.rounds, device=args.device, backend=args.backend))
        else:
            print(sparse.run(what, rounds=max(3, args.rounds // 3)))
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsefl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which kernels and backends this install has").set_defaults(
        func=_info)
    bench = sub.add_parser("bench", help="run a kernel benchmark and print its table")
    bench.add_argument("what", choices=["sam", "topk", "aggregate", "codec", "all"],
                       help="sam: SAM/ASAM perturb+restore; topk: global top-k mask; "
                            "aggregate: sparse aggregation; codec: payload sizes")
    bench.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    bench.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--backend", default=None,
                       choices=["auto", "cpp", "cuda", "triton", "reference"])
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
