"""Ranking metrics for the two protocols of docs/METHODS.md section 1, computed without a dense
users x items matrix.

Leave-one-out (sampled candidates): the held-out item's 0-based rank r among its candidates counts
    the negatives scoring >= it (ties count against the model, so a constant model scores as badly
    as it can); HR@N = [r < N], NDCG@N = [r < N] / log2(r + 2), MRR@N = [r < N] / (r + 1).
Full ranking: each user's top-K over all items except the excluded ones (training items; for the
    test part also the validation items), from kdfast.topk_scores in user batches; with binary gains
    and hits h_p at 0-based positions p: Recall@K = sum_p h_p / |GT|, Precision@K = sum_p h_p / K,
    NDCG@K = sum_p h_p / log2(p + 2) / sum_{p < min(|GT|, K)} 1 / log2(p + 2).
All metrics are means over the users that have ground truth for the part evaluated.
"""

from __future__ import annotations

import torch

from ._core.csr import concat_rows, has_pair, pair_keys, select_rows

LOO_NS = (5, 10, 20)
FULL_KS = (10, 20, 50)


def metric_names(protocol: str, ns=LOO_NS, ks=FULL_KS) -> list:
    """The names evaluate() returns for a protocol ("loo": HR/NDCG/MRR@N, "full":
    Recall/NDCG/Precision@K)."""
    if protocol == "loo":
        return [f"{m}@{n}" for n in ns for m in ("HR", "NDCG", "MRR")]
    if protocol == "full":
        return [f"{m}@{k}" for k in ks for m in ("Recall", "NDCG", "Precision")]
    raise ValueError(f"protocol must be 'loo' or 'full', got {protocol!r}")


def held_out_rank(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of column 0 among each row of candidate scores [n, C]: the candidates that
    score >= it (ties count against the model)."""
    return (scores[:, 1:] >= scores[:, :1]).sum(1)


def loo_ranks(user_emb, item_emb, users, candidates, *, batch: int = 512) -> torch.Tensor:
    """0-based rank of candidates[:, 0] among each row of candidates (ties pessimistic).

    user_emb [U, d], item_emb [I, d] float; users int64 [n]; candidates int64 [n, C] (column 0 = the
    held-out item). Scores <e_u, e_i> by gather + batched dot, `batch` users at a time. Returns
    int64 [n].
    """
    out = torch.empty(users.numel(), dtype=torch.int64)
    with torch.no_grad():
        for b0 in range(0, users.numel(), batch):
            u = user_emb[users[b0 : b0 + batch].to(user_emb.device)]
            c = item_emb[candidates[b0 : b0 + batch].to(item_emb.device)]
            s = torch.bmm(c, u.unsqueeze(2)).squeeze(2)
            out[b0 : b0 + batch] = held_out_rank(s).cpu()
    return out


def loo_metrics(ranks: torch.Tensor, ns=LOO_NS) -> dict:
    """HR@N, NDCG@N, MRR@N (means over users) from 0-based ranks (int64 [n])."""
    r = ranks.to(torch.float64)
    out = {}
    for n in ns:
        hit = (r < n).to(torch.float64)
        out[f"HR@{n}"] = float(hit.mean())
        out[f"NDCG@{n}"] = float((hit / torch.log2(r + 2)).mean())
        out[f"MRR@{n}"] = float((hit / (r + 1)).mean())
    return out


def full_topk(
    user_emb, item_emb, users, exclude, k: int, *, batch: int = 1024, backend: str = "auto"
) -> torch.Tensor:
    """Top-k item ids (int64 [n, k], -1 where fewer remain) of each user in `users` by <e_u, e_i>,
    excluding the items of `exclude` (a CSR pair over all users), via kdfast.topk_scores in batches
    of `batch` users."""
    from ._core import progress
    from .ops.topk import topk_scores

    out = torch.empty((users.numel(), k), dtype=torch.int64)
    pairs = users.numel() * float(item_emb.shape[0])
    with (
        torch.no_grad(),
        progress.bar(users.numel(), "evaluation", pairs=pairs, unit="user") as bar,
    ):
        ue, ie = user_emb.detach(), item_emb.detach()
        for b0 in range(0, users.numel(), batch):
            ub = users[b0 : b0 + batch]
            ex = select_rows(*exclude, ub)
            _, idx = topk_scores(ue[ub.to(ue.device)], ie, k, exclude=ex, backend=backend)
            out[b0 : b0 + batch] = idx.cpu()
            bar.update(ub.numel())
    return out


def full_metrics(topk: torch.Tensor, truth, n_items: int, ks=FULL_KS) -> dict:
    """Recall@K, NDCG@K, Precision@K (means over rows) of top-k lists against ground truth.

    topk: int64 [n, k_max] ranked item ids (-1 = empty slot); truth: CSR pair with n rows of
    relevant items (sorted within rows or not; every row non-empty); n_items: the id bound.
    """
    n, kmax = topk.shape
    if max(ks) > kmax:
        raise ValueError(f"ks {tuple(ks)} exceed the {kmax} ranked items per user")
    indptr, indices = truth
    sizes = (indptr[1:] - indptr[:-1]).to(torch.float64)
    if bool((sizes == 0).any()):
        raise ValueError("truth has users with no relevant items")
    gt_keys = pair_keys(indptr, indices, n_items)
    hits = (has_pair(gt_keys, torch.arange(n).unsqueeze(1) * n_items + topk) & (topk >= 0)).to(
        torch.float64
    )
    disc = 1.0 / torch.log2(torch.arange(kmax, dtype=torch.float64) + 2)
    out = {}
    for k in ks:
        h = hits[:, :k]
        idcg = torch.cumsum(disc[:k], 0)[(sizes.clamp_max(k) - 1).long()]
        out[f"Recall@{k}"] = float((h.sum(1) / sizes).mean())
        out[f"NDCG@{k}"] = float(((h * disc[:k]).sum(1) / idcg).mean())
        out[f"Precision@{k}"] = float((h.sum(1) / k).mean())
    return out


def evaluate_scorer(
    score_pairs,
    split,
    part: str = "valid",
    *,
    ns=LOO_NS,
    ks=FULL_KS,
    valid_excludes_test: bool = False,
    batch: int = 64,
) -> dict:
    """evaluate() for a model whose scores do not factorise (NeuMF): score_pairs(users [n], items
    [m]) -> [n, m] scores. loo: each row's candidates scored `batch` users at a time (the scores of
    the batch's users against the union of their candidates); full: kdfast.topk_from_scorer."""
    if part not in ("valid", "test"):
        raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
    with torch.no_grad():
        if split.protocol == "loo":
            cands = split.valid_candidates if part == "valid" else split.test_candidates
            users, ranks = split.eval_users, []
            for b0 in range(0, users.numel(), batch):
                ub, cb = users[b0 : b0 + batch], cands[b0 : b0 + batch]
                ids, where = torch.unique(cb, return_inverse=True)
                s = score_pairs(ub, ids).to(torch.float32).cpu()
                ranks.append(held_out_rank(torch.gather(s, 1, where)))
            return loo_metrics(torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64), ns)
        from .ops.topk.scorer import topk_from_scorer

        truth_all, users, exclude = _full_part(split, part, valid_excludes_test)
        _, top = topk_from_scorer(
            score_pairs,
            split.n_users,
            split.n_items,
            max(ks),
            exclude=select_rows(*exclude, users),
            query_ids=users,
        )
    return full_metrics(top, select_rows(*truth_all, users), split.n_items, ks)


