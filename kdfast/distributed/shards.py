"""Rankings written one file per rank, read back as one (memory-mapped).

A sharded ranking is a directory:

    index.json                         {"format": "kdfast-sharded-ranking", "version": 1,
                                        "world": W, "arrays": {name: {"shape": [n_rows, k],
                                        "dtype": "float32", "shards": [{"rank": r, "file": ...,
                                        "rows": [start, stop]}, ...]}}}
    values.rank00000-of-00002.npy      a plain .npy (np.load(..., mmap_mode="r") reads it)
    indices.rank00000-of-00002.npy     ...

The names follow the one-process `kdfast topk` .npz ("values", "indices", and with --item-side
"item_values", "item_indices"); each array's shards cover its rows in order, without gaps. Every
rank writes its own rows into a memory-mapped file (no rank holds more than its block), and rank 0
writes index.json last, after every rank has closed its files: a directory with index.json is
complete.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

FORMAT = "kdfast-sharded-ranking"
INDEX = "index.json"


def shard_file(name: str, rank: int, world: int) -> str:
    return f"{name}.rank{rank:05d}-of-{world:05d}.npy"


class ShardWriter:
    """This rank's part of a sharded ranking in directory `path` (created).

        w = ShardWriter(path, rank, world)
        vals = w.array("values", row_start, n_local, n_rows, k, np.float32)  # a writable memmap
        ... fill vals[i0:i1] batch by batch ...
        w.finish(group)   # every rank; rank 0 then writes index.json

    Every rank must open the same array names in the same order."""

    def __init__(self, path, rank: int, world: int):
        if not 0 <= int(rank) < int(world):
            raise ValueError(f"rank must be in [0, world = {world}), got {rank}")
        self.path, self.rank, self.world = str(path), int(rank), int(world)
        os.makedirs(self.path, exist_ok=True)
        self.arrays = []  # (name, row_start, n_local, n_rows, k, dtype, memmap)

    def array(self, name, row_start, n_local, n_rows, k, dtype):
        file = os.path.join(self.path, shard_file(name, self.rank, self.world))
        mm = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=(int(n_local), int(k)))
        self.arrays.append(
            (name, int(row_start), int(n_local), int(n_rows), int(k), np.dtype(dtype).name, mm)
        )
        return mm

    def finish(self, group=None):
        """Flush and close this rank's files, then (rank 0) write index.json from every rank's row
        ranges; a collective: every rank calls it."""
        from ._comm import Comm

        for *_, mm in self.arrays:
            mm.flush()
        spans = torch.tensor([[a[1], a[2]] for a in self.arrays], dtype=torch.int64).reshape(-1, 2)
        comm = Comm(group, torch.device("cpu"), "kdfast.distributed.ShardWriter.finish")
        err = None
        if comm.world != self.world:
            err = ValueError(
                f"world: the writer says {self.world} ranks, the group has {comm.world}"
            )
        comm.agree(err)
        every = comm.all_gather(spans).cpu()  # [world, n_arrays, 2]
        self.arrays = [a[:6] + (None,) for a in self.arrays]  # drop the memmaps (closes them)
        if self.rank == 0:
            self._write_index(every)
        comm.agree(None)  # the index is written before any rank goes on

    def _write_index(self, every):
        arrays = {}
        for j, (name, _, _, n_rows, k, dtype, _) in enumerate(self.arrays):
            shards = [
                {
                    "rank": r,
                    "file": shard_file(name, r, self.world),
                    "rows": [int(every[r, j, 0]), int(every[r, j, 0] + every[r, j, 1])],
                }
                for r in range(self.world)
            ]
            arrays[name] = {"shape": [n_rows, k], "dtype": dtype, "shards": shards}
        index = {"format": FORMAT, "version": 1, "world": self.world, "arrays": arrays}
        tmp = os.path.join(self.path, INDEX + ".tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(tmp, os.path.join(self.path, INDEX))


class ShardedArray:
    """One [n_rows, k] array stored as row blocks in several memory-mapped .npy files. Indexing
    by rows (an int, a slice, an integer array) reads only the rows asked for; np.asarray(a) reads
    everything into one array."""

    def __init__(self, shards, shape, dtype):
        self.shards = shards  # [(start, stop, memmap)]
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._starts = np.array([s for s, _, _ in shards], dtype=np.int64)

    ndim = property(lambda self: len(self.shape))

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((rows.size, self.shape[1]), dtype=self.dtype)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        for j in np.unique(which):
            sel = which == j
            start, _, mm = self.shards[j]
            out[sel] = mm[rows[sel] - start]
        return out

    def __getitem__(self, key):
        cols = slice(None)
        if isinstance(key, tuple):
            key, cols = key[0], key[1:] if len(key) > 2 else key[1]
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self._rows(np.array([i]))[0][cols]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                parts = [
                    mm[max(start, s) - s : min(stop, e) - s]
                    for s, e, mm in self.shards
                    if min(stop, e) > max(start, s)
                ]
                out = np.concatenate(parts) if parts else np.empty((0, self.shape[1]), self.dtype)
                return out[:, cols]
            rows = np.arange(start, stop, step)
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                rows = np.nonzero(rows)[0]
            rows = np.where(rows < 0, rows + n, rows).astype(np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"row ids out of range for {n} rows")
        return self._rows(rows.reshape(-1)).reshape(*rows.shape, self.shape[1])[..., cols]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def load_rankings(path) -> dict:
    """A sharded ranking directory (written by `kdfast topk` under torchrun, or ShardWriter) as
    {name: ShardedArray} with the names of the one-process .npz ("values", "indices", ...), each
    array memory-mapped shard by shard. Raises ValueError for a directory without a complete
    index or shards that do not match it."""
    path = str(path)
    idx_file = os.path.join(path, INDEX)
    if not os.path.isfile(idx_file):
        raise ValueError(
            f"path: {path} has no {INDEX} (not a sharded ranking, or its writing did not finish)"
        )
    with open(idx_file) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"path: {idx_file} is not a {FORMAT} index")
    out = {}
    for name, spec in index["arrays"].items():
        n_rows, k = spec["shape"]
        shards, expect = [], 0
        for s in spec["shards"]:
            start, stop = s["rows"]
            if start != expect:
                raise ValueError(
                    f"path: {name} shard {s['file']} starts at row {start}, not {expect}"
                )
            mm = np.load(os.path.join(path, s["file"]), mmap_mode="r")
            if mm.shape != (stop - start, k):
                raise ValueError(
                    f"path: {s['file']} has shape {mm.shape}, the index says {(stop - start, k)}"
                )
            shards.append((start, stop, mm))
            expect = stop
        if expect != n_rows:
            raise ValueError(f"path: the shards of {name} cover {expect} of its {n_rows} rows")
        dtype = spec.get("dtype") or (shards[0][2].dtype if shards else "float32")
        out[name] = ShardedArray(shards, (n_rows, k), dtype)
    return out
