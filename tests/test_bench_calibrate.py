"""`sparsefl bench calibrate`: drops this machine's "auto" records and re-times the cases
a config's first rounds meet."""

from __future__ import annotations

import json

import pytest

from sparsefl import _native
from sparsefl.bench import calibrate
from sparsefl.nn import sparse_compute as spc

pytestmark = pytest.mark.skipif(not _native.has_cpu_kernels(), reason="no C++ kernels")
SETS = ["data.clients=4", "server.clients_per_round=2", "client.epochs=1"]


def test_calibrate_retimes_and_records_for_this_machine(tmp_path, monkeypatch):
    cache = tmp_path / "auto.json"
    monkeypatch.setenv("SPARSEFL_AUTO_CACHE", str(cache))
    other = "('PowerpropLinear', (3, 3)) @ another CPU | AVX2 | 16 threads"
    cache.write_text(json.dumps({other: "dense"}))
    first = calibrate.run(None, SETS, rounds=2, threads=1)
    assert first["cases"] and first["dropped"] == 0
    table = json.loads(cache.read_text())
    mine = [k for k in table if k.endswith(" @ " + spc.machine_id())]
    assert len(mine) == len(first["cases"]) and table[other] == "dense"
    assert all(c["choice"] in ("sparse", "dense") and c["dense_ms"] > 0 and c["sparse_ms"] > 0
               for c in first["cases"])
    again = calibrate.run(None, SETS, rounds=2, threads=1)  # re-measured, not read back
    assert again["dropped"] == len(mine) and len(again["cases"]) == len(first["cases"])
    assert json.loads(cache.read_text())[other] == "dense"  # another machine's: kept
    assert "dense ms" in calibrate.table(again)


def test_calibrate_refuses_a_config_that_records_nothing():
    with pytest.raises(ValueError, match="only 'auto'"):
        calibrate.run(None, [*SETS, "client.compute=dense"], rounds=1, threads=1)
