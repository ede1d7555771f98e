"""`kdfast topk`: each query's top-k keys (a teacher's ranking) from embedding files, written to
.npz.

    kdfast topk --queries users.npy --keys items.npy -k 100 --exclude users.dat --out top.npz
    kdfast topk --demo 20000 100000 64 -k 100 --out top.npz      # random embeddings, no files
    needed

The .npz holds values [n_q, k] float32 and indices [n_q, k] int64 (index -1 / value -inf where a
query has fewer than k non-excluded keys); with --item-side also item_values / item_indices [n_k,
k]: each key's top-k queries, excluding the transposed exclusion lists (e.g. an item's top users).

Under torchrun (one process per GPU or per CPU share) the work is split among the ranks and --out
names a directory of shards: each rank writes the rows it owns to its own memory-mapped .npy files,
and rank 0 writes index.json naming them (kdfast.distributed.load_rankings reads them back as one
ranking; docs/DISTRIBUTED.md):

    torchrun --standalone --nproc-per-node 2 -m kdfast.cli topk --demo 20000 100000 64 -k 100 \
        --layout keys --out top_shards
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch

from .errors import UsageError


def add_arguments(p):
    src = p.add_argument_group("input")
    src.add_argument(
        "--queries", metavar="Q", help="query embeddings [n_q, d]: .npy or .pt (a tensor)"
    )
    src.add_argument("--keys", metavar="K", help="key embeddings [n_k, d]: .npy or .pt")
    src.add_argument(
        "--demo",
        nargs=3,
        type=int,
        metavar=("N_Q", "N_K", "D"),
        help="use random N(0, 1) embeddings of this size instead of files",
    )
    src.add_argument("--seed", type=int, default=0, help="seed for --demo (default 0)")
    src.add_argument(
        "--exclude",
        metavar="X",
        help="keys each query must not get: a scipy.sparse .npz (rows = queries), an .npz with "
        "'indptr' and 'indices', or a users.dat text file (line r: 'count id id ...', "
        "'0' for none)",
    )
    p.add_argument("-k", "--k", type=int, default=100, help="keys per query (default 100)")
    p.add_argument(
        "--item-side",
        action="store_true",
        help="also each key's top-k queries (transposed exclusions)",
    )
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "numba", "triton"))
    p.add_argument(
        "--device", default="cpu", help="torch device for the computation (default cpu; e.g. cuda)"
    )
    p.add_argument("--batch", type=int, default=4096, help="query rows per call (default 4096)")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's setting)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--out",
        required=True,
        help="output .npz (under torchrun: a directory of shards, created)",
    )
    dist = p.add_argument_group("under torchrun (docs/DISTRIBUTED.md)")
    dist.add_argument(
        "--layout",
        default="queries",
        choices=("queries", "keys"),
        help="queries: each rank ranks its block of queries against all keys; keys: each rank also "
        "holds only its block of keys and the partial lists are merged (default queries)",
    )
    dist.add_argument(
        "--dist-backend",
        default="auto",
        choices=("auto", "nccl", "gloo"),
        help="process-group backend (default: nccl for a CUDA --device, gloo otherwise)",
    )
    dist.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds a rank waits in a collective for the others before it fails "
        "(default kdfast.distributed.DEFAULT_TIMEOUT_S = 300)",
    )


def load_embeddings(path: str, name: str, mmap: bool = False):
    """A 2-D floating tensor from .npy or .pt (mmap: a .npy as a read-only numpy memmap, so that a
    rank reads only its rows)."""
    if not os.path.isfile(path):
        raise UsageError(f"--{name}: file not found: {path}")
    try:
        if path.endswith(".npy") and mmap:
            x = np.load(path, allow_pickle=False, mmap_mode="r")
            if x.ndim != 2:
                raise UsageError(
                    f"--{name}: expected a 2-D array [rows, d], got shape {tuple(x.shape)} in "
                    f"{path}"
                )
            if x.dtype.kind != "f":
                raise UsageError(
                    f"--{name}: expected floating-point embeddings, got {x.dtype} in {path}"
                )
            return x
        if path.endswith(".npy"):
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.endswith(".pt"):
            x = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UsageError(f"--{name}: expected a .npy or .pt file, got {path}")
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise UsageError(f"--{name}: cannot read {path}: {exc}") from None
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"--{name}: {path} must hold one tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise UsageError(
            f"--{name}: expected a 2-D array [rows, d], got shape {tuple(x.shape)} in {path}"
        )
    if not x.dtype.is_floating_point:
        raise UsageError(f"--{name}: expected floating-point embeddings, got {x.dtype} in {path}")
    return x


def load_exclude(path: str, n_q: int, n_k: int):
    import kdfast

    if not os.path.isfile(path):
        raise UsageError(f"--exclude: file not found: {path}")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                if "indptr" in z.files and "indices" in z.files and "format" not in z.files:
                    obj = (z["indptr"], z["indices"])
                else:
                    import scipy.sparse

                    obj = scipy.sparse.load_npz(path)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"--exclude: cannot read {path}: {exc}") from None
    else:
        from ..data import read_users_dat

        try:
            obj = read_users_dat(path)
        except ValueError as exc:
            raise UsageError(f"--exclude: {exc}") from None
    n_rows = (len(obj[0]) - 1) if isinstance(obj, tuple) else obj.shape[0]
    if n_rows != n_q:
        raise UsageError(f"--exclude: {path} has {n_rows} rows but there are {n_q} queries")
    try:
        return kdfast.as_csr(obj, "exclude", n_q, n_k, validate=True)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--exclude: {exc}") from None


def _slice_csr(indptr, indices, r0, r1):
    lo, hi = int(indptr[r0]), int(indptr[r1])
    return indptr[r0 : r1 + 1] - lo, indices[lo:hi]


def _ranked(queries, keys, k, csr, args, bar):
    """Top-k over all query rows, batch by batch."""
    import kdfast

    n_q = queries.shape[0]
    values = np.empty((n_q, k), dtype=np.float32)
    index = np.empty((n_q, k), dtype=np.int64)
    dev = torch.device(args.device)
    keys_dev = keys.to(dev)
    for r0 in range(0, n_q, args.batch):
        r1 = min(n_q, r0 + args.batch)
        excl = None if csr is None else tuple(t.to(dev) for t in _slice_csr(*csr, r0, r1))
        v, i = kdfast.topk_scores(
            queries[r0:r1].to(dev), keys_dev, k, exclude=excl, backend=args.backend
        )
        values[r0:r1], index[r0:r1] = v.cpu().numpy(), i.cpu().numpy()
        bar.update(1)
    return values, index


def run(args) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:  # from kdfast on the given data
        raise UsageError(str(exc)) from None


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (torch.distributed.run), which sets these."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    )


def _run(args) -> int:
    if under_torchrun():
        return _run_distributed(args)
    from tqdm import tqdm

    queries, keys, csr = _load_inputs(args, mmap=False)
    n_q, n_k = queries.shape[0], keys.shape[0]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out: directory does not exist: {out_dir}")
    n_batches = math.ceil(n_q / args.batch) + (math.ceil(n_k / args.batch) if args.item_side else 0)
    result = {}
    with tqdm(
        total=n_batches, desc="top-k batches", unit="batch", disable=args.quiet, file=sys.stderr
    ) as bar:
        result["values"], result["indices"] = _ranked(queries, keys, args.k, csr, args, bar)
        if args.item_side:
            import kdfast

            t_csr = None if csr is None else kdfast.transpose_csr(csr, n_k, n_q)
            result["item_values"], result["item_indices"] = _ranked(
                keys, queries, args.k, t_csr, args, bar
            )
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # what np.savez writes
    np.savez(out, **result)
    if not args.quiet:
        print(
            f"wrote {out}: top-{args.k} of {n_k} keys for {n_q} queries"
            + (f" and top-{args.k} of {n_q} queries for {n_k} keys" if args.item_side else ""),
            file=sys.stderr,
        )
    return 0


# ------------------------------------------------------------------------------------ torchrun
def _rows(x, r0, r1) -> torch.Tensor:
    """Rows r0..r1 of a tensor or a numpy memmap, as a contiguous tensor."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x[r0:r1]))  # a copy: memmaps are read-only
    return x[r0:r1].contiguous()


