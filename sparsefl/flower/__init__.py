"""Flower integration (optional extra: `pip install sparsefl[flower]`).

    from sparsefl.flower import client_app, server_app          # sparsefl's engine on Flower
    from sparsefl.flower import sparse_mod, SparseStrategy      # sparse updates, any app

`server_app(cfg)` / `client_app(cfg)` build a Flower ServerApp / ClientApp that run the
simulator's rounds with the clients on Flower nodes (see sparsefl/flower/app.py);
`sparsefl.flower.app:serverapp` / `:clientapp` are the same, configured from the run
config, for `flwr run` (examples/flower).
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("sparsefl.flower needs Flower: pip install 'sparsefl[flower]' "
                      "(flwr>=1.41,<2)") from e

from sparsefl.flower.app import FlowerClients, client_app, config_from_run, server_app
from sparsefl.flower.sparse import SparseStrategy, sparse_mod

__all__ = ["FlowerClients", "SparseStrategy", "client_app", "config_from_run", "server_app",
           "sparse_mod"]
