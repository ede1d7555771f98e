"""`kdfast distill`: train (or load) a teacher, distill one student per KD method, report and plot
(through the pipeline of kdfast.experiment).

    kdfast distill --data synthetic --protocol loo --teacher-dim 200 --student-dim 20 \
        --methods none,de,rrd --epochs 100 --seed 0 --out runs/demo

Writes OUT/results.json ({"config" (the arguments, data, split, every method's resolved options),
"environment" (versions, threads, device, the resolved backend, start and end times), "teacher":
{"test", "valid", ...}, "students": {method: {"test", "valid", "best_epoch", "seconds_per_epoch",
"history", "file"}}}), OUT/history.csv (per model and evaluation: the loss, its base and KD
parts, every validation metric), OUT/validation.png (the
validation metric per epoch of every student, the teacher as a dashed line), OUT/students/METHOD.pt
(each trained student: its tables, id maps, settings and metrics; `kdfast evaluate
OUT/students/METHOD.pt` reloads and evaluates it, --export writes arrays) and, unless --teacher
names another file, OUT/teacher.pt (the saved teacher, reused by later runs whose data, split and
teacher settings match). A finished run already in --out is kept under timestamped names. Bad
arguments (unknown method, missing data, unwritable output) fail before any training.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .._core.files import atomic_write
from .errors import UsageError


def add_arguments(p) -> None:
    p.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (default, seconds), 'citeulike-t' (path from $KDFAST_DATA, else "
        "downloaded) or a file/folder",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "users-dat", "movielens", "pairs"),
        help="file format of --data PATH (auto, the default: from the content, whatever the name: "
        "'count id id ...' lines -> users-dat, a rating column -> movielens, else pairs)",
    )
    p.add_argument(
        "--min-interactions",
        type=int,
        default=5,
        help="drop users with fewer interactions (default 5; one pass over users, see --k-core)",
    )
    p.add_argument(
        "--k-core",
        type=int,
        default=None,
        metavar="K",
        help="after --min-interactions, keep the iterated K-core: drop users and items with fewer "
        "than K interactions again and again until none is left (default: off)",
    )
    p.add_argument(
        "--min-rating",
        "--threshold",
        dest="threshold",
        type=float,
        default=4.0,
        help="rating files: ratings >= this are interactions (default 4.0)",
    )
    p.add_argument("--synthetic-users", type=int, default=2000)
    p.add_argument("--synthetic-items", type=int, default=1500)
    p.add_argument(
        "--synthetic-seed",
        type=int,
        default=0,
        help="seed of the synthetic data (not of the split)",
    )
    p.add_argument(
        "--protocol",
        default="loo",
        choices=("loo", "full"),
        help="loo: leave-one-out with 499 sampled negatives; full: 60/20/20 split, full ranking",
    )
    p.add_argument(
        "--n-neg", type=int, default=499, help="loo: sampled negatives per held-out item"
    )
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument(
        "--split-order",
        default="random",
        choices=("random", "temporal"),
        help="random (default) or temporal: by the data's timestamps, each user's latest "
        "interactions are held out (loo: the last is test, the one before valid; full: a "
        "time-ordered 60/20/20)",
    )
    p.add_argument(
        "--export-split",
        metavar="CSV",
        default=None,
        help="also write the split as user_id,item_id,part rows in the data's own ids (.gz: "
        "gzipped), to join results back to your data",
    )
    p.add_argument(
        "--teacher-model",
        default="bprmf",
        choices=("bprmf", "lightgcn", "cml", "multvae", "iae"),
        help="teacher family (default bprmf); cml, multvae and iae (kdfast.families) train by "
        "their own losses and reach the KD methods as tables whose dot products are their scores",
    )
    p.add_argument("--student-model", default="bprmf", choices=("bprmf", "lightgcn"))
    p.add_argument("--teacher-dim", type=int, default=200)
    p.add_argument("--student-dim", type=int, default=20)
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher file: loaded when it exists (its metadata must match), else trained and "
        "saved there (default OUT/teacher.pt)",
    )
    p.add_argument(
        "--methods",
        default="none",
        help="comma-separated: none and/or KD methods (de, phr, ftd, htd, rrd, rrd-full, ir-rrd, "
        "hetcomp, rd, cd, dcd, unkd)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a KD method option passed to its build(), e.g. rrd.lam=0.01 (VALUE parsed as JSON, "
        "else a string); repeatable",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="METHOD.KEY=V1,V2,...",
        help="tune an option on validation: the method is trained at every value (the grid of "
        "all its --sweep keys), the setting with the best validation --monitor is kept and "
        "reported on test, and the whole grid is recorded; repeatable",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train the students (every method and --sweep point) in N processes at once, each "
        "with --threads threads (default: this machine's threads divided by N); 1 (the default) "
        "trains them one after another here",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=1000,
        help="maximum student epochs (early stopping on validation)",
    )
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=None,
        help="maximum teacher epochs (default: --epochs)",
    )
    p.add_argument("--eval-every", type=int, default=1, help="validate every E epochs")
    p.add_argument(
        "--patience",
        type=int,
        default=20,
        help="stop after this many evaluations without improvement",
    )
    p.add_argument(
        "--valid-excludes-test",
        action="store_true",
        help="full protocol: rank validation items with the test items excluded too, as the "
        "authors' code does (default: only training items; test items stay out of every choice)",
    )
    p.add_argument(
        "--monitor",
        default=None,
        help="validation metric for early stopping (default NDCG@10 / Recall@50)",
    )
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument(
        "--seed", type=int, default=0, help="training seed (model init, negatives, batch order)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device for training and evaluation (cpu, cuda, cuda:1 ...)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        help="kdfast op backend (auto, torch, cpp, numba, triton; auto: triton on CUDA, else cpp, "
        "numba, torch, the first available)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--out", default="kdfast-out", help="output folder (created)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run that --out holds from its last checkpoint (after Ctrl-C, SIGTERM "
        "or a crash; the same command with --resume added); finished students are not retrained",
    )
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="also log each evaluation (losses, validation metrics) to TensorBoard event files in "
        "DIR (needs the tensorboard package: pip install 'kdfast[tensorboard]')",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="under torchrun: seconds a collective may wait for the other ranks before every rank "
        "fails with an error (default: %(default)s)",
    )
    p.add_argument(
        "--grad-sync",
        choices=("auto", "dense", "sparse"),
        default="dense",
        help="under torchrun: how the ranks sum their gradients each step: dense (one all_reduce "
        "of every gradient), sparse (only the embedding rows the step touched, for slow links) or "
        "auto (sparse when it moves fewer bytes); default: %(default)s",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="E",
        help="write the checkpoint of the model in training (--out/checkpoints/) every E epochs "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="options from a .toml/.yaml/.json file, or a results.json to rerun its experiment "
        "(flags given here override the file)",
    )


def parse_methods(text: str):
    """[(name, default options)] for a comma-separated list ("none" has none); UsageError on unknown
    or unavailable names."""
    from ..methods.registry import METHODS, method_class

    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not names:
        raise UsageError("--methods is empty")
    unknown = [m for m in names if m != "none" and m not in METHODS]
    if unknown:
        raise UsageError(
            f"unknown method(s) {', '.join(unknown)}; known: none, {', '.join(sorted(METHODS))}"
        )
    if len(set(names)) != len(names):
        raise UsageError(f"--methods lists a method twice: {text}")
    out = []
    for m in names:
        if m == "none":
            out.append((m, {}))
            continue
        try:
            _, opts = method_class(m)
        except (ImportError, AttributeError) as exc:
            raise UsageError(
                f"method {m!r} is not available in this installation ({exc})"
            ) from None
        out.append((m, opts))
    return out


def parse_options(items, methods):
    """{method: {key: value}} from "METHOD.KEY=VALUE" strings; UsageError for a malformed item or a
    method that is not in the run."""
    out = {}
    for item in items:
        head, eq, value = item.partition("=")
        name, dot, key = head.partition(".")
        if not eq or not dot or not name or not key:
            raise UsageError(f"--option {item!r} is not METHOD.KEY=VALUE")
        if name not in methods or name == "none":
            raise UsageError(f"--option {item!r}: method {name!r} is not among --methods")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(name, {})[key] = parsed
    return out


def parse_sweeps(items, methods):
    """{method: [options, ...]}: the grid (cartesian product) of each method's swept keys, from
    "METHOD.KEY=V1,V2,..." strings (values parsed as JSON, else strings); UsageError for a
    malformed item, a method not in the run, or a key swept twice."""
    import itertools

    keys = {}
    for item in items:
        head, eq, values = item.partition("=")
        name, dot, key = head.partition(".")
        if not eq or not dot or not name or not key or not values:
            raise UsageError(f"--sweep {item!r} is not METHOD.KEY=V1,V2,...")
        if name not in methods or name == "none":
            raise UsageError(f"--sweep {item!r}: method {name!r} is not among --methods")
        if key in keys.setdefault(name, {}):
            raise UsageError(f"--sweep {item!r}: {name}.{key} is swept twice")
        parsed = []
        for v in values.split(","):
            try:
                parsed.append(json.loads(v))
            except ValueError:
                parsed.append(v)
        keys[name][key] = parsed
    return {
        name: [dict(zip(ks, combo)) for combo in itertools.product(*ks.values())]
        for name, ks in keys.items()
    }


def _label(name, point) -> str:
    return name + "".join(f"@{k}={v}" for k, v in point.items())


def _resolved(name, options):
    """Every option the method is built with: build's defaults, the registry's, then the user's
    (JSON-safe: values that are not numbers, strings, booleans or None as their repr)."""
    from ..methods.registry import method_class

    cls, defaults = method_class(name)
    out = {**cls.option_defaults(), **defaults, **options}
    ok = (int, float, str, bool, type(None))
    return {k: v if isinstance(v, ok) else repr(v) for k, v in out.items()}


def _environment(args, device) -> dict:
    """Versions, threads, device, the backend each op resolves to here, and the start time."""
    import platform

    import torch

    from .. import __version__
    from .._core import backend as _backend

    try:  # what the float32 top-K and Plackett-Luce ops run on (ops without it: cpp, else torch)
        resolved = _backend.resolve(args.backend, device, dtype=torch.float32)
    except (ValueError, RuntimeError, TypeError) as exc:
        resolved = f"unavailable: {exc}"
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {
        "processes": world,
        "kdfast": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "backend_requested": args.backend,
        "backend_resolved": resolved,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _validated(name, options):
    """The method's options checked by the registry (names and values) before any training."""
    from ..methods.registry import validate_options

    try:
        return validate_options(name, options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--option {exc}") from None  # the message names the method


def _check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".kdfast-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{what} {str(folder)!r} cannot be written: {exc}") from None


