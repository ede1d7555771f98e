"""Progress bars of the long steps: showing one changes no result."""

import pytest
import torch

from kdfast import experiment as ex
from kdfast import metrics
from kdfast._core import progress
from kdfast.methods.base import teacher_top


@pytest.fixture
def always():
    progress.set_enabled(True)
    yield
    progress.set_enabled(None)


def test_blocks_with_a_bar_give_the_same_lists(always, capsys, monkeypatch):
    spec = ex.DataSpec(data="synthetic", synthetic_users=150, synthetic_items=120, protocol="full")
    _, split = ex.load_split(spec)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(split.n_users, 8, generator=g), torch.randn(split.n_items, 8, generator=g)
    monkeypatch.setattr(progress, "LONG_PAIRS", 4000.0)  # blocks of 1000 pairs: 9 rows each
    shown = teacher_top(q, k, 20, split.train, "torch", with_values=True)
    assert "teacher top-N" in capsys.readouterr().err
    progress.set_enabled(False)
    plain = teacher_top(q, k, 20, split.train, "torch", with_values=True)
    assert torch.equal(shown[1], plain[1]) and torch.equal(shown[0], plain[0])
    progress.set_enabled(True)
    with_bar = metrics.evaluate(q, k, split, "test", backend="torch")
    assert "evaluation" in capsys.readouterr().err
    progress.set_enabled(False)
    assert with_bar == metrics.evaluate(q, k, split, "test", backend="torch")


def test_automatic_rule_and_bad_setting():
    assert not progress.enabled(1e6) and progress.enabled(2e9)
    with pytest.raises(ValueError, match="progress must be"):
        progress.set_enabled("yes")


def test_reading_a_data_file_with_a_bar(always, tmp_path, capsys):
    from kdfast import data as kdata

    path = tmp_path / "ratings.dat"
    path.write_text("".join(f"{u}::{i}::5::{u + i}\n" for u in range(8) for i in range(6)))
    shown = kdata.load(str(path), min_user_interactions=1)
    assert "reading ratings.dat" in capsys.readouterr().err
    progress.set_enabled(False)
    plain = kdata.load(str(path), min_user_interactions=1)
    assert shown.fingerprint() == plain.fingerprint() and plain.nnz == 48
