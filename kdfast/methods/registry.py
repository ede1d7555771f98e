"""The registry of KD method names (the names `kdfast distill --methods` takes), and the check of a
method's options before any training.

"none" (plain BPR, no KD) is not a method: the callers handle it.
"""

from __future__ import annotations

import importlib

# name on the command line -> ("module:Class", default options)
METHODS = {
    "de": ("kdfast.methods.de:DE", {}),
    "phr": ("kdfast.methods.phr:PHR", {}),
    "ftd": ("kdfast.methods.ftd:FTD", {}),
    "htd": ("kdfast.methods.htd:HTD", {}),
    "rrd": ("kdfast.methods.rrd:RRD", {}),
    "rrd-full": ("kdfast.methods.rrd:RRD", {"sampling": False}),
    "ir-rrd": ("kdfast.methods.ir_rrd:IRRRD", {}),
    "hetcomp": ("kdfast.methods.hetcomp:HetComp", {}),
    # peers the papers compare with (docs/METHODS.md section 8)
    "rd": ("kdfast.methods.rd:RD", {}),
    "cd": ("kdfast.methods.cd:CD", {}),
    "dcd": ("kdfast.methods.dcd:DCD", {}),
    "unkd": ("kdfast.methods.unkd:UnKD", {}),
}


def method_class(name: str):
    """(class, default options) for a registered method name; ValueError listing the known names."""
    if name not in METHODS:
        raise ValueError(f"unknown KD method {name!r}; known: none, {', '.join(sorted(METHODS))}")
    target, defaults = METHODS[name]
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls), dict(defaults)


def validate_options(name: str, options: dict) -> dict:
    """The options to build the method `name` with: its registry defaults updated by `options`,
    every name and value checked as its build would check them (cls.check_options), before any data
    is loaded or teacher trained.

    Raises ValueError for an unknown method, an unknown option (the message lists the valid ones) or
    a value its rule refuses, TypeError for a value of the wrong type; the message names the method
    and the option. Rules that need the data (N larger than some user's unobserved items) are left
    to build.
    """
    cls, defaults = method_class(name)
    return cls.check_options({**defaults, **options}, label=name)