def _check_args(args) -> None:
    for name in (
        "teacher_dim",
        "student_dim",
        "epochs",
        "eval_every",
        "patience",
        "batch_size",
        "n_neg",
        "synthetic_users",
        "synthetic_items",
        "checkpoint_every",
        "jobs",
    ):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.teacher_epochs is not None and args.teacher_epochs < 1:
        raise UsageError(f"--teacher-epochs must be >= 1, got {args.teacher_epochs}")
    if args.k_core is not None and args.k_core < 1:
        raise UsageError(f"--k-core must be >= 1, got {args.k_core}")
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")


def report_table(results: dict, protocol: str, monitor: str) -> str:
    """The printed summary: teacher and one row per student, with the change of `monitor` relative
    to the no-KD student ("none") when it ran."""
    from ..experiment import format_table, summary_columns, summary_rows

    cols = summary_columns(protocol, monitor)
    t, students = results["teacher"], results["students"]
    rows = summary_rows(t["test"], students, cols, monitor)
    sec = t.get("seconds_per_epoch")
    rows[0] += [
        "",
        str(t.get("best_epoch", "")),
        f"{sec:.2f}" if sec and not t.get("loaded") else "loaded",
    ]
    for row, r in zip(rows[1:], students.values()):
        row += [str(r["best_epoch"]), f"{r['seconds_per_epoch']:.2f}"]
    header = ["model"] + cols + [f"{monitor} vs none", "best epoch", "s/epoch"]
    return format_table(rows, header)


