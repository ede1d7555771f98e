"""The experiment pipeline: data and split, the teacher (loaded when a saved one matches, else
trained and saved), one student per KD method, and the summary of the results.

`kdfast distill`, bench/cpu_epoch.py and results/hetcomp_teachers.py all run through these
functions, so a teacher is never reused on other data or another split, whoever asks for it:

    spec = DataSpec(data="citeulike-t", protocol="loo")
    dataset, split = load_split(spec)
    train = TrainSpec(epochs=200, eval_every=5)
    teacher = get_teacher(dataset, split, spec, TeacherSpec("bprmf", 200), train, path="t.pt")
    result = train_student(split, teacher, "rrd", {"lam": 0.01}, student_dim=20, train=train)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data as kdata
from . import metrics
from .families import dot_tables
from .models import build_model, load_teacher, save_embeddings, save_teacher
from .train import DEFAULT_MONITOR, Trainer

#: the columns of the summary per protocol (the monitored metric is added when it is not among them)
SUMMARY = {
    "loo": ("NDCG@10", "HR@10", "MRR@10", "NDCG@20"),
    "full": ("Recall@20", "NDCG@20", "Recall@50", "NDCG@50"),
}


@dataclass(frozen=True)
class DataSpec:
    """Which data and which split: everything a saved teacher's fingerprint must match."""

    data: str = "synthetic"
    fmt: str = "auto"
    min_interactions: int = 5
    threshold: float = 4.0
    synthetic_users: int = 2000
    synthetic_items: int = 1500
    synthetic_seed: int = 0
    protocol: str = "loo"
    n_neg: int = 499
    split_seed: int = 0
    split_order: str = "random"
    k_core: int | None = None


@dataclass(frozen=True)
class TrainSpec:
    """How a model is trained and evaluated (kdfast.Trainer's options)."""

    epochs: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-3
    eval_every: int = 1
    patience: int = 20
    monitor: str | None = None
    seed: int = 0
    progress: bool = False
    backend: str = "auto"
    device: str = "cpu"
    valid_excludes_test: bool = False
    checkpoint_every: int = 1
    grad_sync: str = "dense"

    def monitor_for(self, protocol: str) -> str:
        return self.monitor or DEFAULT_MONITOR[protocol]


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher model: its family and dimension."""

    model: str = "bprmf"
    dim: int = 200


@dataclass
class Teacher:
    """A teacher's score embeddings, its metadata, and whether it was loaded or trained in this
    run."""

    user: torch.Tensor
    item: torch.Tensor
    meta: dict
    loaded: bool
    file: str | None = None
    result: dict = field(default_factory=dict)


def load_split(spec: DataSpec):
    """(dataset, split) of a DataSpec; OSError/ValueError for missing or malformed data."""
    options = {}
    if spec.data == "synthetic":
        options = {"n_users": spec.synthetic_users, "n_items": spec.synthetic_items}
    dataset = kdata.load(
        spec.data,
        fmt=spec.fmt,
        min_user_interactions=spec.min_interactions,
        threshold=spec.threshold,
        seed=spec.synthetic_seed,
        k_core=spec.k_core,
        **options,
    )
    split = kdata.make_split(
        dataset, spec.protocol, seed=spec.split_seed, n_neg=spec.n_neg, order=spec.split_order
    )
    return dataset, split


def teacher_fingerprint(dataset, spec: DataSpec, teacher: TeacherSpec) -> dict:
    """The metadata a saved teacher must match to be reused: data, protocol, split and model."""
    temporal = spec.split_order == "temporal"
    expect = {
        "data_fingerprint": dataset.fingerprint(timestamps=temporal),
        "protocol": spec.protocol,
        "split_seed": spec.split_seed,
        "model": teacher.model,
        "dim": teacher.dim,
    }
    if temporal:  # (absent for random splits: teachers saved before the option still match)
        expect["split_order"] = spec.split_order
    if spec.protocol == "loo":
        expect["n_neg"] = spec.n_neg
    return expect


def new_model(kind: str, dim: int, split, generator: torch.Generator, device="cpu"):
    """A freshly initialised model (BPR-MF or LightGCN) of the split's users and items."""
    model = build_model(kind, split.n_users, split.n_items, dim, split.train, generator=generator)
    return model.to(device)


