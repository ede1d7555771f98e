"""The hot ops, one folder each: the public function with its checks, the torch.library op and one
backend table (__init__.py), the reference that is both the test oracle and the "torch" backend
(reference.py), the C++ glue (cpu.py) and the Triton kernels (triton.py).

Every backend of an op has the same function signatures and returns the same things; the op calls
the row of its table that kdfast._core.backend chose and never asks which one it is.
"""