def _load_inputs(args, *, mmap: bool):
    """(queries, keys, exclusion CSR or None) of the command line, checked: --demo tensors, or the
    --queries/--keys files (.npy memory-mapped when mmap)."""
    if args.k < 1:
        raise UsageError(f"-k must be >= 1, got {args.k}")
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.demo:
        if args.queries or args.keys:
            raise UsageError("give either --demo or --queries/--keys, not both")
        n_q, n_k, d = args.demo
        if min(n_q, n_k, d) < 1:
            raise UsageError(f"--demo sizes must be >= 1, got {n_q} {n_k} {d}")
        gen = torch.Generator().manual_seed(args.seed)
        queries, keys = torch.randn(n_q, d, generator=gen), torch.randn(n_k, d, generator=gen)
    else:
        if not (args.queries and args.keys):
            raise UsageError("give --queries and --keys (or --demo N_Q N_K D)")
        queries = load_embeddings(args.queries, "queries", mmap=mmap)
        keys = load_embeddings(args.keys, "keys", mmap=mmap)
        if queries.shape[1] != keys.shape[1]:
            raise UsageError(
                f"queries have d = {queries.shape[1]} but keys have d = {keys.shape[1]}"
            )
    n_q, n_k = queries.shape[0], keys.shape[0]
    csr = load_exclude(args.exclude, n_q, n_k) if args.exclude else None
    return queries, keys, csr


