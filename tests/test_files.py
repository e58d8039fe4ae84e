"""Publishing outputs: all or nothing, no temporaries left behind, early checks of output paths."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deployq.core.files import AtomicOutputs, OutputPathError, check_output, clean_leftovers, json_text


def test_a_set_is_published_all_or_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "c.txt").mkdir()  # a folder where the last file of the set should go
    with pytest.raises(OutputPathError, match="c.txt is a folder"):
        with AtomicOutputs() as out:
            out.write_text(tmp_path / "a.txt", "new a")
            out.write_text(tmp_path / "b.txt", "new b")
            out.write_text(tmp_path / "c.txt", "new c")
    assert (tmp_path / "a.txt").read_text() == "old a" and not (tmp_path / "b.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "c.txt"]  # no temporaries


def test_a_failed_rename_puts_back_what_it_replaced(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").write_text("old b")
    real_replace = os.replace

    def failing(src, dst):
        if str(dst).endswith("b.txt") and ".tmp" in str(src):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        with AtomicOutputs() as out:
            out.write_text(tmp_path / "a.txt", "new a")
            out.write_text(tmp_path / "b.txt", "new b")
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b.txt").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_a_failed_set_leaves_no_folder_it_made(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicOutputs() as out:
            out.write_text(tmp_path / "new" / "deeper" / "a.txt", "a")
            raise RuntimeError("the second input failed")
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_killed_runs_are_removed_and_backups_restored(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.onnx.{dead.pid}.abcd1234.tmp.onnx"
    stale.write_text("half")
    backup = tmp_path / f".qparams.json.{dead.pid}.bak"
    backup.write_text("the user's previous file")
    mine = tmp_path / f".x.onnx.{os.getpid()}.abcd1234.tmp.onnx"  # a live process's: kept
    mine.write_text("in progress")
    user = tmp_path / ".hidden.123.notes"  # not ours: kept
    user.write_text("mine")
    assert clean_leftovers(tmp_path) == [stale]
    assert (tmp_path / "qparams.json").read_text() == "the user's previous file"
    assert mine.exists() and user.exists() and not backup.exists()


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="--out .*file is a file, not a folder"):
        check_output(tmp_path / "file", "--out", folder=True)
    with pytest.raises(OutputPathError, match="--json .*file is a file, so no folder"):
        check_output(tmp_path / "file" / "r.json", "--json")
    with pytest.raises(OutputPathError, match="--html .* is a folder"):
        check_output(tmp_path, "--html")
    assert check_output(tmp_path / "new" / "r.json", "--json") == tmp_path / "new" / "r.json"


def test_json_files_are_strict():
    text = json_text({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.slow
def test_sigterm_during_an_export_publishes_nothing_and_leaves_nothing(tmp_path):
    """SIGTERM is handled like Ctrl-C: the command unwinds, its temporaries are removed, exit 130."""
    import torch

    from deployq.examples import zoo

    torch.save(zoo.unet(width=16).state_dict(), tmp_path / "float.pth")
    import numpy as np
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).uniform(0, 1, (64, 3, 192, 192)).astype(np.float32))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    process = subprocess.Popen([sys.executable, "-m", "deployq", "export", "--ckpt", str(tmp_path / "float.pth"),
                                "--model", "deployq.examples.zoo:unet", "--model-kwargs", '{"width": 16}',
                                "--input-shape", "1,3,192,192", "--calib", str(tmp_path / "calib.npy"),
                                "--calib-batches", "64", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # importing, calibrating or exporting: each must unwind the same way
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
