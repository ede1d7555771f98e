"""Checkpoints of a training run: enough to continue it and get the bits an uninterrupted run gets.

A run's state is the model's and the KD method's parameters and buffers, the optimizer's state,
every random generator (the trainer's, the global torch RNG, and any torch.Generator a method or
model holds), the epoch, the early-stopping bookkeeping and whatever plain state a method keeps
between epochs (HetComp's selected teacher checkpoints, DCD's ranks, RRD's sampled lists, ...).

Methods need no code of their own for this. `Snapshot` walks an object's attributes (recursing into
nn.Modules, plain objects, lists, tuples and dicts) right after the object is built, and
`capture` later records only what the run changed since: attributes rebound to another object,
tensors changed in place (their version counter moved), generators (always), and plain values. On
resume the object is built again the same way (a seeded build is deterministic), its Snapshot taken,
and `restore` writes the recorded state back: parameters and buffers in place (the optimizer holds
them), generators through set_state, other attributes rebound. So what a method computed once at
build (a teacher's top-K lists) is not stored in every checkpoint.

An attribute that is neither a tensor, a generator, a plain value, a container nor an object with
attributes (a function, a C object) is kept as built; if the run rebinds such an attribute,
`capture` raises TypeError naming it, instead of writing a checkpoint that would resume differently.

Files are written whole or not at all (kdfast._core.files.atomic_write) with torch.save, and read
with torch.load(weights_only=False): load only checkpoints you wrote.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ._core.files import atomic_write

FORMAT = "kdfast-checkpoint-1"
_PLAIN = (int, float, bool, str, bytes, type(None), complex, torch.dtype, torch.device)
_KEEP = ("keep",)  # in a captured state: the value as built


def _children(obj):
    """The (key, value) pairs the walker descends into, and how to rebuild: "dict", "list",
    "tuple", "attrs" (an object's __dict__), or None for a leaf."""
    if isinstance(obj, dict):
        return "dict", list(obj.items())
    if isinstance(obj, list):
        return "list", list(enumerate(obj))
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return "tuple", list(enumerate(obj))
    if isinstance(obj, nn.Module):
        attrs = {
            k: v for k, v in vars(obj).items() if k not in ("_parameters", "_buffers", "_modules")
        }
        attrs.update(obj._modules)
        return "attrs", list(attrs.items())
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.Tensor)) and not callable(obj):
        return "attrs", list(vars(obj).items())
    return None, []


class Snapshot:
    """What an object looks like right after it is built: for each attribute path, the identity
    of its value (and a tensor's version counter)."""

    def __init__(self, obj):
        self.seen = {}
        self._walk(obj, ())

    def _walk(self, obj, path, depth=0):
        ver = obj._version if isinstance(obj, torch.Tensor) else None
        self.seen[path] = (id(obj), ver)
        if depth > 20 or isinstance(obj, (torch.Tensor, torch.Generator) + _PLAIN):
            return
        _, children = _children(obj)
        for k, v in children:
            self._walk(v, path + (k,), depth + 1)

    def unchanged(self, obj, path) -> bool:
        was = self.seen.get(path)
        if was is None or was[0] != id(obj):
            return False
        return not isinstance(obj, torch.Tensor) or obj._version == was[1]


def capture(obj, snapshot: Snapshot, name: str = "object"):
    """The state of `obj` that differs from its build (see the module docstring), as plain
    containers of tensors and values that torch.save can write."""
    return _capture(obj, snapshot, (), name, set())


