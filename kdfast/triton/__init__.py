"""Triton kernels and their launchers. Imported lazily, so that TRITON_INTERPRET set at start-up applies."""
