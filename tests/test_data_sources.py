"""Data beyond one .npz in memory: folders of shards and memory-mapped .npy arrays (streamed),
and torch Datasets / DataLoaders through `po.optimize` (short epoch budgets, the digits CNN)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import plinio_onnx as po
from plinio_onnx.cli import main
from plinio_onnx.errors import DataError, NonFiniteError
from plinio_onnx.optimize import flow, optimize, streams
from plinio_onnx.optimize.data import ort_outputs, prepare
from plinio_onnx.optimize.shards import ShardSet, open_shards
from plinio_onnx.optimize.sources import DataSources, load_problem

from _util import MODELS, one_torch_thread  # noqa: F401  (the fixture, found by name)

# torch on one thread for the whole module (the fixture is module-scoped)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = MODELS / "digits_cnn.onnx"
DATA = MODELS / "digits.npz"
FAST = dict(target_params="50%", warmup_epochs=1, epochs=2, finetune_epochs=1, threads=1, quiet=True,
            checkpoint_dir=False)


@pytest.fixture(scope="module")
def digits():
    with np.load(DATA) as data:
        return data["x"], data["y"]


def _write_shards(folder, x, y, parts=4, *, compressed=()):
    folder.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
        save = np.savez_compressed if i in compressed else np.savez
        save(folder / f"shard_{i:03d}.npz", x=x[rows], y=y[rows])
    return folder


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-.npz run every streamed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "npz.onnx"
    return optimize(MODEL, DATA, output=out, **FAST), out


def _same_run(a, a_out, b, b_out):
    assert _sha(a_out) == _sha(b_out)                      # byte-identical model
    for key in ("before", "after", "splits", "layers", "task", "metric"):
        assert getattr(a, key) == getattr(b, key), key     # equal, not close


def test_four_npz_shards_give_the_single_npz_result_and_never_read_test_rows(reference, digits, tmp_path,
                                                                              monkeypatch):
    folder = _write_shards(tmp_path / "shards", *digits)
    monkeypatch.setattr(streams, "WINDOW_BYTES", 4096)      # a window per batch: many shard reads
    read: list[np.ndarray] = []
    reporting = []
    original_rows, original_scores = ShardSet.rows, flow.split_ort_scores

    def rows(self, index, names, check=None):
        if not reporting:
            read.append(np.asarray(index))
        return original_rows(self, index, names, check)

    def scores(*args, **kwargs):                            # the report's test metrics
        reporting.append(True)
        return original_scores(*args, **kwargs)

    monkeypatch.setattr(ShardSet, "rows", rows)
    monkeypatch.setattr(flow, "split_ort_scores", scores)
    out = tmp_path / "shards.onnx"
    report = optimize(MODEL, folder, output=out, **FAST)
    _same_run(*reference, report, out)
    assert any("4 .npz shards" in note and "first 256 samples of shard_000.npz" in note for note in report.notes)
    problem = load_problem(MODEL, DataSources(folder), "auto", 0, 0.2, 0.2)
    seen = np.unique(np.concatenate(read))
    assert len(seen) == len(problem.train) + len(problem.val)
    assert not np.intersect1d(seen, problem.test.indices).size


def test_memory_mapped_npy_folder_gives_the_single_npz_result(reference, digits, tmp_path):
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "x.npy", digits[0])
    np.save(folder / "y.npy", digits[1])
    out = tmp_path / "mmap.onnx"
    argv = ["optimize", str(MODEL), "--data", str(folder), "-o", str(out), "--target-params", "50%",
            "--warmup-epochs", "1", "--epochs", "2", "--finetune-epochs", "1", "--threads", "1", "--quiet"]
    assert main(argv) == 0
    report = json.loads(out.with_name("mmap.report.json").read_text())
    ref, ref_out = reference
    assert _sha(out) == _sha(ref_out)
    assert report["after"] == ref.after and report["before"] == ref.before and report["splits"] == ref.splits
    assert main(argv) == 0                                  # the same command resumes (the arrays' digest)
    assert json.loads(out.with_name("mmap.report.json").read_text())["resumed"] is True
    before = load_problem(MODEL, DataSources(folder), "auto", 0, 0.2, 0.2).identity[1]["shards.sha256"]
    np.save(folder / "y.npy", digits[1][::-1])              # other data: another fingerprint
    after = load_problem(MODEL, DataSources(folder), "auto", 0, 0.2, 0.2).identity[1]["shards.sha256"]
    assert not np.array_equal(before, after)


def test_every_layout_reads_the_rows_of_one_array(digits, tmp_path):
    x, y = digits
    index = np.random.default_rng(3).permutation(len(x))[:700]
    npz = _write_shards(tmp_path / "npz", x, y, parts=5, compressed=(1, 3))   # savez and savez_compressed
    folders = tmp_path / "folders"
    for i, rows in enumerate(np.array_split(np.arange(len(x)), 3)):
        (folders / f"part{i}").mkdir(parents=True)
        np.save(folders / f"part{i}" / "x.npy", np.asfortranarray(x[rows]))     # Fortran order too
        np.save(folders / f"part{i}" / "y.npy", y[rows])
    for folder, layout, count in ((npz, ".npz shards", 5), (folders, ".npy shard folders", 3)):
        shards = open_shards(folder)
        assert (shards.layout, len(shards.shards), len(shards)) == (layout, count, len(x))
        got = shards.rows(index, ["x", "y"])
        np.testing.assert_array_equal(got["x"], x[index])
        np.testing.assert_array_equal(got["y"], y[index])
        np.testing.assert_array_equal(shards.column("y"), y)
    assert open_shards(npz).shards[0].arrays["x"].offset is not None          # savez: memory-mapped
    assert open_shards(npz).shards[1].arrays["x"].offset is None              # compressed: read whole


def test_streamed_distillation_targets_are_the_teachers_outputs(digits, tmp_path):
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(600), 3)):
        np.savez(folder / f"s{i}.npz", input=digits[0][rows])
    problem = load_problem(MODEL, DataSources(folder), "auto", 0, 0.2, 0.2)
    assert problem.task.kind == "distill"
    index = np.arange(0, len(problem.train), 7)
    inputs, target = problem.train.take(index)
    (expected,) = ort_outputs(problem.base.to_onnx(), problem.input_names, [inputs[0].numpy()], source=None)
    np.testing.assert_array_equal(target[0].numpy(), expected)
    again = problem.train.take(index)[1][0]                # served from the per-sample cache
    np.testing.assert_array_equal(again.numpy(), expected)
    in_memory = prepare(MODEL, {"input": digits[0][:600]}, "auto", 0, 0.2, 0.2)
    assert problem.train.target_variance() == pytest.approx(in_memory.train.target_variance(), rel=1e-4)


def _error(capsys, folder, tmp_path) -> str:
    rc = main(["optimize", str(MODEL), "--data", str(folder), "-o", str(tmp_path / "o.onnx"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    return err


def test_bad_shards_are_one_clear_error_naming_the_shard(digits, tmp_path, capsys):
    x, y = digits
    renamed = _write_shards(tmp_path / "renamed", x, y)
    np.savez(renamed / "shard_002.npz", input=x[:50], y=y[:50])            # another input name
    err = _error(capsys, renamed, tmp_path)
    assert "shard_002.npz" in err and "'input'" in err
    shapes = _write_shards(tmp_path / "shapes", x, y)
    np.savez(shapes / "shard_001.npz", x=x[:50, :, :7, :7], y=y[:50])
    err = _error(capsys, shapes, tmp_path)
    assert "shard_001.npz" in err and "[1, 7, 7]" in err
    unlabeled = _write_shards(tmp_path / "unlabeled", x, y)
    np.savez(unlabeled / "shard_003.npz", x=x[:50])                        # one shard without y
    err = _error(capsys, unlabeled, tmp_path)
    assert "shard_003.npz" in err and "'y'" in err
    mixed = _write_shards(tmp_path / "mixed", x, y)
    np.save(mixed / "x.npy", x)
    assert "mixes" in _error(capsys, mixed, tmp_path)
    (tmp_path / "empty").mkdir()
    err = _error(capsys, tmp_path / "empty", tmp_path)
    assert "no data in the folder" in err and "empty" in err


def test_a_bad_row_in_a_later_shard_is_caught_when_read(digits, tmp_path):
    x, y = digits
    folder = _write_shards(tmp_path / "nan", x, y)
    bad = np.load(folder / "shard_003.npz")["x"].copy()
    bad[5, 0, 2, 2] = np.nan
    np.savez(folder / "shard_003.npz", x=bad, y=np.load(folder / "shard_003.npz")["y"])
    with pytest.raises(NonFiniteError, match="shard_003.npz"):
        optimize(MODEL, folder, output=tmp_path / "o.onnx", **FAST)
    labels = _write_shards(tmp_path / "labels", x, y)
    wrong = y[-400:].copy()
    wrong[0] = 12                                           # not a class of the model: seen when split
    np.savez(labels / "shard_003.npz", x=x[-400:], y=wrong)
    with pytest.raises(DataError, match="0..9"):
        optimize(MODEL, labels, output=tmp_path / "o.onnx", **FAST)


class _DictDigits(Dataset):
    """Items as dicts by input name, numpy values (as a user's Dataset might give)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input": self.x[i], "y": int(self.y[i])}


def test_torch_dataset_and_dataloader_with_workers_end_to_end(digits, tmp_path):
    x, y = (torch.from_numpy(a) for a in digits)
    options = FAST
    train, val, test = TensorDataset(x[:1100], y[:1100]), TensorDataset(x[1100:1450], y[1100:1450]), \
        TensorDataset(x[1450:], y[1450:])
    first = optimize(MODEL, output=tmp_path / "a.onnx", train=train, val=val, test=test, **options)

    def interrupt(phase, epoch, info):
        if phase == "search" and epoch == 1:
            raise KeyboardInterrupt

    resumable = {**options, "checkpoint_dir": None}
    with pytest.raises(KeyboardInterrupt):
        optimize(MODEL, output=tmp_path / "b.onnx", train=train, val=val, test=test, callback=interrupt, **resumable)
    again = optimize(MODEL, output=tmp_path / "b.onnx", train=train, val=val, test=test, **resumable)
    assert again.resumed
    assert _sha(tmp_path / "a.onnx") == _sha(tmp_path / "b.onnx")        # the run's seed batches a Dataset
    assert first.splits == {"train": 1100, "val": 350, "test": 347} and first.after["test"]["accuracy"] > 0.5
    assert first.after["params"] <= 0.5 * first.before["params"]
    loader = DataLoader(_DictDigits(digits[0][:1100], digits[1][:1100]), batch_size=32, shuffle=True,
                        num_workers=2, generator=torch.Generator().manual_seed(0))
    report = optimize(MODEL, output=tmp_path / "c.onnx", train=loader, val=DataLoader(val, batch_size=100), **options)
    assert report.splits == {"train": 1100, "val": 350, "test": 0} and report.after["test"] == {}
    assert report.after["params"] <= 0.5 * report.before["params"]
    assert any("DataLoader" in note and "no test data" in note for note in report.notes)
    (logits,) = ort_outputs(po.load(tmp_path / "c.onnx").to_onnx(), ["input"], [digits[0][1450:]], source=None)
    assert (logits.argmax(1) == digits[1][1450:]).mean() > 0.5


def test_dataset_errors_are_clear(digits, tmp_path):
    x = torch.from_numpy(digits[0])
    with pytest.raises(DataError, match="not both"):
        optimize(MODEL, DATA, output=tmp_path / "o.onnx", train=TensorDataset(x), val=TensorDataset(x))
    with pytest.raises(DataError, match="train= and val="):
        optimize(MODEL, output=tmp_path / "o.onnx", train=TensorDataset(x))
    with pytest.raises(DataError, match="3 parts"):
        optimize(MODEL, output=tmp_path / "o.onnx", train=TensorDataset(x, x, x), val=TensorDataset(x))
    with pytest.raises(DataError, match="Dataset or DataLoader"):
        optimize(MODEL, output=tmp_path / "o.onnx", train=[1, 2], val=TensorDataset(x))


def test_dataset_fingerprints_resume_only_on_the_same_data(digits):
    x, y = (torch.from_numpy(a) for a in digits)

    def identity(train, val):
        return load_problem(MODEL, DataSources(train=train, val=val), "auto", 0, 0.2, 0.2).identity[1]["datasets.sha256"]

    train, val = TensorDataset(x[:500], y[:500]), TensorDataset(x[500:700], y[500:700])
    shuffled = identity(DataLoader(train, batch_size=32, shuffle=True), val)
    assert np.array_equal(shuffled, identity(DataLoader(train, batch_size=32, shuffle=True), val))  # any order
    assert not np.array_equal(shuffled, identity(train, val))                    # a Dataset, not a loader
    assert not np.array_equal(identity(train, val), identity(TensorDataset(x[1:501], y[1:501]), val))
