"""The public namespace: every name `import kdfast` lists resolves (lazily), the submodules the
README uses are attributes, and `kdfast --version` answers."""

import subprocess
import sys

import pytest

import kdfast


@pytest.mark.parametrize("name", kdfast.__all__)
def test_every_listed_name_resolves(name):
    assert getattr(kdfast, name) is not None
    assert name in dir(kdfast)


def test_submodules_are_attributes():
    assert callable(kdfast.data.load) and callable(kdfast.metrics.evaluate)
    assert callable(kdfast.sampling.uniform_excluding_sample)
    with pytest.raises(AttributeError, match="no attribute 'bogus'"):
        kdfast.bogus  # noqa: B018


def test_version_flag():
    out = subprocess.run(
        [sys.executable, "-m", "kdfast", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"kdfast {kdfast.__version__}"
