"""`kdfast evaluate`: reload a saved student or teacher (OUT/students/METHOD.pt, OUT/teacher.pt),
evaluate it on the split it was trained on, and export its tables as arrays.

    kdfast evaluate runs/demo/students/rrd.pt
    kdfast evaluate runs/demo/students/rrd.pt --data path/to/users.dat --export rrd.npz

The split is rebuilt from the settings saved in the file (data, format, filters, protocol, split
seed); its data fingerprint must match the file's, so a model is never scored on other data. The
metrics (valid and test, the protocol's) are printed as JSON. --export writes an .npz with user
[U, d] and item [I, d] (float32; scores = user @ item.T) and user_ids / item_ids (the data file's
ids of the rows, as strings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UsageError


def add_arguments(p) -> None:
    p.add_argument("file", help="a saved student or teacher (.pt, as kdfast distill writes them)")
    p.add_argument(
        "--data",
        default=None,
        help="the data file or folder, when it has moved since training (default: the saved path)",
    )
    p.add_argument("--export", metavar="NPZ", default=None, help="write the tables and ids here")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "numba", "triton"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def run(args) -> int:
    import torch

    from .. import experiment, metrics
    from ..models import load_embeddings

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.file)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    try:
        saved = load_embeddings(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    meta = saved["meta"]
    spec = meta.get("data_spec")
    if not isinstance(spec, dict):
        raise UsageError(
            f"{path} does not record its data settings (a teacher file written before they were "
            "saved): it cannot be re-evaluated"
        )
    if args.data is not None:
        spec = dict(spec, data=args.data)
    try:
        dataset, split = experiment.load_split(experiment.DataSpec(**spec))
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(
            f"the saved data {spec.get('data')!r}: {exc} (--data gives its path)"
        ) from None
    if dataset.fingerprint() != meta.get("data_fingerprint"):
        raise UsageError(
            f"the data at {spec.get('data')!r} is not the data {path} was trained on (fingerprint "
            f"{dataset.fingerprint()} against {meta.get('data_fingerprint')})"
        )
    user, item = saved["user"], saved["item"]
    if user.shape[0] != split.n_users or item.shape[0] != split.n_items:
        raise UsageError(f"{path}: its tables do not match the split's users and items")
    out = {"file": str(path), "role": saved["role"], "method": meta.get("method")}
    for part in ("valid", "test"):
        out[part] = metrics.evaluate(user, item, split, part, backend=args.backend)
    print(json.dumps(out, indent=1))
    if args.export:
        ids = {
            k: np.asarray(saved[k] if saved[k] is not None else [], dtype=object)
            for k in ("user_ids", "item_ids")
        }
        target = Path(args.export)
        if target.suffix != ".npz":
            target = target.with_name(target.name + ".npz")
        np.savez(
            target,
            user=user.numpy(),
            item=item.numpy(),
            user_ids=ids["user_ids"].astype(str),
            item_ids=ids["item_ids"].astype(str),
        )
        print(f"wrote {target}")
    return 0
