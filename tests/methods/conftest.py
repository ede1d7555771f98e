"""Fixtures shared by the method tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_topk(monkeypatch):
    # the teacher (and student) top lists go through kdfast.topk_scores; keep it on the reference
    # here
    monkeypatch.setenv("KDFAST_BACKEND", "torch")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tensors are tiny: extra intra-op threads only cost time, a lot of it on a loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