def fit(
    model,
    split,
    train: TrainSpec,
    *,
    method=None,
    name="model",
    log=print,
    on_epoch_end=None,
    checkpoint=None,
    resume=False,
    on_validation=None,
):
    """Train a model (with a KD method, or plain BPR) under the TrainSpec: Trainer.fit()'s
    result. checkpoint, resume, on_validation: see kdfast.Trainer."""
    trainer = Trainer(
        model,
        split,
        method=method,
        epochs=train.epochs,
        batch_size=train.batch_size,
        lr=train.lr,
        weight_decay=train.weight_decay,
        eval_every=train.eval_every,
        patience=train.patience,
        monitor=train.monitor_for(split.protocol),
        seed=train.seed,
        progress=train.progress,
        log=log,
        name=name,
        backend=train.backend,
        on_epoch_end=on_epoch_end,
        valid_excludes_test=train.valid_excludes_test,
        checkpoint=checkpoint,
        checkpoint_every=train.checkpoint_every,
        grad_sync=train.grad_sync,
        resume=resume,
        on_validation=on_validation,
    )
    result = trainer.fit()
    if trainer.model is not model:  # (restored models are restored in place; never expected)
        raise RuntimeError("the trainer replaced the model")
    return result


def train_model(
    kind: str,
    dim: int,
    split,
    train: TrainSpec,
    *,
    name="model",
    log=print,
    on_epoch_end=None,
    checkpoint=None,
    resume=False,
    on_validation=None,
):
    """A fresh model, initialised from a generator seeded with train.seed, trained without KD;
    returns (model, Trainer.fit()'s result). checkpoint, resume, on_validation: see
    kdfast.Trainer."""
    model = new_model(kind, dim, split, torch.Generator().manual_seed(train.seed), train.device)
    result = fit(
        model,
        split,
        train,
        name=name,
        log=log,
        on_epoch_end=on_epoch_end,
        checkpoint=checkpoint,
        resume=resume,
        on_validation=on_validation,
    )
    return model, result


def get_teacher(
    dataset,
    split,
    data_spec: DataSpec,
    teacher: TeacherSpec,
    train: TrainSpec,
    *,
    path=None,
    log=print,
    checkpoint=None,
    resume=False,
    on_validation=None,
) -> Teacher:
    """The teacher: loaded from `path` when it exists (its fingerprint must match this data, split
    and model: ValueError otherwise), else trained and, with a path, saved there. checkpoint,
    resume, on_validation: the training's (kdfast.Trainer)."""
    expect = teacher_fingerprint(dataset, data_spec, teacher)
    device = torch.device(train.device)
    if path is not None and Path(path).exists():
        user, item, meta = load_teacher(path, expect=expect)
        if log is not None:
            log(
                f"teacher: loaded {path} (trained {meta.get('epochs_run')} epochs, "
                f"best {meta.get('best_epoch')})"
            )
        return Teacher(user.to(device), item.to(device), meta, loaded=True, file=str(path))
    model, result = train_model(
        teacher.model,
        teacher.dim,
        split,
        train,
        name="teacher",
        log=log,
        checkpoint=checkpoint,
        resume=resume,
        on_validation=on_validation,
    )
    user, item = (t.clone() for t in dot_tables(model))  # exact scores as dot products
    monitor = train.monitor_for(split.protocol)
    keys = ("best_epoch", "epochs_run", "seconds_per_epoch", "valid", "test", "history")
    meta = dict(
        expect,
        data_spec=asdict(data_spec),
        seed=train.seed,
        data_name=dataset.name,
        monitor=monitor,
        train=asdict(train),
        **{k: result[k] for k in keys},
    )
    if path is not None:
        save_teacher(path, user, item, meta, **id_maps(dataset))
        if log is not None:
            log(f"teacher: saved {path}")
    return Teacher(
        user, item, meta, loaded=False, file=None if path is None else str(path), result=result
    )


def build_method(name: str, teacher: Teacher, split, student_dim: int, options: dict, *, generator):
    """The KD method `name` built on the teacher (options validated by the registry), or None for
    "none"."""
    if name == "none":
        return None
    from .methods.registry import method_class, validate_options

    cls, _ = method_class(name)
    return cls.build(
        teacher.user,
        teacher.item,
        split.train,
        student_dim,
        generator=generator,
        **validate_options(name, options),
    )


def id_maps(dataset) -> dict:
    """{"user_ids", "item_ids"}: the original ids of the dataset's rows (for saved tables)."""
    return {"user_ids": dataset.user_ids, "item_ids": dataset.item_ids}


