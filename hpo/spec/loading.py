"""Reading a search-space file: YAML in, a validated :class:`Spec` out, or one :class:`SpecError`
line naming the file, the key and what is wrong."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from hpo.errors import SpecError
from hpo.spec.checks import inconsistencies, mismatched_sections
from hpo.spec.study import Spec
from hpo.spec.user import NestedValueError

#: Union tags (:mod:`hpo.spec.values`, :class:`Spec`) that pydantic puts in an error's location.
_TAGS = ("value", "range", "choice", "user", "builtin")


def read_spec_file(path: str | Path) -> str:
    """The text of a search-space file; :class:`SpecError` when it cannot be read."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError(path, "", f"cannot read the file: {reason}") from exc


def load_spec(path: str | Path) -> Spec:
    """Read and validate a search-space file; raise :class:`SpecError` on any problem."""
    return parse_spec(read_spec_file(path), source=path)


def parse_spec(text: str, source: str | Path = "<spec>") -> Spec:
    """Validate search-space YAML ``text``; ``source`` names it in errors."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise SpecError(source, where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(source, "", f"expected a mapping of keys, got {type(raw).__name__}")
    for key, problem in mismatched_sections(raw):
        raise SpecError(source, key, problem)
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        key, problem = _first_error(exc)
        more = exc.error_count() - 1
        raise SpecError(source, key, problem + (f" (and {more} more problems)" if more else "")) from exc
    for key, problem in inconsistencies(spec):
        raise SpecError(source, key, problem)
    if spec.name is None:
        spec = spec.model_copy(update={"name": Path(str(source)).stem})
    return spec


def _first_error(exc: ValidationError) -> tuple[str, str]:
    error = exc.errors()[0]
    parts = [str(p) for p in error["loc"] if p not in _TAGS and not str(p).startswith("function-")]
    key = ".".join(parts) or "(top level)"
    kind = error["type"]
    nested = (error.get("ctx") or {}).get("error")
    if isinstance(nested, NestedValueError):
        return f"{key}.{nested.key}" if nested.key else key, nested.problem
    if kind == "extra_forbidden":
        return key, "unknown key"
    if kind == "missing":
        return key, "required key is missing"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = error.get("input")
    if kind not in ("value_error", "assertion_error") and isinstance(value, (str, int, float, bool)):
        message += f", got {value!r}"
    return key, message