def plot(results: dict, monitor: str, path: Path) -> None:
    """PNG of the validation `monitor` per evaluated epoch, one line per student, teacher dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["students"].items():
        h = r["history"]
        ax.plot([e["epoch"] for e in h], [e["valid"][monitor] for e in h], label=name)
    tv = results["teacher"].get("valid", {}).get(monitor)
    if tv is not None:
        ax.axhline(tv, color="black", linestyle="--", linewidth=1, label="teacher")
    cfg = results["config"]
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {monitor}")
    ax.set_title(
        f"{cfg['data']['name']} ({cfg['protocol']}): student dim {cfg['student_dim']}, "
        f"teacher dim {cfg['teacher_dim']}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: this process's rank under torch.distributed (torchrun); only rank 0 writes files and logs
_RANK = 0


def _write_json(results, path: Path) -> None:
    if _RANK != 0:
        return
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))


def _specs(args):
    """The pipeline's specs from the command line."""
    from ..experiment import DataSpec, TeacherSpec, TrainSpec

    data = DataSpec(
        data=args.data,
        fmt=args.format,
        min_interactions=args.min_interactions,
        threshold=args.threshold,
        synthetic_users=args.synthetic_users,
        synthetic_items=args.synthetic_items,
        synthetic_seed=args.synthetic_seed,
        protocol=args.protocol,
        n_neg=args.n_neg,
        split_seed=args.split_seed,
        split_order=args.split_order,
        k_core=args.k_core,
    )
    train = TrainSpec(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        patience=args.patience,
        monitor=args.monitor,
        seed=args.seed,
        progress=not args.no_progress,
        backend=args.backend,
        device=args.device,
        valid_excludes_test=args.valid_excludes_test,
        checkpoint_every=args.checkpoint_every,
        grad_sync=args.grad_sync,
    )
    return data, TeacherSpec(model=args.teacher_model, dim=args.teacher_dim), train


