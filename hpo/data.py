"""Data sets as in-memory tensors with deterministic train/validation/test splits.

Nothing is ever downloaded: ``digits`` ships inside scikit-learn, the torchvision sets are read
from a local root in torchvision's own layout, and user files are ``.npz`` or ``.csv``. Every
trial of a study sees the same split, fixed by the data seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpo.errors import DataError
from hpo.spec import TORCHVISION_SETS, DataSpec

__all__ = ["DataError", "DataSpec", "Split", "Splits", "load_data"]


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (float32, standardised) and integer labels ``y`` of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    """The three splits of a data set and what a network needs to know about it."""

    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    name: str


def load_data(spec: DataSpec) -> Splits:
    """Read ``spec``'s data set, split it deterministically and standardise it.

    Inputs are standardised with the training split's statistics (per channel for images, per
    feature for tabular data), so the validation and test splits leak nothing into training.
    """
    if spec.dataset == "digits":
        x, y, x_test, y_test = _digits()
    elif spec.dataset in TORCHVISION_SETS:
        x, y, x_test, y_test = _torchvision(spec.dataset, spec.root)
    elif spec.dataset == "npz":
        x, y, x_test, y_test = _npz(spec.path)
    else:
        x, y, x_test, y_test = _csv(spec.path, spec.label_column)
    if spec.image_shape is not None and x.ndim == 2:
        x = _reshape(x, spec.image_shape, spec.path)
        x_test = None if x_test is None else _reshape(x_test, spec.image_shape, spec.path)

    rng = np.random.default_rng(spec.seed)
    if x_test is None:
        rest, test = _stratified_split(y, spec.test_fraction, rng)
        x, y, x_test, y_test = x[rest], y[rest], x[test], y[test]
    train, val = _stratified_split(y, spec.val_fraction, rng)
    if spec.limit is not None:
        train = train[: spec.limit]

    classes, y_all = np.unique(np.concatenate([y, y_test]), return_inverse=True)
    y, y_test = y_all[: len(y)], y_all[len(y):]
    mean, std = _statistics(x[train])
    as_split = lambda xs, ys: Split(  # noqa: E731
        torch.from_numpy(((xs - mean) / std).astype(np.float32)), torch.from_numpy(ys.astype(np.int64))
    )
    return Splits(
        train=as_split(x[train], y[train]),
        val=as_split(x[val], y[val]),
        test=as_split(x_test, y_test),
        input_shape=tuple(x.shape[1:]),
        num_classes=len(classes),
        name=spec.dataset,
    )


def _digits() -> tuple[np.ndarray, np.ndarray, None, None]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0)[:, None, :, :], digits.target, None, None


def _torchvision(name: str, root: Path | None) -> tuple[np.ndarray, ...]:
    try:
        from torchvision import datasets
    except ImportError as exc:
        raise DataError(
            f"dataset {name!r} needs torchvision: pip install 'dropout-hpo[vision]'"
        ) from exc
    cls = getattr(datasets, TORCHVISION_SETS[name])
    try:
        train, test = (cls(str(root), train=flag, download=False) for flag in (True, False))
    except RuntimeError as exc:
        raise DataError(
            f"{name} not found under {root} ({exc}); files are never downloaded: place "
            f"torchvision's {TORCHVISION_SETS[name]} files there"
        ) from exc
    return (*_images(train), *_images(test))


def _images(ds) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(ds.data, dtype=np.float32) / 255.0
    data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    return data, np.asarray(ds.targets)


def _npz(path: Path | None) -> tuple[np.ndarray | None, ...]:
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as .npz ({exc})") from exc
    missing = {"x", "y"} - arrays.keys()
    if missing:
        raise DataError(f"{path}: missing arrays {sorted(missing)} (need 'x' and 'y')")
    return (
        arrays["x"].astype(np.float32), arrays["y"],
        arrays.get("x_test", None), arrays.get("y_test", None),
    )


def _csv(path: Path | None, label_column: str | None) -> tuple[np.ndarray | None, ...]:
    try:
        table = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from exc
    names = table.dtype.names or ()
    label = label_column or (names[-1] if names else None)
    if label not in names:
        raise DataError(f"{path}: no label column {label!r} (columns: {', '.join(names)})")
    features = [n for n in names if n != label]
    x = np.stack([table[n] for n in features], axis=1).astype(np.float32)
    if np.isnan(x).any() or np.isnan(table[label]).any():
        raise DataError(f"{path}: non-numeric or missing values")
    return x, table[label].astype(np.int64), None, None


def _reshape(x: np.ndarray, shape: tuple[int, int, int], path: Path | None) -> np.ndarray:
    if int(np.prod(shape)) != x.shape[1]:
        raise DataError(f"{path}: rows have {x.shape[1]} values, image_shape {shape} needs {np.prod(shape)}")
    return x.reshape(len(x), *shape)


def _stratified_split(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) holding out ``fraction`` of each class."""
    kept, held = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return rng.permutation(np.concatenate(kept)), rng.permutation(np.concatenate(held))


def _statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = (0, 2, 3) if x.ndim == 4 else (0,) if x.ndim == 2 else tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes, keepdims=True)[0]
    std = x.std(axis=axes, keepdims=True)[0]
    return mean, np.where(std > 1e-8, std, 1.0)
