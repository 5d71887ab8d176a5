"""The user's own data, named by import path: a ``LightningDataModule`` whose loaders are used as
they are, or a callable returning ``(train, val)`` or ``(train, val, test)`` datasets (or a
mapping with those keys), which hpo batches.

A :class:`UserData` travels to Ray workers as its source alone (import path, arguments, code
folder) and is built again there, once per worker process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from hpo.user_code import UserCodeError, add_code_dir, instantiate, locate

#: Examples in the batch that checks a model before a study and probes its dropout sites.
EXAMPLE_SIZE = 8


@dataclass(frozen=True)
class DataSource:
    """Where the user's data comes from: ``{class_path, init_args}`` and the code folder."""

    spec: dict[str, Any]
    code_dir: str | None = None

    @property
    def key(self) -> str:
        return repr((self.spec, self.code_dir))


@dataclass
class UserData:
    """The user's data, loaded: a data module, or datasets.

    Args:
        source: What to build again in another process.
        datamodule: The ``LightningDataModule``, when the class path names one.
        datasets: ``(train, val, test)`` (``test`` may be ``None``) from a callable.
    """

    source: DataSource
    datamodule: Any = None
    datasets: tuple[Any, Any, Any] | None = None
    _example: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.source.spec["class_path"]

    def fit_arguments(self, batch_size: int, seed: int) -> dict[str, Any]:
        """What :func:`hpo.running.harness.fit_interruptible` fits on: the data module, or
        ``train`` and ``val`` loaders over the datasets (training shuffled by ``seed``)."""
        if self.datamodule is not None:
            return {"datamodule": self.datamodule}
        train, val, _ = self.datasets
        generator = torch.Generator().manual_seed(seed)
        return {
            "train": DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
            "val": DataLoader(val, batch_size=batch_size),
        }

    def split_loader(self, split: str, batch_size: int = 256) -> DataLoader | None:
        """An unshuffled loader of ``train``, ``val`` or ``test`` (``None`` when there is none)."""
        if self.datamodule is not None:
            return _datamodule_loader(self.datamodule, split)
        dataset = dict(zip(("train", "val", "test"), self.datasets))[split]
        return None if dataset is None else DataLoader(dataset, batch_size=batch_size)

    def example_batch(self) -> Any:
        """The first :data:`EXAMPLE_SIZE` training examples as one batch (the probe's and the
        check's input, and the logged model's input example). Drawing it leaves torch's global
        random generator as it was (a shuffling loader draws from it), so whether a trial is the
        first to ask does not change what it computes."""
        if self._example is None:
            with torch.random.fork_rng(devices=[]):
                self._example = _first_examples(self)
        return self._example

    def for_retraining(self) -> UserData:
        """The same data with training and validation examples together for training, and the
        test examples watched in validation's place (``hpo retrain``)."""
        parts = [self.split_loader(s) for s in ("train", "val", "test")]
        if parts[2] is None:
            raise UserCodeError("data", f"{self.name} gives no test data, which re-training is tested on once")
        train, val, test = (loader.dataset for loader in parts)
        return UserData(self.source, datasets=(ConcatDataset([train, val]), test, test))

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        loaded = _load_cached(state["source"])
        self.__dict__.update(loaded.__dict__)


def _datamodule_loader(datamodule: Any, split: str) -> Any:
    stage = {"train": "fit", "val": "validate", "test": "test"}[split]
    method = getattr(datamodule, f"{split}_dataloader", None)
    datamodule.setup(stage)
    try:
        return method()
    except NotImplementedError:  # Lightning's default for a loader the module does not define
        return None


def _first_examples(data: UserData) -> Any:
    if data.datasets is not None:
        train = data.datasets[0]
        return default_collate([train[i] for i in range(min(EXAMPLE_SIZE, len(train)))])
    loader = _datamodule_loader(data.datamodule, "train")
    return _head(next(iter(loader)), EXAMPLE_SIZE)