@contextlib.contextmanager
def _exclusive(out: Path):
    """One kdfast distill at a time per --out folder: a lock file holding this process's id (a lock
    left by a process that is gone is taken over)."""
    lock = out / ".kdfast-distill.lock"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = _lock_owner(lock)
            if pid is not None and _alive(pid):
                raise UsageError(
                    f"--out {str(out)!r} is in use by another kdfast distill (process {pid}); "
                    "wait for it to finish or choose another --out"
                ) from None
            lock.unlink(missing_ok=True)
    else:
        raise UsageError(f"--out {str(out)!r}: cannot take the lock {lock}")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_owner(lock: Path):
    try:
        return int(lock.read_text().strip() or -1)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_history_csv(results, path: Path) -> None:
    if _RANK != 0:
        return
    """One row per model and evaluation: model, epoch, loss, loss_base, loss_kd and every
    validation metric (the teacher's rows when it was trained in this run)."""
    import csv
    import io

    runs = {"teacher": results["teacher"].get("history") or []}
    runs.update({name: r.get("history") or [] for name, r in results["students"].items()})
    metrics = sorted({m for h in runs.values() for e in h for m in e.get("valid", {})})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "epoch", "loss", "loss_base", "loss_kd", *metrics])
    for name, hist in runs.items():
        for e in hist:
            valid = e.get("valid", {})
            row = [name, e["epoch"], e.get("loss"), e.get("loss_base"), e.get("loss_kd")]
            w.writerow(row + [valid.get(m) for m in metrics])
    text = buf.getvalue()
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _train_unit(shared, label, name, options, log, on_validation):
    """One student (a method at one grid point), checkpointed under --out/checkpoints/LABEL.pt
    and saved to --out/students/LABEL.pt."""
    from .. import experiment

    out = shared["out"]
    lead = shared.get("rank", 0) == 0
    return experiment.train_student(
        shared["split"],
        shared["teacher"],
        name,
        options,
        student_model=shared["student_model"],
        student_dim=shared["student_dim"],
        train=shared["train"],
        log=log,
        save_to=out / "students" / f"{label}.pt" if lead else None,
        dataset=shared["dataset"],
        data_spec=shared["data_spec"],
        checkpoint=out / "checkpoints" / f"{label}.pt",
        resume=shared["resume"],
        on_validation=on_validation,
    )


_WORKER = {}


def _worker_init(shared, threads):
    import signal

    import torch

    from .._core import progress

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool
    torch.set_num_threads(threads)
    progress.set_enabled(False)
    _WORKER.update(shared)
    _WORKER["live"] = _LiveLog(shared["out"] / "history.csv", shared["tensorboard"], fresh=False)


def _worker_run(label, name, options):
    live = _WORKER["live"]
    try:
        return _train_unit(_WORKER, label, name, options, print, live.hook(label))
    finally:
        live.flush()


