"""Federated learning engine: config -> rounds -> History (see engine.py for a round)."""

from sparsefl.fl.config import Config, ConfigError, load
from sparsefl.fl.engine import History, Simulation, run

__all__ = ["Config", "ConfigError", "History", "Simulation", "load", "run"]
