"""dropout-hpo: Bayesian optimisation of dropout configurations.

The public API; the CLI (``hpo``) is a thin layer over these names.
"""

from hpo.api import resume, submit
from hpo.data import DataSpec, load_data
from hpo.dropout import DropoutConfig, apply_max_norm
from hpo.spec import Spec, SpecError, load_spec, parse_spec
from hpo.study import create_study, load_study

__version__ = "0.1.0"

__all__ = [
    "DataSpec", "DropoutConfig", "Spec", "SpecError", "apply_max_norm", "create_study",
    "load_data", "load_spec", "load_study", "parse_spec", "resume", "submit",
]