def _capture(obj, snap, path, name, active):
    if isinstance(obj, torch.Generator):
        return ("generator", obj.get_state())
    if isinstance(obj, _PLAIN):
        return ("value", obj)
    if isinstance(obj, torch.Tensor):
        if snap.unchanged(obj, path) and not isinstance(obj, nn.Parameter):
            return _KEEP
        return ("tensor", obj.detach().clone(), str(obj.device))
    if id(obj) in active:  # a cycle: keep as built
        return _KEEP
    kind, children = _children(obj)
    if kind is None:
        if snap.unchanged(obj, path):
            return _KEEP
        where = name + "".join(f"[{k!r}]" if not isinstance(k, str) else f".{k}" for k in path)
        raise TypeError(
            f"cannot checkpoint {where}: a {type(obj).__name__} rebound during training (only "
            "tensors, generators, plain values, containers and objects with attributes are saved)"
        )
    if kind == "attrs" and not snap.unchanged(obj, path) and not isinstance(obj, nn.Module):
        return ("object", obj)  # made during training: saved whole (pickled)
    active.add(id(obj))
    try:
        state = {
            "kind": kind,
            "rebound": not snap.unchanged(obj, path),
            "items": [(k, _capture(v, snap, path + (k,), name, active)) for k, v in children],
        }
        if isinstance(obj, nn.Module):
            state["module"] = {
                k: v.detach().clone()
                for k, v in obj.state_dict(keep_vars=True).items()
                if "." not in k  # a child's own entries are captured with the child
            }
        return ("node", state)
    finally:
        active.discard(id(obj))


def restore(obj, state):
    """Write a state from `capture` back into `obj`, an object built the same way; returns the
    object (a new container where the state's container differs)."""
    return _restore(obj, state)


def _restore(current, state):
    tag = state[0]
    if tag == "keep":
        return current
    if tag == "value":
        return state[1]
    if tag == "generator":
        if not isinstance(current, torch.Generator):
            raise ValueError("the checkpoint holds a generator where the object has none")
        current.set_state(state[1])
        return current
    if tag == "tensor":
        return state[1].to(state[2])
    if tag == "object":
        return state[1]
    node = state[1]
    kind, items = node["kind"], node["items"]
    if kind == "attrs":
        target = current
        attrs = dict(vars(current))
        if isinstance(current, nn.Module):
            attrs.update(current._modules)
        for k, sub in items:
            new = _restore(attrs.get(k), sub)
            if isinstance(current, nn.Module) and k in current._modules:
                if new is not current._modules[k]:
                    setattr(current, k, new)
            elif new is not attrs.get(k) or k not in vars(current):
                object.__setattr__(current, k, new)
        if isinstance(current, nn.Module) and "module" in node:
            own = current.state_dict(keep_vars=True)
            with torch.no_grad():
                for k, v in node["module"].items():
                    if k not in own:
                        raise ValueError(f"the checkpoint has {k!r}, which the module lacks")
                    if own[k].shape != v.shape:
                        raise ValueError(
                            f"{k!r}: the checkpoint's shape {tuple(v.shape)} is not the module's "
                            f"{tuple(own[k].shape)}"
                        )
                    own[k].copy_(v.to(own[k].device))
        return target
    old = current if isinstance(current, (dict, list, tuple)) else ({} if kind == "dict" else [])
    if kind == "dict":
        out = {k: _restore(old.get(k) if isinstance(old, dict) else None, sub) for k, sub in items}
        if isinstance(current, dict) and not node["rebound"]:
            current.clear()
            current.update(out)
            return current
        return out
    vals = [_restore(old[i] if i < len(old) else None, sub) for i, sub in items]
    if kind == "tuple":
        return tuple(vals)
    if isinstance(current, list) and not node["rebound"]:
        current[:] = vals
        return current
    return vals


def rng_state(device) -> dict:
    """The global RNG states a run draws from: torch's CPU generator (and CUDA's on a CUDA
    device)."""
    state = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def save(path, payload: dict) -> Path:
    """Write a checkpoint (a dict) whole or not at all."""
    payload = dict(payload, format=FORMAT)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load(path) -> dict:
    """Read a checkpoint written by save(); ValueError when the file is not one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which
        raise ValueError(f"{path}: not a readable kdfast checkpoint ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a kdfast checkpoint (format {FORMAT})")
    return payload
