"""kdfast: fast knowledge distillation for recommender systems.

The public API. Names are imported on first use, so `import kdfast` stays cheap and Triton is only
imported when a Triton kernel runs.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # machinery
    "backends": "kdfast._core.backend",
    "as_csr": "kdfast.csr",
    "transpose_csr": "kdfast.csr",
    # ops
    "topk_scores": "kdfast.ops.topk",
    "topk_from_scorer": "kdfast.ops.topk.scorer",
    "rank_of_ids": "kdfast.ops.rank_of_ids",
    "plackett_luce_loss": "kdfast.ops.plackett_luce",
    "plackett_luce_loss_from_embeddings": "kdfast.ops.plackett_luce",
    "full_catalog_listwise_loss": "kdfast.ops.full_catalog",
    "full_catalog_set_loss": "kdfast.ops.full_catalog",
    "topology_loss": "kdfast.ops.topology",
    "grouped_topology_loss": "kdfast.ops.topology",
    # methods
    "RRD": "kdfast.methods.rrd",
    "IRRRD": "kdfast.methods.ir_rrd",
    "DE": "kdfast.methods.de",
    "PHR": "kdfast.methods.phr",
    "FTD": "kdfast.methods.ftd",
    "HTD": "kdfast.methods.htd",
    "HetComp": "kdfast.methods.hetcomp",
    "RD": "kdfast.methods.rd",
    "CD": "kdfast.methods.cd",
    "DCD": "kdfast.methods.dcd",
    "UnKD": "kdfast.methods.unkd",
    "scorer_teacher": "kdfast.methods.base",
    # models, data, evaluation, training
    "BPRMF": "kdfast.models",
    "LightGCN": "kdfast.models",
    "CML": "kdfast.families",
    "NeuMF": "kdfast.families",
    "MultVAE": "kdfast.families",
    "IAutoRec": "kdfast.families",
    "Trainer": "kdfast.train",
}

# subpackages and modules reachable as attributes (kdfast.data.load, kdfast.metrics.evaluate, ...)
_MODULES = (
    "checkpoint",
    "csr",
    "data",
    "distributed",
    "experiment",
    "families",
    "methods",
    "metrics",
    "models",
    "ops",
    "sampling",
    "train",
)

__all__ = sorted(_EXPORTS) + list(_MODULES) + ["__version__"]


def __getattr__(name):
    if name in _MODULES:
        value = importlib.import_module(f"kdfast.{name}")
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
