"""kdfast.topk_from_scorer on a teacher whose score does not factorise: a NeuMF-style scorer (GMF
product plus a one-hidden-layer MLP over the pair) ranking every item for every user, its wall time
and the peak extra memory of the process (resident set on the CPU, allocator peak on a GPU), set
against the n_q x n_k score matrix it never forms.

    python -m bench.scorer --users 20000 --items 100000 --k 100        # the committed run
    python -m bench.scorer --users 500 --items 2000 --out /tmp/try      # a try-out

Results: bench/results/<device>/scorer.md and .json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import kdfast
from bench import harness


class PairScorer(torch.nn.Module):
    """s(u, i) = w_g . (p_u * q_i) + w_m . relu(A x_u + B y_i + c): NeuMF's two branches, with the
    MLP's first layer split over the user and item halves of its input (so that a tile costs
    [q, n, h] adds, not a [q, n, 2d] concatenation)."""

    def __init__(self, n_users, n_items, dim, hidden, generator):
        super().__init__()
        r = lambda *s: torch.randn(*s, generator=generator) * 0.1  # noqa: E731
        self.p, self.q = r(n_users, dim), r(n_items, dim)
        self.x, self.y = r(n_users, dim), r(n_items, dim)
        self.a, self.b, self.c = r(dim, hidden), r(dim, hidden), r(hidden)
        self.w_g, self.w_m = r(dim), r(hidden)

    def forward(self, users, items):
        gmf = (self.p[users] * self.w_g) @ self.q[items].T
        hu = self.x[users] @ self.a + self.c  # [q, h]
        hi = self.y[items] @ self.b  # [n, h]
        return gmf + torch.relu(hu[:, None, :] + hi[None, :, :]) @ self.w_m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--items", type=int, default=100000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--tile-elems", type=int, default=1 << 20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    model = PairScorer(args.users, args.items, args.dim, args.hidden, g).to(device)
    for name in ("p", "q", "x", "y", "a", "b", "c", "w_g", "w_m"):
        setattr(model, name, getattr(model, name).to(device))
    # a check on a corner of the problem: the tiled result equals the dense ranking there
    few_u, few_i = torch.arange(min(64, args.users)), torch.arange(min(3000, args.items))
    with torch.no_grad():
        dense = model(few_u.to(device), few_i.to(device))
    small = kdfast.topk_from_scorer(
        lambda u, i: dense[u][:, i], len(few_u), len(few_i), args.k, device=device
    )
    tiled = kdfast.topk_from_scorer(
        model, len(few_u), len(few_i), args.k, tile_elems=args.tile_elems, device=device
    )
    agree = bool(torch.equal(small[1], tiled[1]))
    with harness.peak_memory(device) as mem:
        t0 = time.perf_counter()
        values, index = kdfast.topk_from_scorer(
            model,
            args.users,
            args.items,
            args.k,
            tile_elems=args.tile_elems,
            device=device,
            progress=True,
        )
        harness.sync(device)
        seconds = time.perf_counter() - t0
    pairs = args.users * args.items
    row = {
        "case": f"{args.users} x {args.items}, k={args.k}, d={args.dim}, hidden={args.hidden}",
        "seconds": round(seconds, 2),
        "Mpairs_per_s": round(pairs / seconds / 1e6, 1),
        "peak_extra_MB": mem.get("peak_MB"),
        "dense_scores_MB": round(pairs * 4 / 2**20),
        "result_MB": round(args.users * args.k * 12 / 2**20, 1),
        "tile_elems": args.tile_elems,
        "dense_check": "same top-k" if agree else "DIFFERS",
    }
    env = harness.environment(device)
    out = args.out or os.path.join(harness.RESULTS, env["slug"])
    text = harness.write_results(
        os.path.join(out, "scorer.md"),
        "kdfast.topk_from_scorer: a NeuMF-style pair scorer over the whole catalog",
        env,
        [row],
        list(row),
        intro=[
            "",
            "The scorer: GMF (p_u * q_i) plus an MLP with one hidden layer over the pair (its "
            "first layer split over the user and item halves); top-k of every user over every "
            "item, no exclusions. peak_extra_MB: growth of the process's peak memory during the "
            "call (CPU: resident set), against dense_scores_MB, the float32 score matrix it never "
            "forms. dense_check: the tiled top-k equals the dense ranking on a 64 x 3000 corner.",
        ],
        command="python -m bench.scorer " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    print(text)
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