def _full_part(split, part, valid_excludes_test):
    """(truth CSR over all users, the users with truth in this part, the exclusion CSR)."""
    truth_all = split.valid if part == "valid" else split.test
    counts = truth_all[0][1:] - truth_all[0][:-1]
    users = torch.nonzero(counts > 0).flatten()
    if part == "test":
        exclude = concat_rows(split.train, split.valid)
    elif valid_excludes_test:
        exclude = concat_rows(split.train, split.test)
    else:
        exclude = split.train
    return truth_all, users, exclude


def evaluate(
    user_emb,
    item_emb,
    split,
    part: str = "valid",
    *,
    ns=LOO_NS,
    ks=FULL_KS,
    backend: str = "auto",
    valid_excludes_test: bool = False,
) -> dict:
    """Metrics of embeddings on a Split's "valid" or "test" part (protocol from the split).

    loo: HR/NDCG/MRR at ns over the split's candidates. full: Recall/NDCG/Precision at ks, ranking
    all items except training items (and, for "test", the validation items too), over users with at
    least one item in that part. valid_excludes_test: for "valid", also exclude the test items (the
    authors' code of DE-RRD/TD/HetComp does; it uses the test set to shape validation, so early
    stopping sees slightly higher numbers; kdfast's default keeps test items out of every choice).
    """
    if part not in ("valid", "test"):
        raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
    if split.protocol == "loo":
        cands = split.valid_candidates if part == "valid" else split.test_candidates
        return loo_metrics(loo_ranks(user_emb, item_emb, split.eval_users, cands), ns)
    truth_all, users, exclude = _full_part(split, part, valid_excludes_test)
    top = full_topk(user_emb, item_emb, users, exclude, max(ks), backend=backend)
    return full_metrics(top, select_rows(*truth_all, users), split.n_items, ks)