def _head(batch: Any, n: int) -> Any:
    """The first ``n`` examples of a collated batch (tensors, tuples, lists and mappings)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: _head(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_head(v, n) for v in batch)
    return batch


def _is_dataset(value: Any) -> bool:
    return isinstance(value, Dataset) or (hasattr(value, "__getitem__") and hasattr(value, "__len__"))


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or type(value).__name__ == "ndarray"


def _is_raw(part: Any) -> bool:
    """An array, or a tuple or list of arrays, where a dataset of examples belongs: indexing it
    gives rows (or whole arrays), not ``(inputs, label)`` examples."""
    return _is_array(part) or (isinstance(part, (tuple, list)) and bool(part) and all(_is_array(p) for p in part))


def _raw_kind(part: Any) -> str:
    if _is_array(part):
        return f"a {type(part).__name__}"
    return f"a {type(part).__name__} of {len(part)} {type(part[0]).__name__}s"


def _datasets(returned: Any, class_path: str) -> tuple[Any, Any, Any]:
    """``(train, val, test)`` from what a data callable returned, or a one-line error."""
    if isinstance(returned, Mapping):
        missing = {"train", "val"} - set(returned)
        if missing:
            raise UserCodeError(
                "data.class_path",
                f"{class_path} returned a mapping without {sorted(missing)}; "
                "expected keys train, val and optionally test",
            )
        parts = [returned["train"], returned["val"], returned.get("test")]
    elif isinstance(returned, Sequence) and not isinstance(returned, (str, bytes)) and len(returned) in (2, 3):
        parts = [*returned, None][:3]
    else:
        what = f"a {type(returned).__name__}" + (f" of {len(returned)} items" if isinstance(returned, Sequence) else "")
        raise UserCodeError(
            "data.class_path",
            f"{class_path} returned {what}; expected (train, val) or "
            "(train, val, test) datasets, or a LightningDataModule class",
        )
    for name, part in zip(("train", "val", "test"), parts):
        if part is None and name != "test":
            raise UserCodeError("data.class_path", f"{class_path} returned no {name} dataset")
        if _is_raw(part):
            raise UserCodeError(
                "data.class_path",
                f"{class_path} returned {_raw_kind(part)} as its {name} dataset; "
                "wrap inputs and labels in a Dataset, e.g. "
                "torch.utils.data.TensorDataset(x, y)",
            )
        if part is not None and not _is_dataset(part):
            raise UserCodeError(
                "data.class_path",
                f"{class_path} returned a {type(part).__name__} as its {name} "
                "dataset; expected a torch Dataset (with __getitem__ and __len__)",
            )
        if part is not None and len(part) == 0:
            raise UserCodeError("data.class_path", f"{class_path} returned an empty {name} dataset")
    return parts[0], parts[1], parts[2]


def load_user_data(source: DataSource) -> UserData:
    """Import and build the user's data; :class:`~hpo.user_code.UserCodeError` naming the key
    and the cause when it cannot be used."""
    import lightning.pytorch as pl

    add_code_dir(source.code_dir)
    spec = source.spec
    target = locate(spec["class_path"], "data.class_path")
    if isinstance(target, type) and issubclass(target, pl.LightningDataModule):
        return UserData(source, datamodule=instantiate(spec, "data"))
    if isinstance(target, type) and issubclass(target, Dataset):
        raise UserCodeError(
            "data.class_path",
            f"{spec['class_path']} is one Dataset; name a LightningDataModule, "
            "or a function returning (train, val) or (train, val, test) datasets",
        )
    returned = instantiate(spec, "data")
    if isinstance(returned, pl.LightningDataModule):
        return UserData(source, datamodule=returned)
    return UserData(source, datasets=_datasets(returned, spec["class_path"]))


_LOADED: dict[str, UserData] = {}


def _load_cached(source: DataSource) -> UserData:
    """:func:`load_user_data`, once per process for a given source (Ray workers run many
    trials)."""
    if source.key not in _LOADED:
        _LOADED.clear()
        _LOADED[source.key] = load_user_data(source)
    return _LOADED[source.key]
