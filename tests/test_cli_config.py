"""`--config FILE`: options from TOML/YAML/JSON, flags override the file, and a results.json reruns
its experiment exactly."""

import json

import pytest

from kdfast.cli import main

TOML = """
data = "synthetic"
synthetic-users = 120
synthetic_items = 150
n-neg = 40
teacher_dim = 16
student_dim = 4
epochs = 2
lr = 0.01
methods = "none,rrd"
option = ["rrd.N=20", "rrd.K=5", "rrd.L=5"]
no_progress = true
threads = 1
"""


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_toml_config_flags_override_and_results_json_reruns(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML)
    assert (
        main(["distill", "--config", str(cfg), "--epochs", "3", "--out", str(tmp_path / "a")]) == 0
    )
    a = _results(tmp_path / "a")
    assert a["config"]["args"]["epochs"] == 3  # the flag won over the file's 2
    assert a["config"]["args"]["synthetic_users"] == 120 and a["config"]["methods"] == [
        "none",
        "rrd",
    ]
    assert a["config"]["method_options"]["rrd"] == {"N": 20, "K": 5, "L": 5}
    rerun = [
        "distill",
        "--config",
        str(tmp_path / "a" / "results.json"),
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(rerun) == 0
    b = _results(tmp_path / "b")
    assert b["students"]["rrd"]["test"] == a["students"]["rrd"]["test"]
    assert {k: v for k, v in b["config"]["args"].items() if k != "out"} == {
        k: v for k, v in a["config"]["args"].items() if k != "out"
    }


# one run's options, with dashes (as the flags are spelled) or underscores (as argparse stores them)
SMALL = {"synthetic-users": 120, "synthetic-items": 150, "n-neg": 40, "teacher-dim": 8,
         "student-dim": 4, "epochs": 1, "methods": "none", "no-progress": True}  # fmt: skip


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_json_and_yaml_configs(tmp_path, fmt):
    if fmt == "json":
        text = json.dumps(SMALL)
    else:
        text = pytest.importorskip("yaml").safe_dump(
            {k.replace("-", "_"): v for k, v in SMALL.items()}
        )
    cfg = tmp_path / f"run.{fmt}"
    cfg.write_text(text)
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 0
    assert _results(tmp_path / "o")["config"]["args"]["teacher_dim"] == 8


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.toml", "epoch = 3\n", "'epoch' is not an option"),
        ("bad.toml", "epochs = \n", "--config"),
        ("bad.json", "[1, 2]", "expected a table of options"),
        ("bad.ini", "x", "use a .toml"),
    ],
)
def test_bad_configs_are_named(tmp_path, capsys, name, text, message):
    cfg = tmp_path / name
    cfg.write_text(text)
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
