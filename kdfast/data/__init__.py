"""Data sets, loaders and splits: kdfast.data.load("synthetic" | "citeulike-t" | path, k_core=None)
-> Interactions (with timestamps when the file has them), kdfast.data.make_split(data, "loo" |
"full", seed=0, order="random" | "temporal") -> Split, export_split / read_split (a split as a CSV
of the original ids)."""

from .datasets import (
    CITEULIKE_SHA256,
    CITEULIKE_URL,
    Interactions,
    citeulike_path,
    from_pairs,
    load,
    load_citeulike,
    load_movielens,
    load_pairs,
    load_users_dat,
    read_users_dat,
    synthetic,
)
from .splits import (
    ORDERS,
    PROTOCOLS,
    Split,
    export_split,
    leave_last_out,
    leave_one_out,
    make_split,
    random_split,
    read_split,
    temporal_split,
)

__all__ = [
    "CITEULIKE_SHA256",
    "CITEULIKE_URL",
    "ORDERS",
    "PROTOCOLS",
    "Interactions",
    "Split",
    "citeulike_path",
    "export_split",
    "from_pairs",
    "leave_last_out",
    "leave_one_out",
    "load",
    "load_citeulike",
    "load_movielens",
    "load_pairs",
    "load_users_dat",
    "make_split",
    "random_split",
    "read_split",
    "read_users_dat",
    "synthetic",
    "temporal_split",
]
