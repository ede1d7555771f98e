"""Data sets, loaders and splits: kdfast.data.load("synthetic" | "citeulike-t" | path) ->
Interactions, kdfast.data.make_split(data, "loo" | "full", seed=0) -> Split."""

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
from .splits import Split, leave_one_out, make_split, random_split

__all__ = [
    "CITEULIKE_SHA256",
    "CITEULIKE_URL",
    "Interactions",
    "Split",
    "citeulike_path",
    "from_pairs",
    "leave_one_out",
    "load",
    "load_citeulike",
    "load_movielens",
    "load_pairs",
    "load_users_dat",
    "make_split",
    "random_split",
    "read_users_dat",
    "synthetic",
]
