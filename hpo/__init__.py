"""dropout-hpo: Bayesian optimisation of dropout configurations.

The public API; the CLI (``hpo``) is a thin layer over these names. They load on first use, so
importing the package (and running verbs that only read the store) does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "submit": "hpo.api",
    "resume": "hpo.api",
    "Spec": "hpo.spec",
    "load_spec": "hpo.spec",
    "parse_spec": "hpo.spec",
    "HpoError": "hpo.errors",
    "SpecError": "hpo.errors",
    "DataError": "hpo.errors",
    "StoreError": "hpo.errors",
    "DataSpec": "hpo.spec",
    "load_data": "hpo.data",
    "DropoutConfig": "hpo.models.dropout",
    "apply_max_norm": "hpo.models.dropout",
    "create_study": "hpo.running.study",
    "load_study": "hpo.running.study",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")


#: Modules that moved into the package's wings. Networks logged to MLflow before the move were
#: pickled under the old names; these aliases keep ``mlflow.pytorch.load_model`` working on them.
_MOVED = {"hpo.nets": "hpo.models.nets", "hpo.dropout": "hpo.models.dropout", "hpo.module": "hpo.models.module"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name in _MOVED else None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        module.__dict__.update(
            {k: v for k, v in vars(importlib.import_module(_MOVED[module.__name__])).items() if not k.startswith("__")}
        )


sys.meta_path.append(_MovedModules())