class _Students:
    """The students of a run: trained here one after another in the order asked for, or, with
    --jobs N > 1, all submitted at once to N worker processes (spawned; each with the threads of
    this process divided by N, at least one, or --threads), results taken in the run's order."""

    def __init__(self, shared, units, jobs, log, live, threads=None):
        self.shared, self.units, self.log, self.live = shared, units, log, live
        self.pool, self.futures = None, {}
        if jobs > 1 and len(units) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            import torch

            threads = threads or max(1, torch.get_num_threads() // jobs)
            log(
                f"students: {len(units)} in {min(jobs, len(units))} processes, "
                f"{threads} threads each"
            )
            self.pool = ProcessPoolExecutor(
                max_workers=min(jobs, len(units)),
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(shared, threads),
            )
            for label, (name, options) in units.items():
                self.futures[label] = self.pool.submit(_worker_run, label, name, options)

    def result(self, label):
        if self.pool is None:
            name, options = self.units[label]
            return _train_unit(self.shared, label, name, options, self.log, self.live.hook(label))
        return self.futures[label].result()

    def close(self, cancel=False):
        if self.pool is None:
            return
        if cancel:
            for proc in list(getattr(self.pool, "_processes", {}).values()):
                proc.terminate()  # their checkpoints keep what they did
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class _LiveLog:
    """Each evaluation as it happens: one row appended to --out/history.csv (rewritten whole from
    results.json when the run ends) and, with --tensorboard, scalars <model>/loss, loss_base,
    loss_kd and valid/<metric> at step = epoch."""

    def __init__(self, path: Path, tensorboard=None, *, fresh: bool):
        self.path, self.writer, self.columns = path, None, None
        if _RANK != 0:
            return
        if fresh and path.exists():
            path.unlink()  # a log without results (a run stopped before any model finished)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise UsageError(
                    f"--tensorboard needs the tensorboard package ({exc}); "
                    "pip install 'kdfast[tensorboard]'"
                ) from None
            self.writer = SummaryWriter(log_dir=str(tensorboard))

    def hook(self, model: str):
        if _RANK != 0:
            return None

        def on_validation(entry):
            self._row(model, entry)
            if self.writer is not None:
                step = entry["epoch"]
                for key in ("loss", "loss_base", "loss_kd"):
                    if entry.get(key) is not None:
                        self.writer.add_scalar(f"{model}/{key}", entry[key], step)
                for metric, v in entry["valid"].items():
                    self.writer.add_scalar(f"{model}/valid/{metric}", v, step)
                self.writer.flush()

        return on_validation

    def _row(self, model, entry):
        import csv

        metrics = sorted(entry["valid"])
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["model", "epoch", "loss", "loss_base", "loss_kd", *metrics])
            row = [model, entry["epoch"], entry["loss"], entry.get("loss_base")]
            w.writerow(row + [entry.get("loss_kd")] + [entry["valid"].get(m) for m in metrics])

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _keep_previous(out: Path, log) -> None:
    """A finished run's results.json (plot, saved students) in --out are renamed
    results-<time>.json (validation-<time>.png, students-<time>/), never overwritten."""
    old = out / "results.json"
    if not old.exists():
        return
    if _RANK != 0:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
    n, suffix = 0, ""
    while (out / f"results-{stamp}{suffix}.json").exists():
        n += 1
        suffix = f"-{n}"
    old.replace(out / f"results-{stamp}{suffix}.json")
    for base, ext in (("validation", "png"), ("history", "csv")):
        f = out / f"{base}.{ext}"
        if f.exists():
            f.replace(out / f"{base}-{stamp}{suffix}.{ext}")
    for folder in ("students", "checkpoints"):
        if (out / folder).is_dir():
            (out / folder).replace(out / f"{folder}-{stamp}{suffix}")
    log(f"--out held the results of an earlier run: kept as results-{stamp}{suffix}.json")


#: arguments that may differ between an interrupted run and its --resume
_RESUME_FREE = ("resume", "no_progress", "threads", "config", "out", "command", "jobs")


