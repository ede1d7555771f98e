"""The collectives kdfast.distributed uses, on any torch.distributed process group: NCCL (CUDA
tensors) and gloo (CPU tensors) both run every function here.

Only collectives both backends implement are used: all_gather_into_tensor (equal sizes) and
all_to_all_single (uneven splits; gloo has it in torch 2.x). A backend without all_to_all_single
falls back to all_gather_into_tensor of padded blocks (each rank then keeps its own block).

Every collective call goes through `_guard`, which turns a timeout or a lost peer into a
DistributedError naming the collective and the process group's timeout, instead of a bare
backend message.
"""

from __future__ import annotations

import datetime
import os

import torch

# the process-group timeout kdfast.distributed.init uses unless told otherwise (seconds)
DEFAULT_TIMEOUT_S = 300.0
# backends known to implement all_to_all_single (checked for gloo in torch 2.13: uneven splits too)
ALL_TO_ALL_BACKENDS = ("nccl", "gloo", "mpi", "ucc")
_MSG_BYTES = 1024  # room for one rank's error message in the status exchange


class DistributedError(RuntimeError):
    """A kdfast.distributed call failed on this rank or on another one (the message says which);
    every rank of the group raises it for the same call instead of waiting."""


def dist():
    import torch.distributed as d

    return d


def require_group(group, where: str):
    """The group (the default one for None), or a RuntimeError that says how to create it."""
    d = dist()
    if not d.is_available():
        raise RuntimeError(f"{where}: torch.distributed is not available in this build of torch")
    if not d.is_initialized():
        raise RuntimeError(
            f"{where}: the default process group is not initialised: call "
            "kdfast.distributed.init() (or torch.distributed.init_process_group) first, e.g. in a "
            "script started with torchrun"
        )
    return group if group is not None else d.group.WORLD


def backend_of(group) -> str:
    return str(dist().get_backend(group)).lower()


def comm_device(group, device: torch.device) -> torch.device:
    """Where the tensors of a collective live: a CUDA device for NCCL (the tensors' own, else the
    current one: CPU tensors travel through it and come back), the CPU otherwise."""
    if backend_of(group) == "nccl":
        if device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# the timeout kdfast.distributed.init gave the default group (for messages), None if not ours
_INIT_TIMEOUT_S = None


def _guard(what: str, fn, timeout_s=None):
    try:
        return fn()
    except DistributedError:
        raise
    except (RuntimeError, OSError) as exc:
        limit = f" (the process group's timeout is {timeout_s:g} s)" if timeout_s else ""
        raise DistributedError(
            f"{what}: a collective failed or timed out{limit}: another rank raised, exited or "
            f"never made the same call ({type(exc).__name__}: {str(exc).strip()[:300]})"
        ) from exc


