"""Train / validation / test splits of Interactions (docs/METHODS.md section 1).

leave_one_out: per user one validation and one test item held out at random; each is ranked among
    n_neg (499) items sampled uniformly, without replacement, from the items the user never
    interacted with (500 candidates). Users with fewer than 3 interactions stay entirely in training
    and are not evaluated.
random_split: per user a random 60% / 20% / 20% of the items for train / valid / test (HetComp's
    full-ranking protocol, seed 0); at least one training item per user.
Both are seeded (numpy PCG64) and deterministic, independent of torch's global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._core.csr import from_lists
from .datasets import Interactions


@dataclass(frozen=True)
class Split:
    """A split of one data set.

    protocol: "loo" (leave-one-out with sampled candidates) or "full" (full-ranking).
    train, valid, test: int64 CSR pairs (indptr [n_users + 1], indices), rows sorted.
    eval_users: int64 [n_eval] users that have validation/test items.
    valid_candidates, test_candidates (loo only): int64 [n_eval, 1 + n_neg]; column 0 is the
        held-out item, the rest are the sampled unobserved items.
    seed: the split's seed; data_fingerprint: Interactions.fingerprint() of the data split.
    """

    protocol: str
    n_users: int
    n_items: int
    train: tuple
    valid: tuple
    test: tuple
    eval_users: torch.Tensor
    seed: int
    data_fingerprint: str
    valid_candidates: torch.Tensor | None = None
    test_candidates: torch.Tensor | None = None

    @property
    def n_train(self) -> int:
        return int(self.train[1].numel())

    def describe(self) -> dict:
        d = {
            "protocol": self.protocol,
            "seed": self.seed,
            "train": self.n_train,
            "valid": int(self.valid[1].numel()),
            "test": int(self.test[1].numel()),
            "eval_users": int(self.eval_users.numel()),
            "data_fingerprint": self.data_fingerprint,
        }
        if self.valid_candidates is not None:
            d["candidates"] = int(self.valid_candidates.shape[1])
        return d


def _sample_unobserved(rng, n_items, observed_sorted, n):
    """n distinct items in [0, n_items) not in observed_sorted (rejection sampling, then a fallback
    through the complement when rejections are frequent)."""
    free = n_items - len(observed_sorted)
    if free < n:
        raise ValueError(
            f"n_neg={n} negatives requested but a user has only {free} unobserved items"
        )
    if free < 2 * n:
        comp = np.setdiff1d(np.arange(n_items), observed_sorted, assume_unique=True)
        return rng.choice(comp, size=n, replace=False)
    out = np.zeros(0, dtype=np.int64)
    while len(out) < n:
        draw = rng.integers(0, n_items, size=2 * n)
        pos = np.searchsorted(observed_sorted, draw)
        hit = (pos < len(observed_sorted)) & (
            observed_sorted[np.minimum(pos, len(observed_sorted) - 1)] == draw
        )
        draw = np.concatenate([out, draw[~hit]])
        _, first = np.unique(draw, return_index=True)
        out = draw[np.sort(first)]
    return out[:n]


def leave_one_out(data: Interactions, *, n_neg: int = 499, seed: int = 0) -> Split:
    """Leave-one-out split: per user (with >= 3 items) one random validation and one random test
    item, each with n_neg sampled unobserved negatives."""
    if n_neg < 1:
        raise ValueError(f"n_neg must be >= 1, got {n_neg}")
    rng = np.random.default_rng(seed)
    indptr, indices = data.indptr.numpy(), data.indices.numpy()
    train_rows, valid_rows, test_rows = [], [], []
    eval_users, vc, tc = [], [], []
    for u in range(data.n_users):
        items = indices[indptr[u] : indptr[u + 1]]
        if len(items) < 3:
            train_rows.append(items)
            valid_rows.append([])
            test_rows.append([])
            continue
        pick = rng.choice(len(items), size=2, replace=False)
        v, t = items[pick[0]], items[pick[1]]
        train_rows.append(np.delete(items, pick))
        valid_rows.append([v])
        test_rows.append([t])
        eval_users.append(u)
        vc.append(np.concatenate([[v], _sample_unobserved(rng, data.n_items, items, n_neg)]))
        tc.append(np.concatenate([[t], _sample_unobserved(rng, data.n_items, items, n_neg)]))
    if not eval_users:
        raise ValueError("leave_one_out: no user has >= 3 interactions")
    return Split(
        "loo",
        data.n_users,
        data.n_items,
        from_lists(train_rows, data.n_users),
        from_lists(valid_rows, data.n_users),
        from_lists(test_rows, data.n_users),
        torch.tensor(eval_users, dtype=torch.int64),
        seed,
        data.fingerprint(),
        torch.from_numpy(np.stack(vc).astype(np.int64)),
        torch.from_numpy(np.stack(tc).astype(np.int64)),
    )


def random_split(data: Interactions, *, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> Split:
    """Per-user random split into train / valid / test by the given fractions (rounded; train gets
    at least one item and the remainder goes to test). Evaluated users: those with a test item."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or abs(f.sum() - 1.0) > 1e-9 or f[0] <= 0:
        raise ValueError(
            "fractions must be three non-negative numbers summing to 1 with train > 0, "
            f"got {fractions}"
        )
    rng = np.random.default_rng(seed)
    indptr, indices = data.indptr.numpy(), data.indices.numpy()
    tr, va, te, eval_users = [], [], [], []
    for u in range(data.n_users):
        items = rng.permutation(indices[indptr[u] : indptr[u + 1]])
        n = len(items)
        n_tr = max(1, int(round(f[0] * n)))
        n_va = min(n - n_tr, int(round(f[1] * n)))
        tr.append(items[:n_tr])
        va.append(items[n_tr : n_tr + n_va])
        te.append(items[n_tr + n_va :])
        if n - n_tr - n_va > 0:
            eval_users.append(u)
    if not eval_users:
        raise ValueError("random_split: no user has a test item")
    return Split(
        "full",
        data.n_users,
        data.n_items,
        from_lists(tr, data.n_users),
        from_lists(va, data.n_users),
        from_lists(te, data.n_users),
        torch.tensor(eval_users, dtype=torch.int64),
        seed,
        data.fingerprint(),
    )


def make_split(data: Interactions, protocol: str, *, seed: int = 0, n_neg: int = 499) -> Split:
    """leave_one_out for protocol "loo", random_split (60/20/20) for "full"."""
    if protocol == "loo":
        return leave_one_out(data, n_neg=n_neg, seed=seed)
    if protocol == "full":
        return random_split(data, seed=seed)
    raise ValueError(f"protocol must be 'loo' or 'full', got {protocol!r}")
