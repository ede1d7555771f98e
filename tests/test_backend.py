"""kdfast._core.backend: which backends exist, the choice for one call, and the errors that say how
to fix."""

import pytest
import torch

import kdfast
from kdfast._core import backend as _backend


def test_backends_content():
    status = kdfast.backends()
    assert set(status) == {"torch", "cpp", "triton", "numba"}
    for ok, why in status.values():
        assert isinstance(ok, bool) and isinstance(why, str) and why
    assert status["torch"][0] is True
    assert status["cpp"][0] == (_backend.ext() is not None)
    assert status["numba"][0] == (_backend._numba_import()[0] is not None)


def test_auto_picks_cpp_on_cpu_when_built(monkeypatch):
    monkeypatch.delenv("KDFAST_BACKEND", raising=False)
    expected = "cpp" if _backend.ext() is not None else "torch"
    assert _backend.resolve("auto", torch.device("cpu")) == expected
    assert _backend.resolve("auto", torch.device("cpu"), available=("torch", "triton")) == "torch"
    # cpp cannot
    assert _backend.resolve("auto", torch.device("cpu"), dtype=torch.float16) == "torch"
    assert _backend.resolve("auto", torch.device("meta")) == "torch"


def test_env_override_replaces_auto(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    assert _backend.resolve("auto", torch.device("cpu")) == "torch"
    if _backend.ext() is not None:
        # explicit choice wins over the env
        assert _backend.resolve("cpp", torch.device("cpu")) == "cpp"
    monkeypatch.setenv("KDFAST_BACKEND", "auto")
    assert _backend.resolve("auto", torch.device("cpu")) in ("cpp", "torch")
    monkeypatch.setenv("KDFAST_BACKEND", "fortran")
    with pytest.raises(ValueError, match="KDFAST_BACKEND"):
        _backend.resolve("auto", torch.device("cpu"))


def test_env_override_reaches_the_op(monkeypatch):
    """KDFAST_BACKEND=torch makes topk_scores run the reference even when cpp is built."""
    calls = []
    import kdfast.ops.topk.reference as ref_mod

    real = ref_mod.topk_scores
    monkeypatch.setattr(ref_mod, "topk_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    kdfast.topk_scores(torch.randn(2, 3), torch.randn(4, 3), 2)
    assert calls == [1]


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("gpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve(None, torch.device("cpu"))


def test_cpp_unavailable_says_how(monkeypatch):
    monkeypatch.setattr(
        _backend,
        "_load_ext",
        lambda: (None, "the C++ extension kdfast._C is not importable (test)"),
    )
    assert kdfast.backends()["cpp"] == (
        False,
        "the C++ extension kdfast._C is not importable (test)",
    )
    with pytest.raises(RuntimeError, match="not available.*not importable"):
        _backend.resolve("cpp", torch.device("cpu"))
    # numba stands in where it imports, for the ops that have it
    fallback = "numba" if kdfast.backends()["numba"][0] else "torch"
    assert _backend.resolve("auto", torch.device("cpu")) == fallback
    assert _backend.resolve("auto", torch.device("cpu"), available=("torch", "cpp")) == "torch"


def test_cpp_on_wrong_device_or_missing():
    with pytest.raises(RuntimeError, match="CPU tensors"):
        _backend.resolve("cpp", torch.device("meta"))
    with pytest.raises(RuntimeError, match="no cpp backend"):
        _backend.resolve("cpp", torch.device("cpu"), available=("torch", "triton"))
    if _backend.ext() is not None:
        with pytest.raises(TypeError, match="float32 or float64"):
            _backend.resolve("cpp", torch.device("cpu"), dtype=torch.bfloat16)


def test_env_names_a_backend_the_op_lacks(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "triton")
    assert _backend.resolve("auto", torch.device("cpu"), available=("torch", "cpp")) in (
        "torch",
        "cpp",
    )
    with pytest.raises(RuntimeError, match="no triton backend"):
        _backend.resolve("triton", torch.device("cpu"), available=("torch", "cpp"))


def test_triton_unavailable(monkeypatch):
    with pytest.raises(RuntimeError, match="no triton backend"):
        _backend.resolve("triton", torch.device("cpu"), available=("torch", "cpp"))
    monkeypatch.setattr(
        _backend, "_triton_import", lambda: (False, "triton is not importable (test)")
    )
    with pytest.raises(RuntimeError, match="not importable"):
        _backend.resolve("triton", torch.device("cpu"))
    assert _backend.resolve("auto", torch.device("cuda")) == "torch"


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setattr(_backend, "_triton_import", lambda: (True, None))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        _backend.resolve("triton", torch.device("cpu"))
    assert kdfast.backends()["triton"][0] is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("triton", torch.device("cpu")) == "triton"
    with pytest.raises(RuntimeError, match="does not run on meta"):
        _backend.resolve("triton", torch.device("meta"))


def test_explicit_unavailable_backend_through_the_op(monkeypatch):
    monkeypatch.setattr(_backend, "_load_ext", lambda: (None, "not built (test)"))
    with pytest.raises(RuntimeError, match="backend='cpp' is not available"):
        kdfast.topk_scores(torch.randn(2, 3), torch.randn(4, 3), 2, backend="cpp")


def test_num_threads_follows_torch():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _backend.num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_numba_missing_says_how(monkeypatch):
    monkeypatch.setattr(_backend, "_load_ext", lambda: (None, "not built (test)"))
    monkeypatch.setattr(_backend, "_numba_import", lambda: (None, "numba is not importable (test)"))
    assert kdfast.backends()["numba"] == (False, "numba is not importable (test)")
    with pytest.raises(RuntimeError, match="backend='numba' is not available.*not importable"):
        _backend.resolve("numba", torch.device("cpu"))
    assert _backend.resolve("auto", torch.device("cpu")) == "torch"


def test_numba_refuses_an_openmp_threading_layer(monkeypatch):
    """numba's "omp" layer would load a second OpenMP runtime next to torch's: the backend reports
    itself unusable instead (before numba starts its threads), and says what to set."""
    numba = pytest.importorskip("numba")
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        monkeypatch.setattr(parallel, "_threading_layer", "omp")
    else:
        monkeypatch.setattr(numba.config, "THREADING_LAYER", "omp")
    ok, why = kdfast.backends()["numba"]
    assert not ok and "NUMBA_THREADING_LAYER=workqueue" in why
    with pytest.raises(RuntimeError, match="second OpenMP runtime"):
        _backend.resolve("numba", torch.device("cpu"))
