"""Nothing is lost: `kdfast distill` saves every student, `kdfast evaluate` reloads one, scores it
on the split it was trained on (the run's own numbers), and exports its tables with the data's ids;
a rerun keeps the earlier students."""

import json

import numpy as np
import pytest
import torch

from kdfast import experiment
from kdfast.cli import main
from kdfast.models import load_embeddings
from tests.test_cli_distill import TINY


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")


def _pairs_file(path, seed):
    """A user,item CSV with string user names (ids that are not row numbers)."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        f"u{u},{int(i)}" for u in range(60) for i in torch.randperm(80, generator=g)[:12].tolist()
    ]
    path.write_text("\n".join(rows) + "\n")


def _distill(out, *extra):
    rc = main(["distill", *TINY, "--methods", "none,rrd", "--option", "rrd.N=20", "--option",
               "rrd.K=5", "--option", "rrd.L=5", "--out", str(out), *extra])  # fmt: skip
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def test_students_are_saved_and_reevaluated_to_the_runs_numbers(tmp_path, capsys):
    out = tmp_path / "run"
    res = _distill(out)
    for name in ("none", "rrd"):
        file = out / "students" / f"{name}.pt"
        assert res["students"][name]["file"] == str(file)
        saved = load_embeddings(file, role="student")
        assert saved["meta"]["method"] == name and saved["meta"]["data_spec"]["data"] == "synthetic"
        capsys.readouterr()
        assert main(["evaluate", str(file), "--export", str(tmp_path / name)]) == 0
        printed = json.loads(capsys.readouterr().out.split("\nwrote")[0])
        for part in ("valid", "test"):
            assert printed[part] == pytest.approx(res["students"][name][part], abs=1e-12)
        arrays = np.load(tmp_path / f"{name}.npz")
        assert np.array_equal(arrays["user"], saved["user"].numpy())
        assert np.array_equal(arrays["item"], saved["item"].numpy())
    # the teacher file is evaluated the same way (role teacher)
    assert main(["evaluate", str(out / "teacher.pt")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["role"] == "teacher"
    assert printed["test"] == pytest.approx(res["teacher"]["test"], abs=1e-12)


def test_saved_ids_are_the_data_files_ids(tmp_path, capsys):
    data = tmp_path / "pairs.csv"
    _pairs_file(data, 0)
    out = tmp_path / "run"
    args = ["--data", str(data), "--format", "pairs", "--n-neg", "20"]
    _distill(out, *args)
    dataset, _ = experiment.load_split(experiment.DataSpec(data=str(data), fmt="pairs", n_neg=20))
    saved = load_embeddings(out / "students" / "rrd.pt")
    assert saved["user_ids"] == dataset.user_ids.tolist()
    assert saved["item_ids"] == dataset.item_ids.tolist()
    assert all(str(u).startswith("u") for u in saved["user_ids"])
    # other data at the saved path: refused by its fingerprint, naming both
    _pairs_file(data, 1)
    assert main(["evaluate", str(out / "students" / "rrd.pt")]) == 2
    assert "is not the data" in capsys.readouterr().err


def test_a_rerun_keeps_the_earlier_students(tmp_path):
    out = tmp_path / "run"
    _distill(out)
    first = (out / "students" / "rrd.pt").read_bytes()
    _distill(out, "--seed", "1")
    kept = [p for p in out.iterdir() if p.name.startswith("students-")]
    assert len(kept) == 1 and (kept[0] / "rrd.pt").read_bytes() == first
    assert (out / "students" / "rrd.pt").read_bytes() != first


@pytest.mark.parametrize(
    "content, message", [(None, "no such file"), (b"junk", "unreadable")]
)  # fmt: skip
def test_bad_files_are_named(tmp_path, capsys, content, message):
    file = tmp_path / "x.pt"
    if content is not None:
        file.write_bytes(content)
    assert main(["evaluate", str(file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
