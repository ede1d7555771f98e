"""`kdfast topk` end to end: files in, .npz out, clear errors with exit code 2."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
import torch

import kdfast
from kdfast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data(tmp_path):
    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(23, 8, generator=gen), torch.randn(57, 8, generator=gen)
    np.save(tmp_path / "q.npy", q.numpy())
    np.save(tmp_path / "k.npy", keys.numpy())
    torch.save(q, tmp_path / "q.pt")
    torch.save(keys, tmp_path / "k.pt")
    rows = [[int(x) for x in torch.randint(0, 57, (r % 5,), generator=gen)] for r in range(23)]
    (tmp_path / "users.dat").write_text(
        "".join(f"{len(r)} {' '.join(map(str, r))}\n".replace(" \n", "\n") for r in rows)
    )
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.array([i for r in rows for i in r], dtype=np.int64)
    return tmp_path, q, keys, (torch.tensor(indptr), torch.tensor(indices))


def test_npy_users_dat_item_side(data, capsys):
    tmp, q, keys, csr = data
    out = tmp / "top.npz"
    rc = main(
        [
            "topk",
            "--queries",
            str(tmp / "q.npy"),
            "--keys",
            str(tmp / "k.npy"),
            "-k",
            "7",
            "--exclude",
            str(tmp / "users.dat"),
            "--item-side",
            "--batch",
            "5",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    z = np.load(out)
    v, i = kdfast.topk_scores(q, keys, 7, exclude=csr)
    assert np.array_equal(z["indices"], i.numpy()) and np.array_equal(z["values"], v.numpy())
    tv, ti = kdfast.topk_scores(keys, q, 7, exclude=kdfast.transpose_csr(csr, 57))
    assert np.array_equal(z["item_indices"], ti.numpy()) and np.array_equal(
        z["item_values"], tv.numpy()
    )
    assert z["item_indices"].shape == (57, 7)
    assert "top-k batches" in capsys.readouterr().err  # the progress bar went to stderr


@pytest.mark.parametrize("fmt", ["scipy", "pair"])
def test_pt_and_npz_exclusions(data, fmt):
    tmp, q, keys, csr = data
    dense = np.zeros((23, 57))
    dense[kdfast.csr.row_ids(csr[0]).numpy(), csr[1].numpy()] = 1
    path = tmp / "x.npz"
    if fmt == "scipy":
        scipy.sparse.save_npz(path, scipy.sparse.csr_matrix(dense))
    else:
        np.savez(path, indptr=csr[0].numpy(), indices=csr[1].numpy())
    out = tmp / "top.npz"
    rc = main(
        [
            "topk",
            "--queries",
            str(tmp / "q.pt"),
            "--keys",
            str(tmp / "k.pt"),
            "-k",
            "60",
            "--exclude",
            str(path),
            "--backend",
            "torch",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    v, i = kdfast.topk_scores(q, keys, 60, exclude=csr, backend="torch")
    z = np.load(out)
    assert np.array_equal(z["indices"], i.numpy())
    assert (z["indices"][:, -3:] == -1).any()  # k > n_k leaves -1 slots


def test_demo_needs_no_files(tmp_path):
    out = tmp_path / "demo.npz"
    assert (
        main(
            [
                "topk",
                "--demo",
                "9",
                "31",
                "4",
                "-k",
                "5",
                "--quiet",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    z = np.load(out)
    assert z["values"].shape == (9, 5) and (z["indices"] >= 0).all()
    assert (np.diff(z["values"], axis=1) <= 0).all()


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    return err


def test_errors_exit_2(data, capsys):
    tmp, *_ = data
    base = ["topk", "--keys", str(tmp / "k.npy"), "--out", str(tmp / "o.npz"), "--quiet"]
    assert "file not found" in _err(capsys, base + ["--queries", str(tmp / "missing.npy")])
    np.save(tmp / "flat.npy", np.zeros(8, dtype=np.float32))
    assert "2-D" in _err(capsys, base + ["--queries", str(tmp / "flat.npy")])
    np.save(tmp / "d5.npy", np.zeros((3, 5), dtype=np.float32))
    assert "d = 5" in _err(capsys, base + ["--queries", str(tmp / "d5.npy")])
    np.save(tmp / "int.npy", np.zeros((3, 8), dtype=np.int64))
    assert "floating" in _err(capsys, base + ["--queries", str(tmp / "int.npy")])
    (tmp / "q.txt").write_text("1 2\n")
    assert ".npy or .pt" in _err(capsys, base + ["--queries", str(tmp / "q.txt")])
    assert "--demo" in _err(capsys, base)
    assert "-k must be" in _err(capsys, base + ["--queries", str(tmp / "q.npy"), "-k", "0"])
    assert "directory" in _err(
        capsys, ["topk", "--demo", "2", "3", "4", "--out", str(tmp / "no" / "o.npz")]
    )


def test_users_dat_errors_name_the_line(data, capsys):
    tmp, *_ = data
    base = [
        "topk",
        "--queries",
        str(tmp / "q.npy"),
        "--keys",
        str(tmp / "k.npy"),
        "--out",
        str(tmp / "o.npz"),
        "--quiet",
    ]
    lines = ["0"] * 23
    lines[4] = "2 3 x"
    (tmp / "bad1.dat").write_text("\n".join(lines) + "\n")
    assert "line 5" in _err(capsys, base + ["--exclude", str(tmp / "bad1.dat")])
    lines[4] = "3 1 2"
    (tmp / "bad2.dat").write_text("\n".join(lines) + "\n")
    assert "line 5: the count says 3 ids but 2 ids follow" in _err(
        capsys, base + ["--exclude", str(tmp / "bad2.dat")]
    )
    lines[4] = "1 57"
    (tmp / "bad3.dat").write_text("\n".join(lines) + "\n")
    assert "outside" in _err(capsys, base + ["--exclude", str(tmp / "bad3.dat")])
    (tmp / "short.dat").write_text("0\n0\n")
    assert "2 rows but there are 23 queries" in _err(
        capsys, base + ["--exclude", str(tmp / "short.dat")]
    )
    assert "file not found" in _err(capsys, base + ["--exclude", str(tmp / "nope.dat")])


def test_console_entry_point_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdfast.cli",
            "topk",
            "--queries",
            str(tmp_path / "nope.npy"),
            "--keys",
            str(tmp_path / "nope.npy"),
            "--out",
            str(tmp_path / "o.npz"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2
    assert "file not found" in res.stderr and "Traceback" not in res.stderr


def test_one_process_unchanged_outside_torchrun(data, monkeypatch):
    """Without torchrun's environment `kdfast topk` writes one .npz, whatever the torchrun-only
    options say; torchrun's variables switch to the sharded path (tests/test_distributed.py)."""
    from kdfast.cli import topk as cli_topk

    for var in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert not cli_topk.under_torchrun()
    tmp, q, keys, csr = data
    out = tmp / "one.npz"
    argv = ["topk", "--queries", str(tmp / "q.npy"), "--keys", str(tmp / "k.npy"), "-k", "4",
            "--exclude", str(tmp / "users.dat"), "--layout", "keys", "--quiet",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    v, i = kdfast.topk_scores(q, keys, 4, exclude=csr)
    z = np.load(out)
    assert np.array_equal(z["indices"], i.numpy()) and np.array_equal(z["values"], v.numpy())
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    assert cli_topk.under_torchrun()
