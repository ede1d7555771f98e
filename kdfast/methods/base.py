"""The interface between the trainer and every KD method, and the registry of method names.

A method is a torch.nn.Module (its own trainable parts - DE's experts, HTD's group assigners - are its
parameters; the trainer optimises them with the student and drops them after training):

    method = Cls.build(teacher_user, teacher_item, train, student_dim, generator=g, **options)
    method.start_epoch(epoch, max_epoch, student_user, student_item)   # resampling, annealing
    loss = method(student_user, student_item, users, pos, neg)          # weighted KD loss (scalar)

teacher_user [U, d_t], teacher_item [I, d_t]: the frozen teacher's embeddings (BPR-MF scores are dot
products); train: the training interactions as an int64 CSR pair (indptr [U+1], item ids), users -> items;
student_user [U, d_s], student_item [I, d_s]: the student's embedding tables (weights of its
nn.Embedding, with gradient); users, pos, neg: int64 [B] - the batch of BPR triples. The returned loss is
already multiplied by the method's lambda and sum-reduced like the base BPR loss (docs/METHODS.md section 1).
"""
from __future__ import annotations

import importlib

import torch

# name on the command line -> ("module:Class", default options)
METHODS = {
    "de": ("kdfast.methods.latent:DE", {}),
    "phr": ("kdfast.methods.latent:PHR", {}),
    "ftd": ("kdfast.methods.topology:FTD", {}),
    "htd": ("kdfast.methods.topology:HTD", {}),
    "rrd": ("kdfast.methods.ranking:RRD", {}),
    "rrd-full": ("kdfast.methods.ranking:RRD", {"sampling": False}),
    "ir-rrd": ("kdfast.methods.ranking:IRRRD", {}),
    "hetcomp": ("kdfast.methods.hetcomp:HetComp", {}),
    # peers the papers compare with (docs/METHODS.md section 8)
    "rd": ("kdfast.methods.rd:RD", {}),
    "cd": ("kdfast.methods.cd:CD", {}),
    "dcd": ("kdfast.methods.dcd:DCD", {}),
    "unkd": ("kdfast.methods.unkd:UnKD", {}),
}


class KDMethod(torch.nn.Module):
    """Base class: subclasses implement build, forward and (if they need it) start_epoch."""

    name = "kd"
    #: False: the trainer minimises the method's loss alone, without the BPR base loss (HetComp's authors
    #: train the student with the KD loss only)
    uses_base_loss = True

    @classmethod
    def build(cls, teacher_user, teacher_item, train, student_dim, *, generator=None, **options):
        raise NotImplementedError

    def start_epoch(self, epoch: int, max_epoch: int, student_user, student_item) -> None:
        """Per-epoch work (sampling, temperature annealing); default: nothing."""

    def status(self) -> str | None:
        """A short line on the method's state for the training log and history (e.g. HetComp's phase);
        default: None."""
        return None

    def forward(self, student_user, student_item, users, pos, neg):  # pragma: no cover - abstract
        raise NotImplementedError


def method_class(name: str):
    """(class, default options) for a registered method name; ValueError listing the known names."""
    if name not in METHODS:
        raise ValueError(f"unknown KD method {name!r}; known: none, {', '.join(sorted(METHODS))}")
    target, defaults = METHODS[name]
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls), dict(defaults)