class Comm:
    """One process group, its rank and size, and the device its collectives use."""

    def __init__(self, group, device, where):
        self.where = where
        self.group = require_group(group, where)
        d = dist()
        self.rank = d.get_rank(self.group)
        self.world = d.get_world_size(self.group)
        self.device = comm_device(self.group, device)
        self.backend = backend_of(self.group)
        self.timeout_s = _INIT_TIMEOUT_S if group is None else None

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x (same shape and dtype on every rank)."""
        x = x.to(self.device).contiguous()
        out = torch.empty((self.world, *x.shape), dtype=x.dtype, device=self.device)
        d = dist()
        fn = getattr(d, "all_gather_single", None) or d.all_gather_into_tensor
        _guard(self.where, lambda: fn(out.view(-1), x.view(-1), group=self.group), self.timeout_s)
        return out

    def all_gather_ragged(self, x: torch.Tensor, lengths=None) -> list:
        """Every rank's x, whose first dimension may differ between ranks (the same dtype and
        trailing shape on every rank), as a list by rank: x padded to the longest and gathered
        once. lengths: every rank's first dimension when the caller knows them (else one more
        all_gather finds them)."""
        if lengths is None:
            lengths = self.all_gather(torch.tensor([x.shape[0]], dtype=torch.int64)).flatten()
        lengths = [int(m) for m in lengths]
        pad = torch.zeros((max(lengths), *x.shape[1:]), dtype=x.dtype, device=self.device)
        pad[: x.shape[0]] = x
        got = self.all_gather(pad)
        return [got[r, :m] for r, m in enumerate(lengths)]

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).clone()
        d = dist()
        _guard(self.where, lambda: d.all_reduce(x, group=self.group), self.timeout_s)
        return x

    def exchange(self, chunks, merge: str = "auto"):
        """Personalised exchange: chunks[j] (a tensor whose first dimension varies, the same dtype
        and trailing shape on every rank) goes to rank j; returns the list of what each rank sent
        here. all_to_all_single when the backend has it (each byte moves once), else (or with
        merge="all_gather") all_gather of every rank's chunks padded to the longest (each rank
        receives everything and keeps its own)."""
        tail = tuple(chunks[0].shape[1:])
        dtype = chunks[0].dtype
        counts = torch.tensor([c.shape[0] for c in chunks], dtype=torch.int64)
        use_a2a = merge == "all_to_all" or (merge == "auto" and self.backend in ALL_TO_ALL_BACKENDS)
        d = dist()
        if use_a2a:
            recv_counts = torch.empty_like(counts, device=self.device)
            _guard(
                self.where,
                lambda: d.all_to_all_single(recv_counts, counts.to(self.device), group=self.group),
                self.timeout_s,
            )
            recv_counts = recv_counts.cpu()
            send = torch.cat([c.to(self.device).reshape(c.shape[0], *tail) for c in chunks])
            recv = torch.empty((int(recv_counts.sum()), *tail), dtype=dtype, device=self.device)
            _guard(
                self.where,
                lambda: d.all_to_all_single(
                    recv,
                    send,
                    output_split_sizes=recv_counts.tolist(),
                    input_split_sizes=counts.tolist(),
                    group=self.group,
                ),
                self.timeout_s,
            )
            return list(torch.split(recv, recv_counts.tolist()))
        # all_gather fallback: every rank's counts, then its chunks padded to the longest
        all_counts = self.all_gather(counts).cpu()  # [world (sender), world (receiver)]
        longest = int(all_counts.max())
        pad = torch.zeros((self.world, longest, *tail), dtype=dtype, device=self.device)
        for j, c in enumerate(chunks):
            pad[j, : c.shape[0]] = c.to(self.device)
        got = self.all_gather(pad)  # [sender, receiver, longest, *tail]
        return [got[s, self.rank, : int(all_counts[s, self.rank])] for s in range(self.world)]

    def step(self, fn):
        """fn() (local work between two collectives) on every rank, then one status exchange: if it
        raised on any rank, every rank raises (see agree), so that no rank goes on to a collective
        the others never reach (gloo aborts the process on mismatched sizes)."""
        err, out = None, None
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank by agree
            err = exc
        self.agree(err)
        return out

    def agree(self, error: BaseException | None, what: str | None = None):
        """One status exchange: if any rank had an error, every rank raises it (the first failing
        rank's message, naming that rank); the exception type is kept for ValueError/TypeError so
        that argument errors read the same on every rank."""
        buf = torch.zeros(_MSG_BYTES + 2, dtype=torch.uint8)
        if error is not None:
            kind = 1 if isinstance(error, ValueError) else 2 if isinstance(error, TypeError) else 3
            msg = f"{type(error).__name__}: {error}".encode()[:_MSG_BYTES]
            buf[0], buf[1] = 1, kind
            buf[2 : 2 + len(msg)] = torch.frombuffer(bytearray(msg), dtype=torch.uint8)
        got = self.all_gather(buf).cpu()
        failed = torch.nonzero(got[:, 0]).flatten().tolist()
        if not failed:
            return
        r = failed[0]
        text = bytes(got[r, 2:].tolist()).rstrip(b"\0").decode(errors="replace")
        kind = int(got[r, 1])
        where = what or self.where
        if r == self.rank and error is not None:
            prefix = f"{where}: on this rank ({r})"
        else:
            prefix = f"{where}: rank {r} of {self.world} failed"
        others = f" (ranks {failed} failed)" if len(failed) > 1 else ""
        cls = ValueError if kind == 1 else TypeError if kind == 2 else DistributedError
        raise cls(f"{prefix}{others}: {text}") from error


def timeout_delta(timeout_s) -> datetime.timedelta:
    t = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if not t > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    return datetime.timedelta(seconds=t)


def init(backend=None, *, timeout_s=None, init_method=None, rank=None, world_size=None, **kwargs):
    """Initialise the default process group (once; a no-op if it is already initialised) with
    kdfast's default timeout (DEFAULT_TIMEOUT_S = 300 s, or timeout_s): NCCL when CUDA is
    available, gloo otherwise. Under torchrun the rank, world size and rendezvous come from the
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); otherwise give init_method (e.g.
    "file:///tmp/kd_init" or "tcp://host:port"), rank and world_size. With NCCL each process uses
    the GPU LOCAL_RANK (torch.cuda.set_device). Returns the group's (rank, world size)."""
    global _INIT_TIMEOUT_S
    d = dist()
    delta = timeout_delta(timeout_s)
    if not d.is_initialized():
        _INIT_TIMEOUT_S = delta.total_seconds()
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        args = dict(backend=backend, timeout=delta, **kwargs)
        if init_method is not None:
            args["init_method"] = init_method
        if rank is not None:
            args["rank"] = rank
        if world_size is not None:
            args["world_size"] = world_size
        d.init_process_group(**args)
    return d.get_rank(), d.get_world_size()