def train_student(
    split,
    teacher: Teacher,
    name: str,
    options: dict,
    *,
    student_model="bprmf",
    student_dim=20,
    train: TrainSpec,
    log=print,
    save_to=None,
    dataset=None,
    data_spec: DataSpec | None = None,
    checkpoint=None,
    resume=False,
    on_validation=None,
) -> dict:
    """A fresh student trained with the method `name`: Trainer.fit()'s result, plus "wall_seconds"
    (training and evaluation) and "setup_seconds" (building the method: the teacher's lists).

    One generator seeded with train.seed initialises the student and then builds the method, in
    that order (seeded runs reproduce the results of earlier versions). save_to: a path where the
    student (its best-validation tables, kdfast.models.save_embeddings role "student") is saved
    with its method, options, data and training settings and metrics; dataset and data_spec are
    then required (the id maps, the data fingerprint, how to rebuild the split). checkpoint,
    resume, on_validation: the training's (kdfast.Trainer); a resumed student is built exactly as
    the first time (same generator draws), then its checkpoint restored."""
    gen = torch.Generator().manual_seed(train.seed)
    model = new_model(student_model, student_dim, split, gen, train.device)
    t0 = time.perf_counter()
    method = build_method(name, teacher, split, student_dim, options, generator=gen)
    if method is not None:
        method = method.to(train.device)
    t1 = time.perf_counter()
    result = fit(
        model,
        split,
        train,
        method=method,
        name=f"student {name}",
        log=log,
        checkpoint=checkpoint,
        resume=resume,
        on_validation=on_validation,
    )
    result["wall_seconds"] = time.perf_counter() - t1
    result["setup_seconds"] = t1 - t0
    if save_to is not None:
        if dataset is None or data_spec is None:
            raise ValueError("save_to needs dataset and data_spec (the saved student's data)")
        user, item = dot_tables(model)
        meta = {
            "method": name,
            "options": dict(options),
            "model": student_model,
            "dim": student_dim,
            "data_fingerprint": dataset.fingerprint(),
            "data_spec": asdict(data_spec),
            "train": asdict(train),
            "teacher": {k: teacher.meta.get(k) for k in ("model", "dim", "data_fingerprint")},
            **{k: result[k] for k in ("best_epoch", "epochs_run", "valid", "test")},
        }
        save_embeddings(save_to, user, item, meta, role="student", **id_maps(dataset))
        result["file"] = str(save_to)
    return result


def teacher_summary(teacher: Teacher, split, backend: str = "auto") -> dict:
    """The teacher's entry of results.json: metrics on this split (evaluated here when it was
    loaded)."""
    if teacher.loaded:
        meta = teacher.meta
        return {
            "loaded": True,
            "file": teacher.file,
            "best_epoch": meta.get("best_epoch"),
            "seconds_per_epoch": meta.get("seconds_per_epoch"),
            "valid": metrics.evaluate(teacher.user, teacher.item, split, "valid", backend=backend),
            "test": metrics.evaluate(teacher.user, teacher.item, split, "test", backend=backend),
            "history": meta.get("history", []),
        }
    keys = ("best_epoch", "seconds_per_epoch", "epochs_run", "valid", "test", "history")
    return {"loaded": False, "file": teacher.file, **{k: teacher.result[k] for k in keys}}


# ---------------------------------------------------------------------------------------- summary
def summary_columns(protocol: str, monitor: str) -> list:
    cols = list(SUMMARY[protocol])
    if monitor not in cols:
        cols.append(monitor)
    return cols


def summary_rows(
    teacher_test: dict, students: dict, cols, monitor: str, *, teacher_label="teacher"
):
    """Rows [label, metric values..., change of `monitor` vs the no-KD student "none", best epoch,
    s/epoch] for the teacher and each student (students: label -> result; a label's method name is
    its text before any " (" options suffix)."""
    rows = [[teacher_label] + [f"{teacher_test[c]:.4f}" for c in cols]]
    base = students.get("none", {}).get("test", {}).get(monitor)
    for label, r in students.items():
        rel = ""
        if base and label != "none":
            rel = f"{100.0 * (r['test'][monitor] / base - 1.0):+.1f}%"
        rows.append([label] + [f"{r['test'][c]:.4f}" for c in cols] + [rel])
    return rows


def format_table(rows, header, *, markdown: bool = False) -> str:
    """A plain aligned text table, or a markdown one."""
    rows = [[str(c) for c in r] + [""] * (len(header) - len(r)) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in rows + [list(header)]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "-" * len(line)] + body)
