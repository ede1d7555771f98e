"""The trainer: BPR base loss + an optional KD method, Adam, periodic validation and early stopping.

Per epoch (docs/METHODS.md section 1):
  1. every training pair (u, i) is shuffled and gets ONE uniform negative j (an item u has no
     training interaction with), resampled every epoch;
  2. method.start_epoch(epoch, max_epoch, student_user, student_item) runs the method's per-epoch
     work (epoch is 0-based, 0 .. max_epoch - 1, so DE's tau = (1e-10)^(epoch / max_epoch) starts at
     1; the embeddings are detached, computed without gradient);
  3. for each batch of `batch_size` training pairs:
        L = -sum_(u,i,j) log sigmoid(<e_u, e_i> - <e_u, e_j>)  +  method(student_user, student_item,
            u, i, j)
     (sum-reduced; the method's loss is already lambda-weighted; a method whose uses_base_loss is
     False, such as HetComp by default, replaces the BPR term), one Adam step on the model's and the
     method's parameters (lr 1e-3, weight decay 1e-3 as Adam's L2 term);
  4. every `eval_every` epochs: validation metrics; the best state (by `monitor`) is kept and
     training stops after `patience` evaluations without improvement. The test metrics are those of
     the best validation state.
The model (and method) may live on any device; batches are moved there once per epoch.
Seeded and deterministic on the CPU, bit for bit for one thread count: the negatives and the batch
order come from a torch.Generator seeded with `seed`, the global torch RNG (used by methods' own
noise, e.g. Gumbel) is seeded with it too, and rows of the student tables are gathered with
gradients that sum in a fixed order (kdfast._core.numerics.gather_rows).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import metrics
from ._core import checks
from ._core.csr import has_pair, pair_keys, row_ids
from ._core.numerics import gather_rows
from .families import dot_tables

DEFAULT_MONITOR = {"loo": "NDCG@10", "full": "Recall@50"}


def sample_negatives(
    users: torch.Tensor, train_keys: torch.Tensor, n_items: int, generator: torch.Generator
) -> torch.Tensor:
    """One uniform item per entry of `users` that the user has no training interaction with.

    users int64 [n]; train_keys int64 sorted u * n_items + i over training pairs. Rejection
    sampling: redraw the entries that hit a training item until none does (each user must have an
    unobserved item).
    """
    neg = torch.randint(0, n_items, (users.numel(),), generator=generator)
    todo = torch.arange(users.numel())
    for _ in range(1000):
        bad = has_pair(train_keys, users[todo] * n_items + neg[todo])
        if not bool(bad.any()):
            return neg
        todo = todo[bad]
        neg[todo] = torch.randint(0, n_items, (todo.numel(),), generator=generator)
    raise RuntimeError(
        "negative sampling did not finish: some user interacted with (nearly) every item"
    )


def bpr_loss(user_emb, item_emb, users, pos, neg) -> torch.Tensor:
    """-sum log sigmoid(<e_u, e_pos> - <e_u, e_neg>) over the batch (sum reduction, docs/METHODS.md
    section 1)."""
    u = gather_rows(user_emb, users)
    diff = gather_rows(item_emb, pos) - gather_rows(item_emb, neg)
    return -F.logsigmoid((u * diff).sum(1)).sum()


class Trainer:
    """Train a model on a Split: BPRMF or LightGCN (BPR loss, optionally with a KD method), or a
    teacher family of kdfast.families (its own train_loss, constrain() after each step; no KD
    method).

    model: has parameters() and embeddings() -> (user [U, d], item [I, d]), or the families'
        interface (evaluated through kdfast.families.dot_tables, or score_pairs for NeuMF);
        split: kdfast.data.Split;
    method: a kdfast.methods.base.KDMethod already built (or None for plain BPR);
    epochs: maximum epochs; batch_size: training pairs per step (1024); lr, weight_decay: Adam's;
    eval_every: validate every E epochs (and after the last); patience: evaluations without
    improvement before stopping (20); monitor: the validation metric to maximise (default NDCG@10
    for loo, Recall@50 for full); seed: RNG seed; progress: tqdm bars; log: a function taking one
    line per evaluation (None: silent); name: label in the log; backend: kdfast.topk_scores backend
    for full ranking;
    on_epoch_end: None or a function (epoch, model) called after each epoch's training steps, before
    its validation (epoch is 1-based), e.g. to keep checkpoints along the training trajectory
    (HetComp); valid_excludes_test: see kdfast.metrics.evaluate (False: validation ranks exclude
    the training items only);
    checkpoint: None or a file path: after every `checkpoint_every` epochs (and when training
        ends) the whole state of the run is written there (kdfast.checkpoint: model, method,
        optimizer, every RNG, the epoch, early stopping), whole or not at all;
    on_validation: None or a function (entry) called with each evaluation's history entry (a
        live log: kdfast distill's history.csv and TensorBoard);
    group: a torch.distributed process group to train data-parallel over (default: the default
        group when one is initialised with more than one process; see "Data-parallel" below);
    grad_sync: how data-parallel ranks sum their gradients: "dense" (one all_reduce of every
        gradient; the default), "sparse" (the embedding rows a step touched, by all_gather) or
        "auto" (sparse when those rows are fewer bytes than the dense buffer). On one machine
        (gloo over loopback) dense was the fastest (bench/results/intel-xeon-2cpu/
        distributed_distill.md); sparse is for links where bytes cost more than the extra work;
    resume: with a checkpoint file that exists, continue from it instead of starting afresh: the
        model and method must be built exactly as for the interrupted run (the same seed and
        options), and the result is then bit for bit that of an uninterrupted run; a checkpoint
        of a finished run returns its result at once (the model in its best state).

    Data-parallel (torch.distributed, e.g. under torchrun): every rank builds the same model and
    method (the same seed) and draws the same epoch permutation and negatives; each step's batch
    of `batch_size` pairs is split by user (the pairs of user u go to rank u mod world), each rank
    backpropagates its part, and the gradients are summed over the ranks (grad_sync: one all_reduce
    of one flat buffer per step as DistributedDataParallel does, or only the rows the step touched),
    so every rank takes the same Adam step.
    The BPR loss and every sum over a batch's unique users are then those of one process; a sum
    over a batch's unique items counts an item once per rank whose part holds it. A method's
    per-user per-epoch work (start_epoch: its sampling, the student's ranks) is sharded the same
    way when the method shards (KDMethod.shard_users: RRD, IR-RRD's user side, CD, UnKD, RD, DCD's
    user side, HetComp's knowledge construction), each rank drawing from its own generator; the
    rest of it (an item side, temperatures) runs on every rank alike. Evaluation is split by users
    (kdfast.distributed.evaluate for full ranking). Only rank 0 logs and writes the checkpoint; a
    sharded method's other ranks write their share beside it (CHECKPOINT.rankR), and a resume
    needs the same world size. Every rank returns the same result. A teacher family trained by its
    own loss (CML, NeuMF, MultVAE, I-AutoRec) trains the whole batch on every rank (no split).
    """

    def __init__(
        self,
        model,
        split,
        *,
        method=None,
        epochs: int = 1000,
        batch_size: int = 1024,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        eval_every: int = 1,
        patience: int = 20,
        monitor: str | None = None,
        seed: int = 0,
        progress: bool = True,
        log=print,
        name: str = "model",
        backend: str = "auto",
        on_epoch_end=None,
        valid_excludes_test: bool = False,
        checkpoint=None,
        checkpoint_every: int = 1,
        resume: bool = False,
        on_validation=None,
        group=None,
        grad_sync: str = "dense",
    ):
        for arg, v in (
            ("epochs", epochs),
            ("batch_size", batch_size),
            ("eval_every", eval_every),
            ("patience", patience),
            ("checkpoint_every", checkpoint_every),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if not (lr > 0) or not (weight_decay >= 0):
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        if method is not None and hasattr(model, "train_loss"):
            raise ValueError(
                f"a KD student must be a dot-product model with embeddings() (BPRMF, LightGCN); "
                f"{type(model).__name__} trains by its own loss and can be a teacher only"
            )
        self.model, self.split, self.method = model, split, method
        self.epochs, self.batch_size, self.lr, self.weight_decay = (
            epochs,
            batch_size,
            lr,
            weight_decay,
        )
        self.eval_every, self.patience, self.seed = eval_every, patience, seed
        self.monitor = monitor or DEFAULT_MONITOR[split.protocol]
        if self.monitor not in metrics.metric_names(split.protocol):
            raise ValueError(
                f"monitor {self.monitor!r} is not a {split.protocol} metric; choose from "
                f"{', '.join(metrics.metric_names(split.protocol))}"
            )
        self.progress, self.log, self.name, self.backend = progress, log, name, backend
        self.valid_excludes_test = bool(valid_excludes_test)
        if on_epoch_end is not None and not callable(on_epoch_end):
            raise TypeError(
                f"on_epoch_end must be callable or None, got {type(on_epoch_end).__name__}"
            )
        self.on_epoch_end = on_epoch_end
        if resume and checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path")
        self.checkpoint, self.checkpoint_every, self.resume = checkpoint, checkpoint_every, resume
        if on_validation is not None and not callable(on_validation):
            raise TypeError(
                f"on_validation must be callable or None, got {type(on_validation).__name__}"
            )
        self.on_validation = on_validation
        self.group = group
        self.grad_sync = checks.one_of(grad_sync, "grad_sync", GRAD_SYNC)
        self.rank, self.world = _dist_rank_world(group)
        if self.rank != 0:  # one voice: rank 0 logs, shows progress and writes checkpoints
            self.log, self.progress = None, False

    def _params(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.method is not None:
            params += [p for p in self.method.parameters() if p.requires_grad]
        return params

    def evaluate(self, part: str = "valid") -> dict:
        """Metrics of the model's current embeddings on the split's valid or test part."""
        self.model.eval()
        with torch.no_grad():
            if getattr(self.model, "score", "dot") is None:  # scores that do not factorise
                out = metrics.evaluate_scorer(
                    self.model.score_pairs,
                    self.split,
                    part,
                    valid_excludes_test=self.valid_excludes_test,
                )
            elif self.world > 1:
                out = _sharded_evaluate(self, *dot_tables(self.model), part)
            else:
                ue, ie = dot_tables(self.model)
                out = metrics.evaluate(
                    ue,
                    ie,
                    self.split,
                    part,
                    backend=self.backend,
                    valid_excludes_test=self.valid_excludes_test,
                )
        self.model.train()
        return out

    def fit(self) -> dict:
        """Train; returns {"best_epoch", "valid" (metrics at the best epoch), "test" (same state),
        "seconds_per_epoch" (training only, evaluation excluded), "epochs_run", "history":
        [{"epoch", "loss", "valid", and with a KD method "loss_base", "loss_kd" (the epoch's loss
        split into the base loss and the method's), "method" (its status line, if any)}, ...]},
        and "resumed_from" (the epoch a resumed run continued after; 0 for a fresh run). The model
        is left in its best-validation state."""
        from tqdm.auto import tqdm

        from . import checkpoint as ckpt

        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        split = self.split
        indptr, items = split.train
        n_items = split.n_items
        users_all = row_ids(indptr)
        train_keys = pair_keys(indptr, items, n_items)
        n = items.numel()
        if n == 0:
            raise ValueError("the split has no training interactions")
        device = next(self.model.parameters()).device
        params = self._params()
        # the fused Adam kernel does the same update (L2 weight decay added to the gradient) about
        # ten times cheaper on the CPU than the per-tensor loop, which dominated an epoch with dense
        # tables
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.Adam(
            params, lr=self.lr, weight_decay=self.weight_decay, fused=fused or None
        )
        run = {
            "history": [],
            "best": -math.inf,
            "best_epoch": 0,
            "best_state": None,
            "since_best": 0,
            "train_seconds": 0.0,
            "epochs_run": 0,
            "stopped": False,
        }
        own_loss = getattr(self.model, "train_loss", None)
        split_batches = self.world > 1 and own_loss is None
        # each rank does its own users' share of the method's per-epoch work (when it shards)
        sharded = split_batches and self.method is not None and self._shard_method()
        snaps = None
        if self.checkpoint is not None:  # what the model and method look like as built
            snaps = {"model": ckpt.Snapshot(self.model)}
            if self.method is not None:
                snaps["method"] = ckpt.Snapshot(self.method)
        resumed_from = 0
        if self.resume and Path(self.checkpoint).exists():
            saved = ckpt.load(self.checkpoint)
            self._check_resumable(saved)
            self.model = ckpt.restore(self.model, saved["model"])
            if self.method is not None:
                method_state = saved["method"]
                if sharded and self.rank != 0:  # this rank's share, from its own file
                    method_state = self._rank_checkpoint(saved)["method"]
                self.method = ckpt.restore(self.method, method_state)
            opt.load_state_dict(saved["optimizer"])
            gen.set_state(saved["generator"])
            ckpt.set_rng_state(saved["rng"], device)
            run = saved["run"]
            resumed_from = run["epochs_run"]
            if self.log is not None:
                self.log(
                    f"[{self.name}] resumed from {self.checkpoint} after epoch {resumed_from}"
                    + (" (finished)" if saved.get("finished") else "")
                )
            if saved.get("finished"):
                self.model.load_state_dict(run["best_state"])
                return dict(saved["result"], resumed_from=resumed_from)

        def save_checkpoint(finished=False, result=None):
            if self.rank != 0:
                if sharded:  # a sharded method's state differs per rank: each writes its own
                    ckpt.save(
                        self._rank_path(),
                        {
                            "epochs_run": run["epochs_run"],
                            "method": ckpt.capture(self.method, snaps["method"], "method"),
                        },
                    )
                return
            payload = {
                "name": self.name,
                "seed": self.seed,
                "epochs": self.epochs,
                "finished": finished,
                "result": result,
                "run": run,
                "model": ckpt.capture(self.model, snaps["model"], "model"),
                "method": None
                if self.method is None
                else ckpt.capture(self.method, snaps["method"], "method"),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "rng": ckpt.rng_state(device),
                "world": self.world,
                "sharded": sharded,
            }
            ckpt.save(self.checkpoint, payload)

        n_batches = math.ceil(n / self.batch_size)
        constrain = getattr(self.model, "constrain", None)
        self.model.train()
        if self.method is not None:
            self.method.train()
        history = run["history"]
        for epoch in range(run["epochs_run"] + 1, self.epochs + 1):
            if run["stopped"]:
                break
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=gen)
            users, pos = users_all[perm], items[perm]
            neg = sample_negatives(users, train_keys, n_items, gen)
            users, pos, neg = users.to(device), pos.to(device), neg.to(device)
            mine = users % self.world == self.rank if split_batches else None
            if self.method is not None:
                with torch.no_grad():
                    su, si = self.model.embeddings()
                    self.method.start_epoch(epoch - 1, self.epochs, su.detach(), si.detach())
            total, kd_parts = 0.0, []  # the KD parts stay on the device until the epoch ends
            bar = tqdm(
                range(n_batches),
                desc=f"{self.name} epoch {epoch}",
                leave=False,
                disable=not self.progress,
            )
            for b in bar:
                sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
                batch = users[sl], pos[sl], neg[sl]
                if split_batches:  # this rank's part of the step: the pairs of its users
                    batch = tuple(t[mine[sl]] for t in batch)
                    if batch[0].numel() == 0:
                        opt.zero_grad(set_to_none=True)
                        _sum_grads(params, self.group, self.grad_sync)
                        opt.step()
                        continue
                if own_loss is not None:  # a family trained by its own loss (no KD method)
                    loss = own_loss(*batch)
                elif self.method is None or self.method.uses_base_loss:
                    ue, ie = self.model.embeddings()
                    loss = bpr_loss(ue, ie, *batch)
                    if self.method is not None:
                        kd = self.method(ue, ie, *batch)
                        kd_parts.append(kd.detach())
                        loss = loss + kd
                else:
                    ue, ie = self.model.embeddings()
                    loss = self.method(ue, ie, *batch)
                    kd_parts.append(loss.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if split_batches:
                    _sum_grads(params, self.group, self.grad_sync)
                opt.step()
                if constrain is not None:
                    constrain()
                total += float(loss.detach())
            bar.close()
            kd_total = None
            if self.method is not None:  # the epoch's KD part (summed in step order, as total)
                kd_total = 0.0
                for part in torch.stack(kd_parts).tolist() if kd_parts else []:
                    kd_total += part
            if split_batches:  # the epoch's losses over all ranks' parts
                total, kd_total = _sum_floats(total, kd_total, self.group)
            if not math.isfinite(total):
                raise FloatingPointError(f"{self.name}: the loss is {total} at epoch {epoch}")
            run["train_seconds"] += time.perf_counter() - t0
            run["epochs_run"] = epoch
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, self.model)
            if epoch % self.eval_every == 0 or epoch == self.epochs:
                self._validate(epoch, total, kd_total, run)
            if self.checkpoint is not None and (
                epoch % self.checkpoint_every == 0 or run["stopped"]
            ):
                save_checkpoint()
        best_state = run["best_state"]
        self.model.load_state_dict(best_state)
        best_epoch = run["best_epoch"]
        valid = next(h["valid"] for h in history if h["epoch"] == best_epoch)
        test = self.evaluate("test")
        if self.log is not None:
            self.log(
                f"[{self.name}] best epoch {best_epoch}: "
                f"test {self.monitor} {test[self.monitor]:.4f}"
            )
        result = {
            "best_epoch": best_epoch,
            "valid": valid,
            "test": test,
            "seconds_per_epoch": run["train_seconds"] / run["epochs_run"],
            "epochs_run": run["epochs_run"],
            "history": history,
        }
        if self.checkpoint is not None:
            save_checkpoint(finished=True, result=result)
        return dict(result, resumed_from=resumed_from)

    def _validate(self, epoch, total, kd_total, run) -> None:
        """An epoch's validation: its history entry, the best state, early stopping, the log."""
        valid = self.evaluate("valid")
        entry = {"epoch": epoch, "loss": total, "valid": valid}
        if kd_total is not None:  # the epoch's loss split into its base and KD parts
            entry["loss_kd"], entry["loss_base"] = kd_total, total - kd_total
        status = self.method.status() if self.method is not None else None
        if status:
            entry["method"] = status
        run["history"].append(entry)
        if self.on_validation is not None:
            self.on_validation(entry)
        score = valid[self.monitor]
        if score > run["best"]:
            run["best"], run["best_epoch"], run["since_best"] = score, epoch, 0
            run["best_state"] = copy.deepcopy(self.model.state_dict())
        else:
            run["since_best"] += 1
        if self.log is not None:
            self.log(
                f"[{self.name}] epoch {epoch}: loss {total:.2f}, "
                f"valid {self.monitor} {score:.4f} "
                f"(best {run['best']:.4f} @ {run['best_epoch']}), "
                f"{run['train_seconds'] / epoch:.2f} s/epoch" + (f"; {status}" if status else "")
            )
        if run["since_best"] >= self.patience:
            run["stopped"] = True
            if self.log is not None:
                self.log(
                    f"[{self.name}] early stop: {self.patience} evaluations without improvement"
                )

    def _shard_method(self) -> bool:
        """Give the method this rank's users (KDMethod.shard_users) once; whether it shards."""
        shard = self.method.user_shard
        if shard is None:
            return bool(self.method.shard_users(self.rank, self.world, all_sum=self._all_sum))
        if shard != (self.rank, self.world):
            raise ValueError(
                f"method: sharded for rank {shard[0]} of {shard[1]}, but this trainer is rank "
                f"{self.rank} of {self.world}"
            )
        return True

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks (a method's total over every user, e.g. HetComp's phase)."""
        from .distributed._comm import Comm

        out = Comm(self.group, t.device, "data-parallel training").all_reduce_sum(t)
        return out.to(t.device)

    def _rank_path(self) -> Path:
        """The checkpoint file of this rank's share of a sharded method (ranks other than 0)."""
        path = Path(self.checkpoint)
        return path.with_name(f"{path.name}.rank{self.rank}")

    def _rank_checkpoint(self, saved) -> dict:
        """This rank's share of a sharded method, checked to be of the same epoch as rank 0's."""
        from . import checkpoint as ckpt

        path = self._rank_path()
        if not path.exists():
            raise ValueError(f"{path}: missing; rank {self.rank} cannot resume its samples")
        mine = ckpt.load(path)
        if mine.get("epochs_run") != saved["run"]["epochs_run"]:
            raise ValueError(
                f"{path} is of epoch {mine.get('epochs_run')}, rank 0's checkpoint of epoch "
                f"{saved['run']['epochs_run']} (a run stopped while writing them): start afresh"
            )
        return mine

    def _check_resumable(self, saved) -> None:
        """The checkpoint belongs to this run: same name, seed, epoch budget and world size."""
        mine = {"name": self.name, "seed": self.seed, "epochs": self.epochs}
        if self.world > 1 or "world" in saved:
            mine["world"] = self.world
        differ = [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in mine.items() if saved.get(k) != v]
        if differ:
            raise ValueError(
                f"{self.checkpoint} is the checkpoint of another run: " + ", ".join(differ)
            )


# ------------------------------------------------------------------------------- data-parallel
def _dist_rank_world(group):
    """(rank, world size) in `group` (the default group when None), (0, 1) without
    torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group: torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


#: how data-parallel training sums the gradients (Trainer's grad_sync)
GRAD_SYNC = ("auto", "dense", "sparse")


def _sum_grads(params, group, mode="dense") -> None:
    """Sum every parameter's gradient over the ranks; a parameter no rank has a gradient for keeps
    None (Adam then skips it, as in one process).

    "dense": one all_reduce of one flat buffer per dtype and device. "sparse": the rows of the 2-D
    parameters (embedding tables) with a nonzero gradient on some rank travel by all_gather (ids and
    rows) and every rank adds them up in rank order; other parameters go dense. "auto": sparse when
    the rows it would gather are fewer bytes than the dense buffer, decided from one exchange of
    the row counts (so every rank decides alike). Every mode leaves the same gradient on every rank;
    with two ranks the sums are the dense ones bit for bit (a + b == b + a)."""
    tables = [] if mode == "dense" else [p for p in params if p.dim() == 2]
    if tables:
        tables = _sum_rows(tables, group, force=mode == "sparse")
    done = {id(p) for p in tables}
    rest = [p for p in params if id(p) not in done]
    if rest:
        _all_reduce_dense(rest, group)


def _sum_rows(tables, group, force):
    """The sparse part of _sum_grads: returns the tables it summed (none when "auto" finds the
    dense all_reduce cheaper)."""
    from .distributed._comm import Comm

    dev = tables[0].device
    comm = Comm(group, dev, "data-parallel training")
    world = comm.world
    rows = [
        torch.zeros(0, dtype=torch.int64, device=dev)
        if p.grad is None
        else torch.nonzero(p.grad.ne(0).any(1)).flatten()
        for p in tables
    ]
    # per table: the rows this rank sends and whether it has a gradient at all
    mine = torch.tensor(
        [r.numel() for r in rows] + [int(p.grad is not None) for p in tables],
        dtype=torch.int64,
        device=dev,
    )
    counts = comm.all_gather(mine).cpu()
    n, has = counts[:, : len(tables)], counts[:, len(tables) :].sum(0)
    widths = [p.shape[1] * p.element_size() + 8 for p in tables]  # a row and its id
    sparse_bytes = world * max(sum(int(c) * w for c, w in zip(n[r], widths)) for r in range(world))
    dense_bytes = 2 * sum(p.numel() * p.element_size() for p in tables)  # a ring all_reduce
    if not force and sparse_bytes >= dense_bytes:
        return []
    by_dtype = {}
    for x, p in enumerate(tables):
        by_dtype.setdefault(p.dtype, []).append(x)
    for dtype, xs in by_dtype.items():
        # this rank's ids and rows; every rank's, by their known counts
        ids = torch.cat([rows[x] for x in xs])
        vals = torch.cat(
            [tables[x].grad.index_select(0, rows[x]).reshape(-1) for x in xs if rows[x].numel()]
            + [torch.zeros(0, dtype=dtype, device=dev)]
        )
        n_ids = [int(n[r, xs].sum()) for r in range(world)]
        n_vals = [sum(int(n[r, x]) * tables[x].shape[1] for x in xs) for r in range(world)]
        all_ids = [t.to(dev) for t in comm.all_gather_ragged(ids, n_ids)]
        all_vals = [t.to(dev) for t in comm.all_gather_ragged(vals, n_vals)]
        out = {x: None for x in xs}
        for r in range(world):  # every rank adds the ranks' rows in rank order
            i0 = v0 = 0
            for x in xs:
                c, d = int(n[r, x]), tables[x].shape[1]
                if has[x] and out[x] is None:
                    out[x] = torch.zeros_like(tables[x])
                if c:
                    out[x].index_add_(
                        0, all_ids[r][i0 : i0 + c], all_vals[r][v0 : v0 + c * d].view(c, d)
                    )
                i0, v0 = i0 + c, v0 + c * d
        for x in xs:
            tables[x].grad = out[x]
    return tables


def _all_reduce_dense(params, group) -> None:
    """The dense part of _sum_grads: one all_reduce per dtype and device."""
    import torch.distributed as dist

    from .distributed._comm import _guard

    buckets = {}
    for p in params:
        buckets.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, dev), ps in buckets.items():
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
            + [torch.tensor([float(p.grad is not None) for p in ps], dtype=dtype, device=dev)]
        )
        _guard("data-parallel training", lambda f=flat: dist.all_reduce(f, group=group))
        at = 0
        for p in ps:
            n = p.numel()
            p.grad = flat[at : at + n].view_as(p).clone()
            at += n
        for p, has in zip(ps, flat[at:].tolist()):
            if has == 0:
                p.grad = None


def _sum_floats(total, kd_total, group):
    """(total, kd_total) summed over the ranks (float64; kd_total may be None)."""
    import torch.distributed as dist

    from .distributed._comm import _guard

    t = torch.tensor([total, kd_total or 0.0], dtype=torch.float64)
    _guard("data-parallel training", lambda: dist.all_reduce(t, group=group))
    return float(t[0]), None if kd_total is None else float(t[1])


def _sharded_evaluate(trainer, ue, ie, part) -> dict:
    """Trainer.evaluate over the ranks: each ranks a block of the users, the same numbers as one
    process (full: kdfast.distributed.evaluate; loo: each block's held-out ranks gathered)."""
    from .distributed import block_range
    from .distributed import evaluate as dist_evaluate
    from .distributed._comm import Comm

    split = trainer.split
    if split.protocol == "full":
        return dist_evaluate(
            ue,
            ie,
            split,
            part,
            backend=trainer.backend,
            valid_excludes_test=trainer.valid_excludes_test,
            group=trainer.group,
        )
    cands = split.valid_candidates if part == "valid" else split.test_candidates
    n = split.eval_users.numel()
    r0, r1 = block_range(n, trainer.rank, trainer.world)
    mine = metrics.loo_ranks(ue, ie, split.eval_users[r0:r1], cands[r0:r1])
    sizes = [hi - lo for lo, hi in (block_range(n, r, trainer.world) for r in range(trainer.world))]
    comm = Comm(trainer.group, mine.device, "evaluation")
    return metrics.loo_metrics(torch.cat(comm.all_gather_ragged(mine, sizes)).cpu())