def _resumable(out: Path, args, log):
    """The results.json of the interrupted run in --out that --resume continues, checked against
    this command's arguments; None (with a note) when --out holds no run to resume."""
    path = out / "results.json"
    if not path.exists():
        log("--resume: --out holds no earlier run; starting afresh")
        return None
    try:
        old = json.loads(path.read_text())
        old_args = old["config"]["args"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--resume: {path} is not a kdfast results file ({exc})") from None
    new_args = {k: v for k, v in vars(args).items() if k not in ("func",)}
    differ = [
        f"--{k.replace('_', '-')} {old_args.get(k)!r} (now {new_args.get(k)!r})"
        for k in sorted(set(old_args) | set(new_args))
        if k not in _RESUME_FREE and old_args.get(k) != new_args.get(k)
    ]
    if differ:
        raise UsageError(
            "--resume: this command differs from the run in --out: "
            + "; ".join(differ)
            + " (rerun that run's command with --resume, or drop --resume to start a new run)"
        )
    return old


def _quiet(*args, **kwargs):
    pass


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args) -> int:
    import signal
    import threading

    global _RANK
    _check_args(args)
    out = Path(args.out)
    _check_writable(out, "--out folder")
    owned = _start_distributed(args)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        with _exclusive(out) if _RANK == 0 else contextlib.nullcontext():
            return _run(args, out)
    except KeyboardInterrupt:
        if (out / "checkpoints").is_dir():
            print(
                f"stopped; the checkpoints in {out / 'checkpoints'} keep the training so far: "
                "rerun the same command with --resume to continue",
                file=sys.stderr,
            )
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if owned:
            import torch.distributed as dist

            dist.destroy_process_group()
        _RANK = 0


