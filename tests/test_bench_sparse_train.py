"""`sparsefl bench sparse-train` tables: the headline ratio is against plain torch (what a
user would otherwise run), next to the Powerprop dense path's."""

from __future__ import annotations

from sparsefl.bench import sparse_train


def _cells(table: str) -> tuple[list[str], list[str]]:
    head, _, row = table.splitlines()[:3]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return split(head), split(row)


def test_step_table_leads_with_plain_torch():
    row = {"model": "ResNet-18 w8", "batch": 16, "density": 0.05, "plain_ms": 30.0,
           "dense_ms": 40.0, "sparse_ms": 15.0, "keep_ms": 12.0, "auto_ms": 20.0,
           "auto_sparse_layers": 18, "layers": 21}
    head, cells = _cells(sparse_train._fmt_steps([row]))
    assert head[8] == "**sparse vs plain**" and cells[8] == "2.00x"
    assert head[9] == "auto vs plain" and cells[9] == "1.50x"
    assert head[10] == "sparse vs dense" and cells[10] == "2.67x"


def test_layer_table_leads_with_plain_torch():
    row = {"layer": "64->64 3x3 @32", "density": 0.05, "plain_ms": 9.0, "dense_ms": 12.0,
           "sparse_ms": 3.0, "auto_ms": 3.0, "auto_choice": "sparse", "dense_gflop": 1.2,
           "sparse_gflop": 0.06}
    head, cells = _cells(sparse_train._fmt_layers([row]))
    assert head[6] == "**sparse vs plain**" and cells[6] == "3.00x"
    assert head[7] == "sparse vs dense" and cells[7] == "4.00x"
