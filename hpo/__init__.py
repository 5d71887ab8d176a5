"""dropout-hpo: Bayesian optimisation of dropout configurations.

The public API; the CLI (``hpo``) is a thin layer over these names. They load on first use, so
importing the package (and running verbs that only read the store) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "submit": "hpo.api", "resume": "hpo.api",
    "Spec": "hpo.spec", "load_spec": "hpo.spec", "parse_spec": "hpo.spec",
    "HpoError": "hpo.errors", "SpecError": "hpo.errors", "DataError": "hpo.errors",
    "StoreError": "hpo.errors",
    "DataSpec": "hpo.spec", "load_data": "hpo.data",
    "DropoutConfig": "hpo.dropout", "apply_max_norm": "hpo.dropout",
    "create_study": "hpo.study", "load_study": "hpo.study",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")
