"""Pure-PyTorch reference implementations of every kdfast op: the oracle for tests, and the fallback."""
