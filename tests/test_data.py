"""Data sets: embedded digits, torchvision files under a local root, user .npz/.csv files."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hpo.data import DataError, DataSpec, load_data

try:
    import torchvision
except ImportError:  # pragma: no cover - depends on the install
    torchvision = None
needs_torchvision = pytest.mark.skipif(torchvision is None, reason="the vision extra is not installed")


def test_digits_ships_with_the_package_and_splits_three_ways(digits):
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(digits.test) == pytest.approx(0.2 * 1797, abs=10)


def _rows(split) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.x}


def test_splits_are_disjoint():
    splits = load_data(DataSpec(dataset="digits", seed=3))
    train, val, test = _rows(splits.train), _rows(splits.val), _rows(splits.test)
    # digits has a handful of exact duplicate images; the overlap can be no larger than that
    assert len(train & test) < 5 and len(train & val) < 5 and len(val & test) < 5


def test_same_seed_gives_the_same_split_and_another_seed_another():
    a, b, c = (load_data(DataSpec(seed=s)) for s in (1, 1, 2))
    assert torch.equal(a.val.y, b.val.y) and torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.val.x, c.val.x)


def test_splits_are_stratified():
    splits = load_data(DataSpec(seed=0))
    counts = torch.bincount(splits.val.y, minlength=10).float()
    assert counts.min() >= counts.max() - 2


def test_inputs_are_standardised_with_training_statistics_only(digits):
    assert digits.train.x.mean().abs() < 1e-4
    assert digits.train.x.std().item() == pytest.approx(1.0, abs=0.01)
    assert digits.val.x.mean().abs() > 1e-4  # val was not used for the statistics


def test_limit_caps_the_training_split():
    assert len(load_data(DataSpec(limit=100)).train) == 100


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format as in LeCun's MNIST files: magic, dims, then big-endian unsigned bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@needs_torchvision
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_loads_from_a_local_torchvision_root(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    for prefix, n in (("train", 120), ("t10k", 40)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    splits = load_data(DataSpec(dataset=name, root=tmp_path, val_fraction=0.25))
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert len(splits.test) == 40, "the official test split is used as is"
    assert len(splits.train) == 90 and len(splits.val) == 30


@needs_torchvision
def test_cifar10_loads_from_a_local_torchvision_root(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    # tiny files cannot match the real archive's checksums; everything else is torchvision's code
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", None] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", None]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": None})
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(np.arange(20) % 10)}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    splits = load_data(DataSpec(dataset="cifar10", root=tmp_path, val_fraction=0.1))
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    assert len(splits.test) == 20 and len(splits.train) + len(splits.val) == 100
    channel_means = splits.train.x.mean(dim=(0, 2, 3))
    assert channel_means.abs().max() < 1e-4, "standardised per channel"


@needs_torchvision
def test_missing_torchvision_files_say_where_they_were_expected(tmp_path):
    with pytest.raises(DataError, match="never downloaded"):
        load_data(DataSpec(dataset="mnist", root=tmp_path))


def test_npz_file_with_its_own_test_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(
        path,
        x=rng.normal(size=(100, 6)),
        y=rng.integers(0, 3, 100),
        x_test=rng.normal(size=(30, 6)),
        y_test=rng.integers(0, 3, 30),
    )
    splits = load_data(DataSpec(dataset="npz", path=path))
    assert splits.input_shape == (6,) and splits.num_classes == 3 and len(splits.test) == 30


def test_npz_rows_can_be_reshaped_into_images(tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, x=np.random.rand(50, 16), y=np.arange(50) % 2)
    assert load_data(DataSpec(dataset="npz", path=path, image_shape=(1, 4, 4))).input_shape == (1, 4, 4)


def test_npz_without_labels_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((5, 2)))
    with pytest.raises(DataError, match="missing arrays \\['y'\\]"):
        load_data(DataSpec(dataset="npz", path=path))


def test_csv_with_a_named_label_column(tmp_path):
    path = tmp_path / "data.csv"
    rng = np.random.default_rng(0)
    lines = ["label,a,b,c"] + [f"{i % 2},{rng.normal()},{rng.normal()},{rng.normal()}" for i in range(60)]
    path.write_text("\n".join(lines))
    splits = load_data(DataSpec(dataset="csv", path=path, label_column="label"))
    assert splits.input_shape == (3,) and splits.num_classes == 2


def test_csv_with_text_values_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,label\nx,1\ny,0\n")
    with pytest.raises(DataError, match="non-numeric"):
        load_data(DataSpec(dataset="csv", path=path))


def test_mnist1d_is_generated_without_a_download_with_its_standard_split(monkeypatch):
    import mnist1d.data

    def no_download(*args, **kwargs):
        raise AssertionError("mnist1d.get_dataset downloads; it must never be called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    first, again = load_data(DataSpec(dataset="mnist1d")), load_data(DataSpec(dataset="mnist1d"))
    assert first.input_shape == (40,) and first.num_classes == 10
    assert (len(first.train), len(first.val), len(first.test)) == (3200, 800, 1000)
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.test.y, again.test.y)
    assert abs(float(first.train.x.mean())) < 1e-3
