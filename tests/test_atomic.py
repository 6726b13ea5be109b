"""Atomic writes: all or nothing, permissions from the umask, no temporary file left behind."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import plinio_onnx as po
from plinio_onnx.atomic import atomic_path, write_text
from plinio_onnx.optimize.checkpoint import Checkpoint

from _util import MODELS


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_write_creates_folders_and_honours_the_umask(tmp_path, umask_027):
    path = write_text(tmp_path / "new" / "report.md", "é → ok\n")
    assert path.read_text(encoding="utf-8") == "é → ok\n"
    assert _mode(path) == 0o640                     # 0666 & ~027, not mkstemp's 0600
    assert os.listdir(tmp_path / "new") == ["report.md"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_graph_save_and_checkpoint_files_use_the_helper(tmp_path, umask_027):
    saved = po.load(MODELS / "digits_cnn.onnx").save(tmp_path / "m.onnx")
    assert _mode(saved) == 0o640
    ckpt = Checkpoint(tmp_path / "ckpt", "fingerprint")
    ckpt.open()
    name = ckpt.save_arrays({"a": np.arange(3)}, "search-e0001.optim.npz")
    ckpt.commit("search", {"optim_file": name})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["search-e0001.optim.npz", "state.json"]
    assert _mode(tmp_path / "ckpt" / "state.json") == 0o640 == _mode(tmp_path / "ckpt" / name)
    np.testing.assert_array_equal(ckpt.load_arrays(name)["a"], np.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "m.onnx"]