def _start_distributed(args) -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the process group (gloo on the
    CPU, NCCL for --device cuda) with --dist-timeout; returns whether this call created it."""
    global _RANK
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return False
    if args.jobs > 1:
        raise UsageError("--jobs runs students in worker processes; under torchrun use --jobs 1")
    import torch.distributed as dist

    from .. import distributed

    owned = not (dist.is_available() and dist.is_initialized())
    backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
    try:
        _RANK, _ = distributed.init(backend, timeout_s=args.dist_timeout)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"torch.distributed: cannot join the process group: {exc}") from None
    if backend == "nccl" and args.device == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return owned


def _run(args, out: Path) -> int:
    import dataclasses

    import torch

    from .. import experiment, metrics
    from .._core import backend as _backend
    from ..data.datasets import sniff_format

    methods = parse_methods(args.methods)
    overrides = parse_options(args.option, [m for m, _ in methods])
    grids = parse_sweeps(args.sweep, [m for m, _ in methods])
    methods = [(m, {**opts, **overrides.get(m, {})}) for m, opts in methods]
    methods = [(m, _validated(m, opts) if m != "none" else {}) for m, opts in methods]
    for m, opts in methods:  # every grid point checked before any training
        for point in grids.get(m, []):
            _validated(m, {**opts, **point})
    teacher_path = Path(args.teacher) if args.teacher else out / "teacher.pt"
    if not teacher_path.exists():
        _check_writable(teacher_path.parent, "the folder of the teacher file")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .._core import progress

    progress.set_enabled(False if args.no_progress else None)
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"--device {args.device!r} is not usable here: {exc}") from None
    try:
        _backend.resolve(args.backend, device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--backend: {exc}") from None
    data_spec, teacher_spec, train = _specs(args)
    monitor = train.monitor_for(args.protocol)
    if monitor not in metrics.metric_names(args.protocol):
        raise UsageError(
            f"--monitor {monitor!r} is not a {args.protocol} metric; choose from "
            f"{', '.join(metrics.metric_names(args.protocol))}"
        )
    try:
        dataset, split = experiment.load_split(data_spec)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--data {args.data}: {exc}") from None
    log = print if _RANK == 0 else _quiet
    previous = _resumable(out, args, log) if args.resume else None
    if previous is None:
        _keep_previous(out, log)
    elif previous.get("environment", {}).get("finished"):
        log(f"--resume: the run in {out} had finished; nothing to do")
        log(report_table(previous, args.protocol, monitor))
        return 0
    checkpoints = out / "checkpoints"
    live = _LiveLog(out / "history.csv", args.tensorboard, fresh=previous is None)
    try:
        log(f"data: {dataset.describe()}")
        if args.format == "auto" and Path(args.data).is_file():
            found = sniff_format(args.data)
            log(f"format: {found['format']} (detected from the content: {found['why']})")
        log(f"split: {split.describe()}")
        if args.export_split and _RANK == 0:
            from .. import data as kdata

            try:
                kdata.export_split(dataset, split, args.export_split)
            except OSError as exc:
                raise UsageError(f"--export-split {args.export_split}: {exc}") from None
            log(f"split: written to {args.export_split}")
        config = {k: v for k, v in vars(args).items() if k != "func"}
        config["args"] = {
            k: v for k, v in vars(args).items() if k not in ("func", "command", "config")
        }
        config.update(
            {
                "data": dataset.describe(),
                "split": split.describe(),
                "monitor": monitor,
                "methods": [m for m, _ in methods],
                "method_options": {m: o for m, o in methods if o},
                "resolved_method_options": {m: _resolved(m, o) for m, o in methods if m != "none"},
                "teacher_file": str(teacher_path),
            }
        )
        results = {
            "config": config,
            "environment": _environment(args, device),
            "teacher": {},
            "students": {},
        }
        if previous is not None:  # the interrupted run's start, and when each part resumed
            env = previous.get("environment", {})
            results["environment"]["started"] = env.get("started")
            results["environment"]["resumed"] = env.get("resumed", []) + [
                time.strftime("%Y-%m-%dT%H:%M:%S%z")
            ]
        teacher_train = dataclasses.replace(train, epochs=args.teacher_epochs or args.epochs)
        try:
            teacher = experiment.get_teacher(
                dataset,
                split,
                data_spec,
                teacher_spec,
                teacher_train,
                path=teacher_path if _RANK == 0 or teacher_path.exists() else None,
                log=log,
                checkpoint=checkpoints / "teacher.pt",
                resume=previous is not None,
                on_validation=live.hook("teacher"),
            )
        except (OSError, ValueError, RuntimeError) as exc:
            if teacher_path.exists():
                raise UsageError(str(exc)) from None
            raise
        results["teacher"] = experiment.teacher_summary(teacher, split, backend=args.backend)
        before = (previous or {}).get("teacher") or {}
        if teacher.loaded and before.get("loaded") is False and before.get("file") == teacher.file:
            results["teacher"] = before  # trained by the interrupted run: its measured summary
        _write_json(results, out / "results.json")

        done = (previous or {}).get("students", {})
        units = {}  # label -> (method, its options at this grid point)
        for name, opts in methods:
            resolved = _resolved(name, opts) if name != "none" else {}
            if not (name in done and done[name].get("options") == resolved):
                for point in grids.get(name, [{}]):
                    units[_label(name, point)] = (
                        name,
                        _validated(name, {**opts, **point}) if point else opts,
                    )
        shared = {
            "split": split,
            "teacher": teacher,
            "dataset": dataset,
            "data_spec": data_spec,
            "train": train,
            "student_model": args.student_model,
            "student_dim": args.student_dim,
            "out": out,
            "resume": previous is not None,
            "tensorboard": args.tensorboard,
            "rank": _RANK,
        }
        pool = _Students(shared, units, args.jobs, log, live, threads=args.threads)
        try:
            for name, opts in methods:
                resolved = _resolved(name, opts) if name != "none" else {}
                if name in done and done[name].get("options") == resolved:
                    results["students"][name] = done[name]  # finished before the interruption
                    log(f"student {name}: finished in the interrupted run")
                    continue
                grid = []
                for point in grids.get(name, [{}]):
                    label = _label(name, point)
                    r = pool.result(label)
                    grid.append((point, r))
                    if point:
                        log(f"[sweep {label}] valid {monitor} {r['valid'][monitor]:.4f}")
                # the setting chosen on validation (the first of equals); test reported for it only
                point, best = max(grid, key=lambda pr: pr[1]["valid"][monitor])
                if name in grids:
                    best = dict(best)
                    best["sweep"] = {
                        "chosen": point,
                        "monitor": monitor,
                        "grid": [
                            {
                                "options": p,
                                "valid": r["valid"],
                                "best_epoch": r["best_epoch"],
                                "file": r.get("file"),
                            }
                            for p, r in grid
                        ],  # fmt: skip
                    }
                best = dict(best, options=resolved)
                results["students"][name] = best
                _write_json(results, out / "results.json")
        except BaseException:
            pool.close(cancel=True)
            raise
        pool.close()

        results["environment"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_history_csv(results, out / "history.csv")
        _write_json(results, out / "results.json")
        if _RANK != 0:
            return 0
        plot(results, monitor, out / "validation.png")
        if checkpoints.is_dir():  # the run is complete: its checkpoints are no longer needed
            import shutil

            shutil.rmtree(checkpoints, ignore_errors=True)
        print()
        print(report_table(results, args.protocol, monitor))
        print(f"\nwrote {out / 'results.json'} and {out / 'validation.png'}")
        return 0
    finally:
        live.close()
