"""Datasets from local files and seeded client partitions."""

from sparsefl.data.partition import METHODS, ClientData, partition
from sparsefl.data.sources import NAMES, Dataset, load, read_idx, subset

__all__ = ["METHODS", "NAMES", "ClientData", "Dataset", "load", "partition", "read_idx", "subset"]
