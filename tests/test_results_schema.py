"""results.json against its one documented schema (docs/results.schema.json): real runs (a trained
and a loaded teacher, a sweep) validate, and a results file missing a part or with a wrong type
does not."""

import copy
import json
from pathlib import Path

import pytest

from kdfast.cli import main
from tests.test_cli_distill import TINY

jsonschema = pytest.importorskip("jsonschema")
SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "results.schema.json").read_text())


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")


def test_real_runs_validate_and_broken_ones_do_not(tmp_path):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    out = tmp_path / "run"
    args = ["distill", *TINY, "--methods", "none,rrd", "--option", "rrd.N=20", "--option",
            "rrd.K=5", "--option", "rrd.L=5", "--sweep", "rrd.lam=0.001,0.01"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    jsonschema.validate(first, SCHEMA)
    assert first["teacher"]["loaded"] is False
    # a second run reuses the saved teacher: loaded, and still valid
    assert main([*args, "--teacher", str(out / "teacher.pt"), "--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert second["teacher"]["loaded"] is True
    jsonschema.validate(second, SCHEMA)
    broken = []
    for path, value in ((("environment",), None), (("students", "rrd", "best_epoch"), "3")):
        r = copy.deepcopy(first)
        node = r
        for key in path[:-1]:
            node = node[key]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        broken.append(r)
    for r in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(r, SCHEMA)
