"""Python glue around the C++ extension kdfast._C: buffers in, buffers out, one function per op."""
