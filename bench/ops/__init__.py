"""One file per op: its benchmark cases and providers (BENCHES), its GPU checks (checks) and the GPU
run's timings (timings); see bench/harness.py and bench/README.md."""

OPS = ("topk", "plackett_luce", "full_catalog", "topology", "rank_of_ids")
