"""Turn a pytest-benchmark JSON file into the markdown table used in docs/benchmarks.md.

    python bench/report.py results.json
"""

from __future__ import annotations

import json
import sys

from sparsefl.bench.report import Workload, report
from sparsefl.bench.timing import Timing


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    results, workloads = {}, []
    for b in data["benchmarks"]:
        s, info = b["stats"], b["extra_info"]
        results[b["param"]] = Timing(s["median"], s["min"], s["iqr"], s["rounds"])
        workloads.append(Workload(b["param"], lambda: None, info.get("bytes_moved"),
                                  info.get("baseline")))
    numel = data["benchmarks"][0]["extra_info"]["numel"]
    print(report(results, workloads, numel, "copy (x.copy_)"))


if __name__ == "__main__":
    main(sys.argv[1])