def _inputs(args):
    """(queries, keys): tensors (--demo, .pt) or memmaps (.npy); the exclusion CSR or None; under
    torchrun."""
    queries, keys, csr = _load_inputs(args, mmap=True)
    if args.out.endswith(".npz"):
        raise UsageError(
            f"--out: under torchrun the ranking is written as a directory of shards, got {args.out}"
        )
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out: directory does not exist: {parent}")
    return queries, keys, csr


def _run_distributed(args) -> int:
    """`kdfast topk` under torchrun: this rank's blocks of rows, its shard files."""
    import torch.distributed as tdist
    from tqdm import tqdm

    from .. import distributed as kd
    from .._core.csr import select_rows

    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    backend = (
        args.dist_backend
        if args.dist_backend != "auto"
        else ("nccl" if dev.type == "cuda" else "gloo")
    )
    try:
        rank, world = kd.init(backend, timeout_s=args.dist_timeout)
    except ValueError as exc:
        raise UsageError(f"--dist-timeout: {exc}") from None
    try:
        return _distributed(args, kd, select_rows, tqdm, dev, rank, world)
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def _distributed(args, kd, select_rows, tqdm, dev, rank, world) -> int:
    from ..distributed._comm import Comm

    comm = Comm(None, dev, "kdfast topk")
    err, loaded = None, None
    try:
        loaded = _inputs(args)
    except (UsageError, ValueError, TypeError, OSError) as exc:
        err = ValueError(str(exc))
    try:
        comm.agree(err)  # a rank whose files are bad stops every rank, with its message
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    queries, keys, csr = loaded
    n_q, n_k = queries.shape[0], keys.shape[0]
    sides = [("", queries, keys, csr)]
    if args.item_side:
        import kdfast

        t_csr = None if csr is None else kdfast.transpose_csr(csr, n_k, n_q)
        sides.append(("item_", keys, queries, t_csr))
    writer = kd.ShardWriter(args.out, rank, world)
    n_calls = sum(math.ceil(math.ceil(q.shape[0] / world) / args.batch) for _, q, _, _ in sides)
    with tqdm(
        total=n_calls,
        desc=f"top-k batches (rank 0 of {world})",
        unit="batch",
        disable=args.quiet or rank != 0,
        file=sys.stderr,
    ) as bar:
        for prefix, qs, ks, x in sides:
            nq, nk = qs.shape[0], ks.shape[0]
            r0, r1 = kd.block_range(nq, rank, world)
            if args.layout == "keys":
                k0, k1 = kd.block_range(nk, rank, world)
            else:
                k0, k1 = 0, nk
            keys_dev = _rows(ks, k0, k1).to(dev)
            vals = writer.array(prefix + "values", r0, r1 - r0, nq, args.k, np.float32)
            idx = writer.array(prefix + "indices", r0, r1 - r0, nq, args.k, np.int64)
            longest = max(b - a for a, b in (kd.block_range(nq, r, world) for r in range(world)))
            for b in range(math.ceil(longest / args.batch)):  # the same number of calls everywhere
                a0 = min(r1, r0 + b * args.batch)
                a1 = min(r1, a0 + args.batch)
                ex = None
                if x is not None:
                    ex = tuple(t.to(dev) for t in select_rows(*x, torch.arange(a0, a1)))
                v, i = kd.topk_scores(
                    _rows(qs, a0, a1).to(dev),
                    keys_dev,
                    args.k,
                    exclude=ex,
                    layout=args.layout,
                    key_offset=k0 if args.layout == "keys" else None,
                    backend=args.backend,
                )
                vals[a0 - r0 : a1 - r0], idx[a0 - r0 : a1 - r0] = v.cpu().numpy(), i.cpu().numpy()
                bar.update(1)
            del keys_dev
    writer.finish()
    if rank == 0 and not args.quiet:
        print(
            f"wrote {args.out}/: top-{args.k} of {n_k} keys for {n_q} queries"
            + (f" and top-{args.k} of {n_q} queries for {n_k} keys" if args.item_side else "")
            + f", {world} shards each (kdfast.distributed.load_rankings reads them)",
            file=sys.stderr,
        )
    return 0
